//! Progress reports during a load.

use std::path::PathBuf;
use std::sync::Arc;

/// A snapshot of a load's progress.
#[derive(Debug, Clone)]
pub struct Progress {
    /// Bytes delivered so far.
    pub bytes_done: u64,
    /// Bytes the load reads in all.
    pub bytes_total: u64,
    /// The file the last delivered bytes came from.
    pub file: PathBuf,
}

/// A progress callback, called from the loading thread after each delivered extent.
///
/// ```
/// use std::sync::{Arc, atomic::{AtomicU64, Ordering}};
/// let seen = Arc::new(AtomicU64::new(0));
/// let s = seen.clone();
/// let cb: weightstream::progress::ProgressFn = Arc::new(move |p| s.store(p.bytes_done, Ordering::Relaxed));
/// # drop(cb);
/// ```
pub type ProgressFn = Arc<dyn Fn(&Progress) + Send + Sync>;
