//! The host pipeline end to end: cpu and null targets, every engine, O_DIRECT, faults,
//! cancellation, edge cases, and the host-memory bound. No GPU needed.

mod common;

use common::{file_tensors, pattern, weightstream_bin};

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use weightstream::format::{read_header, write_file, WriteTensor};
use weightstream::io::{Fault, IoKind};
use weightstream::{CancelToken, Checkpoint, Device, Dtype, Error, ErrorKind, Loader};

fn tmpdir() -> tempfile::TempDir {
    // On the project's disk, not tmpfs, so that O_DIRECT works where the filesystem allows it.
    // (The build machine's path may not exist where the binary runs: then the system temp dir.)
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).or_else(|_| tempfile::tempdir()).unwrap()
}

/// A checkpoint with awkward sizes: odd lengths, a tensor larger than small rings, empties.
fn write_mixed(dir: &Path) -> (PathBuf, Vec<(String, Vec<u8>)>) {
    let specs: Vec<(String, Dtype, Vec<u64>)> = vec![
        ("a.bias".into(), Dtype::F32, vec![7]),
        ("a.weight".into(), Dtype::BF16, vec![333, 129]),
        ("b.empty".into(), Dtype::F16, vec![0, 4]),
        ("b.scalar".into(), Dtype::I64, vec![]),
        ("c.big".into(), Dtype::U8, vec![3 << 20]),
        ("d.flags".into(), Dtype::BOOL, vec![13]),
        ("e.f64".into(), Dtype::F64, vec![1025]),
    ];
    let data: Vec<Vec<u8>> = specs
        .iter()
        .enumerate()
        .map(|(i, (_, d, s))| pattern(i as u64 + 1, d.bytes_for(s.iter().product()).unwrap() as usize))
        .collect();
    let tensors: Vec<_> =
        specs.iter().zip(&data).map(|((n, d, s), b)| WriteTensor::new(n.clone(), *d, s.clone(), b)).collect();
    let path = dir.join("mixed.safetensors");
    write_file(&path, &tensors, &Default::default()).unwrap();
    (path, specs.into_iter().map(|s| s.0).zip(data).collect())
}

fn assert_loaded(loader: &Loader, path: &Path, expect: &[(String, Vec<u8>)]) {
    let m = loader.load(path).unwrap_or_else(|e| panic!("{loader:?}: {e}"));
    assert_eq!(m.len(), expect.len());
    for (name, bytes) in expect {
        let t = m.tensor(name).unwrap();
        assert_eq!(&t.to_host_vec().unwrap(), bytes, "{name} with {loader:?}");
        assert_eq!(t.arena_range().start % 256, 0);
    }
    assert_eq!(m.stats().bytes_loaded, expect.iter().map(|(_, b)| b.len() as u64).sum::<u64>());
}

fn direct_supported(dir: &Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    let p = dir.join("probe");
    std::fs::write(&p, [0u8; 4096]).unwrap();
    let ok = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(&p).is_ok();
    if !ok {
        println!("SKIPPED: O_DIRECT not supported on {}", dir.display());
    }
    ok
}

fn engines() -> Vec<IoKind> {
    let mut v = vec![IoKind::Pread];
    match weightstream::io::open_engine(
        &weightstream::io::EngineOptions { kind: IoKind::Uring, ..Default::default() },
        false,
    ) {
        Ok(_) => v.push(IoKind::Uring),
        Err(e) => println!("SKIPPED io_uring variants: {e}"),
    }
    v
}

#[test]
fn cpu_target_every_engine_and_ring_shape_matches_the_file() {
    let dir = tmpdir();
    let (path, expect) = write_mixed(dir.path());
    assert_eq!(expect, file_tensors(&path));
    let direct = direct_supported(dir.path());
    for io in engines() {
        for (count, size) in [(4usize, 16usize << 20), (2, 64 << 10), (3, 1 << 20)] {
            let base =
                Loader::new().device(Device::Cpu).io(io).staging_count(count).staging_size(size).read_size(64 << 10);
            assert_loaded(&base, &path, &expect);
            if direct {
                assert_loaded(&base.clone().direct(true), &path, &expect);
            }
            // Short reads everywhere: resumed below the pipeline, same bytes.
            assert_loaded(&base.clone().inject_fault(Fault::ShortReads(1000)), &path, &expect);
        }
    }
}

