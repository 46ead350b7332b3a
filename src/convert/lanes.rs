//! Host conversions over aligned, typed slices, written as branch-free per-element code that the
//! compiler turns into vector instructions, compiled for AVX-512, AVX2 and the baseline and
//! picked at run time.
//!
//! This is the cpu target's fast path: the byte-wise code in `cpu.rs` converts about 4 GB/s on
//! one core, these loops several times that. Each function gives the same bits as `half`
//! (checked here over every 16-bit input and the f32 rounding boundaries, and in
//! `tests/convert_math.rs` against the kernels' math). A slice that is not aligned to its element
//! type, or a big-endian host, falls back to the byte-wise code (`convert` returns `false`).

use bytemuck::Pod;

use crate::format::Dtype;

/// Converts `src` into `dst` (lengths already checked) when the pair has a fast path and both
/// slices are aligned for their element types. Returns whether it did.
pub(super) fn convert(from: Dtype, to: Dtype, src: &[u8], dst: &mut [u8]) -> bool {
    if cfg!(target_endian = "big") {
        return false;
    }
    use Dtype::*;
    match (from, to) {
        (BF16, F16) => typed(src, dst).map(|(s, d)| bf16_f16(s, d)).is_some(),
        (BF16, F32) => typed(src, dst).map(|(s, d)| bf16_f32(s, d)).is_some(),
        (F32, BF16) => typed(src, dst).map(|(s, d)| f32_bf16(s, d)).is_some(),
        (F64, F32) => typed(src, dst).map(|(s, d)| f64_f32(s, d)).is_some(),
        (F32, F16) => typed(src, dst).map(|(s, d)| f32_f16(s, d)).is_some(),
        (F16, F32) => typed(src, dst).map(|(s, d)| f16_f32(s, d)).is_some(),
        (F16, BF16) => typed(src, dst).map(|(s, d)| f16_bf16(s, d)).is_some(),
        _ => false,
    }
}

/// The two slices as typed slices, when both are aligned for their types.
fn typed<'a, S: Pod, D: Pod>(src: &'a [u8], dst: &'a mut [u8]) -> Option<(&'a [S], &'a mut [D])> {
    Some((bytemuck::try_cast_slice(src).ok()?, bytemuck::try_cast_slice_mut(dst).ok()?))
}

// The loops, each compiled for AVX-512, AVX2 and the baseline, picked at run time by the CPU's
// features: 3-4× the baseline's speed on AVX-512 (BENCHMARKS.md).

#[multiversion::multiversion(targets("x86_64+avx512f+avx512bw+avx512vl", "x86_64+avx2+fma", "aarch64+neon"))]
fn bf16_f16(s: &[u16], d: &mut [u16]) {
    for (o, x) in d.iter_mut().zip(s) {
        *o = bf16_to_f16(*x);
    }
}

#[multiversion::multiversion(targets("x86_64+avx512f+avx512bw+avx512vl", "x86_64+avx2+fma", "aarch64+neon"))]
fn bf16_f32(s: &[u16], d: &mut [u32]) {
    for (o, x) in d.iter_mut().zip(s) {
        *o = bf16_to_f32(*x);
    }
}

#[multiversion::multiversion(targets("x86_64+avx512f+avx512bw+avx512vl", "x86_64+avx2+fma", "aarch64+neon"))]
fn f32_bf16(s: &[u32], d: &mut [u16]) {
    for (o, x) in d.iter_mut().zip(s) {
        *o = f32_to_bf16(*x);
    }
}

#[multiversion::multiversion(targets("x86_64+avx512f+avx512bw+avx512vl", "x86_64+avx2+fma", "aarch64+neon"))]
fn f32_f16(s: &[u32], d: &mut [u16]) {
    for (o, x) in d.iter_mut().zip(s) {
        *o = f32_to_f16(*x);
    }
}

