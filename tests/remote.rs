//! Remote sources against real servers on the loopback (`tests/remote_support`): S3 (moto),
//! HTTP (nginx), Azure (Azurite) and GCS (where its emulator works), each started as its own
//! process; faults injected by a proxy in front of them. Each server's tests skip with one line
//! when its program is not installed (`scripts/install_test_servers.sh` installs them; CI sets
//! `WEIGHTSTREAM_REQUIRE_SERVERS=1`, which turns a skip into a failure).
#![cfg(feature = "remote")]

mod common;
mod remote_support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use remote_support::{AzureServer, FaultProxy, GcsServer, HttpServer, RemoteServer, S3Server, Schedule};
use weightstream::format::{write_file, WriteTensor};
use weightstream::{Device, Dtype, Error, ErrorKind, LoadedModel, Loader, RemoteFailure};

/// Tensors of odd lengths at odd offsets: every GET boundary lands mid-tensor somewhere.
fn tensors(seed: u64) -> Vec<(String, Dtype, Vec<u64>, Vec<u8>)> {
    let sizes: [(Dtype, Vec<u64>); 7] = [
        (Dtype::U8, vec![1]),
        (Dtype::U8, vec![100_003]),
        (Dtype::F32, vec![301, 257]),
        (Dtype::BF16, vec![3, 5, 7]),
        (Dtype::U8, vec![0]),
        (Dtype::F16, vec![131_071]),
        (Dtype::I64, vec![9, 1_001]),
    ];
    sizes
        .into_iter()
        .enumerate()
        .map(|(i, (dtype, shape))| {
            let n: u64 = shape.iter().product::<u64>() * dtype.bits() / 8;
            (format!("layer.{i}.w"), dtype, shape, common::pattern(seed + i as u64, n as usize))
        })
        .collect()
}

fn write(path: &Path, ts: &[(String, Dtype, Vec<u64>, Vec<u8>)]) {
    let w: Vec<WriteTensor> = ts.iter().map(|(n, d, s, b)| WriteTensor::new(n.clone(), *d, s.clone(), b)).collect();
    write_file(path, &w, &Default::default()).unwrap();
}

/// A local checkpoint in three layouts: `single/model.safetensors`, and `sharded/` with two
/// shards and `model.safetensors.index.json`.
fn layouts(dir: &Path) -> PathBuf {
    let ts = tensors(7);
    std::fs::create_dir_all(dir.join("single")).unwrap();
    write(&dir.join("single/model.safetensors"), &ts);
    std::fs::create_dir_all(dir.join("sharded")).unwrap();
    let (a, b) = ts.split_at(4);
    write(&dir.join("sharded/model-00001-of-00002.safetensors"), a);
    write(&dir.join("sharded/model-00002-of-00002.safetensors"), b);
    let map: serde_json::Map<String, serde_json::Value> = a
        .iter()
        .map(|t| (t.0.clone(), "model-00001-of-00002.safetensors".into()))
        .chain(b.iter().map(|t| (t.0.clone(), "model-00002-of-00002.safetensors".into())))
        .collect();
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map});
    std::fs::write(dir.join("sharded/model.safetensors.index.json"), index.to_string()).unwrap();
    dir.to_path_buf()
}

/// Upload every file of `local` under `prefix/`.
fn upload(server: &dyn RemoteServer, local: &Path, prefix: &str) {
    for e in std::fs::read_dir(local).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().into_string().unwrap();
        server.put(&format!("{prefix}/{name}"), &std::fs::read(e.path()).unwrap());
    }
}

fn loader_for(server: &dyn RemoteServer) -> Loader {
    let mut l = Loader::new().device(Device::Cpu);
    for (k, v) in server.options() {
        l = l.storage_option(k, v);
    }
    l
}

fn assert_same(got: &LoadedModel, want: &LoadedModel, what: &str) {
    let names = |m: &LoadedModel| m.tensors().map(|t| t.name().to_string()).collect::<Vec<_>>();
    assert_eq!(names(got), names(want), "{what}");
    for w in want.tensors() {
        let g = got.tensor(w.name()).unwrap();
        assert_eq!((g.dtype(), g.shape()), (w.dtype(), w.shape()), "{what}: {}", w.name());
        assert!(g.to_host_vec().unwrap() == w.to_host_vec().unwrap(), "{what}: bytes of {}", w.name());
    }
}

