//! Edits at run time: the list of persistent edits a model keeps ([`EditList`]), and the chain that runs them in
//! front of a run's own hook ([`EditHook`]). An edit is a graph with one invoke that sees every row of whatever
//! batch comes; its interleaver sees each module event first, and once all its nodes have run it starts over, so a
//! generation applies it at every step. The blocks that make edits (`model.edit()`, [`crate::envoy::Edited`]) are
//! the front end's.

use crate::graph::Graph;
use crate::interleave::Interleaver;
use crate::nn::{Hook, Module};
use crate::{Error, Result};
use std::sync::{Arc, RwLock};
use tch::Tensor;

/// The edits a model applies before every run, oldest first.
#[derive(Debug, Default)]
pub struct EditList(RwLock<Vec<Arc<Graph>>>);

impl EditList {
    /// No edits.
    pub fn new() -> Self {
        Self::default()
    }

    /// The edits now (a run keeps this copy, so an edit added meanwhile applies from the next run on).
    pub fn snapshot(&self) -> Vec<Arc<Graph>> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Adds an edit after the others.
    pub fn push(&self, edit: Arc<Graph>) {
        self.0.write().unwrap_or_else(|p| p.into_inner()).push(edit);
    }

    /// Removes every edit.
    pub fn clear(&self) {
        self.0.write().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// How many edits there are.
    pub fn len(&self) -> usize {
        self.0.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A hook that changes nothing (the end of a chain of edits when there is no other hook).
pub struct PassThrough;

impl Hook for PassThrough {
    fn input(&mut self, _module: &str, x: Tensor) -> Result<Tensor> {
        Ok(x)
    }
    fn output(&mut self, _module: &str, y: Tensor) -> Result<Tensor> {
        Ok(y)
    }
}

/// One edit's graph running during a run: its interleaver starts over each time all its nodes have run.
struct Runner<'a> {
    index: usize,
    graph: &'a Graph,
    root: &'a dyn Module,
    meta: bool,
    inter: Interleaver<'a>,
}

impl<'a> Runner<'a> {
    fn new(index: usize, graph: &'a Graph, root: &'a dyn Module, meta: bool) -> Result<Self> {
        let inter = Self::fresh(index, graph, root, meta)?;
        Ok(Runner { index, graph, root, meta, inter })
    }

    fn fresh(index: usize, graph: &'a Graph, root: &'a dyn Module, meta: bool) -> Result<Interleaver<'a>> {
        let wrap = |e| Error::Edit { index, source: Box::new(e) };
        let mut inter = Interleaver::whole(graph, root).map_err(wrap)?;
        if meta {
            inter = inter.scan();
        }
        inter.start().map_err(wrap)?;
        Ok(inter)
    }

    /// Runs `f` on the interleaver, then starts over if the edit is complete.
    fn event<R>(&mut self, f: impl FnOnce(&mut Interleaver<'a>) -> Result<R>) -> Result<R> {
        let out = f(&mut self.inter).map_err(|e| Error::Edit { index: self.index, source: Box::new(e) })?;
        if self.inter.is_done() {
            self.inter = Self::fresh(self.index, self.graph, self.root, self.meta)?;
        }
        Ok(out)
    }
}

/// Edits in front of a run's own hook: each event goes through every edit, oldest first, then to `next`.
pub struct EditHook<'a, 'h> {
    runners: Vec<Runner<'a>>,
    next: &'h mut dyn Hook,
}

impl<'a, 'h> EditHook<'a, 'h> {
    /// The chain of `edits` (whose ad-hoc module calls find modules under `root`; `meta` for a scan) before
    /// `next`.
    pub fn new(edits: &'a [Arc<Graph>], root: &'a dyn Module, meta: bool, next: &'h mut dyn Hook) -> Result<Self> {
        let runners = edits.iter().enumerate().map(|(i, g)| Runner::new(i, g, root, meta)).collect::<Result<_>>()?;
        Ok(EditHook { runners, next })
    }
}

impl Hook for EditHook<'_, '_> {
    fn input(&mut self, module: &str, mut x: Tensor) -> Result<Tensor> {
        for r in &mut self.runners {
            x = r.event(|i| i.input(module, x))?;
        }
        self.next.input(module, x)
    }

    fn output(&mut self, module: &str, mut y: Tensor) -> Result<Tensor> {
        for r in &mut self.runners {
            y = r.event(|i| i.output(module, y))?;
        }
        self.next.output(module, y)
    }

    /// The last hook that gives a value wins (the run's own skip over an edit's).
    fn skip(&mut self, module: &str, x: &Tensor) -> Result<Option<Tensor>> {
        let mut out = None;
        for r in &mut self.runners {
            if let Some(v) = r.event(|i| i.skip(module, x))? {
                out = Some(v);
            }
        }
        Ok(self.next.skip(module, x)?.or(out))
    }

    fn wants_points(&mut self, module: &str, names: &[&str]) -> bool {
        let mut any = false;
        for r in &mut self.runners {
            any |= r.inter.wants_points(module, names);
        }
        self.next.wants_points(module, names) || any
    }

    fn point(&mut self, path: &str, mut t: Tensor) -> Result<Tensor> {
        for r in &mut self.runners {
            t = r.event(|i| i.point(path, t))?;
        }
        self.next.point(path, t)
    }
}

/// Runs `f` with `hook` behind `edits` (`hook` alone when there are none; [`PassThrough`] when there is no hook).
pub fn with_edits<R>(
    edits: &EditList,
    root: &dyn Module,
    meta: bool,
    hook: Option<&mut dyn Hook>,
    f: impl FnOnce(Option<&mut dyn Hook>) -> Result<R>,
) -> Result<R> {
    let graphs = edits.snapshot();
    if graphs.is_empty() {
        return f(hook);
    }
    let mut pass = PassThrough;
    let next: &mut dyn Hook = match hook {
        Some(h) => h,
        None => &mut pass,
    };
    let mut chain = EditHook::new(&graphs, root, meta, next)?;
    f(Some(&mut chain))
}

/// Runs `f` with `next` behind `edits` (whose ad-hoc module calls find modules under `root`; `meta` for a scan):
/// `next` alone when there are none.
pub fn chained<R>(
    edits: &[Arc<Graph>],
    root: &dyn Module,
    meta: bool,
    next: &mut dyn Hook,
    f: impl FnOnce(&mut dyn Hook) -> Result<R>,
) -> Result<R> {
    if edits.is_empty() {
        return f(next);
    }
    let mut chain = EditHook::new(edits, root, meta, next)?;
    f(&mut chain)
}
