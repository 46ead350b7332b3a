//! Same-run comparison of load strategies: our pipeline in its variants against the baselines
//! that other loaders use, each timed over several runs, optionally from a cold page cache.
//!
//! The `mmap-copy` baseline reads through a memory map, as candle and the Rust `safetensors`
//! crate do; a file truncated under a map raises SIGBUS on the next read of a lost page, which
//! would kill the whole process. So it runs in a child process (the executable named in
//! [`BenchOptions::child_exe`], which calls [`child_main`]), and a signal that ends the child is
//! reported as that baseline's error.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Instant;

use crate::error::{Error, Result, UsageError};
use crate::io::IoKind;
use crate::loader::Loader;
use crate::sink::Device;
use crate::source::Checkpoint;

/// One way to load a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BenchStrategy {
    /// The loader as configured.
    Pipeline,
    /// The loader with io_uring.
    PipelineUring,
    /// The loader with the pread pool.
    PipelinePread,
    /// The loader with O_DIRECT.
    PipelineDirect,
    /// The loader with zero-copy (CUDA).
    PipelineZeroCopy,
    /// Baseline: mmap each file, one copy per tensor (candle, the Rust `safetensors` crate).
    MmapCopy,
    /// Baseline: read each file into one buffer, one copy per tensor.
    ReadAll,
}

impl BenchStrategy {
    /// Every strategy, in the order of their names.
    pub const ALL: [BenchStrategy; 7] = [
        BenchStrategy::Pipeline,
        BenchStrategy::PipelineUring,
        BenchStrategy::PipelinePread,
        BenchStrategy::PipelineDirect,
        BenchStrategy::PipelineZeroCopy,
        BenchStrategy::MmapCopy,
        BenchStrategy::ReadAll,
    ];

    /// The name the CLI uses.
    pub fn name(self) -> &'static str {
        match self {
            BenchStrategy::Pipeline => "pipeline",
            BenchStrategy::PipelineUring => "pipeline-uring",
            BenchStrategy::PipelinePread => "pipeline-pread",
            BenchStrategy::PipelineDirect => "pipeline-direct",
            BenchStrategy::PipelineZeroCopy => "pipeline-zero-copy",
            BenchStrategy::MmapCopy => "mmap-copy",
            BenchStrategy::ReadAll => "read-all",
        }
    }

    /// Whether this is a baseline (not our pipeline).
    pub fn is_baseline(self) -> bool {
        matches!(self, BenchStrategy::MmapCopy | BenchStrategy::ReadAll)
    }

    /// The loader this strategy runs, from the configured one (`None` for a baseline).
    pub fn loader(self, base: &Loader) -> Option<Loader> {
        let l = base.clone();
        match self {
            BenchStrategy::Pipeline => Some(l),
            BenchStrategy::PipelineUring => Some(l.io(IoKind::Uring)),
            BenchStrategy::PipelinePread => Some(l.io(IoKind::Pread)),
            BenchStrategy::PipelineDirect => Some(l.direct(true)),
            BenchStrategy::PipelineZeroCopy => Some(l.zero_copy(true)),
            BenchStrategy::MmapCopy | BenchStrategy::ReadAll => None,
        }
    }
}

impl FromStr for BenchStrategy {
    type Err = Error;
    /// ```
    /// use weightstream::bench::BenchStrategy;
    /// assert_eq!("mmap-copy".parse::<BenchStrategy>()?, BenchStrategy::MmapCopy);
    /// assert!("fastest".parse::<BenchStrategy>().is_err());
    /// # Ok::<(), weightstream::Error>(())
    /// ```
    fn from_str(s: &str) -> Result<Self> {
        BenchStrategy::ALL.into_iter().find(|b| b.name() == s).ok_or_else(|| {
            let names: Vec<_> = BenchStrategy::ALL.iter().map(|b| b.name()).collect();
            Error::bad_option("strategy", s, format!("one of {}", names.join(", ")))
        })
    }
}

/// How to run a comparison.
#[derive(Debug, Clone, Default)]
pub struct BenchOptions {
    /// Timed runs per strategy (at least one), each after one untimed warm-up run unless `cold`.
    pub runs: usize,
    /// Evict the files from the page cache before each run.
    pub cold: bool,
    /// Write a trace of the last pipeline run here.
    pub trace: Option<PathBuf>,
    /// The executable that runs the `mmap-copy` baseline in a child process: it must call
    /// [`child_main`] when started with [`CHILD_ENV`] set. Without one, `mmap-copy` is refused.
    pub child_exe: Option<PathBuf>,
}

