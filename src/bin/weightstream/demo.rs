//! `weightstream demo`: write a demo checkpoint, load it (GPU if present, else host), verify it.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::flag;
use weightstream::bench::{self, BenchOptions, BenchStrategy};
use weightstream::format::{write_file, WriteTensor};
use weightstream::{CancelToken, Checkpoint, Device, Dtype, Loader};

use crate::Failure;

/// Arguments of `demo`.
#[derive(clap::Args)]
pub struct Args {
    /// Transformer layers in the demo model (each about 24 MiB of bf16).
    #[arg(long, default_value_t = 8)]
    pub layers: usize,
    /// Target device (default: a GPU if there is one, else host memory).
    #[arg(long, default_value = "auto")]
    pub device: Device,
}

/// Deterministic bf16 weights: small values around zero, different per tensor.
fn weights(seed: u64, elements: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(elements * 2);
    for _ in 0..elements {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let v = ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.05;
        out.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes());
    }
    out
}

/// (name, shape) of a small Llama-style model.
fn layout(layers: usize) -> Vec<(String, Vec<u64>)> {
    let (hidden, inter, vocab) = (1024u64, 2816u64, 32000u64);
    let mut v = vec![("model.embed_tokens.weight".to_string(), vec![vocab, hidden])];
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        v.push((format!("{p}.input_layernorm.weight"), vec![hidden]));
        for m in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            v.push((format!("{p}.self_attn.{m}.weight"), vec![hidden, hidden]));
        }
        v.push((format!("{p}.post_attention_layernorm.weight"), vec![hidden]));
        v.push((format!("{p}.mlp.gate_proj.weight"), vec![inter, hidden]));
        v.push((format!("{p}.mlp.up_proj.weight"), vec![inter, hidden]));
        v.push((format!("{p}.mlp.down_proj.weight"), vec![hidden, inter]));
    }
    v.push(("model.norm.weight".to_string(), vec![hidden]));
    v.push(("lm_head.weight".to_string(), vec![vocab, hidden]));
    v
}

/// SIGINT and SIGTERM, noted by a flag that the demo checks between its steps (and its load
/// through a [`CancelToken`]), so that it removes its temp checkpoint before it exits. A second
/// signal while it cleans up ends the process at once (signal-hook's conditional shutdown).
struct Interrupt {
    /// The number of the signal that arrived, 0 while none did.
    signal: Arc<AtomicUsize>,
}

impl Interrupt {
    fn install() -> weightstream::Result<Interrupt> {
        let signal = Arc::new(AtomicUsize::new(0));
        let armed = Arc::new(AtomicBool::new(false));
        for sig in [SIGINT, SIGTERM] {
            // The shutdown goes first: it fires only on a second signal, once `armed` is set.
            let registered = flag::register_conditional_shutdown(sig, 128 + sig, armed.clone())
                .and_then(|_| flag::register(sig, armed.clone()))
                .and_then(|_| flag::register_usize(sig, signal.clone(), sig as usize));
            registered.map_err(|e| weightstream::Error::Internal {
                what: format!("demo: cannot handle signal {sig}: {e}"),
            })?;
        }
        Ok(Interrupt { signal })
    }

    /// The signal that arrived, if one did.
    fn arrived(&self) -> Option<i32> {
        match self.signal.load(Ordering::SeqCst) {
            0 => None,
            sig => i32::try_from(sig).ok(),
        }
    }

    /// `Err(Stop::Signal)` once a signal arrived.
    fn check(&self) -> Result<(), Stop> {
        match self.arrived() {
            Some(sig) => Err(Stop::Signal(sig)),
            None => Ok(()),
        }
    }
}

/// Why the demo stopped early.
enum Stop {
    Failed(weightstream::Error),
    Signal(i32),
}

impl From<weightstream::Error> for Stop {
    fn from(e: weightstream::Error) -> Self {
        Stop::Failed(e)
    }
}

/// Run `demo`: everything happens in a temp dir of its own, removed however the demo ends
/// (success, error, SIGINT or SIGTERM; not SIGKILL, which no program can handle).
pub fn run(args: Args) -> Result<(), Failure> {
    let interrupt = Interrupt::install()?;
    let dir = tempfile::tempdir().map_err(|e| weightstream::Error::Io {
        file: std::env::temp_dir(),
        tensor: None,
        source: e,
    })?;
    let dir_path = dir.path().to_path_buf();
    let result = demo_in(&dir_path, &args, &interrupt);
    let removed = dir.close();
    // A signal that came during the last step still counts: the user asked us to stop.
    let result = match (result, interrupt.arrived()) {
        (Ok(()), Some(sig)) | (Err(Stop::Failed(weightstream::Error::Cancelled)), Some(sig)) => Err(Stop::Signal(sig)),
        (r, _) => r,
    };
    match (result, removed) {
        (Ok(()), Ok(())) => outln!("removed {}", dir_path.display()).map_err(Failure::from),
        (Ok(()), Err(source)) => Err(weightstream::Error::Io { file: dir_path, tensor: None, source }.into()),
        (Err(Stop::Failed(e)), _) => Err(e.into()),
        (Err(Stop::Signal(signal)), removed) => Err(Failure::Interrupted {
            signal,
            cleanup: match removed {
                Ok(()) => format!("removed {}", weightstream::text::path_for_display(&dir_path)),
                Err(e) => format!("could not remove {}: {e}", weightstream::text::path_for_display(&dir_path)),
            },
        }),
    }
}