/// Every layout, remote, equals the local load byte for byte; with small GETs and short reads
/// too (ranges at odd offsets, resumed mid-request).
fn layouts_equal_local(server: &dyn RemoteServer, name: &str) {
    let dir = tempfile::tempdir().unwrap();
    let local = layouts(dir.path());
    upload(server, &local.join("single"), "single");
    upload(server, &local.join("sharded"), "sharded");
    let cases = [
        ("single/model.safetensors", local.join("single/model.safetensors")),
        ("sharded/model.safetensors.index.json", local.join("sharded/model.safetensors.index.json")),
        ("sharded", local.join("sharded")),
        ("single/", local.join("single")),
    ];
    let want_of = |p: &Path| Loader::new().device(Device::Cpu).load(p).unwrap();
    for (key, path) in &cases {
        let want = want_of(path);
        let url = server.url(key);
        for (how, loader) in [
            ("defaults", loader_for(server)),
            ("64 KiB GETs, 3 in flight", loader_for(server).remote_request_size(64 << 10).remote_concurrency(3)),
            (
                "short reads of 4099 bytes",
                loader_for(server)
                    .remote_request_size(64 << 10)
                    .inject_fault(weightstream::io::Fault::ShortReads(4099)),
            ),
            ("64 KiB ring slots", loader_for(server).staging_size(64 << 10).staging_count(3)),
        ] {
            let got = loader.load(&url).unwrap_or_else(|e| panic!("{name} {url} ({how}): {e}"));
            assert_same(&got, &want, &format!("{name} {url} ({how})"));
            assert_eq!(got.stats().io, "remote");
        }
        // To `null` too: everything read, nothing kept.
        let null = loader_for(server).device(Device::Null).load(&url).unwrap();
        assert_eq!(null.stats().bytes_read, want.stats().bytes_read, "{name} {url} null");
    }
}

#[test]
fn s3_layouts_equal_local_loads() {
    let Some(s3) = S3Server::start() else { return };
    layouts_equal_local(&s3, "s3");
}

#[test]
fn http_layouts_equal_local_loads() {
    let Some(http) = HttpServer::start() else { return };
    layouts_equal_local(&http, "http");
}

#[test]
fn azure_layouts_equal_local_loads() {
    let Some(az) = AzureServer::start() else { return };
    layouts_equal_local(&az, "azure");
}

#[test]
fn gcs_layouts_equal_local_loads() {
    let Some(gcs) = GcsServer::start() else { return };
    layouts_equal_local(&gcs, "gcs");
}

