//! `weightstream demo`: write a demo checkpoint, load it (GPU if present, else host), verify it.

use std::time::Instant;

use weightstream::format::{write_file, WriteTensor};
use weightstream::{Checkpoint, Device, Dtype, Loader};

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

/// Run `demo`.
pub fn run(args: Args) -> weightstream::Result<()> {
    let dir = tempfile::tempdir().map_err(|e| weightstream::Error::Io {
        file: std::env::temp_dir(),
        tensor: None,
        source: e,
    })?;
    let path = dir.path().join("demo.safetensors");
    let layout = layout(args.layers);
    let data: Vec<Vec<u8>> = layout
        .iter()
        .enumerate()
        .map(|(i, (_, s))| weights(i as u64 + 1, s.iter().product::<u64>() as usize))
        .collect();
    let tensors: Vec<WriteTensor<'_>> =
        layout.iter().zip(&data).map(|((n, s), d)| WriteTensor::new(n.clone(), Dtype::BF16, s.clone(), d)).collect();
    let mut meta = std::collections::BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    let t0 = Instant::now();
    write_file(&path, &tensors, &meta)?;
    let ckpt = Checkpoint::open(&path)?;
    println!(
        "wrote {} ({} tensors, {:.1} MiB bf16) in {:.2} s",
        path.display(),
        ckpt.tensor_count(),
        ckpt.total_bytes() as f64 / 1048576.0,
        t0.elapsed().as_secs_f64()
    );
    let loader = Loader::new().device(args.device);
    let device = loader.resolved_device();
    if device == Device::Cpu && args.device == Device::Auto {
        println!("no CUDA device found ({}); loading to host memory", why_no_gpu());
    }
    let model = loader.load(&path)?;
    let s = model.stats();
    println!("loaded {} tensors: {s}", model.len());
    let mut checked = 0u64;
    for ((name, _), expect) in layout.iter().zip(&data) {
        let t = model
            .tensor(name)
            .ok_or_else(|| weightstream::Error::Usage { what: format!("demo: tensor `{name}` missing after load") })?;
        if t.to_host_vec()? != *expect {
            return Err(weightstream::Error::Usage { what: format!("demo: tensor `{name}` differs after load") });
        }
        checked += expect.len() as u64;
    }
    println!(
        "verified {} tensors byte for byte ({:.1} MiB read back from {})",
        layout.len(),
        checked as f64 / 1048576.0,
        s.device
    );
    drop(model);
    dir.close().ok();
    println!("removed {}", path.display());
    Ok(())
}

fn why_no_gpu() -> String {
    #[cfg(feature = "cuda")]
    {
        match weightstream::sink::cuda::device_count() {
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
