//! Conversion on the host.
//!
//! [`convert_host`] is the CPU target's path: the `half` crate's conversions, in blocks, on
//! several threads for large buffers. [`convert_with_kernel_math`] runs the CUDA kernels'
//! per-element code (`kernels/convert_math.cuh`) compiled for the host by `build.rs`; tests use it
//! to check the kernels' math exhaustively without a GPU, and that both paths agree bit for bit.

use std::ffi::c_void;
use std::thread;

use half::{bf16, f16, slice::HalfFloatSliceExt};

use super::{check, conversion_error};
use crate::error::Result;
use crate::format::Dtype;

/// Source bytes below which [`convert_host`] stays on the calling thread.
const PARALLEL_MIN_BYTES: usize = 8 << 20;
/// Source bytes per thread at least, above that.
const PER_THREAD_MIN_BYTES: usize = 4 << 20;
/// Elements converted per block (through an aligned buffer of f32 on the stack).
const BLOCK: usize = 2048;

type ShimFn = unsafe extern "C" fn(src: *const c_void, dst: *mut c_void, n: u64);

macro_rules! shim {
    ($($suffix:literal => $name:ident),* $(,)?) => {
        extern "C" {
            $(fn $name(src: *const c_void, dst: *mut c_void, n: u64);)*
        }
        /// The host shim function of a kernel suffix (see `super::TABLE`).
        fn shim_fn(suffix: &str) -> Option<ShimFn> {
            match suffix {
                $($suffix => Some($name as ShimFn),)*
                _ => None,
            }
        }
    };
}

shim!(
    "f32_f16" => ws_host_convert_f32_f16,
    "f32_bf16" => ws_host_convert_f32_bf16,
    "f16_f32" => ws_host_convert_f16_f32,
    "bf16_f32" => ws_host_convert_bf16_f32,
    "f16_bf16" => ws_host_convert_f16_bf16,
    "bf16_f16" => ws_host_convert_bf16_f16,
    "f64_f32" => ws_host_convert_f64_f32,
    "f64_f16" => ws_host_convert_f64_f16,
    "f64_bf16" => ws_host_convert_f64_bf16,
    "f8e4m3_f16" => ws_host_convert_f8e4m3_f16,
    "f8e4m3_bf16" => ws_host_convert_f8e4m3_bf16,
    "f8e4m3_f32" => ws_host_convert_f8e4m3_f32,
    "f8e5m2_f16" => ws_host_convert_f8e5m2_f16,
    "f8e5m2_bf16" => ws_host_convert_f8e5m2_bf16,
    "f8e5m2_f32" => ws_host_convert_f8e5m2_f32,
);

/// Converts `src` (little-endian `from` elements) into `dst` (little-endian `to` elements) with
/// the CUDA kernels' own per-element code compiled for the host, on the calling thread.
///
/// `dst.len()` must be [`super::output_len`]`(from, to, src.len())`; `from == to` copies.
///
/// ```
/// use weightstream::{convert, Dtype};
/// let mut out = [0u8; 4];
/// convert::convert_with_kernel_math(Dtype::F8_E4M3, Dtype::F32, &[0x38], &mut out)?;
/// assert_eq!(f32::from_le_bytes(out), 1.0);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn convert_with_kernel_math(from: Dtype, to: Dtype, src: &[u8], dst: &mut [u8]) -> Result<()> {
    let n = check(from, to, src.len(), dst.len())?;
    if from == to {
        dst.copy_from_slice(src);
        return Ok(());
    }
    let f = super::suffix(from, to)
        .and_then(shim_fn)
        .ok_or_else(|| conversion_error(from, to, "no host build of this kernel".into()))?;
    // SAFETY: `check` verified that `src` holds exactly `n` elements of `from` and `dst` room for
    // exactly `n` elements of `to`; the shim reads and writes byte-wise (no alignment needed)
    // within those bounds and keeps no pointer after returning.
    unsafe { f(src.as_ptr().cast(), dst.as_mut_ptr().cast(), n as u64) };
    Ok(())
}

