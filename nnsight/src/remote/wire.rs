//! The JSON messages of the HTTP API besides requests and results (see [`super::protocol`]): job states, model
//! descriptions, sent values, and errors.

use crate::graph::TensorData;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};

/// The answer to a submitted job.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Submitted {
    /// The job's id.
    pub id: String,
}

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Waiting for a worker.
    Queued,
    /// Running.
    Running,
    /// Finished; its result can be fetched.
    Completed,
    /// Failed (see the status's error).
    Error,
}

impl JobState {
    /// Whether the job has ended (completed or failed).
    pub fn is_final(self) -> bool {
        matches!(self, JobState::Completed | JobState::Error)
    }
}

/// A job's state and, if it failed, why.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobStatus {
    /// The job's id.
    pub id: String,
    /// Its state.
    pub state: JobState,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<WireError>,
}

/// What the server tells about one of its models: enough for a client to build a weightless handle of it
/// ([`crate::LanguageModel::connect`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelInfo {
    /// Its name on the server.
    pub name: String,
    /// The architecture's registry name (`llama`, `gpt2`).
    pub architecture: String,
    /// The configuration (Hugging Face field names).
    pub config: serde_json::Value,
    /// The tokenizer, as `tokenizer.json` holds it.
    pub tokenizer: String,
    /// BOS, EOS and padding ids.
    pub special: crate::load::tokenizer::SpecialTokens,
    /// Every parameter's dotted name, shape and dtype (a tch `Kind` name).
    pub parameters: Vec<(String, Vec<i64>, String)>,
}

/// A value a block sent while it ran (`send!`), as an event carries it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SentValue {
    /// The source text of the sent expression.
    pub label: String,
    /// The value.
    pub tensor: TensorData,
}

/// An error as the server reports it; [`WireError::into_error`] turns it back into the [`Error`] it was.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum WireError {
    /// No key, or a wrong one.
    Unauthorized {
        /// What is wrong.
        message: String,
    },
    /// Another protocol version.
    ProtocolVersion {
        /// The server's version.
        server: u32,
        /// The client's version.
        client: u32,
    },
    /// Over a limit.
    Limit {
        /// What is limited.
        what: String,
        /// The limit.
        limit: u64,
        /// What the request has.
        given: u64,
    },
    /// Past the time limit.
    TimeLimit {
        /// The limit in seconds.
        seconds: f64,
    },
    /// The queue is full.
    Busy {
        /// When to retry, in seconds.
        retry_after_s: u64,
    },
    /// A function the server does not have.
    UnknownFunction {
        /// Its name.
        name: String,
        /// The server's functions.
        known: Vec<String>,
    },
    /// Anything else, by its message.
    Other {
        /// The error's message.
        message: String,
    },
}

impl WireError {
    /// The error this stands for.
    pub fn into_error(self) -> Error {
        match self {
            WireError::Unauthorized { message } => Error::Remote { message: format!("unauthorized: {message}") },
            WireError::ProtocolVersion { server, client } => Error::ProtocolVersion { server, client },
            WireError::Limit { what, limit, given } => Error::Limit { what, limit, given },
            WireError::TimeLimit { seconds } => Error::TimeLimit { seconds },
            WireError::Busy { retry_after_s } => Error::Busy { retry_after_s },
            WireError::UnknownFunction { name, known } => Error::UnknownFunction { name, known },
            WireError::Other { message } => Error::Remote { message },
        }
    }
}

impl From<&Error> for WireError {
    fn from(e: &Error) -> Self {
        match e {
            Error::ProtocolVersion { server, client } => {
                WireError::ProtocolVersion { server: *server, client: *client }
            }
            Error::Limit { what, limit, given } => {
                WireError::Limit { what: what.clone(), limit: *limit, given: *given }
            }
            Error::TimeLimit { seconds } => WireError::TimeLimit { seconds: *seconds },
            Error::Busy { retry_after_s } => WireError::Busy { retry_after_s: *retry_after_s },
            Error::UnknownFunction { name, known } => {
                WireError::UnknownFunction { name: name.clone(), known: known.clone() }
            }
            other => WireError::Other { message: other.to_string() },
        }
    }
}

/// A JSON body, or an error naming what could not be encoded.
pub(crate) fn json<T: Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| Error::Protocol { message: format!("cannot encode a message: {e}") })
}
