//! The pread engine: a pool of threads, each doing one `pread` per request.
//!
//! On a warm page cache a read is a memcpy from the cache, so parallel threads are what reaches
//! memory bandwidth; this engine is also the fallback where io_uring is unavailable.

use std::io;

use super::pool::WorkerPool;
use super::{RawCompletion, RawEngine, RawRead};

/// A pool of reader threads.
pub struct PreadEngine {
    pool: WorkerPool<RawRead, RawCompletion>,
}

impl PreadEngine {
    /// A pool of `threads` readers (at least one).
    ///
    /// ```
    /// let engine = weightstream::io::PreadEngine::new(2);
    /// # drop(engine);
    /// ```
    pub fn new(threads: usize) -> Self {
        // Where the OS runs out of threads, the pool is what could be started; with none at all,
        // submit reports that the workers have stopped.
        PreadEngine { pool: WorkerPool::new("ws-pread", threads, |_| read_one) }
    }
}

fn read_one(r: RawRead) -> RawCompletion {
    // SAFETY: the submitter guarantees (RawEngine::submit contract) that r.buf is valid for r.len
    // bytes of writes and r.fd open until this completion is received (or the engine dropped,
    // which joins the readers first).
    let n = unsafe { libc::pread(r.fd, r.buf.cast(), r.len, r.offset as libc::off_t) };
    let result = if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) };
    RawCompletion { tag: r.tag, result }
}

impl RawEngine for PreadEngine {
    fn name(&self) -> &'static str {
        "pread"
    }

    unsafe fn submit(&mut self, read: RawRead) -> io::Result<()> {
        if self.pool.send(read) {
            Ok(())
        } else {
            Err(io::Error::other("pread workers have stopped"))
        }
    }

    fn wait(&mut self) -> io::Result<RawCompletion> {
        self.pool.recv().ok_or_else(|| io::Error::other("pread workers have stopped"))
    }
}
