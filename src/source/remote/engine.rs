//! The remote engine: each read is one ranged GET of an object, whose body is copied once, as
//! it streams in, into the read's buffer (a staging slot, or the tensor's place).
//!
//! A read's `fd` is the index of its object in the engine's table. GETs run on the remote
//! runtime, at most `concurrency` at once; the loader sizes reads to the request size. Retries (5xx, 429, timeouts, broken bodies) are `object_store`'s, pinned to the ETag
//! taken when the header was read.

use std::io;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::{select, Either};
use tokio::sync::{watch, Semaphore};

use super::store::handle as runtime_handle;
use super::RemoteObject;
use crate::cancel::CancelToken;
use crate::error::{RemoteFailure, RemoteFault};
use crate::io::{RawCompletion, RawEngine, RawRead};

/// A read engine over remote objects.
pub struct RemoteEngine {
    objects: Arc<Vec<Arc<RemoteObject>>>,
    permits: Arc<Semaphore>,
    cancel: watch::Sender<bool>,
    done_tx: Sender<RawCompletion>,
    done_rx: Receiver<RawCompletion>,
    in_flight: usize,
    /// The load's tokens (the caller's, a stream's): a wait notices either within
    /// [`CANCEL_POLL`] and drops the requests.
    tokens: Vec<CancelToken>,
    runtime: tokio::runtime::Handle,
}

/// How often a wait looks at the load's cancel token: a stalled server must not hold a
/// cancelled load for its timeout.
const CANCEL_POLL: Duration = Duration::from_millis(50);

/// A read's buffer, lent to the runtime's threads.
#[derive(Clone, Copy)]
struct Dest(*mut u8);

// SAFETY: under `RawEngine::submit`'s contract the buffer stays valid, and is written by this
// read alone, until its completion is returned.
unsafe impl Send for Dest {}
// SAFETY: as for Send: only the read's own future writes through it.
unsafe impl Sync for Dest {}

impl Dest {
    /// The address (a method, so that a future captures the whole `Dest`, not the pointer).
    fn ptr(self) -> *mut u8 {
        self.0
    }
}

/// Sends a read's completion exactly once: with its result, or, if the task is dropped before
/// it has one (it panicked), with an error, so that a wait never hangs on it.
struct Completer {
    tx: Sender<RawCompletion>,
    tag: u64,
    sent: bool,
}

impl Completer {
    fn send(mut self, result: io::Result<usize>) {
        self.sent = true;
        let _ = self.tx.send(RawCompletion { tag: self.tag, result });
    }
}

impl Drop for Completer {
    fn drop(&mut self) {
        if !self.sent {
            let result = Err(io::Error::other("a remote read ended without a result"));
            let _ = self.tx.send(RawCompletion { tag: self.tag, result });
        }
    }
}

impl RemoteEngine {
    /// An engine over `objects` (a read's `fd` indexes them), with at most `concurrency` GETs in
    /// flight, cancelled when any of `tokens` is; an error when the runtime for remote requests
    /// cannot start.
    pub fn new(
        objects: Vec<Arc<RemoteObject>>,
        concurrency: usize,
        tokens: Vec<CancelToken>,
    ) -> crate::error::Result<Self> {
        let (done_tx, done_rx) = channel();
        Ok(RemoteEngine {
            objects: Arc::new(objects),
            permits: Arc::new(Semaphore::new(concurrency.clamp(1, Semaphore::MAX_PERMITS))),
            cancel: watch::channel(false).0,
            done_tx,
            done_rx,
            in_flight: 0,
            tokens,
            runtime: runtime_handle()?,
        })
    }
}

impl RawEngine for RemoteEngine {
    fn name(&self) -> &'static str {
        "remote"
    }

    unsafe fn submit(&mut self, read: RawRead) -> io::Result<()> {
        let object = usize::try_from(read.fd)
            .ok()
            .and_then(|i| self.objects.get(i))
            .cloned()
            .ok_or_else(|| io::Error::other(format!("no remote object {}", read.fd)))?;
        let permits = Arc::clone(&self.permits);
        let completer = Completer { tx: self.done_tx.clone(), tag: read.tag, sent: false };
        let mut cancelled = self.cancel.subscribe();
        let dest = Dest(read.buf);
        let task = async move {
            // Declared first, so dropped last: after the fetch, whose writes end with it.
            let completer = completer;
            // Either the reads finish or the load is cancelled; in both cases the fetch future
            // is dropped at the end of this block (no part of it writes any more), before the
            // completion hands the buffer back.
            let result = {
                let fetch = std::pin::pin!(fetch(&object, read.offset, dest, read.len, &permits));
                let stop = std::pin::pin!(async move {
                    let _ = cancelled.wait_for(|c| *c).await;
                });
                match select(fetch, stop).await {
                    Either::Left((r, _)) => r.map(|()| read.len).map_err(RemoteFault::into_io),
                    Either::Right(_) => Err(io::Error::other("remote read cancelled")),
                }
            };
            completer.send(result);
        };
        // Counted before it can complete; the runtime was checked when the engine was made, so
        // spawning cannot fail here.
        self.in_flight += 1;
        self.runtime.spawn(task);
        Ok(())
    }

    fn wait(&mut self) -> io::Result<RawCompletion> {
        loop {
            match self.done_rx.recv_timeout(CANCEL_POLL) {
                Ok(c) => {
                    self.in_flight -= 1;
                    return Ok(c);
                }
                Err(RecvTimeoutError::Timeout) => {
                    if self.tokens.iter().any(CancelToken::is_cancelled) {
                        self.cancel();
                    }
                }
                // The engine holds a sender itself: never, but not a reason to panic.
                Err(RecvTimeoutError::Disconnected) => return Err(io::Error::other("the remote runtime stopped")),
            }
        }
    }

    fn cancel(&mut self) {
        self.cancel.send_replace(true);
    }
}

impl Drop for RemoteEngine {
    fn drop(&mut self) {
        // No GET may write into a buffer once the engine is gone: stop them and wait for each.
        self.cancel.send_replace(true);
        while self.in_flight > 0 && self.done_rx.recv().is_ok() {
            self.in_flight -= 1;
        }
    }
}

/// GET `len` bytes at `offset` of `object` into `dest`, holding a permit while it runs.
async fn fetch(
    object: &RemoteObject,
    offset: u64,
    dest: Dest,
    len: usize,
    permits: &Semaphore,
) -> Result<(), RemoteFault> {
    let _permit = permits
        .acquire()
        .await
        .map_err(|_| RemoteFault::new(RemoteFailure::Other, "the request limiter closed".into()))?;
    // SAFETY: under `RawEngine::submit`'s contract the caller's buffer of `len` bytes at `dest`
    // is valid, and written by this read alone, until its completion is returned; the slice
    // lives only inside this future, which is dropped or finished before the completion is sent.
    let dst = unsafe { std::slice::from_raw_parts_mut(dest.ptr(), len) };
    object.read_into(offset..offset + len as u64, dst).await
}
