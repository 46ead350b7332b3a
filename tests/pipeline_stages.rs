//! The one pipeline through every host stage: the strategy each option combination gets (never
//! a silent downgrade), injected faults on every stage, and concurrent loads on clones of one
//! `Loader`. No GPU needed.

mod common;

use common::{pattern, weightstream_bin};

use std::path::{Path, PathBuf};
use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use weightstream::format::{read_header, write_file, WriteTensor};
use weightstream::io::{Fault, IoKind};
use weightstream::{Device, Dtype, Error, ErrorKind, Loader};

fn tmpdir() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).or_else(|_| tempfile::tempdir()).unwrap()
}

/// A checkpoint of f32 tensors (so that conversions apply to all of them), one larger than the
/// small rings below; returns its path and the tensors' bytes.
fn write_f32(dir: &Path, name: &str, big: u64) -> (PathBuf, Vec<(String, Vec<u8>)>) {
    let specs: Vec<(String, u64)> = vec![("a".into(), 7), ("b".into(), big), ("c".into(), 1025), ("d".into(), 0)];
    let data: Vec<Vec<u8>> = specs
        .iter()
        .enumerate()
        .map(|(i, (_, n))| {
            // Finite f32 values, so that every dtype round-trips its own way.
            let raw = pattern(i as u64 + 11, *n as usize);
            raw.iter().flat_map(|b| (*b as f32 / 7.0 - 3.0).to_le_bytes()).collect()
        })
        .collect();
    let tensors: Vec<_> =
        specs.iter().zip(&data).map(|((n, e), b)| WriteTensor::new(n.clone(), Dtype::F32, vec![*e], b)).collect();
    let path = dir.join(name);
    write_file(&path, &tensors, &Default::default()).unwrap();
    (path, specs.into_iter().map(|s| s.0).zip(data).collect())
}

fn uring_available() -> bool {
    weightstream::io::open_engine(&weightstream::io::EngineOptions { kind: IoKind::Uring, ..Default::default() }, false)
        .is_ok()
}

fn direct_supported(dir: &Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    let p = dir.join("probe");
    std::fs::write(&p, [0u8; 4096]).unwrap();
    std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(&p).is_ok()
}

/// Every host stage the strategy can pick, with the `io` it must report.
fn stage_configs(dir: &Path) -> Vec<(&'static str, Loader, &'static str)> {
    let small = Loader::new().staging_count(2).staging_size(64 << 10).read_size(16 << 10);
    let mut v = vec![
        ("in place, engine", small.clone().device(Device::Cpu).io(IoKind::Pread), "pread"),
        ("in place, convert on workers", small.clone().device(Device::Cpu).dtype(Dtype::BF16), "pread"),
        ("ring, null", small.clone().device(Device::Null).io(IoKind::Pread), "pread"),
    ];
    if uring_available() {
        v.push(("in place, io_uring", small.clone().device(Device::Cpu).io(IoKind::Uring), "uring"));
        v.push((
            "ring, io_uring converting",
            small.clone().device(Device::Cpu).io(IoKind::Uring).dtype(Dtype::F16),
            "uring",
        ));
    } else {
        println!("SKIPPED io_uring stages: io_uring unavailable here");
    }
    if direct_supported(dir) {
        v.push(("ring, O_DIRECT", small.clone().device(Device::Cpu).direct(true).io(IoKind::Pread), "pread"));
        v.push((
            "ring, O_DIRECT converting",
            small.clone().device(Device::Cpu).direct(true).io(IoKind::Pread).dtype(Dtype::F16),
            "pread",
        ));
    } else {
        println!("SKIPPED O_DIRECT stages: the filesystem refuses O_DIRECT");
    }
    v
}

