//! The CUDA target on a real GPU. Without a driver or a device every test prints one line
//! saying so and returns.

#![cfg(feature = "cuda")]

mod common;

use common::{file_tensors, pattern, weightstream_bin};

use std::path::{Path, PathBuf};

use weightstream::format::{write_file, WriteTensor};
use weightstream::sink::cuda::{device_count, CudaDevice, DeviceArena};
use weightstream::{Device, Dtype, Error, ErrorKind, Loader};

/// GPU tests run one at a time: the out-of-memory test compares free device memory before and
/// after, which a concurrent test's arena would disturb.
static GPU: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn gpu() -> Option<std::sync::MutexGuard<'static, ()>> {
    let guard = GPU.lock().unwrap_or_else(|p| p.into_inner());
    common::cuda_device_present().then_some(guard)
}

fn write_mixed(dir: &Path) -> PathBuf {
    let specs: Vec<(String, Dtype, Vec<u64>)> = vec![
        ("a.bias".into(), Dtype::F32, vec![7]),
        ("a.weight".into(), Dtype::BF16, vec![333, 129]),
        ("b.empty".into(), Dtype::F16, vec![0, 4]),
        ("c.big".into(), Dtype::U8, vec![5 << 20]),
        ("d.f32".into(), Dtype::F32, vec![1000, 3]),
        ("e.f64".into(), Dtype::F64, vec![1025]),
    ];
    let data: Vec<Vec<u8>> = specs
        .iter()
        .enumerate()
        .map(|(i, (_, d, s))| {
            let n = s.iter().product::<u64>() as usize;
            match d {
                // Real floats, so conversions have meaningful values.
                Dtype::F32 => (0..n).flat_map(|k| ((k as f32 - 500.0) * 0.37).to_le_bytes()).collect(),
                Dtype::F64 => (0..n).flat_map(|k| ((k as f64) * 1e-3 - 0.4).to_le_bytes()).collect(),
                _ => pattern(i as u64 + 1, d.bytes_for(n as u64).unwrap() as usize),
            }
        })
        .collect();
    let tensors: Vec<_> =
        specs.iter().zip(&data).map(|((n, d, s), b)| WriteTensor::new(n.clone(), *d, s.clone(), b)).collect();
    let path = dir.join("mixed.safetensors");
    write_file(&path, &tensors, &Default::default()).unwrap();
    path
}

fn check_same(loader: &Loader, path: &Path) {
    let expect = file_tensors(path);
    let m = loader.load(path).unwrap_or_else(|e| panic!("{loader:?}: {e}"));
    assert_eq!(m.device(), Device::Cuda(0));
    assert!(m.stats().pinned);
    for (name, bytes) in &expect {
        let t = m.tensor(name).unwrap();
        assert!(t.device_ptr().is_some());
        assert_eq!(t.device_ordinal(), Some(0));
        assert_eq!(&t.to_host_vec().unwrap(), bytes, "{name}");
    }
}

#[test]
fn every_tensor_lands_byte_for_byte_with_rings_smaller_than_a_tensor() {
    let Some(_gpu) = gpu() else { return };
    let dir = tempfile::tempdir().unwrap();
    let path = write_mixed(dir.path());
    for (count, size, streams) in [(4, 16 << 20, 2), (2, 1 << 20, 1), (3, 256 << 10, 3)] {
        let loader = Loader::new().device(Device::Cuda(0)).staging_count(count).staging_size(size).streams(streams);
        check_same(&loader, &path);
        // Ring reuse: the same loader, several loads.
        check_same(&loader, &path);
        check_same(&loader.clone().io(weightstream::io::IoKind::Pread), &path);
        check_same(&loader.clone().direct(true), &path);
    }
}

#[test]
fn python_written_files_and_sharded_model_on_the_gpu() {
    let Some(_gpu) = gpu() else { return };
    let Some(dir) = common::python_data_dir() else { return };
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|e| e == "safetensors") {
            check_same(&Loader::new().device(Device::Cuda(0)), &p);
            n += 1;
        } else if p.is_dir() {
            let m = Loader::new().device(Device::Cuda(0)).load(&p).unwrap();
            let cpu = Loader::new().device(Device::Cpu).load(&p).unwrap();
            assert_eq!(m.len(), cpu.len());
            for t in cpu.tensors() {
                assert_eq!(m.tensor(t.name()).unwrap().to_host_vec().unwrap(), t.to_host_vec().unwrap());
            }
            n += 1;
        }
    }
    assert!(n >= 3);
}

