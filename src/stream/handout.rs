//! The sink side of a stream: [`Handout`] wraps the sink of one batch and hands each tensor out,
//! in plan order, once its last byte has landed; [`BatchSink`] is a host batch that the readers
//! fill in place (or staged pieces are copied into) while landed tensors are already out.

use std::cell::RefCell;
use std::rc::Rc;

use std::sync::Arc;

use crate::cancel::CancelToken;
use crate::error::{Error, Result};
use crate::memory::{Fence, HostMemory, HostRegion, Staged};
use crate::plan::Plan;
use crate::sink::{Delivery, Sink};

/// Hands tensor `i` of the batch on (`Err`: nobody takes it any more).
pub(crate) type Emit = Box<dyn FnMut(usize) -> Result<()>>;

/// Which tensors of a batch have landed, and which of them were handed out.
struct Landing {
    /// Stored bytes of each tensor not yet delivered.
    left: Vec<u64>,
    landed: Vec<bool>,
    /// The first tensor not yet handed out: tensors go out in plan order.
    next: usize,
    emit: Emit,
    /// A delivery, a fence or the sink's finish failed: a tensor counted as delivered may not
    /// have landed, so nothing more is handed out.
    failed: bool,
}

impl Landing {
    fn land(&mut self, tensors: &[usize]) -> Result<()> {
        if self.failed {
            return Err(Error::internal("a stream batch failed: its remaining tensors are not handed out"));
        }
        for &i in tensors {
            self.landed[i] = true;
        }
        while self.next < self.landed.len() && self.landed[self.next] {
            (self.emit)(self.next)?;
            self.next += 1;
        }
        Ok(())
    }
}

/// A sink that passes every delivery to `inner` and hands a tensor out once all its bytes were
/// delivered and the fence of its last delivery fired.
pub(crate) struct Handout<'c, S> {
    inner: S,
    landing: Rc<RefCell<Landing>>,
    stop: &'c CancelToken,
}

impl<'c, S: Sink> Handout<'c, S> {
    /// Wrap `inner` for `plan`, the batch. `stop` fails the next delivery once cancelled.
    pub(crate) fn new(inner: S, plan: &Plan, stop: &'c CancelToken, emit: Emit) -> Self {
        let left: Vec<u64> = plan.tensors.iter().map(|t| t.stored_len).collect();
        let landed = left.iter().map(|&l| l == 0).collect();
        Handout { inner, landing: Rc::new(RefCell::new(Landing { left, landed, next: 0, emit, failed: false })), stop }
    }

    /// After a successful run: hand out what is left (tensors of no bytes, fences never waited
    /// on because the run ended first: the sink finished, so they have fired).
    pub(crate) fn finish_batch(&mut self) -> Result<()> {
        let mut l = self.landing.borrow_mut();
        let done: Vec<usize> = (0..l.left.len()).filter(|&i| l.left[i] == 0).collect();
        l.land(&done)?;
        match l.next == l.left.len() {
            true => Ok(()),
            false => Err(Error::internal(format!("tensor {} of a stream batch never landed", l.next))),
        }
    }
}

impl<S: Sink> Sink for Handout<'_, S> {
    fn host_region(&mut self) -> Option<HostRegion> {
        self.inner.host_region()
    }

    fn reads_by_dma(&self) -> bool {
        self.inner.reads_by_dma()
    }

    fn deliver(&mut self, d: &Delivery<'_>) -> Result<Fence> {
        if self.stop.is_cancelled() {
            return Err(Error::Cancelled);
        }
        let mut completed = Vec::new();
        {
            let mut l = self.landing.borrow_mut();
            for piece in d.pieces() {
                let (p, _) = piece?;
                let left = &mut l.left[p.tensor];
                *left = left.checked_sub(p.len).ok_or_else(|| Error::internal("a stream tensor delivered twice"))?;
                if *left == 0 {
                    completed.push(p.tensor);
                }
            }
        }
        let fence = self.inner.deliver(d).inspect_err(|_| self.landing.borrow_mut().failed = true)?;
        if fence.is_done() {
            if !completed.is_empty() {
                self.landing.borrow_mut().land(&completed)?;
            }
            return Ok(Fence::done());
        }
        // Every pending fence is watched, not only those that complete a tensor: a tensor's
        // earlier pieces may have gone out on another stream, and their failure must stop it.
        let landing = Rc::clone(&self.landing);
        Ok(Fence::new(move || {
            fence.wait().inspect_err(|_| landing.borrow_mut().failed = true)?;
            match completed.is_empty() {
                true => Ok(()),
                false => landing.borrow_mut().land(&completed),
            }
        }))
    }

    fn finish(&mut self) -> Result<()> {
        self.inner.finish().inspect_err(|_| self.landing.borrow_mut().failed = true)
    }

    fn scratch_bytes(&self) -> u64 {
        self.inner.scratch_bytes()
    }

    fn write_trace(&mut self, trace: &mut crate::trace::TraceRecorder) -> Result<()> {
        self.inner.write_trace(trace)
    }
}

/// The host memory of one batch: the readers read (and convert) into it in place, or staged
/// pieces are copied into it; tensors are handed out as shares of it while the rest still loads.
pub(crate) struct BatchSink {
    batch: Arc<HostMemory>,
}

impl BatchSink {
    pub(crate) fn new(batch: Arc<HostMemory>) -> Self {
        BatchSink { batch }
    }
}

impl Sink for BatchSink {
    fn host_region(&mut self) -> Option<HostRegion> {
        let ptr = std::ptr::NonNull::new(self.batch.as_ptr())?;
        // SAFETY: the mapping is `len` bytes, kept alive by this sink's `Arc` until the load
        // returned. Readers write a tensor's bytes only before the delivery that reports them;
        // only then does `Handout` hand the tensor out (a shared view of its range), and no read
        // writes that range again. Nothing else writes the batch.
        Some(unsafe { HostRegion::new(ptr, self.batch.len()) })
    }

    fn deliver(&mut self, d: &Delivery<'_>) -> Result<Fence> {
        if matches!(d.bytes, Staged::InPlace) {
            return Ok(Fence::done());
        }
        for piece in d.host_pieces() {
            let (p, src) = piece?;
            let t = &d.plan.tensors[p.tensor];
            let (start, len) = (t.dst_offset as usize, t.len as usize);
            if start.checked_add(len).is_none_or(|end| end > self.batch.len()) {
                return Err(Error::internal(format!("tensor `{}` outside its stream batch", t.name)));
            }
            // SAFETY: the range is inside the mapping (checked); it is this tensor's alone (the
            // plan's destinations do not overlap), and the tensor is not handed out before this
            // delivery returns, so no other reference to these bytes exists.
            let place = unsafe { std::slice::from_raw_parts_mut(self.batch.as_ptr().add(start), len) };
            crate::sink::write_piece(d.plan, &p, src, place)?;
        }
        Ok(Fence::done())
    }

    fn finish(&mut self) -> Result<()> {
        Ok(())
    }
}
