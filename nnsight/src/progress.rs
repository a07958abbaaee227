//! A one-line progress display on standard error for long loads: redrawn in place on a terminal, a single
//! summary line otherwise (logs and CI stay readable).

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// Progress of a long piece of work measured in bytes.
pub struct Progress {
    label: String,
    total: u64,
    done: u64,
    start: Instant,
    last_draw: Option<Instant>,
    tty: bool,
    enabled: bool,
}

impl Progress {
    /// Starts a display for `total` bytes of work.
    pub fn new(label: &str, total: u64) -> Self {
        let enabled = std::env::var_os("NNSIGHT_QUIET").is_none();
        Progress {
            label: label.to_string(),
            total,
            done: 0,
            start: Instant::now(),
            last_draw: None,
            tty: std::io::stderr().is_terminal(),
            enabled,
        }
    }

    /// A display that prints nothing.
    pub fn hidden() -> Self {
        let mut p = Progress::new("", 0);
        p.enabled = false;
        p
    }

    /// Records `bytes` more done.
    pub fn advance(&mut self, bytes: u64) {
        self.done += bytes;
        if !(self.enabled && self.tty) {
            return;
        }
        let now = Instant::now();
        if self.last_draw.is_some_and(|t| now - t < Duration::from_millis(100)) {
            return;
        }
        self.last_draw = Some(now);
        let pct = if self.total == 0 { 100.0 } else { 100.0 * self.done as f64 / self.total as f64 };
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r{} {:5.1}% ({:.0}/{:.0} MB)", self.label, pct, mb(self.done), mb(self.total));
        let _ = err.flush();
    }

    /// Ends the display with a summary line.
    pub fn finish(&mut self) {
        if !self.enabled {
            return;
        }
        let secs = self.start.elapsed().as_secs_f64();
        let mut err = std::io::stderr().lock();
        let cr = if self.tty { "\r" } else { "" };
        let _ = writeln!(err, "{cr}{} done: {:.0} MB in {:.2} s          ", self.label, mb(self.done), secs);
        self.enabled = false;
    }
}

fn mb(b: u64) -> f64 {
    b as f64 / 1e6
}