/// Converts `src` (little-endian `from` elements) into `dst` (little-endian `to` elements) on the
/// host with the `half` crate (F64 narrowing: the kernels' math), giving the same bits as the
/// CUDA kernels. Large buffers are split across threads (`std::thread::available_parallelism`).
///
/// `dst.len()` must be [`super::output_len`]`(from, to, src.len())`, else
/// [`crate::Error::Conversion`]; so is an unsupported pair. `from == to` copies.
pub fn convert_host(from: Dtype, to: Dtype, src: &[u8], dst: &mut [u8]) -> Result<()> {
    let n = check(from, to, src.len(), dst.len())?;
    if from == to {
        dst.copy_from_slice(src);
        return Ok(());
    }
    let (sb, db) = ((from.bits() / 8) as usize, (to.bits() / 8) as usize);
    let threads = if src.len() < PARALLEL_MIN_BYTES {
        1
    } else {
        thread::available_parallelism().map(|p| p.get()).unwrap_or(1).min(src.len() / PER_THREAD_MIN_BYTES).max(1)
    };
    if threads == 1 {
        return convert_chunk(from, to, src, dst);
    }
    // Whole blocks per thread, so that only the last chunk has a partial block.
    let per = n.div_ceil(threads).div_ceil(BLOCK) * BLOCK;
    thread::scope(|s| {
        let mut chunks = src.chunks(per * sb).zip(dst.chunks_mut(per * db));
        // The first chunk runs here; the others on their own threads.
        let first = chunks.next();
        let mut handles = Vec::with_capacity(threads);
        let mut result = Ok(());
        for (sc, dc) in chunks {
            match thread::Builder::new().spawn_scoped(s, move || convert_chunk(from, to, sc, dc)) {
                Ok(h) => handles.push(h),
                Err(e) => {
                    result = Err(conversion_error(from, to, format!("could not start a thread: {e}")));
                    break;
                }
            }
        }
        if let Some((sc, dc)) = first {
            let r = convert_chunk(from, to, sc, dc);
            if result.is_ok() {
                result = r;
            }
        }
        for h in handles {
            let r = h.join().unwrap_or_else(|_| Err(conversion_error(from, to, "a conversion thread panicked".into())));
            if result.is_ok() {
                result = r;
            }
        }
        result
    })
}

/// [`convert_host`] on the calling thread only (callers that are already one of many threads).
pub(crate) fn convert_serial(from: Dtype, to: Dtype, src: &[u8], dst: &mut [u8]) -> Result<()> {
    check(from, to, src.len(), dst.len())?;
    if from == to {
        dst.copy_from_slice(src);
        return Ok(());
    }
    convert_chunk(from, to, src, dst)
}

/// Converts one chunk on the calling thread. Lengths are already checked.
fn convert_chunk(from: Dtype, to: Dtype, src: &[u8], dst: &mut [u8]) -> Result<()> {
    if super::lanes::convert(from, to, src, dst) {
        return Ok(());
    }
    byte_wise(from, to, src, dst)
}

