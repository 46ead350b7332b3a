//! `weightstream load PATH [options]`: load a checkpoint and report what landed where.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;
use sha2::{Digest, Sha256};
use weightstream::text::escape_controls;
use weightstream::IoKind;
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
    /// Load rank RANK's share of a tensor-parallel world of WORLD ranks (with --split rules).
    #[arg(long, value_name = "RANK/WORLD", value_parser = parse_shard)]
    pub shard: Option<(usize, usize)>,
    /// Under --shard, split tensors matching GLOB along dimension DIM (repeatable; the first
    /// matching rule wins; others load whole).
    #[arg(long = "split", value_name = "GLOB=DIM", value_parser = parse_split)]
    pub splits: Vec<(String, usize)>,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

/// How `s3://`, `gs://`, `az://` and `http(s)://` sources are reached (with `load`, `bench` and
/// `inspect`).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct RemoteArgs {
    /// An object_store option for remote sources, after the AWS_*, GOOGLE_* and AZURE_*
    /// environment variables (repeatable): aws_endpoint=URL, aws_region=R, allow_http=true,
    /// timeout=30s, max_retries=N, retry_timeout=3m, ...
    #[arg(long = "storage-option", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub storage_options: Vec<(String, String)>,
    /// Ranged GETs in flight at most for remote sources (default 8).
    #[arg(long, value_name = "N")]
    pub remote_concurrency: Option<usize>,
    /// Bytes of one ranged GET at most for remote sources (default 8M).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub remote_request_size: Option<u64>,
}

impl RemoteArgs {
    /// `loader` with these options.
    pub fn apply(&self, mut loader: Loader) -> Loader {
        for (k, v) in &self.storage_options {
            loader = loader.storage_option(k.clone(), v.clone());
        }
        if let Some(n) = self.remote_concurrency {
            loader = loader.remote_concurrency(n);
        }
        if let Some(b) = self.remote_request_size {
            loader = loader.remote_request_size(usize::try_from(b).unwrap_or(usize::MAX));
        }
        loader
    }
}

/// `KEY=VALUE`.
fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("`{s}` is not KEY=VALUE")),
    }
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
        if let Some((rank, world)) = self.shard {
            l = l.shard(rank, world);
        }
        for (glob, dim) in &self.splits {
            l = l.split(glob.clone(), *dim);
        }
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
        self.remote.apply(l)
    }
}