#[test]
fn every_stage_loads_the_same_bytes_and_reports_the_engine_it_used() {
    let dir = tmpdir();
    let (path, _) = write_f32(dir.path(), "m.safetensors", 100_000);
    for (what, loader, io) in stage_configs(dir.path()) {
        let m = loader.load(&path).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(m.stats().io, io, "{what}");
        let reference = Loader::new().device(Device::Cpu).io(IoKind::Pread);
        let reference = match m.tensor("a").unwrap().dtype() {
            Dtype::F32 => reference,
            d => reference.dtype(d),
        };
        let want = reference.load(&path).unwrap();
        for t in want.tensors() {
            if m.device() == Device::Null {
                assert!(m.tensor(t.name()).unwrap().to_host_vec().is_err());
                continue;
            }
            assert_eq!(
                m.tensor(t.name()).unwrap().to_host_vec().unwrap(),
                t.to_host_vec().unwrap(),
                "{what}: {}",
                t.name()
            );
        }
    }
}

#[test]
fn every_stage_survives_short_reads_and_names_file_and_tensor_on_eio() {
    let dir = tmpdir();
    let (path, _) = write_f32(dir.path(), "m.safetensors", 100_000);
    let h = read_header(&path).unwrap();
    let b = h.tensors.iter().find(|t| t.name == "b").unwrap();
    let at = h.data_start + b.data_offsets.0 + 200_001;
    for (what, loader, _) in stage_configs(dir.path()) {
        let clean = loader.load(&path).unwrap_or_else(|e| panic!("{what}: {e}"));
        // O_DIRECT reads come back short in whole blocks only.
        let short_len = if what.contains("O_DIRECT") { 4096 } else { 1000 };
        let short = loader
            .clone()
            .inject_fault(Fault::ShortReads(short_len))
            .load(&path)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        if clean.device() != Device::Null {
            for t in clean.tensors() {
                assert_eq!(short.tensor(t.name()).unwrap().to_host_vec().unwrap(), t.to_host_vec().unwrap(), "{what}");
            }
        }
        let err = loader.clone().inject_fault(Fault::EioAt(at)).load(&path).unwrap_err();
        match &err {
            Error::Io { file, tensor, source } => {
                assert_eq!(file, &path, "{what}");
                assert_eq!(tensor.as_deref(), Some("b"), "{what}: {err}");
                assert_eq!(source.raw_os_error(), Some(libc::EIO), "{what}");
            }
            other => panic!("{what}: expected Io, got {other:?}"),
        }
        // The same loader (and its pooled ring) loads cleanly afterwards.
        assert_eq!(loader.load(&path).unwrap().len(), 4, "{what}");
    }
}

#[test]
fn io_uring_asked_for_a_converted_cpu_load_is_used_not_dropped() {
    let dir = tmpdir();
    let (path, _) = write_f32(dir.path(), "m.safetensors", 10_000);
    let out = std::process::Command::new(weightstream_bin())
        .args(["load", "--device", "cpu", "--dtype", "f16", "--io", "uring", "--json", "--quiet"])
        .arg(&path)
        .output()
        .unwrap();
    if !uring_available() {
        // Then it must be a clear error, not a load with another engine.
        assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
        println!("SKIPPED io_uring JSON check: io_uring unavailable here");
        return;
    }
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["io"], "uring");
    assert_eq!(j["tensors"][0]["dtype"], "F16");
}

