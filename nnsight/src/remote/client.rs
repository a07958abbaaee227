//! The client: a server's address, a model name on it and an API key ([`Remote`]); runs jobs there and brings
//! back what they saved.

use super::protocol::{self, Job, Request, PROTOCOL_VERSION};
use super::wire::{JobStatus, ModelInfo, Submitted, WireError};
use crate::exec::{LocalGenerateTarget, LocalTarget, Program};
use crate::graph::Graph;
use crate::interleave::Finished;
use crate::models::batch::Input;
use crate::{Error, GenerateOptions, Result};
use std::io::{BufRead, BufReader, Read};
use std::time::Duration;

/// The environment variable a [`Remote`] takes its API key from.
pub const KEY_VARIABLE: &str = "NNSIGHT_API_KEY";

/// A model on a server: where blocks run when they name it (`intervene!(model.trace(input).remote(&server) { .. })`)
/// or when the model was connected to it ([`crate::LanguageModel::connect`]).
///
/// The API key comes from `NNSIGHT_API_KEY` unless [`Remote::key`] gives one. A blocking run submits the job,
/// follows its events (lines the block's `log!` prints arrive as they are printed, through the same path as a
/// local `log!`; values it `send!`s reach [`crate::interleave::capture_sent`]), then fetches the saved values. A
/// dropped connection while waiting is retried (a few times, with a growing pause); a failed submit is reported,
/// never repeated, so a job never runs twice.
#[derive(Clone)]
pub struct Remote {
    url: String,
    model: String,
    key: Option<String>,
    retries: u32,
    /// Connections, with time limits: 10 s to connect, 60 s of silence on a read (the server sends a keep-alive
    /// on an event stream every 15 s), so a vanished server is an error, not a hang.
    agent: ureq::Agent,
}

impl std::fmt::Debug for Remote {
    /// The key is never shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote")
            .field("url", &self.url)
            .field("model", &self.model)
            .field("key", &self.key.as_ref().map(|_| "…"))
            .finish()
    }
}