#[test]
fn null_target_reads_everything_and_keeps_no_bytes() {
    let dir = tmpdir();
    let (path, expect) = write_mixed(dir.path());
    for io in engines() {
        let m = Loader::new().device(Device::Null).io(io).staging_count(2).staging_size(64 << 10).load(&path).unwrap();
        assert_eq!(m.stats().bytes_read, expect.iter().map(|(_, b)| b.len() as u64).sum::<u64>());
        assert!(m.tensor("c.big").unwrap().to_host_vec().is_err());
        assert_eq!(m.arena_bytes(), 0);
    }
}

#[test]
fn python_written_files_load_byte_for_byte_on_every_engine() {
    let Some(dir) = common::python_data_dir() else { return };
    let mut files: Vec<PathBuf> =
        walk(&dir).into_iter().filter(|p| p.extension().is_some_and(|e| e == "safetensors")).collect();
    files.sort();
    assert!(files.len() >= 5, "expected the generated files in {}", dir.display());
    for f in &files {
        let expect = file_tensors(f);
        for io in engines() {
            assert_loaded(&Loader::new().device(Device::Cpu).io(io), f, &expect);
            let m = Loader::new().device(Device::Null).io(io).load(f).unwrap();
            assert_eq!(m.len(), expect.len());
        }
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn filtered_load_selects_by_glob_and_reads_less() {
    let dir = tmpdir();
    let (path, expect) = write_mixed(dir.path());
    let m = Loader::new().device(Device::Cpu).only("a.*").only("e.*").load(&path).unwrap();
    let names: Vec<_> = m.tensors().map(|t| t.name().to_string()).collect();
    assert_eq!(names, ["a.bias", "a.weight", "e.f64"]);
    for (n, b) in expect.iter().filter(|(n, _)| names.contains(n)) {
        assert_eq!(&m.tensor(n).unwrap().to_host_vec().unwrap(), b);
    }
    assert!(m.stats().bytes_read < 3 << 20, "the 3 MiB tensor must not be read");
    let err = Loader::new().device(Device::Cpu).only("[").load(&path).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Usage, "{err}");
}

#[test]
fn eio_names_file_and_tensor_and_the_loader_is_reusable() {
    let dir = tmpdir();
    let (path, expect) = write_mixed(dir.path());
    let h = read_header(&path).unwrap();
    let big = h.tensors.iter().find(|t| t.name == "c.big").unwrap();
    let at = h.data_start + big.data_offsets.0 + 1_000_000;
    for staged in [false, true] {
        let loader = Loader::new()
            .device(if staged { Device::Null } else { Device::Cpu })
            .staging_count(2)
            .staging_size(256 << 10);
        let err = loader.clone().inject_fault(Fault::EioAt(at)).load(&path).unwrap_err();
        match &err {
            Error::Io { file, tensor, source } => {
                assert_eq!(file, &path);
                assert_eq!(tensor.as_deref(), Some("c.big"));
                assert_eq!(source.raw_os_error(), Some(libc::EIO));
            }
            other => panic!("expected Io, got {other:?}"),
        }
        assert!(err.to_string().contains("c.big"));
        // Same loader (same ring) afterwards: a clean load.
        let m = loader.load(&path).unwrap();
        assert_eq!(m.len(), expect.len());
    }
}

#[test]
fn file_truncated_after_planning_is_an_eof_error_not_a_crash() {
    let dir = tmpdir();
    let (path, _) = write_mixed(dir.path());
    let ckpt = Checkpoint::open(&path).unwrap();
    let len = std::fs::metadata(&path).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(len - 5000).unwrap();
    for device in [Device::Cpu, Device::Null] {
        let err =
            Loader::new().device(device).staging_count(2).staging_size(128 << 10).load_checkpoint(&ckpt).unwrap_err();
        match &err {
            Error::UnexpectedEof { file, tensor, .. } => {
                assert_eq!(file, &path);
                assert_eq!(tensor.as_deref(), Some("e.f64"), "{err}");
            }
            other => panic!("expected UnexpectedEof, got {other:?}"),
        }
    }
    // Opening it afresh: the header check catches it.
    assert!(matches!(Loader::new().device(Device::Cpu).load(&path), Err(Error::DataLengthMismatch { .. })));
}

#[test]
fn cancellation_mid_load_returns_cancelled() {
    let dir = tmpdir();
    let (path, _) = write_mixed(dir.path());
    for device in [Device::Cpu, Device::Null] {
        let token = CancelToken::new();
        let calls = Arc::new(AtomicUsize::new(0));
        let (t, c) = (token.clone(), calls.clone());
        let loader = Loader::new()
            .device(device)
            .staging_count(2)
            .staging_size(64 << 10)
            .read_size(64 << 10)
            .queue_depth(1)
            .cancel_token(token)
            .progress(Arc::new(move |_| {
                c.fetch_add(1, Ordering::Relaxed);
                t.cancel();
            }));
        let err = loader.load(&path).unwrap_err();
        assert!(matches!(err, Error::Cancelled), "{err:?}");
        assert!(calls.load(Ordering::Relaxed) >= 1);
    }
}

#[test]
fn empty_model_and_empty_tensors() {
    let dir = tmpdir();
    let empty = dir.path().join("empty.safetensors");
    write_file(&empty, &[], &Default::default()).unwrap();
    for device in [Device::Cpu, Device::Null] {
        let m = Loader::new().device(device).load(&empty).unwrap();
        assert!(m.is_empty());
        assert_eq!(m.stats().bytes_read, 0);
    }
    let zeros = dir.path().join("zeros.safetensors");
    write_file(
        &zeros,
        &[WriteTensor::new("z", Dtype::F32, vec![0], &[]), WriteTensor::new("y", Dtype::U8, vec![0, 9], &[])],
        &Default::default(),
    )
    .unwrap();
    let m = Loader::new().device(Device::Cpu).load(&zeros).unwrap();
    assert_eq!(m.tensor("y").unwrap().to_host_vec().unwrap(), Vec::<u8>::new());
    assert_eq!(m.tensor("y").unwrap().shape(), &[0, 9]);
}

#[test]
fn tensor_larger_than_the_whole_ring() {
    let dir = tmpdir();
    let data = pattern(99, 5 << 20);
    let path = dir.path().join("one.safetensors");
    write_file(&path, &[WriteTensor::new("huge", Dtype::U8, vec![data.len() as u64], &data)], &Default::default())
        .unwrap();
    for io in engines() {
        let loader = Loader::new().device(Device::Cpu).io(io).staging_count(2).staging_size(256 << 10);
        assert_loaded(&loader, &path, &[("huge".into(), data.clone())]);
        if direct_supported(dir.path()) {
            assert_loaded(&loader.clone().direct(true), &path, &[("huge".into(), data.clone())]);
        }
        let m = Loader::new().device(Device::Null).io(io).staging_count(2).staging_size(256 << 10).load(&path).unwrap();
        assert_eq!(m.stats().bytes_read, data.len() as u64);
    }
}

#[test]
fn every_malformed_file_fails_cleanly_through_load() {
    let dir = tmpdir();
    let good = {
        let (p, _) = write_mixed(dir.path());
        std::fs::read(p).unwrap()
    };
    let hl = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("short", vec![1, 2, 3]),
        ("huge-len", u64::MAX.to_le_bytes().to_vec()),
        ("truncated", good[..good.len() - 1].to_vec()),
        ("trailing", [good.clone(), vec![0]].concat()),
        ("not-json", [8u64.to_le_bytes().to_vec(), b"{nope!!}".to_vec()].concat()),
    ];
    let mut bad_utf8 = good.clone();
    bad_utf8[10] = 0xff;
    cases.push(("utf8", bad_utf8));
    let mut bad_dtype = good.clone();
    let h = String::from_utf8(good[8..8 + hl].to_vec()).unwrap().replace("\"BF16\"", "\"XF16\"");
    bad_dtype.splice(8..8 + hl, h.into_bytes());
    cases.push(("dtype", bad_dtype));
    for (name, bytes) in cases {
        let p = dir.path().join(format!("{name}.safetensors"));
        std::fs::write(&p, &bytes).unwrap();
        for device in [Device::Cpu, Device::Null] {
            let err = Loader::new().device(device).load(&p).expect_err(name);
            assert_eq!(err.file(), Some(p.as_path()), "{name}: {err}");
        }
    }
}

