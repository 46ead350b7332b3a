//! Streaming with bounded memory: the tensors of [`crate::Loader::stream`], handed out in file
//! order as they land, each owning a refcounted share of a batch buffer.
//!
//! A producer thread cuts the plan into batches of at most half the window (so that one batch
//! loads while the consumer takes the other), waits until the window has room for the next
//! batch, allocates its buffer (host or device) and runs it through the one pipeline. A tensor
//! is sent the moment its bytes have landed (its delivery's fence fired). The window counts the
//! bytes of batch buffers that the consumer has not yet taken; what it took is its own, and
//! dropping it frees its share (a batch buffer is freed with its last share).

pub(crate) mod handout;

use std::ops::Range;
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;

use crate::cancel::CancelToken;
use crate::error::{Error, Result};
use crate::format::Dtype;
use crate::plan::Plan;
use crate::sink::Device;

/// One tensor of a [`TensorStream`]: its loaded bytes (host or device) and what they are.
///
/// Its bytes are a share of its batch's buffer (page-aligned host memory, or device memory),
/// which is freed when the last share of it is dropped. On CUDA the device is synchronized
/// first (`cuMemFree` alone only may wait): a copy the consumer queued from the tensor on its own
/// stream completes before the memory can be reused.
pub struct StreamedTensor {
    pub(crate) name: String,
    pub(crate) dtype: Dtype,
    pub(crate) stored_dtype: Dtype,
    pub(crate) shape: Vec<u64>,
    pub(crate) data: TensorData,
    /// Bytes of the batch buffer this share accounts for (its size and the padding after it).
    pub(crate) span: u64,
}

/// Where a streamed tensor's bytes are.
pub(crate) enum TensorData {
    Host(HostShare),
    #[cfg(feature = "cuda")]
    Device {
        batch: Arc<DeviceBatch>,
        offset: u64,
        len: u64,
    },
}

/// A stream's device batch: freed only after the device finished the work queued on it.
#[cfg(feature = "cuda")]
pub(crate) struct DeviceBatch(pub(crate) crate::cuda::DeviceArena);

#[cfg(feature = "cuda")]
impl Drop for DeviceBatch {
    fn drop(&mut self) {
        // Work the consumer queued on a tensor of this batch (on any stream) must finish before
        // the memory is freed and maybe reused; cuMemFree does not promise to wait for it.
        let _ = self.0.device().synchronize();
    }
}