/// The environment variable that tells an executable to run a baseline as a [`child_main`].
pub const CHILD_ENV: &str = "WEIGHTSTREAM_BENCH_CHILD";

/// Tests only: a baseline child truncates its files to their headers before it copies.
#[doc(hidden)]
pub const TRUNCATE_ENV: &str = "WEIGHTSTREAM_BENCH_TEST_TRUNCATE";

/// The timed runs of one strategy.
#[derive(Debug, Clone)]
pub struct BenchRow {
    /// The strategy.
    pub strategy: BenchStrategy,
    /// Seconds of each timed run.
    pub seconds: Vec<f64>,
    /// Bytes read by a run.
    pub bytes: u64,
    /// With `cold`: the largest fraction of a file still cached after an eviction.
    pub resident_after_evict: Option<f64>,
}

impl BenchRow {
    /// Median seconds.
    pub fn median(&self) -> f64 {
        let mut s = self.seconds.clone();
        s.sort_by(f64::total_cmp);
        match s.len() {
            0 => 0.0,
            n if n % 2 == 1 => s[n / 2],
            n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
        }
    }

    /// Fastest run, seconds.
    pub fn min(&self) -> f64 {
        self.seconds.iter().copied().fold(f64::INFINITY, f64::min)
    }

    /// Slowest run, seconds.
    pub fn max(&self) -> f64 {
        self.seconds.iter().copied().fold(0.0, f64::max)
    }

    /// GB/s at the median.
    pub fn gbps(&self) -> f64 {
        self.bytes as f64 / self.median() / 1e9
    }
}

/// The result of a comparison.
#[derive(Debug, Clone)]
pub struct BenchReport {
    /// The device every strategy loaded to.
    pub device: Device,
    /// Tensor bytes of the checkpoint.
    pub bytes: u64,
    /// One row per strategy, in the order asked.
    pub rows: Vec<BenchRow>,
}

impl BenchReport {
    /// Median seconds of the fastest baseline, if any baseline ran.
    pub fn fastest_baseline(&self) -> Option<f64> {
        self.rows.iter().filter(|r| r.strategy.is_baseline()).map(BenchRow::median).reduce(f64::min)
    }
}

/// Compare `strategies` loading `ckpt` to `base`'s device.
///
/// ```
/// use weightstream::{bench::{self, BenchOptions, BenchStrategy}, format::{write_file, WriteTensor}, Checkpoint, Device, Dtype, Loader};
/// let dir = tempfile::tempdir()?;
/// let p = dir.path().join("m.safetensors");
/// write_file(&p, &[WriteTensor::new("w", Dtype::U8, vec![4096], &[7; 4096])], &Default::default())?;
/// let opts = BenchOptions { runs: 2, ..Default::default() };
/// let report = bench::run(&Checkpoint::open(&p)?, &Loader::new().device(Device::Null),
///                         &[BenchStrategy::Pipeline, BenchStrategy::ReadAll], &opts)?;
/// assert_eq!(report.rows.len(), 2);
/// assert_eq!(report.rows[0].bytes, 4096);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn run(ckpt: &Checkpoint, base: &Loader, strategies: &[BenchStrategy], opts: &BenchOptions) -> Result<BenchReport> {
    if (opts.cold || strategies.iter().any(|s| s.is_baseline())) && ckpt.local_files("a baseline").is_err() {
        let refuse = |option, why: &str| {
            let why = format!("{why}; scripts/remote_bench.sh compares remote loaders");
            Err(Error::unsupported(option, "a remote source", why))
        };
        if opts.cold {
            return refuse("cold", "it evicts local files from the page cache");
        }
        if let Some(s) = strategies.iter().find(|s| s.is_baseline()) {
            return refuse("strategy", &format!("the {} baseline reads local files", s.name()));
        }
    }
    let device = base.resolved_device();
    let runs = opts.runs.max(1);
    let warmup = usize::from(!opts.cold);
    let mut rows = Vec::new();
    for &strategy in strategies {
        let loader = strategy.loader(base).map(|l| l.device(device));
        let mut row = BenchRow { strategy, seconds: Vec::new(), bytes: 0, resident_after_evict: None };
        for i in 0..warmup + runs {
            if opts.cold {
                let mut worst: f64 = 0.0;
                for f in &ckpt.files {
                    worst = worst.max(evict(&f.path)?);
                }
                row.resident_after_evict = Some(row.resident_after_evict.unwrap_or(0.0).max(worst));
            }
            let last = i + 1 == warmup + runs;
            let (secs, bytes) = match (&loader, strategy) {
                (Some(l), _) => {
                    let l = l.clone().trace(last && opts.trace.is_some());
                    let t = Instant::now();
                    let m = l.load_checkpoint(ckpt)?;
                    let secs = t.elapsed().as_secs_f64();
                    if let (true, Some(p), Some(tr)) = (last, &opts.trace, m.trace()) {
                        tr.write_chrome_json(p)?;
                    }
                    (secs, m.stats().bytes_read)
                }
                (None, BenchStrategy::MmapCopy) => mmap_copy_in_child(ckpt, device, opts)?,
                (None, _) => {
                    let t = Instant::now();
                    let bytes = crate::bench_baselines::read_all(ckpt, device)?;
                    (t.elapsed().as_secs_f64(), bytes)
                }
            };
            if i >= warmup {
                row.seconds.push(secs);
                row.bytes = bytes;
            }
        }
        rows.push(row);
    }
    Ok(BenchReport { device, bytes: ckpt.total_bytes(), rows })
}

