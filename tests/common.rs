//! Shared helpers of the integration tests: paths, the default model loaded once, a recording hook.

use nnsight::nn::Hook;
use nnsight::prelude::*;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, OnceLock};

/// A folder of the project's test data.
pub fn data(rel: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/data")).join(rel)
}

/// The default model file (fetched by `make test` / `scripts/setup.sh`).
pub fn smollm2_path() -> PathBuf {
    let p = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    assert!(p.exists(), "{} is missing: run `make test` (or scripts/setup.sh) to fetch the model", p.display());
    p
}

/// Keeps libtorch to one thread per test (tests run two at a time on two cores).
pub fn init() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        tch::set_num_threads(1);
        // SAFETY: set once, before any test reads the environment.
        unsafe { std::env::set_var("NNSIGHT_QUIET", "1") };
    });
}

/// The device the model tests run on: `NNSIGHT_TEST_DEVICE=cuda` selects GPU 0 (and fails if there is none).
pub fn device() -> Device {
    match std::env::var("NNSIGHT_TEST_DEVICE").as_deref() {
        Ok("cuda") => {
            assert!(tch::Cuda::is_available(), "NNSIGHT_TEST_DEVICE=cuda but tch::Cuda::is_available() is false");
            Device::Cuda(0)
        }
        _ => Device::Cpu,
    }
}

/// Load options for tests: quiet, on the test device.
pub fn opts() -> LoadOptions {
    init();
    LoadOptions::default().progress(false).device(device())
}

/// SmolLM2, loaded once per test process, in float32. Tests that use it take turns (tch tensors are `Send` but
/// not `Sync`).
pub fn smollm2() -> MutexGuard<'static, LanguageModel<Llama>> {
    static MODEL: OnceLock<Mutex<LanguageModel<Llama>>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            init();
            let opts = LoadOptions::default().progress(false).device(device());
            Mutex::new(LanguageModel::<Llama>::load_with(smollm2_path(), opts).expect("load SmolLM2"))
        })
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Reference tensors from a safetensors file, by name.
pub fn read_reference(path: &std::path::Path) -> BTreeMap<String, Tensor> {
    Tensor::read_safetensors(path).expect("read reference").into_iter().collect()
}

/// A hook that records every module's output (by path, in call order) and the call order itself; with `points`,
/// also every inner point (`model.layers.0.self_attn.probs`), which makes attention take its explicit path.
#[derive(Default)]
pub struct Recorder {
    pub outputs: BTreeMap<String, Tensor>,
    pub order: Vec<String>,
    pub points: bool,
}

impl Hook for Recorder {
    fn input(&mut self, _module: &str, x: Tensor) -> nnsight::Result<Tensor> {
        Ok(x)
    }
    fn output(&mut self, module: &str, y: Tensor) -> nnsight::Result<Tensor> {
        self.order.push(module.to_string());
        self.outputs.insert(module.to_string(), y.to_device(Device::Cpu));
        Ok(y)
    }
    fn wants_points(&mut self, _module: &str, _names: &[&str]) -> bool {
        self.points
    }
}

/// Largest elementwise `|a - b| - (atol + rtol * |b|)`; the check passes when it is ≤ 0.
pub fn excess(a: &Tensor, b: &Tensor, atol: f64, rtol: f64) -> f64 {
    let a = a.to_device(Device::Cpu).to_kind(Kind::Double);
    let b = b.to_device(Device::Cpu).to_kind(Kind::Double);
    assert_eq!(a.size(), b.size(), "shapes differ");
    ((&a - &b).abs() - (b.abs() * rtol + atol)).max().double_value(&[])
}

/// Largest absolute difference.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_device(Device::Cpu).to_kind(Kind::Double);
    let b = b.to_device(Device::Cpu).to_kind(Kind::Double);
    assert_eq!(a.size(), b.size(), "shapes differ");
    (a - b).abs().max().double_value(&[])
}

/// The tiny GPT-2 of the test data (2 layers, 4 heads, hidden 64), quiet, on the test device.
pub fn tiny_gpt2() -> LanguageModel<Gpt2> {
    LanguageModel::<Gpt2>::load_with(data("tiny-gpt2"), opts()).expect("load tests/data/tiny-gpt2")
}

/// Counts its drops in the shared counter (to prove a closure or value is dropped exactly once).
pub struct DropCount(pub std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl Drop for DropCount {
    fn drop(&mut self) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// An HTTP server on a free loopback port in front of `queue`, serving `info` under its name, with `policy` and
/// `limits` (the servers of the co-batching tests).
pub fn serve_queue(
    queue: Box<dyn nnsight::remote::JobQueue>,
    info: nnsight::remote::ModelInfo,
    policy: nnsight::remote::CoBatch,
    limits: nnsight::remote::Limits,
) -> nnsight::remote::Server {
    let options = nnsight::remote::ServeOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        limits,
        co_batch: policy,
        ..Default::default()
    };
    let infos = std::collections::HashMap::from([(info.name.clone(), info)]);
    nnsight::remote::Server::start_with(queue, infos, options).expect("start the server")
}
