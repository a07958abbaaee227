//! The HTTP side of the server: the route table (and which routes need a key), the handlers, and the jobs the
//! server remembers for them.

use super::super::execute::Limits;
use super::super::protocol::{self, decode_request};
use super::super::wire::{json, JobState, ModelInfo, Submitted, WireError};
use super::auth::{self, Keys};
use super::jobs::{JobQueue, JobRecord, JobStore, QueuedJob, StoreError};
use super::metrics::{JobFacts, Metrics};
use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::from_fn_with_state;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the HTTP handlers share.
struct AppState {
    queue: Box<dyn JobQueue>,
    infos: HashMap<String, ModelInfo>,
    limits: Limits,
    jobs: Mutex<HashMap<String, Arc<JobRecord>>>,
    /// Job ids in submission order (the oldest finished ones are forgotten past [`KEEP_JOBS`]).
    order: Mutex<std::collections::VecDeque<String>>,
    next: AtomicU64,
    /// This process's job figures (`/metrics`).
    metrics: Arc<Metrics>,
}

/// How many jobs the server remembers.
const KEEP_JOBS: usize = 4096;

/// How long a finished job's result is kept (then fetching it is an error saying so; its state stays).
pub const RESULT_TTL: Duration = Duration::from_secs(15 * 60);

/// The routes over `queue`'s models (described by `infos`), every one behind the key check of `keys`. The check is
/// one layer, put on each route's methods rather than on the router, so that an unknown path (404) or a method the
/// route lacks (405) is answered without asking for a key.
pub(super) fn router(
    queue: Box<dyn JobQueue>,
    infos: HashMap<String, ModelInfo>,
    keys: Vec<String>,
    limits: Limits,
) -> Router {
    let metrics = Arc::new(Metrics::new(&queue.models()));
    queue.observe(metrics.clone());
    let state = Arc::new(AppState {
        metrics,
        queue,
        infos,
        limits,
        jobs: Mutex::new(HashMap::new()),
        order: Mutex::new(Default::default()),
        next: AtomicU64::new(1),
    });
    let key = from_fn_with_state(Keys::new(keys), auth::require_key);
    Router::new()
        .route("/v1/models", get(list_models).route_layer(key.clone()))
        .route("/v1/models/{name}", get(describe_model).route_layer(key.clone()))
        .route("/v1/jobs", post(submit).route_layer(key.clone()))
        .route("/v1/jobs/{id}", get(status).route_layer(key.clone()))
        .route("/v1/jobs/{id}/events", get(events).route_layer(key.clone()))
        .route("/v1/jobs/{id}/result", get(result).route_layer(key.clone()))
        .route("/metrics", get(show_metrics).route_layer(key))
        .route("/healthz", get(healthz))
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(state)
}

/// An error response.
pub(super) fn error(status: StatusCode, e: WireError) -> Response {
    let mut r = (status, json(&e).unwrap_or_default()).into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    if let WireError::Busy { retry_after_s } = e {
        if let Ok(v) = header::HeaderValue::from_str(&retry_after_s.to_string()) {
            r.headers_mut().insert(header::RETRY_AFTER, v);
        }
    }
    r
}

fn json_response(status: StatusCode, body: String) -> Response {
    let mut r = (status, body).into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    r
}

async fn list_models(State(state): State<Arc<AppState>>) -> Response {
    let models: Vec<serde_json::Value> = state
        .queue
        .models()
        .iter()
        .filter_map(|n| state.infos.get(n))
        .map(|i| serde_json::json!({ "name": i.name, "architecture": i.architecture }))
        .collect();
    json_response(
        StatusCode::OK,
        serde_json::json!({ "protocol": protocol::PROTOCOL_VERSION, "models": models }).to_string(),
    )
}

async fn describe_model(State(state): State<Arc<AppState>>, UrlPath(name): UrlPath<String>) -> Response {
    match state.infos.get(&name) {
        Some(info) => json_response(StatusCode::OK, json(info).unwrap_or_default()),
        None => error(StatusCode::NOT_FOUND, WireError::Other { message: format!("no model `{name}` on this server") }),
    }
}

