//! Commit latency for metrics: the store thread records how long each
//! batch took to write and sync; the loop reads a snapshot when it is
//! scraped. Plain atomics, written by one thread and read by another: a
//! metric sample, not state anything waits on.

use crate::supervisor::metrics::{Histogram, COMMIT_BUCKETS};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// The commit-latency histogram, shared by the store thread and the loop.
#[derive(Debug, Default)]
pub struct CommitLatency {
    counts: [AtomicU64; 13],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

impl CommitLatency {
    /// One commit took `d`.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        self.counts[Histogram::bucket(&COMMIT_BUCKETS, secs)].fetch_add(1, Relaxed);
        self.sum_ns
            .fetch_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX), Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    /// What was recorded so far (the fields are read one by one, so a
    /// scrape during a commit may see it in some and not others).
    pub fn snapshot(&self) -> Histogram {
        let mut h = Histogram::new(&COMMIT_BUCKETS);
        for (c, a) in h.counts.iter_mut().zip(&self.counts) {
            *c = a.load(Relaxed);
        }
        h.count = self.count.load(Relaxed);
        h.sum = self.sum_ns.load(Relaxed) as f64 / 1e9;
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_what_was_observed() {
        let l = CommitLatency::default();
        l.observe(Duration::from_micros(300));
        l.observe(Duration::from_millis(20));
        let h = l.snapshot();
        assert_eq!(h.count, 2);
        assert_eq!(h.buckets()[2], (0.0005, 1));
        assert!((h.sum - 0.0203).abs() < 1e-9);
    }
}
