//! Staging memory kept between loads, shared by the clones of a `Loader`: one host ring, one
//! pinned ring per CUDA device, and the conversion kernels per device.
//!
//! The lock is held only to check a ring out or in, never during a load: clones load at the
//! same time (a second concurrent load allocates a ring of its own, and the pool keeps one per
//! device when both are back), and a load started from a progress callback does not deadlock.

use std::ops::{Deref, DerefMut};
use std::sync::{Mutex, MutexGuard};

use crate::error::Result;
use crate::stage::StagingRing;

#[derive(Default)]
struct Pooled {
    host: Option<StagingRing>,
    /// The conversion kernels, loaded once per device (a module load can JIT-compile PTX).
    /// Declared before the pinned rings so that they drop first: the rings' buffers hold the
    /// device's context, which a module needs until it is unloaded.
    #[cfg(feature = "cuda")]
    converters: Vec<(usize, std::sync::Arc<crate::cuda::kernels::DeviceConverter>)>,
    #[cfg(feature = "cuda")]
    pinned: Vec<(usize, StagingRing)>,
}

/// The staging pool of a loader and its clones.
#[derive(Default)]
pub(crate) struct StagingPool(Mutex<Pooled>);

fn fits(r: &StagingRing, count: usize, size: usize) -> bool {
    r.slot_count() == count && r.slot_size() == size
}

impl StagingPool {
    fn lock(&self) -> MutexGuard<'_, Pooled> {
        // A panic while the lock was held cannot leave a ring half-updated: take it anyway.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A host ring of `count` slots of `size` bytes: the pooled one if it fits, else a new one
    /// (a pooled ring of another size is freed first).
    pub(crate) fn host(&self, count: usize, size: usize) -> Result<StagingRing> {
        let pooled = self.lock().host.take();
        match pooled {
            Some(r) if fits(&r, count, size) => Ok(r),
            other => {
                drop(other); // free the old ring before mapping the new one
                StagingRing::host(count, size)
            }
        }
    }

    /// Return a host ring after a load (kept unless another is pooled already).
    pub(crate) fn give_back_host(&self, ring: StagingRing) {
        let mut p = self.lock();
        if p.host.is_none() {
            p.host = Some(ring);
        }
    }

    /// A pinned ring for `dev`, as [`StagingPool::host`] does for host rings.
    #[cfg(feature = "cuda")]
    pub(crate) fn pinned(
        &self,
        dev: &std::sync::Arc<crate::cuda::CudaDevice>,
        count: usize,
        size: usize,
    ) -> Result<StagingRing> {
        let ordinal = dev.ordinal();
        let pooled = {
            let mut p = self.lock();
            p.pinned.iter().position(|(o, _)| *o == ordinal).map(|i| p.pinned.swap_remove(i).1)
        };
        match pooled {
            Some(r) if fits(&r, count, size) => Ok(r),
            other => {
                drop(other); // free the old ring before pinning the new one
                crate::stage::StagingRing::pinned(dev, count, size)
            }
        }
    }

    /// Return the pinned ring of device `ordinal` after a load.
    #[cfg(feature = "cuda")]
    pub(crate) fn give_back_pinned(&self, ordinal: usize, ring: StagingRing) {
        let mut p = self.lock();
        if !p.pinned.iter().any(|(o, _)| *o == ordinal) {
            p.pinned.push((ordinal, ring));
        }
    }

    /// The conversion kernels loaded on `dev` (loaded on first use, outside the lock).
    #[cfg(feature = "cuda")]
    pub(crate) fn converter(
        &self,
        dev: &std::sync::Arc<crate::cuda::CudaDevice>,
    ) -> Result<std::sync::Arc<crate::cuda::kernels::DeviceConverter>> {
        let ordinal = dev.ordinal();
        let found = self.lock().converters.iter().find(|(o, _)| *o == ordinal).map(|(_, c)| c.clone());
        if let Some(c) = found {
            return Ok(c);
        }
        dev.bind()?;
        let c = std::sync::Arc::new(crate::cuda::kernels::DeviceConverter::load()?);
        let mut p = self.lock();
        match p.converters.iter().find(|(o, _)| *o == ordinal) {
            Some((_, other)) => Ok(other.clone()),
            None => {
                p.converters.push((ordinal, c.clone()));
                Ok(c)
            }
        }
    }
}

/// Where a leased ring goes back to.
#[derive(Debug, Clone, Copy)]
enum Home {
    Host,
    #[cfg(feature = "cuda")]
    Pinned(usize),
}

/// A staging ring lent for one run: it goes back to its pool when dropped, on every path (a
/// failed run, a panic unwinding through the load) without a hand-written give-back.
pub(crate) struct StagingLease<'p> {
    pool: &'p StagingPool,
    ring: Option<StagingRing>,
    home: Home,
}

impl StagingPool {
    /// Lend a host ring of `count` slots of `size` bytes (the kept one when it fits).
    pub(crate) fn lease_host(&self, count: usize, size: usize) -> Result<StagingLease<'_>> {
        Ok(StagingLease { pool: self, ring: Some(self.host(count, size)?), home: Home::Host })
    }

    /// Lend a pinned ring of device `dev` (the kept one when it fits).
    #[cfg(feature = "cuda")]
    pub(crate) fn lease_pinned(
        &self,
        dev: &std::sync::Arc<crate::cuda::CudaDevice>,
        count: usize,
        size: usize,
    ) -> Result<StagingLease<'_>> {
        let ring = self.pinned(dev, count, size)?;
        Ok(StagingLease { pool: self, ring: Some(ring), home: Home::Pinned(dev.ordinal()) })
    }
}

impl Deref for StagingLease<'_> {
    type Target = StagingRing;
    fn deref(&self) -> &StagingRing {
        // ok: the ring is Some from the lease's making until Drop takes it.
        self.ring.as_ref().unwrap_or_else(|| unreachable!("a staging lease without its ring"))
    }
}

impl DerefMut for StagingLease<'_> {
    fn deref_mut(&mut self) -> &mut StagingRing {
        // ok: as in deref.
        self.ring.as_mut().unwrap_or_else(|| unreachable!("a staging lease without its ring"))
    }
}

impl Drop for StagingLease<'_> {
    fn drop(&mut self) {
        let Some(ring) = self.ring.take() else { return };
        match self.home {
            Home::Host => self.pool.give_back_host(ring),
            #[cfg(feature = "cuda")]
            Home::Pinned(ordinal) => self.pool.give_back_pinned(ordinal, ring),
        }
    }
}
