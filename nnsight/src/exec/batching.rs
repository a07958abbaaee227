//! How a trace's invokes become forward passes ([`Batching`]):
//!
//! - **Chunks.** A trace with more rows than [`Batching::max_rows`] runs in several passes, each over a chunk of
//!   whole invokes in order. Values still cross invokes as in one batch: an invoke that uses a value of
//!   a *later* invoke stays in one chunk with it, and values of earlier chunks are kept for the invokes that use
//!   them.
//! - **Shared prefix.** When the rows of a pass repeat (invokes on the same input) and no node of the pass (nor any
//!   persistent edit) touches the model before some decoder layer, the layers before it run once, on the distinct
//!   rows only, and the pass skips them with their outputs, each row given its distinct row's.
//! - **Last position.** When the code reads nothing of the logits but the last position (`model.output.i((.., -1))`),
//!   the head runs on that position only.
//!
//! All three give the results of one batch within float noise: a row's numbers do not depend on the other rows, but a
//! matrix product of another number of rows may round differently (measured 0 on SmolLM2 with the CPU's oneDNN
//! path; tests hold it to 1e-4).

use super::target::TraceTarget;
use super::Watch;
use crate::graph::{Graph, Op};
use crate::nn::Hook;
use crate::{Error, Result};
use ahash::AHashSet as HashSet;
use std::ops::Range;
use tch::Tensor;

/// How a trace's invokes are batched (see the [module docs](self)): set per model with
/// [`crate::LanguageModel::set_batching`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batching {
    /// The most rows of one forward pass (64 by default); `None`: every invoke in one pass.
    pub max_rows: Option<usize>,
    /// Whether leading layers that no node touches run once for repeated rows (true by default).
    pub share_prefix: bool,
}

impl Default for Batching {
    fn default() -> Self {
        Batching { max_rows: Some(64), share_prefix: true }
    }
}

impl Batching {
    /// At most `rows` rows per forward pass (at least 1); a trace with more runs in chunks of whole invokes.
    pub fn max_rows(mut self, rows: usize) -> Self {
        self.max_rows = Some(rows.max(1));
        self
    }

    /// Every invoke in one forward pass, however many rows.
    pub fn one_pass(mut self) -> Self {
        self.max_rows = None;
        self
    }

    /// Whether repeated rows share the layers before the first one a node touches.
    pub fn share_prefix(mut self, share: bool) -> Self {
        self.share_prefix = share;
        self
    }
}

/// One forward pass of the last trace run on this thread (see [`last_passes`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PassInfo {
    /// The invokes whose rows it ran.
    pub invokes: Range<usize>,
    /// Its rows.
    pub rows: i64,
    /// How many leading decoder layers it skipped, their output computed once per distinct row.
    pub shared_layers: usize,
    /// How many distinct rows computed those layers (0 when none were shared).
    pub distinct_rows: usize,
    /// Whether the head ran on the last position only (the code read nothing else of the logits).
    pub last_position_only: bool,
}

