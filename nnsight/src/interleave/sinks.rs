//! Where `log!` lines and `send!` values go: standard error, or the receiver a caller installed on this thread
//! ([`capture_logs`], [`capture_sent`]), put back when it returns, even on a panic.

use tch::Tensor;

/// A receiver of `log!` lines.
type LogSink = Box<dyn FnMut(String)>;
/// A receiver of `send!` values.
type SentSink = Box<dyn FnMut(String, Tensor)>;

thread_local! {
    /// Where `log!` lines go on this thread (`None`: standard error).
    static LOG_SINK: std::cell::RefCell<Option<LogSink>> = const { std::cell::RefCell::new(None) };
}

/// Where a `log!` line goes: the receiver of [`capture_logs`] / [`capture_logs_with`] if one is active on this
/// thread, else standard error.
pub(crate) fn emit_log(line: String) {
    let line = LOG_SINK.with(|c| match c.borrow_mut().as_mut() {
        Some(f) => {
            f(line);
            None
        }
        None => Some(line),
    });
    if let Some(line) = line {
        eprintln!("{line}");
    }
}

/// Runs `f` with `receive` getting every line that `log!` nodes print meanwhile on this thread, as it is printed,
/// instead of standard error (a server streams them to its client this way).
pub fn capture_logs_with<T>(receive: impl FnMut(String) + 'static, f: impl FnOnce() -> T) -> T {
    with_thread_value(&LOG_SINK, Some(Box::new(receive)), f)
}

/// Runs `f` with this thread's `key` set to `value`, then puts the outer value back (also when `f` panics).
pub(super) fn with_thread_value<V: 'static, T>(
    key: &'static std::thread::LocalKey<std::cell::RefCell<V>>,
    value: V,
    f: impl FnOnce() -> T,
) -> T {
    struct Restore<V: 'static>(&'static std::thread::LocalKey<std::cell::RefCell<V>>, Option<V>);
    impl<V: 'static> Drop for Restore<V> {
        fn drop(&mut self) {
            if let Some(outer) = self.1.take() {
                self.0.with(|c| *c.borrow_mut() = outer);
            }
        }
    }
    let _restore = Restore(key, Some(key.with(|c| std::mem::replace(&mut *c.borrow_mut(), value))));
    f()
}

/// Runs `f`, collecting the lines that `log!` nodes print meanwhile on this thread instead of writing them to
/// standard error.
pub fn capture_logs<T>(f: impl FnOnce() -> T) -> (T, Vec<String>) {
    let lines = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
    let sink = lines.clone();
    let out = capture_logs_with(move |l| sink.borrow_mut().push(l), f);
    let lines = std::mem::take(&mut *lines.borrow_mut());
    (out, lines)
}

thread_local! {
    /// Where values of `send!` go on this thread (`None`: printed like `log!`).
    static SENT: std::cell::RefCell<Option<SentSink>> = const { std::cell::RefCell::new(None) };
}

/// Hands a value a `send!` node computed to this thread's receiver ([`capture_sent`]), or prints it like `log!`.
pub(crate) fn emit_sent(label: String, t: Tensor) {
    let left = SENT.with(|c| match c.borrow_mut().as_mut() {
        Some(f) => {
            f(label, t);
            None
        }
        None => Some((label, t)),
    });
    if let Some((label, t)) = left {
        let line = if t.numel() == 1 { format!("{label}: {}", t.double_value(&[])) } else { format!("{label}: {t}") };
        emit_log(line);
    }
}

/// Runs `f` with `receive` getting every value a `send!` node computes meanwhile on this thread, as it is computed
/// (a server streams them to its client this way; a remote run's sent values arrive here too).
pub fn capture_sent<T>(receive: impl FnMut(String, Tensor) + 'static, f: impl FnOnce() -> T) -> T {
    with_thread_value(&SENT, Some(Box::new(receive)), f)
}

thread_local! {
    /// The invoke of the block's node whose `log!` or `send!` is being delivered on this thread now.
    static EMITTER: std::cell::Cell<Option<u32>> = const { std::cell::Cell::new(None) };
}

/// The invoke whose node emits the `log!` line or `send!` value being delivered now, read from inside a receiver
/// of [`capture_logs_with`] or [`capture_sent`] (a server running several jobs as one batch routes each line to
/// its job this way). `None` for a line of a persistent edit's graph (which sees the whole batch) or one that no
/// node of a run emitted (a remote run's lines, relayed by its client).
pub fn emitting_invoke() -> Option<u32> {
    EMITTER.with(|c| c.get())
}

/// Sets [`emitting_invoke`] until dropped (then puts the outer value back).
pub(super) struct Emitting(Option<u32>);

impl Emitting {
    pub(super) fn set(invoke: Option<u32>) -> Self {
        Emitting(EMITTER.with(|c| c.replace(invoke)))
    }
}

impl Drop for Emitting {
    fn drop(&mut self) {
        EMITTER.with(|c| c.set(self.0));
    }
}
