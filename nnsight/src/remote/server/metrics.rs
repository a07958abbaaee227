//! What a server process counts and logs about its jobs: one structured log line per job (`tracing`, target
//! `nnsight::job`), and the counters, gauges and histograms `/metrics` gives in Prometheus' text format.
//!
//! The figures are this process's: with the Redis broker, each process counts the jobs submitted to it and the
//! jobs its workers ran; the queue length is the shared queue's.

use super::cobatch::BatchCounters;
use crate::exec::Job;
use crate::models::batch::Input;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The upper bounds of the latency histograms' buckets, in seconds.
const BOUNDS: [f64; 14] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];

/// A job as the log line and the counters describe it (never its key: a short hash of it).
#[derive(Debug, Clone, Default)]
pub struct JobFacts {
    /// The model it is for.
    pub model: String,
    /// The first 12 hex digits of the SHA-1 of its API key (`-` when no key was given).
    pub key_id: String,
    /// Nodes of its graphs (the block's and its edits').
    pub nodes: u64,
    /// Input rows (prompts) of its invokes.
    pub rows: u64,
}

impl JobFacts {
    /// The facts of `job` for `model`, submitted with the `Authorization` header `authorization`.
    pub fn of(job: &Job, model: &str, authorization: Option<&str>) -> Self {
        let rows = job
            .inputs()
            .into_iter()
            .map(|i| match i {
                Some(Input::Text(_)) => 1,
                Some(Input::Texts(t)) => t.len() as u64,
                Some(Input::Ids(ids)) => ids.len() as u64,
                None => 0,
            })
            .sum();
        let key = authorization.and_then(|h| h.strip_prefix("Bearer ")).map(str::trim).filter(|k| !k.is_empty());
        JobFacts {
            model: model.to_string(),
            key_id: key.map(key_id).unwrap_or_else(|| "-".into()),
            nodes: job.graphs().map(|g| g.nodes.len() as u64).sum(),
            rows,
        }
    }
}

/// A short, one-way name of an API key for logs: the first 12 hex digits of its SHA-1.
pub fn key_id(key: &str) -> String {
    let hex = sha1_smol::Sha1::from(key.as_bytes()).digest().to_string();
    hex[..12].to_string()
}

/// Writes the job's log line: id, model, key id, nodes, rows, queue wait, run time, outcome. A subscriber that
/// panics loses the line, never the worker thread writing it.
pub fn log_job(id: &str, facts: &JobFacts, queue_wait: Duration, run: Duration, outcome: &str) {
    let _ = std::panic::catch_unwind(|| log_line(id, facts, queue_wait, run, outcome));
}

fn log_line(id: &str, facts: &JobFacts, queue_wait: Duration, run: Duration, outcome: &str) {
    tracing::info!(
        target: "nnsight::job",
        job = id,
        model = facts.model.as_str(),
        key = facts.key_id.as_str(),
        nodes = facts.nodes,
        rows = facts.rows,
        queue_ms = queue_wait.as_millis() as u64,
        run_ms = run.as_millis() as u64,
        outcome,
        "job ended"
    );
}

#[derive(Default, Clone)]
struct Histogram {
    counts: [u64; BOUNDS.len()],
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        for (c, b) in self.counts.iter_mut().zip(BOUNDS) {
            if seconds <= b {
                *c += 1;
            }
        }
        self.sum += seconds;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, model: &str) {
        for (c, b) in self.counts.iter().zip(BOUNDS) {
            let _ = writeln!(out, "{name}_bucket{{model=\"{model}\",le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{model=\"{model}\",le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum{{model=\"{model}\"}} {}", self.sum);
        let _ = writeln!(out, "{name}_count{{model=\"{model}\"}} {}", self.count);
    }
}

#[derive(Default)]
struct Inner {
    /// Jobs of the in-process queue accepted and not started yet, by model.
    waiting: BTreeMap<String, u64>,
    submitted: BTreeMap<String, u64>,
    ended: BTreeMap<(String, String), u64>,
    waited: BTreeMap<String, Histogram>,
    ran: BTreeMap<String, Histogram>,
    /// Each model's co-batching counters (its workers keep them: the in-process queue's or the broker's).
    batches: BTreeMap<String, Arc<BatchCounters>>,
}