#[test]
fn trace_spans_account_for_every_byte() {
    let dir = tmpdir();
    let (path, expect) = write_mixed(dir.path());
    let total: u64 = expect.iter().map(|(_, b)| b.len() as u64).sum();
    for device in [Device::Cpu, Device::Null] {
        let m = Loader::new().device(device).staging_count(2).staging_size(256 << 10).trace(true).load(&path).unwrap();
        let t = m.trace().unwrap();
        let read: u64 = t.spans().iter().filter(|s| s.name == "read").map(|s| s.bytes).sum();
        assert_eq!(read, total);
        let out = dir.path().join("trace.json");
        t.write_chrome_json(&out).unwrap();
        let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
        let events = doc["traceEvents"].as_array().unwrap();
        let bytes: u64 =
            events.iter().filter(|e| e["name"] == "read").map(|e| e["args"]["bytes"].as_u64().unwrap()).sum();
        assert_eq!(bytes, total);
    }
}

#[test]
fn async_load_does_not_block_the_runtime() {
    let dir = tmpdir();
    let (path, expect) = write_mixed(dir.path());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let m = rt.block_on(async {
        let load = Loader::new().device(Device::Cpu).load_async(&path);
        // The single worker stays free to run another task while the load runs elsewhere.
        let other = tokio::spawn(async { 42 });
        let (m, o) = tokio::join!(load, other);
        assert_eq!(o.unwrap(), 42);
        m
    });
    assert_eq!(m.unwrap().len(), expect.len());
}

