//! `Loader::stream`: tensors in file order as they land, within a window of bytes in flight;
//! an error is one `Err` item and the end; dropping the stream stops the load.

mod common;

use common::pattern;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use weightstream::format::{write_file, WriteTensor};
use weightstream::io::Fault;
use weightstream::{CancelToken, Device, Dtype, Error, ErrorKind, Loader, StreamedTensor};

/// A checkpoint of tensors of many sizes and dtypes, one of no bytes; returns its path.
fn write(dir: &Path, name: &str, seed: u64) -> PathBuf {
    let specs: Vec<(String, Dtype, Vec<u64>)> = (0..24)
        .map(|i| {
            let (d, s) = match i % 6 {
                0 => (Dtype::F32, vec![16, 3 + i]),
                1 => (Dtype::BF16, vec![64, 40 * i]),
                2 => (Dtype::U8, vec![(i * 37_001) % 300_000]),
                3 => (Dtype::F16, vec![0, 8]),
                4 => (Dtype::F16, vec![8, 1024 * i]),
                _ => (Dtype::I64, vec![2 * i, 2]),
            };
            (format!("layer.{i}.w"), d, s)
        })
        .collect();
    let data: Vec<Vec<u8>> = specs
        .iter()
        .enumerate()
        .map(|(i, (_, d, s))| match d {
            // Finite floats, so that conversions compare bitwise with the arena's.
            Dtype::F32 => (0..s.iter().product::<u64>()).flat_map(|k| (k as f32 * 0.5 - 7.0).to_le_bytes()).collect(),
            _ => pattern(seed + i as u64, d.bytes_for(s.iter().product()).unwrap() as usize),
        })
        .collect();
    let ws: Vec<_> =
        specs.iter().zip(&data).map(|((n, d, s), b)| WriteTensor::new(n.as_str(), *d, s.clone(), b)).collect();
    let path = dir.join(name);
    write_file(&path, &ws, &Default::default()).unwrap();
    path
}

/// Stream `path` holding every tensor and compare it with a load with the same options.
fn check_held(loader: &Loader, path: &Path, window: u64) {
    let want = loader.load(path).unwrap();
    let got: Vec<StreamedTensor> =
        loader.stream(path, window).unwrap().collect::<weightstream::Result<_>>().unwrap_or_else(|e| panic!("{e}"));
    let names: Vec<&str> = got.iter().map(StreamedTensor::name).collect();
    let want_names: Vec<&str> = want.tensors().map(|t| t.name()).collect();
    assert_eq!(names, want_names, "file order, {loader:?} window {window}");
    for (g, w) in got.iter().zip(want.tensors()) {
        assert_eq!((g.dtype(), g.stored_dtype(), g.shape()), (w.dtype(), w.stored_dtype(), w.shape()), "{}", g.name());
        assert_eq!(g.device(), Device::Cpu);
        assert!(g.host_bytes().unwrap() == w.to_host_vec().unwrap(), "{} with {loader:?} window {window}", g.name());
        if g.byte_len() > 0 {
            assert_eq!(g.host_bytes().unwrap().as_ptr() as usize % 256, 0, "{} is aligned", g.name());
        }
    }
}

fn uring_works() -> bool {
    let opts = weightstream::io::EngineOptions { kind: weightstream::io::IoKind::Uring, ..Default::default() };
    let ok = weightstream::io::open_engine(&opts, false).is_ok();
    if !ok {
        println!("SKIPPED the io_uring stream: io_uring cannot start here");
    }
    ok
}