/// One of [`BatchCounters`]' figures.
type Counter = fn(&BatchCounters) -> u64;

/// A server process's job figures.
#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

impl Metrics {
    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        f(&mut self.inner.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Figures for `models` (each shown from the start, with zeros).
    pub fn new(models: &[String]) -> Self {
        let metrics = Metrics::default();
        metrics.with(|m| {
            for model in models {
                m.waiting.insert(model.clone(), 0);
                m.submitted.insert(model.clone(), 0);
            }
        });
        metrics
    }

    /// A job for `model` was submitted to this process; `local`: it waits in this process's queue (counted in
    /// the queue length until [`Metrics::started`]).
    pub fn submitted(&self, model: &str, local: bool) {
        self.with(|m| {
            *m.submitted.entry(model.to_string()).or_default() += 1;
            if local {
                *m.waiting.entry(model.to_string()).or_default() += 1;
            }
        });
    }

    /// A job of this process's queue left it (it started, or failed before starting).
    pub fn started(&self, model: &str) {
        self.with(|m| {
            if let Some(n) = m.waiting.get_mut(model) {
                *n = n.saturating_sub(1);
            }
        });
    }

    /// A submitted job was refused (the queue was full): counted with the outcome `busy`.
    pub fn refused(&self, model: &str) {
        self.with(|m| *m.ended.entry((model.to_string(), "busy".to_string())).or_default() += 1);
    }

    /// A job for `model` ended with `outcome` (`completed`, `error`) after waiting `queue_wait` and running
    /// `run`.
    pub fn ended(&self, model: &str, outcome: &str, queue_wait: Duration, run: Duration) {
        self.with(|m| {
            *m.ended.entry((model.to_string(), outcome.to_string())).or_default() += 1;
            m.waited.entry(model.to_string()).or_default().observe(queue_wait.as_secs_f64());
            m.ran.entry(model.to_string()).or_default().observe(run.as_secs_f64());
        });
    }

    /// Shows `counters` (a model's co-batching figures, kept by its workers) with the figures of `model`.
    pub fn batches(&self, model: &str, counters: Arc<BatchCounters>) {
        self.with(|m| m.batches.insert(model.to_string(), counters));
    }

    /// The figures in Prometheus' text format, with each model's queue length (`queued`: a shared queue's; `None`:
    /// this process's own) and whether the queue's store answers (`up`).
    pub fn render(&self, queued: Option<&[(String, u64)]>, up: bool) -> String {
        let mut out = String::new();
        let head = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        head(&mut out, "nnsight_up", "gauge", "Whether the server and its queue's store answer (1) or not (0).");
        let _ = writeln!(out, "nnsight_up {}", u8::from(up));
        head(&mut out, "nnsight_queue_length", "gauge", "Jobs waiting for a worker, by model.");
        self.with(|m| {
            let own: Vec<(String, u64)> = m.waiting.iter().map(|(k, v)| (k.clone(), *v)).collect();
            for (model, n) in queued.unwrap_or(&own) {
                let _ = writeln!(out, "nnsight_queue_length{{model=\"{model}\"}} {n}");
            }
            head(
                &mut out,
                "nnsight_jobs_submitted_total",
                "counter",
                "Jobs submitted to this process (refused ones too), by model.",
            );
            for (model, n) in &m.submitted {
                let _ = writeln!(out, "nnsight_jobs_submitted_total{{model=\"{model}\"}} {n}");
            }
            head(
                &mut out,
                "nnsight_jobs_total",
                "counter",
                "Jobs ended by this process's workers (or refused here: busy), by model and outcome.",
            );
            for ((model, outcome), n) in &m.ended {
                let _ = writeln!(out, "nnsight_jobs_total{{model=\"{model}\",outcome=\"{outcome}\"}} {n}");
            }
            head(&mut out, "nnsight_job_queue_seconds", "histogram", "Time jobs waited for a worker, by model.");
            for (model, h) in &m.waited {
                h.render(&mut out, "nnsight_job_queue_seconds", model);
            }
            head(&mut out, "nnsight_job_run_seconds", "histogram", "Time jobs ran, by model.");
            for (model, h) in &m.ran {
                h.render(&mut out, "nnsight_job_run_seconds", model);
            }
            if m.batches.is_empty() {
                return;
            }
            // Counters rather than a histogram: the mean batch size over any window is the ratio of the rates of
            // the first two.
            let series: [(&str, &str, Counter); 7] = [
                (
                    "nnsight_batches_total",
                    "Batches the workers ran (a job run alone is a batch of one), by model.",
                    BatchCounters::batches,
                ),
                ("nnsight_batch_jobs_total", "Jobs the workers ran in those batches, by model.", BatchCounters::jobs),
                (
                    "nnsight_merged_jobs_total",
                    "Jobs that ran merged with others and got their results so, by model.",
                    BatchCounters::merged_jobs,
                ),
                (
                    "nnsight_batch_reruns_total",
                    "Jobs run again alone because their batch failed, by model.",
                    BatchCounters::reruns,
                ),
                (
                    "nnsight_continuous_jobs_total",
                    "Generation jobs that ran in a continuous batch, by model.",
                    BatchCounters::continuous_jobs,
                ),
                (
                    "nnsight_decode_steps_total",
                    "Decode steps of continuous batches, by model.",
                    BatchCounters::decode_steps,
                ),
                (
                    "nnsight_decode_step_rows_total",
                    "Rows of those decode steps (over the steps: the mean rows per step), by model.",
                    BatchCounters::decode_step_rows,
                ),
            ];
            for (name, help, value) in series {
                head(&mut out, name, "counter", help);
                for (model, c) in &m.batches {
                    let _ = writeln!(out, "{name}{{model=\"{model}\"}} {}", value(c));
                }
            }
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_format_has_counters_and_cumulative_buckets() {
        let m = Metrics::new(&["tiny".to_string()]);
        m.submitted("tiny", true);
        m.submitted("tiny", true);
        m.started("tiny");
        m.ended("tiny", "completed", Duration::from_millis(3), Duration::from_millis(40));
        m.ended("tiny", "error", Duration::from_millis(20), Duration::from_secs(2));
        assert!(m.render(None, true).lines().any(|l| l == "nnsight_queue_length{model=\"tiny\"} 1"));
        let text = m.render(Some(&[("tiny".into(), 4)]), true);
        for line in [
            "nnsight_up 1",
            "nnsight_queue_length{model=\"tiny\"} 4",
            "nnsight_jobs_submitted_total{model=\"tiny\"} 2",
            "nnsight_jobs_total{model=\"tiny\",outcome=\"completed\"} 1",
            "nnsight_jobs_total{model=\"tiny\",outcome=\"error\"} 1",
            "nnsight_job_run_seconds_bucket{model=\"tiny\",le=\"0.05\"} 1",
            "nnsight_job_run_seconds_bucket{model=\"tiny\",le=\"2.5\"} 2",
            "nnsight_job_run_seconds_bucket{model=\"tiny\",le=\"+Inf\"} 2",
            "nnsight_job_queue_seconds_bucket{model=\"tiny\",le=\"0.005\"} 1",
            "nnsight_job_run_seconds_count{model=\"tiny\"} 2",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing from:\n{text}");
        }
    }

    #[test]
    fn a_key_is_logged_only_as_a_short_hash() {
        let id = key_id("secret1");
        assert_eq!(id.len(), 12);
        assert!(!id.contains("secret1"));
        assert_eq!(id, key_id("secret1"), "stable");
        assert_ne!(id, key_id("secret2"));
        let facts = JobFacts::of(
            &Job::Trace { graph: Default::default(), inputs: vec![Some("a".into()), None], edits: vec![] },
            "tiny",
            Some("Bearer secret1"),
        );
        assert_eq!((facts.key_id.as_str(), facts.rows), (id.as_str(), 1));
    }
}
