//! Which kernel runs a float32 linear layer on the CPU: oneDNN's matmul (`mkldnn::_linear_pointwise`, what
//! PyTorch's compiler uses) or `at::linear` (MKL's `sgemm`, as PyTorch eager), chosen per shape and per machine.
//!
//! Neither kernel wins everywhere: oneDNN is much faster on some CPUs and slower on others, and a prompt's
//! forward (many rows) may prefer another kernel than a one-token decoding step. So in the default mode
//! ([`LinearMode::Auto`]) the first call of each shape class ([`LinearKey`]: a bucket of rows, the in and out
//! features, the dtype, bias or not) times both kernels on a fixed probe of that class (a deterministic input of
//! [`RowsBucket::probe_rows`] rows against the layer's own weight: one warm-up call each, then up to seven
//! alternating rounds, each timing enough calls to last about 0.2 ms, within about 20 ms in all, or one round when
//! a single call is longer), keeps the kernel with the lower median, and takes it for that class from then on, in
//! every thread of the process. A shape therefore always takes the same kernel within a process; two processes
//! may choose differently where the kernels are close, and then round differently (by a few float32 ulps).
//!
//! Only float32 CPU calls that want no gradient have a choice; everything else (other devices and dtypes, meta
//! tensors, autograd) runs `at::linear`.
//!
//! Overrides, for the whole process: the environment variable `NNSIGHT_LINEAR=auto|onednn|aten` (`auto` when
//! unset), `NNSIGHT_NO_ONEDNN` (set: `aten`), or [`set_process_linear_mode`]; for the calling thread:
//! [`set_linear_mode`] (and [`set_onednn_linear`]), which win over the process's mode.

use crate::error::{Error, TchResultExt};
use crate::ffi;
use crate::Result;
use std::cell::Cell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// A kernel for `x Wᵀ + b`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LinearPath {
    /// oneDNN's matmul (`mkldnn::_linear_pointwise`).
    OneDnn,
    /// `at::linear` (MKL's `sgemm` on the CPU), as PyTorch eager runs it.
    Aten,
}

/// How linear layers choose their kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum LinearMode {
    /// Per shape class, the kernel that was faster on this machine (timed once per class and process).
    #[default]
    Auto,
    /// oneDNN wherever it can run (float32 on the CPU, no gradient wanted).
    OneDnn,
    /// `at::linear` everywhere.
    Aten,
}

impl LinearMode {
    /// Reads `auto`, `onednn` or `aten` (any case), as `NNSIGHT_LINEAR` takes them.
    pub fn parse(text: &str) -> Option<Self> {
        match text.trim().to_ascii_lowercase().as_str() {
            "auto" => Some(LinearMode::Auto),
            "onednn" => Some(LinearMode::OneDnn),
            "aten" => Some(LinearMode::Aten),
            _ => None,
        }
    }

    fn code(self) -> u8 {
        match self {
            LinearMode::Auto => 1,
            LinearMode::OneDnn => 2,
            LinearMode::Aten => 3,
        }
    }

    fn from_code(code: u8) -> Self {
        match code {
            2 => LinearMode::OneDnn,
            3 => LinearMode::Aten,
            _ => LinearMode::Auto,
        }
    }
}

/// The bucket of a call's rows (the product of the input's leading dimensions).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RowsBucket {
    /// One row: a decoding step of one sequence.
    One,
    /// 2 to 4 rows.
    UpTo4,
    /// 5 to 16 rows.
    UpTo16,
    /// 17 to 64 rows.
    UpTo64,
    /// 65 rows or more.
    Over64,
}

impl RowsBucket {
    /// The bucket of `rows`.
    pub fn of(rows: i64) -> Self {
        match rows {
            ..=1 => RowsBucket::One,
            2..=4 => RowsBucket::UpTo4,
            5..=16 => RowsBucket::UpTo16,
            17..=64 => RowsBucket::UpTo64,
            _ => RowsBucket::Over64,
        }
    }

    /// The rows of the probe that times this bucket: 1, 3, 9, 33 and 65.
    pub fn probe_rows(self) -> i64 {
        match self {
            RowsBucket::One => 1,
            RowsBucket::UpTo4 => 3,
            RowsBucket::UpTo16 => 9,
            RowsBucket::UpTo64 => 33,
            RowsBucket::Over64 => 65,
        }
    }
}

/// A linear call's shape class: the key of the per-process choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LinearKey {
    /// The bucket of the input's rows.
    pub rows: RowsBucket,
    /// The weight's in features (the input's last dimension).
    pub in_features: i64,
    /// The weight's out features.
    pub out_features: i64,
    /// The dtype of input and weight.
    pub kind: Kind,
    /// Whether a bias is added.
    pub bias: bool,
}