#[test]
fn options_that_cannot_be_honoured_are_usage_errors() {
    let dir = tmpdir();
    let (path, _) = write_f32(dir.path(), "m.safetensors", 10_000);
    let cases = [
        ("zero-copy on cpu", Loader::new().device(Device::Cpu).zero_copy(true)),
        ("zero-copy on null", Loader::new().device(Device::Null).zero_copy(true)),
        ("zero-copy with O_DIRECT", Loader::new().device(Device::Cuda(0)).zero_copy(true).direct(true)),
        ("zero-copy with a read engine", Loader::new().device(Device::Cuda(0)).zero_copy(true).io(IoKind::Pread)),
        ("no staging buffer", Loader::new().device(Device::Null).staging_count(0)),
        ("a billion staging buffers", Loader::new().device(Device::Null).staging_count(1_000_000_000)),
        ("staging buffers of 4 KiB", Loader::new().device(Device::Null).staging_size(4096)),
        ("dtype I8 as a target", Loader::new().device(Device::Cpu).dtype(Dtype::I8)),
    ];
    for (what, loader) in cases {
        let err = loader.load(&path).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Usage, "{what}: {err}");
    }
    // The CLI: a ring of a billion buffers is refused at once (exit 1 with one error line), and
    // `--staging` is the ring's total, not rounded up per buffer.
    let out = std::process::Command::new(weightstream_bin())
        .args(["load", "--device", "null", "--quiet", "--staging-buffers", "1000000000"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.starts_with("error: ") && stderr.lines().count() == 1, "{stderr}");
    let out = std::process::Command::new(weightstream_bin())
        .args(["load", "--device", "null", "--quiet", "--json", "--staging", "1M", "--staging-buffers", "3"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let staging = j["staging_bytes"].as_u64().unwrap();
    assert!(staging <= 1 << 20 && staging > (1 << 20) - 3 * 4096, "--staging 1M gave a ring of {staging} bytes");
}

#[test]
fn clones_load_at_the_same_time() {
    // A slow load holds its progress callback until a small load on a clone of the same loader
    // has finished (or 20 s passed): with one lock held for a whole load, the small one would
    // wait for the slow one, and the slow one would see the timeout.
    let dir = tmpdir();
    let (big, _) = write_f32(dir.path(), "big.safetensors", 1 << 20);
    let (small, _) = write_f32(dir.path(), "small.safetensors", 1000);
    for device in [Device::Cpu, Device::Null] {
        let loader = Loader::new().device(device).staging_count(2).staging_size(64 << 10).read_size(16 << 10);
        let (started_tx, started_rx) = channel::<()>();
        let (small_done_tx, small_done_rx) = channel::<()>();
        let started_tx = Mutex::new(Some(started_tx));
        let small_done_rx = Mutex::new(small_done_rx);
        let saw_small_first = Arc::new(Mutex::new(None));
        let seen = saw_small_first.clone();
        let slow = loader.clone().progress(Arc::new(move |_| {
            if let Some(tx) = started_tx.lock().unwrap().take() {
                let _ = tx.send(());
                let got = small_done_rx.lock().unwrap().recv_timeout(Duration::from_secs(20)).is_ok();
                *seen.lock().unwrap() = Some(got);
            }
        }));
        let big_path = big.clone();
        let t = std::thread::spawn(move || slow.load(&big_path).map(|m| m.len()));
        started_rx.recv_timeout(Duration::from_secs(20)).expect("the slow load started");
        let m = loader.clone().load(&small).unwrap();
        assert_eq!(m.len(), 4);
        small_done_tx.send(()).unwrap();
        assert_eq!(t.join().unwrap().unwrap(), 4);
        assert_eq!(*saw_small_first.lock().unwrap(), Some(true), "{device}: the small load waited for the slow one");
    }
}

#[test]
fn a_load_started_from_a_progress_callback_completes() {
    let dir = tmpdir();
    let (big, _) = write_f32(dir.path(), "big.safetensors", 100_000);
    let (small, expect) = write_f32(dir.path(), "small.safetensors", 1000);
    for device in [Device::Cpu, Device::Null] {
        let loader = Loader::new().device(device).staging_count(2).staging_size(64 << 10).read_size(16 << 10);
        let inner = loader.clone();
        let small = small.clone();
        let result = Arc::new(Mutex::new(None));
        let r = result.clone();
        let outer = loader.clone().progress(Arc::new(move |_| {
            let mut slot = r.lock().unwrap();
            if slot.is_none() {
                *slot = Some(inner.load(&small).map(|m| {
                    m.tensors().map(|t| (t.name().to_string(), t.to_host_vec().unwrap_or_default())).collect::<Vec<_>>()
                }));
            }
        }));
        assert_eq!(outer.load(&big).unwrap().len(), 4);
        let got = result.lock().unwrap().take().expect("the callback ran").expect("the inner load succeeded");
        assert_eq!(got.len(), expect.len(), "{device}");
        if device == Device::Cpu {
            for ((n, b), (en, eb)) in got.iter().zip(&expect) {
                assert_eq!((n, b), (en, eb));
            }
        }
    }
}
