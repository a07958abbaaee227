//! Continuous batching of generations: a server's model runs the generation jobs waiting for it as one batch that
//! changes between decode steps (our counterpart of Python nnsight's vLLM path).
//!
//! A job joins in two moves: its prefill runs alone (its graph interleaved exactly as in a run of its own: step 0),
//! then its rows' KV cache and attention mask are appended to the batch's (the shorter cache left-padded with
//! masked zeros, so every row keeps its positions and attends to exactly its own tokens). Each decode step then
//! runs one token of every running row in one forward; a [`Split`] hook hands each job's interleaver its own rows
//! of every module event, so each job's per-step interventions (`.iter`, `.all()`, `.next()`), saves, `log!` and
//! `send!` lines are its own, and so is its step count. A job leaves when its rows stop (stop ids, its
//! `max_new_tokens`, a `.stop()`), when its graph fails, or when its watch says so (time limit, cancellation): its
//! rows leave the cache and its outcome goes to its [`Joining::done`]; the others go on.
//!
//! Numerics: a job's prefill is bit-identical to its solo run; its decode steps run in a larger batch over a cache
//! padded with masked positions, which changes the order of floating-point sums in the matrix products (the same
//! drift as co-batched traces, ~1e-6 relative on SmolLM2; greedy tokens equal).

use super::LanguageModel;
use crate::exec::edits::chained;
use crate::exec::run::{generated_ids, started, watched, Program};
use crate::exec::target::TraceTarget;
use crate::exec::Job;
use crate::generate::Decoder;
use crate::graph::Graph;
use crate::interleave::{Finished, Interleaver};
use crate::models::{CachedInput, CausalLm};
use crate::nn::{Ctx, Hook, KvCache};
use crate::remote::{Arrivals, Joining};
use crate::{Error, Result};
use std::rc::Rc;
use std::sync::Arc;
use tch::Tensor;

/// How many jobs one continuous batch takes in over its life: their graphs are kept until it ends, so a batch
/// that never empties (steady load) stops taking jobs after these, drains, and the next one begins.
pub const MAX_JOBS_PER_BATCH: usize = 1024;

/// Leading cache positions no running row attends to any more are dropped once there are this many (and at least
/// a quarter of the cache): the copy is paid rarely, and the cache stays as long as its oldest running row needs.
const TRIM_AT: i64 = 32;

/// A job running in the batch.
struct Member<'a> {
    inter: Interleaver<'a>,
    decoder: Decoder,
    watch: Box<dyn Fn() -> Result<()>>,
    log: Rc<dyn Fn(String)>,
    sent: Rc<dyn Fn(String, Tensor)>,
    done: Box<dyn FnOnce(Result<Finished>)>,
    /// Set during a step when the job's graph stopped (`Ok`) or failed (`Err`): it leaves after the step.
    ended: Option<Result<()>>,
}

/// The batch: its jobs, and the cache and mask of their rows (in the jobs' order).
struct Batch<'a> {
    members: Vec<Member<'a>>,
    kv: KvCache,
    mask: Tensor,
    edits: Vec<Arc<Graph>>,
}

impl<M: CausalLm> LanguageModel<M> {
    /// Whether `job` can run in a continuous batch on this model (see [`crate::exec::merge::joins_continuous`]);
    /// a model whose cache is recomputed at some length (Phi-3's generation) cannot.
    pub(crate) fn joins_continuous(&self, job: &Job) -> bool {
        self.model().recompute_cache_at().is_none() && crate::exec::merge::joins_continuous(job)
    }

    /// Runs `first` and the jobs `arrivals` hands over as one continuous batch until none is left (see the module
    /// docs); every job's outcome goes to its `done`.
    pub(crate) fn run_continuous(&self, first: Vec<Joining>, arrivals: &mut dyn Arrivals) {
        let _no_grad = tch::no_grad_guard();
        let jobs = typed_arena::Arena::new();
        let mut batch: Option<Batch<'_>> = None;
        let mut taken = 0;
        let mut pending = first;
        loop {
            for joining in std::mem::take(&mut pending) {
                taken += 1;
                self.admit(&jobs, joining, &mut batch);
            }
            let Some(b) = batch.as_mut() else {
                if taken >= MAX_JOBS_PER_BATCH {
                    return;
                }
                pending = arrivals.poll(0);
                if pending.is_empty() {
                    return;
                }
                continue;
            };
            if let Err(e) = self.decode_step(b) {
                let message = format!("the decode step of a continuous batch failed: {e}");
                for m in &mut b.members {
                    m.ended.get_or_insert_with(|| Err(Error::Intervention { message: message.clone() }));
                }
            } else {
                arrivals.stepped(b.members.iter().map(|m| m.decoder.num_rows()).sum());
            }
            if self.leave(b) {
                batch = None;
            }
            if taken < MAX_JOBS_PER_BATCH {
                let rows = batch.as_ref().map_or(0, |b| b.members.iter().map(|m| m.decoder.num_rows()).sum());
                pending = arrivals.poll(rows);
            }
        }
    }

