//! The io_uring engine.
//!
//! Reads are flagged `IOSQE_ASYNC` so that, on a warm page cache, the copies run on the kernel's
//! io-wq workers in parallel instead of inline in the submitting thread.

use std::io;

use io_uring::{opcode, squeue, types, IoUring};

use super::{RawCompletion, RawEngine, RawRead};

/// An io_uring instance with a bounded number of reads in flight.
pub struct UringEngine {
    ring: IoUring,
    in_flight: usize,
    unsubmitted: usize,
}

impl UringEngine {
    /// A ring of `entries` submission entries, with at most `workers` bounded io-wq workers.
    ///
    /// Fails where io_uring is unavailable (old kernel, seccomp, `io_uring_disabled`).
    pub fn new(entries: u32, workers: u32) -> io::Result<Self> {
        let entries = entries.clamp(1, 4096).next_power_of_two();
        let ring = IoUring::builder().build(entries)?;
        // Best effort: bound the async workers to the reader count asked for.
        let _ = ring.submitter().register_iowq_max_workers(&mut [workers.max(1), workers.max(1)]);
        Ok(UringEngine { ring, in_flight: 0, unsubmitted: 0 })
    }
}

impl RawEngine for UringEngine {
    fn name(&self) -> &'static str {
        "uring"
    }

    unsafe fn submit(&mut self, read: RawRead) -> io::Result<()> {
        // Linux reads at most MAX_RW_COUNT (2 GiB - 4 KiB, block-aligned) per call anyway: ask for
        // no more, and the ReadQueue resumes the rest like any short read.
        let len = read.len.min(0x7fff_f000) as u32;
        let entry = opcode::Read::new(types::Fd(read.fd), read.buf, len)
            .offset(read.offset)
            .build()
            .flags(squeue::Flags::ASYNC)
            .user_data(read.tag);
        loop {
            // SAFETY: the caller upholds RawEngine::submit's contract: the buffer is valid for
            // writes of `len` bytes and the fd open until this entry's completion is reaped.
            let pushed = unsafe { self.ring.submission().push(&entry) };
            if pushed.is_ok() {
                break;
            }
            // Queue full: hand what is queued to the kernel and try again.
            self.ring.submit()?;
            self.unsubmitted = 0;
        }
        self.in_flight += 1;
        self.unsubmitted += 1;
        Ok(())
    }

    fn wait(&mut self) -> io::Result<RawCompletion> {
        loop {
            if let Some(cqe) = self.ring.completion().next() {
                self.in_flight -= 1;
                let res = cqe.result();
                let result = if res < 0 { Err(io::Error::from_raw_os_error(-res)) } else { Ok(res as usize) };
                return Ok(RawCompletion { tag: cqe.user_data(), result });
            }
            if self.in_flight == 0 {
                return Err(io::Error::other("io_uring wait with nothing in flight"));
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => self.unsubmitted = 0,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        // Reap every read the kernel still holds so that no buffer is written after this point.
        while self.in_flight > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
            let n = self.ring.completion().count();
            self.in_flight = self.in_flight.saturating_sub(n);
        }
    }
}