#[multiversion::multiversion(targets("x86_64+avx512f+avx512bw+avx512vl", "x86_64+avx2+fma", "aarch64+neon"))]
fn f16_f32(s: &[u16], d: &mut [u32]) {
    for (o, x) in d.iter_mut().zip(s) {
        *o = f16_to_f32(*x);
    }
}

#[multiversion::multiversion(targets("x86_64+avx512f+avx512bw+avx512vl", "x86_64+avx2+fma", "aarch64+neon"))]
fn f16_bf16(s: &[u16], d: &mut [u16]) {
    // f16 -> f32 is exact, so this rounds once.
    for (o, x) in d.iter_mut().zip(s) {
        *o = f32_to_bf16(f16_to_f32(*x));
    }
}

#[multiversion::multiversion(targets("x86_64+avx512f+avx512bw+avx512vl", "x86_64+avx2+fma", "aarch64+neon"))]
fn f64_f32(s: &[f64], d: &mut [f32]) {
    for (o, x) in d.iter_mut().zip(s) {
        *o = *x as f32;
    }
}

/// bf16 bits to f32 bits: exact; a NaN gets its quiet bit set, as `half` does.
#[inline(always)]
fn bf16_to_f32(x: u16) -> u32 {
    let quiet = if x & 0x7FFF > 0x7F80 { 0x40 } else { 0 };
    ((x | quiet) as u32) << 16
}

/// f32 bits to bf16 bits, rounding to nearest even; NaN keeps its top mantissa bits and is
/// quieted, as `half` does. Overflow rounds to ±inf.
#[inline(always)]
fn f32_to_bf16(x: u32) -> u16 {
    let nan = ((x >> 16) as u16) | 0x40;
    let rounded = (x.wrapping_add(0x7FFF + ((x >> 16) & 1)) >> 16) as u16;
    if x & 0x7FFF_FFFF > 0x7F80_0000 {
        nan
    } else {
        rounded
    }
}

/// f16 bits to f32 bits: exact. Subnormals are m × 2^-24, computed as (2^-14 + m × 2^-24) - 2^-14
/// in f32 (both exact); NaN gets its quiet bit set, as `half` (and F16C) do.
#[inline(always)]
fn f16_to_f32(h: u16) -> u32 {
    let sign = ((h & 0x8000) as u32) << 16;
    let a = (h & 0x7FFF) as u32;
    let normal = (a << 13) + (112 << 23);
    let sub = (f32::from_bits((a << 13) + (113 << 23)) - f32::from_bits(113 << 23)).to_bits();
    let special = 0x7F80_0000 | ((a & 0x3FF) << 13) | if a > 0x7C00 { 0x0040_0000 } else { 0 };
    sign | if a < 0x400 {
        sub
    } else if a < 0x7C00 {
        normal
    } else {
        special
    }
}

/// f32 bits to f16 bits, rounding to nearest even (as `half` and F16C do).
///
/// Normal results: rebias the exponent and round the 13 dropped mantissa bits by adding
/// 0xFFF plus the kept mantissa's low bit (ties to even); a carry runs into the exponent, up to
/// ±inf. Below 2^-14 the subnormal is x / 2^-24 rounded, done by one f32 add of 0.5 (ulp 2^-24
/// there). From 2^16 on: ±inf; NaN keeps its top mantissa bits and is quieted.
#[inline(always)]
fn f32_to_f16(x: u32) -> u16 {
    let sign = ((x >> 16) & 0x8000) as u16;
    let a = x & 0x7FFF_FFFF;
    let sub = (f32::from_bits(a) + 0.5).to_bits().wrapping_sub(0x3F00_0000) as u16;
    let normal = (a.wrapping_sub(112 << 23).wrapping_add(0xFFF + ((a >> 13) & 1)) >> 13) as u16;
    let special = if a > 0x7F80_0000 { 0x7E00 | ((a >> 13) & 0x3FF) as u16 } else { 0x7C00 };
    sign | if a < (113 << 23) {
        sub
    } else if a < (143 << 23) {
        normal
    } else {
        special
    }
}

