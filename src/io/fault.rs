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

impl Fault {
    /// Applies the fault to one read attempt of `len` bytes at `offset`: the length to attempt,
    /// or the injected error.
    ///
    /// ```
    /// use weightstream::io::Fault;
    /// assert_eq!(Fault::ShortReads(7).attempt(0, 100).unwrap(), 7);
    /// assert!(Fault::EioAt(50).attempt(0, 100).is_err());
    /// assert_eq!(Fault::EioAt(50).attempt(100, 100).unwrap(), 100);
    /// ```
    pub fn attempt(&self, offset: u64, len: usize) -> io::Result<usize> {
        match *self {
            Fault::ShortReads(max) => Ok(len.min(max.max(1))),
            Fault::EioAt(at) if offset <= at && at < offset + len as u64 => {
                Err(io::Error::from_raw_os_error(libc::EIO))
            }
            Fault::EioAt(_) => Ok(len),
        }
    }
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
        match self.fault.attempt(read.offset, read.len) {
            Ok(len) => read.len = len,
            Err(e) => {
                self.injected.push(RawCompletion { tag: read.tag, result: Err(e) });
                return Ok(());
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

    fn cancel(&mut self) {
        self.inner.cancel();
    }
}
