//! Boundless DAS (`nnsight::das`): the interchange against Python nnsight 0.8.1 for a fixed rotation and boundary,
//! the rotation's orthogonality through training, the boundary's two ends (a full swap is activation patching, an
//! empty one no intervention), a loss that falls in a short run, and the errors.

use crate::common::{self, max_abs_diff, read_reference};
use nnsight::das::{interchange, Boundary, BoundlessDas, Pair, Rotation, TrainConfig};
use nnsight::prelude::*;

const TEMPLATE: (&str, &str) = ("Q: What is the capital city of", "?\nA: The capital city is");

fn prompt(model: &LanguageModel<Llama>, country: &str) -> Vec<i64> {
    model.encode(&format!("{} {country}{}", TEMPLATE.0, TEMPLATE.1)).unwrap()
}

fn first_token(model: &LanguageModel<Llama>, word: &str) -> i64 {
    model.encode(&format!(" {word}")).unwrap()[0]
}

/// The country's token: where two prompts of the template differ.
fn country_position(a: &[i64], b: &[i64]) -> i64 {
    a.iter().zip(b).position(|(x, y)| x != y).unwrap() as i64
}

/// `R Rᵀ − I`, largest entry.
fn orthogonality_error(r: &Tensor) -> f64 {
    let r = r.to_kind(Kind::Double);
    (r.matmul(&r.tr()) - Tensor::eye(r.size()[0], (Kind::Double, Device::Cpu))).abs().max().double_value(&[])
}

/// The product of Householder reflections `prod_k (I − 2 v_k v_kᵀ)` in float64, as the peer script builds it.
fn householder(vs: &Tensor) -> Tensor {
    let vs = vs.to_kind(Kind::Double);
    let d = vs.size()[1];
    let eye = Tensor::eye(d, (Kind::Double, Device::Cpu));
    let mut r = eye.copy();
    for k in 0..vs.size()[0] {
        let v = vs.get(k);
        r = r.matmul(&(&eye - v.outer(&v) * 2.0));
    }
    r.to_kind(Kind::Float)
}

#[test]
fn the_interchange_matches_python_nnsight() -> nnsight::Result<()> {
    let guard = common::smollm2();
    let model = &*guard;
    let reference = read_reference(&common::data("das/reference.safetensors"));
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(common::data("das/reference.json")).unwrap()).unwrap();
    let (layer, position) = (meta["layer"].as_u64().unwrap() as usize, meta["position"].as_i64().unwrap());
    let (size, temperature) = (meta["size"].as_f64().unwrap(), meta["temperature"].as_f64().unwrap());

    let rotation = Rotation::from_matrix(&householder(&reference["householder"]))?;
    let boundary = Boundary::new(576, size)?;
    let mask = boundary.mask(temperature)?;
    // The mask is the same formula: float32 sigmoids of the same numbers.
    assert!(
        max_abs_diff(&mask, &reference["mask"]) < 1e-6,
        "mask differs by {}",
        max_abs_diff(&mask, &reference["mask"])
    );

    let ids = |name: &str| -> Vec<Vec<i64>> {
        let t = &reference[name];
        (0..t.size()[0]).map(|i| Vec::<i64>::try_from(t.get(i)).unwrap()).collect()
    };
    let pairs: Vec<Pair> = ids("base_ids")
        .into_iter()
        .zip(ids("source_ids"))
        .map(|(base, source)| Pair::new(base, source, position, 0))
        .collect();
    let das = BoundlessDas::with_parts(model, layer, rotation, boundary)?;
    let out = das.interchanged(&pairs, &mask)?;
    // Float32 forwards of the same weights (ours batched, Python's one prompt at a time): the hidden states are
    // within 1e-5 of each other, the logits (up to about 20 here) within 1e-4.
    let hidden_diff = max_abs_diff(&out.hidden, &reference["hidden"]);
    let logits = out.logits.gather(1, &reference["top_ids"], false);
    let logits_diff = max_abs_diff(&logits, &reference["top_logits"]);
    println!("hidden within {hidden_diff:.2e}, the 1024 largest logits within {logits_diff:.2e}");
    assert!(hidden_diff < 1e-4, "intervened hidden states differ by {hidden_diff}");
    assert!(logits_diff < 1e-4, "logits differ by {logits_diff}");
    assert!(out.logits.argmax(-1, false).equal(&reference["top_ids"].select(1, 0)));
    Ok(())
}

