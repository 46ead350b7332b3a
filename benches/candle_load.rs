//! Time to a ready candle model: weightstream's backend against candle's own mmap loader
//! (`VarBuilder::from_mmaped_safetensors`), same files, same run, alternating in rounds.
//!
//! `cargo bench --features candle --bench candle_load`
//! - MiniLM: all-MiniLM-L6-v2 from `WEIGHTSTREAM_MINILM_DIR` (skipped without it);
//! - a synthetic BERT-shaped f32 checkpoint of about 2 GiB (hidden 1024, 40 layers) written by
//!   our writer into `WS_BENCH_DIR` (default: a temp dir, removed after).
//!
//! "Ready" is `BertModel::load` returned: every weight is in candle's memory either way (on cpu
//! candle's mmap backend copies each tensor into its own `Vec` when the model asks for it, so no
//! page is left to fault in later). Warm page cache: one untimed round of each first.

use std::path::Path;
use std::time::Instant;

use candle_core::Device;
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config, DTYPE};
use weightstream::format::{write_file, WriteTensor};
use weightstream::{Dtype, Loader};

fn config(dir: &Path) -> Config {
    serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap()
}

fn ready_weightstream(dir: &Path, cfg: &Config) -> BertModel {
    let vb =
        weightstream::candle::var_builder(&Loader::new(), dir.join("model.safetensors"), DTYPE, &Device::Cpu).unwrap();
    BertModel::load(vb, cfg).unwrap()
}

fn ready_mmap(dir: &Path, cfg: &Config) -> BertModel {
    // SAFETY: the benchmark's files are not modified while it runs.
    let vb =
        unsafe { VarBuilder::from_mmaped_safetensors(&[dir.join("model.safetensors")], DTYPE, &Device::Cpu).unwrap() };
    BertModel::load(vb, cfg).unwrap()
}

/// A BERT-shaped checkpoint (bert-large dims, `layers` layers, f32) and its config.json.
fn synthetic_bert(dir: &Path, layers: usize) -> u64 {
    let (h, ff, vocab, pos) = (1024u64, 4096u64, 30522u64, 512u64);
    let big: Vec<u8> = (0..(vocab * h * 4) as u32).map(|i| ((i.wrapping_mul(2654435761) >> 24) as u8) & 0x3c).collect();
    let mut shapes: Vec<(String, Vec<u64>)> = vec![
        ("embeddings.word_embeddings.weight".into(), vec![vocab, h]),
        ("embeddings.position_embeddings.weight".into(), vec![pos, h]),
        ("embeddings.token_type_embeddings.weight".into(), vec![2, h]),
        ("embeddings.LayerNorm.weight".into(), vec![h]),
        ("embeddings.LayerNorm.bias".into(), vec![h]),
    ];
    for i in 0..layers {
        let l = format!("encoder.layer.{i}");
        for (name, out, inp) in [
            ("attention.self.query", h, h),
            ("attention.self.key", h, h),
            ("attention.self.value", h, h),
            ("attention.output.dense", h, h),
            ("intermediate.dense", ff, h),
            ("output.dense", h, ff),
        ] {
            shapes.push((format!("{l}.{name}.weight"), vec![out, inp]));
            shapes.push((format!("{l}.{name}.bias"), vec![out]));
        }
        for norm in ["attention.output.LayerNorm", "output.LayerNorm"] {
            shapes.push((format!("{l}.{norm}.weight"), vec![h]));
            shapes.push((format!("{l}.{norm}.bias"), vec![h]));
        }
    }
    let tensors: Vec<WriteTensor> = shapes
        .iter()
        .map(|(n, s)| {
            WriteTensor::new(n.clone(), Dtype::F32, s.clone(), &big[..(s.iter().product::<u64>() * 4) as usize])
        })
        .collect();
    write_file(dir.join("model.safetensors"), &tensors, &Default::default()).unwrap();
    let cfg = serde_json::json!({
        "vocab_size": vocab, "hidden_size": h, "num_hidden_layers": layers, "num_attention_heads": 16,
        "intermediate_size": ff, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
        "max_position_embeddings": pos, "type_vocab_size": 2, "initializer_range": 0.02,
        "layer_norm_eps": 1e-12, "pad_token_id": 0, "model_type": "bert"
    });
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    std::fs::metadata(dir.join("model.safetensors")).unwrap().len()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Alternate the two loaders for `rounds` rounds after one untimed round each; print medians.
fn compare(label: &str, dir: &Path, rounds: usize) {
    let cfg = config(dir);
    let bytes = std::fs::metadata(dir.join("model.safetensors")).unwrap().len();
    drop((ready_weightstream(dir, &cfg), ready_mmap(dir, &cfg)));
    let (mut ws, mut mm) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        // Each model is dropped after its time is taken (freeing 2 GiB is not loading it).
        let t = Instant::now();
        let model = std::hint::black_box(ready_weightstream(dir, &cfg));
        ws.push(t.elapsed().as_secs_f64());
        drop(model);
        let t = Instant::now();
        let model = std::hint::black_box(ready_mmap(dir, &cfg));
        mm.push(t.elapsed().as_secs_f64());
        drop(model);
    }
    let (w, m) = (median(ws.clone()), median(mm.clone()));
    println!(
        "{label} ({:.1} MiB): weightstream {:.1} ms (min {:.1}, max {:.1}), candle mmap {:.1} ms (min {:.1}, max {:.1}), \
         candle/weightstream {:.2}x, medians of {rounds}",
        bytes as f64 / (1u64 << 20) as f64,
        w * 1e3,
        ws.iter().cloned().fold(f64::MAX, f64::min) * 1e3,
        ws.iter().cloned().fold(0.0, f64::max) * 1e3,
        m * 1e3,
        mm.iter().cloned().fold(f64::MAX, f64::min) * 1e3,
        mm.iter().cloned().fold(0.0, f64::max) * 1e3,
        m / w,
    );
}

fn main() {
    match std::env::var_os("WEIGHTSTREAM_MINILM_DIR") {
        Some(d) => compare("all-MiniLM-L6-v2", Path::new(&d), 15),
        None => println!("MiniLM: SKIPPED (set WEIGHTSTREAM_MINILM_DIR)"),
    }
    let tmp;
    let dir = match std::env::var_os("WS_BENCH_DIR") {
        Some(d) => std::path::PathBuf::from(d),
        None => {
            tmp = tempfile::tempdir().unwrap();
            tmp.path().to_path_buf()
        }
    };
    std::fs::create_dir_all(&dir).unwrap();
    synthetic_bert(&dir, 40);
    compare("synthetic BERT, 40 layers, f32", &dir, 7);
}
