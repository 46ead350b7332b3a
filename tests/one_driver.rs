//! Every way of loading runs through the one driver, so what a load offers the others offer too:
//! progress, cancellation and trace through `stream` and `load_into`; and `load_with`, the
//! caller-owned sink, gets the same bytes a load keeps, in file order.

mod common;

use common::pattern;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use weightstream::format::{write_file, WriteTensor};
use weightstream::io::IoKind;
use weightstream::progress::{Progress, ProgressFn};
use weightstream::{CancelToken, Destination, Device, Dtype, Error, ErrorKind, Loader, TensorPiece, MIN_STAGING_SIZE};

/// 12 tensors, some of several MiB (several pieces through small slots), some tiny; F32 and U8.
fn write(dir: &Path) -> PathBuf {
    let specs: Vec<(String, Dtype, Vec<u64>)> = (0..12u64)
        .map(|i| match i % 3 {
            0 => (format!("t.{i}"), Dtype::F32, vec![256, 1024 + i]),
            1 => (format!("t.{i}"), Dtype::U8, vec![17 * i + 1]),
            _ => (format!("t.{i}"), Dtype::F32, vec![64, 3000]),
        })
        .collect();
    let data: Vec<Vec<u8>> = specs
        .iter()
        .enumerate()
        .map(|(i, (_, d, s))| pattern(i as u64 + 7, d.bytes_for(s.iter().product::<u64>()).unwrap() as usize))
        .collect();
    let tensors: Vec<WriteTensor<'_>> =
        specs.iter().zip(&data).map(|((n, d, s), b)| WriteTensor::new(n.clone(), *d, s.clone(), b)).collect();
    let path = dir.join("m.safetensors");
    write_file(&path, &tensors, &Default::default()).unwrap();
    path
}

/// Every progress report: bytes done, bytes in all.
type Seen = Arc<Mutex<Vec<(u64, u64)>>>;

/// A progress callback that records every report.
fn recorder() -> (ProgressFn, Seen) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = Arc::clone(&seen);
    let f: ProgressFn = Arc::new(move |p: &Progress| s.lock().unwrap().push((p.bytes_done, p.bytes_total)));
    (f, seen)
}

/// Reports rise, share one total, and end at it: the bytes the load read.
fn check_progress(seen: &[(u64, u64)], bytes_read: u64) {
    assert!(seen.len() > 1, "progress was reported {} times", seen.len());
    let total = seen[0].1;
    assert!(seen.iter().all(|&(_, t)| t == total), "the total changed: {seen:?}");
    assert!(seen.windows(2).all(|w| w[0].0 < w[1].0), "progress did not rise: {seen:?}");
    assert_eq!(seen.last().unwrap().0, total);
    assert_eq!(total, bytes_read);
}

#[test]
fn a_stream_reports_progress_over_all_its_batches_and_keeps_a_trace() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path());
    let (progress, seen) = recorder();
    let loader = Loader::new().device(Device::Cpu).progress(progress).trace(true);
    // A 2 MiB window: several batches.
    let mut stream = loader.stream(&path, 2 << 20).unwrap();
    assert!(stream.trace().is_none(), "a trace before the stream ended");
    let mut n = 0;
    for t in stream.by_ref() {
        t.unwrap();
        n += 1;
    }
    assert_eq!(n, 12);
    check_progress(&seen.lock().unwrap(), stream.bytes_read());
    let trace = stream.trace().expect("no trace after the stream ended");
    let reads = trace.spans().iter().filter(|s| s.name == "read").count();
    assert!(reads > 1, "{reads} read spans");
}

#[test]
fn a_stream_stops_when_its_token_is_cancelled_from_progress() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path());
    let token = CancelToken::new();
    let t = token.clone();
    let progress: ProgressFn = Arc::new(move |_| t.cancel());
    let loader = Loader::new().device(Device::Cpu).progress(progress).cancel_token(token);
    let items: Vec<_> = loader.stream(&path, 2 << 20).unwrap().collect();
    let last = items.last().expect("no items");
    assert!(matches!(last, Err(Error::Cancelled)), "last item: {last:?}");
    assert!(items.len() < 12, "every tensor came out of a cancelled stream");
}

