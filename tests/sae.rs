//! Sparse autoencoders (`nnsight::sae`): an SAELens folder spliced into a SmolLM2 trace against Python nnsight
//! 0.8.1 (scripts/peer/nnsight_sae.py), the activations' semantics, the SAELens files written and read back, the
//! errors for folders that do not fit, the graph as data, and a short training run.

use crate::common::{self, max_abs_diff, read_reference};
use nnsight::prelude::*;
use nnsight::sae::train::{self, TrainOptions};
use nnsight::sae::{Activation, FeatureEdit, Sae, Site};
use nnsight::Error;
use std::path::Path;

fn folder() -> std::path::PathBuf {
    common::data("sae/smollm2-layer5")
}

/// `|ours - theirs| <= 1e-4 + relative * max|theirs|`: our SmolLM2 forward and transformers' differ by float32
/// rounding (the README's parity table: 2.8e-5 on the plain logits; layer 5's output reaches ~650 at the first
/// token, an attention sink, where it differs by 6e-4). The SAE adds one matmul of 576 terms each way; its random
/// weights (gain about 2) carry that rounding on to the features and reconstruction (relative 1e-5) and, once
/// spliced in, through 24 more layers to the logits (observed 2.6e-4 on logits of magnitude ~17: relative 3e-5).
fn assert_close(name: &str, ours: &Tensor, theirs: &Tensor) {
    let relative = if name.starts_with("logits") { 3e-5 } else { 1e-5 };
    let tolerance = 1e-4 + relative * theirs.abs().max().double_value(&[]);
    let d = max_abs_diff(ours, theirs);
    eprintln!("{name}: max |ours - Python nnsight's| = {d:.2e} (tolerance {tolerance:.2e})");
    assert!(d <= tolerance, "{name}: differs from Python nnsight's by {d:.3e} > {tolerance:.3e}");
}

#[test]
fn splicing_an_saelens_folder_matches_python_nnsight() -> nnsight::Result<()> {
    let guard = common::smollm2();
    let model = &*guard;
    let reference = read_reference(&common::data("sae/reference.safetensors"));
    let sae = Sae::load(folder())?;
    assert_eq!((sae.d_in(), sae.d_sae(), sae.activation), (576, 128, Activation::Relu));
    assert_eq!(sae.site(), Some(Site::Output(5)));
    assert_eq!(sae.check(model)?, Site::Output(5));

    intervene!(model.trace("The Eiffel Tower is in the city of") {
        let h = model.layers[5].output;
        let clean = h.i(0).save();
        let f = sae.encode_in(h);
        let features = f.i(0).save();
        let recon = sae.decode_in(f);
        let reconstruction = recon.i(0).save();
        model.layers[5].output = recon;
        let logits = model.output.i((0, -1)).save();
    });
    assert_close("layer 5 output", &clean, &reference["h"]);
    assert_close("features", &features, &reference["features"]);
    assert_close("reconstruction", &reconstruction, &reference["reconstruction"]);
    assert_close("logits with the reconstruction spliced in", &logits, &reference["logits_spliced"]);
    // The splice changed something (else the comparison above proves little).
    let plain = model.forward("The Eiffel Tower is in the city of")?.i((0, -1));
    assert!(max_abs_diff(&plain, &logits) > 0.1);
    // The eager forms agree with the graph's.
    assert!(max_abs_diff(&sae.encode(&clean)?, &features) <= 1e-6);
    assert!(max_abs_diff(&sae.forward(&clean)?, &reconstruction) <= 1e-6);

    // The persistent edits: the reconstruction spliced in, and feature 3 turned off with the error term kept.
    let spliced = sae.splice(model)?;
    let logits = spliced.forward("The Eiffel Tower is in the city of")?.i((0, -1));
    assert_close("logits through Sae::splice", &logits, &reference["logits_spliced"]);
    let edited = sae.edit_feature(model, 3, FeatureEdit::Scale(0.0))?;
    let logits = edited.forward("The Eiffel Tower is in the city of")?.i((0, -1));
    assert_close("logits with feature 3 off", &logits, &reference["logits_edited"]);
    assert!(max_abs_diff(&plain, &logits) > 1e-3, "turning feature 3 off changed nothing");

    // The SAE itself on the same activations as Python's (the check: the model's forward rounding aside).
    assert!(max_abs_diff(&sae.encode(&reference["h"])?, &reference["features"]) <= 1e-4);
    assert!(max_abs_diff(&sae.forward(&reference["h"])?, &reference["reconstruction"]) <= 1e-4);
    // JumpReLU and TopK on the same weights, on Python's activations.
    let threshold = &reference["threshold"];
    let jump = Sae::new(&sae.w_enc, &sae.b_enc, &sae.w_dec, &sae.b_dec, Some(threshold), Activation::JumpRelu, "")?;
    assert!(max_abs_diff(&jump.encode(&reference["h"])?, &reference["features_jumprelu"]) <= 1e-4);
    let topk = Sae::new(&sae.w_enc, &sae.b_enc, &sae.w_dec, &sae.b_dec, None, Activation::TopK { k: 8 }, "")?;
    assert!(max_abs_diff(&topk.encode(&reference["h"])?, &reference["features_topk"]) <= 1e-4);
    Ok(())
}

