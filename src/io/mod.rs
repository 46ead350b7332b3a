//! Read engines: queue positioned reads into caller-owned buffers, complete in any order.
//!
//! Two layers:
//! - a [`RawEngine`] performs one read attempt per request (io_uring or a pread thread pool);
//! - a [`ReadQueue`] sits on top, resumes short reads, turns raw errno values into
//!   `io::Error`, and reports end-of-file as a short total. Nothing above it sees a raw result.
//!
//! A fault-injecting engine ([`FaultyEngine`]) sits between the two in tests.

mod fault;
pub(crate) mod pool;
mod pread;
#[cfg(all(feature = "uring", target_os = "linux"))]
mod uring;

use std::collections::HashMap;
use std::io;
use std::os::fd::RawFd;

pub use fault::{Fault, FaultyEngine};
pub use pread::PreadEngine;
#[cfg(all(feature = "uring", target_os = "linux"))]
pub use uring::UringEngine;

/// Which read engine to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IoKind {
    /// O_DIRECT reads: io_uring when the kernel allows it, else pread. Buffered reads: pread,
    /// which measured faster from a warm page cache (see BENCHMARKS.md).
    #[default]
    Auto,
    /// io_uring only (an error when unavailable).
    Uring,
    /// A pool of threads calling pread.
    Pread,
}

impl std::str::FromStr for IoKind {
    type Err = crate::error::Error;
    fn from_str(s: &str) -> crate::error::Result<Self> {
        match s {
            "auto" => Ok(IoKind::Auto),
            "uring" | "io_uring" => Ok(IoKind::Uring),
            "pread" => Ok(IoKind::Pread),
            _ => Err(crate::error::Error::bad_option("io", s, "auto, uring or pread")),
        }
    }
}

/// One read attempt: `len` bytes at `offset` of `fd` into `buf`.
#[derive(Debug, Clone, Copy)]
pub struct RawRead {
    /// File descriptor (kept open by the caller until completion).
    pub fd: RawFd,
    /// File offset.
    pub offset: u64,
    /// Destination.
    pub buf: *mut u8,
    /// Bytes to read.
    pub len: usize,
    /// Caller's tag, returned with the completion.
    pub tag: u64,
}

// SAFETY: a RawRead is a plain description of a request; the pointer is only dereferenced by the
// engine under the contract of `RawEngine::submit`, which the submitter upholds.
unsafe impl Send for RawRead {}

/// The outcome of one read attempt: bytes read (0 = end of file) or the error.
#[derive(Debug)]
pub struct RawCompletion {
    /// The tag of the request.
    pub tag: u64,
    /// Bytes read, or the error.
    pub result: io::Result<usize>,
}

/// An engine performing single read attempts, possibly many at once.
pub trait RawEngine: Send {
    /// A short name for reports (`"uring"`, `"pread"`).
    fn name(&self) -> &'static str;

    /// Queue one read.
    ///
    /// # Safety
    /// 1. `read.buf` must be valid for writes of `read.len` bytes, and not otherwise accessed,
    ///    from this call until the completion carrying `read.tag` has been returned by
    ///    [`RawEngine::wait`].
    /// 2. `read.fd` must stay open until then.
    unsafe fn submit(&mut self, read: RawRead) -> io::Result<()>;

    /// Block until one queued read completes, and return it. Must only be called while at
    /// least one read is queued.
    fn wait(&mut self) -> io::Result<RawCompletion>;

    /// Ask the reads in flight to end early (a load failed or was cancelled); each still
    /// completes through [`RawEngine::wait`]. Engines whose reads end quickly anyway need not.
    fn cancel(&mut self) {}
}

/// A read request as the pipeline sees it.
#[derive(Debug, Clone, Copy)]
pub struct ReadRequest {
    /// File descriptor.
    pub fd: RawFd,
    /// File offset.
    pub offset: u64,
    /// Destination.
    pub buf: *mut u8,
    /// Bytes wanted.
    pub len: usize,
    /// Caller's tag.
    pub tag: u64,
}

/// The completion of a whole request: `Ok(n)` with `n < len` only at end of file.
#[derive(Debug)]
pub struct Completion {
    /// The request's tag.
    pub tag: u64,
    /// Its offset (for error reports).
    pub offset: u64,
    /// Bytes wanted.
    pub len: usize,
    /// Bytes read, or the error.
    pub result: io::Result<usize>,
}

struct Pending {
    req: ReadRequest,
    done: usize,
}

/// Resumes short reads on top of a [`RawEngine`] and keeps count of what is in flight.
pub struct ReadQueue {
    engine: Box<dyn RawEngine>,
    pending: HashMap<u64, Pending>,
    next_id: u64,
    depth: usize,
}

impl ReadQueue {
    /// A queue over `engine` allowing `depth` requests in flight.
    pub fn new(engine: Box<dyn RawEngine>, depth: usize) -> Self {
        ReadQueue { engine, pending: HashMap::new(), next_id: 0, depth: depth.max(1) }
    }

    /// The engine's name.
    pub fn engine_name(&self) -> &'static str {
        self.engine.name()
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    /// How many more requests may be submitted now.
    pub fn room(&self) -> usize {
        self.depth.saturating_sub(self.pending.len())
    }

