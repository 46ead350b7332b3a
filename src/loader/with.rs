//! A caller-owned sink: [`Loader::load_with`] hands every piece of every selected tensor to a
//! [`TensorSink`] as it lands, in file order, for callers that consume bytes without keeping
//! them (hash, upload, quantize).

use std::path::Path;
use std::time::Instant;

use super::drive::On;
use super::Loader;
use crate::error::{Error, Result};
use crate::format::Dtype;
use crate::memory::Fence;
use crate::model::LoadStats;
use crate::pipeline::Observer;
use crate::plan::Plan;
use crate::sink::{Delivery, Device, Sink};
use crate::trace::TraceRecorder;

/// What a [`TensorSink`] may fail with: its own error, returned by the load as
/// [`Error::Sink`] naming the file and the tensor.
pub type SinkError = Box<dyn std::error::Error + Send + Sync>;

/// One piece of a tensor as loaded, handed to a [`TensorSink`].
#[derive(Debug, Clone, Copy)]
pub struct TensorPiece<'a> {
    /// The tensor's name.
    pub name: &'a str,
    /// Its dtype as loaded (after [`Loader::dtype`]).
    pub dtype: Dtype,
    /// Its shape as loaded (a shard's block shape under [`Loader::shard`]).
    pub shape: &'a [u64],
    /// Bytes of the whole tensor as loaded.
    pub tensor_len: u64,
    /// Where these bytes start within the tensor as loaded.
    pub offset: u64,
    /// The bytes, converted when a conversion was asked.
    pub bytes: &'a [u8],
}

/// A consumer of loaded bytes: [`Loader::load_with`] calls [`TensorSink::piece`] once per
/// piece, in file order (a big tensor arrives in several pieces, each once, their offsets
/// ascending). A closure taking a [`TensorPiece`] is a `TensorSink`.
///
/// ```
/// # let dir = tempfile::tempdir()?;
/// # let p = dir.path().join("m.safetensors");
/// use weightstream::{format::{write_file, WriteTensor}, Device, Dtype, Loader, TensorPiece};
/// write_file(&p, &[WriteTensor::new("a", Dtype::U8, vec![3], &[1, 2, 3]),
///                  WriteTensor::new("b", Dtype::U8, vec![2], &[4, 5])], &Default::default())?;
/// let mut sum = 0u64;
/// let mut sink = |p: &TensorPiece<'_>| {
///     sum += p.bytes.iter().map(|&b| u64::from(b)).sum::<u64>();
///     Ok(())
/// };
/// let stats = Loader::new().device(Device::Cpu).load_with(&p, &mut sink)?;
/// assert_eq!((sum, stats.bytes_loaded), (15, 5));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub trait TensorSink {
    /// Take one piece. An error stops the load.
    fn piece(&mut self, piece: &TensorPiece<'_>) -> std::result::Result<(), SinkError>;
}

impl<F: FnMut(&TensorPiece<'_>) -> std::result::Result<(), SinkError>> TensorSink for F {
    fn piece(&mut self, piece: &TensorPiece<'_>) -> std::result::Result<(), SinkError> {
        self(piece)
    }
}

impl Loader {
    /// Load the checkpoint at `path` into `sink`: every piece of every selected tensor, in file
    /// order, as it lands in host staging (converted first when [`Loader::dtype`] asks). No
    /// arena is allocated: host memory is the staging ring. `only`, `shard`, `dtype`,
    /// `direct`, `io`, progress, cancellation and trace apply as to [`Loader::load`]; the
    /// device option does not (the bytes are the caller's, on the host), and `zero_copy` is a
    /// usage error.
    ///
    /// A failing sink stops the load with [`Error::Sink`], naming the file and the tensor.
    pub fn load_with(&self, path: impl AsRef<Path>, sink: &mut impl TensorSink) -> Result<LoadStats> {
        let started = Instant::now();
        if self.zero_copy {
            return Err(Error::unsupported("zero_copy", "load_with", "it hands host bytes to the caller"));
        }
        let ckpt = self.open(path.as_ref())?;
        let device = Device::Cpu;
        let loader = self.clone().device(device);
        let (_, plan) = loader.plan_of(&ckpt, &|_| true)?;
        let files = self.read_files(&ckpt, &plan)?;
        let mut trace = self.trace.then(TraceRecorder::new);
        let mut obs = Observer::new(self.progress.as_ref(), self.cancel.as_ref(), trace.as_mut());
        let drive = loader.drive(On::Host { device, in_place: false }, &plan, files.requests())?;
        let mut adapter = CallerSink { sink, next: 0, scratch: Vec::new() };
        let out = drive.run(&plan, &files, &mut adapter, &mut obs)?;
        Ok(out.stats(device, &plan, self.direct, started, trace))
    }
}

/// The pipeline's sink over a caller's [`TensorSink`]. It asks for file order
/// ([`Sink::needs_file_order`]): the ring hands slots out in extent order, an early slot waiting
/// in its own slot, so nothing is copied aside and memory stays the ring's.
struct CallerSink<'s, T: ?Sized> {
    sink: &'s mut T,
    /// The first extent not yet handed out.
    next: usize,
    /// Conversion output, reused.
    scratch: Vec<u8>,
}

impl<T: TensorSink + ?Sized> CallerSink<'_, T> {
    fn hand(&mut self, plan: &Plan, p: &crate::plan::Piece, src: &[u8]) -> Result<()> {
        let t = &plan.tensors[p.tensor];
        let dst = t.dst_range(p.tensor_offset, p.len);
        let bytes = match t.converts() {
            true => {
                self.scratch.resize((dst.end - dst.start) as usize, 0);
                crate::convert::convert_host(t.stored_dtype, t.dtype, src, &mut self.scratch).map_err(|_| {
                    Error::UnsupportedConversion {
                        file: plan.files[t.file].path.clone(),
                        tensor: t.name.clone(),
                        from: t.stored_dtype.name(),
                        to: t.dtype.name(),
                    }
                })?;
                &self.scratch[..]
            }
            false => src,
        };
        let piece = TensorPiece {
            name: &t.name,
            dtype: t.dtype,
            shape: &t.shape,
            tensor_len: t.len,
            offset: dst.start - t.dst_offset,
            bytes,
        };
        self.sink.piece(&piece).map_err(|source| Error::Sink {
            file: plan.files[t.file].path.clone(),
            tensor: t.name.clone(),
            source,
        })
    }
}

impl<T: TensorSink + ?Sized> Sink for CallerSink<'_, T> {
    fn needs_file_order(&self) -> bool {
        true
    }

    fn deliver(&mut self, d: &Delivery<'_>) -> Result<Fence> {
        if d.extents.start != self.next {
            let what = format!("extent {} delivered while the sink waited for extent {}", d.extents.start, self.next);
            return Err(Error::internal(what));
        }
        for piece in d.host_pieces() {
            let (p, src) = piece?;
            self.hand(d.plan, &p, src)?;
        }
        self.next = d.extents.end;
        Ok(Fence::done())
    }

    fn finish(&mut self) -> Result<()> {
        Ok(())
    }
}
