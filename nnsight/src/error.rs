//! The one error type of the runtime. Every variant says where (a file, a tensor name or a module path) and what
//! was expected, so that a message alone is enough to act on.

use std::path::PathBuf;

/// Result type of the runtime.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while loading, building or running a model.
///
/// `Debug` prints the same message as `Display`, so that `fn main() -> nnsight::Result<()>` reports errors
/// readably.
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file or folder the loader needs does not exist.
    #[error("file not found: {path} ({what})")]
    FileNotFound {
        /// The path that was looked for.
        path: PathBuf,
        /// What the file was needed for.
        what: String,
    },

    /// Reading a file failed.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },

    /// Writing a file (or making its folder) failed.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file or folder.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },

    /// A file exists but its contents are not what its format requires.
    #[error("{path}: {message}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What was wrong, and where in the file.
        message: String,
    },

    /// A `config.json` (or the GGUF metadata standing in for it) lacks a field or holds a bad value.
    #[error("config {path}: {message}")]
    Config {
        /// Where the configuration came from.
        path: PathBuf,
        /// The field and what was expected of it.
        message: String,
    },

    /// A GGUF tensor is stored in a quantization this crate cannot dequantize.
    #[error("{path}: tensor `{tensor}` has GGUF type {ggml_type} ({type_name}), which is not supported; supported: {supported}")]
    UnsupportedTensorType {
        /// The GGUF file.
        path: PathBuf,
        /// The tensor's name in the file.
        tensor: String,
        /// The numeric GGML type id.
        ggml_type: u32,
        /// The type's llama.cpp name, where known.
        type_name: String,
        /// The supported types, comma separated.
        supported: String,
    },

    /// The checkpoint's architecture has no implementation registered.
    #[error("architecture `{found}` is not supported; supported architectures: {supported}")]
    UnsupportedArchitecture {
        /// The `model_type` / `general.architecture` found.
        found: String,
        /// Registered architectures, comma separated.
        supported: String,
    },

    /// A typed load (`LanguageModel::<Llama>::load`) found a checkpoint of another architecture.
    #[error("{path} holds a `{found}` model, but a `{expected}` model was asked for")]
    WrongArchitecture {
        /// The checkpoint.
        path: PathBuf,
        /// The architecture asked for.
        expected: String,
        /// The architecture found.
        found: String,
    },

    /// Tensors that the architecture needs are absent from the checkpoint.
    #[error("{path}: missing tensors ({count}): {names}", count = names.len(), names = names.join(", "))]
    MissingTensors {
        /// The checkpoint.
        path: PathBuf,
        /// Names (Hugging Face state-dict keys) of the missing tensors.
        names: Vec<String>,
    },

    /// The checkpoint holds tensors that the architecture has no place for.
    #[error("{path}: unexpected tensors ({count}): {names}", count = names.len(), names = names.join(", "))]
    UnexpectedTensors {
        /// The checkpoint.
        path: PathBuf,
        /// Names of the tensors left over.
        names: Vec<String>,
    },

    /// A tensor of the checkpoint, or a value given to a module, has the wrong shape.
    #[error("shape mismatch for `{name}`: expected {expected:?}, found {found:?}")]
    ShapeMismatch {
        /// Tensor name or module path.
        name: String,
        /// The shape required.
        expected: Vec<i64>,
        /// The shape given.
        found: Vec<i64>,
    },

    /// The tokenizer could not be built, or failed on an input.
    #[error("tokenizer: {message}")]
    Tokenizer {
        /// What failed.
        message: String,
    },

    /// The input given to a model is unusable (empty batch, empty prompt, bad token id, ...).
    #[error("invalid input: {message}")]
    InvalidInput {
        /// What was wrong.
        message: String,
    },

    /// An index outside a dimension: a module list indexed past its length (found while the graph is built), or a
    /// value (a module's output, an inner point, a computed value) indexed past a dimension's size (found as soon
    /// as the value's shape is known: in a scan, or when the value arrives, before libtorch is asked).
    #[error("{}", index_message(module, *index, *len, *dim))]
    IndexOutOfRange {
        /// The list's path (`model.model.layers`), or the value indexed (`` `model.model.layers.0.self_attn.head_output` output ``).
        module: String,
        /// The index given.
        index: i64,
        /// The list's length, or the dimension's size.
        len: usize,
        /// The dimension indexed (`None` for a module list).
        dim: Option<usize>,
    },

    /// Within one invoke, a module was read or written after a module that runs later (found while the graph is
    /// built): the earlier module has already run when the later one is reached.
    #[error("out of order: {later} comes after {earlier} in the forward pass, so {earlier} cannot be used after it in the same invoke")]
    OutOfOrder {
        /// The access that came first in the code but runs later (`model.model.layers.5 output`).
        later: String,
        /// The access that came second in the code but runs earlier.
        earlier: String,
    },

    /// A gradient was read after the gradient of a later module of the same backward: gradients arrive in backward
    /// order (the reverse of the forward), so the later module's comes first.
    #[error("out of order: {earlier} arrives before {later} in the backward pass (gradients come in the reverse of the forward order), so it cannot be read after it in the same invoke")]
    GradientOrder {
        /// The gradient read first in the code, of a module that runs earlier in the forward.
        earlier: String,
        /// The gradient read second, of a module that runs later (its gradient arrives first).
        later: String,
    },

    /// A value written to a module has the wrong shape; nothing was written.
    #[error("cannot write to {target}: expected shape {expected:?}, given {given:?}; nothing was written")]
    WriteShape {
        /// What was written (`model.model.layers.3 output[(.., -1)]`).
        target: String,
        /// The shape there.
        expected: Vec<i64>,
        /// The value's shape.
        given: Vec<i64>,
    },

    /// A value that stands for an invoke's rows of a module's output (the value of a `skip`) has another number
    /// of rows.
    #[error("{target}: the value's first dimension must be {rows} (the invoke's rows), given shape {given:?}")]
    BatchRows {
        /// What the value was for (`` skip of `model.model.layers.3` (invoke 1) ``).
        target: String,
        /// The rows the value must have.
        rows: i64,
        /// The value's shape.
        given: Vec<i64>,
    },

    /// The forward pass ended before a node could run (its module never ran, or ran fewer times).
    #[error("{node} was never reached: the forward pass ended before it ({reason})")]
    NeverReached {
        /// The node (`read of model.model.layers.5 output (call 0)`).
        node: String,
        /// Why, as far as known.
        reason: String,
    },

    /// A graph calls a function that this program has not registered with `#[nnsight::function]` (a graph read
    /// from JSON, or sent by a client compiled with other functions).
    #[error("unknown function `{name}`: not registered with #[nnsight::function] in this program (registered: {})", if known.is_empty() { "none".to_string() } else { known.join(", ") })]
    UnknownFunction {
        /// The name the graph uses.
        name: String,
        /// The names this program registered.
        known: Vec<String>,
    },

    /// An operation of an intervention failed while the graph ran.
    #[error("intervention failed: {message}")]
    Intervention {
        /// What failed, and at which node.
        message: String,
    },

    /// Bytes on the wire (a request, a result) are not a valid message of the protocol.
    #[error("protocol error: {message}")]
    Protocol {
        /// What is wrong (an unknown op is named).
        message: String,
    },

    /// Client and server speak different versions of the wire format.
    #[error("protocol version mismatch: the server speaks version {server}, the client version {client}")]
    ProtocolVersion {
        /// The server's version.
        server: u32,
        /// The client's version.
        client: u32,
    },

    /// A request is over one of the server's limits.
    #[error("over the server's limit: {what} is {given}, the limit is {limit}")]
    Limit {
        /// What is limited (`request bytes`, `graph nodes`, `saved bytes`).
        what: String,
        /// The limit.
        limit: u64,
        /// What the request has.
        given: u64,
    },

    /// A job ran past its time limit and was cancelled (the server stays healthy).
    #[error("the job ran past its time limit of {seconds} s and was cancelled")]
    TimeLimit {
        /// The limit in seconds.
        seconds: f64,
    },

    /// The server's queue for the model is full.
    #[error("the server is busy: retry after {retry_after_s} s")]
    Busy {
        /// When to retry, in seconds.
        retry_after_s: u64,
    },

    /// A remote run failed: the server refused the request or the job failed there, or the server could not be
    /// reached.
    #[error("remote: {message}")]
    Remote {
        /// What the server said, or why it could not be reached.
        message: String,
    },

    /// The job broker (Redis) of a server could not be reached or refused what the server asked.
    #[error("the job broker at {url}: {message}")]
    Broker {
        /// Its URL, without a password.
        url: String,
        /// What went wrong and what to do.
        message: String,
    },

    /// A persistent edit cannot hold this kind of node (it runs again in every later forward pass, keeping
    /// nothing).
    #[error("an edit cannot {what} (node {node}): {hint}")]
    NotAnEdit {
        /// What the edit block tried (`save a value`, `stop the model`, ...).
        what: String,
        /// The node.
        node: u32,
        /// Where that belongs instead.
        hint: String,
    },

    /// A persistent edit failed while it ran inside a forward pass.
    #[error("in persistent edit {index} of the model: {source}")]
    Edit {
        /// Which edit (0 is the first one made).
        index: usize,
        /// What failed.
        #[source]
        source: Box<Error>,
    },

    /// A block of a session run as one job failed (the job's other blocks gave no result either).
    #[error("in block {block} of the session: {source}")]
    SessionBlock {
        /// Which block (1 is the first).
        block: usize,
        /// What failed.
        #[source]
        source: Box<Error>,
    },

    /// A graph (e.g. read from JSON) is malformed.
    #[error("invalid graph: {message}")]
    InvalidGraph {
        /// What is wrong.
        message: String,
    },

    /// Every invoke reached `stop()`: the forward pass was cut short on purpose. Traces catch it; it reaches
    /// code only from a hook used outside a trace.
    #[error("the forward pass was stopped by `stop()`")]
    Stopped,

    /// A picture (`nnsight::plot`) cannot be drawn: its data, labels or file name are not what it needs (writing
    /// the file is [`Error::Write`]).
    #[error("{path}: cannot draw the picture: {message}", path = path.display())]
    Plot {
        /// The picture's file.
        path: PathBuf,
        /// What was wrong, with what was expected and what was given.
        message: String,
    },

    /// A libtorch operation failed inside a module (or while loading a tensor, or in an intervention). The message
    /// is libtorch's first lines, never its C++ backtrace.
    #[error("{}: {}", torch_place(module), torch_text(source))]
    Torch {
        /// Dotted path of the module whose forward failed (empty for the model itself), or what was running
        /// (`` `model.model.layers.3` output ``, `constant`, a tensor's name).
        module: String,
        /// libtorch's error, its message cut before the C++ backtrace.
        #[source]
        source: tch::TchError,
    },
}

