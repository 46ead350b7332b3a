//! The sink side of a stream: [`Handout`] wraps the sink of one batch and hands each tensor out,
//! in plan order, once its last byte has landed; [`PartsSink`] writes a host batch into buffers
//! it owns, so that a landed tensor's buffer can be moved out while the rest still loads.

use std::cell::RefCell;
use std::rc::Rc;

use bytes::BytesMut;

use crate::error::{Error, Result};
use crate::loader::CancelToken;
use crate::plan::Plan;
use crate::sink::{Delivery, Fence, Sink};

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
}

impl Landing {
    fn land(&mut self, tensors: &[usize]) -> Result<()> {
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
        Handout { inner, landing: Rc::new(RefCell::new(Landing { left, landed, next: 0, emit })), stop }
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
        let fence = self.inner.deliver(d)?;
        if completed.is_empty() {
            return Ok(fence);
        }
        if fence.is_done() {
            self.landing.borrow_mut().land(&completed)?;
            return Ok(Fence::done());
        }
        let landing = Rc::clone(&self.landing);
        Ok(Fence::new(move || {
            fence.wait()?;
            landing.borrow_mut().land(&completed)
        }))
    }

    fn finish(&mut self) -> Result<()> {
        self.inner.finish()
    }
}

/// The host buffers of one batch, a tensor each, shares of one allocation; a landed tensor's
/// buffer is taken out (by the emitter) while the others still fill.
pub(crate) type Parts = Rc<RefCell<Vec<Option<BytesMut>>>>;

/// Split one zeroed allocation of `plan.dst_len` bytes into a buffer per tensor of its loaded
/// size (the padding after a tensor stays with it, unseen).
pub(crate) fn host_parts(plan: &Plan) -> Parts {
    let mut rest = BytesMut::zeroed(plan.dst_len as usize);
    let mut parts = Vec::with_capacity(plan.tensors.len());
    for (i, t) in plan.tensors.iter().enumerate() {
        let end = plan.tensors.get(i + 1).map_or(plan.dst_len, |n| n.dst_offset);
        let mut part = rest.split_to((end - t.dst_offset) as usize);
        part.truncate(t.len as usize);
        parts.push(Some(part));
    }
    Rc::new(RefCell::new(parts))
}

/// Writes (and converts) staged host pieces into [`Parts`].
pub(crate) struct PartsSink {
    pub(crate) parts: Parts,
}

impl Sink for PartsSink {
    fn deliver(&mut self, d: &Delivery<'_>) -> Result<Fence> {
        let mut parts = self.parts.borrow_mut();
        for piece in d.host_pieces() {
            let (p, src) = piece?;
            let Some(place) = parts.get_mut(p.tensor).and_then(Option::as_mut) else {
                return Err(Error::internal("a stream tensor delivered after it was handed out"));
            };
            crate::sink::write_piece(d.plan, &p, src, place)?;
        }
        Ok(Fence::done())
    }

    fn finish(&mut self) -> Result<()> {
        Ok(())
    }
}
