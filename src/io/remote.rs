//! The remote engine: each read is one or more ranged GETs of an object, whose bodies are copied
//! once, as they stream in, into the read's buffer (a staging slot).
//!
//! A read's `fd` is the index of its object in the engine's table. GETs run on the remote
//! runtime, at most `concurrency` at once over all reads, each for at most `request_size`
//! bytes. Retries (5xx, 429, timeouts, broken bodies) are `object_store`'s, pinned to the ETag
//! taken when the header was read.

use std::io;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;

use futures_util::future::{select, try_join_all, Either};
use tokio::sync::{watch, Semaphore};

use super::{RawCompletion, RawEngine, RawRead};
use crate::error::{RemoteFailure, RemoteFault};
use crate::source::remote::spawn_remote;
use crate::source::RemoteObject;

/// A read engine over remote objects.
pub struct RemoteEngine {
    objects: Arc<Vec<Arc<RemoteObject>>>,
    request_size: usize,
    permits: Arc<Semaphore>,
    cancel: watch::Sender<bool>,
    done_tx: Sender<RawCompletion>,
    done_rx: Receiver<RawCompletion>,
    in_flight: usize,
}

/// A buffer address that may cross to the runtime's threads: the submit contract keeps it
/// valid and ours alone until the read's completion is returned.
#[derive(Clone, Copy)]
struct Dest(usize);

impl RemoteEngine {
    /// An engine over `objects` (a read's `fd` indexes them), with at most `concurrency` GETs of
    /// at most `request_size` bytes in flight.
    pub fn new(objects: Vec<Arc<RemoteObject>>, concurrency: usize, request_size: usize) -> Self {
        let (done_tx, done_rx) = channel();
        RemoteEngine {
            objects: Arc::new(objects),
            request_size: request_size.max(1),
            permits: Arc::new(Semaphore::new(concurrency.max(1))),
            cancel: watch::channel(false).0,
            done_tx,
            done_rx,
            in_flight: 0,
        }
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
        let (tx, permits, size) = (self.done_tx.clone(), Arc::clone(&self.permits), self.request_size);
        let mut cancelled = self.cancel.subscribe();
        let dest = Dest(read.buf as usize);
        let task = async move {
            let fetch = std::pin::pin!(fetch(&object, read.offset, dest, read.len, size, &permits));
            let stop = std::pin::pin!(async move {
                let _ = cancelled.wait_for(|c| *c).await;
            });
            // Either the reads finish or the load is cancelled; in both cases the fetch future is
            // dropped (no part of it writes any more) before the completion is sent.
            let result = match select(fetch, stop).await {
                Either::Left((r, _)) => r.map(|()| read.len).map_err(RemoteFault::into_io),
                Either::Right(_) => Err(io::Error::other("remote read cancelled")),
            };
            let _ = tx.send(RawCompletion { tag: read.tag, result });
        };
        spawn_remote(task).map_err(io::Error::other)?;
        self.in_flight += 1;
        Ok(())
    }

    fn wait(&mut self) -> io::Result<RawCompletion> {
        let c = self.done_rx.recv().map_err(|_| io::Error::other("the remote runtime stopped"))?;
        self.in_flight -= 1;
        Ok(c)
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

/// GET `len` bytes at `offset` of `object` into `dest`, in parts of at most `size` bytes, each
/// holding a permit while it runs; the first failure drops the other parts.
async fn fetch(
    object: &RemoteObject,
    offset: u64,
    dest: Dest,
    len: usize,
    size: usize,
    permits: &Semaphore,
) -> Result<(), RemoteFault> {
    let parts = (0..len).step_by(size).map(|start| {
        let n = size.min(len - start);
        async move {
            let _permit = permits
                .acquire()
                .await
                .map_err(|_| RemoteFault::new(RemoteFailure::Other, "the request limiter closed".into()))?;
            // SAFETY: under `RawEngine::submit`'s contract the caller's buffer of `len` bytes at
            // `dest` is valid, and written by this read alone, until its completion is returned;
            // the parts are disjoint (`start..start + n` within `0..len`), and each slice lives
            // only inside this future, which is dropped or finished before the completion is sent.
            let dst = unsafe { std::slice::from_raw_parts_mut((dest.0 + start) as *mut u8, n) };
            let at = offset + start as u64;
            object.read_into(at..at + n as u64, dst).await
        }
    });
    try_join_all(parts).await.map(|_| ())
}