/// A plan of mostly large tensors reads straight into the arena (no ring: staging 0), in
/// GETs of at most a request, and equals the local load; one of many small ones goes through the
/// ring.
fn large_tensors_load_in_place(server: &dyn RemoteServer, name: &str) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("large.safetensors");
    let mut ts = tensors(21)[..2].to_vec();
    for i in 0..3u64 {
        let n = 393_216 + 3 + i as usize;
        ts.push((format!("big.{i}"), Dtype::F32, vec![n as u64], common::pattern(40 + i, n * 4)));
    }
    write(&p, &ts);
    server.put("large.safetensors", &std::fs::read(&p).unwrap());
    let want = Loader::new().device(Device::Cpu).load(&p).unwrap();
    let url = server.url("large.safetensors");
    for (how, loader) in [
        ("256 KiB GETs", loader_for(server).remote_request_size(256 << 10)),
        (
            "256 KiB GETs, short reads",
            loader_for(server).remote_request_size(256 << 10).inject_fault(weightstream::io::Fault::ShortReads(70_001)),
        ),
    ] {
        let got = loader.load(&url).unwrap_or_else(|e| panic!("{name} ({how}): {e}"));
        assert_same(&got, &want, &format!("{name} in place ({how})"));
        assert_eq!(got.stats().staging_bytes, 0, "{name} ({how}): read in place");
    }
    // load_into and stream choose the same way: in place into the caller's buffers and batches.
    let loader = loader_for(server).remote_request_size(256 << 10);
    let mut bufs: Vec<(String, Vec<u8>)> =
        want.tensors().map(|t| (t.name().to_string(), vec![0u8; t.byte_len() as usize])).collect();
    let dests = bufs.iter_mut().map(|(n, b)| (n.clone(), weightstream::Destination::Host(b.as_mut_slice())));
    let stats = loader.load_into(&url, dests).unwrap();
    assert_eq!(stats.staging_bytes, 0, "{name}: load_into in place");
    for (n, b) in &bufs {
        assert!(*b == want.tensor(n).unwrap().to_host_vec().unwrap(), "{name}: load_into {n}");
    }
    for t in loader.stream(&url, 16 << 20).unwrap() {
        let t = t.unwrap();
        assert!(t.host_bytes().unwrap() == want.tensor(t.name()).unwrap().to_host_vec().unwrap(), "{name}: stream");
    }
    // 8 MiB GETs: 3 large GETs against 2 small ones, so the ring.
    let got = loader_for(server).load(&url).unwrap();
    assert_same(&got, &want, &format!("{name} through the ring"));
    assert!(got.stats().staging_bytes > 0, "{name}: through the ring");
}

#[test]
fn http_large_tensors_load_in_place() {
    let Some(http) = HttpServer::start() else { return };
    large_tensors_load_in_place(&http, "http");
}

#[test]
fn s3_large_tensors_load_in_place() {
    let Some(s3) = S3Server::start() else { return };
    large_tensors_load_in_place(&s3, "s3");
}

/// A URL that answers with a redirect (as the Hugging Face Hub's `resolve/` URLs do) loads
/// from where it leads, every layout: the file, the index and its shards, the conventional
/// names of a prefix.
#[test]
fn http_redirects_are_followed() {
    let Some(http) = HttpServer::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let local = layouts(dir.path());
    upload(&http, &local.join("single"), "single");
    upload(&http, &local.join("sharded"), "sharded");
    let port: u16 = http.endpoint().rsplit(':').next().unwrap().parse().unwrap();
    let answer = remote_support::raw_request(port, "HEAD", "/redirect/single/model.safetensors", &[], &[]).unwrap();
    assert_eq!(answer.status, 302, "the server redirects");
    for (key, path) in [
        ("redirect/single/model.safetensors", local.join("single/model.safetensors")),
        ("redirect/sharded/model.safetensors.index.json", local.join("sharded")),
        ("redirect/sharded/", local.join("sharded")),
    ] {
        let want = Loader::new().device(Device::Cpu).load(&path).unwrap();
        let url = http.url(key);
        let got = loader_for(&http).remote_request_size(64 << 10).load(&url).unwrap_or_else(|e| panic!("{url}: {e}"));
        assert_same(&got, &want, &url);
    }
}

/// The other ways to hand tensors over read remote sources as they read local ones.
#[test]
fn stream_load_into_and_describe_read_remote_objects() {
    let Some(s3) = S3Server::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let local = layouts(dir.path());
    upload(&s3, &local.join("sharded"), "m");
    let want = Loader::new().device(Device::Cpu).load(local.join("sharded")).unwrap();
    let url = s3.url("m");
    let loader = loader_for(&s3).remote_request_size(64 << 10);
    let streamed: Vec<_> = loader.stream(&url, 1 << 20).unwrap().collect::<weightstream::Result<_>>().unwrap();
    assert_eq!(streamed.len(), want.len());
    for s in &streamed {
        assert!(s.host_bytes().unwrap() == want.tensor(s.name()).unwrap().to_host_vec().unwrap(), "{}", s.name());
    }
    let infos = loader.describe(&url).unwrap();
    assert_eq!(infos.len(), want.len());
    let mut bufs: Vec<(String, Vec<u8>)> =
        want.tensors().map(|t| (t.name().to_string(), vec![0u8; t.byte_len() as usize])).collect();
    let dests = bufs.iter_mut().map(|(n, b)| (n.clone(), weightstream::Destination::Host(b.as_mut_slice())));
    loader.load_into(&url, dests).unwrap();
    for (n, b) in &bufs {
        assert!(*b == want.tensor(n).unwrap().to_host_vec().unwrap(), "load_into {n}");
    }
}

