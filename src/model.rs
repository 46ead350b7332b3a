//! What a load returns: the tensors, where they live, and how the load went.

use crate::error::{Error, Result, UsageError};
use crate::format::Dtype;
use crate::memory::HostMemory;
use crate::sink::Device;

/// Where a model's bytes live. Dropping it frees the arena as one.
pub(crate) enum Storage {
    Host(HostMemory),
    #[cfg(feature = "cuda")]
    Cuda(crate::cuda::DeviceArena),
    Null,
}

/// Figures of one load.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadStats {
    /// The device the model was loaded to (`auto` resolved).
    pub device: Device,
    /// The read engine that ran (`"uring"` or `"pread"`).
    pub io: &'static str,
    /// Whether files were opened with O_DIRECT.
    pub direct: bool,
    /// Bytes read from the files.
    pub bytes_read: u64,
    /// Bytes of tensors as loaded (after conversion).
    pub bytes_loaded: u64,
    /// Wall-clock seconds from planning to the last byte landed.
    pub seconds: f64,
    /// Bytes of the staging ring (0 when the target read straight into its memory).
    pub staging_bytes: u64,
    /// Whether the staging ring was pinned memory.
    pub pinned: bool,
    /// Bytes of device memory used as conversion scratch besides the model (0 when nothing was
    /// converted on a GPU).
    pub device_scratch_bytes: u64,
    /// The load's trace when [`crate::Loader::trace`] was on, for the ways that return only
    /// figures ([`crate::Loader::load_into`], [`crate::Loader::load_with`],
    /// [`crate::TensorStream::trace`]); [`crate::Loader::load`] keeps it in the model
    /// ([`LoadedModel::trace`]) and leaves this `None`.
    pub trace: Option<std::sync::Arc<crate::trace::TraceRecorder>>,
}

impl std::fmt::Display for LoadStats {
    /// One line: `1024.0 MiB to cuda:0 in 0.105 s (42.50 GB/s, io pread, staging 128 MiB pinned)`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.1} MiB to {} in {:.3} s ({:.2} GB/s, io {}{}, staging {} MiB{})",
            self.bytes_loaded as f64 / 1048576.0,
            self.device,
            self.seconds,
            self.gbps(),
            self.io,
            if self.direct { " O_DIRECT" } else { "" },
            self.staging_bytes >> 20,
            if self.pinned { " pinned" } else { "" },
        )
    }
}

impl LoadStats {
    /// Read throughput in GB/s (10^9 bytes per second).
    pub fn gbps(&self) -> f64 {
        if self.seconds > 0.0 {
            self.bytes_read as f64 / self.seconds / 1e9
        } else {
            0.0
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct TensorMeta {
    pub name: String,
    pub dtype: Dtype,
    pub stored_dtype: Dtype,
    pub shape: Vec<u64>,
    pub offset: u64,
    pub len: u64,
}

/// A loaded checkpoint: tensors by name and in file order, in one arena on one device.
pub struct LoadedModel {
    pub(crate) device: Device,
    pub(crate) tensors: Vec<TensorMeta>,
    /// Indices of `tensors` sorted by name (4 bytes a tensor, not a second copy of the names).
    pub(crate) by_name: Vec<u32>,
    pub(crate) storage: Storage,
    pub(crate) stats: LoadStats,
    pub(crate) trace: Option<crate::trace::TraceRecorder>,
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel")
            .field("device", &self.device)
            .field("tensors", &self.tensors.len())
            .field("stats", &self.stats)
            .finish()
    }
}

impl LoadedModel {
    pub(crate) fn new(device: Device, tensors: Vec<TensorMeta>, storage: Storage, stats: LoadStats) -> Self {
        let mut by_name: Vec<u32> = (0..tensors.len() as u32).collect();
        by_name.sort_unstable_by(|&a, &b| tensors[a as usize].name.cmp(&tensors[b as usize].name));
        LoadedModel { device, tensors, by_name, storage, stats, trace: None }
    }

    /// The device the tensors are on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether there are no tensors.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// The tensor called `name`.
    pub fn tensor(&self, name: &str) -> Option<TensorRef<'_>> {
        let k = self.by_name.binary_search_by(|&i| self.tensors[i as usize].name.as_str().cmp(name)).ok()?;
        Some(TensorRef { model: self, meta: &self.tensors[self.by_name[k] as usize] })
    }

    /// All tensors, in file order.
    pub fn tensors(&self) -> impl ExactSizeIterator<Item = TensorRef<'_>> + '_ {
        self.tensors.iter().map(move |meta| TensorRef { model: self, meta })
    }

    /// The trace of the load, when [`crate::Loader::trace`] asked for one.
    pub fn trace(&self) -> Option<&crate::trace::TraceRecorder> {
        self.trace.as_ref()
    }

    /// Figures of the load.
    pub fn stats(&self) -> &LoadStats {
        &self.stats
    }

    /// Bytes of the arena holding the tensors (alignment padding included).
    pub fn arena_bytes(&self) -> u64 {
        match &self.storage {
            Storage::Host(m) => m.len() as u64,
            #[cfg(feature = "cuda")]
            Storage::Cuda(a) => a.len() as u64,
            Storage::Null => 0,
        }
    }
}

/// One tensor of a [`LoadedModel`].
#[derive(Clone, Copy)]
pub struct TensorRef<'a> {
    model: &'a LoadedModel,
    meta: &'a TensorMeta,
}