async fn submit(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    let limit = state.limits.request_bytes;
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    let over = |given: u64| {
        error(StatusCode::PAYLOAD_TOO_LARGE, WireError::Limit { what: "request bytes".into(), limit, given })
    };
    // Read up to the limit; past it, read on without keeping (so that the client, still sending, gets the
    // answer rather than a broken connection), up to a bound, then refuse.
    let mut bytes = Vec::new();
    let mut total: u64 = 0;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = futures_util::StreamExt::next(&mut stream).await {
        let Ok(chunk) = chunk else {
            return error(StatusCode::BAD_REQUEST, WireError::Other { message: "the request body broke off".into() });
        };
        total += chunk.len() as u64;
        if total <= limit {
            bytes.extend_from_slice(&chunk);
        } else if total > limit.saturating_mul(16) {
            break;
        }
    }
    if total > limit || declared.is_some_and(|n| n > limit) {
        return over(declared.unwrap_or(total).max(total));
    }
    let request = match decode_request(&bytes) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, WireError::from(&e)),
    };
    if !state.infos.contains_key(&request.model) {
        let known = state.queue.models().join(", ");
        return error(
            StatusCode::NOT_FOUND,
            WireError::Other { message: format!("no model `{}` on this server (it serves: {known})", request.model) },
        );
    }
    // Refused before anything runs: too many nodes, a malformed graph, a function this program lacks.
    let nodes: u64 = request.job.graphs().map(|g| g.nodes.len() as u64).sum();
    if nodes > state.limits.graph_nodes {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            WireError::Limit { what: "graph nodes".into(), limit: state.limits.graph_nodes, given: nodes },
        );
    }
    for g in request.job.graphs() {
        if let Err(e) = crate::function::validate(g) {
            return error(StatusCode::BAD_REQUEST, WireError::from(&e));
        }
    }
    let authorization = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let facts = JobFacts::of(&request.job, &request.model, authorization);
    if state.queue.store().is_some() {
        let (model, key_id) = (facts.model.clone(), facts.key_id.clone());
        return match in_store(&state, move |s| s.submit(request, &key_id)).await {
            Ok(id) => {
                state.metrics.submitted(&model, false);
                json_response(StatusCode::ACCEPTED, json(&Submitted { id }).unwrap_or_default())
            }
            Err(r) => {
                state.metrics.submitted(&model, false);
                state.metrics.refused(&model);
                *r
            }
        };
    }
    let id = format!("job-{}", state.next.fetch_add(1, Ordering::Relaxed));
    let record = Arc::new(JobRecord::new(id.clone()));
    let model = facts.model.clone();
    record.observe(facts, state.metrics.clone());
    if let Err(full) = state.queue.push(QueuedJob { record: record.clone(), request }) {
        state.metrics.started(&model);
        state.metrics.refused(&model);
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            WireError::Busy { retry_after_s: full.retry_after.as_secs_f64().ceil() as u64 },
        );
    }
    remember(&state, record);
    json_response(StatusCode::ACCEPTED, json(&Submitted { id }).unwrap_or_default())
}

/// Keeps the record, forgetting the oldest finished jobs past [`KEEP_JOBS`] and results older than
/// [`RESULT_TTL`].
fn remember(state: &AppState, record: Arc<JobRecord>) {
    let mut jobs = state.jobs.lock().unwrap_or_else(|p| p.into_inner());
    let mut order = state.order.lock().unwrap_or_else(|p| p.into_inner());
    for job in jobs.values() {
        let ended = *job.ended.lock().unwrap_or_else(|p| p.into_inner());
        if ended.is_some_and(|t| t.elapsed() > RESULT_TTL) {
            job.result.lock().unwrap_or_else(|p| p.into_inner()).take();
        }
    }
    order.push_back(record.id.clone());
    jobs.insert(record.id.clone(), record);
    while order.len() > KEEP_JOBS {
        let Some(oldest) = order.front().cloned() else { break };
        if !jobs.get(&oldest).is_none_or(|j| j.status().state.is_final()) {
            break;
        }
        order.pop_front();
        jobs.remove(&oldest);
    }
}