/// An object replaced after its header was read, or while its data is read, is an error that
/// names it: never a mix of old and new bytes.
fn replaced_object_is_an_error<S: RemoteServer + Sync>(server: &S, name: &str) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.safetensors");
    write(&p, &tensors(1));
    let bytes = std::fs::read(&p).unwrap();
    let mut changed = bytes.clone();
    let last = changed.len() - 1;
    changed[last] ^= 0xff; // same size, same header, one data byte differs
    server.put("m.safetensors", &bytes);
    let url = server.url("m.safetensors");

    // Replaced between open and load.
    let loader = loader_for(server).remote_request_size(64 << 10).remote_concurrency(1);
    let ckpt = loader.open(&url).unwrap();
    server.put("m.safetensors", &changed);
    let err = loader.load_checkpoint(&ckpt).expect_err("a replaced object must not load");
    assert_changed(&err, &url, name);

    // Replaced mid-load: the first progress report (one 64 KiB slot landed) has a thread that
    // may borrow the server replace the object, and waits until it has.
    server.put("m.safetensors", &bytes);
    let (ask, asked) = std::sync::mpsc::channel::<()>();
    let (done, replaced) = std::sync::mpsc::channel::<()>();
    let (ask, replaced) = (std::sync::Mutex::new(Some(ask)), std::sync::Mutex::new(replaced));
    let loader = loader_for(server)
        .remote_request_size(64 << 10)
        .remote_concurrency(1)
        .staging_size(64 << 10)
        .staging_count(1)
        .progress(Arc::new(move |_p| {
            if let Some(ask) = ask.lock().unwrap().take() {
                ask.send(()).unwrap();
                replaced.lock().unwrap().recv().unwrap();
            }
        }));
    let err = std::thread::scope(|scope| {
        scope.spawn(move || {
            if asked.recv().is_ok() {
                server.put("m.safetensors", &changed);
                done.send(()).unwrap();
            }
        });
        // The loader (and the request sender in its callback) dies here on every path, so the
        // thread above ends even if no progress was reported.
        let loader = loader;
        loader.load(&url).expect_err("an object replaced mid-load must not load")
    });
    assert_changed(&err, &url, name);
}

fn assert_changed(err: &Error, url: &str, name: &str) {
    match err {
        Error::Remote { file, failure: RemoteFailure::Changed, .. } => assert_eq!(file, Path::new(url), "{name}"),
        other => panic!("{name}: expected an object-changed error, got {other:?}"),
    }
    assert_eq!(err.kind(), ErrorKind::Source);
    assert!(err.to_string().starts_with(url), "{name}: {err}");
}

#[test]
fn s3_object_replaced_during_a_load_is_an_error() {
    let Some(s3) = S3Server::start() else { return };
    replaced_object_is_an_error(&s3, "s3");
}

#[test]
fn http_object_replaced_during_a_load_is_an_error() {
    let Some(http) = HttpServer::start() else { return };
    replaced_object_is_an_error(&http, "http");
}

/// fake-gcs-server ignores `If-Match`: the answer's ETag, compared with the header read's,
/// catches the change.
#[test]
fn gcs_object_replaced_during_a_load_is_an_error() {
    let Some(gcs) = GcsServer::start() else { return };
    replaced_object_is_an_error(&gcs, "gcs");
}

#[test]
fn azure_object_replaced_during_a_load_is_an_error() {
    let Some(az) = AzureServer::start() else { return };
    replaced_object_is_an_error(&az, "azure");
}