impl LinearKey {
    /// The class of `x Wᵀ + b`, or `None` when only `at::linear` can run it (not all float32 on the CPU, a meta
    /// tensor, or a gradient wanted).
    pub fn of(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Option<Self> {
        let float_cpu = |t: &Tensor| t.kind() == Kind::Float && t.device() == Device::Cpu && !t.requires_grad();
        // A meta tensor (a scan) reports its device as MPS through tch; it is excluded by name all the same.
        if !(float_cpu(x) && float_cpu(w) && b.is_none_or(float_cpu)) || ffi::is_meta(x) || ffi::is_meta(w) {
            return None;
        }
        let (xs, ws) = (x.size(), w.size());
        let (&in_features, &out_features) = (xs.last()?, ws.first()?);
        let rows = xs[..xs.len() - 1].iter().product::<i64>();
        Some(LinearKey { rows: RowsBucket::of(rows), in_features, out_features, kind: Kind::Float, bias: b.is_some() })
    }
}

/// What the probe of a shape class measured, and the kernel it chose.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinearChoice {
    /// The kernel this class takes under [`LinearMode::Auto`].
    pub path: LinearPath,
    /// oneDNN's median time per call on the probe, in microseconds (`None`: it could not run).
    pub onednn_us: Option<f64>,
    /// `at::linear`'s median time per call on the probe, in microseconds (`None`: it could not run).
    pub aten_us: Option<f64>,
}

/// The process's mode: 0 until first read from the environment, then a [`LinearMode::code`].
static PROCESS_MODE: AtomicU8 = AtomicU8::new(0);

thread_local! {
    /// This thread's mode (`None`: the process's).
    static THREAD_MODE: Cell<Option<LinearMode>> = const { Cell::new(None) };
}

/// The mode the environment asks for: `NNSIGHT_NO_ONEDNN` set gives [`LinearMode::Aten`], else `NNSIGHT_LINEAR`.
fn env_mode() -> LinearMode {
    if std::env::var_os("NNSIGHT_NO_ONEDNN").is_some() {
        return LinearMode::Aten;
    }
    match std::env::var("NNSIGHT_LINEAR") {
        Ok(text) => LinearMode::parse(&text).unwrap_or_else(|| {
            eprintln!("nnsight: warning: NNSIGHT_LINEAR={text:?} is not auto, onednn or aten; using auto");
            LinearMode::Auto
        }),
        Err(_) => LinearMode::Auto,
    }
}

/// The mode of threads that set none of their own: [`set_process_linear_mode`]'s, else the environment's.
pub fn process_linear_mode() -> LinearMode {
    let code = PROCESS_MODE.load(Ordering::Relaxed);
    if code != 0 {
        return LinearMode::from_code(code);
    }
    let _ = PROCESS_MODE.compare_exchange(0, env_mode().code(), Ordering::Relaxed, Ordering::Relaxed);
    LinearMode::from_code(PROCESS_MODE.load(Ordering::Relaxed))
}

/// Sets the mode of every thread that sets none of its own, over the environment's.
pub fn set_process_linear_mode(mode: LinearMode) {
    PROCESS_MODE.store(mode.code(), Ordering::Relaxed);
}

/// Sets the calling thread's mode (`None`: follow the process's).
pub fn set_linear_mode(mode: Option<LinearMode>) {
    THREAD_MODE.with(|m| m.set(mode));
}

/// The mode the calling thread's linear layers follow.
pub fn linear_mode() -> LinearMode {
    THREAD_MODE.with(Cell::get).unwrap_or_else(process_linear_mode)
}

/// Turns oneDNN on or off for the calling thread: `false` sends every linear layer it runs through `at::linear`
/// (as [`LinearMode::Aten`]); `true` lets the faster kernel run again (as [`LinearMode::Auto`]), even where the
/// environment turned oneDNN off.
pub fn set_onednn_linear(enabled: bool) {
    set_linear_mode(Some(if enabled { LinearMode::Auto } else { LinearMode::Aten }));
}

/// Whether the calling thread may use oneDNN (its mode is not [`LinearMode::Aten`]) and oneDNN has run
/// successfully in this process.
pub fn onednn_linear_in_use() -> bool {
    ffi::onednn_available() == Some(true) && linear_mode() != LinearMode::Aten
}

/// The choices made so far in this process, one per shape class, sorted by rows, in and out features.
pub fn linear_choices() -> Vec<(LinearKey, LinearChoice)> {
    let mut all: Vec<_> = choices().lock().unwrap_or_else(PoisonError::into_inner).clone().into_iter().collect();
    all.sort_by_key(|(k, _)| (k.rows, k.in_features, k.out_features, k.bias, format!("{:?}", k.kind)));
    all
}

/// The kernel the calling thread takes now for `key`: the forced one under a forced mode (`at::linear` where
/// oneDNN is missing), the chosen one under [`LinearMode::Auto`], `None` there when no call has chosen yet.
pub fn linear_path_for(key: &LinearKey) -> Option<LinearPath> {
    match linear_mode() {
        LinearMode::Aten => Some(LinearPath::Aten),
        LinearMode::OneDnn if ffi::onednn_available() == Some(false) => Some(LinearPath::Aten),
        LinearMode::OneDnn => Some(LinearPath::OneDnn),
        LinearMode::Auto => choices().lock().unwrap_or_else(PoisonError::into_inner).get(key).map(|c| c.path),
    }
}

