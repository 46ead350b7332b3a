//! [`Loader::stream`]: a producer thread that loads a checkpoint batch by batch into fresh
//! buffers within a window, handing each tensor out as it lands.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, OnceLock};

use super::drive::{Drive, On};
use super::files::ReadFiles;
use super::Loader;
use crate::cancel::CancelToken;
use crate::error::{Error, Result};
use crate::format::Dtype;
use crate::memory::HostMemory;
use crate::pipeline::Observer;
use crate::plan::Plan;
use crate::sink::Device;
use crate::source::Checkpoint;
use crate::stream::handout::{BatchSink, Emit, Handout};
use crate::stream::{batches, HostShare, StreamedTensor, TensorData, TensorStream, Window};
use crate::trace::TraceRecorder;

/// What each streamed tensor of a batch carries, taken when it is handed out.
struct Meta {
    name: String,
    dtype: Dtype,
    stored_dtype: Dtype,
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
        match device {
            Device::Cpu => {}
            #[cfg(feature = "cuda")]
            Device::Cuda(_) => {}
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => return Err(Error::CudaNotBuilt),
            _ => {
                let why = format!("it hands tensors out in host or CUDA memory, not {device}");
                return Err(Error::unsupported("device", "stream", why));
            }
        }
        let cut = batches(&plan, window_bytes)?;
        let window = Arc::new(Window::new(window_bytes));
        let stop = CancelToken::new();
        let (tx, rx) = channel();
        let remaining = plan.tensors.len();
        let bytes_read = Arc::new(AtomicU64::new(0));
        let trace = Arc::new(OnceLock::new());
        let producer = {
            let (mut loader, window, stop) = (self.clone(), Arc::clone(&window), stop.clone());
            let kept = Arc::clone(&trace);
            // Reads that wait on a server (remote engines) end when the stream is dropped too.
            loader.stream_stop = Some(stop.clone());
            let read = Arc::clone(&bytes_read);
            std::thread::Builder::new()
                .name("weightstream-stream".into())
                .spawn(move || {
                    let mut recorder = loader.trace.then(TraceRecorder::new);
                    let shared = (&*window, &stop, &*read);
                    let produced = loader.produce(&ckpt, &plan, cut, device, shared, recorder.as_mut(), &tx);
                    // The trace is set before the stream can end: before the error item (the
                    // iterator ends on it) and before the channel closes (tx drops last).
                    if let Some(r) = recorder {
                        let _ = kept.set(Arc::new(r));
                    }
                    if let Err(e) = produced {
                        let _ = tx.send(Err(e)); // nobody listens once the stream was dropped
                    }
                    drop(tx);
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
            trace,
        })
    }

