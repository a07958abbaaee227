//! The CPU linear kernel chosen per shape class (`nnsight::nn::fast_linear`): a class is probed once and keeps its
//! kernel, forced modes (per thread, and per process through the environment) are honoured, and both kernels give
//! the same numbers within float32 tolerance, on single layers and on SmolLM2's logits.

use crate::common::{self, max_abs_diff};
use nnsight::nn::fast_linear::{self, LinearKey, LinearMode, LinearPath, RowsBucket};
use nnsight::nn::{Ctx, Linear};
use nnsight::prelude::*;

/// Sets the calling thread's mode for its lifetime, then lets the thread follow the process again.
struct ThreadMode;

impl ThreadMode {
    fn set(mode: LinearMode) -> Self {
        fast_linear::set_linear_mode(Some(mode));
        ThreadMode
    }
}

impl Drop for ThreadMode {
    fn drop(&mut self) {
        fast_linear::set_linear_mode(None);
    }
}

/// A deterministic `[rows, n]` float32 tensor with values in [-scale, scale] (no random generator, which other
/// tests share).
fn pattern(rows: i64, n: i64, step: f64, scale: f64) -> Tensor {
    (Tensor::arange(rows * n, (Kind::Float, Device::Cpu)) * step).sin().reshape([rows, n]) * scale
}

/// A linear layer `in -> out` with deterministic weights of the scale `nn.Linear` initialises to.
fn layer(in_features: i64, out_features: i64, bias: bool) -> Linear {
    let scale = 1.0 / (in_features as f64).sqrt();
    let w = pattern(out_features, in_features, 0.37, scale);
    let b = bias.then(|| pattern(1, out_features, 0.91, scale).reshape([out_features]));
    Linear::from_tensors("probe", w, b)
}

fn run(l: &Linear, x: &Tensor) -> Tensor {
    Ctx::new().call(l, x).unwrap()
}

#[test]
fn a_shape_class_is_probed_once_and_keeps_its_kernel() {
    common::init();
    let _auto = ThreadMode::set(LinearMode::Auto);
    // Shapes no other test uses, so that this test sees its classes chosen for the first time.
    let l = layer(37, 53, true);
    let x3 = pattern(3, 37, 0.11, 1.0).reshape([1, 3, 37]);
    let key = LinearKey::of(&x3, &l.weight, l.bias.as_ref()).expect("a float32 CPU call has a class");
    assert_eq!(
        key,
        LinearKey { rows: RowsBucket::UpTo4, in_features: 37, out_features: 53, kind: Kind::Float, bias: true }
    );
    assert_eq!(fast_linear::linear_path_for(&key), None, "no call of this class yet");

    let y3 = run(&l, &x3);
    let chosen = fast_linear::linear_path_for(&key).expect("the first call chose");
    let choice = |k: &LinearKey| fast_linear::linear_choices().into_iter().find(|(c, _)| c == k).map(|(_, c)| c);
    let first = choice(&key).expect("listed among the choices");
    assert_eq!(first.path, chosen);
    assert!(first.aten_us.is_some_and(|t| t > 0.0) && first.onednn_us.is_some_and(|t| t > 0.0), "{first:?}");
    assert_eq!(
        chosen,
        if first.onednn_us < first.aten_us { LinearPath::OneDnn } else { LinearPath::Aten },
        "the faster median wins: {first:?}"
    );
    eprintln!("class {key:?}: {first:?}");

    // More calls of the class (2 and 4 rows are the same bucket) take the same kernel without a new probe: the
    // recorded timings stay as they were, and each output is bit for bit that kernel's.
    for rows in [2, 4, 3] {
        let x = pattern(rows, 37, 0.23, 1.0);
        let y = run(&l, &x);
        assert!(y.equal(&fast_linear::linear_with(chosen, &x, &l.weight, l.bias.as_ref()).unwrap()), "{rows} rows");
    }
    assert!(y3.equal(&fast_linear::linear_with(chosen, &x3, &l.weight, l.bias.as_ref()).unwrap()));
    assert_eq!(choice(&key), Some(first), "probed once");

    // Five rows are another class, probed on its own call.
    let x5 = pattern(5, 37, 0.23, 1.0);
    let key5 = LinearKey::of(&x5, &l.weight, l.bias.as_ref()).unwrap();
    assert_eq!(key5.rows, RowsBucket::UpTo16);
    assert_eq!(fast_linear::linear_path_for(&key5), None);
    let _ = run(&l, &x5);
    assert!(fast_linear::linear_path_for(&key5).is_some());
    assert_eq!(choice(&key), Some(first));
}

