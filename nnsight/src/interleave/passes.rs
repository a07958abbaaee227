//! A trace in several forward passes: each pass runs a chunk of the invokes over their own rows
//! ([`Interleaver::begin_pass`], [`Interleaver::end_pass`]); and how an invoke that still waits at the end of its
//! pass is settled (set aside with a warning, or reported).

use super::{display, Interleaver};
use crate::{Error, Result};

impl Interleaver<'_> {
    /// Runs what invoke `inv` can still run without a hook event; if it then still waits for one, either sets the
    /// rest aside (after `stop()`, or a generation step that never came: a warning, as in Python nnsight) or
    /// reports why it was never reached.
    pub(super) fn settle(&mut self, inv: usize) -> Result<()> {
        self.advance(inv, None)?;
        let Some(&id) = self.per_invoke[inv].get(self.cursor[inv]) else { return Ok(()) };
        let op = &self.graph.nodes[id as usize].op;
        let rest = &self.per_invoke[inv][self.cursor[inv]..];
        if self.stopped[inv] {
            // Code after `stop()` never runs, as in Python nnsight: say so, keep what was saved.
            eprintln!(
                "nnsight: warning: node {id}, {} (invoke {inv}), comes after `stop()` and was never reached",
                op.describe()
            );
            self.unreached.extend(rest.iter().copied());
            self.cursor[inv] = self.per_invoke[inv].len();
            return Ok(());
        }
        let ran = op.hook_point().and_then(|(m, p, _)| self.fired.get(&(m.to_string(), p)).copied());
        if let (Some((m, _, call)), Some(n)) = (op.hook_point(), ran) {
            if call >= n {
                // A later step that never came (the generation ended first): as in Python nnsight, warn, keep what
                // was saved, skip the code after it.
                eprintln!(
                    "nnsight: warning: step {call} was never reached (`{}` ran {n} time(s)); invoke {inv} skips node {id}, {}, and the code after it",
                    display(m),
                    op.describe()
                );
                self.unreached.extend(rest.iter().copied());
                self.cursor[inv] = self.per_invoke[inv].len();
                return Ok(());
            }
        }
        let reason = match op.hook_point() {
            Some((m, _, _)) if ran.is_some() => format!(
                "`{}` had already run when invoke {inv} reached it: it comes earlier in the forward pass than what the invoke used before",
                display(m)
            ),
            Some((m, _, _)) => format!("`{}` did not run", display(m)),
            None => "a value it needs was never computed".into(),
        };
        Err(Error::NeverReached { node: format!("node {id}, {} (invoke {inv})", op.describe()), reason })
    }

    /// Starts a forward pass over the rows of the invokes in `invokes` only (a chunk of a trace that runs in
    /// several passes): `rows[k]` are invoke `invokes.start + k`'s rows in a batch of `batch` rows. Call numbers
    /// start again at 0 (every pass is the trace's one forward pass, for other rows); values of earlier passes
    /// stay for the invokes that use them.
    pub fn begin_pass(&mut self, invokes: std::ops::Range<usize>, rows: &[(i64, i64)], batch: i64) {
        for (inv, r) in invokes.clone().zip(rows) {
            self.rows[inv] = *r;
        }
        self.batch = batch;
        self.active = invokes;
        self.fired.clear();
    }

    /// Ends a pass begun with [`Self::begin_pass`]: its invokes run what is left without the model (code after
    /// their last read), and one still waiting for a hook event is reported as [`Self::finish_all`] would.
    pub fn end_pass(&mut self) -> Result<()> {
        for inv in self.active.clone() {
            self.settle(inv)?;
        }
        Ok(())
    }

    /// The rows of the pass now.
    pub fn batch_rows(&self) -> i64 {
        self.batch
    }

    /// The invokes of the pass now.
    pub fn active(&self) -> std::ops::Range<usize> {
        self.active.clone()
    }
}