/// The byte-wise conversions: any alignment, any host; the typed fast path declines otherwise.
fn byte_wise(from: Dtype, to: Dtype, src: &[u8], dst: &mut [u8]) -> Result<()> {
    use Dtype::*;
    match (from, to) {
        (F32, BF16) => via_f32::<4>(src, dst, to, f32::from_le_bytes),
        (BF16, F32) => map::<2, 4>(src, dst, |b| bf16::from_le_bytes(b).to_f32().to_le_bytes()),
        (F64, F32) => map::<8, 4>(src, dst, |b| (f64::from_le_bytes(b) as f32).to_le_bytes()),
        // `half` has no correctly rounded f64 narrowing (its runtime `from_f64` goes through f32 on
        // x86 with F16C; its software path ignores the low 32 mantissa bits in ties): use the
        // kernels' own math, compiled for the host.
        (F64, F16) | (F64, BF16) => convert_with_kernel_math(from, to, src, dst),
        (F8_E4M3, _) | (F8_E5M2, _) if matches!(to, F32 | F16 | BF16) => {
            let table = if from == F8_E4M3 { &E4M3_F32 } else { &E5M2_F32 };
            via_f32::<1>(src, dst, to, |b| f32::from_bits(table[b[0] as usize]))
        }
        (F32, F16) => via_f32::<4>(src, dst, to, f32::from_le_bytes),
        (F16, F32) | (F16, BF16) => {
            let db = (to.bits() / 8) as usize;
            let mut h = [f16::ZERO; BLOCK];
            let mut f = [0f32; BLOCK];
            for (sc, dc) in src.chunks(BLOCK * 2).zip(dst.chunks_mut(BLOCK * db)) {
                let k = sc.len() / 2;
                for (x, b) in h[..k].iter_mut().zip(sc.chunks_exact(2)) {
                    *x = f16::from_le_bytes([b[0], b[1]]);
                }
                h[..k].convert_to_f32_slice(&mut f[..k]);
                store_f32(&f[..k], dc, to);
            }
            Ok(())
        }
        (BF16, F16) => via_f32::<2>(src, dst, to, |b| bf16::from_le_bytes(b).to_f32()),
        _ => Err(conversion_error(from, to, "no host conversion".into())),
    }
}

/// Elementwise conversion of `S`-byte elements into `D`-byte elements.
#[inline(always)]
fn map<const S: usize, const D: usize>(src: &[u8], dst: &mut [u8], f: impl Fn([u8; S]) -> [u8; D]) -> Result<()> {
    for (s, d) in src.chunks_exact(S).zip(dst.chunks_exact_mut(D)) {
        let mut a = [0u8; S];
        a.copy_from_slice(s);
        d.copy_from_slice(&f(a));
    }
    Ok(())
}

/// Decodes `S`-byte elements to f32 (exactly, or with the one rounding of the conversion) in
/// blocks, then stores them as `to` (F32, F16 or BF16) with `half`'s slice conversions.
#[inline(always)]
fn via_f32<const S: usize>(src: &[u8], dst: &mut [u8], to: Dtype, decode: impl Fn([u8; S]) -> f32) -> Result<()> {
    let db = (to.bits() / 8) as usize;
    let mut f = [0f32; BLOCK];
    for (sc, dc) in src.chunks(BLOCK * S).zip(dst.chunks_mut(BLOCK * db)) {
        let k = sc.len() / S;
        for (x, b) in f[..k].iter_mut().zip(sc.chunks_exact(S)) {
            let mut a = [0u8; S];
            a.copy_from_slice(b);
            *x = decode(a);
        }
        store_f32(&f[..k], dc, to);
    }
    Ok(())
}

/// Stores f32 values as F32, F16 (`half`'s vectorised slice conversion) or BF16.
#[inline(always)]
fn store_f32(f: &[f32], dst: &mut [u8], to: Dtype) {
    match to {
        Dtype::F16 => {
            let mut h = [f16::ZERO; BLOCK];
            let h = &mut h[..f.len()];
            h.convert_from_f32_slice(f);
            for (x, d) in h.iter().zip(dst.chunks_exact_mut(2)) {
                d.copy_from_slice(&x.to_le_bytes());
            }
        }
        Dtype::BF16 => {
            // Into an aligned block first: this loop vectorises.
            let mut h = [0u16; BLOCK];
            let h = &mut h[..f.len()];
            for (o, x) in h.iter_mut().zip(f) {
                *o = bf16::from_f32(*x).to_bits();
            }
            for (x, d) in h.iter().zip(dst.chunks_exact_mut(2)) {
                d.copy_from_slice(&x.to_le_bytes());
            }
        }
        _ => {
            for (x, d) in f.iter().zip(dst.chunks_exact_mut(4)) {
                d.copy_from_slice(&x.to_le_bytes());
            }
        }
    }
}

