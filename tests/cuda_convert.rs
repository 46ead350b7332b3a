//! The conversion kernels on a CUDA device give the host's bits (the kernel math compiled for the
//! host, itself checked against `half`/ml_dtypes in tests/convert_math.rs), for every conversion,
//! every way of loading the kernels (nvcc PTX, lowered PTX, NVRTC), aligned and misaligned
//! buffers, tails, and, for every conversion, a buffer much larger than one grid. Without a driver
//! or device the GPU tests print one line and pass.
#![cfg(feature = "cuda")]

mod common;

use common::SplitMix;
use cudarc::driver::{result as dr, sys};
use weightstream::convert::{conversions, convert_host, convert_with_kernel_math, output_len};
use weightstream::cuda::kernels::{self as wc, DeviceConverter, KernelSource};
use weightstream::{Dtype, Error};

/// Makes device 0's primary context current, or says why not (one line) and returns `None`.
fn gpu() -> Option<sys::CUdevice> {
    // SAFETY: only probes whether libcuda can be opened; nothing of cudarc runs before it.
    if !unsafe { sys::is_culib_present() } {
        println!("skipping: no CUDA driver/device");
        return None;
    }
    if dr::init().is_err() || dr::device::get_count().map_or(true, |n| n < 1) {
        println!("skipping: no CUDA driver/device");
        return None;
    }
    let dev = dr::device::get(0).expect("device 0");
    // SAFETY: `dev` comes from `device::get`; the primary context is retained for the rest of the
    // process and made current on this thread.
    unsafe {
        let ctx = dr::primary_ctx::retain(dev).expect("retain the primary context");
        dr::ctx::set_current(ctx).expect("make it current");
    }
    Some(dev)
}

/// Device memory freed on drop (the context stays current on the test thread).
struct DevBuf {
    ptr: sys::CUdeviceptr,
    len: usize,
}

impl DevBuf {
    fn new(len: usize, fill: u8) -> DevBuf {
        // SAFETY: a plain allocation and fill of `len.max(1)` bytes in the current context.
        unsafe {
            let ptr = dr::malloc_sync(len.max(1)).expect("cuMemAlloc");
            dr::memset_d8_sync(ptr, fill, len.max(1)).expect("cuMemsetD8");
            DevBuf { ptr, len }
        }
    }
    fn write(&self, offset: usize, data: &[u8]) {
        assert!(offset + data.len() <= self.len);
        // SAFETY: the range is inside this allocation (checked above).
        unsafe { dr::memcpy_htod_sync(self.ptr + offset as u64, data) }.expect("cuMemcpyHtoD");
    }
    fn read(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.len];
        // SAFETY: reads exactly this allocation's bytes.
        unsafe { dr::memcpy_dtoh_sync(&mut v, self.ptr) }.expect("cuMemcpyDtoH");
        v
    }
}

impl Drop for DevBuf {
    fn drop(&mut self) {
        // SAFETY: allocated by `new`, freed once, after the work using it has been synchronised.
        let _ = unsafe { dr::free_sync(self.ptr) };
    }
}

/// Inputs for `from`: every 8- and 16-bit pattern, specials and random values for f32 and f64,
/// with an element count that leaves a tail after the kernels' 16-byte groups.
fn inputs(from: Dtype) -> Vec<u8> {
    let mut r = SplitMix(from.bits() ^ 0x00C0_FFEE);
    match from.bits() {
        8 => (0..17 * 256 + 5).map(|i| i as u8).collect(),
        16 => (0..=u16::MAX).chain([0x7C01, 0xFFFF, 0x0001]).flat_map(|x| x.to_le_bytes()).collect(),
        32 => {
            let specials: [u32; 16] = [
                0,
                0x8000_0000,
                0x7F80_0000,
                0xFF80_0000,
                0x7FC0_0000,
                0x7F80_0001,
                0xFFFF_FFFF,
                1,
                0x007F_FFFF,
                0x477F_F000,
                0x477F_EFFF,
                0x3300_0000,
                0x3300_0001,
                0x7F7F_8000,
                0x3F80_8000,
                0x3F81_8000,
            ];
            let mut v: Vec<u32> = specials.to_vec();
            v.extend((0..1_000_003).map(|_| r.next() as u32));
            v.iter().flat_map(|x| x.to_le_bytes()).collect()
        }
        _ => {
            let specials: [u64; 8] = [
                0,
                1 << 63,
                0x7FF0_0000_0000_0000,
                0x7FF0_0000_0000_0001,
                0x7FF8_0000_0000_0000,
                1,
                0x47EF_FFFF_F000_0000,
                0x3690_0000_0000_0001,
            ];
            let mut v: Vec<u64> = specials.to_vec();
            v.extend((0..300_001).map(|_| r.next()));
            v.iter().flat_map(|x| x.to_le_bytes()).collect()
        }
    }
}

