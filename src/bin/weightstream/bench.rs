//! `weightstream bench PATH`: the same checkpoint loaded by several strategies, in one run.
//!
//! Strategies: `pipeline` (ours, with the chosen engine; `pipeline-uring`, `pipeline-pread`,
//! `pipeline-direct` pick one), and the baselines `mmap-copy` (how candle and the Rust
//! `safetensors` crate load: mmap, then one pageable copy per tensor) and `read-all` (read each
//! file into a Vec, then copy per tensor).

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::Instant;

use weightstream::io::IoKind;
use weightstream::{Checkpoint, Device, Error, Result};

use crate::load::LoaderArgs;

/// Arguments of `bench`.
#[derive(clap::Args)]
pub struct Args {
    /// A .safetensors file, an index JSON, a directory, or a Hugging Face cache folder.
    pub path: PathBuf,
    #[command(flatten)]
    pub loader: LoaderArgs,
    /// Strategies to compare (repeatable): pipeline, pipeline-uring, pipeline-pread,
    /// pipeline-direct, pipeline-mapped (experimental, CUDA), mmap-copy, read-all. Default:
    /// pipeline, mmap-copy, read-all.
    #[arg(long = "strategy")]
    pub strategies: Vec<String>,
    /// Timed runs per strategy (after one warm-up run unless --cold).
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Evict the files from the page cache before each run (posix_fadvise DONTNEED).
    #[arg(long)]
    pub cold: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Write a trace of the last pipeline run to FILE.
    #[arg(long, value_name = "FILE")]
    pub trace: Option<PathBuf>,
}

struct Row {
    name: String,
    baseline: bool,
    secs: Vec<f64>,
    bytes: u64,
    resident_after_evict: Option<f64>,
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// Evict `path` from the page cache; returns the fraction of its pages still resident after.
pub fn evict(path: &std::path::Path) -> Result<f64> {
    let f = std::fs::File::open(path).map_err(|e| Error::Io { file: path.into(), tensor: None, source: e })?;
    // SAFETY: advisory call on an open fd; no memory is touched.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if rc != 0 {
        return Err(Error::Io { file: path.into(), tensor: None, source: std::io::Error::from_raw_os_error(rc) });
    }
    resident_fraction(&f).map_err(|e| Error::Io { file: path.into(), tensor: None, source: e })
}