/// Through the fault proxy: 503s and 429s that stop are retried through; ones that do not are
/// an error naming the status, after exactly the retries allowed.
#[test]
fn server_errors_are_retried_then_given_up() {
    let Some(s3) = S3Server::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.safetensors");
    write(&p, &tensors(3));
    s3.put("m.safetensors", &std::fs::read(&p).unwrap());
    let want = Loader::new().device(Device::Cpu).load(&p).unwrap();
    let proxy = FaultProxy::start(&s3.endpoint(), Schedule::PassThrough);
    let via = |retries: usize| {
        let mut l = Loader::new().device(Device::Cpu).remote_request_size(64 << 10);
        for (k, v) in s3.options_via(&proxy.endpoint()) {
            l = l.storage_option(k, v);
        }
        l.storage_option("max_retries", retries.to_string())
    };
    let url = s3.url_via(&proxy.endpoint(), "m.safetensors");
    for status in [503, 500, 429] {
        proxy.set_schedule(Schedule::FailThenPass { status, times: 3 });
        let before = proxy.injected();
        let got = via(5).load(&url).unwrap_or_else(|e| panic!("{status} three times, then served: {e}"));
        assert_same(&got, &want, &format!("after {status}s"));
        assert_eq!(proxy.injected() - before, 3, "{status}: three answers injected");
    }
    proxy.set_schedule(Schedule::AlwaysFail { status: 503 });
    let before = proxy.requests();
    let err = via(2).load(&url).expect_err("503 forever");
    match &err {
        Error::Remote { failure: RemoteFailure::Status(503), file, .. } => assert_eq!(file, Path::new(&url)),
        other => panic!("expected a 503 error, got {other:?}"),
    }
    assert_eq!(err.kind(), ErrorKind::Io);
    assert_eq!(proxy.requests() - before, 3, "one request and two retries, then it gave up");
}

/// Data GETs that fail for good name the tensor they were for.
#[test]
fn a_failed_data_request_names_the_tensor() {
    let Some(http) = HttpServer::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.safetensors");
    write(&p, &tensors(4));
    http.put("m.safetensors", &std::fs::read(&p).unwrap());
    let proxy = FaultProxy::start(&http.endpoint(), Schedule::PassThrough);
    let url = http.url_via(&proxy.endpoint(), "m.safetensors");
    let loader = Loader::new().device(Device::Cpu).storage_option("max_retries", "0");
    let ckpt = loader.open(&url).unwrap();
    proxy.set_schedule(Schedule::AlwaysFail { status: 500 });
    let err = loader.load_checkpoint(&ckpt).expect_err("500 forever");
    match &err {
        Error::Remote { failure: RemoteFailure::Status(500), tensor: Some(t), .. } => {
            assert!(t.starts_with("layer."), "{t}")
        }
        other => panic!("expected a 500 naming a tensor, got {other:?}"),
    }
}

/// A server that accepts and never answers: a timeout, after the retries allowed, in bounded time.
#[test]
fn a_stalled_server_times_out() {
    let Some(http) = HttpServer::start() else { return };
    http.put("m.safetensors", &std::fs::read(small_file().path().join("m.safetensors")).unwrap());
    let proxy = FaultProxy::start(&http.endpoint(), Schedule::AlwaysStall);
    let url = http.url_via(&proxy.endpoint(), "m.safetensors");
    let started = Instant::now();
    let err = Loader::new()
        .device(Device::Cpu)
        .storage_option("timeout", "1s")
        .storage_option("max_retries", "1")
        .load(&url)
        .expect_err("a stalled server");
    assert!(matches!(err, Error::Remote { failure: RemoteFailure::TimedOut, .. }), "expected a timeout, got {err:?}");
    assert!(started.elapsed() < Duration::from_secs(20), "gave up in {:?}", started.elapsed());
}

