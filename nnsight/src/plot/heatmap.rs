//! Heatmaps: a grid of coloured cells with labelled rows and columns (tokens as text, thinned or turned upright
//! when there are many), a title, axis names, a colour bar, and optional text in each cell.

use super::colour::{text_on, tick_text, ticks, ColourMap, Scale};
use super::{plot_error, render, text_size, DrawResult, Picture, FONT};
use crate::{Error, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::path::Path;
use tch::{Kind, Tensor};

/// A heatmap of a `rows x cols` grid of values (see the [module docs](super)). Row 0 is at the top.
#[derive(Debug, Clone, Default)]
pub struct Heatmap {
    values: Vec<Vec<f64>>,
    title: String,
    row_name: String,
    row_labels: Vec<String>,
    col_name: String,
    col_labels: Vec<String>,
    value_name: String,
    scale: Scale,
    range: Option<(f64, f64)>,
    cell_text: Option<Vec<Vec<String>>>,
}

// Sizes in pixels.
const PAD: i32 = 14;
const GAP: i32 = 6;
const TITLE: f64 = 20.0;
const AXIS: f64 = 15.0;
const LABEL: f64 = 13.0;
const CELL: f64 = 12.0;
const BAR: i32 = 16;
/// Labels longer than this many characters are cut short.
const LONGEST_LABEL: usize = 24;

impl Heatmap {
    /// A heatmap of `values`, one inner `Vec` per row; rows and columns are numbered until labelled.
    pub fn new(values: Vec<Vec<f64>>) -> Self {
        Heatmap { values, ..Default::default() }
    }

    /// A heatmap of a two-dimensional tensor (rows along its first dimension).
    pub fn from_tensor(values: &Tensor) -> Result<Self> {
        let size = values.size();
        if size.len() != 2 {
            return Err(Error::InvalidInput {
                message: format!("Heatmap::from_tensor: expected a two-dimensional tensor, given shape {size:?}"),
            });
        }
        let flat = values
            .f_to_kind(Kind::Double)
            .and_then(|t| t.f_to_device(tch::Device::Cpu))
            .and_then(|t| t.f_contiguous())
            .and_then(|t| t.f_view([-1]))
            .and_then(|t| Vec::<f64>::try_from(&t))
            .map_err(|e| Error::torch("Heatmap::from_tensor", e))?;
        let cols = size[1].max(1) as usize;
        Ok(Heatmap::new(flat.chunks(cols).map(<[f64]>::to_vec).collect()))
    }

    /// The title above the picture.
    pub fn title(mut self, title: impl Into<String>) -> Self {
        self.title = title.into();
        self
    }

    /// The rows' axis name (`"layer"`) and a label per row (empty: the row numbers).
    pub fn rows<S: Into<String>>(mut self, name: impl Into<String>, labels: impl IntoIterator<Item = S>) -> Self {
        self.row_name = name.into();
        self.row_labels = labels.into_iter().map(Into::into).collect();
        self
    }

    /// The columns' axis name (`"position"`) and a label per column (empty: the column numbers).
    pub fn cols<S: Into<String>>(mut self, name: impl Into<String>, labels: impl IntoIterator<Item = S>) -> Self {
        self.col_name = name.into();
        self.col_labels = labels.into_iter().map(Into::into).collect();
        self
    }

    /// What the colours stand for, written beside the colour bar (`"logit difference"`).
    pub fn value_name(mut self, name: impl Into<String>) -> Self {
        self.value_name = name.into();
        self
    }

    /// The colour scale ([`Scale::Auto`] by default: diverging when any value is negative).
    pub fn scale(mut self, scale: Scale) -> Self {
        self.scale = scale;
        self
    }

    /// The values at the two ends of the colour bar (by default the values' range, or `-m..m` for a diverging
    /// scale); values outside take the end colours.
    pub fn range(mut self, lo: f64, hi: f64) -> Self {
        self.range = Some((lo, hi));
        self
    }

    /// Text written in each cell (one `Vec` per row, like the values), e.g. a logit lens's top token.
    pub fn cell_text(mut self, text: Vec<Vec<String>>) -> Self {
        self.cell_text = Some(text);
        self
    }

    /// Writes the picture to `path`: PNG or SVG by its extension (the folder is created if missing).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        self.check(path)?;
        let layout = Layout::of(self);
        render(path, layout.size, &Drawing { map: self, layout })
    }

    fn check(&self, path: &Path) -> Result<()> {
        let fail = |m: String| Err(plot_error(path, format!("heatmap: {m}")));
        let (rows, cols) = (self.values.len(), self.values.first().map_or(0, Vec::len));
        if rows == 0 || cols == 0 {
            return fail(format!("no values to draw (given {rows} rows of {cols} values)"));
        }
        if let Some((i, row)) = self.values.iter().enumerate().find(|(_, r)| r.len() != cols) {
            return fail(format!("every row must have {cols} values (as row 0 has), row {i} has {}", row.len()));
        }
        for (what, labels, n) in [("row", &self.row_labels, rows), ("column", &self.col_labels, cols)] {
            if !labels.is_empty() && labels.len() != n {
                return fail(format!("{} {what} labels given for {n} {what}s", labels.len()));
            }
        }
        if let Some(text) = &self.cell_text {
            if text.len() != rows || text.iter().any(|r| r.len() != cols) {
                return fail(format!("the cell text must be {rows} rows of {cols} (as the values are)"));
            }
        }
        if let Some((lo, hi)) = self.range {
            if !(lo.is_finite() && hi.is_finite() && lo < hi) {
                return fail(format!("the colour range must be finite with low < high, given {lo}..{hi}"));
            }
        }
        Ok(())
    }

    fn labels(given: &[String], n: usize) -> Vec<String> {
        if given.is_empty() {
            (0..n).map(|i| i.to_string()).collect()
        } else {
            given.iter().map(|l| shown(l, LONGEST_LABEL)).collect()
        }
    }
}

