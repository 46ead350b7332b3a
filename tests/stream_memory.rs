//! `Loader::stream` keeps anonymous memory within window + ring + 64 MiB beyond what the consumer
//! holds, whatever the checkpoint's size. Alone in its binary, one test: other tests running
//! beside it would move the process's RssAnon.

mod common;

use std::path::Path;
use std::time::Duration;

use weightstream::format::{write_file, WriteTensor};
use weightstream::{Device, Dtype, Loader, StreamedTensor};

fn rss_anon() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s.lines().find(|l| l.starts_with("RssAnon:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

const WINDOW: u64 = 32 << 20;
const TENSOR: usize = 4 << 20;

/// 80 tensors: `t{i}` of 4 MiB (320 MiB in all: ten windows), each after a 100-byte `s{i}`. One
/// slice written 80 times, each tensor told apart by its first 8 bytes, so the test holds little.
fn write(path: &Path) -> Vec<u8> {
    let mut data = common::pattern(7, TENSOR);
    let mut bufs = Vec::new();
    for i in 0..80u64 {
        data[..8].copy_from_slice(&i.to_le_bytes());
        bufs.push(data.clone());
    }
    let small = [3u8; 100];
    let ws: Vec<_> = bufs
        .iter()
        .enumerate()
        .flat_map(|(i, d)| {
            [
                WriteTensor::new(format!("s{i}"), Dtype::U8, vec![100], &small),
                WriteTensor::new(format!("t{i}"), Dtype::U8, vec![TENSOR as u64], d),
            ]
        })
        .collect();
    write_file(path, &ws, &Default::default()).unwrap();
    data
}

/// Stream `path`, checking every big tensor's bytes and keeping the small ones when `hold_small`;
/// the peak growth of RssAnon over `before` while doing so.
fn stream_peak(path: &Path, data: &[u8], hold_small: bool, before: u64) -> (u64, Vec<StreamedTensor>) {
    let mut stream = Loader::new().device(Device::Cpu).stream(path, WINDOW).unwrap();
    let (mut peak, mut count, mut held) = (0u64, 0u64, Vec::new());
    while let Some(t) = stream.next() {
        let t = t.unwrap();
        if t.name().starts_with('s') {
            assert_eq!(t.host_bytes().unwrap(), &[3u8; 100][..]);
            if hold_small {
                held.push(t);
            }
            continue;
        }
        let b = t.host_bytes().unwrap();
        assert_eq!(b[..8], count.to_le_bytes(), "tensor {count} in file order");
        assert!(b[8..] == data[8..], "bytes of {}", t.name());
        if count == 0 {
            // A producer that ignored the window would load the whole file meanwhile.
            std::thread::sleep(Duration::from_millis(500));
            assert!(stream.bytes_read() < 3 * WINDOW, "{} bytes read while the consumer waited", stream.bytes_read());
        }
        peak = peak.max(rss_anon().saturating_sub(before));
        count += 1;
    }
    assert_eq!(count, 80);
    (peak, held)
}

#[test]
fn streaming_ten_windows_stays_within_the_window_beyond_what_the_consumer_holds() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.safetensors");
    let data = write(&path);
    // The bound is window + ring + 64 MiB; a host stream reads in place (no ring), so
    // the stricter window + 64 MiB holds, and catches more.
    let bound = WINDOW + (64 << 20);
    let before = rss_anon();
    let (peak, _) = stream_peak(&path, &data, false, before);
    eprintln!("dropping every tensor: RssAnon peak +{} MiB (bound {} MiB)", peak >> 20, bound >> 20);
    assert!(peak <= bound, "RssAnon grew by {peak} bytes, more than window + 64 MiB = {bound}");
    // Holding one small tensor of every batch must not hold the batch: only its pages.
    let before = rss_anon();
    let (peak, held) = stream_peak(&path, &data, true, before);
    eprintln!("holding 80 small tensors: RssAnon peak +{} MiB (bound {} MiB)", peak >> 20, bound >> 20);
    assert!(peak <= bound, "RssAnon grew by {peak} bytes holding {} small tensors", held.len());
    assert!(held.iter().all(|t| t.host_bytes().unwrap() == [3u8; 100]), "held tensors keep their bytes");
}
