//! Running a load off the calling thread so that Ctrl-C stops it: the caller waits with the GIL
//! released, wakes every 50 ms to run Python's signal handlers, and on an exception
//! (KeyboardInterrupt) cancels the load, waits for it to stop, and hands the exception back.

use std::sync::atomic::Ordering;
use std::thread;
use std::time::Duration;

use pyo3::prelude::*;
use weightstream::CancelToken;

/// How often the waiting thread checks for signals.
const POLL: Duration = Duration::from_millis(50);

/// Run `work` on a scoped thread while this thread waits without the GIL. Returns its result
/// and, when a signal handler raised meanwhile (Ctrl-C), that exception: `token` was cancelled
/// and the work has returned (usually `Cancelled`).
pub fn run<T: Send>(
    py: Python<'_>,
    token: &CancelToken,
    work: impl FnOnce() -> T + Send,
) -> PyResult<(T, Option<PyErr>)> {
    // The worker raises `done` before it wakes the waiter, which loops on it (a thread only
    // counts as finished later, so waiting on that alone could sleep a whole poll in vain).
    let done_flag = std::sync::atomic::AtomicBool::new(false);
    let done = &done_flag;
    thread::scope(|s| {
        let caller = thread::current();
        let handle = thread::Builder::new()
            .name("weightstream-load".into())
            .spawn_scoped(s, move || {
                let out = work();
                done.store(true, Ordering::Release);
                caller.unpark();
                out
            })
            .map_err(|e| pyo3::exceptions::PyOSError::new_err(format!("cannot start a load thread: {e}")))?;
        let mut interrupted = None;
        // A panicking worker never raises `done`: it finishes, though.
        while !done.load(Ordering::Acquire) && !handle.is_finished() {
            py.detach(|| thread::park_timeout(POLL));
            if interrupted.is_none() {
                if let Err(e) = py.check_signals() {
                    token.cancel();
                    interrupted = Some(e);
                }
            }
        }
        match handle.join() {
            Ok(out) => Ok((out, interrupted)),
            Err(_) => Err(crate::errors::raise(py, "InternalError", "the load thread panicked".into())),
        }
    })
}