impl Remote {
    /// The model `model` on the server at `url` (`http://host:port`), with the key of `NNSIGHT_API_KEY` if set.
    pub fn new(url: impl Into<String>, model: impl Into<String>) -> Self {
        let url = url.into().trim_end_matches('/').to_string();
        let key = std::env::var(KEY_VARIABLE).ok().filter(|k| !k.is_empty());
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(10))
            .timeout_read(Duration::from_secs(60))
            .build();
        Remote { url, model: model.into(), key, retries: 4, agent }
    }

    /// This handle with API key `key`.
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// This handle retrying a dropped connection `n` times while it waits for a job (default 4).
    pub fn retries(mut self, n: u32) -> Self {
        self.retries = n;
        self
    }

    /// The server's address.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The model's name on the server.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// The model's configuration, tokenizer and parameter shapes (what [`crate::LanguageModel::connect`] builds
    /// a weightless handle from).
    pub fn model_info(&self) -> Result<ModelInfo> {
        let path = format!("/v1/models/{}", self.model);
        let body = self.read(self.get(&path))?;
        serde_json::from_slice(&body).map_err(|e| remote(format!("the server's model description is malformed: {e}")))
    }

    /// Runs `job` and waits for its saved values. A busy server (its queue full) is asked again after the
    /// pause it names (at most 30 s each time, as many times as [`Remote::retries`] allows): a refused job was
    /// not queued, so it never runs twice.
    pub fn run(&self, job: Job) -> Result<Finished> {
        let mut tries = 0;
        let id = loop {
            match self.submit(job.clone()) {
                Err(Error::Busy { retry_after_s }) if tries < self.retries => {
                    tries += 1;
                    std::thread::sleep(Duration::from_secs(retry_after_s.clamp(1, 30)));
                }
                other => break other?,
            }
        };
        self.wait(&id)
    }

    /// Runs a session's `blocks` as one job ([`Job::Session`]) and waits for it; each block's saved values.
    pub fn run_session(&self, blocks: Vec<crate::exec::SessionBlock>) -> Result<Vec<Finished>> {
        let sizes: Vec<usize> = blocks.iter().map(|b| b.job.graphs().next().map_or(0, |g| g.nodes.len())).collect();
        let all = self.run(Job::Session { blocks })?;
        crate::exec::session::split(all, &sizes)
    }

    /// Submits `job` without waiting; returns its id (for [`Remote::status`], [`Remote::wait`], [`Remote::fetch`]).
    pub fn submit(&self, job: Job) -> Result<String> {
        let request = Request { protocol: PROTOCOL_VERSION, model: self.model.clone(), job };
        let bytes = protocol::encode_request(&request)?;
        let response = self
            .auth(self.agent.post(&format!("{}/v1/jobs", self.url)))
            .set("Content-Type", "application/octet-stream")
            .send_bytes(&bytes)
            .map_err(Box::new);
        let body = self.read(response)?;
        let s: Submitted =
            serde_json::from_slice(&body).map_err(|e| remote(format!("the server's answer is malformed: {e}")))?;
        Ok(s.id)
    }

    /// The job's state now.
    pub fn status(&self, id: &str) -> Result<JobStatus> {
        let body = self.read(self.get(&format!("/v1/jobs/{id}")))?;
        serde_json::from_slice(&body).map_err(|e| remote(format!("the server's answer is malformed: {e}")))
    }

    /// The job's saved values, if it has finished (an error if it failed, or has not finished yet).
    pub fn fetch(&self, id: &str) -> Result<Finished> {
        let body = self.read(self.get(&format!("/v1/jobs/{id}/result")))?;
        protocol::decode_result(&body)
    }

    /// Waits for the job, relaying its log lines and sent values as they come, then fetches its saved values.
    pub fn wait(&self, id: &str) -> Result<Finished> {
        self.wait_with(id, &mut |_| {})
    }

    /// [`Remote::wait`], also handing `on_status` each state the job goes through (queued, running, completed or
    /// error) as the server reports it: a subscription to the job.
    pub fn wait_with(&self, id: &str, on_status: &mut dyn FnMut(&JobStatus)) -> Result<Finished> {
        let mut tries = 0;
        let mut seen = 0;
        loop {
            match self.follow(id, &mut seen, on_status) {
                Ok(()) => break,
                // Follow again: the events not relayed yet come, even if the job has ended meanwhile.
                Err(e @ Error::Remote { .. }) if tries < self.retries && is_transport(&e) => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(100 << tries));
                }
                Err(e) => return Err(e),
            }
        }
        self.fetch(id)
    }

    /// Follows the job's events until its end. The server sends every event from the first on each connection;
    /// `seen` counts those relayed already, so that after a reconnect nothing is relayed twice.
    fn follow(&self, id: &str, seen: &mut usize, on_status: &mut dyn FnMut(&JobStatus)) -> Result<()> {
        let response = self.get(&format!("/v1/jobs/{id}/events"));
        let response = match response {
            Ok(r) => r,
            Err(e) => return Err(self.error_of(e)),
        };
        let reader = BufReader::new(response.into_reader());
        let mut event = String::new();
        let mut index = 0;
        for line in reader.lines() {
            let line =
                line.map_err(|e| transport(format!("the connection dropped while waiting for job {id}: {e}")))?;
            if let Some(name) = line.strip_prefix("event:") {
                event = name.trim().to_string();
            } else if let Some(data) = line.strip_prefix("data:") {
                let data = data.trim();
                index += 1;
                if index <= *seen {
                    continue;
                }
                *seen = index;
                match event.as_str() {
                    "status" => {
                        // The first event of a job is its bare state; later ones are whole statuses.
                        let status = serde_json::from_str::<JobStatus>(data).ok().or_else(|| {
                            let v: serde_json::Value = serde_json::from_str(data).ok()?;
                            let state = serde_json::from_value(v.get("state")?.clone()).ok()?;
                            Some(JobStatus { id: id.to_string(), state, error: None })
                        });
                        if let Some(status) = status {
                            on_status(&status);
                        }
                    }
                    "log" => {
                        let v: serde_json::Value = serde_json::from_str(data).unwrap_or_default();
                        if let Some(l) = v.get("line").and_then(|l| l.as_str()) {
                            crate::interleave::emit_log(l.to_string());
                        }
                    }
                    "value" => {
                        let v: super::wire::SentValue = serde_json::from_str(data)
                            .map_err(|e| remote(format!("a sent value is malformed: {e}")))?;
                        crate::interleave::emit_sent(v.label, v.tensor.to_tensor(tch::Device::Cpu)?);
                    }
                    "end" => return Ok(()),
                    _ => {}
                }
            }
        }
        Err(transport(format!("the connection dropped while waiting for job {id}")))
    }

    fn get(&self, path: &str) -> std::result::Result<ureq::Response, Box<ureq::Error>> {
        self.auth(self.agent.get(&format!("{}{path}", self.url))).call().map_err(Box::new)
    }

    fn auth(&self, request: ureq::Request) -> ureq::Request {
        match &self.key {
            Some(k) => request.set("Authorization", &format!("Bearer {k}")),
            None => request,
        }
    }

    /// The body of a successful response, or the error the server or the connection gave.
    fn read(&self, response: std::result::Result<ureq::Response, Box<ureq::Error>>) -> Result<Vec<u8>> {
        let response = response.map_err(|e| self.error_of(e))?;
        let mut body = Vec::new();
        response
            .into_reader()
            .read_to_end(&mut body)
            .map_err(|e| transport(format!("the connection to {} dropped: {e}", self.url)))?;
        Ok(body)
    }

    /// The server's error (as it sent it), or a clear one for a connection failure.
    fn error_of(&self, e: Box<ureq::Error>) -> Error {
        match *e {
            ureq::Error::Status(code, response) => {
                let text = response.into_string().unwrap_or_default();
                match serde_json::from_str::<WireError>(&text) {
                    Ok(w) => w.into_error(),
                    Err(_) => remote(format!("the server answered {code}: {text}")),
                }
            }
            ureq::Error::Transport(t) => transport(format!("cannot reach the server at {}: {t}", self.url)),
        }
    }
}