/// What a caught panic said (its message, or "a panic"), for the error a server gives the job instead.
pub(crate) fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a panic".into())
}

/// `IndexOutOfRange`'s message, for a module list or a value's dimension.
fn index_message(place: &str, index: i64, len: usize, dim: Option<usize>) -> String {
    match dim {
        None => format!("index {index} is out of range for `{place}`, which has {len} modules"),
        Some(d) => format!(
            "index {index} is out of range for dimension {d} of {place}, whose size is {len} (valid: {} to {})",
            -(len as i64),
            len as i64 - 1
        ),
    }
}

/// Where a libtorch error happened, as a message starts: `` in `model.layers.0.mlp` ``, `in the model`, or the
/// place as given when it is already worded (it has a space or backticks).
fn torch_place(module: &str) -> String {
    if module.is_empty() {
        "in the model".to_string()
    } else if module.contains(' ') || module.contains('`') {
        format!("in {module}")
    } else {
        format!("in `{module}`")
    }
}

/// libtorch's message without tch's prefix or the C++ backtrace.
fn torch_text(e: &tch::TchError) -> String {
    clean_torch_message(&e.to_string())
}

/// libtorch's message up to its C++ backtrace ("Exception raised from ...", "frame #0: ..."), trimmed.
pub(crate) fn clean_torch_message(message: &str) -> String {
    let message = message.strip_prefix("Internal torch error: ").unwrap_or(message);
    let mut end = message.len();
    for marker in ["Exception raised from", "\nframe #", "frame #0:"] {
        if let Some(i) = message.find(marker) {
            end = end.min(i);
        }
    }
    message[..end].trim().trim_end_matches(['(', ' ']).trim().to_string()
}

