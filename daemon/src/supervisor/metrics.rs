//! What the core counts for metrics (plain data, no I/O): per pool, the
//! jobs that finished in each state and a histogram of their run times.
//! The reactor turns a [`MetricsSnapshot`] into the Prometheus text
//! (`crate::metrics`).

use super::*;

/// Buckets of a histogram: upper bounds in seconds (an implicit `+Inf`
/// follows).
pub type Bounds = [f64; 12];

/// Job run times: 1 ms to 5 min.
pub const RUN_TIME_BUCKETS: Bounds = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 300.0,
];

/// Store commits (write, fsync): 100 µs to 1 s.
pub const COMMIT_BUCKETS: Bounds = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// A histogram with fixed buckets: counts per bucket (not cumulative),
/// their total and the sum of the observations.
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    /// The buckets' upper bounds.
    pub bounds: &'static Bounds,
    /// One count per bound, then the `+Inf` one.
    pub counts: [u64; 13],
    /// Observations.
    pub count: u64,
    /// Their sum, in seconds.
    pub sum: f64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram::new(&RUN_TIME_BUCKETS)
    }
}

impl Histogram {
    /// An empty histogram with these buckets.
    pub fn new(bounds: &'static Bounds) -> Histogram {
        Histogram {
            bounds,
            counts: [0; 13],
            count: 0,
            sum: 0.0,
        }
    }

    /// The bucket an observation of `secs` falls in.
    pub fn bucket(bounds: &Bounds, secs: f64) -> usize {
        bounds
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(bounds.len())
    }

    /// Records one observation of `secs` seconds.
    pub fn observe(&mut self, secs: f64) {
        self.counts[Histogram::bucket(self.bounds, secs)] += 1;
        self.count += 1;
        self.sum += secs;
    }

    /// `(upper bound, observations in that bucket)`, ending with `+Inf`
    /// (the encoder makes them cumulative).
    pub fn buckets(&self) -> Vec<(f64, u64)> {
        self.bounds
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(self.counts)
            .collect()
    }
}

/// Per pool, since the daemon started (the store's earlier history is in
/// `succeeded` / `failed` of `status`, which count it too).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PoolStats {
    /// Jobs finished per final state, by [`JobState`] index; a job retried
    /// after it ended counts again when it ends again.
    pub finished: [u64; 7],
    /// Run time of each finished job's last attempt.
    pub run_time: Histogram,
}

impl PoolStats {
    /// A job ended in `state`; its last attempt ran `run_ms` (if it ran).
    pub fn finished(&mut self, state: JobState, run_ms: Option<u64>) {
        self.finished[state as usize] += 1;
        if let Some(ms) = run_ms {
            self.run_time.observe(ms as f64 / 1000.0);
        }
    }
}

/// One pool's figures for a metrics scrape.
#[derive(Debug, Clone)]
pub struct PoolMetrics {
    /// The pool's status line and workers (RSS filled in by the reactor).
    pub status: PoolStatus,
    /// Counted since start.
    pub stats: PoolStats,
    /// Its adaptive (or pinned) prefetch depth now.
    pub prefetch: u32,
}

/// Everything the core knows for a scrape.
#[derive(Debug, Clone)]
pub struct MetricsSnapshot {
    /// Per pool, in name order.
    pub pools: Vec<PoolMetrics>,
    /// Client files held for `payloads = "memory"` jobs, and the bound.
    pub memory_files_held: (usize, usize),
    /// Bytes of large memory-mode inputs sent as bytes, and the bound.
    pub memory_bytes_held: (u64, u64),
}

impl Supervisor {
    /// The figures for `metrics`.
    pub fn metrics(&self, now: Instant) -> MetricsSnapshot {
        let report = self
            .status(None, now)
            .unwrap_or(StatusReport { pools: Vec::new() });
        let pools = report
            .pools
            .into_iter()
            .map(|status| {
                let p = &self.pools[&status.name];
                PoolMetrics {
                    stats: p.jobs.stats.clone(),
                    prefetch: self.prefetch_now(&status.name) as u32,
                    status,
                }
            })
            .collect();
        MetricsSnapshot {
            pools,
            memory_files_held: self.memory_files_held(),
            memory_bytes_held: self.memory_bytes_held(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_end_at_inf() {
        let mut h = Histogram::default();
        for s in [0.0005, 0.001, 0.002, 2.0, 1000.0] {
            h.observe(s);
        }
        let c = h.buckets();
        assert_eq!(c.len(), RUN_TIME_BUCKETS.len() + 1);
        assert_eq!(c[0], (0.001, 2));
        assert_eq!(c[1], (0.005, 1));
        assert_eq!(c[c.len() - 3], (30.0, 0));
        assert_eq!(c[c.len() - 1], (f64::INFINITY, 1));
        assert_eq!(h.count, 5);
        assert!((h.sum - 1002.0035).abs() < 1e-9);
    }

    #[test]
    fn finished_counts_by_state() {
        let mut s = PoolStats::default();
        s.finished(JobState::Succeeded, Some(3));
        s.finished(JobState::Dead, None);
        assert_eq!(s.finished[JobState::Succeeded as usize], 1);
        assert_eq!(s.finished[JobState::Dead as usize], 1);
        assert_eq!(s.run_time.count, 1);
    }
}
