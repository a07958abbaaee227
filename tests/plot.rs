//! `nnsight::plot`: every kind of picture written as PNG and SVG, the PNGs decoded (size, not blank, a colour bar
//! that varies), the SVGs holding their labels; errors for bad input; `Labelled::plot`; `str_tokens`; and the
//! logit lens against Python nnsight 0.8.1 on the same weights (`scripts/peer/nnsight_logit_lens.py`).

use crate::common;
use nnsight::patching::{Axis, Labelled};
use nnsight::plot::{Heatmap, Lines, Scale};
use nnsight::prelude::*;
use nnsight::Error;
use std::collections::BTreeSet;
use std::path::Path;

/// A decoded PNG: width, height and RGB pixels.
struct Image {
    width: u32,
    height: u32,
    rgb: Vec<u8>,
}

impl Image {
    fn read(path: &Path) -> Image {
        let decoder = png::Decoder::new(std::fs::File::open(path).expect("open the PNG"));
        let mut reader = decoder.read_info().expect("a PNG header");
        let mut buf = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buf).expect("PNG data");
        assert_eq!(info.color_type, png::ColorType::Rgb, "{}: RGB pixels", path.display());
        buf.truncate(info.buffer_size());
        Image { width: info.width, height: info.height, rgb: buf }
    }

    fn pixel(&self, x: u32, y: u32) -> [u8; 3] {
        let i = (y * self.width + x) as usize * 3;
        [self.rgb[i], self.rgb[i + 1], self.rgb[i + 2]]
    }

    fn colours(&self) -> BTreeSet<[u8; 3]> {
        self.rgb.chunks(3).map(|c| [c[0], c[1], c[2]]).collect()
    }

    /// The most distinct colours in one pixel column of the right quarter (where a colour bar is).
    fn most_colours_in_a_right_column(&self) -> usize {
        (self.width * 3 / 4..self.width)
            .map(|x| (0..self.height).map(|y| self.pixel(x, y)).collect::<BTreeSet<_>>().len())
            .max()
            .unwrap_or(0)
    }
}

/// How plotters writes a text element's content in SVG.
fn text_element(text: &str) -> String {
    format!(">\n{text}\n</text>")
}

fn grid(rows: usize, cols: usize) -> Vec<Vec<f64>> {
    (0..rows).map(|r| (0..cols).map(|c| ((r * cols + c) as f64 * 0.37).sin() * (r as f64 - 3.0)).collect()).collect()
}

fn tokens(n: usize) -> Vec<String> {
    ["The", " Eiffel", " Tower", " is", " in", " the", " city", " of", "\n"]
        .iter()
        .cycle()
        .take(n)
        .map(|s| s.to_string())
        .collect()
}

#[test]
fn heatmaps_are_written_as_png_and_svg_with_their_labels() {
    let dir = tempfile::tempdir().unwrap();
    let text: Vec<Vec<String>> = (0..6).map(|r| tokens(9).iter().map(|t| format!("{t}{r}")).collect()).collect();
    let map = Heatmap::new(grid(6, 9))
        .title("a signed grid")
        .rows("layer", (0..6).map(|l| l.to_string()))
        .cols("position", tokens(9))
        .value_name("effect")
        .cell_text(text);
    for ext in ["png", "svg"] {
        map.save(dir.path().join(format!("grid.{ext}"))).unwrap();
    }
    let image = Image::read(&dir.path().join("grid.png"));
    // 9 columns of at least 30 pixels, 6 rows of at least 10, with labels around them.
    assert!(image.width >= 9 * 30 + 100 && image.height >= 6 * 10 + 60, "{} x {}", image.width, image.height);
    assert!(image.width <= 2000 && image.height <= 2000, "{} x {}", image.width, image.height);
    assert!(image.colours().len() > 50, "{} colours", image.colours().len());
    assert!(image.most_colours_in_a_right_column() > 40, "the colour bar does not vary");
    let svg = std::fs::read_to_string(dir.path().join("grid.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"), "{}", &svg[..80.min(svg.len())]);
    for text in ["a signed grid", "layer", "position", "effect", "Eiffel", "Tower3", "\\n"] {
        assert!(svg.contains(text), "the SVG lacks {text:?}");
    }
}

