//! Pictures of what an experiment found: [`Heatmap`]s (a logit lens, a patching grid, an attention pattern,
//! attribution scores) and [`Lines`] (a training curve, a sweep over layers), written as PNG or SVG by the file's
//! extension. Built on `plotters`, with DejaVu Sans bundled (`nnsight/assets/fonts`, Bitstream Vera licence) and
//! registered with plotters' `ab_glyph` text, so pictures come out the same on a bare server with no fonts
//! installed. Behind the `plot` cargo feature (on by default).
//!
//! ```no_run
//! use nnsight::plot::{Heatmap, Lines};
//!
//! # fn main() -> nnsight::Result<()> {
//! Heatmap::new(vec![vec![0.1, -0.4], vec![0.9, 0.0]])
//!     .title("effect of patching")
//!     .rows("layer", ["0", "1"])
//!     .cols("position", ["The", " Eiffel"])
//!     .save("target/pictures/grid.png")?;
//! Lines::new()
//!     .axes("step", "loss")
//!     .series("train", &[3.1, 2.4, 2.0, 1.8])
//!     .save("target/pictures/loss.svg")?;
//! # Ok(())
//! # }
//! ```
//!
//! [`Labelled`] (what a patching sweep returns) plots in one call: `grid.plot("resid.png", "title")`.

mod colour;
mod heatmap;
mod lines;

pub use colour::Scale;
pub use heatmap::Heatmap;
pub use lines::Lines;

use crate::patching::Labelled;
use crate::{Error, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;
use std::sync::Once;

/// The font family every picture's text uses: DejaVu Sans, bundled and registered on first use.
pub(crate) const FONT: &str = "sans-serif";

/// Registers the bundled font with plotters (once per process).
fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        const DEJAVU_SANS: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");
        // The bundled file is a valid TrueType font: registration cannot fail on it (checked by the tests).
        let _ = plotters::style::register_font(FONT, FontStyle::Normal, DEJAVU_SANS);
    });
}

/// The width and height in pixels of `text` at `size` in the bundled font.
pub(crate) fn text_size(text: &str, size: f64) -> (u32, u32) {
    register_font();
    (FONT, size).into_font().box_size(text).unwrap_or((0, 0))
}

/// A picture's file format, from its path's extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Png,
    Svg,
}

fn format_of(path: &Path) -> Result<Format> {
    match path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
        Some("png") => Ok(Format::Png),
        Some("svg") => Ok(Format::Svg),
        other => Err(plot_error(
            path,
            format!(
                "unknown picture format {}: the file name must end in .png or .svg",
                other.map(|e| format!("`.{e}`")).unwrap_or_else(|| "(no extension)".into())
            ),
        )),
    }
}

/// An [`Error::Plot`] about `path`.
pub(crate) fn plot_error(path: &Path, message: impl Into<String>) -> Error {
    Error::Plot { path: path.to_path_buf(), message: message.into() }
}

/// Something drawn on any plotters backend.
pub(crate) trait Picture {
    /// Draws the whole picture on `root`.
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult<DB>;
}

/// Draws `picture`, `width` x `height` pixels, on the backend `path`'s extension chooses, and writes the file (its
/// folder created if missing).
pub(crate) fn render(path: &Path, (width, height): (u32, u32), picture: &impl Picture) -> Result<()> {
    register_font();
    let format = format_of(path)?;
    let failed = |e: String| plot_error(path, format!("drawing failed: {e}"));
    let bytes = match format {
        Format::Png => {
            let mut pixels = vec![255u8; width as usize * height as usize * 3];
            {
                let root = BitMapBackend::with_buffer(&mut pixels, (width, height)).into_drawing_area();
                picture.draw(&root).map_err(|e| failed(e.to_string()))?;
                root.present().map_err(|e| failed(e.to_string()))?;
            }
            encode_png(&pixels, width, height).map_err(|e| plot_error(path, format!("PNG encoding failed: {e}")))?
        }
        Format::Svg => {
            let mut text = String::new();
            {
                let root = SVGBackend::with_string(&mut text, (width, height)).into_drawing_area();
                picture.draw(&root).map_err(|e| failed(e.to_string()))?;
                root.present().map_err(|e| failed(e.to_string()))?;
            }
            text.into_bytes()
        }
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| Error::Write { path: dir.to_path_buf(), source })?;
    }
    std::fs::write(path, bytes).map_err(|source| Error::Write { path: path.to_path_buf(), source })
}

/// What drawing on a backend returns.
pub(crate) type DrawResult<DB> = std::result::Result<(), DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

fn encode_png(pixels: &[u8], width: u32, height: u32) -> std::result::Result<Vec<u8>, png::EncodingError> {
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_compression(png::Compression::Best);
    let mut writer = encoder.write_header()?;
    writer.write_image_data(pixels)?;
    writer.finish()?;
    Ok(out)
}

impl Labelled {
    /// A heatmap of a two-axis result: its first axis down the rows, its second across the columns, their names
    /// and labels on the axes; the colour scale diverges around zero when any value is negative.
    pub fn heatmap(&self) -> Result<Heatmap> {
        if self.axes.len() != 2 {
            return Err(Error::InvalidInput {
                message: format!(
                    "Labelled::heatmap: a heatmap needs two axes, this result has {} ({})",
                    self.axes.len(),
                    self.axes.iter().map(|a| a.name).collect::<Vec<_>>().join(", ")
                ),
            });
        }
        let (rows, cols) = (&self.axes[0], &self.axes[1]);
        Ok(Heatmap::from_tensor(&self.values)?
            .rows(rows.name, rows.labels.clone())
            .cols(cols.name, cols.labels.clone()))
    }

    /// Writes [`heatmap`](Self::heatmap) with `title` to `path` (`.png` or `.svg`).
    pub fn plot(&self, path: impl AsRef<Path>, title: &str) -> Result<()> {
        self.heatmap()?.title(title).save(path)
    }
}