fn demo_in(dir: &Path, args: &Args, interrupt: &Interrupt) -> Result<(), Stop> {
    let path = dir.join("demo.safetensors");
    let layout = layout(args.layers);
    let mut data: Vec<Vec<u8>> = Vec::with_capacity(layout.len());
    for (i, (_, s)) in layout.iter().enumerate() {
        interrupt.check()?;
        data.push(weights(i as u64 + 1, s.iter().product::<u64>() as usize));
    }
    let tensors: Vec<WriteTensor<'_>> =
        layout.iter().zip(&data).map(|((n, s), d)| WriteTensor::new(n.clone(), Dtype::BF16, s.clone(), d)).collect();
    let mut meta = std::collections::BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    let t0 = Instant::now();
    interrupt.check()?;
    write_file(&path, &tensors, &meta)?;
    interrupt.check()?;
    let ckpt = Checkpoint::open(&path)?;
    outln!(
        "wrote {} ({} tensors, {:.1} MiB bf16) in {:.2} s",
        path.display(),
        ckpt.tensor_count(),
        ckpt.total_bytes() as f64 / 1048576.0,
        t0.elapsed().as_secs_f64()
    )?;
    let cancel = CancelToken::new();
    let (signal, on_progress) = (interrupt.signal.clone(), cancel.clone());
    let loader = Loader::new().device(args.device).cancel_token(cancel).progress(Arc::new(move |_| {
        if signal.load(Ordering::SeqCst) != 0 {
            on_progress.cancel();
        }
    }));
    let device = loader.resolved_device();
    if device == Device::Cpu && args.device == Device::Auto {
        outln!("no CUDA device found ({}); loading to host memory", why_no_gpu())?;
    }
    interrupt.check()?;
    let model = loader.load(&path)?;
    let s = model.stats();
    outln!("loaded {} tensors: {s}", model.len())?;
    let mut checked = 0u64;
    for ((name, _), expect) in layout.iter().zip(&data) {
        interrupt.check()?;
        let t = model.tensor(name).ok_or_else(|| weightstream::Error::Internal {
            what: format!("demo: tensor `{name}` missing after load"),
        })?;
        if t.to_host_vec()? != *expect {
            return Err(
                weightstream::Error::Internal { what: format!("demo: tensor `{name}` differs after load") }.into()
            );
        }
        checked += expect.len() as u64;
    }
    outln!(
        "verified {} tensors byte for byte ({:.1} MiB read back from {})",
        layout.len(),
        checked as f64 / 1048576.0,
        s.device
    )?;
    interrupt.check()?;
    baseline(&ckpt, &loader)?;
    Ok(())
}

/// Timed loads of each side of the same-run comparison (each after one untimed warm-up).
const BASELINE_RUNS: usize = 3;

/// The reference beside the demo's figure: the same load against the plain read-then-copy a
/// user would otherwise write (`weightstream::bench`'s `read-all` baseline: `std::fs::read` of
/// the file, then a copy of each tensor to the device, or into a Vec of its own on the host), in
/// this run, each timed the same way.
fn baseline(ckpt: &Checkpoint, loader: &Loader) -> Result<(), Stop> {
    let opts = BenchOptions { runs: BASELINE_RUNS, ..Default::default() };
    let report = bench::run(ckpt, loader, &[BenchStrategy::Pipeline, BenchStrategy::ReadAll], &opts)?;
    let (ours, plain) = match report.rows.as_slice() {
        [ours, plain] => (ours, plain),
        _ => return Err(weightstream::Error::Internal { what: "demo: the comparison lost a row".into() }.into()),
    };
    let copy = match report.device {
        Device::Cuda(_) => "a pageable host-to-device copy per tensor",
        Device::Null => "a copy per tensor into a reused buffer",
        _ => "a copy per tensor into a Vec",
    };
    outln!(
        "baseline, same run, medians of {BASELINE_RUNS} after a warm-up: std::fs::read, then {copy}: {:.3} s \
         ({:.2} GB/s); weightstream {:.3} s ({:.2} GB/s): {:.2}x",
        plain.median(),
        plain.gbps(),
        ours.median(),
        ours.gbps(),
        plain.median() / ours.median()
    )?;
    Ok(())
}

fn why_no_gpu() -> String {
    #[cfg(feature = "cuda")]
    {
        match weightstream::cuda_device_count() {
            Ok(0) => "driver present, no device".into(),
            Ok(n) => format!("{n} devices"),
            Err(e) => e.to_string(),
        }
    }
    #[cfg(not(feature = "cuda"))]
    {
        "built without the `cuda` feature".into()
    }
}