#[test]
fn filtered_and_converted_loads_match_the_cpu_target() {
    let Some(_gpu) = gpu() else { return };
    let dir = tempfile::tempdir().unwrap();
    let path = write_mixed(dir.path());
    for dtype in [Dtype::BF16, Dtype::F16, Dtype::F32] {
        for ring in [16 << 20, 256 << 10] {
            let g = Loader::new()
                .device(Device::Cuda(0))
                .dtype(dtype)
                .staging_size(ring)
                .staging_count(3)
                .load(&path)
                .unwrap();
            let c = Loader::new().device(Device::Cpu).dtype(dtype).load(&path).unwrap();
            for t in c.tensors() {
                let d = g.tensor(t.name()).unwrap();
                assert_eq!(d.dtype(), t.dtype());
                assert_eq!(d.to_host_vec().unwrap(), t.to_host_vec().unwrap(), "{} as {dtype}", t.name());
            }
        }
    }
    // One loader, several converting loads: the kernels module is loaded once and reused.
    let loader = Loader::new().device(Device::Cuda(0)).dtype(Dtype::BF16);
    let cpu = Loader::new().device(Device::Cpu).dtype(Dtype::BF16).load(&path).unwrap();
    for _ in 0..3 {
        let g = loader.load(&path).unwrap();
        for t in cpu.tensors() {
            assert_eq!(g.tensor(t.name()).unwrap().to_host_vec().unwrap(), t.to_host_vec().unwrap());
        }
    }
    let g = Loader::new().device(Device::Cuda(0)).only("a.*").load(&path).unwrap();
    assert_eq!(g.len(), 2);
}

#[test]
fn tensors_borrow_as_cudarc_slices() {
    let Some(_gpu) = gpu() else { return };
    let dir = tempfile::tempdir().unwrap();
    let path = write_mixed(dir.path());
    let m = Loader::new().device(Device::Cuda(0)).load(&path).unwrap();
    let ctx = cudarc::driver::CudaContext::new(0).unwrap();
    let stream = ctx.default_stream();
    for (name, bytes) in file_tensors(&path) {
        let t = m.tensor(&name).unwrap();
        let back = t.with_cudarc_slice::<u8, _>(&stream, |s| stream.clone_dtoh(s)).unwrap().unwrap();
        assert_eq!(back, bytes, "{name}");
    }
    // A length that is not a whole number of elements is an error, not a bad slice.
    assert!(m.tensor("a.bias").unwrap().with_cudarc_slice::<f64, _>(&stream, |_| ()).is_err());
    // The arena is still ours after the borrows: read it again.
    assert_eq!(m.tensor("c.big").unwrap().to_host_vec().unwrap().len(), 5 << 20);
}

#[test]
fn missing_ordinal_is_a_clear_error() {
    let Some(_gpu) = gpu() else { return };
    let dir = tempfile::tempdir().unwrap();
    let path = write_mixed(dir.path());
    let count = device_count().unwrap();
    let err = Loader::new().device(Device::Cuda(7 + count)).load(&path).unwrap_err();
    assert!(matches!(err, Error::NoCudaDevice { .. }), "{err}");
}

#[test]
fn device_out_of_memory_is_typed_and_frees_everything() {
    let Some(_gpu) = gpu() else { return };
    let dev = CudaDevice::open(0).unwrap();
    let (free0, total) = dev.mem_info().unwrap();
    let err = DeviceArena::alloc(&dev, total * 2).unwrap_err();
    assert!(matches!(err, Error::DeviceOutOfMemory { .. }), "{err}");
    // A sparse file whose header is valid but whose tensor is larger than the device.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("huge.safetensors");
    let elems = (total as u64) * 2;
    let header = weightstream::format::header_json(&[("w".into(), Dtype::U8, vec![elems], elems)], &Default::default());
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&header);
    std::fs::write(&path, &bytes).unwrap();
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(bytes.len() as u64 + elems).unwrap();
    let loader = Loader::new().device(Device::Cuda(0));
    let err = loader.load(&path).unwrap_err();
    assert!(matches!(err, Error::DeviceOutOfMemory { .. }), "{err}");
    let (free1, _) = dev.mem_info().unwrap();
    // Nothing leaked: free memory is back where it was (the pinned ring is host memory).
    assert!(free1 + (64 << 20) >= free0, "free before {free0}, after {free1}");
    // And the loader still works.
    let ok = write_mixed(dir.path());
    check_same(&loader, &ok);
}