    /// Runs `joining`'s prefill alone and adds it to `batch` (or starts one), or ends it there when that is all
    /// it does.
    fn admit<'a>(&'a self, jobs: &'a typed_arena::Arena<Job>, joining: Joining, batch: &mut Option<Batch<'a>>) {
        let Joining { job, watch, log, sent, done } = joining;
        let job: &'a Job = jobs.alloc(job);
        let Job::Generate { graph, inputs, options, edits: extra } = job else {
            done(Err(Error::InvalidInput { message: "only a generation job joins a continuous batch".into() }));
            return;
        };
        let mut edits = TraceTarget::edits(self);
        edits.extend(extra.iter().cloned().map(Arc::new));
        if batch.as_ref().is_some_and(|b| b.edits != edits) {
            let message = "a job with other persistent edits cannot join this continuous batch".into();
            done(Err(Error::InvalidInput { message }));
            return;
        }
        let prefill = guarded(&log, &sent, || {
            watch()?;
            let (input, mut inter) = started(self, Program::from(graph), inputs)?;
            if inter.all_stopped() {
                return Ok((inter, None));
            }
            let mut decoder = Decoder::new(self.model(), self.special_tokens(), &input, options)?;
            let step = watched(&mut inter, Some(&*watch), |hook| {
                chained(&edits, self.root(), false, hook, |h| decoder.step(self.model(), Some(h)))
            });
            match step {
                Ok(_) => Ok((inter, Some(decoder))),
                Err(Error::Stopped) => Ok((inter, None)),
                Err(e) => Err(e),
            }
        });
        let (inter, decoder) = match prefill {
            Ok(p) => p,
            Err(e) => return done(Err(e)),
        };
        let Some(mut decoder) = decoder else {
            // Every invoke stopped: the run ends as a solo run would, without `model.generated()`.
            return done(guarded(&log, &sent, || inter.finish_all()));
        };
        let cache = match decoder.is_done() {
            true => None,
            false => decoder.take_cache(),
        };
        let mut member = Member { inter, decoder, watch, log, sent, done, ended: None };
        let Some((kv, mask)) = cache else { return self.finish(member) };
        match batch {
            None => *batch = Some(Batch { members: vec![member], kv, mask, edits }),
            Some(b) => match join(b, kv, mask, options.max_new_tokens as i64) {
                Ok(()) => b.members.push(member),
                Err(e) => {
                    member.ended = Some(Err(Error::torch("continuous batch: joining the cache", e)));
                    self.finish(member);
                }
            },
        }
    }

    /// One decode step of every running job's rows; a job whose watch fails leaves first.
    fn decode_step(&self, batch: &mut Batch<'_>) -> Result<()> {
        for m in &mut batch.members {
            if let Err(e) = (m.watch)() {
                m.ended = Some(Err(e));
            }
        }
        let (mut ids, mut positions, mut column) = (Vec::new(), Vec::new(), Vec::new());
        for m in &mut batch.members {
            let (i, p, c) = m.decoder.next_rows();
            ids.extend(i);
            positions.extend(p);
            column.extend(c);
        }
        let f = |e| Error::torch("continuous batch", e);
        let (rows, device) = (ids.len() as i64, batch.mask.device());
        let mk = |v: &[i64]| Tensor::from_slice(v).f_view([rows, 1]).and_then(|t| t.f_to_device(device)).map_err(f);
        let mask = Tensor::f_cat(&[&batch.mask, &mk(&column)?], 1).map_err(f)?;
        // Unpadded (one job whose rows never stopped), the forward takes the same path as the job's own run.
        let zero = mask.f_eq(0).and_then(|z| z.f_any()).and_then(|z| z.f_to_device(tch::Device::Cpu)).map_err(f)?;
        let padded = bool::try_from(zero).map_err(f)?;
        let input = CachedInput {
            input_ids: mk(&ids)?,
            attention_mask: mask.shallow_clone(),
            position_ids: mk(&positions)?,
            padded,
            last_logits_only: true,
        };
        let kv = std::mem::take(&mut batch.kv);
        let mut split = Split { members: &mut batch.members };
        let (logits, kv) = chained(&batch.edits, self.root(), false, &mut split, |h| {
            self.model().run_cached(&mut Ctx::with_hook(h), &input, kv)
        })?;
        batch.kv = kv;
        batch.mask = mask;
        let mut row = 0;
        for m in &mut batch.members {
            let n = m.decoder.num_rows() as i64;
            let part = logits.f_narrow(0, row, n).map_err(f)?;
            row += n;
            if m.ended.is_none() {
                let (decoder, log, sent) = (&mut m.decoder, &m.log, &m.sent);
                if let Err(e) = guarded(log, sent, || decoder.accept(&part)) {
                    m.ended = Some(Err(e));
                }
            }
        }
        Ok(())
    }

    /// Ends the jobs that are done (their rows leave the cache); trims cache positions no running row needs.
    /// Whether the batch is empty now.
    fn leave(&self, batch: &mut Batch<'_>) -> bool {
        let (mut keep, mut row, mut staying) = (Vec::new(), 0i64, Vec::new());
        let before = batch.members.len();
        for m in batch.members.drain(..) {
            let n = m.decoder.num_rows() as i64;
            if m.ended.is_none() && !m.decoder.is_done() {
                keep.extend(row..row + n);
                staying.push(m);
            } else {
                self.finish(m);
            }
            row += n;
        }
        batch.members = staying;
        if batch.members.is_empty() {
            return true;
        }
        if batch.members.len() < before {
            if let Err(e) = keep_rows(batch, &keep) {
                let message = format!("continuous batch: letting rows go: {e}");
                for m in batch.members.drain(..) {
                    self.finish(Member { ended: Some(Err(Error::Intervention { message: message.clone() })), ..m });
                }
                return true;
            }
        }
        false
    }

    /// Hands `member`'s outcome to its `done`: its values (with `model.generated()`), or its error.
    fn finish(&self, member: Member<'_>) {
        let Member { mut inter, decoder, log, sent, done, ended, .. } = member;
        let outcome = match ended {
            Some(Err(e)) => Err(e),
            Some(Ok(())) => guarded(&log, &sent, || inter.finish_all()),
            None => guarded(&log, &sent, || {
                let ids: Vec<Vec<i64>> = decoder.generation().rows.iter().map(|r| r.ids()).collect();
                inter.provide_generated(&generated_ids(&ids))?;
                inter.finish_all()
            }),
        };
        done(outcome);
    }
}