#[test]
fn calls_that_only_at_linear_can_run_have_no_class() {
    common::init();
    let l = layer(8, 4, false);
    let x = pattern(2, 8, 0.3, 1.0);
    assert!(LinearKey::of(&x.to_kind(Kind::BFloat16), &l.weight.to_kind(Kind::BFloat16), None).is_none());
    assert!(LinearKey::of(&x.copy().set_requires_grad(true), &l.weight, None).is_none());
    assert!(LinearKey::of(&x, &l.weight, None).is_some());
    // And oneDNN refuses them when asked by name, with a message naming what it takes.
    let err = fast_linear::linear_with(LinearPath::OneDnn, &x.to_kind(Kind::Double), &l.weight, None).unwrap_err();
    assert!(err.to_string().contains("expected float32 CPU tensors"), "{err}");
}

#[test]
fn forced_modes_are_honoured_in_the_thread() {
    common::init();
    let l = layer(48, 40, true);
    let x = pattern(7, 48, 0.17, 1.0);
    let key = LinearKey::of(&x, &l.weight, l.bias.as_ref()).unwrap();
    for (mode, path) in [(LinearMode::OneDnn, LinearPath::OneDnn), (LinearMode::Aten, LinearPath::Aten)] {
        let _mode = ThreadMode::set(mode);
        assert_eq!(fast_linear::linear_mode(), mode);
        assert_eq!(fast_linear::linear_path_for(&key), Some(path));
        let want = fast_linear::linear_with(path, &x, &l.weight, l.bias.as_ref()).unwrap();
        assert!(run(&l, &x).equal(&want), "{mode:?} runs {path:?}");
    }
    let _off = ThreadMode::set(LinearMode::OneDnn);
    fast_linear::set_onednn_linear(false);
    assert_eq!(fast_linear::linear_mode(), LinearMode::Aten);
    assert!(!fast_linear::onednn_linear_in_use());
    assert!(run(&l, &x).equal(&x.linear(&l.weight, l.bias.as_ref())));
    fast_linear::set_onednn_linear(true);
    assert_eq!(fast_linear::linear_mode(), LinearMode::Auto);
}

/// Both kernels, on shapes of SmolLM2 and odd ones: max |oneDNN − at::linear| ≤ 1e-5 · max |y| (float32 rounding
/// of sums of up to 1536 terms).
#[test]
fn both_kernels_agree_within_float_tolerance() {
    common::init();
    for (rows, i, o, bias) in
        [(1, 576, 576, false), (9, 576, 1536, false), (3, 1536, 576, false), (65, 64, 300, true), (17, 37, 53, true)]
    {
        let l = layer(i, o, bias);
        let x = pattern(rows, i, 0.29, 1.0);
        let a = fast_linear::linear_with(LinearPath::Aten, &x, &l.weight, l.bias.as_ref()).unwrap();
        let d = fast_linear::linear_with(LinearPath::OneDnn, &x, &l.weight, l.bias.as_ref()).unwrap();
        let scale = a.abs().max().double_value(&[]);
        let diff = max_abs_diff(&a, &d);
        eprintln!("[{rows}, {i}] x [{o}, {i}]ᵀ bias {bias}: max |diff| {diff:.3e} (max |y| {scale:.3})");
        assert!(diff <= 1e-5 * scale, "[{rows}, {i}] -> {o}: {diff} > 1e-5 * {scale}");
    }
}