#[test]
fn the_interchange_formula_at_its_ends() -> nnsight::Result<()> {
    common::init();
    let base = Tensor::randn([3, 16], (Kind::Float, Device::Cpu));
    let source = Tensor::randn([3, 16], (Kind::Float, Device::Cpu));
    let r = Rotation::random(16, 3)?.matrix()?;
    assert!(orthogonality_error(&r) < 1e-6);
    let ones = Tensor::ones([16], (Kind::Float, Device::Cpu));
    assert!(max_abs_diff(&interchange(&base, &source, &r, &ones)?, &source) < 1e-5);
    assert!(max_abs_diff(&interchange(&base, &source, &r, &ones.zeros_like())?, &base) < 1e-5);
    // Half the rotated dimensions: the rotated coordinates are the source's below the boundary, the base's above.
    let half = Boundary::new(16, 8.0)?.hard_mask();
    let mixed = interchange(&base, &source, &r, &half)?.matmul(&r);
    assert!(max_abs_diff(&mixed.narrow(1, 0, 8), &source.matmul(&r).narrow(1, 0, 8)) < 1e-5);
    assert!(max_abs_diff(&mixed.narrow(1, 8, 8), &base.matmul(&r).narrow(1, 8, 8)) < 1e-5);
    // A soft mask at a low temperature is the hard one.
    assert!(max_abs_diff(&Boundary::new(16, 8.0)?.mask(0.01)?, &half) < 1e-6);
    Ok(())
}

#[test]
fn a_full_boundary_is_activation_patching_and_an_empty_one_changes_nothing() -> nnsight::Result<()> {
    let guard = common::smollm2();
    let model = &*guard;
    let (france, japan, italy) = (prompt(model, "France"), prompt(model, "Japan"), prompt(model, "Italy"));
    let position = country_position(&france, &japan);
    let tokyo = first_token(model, "Tokyo");
    let pairs = vec![
        Pair::new(france.clone(), japan.clone(), position, tokyo),
        Pair::new(italy.clone(), japan.clone(), position, tokyo),
    ];
    let layer = 6;
    // Plain activation patching of the source's hidden state, and plain runs.
    intervene!(model.trace(japan.clone()) {
        let source = model.model.layers[layer].output.i((.., position)).save();
    });
    let mut patched = Vec::new();
    let mut plain = Vec::new();
    for base in [&france, &italy] {
        intervene!(model.trace(base.clone()) {
            model.model.layers[layer].output[(.., position, ..)] = &source;
            let logits = model.output.i((.., -1)).save();
        });
        patched.push(logits);
        plain.push(model.forward(base.clone())?.i((.., -1)));
    }
    let (patched, plain) = (Tensor::cat(&patched, 0), Tensor::cat(&plain, 0));

    let full = BoundlessDas::with_parts(model, layer, Rotation::random(576, 5)?, Boundary::new(576, 576.0)?)?;
    let swapped = full.interchanged(&pairs, &full.boundary.hard_mask())?;
    let diff = max_abs_diff(&swapped.logits, &patched);
    assert!(diff < 1e-4, "a full swap differs from activation patching by {diff}");
    assert!(max_abs_diff(&swapped.hidden.get(0), &source.get(0)) < 1e-4);
    assert_eq!(full.iia(&pairs)?, 1.0, "patching Japan's country token makes the answer Tokyo");
    let soft = full.interchanged(&pairs, &full.boundary.mask(0.01)?)?;
    assert!(max_abs_diff(&soft.logits, &patched) < 1e-4);

    let none = BoundlessDas::with_parts(model, layer, Rotation::random(576, 5)?, Boundary::new(576, 0.0)?)?;
    let kept = none.interchanged(&pairs, &none.boundary.hard_mask())?;
    let diff = max_abs_diff(&kept.logits, &plain);
    assert!(diff < 1e-4, "an empty boundary differs from no intervention by {diff}");
    assert_eq!(none.iia(&pairs)?, 0.0);
    Ok(())
}