/// Cancelling a load whose server stalls ends it at once (its requests dropped), not after the
/// server's timeout and retries.
#[test]
fn cancelling_a_load_from_a_stalled_server_ends_it_at_once() {
    let Some(http) = HttpServer::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    write(&dir.path().join("m.safetensors"), &tensors(6));
    http.put("m.safetensors", &std::fs::read(dir.path().join("m.safetensors")).unwrap());
    let proxy = FaultProxy::start(&http.endpoint(), Schedule::PassThrough);
    let url = http.url_via(&proxy.endpoint(), "m.safetensors");
    let token = weightstream::CancelToken::new();
    let loader = Loader::new()
        .device(Device::Cpu)
        .cancel_token(token.clone())
        .storage_option("timeout", "60s")
        .remote_request_size(64 << 10);
    let ckpt = loader.open(&url).unwrap();
    proxy.set_schedule(Schedule::AlwaysStall);
    let canceller = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        token.cancel();
        Instant::now()
    });
    let err = loader.load_checkpoint(&ckpt).expect_err("a cancelled load");
    let cancelled_at = canceller.join().unwrap();
    assert!(matches!(err, Error::Cancelled), "expected Cancelled, got {err:?}");
    assert!(cancelled_at.elapsed() < Duration::from_secs(5), "ended {:?} after the cancel", cancelled_at.elapsed());
    assert!(proxy.requests() > 3, "data requests reached the stalled server");

    // Opening (the header reads) stops on the token too.
    let token = weightstream::CancelToken::new();
    let loader = Loader::new().device(Device::Cpu).cancel_token(token.clone()).storage_option("timeout", "60s");
    let canceller = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        token.cancel();
        Instant::now()
    });
    let err = loader.open(&url).expect_err("a cancelled open");
    let cancelled_at = canceller.join().unwrap();
    assert!(matches!(err, Error::Cancelled), "expected Cancelled, got {err:?}");
    assert!(
        cancelled_at.elapsed() < Duration::from_secs(5),
        "open ended {:?} after the cancel",
        cancelled_at.elapsed()
    );
}

/// Dropping a stream whose server stalls returns at once: the stream's own stop reaches the
/// requests in flight.
#[test]
fn dropping_a_stream_from_a_stalled_server_returns_at_once() {
    let Some(http) = HttpServer::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let big = common::pattern(11, 8 << 20);
    let names: Vec<String> = (0..4).map(|i| format!("t{i}")).collect();
    let ws: Vec<_> =
        names.iter().map(|n| WriteTensor::new(n.clone(), Dtype::U8, vec![big.len() as u64], &big)).collect();
    write_file(dir.path().join("m.safetensors"), &ws, &Default::default()).unwrap();
    http.put("m.safetensors", &std::fs::read(dir.path().join("m.safetensors")).unwrap());
    let proxy = FaultProxy::start(&http.endpoint(), Schedule::PassThrough);
    let url = http.url_via(&proxy.endpoint(), "m.safetensors");
    let loader = Loader::new()
        .device(Device::Cpu)
        .storage_option("timeout", "60s")
        .remote_request_size(64 << 10)
        .remote_concurrency(2);
    let mut stream = loader.stream(&url, 64 << 20).unwrap();
    let first = stream.next().unwrap().unwrap();
    assert_eq!(first.name(), "t0");
    // The other 24 MiB go 64 KiB at a time, two at once: most are still to come.
    proxy.set_schedule(Schedule::AlwaysStall);
    std::thread::sleep(Duration::from_millis(300));
    let dropping = Instant::now();
    drop(stream);
    assert!(dropping.elapsed() < Duration::from_secs(5), "drop took {:?}", dropping.elapsed());
    let stalled = proxy.seen().iter().filter(|s| s.outcome == remote_support::Outcome::Stalled).count();
    assert!(stalled > 0, "requests were stalled while the stream was dropped");
}

fn small_file() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write(&dir.path().join("m.safetensors"), &tensors(5)[..2]);
    dir
}