/// `text` as it can be drawn on one line: control characters escaped, cut to `most` characters.
fn shown(text: &str, most: usize) -> String {
    let escaped: String = text.chars().flat_map(|c| c.escape_debug().collect::<Vec<_>>()).collect();
    let escaped = escaped.replace("\\'", "'").replace("\\\"", "\"");
    // A token of spaces alone would be invisible: show its spaces as open boxes.
    let escaped = if escaped.trim().is_empty() { escaped.replace(' ', "\u{2423}") } else { escaped };
    if escaped.chars().count() > most {
        escaped.chars().take(most - 1).chain(std::iter::once('…')).collect()
    } else {
        escaped
    }
}

/// `text` cut (with an ellipsis) to fit `width` pixels at `size`.
fn fitted(text: &str, size: f64, width: i32) -> String {
    if text_size(text, size).0 as i32 <= width {
        return text.to_string();
    }
    let chars: Vec<char> = text.chars().collect();
    (1..chars.len())
        .rev()
        .map(|n| chars[..n].iter().chain(std::iter::once(&'…')).collect::<String>())
        .find(|t| text_size(t, size).0 as i32 <= width)
        .unwrap_or_default()
}

/// Where everything goes, in pixels.
struct Layout {
    size: (u32, u32),
    rows: Vec<String>,
    cols: Vec<String>,
    cell: (i32, i32),
    grid: (i32, i32),
    row_step: usize,
    col_step: usize,
    cols_upright: bool,
    col_band: i32,
    bar: (i32, i32, i32),
    /// The centre of the colour bar's caption, across.
    caption_x: i32,
    map: ColourMap,
}