fn find(state: &AppState, id: &str) -> std::result::Result<Arc<JobRecord>, Box<Response>> {
    state.jobs.lock().unwrap_or_else(|p| p.into_inner()).get(id).cloned().ok_or_else(|| {
        Box::new(error(StatusCode::NOT_FOUND, WireError::Other { message: format!("no job `{id}` on this server") }))
    })
}

async fn status(State(state): State<Arc<AppState>>, UrlPath(id): UrlPath<String>) -> Response {
    if state.queue.store().is_some() {
        return match stored_status(&state, &id).await {
            Ok(status) => json_response(StatusCode::OK, json(&status).unwrap_or_default()),
            Err(r) => *r,
        };
    }
    match find(&state, &id) {
        Ok(job) => json_response(StatusCode::OK, json(&job.status()).unwrap_or_default()),
        Err(r) => *r,
    }
}

async fn result(State(state): State<Arc<AppState>>, UrlPath(id): UrlPath<String>) -> Response {
    let (status, bytes) = if state.queue.store().is_some() {
        let status = match stored_status(&state, &id).await {
            Ok(s) => s,
            Err(r) => return *r,
        };
        let bytes = if status.state == JobState::Completed {
            let key = id.clone();
            match in_store(&state, move |s| s.result(&key)).await {
                Ok(b) => b.map(Arc::new),
                Err(r) => return *r,
            }
        } else {
            None
        };
        (status, bytes)
    } else {
        match find(&state, &id) {
            Ok(job) => (job.status(), job.result.lock().unwrap_or_else(|p| p.into_inner()).clone()),
            Err(r) => return *r,
        }
    };
    match status.state {
        JobState::Completed => {
            let Some(bytes) = bytes else {
                let message = format!("the result of job `{id}` was dropped {} s after it ended", RESULT_TTL.as_secs());
                return error(StatusCode::GONE, WireError::Other { message });
            };
            let mut r = Response::new(Body::from(bytes.as_ref().clone()));
            r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/octet-stream"));
            r
        }
        JobState::Error => {
            let e = status.error.unwrap_or(WireError::Other { message: "the job failed".into() });
            error(StatusCode::UNPROCESSABLE_ENTITY, e)
        }
        _ => error(StatusCode::CONFLICT, WireError::Other { message: format!("job `{id}` has not finished yet") }),
    }
}