#[test]
fn host_rss_during_a_gpu_load_stays_bounded() {
    let Some(_gpu) = gpu() else { return };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.safetensors");
    let chunk = pattern(5, 64 << 20);
    let tensors: Vec<_> =
        (0..16).map(|i| WriteTensor::new(format!("t{i}"), Dtype::U8, vec![chunk.len() as u64], &chunk)).collect();
    write_file(&path, &tensors, &Default::default()).unwrap(); // 1 GiB, 64x the 16 MiB ring
    let empty = dir.path().join("empty.safetensors");
    write_file(&empty, &[WriteTensor::new("x", Dtype::U8, vec![1], &[1])], &Default::default()).unwrap();
    let rss = |p: &Path| {
        let out = std::process::Command::new(weightstream_bin())
            .args(["load", "--device", "cuda", "--staging", "16M", "--json", "--quiet"])
            .arg(p)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        j["peak_host_rss_bytes"].as_u64().unwrap()
    };
    let base = rss(&empty); // the CUDA driver's own footprint
    let big = rss(&path);
    println!("peak RSS: CUDA baseline {} MiB, 1 GiB load {} MiB", base >> 20, big >> 20);
    assert!(big < base + (16 << 20) + (64 << 20), "1 GiB load peaked at {big} bytes, baseline {base}");
}

#[test]
fn converted_load_peaks_at_converted_size_plus_bounded_scratch() {
    let Some(_gpu) = gpu() else { return };
    let dir = tempfile::tempdir().unwrap();
    // 256 MiB of f32 in 64 tensors, loaded as bf16: 128 MiB on the device.
    let path = dir.path().join("f32.safetensors");
    let data: Vec<u8> = (0..1u32 << 20).flat_map(|k| ((k as f32 - 5e5) * 1e-3).to_le_bytes()).collect();
    let tensors: Vec<_> =
        (0..64).map(|i| WriteTensor::new(format!("w{i}"), Dtype::F32, vec![1024, 1024], &data)).collect();
    write_file(&path, &tensors, &Default::default()).unwrap();
    let converted = 128u64 << 20;
    let dev = CudaDevice::open(0).unwrap();
    let cpu = Loader::new().device(Device::Cpu).dtype(Dtype::BF16).load(&path).unwrap();
    // Default ring (one region of 16 MiB per stream), and 32 MiB slots over 4 streams, whose
    // 16 MiB regions take each slot in two rounds.
    for (slot, streams) in [(16usize << 20, 2usize), (32 << 20, 4)] {
        let min_free = std::sync::Arc::new(std::sync::Mutex::new(usize::MAX));
        let (m2, d2) = (min_free.clone(), dev.clone());
        let loader = Loader::new().device(Device::Cuda(0)).dtype(Dtype::BF16).staging_size(slot).streams(streams);
        drop(loader.load(&path).unwrap()); // warm-up: the kernels module and the pinned ring stay
        let (free0, _) = dev.mem_info().unwrap();
        let sampling = loader.clone().progress(std::sync::Arc::new(move |_| {
            let (free, _) = d2.mem_info().unwrap();
            let mut m = m2.lock().unwrap();
            *m = (*m).min(free);
        }));
        let g = sampling.load(&path).unwrap();
        let scratch = g.stats().device_scratch_bytes;
        assert!(scratch > 0 && scratch <= weightstream::sink::cuda::SCRATCH_BUDGET as u64, "scratch {scratch}");
        let peak = free0 - *min_free.lock().unwrap();
        // Allocation granularity and the driver's own bookkeeping: a few MiB at most.
        let slack = 8 << 20;
        assert!(
            (peak as u64) <= converted + scratch + slack,
            "slot {slot}, {streams} streams: device peak {peak} > {converted} converted + {scratch} scratch"
        );
        for t in cpu.tensors() {
            assert_eq!(g.tensor(t.name()).unwrap().to_host_vec().unwrap(), t.to_host_vec().unwrap(), "{}", t.name());
        }
    }
}

