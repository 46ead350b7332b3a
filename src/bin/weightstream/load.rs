//! `weightstream load PATH [options]`: load a checkpoint and report what landed where.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use weightstream::io::IoKind;
use weightstream::{Device, Dtype, LoadedModel, Loader};

/// Options shared by `load` and `bench`: how to build the loader.
#[derive(clap::Args, Clone, Debug)]
pub struct LoaderArgs {
    /// Target: auto (a GPU if there is one, else cpu), cpu, null (read and drop), cuda, cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: Device,
    /// Convert F16/BF16/F32/F64 tensors to this dtype: keep, f32, f16, bf16.
    #[arg(long, default_value = "keep", value_parser = ["keep", "f32", "f16", "bf16"])]
    pub dtype: String,
    /// Load only tensors matching this glob (repeatable).
    #[arg(long = "only", value_name = "GLOB")]
    pub only: Vec<String>,
    /// Read engine: auto, uring, pread.
    #[arg(long, default_value = "auto")]
    pub io: IoKind,
    /// Open files with O_DIRECT (bypass the page cache).
    #[arg(long)]
    pub direct: bool,
    /// Total size of the staging ring (e.g. 64M, 1G). Default: 128M for cuda and --direct,
    /// 32M for buffered host loads (measured, BENCHMARKS.md).
    #[arg(long, value_parser = parse_size)]
    pub staging: Option<u64>,
    /// Number of staging buffers the ring is split into (default 8, at most 1024).
    #[arg(long)]
    pub staging_buffers: Option<usize>,
    /// Reader threads (default: CPU count, 2..16).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Size of one read request (default 2M).
    #[arg(long, value_parser = parse_size)]
    pub read_size: Option<u64>,
    /// CUDA streams for the copies.
    #[arg(long, default_value_t = 2)]
    pub streams: usize,
    /// Experimental: DMA from the page cache (mmap + cuMemHostRegister), no staging copy.
    #[arg(long)]
    pub zero_copy: bool,
}

impl LoaderArgs {
    /// The loader these options describe.
    pub fn loader(&self) -> Loader {
        let mut l = Loader::new()
            .device(self.device)
            .io(self.io)
            .direct(self.direct)
            .streams(self.streams)
            .zero_copy(self.zero_copy);
        if let Some(d) = parse_dtype(&self.dtype) {
            l = l.dtype(d);
        }
        if let Some(n) = self.staging_buffers {
            l = l.staging_count(n);
        }
        if let Some(total) = self.staging {
            // The total is honoured: each buffer gets its share, rounded down to 4 KiB.
            let n = self.staging_buffers.unwrap_or(8).max(1) as u64;
            l = l.staging_size(usize::try_from(total / n).unwrap_or(usize::MAX));
        }
        for g in &self.only {
            l = l.only(g.clone());
        }
        if let Some(t) = self.threads {
            l = l.threads(t);
        }
        if let Some(r) = self.read_size {
            l = l.read_size(r as usize);
        }
        l
    }
}

/// Arguments of `load`.
#[derive(clap::Args)]
pub struct Args {
    /// A .safetensors file, an index JSON, a directory, or a Hugging Face cache folder.
    pub path: PathBuf,
    #[command(flatten)]
    pub loader: LoaderArgs,
    /// Hash each tensor's bytes read back from where they landed (sha256).
    #[arg(long)]
    pub checksum: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Write a Chrome/Perfetto trace of reads and copies to FILE.
    #[arg(long, value_name = "FILE")]
    pub trace: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// `--dtype` value to a target dtype (`None` for keep; clap has checked the value).
fn parse_dtype(s: &str) -> Option<Dtype> {
    match s {
        "f32" => Some(Dtype::F32),
        "f16" => Some(Dtype::F16),
        "bf16" => Some(Dtype::BF16),
        _ => None,
    }
}

/// Parse `16M`, `1G`, `4KiB`, `65536`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("invalid size `{s}`"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().trim_end_matches("ib").trim_end_matches('b') {
        "" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        _ => return Err(format!("invalid size unit in `{s}` (K, M, G)")),
    };
    n.checked_mul(mult).filter(|&v| v > 0).ok_or_else(|| format!("invalid size `{s}`"))
}

/// A progress bar on stderr when it is a terminal.
pub fn progress_bar(quiet: bool) -> Option<indicatif::ProgressBar> {
    if quiet || !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {bytes_per_sec} {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    Some(bar)
}

/// sha256 of a tensor's bytes read back from its device.
pub fn tensor_sha256(t: &weightstream::TensorRef<'_>) -> weightstream::Result<String> {
    let bytes = t.to_host_vec()?;
    Ok(Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect())
}

/// Run `load`.
pub fn run(args: Args) -> weightstream::Result<()> {
    let mut loader = args.loader.loader().trace(args.trace.is_some());
    let bar = progress_bar(args.quiet);
    if let Some(bar) = &bar {
        let bar = bar.clone();
        loader = loader.progress(Arc::new(move |p| {
            bar.set_length(p.bytes_total);
            bar.set_position(p.bytes_done);
        }));
    }
    let model = loader.load(&args.path)?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    if let (Some(path), Some(trace)) = (&args.trace, model.trace()) {
        trace.write_chrome_json(path)?;
    }
    report(&model, args.checksum, args.json)
}

fn report(model: &LoadedModel, checksum: bool, json: bool) -> weightstream::Result<()> {
    let s = model.stats();
    let rss = weightstream::peak_host_rss_bytes();
    let mut tensors = Vec::with_capacity(model.len());
    for t in model.tensors() {
        let mut o = serde_json::json!({"name": t.name(), "dtype": t.dtype().name(), "shape": t.shape()});
        if checksum {
            o["sha256"] = tensor_sha256(&t)?.into();
        }
        tensors.push(o);
    }
    if json {
        let out = serde_json::json!({
            "device": s.device.to_string(),
            "io": s.io,
            "direct": s.direct,
            "bytes_read": s.bytes_read,
            "bytes_loaded": s.bytes_loaded,
            "seconds": s.seconds,
            "gbps": s.gbps(),
            "staging_bytes": s.staging_bytes,
            "pinned": s.pinned,
            "peak_host_rss_bytes": rss,
            "tensors": tensors,
        });
        println!("{out}");
    } else {
        println!(
            "loaded {} tensors: {s}, peak host RSS {} MiB",
            model.len(),
            rss.map(|r| (r >> 20).to_string()).unwrap_or_else(|| "?".into()),
        );
        if checksum {
            for t in &tensors {
                println!("{}  {}", t["sha256"].as_str().unwrap_or(""), t["name"].as_str().unwrap_or(""));
            }
        }
    }
    Ok(())
}
