//! Steering vectors (`nnsight::steering`): the contrastive recipe against Python nnsight 0.8.1, llama.cpp control
//! vectors written here and read by the `gguf` Python package (and the other way round), applying a file equal to
//! adding its directions by hand, and the errors for files that do not fit.

use crate::common::{self, max_abs_diff, read_reference};
use nnsight::prelude::*;
use nnsight::steering::{Pooling, SteeringVector};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The venv python with the `gguf` package: `NNSIGHT_PYTHON`, else the set-up's venv (`scripts/setup.sh`).
fn python() -> PathBuf {
    let python = std::env::var_os("NNSIGHT_PYTHON").map(PathBuf::from).unwrap_or_else(|| {
        nnsight::load::cache_dir().expect("no cache folder (HOME unset)").join("venv-torch-2.13.0/bin/python")
    });
    let ok = Command::new(&python).args(["-c", "import gguf"]).output().map(|o| o.status.success()).unwrap_or(false);
    assert!(ok, "{} cannot import the gguf package: run scripts/setup.sh (or set NNSIGHT_PYTHON)", python.display());
    python
}

/// Runs a Python snippet with `args`; its stdout.
fn run_python(code: &str, args: &[&Path]) -> String {
    let out = Command::new(python()).arg("-c").arg(code).args(args).output().expect("run python");
    assert!(out.status.success(), "python failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn pairs_of_reference() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(common::data("smollm2/steering_reference.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_str().unwrap().to_string(), p[1].as_str().unwrap().to_string()))
        .collect()
}

fn values(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.to_device(Device::Cpu).to_kind(Kind::Float)).unwrap()
}

#[test]
fn the_recipe_matches_python_nnsight_and_repeats_exactly() -> nnsight::Result<()> {
    let guard = common::smollm2();
    let model = &*guard;
    let owned = pairs_of_reference();
    let pairs: Vec<(&str, &str)> = owned.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    let reference = read_reference(&common::data("smollm2/steering_reference.safetensors"));
    let all: Vec<usize> = (0..30).collect();
    // The largest |activation| of each layer's output over the prompts.
    let mut largest = [0f64; 30];
    for prompt in pairs.iter().flat_map(|(a, b)| [*a, *b]) {
        intervene!(model.trace(prompt) {
            let mut maxima = Vec::new();
            for l in 0..30 {
                maxima.push(model.layers[l].output.abs().max().save());
            }
        });
        for (l, m) in maxima.iter().enumerate() {
            largest[l] = largest[l].max(m.double_value(&[]));
        }
    }
    eprintln!(
        "largest |activation| at layers 0, 1, 15, 29: {:.0} {:.0} {:.0} {:.0}",
        largest[0], largest[1], largest[15], largest[29]
    );
    for (pooling, name) in [(Pooling::LastToken, "last_token"), (Pooling::AllTokens, "all_tokens")] {
        let ours = SteeringVector::contrastive_at(model, &pairs, pooling, &all)?;
        let theirs = &reference[name];
        // The two forwards differ by float32 rounding, which grows with the activations (up to 3.4e-4 at layer 29's
        // output, see the README's parity table). At the last token, per layer |ours - theirs| <= 1e-4 +
        // 1e-5 max|theirs|. A mean over all tokens also carries the first token's rounding: its activations reach
        // 2e4 (the attention sink), where float32 steps by 2e-3, divided by the prompt's length; so there
        // |ours - theirs| <= 1e-4 + 1e-6 max|activation| (the largest of the layer's output over the prompts).
        let mut worst: f64 = 0.0;
        for (l, &activations) in largest.iter().enumerate() {
            let reference = theirs.get(l as i64);
            let d = max_abs_diff(&ours.directions[&l], &reference);
            let tolerance = match pooling {
                Pooling::LastToken => 1e-4 + 1e-5 * reference.abs().max().double_value(&[]),
                Pooling::AllTokens => 1e-4 + 1e-6 * activations,
            };
            assert!(d <= tolerance, "{name}, layer {l}: differs from Python nnsight's by {d:.3e} > {tolerance:.3e}");
            worst = worst.max(d);
            if l == 28 {
                eprintln!("{name}: worst |ours - Python nnsight| over layers 0-28 = {worst:.3e}");
            }
        }
        eprintln!(
            "{name}: worst |ours - Python nnsight| over 30 layers x 576 = {worst:.3e} (layer 29 {:.3e})",
            max_abs_diff(&ours.directions[&29], &theirs.get(29))
        );
        // Not trivially zero: the pairs differ at every layer.
        assert!(theirs.get(15).abs().max().double_value(&[]) > 0.1);
        let again = SteeringVector::contrastive_at(model, &pairs, pooling, &all)?;
        for l in 0..30 {
            assert!(again.directions[&l].equal(&ours.directions[&l]), "{name}: layer {l} differs between runs");
        }
    }
    // The default layers are llama.cpp's: 1 to 29.
    let default = SteeringVector::contrastive(model, &pairs[..1], Pooling::LastToken)?;
    assert_eq!(default.layers(), (1..30).collect::<Vec<_>>());
    assert_eq!(default.model_hint, "llama");
    Ok(())
}

