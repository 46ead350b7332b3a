//! A fault-injecting engine for tests: short reads, errors at a chosen offset.

use std::io;

use super::{RawCompletion, RawEngine, RawRead};

/// A fault to inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Every read attempt returns at most this many bytes (exercises short-read resumption).
    ShortReads(usize),
    /// A read attempt whose range covers this file offset fails with EIO.
    EioAt(u64),
}

/// Wraps an engine and injects `fault` into its reads.
///
/// ```
/// use weightstream::io::{Fault, FaultyEngine, PreadEngine};
/// let engine = FaultyEngine::new(Box::new(PreadEngine::new(1)), Fault::ShortReads(7));
/// # drop(engine);
/// ```
pub struct FaultyEngine {
    inner: Box<dyn RawEngine>,
    fault: Fault,
    injected: Vec<RawCompletion>,
}

impl FaultyEngine {
    /// Wrap `inner`.
    pub fn new(inner: Box<dyn RawEngine>, fault: Fault) -> Self {
        FaultyEngine { inner, fault, injected: Vec::new() }
    }
}

impl RawEngine for FaultyEngine {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    unsafe fn submit(&mut self, mut read: RawRead) -> io::Result<()> {
        match self.fault {
            Fault::ShortReads(max) => read.len = read.len.min(max.max(1)),
            Fault::EioAt(at) => {
                if read.offset <= at && at < read.offset + read.len as u64 {
                    self.injected
                        .push(RawCompletion { tag: read.tag, result: Err(io::Error::from_raw_os_error(libc::EIO)) });
                    return Ok(());
                }
            }
        }
        // SAFETY: forwarded from the caller; a shortened length stays inside its buffer.
        unsafe { self.inner.submit(read) }
    }

    fn wait(&mut self) -> io::Result<RawCompletion> {
        match self.injected.pop() {
            Some(c) => Ok(c),
            None => self.inner.wait(),
        }
    }
}