#[test]
fn zero_copy_loads_byte_for_byte_and_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_mixed(dir.path());
    // Without a GPU: a clear error, not a silent fallback.
    let err = Loader::new().device(Device::Cpu).zero_copy(true).load(&path).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Usage, "{err}");
    let Some(_gpu) = gpu() else { return };
    let loader = Loader::new().device(Device::Cuda(0)).zero_copy(true);
    for _ in 0..2 {
        let m = loader.load(&path).unwrap();
        assert_eq!(m.stats().io, "zero-copy");
        for (name, bytes) in file_tensors(&path) {
            assert_eq!(m.tensor(&name).unwrap().to_host_vec().unwrap(), bytes, "{name}");
        }
    }
    // Filtered: only the selected tensors, each byte for byte.
    let m = loader.clone().only("a.*").only("e.*").load(&path).unwrap();
    assert_eq!(m.len(), 3);
    for (name, bytes) in file_tensors(&path).into_iter().filter(|(n, _)| n.starts_with('a') || n.starts_with('e')) {
        assert_eq!(m.tensor(&name).unwrap().to_host_vec().unwrap(), bytes, "{name} (filtered)");
    }
    // Converting loads keep the staged path.
    let m = loader.clone().dtype(Dtype::BF16).load(&path).unwrap();
    assert_ne!(m.stats().io, "zero-copy");
    // Cancelled after the first window of a 96 MiB file (three windows): the typed error, with
    // copies of later windows possibly in flight; then the loader loads again.
    let big = dir.path().join("big.safetensors");
    let chunk = pattern(3, 32 << 20);
    let ts: Vec<_> = (0..3).map(|i| WriteTensor::new(format!("t{i}"), Dtype::U8, vec![32 << 20], &chunk)).collect();
    write_file(&big, &ts, &Default::default()).unwrap();
    let token = weightstream::CancelToken::new();
    let t = token.clone();
    let err =
        loader.clone().cancel_token(token).progress(std::sync::Arc::new(move |_| t.cancel())).load(&big).unwrap_err();
    assert!(matches!(err, Error::Cancelled), "{err:?}");
    assert_eq!(loader.load(&big).unwrap().tensor("t2").unwrap().to_host_vec().unwrap(), chunk);
    // Truncated after planning: an error naming the file, never SIGBUS.
    let ckpt = weightstream::Checkpoint::open(&path).unwrap();
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(len - 5000).unwrap();
    let err = loader.load_checkpoint(&ckpt).unwrap_err();
    assert_eq!(err.file(), Some(path.as_path()), "{err}");
}

#[test]
fn shards_on_the_device_equal_shards_in_host_memory() {
    // Strided (dim 1) and contiguous (dim 0) blocks, plain and converted, through the pinned ring
    // and zero-copy: each rank's block on the device equals the same rank's block on the host.
    let dir = tempfile::tempdir().unwrap();
    let path = write_mixed(dir.path());
    let Some(_gpu) = gpu() else { return };
    for world in [1, 3] {
        for rank in 0..world {
            let shard = |l: Loader| l.shard(rank, world).split("a.weight", 1).split("d.f32", 0).split("e.f64", 0);
            for dtype in [None, Some(Dtype::BF16)] {
                let with = |l: Loader| match dtype {
                    Some(d) => l.dtype(d),
                    None => l,
                };
                let cpu = with(shard(Loader::new().device(Device::Cpu))).load(&path).unwrap();
                for zero_copy in [false, true] {
                    let l = with(shard(Loader::new().device(Device::Cuda(0)).zero_copy(zero_copy)));
                    let g = l.load(&path).unwrap_or_else(|e| panic!("{l:?}: {e}"));
                    for t in cpu.tensors() {
                        let d = g.tensor(t.name()).unwrap();
                        assert_eq!(d.shape(), t.shape(), "{}", t.name());
                        assert_eq!(
                            d.to_host_vec().unwrap(),
                            t.to_host_vec().unwrap(),
                            "{} {rank}/{world} {l:?}",
                            t.name()
                        );
                    }
                }
            }
        }
    }
}