/// SmolLM2's logits under the automatic choice equal those with every layer forced to either kernel within 1e-4;
/// the forced kernels do differ (oneDNN really ran). A linear whose input wants a gradient goes through
/// `at::linear`, which has a backward.
#[test]
fn model_logits_under_auto_equal_each_forced_kernel() {
    let model = common::smollm2();
    if common::device() != Device::Cpu {
        eprintln!("skipped on {:?}: the choice concerns the CPU only", common::device());
        return;
    }
    let batch = model.batch("The Eiffel Tower is in the city of").unwrap();
    let logits = |mode| {
        let _mode = ThreadMode::set(mode);
        model.forward_batch(&batch).unwrap()
    };
    let (auto, onednn, aten) = (logits(LinearMode::Auto), logits(LinearMode::OneDnn), logits(LinearMode::Aten));
    let (da, dd, dx) = (max_abs_diff(&auto, &aten), max_abs_diff(&auto, &onednn), max_abs_diff(&onednn, &aten));
    eprintln!("logits max |diff|: auto vs at::linear {da:.3e}, auto vs oneDNN {dd:.3e}, oneDNN vs at::linear {dx:.3e}");
    assert!(da <= 1e-4 && dd <= 1e-4, "auto vs at::linear {da}, auto vs oneDNN {dd}");
    assert!(dx > 0.0 && dx <= 1e-4, "the two kernels differ by float32 rounding only, found {dx}");
    let _auto = ThreadMode::set(LinearMode::Auto);
    assert!(fast_linear::onednn_linear_in_use());
    for (key, choice) in fast_linear::linear_choices().iter().filter(|(k, _)| k.in_features == 576) {
        eprintln!("  {key:?}: {choice:?}");
    }

    let layer = &model.model().model.layers[0].mlp.up_proj;
    let x = Tensor::randn([1, 3, 576], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let y = Ctx::new().call(layer, &x).unwrap();
    y.sum(Kind::Float).backward();
    let want = Tensor::ones([1, 3, 1536], (Kind::Float, Device::Cpu)).matmul(&layer.weight);
    assert!(max_abs_diff(&x.grad(), &want) < 1e-4);
}

/// Run by [`the_environment_sets_the_process_mode`] in a child process with `NNSIGHT_LINEAR_EXPECT` set to the
/// mode the environment should give; alone (without it), it checks nothing.
#[test]
fn env_child() {
    let Ok(expect) = std::env::var("NNSIGHT_LINEAR_EXPECT") else { return };
    common::init();
    let mode = LinearMode::parse(&expect).expect("a mode");
    assert_eq!(fast_linear::process_linear_mode(), mode);
    assert_eq!(fast_linear::linear_mode(), mode, "a thread with no mode of its own follows the process");
    let l = layer(24, 20, false);
    let x = pattern(2, 24, 0.7, 1.0);
    let key = LinearKey::of(&x, &l.weight, None).unwrap();
    let y = run(&l, &x);
    let path = fast_linear::linear_path_for(&key).expect("chosen or forced");
    match mode {
        LinearMode::OneDnn => assert_eq!(path, LinearPath::OneDnn),
        LinearMode::Aten => assert_eq!(path, LinearPath::Aten),
        LinearMode::Auto => assert_eq!(fast_linear::linear_choices().len(), 1, "one class probed"),
    }
    assert!(y.equal(&fast_linear::linear_with(path, &x, &l.weight, None).unwrap()));
    println!("env_child checked {mode:?}");
}

#[test]
fn the_environment_sets_the_process_mode() {
    let cases = [
        ("NNSIGHT_LINEAR", "onednn", "onednn"),
        ("NNSIGHT_LINEAR", "aten", "aten"),
        ("NNSIGHT_LINEAR", "Auto", "auto"),
        ("NNSIGHT_NO_ONEDNN", "1", "aten"),
    ];
    for (var, value, expect) in cases {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["linear_path::env_child", "--exact", "--nocapture", "--test-threads=1"])
            .env_remove("NNSIGHT_LINEAR")
            .env_remove("NNSIGHT_NO_ONEDNN")
            .env(var, value)
            .env("NNSIGHT_LINEAR_EXPECT", expect)
            .output()
            .unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{var}={value}:\n{text}");
        assert!(text.contains("env_child checked"), "{var}={value}: the child ran no check:\n{text}");
    }
}