#[test]
fn peak_rss_of_a_null_load_stays_within_ring_plus_64_mib() {
    // A child process (the CLI) so that this test binary's own allocations do not count.
    let dir = tmpdir();
    let path = dir.path().join("big.safetensors");
    let chunk = pattern(5, 32 << 20);
    let tensors: Vec<_> =
        (0..16).map(|i| WriteTensor::new(format!("t{i}"), Dtype::U8, vec![chunk.len() as u64], &chunk)).collect();
    write_file(&path, &tensors, &Default::default()).unwrap(); // 512 MiB
    let ring = 16u64 << 20;
    for io in ["pread", "uring"] {
        let out = std::process::Command::new(weightstream_bin())
            .args(["load", "--device", "null", "--staging", "16M", "--json", "--quiet", "--io", io])
            .arg(&path)
            .output()
            .unwrap();
        if !out.status.success() && io == "uring" {
            println!("SKIPPED uring RSS check: {}", String::from_utf8_lossy(&out.stderr));
            continue;
        }
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let rss = j["peak_host_rss_bytes"].as_u64().unwrap();
        assert_eq!(j["bytes_read"].as_u64().unwrap(), 512 << 20);
        assert!(rss < ring + (64 << 20), "{io}: peak RSS {rss} for a 512 MiB model through a 16 MiB ring");
    }
}

#[test]
fn extreme_options_load_or_fail_typed_never_panic() {
    let dir = tmpdir();
    let (path, expect) = write_mixed(dir.path());
    for io in engines() {
        let base = Loader::new().device(Device::Cpu).io(io);
        for loader in [
            base.clone().read_size(usize::MAX),
            base.clone().threads(usize::MAX),
            base.clone().queue_depth(usize::MAX).threads(100_000),
            base.clone().read_size(usize::MAX).staging_count(2).staging_size(64 << 10).device(Device::Null),
        ] {
            let m = loader.load(&path).unwrap_or_else(|e| panic!("{loader:?}: {e}"));
            assert_eq!(m.len(), expect.len());
        }
        assert_loaded(&base.clone().read_size(usize::MAX).staging_count(2).staging_size(64 << 10), &path, &expect);
        // A ring that cannot exist: a typed error, not an overflow.
        let huge = base.clone().device(Device::Null).staging_size(usize::MAX);
        assert!(matches!(huge.load(&path), Err(Error::HostOutOfMemory { .. })));
        assert_eq!(huge.staging_count(usize::MAX).staging_bytes(), usize::MAX);
    }
    for len in [usize::MAX, usize::MAX - 4095] {
        assert!(matches!(weightstream::sink::HostMemory::new(len), Err(Error::HostOutOfMemory { .. })));
    }
}