/// One device allocation per tensor of `cpu`, each its loaded size.
fn device_places(dev: &std::sync::Arc<CudaDevice>, cpu: &weightstream::LoadedModel) -> Vec<(String, DeviceArena)> {
    cpu.tensors().map(|t| (t.name().to_string(), DeviceArena::alloc(dev, t.byte_len() as usize).unwrap())).collect()
}

/// `load_into` destinations over `arenas`.
fn destinations(
    arenas: &[(String, DeviceArena)],
) -> impl Iterator<Item = (String, weightstream::Destination<'static>)> + '_ {
    arenas.iter().map(|(n, a)| {
        // SAFETY: each arena is device memory of cuda:0, alive until after the load (the
        // caller keeps `arenas`), used by nothing else.
        (n.clone(), weightstream::Destination::Device(unsafe { weightstream::DevicePlace::new(a.ptr(), a.len(), 0) }))
    })
}

#[test]
fn load_into_device_pointers_equals_a_host_load() {
    // Caller-owned device memory (one allocation a tensor), plain, converted and sharded: the
    // bytes equal a cpu load's with the same options.
    let dir = tempfile::tempdir().unwrap();
    let path = write_mixed(dir.path());
    let Some(_gpu) = gpu() else { return };
    let dev = CudaDevice::open(0).unwrap();
    let options: [fn(Loader) -> Loader; 3] =
        [|l| l, |l| l.dtype(Dtype::BF16), |l| l.shard(1, 3).split("a.weight", 1).split("d.f32", 0)];
    for opt in options {
        let cpu = opt(Loader::new().device(Device::Cpu)).load(&path).unwrap();
        let arenas = device_places(&dev, &cpu);
        let dests = destinations(&arenas);
        opt(Loader::new().device(Device::Cuda(0))).load_into(&path, dests).unwrap();
        for (n, a) in &arenas {
            assert_eq!(a.copy_to_host(0, a.len()).unwrap(), cpu.tensor(n).unwrap().to_host_vec().unwrap(), "{n}");
        }
    }
}

#[test]
fn zero_copy_through_load_into_and_stream_equals_a_host_load() {
    // Through the one driver, zero-copy is a strategy of every way onto CUDA: caller pointers
    // and stream batches take the page-cache windows as the arena does, plain and converted.
    let dir = tempfile::tempdir().unwrap();
    let path = write_mixed(dir.path());
    let Some(_gpu) = gpu() else { return };
    let dev = CudaDevice::open(0).unwrap();
    for dtype in [None, Some(Dtype::BF16)] {
        let with = |l: Loader| match dtype {
            Some(d) => l.dtype(d),
            None => l,
        };
        let cpu = with(Loader::new().device(Device::Cpu)).load(&path).unwrap();
        let loader = with(Loader::new().device(Device::Cuda(0)).zero_copy(true).trace(true));
        let arenas = device_places(&dev, &cpu);
        let dests = destinations(&arenas);
        let stats = loader.load_into(&path, dests).unwrap();
        assert_eq!(stats.io, "zero-copy", "{dtype:?}");
        assert!(stats.trace.as_ref().is_some_and(|t| t.spans().iter().any(|s| s.name == "copy")), "{dtype:?}");
        for (n, a) in &arenas {
            assert_eq!(a.copy_to_host(0, a.len()).unwrap(), cpu.tensor(n).unwrap().to_host_vec().unwrap(), "{n}");
        }
        let mut stream = loader.stream(&path, 64 << 20).unwrap();
        let mut count = 0;
        for t in stream.by_ref() {
            let t = t.unwrap();
            assert_eq!(t.to_host_vec().unwrap(), cpu.tensor(t.name()).unwrap().to_host_vec().unwrap(), "{}", t.name());
            count += 1;
        }
        assert_eq!(count, cpu.len(), "{dtype:?}");
        assert!(stream.trace().is_some_and(|t| t.spans().iter().any(|s| s.name == "copy")), "{dtype:?}");
    }
}
