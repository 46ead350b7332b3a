//! A remote load keeps host memory at its ring, whatever the checkpoint's size: 512 MiB from
//! nginx on the loopback to `null` (nothing kept) and streamed with a 64 MiB window, RssAnon
//! sampled while it runs. Alone in its binary, one test: other tests beside it would move the
//! process's RssAnon.
#![cfg(feature = "remote")]

mod common;
mod remote_support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use remote_support::{HttpServer, RemoteServer};
use weightstream::format::{write_file, WriteTensor};
use weightstream::{Device, Dtype, Loader};

fn rss_anon() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s.lines().find(|l| l.starts_with("RssAnon:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

/// The peak of RssAnon above `base` while `f` runs, sampled every 2 ms on another thread.
fn peak_during<T>(base: u64, f: impl FnOnce() -> T) -> (T, u64) {
    let (stop, peak) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
    let sampler = {
        let (stop, peak) = (Arc::clone(&stop), Arc::clone(&peak));
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(rss_anon().saturating_sub(base), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    let out = f();
    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    (out, peak.load(Ordering::Relaxed))
}

#[test]
fn remote_loads_keep_host_memory_at_the_ring() {
    let Some(http) = HttpServer::start() else { return };
    const TENSOR: usize = 8 << 20;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.safetensors");
    {
        let data = common::pattern(9, TENSOR);
        let names: Vec<String> = (0..64).map(|i| format!("t{i}")).collect();
        let ws: Vec<_> =
            names.iter().map(|n| WriteTensor::new(n.clone(), Dtype::U8, vec![TENSOR as u64], &data)).collect();
        write_file(&path, &ws, &Default::default()).unwrap();
    }
    // Into nginx's root without a copy in this process (a rename, same file system or not).
    std::fs::copy(&path, http.root().join("big.safetensors")).unwrap();
    drop(dir);
    let url = http.url("big.safetensors");
    let mut loader = Loader::new().device(Device::Null);
    for (k, v) in http.options() {
        loader = loader.storage_option(k, v);
    }
    let ring = loader.remote_ring_dims(Device::Null);
    let ring = (ring.0 * ring.1) as u64;
    // Opening warms the runtime and the client; the load then allocates its ring (counted).
    loader.open(&url).unwrap();
    let base = rss_anon();
    let (model, peak) = peak_during(base, || loader.load(&url).unwrap());
    assert_eq!(model.stats().bytes_read, 64 * TENSOR as u64);
    let limit = ring + (64 << 20);
    println!("null: RssAnon peak +{} MiB (ring {} MiB, limit {} MiB)", peak >> 20, ring >> 20, limit >> 20);
    assert!(peak <= limit, "a 512 MiB remote load to null grew RssAnon by {} MiB", peak >> 20);

    // Streamed to host memory, each tensor dropped once seen: the window, the ring, 64 MiB.
    let window: u64 = 64 << 20;
    let loader = loader.device(Device::Cpu);
    let base = rss_anon();
    let (count, peak) = peak_during(base, || {
        let mut n = 0;
        for t in loader.stream(&url, window).unwrap() {
            let t = t.unwrap();
            assert_eq!(t.host_bytes().unwrap().len(), TENSOR);
            n += 1;
        }
        n
    });
    assert_eq!(count, 64);
    let limit = window + ring + (64 << 20);
    println!("stream: RssAnon peak +{} MiB (limit {} MiB)", peak >> 20, limit >> 20);
    assert!(peak <= limit, "a 512 MiB remote stream grew RssAnon by {} MiB", peak >> 20);
}