#[test]
fn progress_ends_at_its_total_when_a_filter_leaves_gaps() {
    let dir = tmpdir();
    let (path, expect) = write_mixed(dir.path());
    // a.* and c.* leave b.scalar (8 bytes) between them: a staged extent reads through it.
    let selected: u64 =
        expect.iter().filter(|(n, _)| n.starts_with('a') || n.starts_with('c')).map(|(_, b)| b.len() as u64).sum();
    for device in [Device::Cpu, Device::Null] {
        let last = Arc::new(std::sync::Mutex::new(None));
        let l = last.clone();
        let m = Loader::new()
            .device(device)
            .only("a.*")
            .only("c.*")
            .progress(Arc::new(move |p| *l.lock().unwrap() = Some((p.bytes_done, p.bytes_total))))
            .load(&path)
            .unwrap();
        let (done, total) = last.lock().unwrap().unwrap();
        assert_eq!(done, total, "{device}: progress stopped short");
        assert_eq!(m.stats().bytes_read, total, "{device}");
        assert!(total >= selected && total <= selected + 8, "{device}: {total}");
    }
}

#[test]
fn many_small_reads_per_slot_never_overfill_the_engine() {
    // 64 slots of 1 MiB filled by 4 KiB reads: 16,448 reads could be wanted at once, more than
    // an io_uring's completion queue holds; the pipeline must wait for room instead.
    let dir = tmpdir();
    let (path, expect) = write_mixed(dir.path());
    for io in engines() {
        let loader = Loader::new().io(io).staging_count(64).staging_size(1 << 20).read_size(4096);
        let m = loader.clone().device(Device::Null).load(&path).unwrap();
        assert_eq!(m.stats().bytes_read, expect.iter().map(|(_, b)| b.len() as u64).sum::<u64>());
        if direct_supported(dir.path()) {
            assert_loaded(&loader.clone().device(Device::Cpu).direct(true), &path, &expect);
        }
    }
}

/// The bytes `write_mixed`'s tensors should load as when F16/BF16/F32/F64 are converted to `to`:
/// the kernels' own math (compiled C, checked against `half` in tests/convert_math.rs), not the
/// code under test.
fn converted_expectation(expect: &[(String, Vec<u8>)], path: &Path, to: Dtype) -> Vec<(String, Dtype, Vec<u8>)> {
    let h = read_header(path).unwrap();
    expect
        .iter()
        .map(|(name, bytes)| {
            let from = h.tensors.iter().find(|t| &t.name == name).unwrap().dtype;
            if !from.is_convertible_float() || from == to {
                return (name.clone(), from, bytes.clone());
            }
            let mut out = vec![0u8; weightstream::convert::output_len(from, to, bytes.len() as u64).unwrap() as usize];
            weightstream::convert::convert_with_kernel_math(from, to, bytes, &mut out).unwrap();
            (name.clone(), to, out)
        })
        .collect()
}

#[test]
fn cpu_conversion_in_read_and_convert_workers_matches_the_kernel_math() {
    // Many pieces per tensor (4 KiB and 64 KiB reads), every target dtype, 1 to 3 workers;
    // e.f64 sits at an odd file offset (after 13 bools).
    let dir = tmpdir();
    let (path, expect) = write_mixed(dir.path());
    for threads in [1, 3] {
        for read_size in [4096, 64 << 10, 2 << 20] {
            for to in [Dtype::F16, Dtype::BF16, Dtype::F32] {
                let loader = Loader::new().device(Device::Cpu).read_size(read_size).threads(threads).dtype(to);
                let m = loader.load(&path).unwrap_or_else(|e| panic!("{loader:?}: {e}"));
                for (name, dtype, bytes) in converted_expectation(&expect, &path, to) {
                    let t = m.tensor(&name).unwrap();
                    assert_eq!(t.dtype(), dtype, "{name}");
                    assert!(t.to_host_vec().unwrap() == bytes, "{name} -> {to} with {loader:?}");
                    assert_eq!(t.arena_range().start % 256, 0);
                }
                assert!(m.stats().staging_bytes > 0, "converted loads report the workers' buffers");
            }
        }
    }
    // No conversion asked: no buffers at all.
    let m = Loader::new().device(Device::Cpu).load(&path).unwrap();
    assert_eq!(m.stats().staging_bytes, 0);
}