#[test]
fn a_large_grid_thins_its_labels_and_a_sequential_scale_starts_white() {
    let dir = tempfile::tempdir().unwrap();
    let values: Vec<Vec<f64>> = grid(80, 120).into_iter().map(|r| r.into_iter().map(f64::abs).collect()).collect();
    let path = dir.path().join("big.svg");
    Heatmap::new(values)
        .rows("query", tokens(80))
        .cols("key", tokens(120))
        .scale(Scale::Sequential)
        .save(&path)
        .unwrap();
    let svg = std::fs::read_to_string(&path).unwrap();
    // Fewer column labels than columns (thinned), turned upright.
    let labels = svg.matches(&text_element(" Eiffel")).count() + svg.matches(&text_element("The")).count();
    assert!(labels > 0 && labels < (80 + 120) / 9 * 2, "{labels} labels of the two most common tokens");
    assert!(svg.contains("rotate(270"), "upright column labels");
    let png = dir.path().join("big.png");
    Heatmap::new(vec![vec![0.0, 1.0]]).scale(Scale::Sequential).save(&png).unwrap();
    let image = Image::read(&png);
    assert!(image.colours().contains(&[247, 251, 255]), "the low end of the sequential scale");
}

#[test]
fn line_plots_are_written_as_png_and_svg_with_a_legend() {
    let dir = tempfile::tempdir().unwrap();
    let loss: Vec<f64> = (0..50).map(|i| 3.0 * (-(i as f64) / 15.0).exp() + 0.5).collect();
    let plot = Lines::new()
        .title("training")
        .axes("step", "loss")
        .series("train", &loss)
        .series_xy("eval", &[(0.0, 3.4), (25.0, 1.2), (49.0, 0.9)]);
    for ext in ["png", "svg"] {
        plot.save(dir.path().join(format!("loss.{ext}"))).unwrap();
    }
    let image = Image::read(&dir.path().join("loss.png"));
    assert_eq!((image.width, image.height), (800, 500));
    let colours = image.colours();
    assert!(colours.len() > 20, "{} colours", colours.len());
    for (name, rgb) in [("train", [31, 119, 180]), ("eval", [255, 127, 14])] {
        assert!(colours.contains(&rgb), "the {name} series' colour {rgb:?} is not drawn");
    }
    let svg = std::fs::read_to_string(dir.path().join("loss.svg")).unwrap();
    for text in ["training", "step", "loss", "train", "eval"] {
        assert!(svg.contains(&text_element(text)), "the SVG lacks {text:?}");
    }
}

/// The message of a plot error, checked to be one.
fn plot_message(result: nnsight::Result<()>) -> String {
    match result {
        Err(e @ Error::Plot { .. }) => e.to_string(),
        other => panic!("expected Error::Plot, got {other:?}"),
    }
}

#[test]
fn bad_input_is_an_error_naming_what_was_expected() {
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("x.png");
    let m = plot_message(Heatmap::new(vec![]).save(&png));
    assert!(m.contains("x.png") && m.contains("no values"), "{m}");
    let m = plot_message(Heatmap::new(grid(2, 3)).rows("layer", ["0", "1", "2"]).save(&png));
    assert!(m.contains("3 row labels given for 2 rows"), "{m}");
    let m = plot_message(Heatmap::new(vec![vec![1.0, 2.0], vec![3.0]]).save(&png));
    assert!(m.contains("row 1 has 1"), "{m}");
    let m = plot_message(Heatmap::new(grid(2, 2)).cell_text(vec![vec!["a".into()]]).save(&png));
    assert!(m.contains("cell text must be 2 rows of 2"), "{m}");
    let m = plot_message(Heatmap::new(grid(2, 2)).save(dir.path().join("x.jpg")));
    assert!(m.contains("`.jpg`") && m.contains(".png or .svg"), "{m}");
    let m = plot_message(Lines::new().save(&png));
    assert!(m.contains("no series"), "{m}");
    let m = plot_message(Lines::new().series("a", &[1.0, f64::NAN]).save(&png));
    assert!(m.contains("not finite at point 1"), "{m}");
    // A folder that cannot be made (a file stands in its way).
    std::fs::write(dir.path().join("file"), "").unwrap();
    match Heatmap::new(grid(2, 2)).save(dir.path().join("file/x.png")) {
        Err(e @ Error::Write { .. }) => assert!(e.to_string().contains("cannot write"), "{e}"),
        other => panic!("expected Error::Write, got {other:?}"),
    }
    assert!(!png.exists(), "nothing is written for bad input");
}

