//! `weightstream bench PATH`: the same checkpoint loaded by several strategies, in one run
//! (`weightstream::bench` does the work; this prints it).

use std::path::PathBuf;

use weightstream::bench::{self, BenchOptions, BenchStrategy};
use weightstream::Result;

use crate::load::LoaderArgs;

/// Arguments of `bench`.
#[derive(clap::Args)]
pub struct Args {
    /// A .safetensors file, an index JSON, a directory, or a Hugging Face cache folder.
    pub path: PathBuf,
    #[command(flatten)]
    pub loader: LoaderArgs,
    /// Strategies to compare (repeatable): pipeline, pipeline-uring, pipeline-pread,
    /// pipeline-direct, pipeline-zero-copy (experimental, CUDA), mmap-copy, read-all. Default:
    /// pipeline, mmap-copy, read-all.
    #[arg(long = "strategy")]
    pub strategies: Vec<BenchStrategy>,
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

/// Run `bench`.
pub fn run(args: Args) -> Result<()> {
    let loader = args.loader.loader();
    let ckpt = loader.open(&args.path)?;
    let remote = ckpt.local_files("a baseline").is_err();
    let strategies = if args.strategies.is_empty() && remote {
        vec![BenchStrategy::Pipeline]
    } else if args.strategies.is_empty() {
        vec![BenchStrategy::Pipeline, BenchStrategy::MmapCopy, BenchStrategy::ReadAll]
    } else {
        args.strategies.clone()
    };
    let opts = BenchOptions {
        runs: args.runs,
        cold: args.cold,
        trace: args.trace.clone(),
        child_exe: std::env::current_exe().ok(),
    };
    let report = bench::run(&ckpt, &loader, &strategies, &opts)?;
    let fastest = report.fastest_baseline();
    let ratio = |r: &bench::BenchRow| fastest.map(|f| f / r.median()).filter(|x| x.is_finite());
    if args.json {
        let results: Vec<_> = report
            .rows
            .iter()
            .map(|r| {
                serde_json::json!({
                    "strategy": r.strategy.name(), "baseline": r.strategy.is_baseline(), "runs": r.seconds.len(),
                    "min_s": r.min(), "median_s": r.median(), "max_s": r.max(), "bytes": r.bytes, "gbps": r.gbps(),
                    "speedup_vs_fastest_baseline": ratio(r), "resident_after_evict": r.resident_after_evict,
                })
            })
            .collect();
        let doc = serde_json::json!({
            "path": args.path, "device": report.device.to_string(), "cold": args.cold,
            "bytes": report.bytes, "results": results,
        });
        outln!("{doc}")?;
        return Ok(());
    }
    outln!(
        "{} on {} ({:.1} MiB, {}, {} runs each, medians)",
        args.path.display(),
        report.device,
        report.bytes as f64 / 1048576.0,
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
    for r in &report.rows {
        outln!(
            "{:<18} {:>9.4} {:>9.4} {:>9.4} {:>9.2} {:>12}",
            r.strategy.name(),
            r.min(),
            r.median(),
            r.max(),
            r.gbps(),
            ratio(r).map(|x| format!("{x:.2}x")).unwrap_or_else(|| "-".into()),
        )?;
    }
    for r in &report.rows {
        if let Some(res) = r.resident_after_evict.filter(|&res| res > 0.01) {
            outln!(
                "warning: {}: {:.0}% of the file stayed in the page cache after eviction (runs were not fully cold)",
                r.strategy.name(),
                res * 100.0
            )?;
        }
    }
    Ok(())
}
