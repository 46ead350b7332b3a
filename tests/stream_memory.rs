//! `Loader::stream` keeps anonymous memory within window + ring + 64 MiB while the consumer drops
//! each tensor, whatever the checkpoint's size. Alone in its binary: other tests running beside
//! it would move the process's RssAnon.

mod common;

use std::time::Duration;

use weightstream::format::{write_file, WriteTensor};
use weightstream::{Device, Dtype, Loader};

fn rss_anon() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s.lines().find(|l| l.starts_with("RssAnon:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

#[test]
fn streaming_ten_windows_while_dropping_each_tensor_stays_within_window_and_ring() {
    const WINDOW: u64 = 32 << 20;
    const TENSOR: usize = 4 << 20;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.safetensors");
    // 80 tensors of 4 MiB, 320 MiB in all: ten windows. One 4 MiB slice written 80 times, each
    // tensor told apart by its first 8 bytes, so the test itself holds little.
    let mut data = common::pattern(7, TENSOR);
    let mut file = Vec::new();
    for i in 0..80u64 {
        data[..8].copy_from_slice(&i.to_le_bytes());
        file.push(data.clone());
    }
    let ws: Vec<_> = file
        .iter()
        .enumerate()
        .map(|(i, d)| WriteTensor::new(format!("t{i}"), Dtype::U8, vec![TENSOR as u64], d))
        .collect();
    write_file(&path, &ws, &Default::default()).unwrap();
    drop(ws);
    drop(file);
    let loader = Loader::new().device(Device::Cpu);
    let ring = loader.staging_bytes() as u64;
    let before = rss_anon();
    let mut stream = loader.stream(&path, WINDOW).unwrap();
    let mut peak = 0u64;
    let mut count = 0u64;
    while let Some(t) = stream.next() {
        let t = t.unwrap();
        let b = t.host_bytes().unwrap();
        assert_eq!(b[..8], count.to_le_bytes(), "tensor {count} in file order");
        assert!(b[8..] == data[8..], "bytes of {}", t.name());
        if count == 0 {
            // A producer that ignored the window would load the whole file meanwhile.
            std::thread::sleep(Duration::from_millis(500));
        }
        assert!(stream.bytes_in_flight() <= WINDOW, "{} in flight", stream.bytes_in_flight());
        peak = peak.max(rss_anon().saturating_sub(before));
        count += 1;
        drop(t);
    }
    assert_eq!(count, 80);
    let bound = WINDOW + ring + (64 << 20);
    eprintln!("RssAnon peak +{} MiB (bound {} MiB)", peak >> 20, bound >> 20);
    assert!(peak <= bound, "RssAnon grew by {peak} bytes, more than window + ring + 64 MiB = {bound}");
}