/// `x Wᵀ + b` through the kernel `path`, whatever the mode (for benchmarks and tests). oneDNN takes float32 CPU
/// tensors that want no gradient only; anything else is an error.
pub fn linear_with(path: LinearPath, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    match path {
        LinearPath::Aten => x.f_linear(w, b).at("linear_with"),
        LinearPath::OneDnn => {
            let refused = |why: &str| Error::InvalidInput {
                message: format!(
                    "linear_with(OneDnn): expected float32 CPU tensors that want no gradient and a libtorch with \
                     oneDNN's linear, given input {:?} {:?} on {:?}, weight {:?}: {why}",
                    x.size(),
                    x.kind(),
                    x.device(),
                    w.size()
                ),
            };
            LinearKey::of(x, w, b).ok_or_else(|| refused("not a oneDNN call"))?;
            ffi::onednn_linear(x, w, b).ok_or_else(|| refused("oneDNN refused it"))
        }
    }
}

/// `x Wᵀ + b` through the kernel the calling thread's mode picks (see the module's text); errors name `at`.
pub(crate) fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>, at: &str) -> Result<Tensor> {
    if let Some(key) = LinearKey::of(x, w, b) {
        let path = match linear_mode() {
            LinearMode::Aten => LinearPath::Aten,
            LinearMode::OneDnn => LinearPath::OneDnn,
            LinearMode::Auto => choose(&key, w, b),
        };
        if path == LinearPath::OneDnn {
            if let Some(y) = ffi::onednn_linear(x, w, b) {
                return Ok(y);
            }
        }
    }
    x.f_linear(w, b).at(at)
}

fn choices() -> &'static Mutex<HashMap<LinearKey, LinearChoice>> {
    static CHOICES: OnceLock<Mutex<HashMap<LinearKey, LinearChoice>>> = OnceLock::new();
    CHOICES.get_or_init(Mutex::default)
}

/// `key`'s kernel: the cached choice, or a probe's (under the lock, so that a class is probed once).
fn choose(key: &LinearKey, w: &Tensor, b: Option<&Tensor>) -> LinearPath {
    let mut map = choices().lock().unwrap_or_else(PoisonError::into_inner);
    map.entry(*key).or_insert_with(|| probe(key, w, b)).path
}

/// One sample should time calls for about this long (µs).
const SAMPLE_US: f64 = 200.0;
/// The timed rounds after the warm-up should take about this long in all (µs).
const BUDGET_US: f64 = 20_000.0;
/// At most this many timed rounds.
const MAX_ROUNDS: usize = 7;

/// Times both kernels on a deterministic input of the class's probe rows against the layer's weight and bias.
fn probe(key: &LinearKey, w: &Tensor, b: Option<&Tensor>) -> LinearChoice {
    let rows = key.rows.probe_rows();
    let x = Tensor::f_arange(rows * key.in_features, (Kind::Float, Device::Cpu))
        .and_then(|t| t.f_mul_scalar(0.618)?.f_sin()?.f_reshape([rows, key.in_features]));
    let Ok(x) = x else {
        return LinearChoice { path: LinearPath::Aten, onednn_us: None, aten_us: None };
    };
    let mut aten = || x.f_linear(w, b).is_ok();
    let mut onednn = || ffi::onednn_linear(&x, w, b).is_some();
    // Warm-up: one call each (oneDNN builds its primitive), which also sizes the samples.
    let (Some(a0), Some(o0)) = (time(1, &mut aten), time(1, &mut onednn)) else {
        let aten_us = time(1, &mut aten);
        return LinearChoice { path: LinearPath::Aten, onednn_us: None, aten_us };
    };
    let calls = |t: f64| (SAMPLE_US / t.max(1e-3)).clamp(1.0, 64.0) as usize;
    let (na, no) = (calls(a0), calls(o0));
    let round_us = na as f64 * a0 + no as f64 * o0;
    let rounds = ((BUDGET_US / round_us.max(1e-3)) as usize).clamp(1, MAX_ROUNDS);
    let (mut ta, mut to) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        // Alternate which kernel goes first, so that neither always follows the other's cache traffic.
        let order = if round % 2 == 0 { [true, false] } else { [false, true] };
        for first_aten in order {
            if first_aten {
                ta.extend(time(na, &mut aten));
            } else {
                to.extend(time(no, &mut onednn));
            }
        }
    }
    let (aten_us, onednn_us) = (median(ta), median(to));
    let path = match (onednn_us, aten_us) {
        (Some(o), Some(a)) if o < a => LinearPath::OneDnn,
        (Some(_), None) => LinearPath::OneDnn,
        _ => LinearPath::Aten,
    };
    LinearChoice { path, onednn_us, aten_us }
}

/// Mean time per call of `n` calls of `f` (µs), or `None` when a call fails.
fn time(n: usize, f: &mut dyn FnMut() -> bool) -> Option<f64> {
    let start = Instant::now();
    for _ in 0..n {
        if !f() {
            return None;
        }
    }
    Some(start.elapsed().as_secs_f64() * 1e6 / n as f64)
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}