#[test]
fn load_into_reports_progress_keeps_a_trace_and_stops_when_cancelled() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path());
    let model = Loader::new().device(Device::Cpu).load(&path).unwrap();
    let mut bufs: Vec<(String, Vec<u8>)> =
        model.tensors().map(|t| (t.name().to_string(), vec![0u8; t.byte_len() as usize])).collect();
    let (progress, seen) = recorder();
    // Through small slots of the ring (O_DIRECT-free, io_uring asked for a converting load
    // would also do): in place or ring, progress and trace are the driver's.
    let loader = Loader::new().device(Device::Cpu).progress(progress).trace(true);
    let dests = bufs.iter_mut().map(|(n, b)| (n.clone(), Destination::Host(b)));
    let stats = loader.load_into(&path, dests).unwrap();
    check_progress(&seen.lock().unwrap(), stats.bytes_read);
    assert!(!stats.trace.as_ref().expect("no trace").spans().is_empty());
    for (name, b) in &bufs {
        assert_eq!(b, &model.tensor(name).unwrap().to_host_vec().unwrap(), "{name}");
    }

    let token = CancelToken::new();
    let t = token.clone();
    let progress: ProgressFn = Arc::new(move |_| t.cancel());
    let dests = bufs.iter_mut().map(|(n, b)| (n.clone(), Destination::Host(b)));
    let err = Loader::new().device(Device::Cpu).progress(progress).cancel_token(token).load_into(&path, dests);
    assert!(matches!(err, Err(Error::Cancelled)), "{err:?}");
}

/// Every piece `load_with` handed out, in order.
fn pieces_of(loader: &Loader, path: &Path) -> Vec<(String, u64, Vec<u8>)> {
    let mut got = Vec::new();
    let mut sink = |p: &TensorPiece<'_>| {
        got.push((p.name.to_string(), p.offset, p.bytes.to_vec()));
        Ok(())
    };
    loader.load_with(path, &mut sink).unwrap();
    got
}

#[test]
fn load_with_hands_out_a_loads_bytes_in_file_order_converted_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path());
    // Small slots and many pread workers: several pieces per big tensor, and slots that land
    // out of order (the sink must still see file order).
    for (dtype, io) in [(None, IoKind::Pread), (Some(Dtype::BF16), IoKind::Pread), (None, IoKind::Auto)] {
        let mut loader =
            Loader::new().device(Device::Cpu).io(io).threads(8).staging_size(MIN_STAGING_SIZE).staging_count(6);
        if let Some(d) = dtype {
            loader = loader.dtype(d);
        }
        let model = loader.load(&path).unwrap();
        let got = pieces_of(&loader, &path);
        let names: Vec<&str> = model.tensors().map(|t| t.name()).collect();
        let mut order: Vec<&str> = got.iter().map(|(n, _, _)| n.as_str()).collect();
        order.dedup();
        assert_eq!(order, names, "tensors out of file order ({dtype:?}, {io:?})");
        assert!(got.len() > names.len(), "no tensor came in several pieces");
        for t in model.tensors() {
            let mut at = 0;
            let mut bytes = Vec::new();
            for (_, offset, b) in got.iter().filter(|(n, _, _)| n == t.name()) {
                assert_eq!(*offset, at, "{}: a gap or a repeat", t.name());
                at += b.len() as u64;
                bytes.extend_from_slice(b);
            }
            assert_eq!(bytes, t.to_host_vec().unwrap(), "{} ({dtype:?}, {io:?})", t.name());
        }
    }
}

#[test]
fn a_failing_tensor_sink_stops_the_load_naming_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path());
    let mut sink = |p: &TensorPiece<'_>| match p.name {
        "t.4" => Err("disk full".into()),
        _ => Ok(()),
    };
    let err = Loader::new().load_with(&path, &mut sink).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Io);
    assert!(matches!(&err, Error::Sink { tensor, .. } if tensor == "t.4"), "{err:?}");
    assert!(err.to_string().contains("disk full"), "{err}");

    let err = Loader::new().zero_copy(true).load_with(&path, &mut |_: &TensorPiece<'_>| Ok(())).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Usage, "{err}");
}

#[test]
fn a_stream_that_fails_still_has_its_trace_once_it_ended() {
    // The iterator ends on the error item: the trace must be there by then, every time.
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path());
    let at = std::fs::metadata(&path).unwrap().len() - 100; // inside the last tensor
    for _ in 0..20 {
        let loader = Loader::new()
            .device(Device::Cpu)
            .io(IoKind::Pread)
            .inject_fault(weightstream::Fault::EioAt(at))
            .trace(true);
        let mut stream = loader.stream(&path, 2 << 20).unwrap();
        let last = stream.by_ref().last().expect("no items");
        assert!(last.is_err(), "the injected error did not come out");
        assert!(stream.trace().is_some(), "no trace after the error item");
    }
}