impl StreamedTensor {
    /// Its name in the checkpoint.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The dtype it was loaded as.
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }

    /// The dtype the file stores.
    pub fn stored_dtype(&self) -> Dtype {
        self.stored_dtype
    }

    /// Its loaded shape (a shard's shape when it is split).
    pub fn shape(&self) -> &[u64] {
        &self.shape
    }

    /// Its loaded size in bytes.
    pub fn byte_len(&self) -> u64 {
        match &self.data {
            TensorData::Host(b) => b.len as u64,
            #[cfg(feature = "cuda")]
            TensorData::Device { len, .. } => *len,
        }
    }

    /// The device its bytes are on.
    pub fn device(&self) -> Device {
        match &self.data {
            TensorData::Host(_) => Device::Cpu,
            #[cfg(feature = "cuda")]
            TensorData::Device { batch, .. } => Device::Cuda(batch.0.device().ordinal()),
        }
    }

    /// Its bytes, when they are in host memory (256-byte aligned).
    pub fn host_bytes(&self) -> Option<&[u8]> {
        match &self.data {
            TensorData::Host(b) => Some(b.as_ref()),
            #[cfg(feature = "cuda")]
            TensorData::Device { .. } => None,
        }
    }

    /// Its share of the host batch buffer, kept alive by the returned handle alone (for handing
    /// the bytes on without a copy), when they are in host memory.
    pub fn into_host_bytes(self) -> Option<bytes::Bytes> {
        match self.data {
            TensorData::Host(b) => Some(bytes::Bytes::from_owner(b)),
            #[cfg(feature = "cuda")]
            TensorData::Device { .. } => None,
        }
    }

    /// The device address of its first byte (a `CUdeviceptr`, 256-byte aligned), when it is on a
    /// CUDA device: valid while this tensor lives.
    pub fn device_ptr(&self) -> Option<u64> {
        match &self.data {
            TensorData::Host(_) => None,
            #[cfg(feature = "cuda")]
            TensorData::Device { batch, offset, .. } => Some(batch.0.ptr() + offset),
        }
    }

    /// Call `f` on its bytes in order, in pieces of at most `max_chunk` bytes: host bytes in
    /// place, device bytes copied back one piece at a time (host memory stays one piece).
    ///
    /// ```
    /// # let dir = tempfile::tempdir()?;
    /// # let p = dir.path().join("m.safetensors");
    /// # weightstream::format::write_file(&p, &[weightstream::format::WriteTensor::new("w", weightstream::Dtype::U8, vec![5], &[1, 2, 3, 4, 5])], &Default::default())?;
    /// let t = weightstream::Loader::new().device(weightstream::Device::Cpu).stream(&p, 1 << 20)?.next().ok_or("empty")??;
    /// let mut pieces = Vec::new();
    /// t.for_each_chunk(2, |b| pieces.push(b.to_vec()))?;
    /// assert_eq!(pieces, [vec![1, 2], vec![3, 4], vec![5]]);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn for_each_chunk(&self, max_chunk: usize, mut f: impl FnMut(&[u8])) -> Result<()> {
        let max_chunk = max_chunk.max(1);
        match &self.data {
            TensorData::Host(b) => b.as_ref().chunks(max_chunk).for_each(&mut f),
            #[cfg(feature = "cuda")]
            TensorData::Device { batch, offset, len } => {
                let mut done = 0u64;
                while done < *len {
                    let n = (*len - done).min(max_chunk as u64);
                    f(&batch.0.copy_to_host(offset + done, n as usize)?);
                    done += n;
                }
            }
        }
        Ok(())
    }

    /// A copy of its bytes in host memory (from the device when it is there).
    pub fn to_host_vec(&self) -> Result<Vec<u8>> {
        match &self.data {
            TensorData::Host(b) => Ok(b.as_ref().to_vec()),
            #[cfg(feature = "cuda")]
            TensorData::Device { batch, offset, len } => batch.0.copy_to_host(*offset, *len as usize),
        }
    }
}

impl std::fmt::Debug for StreamedTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamedTensor")
            .field("name", &self.name)
            .field("dtype", &self.dtype)
            .field("shape", &self.shape)
            .field("device", &self.device())
            .finish()
    }
}

/// A landed tensor's bytes in its host batch, which the share keeps alive.
pub(crate) struct HostShare {
    pub(crate) batch: Arc<crate::memory::HostMemory>,
    pub(crate) offset: usize,
    pub(crate) len: usize,
    /// Its bytes and the padding after it, up to the next tensor (or the batch's end).
    pub(crate) span: usize,
}

impl Drop for HostShare {
    fn drop(&mut self) {
        // The pages that lie wholly inside this tensor's span go back to the system now, not
        // with the batch's last tensor: a consumer that keeps one small tensor of each batch
        // holds a page or two a batch, not every batch.
        const PAGE: usize = 4096;
        let start = self.offset.next_multiple_of(PAGE);
        let end = (self.offset + self.span).min(self.batch.len()) / PAGE * PAGE;
        if end > start {
            // SAFETY: the pages lie in the batch's mapping and in this tensor's span alone; the
            // tensor landed (nothing writes them again) and this last reference to its bytes is
            // going, so no one reads them either. MADV_DONTNEED on private anonymous memory
            // only drops the pages (they would read back as zeros); failure is harmless.
            unsafe { libc::madvise(self.batch.as_ptr().add(start).cast(), end - start, libc::MADV_DONTNEED) };
        }
    }
}

impl AsRef<[u8]> for HostShare {
    fn as_ref(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: the range lies in the batch's mapping (the emitter took it from the plan the
        // batch was sized by) and the share keeps the mapping alive; the tensor landed before it
        // was handed out and nothing writes its range afterwards (`BatchSink`).
        unsafe { std::slice::from_raw_parts(self.batch.as_ptr().add(self.offset), self.len) }
    }
}