/// A vector of distinct, known values at layers 1, 7 and 29 of SmolLM2 (hidden 576).
fn known_vector() -> SteeringVector {
    let directions: BTreeMap<usize, Tensor> = [1usize, 7, 29]
        .into_iter()
        .map(|l| (l, (Tensor::arange(576, (Kind::Float, Device::Cpu)) * 0.01 - l as f64).sin()))
        .collect();
    SteeringVector::new("llama", directions).unwrap()
}

#[test]
fn a_written_control_vector_reads_back_with_the_gguf_package() -> nnsight::Result<()> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("known.gguf");
    let vector = known_vector();
    vector.write_control_vector(&path)?;
    let out = run_python(
        r#"
import json, sys, gguf
r = gguf.GGUFReader(sys.argv[1])
def field(k):
    f = r.get_field(k)
    return None if f is None else (f.types[0].name, f.contents())
print(json.dumps({
    "fields": {k: field(k) for k in ["general.architecture", "controlvector.model_hint", "controlvector.layer_count"]},
    "tensors": [{"name": t.name, "shape": [int(d) for d in t.shape], "type": t.tensor_type.name,
                 "values": [float(v) for v in t.data]} for t in r.tensors],
}))
"#,
        &[&path],
    );
    let got: serde_json::Value = serde_json::from_str(&out).unwrap();
    let fields = &got["fields"];
    assert_eq!(fields["general.architecture"], serde_json::json!(["STRING", "controlvector"]));
    assert_eq!(fields["controlvector.model_hint"], serde_json::json!(["STRING", "llama"]));
    assert_eq!(fields["controlvector.layer_count"], serde_json::json!(["INT32", 3]));
    let tensors = got["tensors"].as_array().unwrap();
    assert_eq!(tensors.len(), 3);
    for (t, (layer, direction)) in tensors.iter().zip(&vector.directions) {
        assert_eq!(t["name"], format!("direction.{layer}"));
        assert_eq!(t["shape"], serde_json::json!([576]));
        assert_eq!(t["type"], "F32");
        let theirs: Vec<f32> = t["values"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        assert_eq!(theirs, values(direction), "values of direction.{layer}");
    }
    // And back here, unchanged.
    let back = SteeringVector::read_control_vector(&path)?;
    assert_eq!(back.layers(), vec![1, 7, 29]);
    assert_eq!(back.model_hint, "llama");
    for (l, d) in &vector.directions {
        assert!(back.directions[l].equal(d));
    }
    Ok(())
}

#[test]
fn applying_a_control_vector_equals_adding_its_directions_by_hand() -> nnsight::Result<()> {
    let (guard, dir) = (common::smollm2(), tempfile::tempdir().unwrap());
    let model = &*guard;
    let path = dir.path().join("known.gguf");
    known_vector().write_control_vector(&path)?;
    let vector = SteeringVector::read_control_vector(&path)?;
    let prompt = "The Eiffel Tower is in the city of";
    let strength = 2.5;

    let edited = vector.edit(model, strength)?;
    let steered = edited.forward(prompt)?;
    let hand: Vec<(i64, Tensor)> = [1i64, 7, 29]
        .into_iter()
        .map(|l| (l, (Tensor::arange(576, (Kind::Float, Device::Cpu)) * 0.01 - l as f64).sin() * strength))
        .collect();
    intervene!(model.trace(prompt) {
        for (l, add) in &hand {
            model.model.layers[*l as usize].output += &add.to_device(common::device());
        }
        let by_hand = model.output.save();
    });
    let d = max_abs_diff(&steered, &by_hand);
    eprintln!("steered by the file vs by hand: max |diff| {d:e}");
    assert!(d <= 1e-6, "applying the file differs from adding by hand by {d}");
    let plain = model.forward(prompt)?;
    assert!(max_abs_diff(&steered, &plain) > 1e-2, "the vector changed nothing");

    // In place, and off again.
    vector.edit_in_place(model, strength)?;
    let in_place = model.forward(prompt);
    model.clear_edits();
    assert!(max_abs_diff(&in_place?, &by_hand) <= 1e-6);
    assert!(model.forward(prompt)?.equal(&plain));

    // The additions are what an edit adds.
    let additions = vector.additions(model, strength)?;
    assert_eq!(additions.iter().map(|(l, _)| *l).collect::<Vec<_>>(), vec![1, 7, 29]);
    assert!(additions[0].1.to_device(Device::Cpu).equal(&hand[0].1));
    Ok(())
}