fn tiny(activation: Activation, d_in: i64, d_sae: i64) -> Sae {
    tch::manual_seed(3);
    let w_enc = Tensor::randn([d_in, d_sae], (Kind::Float, Device::Cpu));
    let w_dec = Tensor::randn([d_sae, d_in], (Kind::Float, Device::Cpu));
    let b_enc = Tensor::randn([d_sae], (Kind::Float, Device::Cpu)) * 0.1;
    let b_dec = Tensor::randn([d_in], (Kind::Float, Device::Cpu)) * 0.1;
    let threshold = Tensor::rand([d_sae], (Kind::Float, Device::Cpu));
    let t = (activation == Activation::JumpRelu).then_some(&threshold);
    Sae::new(&w_enc, &b_enc, &w_dec, &b_dec, t, activation, "blocks.1.hook_resid_post").unwrap()
}

#[test]
fn encode_and_decode_follow_saelens() -> nnsight::Result<()> {
    common::init();
    let x = Tensor::randn([2, 5, 16], (Kind::Float, Device::Cpu));
    let relu = tiny(Activation::Relu, 16, 32);
    let f = relu.encode(&x)?;
    assert_eq!(f.size(), vec![2, 5, 32]);
    assert_eq!(relu.decode(&f)?.size(), vec![2, 5, 16]);
    let pre = relu.hidden_pre(&x)?;
    assert!(max_abs_diff(&pre, &((&x - &relu.b_dec).matmul(&relu.w_enc) + &relu.b_enc)) <= 1e-5);
    assert!(max_abs_diff(&f, &pre.relu()) == 0.0);
    assert!(max_abs_diff(&relu.forward(&x)?, &(f.matmul(&relu.w_dec) + &relu.b_dec)) <= 1e-5);

    // JumpReLU: pre where pre > threshold, else 0 (even for positive pre below the threshold).
    let jump = tiny(Activation::JumpRelu, 16, 32);
    let pre = jump.hidden_pre(&x)?;
    let th = jump.threshold.as_ref().unwrap();
    let expected = pre.where_self(&pre.gt_tensor(th), &pre.zeros_like());
    assert!(max_abs_diff(&jump.encode(&x)?, &expected) == 0.0);
    let below = pre.gt(0.0).logical_and(&pre.le_tensor(th)).sum(Kind::Int64).int64_value(&[]);
    assert!(below > 0, "the test should have positive pre-activations under the threshold");

    // TopK: at most k active per position, and they are the k largest pre-activations.
    let topk = tiny(Activation::TopK { k: 4 }, 16, 32);
    let f = topk.encode(&x)?;
    let pre = topk.hidden_pre(&x)?;
    let active = f.gt(0.0).sum_dim_intlist(-1, false, Kind::Int64);
    assert!(active.le(4).all().int64_value(&[]) == 1);
    let kth = pre.topk(4, -1, true, true).0.narrow(-1, 3, 1);
    let expected = pre.where_self(&pre.ge_tensor(&kth).logical_and(&pre.gt(0.0)), &pre.zeros_like());
    assert!(max_abs_diff(&f, &expected) == 0.0);

    // A wrong width is an error naming d_in.
    let err = relu.encode(&Tensor::zeros([3, 15], (Kind::Float, Device::Cpu))).unwrap_err();
    assert!(err.to_string().contains("d_in = 16"), "{err}");
    Ok(())
}

