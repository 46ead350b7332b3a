//! `Loader::stream` to a CUDA device: device memory stays within the window (plus a
//! conversion's bounded scratch) while the consumer drops each tensor, and the bytes equal a host
//! load. Without a driver or a device each test prints one line saying so and returns.

#![cfg(feature = "cuda")]

mod common;

use std::sync::{Arc, Mutex};

use weightstream::format::{write_file, WriteTensor};
use weightstream::sink::cuda::{CudaDevice, SCRATCH_BUDGET};
use weightstream::{Device, Dtype, Loader, StreamedTensor};

#[test]
fn a_device_stream_stays_within_its_window_and_equals_a_host_load() {
    if !common::cuda_device_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // 256 MiB of f32 in 64 tensors, streamed as bf16 through a 32 MiB window.
    let path = dir.path().join("f32.safetensors");
    let data: Vec<u8> = (0..1u32 << 20).flat_map(|k| ((k as f32 - 5e5) * 1e-3).to_le_bytes()).collect();
    let tensors: Vec<_> =
        (0..64).map(|i| WriteTensor::new(format!("w{i}"), Dtype::F32, vec![1024, 1024], &data)).collect();
    write_file(&path, &tensors, &Default::default()).unwrap();
    let window = 32u64 << 20;
    let cpu = Loader::new().device(Device::Cpu).dtype(Dtype::BF16).load(&path).unwrap();
    let dev = CudaDevice::open(0).unwrap();
    let loader = Loader::new().device(Device::Cuda(0)).dtype(Dtype::BF16);
    // Warm-up: the kernels module and the pinned ring stay with the loader.
    let held: Vec<StreamedTensor> = loader.stream(&path, window).unwrap().map(Result::unwrap).collect();
    for (t, want) in held.iter().zip(cpu.tensors()) {
        assert_eq!(t.device(), Device::Cuda(0));
        assert_eq!((t.name(), t.shape()), (want.name(), want.shape()));
        assert_eq!(t.to_host_vec().unwrap(), want.to_host_vec().unwrap(), "{}", t.name());
    }
    drop(held);
    let (free0, _) = dev.mem_info().unwrap();
    let min_free = Arc::new(Mutex::new(usize::MAX));
    let mut count = 0;
    for t in loader.stream(&path, window).unwrap() {
        let t = t.unwrap();
        let (free, _) = dev.mem_info().unwrap();
        let mut m = min_free.lock().unwrap();
        *m = (*m).min(free);
        if count % 16 == 0 {
            assert_eq!(t.to_host_vec().unwrap(), cpu.tensor(t.name()).unwrap().to_host_vec().unwrap());
        }
        count += 1;
    }
    assert_eq!(count, 64);
    let peak = (free0 - *min_free.lock().unwrap()) as u64;
    let slack = 8 << 20; // allocation granularity and the driver's bookkeeping
    println!("device peak {} MiB for a window of {} MiB", peak >> 20, window >> 20);
    assert!(peak <= window + SCRATCH_BUDGET as u64 + slack, "device peak {peak} > window {window} + scratch + slack");
}
