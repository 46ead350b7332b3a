//! The baselines of `bench`: where other loaders put each tensor, and how they read it.

use crate::error::{Error, Result};
use crate::sink::Device;
use crate::source::Checkpoint;

/// Where a baseline puts each tensor: an owned Vec (cpu), its own device allocation filled by a
/// pageable host-to-device copy (cuda, as candle does), or (null) a reused 8 MiB buffer, so that
/// every byte is copied once, as our null pipeline copies into its ring.
struct BaselineTarget {
    device: Device,
    total: u64,
    keep: Vec<Vec<u8>>,
    scratch: Vec<u8>,
    #[cfg(feature = "cuda")]
    cuda: Option<(std::sync::Arc<crate::cuda::CudaDevice>, Vec<crate::cuda::DeviceArena>)>,
}

impl BaselineTarget {
    fn new(device: Device) -> Result<Self> {
        Ok(BaselineTarget {
            device,
            total: 0,
            keep: Vec::new(),
            scratch: if device == Device::Null { vec![0; 8 << 20] } else { Vec::new() },
            #[cfg(feature = "cuda")]
            cuda: match device {
                Device::Cuda(n) => Some((crate::cuda::CudaDevice::open(n)?, Vec::new())),
                _ => None,
            },
        })
    }

    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        self.total += bytes.len() as u64;
        #[cfg(feature = "cuda")]
        if let Some((dev, arenas)) = &mut self.cuda {
            let arena = crate::cuda::DeviceArena::alloc(dev, bytes.len())?;
            if !bytes.is_empty() {
                // SAFETY: the destination is a fresh allocation of bytes.len() bytes and the
                // source a live slice; from pageable memory the driver has copied the bytes out
                // before returning.
                unsafe {
                    crate::cuda::driver::memcpy_htod_async(
                        arena.ptr(),
                        bytes.as_ptr(),
                        bytes.len(),
                        std::ptr::null_mut(),
                    )?;
                }
            }
            arenas.push(arena);
            return Ok(());
        }
        if self.device == Device::Null {
            for chunk in bytes.chunks(self.scratch.len()) {
                self.scratch[..chunk.len()].copy_from_slice(chunk);
                std::hint::black_box(&self.scratch);
            }
        } else {
            self.keep.push(bytes.to_vec());
        }
        Ok(())
    }

    /// Wait for the device's copies; the bytes moved.
    fn finish(self) -> Result<u64> {
        #[cfg(feature = "cuda")]
        if let Some((dev, _)) = &self.cuda {
            dev.synchronize()?;
        }
        Ok(self.total)
    }
}

/// mmap each file, then copy every tensor on its own (candle's and the Rust `safetensors`
/// crate's way).
/// `truncate_after_map` (tests): shrink each file to its header once it is mapped, as a file
/// rewritten in place under a running loader would.
pub(crate) fn mmap_copy(ckpt: &Checkpoint, device: Device, truncate_after_map: bool) -> Result<u64> {
    let mut target = BaselineTarget::new(device)?;
    for f in &ckpt.files {
        let io = |e| Error::Io { file: f.path.clone(), tensor: None, source: e };
        let file = f.local_file("the mmap baseline")?;
        // SAFETY: a read-only map of a file validated a moment ago; as in the baselines it
        // models, a concurrent truncation would fault (the reason our pipeline avoids mmap):
        // `bench` runs this in a child process, where SIGBUS ends the child only.
        let map = unsafe { memmap2::Mmap::map(&**file) }.map_err(io)?;
        if truncate_after_map {
            let w = std::fs::OpenOptions::new().write(true).open(&f.path).map_err(io)?;
            w.set_len(f.header.data_start).map_err(io)?;
        }
        for t in &f.header.tensors {
            let s = (f.header.data_start + t.data_offsets.0) as usize;
            let bytes = map.get(s..s + t.byte_len() as usize).ok_or_else(|| Error::UnexpectedEof {
                file: f.path.clone(),
                tensor: Some(t.name.clone()),
                what: "tensor data",
                at: map.len() as u64,
            })?;
            target.put(bytes)?;
        }
    }
    target.finish()
}

/// Read each file into one Vec, then copy every tensor out of it.
pub(crate) fn read_all(ckpt: &Checkpoint, device: Device) -> Result<u64> {
    let mut target = BaselineTarget::new(device)?;
    for f in &ckpt.files {
        let all = std::fs::read(&f.path).map_err(|e| Error::Io { file: f.path.clone(), tensor: None, source: e })?;
        for t in &f.header.tensors {
            let s = (f.header.data_start + t.data_offsets.0) as usize;
            let bytes = all.get(s..s + t.byte_len() as usize).ok_or_else(|| Error::UnexpectedEof {
                file: f.path.clone(),
                tensor: Some(t.name.clone()),
                what: "tensor data",
                at: all.len() as u64,
            })?;
            target.put(bytes)?;
        }
    }
    target.finish()
}
