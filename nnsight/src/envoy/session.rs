//! A remote session of blocks alone, sent as one request ([`Session`]): `intervene!(model.session().remote(&server)
//! { trace(..) { .. } trace(..) { .. } })` with no Rust code between its blocks builds every block's graph first,
//! then sends them as one [`Job::Session`]; a value of an earlier block that a later one names travels as a
//! reference ([`Import`]) and is resolved on the server. The bindings after the session are what they would be
//! after the blocks run one by one.
//!
//! Inside a later block, an earlier block's value is a saved proxy ([`Carry`]), not yet a tensor: graph operations
//! apply to it (`&h * 2.0`, `model.x.output = h`), Rust code that reads its numbers does not (put Rust code between
//! the blocks for that: the session then runs block by block, one request each).

use super::generate::Generate;
use super::results::{FromValue, NotSaved, SavedValues, TraceResults};
use super::trace::Trace;
use crate::exec::{GenerateTarget, Import, Job, SessionBlock, TraceTarget};
use crate::graph::{Constant, Graph, NodeId, Op};
use crate::handle::builder::GraphCell;
use crate::handle::proxy::{Proxy, Saved};
use crate::models::batch::Input;
use crate::remote::Remote;
use crate::{Error, GenerateOptions, Result};
use std::cell::{Cell, RefCell};

/// The blocks of a session sent as one request, added as they are built, then run together ([`Session::run`]).
pub struct Session {
    server: Remote,
    /// Each block's graph (its address, to know which block a proxy belongs to) and job.
    blocks: RefCell<Vec<(*const GraphCell, SessionBlock)>>,
    /// Imports of blocks being built, by their graph.
    pending: RefCell<Vec<(*const GraphCell, Import)>>,
}

impl Session {
    /// A session whose blocks run on `server`.
    pub fn new(server: &Remote) -> Self {
        Session { server: server.clone(), blocks: RefCell::new(Vec::new()), pending: RefCell::new(Vec::new()) }
    }

    /// Adds a block whose graph is built (its inputs taken, its first build error reported here).
    pub fn add<B: SessionPart + ?Sized>(&self, block: &B) -> Result<()> {
        let (cell, job) = block.session_job()?;
        let cell: *const GraphCell = cell;
        let mut pending = self.pending.borrow_mut();
        let imports = pending.iter().filter(|(c, _)| *c == cell).map(|(_, i)| *i).collect();
        pending.retain(|(c, _)| *c != cell);
        self.blocks.borrow_mut().push((cell, SessionBlock { job, imports }));
        Ok(())
    }

    /// A constant of `g` (a block being built) standing for the value saved of `node` of `from` (an earlier
    /// block's graph), saved in `g` too.
    fn import<'g, T>(&self, g: &'g GraphCell, from: &GraphCell, node: NodeId) -> Saved<'g, T> {
        // A placeholder (0, not NaN: JSON has no NaN); the server puts the value in its place.
        let id = g.push(Op::Const { value: Constant::Scalar(0.0) });
        match self.blocks.borrow().iter().position(|(c, _)| std::ptr::eq(*c, from)) {
            Some(block) => {
                let import = Import { node: id, block: block as u32, from: node };
                self.pending.borrow_mut().push((g, import));
            }
            None => g.record_error(Error::Intervention {
                message: format!("node {node} belongs to a block that is not an earlier block of this session"),
            }),
        }
        Proxy::new(id, g).save()
    }

    /// Runs every block on the server as one job; their saved values, block by block.
    pub fn run(&self) -> Result<SessionResults> {
        let blocks = std::mem::take(&mut *self.blocks.borrow_mut());
        let (cells, blocks): (Vec<*const GraphCell>, Vec<SessionBlock>) = blocks.into_iter().unzip();
        let parts = self.server.run_session(blocks)?;
        Ok(SessionResults { blocks: cells.into_iter().zip(parts.into_iter().map(TraceResults::from)).collect() })
    }
}

/// The saved values of a session's blocks, each found by the graph its proxy belongs to.
#[derive(Debug)]
pub struct SessionResults {
    blocks: Vec<(*const GraphCell, TraceResults)>,
}

impl SessionResults {
    fn block(&self, g: &GraphCell) -> Option<&TraceResults> {
        self.blocks.iter().find(|(c, _)| std::ptr::eq(*c, g)).map(|(_, r)| r)
    }
}

impl SavedValues for SessionResults {
    fn take_saved<T: FromValue>(&mut self, g: &GraphCell, node: NodeId) -> Result<T> {
        match self.blocks.iter_mut().find(|(c, _)| std::ptr::eq(*c, g)) {
            Some((_, r)) => r.take(node),
            None => {
                Err(Error::Intervention { message: format!("saved node {node} belongs to no block of this session") })
            }
        }
    }
    fn skipped(&self, g: &GraphCell, node: NodeId) -> bool {
        self.block(g).is_some_and(|r| r.unreached(node))
    }
}