/// A libtorch error with its message cut before the C++ backtrace.
pub(crate) fn clean_tch_error(e: tch::TchError) -> tch::TchError {
    match e {
        tch::TchError::Torch(m) => tch::TchError::Torch(clean_torch_message(&m)),
        other => other,
    }
}

impl Error {
    /// Attaches a module path to a libtorch error.
    pub fn torch(module: impl Into<String>, source: tch::TchError) -> Self {
        Error::Torch { module: module.into(), source: clean_tch_error(source) }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        if source.kind() == std::io::ErrorKind::NotFound {
            return Error::FileNotFound { path, what: source.to_string() };
        }
        Error::Io { path, source }
    }

    pub(crate) fn format(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Format { path: path.into(), message: message.into() }
    }

    pub(crate) fn config(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Config { path: path.into(), message: message.into() }
    }
}

/// Extension for `tch` results: attach the module path where the operation ran.
pub trait TchResultExt<T> {
    /// Turns a `TchError` into [`Error::Torch`] naming `module`.
    fn at(self, module: &str) -> Result<T>;
}

impl<T> TchResultExt<T> for std::result::Result<T, tch::TchError> {
    fn at(self, module: &str) -> Result<T> {
        self.map_err(|e| Error::torch(module, e))
    }
}

impl std::fmt::Debug for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libtorch_messages_lose_the_cpp_backtrace_and_the_prefix() {
        let raw = "Internal torch error: select(): index 9 out of range for tensor of size [1, 9, 9, 64] at dimension 2\nException raised from select_symint at /pytorch/aten/src/ATen/native/TensorShape.cpp:1717 (most recent call first):\nframe #0: c10::Error::Error(c10::SourceLocation, std::string) + 0x9d (0x7f in libc10.so)\nframe #1: ...";
        assert_eq!(
            clean_torch_message(raw),
            "select(): index 9 out of range for tensor of size [1, 9, 9, 64] at dimension 2"
        );
        let e = Error::torch("model.layers.0.mlp", tch::TchError::Torch(raw.into()));
        assert_eq!(
            e.to_string(),
            "in `model.layers.0.mlp`: select(): index 9 out of range for tensor of size [1, 9, 9, 64] at dimension 2"
        );
        let worded = Error::torch("`model.layers.0` output", tch::TchError::Torch("bad".into()));
        assert_eq!(worded.to_string(), "in `model.layers.0` output: bad");
        assert_eq!(Error::torch("", tch::TchError::Torch("bad".into())).to_string(), "in the model: bad");
    }
}