#[test]
fn saved_folders_read_back_equal() -> nnsight::Result<()> {
    common::init();
    let dir = tempfile::tempdir().unwrap();
    for activation in [Activation::Relu, Activation::JumpRelu, Activation::TopK { k: 5 }] {
        let sae = tiny(activation, 16, 32);
        let path = dir.path().join(activation.architecture());
        sae.save(&path)?;
        let back = Sae::load(&path)?;
        assert_eq!(back.activation, activation);
        assert_eq!(back.hook_name, "blocks.1.hook_resid_post");
        assert!(back.apply_b_dec_to_input);
        for (a, b) in [(&sae.w_enc, &back.w_enc), (&sae.b_enc, &back.b_enc), (&sae.w_dec, &back.w_dec)] {
            assert!(max_abs_diff(a, b) == 0.0);
        }
        assert_eq!(sae.threshold.is_some(), back.threshold.is_some());
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path.join("cfg.json")).unwrap()).unwrap();
        assert_eq!(cfg["architecture"], activation.architecture());
        assert_eq!(cfg["metadata"]["hook_name"], "blocks.1.hook_resid_post");
        assert_eq!(cfg["metadata"]["hook_layer"], 1);
        if let Activation::TopK { k } = activation {
            assert_eq!(cfg["k"], k);
        }
    }
    // A pre-6 config (hook_name at the top, the activation as activation_fn_str and its kwargs) reads too.
    let old = dir.path().join("old");
    tiny(Activation::Relu, 16, 32).save(&old)?;
    let pre6 = serde_json::json!({
        "d_in": 16, "d_sae": 32, "hook_name": "blocks.2.hook_resid_pre", "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": 3}, "apply_b_dec_to_input": false, "normalize_activations": false,
    });
    std::fs::write(old.join("cfg.json"), pre6.to_string()).unwrap();
    let sae = Sae::load(&old)?;
    assert_eq!(
        (sae.activation, sae.site(), sae.apply_b_dec_to_input),
        (Activation::TopK { k: 3 }, Some(Site::Input(2)), false)
    );
    Ok(())
}

/// Copies the reference folder to a temporary one, with `cfg` changed by `edit_cfg` and the weights by `edit`.
fn broken(
    edit_cfg: impl FnOnce(&mut serde_json::Value),
    edit: impl FnOnce(&mut Vec<(String, Tensor)>),
) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(folder().join("cfg.json")).unwrap()).unwrap();
    edit_cfg(&mut cfg);
    std::fs::write(dir.path().join("cfg.json"), cfg.to_string()).unwrap();
    let mut tensors = Tensor::read_safetensors(folder().join("sae_weights.safetensors")).unwrap();
    edit(&mut tensors);
    Tensor::write_safetensors(&tensors, dir.path().join("sae_weights.safetensors")).unwrap();
    dir
}

fn load_err(dir: &Path) -> Error {
    Sae::load(dir).expect_err("the folder should be refused")
}

#[test]
fn bad_folders_are_refused_with_clear_errors() -> nnsight::Result<()> {
    common::init();
    let missing = load_err(Path::new("no/such/sae"));
    assert!(matches!(missing, Error::FileNotFound { .. }), "{missing}");

    let dir = broken(|_| {}, |t| t.retain(|(n, _)| n != "W_dec"));
    let err = load_err(dir.path());
    assert!(matches!(&err, Error::MissingTensors { names, .. } if names == &["W_dec"]), "{err}");

    let dir = broken(|c| c["d_sae"] = 100.into(), |_| {});
    let err = load_err(dir.path());
    assert!(
        matches!(&err, Error::ShapeMismatch { expected, found, .. } if expected == &[576, 100] && found == &[576, 128]),
        "{err}"
    );
    assert!(err.to_string().contains("W_enc"), "{err}");

    let dir = broken(|c| c["architecture"] = "gated".into(), |_| {});
    let err = load_err(dir.path()).to_string();
    assert!(err.contains("cfg.json") && err.contains("`gated` is not supported"), "{err}");

    let dir = broken(|c| c["normalize_activations"] = "expected_average_only_in".into(), |_| {});
    let err = load_err(dir.path()).to_string();
    assert!(err.contains("normalize_activations"), "{err}");

    let dir = broken(|c| c["architecture"] = "jumprelu".into(), |_| {});
    let err = load_err(dir.path());
    assert!(matches!(&err, Error::MissingTensors { names, .. } if names == &["threshold"]), "{err}");

    let dir = broken(|c| c["architecture"] = "topk".into(), |_| {});
    assert!(load_err(dir.path()).to_string().contains("needs `k`"));

    let dir = broken(|_| {}, |t| t.push(("extra".into(), Tensor::zeros([2], (Kind::Float, Device::Cpu)))));
    assert!(matches!(load_err(dir.path()), Error::UnexpectedTensors { .. }));

    let dir = broken(|c| c.as_object_mut().unwrap().remove("d_in").map(|_| ()).unwrap(), |_| {});
    assert!(load_err(dir.path()).to_string().contains("`d_in` is missing"));

    // An SAE of SmolLM2's width does not fit tiny-gpt2 (width 64); nor a layer beyond the model's.
    let gpt2 = LanguageModel::<Gpt2>::load_with(common::data("tiny-gpt2"), common::opts())?;
    let mut sae = Sae::load(folder())?;
    let err = sae.check(&gpt2).unwrap_err().to_string();
    assert!(err.contains("layer 5") && err.contains("2 layers"), "{err}");
    sae.hook_name = "blocks.1.hook_resid_post".into();
    let err = sae.check(&gpt2).unwrap_err().to_string();
    assert!(err.contains("d_in is 576") && err.contains("hidden size is 64"), "{err}");
    assert!(sae.splice(&gpt2).is_err());
    let mut far = sae.clone();
    far.hook_name = "blocks.40.hook_resid_post".into();
    assert!(far.check(&gpt2).unwrap_err().to_string().contains("layer 40"));
    far.hook_name = "blocks.0.attn.hook_z".into();
    assert!(far.check(&gpt2).unwrap_err().to_string().contains("not a residual-stream site"));
    assert!(sae.edit_feature(&gpt2, 500, FeatureEdit::Set(1.0)).err().unwrap().to_string().contains("feature 500"));
    Ok(())
}