const SENTINEL: u8 = 0xA5;
const PAD: usize = 256;

/// Converts `src` on the device with the source at element offset `so` and the destination at
/// element offset `dof` (from 256-byte aligned bases), checks it against `want` and that nothing
/// outside the destination range was written.
fn run_one(conv: &DeviceConverter, from: Dtype, to: Dtype, src: &[u8], so: usize, dof: usize, want: &[u8]) {
    let (sb, db) = ((from.bits() / 8) as usize, (to.bits() / 8) as usize);
    let n = src.len() / sb;
    let s = DevBuf::new(src.len() + so * sb + PAD, 0);
    s.write(so * sb, src);
    let d = DevBuf::new(want.len() + dof * db + 2 * PAD, SENTINEL);
    let dst_start = PAD + dof * db;
    // SAFETY: the converter was made in the current context; `s` and `d` are allocations of that
    // context holding `n` elements of `from` at the source offset and room for `n` elements of
    // `to` at `dst_start`; they do not overlap and live until after the synchronisation below.
    unsafe {
        conv.launch(from, to, s.ptr + (so * sb) as u64, d.ptr + dst_start as u64, n, dr::stream::null())
            .unwrap_or_else(|e| panic!("{from}->{to}: launch: {e}"));
    }
    dr::ctx::synchronize().unwrap_or_else(|e| panic!("{from}->{to}: kernel failed: {e:?}"));
    let got = d.read();
    let (before, rest) = got.split_at(dst_start);
    let (mid, after) = rest.split_at(want.len());
    assert!(before.iter().chain(after).all(|&b| b == SENTINEL), "{from}->{to} ({so},{dof}): wrote outside dst");
    if mid != want {
        let i = (0..want.len()).find(|&i| mid[i] != want[i]).unwrap_or(0) / db;
        panic!(
            "{from}->{to} via {:?} (src +{so}, dst +{dof} elements, n = {n}): element {i} of input {:02x?} is \
             {:02x?} on the device, {:02x?} on the host",
            conv.source(),
            &src[i * sb..(i + 1) * sb],
            &mid[i * db..(i + 1) * db],
            &want[i * db..(i + 1) * db]
        );
    }
}

fn host_reference(from: Dtype, to: Dtype, src: &[u8]) -> Vec<u8> {
    let len = output_len(from, to, src.len() as u64).unwrap() as usize;
    let mut want = vec![0u8; len];
    convert_with_kernel_math(from, to, src, &mut want).unwrap();
    let mut host = vec![0u8; len];
    convert_host(from, to, src, &mut host).unwrap();
    assert!(want == host, "{from}->{to}: convert_host differs from the kernel math");
    want
}

#[test]
fn device_results_equal_host_results() {
    let Some(_dev) = gpu() else { return };
    let mut loaded = Vec::new();
    for source in KernelSource::ALL {
        match DeviceConverter::with_source(source) {
            Ok(c) => {
                assert_eq!(c.source(), source);
                loaded.push(c);
            }
            Err(e) => {
                println!("kernel source {source:?} unavailable: {e}");
                // A PTX that ptxas accepts at ISA 7.0 must load on any driver that runs sm_80+.
                assert!(
                    !(source == KernelSource::NvccPtxLowered && wc::embedded_ptx().is_some()),
                    "the embedded PTX did not load even with its ISA version lowered: {e}"
                );
            }
        }
    }
    assert!(!loaded.is_empty(), "no way of loading the kernels worked");
    // What the pipeline gets.
    let auto = DeviceConverter::load().expect("DeviceConverter::load");
    println!("DeviceConverter::load() uses {:?}", auto.source());

    let mut pairs: Vec<(Dtype, Dtype)> = conversions().collect();
    pairs.extend([(Dtype::F32, Dtype::F32), (Dtype::BF16, Dtype::BF16), (Dtype::I8, Dtype::I8)]);
    for (from, to) in pairs {
        let src = inputs(from);
        let want = host_reference(from, to, &src);
        for conv in &loaded {
            for (so, dof) in [(0, 0), (1, 0), (0, 1), (3, 5)] {
                run_one(conv, from, to, &src, so, dof, &want);
            }
            // One element, and none.
            let sb = (from.bits() / 8) as usize;
            run_one(conv, from, to, &src[..sb], 0, 0, &want[..(to.bits() / 8) as usize]);
            run_one(conv, from, to, &[], 0, 0, &[]);
        }
    }
}