#[test]
fn control_vectors_written_by_the_gguf_package_import() -> nnsight::Result<()> {
    let dir = tempfile::tempdir().unwrap();
    let (repeng, llama) = (dir.path().join("repeng.gguf"), dir.path().join("cvector.gguf"));
    // repeng's export_gguf (u32 layer_count) and llama.cpp cvector-generator's keys (i32 layer_count), through the
    // gguf package's writer.
    run_python(
        r#"
import sys, numpy as np, gguf
for path, count in [(sys.argv[1], "uint32"), (sys.argv[2], "int32")]:
    w = gguf.GGUFWriter(path, "controlvector")
    w.add_string("controlvector.model_hint", "llama")
    getattr(w, "add_" + count)("controlvector.layer_count", 2)
    for layer in [3, 12]:
        w.add_tensor(f"direction.{layer}", (np.arange(576, dtype=np.float32) / 100 - layer).astype(np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
"#,
        &[&repeng, &llama],
    );
    for path in [&repeng, &llama] {
        let vector = SteeringVector::read_control_vector(path)?;
        assert_eq!(vector.layers(), vec![3, 12]);
        assert_eq!(vector.model_hint, "llama");
        for layer in [3usize, 12] {
            let expected: Vec<f32> = (0..576).map(|i| i as f32 / 100.0 - layer as f32).collect();
            assert_eq!(values(&vector.directions[&layer]), expected);
        }
    }
    let guard = common::smollm2();
    let model = &*guard;
    let vector = SteeringVector::read_control_vector(&repeng)?;
    let steered = vector.edit(model, 0.5)?.forward("Hello")?;
    assert!(max_abs_diff(&steered, &model.forward("Hello")?) > 1e-3);
    Ok(())
}

#[test]
fn files_that_do_not_fit_are_errors_naming_the_file_and_the_reason() -> nnsight::Result<()> {
    let (guard, dir) = (common::smollm2(), tempfile::tempdir().unwrap());
    let model = &*guard;
    let err = |r: nnsight::Result<SteeringVector>| r.unwrap_err().to_string();

    // A model file is not a control vector.
    let e = err(SteeringVector::read_control_vector(common::smollm2_path()));
    assert!(e.contains("not a control vector: general.architecture is \"llama\""), "{e}");

    // Made for another model: hidden size 64.
    let small = dir.path().join("small.gguf");
    let directions = BTreeMap::from([(2usize, Tensor::ones([64], (Kind::Float, Device::Cpu)))]);
    SteeringVector::new("gpt2", directions)?.write_control_vector(&small)?;
    let vector = SteeringVector::read_control_vector(&small)?;
    let e = vector.edit(model, 1.0).err().unwrap().to_string();
    assert!(
        e.contains("small.gguf") && e.contains("direction.2 has 64 values, but this model's hidden size is 576"),
        "{e}"
    );

    // A layer beyond the model's 30.
    let beyond = dir.path().join("beyond.gguf");
    let directions = BTreeMap::from([(30usize, Tensor::ones([576], (Kind::Float, Device::Cpu)))]);
    SteeringVector::new("llama", directions)?.write_control_vector(&beyond)?;
    let e = SteeringVector::read_control_vector(&beyond)?.additions(model, 1.0).err().unwrap().to_string();
    assert!(
        e.contains("beyond.gguf") && e.contains("direction.30 steers layer 30, but the model has 30 layers (0 to 29)"),
        "{e}"
    );

    // Layer 0 is neither written nor read; nor are F16 or two-dimensional directions, or other tensors.
    let zero = BTreeMap::from([(0usize, Tensor::ones([576], (Kind::Float, Device::Cpu)))]);
    let e =
        SteeringVector::new("llama", zero)?.write_control_vector(dir.path().join("zero.gguf")).unwrap_err().to_string();
    assert!(e.contains("steers layer 0") && e.contains(".select(1..)"), "{e}");
    let bad: Vec<PathBuf> =
        ["zero", "f16", "matrix", "other"].iter().map(|n| dir.path().join(format!("{n}.gguf"))).collect();
    run_python(
        r#"
import sys, numpy as np, gguf
cases = [("direction.0", np.ones(8, np.float32)), ("direction.1", np.ones(8, np.float16)),
         ("direction.1", np.ones((2, 4), np.float32)), ("token_embd.weight", np.ones(8, np.float32))]
for path, (name, value) in zip(sys.argv[1:], cases):
    w = gguf.GGUFWriter(path, "controlvector")
    w.add_tensor(name, value)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
"#,
        &bad.iter().map(PathBuf::as_path).collect::<Vec<_>>(),
    );
    let expected = [
        "direction.0: llama.cpp never steers layer 0",
        "`direction.1` is F16 of shape [8]; a direction is F32 of one dimension",
        "`direction.1` is F32 of shape [2, 4]",
        "tensor `token_embd.weight` is not a control vector's direction.N",
    ];
    for (path, expected) in bad.iter().zip(expected) {
        let e = err(SteeringVector::read_control_vector(path));
        assert!(e.contains(expected) && e.contains(&path.display().to_string()), "{e}");
    }
    Ok(())
}
