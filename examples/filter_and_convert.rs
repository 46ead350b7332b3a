//! Load only some tensors, converted to bf16 (on the GPU by a kernel, on the host with `half`).
//!
//! `cargo run --example filter_and_convert`

use weightstream::format::{write_file, WriteTensor};
use weightstream::{Device, Dtype, Loader};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("example.safetensors");
    let f32s: Vec<u8> = (0..1024).flat_map(|i| (i as f32 * 0.5).to_le_bytes()).collect();
    let ids: Vec<u8> = (0..256i64).flat_map(|i| i.to_le_bytes()).collect();
    write_file(
        &path,
        &[
            WriteTensor::new("model.layers.0.mlp.weight", Dtype::F32, vec![32, 32], &f32s),
            WriteTensor::new("model.layers.1.mlp.weight", Dtype::F32, vec![32, 32], &f32s),
            WriteTensor::new("model.position_ids", Dtype::I64, vec![256], &ids),
        ],
        &Default::default(),
    )?;
    let loader = Loader::new().only("model.layers.0.*").only("model.position_ids").dtype(Dtype::BF16);
    if loader.resolved_device() == Device::Cpu {
        println!("no CUDA device here: converting on the host instead");
    }
    let model = loader.load(&path)?;
    for t in model.tensors() {
        println!("{}: stored {} -> loaded {} ({} bytes)", t.name(), t.stored_dtype(), t.dtype(), t.byte_len());
    }
    let w = model.tensor("model.layers.0.mlp.weight").ok_or("missing")?.to_host_vec()?;
    let third = half::bf16::from_le_bytes([w[6], w[7]]);
    println!("element 3 = {third} (1.5 as bf16)");
    Ok(())
}