/// Appends a job's cache and mask (after its prefill) to the batch's, the shorter left-padded with masked zeros.
fn join(batch: &mut Batch<'_>, kv: KvCache, mask: Tensor, room: i64) -> std::result::Result<(), tch::TchError> {
    let (a, b) = (batch.mask.size()[1], mask.size()[1]);
    let pad = |m: &Tensor, to: i64| -> std::result::Result<Tensor, tch::TchError> {
        let (rows, cols) = (m.size()[0], m.size()[1]);
        match cols < to {
            true => Tensor::f_cat(&[&Tensor::f_zeros([rows, to - cols], (m.kind(), m.device()))?, m], 1),
            false => Ok(m.shallow_clone()),
        }
    };
    let joined = batch.kv.concat(&kv, room.max(TRIM_AT))?;
    let mask = Tensor::f_cat(&[&pad(&batch.mask, a.max(b))?, &pad(&mask, a.max(b))?], 0)?;
    batch.kv = joined;
    batch.mask = mask;
    Ok(())
}

/// Keeps the rows `keep` of the batch's cache and mask, then drops leading positions no row attends to.
fn keep_rows(batch: &mut Batch<'_>, keep: &[i64]) -> std::result::Result<(), tch::TchError> {
    let index = Tensor::from_slice(keep).f_to_device(batch.mask.device())?;
    batch.kv.keep_rows(&index)?;
    batch.mask = batch.mask.f_index_select(0, &index)?;
    // Leading columns masked in every row: the first column any row attends to.
    let used = batch.mask.f_ne(0)?.f_any_dims(Some([0i64].as_slice()), false)?;
    let first = i64::try_from(used.f_to_kind(tch::Kind::Int64)?.f_argmax(0, false)?.f_to_device(tch::Device::Cpu)?)?;
    let past = batch.kv.past_len();
    if first >= TRIM_AT && first * 4 >= past {
        batch.kv.drop_front(first, TRIM_AT)?;
        batch.mask = batch.mask.f_narrow(1, first, past - first)?.f_contiguous()?;
    }
    Ok(())
}