/// A missing object, a missing bucket and a refused credential: typed errors naming the URL.
#[test]
fn missing_objects_buckets_and_bad_credentials() {
    let Some(s3) = S3Server::start() else { return };
    s3.put("m.safetensors", &std::fs::read(small_file().path().join("m.safetensors")).unwrap());
    let loader = loader_for(&s3);
    let missing = s3.url("nothere.safetensors");
    let err = loader.load(&missing).expect_err("missing key");
    assert!(
        matches!(&err, Error::Remote { failure: RemoteFailure::NotFound, file, .. } if file == Path::new(&missing)),
        "{err:?}"
    );
    let other_bucket = "s3://no-such-bucket-ws/m.safetensors";
    let err = loader.load(other_bucket).expect_err("missing bucket");
    assert!(matches!(&err, Error::Remote { failure: RemoteFailure::NotFound, .. }), "{err:?}");
    assert!(err.to_string().starts_with(other_bucket), "{err}");
    let mut wrong = Loader::new().device(Device::Cpu);
    for (k, v) in s3.options() {
        let v = if k == "aws_secret_access_key" { "wrong-secret".to_string() } else { v };
        wrong = wrong.storage_option(k, v);
    }
    let err = wrong.load(s3.url("m.safetensors")).expect_err("a wrong secret");
    assert!(matches!(&err, Error::Remote { failure: RemoteFailure::Denied, .. }), "{err:?}");
    assert_eq!(err.kind(), ErrorKind::Source);
}

/// Options that remote objects cannot honour, and unknown storage options, are usage errors.
#[test]
fn options_remote_objects_cannot_honour_are_usage_errors() {
    let Some(http) = HttpServer::start() else { return };
    http.put("m.safetensors", &std::fs::read(small_file().path().join("m.safetensors")).unwrap());
    let url = http.url("m.safetensors");
    for loader in [
        Loader::new().device(Device::Cpu).direct(true),
        Loader::new().device(Device::Cpu).io(weightstream::io::IoKind::Pread),
        Loader::new().device(Device::Cpu).storage_option("no_such_option", "1"),
    ] {
        let err = loader.load(&url).expect_err("usage");
        assert_eq!(err.kind(), ErrorKind::Usage, "{err}");
    }
}

/// The malformed files of the local tests, served remotely: the same error as the local load
/// of the same bytes, naming the URL.
#[test]
fn malformed_files_served_remotely_fail_as_local_ones_do() {
    let Some(http) = HttpServer::start() else { return };
    let good = std::fs::read(small_file().path().join("m.safetensors")).unwrap();
    let header_len = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let with_header = |h: &[u8], data: usize| {
        let mut b = (h.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(h);
        b.extend(std::iter::repeat_n(0u8, data));
        b
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("tiny", vec![1, 2, 3, 4, 5]),
        ("header_too_large", [200_000_000u64.to_le_bytes().as_slice(), &[b'{'; 64]].concat()),
        ("header_past_end", [1000u64.to_le_bytes().as_slice(), b"{}"].concat()),
        ("not_json", with_header(b"{not json", 0)),
        ("not_utf8", with_header(&[b'{', 0xff, 0xfe, b'}'], 0)),
        ("offsets_past_data", with_header(br#"{"a":{"dtype":"U8","shape":[10],"data_offsets":[0,10]}}"#, 4)),
        ("truncated_data", good[..8 + header_len + 7].to_vec()),
        (
            "shape_overflow",
            with_header(br#"{"a":{"dtype":"F32","shape":[4294967296,4294967296,4294967296],"data_offsets":[0,4]}}"#, 4),
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (name, bytes) in &cases {
        let local = dir.path().join(format!("{name}.safetensors"));
        std::fs::write(&local, bytes).unwrap();
        let key = format!("bad/{name}.safetensors");
        http.put(&key, bytes);
        let url = http.url(&key);
        let want = Loader::new().device(Device::Cpu).load(&local).expect_err(name);
        let got = Loader::new().device(Device::Cpu).load(&url).expect_err(name);
        assert_eq!(std::mem::discriminant(&got), std::mem::discriminant(&want), "{name}: {got} vs {want}");
        assert_eq!(got.file(), Some(Path::new(&url)), "{name}: {got}");
    }
    // An index whose shard leads outside its prefix.
    let index = serde_json::json!({"weight_map": {"a": "../elsewhere/m.safetensors"}});
    http.put("bad/evil.safetensors.index.json", index.to_string().as_bytes());
    let err = Loader::new().device(Device::Cpu).load(http.url("bad/evil.safetensors.index.json")).unwrap_err();
    assert!(matches!(err, Error::BadIndex { .. }), "{err:?}");
}
