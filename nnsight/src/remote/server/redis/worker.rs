//! A worker of the broker: takes its model's jobs from the stream (first those a stopped process left), runs
//! them, stores their ends; and the thread renewing the claims on the jobs this process runs.

use super::scripts::{FINISH, RENEW, START};
use super::{
    create_group, end_event, event, now_ms, state_name, status_event, Shared, BLOCK, GROUP, MAX_STARTS, STATE_TTL,
};
use crate::remote::execute::Hosted;
use crate::remote::protocol;
use crate::remote::server::metrics::{log_job, JobFacts};
use crate::remote::server::{run_streaming, RESULT_TTL};
use crate::remote::wire::{json, JobState, WireError};
use ::redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};
use ::redis::{cmd, Connection, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

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
            Ok(Some(entry)) => {
                pause = Duration::from_millis(100);
                run_entry(shared, model, name, &stream, entry);
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

/// The next entry to run: one a silent worker has held longer than the reclaim time, else a new one (waiting up
/// to [`BLOCK`] for it).
fn next_entry(shared: &Shared, c: &mut Connection, stream: &str) -> ::redis::RedisResult<Option<StreamId>> {
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
        return Ok(Some(entry));
    }
    let read: Option<StreamReadReply> = cmd("XREADGROUP")
        .arg("GROUP")
        .arg(GROUP)
        .arg(&shared.consumer)
        .arg("COUNT")
        .arg(1)
        .arg("BLOCK")
        .arg(BLOCK.as_millis() as u64)
        .arg("STREAMS")
        .arg(stream)
        .arg(">")
        .query(c)?;
    Ok(read.and_then(|r| r.keys.into_iter().next()).and_then(|k| k.ids.into_iter().next()))
}

fn field(entry: &StreamId, name: &str) -> Option<Vec<u8>> {
    match entry.map.get(name)? {
        Value::BulkString(b) => Some(b.clone()),
        Value::SimpleString(s) => Some(s.clone().into_bytes()),
        _ => None,
    }
}

/// Runs one entry's job: marks it running here, runs it with its events going to Redis, stores its end.
fn run_entry<H: Hosted>(shared: &Arc<Shared>, model: &H, name: &str, stream: &str, entry: StreamId) {
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
        return;
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
            return;
        }
        Ok(-1) | Ok(0) => return finish(Err(WireError::Other { message: String::new() })), // only acknowledges
        Ok(-2) => {
            let message = format!(
                "job {id} was started {MAX_STARTS} times and its worker stopped each time (a crash, a kill, or a lost connection to Redis); it is not tried again"
            );
            return finish(Err(WireError::Other { message }));
        }
        Ok(_) => {}
    }
    let lost = Arc::new(AtomicBool::new(false));
    shared.in_flight.lock().unwrap_or_else(|p| p.into_inner()).push((
        stream.to_string(),
        entry.id.clone(),
        lost.clone(),
    ));
    let begun = std::time::Instant::now();
    // Waited since it was queued (the entry id is the time it was added, in ms).
    let queued_ms = entry.id.split('-').next().and_then(|ms| ms.parse::<u64>().ok()).unwrap_or_else(now_ms);
    let waited = Duration::from_millis(now_ms().saturating_sub(queued_ms));
    let request = protocol::decode_request(&bytes);
    let mut facts = match &request {
        Ok(r) => JobFacts::of(&r.job, name, None),
        Err(_) => JobFacts { model: name.to_string(), ..JobFacts::default() },
    };
    facts.key_id = field(&entry, "key").map(|k| String::from_utf8_lossy(&k).into_owned()).unwrap_or_else(|| "-".into());
    let outcome = match request {
        Ok(request) => run_captured(shared, model, &id, &request, &lost),
        Err(e) => Err(WireError::from(&e)),
    };
    let ran = begun.elapsed();
    shared.in_flight.lock().unwrap_or_else(|p| p.into_inner()).retain(|(_, e, _)| e != &entry.id);
    if let Some(mean) = shared.mean_ms.get(name) {
        let ms = begun.elapsed().as_millis() as u64;
        mean.store((mean.load(Ordering::Relaxed) * 7 + ms) / 8, Ordering::Relaxed);
    }
    let taken_over = lost.load(Ordering::Relaxed);
    let what = if taken_over {
        "taken_over"
    } else if outcome.is_ok() {
        "completed"
    } else {
        "error"
    };
    if let Some(metrics) = shared.metrics.get() {
        metrics.ended(name, what, waited, ran);
    }
    log_job(&id, &facts, waited, ran, what);
    if taken_over {
        // Another process took the job over (this one was thought dead): its run is the one that counts.
        return;
    }
    finish(outcome);
}

/// Decodes and runs a job as the in-process queue does (the same [`execute`]), its `log!` lines and `send!`
/// values appended to its events as they come; a panic fails only the job.
fn run_captured<H: Hosted>(
    shared: &Arc<Shared>,
    model: &H,
    id: &str,
    request: &protocol::Request,
    cancel: &AtomicBool,
) -> std::result::Result<Vec<u8>, WireError> {
    let (events, id) = (shared.clone(), id.to_string());
    let emit = move |name: &'static str, data: String| {
        let key = events.events(&id);
        let _ = events.pool.with(|c| cmd("RPUSH").arg(&key).arg(event(name, &data)).query::<()>(c));
    };
    run_streaming(model, &request.job, &shared.limits, cancel, emit)
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