/// fp8 e4m3fn (bias 7, no infinity, NaN = S.1111.111) to f32 bits; NaN -> the canonical quiet NaN
/// with the sign, as ml_dtypes does.
const fn e4m3_to_f32(v: u8) -> u32 {
    let sign = ((v as u32) & 0x80) << 24;
    let exp = ((v as u32) >> 3) & 0xF;
    let man = (v as u32) & 0x7;
    if exp == 0xF && man == 0x7 {
        return sign | 0x7FC0_0000;
    }
    if exp == 0 {
        if man == 0 {
            return sign;
        }
        // man * 2^-9, normalised.
        let lz = man.leading_zeros() - 29;
        return sign | ((127 - 7 - lz) << 23) | (((man << (lz + 1)) & 0x7) << 20);
    }
    sign | ((exp + 127 - 7) << 23) | (man << 20)
}

/// fp8 e5m2 (bias 15, IEEE-like with inf and NaN) to f32 bits; NaN -> canonical quiet NaN.
const fn e5m2_to_f32(v: u8) -> u32 {
    let sign = ((v as u32) & 0x80) << 24;
    let exp = ((v as u32) >> 2) & 0x1F;
    let man = (v as u32) & 0x3;
    if exp == 0x1F {
        return if man == 0 { sign | 0x7F80_0000 } else { sign | 0x7FC0_0000 };
    }
    if exp == 0 {
        if man == 0 {
            return sign;
        }
        let lz = man.leading_zeros() - 30;
        return sign | ((127 - 15 - lz) << 23) | (((man << (lz + 1)) & 0x3) << 21);
    }
    sign | ((exp + 127 - 15) << 23) | (man << 21)
}

const fn table(e4m3: bool) -> [u32; 256] {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = if e4m3 { e4m3_to_f32(i as u8) } else { e5m2_to_f32(i as u8) };
        i += 1;
    }
    t
}

static E4M3_F32: [u32; 256] = table(true);
static E5M2_F32: [u32; 256] = table(false);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fp8_known_values() {
        assert_eq!(f32::from_bits(E4M3_F32[0x7E]), 448.0);
        assert_eq!(f32::from_bits(E4M3_F32[0x01]), 2f32.powi(-9));
        assert!(f32::from_bits(E4M3_F32[0xFF]).is_nan());
        assert_eq!(f32::from_bits(E5M2_F32[0x7B]), 57344.0);
        assert_eq!(f32::from_bits(E5M2_F32[0x7C]), f32::INFINITY);
        assert_eq!(f32::from_bits(E5M2_F32[0x01]), 2f32.powi(-16));
    }

    #[test]
    fn bad_lengths_are_errors() {
        let mut d = [0u8; 3];
        assert!(convert_host(Dtype::F32, Dtype::F16, &[0; 8], &mut d).is_err());
        assert!(convert_with_kernel_math(Dtype::F32, Dtype::F16, &[0; 8], &mut d).is_err());
        assert!(convert_host(Dtype::U8, Dtype::F16, &[0; 3], &mut [0; 6]).is_err());
    }

    #[test]
    fn parallel_split_matches_serial() {
        // Above PARALLEL_MIN_BYTES with a partial last block.
        let n = (PARALLEL_MIN_BYTES / 4) * 3 + 777;
        let src: Vec<u8> =
            (0..n as u32).flat_map(|i| f32::from_bits(i.wrapping_mul(2_654_435_761)).to_le_bytes()).collect();
        let mut a = vec![0u8; n * 2];
        let mut b = vec![0u8; n * 2];
        convert_host(Dtype::F32, Dtype::BF16, &src, &mut a).unwrap();
        convert_chunk(Dtype::F32, Dtype::BF16, &src, &mut b).unwrap();
        assert!(a == b);
    }
}