/// bf16 bits to f16 bits, rounding to nearest even (the same bits as `half` going through f32).
///
/// bf16 has 7 mantissa bits and f16 10, so a value in f16's normal range converts exactly by
/// moving the exponent. Below it (|x| < 2^-14) the f16 subnormal is x / 2^-24 rounded to an
/// integer; adding 0.5 in f32, whose ulp there is 2^-24, does that rounding in one hardware add.
/// From 2^16 on (bf16 0x4780; the largest bf16 below it, 65280, is finite in f16) the result is
/// ±inf; NaN keeps its top mantissa bits and is quieted.
#[inline(always)]
fn bf16_to_f16(x: u16) -> u16 {
    let sign = x & 0x8000;
    let a = x & 0x7FFF;
    let sub = (f32::from_bits((a as u32) << 16) + 0.5).to_bits().wrapping_sub(0x3F00_0000) as u16;
    let normal = a.wrapping_sub(112 << 7) << 3;
    let special = if a > 0x7F80 { 0x7E00 | ((a & 0x7F) << 3) } else { 0x7C00 };
    sign | if a < 0x3880 {
        sub
    } else if a < 0x4780 {
        normal
    } else {
        special
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};

    #[test]
    fn sixteen_bit_functions_match_half_on_every_input() {
        for x in 0..=u16::MAX {
            let b = bf16::from_bits(x);
            assert_eq!(bf16_to_f16(x), f16::from_f32(b.to_f32()).to_bits(), "bf16 {x:#06x} -> f16");
            assert_eq!(bf16_to_f32(x), b.to_f32().to_bits(), "bf16 {x:#06x} -> f32");
            let h = f16::from_bits(x);
            assert_eq!(f16_to_f32(x), h.to_f32_const().to_bits(), "f16 {x:#06x} -> f32");
            assert_eq!(
                f32_to_f16(h.to_f32_const().to_bits()),
                x | if h.is_nan() { 0x200 } else { 0 },
                "f16 {x:#06x} round trip"
            );
        }
    }

    #[test]
    fn f32_functions_match_half_at_every_rounding_boundary() {
        for hi in 0..=u16::MAX as u32 {
            // bf16 ties sit at 0x8000 in the low half, f16 ties at 0x1000 (for normal results).
            for lo in [0u32, 1, 0x0FFF, 0x1000, 0x1001, 0x3000, 0x7FFF, 0x8000, 0x8001, 0xFFFF] {
                let x = (hi << 16) | lo;
                assert_eq!(f32_to_bf16(x), bf16::from_f32(f32::from_bits(x)).to_bits(), "f32 {x:#010x} -> bf16");
                assert_eq!(f32_to_f16(x), f16::from_f32_const(f32::from_bits(x)).to_bits(), "f32 {x:#010x} -> f16");
            }
        }
    }

    #[test]
    fn f64_to_f32_is_rust_rounding() {
        let xs = [0.1f64, -1e300, 1e-300, f64::NAN, f64::INFINITY, 3.4028235677973366e38, 1.0 + f64::EPSILON];
        let mut out = [0f32; 7];
        f64_f32(&xs, &mut out);
        for (x, o) in xs.iter().zip(out) {
            assert_eq!(o.to_bits(), (*x as f32).to_bits(), "{x}");
        }
    }

    #[test]
    fn misaligned_slices_are_declined() {
        // Backed by u32s, so byte 1 is at an odd address: misaligned for every element type.
        let src = vec![0u32; 64];
        let mut dst = vec![0u32; 64];
        let src: &[u8] = bytemuck::cast_slice(&src);
        let dst: &mut [u8] = bytemuck::cast_slice_mut(&mut dst);
        assert!(!convert(Dtype::BF16, Dtype::F16, &src[1..129], &mut dst[..128]));
        assert!(!convert(Dtype::F32, Dtype::BF16, &src[..128], &mut dst[1..65]));
        assert!(convert(Dtype::BF16, Dtype::F16, &src[2..130], &mut dst[..128]));
    }
}
