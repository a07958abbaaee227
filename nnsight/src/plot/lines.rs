//! Line plots: one or more named series over a shared x axis (a training curve, a metric over layers), with axis
//! names, a grid and a legend.

use super::{plot_error, render, DrawResult, Picture, FONT};
use crate::Result;
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;

/// A line plot of named series (see the [module docs](super)).
#[derive(Debug, Clone, Default)]
pub struct Lines {
    title: String,
    x_name: String,
    y_name: String,
    series: Vec<(String, Vec<(f64, f64)>)>,
    size: Option<(u32, u32)>,
}

/// Tableau's ten colours: distinct for series side by side.
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

impl Lines {
    /// An empty plot: add series with [`series`](Self::series) or [`series_xy`](Self::series_xy).
    pub fn new() -> Self {
        Lines::default()
    }

    /// The title above the plot.
    pub fn title(mut self, title: impl Into<String>) -> Self {
        self.title = title.into();
        self
    }

    /// The axes' names (`"step"`, `"loss"`).
    pub fn axes(mut self, x: impl Into<String>, y: impl Into<String>) -> Self {
        (self.x_name, self.y_name) = (x.into(), y.into());
        self
    }

    /// A series named `name` (its legend entry) with `ys` at x = 0, 1, 2, ...
    pub fn series(self, name: impl Into<String>, ys: &[f64]) -> Self {
        let points: Vec<(f64, f64)> = ys.iter().enumerate().map(|(i, &y)| (i as f64, y)).collect();
        self.series_xy(name, &points)
    }

    /// A series named `name` through `points` (x, y), drawn in the order given.
    pub fn series_xy(mut self, name: impl Into<String>, points: &[(f64, f64)]) -> Self {
        self.series.push((name.into(), points.to_vec()));
        self
    }

    /// The picture's size in pixels (800 x 500 by default).
    pub fn size(mut self, width: u32, height: u32) -> Self {
        self.size = Some((width, height));
        self
    }

    /// Writes the picture to `path`: PNG or SVG by its extension (the folder is created if missing).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let fail = |m: String| Err(plot_error(path, format!("line plot: {m}")));
        if self.series.is_empty() {
            return fail("no series to draw".into());
        }
        for (name, points) in &self.series {
            if points.is_empty() {
                return fail(format!("series {name:?} has no points"));
            }
            if let Some(i) = points.iter().position(|(x, y)| !(x.is_finite() && y.is_finite())) {
                return fail(format!("series {name:?} has a value that is not finite at point {i}: {:?}", points[i]));
            }
        }
        let (width, height) = self.size.unwrap_or((800, 500));
        if width < 200 || height < 150 {
            return fail(format!("the picture must be at least 200 x 150 pixels, given {width} x {height}"));
        }
        render(path, (width, height), self)
    }

    /// The range of `pick` over all points, widened by 5% each side (and to a width of 1 when flat).
    fn range(&self, pick: impl Fn(&(f64, f64)) -> f64) -> std::ops::Range<f64> {
        let all = self.series.iter().flat_map(|(_, p)| p.iter().map(&pick));
        let (lo, hi) = all.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
        let margin = if hi > lo { (hi - lo) * 0.05 } else { 0.5 };
        (lo - margin)..(hi + margin)
    }
}

impl Picture for Lines {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult<DB> {
        root.fill(&WHITE)?;
        let grey = RGBColor(90, 90, 90);
        let mut chart = ChartBuilder::on(root)
            .caption(&self.title, (FONT, 20))
            .margin(16)
            .x_label_area_size(46)
            .y_label_area_size(70)
            .build_cartesian_2d(self.range(|p| p.0), self.range(|p| p.1))?;
        chart
            .configure_mesh()
            .x_desc(self.x_name.as_str())
            .y_desc(self.y_name.as_str())
            .x_label_formatter(&|v| tick(*v))
            .y_label_formatter(&|v| tick(*v))
            .label_style((FONT, 13))
            .axis_desc_style((FONT, 15))
            .light_line_style(RGBColor(238, 238, 238))
            .bold_line_style(RGBColor(215, 215, 215))
            .axis_style(grey)
            .draw()?;
        for (i, (name, points)) in self.series.iter().enumerate() {
            let colour = PALETTE[i % PALETTE.len()];
            chart
                .draw_series(LineSeries::new(points.iter().copied(), colour.stroke_width(2)))?
                .label(name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2)));
            if points.len() <= 40 {
                chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, colour.filled())))?;
            }
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(grey)
            .label_font((FONT, 13))
            .draw()
    }
}

/// A tick value as short text: whole numbers without decimals (layers, steps), others to six significant digits.
fn tick(v: f64) -> String {
    if (v - v.round()).abs() < 1e-9 * v.abs().max(1.0) {
        return format!("{}", v.round());
    }
    if v.abs() < 1e-3 || v.abs() >= 1e6 {
        return format!("{v:.1e}");
    }
    let text = format!("{v:.6}");
    text.trim_end_matches('0').trim_end_matches('.').to_string()
}