impl std::fmt::Debug for TensorRef<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TensorRef")
            .field("name", &self.meta.name)
            .field("dtype", &self.meta.dtype)
            .field("shape", &self.meta.shape)
            .field("device", &self.model.device)
            .finish()
    }
}

impl<'a> TensorRef<'a> {
    /// Name.
    pub fn name(&self) -> &'a str {
        &self.meta.name
    }

    /// Dtype as loaded.
    pub fn dtype(&self) -> Dtype {
        self.meta.dtype
    }

    /// Dtype as stored in the file.
    pub fn stored_dtype(&self) -> Dtype {
        self.meta.stored_dtype
    }

    /// Shape.
    pub fn shape(&self) -> &'a [u64] {
        &self.meta.shape
    }

    /// The device it is on.
    pub fn device(&self) -> Device {
        self.model.device
    }

    /// Byte length as loaded.
    pub fn byte_len(&self) -> u64 {
        self.meta.len
    }

    /// Byte range in the model's arena.
    pub fn arena_range(&self) -> std::ops::Range<u64> {
        self.meta.offset..self.meta.offset + self.meta.len
    }

    /// Its bytes, when it lives in host memory.
    pub fn host_bytes(&self) -> Option<&'a [u8]> {
        match &self.model.storage {
            Storage::Host(m) => {
                Some(&m.as_slice()[self.meta.offset as usize..(self.meta.offset + self.meta.len) as usize])
            }
            _ => None,
        }
    }

    /// Its device pointer (a `CUdeviceptr`), when it lives on a CUDA device. The pointer is
    /// valid while the [`LoadedModel`] lives.
    pub fn device_ptr(&self) -> Option<u64> {
        match &self.model.storage {
            #[cfg(feature = "cuda")]
            Storage::Cuda(a) => Some(a.ptr() + self.meta.offset),
            _ => None,
        }
    }

    /// The CUDA device ordinal, when on a CUDA device.
    pub fn device_ordinal(&self) -> Option<usize> {
        match self.model.device {
            Device::Cuda(n) => Some(n),
            _ => None,
        }
    }

    /// Borrow it as a cudarc `CudaSlice<T>` on `stream` for the duration of `f`, to hand the
    /// weights to cudarc kernels or copies. The slice is never freed by cudarc: the memory stays
    /// owned by the [`LoadedModel`] (even if `f` panics). `stream` must belong to the tensor's
    /// device, and the byte length must be a whole number of `T`.
    ///
    /// ```no_run
    /// # fn demo(model: &weightstream::LoadedModel) -> Result<(), Box<dyn std::error::Error>> {
    /// let ctx = cudarc::driver::CudaContext::new(0)?;
    /// let stream = ctx.default_stream();
    /// let w = model.tensor("lm_head.weight").ok_or("missing tensor")?;
    /// let host: Vec<u16> = w.with_cudarc_slice(&stream, |s| stream.clone_dtoh(s))??;
    /// # Ok(()) }
    /// ```
    #[cfg(feature = "cuda")]
    pub fn with_cudarc_slice<T: cudarc::driver::DeviceRepr, R>(
        &self,
        stream: &std::sync::Arc<cudarc::driver::CudaStream>,
        f: impl FnOnce(&cudarc::driver::CudaSlice<T>) -> R,
    ) -> Result<R> {
        let (Some(ptr), Some(ordinal)) = (self.device_ptr(), self.device_ordinal()) else {
            return Err(self.misused("it is not on a CUDA device".into()));
        };
        if stream.context().ordinal() != ordinal {
            return Err(
                self.misused(format!("it is on cuda:{ordinal}, the stream on cuda:{}", stream.context().ordinal()))
            );
        }
        let size = std::mem::size_of::<T>() as u64;
        if size == 0 || self.meta.len % size != 0 {
            return Err(self.misused(format!("{} bytes are not a whole number of {size}-byte elements", self.meta.len)));
        }
        /// Leaks the slice back to a plain pointer on every path, so cudarc never frees it.
        struct Borrowed<T>(Option<cudarc::driver::CudaSlice<T>>);
        impl<T> Drop for Borrowed<T> {
            fn drop(&mut self) {
                if let Some(s) = self.0.take() {
                    s.leak();
                }
            }
        }
        // SAFETY: ptr..ptr+len lies in this model's live arena on the stream's device (checked),
        // every load's copies completed before the model was returned, and the guard leaks the
        // slice instead of freeing it, so the arena keeps sole ownership.
        let slice = Borrowed(Some(unsafe { stream.upgrade_device_ptr::<T>(ptr, (self.meta.len / size) as usize) }));
        match &slice.0 {
            Some(s) => Ok(f(s)),
            None => unreachable!("set just above"), // ok: `slice` was built as Some two lines up
        }
    }

    /// Copy its bytes back to a host `Vec` (for verification), wherever it lives.
    pub fn to_host_vec(&self) -> Result<Vec<u8>> {
        match &self.model.storage {
            Storage::Host(_) => Ok(self.host_bytes().unwrap_or_default().to_vec()),
            #[cfg(feature = "cuda")]
            Storage::Cuda(a) => a.copy_to_host(self.meta.offset, self.meta.len as usize),
            Storage::Null => Err(UsageError::BytesDropped { tensor: self.meta.name.clone() }.into()),
        }
    }

    /// Hand its bytes to `f` in order, in pieces of at most `max_chunk` bytes, wherever it
    /// lives: host memory is lent in place (no copy); device memory is copied back one piece at
    /// a time into a host buffer of at most `max_chunk` bytes, so that hashing or comparing a
    /// tensor of any size needs no more host memory than that. `f` is called zero times for an
    /// empty tensor.
    ///
    /// ```
    /// use sha2::{Digest, Sha256};
    /// use weightstream::{format::{write_file, WriteTensor}, Device, Dtype, Loader};
    /// let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("m.safetensors");
    /// let bytes: Vec<u8> = (0..100).collect();
    /// write_file(&path, &[WriteTensor::new("w", Dtype::U8, vec![100], &bytes)], &Default::default())?;
    /// let model = Loader::new().device(Device::Cpu).load(&path)?;
    /// let mut hash = Sha256::new();
    /// let mut pieces = 0;
    /// model.tensor("w").ok_or("missing")?.for_each_chunk(32, |piece| {
    ///     hash.update(piece);
    ///     pieces += 1;
    /// })?;
    /// assert_eq!(pieces, 4); // 32 + 32 + 32 + 4 bytes
    /// assert_eq!(hash.finalize(), Sha256::digest(&bytes));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn for_each_chunk(&self, max_chunk: usize, mut f: impl FnMut(&[u8])) -> Result<()> {
        if max_chunk == 0 {
            return Err(Error::bad_option("max_chunk", 0, "at least 1 byte"));
        }
        match &self.model.storage {
            Storage::Host(_) => {
                for piece in self.host_bytes().unwrap_or_default().chunks(max_chunk) {
                    f(piece);
                }
                Ok(())
            }
            #[cfg(feature = "cuda")]
            Storage::Cuda(a) => {
                let mut done = 0u64;
                while done < self.meta.len {
                    let len = (self.meta.len - done).min(max_chunk as u64) as usize;
                    let piece = a.copy_to_host(self.meta.offset + done, len)?;
                    f(&piece);
                    done += len as u64;
                }
                Ok(())
            }
            Storage::Null => Err(UsageError::BytesDropped { tensor: self.meta.name.clone() }.into()),
        }
    }
}

#[cfg(feature = "cuda")]
impl TensorRef<'_> {
    /// [`UsageError::BadTensorUse`] of this tensor.
    fn misused(&self, why: String) -> Error {
        UsageError::BadTensorUse { tensor: self.meta.name.clone(), why }.into()
    }
}

/// Peak resident set size of this process so far (`VmHWM`), in bytes, where Linux reports it.
pub fn peak_host_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
