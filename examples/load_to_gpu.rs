//! Load a checkpoint to the GPU (falls back to host memory without one, and says so).
//!
//! `cargo run --release --example load_to_gpu [PATH]` (without PATH: a small generated file).

use weightstream::format::{write_file, WriteTensor};
use weightstream::{Device, Dtype, Loader};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let path = match std::env::args().nth(1) {
        Some(p) => p.into(),
        None => {
            let p = dir.path().join("example.safetensors");
            let w: Vec<u8> = (0..4096u32).flat_map(|i| half::bf16::from_f32(i as f32).to_le_bytes()).collect();
            write_file(&p, &[WriteTensor::new("layer.0.weight", Dtype::BF16, vec![64, 64], &w)], &Default::default())?;
            p
        }
    };
    let loader = Loader::new(); // device auto: cuda:0 if present, else cpu
    if loader.resolved_device() == Device::Cpu {
        println!("no CUDA device here: loading to host memory instead");
    }
    let model = loader.load(&path)?;
    for t in model.tensors() {
        match t.device_ptr() {
            Some(ptr) => {
                println!("{} {} {:?} at device pointer {ptr:#x} on {}", t.name(), t.dtype(), t.shape(), t.device())
            }
            None => println!("{} {} {:?} in host memory ({} bytes)", t.name(), t.dtype(), t.shape(), t.byte_len()),
        }
    }
    let s = model.stats();
    println!("{} bytes to {} in {:.4} s ({:.2} GB/s)", s.bytes_loaded, s.device, s.seconds, s.gbps());
    Ok(())
}