/// Fraction of the file's pages in the page cache (mincore over a read-only mapping; the
/// mapping is never read, so a truncated file cannot fault here).
fn resident_fraction(f: &std::fs::File) -> std::io::Result<f64> {
    let len = f.metadata()?.len() as usize;
    if len == 0 {
        return Ok(0.0);
    }
    // SAFETY: the mapping is only passed to mincore, never dereferenced.
    let map = unsafe { memmap2::Mmap::map(f)? };
    let page = 4096usize;
    let pages = len.div_ceil(page);
    let mut vec = vec![0u8; pages];
    // SAFETY: map is a live mapping of len bytes; vec has one byte per page.
    let rc = unsafe { libc::mincore(map.as_ptr() as *mut libc::c_void, len, vec.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(vec.iter().filter(|&&b| b & 1 == 1).count() as f64 / pages as f64)
}

/// Where a baseline puts each tensor: an owned Vec (cpu), its own device allocation filled by a
/// pageable host-to-device copy (cuda, as candle does), or (null) a reused 8 MiB buffer, so that
/// every byte is copied once, as our null pipeline copies into its ring.
struct BaselineTarget {
    device: Device,
    total: u64,
    keep: Vec<Vec<u8>>,
    scratch: Vec<u8>,
    #[cfg(feature = "cuda")]
    cuda:
        Option<(std::sync::Arc<weightstream::target::cuda::CudaDevice>, Vec<weightstream::target::cuda::DeviceArena>)>,
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
                Device::Cuda(n) => Some((weightstream::target::cuda::CudaDevice::open(n)?, Vec::new())),
                _ => None,
            },
        })
    }

    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        self.total += bytes.len() as u64;
        #[cfg(feature = "cuda")]
        if let Some((dev, arenas)) = &mut self.cuda {
            let arena = weightstream::target::cuda::DeviceArena::alloc(dev, bytes.len())?;
            if !bytes.is_empty() {
                // SAFETY: the destination is a fresh allocation of bytes.len() bytes and the
                // source a live slice; from pageable memory the driver has copied the bytes out
                // before returning.
                unsafe {
                    weightstream::target::cuda::result::memcpy_htod_async(
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
fn mmap_copy(ckpt: &Checkpoint, device: Device) -> Result<u64> {
    let mut target = BaselineTarget::new(device)?;
    for f in &ckpt.files {
        let io = |e| Error::Io { file: f.path.clone(), tensor: None, source: e };
        let file = std::fs::File::open(&f.path).map_err(io)?;
        // SAFETY: a read-only map of a file validated a moment ago; as in the baselines it
        // models, a concurrent truncation would fault (the reason our pipeline avoids mmap).
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        for t in &f.header.tensors {
            let s = (f.header.data_start + t.data_offsets.0) as usize;
            target.put(&map[s..s + t.byte_len() as usize])?;
        }
    }
    target.finish()
}

/// Read each file into one Vec, then copy every tensor out of it.
fn read_all(ckpt: &Checkpoint, device: Device) -> Result<u64> {
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

/// Run `bench`.
pub fn run(args: Args) -> Result<()> {
    let ckpt = Checkpoint::open(&args.path)?;
    let strategies = if args.strategies.is_empty() {
        vec!["pipeline".to_string(), "mmap-copy".to_string(), "read-all".to_string()]
    } else {
        args.strategies.clone()
    };
    let base_loader = args.loader.loader();
    let device = base_loader.resolved_device();
    let mut rows = Vec::new();
    for name in &strategies {
        let loader = match name.as_str() {
            "pipeline" => Some(base_loader.clone()),
            "pipeline-uring" => Some(base_loader.clone().io(IoKind::Uring)),
            "pipeline-pread" => Some(base_loader.clone().io(IoKind::Pread)),
            "pipeline-direct" => Some(base_loader.clone().direct(true)),
            "pipeline-mapped" => Some(base_loader.clone().zero_copy(true)),
            "mmap-copy" | "read-all" => None,
            other => return Err(Error::InvalidOption { what: format!("unknown strategy `{other}`") }),
        };
        let loader = loader.map(|l| l.device(device));
        let mut row = Row {
            name: name.clone(),
            baseline: loader.is_none(),
            secs: Vec::new(),
            bytes: 0,
            resident_after_evict: None,
        };
        let warmup = usize::from(!args.cold);
        for i in 0..warmup + args.runs.max(1) {
            if args.cold {
                let mut worst: f64 = 0.0;
                for f in &ckpt.files {
                    worst = worst.max(evict(&f.path)?);
                }
                row.resident_after_evict = Some(row.resident_after_evict.unwrap_or(0.0).max(worst));
            }
            let t = Instant::now();
            let bytes = match &loader {
                Some(l) => {
                    let last = i + 1 == warmup + args.runs.max(1);
                    let l = l.clone().trace(last && args.trace.is_some());
                    let m = l.load_checkpoint(&ckpt)?;
                    if let (true, Some(p), Some(tr)) = (last, &args.trace, m.trace()) {
                        tr.write_chrome_json(p)?;
                    }
                    m.stats().bytes_read
                }
                None if name == "mmap-copy" => mmap_copy(&ckpt, device)?,
                None => read_all(&ckpt, device)?,
            };
            let secs = t.elapsed().as_secs_f64();
            if i >= warmup {
                row.secs.push(secs);
                row.bytes = bytes;
            }
        }
        rows.push(row);
    }
    let fastest_baseline = rows.iter().filter(|r| r.baseline).map(|r| median(&r.secs)).fold(f64::INFINITY, f64::min);
    let mut out = Vec::new();
    for r in &rows {
        let med = median(&r.secs);
        let min = r.secs.iter().copied().fold(f64::INFINITY, f64::min);
        let max = r.secs.iter().copied().fold(0.0, f64::max);
        let gbps = r.bytes as f64 / med / 1e9;
        let ratio = if fastest_baseline.is_finite() { fastest_baseline / med } else { f64::NAN };
        out.push(serde_json::json!({
            "strategy": r.name, "baseline": r.baseline, "runs": r.secs.len(),
            "min_s": min, "median_s": med, "max_s": max, "bytes": r.bytes, "gbps": gbps,
            "speedup_vs_fastest_baseline": if ratio.is_finite() { serde_json::json!(ratio) } else { serde_json::Value::Null },
            "resident_after_evict": r.resident_after_evict,
        }));
    }
    if args.json {
        let doc = serde_json::json!({
            "path": args.path, "device": device.to_string(), "cold": args.cold,
            "bytes": ckpt.total_bytes(), "results": out,
        });
        outln!("{doc}")?;
        return Ok(());
    }
    outln!(
        "{} on {} ({:.1} MiB, {}, {} runs each, medians)",
        args.path.display(),
        device,
        ckpt.total_bytes() as f64 / 1048576.0,
        if args.cold { "cold cache" } else { "warm cache" },
        args.runs
    )?;
    outln!(
        "{:<18} {:>9} {:>9} {:>9} {:>9} {:>12}",
        "strategy",
        "min s",
        "median s",
        "max s",
        "GB/s",
        "vs fastest baseline"
    )?;
    for o in &out {
        outln!(
            "{:<18} {:>9.4} {:>9.4} {:>9.4} {:>9.2} {:>12}",
            o["strategy"].as_str().unwrap_or(""),
            o["min_s"].as_f64().unwrap_or(0.0),
            o["median_s"].as_f64().unwrap_or(0.0),
            o["max_s"].as_f64().unwrap_or(0.0),
            o["gbps"].as_f64().unwrap_or(0.0),
            o["speedup_vs_fastest_baseline"].as_f64().map(|r| format!("{r:.2}x")).unwrap_or_else(|| "-".into()),
        )?;
    }
    for r in &rows {
        if let Some(res) = r.resident_after_evict {
            if res > 0.01 {
                outln!("warning: {}: {:.0}% of the file stayed in the page cache after eviction (runs were not fully cold)", r.name, res * 100.0)?;
            }
        }
    }
    Ok(())
}
