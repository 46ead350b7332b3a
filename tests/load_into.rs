//! `Loader::load_into`: tensors land in caller-owned buffers of their loaded size, nothing else
//! is allocated beyond the ring, and every destination the load cannot fill is an error naming
//! the tensor.

mod common;

use common::pattern;

use std::path::{Path, PathBuf};

use weightstream::format::{write_file, WriteTensor};
use weightstream::{Destination, Device, DevicePlace, Dtype, Error, ErrorKind, Loader};

fn write(dir: &Path) -> PathBuf {
    let specs: Vec<(&str, Dtype, Vec<u64>)> = vec![
        ("a", Dtype::F32, vec![7]),
        ("b", Dtype::BF16, vec![40, 24]),
        ("c", Dtype::U8, vec![3 << 20]),
        ("d", Dtype::F16, vec![0]),
        ("e", Dtype::F32, vec![16, 6]),
    ];
    let data: Vec<Vec<u8>> = specs
        .iter()
        .enumerate()
        .map(|(i, (_, d, s))| {
            let n = s.iter().product::<u64>();
            match d {
                Dtype::F32 => (0..n).flat_map(|k| (k as f32 * 0.25 - 3.0).to_le_bytes()).collect(),
                _ => pattern(i as u64 + 2, d.bytes_for(n).unwrap() as usize),
            }
        })
        .collect();
    let ws: Vec<_> = specs.iter().zip(&data).map(|((n, d, s), b)| WriteTensor::new(*n, *d, s.clone(), b)).collect();
    let path = dir.join("m.safetensors");
    write_file(&path, &ws, &Default::default()).unwrap();
    path
}

/// Load `names` of `path` with `loader` into fresh buffers sized from a plain load with the same
/// options, and compare with that load.
fn check_into(loader: &Loader, path: &Path, names: &[&str]) {
    let want = names.iter().fold(loader.clone(), |l, n| l.only(*n)).load(path).unwrap();
    // `describe` tells the loaded dtype, shape and size without loading.
    let described = names.iter().fold(loader.clone(), |l, n| l.only(*n)).describe(path).unwrap();
    assert_eq!(described.len(), want.len());
    for (d, t) in described.iter().zip(want.tensors()) {
        assert_eq!((d.name.as_str(), d.dtype, d.stored_dtype), (t.name(), t.dtype(), t.stored_dtype()));
        assert_eq!((d.shape.as_slice(), d.byte_len), (t.shape(), t.byte_len()), "{} with {loader:?}", d.name);
    }
    let mut bufs: Vec<Vec<u8>> =
        names.iter().map(|n| vec![0xAAu8; want.tensor(n).unwrap().byte_len() as usize]).collect();
    let stats = loader
        .load_into(path, names.iter().zip(bufs.iter_mut()).map(|(n, b)| (n.to_string(), Destination::Host(&mut b[..]))))
        .unwrap_or_else(|e| panic!("{loader:?}: {e}"));
    for (n, b) in names.iter().zip(&bufs) {
        assert!(*b == want.tensor(n).unwrap().to_host_vec().unwrap(), "{n} with {loader:?}");
    }
    assert_eq!(stats.bytes_loaded, want.stats().bytes_loaded);
    // The same reads as a load of the same tensors with the same options (in place, or through
    // the ring where a load would use it), no more.
    assert_eq!(stats.bytes_read, want.stats().bytes_read, "only the destinations' tensors are read");
    assert_eq!(stats.io, want.stats().io, "the same engine as a load");
}

#[test]
fn tensors_land_in_caller_buffers_with_conversion_and_shards() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path());
    let base = Loader::new().device(Device::Cpu).staging_count(2).staging_size(256 << 10);
    for names in [&["a", "b", "c", "d", "e"][..], &["b"], &["e", "a"]] {
        check_into(&base, &path, names);
        check_into(&base.clone().dtype(Dtype::F16), &path, names);
        check_into(&base.clone().shard(1, 2).split("b", 1).split("e", 0).split("c", 0), &path, names);
        check_into(&base.clone().shard(0, 4).split("*", 0).dtype(Dtype::BF16), &path, &["b", "c", "e"]);
        // Through the ring (O_DIRECT cannot read in place), plain and converting.
        check_into(&base.clone().direct(true), &path, names);
        check_into(&base.clone().direct(true).dtype(Dtype::F16).shard(1, 2).split("b", 1), &path, names);
    }
}

#[test]
fn destinations_the_load_cannot_fill_are_errors_naming_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path());
    let cpu = Loader::new().device(Device::Cpu);
    let mut small = vec![0u8; 27];
    let mut right = vec![0u8; 28];
    let expect_bad = |r: weightstream::Result<weightstream::LoadStats>, tensor: &str, words: &str| {
        let err = r.unwrap_err();
        assert!(matches!(&err, Error::BadDestination { tensor: t, .. } if t == tensor), "{err:?}");
        assert_eq!(err.kind(), ErrorKind::Usage);
        assert!(err.to_string().contains(words), "{err}");
    };
    expect_bad(cpu.load_into(&path, [("a".into(), Destination::Host(&mut small))]), "a", "27 bytes");
    expect_bad(cpu.load_into(&path, [("zz".into(), Destination::Host(&mut right))]), "zz", "no such tensor");
    expect_bad(cpu.clone().only("b").load_into(&path, [("a".into(), Destination::Host(&mut right))]), "a", "--only");
    // SAFETY: these places are never written: each call below fails before any read.
    let (p1, p2) = unsafe { (DevicePlace::new(0x1000, 28, 0), DevicePlace::new(0x1010, 1920, 0)) };
    expect_bad(cpu.load_into(&path, [("a".into(), Destination::Device(p1))]), "a", "cuda:0");
    let gpu = Loader::new().device(Device::Cuda(0));
    expect_bad(gpu.load_into(&path, [("a".into(), Destination::Host(&mut right))]), "a", "host destination");
    let overlapping = [("a".to_string(), Destination::Device(p1)), ("b".to_string(), Destination::Device(p2))];
    let err = gpu.load_into(&path, overlapping).unwrap_err();
    assert!(matches!(&err, Error::BadDestination { .. }) && err.to_string().contains("overlaps"), "{err}");
    let err = Loader::new().device(Device::Null).load_into(&path, [("a".into(), Destination::Host(&mut right))]);
    assert_eq!(err.unwrap_err().kind(), ErrorKind::Usage);
}

fn rss_anon() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s.lines().find(|l| l.starts_with("RssAnon:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

#[test]
fn nothing_but_the_ring_is_allocated() {
    // 256 MiB loaded into buffers the caller already holds: the process grows by the readers
    // (and the ring where one is used: 8 x 4 MiB), not by another copy of the tensor.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.safetensors");
    let data = pattern(4, 256 << 20);
    write_file(&path, &[WriteTensor::new("w", Dtype::U8, vec![data.len() as u64], &data)], &Default::default())
        .unwrap();
    drop(data);
    let mut buf = vec![1u8; 256 << 20]; // touched: resident before the load
    let before = rss_anon();
    Loader::new().device(Device::Cpu).load_into(&path, [("w".into(), Destination::Host(&mut buf))]).unwrap();
    let grew = rss_anon().saturating_sub(before);
    assert!(grew < (32 << 20) + (64 << 20), "RssAnon grew by {grew} bytes");
    assert_eq!(buf[12345], pattern(4, 12346)[12345]);
}
