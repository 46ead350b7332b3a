//! Conversion throughput.
//!
//! - host: `convert_host` F32->BF16 (and F16->F32) on 256 MiB of source, against a plain memcpy of
//!   the same bytes; and five conversions on one cache-resident 2 MiB piece, one thread (what a
//!   read-and-convert worker does per piece);
//! - device (when a CUDA driver and device are present): each kernel on 256 MiB of source, against
//!   a `cuMemcpyDtoD` of the same source bytes (the device's memory bandwidth). Throughput counts
//!   bytes read + written. A summary with the kernels' share of the copy's bandwidth is printed
//!   (event-timed medians) before the criterion runs.
//!
//! `cargo bench --bench convert`

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use weightstream::convert::convert_host;
use weightstream::Dtype;

const SRC_BYTES: usize = 256 << 20;

fn pattern(n: usize) -> Vec<u8> {
    let mut x = 0x9E37_79B9u32;
    (0..n / 4)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            // finite values of all magnitudes around 1
            (0x3000_0000 | (x & 0x8FFF_FFFF)).to_le_bytes()
        })
        .collect()
}

fn host(c: &mut Criterion) {
    let src = pattern(SRC_BYTES);
    let mut g = c.benchmark_group("convert_host");
    g.sample_size(10);
    for (from, to) in [(Dtype::F32, Dtype::BF16), (Dtype::F32, Dtype::F16), (Dtype::BF16, Dtype::F32)] {
        let n = SRC_BYTES / (from.bits() / 8) as usize;
        let mut dst = vec![0u8; n * (to.bits() / 8) as usize];
        g.throughput(Throughput::Bytes(SRC_BYTES as u64));
        g.bench_function(BenchmarkId::new(format!("{from}->{to}"), "256MiB"), |b| {
            b.iter(|| convert_host(from, to, &src, &mut dst).unwrap())
        });
    }
    let mut dst = vec![0u8; SRC_BYTES];
    g.bench_function(BenchmarkId::new("memcpy", "256MiB"), |b| b.iter(|| dst.copy_from_slice(&src)));
    g.finish();
    // What one read-and-convert worker does per piece: one thread, a 2 MiB source already in
    // cache (the cpu target converts each piece right after reading it).
    let mut g = c.benchmark_group("convert_piece");
    let piece = &src[..PIECE_BYTES];
    for (from, to) in [
        (Dtype::BF16, Dtype::F16),
        (Dtype::F32, Dtype::BF16),
        (Dtype::F32, Dtype::F16),
        (Dtype::BF16, Dtype::F32),
        (Dtype::F16, Dtype::F32),
    ] {
        let n = PIECE_BYTES / (from.bits() / 8) as usize;
        let mut dst = vec![0u8; n * (to.bits() / 8) as usize];
        g.throughput(Throughput::Bytes(PIECE_BYTES as u64));
        g.bench_function(BenchmarkId::new(format!("{from}->{to}"), "2MiB"), |b| {
            // Below convert_host's threshold for splitting across threads: one thread.
            b.iter(|| convert_host(from, to, piece, &mut dst).unwrap())
        });
    }
    g.finish();
}

const PIECE_BYTES: usize = 2 << 20;

#[cfg(feature = "cuda")]
mod device {
    use super::*;
    use cudarc::driver::{result as dr, sys};
    use std::time::{Duration, Instant};
    use weightstream::convert::conversions;
    use weightstream::cuda::kernels::DeviceConverter;

    /// Makes device 0's primary context current, or `None` after one line saying why.
    fn gpu() -> Option<()> {
        // SAFETY: only probes whether libcuda can be opened; nothing of cudarc runs before it.
        if !unsafe { sys::is_culib_present() } || dr::init().is_err() || dr::device::get_count().map_or(true, |n| n < 1)
        {
            println!("skipping device benches: no CUDA driver/device");
            return None;
        }
        let dev = dr::device::get(0).ok()?;
        // SAFETY: `dev` comes from `device::get`; the primary context stays retained and current.
        unsafe {
            let ctx = dr::primary_ctx::retain(dev).ok()?;
            dr::ctx::set_current(ctx).ok()?;
        }
        Some(())
    }

    struct Bufs {
        src: sys::CUdeviceptr,
        dst: sys::CUdeviceptr,
    }

    impl Drop for Bufs {
        fn drop(&mut self) {
            // SAFETY: allocated below, freed once, after synchronisation.
            unsafe {
                let _ = dr::free_sync(self.src);
                let _ = dr::free_sync(self.dst);
            }
        }
    }