#[test]
fn large_buffer_many_grid_strides() {
    let Some(_dev) = gpu() else { return };
    let conv = DeviceConverter::load().expect("DeviceConverter::load");
    let mut r = SplitMix(42);
    // 48M elements (192 MiB of f32): many times what one grid covers, plus a tail.
    let n = 48 * 1024 * 1024 + 7;
    let src: Vec<u8> = (0..n).flat_map(|_| (r.next() as u32).to_le_bytes()).collect();
    for to in [Dtype::BF16, Dtype::F16] {
        let mut want = vec![0u8; n * 2];
        convert_host(Dtype::F32, to, &src, &mut want).unwrap();
        run_one(&conv, Dtype::F32, to, &src, 0, 0, &want);
    }
}

/// Every conversion on 48M + 7 random elements, aligned: the widening kernels' unrolled loop (K
/// chunks a grid apart) runs several times, then their one-chunk remainder loop and the scalar
/// tail; the small inputs of `device_results_equal_host_results` only reach the latter two.
#[test]
fn every_conversion_on_a_large_buffer() {
    let Some(_dev) = gpu() else { return };
    let conv = DeviceConverter::load().expect("DeviceConverter::load");
    let n = 48 * 1024 * 1024 + 7;
    let mut r = SplitMix(7);
    let mut bytes = vec![0u8; n * 8];
    for c in bytes.chunks_exact_mut(8) {
        c.copy_from_slice(&r.next().to_le_bytes());
    }
    for (from, to) in conversions() {
        let src = &bytes[..n * (from.bits() / 8) as usize];
        let mut want = vec![0u8; n * (to.bits() / 8) as usize];
        convert_with_kernel_math(from, to, src, &mut want).unwrap();
        run_one(&conv, from, to, src, 0, 0, &want);
    }
}

#[test]
fn unsupported_pairs_are_errors_on_the_device_too() {
    let Some(_dev) = gpu() else { return };
    let conv = DeviceConverter::load().expect("DeviceConverter::load");
    let d = DevBuf::new(64, 0);
    // SAFETY: the pair is rejected before anything is enqueued; the pointers are valid anyway.
    let r = unsafe { conv.launch(Dtype::F16, Dtype::I8, d.ptr, d.ptr + 32, 4, dr::stream::null()) };
    assert!(matches!(r, Err(Error::Conversion { .. })), "{r:?}");
}

#[test]
fn loading_without_a_driver_or_context_is_an_error() {
    // On a thread where no context is current (or without libcuda at all), `load` returns an
    // error instead of panicking.
    let r = std::thread::spawn(DeviceConverter::load).join().expect("no panic");
    match r {
        Err(Error::NoCudaDriver) | Err(Error::Cuda { .. }) => {}
        other => panic!("expected an error, got {other:?}"),
    }
}

#[test]
fn nvrtc_compiles_the_kernels() {
    // Needs libnvrtc only, no GPU.
    match wc::compile_with_nvrtc(9, 0) {
        Ok(ptx) => {
            let entries = ptx.matches(".entry ws_convert_").count();
            assert_eq!(entries, conversions().count(), "kernels in the NVRTC PTX");
        }
        Err(e @ Error::Cuda { call: "nvrtc", .. }) => println!("skipping: {e}"),
        Err(e) => panic!("NVRTC failed on the kernel source: {e}"),
    }
}
