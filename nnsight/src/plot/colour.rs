//! Colour scales of heatmaps: diverging (blue, white at zero, red) for signed values such as patching effects, and
//! sequential (white to dark blue) for values such as probabilities; and the text colour that reads on a cell.

use plotters::style::RGBColor;

/// How a heatmap maps values to colours.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Scale {
    /// Diverging when any value is negative, sequential otherwise.
    #[default]
    Auto,
    /// Blue below zero, white at zero, red above, symmetric: the range is `-m..m` with `m` the largest magnitude
    /// (for signed data: patching effects, attribution scores, logit differences).
    Diverging,
    /// White at the low end to dark blue at the high end, over the values' range (probabilities, norms).
    Sequential,
}

/// A scale fixed to a range: maps a value to a colour.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ColourMap {
    /// The value at the low end of the colour bar.
    pub lo: f64,
    /// The value at the high end.
    pub hi: f64,
    diverging: bool,
}

// ColorBrewer's RdBu (reversed) and Blues, end and middle points.
const BLUE: (f64, f64, f64) = (33.0, 102.0, 172.0);
const WHITE: (f64, f64, f64) = (247.0, 247.0, 247.0);
const RED: (f64, f64, f64) = (178.0, 24.0, 43.0);
const PALE: (f64, f64, f64) = (247.0, 251.0, 255.0);
const MID_BLUE: (f64, f64, f64) = (107.0, 174.0, 214.0);
const DARK_BLUE: (f64, f64, f64) = (8.0, 48.0, 107.0);

impl ColourMap {
    /// The map `scale` gives the finite `values` (an explicit `range` wins over the values' own).
    pub fn new(scale: Scale, values: impl Iterator<Item = f64> + Clone, range: Option<(f64, f64)>) -> Self {
        let finite = values.filter(|v| v.is_finite());
        let (min, max) = finite.clone().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
        let (min, max) = if min <= max { (min, max) } else { (0.0, 1.0) };
        let diverging = match scale {
            Scale::Auto => min < 0.0,
            Scale::Diverging => true,
            Scale::Sequential => false,
        };
        let (lo, hi) = match range {
            Some(r) => r,
            None if diverging => {
                let m = min.abs().max(max.abs());
                (-m, m)
            }
            None => (min, max),
        };
        // A flat range still needs a width to divide by.
        let (lo, hi) = if hi > lo { (lo, hi) } else { (lo - 0.5, lo + 0.5) };
        ColourMap { lo, hi, diverging }
    }

    /// The colour of `value` (clamped to the range; not-a-number is grey).
    pub fn colour(&self, value: f64) -> RGBColor {
        if value.is_nan() {
            return RGBColor(200, 200, 200);
        }
        let t = ((value - self.lo) / (self.hi - self.lo)).clamp(0.0, 1.0);
        let (a, b, u) = if self.diverging {
            if t < 0.5 {
                (BLUE, WHITE, t * 2.0)
            } else {
                (WHITE, RED, t * 2.0 - 1.0)
            }
        } else if t < 0.5 {
            (PALE, MID_BLUE, t * 2.0)
        } else {
            (MID_BLUE, DARK_BLUE, t * 2.0 - 1.0)
        };
        let mix = |x: f64, y: f64| (x + (y - x) * u).round() as u8;
        RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
    }
}

/// Black or white, whichever reads better on `background`.
pub(crate) fn text_on(background: RGBColor) -> RGBColor {
    let RGBColor(r, g, b) = background;
    let luminance = 0.299 * r as f64 + 0.587 * g as f64 + 0.114 * b as f64;
    if luminance > 140.0 {
        RGBColor(0, 0, 0)
    } else {
        RGBColor(255, 255, 255)
    }
}

/// About `n` round tick values covering `lo..=hi` (steps of 1, 2 or 5 times a power of ten).
pub(crate) fn ticks(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    let span = hi - lo;
    if span <= 0.0 || !span.is_finite() {
        return vec![lo];
    }
    let raw = span / n.max(1) as f64;
    let power = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * power).find(|s| span / s <= n as f64).unwrap_or(10.0 * power);
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    (first..=last).map(|i| i as f64 * step).collect()
}

/// A tick value as short text (`0.25`, `-3`, `1.2e-5`).
pub(crate) fn tick_text(v: f64, step: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let magnitude = v.abs().max(step.abs());
    if !(1e-3..1e5).contains(&magnitude) {
        return format!("{v:.1e}");
    }
    let decimals = (-(step.abs().log10().floor())).max(0.0) as usize;
    format!("{v:.decimals$}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diverging_is_white_at_zero_and_symmetric() {
        let map = ColourMap::new(Scale::Auto, [-1.0, 3.0].into_iter(), None);
        assert_eq!((map.lo, map.hi), (-3.0, 3.0));
        let RGBColor(r, g, b) = map.colour(0.0);
        assert_eq!((r, g, b), (247, 247, 247));
        assert_ne!(map.colour(3.0), map.colour(-3.0));
    }

    #[test]
    fn sequential_spans_the_values_and_ticks_are_round() {
        let map = ColourMap::new(Scale::Auto, [0.2, 0.9].into_iter(), None);
        assert_eq!((map.lo, map.hi), (0.2, 0.9));
        assert_eq!(ticks(0.0, 1.0, 5), [0.0, 0.2, 0.4, 0.6000000000000001, 0.8, 1.0]);
        assert_eq!(tick_text(0.25, 0.05), "0.25");
        assert_eq!(tick_text(-3.0, 1.0), "-3");
    }
}
