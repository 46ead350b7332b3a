//! [`Loader::stream`]: a producer thread that loads a checkpoint batch by batch into fresh
//! buffers within a window, handing each tensor out as it lands.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::Arc;

use super::files::ReadFiles;
use super::run::Strategy;
use super::Loader;
use crate::error::{Error, Result};
use crate::pipeline::Observer;
use crate::plan::Plan;
use crate::sink::Device;
use crate::sink::HostMemory;
use crate::source::Checkpoint;
use crate::stream::handout::{BatchSink, Emit, Handout};
use crate::stream::{batches, HostShare, StreamedTensor, TensorData, TensorStream, Window};

/// What each streamed tensor of a batch carries, taken when it is handed out.
struct Meta {
    name: String,
    dtype: crate::Dtype,
    stored_dtype: crate::Dtype,
    shape: Vec<u64>,
    offset: u64,
    len: u64,
    span: u64,
}

/// Hands tensor `i` of batch `part` on through `tx`, its bytes at `data(offset, len, span)` of
/// the batch.
fn emitter(
    part: &Plan,
    tx: &Sender<Result<StreamedTensor>>,
    data: impl Fn(u64, u64, u64) -> TensorData + 'static,
) -> Emit {
    let mut metas: Vec<Option<Meta>> = part
        .tensors
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let end = part.tensors.get(i + 1).map_or(part.dst_len, |n| n.dst_offset);
            Some(Meta {
                name: t.name.clone(),
                dtype: t.dtype,
                stored_dtype: t.stored_dtype,
                shape: t.shape.clone(),
                offset: t.dst_offset,
                len: t.len,
                span: end - t.dst_offset,
            })
        })
        .collect();
    let tx = tx.clone();
    Box::new(move |i| {
        let Some(m) = metas.get_mut(i).and_then(Option::take) else {
            return Err(Error::internal("a stream tensor handed out twice"));
        };
        let t = StreamedTensor {
            name: m.name,
            dtype: m.dtype,
            stored_dtype: m.stored_dtype,
            shape: m.shape,
            data: data(m.offset, m.len, m.span),
            span: m.span,
        };
        tx.send(Ok(t)).map_err(|_| Error::Cancelled)
    })
}

