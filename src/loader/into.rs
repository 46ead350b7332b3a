//! Loading into caller-owned memory: [`Loader::load_into`].

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use super::drive::On;
#[cfg(feature = "cuda")]
use super::drive::Run;
use super::Loader;
use crate::error::{Error, Result};
use crate::model::LoadStats;
use crate::pipeline::Observer;
use crate::plan::Plan;
use crate::sink::{Device, HostSink};
use crate::trace::TraceRecorder;

/// Device memory that [`Loader::load_into`] may fill: a `CUdeviceptr` and its length on a CUDA
/// device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DevicePlace {
    ptr: u64,
    len: usize,
    ordinal: usize,
}

impl DevicePlace {
    /// `len` bytes at device address `ptr` on CUDA device `ordinal`.
    ///
    /// # Safety
    /// The memory must be allocated on that device (in its primary context, as cudarc and torch
    /// allocate), valid for writes of `len` bytes until the load returns, and not used by
    /// anything else meanwhile.
    pub unsafe fn new(ptr: u64, len: usize, ordinal: usize) -> Self {
        DevicePlace { ptr, len, ordinal }
    }
}

/// Where [`Loader::load_into`] puts one tensor: exactly its loaded size (after `dtype` and
/// `shard`), on the loader's device.
#[derive(Debug)]
pub enum Destination<'a> {
    /// Host memory (a `cpu` loader).
    Host(&'a mut [u8]),
    /// Device memory (a `cuda:N` loader).
    Device(DevicePlace),
}

impl Destination<'_> {
    fn len(&self) -> usize {
        match self {
            Destination::Host(b) => b.len(),
            Destination::Device(p) => p.len,
        }
    }
}

impl Loader {
    /// Load the tensors named in `destinations` into them, and nothing else: tensors without a
    /// destination are skipped (as [`Loader::only`] skips them), no arena is allocated, and host
    /// memory stays the staging ring. Conversion ([`Loader::dtype`]) and shards
    /// ([`Loader::shard`]) apply: a destination is the tensor's loaded size.
    ///
    /// Errors name the tensor ([`Error::BadDestination`]): a tensor the checkpoint lacks (or
    /// that `only` leaves out), a size that differs, overlapping device ranges, a destination on
    /// another device than the loader's.
    ///
    /// ```
    /// # let dir = tempfile::tempdir()?;
    /// # let p = dir.path().join("m.safetensors");
    /// use weightstream::{format::{write_file, WriteTensor}, Destination, Device, Dtype, Loader};
    /// write_file(&p, &[WriteTensor::new("w", Dtype::U8, vec![4], &[1, 2, 3, 4]),
    ///                  WriteTensor::new("skipped", Dtype::U8, vec![2], &[5, 6])], &Default::default())?;
    /// let mut w = vec![0u8; 4];
    /// let stats = Loader::new().device(Device::Cpu).load_into(&p, [("w".to_string(), Destination::Host(&mut w))])?;
    /// assert_eq!(w, [1, 2, 3, 4]);
    /// assert_eq!(stats.bytes_loaded, 4);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn load_into<'a>(
        &self,
        path: impl AsRef<Path>,
        destinations: impl IntoIterator<Item = (String, Destination<'a>)>,
    ) -> Result<LoadStats> {
        let started = Instant::now();
        let ckpt = self.open(path.as_ref())?;
        let (device, only, shard) = self.prepare()?;
        let mut dests: HashMap<String, Destination<'a>> = destinations.into_iter().collect();
        let first = ckpt.files.first().map(|f| f.path.clone()).unwrap_or_else(|| path.as_ref().to_path_buf());
        let bad = |tensor: &str, message: String| Error::BadDestination {
            file: first.clone(),
            tensor: tensor.into(),
            message,
        };
        let in_only = |n: &str| only.as_ref().is_none_or(|g| g.is_match(n));
        let select = |n: &str| dests.contains_key(n) && in_only(n);
        let plan = Plan::new_sharded(&ckpt, &select, &|n, d| self.out_dtype(n, d), shard.as_ref())?;
        super::check_conversions(&plan)?;
        if plan.tensors.len() < dests.len() {
            let mut missing: Vec<&String> =
                dests.keys().filter(|n| !plan.tensors.iter().any(|t| &t.name == *n)).collect();
            missing.sort();
            if let Some(n) = missing.first() {
                let why = if in_only(n) { "the checkpoint has no such tensor" } else { "--only leaves it out" };
                return Err(bad(n, why.into()));
            }
        }
        // One destination per planned tensor, in plan order, each checked.
        let mut ordered = Vec::with_capacity(plan.tensors.len());
        for t in &plan.tensors {
            let d = dests.remove(&t.name).ok_or_else(|| Error::internal("a planned tensor without a destination"))?;
            ordered.push(d);
        }
        self.fill(&ckpt, &plan, ordered, device, started, &bad)
    }

