//! Validate a checkpoint's headers and list its tensors, without reading tensor data.
//!
//! `cargo run --example inspect [PATH]`

use weightstream::format::{write_file, WriteTensor};
use weightstream::{Checkpoint, Dtype};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let path = match std::env::args().nth(1) {
        Some(p) => p.into(),
        None => {
            let p = dir.path().join("example.safetensors");
            write_file(&p, &[WriteTensor::new("w", Dtype::F16, vec![2, 3], &[0u8; 12])], &Default::default())?;
            p
        }
    };
    let ckpt = Checkpoint::open(&path)?;
    for f in &ckpt.files {
        println!("{}: {} tensors, header {} bytes", f.path.display(), f.header.tensors.len(), f.header.header_len);
        for t in &f.header.tensors {
            println!("  {:<40} {:<8} {:?} [{}, {})", t.name, t.dtype, t.shape, t.data_offsets.0, t.data_offsets.1);
        }
    }
    println!("{} bytes of tensor data", ckpt.total_bytes());
    Ok(())
}
