//! Parsing the header of a 400,000-tensor file: ours (`parse_header`, header bytes + file
//! length) against the reference crate (`SafeTensors::read_metadata`, which wants the whole file
//! in one buffer). Both validate the same rules; both get the file already in memory.
//!
//! `cargo bench --bench header_parse`

use std::collections::BTreeMap;

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use weightstream::format::{header_json, parse_header};
use weightstream::Dtype;

const TENSORS: usize = 400_000;

/// A file of `TENSORS` small tensors with realistic names, mixed dtypes and shapes.
fn file_with_many_tensors() -> Vec<u8> {
    let dtypes = [Dtype::BF16, Dtype::F32, Dtype::F16, Dtype::I64, Dtype::U8];
    let entries: Vec<(String, Dtype, Vec<u64>, u64)> = (0..TENSORS)
        .map(|i| {
            let dtype = dtypes[i % dtypes.len()];
            let shape = vec![(i % 3 + 1) as u64, (i % 5 + 1) as u64];
            let len = dtype.bytes_for(shape.iter().product()).expect("small shape");
            let name = format!("model.layers.{}.block.{}.weight", i / 16, i % 16);
            (name, dtype, shape, len)
        })
        .collect();
    let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    let header = header_json(&entries, &metadata);
    let data_len: u64 = entries.iter().map(|e| e.3).sum();
    let mut file = Vec::with_capacity(8 + header.len() + data_len as usize);
    file.extend_from_slice(&(header.len() as u64).to_le_bytes());
    file.extend_from_slice(&header);
    file.resize(file.len() + data_len as usize, 0);
    file
}

fn bench(c: &mut Criterion) {
    let file = file_with_many_tensors();
    let header_len = u64::from_le_bytes(file[..8].try_into().expect("8 bytes")) as usize;
    let header = &file[8..8 + header_len];
    let file_len = file.len() as u64;
    // Same answer from both before timing anything.
    let ours = parse_header("bench.safetensors", header, file_len).expect("ours accepts");
    let (_, reference) = safetensors::SafeTensors::read_metadata(&file).expect("reference accepts");
    assert_eq!(ours.tensors.len(), TENSORS);
    assert_eq!(reference.tensors().len(), TENSORS);

    let mut group = c.benchmark_group(format!("header_{TENSORS}_tensors_{}MB", header_len / 1_000_000));
    group.sample_size(20).measurement_time(std::time::Duration::from_secs(15));
    group.bench_function("weightstream::parse_header", |b| {
        b.iter(|| parse_header("bench.safetensors", black_box(header), file_len).expect("valid"))
    });
    group.bench_function("safetensors_0.6::read_metadata", |b| {
        b.iter(|| safetensors::SafeTensors::read_metadata(black_box(&file)).expect("valid"))
    });
    group.bench_function("safetensors_0.8::read_metadata", |b| {
        b.iter(|| safetensors_08::SafeTensors::read_metadata(black_box(&file)).expect("valid"))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