    /// Whether another request may be submitted now.
    pub fn has_room(&self) -> bool {
        self.pending.len() < self.depth
    }

    /// Queue a request.
    ///
    /// # Safety
    /// `req.buf` must be valid for writes of `req.len` bytes and not otherwise accessed, and
    /// `req.fd` must stay open, until this request's [`Completion`] was returned by
    /// [`ReadQueue::wait`] or [`ReadQueue::drain`] returned.
    pub unsafe fn submit(&mut self, req: ReadRequest) -> io::Result<()> {
        let id = self.next_id;
        self.next_id += 1;
        let raw = RawRead { fd: req.fd, offset: req.offset, buf: req.buf, len: req.len, tag: id };
        // SAFETY: forwarded from this function's contract.
        unsafe { self.engine.submit(raw)? };
        self.pending.insert(id, Pending { req, done: 0 });
        Ok(())
    }

    /// Wait for the next whole request to complete (short reads resumed here).
    pub fn wait(&mut self) -> io::Result<Completion> {
        loop {
            if self.pending.is_empty() {
                return Err(io::Error::other("ReadQueue::wait with nothing in flight"));
            }
            let c = self.engine.wait()?;
            let Some(p) = self.pending.get_mut(&c.tag) else {
                return Err(io::Error::other(format!("completion for unknown request {}", c.tag)));
            };
            let outcome = match c.result {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => None,
                Err(e) => Some(Err(e)),
                Ok(0) => Some(Ok(())),
                Ok(n) => {
                    p.done += n;
                    (p.done >= p.req.len).then_some(Ok(()))
                }
            };
            if let Some(outcome) = outcome {
                return Ok(self.finish(c.tag, outcome));
            }
            // Resume the rest of the request under the same id.
            let p = &self.pending[&c.tag];
            let raw = RawRead {
                fd: p.req.fd,
                offset: p.req.offset + p.done as u64,
                // SAFETY: done < len, so the pointer stays inside the caller's buffer.
                buf: unsafe { p.req.buf.add(p.done) },
                len: p.req.len - p.done,
                tag: c.tag,
            };
            // SAFETY: the remainder of a buffer the caller lent us under `submit`'s contract.
            if let Err(e) = unsafe { self.engine.submit(raw) } {
                return Ok(self.finish(c.tag, Err(e)));
            }
        }
    }

    fn finish(&mut self, id: u64, outcome: io::Result<()>) -> Completion {
        let (req, done) = match self.pending.remove(&id) {
            Some(p) => (p.req, p.done),
            None => unreachable!("finish is only called for a pending id"), // ok: both callers looked the id up in `pending` first
        };
        Completion { tag: req.tag, offset: req.offset, len: req.len, result: outcome.map(|()| done) }
    }

    /// Wait for every request in flight, discarding results: after it returns no buffer is in
    /// use by the engine. Called on every error and cancellation path before buffers are freed.
    pub fn drain(&mut self) {
        if !self.pending.is_empty() {
            self.engine.cancel();
        }
        while !self.pending.is_empty() {
            match self.engine.wait() {
                Ok(c) => {
                    self.pending.remove(&c.tag);
                }
                Err(_) => {
                    // The engine cannot report more; its Drop waits for what the kernel holds.
                    self.pending.clear();
                }
            }
        }
    }
}

impl Drop for ReadQueue {
    fn drop(&mut self) {
        self.drain();
    }
}

/// Options for building an engine.
#[derive(Debug, Clone, Copy)]
pub struct EngineOptions {
    /// Which engine.
    pub kind: IoKind,
    /// Requests in flight at most.
    pub queue_depth: usize,
    /// Reader threads for the pread engine (and io_uring's async workers bound).
    pub threads: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(4).clamp(2, 16);
        EngineOptions { kind: IoKind::Auto, queue_depth: 32, threads }
    }
}

/// Build the engine `opts` asks for, for buffered (`direct == false`) or O_DIRECT reads.
///
/// `Auto` picks pread for buffered reads: on a warm page cache a read is a memcpy, and a pool
/// of threads calling pread beat io_uring's workers on the H100 host (25.8 against 14-17 GB/s,
/// BENCHMARKS.md). For O_DIRECT it picks io_uring, falling back to pread where io_uring is
/// unavailable.
pub fn open_engine(opts: &EngineOptions, direct: bool) -> io::Result<Box<dyn RawEngine>> {
    let pread = || Ok(Box::new(PreadEngine::new(opts.threads)) as Box<dyn RawEngine>);
    match opts.kind {
        IoKind::Pread => pread(),
        IoKind::Uring => open_uring(opts),
        IoKind::Auto if direct => open_uring(opts).or_else(|_| pread()),
        IoKind::Auto => pread(),
    }
}

#[cfg(all(feature = "uring", target_os = "linux"))]
fn open_uring(opts: &EngineOptions) -> io::Result<Box<dyn RawEngine>> {
    Ok(Box::new(UringEngine::new(opts.queue_depth as u32, opts.threads as u32)?))
}

#[cfg(not(all(feature = "uring", target_os = "linux")))]
fn open_uring(_opts: &EngineOptions) -> io::Result<Box<dyn RawEngine>> {
    Err(io::Error::new(io::ErrorKind::Unsupported, "io_uring support not built"))
}