/// A block that can join a [`Session`]: a trace or a generation of a `LanguageModel`.
pub trait SessionPart {
    /// Its graph and the job that runs it.
    fn session_job(&self) -> Result<(&GraphCell, Job)>;
}

/// A block's graph, its invokes' inputs and its target's persistent edits.
type Parts<I> = (Graph, Vec<Option<I>>, Vec<Graph>);

/// The job's graph, inputs and the target's persistent edits, as a server gets them.
fn parts<T: TraceTarget>(tr: &Trace<'_, T>, form: &str) -> Result<Parts<T::Input>> {
    let inputs = tr.take_inputs(form)?;
    let graph = tr.graph().inner.borrow().graph.clone();
    crate::graph::note_run(&graph);
    let edits = tr.target().edits().iter().map(|g| Graph::clone(g)).collect();
    Ok((graph, inputs, edits))
}

impl<T: TraceTarget<Input = Input>> SessionPart for Trace<'_, T> {
    fn session_job(&self) -> Result<(&GraphCell, Job)> {
        let (graph, inputs, edits) = parts(self, "trace")?;
        Ok((self.graph(), Job::Trace { graph, inputs, edits }))
    }
}

impl<T: GenerateTarget<Input = Input, Options = GenerateOptions>> SessionPart for Generate<'_, T> {
    fn session_job(&self) -> Result<(&GraphCell, Job)> {
        let options = self.options().clone();
        if options.on_token.is_some() {
            return Err(Error::InvalidInput {
                message: "`on_token` cannot run on a server: a remote generation streams what the block sends instead"
                    .into(),
            });
        }
        let (graph, inputs, edits) = parts(self, "generate")?;
        Ok((self.graph(), Job::Generate { graph, inputs, options, edits }))
    }
}

// ---- an earlier block's binding inside a later block -------------------------------------------------------------

/// Wraps a binding of an earlier block named in a later block of a session sent as one request, for [`CarrySaved`]
/// / [`CarrySaveds`] / [`CarryUnsaved`] / [`CarryPlain`], which `intervene!` calls by autoref-based dispatch.
pub struct Carry<T>(Cell<Option<T>>);

impl<T> Carry<T> {
    /// Wraps a binding.
    pub fn new(v: T) -> Self {
        Carry(Cell::new(Some(v)))
    }
    fn take(&self) -> T {
        self.0.take().expect("carried once")
    }
}

/// A saved proxy of an earlier block becomes a saved proxy of this one: a reference to it, resolved on the server.
pub trait CarrySaved<'g> {
    /// The saved proxy in this block.
    type Out;
    /// Imports it into `g`.
    fn __nn_carry(self, s: &Session, g: &'g GraphCell) -> Self::Out;
}
impl<'a, 'g, T> CarrySaved<'g> for &&&Carry<Saved<'a, T>> {
    type Out = Saved<'g, T>;
    fn __nn_carry(self, s: &Session, g: &'g GraphCell) -> Saved<'g, T> {
        let from = self.take().0;
        s.import(g, from.g, from.id)
    }
}

/// Saved proxies of an earlier block, one by one.
pub trait CarrySaveds<'g> {
    /// The saved proxies in this block.
    type Out;
    /// Imports them into `g`.
    fn __nn_carry(self, s: &Session, g: &'g GraphCell) -> Self::Out;
}
impl<'a, 'g, T> CarrySaveds<'g> for &&&Carry<Vec<Saved<'a, T>>> {
    type Out = Vec<Saved<'g, T>>;
    fn __nn_carry(self, s: &Session, g: &'g GraphCell) -> Vec<Saved<'g, T>> {
        self.take().into_iter().map(|p| s.import(g, p.0.g, p.0.id)).collect()
    }
}

/// A proxy an earlier block did not save (inside an `invoke`) has no value, as after a block run alone.
pub trait CarryUnsaved<'g> {
    /// [`NotSaved`].
    type Out;
    /// Marks it unusable.
    fn __nn_carry(self, s: &Session, g: &'g GraphCell) -> Self::Out;
}
impl<'a, 'g, T> CarryUnsaved<'g> for &&Carry<Proxy<'a, T>> {
    type Out = NotSaved<T>;
    fn __nn_carry(self, _: &Session, _: &'g GraphCell) -> NotSaved<T> {
        let _ = self.take();
        NotSaved(std::marker::PhantomData)
    }
}

/// Any other binding is unchanged.
pub trait CarryPlain<'g> {
    /// The same type.
    type Out;
    /// Hands it back.
    fn __nn_carry(self, s: &Session, g: &'g GraphCell) -> Self::Out;
}
impl<'g, T> CarryPlain<'g> for &Carry<T> {
    type Out = T;
    fn __nn_carry(self, _: &Session, _: &'g GraphCell) -> T {
        self.take()
    }
}
