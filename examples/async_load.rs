//! Load on tokio without blocking its workers (the load runs on the blocking pool).
//!
//! `cargo run --example async_load`

use weightstream::format::{write_file, WriteTensor};
use weightstream::{Device, Dtype, Loader};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("example.safetensors");
    let data = vec![7u8; 1 << 20];
    write_file(&path, &[WriteTensor::new("embed", Dtype::U8, vec![1 << 20], &data)], &Default::default())?;
    let loader = Loader::new();
    if loader.resolved_device() == Device::Cpu {
        println!("no CUDA device here: loading to host memory instead");
    }
    let ticker = tokio::spawn(async { "the runtime kept running during the load" });
    let model = loader.load_async(&path).await?;
    println!("{}; loaded {} tensor(s) to {}", ticker.await?, model.len(), model.device());
    Ok(())
}