/// The tensors of a checkpoint in file order, each as soon as it has landed: the iterator of
/// [`crate::Loader::stream`].
///
/// At most `window` bytes of batch buffers are in flight (loading, landed or waiting in the
/// iterator) beyond the tensors the consumer holds. A failure is one `Err` item, after which the
/// iterator ends. Dropping the iterator stops the load and waits until nothing reads or writes
/// its memory any more; the tensors already taken stay valid.
pub struct TensorStream {
    pub(crate) items: Option<Receiver<Result<StreamedTensor>>>,
    pub(crate) window: Arc<Window>,
    pub(crate) stop: CancelToken,
    pub(crate) producer: Option<JoinHandle<()>>,
    pub(crate) remaining: usize,
    pub(crate) ended: bool,
    pub(crate) bytes_read: Arc<std::sync::atomic::AtomicU64>,
    /// The stream's trace when tracing is on, set by the producer before the stream can end
    /// (before an error item, and before the channel closes).
    pub(crate) trace: Arc<std::sync::OnceLock<Arc<crate::trace::TraceRecorder>>>,
}

impl TensorStream {
    /// Bytes of batch buffers in flight now: allocated, but not yet taken by the consumer.
    pub fn bytes_in_flight(&self) -> u64 {
        self.window.in_flight()
    }

    /// Bytes read from the files so far (as [`crate::LoadStats::bytes_read`] counts them).
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The stream's trace (reads, conversions, deliveries of every batch, as
    /// [`crate::LoadedModel::trace`] records a load's), once the iterator has ended, when
    /// [`crate::Loader::trace`] was on.
    ///
    /// ```
    /// # let dir = tempfile::tempdir()?;
    /// # let p = dir.path().join("m.safetensors");
    /// use weightstream::{format::{write_file, WriteTensor}, Device, Dtype, Loader};
    /// write_file(&p, &[WriteTensor::new("a", Dtype::U8, vec![3], &[1, 2, 3])], &Default::default())?;
    /// let mut stream = Loader::new().device(Device::Cpu).trace(true).stream(&p, 1 << 20)?;
    /// for t in stream.by_ref() { t?; }
    /// assert!(!stream.trace().ok_or("no trace")?.spans().is_empty());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn trace(&self) -> Option<Arc<crate::trace::TraceRecorder>> {
        if !self.ended {
            return None;
        }
        self.trace.get().cloned()
    }

    /// The window the stream was opened with.
    pub fn window_bytes(&self) -> u64 {
        self.window.limit
    }
}

impl Iterator for TensorStream {
    type Item = Result<StreamedTensor>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.ended {
            return None;
        }
        let item = match self.items.as_ref().map(Receiver::recv) {
            Some(Ok(item)) => item,
            // The producer ended without sending an error: every tensor was sent, or it
            // panicked (which a join in `Drop` reports no further).
            _ if self.remaining == 0 => {
                self.ended = true;
                return None;
            }
            _ => Err(Error::internal("the stream's loader thread ended before every tensor was sent")),
        };
        match &item {
            Ok(t) => {
                self.window.release(t.span);
                self.remaining = self.remaining.saturating_sub(1);
            }
            Err(_) => self.ended = true,
        }
        Some(item)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        match self.ended {
            true => (0, Some(0)),
            false => (0, Some(self.remaining + 1)),
        }
    }
}

impl std::iter::FusedIterator for TensorStream {}

impl Drop for TensorStream {
    fn drop(&mut self) {
        self.stop.cancel();
        self.window.close();
        // The producer's next send fails, and its pipeline stops at the next delivery; joining
        // it means its sink has finished: no copy still writes into a batch buffer.
        drop(self.items.take());
        if let Some(p) = self.producer.take() {
            let _ = p.join();
        }
    }
}

impl std::fmt::Debug for TensorStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TensorStream")
            .field("window", &self.window.limit)
            .field("in_flight", &self.window.in_flight())
            .field("remaining", &self.remaining)
            .finish()
    }
}

/// The bytes a stream may have in flight, shared by the producer (which takes room before it
/// allocates a batch) and the iterator (which gives it back as the consumer takes tensors).
#[derive(Debug)]
pub(crate) struct Window {
    pub(crate) limit: u64,
    state: Mutex<WindowState>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct WindowState {
    in_flight: u64,
    closed: bool,
}

impl Window {
    pub(crate) fn new(limit: u64) -> Self {
        Window { limit, state: Mutex::new(WindowState::default()), changed: Condvar::new() }
    }

