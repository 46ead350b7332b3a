//! The host pipeline against the reference Rust `safetensors` crate, same file, same run.
//!
//! `cargo bench --bench pipeline` (file size: WS_BENCH_MIB, default 2048; warm page cache).
//! - cpu target: ours vs the reference crate's way (mmap, deserialize, one owned Vec per tensor);
//! - null target: our read pipeline vs a plain 8 MiB read loop (what `dd bs=8M` does).

use std::io::Read;
use std::path::{Path, PathBuf};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use weightstream::format::{write_file, WriteTensor};
use weightstream::{Device, Dtype, Loader};

fn checkpoint(dir: &Path) -> (PathBuf, u64) {
    let mib: u64 = std::env::var("WS_BENCH_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(2048);
    let path = dir.join("bench.safetensors");
    // 32 MiB bf16 matrices and a small norm per layer, like a transformer's weights.
    let big: Vec<u8> = (0..32u32 << 20).map(|i| (i.wrapping_mul(2654435761) >> 24) as u8).collect();
    let small = vec![1u8; 8192];
    let mut tensors = Vec::new();
    let mut total = 0;
    let mut i = 0;
    while total < mib << 20 {
        tensors.push(WriteTensor::new(format!("layers.{i}.norm"), Dtype::BF16, vec![4096], &small));
        tensors.push(WriteTensor::new(format!("layers.{i}.weight"), Dtype::BF16, vec![4096, 4096], &big));
        total += (big.len() + small.len()) as u64;
        i += 1;
    }
    write_file(&path, &tensors, &Default::default()).unwrap();
    (path, total)
}

fn reference_crate_to_vecs(path: &Path) -> usize {
    let f = std::fs::File::open(path).unwrap();
    // SAFETY: a file this benchmark wrote and does not modify.
    let map = unsafe { memmap2::Mmap::map(&f).unwrap() };
    let st = safetensors::SafeTensors::deserialize(&map).unwrap();
    let owned: Vec<Vec<u8>> = st.tensors().into_iter().map(|(_, v)| v.data().to_vec()).collect();
    owned.len()
}

fn read_loop(path: &Path) -> u64 {
    let mut f = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; 8 << 20];
    let mut n = 0;
    loop {
        let r = f.read(&mut buf).unwrap();
        if r == 0 {
            return n;
        }
        n += r as u64;
    }
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let (path, total) = checkpoint(dir.path());
    let _ = read_loop(&path); // warm the page cache
    let mut g = c.benchmark_group("load_to_cpu");
    g.sample_size(10).throughput(Throughput::Bytes(total));
    let ours = Loader::new().device(Device::Cpu);
    g.bench_function("weightstream", |b| b.iter(|| ours.load(&path).unwrap().len()));
    g.bench_function("safetensors_crate_mmap_to_vec", |b| b.iter(|| reference_crate_to_vecs(&path)));
    // Same-size conversion (BF16 -> F16), so the cost of converting is what differs.
    let conv = Loader::new().device(Device::Cpu).dtype(Dtype::F16);
    g.bench_function("weightstream_bf16_to_f16", |b| b.iter(|| conv.load(&path).unwrap().len()));
    g.finish();
    let mut g = c.benchmark_group("read_only");
    g.sample_size(10).throughput(Throughput::Bytes(total));
    let null = Loader::new().device(Device::Null);
    g.bench_function("weightstream_null", |b| b.iter(|| null.load(&path).unwrap().stats().bytes_read));
    g.bench_function("read_loop_8MiB", |b| b.iter(|| read_loop(&path)));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