impl Layout {
    fn of(h: &Heatmap) -> Layout {
        let (n_rows, n_cols) = (h.values.len(), h.values[0].len());
        let rows = Heatmap::labels(&h.row_labels, n_rows);
        let cols = Heatmap::labels(&h.col_labels, n_cols);
        let line = |size: f64| text_size("Ag", size).1 as i32;
        let cell = match &h.cell_text {
            Some(text) => {
                let widest = text.iter().flatten().map(|t| text_size(&shown(t, 12), CELL).0 as i32).max().unwrap_or(0);
                ((widest + 8).clamp(30, 84), line(CELL) + 10)
            }
            None => ((1000 / n_cols as i32).clamp(4, 44), (700 / n_rows as i32).clamp(4, 26)),
        };
        let row_step = ((line(LABEL) + 2) as f64 / cell.1 as f64).ceil().max(1.0) as usize;
        let widest = |labels: &[String], step: usize| {
            labels.iter().step_by(step).map(|l| text_size(l, LABEL).0 as i32).max().unwrap_or(0)
        };
        let row_w = widest(&rows, row_step);
        let cols_upright = widest(&cols, 1) + 6 > cell.0;
        let col_step =
            if cols_upright { ((line(LABEL) + 2) as f64 / cell.0 as f64).ceil().max(1.0) as usize } else { 1 };
        let col_band = if cols_upright { widest(&cols, col_step) } else { line(LABEL) };
        let grid = (cell.0 * n_cols as i32, cell.1 * n_rows as i32);
        let map = ColourMap::new(h.scale, h.values.iter().flatten().copied(), h.range);
        let tick_w = ticks(map.lo, map.hi, 7)
            .iter()
            .map(|&t| text_size(&tick_text(t, tick_step(&map)), LABEL).0 as i32)
            .max()
            .unwrap_or(0);
        let left = PAD + if h.row_name.is_empty() { 0 } else { line(AXIS) + GAP } + row_w + GAP;
        let top = PAD + if h.title.is_empty() { 0 } else { line(TITLE) + 2 * GAP };
        let bar_h = grid.1.max(140);
        let bar_x = left + grid.0 + 3 * GAP;
        let right = bar_x + BAR + GAP + tick_w + if h.value_name.is_empty() { 0 } else { GAP + line(AXIS) } + PAD;
        let below = GAP + col_band + if h.col_name.is_empty() { 0 } else { GAP + line(AXIS) };
        let bottom = top + (grid.1 + below).max(bar_h + line(LABEL) / 2) + PAD;
        let width = right.max(text_size(&h.title, TITLE).0 as i32 + 2 * PAD);
        Layout {
            size: (width as u32, bottom as u32),
            rows,
            cols,
            cell,
            grid: (left, top),
            row_step,
            col_step,
            cols_upright,
            col_band,
            bar: (bar_x, top, bar_h),
            caption_x: bar_x + BAR + GAP + tick_w + GAP + line(AXIS) / 2,
            map,
        }
    }
}

fn tick_step(map: &ColourMap) -> f64 {
    let t = ticks(map.lo, map.hi, 7);
    if t.len() > 1 {
        t[1] - t[0]
    } else {
        map.hi - map.lo
    }
}

/// A heatmap with its layout, ready to draw.
struct Drawing<'a> {
    map: &'a Heatmap,
    layout: Layout,
}

/// Draws `text` at `at`, anchored by `anchor`, upright (read from bottom to top) when `upright`.
pub(crate) fn label<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    text: &str,
    at: (i32, i32),
    size: f64,
    anchor: (HPos, VPos),
    upright: bool,
    colour: RGBColor,
) -> DrawResult<DB> {
    let font = (FONT, size).into_font();
    let font = if upright { font.transform(FontTransform::Rotate270) } else { font };
    let style = TextStyle::from(font).color(&colour).pos(Pos::new(anchor.0, anchor.1));
    root.draw(&Text::new(text.to_string(), at, style))
}