#[test]
fn a_short_training_run_lowers_the_loss_and_keeps_the_rotation_orthogonal() -> nnsight::Result<()> {
    let guard = common::smollm2();
    let model = &*guard;
    let countries = [("France", "Paris"), ("Japan", "Tokyo"), ("Germany", "Berlin"), ("Italy", "Rome")];
    let prompts: Vec<Vec<i64>> = countries.iter().map(|(c, _)| prompt(model, c)).collect();
    let position = country_position(&prompts[0], &prompts[1]);
    let mut pairs = Vec::new();
    for (b, _) in countries.iter().enumerate() {
        for (s, (_, capital)) in countries.iter().enumerate() {
            if b != s {
                pairs.push(Pair::new(prompts[b].clone(), prompts[s].clone(), position, first_token(model, capital)));
            }
        }
    }
    let mut das = BoundlessDas::new(model, 6, 0)?;
    let start = das.boundary.size();
    let config =
        TrainConfig { steps: 6, batch_size: 12, lr_rotation: 1e-2, temperature: (5.0, 1.0), ..Default::default() };
    let mut seen = 0;
    let logs = das.train(&pairs, &config, |_, log| {
        seen += 1;
        assert!(log.loss.is_finite());
        Ok(())
    })?;
    let losses: Vec<f64> = logs.iter().map(|l| l.cross_entropy).collect();
    println!("losses {losses:?}, boundary {start} -> {}", das.boundary.size());
    assert_eq!(seen, 6);
    assert!(losses[5] < losses[0] * 0.8, "the loss falls: {losses:?}");
    assert!(das.rotation.parameter().abs().max().double_value(&[]) > 0.0, "the rotation moved");
    let error = orthogonality_error(&das.rotation.matrix()?);
    assert!(error < 1e-5, "R Rᵀ = I within {error}");
    Ok(())
}

#[test]
fn bad_layers_shapes_and_pairs_are_errors() -> nnsight::Result<()> {
    let guard = common::smollm2();
    let model = &*guard;
    let france = prompt(model, "France");
    let message = |r: nnsight::Result<_>| r.map(|_| ()).expect_err("an error").to_string();

    let e = message(BoundlessDas::new(model, 30, 0).map(|_| ()));
    assert!(e.contains("30") && e.contains("model.layers"), "{e}");
    let e = message(BoundlessDas::with_parts(model, 3, Rotation::random(64, 0)?, Boundary::new(576, 4.0)?).map(|_| ()));
    assert!(e.contains("576") && e.contains("64x64"), "{e}");
    let e = message(Boundary::new(576, 600.0).map(|_| ()));
    assert!(e.contains("600"), "{e}");
    let e = message(Rotation::from_matrix(&Tensor::ones([4, 4], (Kind::Float, Device::Cpu))).map(|_| ()));
    assert!(e.contains("orthogonal"), "{e}");
    let e = message(Rotation::from_matrix(&Tensor::eye(4, (Kind::Float, Device::Cpu)).narrow(0, 0, 3)).map(|_| ()));
    assert!(e.contains("[3, 4]"), "{e}");
    let t = |shape: &[i64]| Tensor::zeros(shape, (Kind::Float, Device::Cpu));
    let e = message(interchange(&t(&[2, 8]), &t(&[2, 8]), &t(&[8, 8]), &t(&[7])).map(|_| ()));
    assert!(e.contains("mask [7]"), "{e}");

    let das = BoundlessDas::new(model, 3, 0)?;
    let e = message(das.iia(&[Pair::new(france.clone(), france.clone(), 40, 5)]).map(|_| ()));
    assert!(e.contains("pair 0, base") && e.contains("position 40"), "{e}");
    let e = message(das.iia(&[Pair::new(france.clone(), vec![], 0, 5)]).map(|_| ()));
    assert!(e.contains("source") && e.contains("no tokens"), "{e}");
    let e = message(das.iia(&[Pair::new(france.clone(), france.clone(), -1, 60_000)]).map(|_| ()));
    assert!(e.contains("label") && e.contains("60000"), "{e}");
    let e = message(das.iia(&[]).map(|_| ()));
    assert!(e.contains("no pairs"), "{e}");
    let e = message(das.interchanged(&[Pair::new(france.clone(), france, -1, 5)], &t(&[10])).map(|_| ()));
    assert!(e.contains("[576]") && e.contains("[10]"), "{e}");
    Ok(())
}