/// Runs `f` with the job's `log!` lines and `send!` values going to its receivers, a panic turned into an error.
fn guarded<T>(log: &Rc<dyn Fn(String)>, sent: &Rc<dyn Fn(String, Tensor)>, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let (log, sent) = (log.clone(), sent.clone());
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        crate::interleave::capture_logs_with(
            move |line| log(line),
            || crate::interleave::capture_sent(move |label, t| sent(label, t), f),
        )
    }));
    outcome.unwrap_or_else(|panic| {
        Err(Error::Intervention { message: format!("the job failed: {}", crate::error::panic_text(&*panic)) })
    })
}

/// The hook of a decode step: every module event's rows split by job, each job's interleaver given its own rows
/// (as in a run of its own), the results put back together (the event's tensor itself when no job changed it).
struct Split<'s, 'a> {
    members: &'s mut [Member<'a>],
}

impl Split<'_, '_> {
    fn each(
        &mut self,
        module: &str,
        x: Tensor,
        f: impl Fn(&mut Interleaver<'_>, Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        if !self.members.iter().any(|m| m.ended.is_none() && m.inter.listens(module)) {
            return Ok(x);
        }
        let total: i64 = self.members.iter().map(|m| m.decoder.num_rows() as i64).sum();
        if x.dim() == 0 || x.size()[0] != total {
            // Not a value of the batch's rows: no job's rows to hand out.
            return Ok(x);
        }
        let mut parts = Vec::with_capacity(self.members.len());
        let (mut changed, mut row) = (false, 0);
        for m in self.members.iter_mut() {
            let n = m.decoder.num_rows() as i64;
            let mine = x.narrow(0, row, n);
            row += n;
            if m.ended.is_some() || !m.inter.listens(module) {
                parts.push(mine);
                continue;
            }
            let before = (mine.data_ptr(), mine.size(), mine.stride());
            let inter = &mut m.inter;
            match guarded(&m.log, &m.sent, || f(inter, mine.shallow_clone())) {
                Ok(y) if y.dim() > 0 && y.size()[0] == n => {
                    changed |= (y.data_ptr(), y.size(), y.stride()) != before;
                    parts.push(y);
                }
                Ok(y) => {
                    let message =
                        format!("a job's intervention gave {:?} for its {n} rows of {:?}", y.size(), x.size());
                    m.ended = Some(Err(Error::InvalidInput { message }));
                    parts.push(mine);
                }
                Err(Error::Stopped) => {
                    m.ended = Some(Ok(()));
                    parts.push(mine);
                }
                Err(e) => {
                    m.ended = Some(Err(e));
                    parts.push(mine);
                }
            }
        }
        if !changed {
            return Ok(x);
        }
        Tensor::f_cat(&parts, 0).map_err(|e| Error::torch("continuous batch", e))
    }
}

impl Hook for Split<'_, '_> {
    fn input(&mut self, module: &str, x: Tensor) -> Result<Tensor> {
        self.each(module, x, |h, x| h.input(module, x))
    }
    fn output(&mut self, module: &str, y: Tensor) -> Result<Tensor> {
        self.each(module, y, |h, y| h.output(module, y))
    }
    fn wants_points(&mut self, module: &str, names: &[&str]) -> bool {
        self.members.iter_mut().any(|m| m.ended.is_none() && m.inter.wants_points(module, names))
    }
    fn point(&mut self, path: &str, t: Tensor) -> Result<Tensor> {
        self.each(path, t, |h, t| h.point(path, t))
    }
}