    /// The producer: each batch takes room in the window, gets a fresh buffer and runs through
    /// the driver; the bytes it read are added to `read`. Progress counts the whole stream.
    #[allow(clippy::too_many_arguments)]
    fn produce(
        &self,
        ckpt: &Checkpoint,
        plan: &Plan,
        cut: Vec<std::ops::Range<usize>>,
        device: Device,
        (window, stop, read): (&Window, &CancelToken, &AtomicU64),
        mut trace: Option<&mut TraceRecorder>,
        tx: &Sender<Result<StreamedTensor>>,
    ) -> Result<()> {
        #[cfg(feature = "cuda")]
        let dev = match device {
            Device::Cuda(o) => Some(crate::cuda::CudaDevice::open(o)?),
            _ => None,
        };
        let on = || -> Result<On> {
            match device {
                #[cfg(feature = "cuda")]
                Device::Cuda(_) => {
                    dev.clone().map(On::Cuda).ok_or_else(|| Error::internal("a CUDA stream without its device"))
                }
                _ => Ok(On::Host { device: Device::Cpu, in_place: true }),
            }
        };
        let parts: Vec<Plan> = cut.into_iter().map(|range| plan.part(range)).collect();
        // The source's shape (read by requests or not) is the same for every batch.
        let requests = self.read_files(ckpt, plan)?.requests();
        let mut total = 0;
        for part in &parts {
            total += self.drive(on()?, part, requests)?.schedule(part).bytes_to_read();
        }
        let mut before = 0;
        for part in parts {
            window.take(part.dst_len)?;
            let files = self.read_files(ckpt, &part)?;
            let drive = self.drive(on()?, &part, files.requests())?;
            let mut obs = Observer {
                progress: self.progress.as_ref(),
                cancel: self.cancel.as_ref(),
                trace: trace.as_deref_mut(),
                runs: Some((before, total)),
            };
            let batch = Batch { part: &part, files: &files, stop, tx };
            let bytes = match device {
                #[cfg(feature = "cuda")]
                Device::Cuda(_) => batch.to_cuda(self.streams, drive, &mut obs)?,
                _ => batch.to_host(drive, &mut obs)?,
            };
            before += bytes;
            read.fetch_add(bytes, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// One batch of a stream: its part of the plan, its files, the stream's stop token and channel.
struct Batch<'a> {
    part: &'a Plan,
    files: &'a ReadFiles,
    stop: &'a CancelToken,
    tx: &'a Sender<Result<StreamedTensor>>,
}

impl Batch<'_> {
    /// One host batch: a fresh page-aligned buffer that readers fill in place (or ring pieces are
    /// copied into), its tensors handed out as shares as they land.
    fn to_host(&self, drive: Drive<'_>, obs: &mut Observer<'_>) -> Result<u64> {
        let Batch { part, files, stop, tx } = *self;
        let batch = Arc::new(HostMemory::new(part.dst_len as usize)?);
        let emit = {
            let batch = Arc::clone(&batch);
            emitter(part, tx, move |offset, len, span| {
                let (offset, len, span) = (offset as usize, len as usize, span as usize);
                TensorData::Host(HostShare { batch: Arc::clone(&batch), offset, len, span })
            })
        };
        let mut sink = Handout::new(BatchSink::new(batch), part, stop, emit);
        let run = drive.run(part, files, &mut sink, obs)?;
        sink.finish_batch()?;
        Ok(run.bytes_read)
    }

    /// One CUDA batch: a fresh device allocation that the copies fill, its tensors handed out as
    /// shares once their copies' fences fired.
    #[cfg(feature = "cuda")]
    fn to_cuda(&self, streams: usize, drive: Drive<'_>, obs: &mut Observer<'_>) -> Result<u64> {
        let Batch { part, files, stop, tx } = *self;
        use crate::cuda::DeviceArena;
        use crate::sink::cuda::CudaSink;
        use crate::stream::DeviceBatch;
        let dev = drive.cuda().cloned().ok_or_else(|| Error::internal("a CUDA batch without its device"))?;
        let batch = Arc::new(DeviceBatch(DeviceArena::alloc(&dev, (part.dst_len as usize).max(1))?));
        let places: Vec<(u64, usize)> =
            part.tensors.iter().map(|t| (batch.0.ptr() + t.dst_offset, t.len as usize)).collect();
        let emit = {
            let batch = Arc::clone(&batch);
            emitter(part, tx, move |offset, len, _| TensorData::Device { batch: Arc::clone(&batch), offset, len })
        };
        let (size, converter, timed) = (drive.slot_size(), drive.converter(), obs.trace.is_some());
        // SAFETY: every place lies inside `batch` (the plan's destinations rebased to 0, each with
        // its loaded size, within dst_len), on `dev`, and they do not overlap; `batch` is kept alive
        // by this function past the sink's drop, and a tensor that shares it is handed out only
        // after its copies' fence fired.
        let inner = unsafe { CudaSink::into_pointers(&dev, places, streams, part.converts(), size, timed, converter)? };
        let mut sink = Handout::new(inner, part, stop, emit);
        let finished =
            drive.run(part, files, &mut sink, obs).and_then(|run| sink.finish_batch().map(|()| run.bytes_read));
        drop(sink);
        drop(batch);
        finished
    }
}