    /// Median seconds of `f` enqueued on the null stream, event-timed.
    fn median_secs(runs: usize, mut f: impl FnMut()) -> f64 {
        let start = dr::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT).expect("event");
        let end = dr::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT).expect("event");
        f(); // warm-up
        let mut t: Vec<f64> = (0..runs)
            .map(|_| {
                // SAFETY: events of the current context, recorded on the null stream and synchronised
                // before their time is read.
                unsafe {
                    dr::event::record(start, std::ptr::null_mut()).expect("record");
                    f();
                    dr::event::record(end, std::ptr::null_mut()).expect("record");
                    dr::event::synchronize(end).expect("sync");
                    dr::event::elapsed(start, end).expect("elapsed") as f64 / 1e3
                }
            })
            .collect();
        // SAFETY: created above, not used after.
        unsafe {
            let _ = dr::event::destroy(start);
            let _ = dr::event::destroy(end);
        }
        t.sort_by(f64::total_cmp);
        t[t.len() / 2]
    }

    pub fn bench(c: &mut Criterion) {
        if gpu().is_none() {
            return;
        }
        let conv = DeviceConverter::load().expect("DeviceConverter::load");
        // Largest destination: fp8 -> f32 is 4x the source.
        // SAFETY: plain allocations in the current context, freed by `Bufs`.
        let bufs = unsafe {
            Bufs {
                src: dr::malloc_sync(SRC_BYTES).expect("alloc"),
                dst: dr::malloc_sync(SRC_BYTES * 4).expect("alloc"),
            }
        };
        let host_src = pattern(SRC_BYTES);
        // SAFETY: copies exactly SRC_BYTES into the SRC_BYTES allocation.
        unsafe { dr::memcpy_htod_sync(bufs.src, &host_src) }.expect("upload");

        let copy = || {
            // SAFETY: both allocations hold at least SRC_BYTES and do not overlap.
            unsafe { dr::memcpy_dtod_async(bufs.dst, bufs.src, SRC_BYTES, std::ptr::null_mut()) }.expect("copy")
        };
        let copy_s = median_secs(20, copy);
        let copy_gbps = 2.0 * SRC_BYTES as f64 / copy_s / 1e9;
        println!(
            "device: kernels loaded from {:?}; cuMemcpyDtoD of 256 MiB: {copy_gbps:.0} GB/s (read + write)",
            conv.source()
        );
        let conv = &conv;
        let (src, dst) = (bufs.src, bufs.dst);
        let launch = move |from: Dtype, to: Dtype| {
            let n = SRC_BYTES / (from.bits() / 8) as usize;
            move || {
                // SAFETY: the source holds `n` elements of `from`, the destination room for `n`
                // elements of `to` (at most 4 x SRC_BYTES); both live until the end of the bench.
                unsafe { conv.launch(from, to, src, dst, n, std::ptr::null_mut()) }.expect("launch")
            }
        };
        for (from, to) in conversions() {
            let n = SRC_BYTES / (from.bits() / 8) as usize;
            let bytes = SRC_BYTES + n * (to.bits() / 8) as usize;
            let s = median_secs(20, launch(from, to));
            let gbps = bytes as f64 / s / 1e9;
            println!(
                "device: {from:>7} -> {to:<4} {gbps:6.0} GB/s (read + write), {:5.1}% of cuMemcpyDtoD",
                100.0 * gbps / copy_gbps
            );
        }

        let mut g = c.benchmark_group("convert_device");
        g.sample_size(20);
        let timed = |f: &mut dyn FnMut(), iters: u64| -> Duration {
            dr::ctx::synchronize().expect("sync");
            let t = Instant::now();
            for _ in 0..iters {
                f();
            }
            dr::ctx::synchronize().expect("sync");
            t.elapsed()
        };
        g.throughput(Throughput::Bytes(2 * SRC_BYTES as u64));
        g.bench_function(BenchmarkId::new("cuMemcpyDtoD", "256MiB"), |b| {
            b.iter_custom(|iters| timed(&mut { copy }, iters))
        });
        for (from, to) in [(Dtype::F32, Dtype::BF16), (Dtype::BF16, Dtype::F32), (Dtype::F8_E4M3, Dtype::BF16)] {
            let n = SRC_BYTES / (from.bits() / 8) as usize;
            g.throughput(Throughput::Bytes((SRC_BYTES + n * (to.bits() / 8) as usize) as u64));
            let mut f = launch(from, to);
            g.bench_function(BenchmarkId::new(format!("{from}->{to}"), "256MiB"), |b| {
                b.iter_custom(|iters| timed(&mut f, iters))
            });
        }
        g.finish();
        drop(bufs);
    }
}

#[cfg(feature = "cuda")]
criterion_group!(benches, host, device::bench);
#[cfg(not(feature = "cuda"))]
criterion_group!(benches, host);
criterion_main!(benches);