/// Arguments of `load`.
#[derive(clap::Args)]
pub struct Args {
    /// A .safetensors file, an index JSON, a directory, or a Hugging Face cache folder; or an
    /// s3://, gs://, az:// or http(s):// URL of a file, an index or a prefix.
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
    /// Stream the tensors instead (each dropped once hashed or counted), with at most WINDOW
    /// bytes (e.g. 1G) in flight: what a framework's weight iterator does.
    #[arg(long, value_name = "WINDOW", value_parser = parse_size, conflicts_with = "trace")]
    pub stream: Option<u64>,
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

/// Parse `RANK/WORLD` (`1/4`).
fn parse_shard(s: &str) -> Result<(usize, usize), String> {
    let parsed = s.split_once('/').and_then(|(r, w)| Some((r.trim().parse().ok()?, w.trim().parse().ok()?)));
    match parsed {
        Some((rank, world)) if rank < world => Ok((rank, world)),
        _ => Err(format!("`{s}`: expected RANK/WORLD with RANK < WORLD, e.g. 0/2")),
    }
}

/// Parse `GLOB=DIM` (`*.q_proj.weight=0`); the last `=` separates them.
fn parse_split(s: &str) -> Result<(String, usize), String> {
    match s.rsplit_once('=').map(|(g, d)| (g, d.trim().parse::<usize>())) {
        Some((glob, Ok(dim))) if !glob.is_empty() => Ok((glob.to_string(), dim)),
        _ => Err(format!("`{s}`: expected GLOB=DIM, e.g. '*.q_proj.weight=0'")),
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

/// The most host memory a checksum reads a device tensor back into at once.
const CHECKSUM_PIECE_BYTES: usize = 8 << 20;

/// sha256 of a tensor's bytes where they landed: hashed in place in host memory, read back from
/// a device in pieces of [`CHECKSUM_PIECE_BYTES`].
pub fn tensor_sha256(t: &weightstream::TensorRef<'_>) -> weightstream::Result<String> {
    sha256_of(|f| t.for_each_chunk(CHECKSUM_PIECE_BYTES, f))
}

/// sha256 of the bytes that `each` hands over, piece by piece.
fn sha256_of(each: impl FnOnce(&mut dyn FnMut(&[u8])) -> weightstream::Result<()>) -> weightstream::Result<String> {
    let mut hash = Sha256::new();
    each(&mut |piece| hash.update(piece))?;
    Ok(hash.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Run `load`.
pub fn run(args: Args) -> weightstream::Result<()> {
    let mut loader = args.loader.loader().trace(args.trace.is_some());
    // A stream reports no progress (each tensor is its own): no bar that would never move.
    let bar = progress_bar(args.quiet || args.stream.is_some());
    if let Some(bar) = &bar {
        let bar = bar.clone();
        loader = loader.progress(Arc::new(move |p| {
            bar.set_length(p.bytes_total);
            bar.set_position(p.bytes_done);
        }));
    }
    if let Some(window) = args.stream {
        return stream(&loader, &args, window);
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

/// The `--json` report (DESIGN.md "CLI contract"); fields in alphabetical order, as they were
/// printed when this was a `serde_json::Value`.
#[derive(Serialize)]
struct JsonReport<'a> {
    bytes_loaded: u64,
    bytes_read: u64,
    device: String,
    direct: bool,
    gbps: f64,
    io: &'static str,
    peak_host_rss_bytes: Option<u64>,
    pinned: bool,
    seconds: f64,
    staging_bytes: u64,
    tensors: Vec<JsonTensor<'a>>,
}

#[derive(Serialize)]
struct JsonTensor<'a> {
    dtype: &'static str,
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    sha256: Option<String>,
    shape: &'a [u64],
}

fn report(model: &LoadedModel, checksum: bool, json: bool) -> weightstream::Result<()> {
    let s = model.stats();
    let rss = weightstream::peak_host_rss_bytes();
    // Every checksum before any output, so that a failed read-back prints only the error.
    let sha256: Vec<String> =
        if checksum { model.tensors().map(|t| tensor_sha256(&t)).collect::<Result<_, _>>()? } else { Vec::new() };
    if json {
        let report = JsonReport {
            bytes_loaded: s.bytes_loaded,
            bytes_read: s.bytes_read,
            device: s.device.to_string(),
            direct: s.direct,
            gbps: s.gbps(),
            io: s.io,
            peak_host_rss_bytes: rss,
            pinned: s.pinned,
            seconds: s.seconds,
            staging_bytes: s.staging_bytes,
            tensors: model
                .tensors()
                .enumerate()
                .map(|(i, t)| JsonTensor {
                    dtype: t.dtype().name(),
                    name: t.name(),
                    sha256: sha256.get(i).cloned(),
                    shape: t.shape(),
                })
                .collect(),
        };
        let mut out = std::io::BufWriter::new(std::io::stdout().lock());
        serde_json::to_writer(&mut out, &report)
            .map_err(std::io::Error::from)
            .and_then(|()| writeln!(out))
            .and_then(|()| out.flush())
            .map_err(crate::out::stdout_error)?;
    } else {
        outln!(
            "loaded {} tensors: {s}, peak host RSS {} MiB",
            model.len(),
            rss.map(|r| (r >> 20).to_string()).unwrap_or_else(|| "?".into()),
        )?;
        if checksum {
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            for (t, sha) in model.tensors().zip(&sha256) {
                writeln!(out, "{sha}  {}", escape_controls(t.name())).map_err(crate::out::stdout_error)?;
            }
            out.flush().map_err(crate::out::stdout_error)?;
        }
    }
    Ok(())
}

/// The `--stream --json` report.
#[derive(Serialize)]
struct JsonStreamReport {
    bytes_loaded: u64,
    bytes_read: u64,
    device: String,
    gbps: f64,
    peak_host_rss_bytes: Option<u64>,
    seconds: f64,
    stream_window_bytes: u64,
    tensors: Vec<JsonStreamedTensor>,
}

#[derive(Serialize)]
struct JsonStreamedTensor {
    dtype: &'static str,
    name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    sha256: Option<String>,
    shape: Vec<u64>,
}

/// `load --stream WINDOW`: take each tensor as it lands, hash it (`--checksum`), drop it.
fn stream(loader: &Loader, args: &Args, window: u64) -> weightstream::Result<()> {
    let started = std::time::Instant::now();
    let mut stream = loader.stream(&args.path, window)?;
    let mut tensors = Vec::new();
    let (mut bytes_loaded, mut device) = (0u64, loader.resolved_device());
    for t in stream.by_ref() {
        let t = t?;
        let sha256 = match args.checksum {
            true => Some(sha256_of(|f| t.for_each_chunk(CHECKSUM_PIECE_BYTES, f))?),
            false => None,
        };
        bytes_loaded += t.byte_len();
        device = t.device();
        tensors.push(JsonStreamedTensor {
            dtype: t.dtype().name(),
            name: t.name().to_string(),
            sha256,
            shape: t.shape().to_vec(),
        });
    }
    let seconds = started.elapsed().as_secs_f64();
    let gbps = if seconds > 0.0 { bytes_loaded as f64 / seconds / 1e9 } else { 0.0 };
    let report = JsonStreamReport {
        bytes_loaded,
        bytes_read: stream.bytes_read(),
        device: device.to_string(),
        gbps,
        peak_host_rss_bytes: weightstream::peak_host_rss_bytes(),
        seconds,
        stream_window_bytes: window,
        tensors,
    };
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let written = if args.json {
        serde_json::to_writer(&mut out, &report).map_err(std::io::Error::from).and_then(|()| writeln!(out))
    } else {
        let rss = report.peak_host_rss_bytes.map(|r| (r >> 20).to_string()).unwrap_or_else(|| "?".into());
        writeln!(
            out,
            "streamed {} tensors to {}: {:.3} GB in {:.3} s ({:.2} GB/s), window {} MiB, peak host RSS {rss} MiB",
            report.tensors.len(),
            report.device,
            bytes_loaded as f64 / 1e9,
            seconds,
            gbps,
            window >> 20
        )
        .and_then(|()| {
            report
                .tensors
                .iter()
                .filter_map(|t| Some((t.sha256.as_ref()?, &t.name)))
                .try_for_each(|(sha, name)| writeln!(out, "{sha}  {}", escape_controls(name)))
        })
    };
    written.and_then(|()| out.flush()).map_err(crate::out::stdout_error)
}
