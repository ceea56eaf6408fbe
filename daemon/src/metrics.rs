//! The Prometheus text exposition (format 0.0.4) of what the daemon
//! knows, for `jobvisorctl metrics` and the HTTP listener (`crate::http`).
//! Built on the loop from a snapshot ([`Scrape`]) and encoded with the
//! `prometheus-client` crate; every metric is named `jobvisor_…`, with its
//! unit in the name, and labelled by `pool` (and `worker`, the slot id).
//!
//! `jobvisor_jobs_succeeded_total` and `jobvisor_jobs_failed_total` are
//! what `status` shows (the store's history included, so they start from
//! it when the daemon starts); `jobvisor_jobs_finished_total{state}` and
//! the run-time histogram count since the daemon started.

use crate::supervisor::metrics::{Histogram, MetricsSnapshot};
use ipc_proto::control::{JobState, PoolState, WorkerState};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, MetricEncoder};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

/// Everything one scrape shows.
#[derive(Debug)]
pub struct Scrape {
    /// The core's figures (workers' RSS filled in).
    pub core: MetricsSnapshot,
    /// Store commit durations.
    pub commit: Histogram,
    /// The daemon's own resident set, bytes.
    pub daemon_rss: u64,
    /// When the daemon started, seconds since the epoch.
    pub start_time: f64,
}

/// The text for `scrape`.
pub fn render(scrape: Scrape) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(scrape));
    let mut text = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut text, &registry);
    text
}

/// One family: its descriptor, then one sample per label set.
fn family<'a, L: prometheus_client::encoding::EncodeLabelSet + 'a>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    samples: impl IntoIterator<Item = (L, Sample)>,
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in samples {
        let fam = m.encode_family(&labels)?;
        sample(fam, value)?;
    }
    Ok(())
}

/// A sample's value.
enum Sample {
    Int(i64),
    Float(f64),
    Count(u64),
    Hgram(Histogram),
}

fn sample(mut m: MetricEncoder, v: Sample) -> Result<(), std::fmt::Error> {
    type NoExemplar = prometheus_client::encoding::NoLabelSet;
    match v {
        Sample::Int(n) => m.encode_gauge(&n),
        Sample::Float(x) => m.encode_gauge(&x),
        Sample::Count(n) => m.encode_counter::<NoExemplar, u64, f64>(&n, None),
        Sample::Hgram(h) => m.encode_histogram::<NoExemplar>(h.sum, h.count, &h.buckets(), None),
    }
}