/// Server-sent events of a job: every event so far, then each new one as it comes, until `end`.
async fn events(State(state): State<Arc<AppState>>, UrlPath(id): UrlPath<String>) -> Response {
    if state.queue.store().is_some() {
        return stored_events(state, id).await;
    }
    let job = match find(&state, &id) {
        Ok(j) => j,
        Err(r) => return *r,
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<std::result::Result<String, std::io::Error>>(64);
    tokio::spawn(async move {
        let mut next = 0;
        loop {
            let notified = job.changed.notified();
            let batch: Vec<(&'static str, String)> = {
                let events = job.events.lock().unwrap_or_else(|p| p.into_inner());
                events[next..].to_vec()
            };
            next += batch.len();
            for (name, data) in batch {
                if tx.send(Ok(format!("event: {name}\ndata: {data}\n\n"))).await.is_err() {
                    return; // the client went away
                }
                if name == "end" {
                    return;
                }
            }
            // Woken by the next event; a timeout also wakes it, as a keep-alive.
            if tokio::time::timeout(Duration::from_secs(15), notified).await.is_err()
                && tx.send(Ok(": keep-alive\n\n".into())).await.is_err()
            {
                return;
            }
        }
    });
    event_stream(rx)
}

/// The response streaming what `rx` receives, as server-sent events.
fn event_stream(rx: tokio::sync::mpsc::Receiver<std::result::Result<String, std::io::Error>>) -> Response {
    let stream = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
    let mut r = Response::new(Body::from_stream(stream));
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/event-stream"));
    r.headers_mut().insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-cache"));
    r
}

// Jobs kept in a shared store (a broker: any server process answers for any job). Its calls may wait on the
// network, so they run on tokio's blocking threads, never on the executor's.

/// `GET /healthz` (no key needed): `200 {"status":"ok"}` while the server, and the store of its queue if it has
/// one, answer; `503` with the reason otherwise.
async fn healthz(State(state): State<Arc<AppState>>) -> Response {
    if state.queue.store().is_some() {
        if let Err(r) = in_store(&state, |s| s.queue_lengths()).await {
            return *r;
        }
    }
    json_response(StatusCode::OK, r#"{"status":"ok"}"#.into())
}

/// `GET /metrics`: this process's job figures in Prometheus' text format.
async fn show_metrics(State(state): State<Arc<AppState>>) -> Response {
    let shared =
        if state.queue.store().is_some() { Some(in_store(&state, |s| s.queue_lengths()).await.ok()) } else { None };
    let body = match &shared {
        Some(Some(lengths)) => state.metrics.render(Some(lengths), true),
        Some(None) => state.metrics.render(Some(&[]), false),
        None => state.metrics.render(None, true),
    };
    let mut r = (StatusCode::OK, body).into_response();
    r.headers_mut()
        .insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
    r
}

/// Runs `f` on the queue's store on a blocking thread; a store error is the response to give.
async fn in_store<T: Send + 'static>(
    state: &Arc<AppState>,
    f: impl FnOnce(&dyn JobStore) -> std::result::Result<T, StoreError> + Send + 'static,
) -> std::result::Result<T, Box<Response>> {
    let state = state.clone();
    let answer = tokio::task::spawn_blocking(move || state.queue.store().map(f)).await;
    match answer {
        Ok(Some(Ok(v))) => Ok(v),
        Ok(Some(Err(StoreError::Full(full)))) => Err(Box::new(error(
            StatusCode::SERVICE_UNAVAILABLE,
            WireError::Busy { retry_after_s: full.retry_after.as_secs_f64().ceil() as u64 },
        ))),
        Ok(Some(Err(StoreError::Unavailable(message)))) => {
            Err(Box::new(error(StatusCode::SERVICE_UNAVAILABLE, WireError::Other { message })))
        }
        Ok(None) | Err(_) => Err(Box::new(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            WireError::Other { message: "the job store failed to answer".into() },
        ))),
    }
}

fn no_job(id: &str) -> Box<Response> {
    Box::new(error(StatusCode::NOT_FOUND, WireError::Other { message: format!("no job `{id}` on this server") }))
}

async fn stored_status(state: &Arc<AppState>, id: &str) -> std::result::Result<super::super::JobStatus, Box<Response>> {
    let key = id.to_string();
    in_store(state, move |s| s.status(&key)).await?.ok_or_else(|| no_job(id))
}

/// How often a follower of a stored job asks the store for new events.
const STORE_POLL: Duration = Duration::from_millis(50);

/// Server-sent events of a stored job, as [`events`] gives them for a job of this process: read from the store
/// every [`STORE_POLL`].
async fn stored_events(state: Arc<AppState>, id: String) -> Response {
    let key = id.clone();
    let first = match in_store(&state, move |s| s.events(&key, 0)).await {
        Ok(Some(first)) => first,
        Ok(None) => return *no_job(&id),
        Err(r) => return *r,
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<std::result::Result<String, std::io::Error>>(64);
    tokio::spawn(async move {
        let mut batch = first;
        let mut next = 0;
        let mut quiet = tokio::time::Instant::now();
        loop {
            next += batch.len();
            if !batch.is_empty() {
                quiet = tokio::time::Instant::now();
            }
            for (name, data) in batch {
                if tx.send(Ok(format!("event: {name}\ndata: {data}\n\n"))).await.is_err() {
                    return; // the client went away
                }
                if name == "end" {
                    return;
                }
            }
            if quiet.elapsed() > Duration::from_secs(15) {
                quiet = tokio::time::Instant::now();
                if tx.send(Ok(": keep-alive\n\n".into())).await.is_err() {
                    return;
                }
            }
            tokio::time::sleep(STORE_POLL).await;
            let key = id.clone();
            batch = match in_store(&state, move |s| s.events(&key, next)).await {
                Ok(Some(b)) => b,
                // Gone (expired) or the store unreachable: the stream ends without `end`, and the client asks again.
                Ok(None) | Err(_) => return,
            };
        }
    });
    event_stream(rx)
}
