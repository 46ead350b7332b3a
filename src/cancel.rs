//! Cancelling a load from another thread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Cancels a load from another thread: the load returns [`crate::Error::Cancelled`] with everything it
/// allocated freed.
///
/// ```
/// let token = weightstream::CancelToken::new();
/// let loader = weightstream::Loader::new().cancel_token(token.clone());
/// token.cancel();
/// # drop(loader);
/// ```
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    /// A token not yet cancelled.
    pub fn new() -> Self {
        Self::default()
    }
    /// Ask the load to stop.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
    /// Whether cancellation was asked.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}