type Labels = Vec<(&'static str, String)>;

/// A family of one sample without labels.
fn one(s: Sample) -> Vec<(Labels, Sample)> {
    vec![(Vec::new(), s)]
}

fn pool_label(name: &str) -> Labels {
    vec![("pool", name.to_string())]
}

impl Collector for Scrape {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use MetricType::{Counter, Gauge, Histogram as Hist};
        use Sample::*;
        let pools = &self.core.pools;
        let per_pool = |f: &dyn Fn(&crate::supervisor::metrics::PoolMetrics) -> Sample| {
            pools
                .iter()
                .map(|p| (pool_label(&p.status.name), f(p)))
                .collect::<Vec<_>>()
        };
        family(
            &mut enc,
            "jobvisor_jobs_queued",
            "Jobs waiting for a worker.",
            Gauge,
            per_pool(&|p| Int(p.status.queued as i64)),
        )?;
        family(
            &mut enc,
            "jobvisor_jobs_running",
            "Jobs handed to a worker.",
            Gauge,
            per_pool(&|p| Int(p.status.running as i64)),
        )?;
        family(
            &mut enc,
            "jobvisor_jobs_succeeded",
            "Jobs that succeeded (as in status: the store's history included).",
            Counter,
            per_pool(&|p| Count(p.status.succeeded)),
        )?;
        family(
            &mut enc,
            "jobvisor_jobs_failed",
            "Jobs that ended without success: failed, cancelled, timed out or dead (as in status).",
            Counter,
            per_pool(&|p| Count(p.status.failed)),
        )?;
        let finished = pools.iter().flat_map(|p| {
            JobState::ALL
                .into_iter()
                .filter(|s| s.is_terminal())
                .map(move |s| {
                    let mut l = pool_label(&p.status.name);
                    l.push(("state", s.as_str().to_string()));
                    (l, Count(p.stats.finished[s as usize]))
                })
        });
        family(
            &mut enc,
            "jobvisor_jobs_finished",
            "Jobs that ended since the daemon started, by final state.",
            Counter,
            finished,
        )?;
        family(
            &mut enc,
            "jobvisor_job_run_seconds",
            "Run time of finished jobs' last attempt, since the daemon started.",
            Hist,
            per_pool(&|p| Hgram(p.stats.run_time.clone())),
        )?;
        family(
            &mut enc,
            "jobvisor_pool_workers",
            "Workers the pool should have (configured or scaled).",
            Gauge,
            per_pool(&|p| Int(i64::from(p.status.desired_workers))),
        )?;
        family(
            &mut enc,
            "jobvisor_pool_workers_ready",
            "Workers ready or busy.",
            Gauge,
            per_pool(&|p| {
                Int(p
                    .status
                    .workers
                    .iter()
                    .filter(|w| matches!(w.state, WorkerState::Ready | WorkerState::Busy))
                    .count() as i64)
            }),
        )?;
        let states = pools.iter().flat_map(|p| {
            [
                PoolState::Running,
                PoolState::Paused,
                PoolState::Failed,
                PoolState::Stopping,
            ]
            .into_iter()
            .map(move |s| {
                let mut l = pool_label(&p.status.name);
                l.push(("state", s.as_str().to_string()));
                (l, Int(i64::from(p.status.state == s)))
            })
        });
        family(
            &mut enc,
            "jobvisor_pool_state",
            "1 for the pool's current state, 0 for the others.",
            Gauge,
            states,
        )?;
        family(
            &mut enc,
            "jobvisor_pool_prefetch",
            "Jobs a worker may hold at once now (adaptive unless the pool pins prefetch).",
            Gauge,
            per_pool(&|p| Int(i64::from(p.prefetch))),
        )?;
        let workers = |f: &dyn Fn(&ipc_proto::control::WorkerStatus) -> Option<Sample>| {
            pools
                .iter()
                .flat_map(|p| p.status.workers.iter().map(move |w| (p, w)))
                .filter_map(|(p, w)| {
                    let mut l = pool_label(&p.status.name);
                    l.push(("worker", w.id.to_string()));
                    Some((l, f(w)?))
                })
                .collect::<Vec<_>>()
        };
        family(
            &mut enc,
            "jobvisor_worker_restarts",
            "Times the worker slot's process was replaced after it died.",
            Counter,
            workers(&|w| Some(Count(u64::from(w.restarts)))),
        )?;
        family(
            &mut enc,
            "jobvisor_worker_up",
            "1 if the slot's process is ready or busy.",
            Gauge,
            workers(&|w| {
                Some(Int(i64::from(matches!(
                    w.state,
                    WorkerState::Ready | WorkerState::Busy
                ))))
            }),
        )?;
        family(
            &mut enc,
            "jobvisor_worker_resident_bytes",
            "Resident set size of the slot's current process.",
            Gauge,
            workers(&|w| w.pid.map(|_| Int(w.rss_bytes as i64))),
        )?;
        family(
            &mut enc,
            "jobvisor_worker_jobs",
            "Jobs done by the slot's current process.",
            Gauge,
            workers(&|w| Some(Int(w.jobs_done as i64))),
        )?;
        family(
            &mut enc,
            "jobvisor_store_commit_seconds",
            "Time to write and sync one batch of the job store.",
            Hist,
            one(Hgram(self.commit.clone())),
        )?;
        let (files, files_max) = self.core.memory_files_held;
        family(
            &mut enc,
            "jobvisor_memory_payload_files",
            "Client files held for payloads = \"memory\" jobs until they end.",
            Gauge,
            one(Int(files as i64)),
        )?;
        family(
            &mut enc,
            "jobvisor_memory_payload_files_max",
            "Most client files held for payloads = \"memory\" jobs; more submits are refused.",
            Gauge,
            one(Int(files_max as i64)),
        )?;
        let (bytes, bytes_max) = self.core.memory_bytes_held;
        family(
            &mut enc,
            "jobvisor_memory_payload_bytes",
            "Bytes of large inputs sent as bytes, held for payloads = \"memory\" jobs.",
            Gauge,
            one(Int(bytes as i64)),
        )?;
        family(
            &mut enc,
            "jobvisor_memory_payload_bytes_max",
            "Most such bytes held; more submits are refused.",
            Gauge,
            one(Int(bytes_max as i64)),
        )?;
        family(
            &mut enc,
            "jobvisor_daemon_resident_bytes",
            "Resident set size of jobvisord.",
            Gauge,
            one(Int(self.daemon_rss as i64)),
        )?;
        family(
            &mut enc,
            "jobvisor_daemon_start_time_seconds",
            "When jobvisord started, seconds since the epoch.",
            Gauge,
            one(Float(self.start_time)),
        )?;
        Ok(())
    }
}