    /// Load `plan` (of `ckpt`) into `ordered`, one destination per planned tensor in plan order,
    /// each checked here against its tensor's loaded size and the loader's device: the end of
    /// [`Loader::load_into`], and of a group rank's reads.
    pub(super) fn fill(
        &self,
        ckpt: &crate::source::Checkpoint,
        plan: &Plan,
        ordered: Vec<Destination<'_>>,
        device: Device,
        started: Instant,
        bad: &dyn Fn(&str, String) -> Error,
    ) -> Result<LoadStats> {
        if ordered.len() != plan.tensors.len() {
            return Err(Error::internal("a destination per planned tensor"));
        }
        for (t, d) in plan.tensors.iter().zip(&ordered) {
            if d.len() as u64 != t.len {
                return Err(bad(
                    &t.name,
                    format!("destination of {} bytes for a tensor of {} bytes loaded", d.len(), t.len),
                ));
            }
            match (d, device) {
                (Destination::Host(_), Device::Cpu) => {}
                (Destination::Device(p), Device::Cuda(o)) if p.ordinal == o => {}
                (Destination::Device(p), _) => {
                    return Err(bad(
                        &t.name,
                        format!("destination on cuda:{}, the loader loads to {device}", p.ordinal),
                    ))
                }
                (Destination::Host(_), _) => {
                    return Err(bad(&t.name, format!("host destination, the loader loads to {device}")))
                }
            }
        }
        check_device_overlap(plan, &ordered, bad)?;
        let files = self.read_files(ckpt, plan)?;
        let mut trace = self.trace.then(TraceRecorder::new);
        let mut obs = Observer::new(self.progress.as_ref(), self.cancel.as_ref(), trace.as_mut());
        let out = match device {
            Device::Cpu => {
                let buffers = ordered
                    .into_iter()
                    .filter_map(|d| match d {
                        Destination::Host(b) => Some(b),
                        Destination::Device(_) => None,
                    })
                    .collect();
                // As a load would: in place (reading and converting into the buffers: one copy),
                // or through the ring where in place cannot honour the options.
                let drive = self.drive(On::Host { device, in_place: true }, plan, files.requests())?;
                drive.run(plan, &files, &mut HostSink::into_buffers(buffers), &mut obs)?
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(ordinal) => self.load_into_device(ordinal, plan, &files, ordered, &mut obs)?,
            _ => {
                return Err(Error::unsupported(
                    "device",
                    "load_into",
                    format!("it fills host or CUDA memory, not {device}"),
                ))
            }
        };
        drop(files);
        Ok(out.stats(device, plan, self.direct, started, trace))
    }

    #[cfg(feature = "cuda")]
    fn load_into_device(
        &self,
        ordinal: usize,
        plan: &Plan,
        files: &super::files::ReadFiles,
        ordered: Vec<Destination<'_>>,
        obs: &mut Observer<'_>,
    ) -> Result<Run> {
        use crate::cuda::CudaDevice;
        use crate::sink::cuda::CudaSink;
        let dev = CudaDevice::open(ordinal)?;
        // Work already queued on the destinations (a framework's zero-fill, or a previous owner
        // of the block in its caching allocator) runs on streams ours do not wait for: let it
        // finish before the copies start, or it could land after them.
        dev.synchronize()?;
        let places = ordered
            .iter()
            .map(|d| match d {
                Destination::Device(p) => Ok((p.ptr, p.len)),
                Destination::Host(_) => Err(Error::internal("a host destination on a CUDA load")),
            })
            .collect::<Result<Vec<_>>>()?;
        let drive = self.drive(On::Cuda(dev.clone()), plan, files.requests())?;
        let (size, converter) = (drive.slot_size(), drive.converter());
        // SAFETY: each place comes from a `DevicePlace`, whose maker promised device memory of
        // this ordinal valid until the load returns; sizes were checked against the plan and
        // the ranges for overlap; the sink is dropped before this function returns.
        let mut sink = unsafe {
            CudaSink::into_pointers(&dev, places, self.streams, plan.converts(), size, self.trace, converter)?
        };
        drive.run(plan, files, &mut sink, obs)
    }
}

/// Device destinations must not overlap (host ones cannot: they are `&mut` slices).
fn check_device_overlap(plan: &Plan, ordered: &[Destination<'_>], bad: &dyn Fn(&str, String) -> Error) -> Result<()> {
    let mut ranges: Vec<(u64, u64, usize)> = ordered
        .iter()
        .enumerate()
        .filter_map(|(i, d)| match d {
            Destination::Device(p) if p.len > 0 => Some((p.ptr, p.ptr.saturating_add(p.len as u64), i)),
            _ => None,
        })
        .collect();
    ranges.sort_unstable();
    for w in ranges.windows(2) {
        if w[1].0 < w[0].1 {
            let (a, b) = (&plan.tensors[w[0].2].name, &plan.tensors[w[1].2].name);
            return Err(bad(b, format!("its device destination overlaps that of `{a}`")));
        }
    }
    Ok(())
}