#[test]
fn held_tensors_equal_a_load_with_the_same_options() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "m.safetensors", 1);
    let base = Loader::new().device(Device::Cpu).staging_count(2).staging_size(256 << 10);
    let largest = base.describe(&path).unwrap().iter().map(|t| t.byte_len).max().unwrap();
    for window in [largest, 2 * largest + 1000, 1 << 30] {
        check_held(&base, &path, window);
        check_held(&base.clone().dtype(Dtype::F32), &path, 2 * window);
        check_held(&base.clone().dtype(Dtype::BF16).only("layer.1*"), &path, window);
        check_held(&base.clone().shard(1, 2).split("*", 0), &path, window);
        check_held(
            &base.clone().io(weightstream::io::IoKind::Pread).inject_fault(Fault::ShortReads(1000)),
            &path,
            window,
        );
        // Through the ring (O_DIRECT cannot read in place; io_uring converts on the ring), plain
        // and converting: the batch sink copies staged pieces.
        check_held(&base.clone().direct(true), &path, window);
        check_held(&base.clone().direct(true).dtype(Dtype::F16), &path, window);
        if uring_works() {
            check_held(&base.clone().io(weightstream::io::IoKind::Uring).dtype(Dtype::F32), &path, 2 * window);
        }
    }
}

#[test]
fn an_index_streams_file_after_file() {
    let dir = tempfile::tempdir().unwrap();
    let a = write(dir.path(), "part-1.safetensors", 10);
    let b = write(dir.path(), "part-2.safetensors", 20);
    // The same names in both files would be an error: give the second file its own.
    let h = weightstream::format::read_header(&b).unwrap();
    let bytes = std::fs::read(&b).unwrap();
    let renamed: Vec<(String, Vec<u8>)> = h
        .tensors
        .iter()
        .map(|t| {
            let s = (h.data_start + t.data_offsets.0) as usize;
            (t.name.replace("layer", "head"), bytes[s..s + t.byte_len() as usize].to_vec())
        })
        .collect();
    let ws: Vec<_> = h
        .tensors
        .iter()
        .zip(&renamed)
        .map(|(t, (n, d))| WriteTensor::new(n.as_str(), t.dtype, t.shape.clone(), d))
        .collect();
    write_file(&b, &ws, &Default::default()).unwrap();
    let mut map = serde_json::Map::new();
    for (f, p) in [("part-1.safetensors", &a), ("part-2.safetensors", &b)] {
        for t in weightstream::format::read_header(p).unwrap().tensors {
            map.insert(t.name, f.into());
        }
    }
    let index = dir.path().join("model.safetensors.index.json");
    std::fs::write(&index, serde_json::json!({ "weight_map": map }).to_string()).unwrap();
    check_held(&Loader::new().device(Device::Cpu), &index, 1 << 20);
}

#[test]
fn a_read_error_is_one_err_item_naming_file_and_tensor_then_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "m.safetensors", 3);
    let h = weightstream::format::read_header(&path).unwrap();
    let bad = &h.tensors[13];
    let at = h.data_start + bad.data_offsets.0 + 5;
    let loader = Loader::new().device(Device::Cpu).io(weightstream::io::IoKind::Pread).inject_fault(Fault::EioAt(at));
    let mut stream = loader.stream(&path, 1 << 20).unwrap();
    let mut ok = Vec::new();
    let err = loop {
        match stream.next().expect("an Err item before the end") {
            Ok(t) => ok.push(t.name().to_string()),
            Err(e) => break e,
        }
    };
    assert_eq!(err.kind(), ErrorKind::Io, "{err}");
    // The failed read started in (or before) the tensor at the fault: that tensor is named,
    // and it was not handed out.
    let named = match &err {
        Error::Io { file, tensor: Some(t), .. } if file.ends_with("m.safetensors") => t.clone(),
        e => panic!("{e:?}"),
    };
    let at_or_before = h.tensors.iter().position(|t| t.name == named).unwrap();
    assert!(at_or_before <= 13 && !ok.contains(&named) && !ok.contains(&bad.name), "{named}: {ok:?}");
    assert!(err.to_string().contains(&named), "{err}");
    assert!(stream.next().is_none() && stream.next().is_none(), "the stream ends after its error");
}