#[test]
fn cpu_conversion_errors_name_file_and_tensor_and_leave_the_loader_usable() {
    let dir = tmpdir();
    let (path, expect) = write_mixed(dir.path());
    let h = read_header(&path).unwrap();
    let w = h.tensors.iter().find(|t| t.name == "a.weight").unwrap();
    let at = h.data_start + w.data_offsets.0 + 20_000;
    let loader = Loader::new().device(Device::Cpu).dtype(Dtype::F16).read_size(4096);
    let err = loader.clone().inject_fault(Fault::EioAt(at)).load(&path).unwrap_err();
    match &err {
        Error::Io { file, tensor, .. } => {
            assert_eq!(file, &path);
            assert_eq!(tensor.as_deref(), Some("a.weight"), "{err}");
        }
        other => panic!("expected Io, got {other:?}"),
    }
    // Short reads are resumed, not errors; and the same loader loads cleanly after the error.
    let m = loader.clone().inject_fault(Fault::ShortReads(1000)).load(&path).unwrap();
    for (name, _, bytes) in converted_expectation(&expect, &path, Dtype::F16) {
        assert!(m.tensor(&name).unwrap().to_host_vec().unwrap() == bytes, "{name} with short reads");
    }
    // Cancelled from the progress callback while conversions are in flight.
    let token = CancelToken::new();
    let t = token.clone();
    let err = loader
        .clone()
        .cancel_token(token)
        .progress(Arc::new(move |p| {
            if p.bytes_done > 50_000 {
                t.cancel()
            }
        }))
        .load(&path)
        .unwrap_err();
    assert!(matches!(err, Error::Cancelled), "{err:?}");
    // Truncated after planning: EOF naming the last tensor, which is converted (F64).
    let ckpt = Checkpoint::open(&path).unwrap();
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(len - 5000).unwrap();
    let err = loader.load_checkpoint(&ckpt).unwrap_err();
    assert!(matches!(&err, Error::UnexpectedEof { tensor: Some(t), .. } if t == "e.f64"), "{err:?}");
}

#[test]
fn cpu_conversion_trace_and_progress_account_for_every_byte() {
    let dir = tmpdir();
    let (path, expect) = write_mixed(dir.path());
    let total: u64 = expect.iter().map(|(_, b)| b.len() as u64).sum();
    let h = read_header(&path).unwrap();
    let converted: u64 = expect
        .iter()
        .filter(|(n, _)| {
            let d = h.tensors.iter().find(|t| &t.name == n).unwrap().dtype;
            d.is_convertible_float() && d != Dtype::BF16
        })
        .map(|(_, b)| b.len() as u64)
        .sum();
    let last = Arc::new(std::sync::Mutex::new((0, 0)));
    let l = last.clone();
    let m = Loader::new()
        .device(Device::Cpu)
        .dtype(Dtype::BF16)
        .read_size(8192)
        .trace(true)
        .progress(Arc::new(move |p| *l.lock().unwrap() = (p.bytes_done, p.bytes_total)))
        .load(&path)
        .unwrap();
    let spans = m.trace().unwrap().spans();
    let sum = |name: &str| spans.iter().filter(|s| s.name == name).map(|s| s.bytes).sum::<u64>();
    assert_eq!(sum("read"), total);
    assert_eq!(sum("convert"), converted);
    assert_eq!(*last.lock().unwrap(), (total, total));
}

#[test]
fn cpu_conversion_with_o_direct_goes_through_the_ring_with_the_same_bits() {
    // O_DIRECT keeps the staged path: pieces converted out of the ring, at any file alignment
    // (e.f64 starts at an odd offset, so its source bytes are misaligned in the slot).
    let dir = tmpdir();
    if !direct_supported(dir.path()) {
        return;
    }
    let (path, expect) = write_mixed(dir.path());
    for to in [Dtype::F16, Dtype::BF16, Dtype::F32] {
        let loader = Loader::new().device(Device::Cpu).direct(true).staging_count(2).staging_size(256 << 10).dtype(to);
        let m = loader.load(&path).unwrap_or_else(|e| panic!("{loader:?}: {e}"));
        assert!(m.stats().direct);
        for (name, dtype, bytes) in converted_expectation(&expect, &path, to) {
            let t = m.tensor(&name).unwrap();
            assert_eq!(t.dtype(), dtype, "{name}");
            assert!(t.to_host_vec().unwrap() == bytes, "{name} -> {to} through the ring");
        }
    }
}
