//! A worker of the broker: takes its model's jobs from the stream (first those a stopped process left, each run
//! alone; else every waiting job up to the co-batching policy's rows, waiting up to its time for more), runs them
//! through co-batching (the in-process queue's code: [`run_taken`]), stores each job's end on its own; and the
//! thread renewing the claims on the jobs this process runs.

use super::scripts::{FINISH, RENEW, START};
use super::{
    create_group, end_event, event, now_ms, state_name, status_event, Shared, BLOCK, GROUP, MAX_STARTS, STATE_TTL,
};
use crate::remote::execute::Hosted;
use crate::remote::protocol;
use crate::remote::server::cobatch::{run_taken, shape_of, Emitter, Member, Taken};
use crate::remote::server::metrics::{log_job, JobFacts};
use crate::remote::server::RESULT_TTL;
use crate::remote::wire::{json, JobState, WireError};
use ::redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};
use ::redis::{cmd, Connection, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A worker: takes the model's jobs (first any a stopped process left behind, then new ones) and runs them,
/// until the queue is dropped. Redis going away is waited out, with a message.
pub(super) fn work<H: Hosted>(shared: &Arc<Shared>, model: &H, name: &str) {
    let stream = shared.stream(name);
    let mut con: Option<Connection> = None;
    let mut pause = Duration::from_millis(100);
    while !shared.stop.load(Ordering::Relaxed) {
        let c = match con.as_mut() {
            Some(c) => c,
            None => match shared.pool.connect() {
                Ok(c) => con.insert(c),
                Err(e) => {
                    eprintln!("nnsight serve: worker of `{name}`: {e}; retrying in {} ms", pause.as_millis());
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_secs(5));
                    continue;
                }
            },
        };
        match next_entry(shared, c, &stream) {
            Ok(Some((entry, reclaimed))) => {
                pause = Duration::from_millis(100);
                let mut taken: Vec<Taken<RedisJob>> = take(shared, model, name, &stream, entry).into_iter().collect();
                // A job taken over from a stopped process runs alone: it may be what stopped it.
                if !reclaimed && !taken.is_empty() {
                    if let Err(e) = gather(shared, c, model, name, &stream, &mut taken) {
                        // What was taken runs; the connection is made again for the next read.
                        eprintln!("nnsight serve: worker of `{name}`: {}", shared.pool.describe(&e));
                        con = None;
                    }
                }
                run_batch(shared, model, name, &stream, taken);
            }
            Ok(None) => pause = Duration::from_millis(100),
            Err(e) if e.code() == Some("NOGROUP") => {
                // Redis lost the group (restarted without persistence): make it again.
                if let Err(e) = create_group(shared, &stream) {
                    eprintln!("nnsight serve: worker of `{name}`: {e}");
                    std::thread::sleep(pause);
                }
            }
            Err(e) => {
                eprintln!(
                    "nnsight serve: worker of `{name}`: {}; retrying in {} ms",
                    shared.pool.describe(&e),
                    pause.as_millis()
                );
                con = None;
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// The next entry to run and whether it was taken over: one a silent worker has held longer than the reclaim
/// time, else a new one (waiting up to [`BLOCK`] for it).
fn next_entry(shared: &Shared, c: &mut Connection, stream: &str) -> ::redis::RedisResult<Option<(StreamId, bool)>> {
    let claimed: StreamAutoClaimReply = cmd("XAUTOCLAIM")
        .arg(stream)
        .arg(GROUP)
        .arg(&shared.consumer)
        .arg(shared.reclaim_after.as_millis() as u64)
        .arg("0-0")
        .arg("COUNT")
        .arg(1)
        .query(c)?;
    if let Some(entry) = claimed.claimed.into_iter().next() {
        return Ok(Some((entry, true)));
    }
    Ok(read_new(shared, c, stream, 1, Some(BLOCK))?.into_iter().next().map(|e| (e, false)))
}

/// Up to `count` new entries of the stream, waiting up to `block` (at least a millisecond) for one; at once
/// without.
fn read_new(
    shared: &Shared,
    c: &mut Connection,
    stream: &str,
    count: usize,
    block: Option<Duration>,
) -> ::redis::RedisResult<Vec<StreamId>> {
    let mut read = cmd("XREADGROUP");
    read.arg("GROUP").arg(GROUP).arg(&shared.consumer).arg("COUNT").arg(count.max(1));
    if let Some(block) = block {
        // BLOCK 0 would wait for ever.
        read.arg("BLOCK").arg((block.as_millis() as u64).max(1));
    }
    let read: Option<StreamReadReply> = read.arg("STREAMS").arg(stream).arg(">").query(c)?;
    Ok(read.and_then(|r| r.keys.into_iter().next()).map(|k| k.ids).unwrap_or_default())
}

/// Adds to `taken` the new entries that wait after it, as the co-batching policy says: up to its rows in all,
/// waiting up to its time for more (each read asking for as many entries as jobs the size of the first fit).
fn gather<H: Hosted>(
    shared: &Arc<Shared>,
    c: &mut Connection,
    model: &H,
    name: &str,
    stream: &str,
    taken: &mut Vec<Taken<RedisJob>>,
) -> ::redis::RedisResult<()> {
    let policy = &shared.policy;
    if !policy.enabled {
        return Ok(());
    }
    // A job that cannot merge fills the batch (as the in-process queue counts it).
    let rows = |s: &Option<(usize, usize)>| s.map_or(policy.max_rows, |s| s.0.max(1));
    let per_job = taken.first().map_or(1, |(_, s)| rows(s));
    let mut total: usize = taken.iter().map(|(_, s)| rows(s)).sum();
    let deadline = Instant::now() + policy.max_wait;
    while total < policy.max_rows && !shared.stop.load(Ordering::Relaxed) {
        let left = deadline.saturating_duration_since(Instant::now());
        // A wait under a millisecond reads what is there; a long one in steps within the connection's timeout.
        let block = (left >= Duration::from_millis(1)).then(|| left.min(BLOCK));
        let count = ((policy.max_rows - total) / per_job).max(1);
        let entries = read_new(shared, c, stream, count, block)?;
        if entries.is_empty() && left <= BLOCK {
            break;
        }
        for entry in entries {
            if let Some(t) = take(shared, model, name, stream, entry) {
                total += rows(&t.1);
                taken.push(t);
            }
        }
    }
    Ok(())
}

/// Runs the jobs taken (oldest first) through co-batching; each stores its end as it settles. A continuous batch
/// of generations among them reads the stream's new entries between its decode steps (without waiting):
/// generations join it, other jobs run there.
fn run_batch<H: Hosted>(shared: &Arc<Shared>, model: &H, name: &str, stream: &str, taken: Vec<Taken<RedisJob>>) {
    let Some(counters) = shared.counters.get(name) else { return };
    let n = taken.len() as u64;
    if n == 0 {
        return;
    }
    let begun = Instant::now();
    let mut more = || -> Vec<RedisJob> {
        if shared.stop.load(Ordering::Relaxed) {
            return Vec::new();
        }
        let entries = shared.pool.with(|c| read_new(shared, c, stream, shared.policy.max_rows, None));
        let entries = entries.unwrap_or_default();
        entries.into_iter().filter_map(|e| take(shared, model, name, stream, e)).map(|(job, _)| job).collect()
    };
    run_taken(model, taken, &shared.limits, &shared.policy, counters, Some(&mut more));
    if let Some(mean) = shared.mean_ms.get(name) {
        // The mean time between two jobs ending, for "retry after".
        let ms = begun.elapsed().as_millis() as u64 / n;
        mean.store((mean.load(Ordering::Relaxed) * 7 + ms) / 8, Ordering::Relaxed);
    }
}

fn field(entry: &StreamId, name: &str) -> Option<Vec<u8>> {
    match entry.map.get(name)? {
        Value::BulkString(b) => Some(b.clone()),
        Value::SimpleString(s) => Some(s.clone().into_bytes()),
        _ => None,
    }
}

/// Takes one entry's job: marks it running here (its claim renewed from now on) and decodes it; `None` when it
/// is not to run (not a job, ended already, started too often, undecodable: each acknowledged, and ended where
/// it must be; or Redis away: it stays pending and is taken over later).
fn take<H: Hosted>(
    shared: &Arc<Shared>,
    model: &H,
    name: &str,
    stream: &str,
    entry: StreamId,
) -> Option<Taken<RedisJob>> {
    let id = field(&entry, "id").map(|b| String::from_utf8_lossy(&b).into_owned());
    let (Some(id), Some(bytes)) = (id, field(&entry, "request")) else {
        // Not a job of ours: acknowledged and dropped.
        let _ = shared.pool.with(|c| {
            ::redis::pipe()
                .cmd("XACK")
                .arg(stream)
                .arg(GROUP)
                .arg(&entry.id)
                .cmd("XDEL")
                .arg(stream)
                .arg(&entry.id)
                .query::<()>(c)
        });
        return None;
    };
    let running = status_event(&id, JobState::Running, None);
    let started: std::result::Result<i64, String> = shared.pool.with(|c| {
        START
            .key(shared.job(&id))
            .key(shared.events(&id))
            .arg(&shared.consumer)
            .arg(now_ms())
            .arg(&running)
            .arg(MAX_STARTS)
            .invoke(c)
    });
    let finish = |outcome: std::result::Result<Vec<u8>, WireError>| finish(shared, stream, &entry.id, &id, outcome);
    match started {
        // Taken by another worker meanwhile, or Redis away: the entry stays pending and is taken over later.
        Err(e) => {
            eprintln!("nnsight serve: job {id}: {e}");
            return None;
        }
        Ok(-1) | Ok(0) => {
            finish(Err(WireError::Other { message: String::new() })); // only acknowledges
            return None;
        }
        Ok(-2) => {
            let message = format!(
                "job {id} was started {MAX_STARTS} times and its worker stopped each time (a crash, a kill, or a lost connection to Redis); it is not tried again"
            );
            finish(Err(WireError::Other { message }));
            return None;
        }
        Ok(_) => {}
    }
    let lost = Arc::new(AtomicBool::new(false));
    shared.in_flight.lock().unwrap_or_else(|p| p.into_inner()).push((
        stream.to_string(),
        entry.id.clone(),
        lost.clone(),
    ));
    // Waited since it was queued (the entry id is the time it was added, in ms).
    let queued_ms = entry.id.split('-').next().and_then(|ms| ms.parse::<u64>().ok()).unwrap_or_else(now_ms);
    let waited = Duration::from_millis(now_ms().saturating_sub(queued_ms));
    let request = protocol::decode_request(&bytes);
    let mut facts = match &request {
        Ok(r) => JobFacts::of(&r.job, name, None),
        Err(_) => JobFacts { model: name.to_string(), ..JobFacts::default() },
    };
    facts.key_id = field(&entry, "key").map(|k| String::from_utf8_lossy(&k).into_owned()).unwrap_or_else(|| "-".into());
    let claim = Claim {
        shared: shared.clone(),
        model: name.to_string(),
        stream: stream.to_string(),
        entry: entry.id,
        id,
        lost,
        facts,
        waited,
        begun: Instant::now(),
    };
    match request {
        Ok(request) => {
            let shape = shape_of(model, &request.job, &shared.policy, &shared.limits);
            Some((RedisJob { claim, request }, shape))
        }
        Err(e) => {
            claim.end(Err(WireError::from(&e)));
            None
        }
    }
}

/// A job this process has started: where it is in Redis, and what its log line and the figures need.
struct Claim {
    shared: Arc<Shared>,
    model: String,
    stream: String,
    entry: String,
    id: String,
    /// Set when another process took the job over (this one was thought dead): its run stops, and stores nothing.
    lost: Arc<AtomicBool>,
    facts: JobFacts,
    waited: Duration,
    begun: Instant,
}

impl Claim {
    /// Counts and logs the job's end and stores it (unless the job was taken over: the other run is the one that
    /// counts); its claim is no longer renewed.
    fn end(&self, outcome: std::result::Result<Vec<u8>, WireError>) {
        let shared = &self.shared;
        let ran = self.begun.elapsed();
        shared.in_flight.lock().unwrap_or_else(|p| p.into_inner()).retain(|(_, e, _)| e != &self.entry);
        let taken_over = self.lost.load(Ordering::Relaxed);
        let what = if taken_over {
            "taken_over"
        } else if outcome.is_ok() {
            "completed"
        } else {
            "error"
        };
        if let Some(metrics) = shared.metrics.get() {
            metrics.ended(&self.model, what, self.waited, ran);
        }
        log_job(&self.id, &self.facts, self.waited, ran, what);
        if !taken_over {
            finish(shared, &self.stream, &self.entry, &self.id, outcome);
        }
    }
}

/// A job of the broker as co-batching runs it: its `log!` lines, `send!` values and batch events are appended to
/// its events in Redis, and its end is stored there.
pub(super) struct RedisJob {
    claim: Claim,
    request: protocol::Request,
}

impl Member for RedisJob {
    fn job(&self) -> &crate::exec::Job {
        &self.request.job
    }
    fn emitter(&self) -> Emitter {
        let (shared, key) = (self.claim.shared.clone(), self.claim.shared.events(&self.claim.id));
        Arc::new(move |name, data| {
            let _ = shared.pool.with(|c| cmd("RPUSH").arg(&key).arg(event(name, &data)).query::<()>(c));
        })
    }
    /// Nothing to do: [`take`] marked it running in Redis.
    fn start(&self) {}
    fn cancel(&self) -> &AtomicBool {
        &self.claim.lost
    }
    fn settle(&self, outcome: std::result::Result<Vec<u8>, WireError>) {
        self.claim.end(outcome);
    }
}

/// Stores the job's end (once: a job that ended already is left as it is) and acknowledges its entry, trying
/// again a few times if Redis is away (else the entry stays pending and another worker runs the job again).
fn finish(shared: &Shared, stream: &str, entry: &str, id: &str, outcome: std::result::Result<Vec<u8>, WireError>) {
    let (state, error, bytes) = match outcome {
        Ok(bytes) => (JobState::Completed, None, bytes),
        Err(e) => (JobState::Error, Some(e), Vec::new()),
    };
    let error_json = error.as_ref().map(|e| json(e).unwrap_or_default()).unwrap_or_default();
    let status = status_event(id, state, error);
    let end = end_event(state);
    for attempt in 0..5 {
        let stored: std::result::Result<i64, String> = shared.pool.with(|c| {
            FINISH
                .key(shared.job(id))
                .key(shared.events(id))
                .key(shared.result(id))
                .key(stream)
                .arg(state_name(state))
                .arg(&error_json)
                .arg(&bytes[..])
                .arg(RESULT_TTL.as_secs())
                .arg(now_ms())
                .arg(&shared.consumer)
                .arg(&status)
                .arg(&end)
                .arg(STATE_TTL.as_secs())
                .arg(GROUP)
                .arg(entry)
                .invoke(c)
        });
        match stored {
            Ok(_) => return,
            Err(e) => {
                eprintln!("nnsight serve: job {id}: cannot store its end (try {}): {e}", attempt + 1);
                std::thread::sleep(Duration::from_millis(200 << attempt));
            }
        }
    }
}

/// Renews the claims of the entries this process runs, every quarter of the reclaim time; an entry no longer
/// this process's is marked lost (its run stops at the next module call).
pub(super) fn renew_claims(shared: &Shared) {
    let every = (shared.reclaim_after / 4).max(Duration::from_millis(50));
    while !shared.stop.load(Ordering::Relaxed) {
        std::thread::sleep(every);
        let held: Vec<(String, String, Arc<AtomicBool>)> =
            shared.in_flight.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for (stream, entry, lost) in held {
            let renewed: std::result::Result<i64, String> =
                shared.pool.with(|c| RENEW.key(&stream).arg(GROUP).arg(&shared.consumer).arg(&entry).invoke(c));
            match renewed {
                Ok(0) => lost.store(true, Ordering::Relaxed),
                Ok(_) => {}
                Err(e) => eprintln!("nnsight serve: cannot renew the claim on a running job: {e}"),
            }
        }
    }
}