thread_local! {
    static LAST: std::cell::RefCell<Vec<PassInfo>> = const { std::cell::RefCell::new(Vec::new()) };
    static SCOPED: std::cell::Cell<Option<Batching>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` with `batching` for every trace this thread runs here meanwhile, whatever the models' own settings
/// (a sweep that wants its own chunk size without changing a model others use; a server's model keeps its own).
pub fn with_batching<R>(batching: Batching, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<Batching>);
    impl Drop for Restore {
        fn drop(&mut self) {
            SCOPED.with(|s| s.set(self.0));
        }
    }
    let _restore = Restore(SCOPED.with(|s| s.replace(Some(batching))));
    f()
}

/// The batching of a trace on `target`: the thread's scoped one ([`with_batching`]), else the target's.
pub(crate) fn settings<T: TraceTarget>(target: &T) -> Batching {
    SCOPED.with(|s| s.get()).unwrap_or_else(|| target.batching())
}

/// The forward passes of the last trace run on this thread (here, or by a server's worker thread): how its invokes
/// were split and what they shared. For understanding a sweep's speed, and for tests.
pub fn last_passes() -> Vec<PassInfo> {
    LAST.with(|l| l.borrow().clone())
}

/// Starts the record of a trace's passes.
pub(crate) fn record_start() {
    LAST.with(|l| l.borrow_mut().clear());
}

/// Adds a pass to the record.
pub(crate) fn record(pass: PassInfo) {
    LAST.with(|l| l.borrow_mut().push(pass));
}

/// Whether a graph may run in chunks and share prefixes: not when it caches module values (a cache records the
/// whole pass), takes gradients (one backward over one pass) or waits for a generation's ids.
pub(crate) fn splittable(graph: &Graph) -> bool {
    !graph.nodes.iter().any(|n| {
        matches!(
            n.op,
            Op::Cache { .. }
                | Op::Backward { .. }
                | Op::Grad { .. }
                | Op::ParamGrad { .. }
                | Op::GradWrite { .. }
                | Op::Generated
        )
    })
}

/// The passes of a trace: ranges of invokes, each at most `max_rows` rows (`rows[i]`: invoke `i`'s row count)
/// unless one group of invokes that must stay together has more. An invoke that uses a value of a later invoke is
/// kept in one pass with it (and every invoke between them).
pub(crate) fn chunks(graph: &Graph, rows: &[i64], max_rows: usize) -> Vec<Range<usize>> {
    let n = rows.len();
    // reach[i]: the last invoke whose value invoke i (or one it must stay with) uses.
    let mut reach: Vec<usize> = (0..n).collect();
    for node in &graph.nodes {
        let user = node.invoke as usize;
        for j in node.op.inputs() {
            let producer = graph.nodes[j as usize].invoke as usize;
            if producer > user && user < n {
                reach[user] = reach[user].max(producer.min(n - 1));
            }
        }
    }
    // Groups: the smallest runs of invokes closed under `reach`.
    let mut groups: Vec<Range<usize>> = Vec::new();
    let mut start = 0;
    while start < n {
        let mut end = reach[start];
        let mut k = start;
        while k <= end {
            end = end.max(reach[k]);
            k += 1;
        }
        groups.push(start..end + 1);
        start = end + 1;
    }
    // Packed in order, at most `max_rows` rows a pass.
    let mut passes: Vec<Range<usize>> = Vec::new();
    let mut filled = 0i64;
    for g in groups {
        let size: i64 = rows[g.clone()].iter().sum();
        match passes.last_mut() {
            Some(last) if filled + size <= max_rows as i64 => {
                last.end = g.end;
                filled += size;
            }
            _ => {
                passes.push(g);
                filled = size;
            }
        }
    }
    passes
}

/// Whether the graph and the edits use nothing of the head (the modules in `heads`, see
/// [`TraceTarget::head_paths`]) but the last position of its output: every hook node on a head is a read of an
/// output, and every use of it an index that picks position -1 of dimension 1 (`model.output.i((.., -1))`). The
/// head may then run on the last position alone, which gives those values exactly as the whole output would
/// (within the rounding of a smaller matrix product).
pub(crate) fn reads_last_position_only(graph: &Graph, edits: &[std::sync::Arc<Graph>], heads: &[String]) -> bool {
    use crate::graph::{IndexItem, Point, TensorOp};
    let on_head = |n: &crate::graph::Node| n.op.hook_point().is_some_and(|(m, _, _)| heads.iter().any(|h| h == m));
    if edits.iter().any(|g| g.nodes.iter().any(on_head)) {
        return false;
    }
    let last =
        |item: &IndexItem| matches!(item, IndexItem::Select(-1) | IndexItem::Slice { start: Some(-1), end: None });
    let rows = |item: &IndexItem| !matches!(item, IndexItem::NewAxis);
    let mut reads: HashSet<crate::graph::NodeId> = HashSet::default();
    for (i, n) in graph.nodes.iter().enumerate() {
        if on_head(n) {
            match n.op {
                Op::Read { point: Point::Output, .. } => {
                    reads.insert(i as crate::graph::NodeId);
                }
                _ => return false,
            }
        }
    }
    graph.nodes.iter().all(|n| match &n.op {
        Op::Tensor(TensorOp::Index { a, index }) if reads.contains(a) => {
            index.len() >= 2 && rows(&index[0]) && last(&index[1])
        }
        op => !op.inputs().iter().any(|j| reads.contains(j)),
    })
}

/// How many leading decoder layers a pass can skip: those that end before the first hook event any of `graphs`'
/// nodes of the invokes in `invokes` (every node of the other graphs: persistent edits) waits for. `layers` are the
/// decoder layers' paths in order; `order` the positions of the forward pass's events.
pub(crate) fn untouched_layers(
    order: &crate::handle::builder::CallOrder,
    layers: &[String],
    graph: &Graph,
    invokes: Range<usize>,
    edits: &[std::sync::Arc<Graph>],
) -> usize {
    let own = graph.nodes.iter().filter(|n| invokes.contains(&(n.invoke as usize)));
    let all = own.chain(edits.iter().flat_map(|g| g.nodes.iter()));
    let first = all
        .filter_map(|n| n.op.hook_point())
        .map(|(module, point, call)| order.position(module, point, call).unwrap_or(0))
        .min();
    let Some(first) = first else { return layers.len() };
    layers.iter().take_while(|l| order.position(l, crate::graph::Point::Output, 0).is_some_and(|p| p < first)).count()
}

/// The output of the last of `skip` leading layers for every row of `batch`, computed once per distinct row
/// (`None` when the rows are all different: nothing to share).
pub(crate) fn shared_prefix<T: TraceTarget>(
    target: &T,
    batch: &T::Prepared,
    last_skipped: &str,
    watch: Option<Watch<'_>>,
) -> Result<Option<(Tensor, usize)>> {
    let Some((distinct, index)) = target.distinct_rows(batch)? else { return Ok(None) };
    let n_distinct = index.iter().copied().max().map_or(0, |m| m as usize + 1);
    let mut capture = Capture { module: last_skipped, value: None, watch };
    match target.forward_hooked(&distinct, &mut capture) {
        Ok(()) | Err(Error::Stopped) => {}
        Err(e) => return Err(e),
    }
    let value = capture.value.ok_or_else(|| Error::Intervention {
        message: format!("shared prefix: `{last_skipped}` did not run in the forward pass"),
    })?;
    let index = Tensor::from_slice(&index).to_device(value.device());
    let value = value.f_index_select(0, &index).map_err(|e| Error::torch(last_skipped.to_string(), e))?;
    Ok(Some((value, n_distinct)))
}

/// A hook that keeps `module`'s output and ends the pass there.
struct Capture<'a> {
    module: &'a str,
    value: Option<Tensor>,
    watch: Option<Watch<'a>>,
}

impl Hook for Capture<'_> {
    fn input(&mut self, _module: &str, x: Tensor) -> Result<Tensor> {
        if let Some(w) = self.watch {
            w()?;
        }
        Ok(x)
    }
    fn output(&mut self, module: &str, y: Tensor) -> Result<Tensor> {
        if module == self.module {
            self.value = Some(y);
            return Err(Error::Stopped);
        }
        Ok(y)
    }
}

/// A hook in front of a pass's own: the skipped layers do not run and give `value` (the last one's output, which
/// is what the next layer sees); every other event goes on to `inner`, which waits for none of theirs.
pub(crate) struct SkipPrefix<'a, 'h> {
    pub(crate) inner: &'h mut (dyn Hook + 'a),
    pub(crate) skipped: HashSet<&'h str>,
    pub(crate) value: &'h Tensor,
}

impl Hook for SkipPrefix<'_, '_> {
    fn input(&mut self, module: &str, x: Tensor) -> Result<Tensor> {
        if self.skipped.contains(module) {
            return Ok(x);
        }
        self.inner.input(module, x)
    }
    fn output(&mut self, module: &str, y: Tensor) -> Result<Tensor> {
        if self.skipped.contains(module) {
            return Ok(y);
        }
        self.inner.output(module, y)
    }
    fn skip(&mut self, module: &str, x: &Tensor) -> Result<Option<Tensor>> {
        if self.skipped.contains(module) {
            return Ok(Some(self.value.shallow_clone()));
        }
        self.inner.skip(module, x)
    }
    fn wants_points(&mut self, module: &str, names: &[&str]) -> bool {
        self.inner.wants_points(module, names)
    }
    fn point(&mut self, path: &str, t: Tensor) -> Result<Tensor> {
        self.inner.point(path, t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::{Constant, Node};

    fn node(op: Op, invoke: u32) -> Node {
        Node { op, invoke }
    }

    #[test]
    fn chunks_pack_whole_invokes_in_order() {
        let g = Graph::default();
        assert_eq!(chunks(&g, &[1, 1, 1, 1, 1], 2), vec![0..2, 2..4, 4..5]);
        assert_eq!(chunks(&g, &[3, 1, 1], 2), vec![0..1, 1..3]);
        assert_eq!(chunks(&g, &[1, 1], 8), vec![0..2]);
    }

    #[test]
    fn an_invoke_using_a_later_invokes_value_stays_with_it() {
        // Invoke 0 uses a value of invoke 2: invokes 0..=2 are one group.
        let mut g = Graph::default();
        g.nodes.push(node(Op::Const { value: Constant::Scalar(1.0) }, 2));
        g.nodes.push(node(Op::Save { value: 0 }, 0));
        assert_eq!(chunks(&g, &[1, 1, 1, 1], 2), vec![0..3, 3..4]);
        // The other way round (a later invoke uses an earlier one's value) splits freely.
        let mut g = Graph::default();
        g.nodes.push(node(Op::Const { value: Constant::Scalar(1.0) }, 0));
        g.nodes.push(node(Op::Save { value: 0 }, 2));
        assert_eq!(chunks(&g, &[1, 1, 1, 1], 2), vec![0..2, 2..4]);
    }
}