/// Run the mmap-copy baseline in a child process; its own timing and bytes come back on stdout.
fn mmap_copy_in_child(ckpt: &Checkpoint, device: Device, opts: &BenchOptions) -> Result<(f64, u64)> {
    let Some(exe) = &opts.child_exe else {
        return Err(UsageError::Requires { option: "mmap-copy", needs: "BenchOptions::child_exe" }.into());
    };
    let mut cmd = std::process::Command::new(exe);
    cmd.env(CHILD_ENV, "mmap-copy").arg(device.to_string());
    for f in &ckpt.files {
        cmd.arg(&f.path);
    }
    let out = cmd.output().map_err(|e| Error::io(exe, e))?;
    let first = ckpt.files.first().map(|f| f.path.clone()).unwrap_or_default();
    if !out.status.success() {
        use std::os::unix::process::ExitStatusExt;
        let why = match out.status.signal() {
            Some(libc::SIGBUS) => "killed by SIGBUS: a file changed under its memory map".to_string(),
            Some(sig) => format!("killed by signal {sig}"),
            None => String::from_utf8_lossy(&out.stderr).trim().to_string(),
        };
        return Err(Error::BadSource { file: first, message: format!("mmap-copy baseline failed: {why}") });
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut it = text.split_whitespace().map(str::parse::<f64>);
    match (it.next(), it.next()) {
        (Some(Ok(secs)), Some(Ok(bytes))) => Ok((secs, bytes as u64)),
        // Not a weightstream bug: `child_exe` names an executable that does not call
        // `child_main` first.
        _ => {
            let expected = format!("an executable that calls bench::child_main first (it answered `{}`)", text.trim());
            Err(Error::bad_option("child_exe", exe.display(), expected))
        }
    }
}

/// The body of a baseline child: call it first thing in `main` of the executable named in
/// [`BenchOptions::child_exe`]. Returns `None` when [`CHILD_ENV`] is not set (not a child);
/// otherwise runs the baseline on the files in the arguments, prints `seconds bytes` on stdout
/// and returns the exit code.
pub fn child_main() -> Option<std::process::ExitCode> {
    let what = std::env::var(CHILD_ENV).ok()?;
    let mut args = std::env::args_os().skip(1);
    let run = || -> Result<(f64, u64)> {
        if what != "mmap-copy" {
            return Err(Error::bad_option(CHILD_ENV, &what, "mmap-copy"));
        }
        let device: Device = args.next().and_then(|d| d.into_string().ok()).unwrap_or_default().parse()?;
        let paths: Vec<PathBuf> = args.map(PathBuf::from).collect();
        let files = paths.iter().map(crate::source::CheckpointFile::open).collect::<Result<Vec<_>>>()?;
        let ckpt = Checkpoint { files, index: None };
        let truncate = std::env::var_os(TRUNCATE_ENV).is_some();
        let t = Instant::now();
        let bytes = crate::bench_baselines::mmap_copy(&ckpt, device, truncate)?;
        Ok((t.elapsed().as_secs_f64(), bytes))
    };
    Some(match run() {
        Ok((secs, bytes)) => {
            use std::io::Write;
            match writeln!(std::io::stdout(), "{secs} {bytes}") {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(_) => std::process::ExitCode::from(1),
            }
        }
        Err(e) => {
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "{e}");
            std::process::ExitCode::from(1)
        }
    })
}

/// Evict `path` from the page cache; returns the fraction of its pages still resident after.
pub fn evict(path: &Path) -> Result<f64> {
    let f = crate::regular_file::open_regular(path)?;
    // SAFETY: advisory call on an open fd; no memory is touched.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if rc != 0 {
        return Err(Error::io(path, std::io::Error::from_raw_os_error(rc)));
    }
    resident_fraction(&f).map_err(|e| Error::io(path, e))
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
