//! What a failed remote request was: the public [`RemoteFailure`] of `Error::Remote`, and the
//! crate's `RemoteFault`, which carries it out of the read engine inside an `io::Error`.

use std::io;

/// What kind of failure a remote request ended in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RemoteFailure {
    /// The object (or bucket) does not exist.
    NotFound,
    /// The credentials were refused or missing.
    Denied,
    /// The object changed (size or ETag) since its header was read.
    Changed,
    /// The server answered with this status after the retries were spent (5xx, 429, …).
    Status(u16),
    /// The request timed out, after its retries.
    TimedOut,
    /// The server could not be reached.
    Unreachable,
    /// The server's answer broke the protocol (a body longer or shorter than the range asked).
    Protocol,
    /// Anything else the store reported.
    Other,
}

impl std::fmt::Display for RemoteFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RemoteFailure::NotFound => f.write_str("not found"),
            RemoteFailure::Denied => f.write_str("access denied"),
            RemoteFailure::Changed => f.write_str("object changed during the load"),
            RemoteFailure::Status(code) => write!(f, "server answered {code}"),
            RemoteFailure::TimedOut => f.write_str("timed out"),
            RemoteFailure::Unreachable => f.write_str("server unreachable"),
            RemoteFailure::Protocol => f.write_str("bad answer"),
            RemoteFailure::Other => f.write_str("request failed"),
        }
    }
}

/// A remote read's failure as the read engine reports it (inside an `io::Error`), before the
/// pipeline names the file and tensor.
#[derive(Debug)]
pub(crate) struct RemoteFault {
    pub failure: RemoteFailure,
    pub message: String,
}

#[cfg_attr(not(feature = "remote"), allow(dead_code))] // made by the remote engine alone
impl RemoteFault {
    pub(crate) fn new(failure: RemoteFailure, message: String) -> Self {
        RemoteFault { failure, message }
    }

    /// The fault inside `e`, if it is one.
    pub(crate) fn inside(e: &io::Error) -> Option<&RemoteFault> {
        e.get_ref().and_then(|inner| inner.downcast_ref::<RemoteFault>())
    }

    pub(crate) fn into_io(self) -> io::Error {
        io::Error::other(self)
    }
}

impl std::fmt::Display for RemoteFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.failure, self.message)
    }
}

impl std::error::Error for RemoteFault {}