impl Loader {
    /// Stream the checkpoint at `path`: an iterator of its tensors in file order, each handed
    /// out as soon as it has landed, owning a refcounted share of a batch buffer (host memory
    /// for `cpu`, device memory for `cuda`).
    ///
    /// At most `window_bytes` of batch buffers are in flight beyond the tensors the consumer
    /// still holds; host memory beyond that is the staging ring. Dropping a tensor frees its
    /// share; dropping the iterator cancels the load and waits until its memory is idle. `dtype`,
    /// `only`, `shard`, `direct` and `cancel_token` apply as to [`Loader::load`].
    ///
    /// Header, option and plan errors (a tensor larger than the window:
    /// [`Error::WindowTooSmall`]) are returned here; a failure while loading is one `Err` item,
    /// after which the iterator ends.
    ///
    /// ```
    /// # let dir = tempfile::tempdir()?;
    /// # let p = dir.path().join("m.safetensors");
    /// use weightstream::{format::{write_file, WriteTensor}, Device, Dtype, Loader};
    /// write_file(&p, &[WriteTensor::new("a", Dtype::U8, vec![3], &[1, 2, 3]),
    ///                  WriteTensor::new("b", Dtype::U8, vec![2], &[4, 5])], &Default::default())?;
    /// let mut names = Vec::new();
    /// for t in Loader::new().device(Device::Cpu).stream(&p, 64 << 20)? {
    ///     let t = t?; // a failed load is one Err item
    ///     names.push((t.name().to_string(), t.host_bytes().map(<[u8]>::to_vec)));
    /// }
    /// assert_eq!(names, [("a".to_string(), Some(vec![1, 2, 3])), ("b".to_string(), Some(vec![4, 5]))]);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn stream(&self, path: impl AsRef<Path>, window_bytes: u64) -> Result<TensorStream> {
        let ckpt = self.open(path.as_ref())?;
        let (device, plan) = self.plan_of(&ckpt, &|_| true)?;
        if self.zero_copy {
            return Err(Error::usage("stream does not support --zero-copy yet: it loads through the ring"));
        }
        match device {
            Device::Cpu => {}
            #[cfg(feature = "cuda")]
            Device::Cuda(_) => {}
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => return Err(Error::CudaNotBuilt),
            _ => return Err(Error::usage(format!("stream hands tensors out in host or CUDA memory, not {device}"))),
        }
        let cut = batches(&plan, window_bytes)?;
        let window = Arc::new(Window::new(window_bytes));
        let stop = crate::CancelToken::new();
        let (tx, rx) = channel();
        let remaining = plan.tensors.len();
        let bytes_read = Arc::new(AtomicU64::new(0));
        let producer = {
            let (mut loader, window, stop) = (self.clone(), Arc::clone(&window), stop.clone());
            // Reads that wait on a server (remote engines) end when the stream is dropped too.
            loader.stream_stop = Some(stop.clone());
            let read = Arc::clone(&bytes_read);
            std::thread::Builder::new()
                .name("weightstream-stream".into())
                .spawn(move || {
                    if let Err(e) = loader.produce(&ckpt, &plan, cut, device, (&window, &stop, &read), &tx) {
                        let _ = tx.send(Err(e)); // nobody listens once the stream was dropped
                    }
                })
                .map_err(|e| Error::internal(format!("cannot start the stream's thread: {e}")))?
        };
        Ok(TensorStream {
            items: Some(rx),
            window,
            stop,
            producer: Some(producer),
            remaining,
            ended: false,
            bytes_read,
        })
    }

    /// The producer: each batch takes room in the window, gets a fresh buffer and runs; the
    /// bytes it read are added to `read`.
    fn produce(
        &self,
        ckpt: &Checkpoint,
        plan: &Plan,
        cut: Vec<std::ops::Range<usize>>,
        device: Device,
        (window, stop, read): (&Window, &crate::CancelToken, &AtomicU64),
        tx: &Sender<Result<StreamedTensor>>,
    ) -> Result<()> {
        #[cfg(feature = "cuda")]
        let dev = match device {
            Device::Cuda(o) => Some(crate::sink::cuda::CudaDevice::open(o)?),
            _ => None,
        };
        for range in cut {
            let part = plan.part(range);
            window.take(part.dst_len)?;
            let files = self.read_files(ckpt, &part)?;
            let mut obs = Observer { progress: None, cancel: self.cancel.as_ref(), trace: None };
            let bytes = match device {
                #[cfg(feature = "cuda")]
                Device::Cuda(_) => {
                    let dev = dev.as_ref().ok_or_else(|| Error::internal("a CUDA stream without its device"))?;
                    self.stream_cuda_batch(dev, &part, &files, stop, tx, &mut obs)?
                }
                _ => self.stream_host_batch(&part, &files, stop, tx, &mut obs)?,
            };
            read.fetch_add(bytes, Ordering::Relaxed);
            drop(files);
        }
        Ok(())
    }

    fn stream_host_batch(
        &self,
        part: &Plan,
        files: &ReadFiles,
        stop: &crate::CancelToken,
        tx: &Sender<Result<StreamedTensor>>,
        obs: &mut Observer<'_>,
    ) -> Result<u64> {
        let batch = Arc::new(HostMemory::new(part.dst_len as usize)?);
        let emit = {
            let batch = Arc::clone(&batch);
            emitter(part, tx, move |offset, len, span| {
                let (offset, len, span) = (offset as usize, len as usize, span as usize);
                TensorData::Host(HostShare { batch: Arc::clone(&batch), offset, len, span })
            })
        };
        let mut sink = Handout::new(BatchSink::new(batch), part, stop, emit);
        // As a whole load would: in place (reading and converting into the batch), or through
        // the ring where in place cannot honour the options (O_DIRECT, io_uring converting).
        let (_, bytes, _) = match self.strategy(Device::Cpu, part, files.is_remote()) {
            Strategy::InPlace { convert_on_workers } => {
                self.in_place(part, files, &mut sink, convert_on_workers, obs)?
            }
            _ => {
                let (count, size) = self.ring_dims_for(Device::Cpu, files.is_remote());
                let mut ring = self.pool.host(count, size)?;
                let run = self.through_ring(part, files, &mut ring, &mut sink, obs);
                self.pool.give_back_host(ring);
                run?
            }
        };
        sink.finish_batch()?;
        Ok(bytes)
    }

    #[cfg(feature = "cuda")]
    fn stream_cuda_batch(
        &self,
        dev: &Arc<crate::sink::cuda::CudaDevice>,
        part: &Plan,
        files: &ReadFiles,
        stop: &crate::CancelToken,
        tx: &Sender<Result<StreamedTensor>>,
        obs: &mut Observer<'_>,
    ) -> Result<u64> {
        use crate::sink::cuda::{CudaSink, DeviceArena};
        use crate::stream::DeviceBatch;
        let batch = Arc::new(DeviceBatch(DeviceArena::alloc(dev, (part.dst_len as usize).max(1))?));
        let places: Vec<(u64, usize)> =
            part.tensors.iter().map(|t| (batch.0.ptr() + t.dst_offset, t.len as usize)).collect();
        let emit = {
            let batch = Arc::clone(&batch);
            emitter(part, tx, move |offset, len, _| TensorData::Device { batch: Arc::clone(&batch), offset, len })
        };
        let converter = match part.converts() {
            true => Some(self.pool.converter(dev)?),
            false => None,
        };
        let (count, size) = self.ring_dims_for(Device::Cuda(dev.ordinal()), files.is_remote());
        let mut ring = self.pool.pinned(dev, count, size)?;
        // SAFETY: every place lies inside `batch` (the plan's destinations rebased to 0, each
        // with its loaded size, within dst_len), on `dev`, and they do not overlap; `batch` is
        // kept alive by this function past the sink's drop, and a tensor that shares it is
        // handed out only after its copies' fence fired.
        let inner =
            unsafe { CudaSink::into_pointers(dev, places, self.streams, part.converts(), size, false, converter)? };
        let mut sink = Handout::new(inner, part, stop, emit);
        let run = self.through_ring(part, files, &mut ring, &mut sink, obs);
        let finished = run.and_then(|(_, bytes, _)| sink.finish_batch().map(|()| bytes));
        drop(sink);
        self.pool.give_back_pinned(dev.ordinal(), ring);
        drop(batch);
        finished
    }
}