#[test]
fn the_graph_names_the_registered_functions_and_reads_back() -> nnsight::Result<()> {
    let gpt2 = LanguageModel::<Gpt2>::load_with(common::data("tiny-gpt2"), common::opts())?;
    let sae = tiny(Activation::TopK { k: 4 }, 64, 32);
    let (out, graphs) = nnsight::graph::capture_graphs(|| -> nnsight::Result<Tensor> {
        intervene!(gpt2.trace("Hello world") {
            let h = gpt2.layers[1].output;
            let edited = sae.edit_feature_in(h, 2, FeatureEdit::Set(3.0));
            gpt2.layers[1].output = edited;
            let features = sae.encode_in(edited).save();
        });
        Ok(features)
    });
    assert_eq!(out?.size()[2], 32);
    let json = graphs[0].to_json();
    for name in ["nnsight::sae::graph::sae_encode", "nnsight::sae::graph::sae_edit_feature"] {
        assert!(json.contains(name), "the graph should call {name}");
    }
    let back = nnsight::graph::Graph::from_json(&json)?;
    assert_eq!(back.to_json(), json);
    Ok(())
}

#[test]
fn a_short_training_run_lowers_the_loss() -> nnsight::Result<()> {
    common::init();
    // Rows that are sparse sums of 24 random directions in 32 dimensions.
    tch::manual_seed(11);
    let dirs = Tensor::randn([24, 32], (Kind::Float, Device::Cpu));
    let mask = Tensor::rand([2000, 24], (Kind::Float, Device::Cpu)).lt(0.1).to_kind(Kind::Float);
    let x = (mask * Tensor::rand([2000, 24], (Kind::Float, Device::Cpu)) * 3.0).matmul(&dirs);
    for activation in [Activation::Relu, Activation::TopK { k: 4 }] {
        let options = TrainOptions {
            d_sae: 48,
            activation,
            l1_coefficient: 1.0,
            lr: 3e-3,
            steps: 150,
            batch_size: 128,
            log_every: 10,
            hook_name: "blocks.0.hook_resid_post".into(),
            ..TrainOptions::default()
        };
        let (sae, curve) = train::train(&x, &options)?;
        let (first, last) = (curve[0], curve[curve.len() - 1]);
        assert_eq!(last.step, 150);
        assert!(last.mse < 0.5 * first.mse, "{activation:?}: mse {} -> {}", first.mse, last.mse);
        let r = train::evaluate(&sae, &x)?;
        assert!(r.explained_variance > 0.6, "{activation:?}: {r:?}");
        assert!(r.l0 > 0.0 && r.l0 < 48.0, "{activation:?}: {r:?}");
        if let Activation::TopK { k } = activation {
            assert!(r.l0 <= k as f64);
        }
    }
    let err = train::train(&x, &TrainOptions { steps: 0, ..TrainOptions::default() }).unwrap_err();
    assert!(err.to_string().contains("steps"), "{err}");
    Ok(())
}