fn remote(message: String) -> Error {
    Error::Remote { message }
}

/// A connection failure (marked so that waiting retries it).
fn transport(message: String) -> Error {
    Error::Remote { message: format!("{TRANSPORT}{message}") }
}

const TRANSPORT: &str = "connection: ";

fn is_transport(e: &Error) -> bool {
    matches!(e, Error::Remote { message } if message.starts_with(TRANSPORT))
}

/// A block on a `LanguageModel` runs on the server: its graph, inputs and the model's edits travel as a job.
impl crate::exec::Backend<Input> for Remote {
    fn trace(
        &self,
        target: &dyn LocalTarget<Input>,
        program: Program<'_>,
        inputs: &[Option<Input>],
    ) -> Result<Finished> {
        let edits = target.run_edits().iter().map(|g| Graph::clone(g)).collect();
        self.run(Job::Trace { graph: program.graph.clone(), inputs: inputs.to_vec(), edits })
    }
}

/// A generation block runs on the server; `on_token` cannot travel (the block's `send!`s stream instead).
impl crate::exec::GenerateBackend<Input, GenerateOptions> for Remote {
    fn generate(
        &self,
        target: &dyn LocalGenerateTarget<Input, GenerateOptions>,
        program: Program<'_>,
        inputs: &[Option<Input>],
        options: &GenerateOptions,
    ) -> Result<Finished> {
        if options.on_token.is_some() {
            return Err(Error::InvalidInput {
                message: "`on_token` cannot run on a server: a remote generation streams what the block sends instead"
                    .into(),
            });
        }
        let edits = target.run_edits().iter().map(|g| Graph::clone(g)).collect();
        let graph = program.graph.clone();
        self.run(Job::Generate { graph, inputs: inputs.to_vec(), options: options.clone(), edits })
    }
}