    /// Block until `bytes` fit in the window, then count them in; `Cancelled` once closed.
    pub(crate) fn take(&self, bytes: u64) -> Result<()> {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        while !s.closed && s.in_flight.saturating_add(bytes) > self.limit {
            s = self.changed.wait(s).unwrap_or_else(PoisonError::into_inner);
        }
        if s.closed {
            return Err(Error::Cancelled);
        }
        s.in_flight += bytes;
        Ok(())
    }

    /// `bytes` were taken by the consumer.
    pub(crate) fn release(&self, bytes: u64) {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        s.in_flight = s.in_flight.saturating_sub(bytes);
        self.changed.notify_all();
    }

    /// Wake and fail every `take` from now on.
    pub(crate) fn close(&self) {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).closed = true;
        self.changed.notify_all();
    }

    pub(crate) fn in_flight(&self) -> u64 {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).in_flight
    }
}

/// Cut `plan` into batches of consecutive tensors of at most `window / 2` destination bytes
/// each, or one tensor alone when it is larger; a tensor larger than the window is an error.
pub(crate) fn batches(plan: &Plan, window: u64) -> Result<Vec<Range<usize>>> {
    let target = (window / 2).max(1);
    let mut out = Vec::new();
    let mut start = 0;
    for (i, t) in plan.tensors.iter().enumerate() {
        if t.len > window {
            return Err(Error::WindowTooSmall {
                file: plan.files[t.file].path.clone(),
                tensor: t.name.clone(),
                bytes: t.len,
                window,
            });
        }
        let first = &plan.tensors[start];
        if i > start && t.dst_offset + t.len - first.dst_offset > target {
            out.push(start..i);
            start = i;
        }
    }
    if start < plan.tensors.len() {
        out.push(start..plan.tensors.len());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{write_file, WriteTensor};

    fn plan_of(lens: &[usize]) -> (tempfile::TempDir, Plan) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.safetensors");
        let data: Vec<Vec<u8>> = lens.iter().map(|&n| vec![1u8; n]).collect();
        let ws: Vec<_> = data
            .iter()
            .enumerate()
            .map(|(i, d)| WriteTensor::new(format!("t{i}"), Dtype::U8, vec![d.len() as u64], d))
            .collect();
        write_file(&p, &ws, &Default::default()).unwrap();
        let plan = Plan::new(&crate::source::Checkpoint::open(&p).unwrap(), &|_| true, &|_, d| d).unwrap();
        (dir, plan)
    }

    #[test]
    fn batches_hold_half_a_window_or_one_bigger_tensor() {
        let (_d, plan) = plan_of(&[100, 100, 300, 1000, 0, 10, 600, 1]);
        // Destinations (256-aligned): 0, 256, 512, 1024, 2048, 2048, 2304, 3072; padding counts.
        let b = batches(&plan, 1200).unwrap();
        assert_eq!(b, vec![0..2, 2..3, 3..4, 4..6, 6..7, 7..8]);
        for r in &b {
            let part = plan.part(r.clone());
            assert!(part.dst_len <= 600 || r.len() == 1, "{r:?}: {}", part.dst_len);
        }
        let err = batches(&plan, 999).unwrap_err();
        assert!(matches!(&err, Error::WindowTooSmall { tensor, bytes: 1000, .. } if tensor == "t3"), "{err}");
        assert_eq!(batches(&plan_of(&[]).1, 10).unwrap(), Vec::<Range<usize>>::new());
    }

    #[test]
    fn the_window_blocks_until_room_is_given_back_and_fails_once_closed() {
        let w = Arc::new(Window::new(100));
        w.take(60).unwrap();
        let w2 = Arc::clone(&w);
        let waiter = std::thread::spawn(move || w2.take(50));
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!waiter.is_finished(), "60 + 50 > 100 must wait");
        w.release(20);
        waiter.join().unwrap().unwrap();
        assert_eq!(w.in_flight(), 90);
        let w3 = Arc::clone(&w);
        let blocked = std::thread::spawn(move || w3.take(50));
        w.close();
        assert!(matches!(blocked.join().unwrap(), Err(Error::Cancelled)));
    }
}