impl Picture for Drawing<'_> {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult<DB> {
        let (h, l) = (self.map, &self.layout);
        let black = RGBColor(0, 0, 0);
        let grey = RGBColor(90, 90, 90);
        root.fill(&WHITE)?;
        let (gx, gy) = l.grid;
        let (cw, ch) = l.cell;
        let (gw, gh) = (cw * l.cols.len() as i32, ch * l.rows.len() as i32);
        if !h.title.is_empty() {
            label(root, &h.title, (l.size.0 as i32 / 2, PAD), TITLE, (HPos::Center, VPos::Top), false, black)?;
        }
        for (r, row) in h.values.iter().enumerate() {
            for (c, &v) in row.iter().enumerate() {
                let (x, y) = (gx + c as i32 * cw, gy + r as i32 * ch);
                let colour = l.map.colour(v);
                root.draw(&Rectangle::new([(x, y), (x + cw, y + ch)], colour.filled()))?;
                if let Some(text) = &h.cell_text {
                    let t = fitted(&shown(&text[r][c], 12), CELL, cw - 4);
                    let at = (x + cw / 2, y + ch / 2);
                    label(root, &t, at, CELL, (HPos::Center, VPos::Center), false, text_on(colour))?;
                }
            }
        }
        root.draw(&Rectangle::new([(gx, gy), (gx + gw, gy + gh)], grey.stroke_width(1)))?;
        for (r, text) in l.rows.iter().enumerate().step_by(l.row_step) {
            let at = (gx - GAP, gy + r as i32 * ch + ch / 2);
            label(root, text, at, LABEL, (HPos::Right, VPos::Center), false, black)?;
        }
        for (c, text) in l.cols.iter().enumerate().step_by(l.col_step) {
            let x = gx + c as i32 * cw + cw / 2;
            if l.cols_upright {
                label(root, text, (x, gy + gh + GAP), LABEL, (HPos::Right, VPos::Center), true, black)?;
            } else {
                label(root, text, (x, gy + gh + GAP), LABEL, (HPos::Center, VPos::Top), false, black)?;
            }
        }
        if !h.row_name.is_empty() {
            let at = (PAD + text_size("Ag", AXIS).1 as i32 / 2, gy + gh / 2);
            label(root, &h.row_name, at, AXIS, (HPos::Center, VPos::Center), true, black)?;
        }
        if !h.col_name.is_empty() {
            let at = (gx + gw / 2, gy + gh + GAP + l.col_band + GAP);
            label(root, &h.col_name, at, AXIS, (HPos::Center, VPos::Top), false, black)?;
        }
        self.colour_bar(root)
    }
}

impl Drawing<'_> {
    fn colour_bar<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult<DB> {
        let (l, black) = (&self.layout, RGBColor(0, 0, 0));
        let (x, top, height) = l.bar;
        let (lo, hi) = (l.map.lo, l.map.hi);
        for i in 0..height {
            let v = hi - (i as f64 + 0.5) / height as f64 * (hi - lo);
            root.draw(&Rectangle::new([(x, top + i), (x + BAR, top + i + 1)], l.map.colour(v).filled()))?;
        }
        root.draw(&Rectangle::new([(x, top), (x + BAR, top + height)], RGBColor(90, 90, 90).stroke_width(1)))?;
        let step = tick_step(&l.map);
        for t in ticks(lo, hi, 7) {
            let y = top + ((hi - t) / (hi - lo) * height as f64).round() as i32;
            root.draw(&PathElement::new(vec![(x + BAR, y), (x + BAR + 4, y)], black))?;
            label(root, &tick_text(t, step), (x + BAR + GAP, y), LABEL, (HPos::Left, VPos::Center), false, black)?;
        }
        if !self.map.value_name.is_empty() {
            let at = (l.caption_x, top + height / 2);
            label(root, &self.map.value_name, at, AXIS, (HPos::Center, VPos::Center), true, black)?;
        }
        Ok(())
    }
}