#[test]
fn a_labelled_result_plots_in_one_call_with_its_axes() {
    common::init();
    let dir = tempfile::tempdir().unwrap();
    let grid = Labelled {
        values: Tensor::from_slice(&[0.5f32, -1.0, 0.25, 2.0, 0.0, -0.5]).view([2, 3]),
        axes: vec![
            Axis { name: "layer", labels: vec!["0".into(), "1".into()] },
            Axis { name: "position", labels: vec!["0:The".into(), "1: Eiffel".into(), "2: Tower".into()] },
        ],
    };
    grid.plot(dir.path().join("grid.svg"), "patching").unwrap();
    let svg = std::fs::read_to_string(dir.path().join("grid.svg")).unwrap();
    for text in ["patching", "layer", "position", "1: Eiffel"] {
        assert!(svg.contains(&text_element(text)), "the SVG lacks {text:?}");
    }
    grid.plot(dir.path().join("grid.png"), "patching").unwrap();
    assert!(Image::read(&dir.path().join("grid.png")).colours().len() > 20);
    let flat = Labelled { values: Tensor::zeros([3], (Kind::Float, Device::Cpu)), axes: vec![grid.axes[0].clone()] };
    match flat.plot(dir.path().join("flat.png"), "") {
        Err(e @ Error::InvalidInput { .. }) => assert!(e.to_string().contains("two axes"), "{e}"),
        other => panic!("expected InvalidInput, got {other:?}"),
    }
}

#[test]
fn str_tokens_decode_each_token_on_its_own() {
    let model = common::smollm2();
    let text = "The Eiffel Tower is in the city of";
    let tokens = model.str_tokens(text).unwrap();
    assert_eq!(tokens.len(), model.encode(text).unwrap().len());
    assert_eq!(tokens.concat(), text);
    assert_eq!(tokens[1], " E");
}

#[test]
fn the_logit_lens_matches_python_nnsight() -> nnsight::Result<()> {
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(common::data("logit-lens/smollm2.json")).unwrap()).unwrap();
    let prompt = reference["prompt"].as_str().unwrap();
    let guard = common::smollm2();
    let model = &*guard;
    let ids: Vec<i64> = reference["tokens"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
    assert_eq!(model.encode(prompt).unwrap(), ids, "the same tokens");
    let n = model.model().model.layers.len();
    intervene!(model.trace(prompt) {
        let mut lens = Vec::new();
        for i in 0..n {
            let h = model.model.layers[i].output;
            lens.push(model.lm_head(model.model.norm(h)).i(0).softmax(-1).save());
        }
    });
    let (top, prob) = (reference["top"].as_array().unwrap(), reference["prob"].as_array().unwrap());
    assert_eq!(lens.len(), top.len());
    let mut worst = 0f64;
    for (l, layer) in lens.iter().enumerate() {
        let (p, ids) = layer.to_device(Device::Cpu).max_dim(-1, false);
        for pos in 0..ids.size()[0] {
            let want = top[l][pos as usize].as_i64().unwrap();
            assert_eq!(ids.int64_value(&[pos]), want, "layer {l}, position {pos}: top token");
            let diff = (p.double_value(&[pos]) - prob[l][pos as usize].as_f64().unwrap()).abs();
            worst = worst.max(diff);
        }
    }
    eprintln!("logit lens: top tokens equal at {n} x {}; largest probability difference {worst:.2e}", ids.len());
    assert!(worst < 1e-4, "probabilities differ from Python nnsight's by {worst:.2e}");
    Ok(())
}