#[test]
fn dropping_the_stream_stops_the_load_and_taken_tensors_stay_valid() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.safetensors");
    let data = pattern(9, 1 << 20);
    let ws: Vec<_> = (0..64).map(|i| WriteTensor::new(format!("t{i}"), Dtype::U8, vec![1 << 20], &data)).collect();
    write_file(&path, &ws, &Default::default()).unwrap();
    let mut stream = Loader::new().device(Device::Cpu).stream(&path, 4 << 20).unwrap();
    let first = stream.next().unwrap().unwrap();
    std::thread::sleep(Duration::from_millis(200)); // the producer fills the window and waits
                                                    // It waits: no more than the window (4 MiB) beyond the tensor taken was read.
    assert!(stream.bytes_read() <= 5 << 20, "{} bytes read of 64 MiB", stream.bytes_read());
    let started = Instant::now();
    drop(stream);
    assert!(started.elapsed() < Duration::from_secs(10), "drop took {:?}", started.elapsed());
    assert_eq!(first.host_bytes().unwrap(), &data[..]);
}

#[test]
fn a_cancelled_token_ends_the_stream_with_cancelled() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "m.safetensors", 4);
    let token = CancelToken::new();
    token.cancel();
    let mut stream = Loader::new().device(Device::Cpu).cancel_token(token).stream(&path, 1 << 20).unwrap();
    assert!(matches!(stream.next(), Some(Err(Error::Cancelled))));
    assert!(stream.next().is_none());
}

#[test]
fn options_a_stream_cannot_honour_are_errors_before_it_starts() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "m.safetensors", 5);
    let cpu = Loader::new().device(Device::Cpu);
    let largest = cpu.describe(&path).unwrap().into_iter().max_by_key(|t| t.byte_len).unwrap();
    let err = cpu.stream(&path, largest.byte_len - 1).unwrap_err();
    assert!(matches!(&err, Error::WindowTooSmall { tensor, .. } if *tensor == largest.name), "{err}");
    assert_eq!(err.kind(), ErrorKind::Usage);
    assert!(err.to_string().contains(&largest.name), "{err}");
    assert_eq!(Loader::new().device(Device::Null).stream(&path, 1 << 30).unwrap_err().kind(), ErrorKind::Usage);
    let bad_shard = cpu.clone().shard(0, 3).split("*", 0).stream(&path, 1 << 30).unwrap_err();
    assert!(matches!(bad_shard, Error::BadShard { .. }), "{bad_shard}");
}

#[test]
fn the_cli_streams_with_the_same_shapes_and_checksums_as_a_load() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "m.safetensors", 6);
    let run = |extra: &[&str]| -> serde_json::Value {
        let out = std::process::Command::new(common::weightstream_bin())
            .args(["load", path.to_str().unwrap(), "--dtype", "f16", "--json"])
            .args(["--shard", "1/2", "--split", "*=0"])
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let (loaded, streamed, ring) = (
        run(&["--device", "cpu", "--checksum"]),
        run(&["--device", "cpu", "--checksum", "--stream", "1M"]),
        run(&["--device", "null"]),
    );
    assert_eq!(streamed["tensors"], loaded["tensors"]);
    assert_eq!(streamed["bytes_loaded"], loaded["bytes_loaded"]);
    // Each tensor's own bytes at least (an in-place load reads exactly those); at most what a
    // ring load reads, whose extents read through small gaps between shards' blocks.
    let read = |v: &serde_json::Value| v["bytes_read"].as_u64().unwrap();
    assert!(read(&loaded) <= read(&streamed) && read(&streamed) <= read(&ring), "{streamed} {loaded} {ring}");
    assert_eq!(streamed["stream_window_bytes"], 1 << 20);
    let small = std::process::Command::new(common::weightstream_bin())
        .args(["load", path.to_str().unwrap(), "--device", "cpu", "--stream", "4K"])
        .output()
        .unwrap();
    assert!(!small.status.success());
    assert!(String::from_utf8_lossy(&small.stderr).contains("window"), "{}", String::from_utf8_lossy(&small.stderr));
}
