//! The conversion kernels' per-element math (`kernels/convert_math.cuh`, compiled for the host by
//! build.rs) against the `half` crate and ml_dtypes, and `convert_host` against that math.
//!
//! - every 16-bit source pair: all 65,536 inputs;
//! - fp8 sources: all 256 inputs against tables made by ml_dtypes (`scripts/fp8_tables.py`);
//! - f32 and f64 sources: every special value, every rounding boundary of f16 and bf16, and
//!   ~10M random samples; `all_f32_inputs` (ignored: `cargo test --release -- --ignored`)
//!   sweeps all 2^32 f32.

mod common;

use common::SplitMix;
use std::path::PathBuf;
use std::process::Command;

use half::{bf16, f16};
use weightstream::convert::{conversions, convert_host, convert_with_kernel_math, output_len};
use weightstream::Dtype;

fn kernel(from: Dtype, to: Dtype, src: &[u8]) -> Vec<u8> {
    let mut dst = vec![0u8; output_len(from, to, src.len() as u64).unwrap() as usize];
    convert_with_kernel_math(from, to, src, &mut dst).unwrap();
    dst
}

fn host(from: Dtype, to: Dtype, src: &[u8]) -> Vec<u8> {
    let mut dst = vec![0u8; output_len(from, to, src.len() as u64).unwrap() as usize];
    convert_host(from, to, src, &mut dst).unwrap();
    dst
}

fn u16s(b: &[u8]) -> Vec<u16> {
    b.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect()
}

fn u32s(b: &[u8]) -> Vec<u32> {
    b.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// Asserts `got == want` element by element, naming the first few inputs that differ.
fn same<I: std::fmt::LowerHex, T: PartialEq + std::fmt::LowerHex>(what: &str, inputs: &[I], got: &[T], want: &[T]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let bad: Vec<String> = (0..got.len())
        .filter(|&i| got[i] != want[i])
        .take(8)
        .map(|i| format!("input {:#x}: got {:#x}, want {:#x}", inputs[i], got[i], want[i]))
        .collect();
    let count = (0..got.len()).filter(|&i| got[i] != want[i]).count();
    assert!(bad.is_empty(), "{what}: {count} of {} differ, e.g.\n  {}", got.len(), bad.join("\n  "));
}

/// The kernel math and `convert_host` agree on `src`.
fn host_matches_kernel(from: Dtype, to: Dtype, src: &[u8]) -> Vec<u8> {
    let k = kernel(from, to, src);
    let h = host(from, to, src);
    assert!(k == h, "{from}->{to}: convert_host differs from the kernel math");
    k
}

// ------------------------------------------------------------------------------------------------
// 16-bit sources, exhaustively.

#[test]
fn f16_sources_all_65536() {
    let inputs: Vec<u16> = (0..=u16::MAX).collect();
    let src: Vec<u8> = inputs.iter().flat_map(|x| x.to_le_bytes()).collect();

    let got = u32s(&host_matches_kernel(Dtype::F16, Dtype::F32, &src));
    let want: Vec<u32> = inputs.iter().map(|&x| f16::from_bits(x).to_f32().to_bits()).collect();
    same("F16->F32 vs half (runtime)", &inputs, &got, &want);
    let want: Vec<u32> = inputs.iter().map(|&x| f16::from_bits(x).to_f32_const().to_bits()).collect();
    same("F16->F32 vs half (software)", &inputs, &got, &want);

    let got = u16s(&host_matches_kernel(Dtype::F16, Dtype::BF16, &src));
    let want: Vec<u16> = inputs.iter().map(|&x| bf16::from_f32(f16::from_bits(x).to_f32()).to_bits()).collect();
    same("F16->BF16 vs half", &inputs, &got, &want);
}

#[test]
fn bf16_sources_all_65536() {
    let inputs: Vec<u16> = (0..=u16::MAX).collect();
    let src: Vec<u8> = inputs.iter().flat_map(|x| x.to_le_bytes()).collect();

    let got = u32s(&host_matches_kernel(Dtype::BF16, Dtype::F32, &src));
    let want: Vec<u32> = inputs.iter().map(|&x| bf16::from_bits(x).to_f32().to_bits()).collect();
    same("BF16->F32 vs half", &inputs, &got, &want);

    let got = u16s(&host_matches_kernel(Dtype::BF16, Dtype::F16, &src));
    let want: Vec<u16> = inputs.iter().map(|&x| f16::from_f32(bf16::from_bits(x).to_f32()).to_bits()).collect();
    same("BF16->F16 vs half (runtime)", &inputs, &got, &want);
    let want: Vec<u16> = inputs.iter().map(|&x| f16::from_f32_const(bf16::from_bits(x).to_f32()).to_bits()).collect();
    same("BF16->F16 vs half (software)", &inputs, &got, &want);
}

// ------------------------------------------------------------------------------------------------
// f32 sources.

/// Special values and rounding boundaries of f32 -> f16 and f32 -> bf16.
fn f32_special_inputs() -> Vec<u32> {
    let mut v: Vec<u32> = vec![
        0x0000_0000,
        0x8000_0000, // +-0
        0x7F80_0000,
        0xFF80_0000, // +-inf
        0x7FC0_0000,
        0xFFC0_0000,
        0x7F80_0001,
        0xFF80_0001,
        0x7FFF_FFFF,
        0xFFFF_FFFF, // NaNs
        0x7FA0_0000,
        0x7F80_2000,
        0x7F80_1FFF,
        0x7F80_1000,
        0x7FBF_FFFF,
        0x7F81_0000,
        0x7F80_8000,
        0x0000_0001,
        0x8000_0001,
        0x007F_FFFF,
        0x0040_0000,
        0x0000_8000, // f32 subnormals
        0x0080_0000,
        0x0080_0001,
        0x7F7F_FFFF,
        0xFF7F_FFFF, // f32 min normal, max
        0x477F_E000,
        0x477F_EFFF,
        0x477F_F000,
        0x477F_F001,
        0x4780_0000, // around f16 max 65504
        0xC77F_E000,
        0xC77F_F000,
        0xC77F_EFFF,
        0x3380_0000,
        0x3300_0000,
        0x3300_0001,
        0x32FF_FFFF,
        0x33C0_0000,
        0x33A0_0000, // f16 min subnormal
        0x3880_0000,
        0x387F_E000,
        0x387F_F000,
        0x387F_FFFF,
        0x387F_C000, // f16 min normal
        0x7F7F_0000,
        0x7F7F_7FFF,
        0x7F7F_8000,
        0x7F7F_8001,
        0x7F7E_8000, // around bf16 max
        0x3F80_0000,
        0x3F80_8000,
        0x3F81_8000,
        0x3F80_8001,
        0x3F80_7FFF, // bf16 ties at 1.0
        0x3F80_1000,
        0x3F80_3000,
        0x3F80_0FFF,
        0x3F80_1001, // f16 ties at 1.0
    ];
    // Every f16 value's neighbours in f32: the halfway point to the next f16, and one ulp either
    // side of it (covers the subnormal range, where the tie bit moves).
    for h in 0u16..0x7C00 {
        let a = f16::from_bits(h).to_f32() as f64;
        let b = f16::from_bits(h + 1).to_f32() as f64;
        let mid = ((a + b) / 2.0) as f32; // exact: f16 midpoints fit in f32
        let m = mid.to_bits();
        for x in [m.wrapping_sub(1), m, m + 1, (a as f32).to_bits()] {
            v.push(x);
            v.push(x | 0x8000_0000);
        }
    }
    // Every sign/exponent/top-10-mantissa pattern with the low 13 bits at the f16 rounding
    // boundaries, and every top-16-bit pattern with the low 16 bits at the bf16 ones.
    for hi in 0u32..(1 << 19) {
        for lo in [0u32, 1, 0x0FFF, 0x1000, 0x1001, 0x1FFF] {
            v.push((hi << 13) | lo);
        }
    }
    for hi in 0u32..(1 << 16) {
        for lo in [0u32, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF] {
            v.push((hi << 16) | lo);
        }
    }
    v
}

fn check_f32_inputs(inputs: &[u32]) {
    let src: Vec<u8> = inputs.iter().flat_map(|x| x.to_le_bytes()).collect();

    let got = u16s(&host_matches_kernel(Dtype::F32, Dtype::F16, &src));
    let want: Vec<u16> = inputs.iter().map(|&x| f16::from_f32(f32::from_bits(x)).to_bits()).collect();
    same("F32->F16 vs half (runtime)", inputs, &got, &want);
    let want: Vec<u16> = inputs.iter().map(|&x| f16::from_f32_const(f32::from_bits(x)).to_bits()).collect();
    same("F32->F16 vs half (software)", inputs, &got, &want);

    let got = u16s(&host_matches_kernel(Dtype::F32, Dtype::BF16, &src));
    let want: Vec<u16> = inputs.iter().map(|&x| bf16::from_f32(f32::from_bits(x)).to_bits()).collect();
    same("F32->BF16 vs half", inputs, &got, &want);
}

#[test]
fn f32_sources_special_values_and_boundaries() {
    let inputs = f32_special_inputs();
    assert!(inputs.len() > 3_500_000);
    check_f32_inputs(&inputs);
}

#[test]
fn f32_sources_10m_random() {
    let mut r = SplitMix(0x05EE_DF32);
    let mut inputs = Vec::with_capacity(10_000_000);
    for i in 0..10_000_000u32 {
        let x = r.next();
        inputs.push(if i % 2 == 0 {
            x as u32 // any bit pattern
        } else {
            // exponents around the f16 range (2^-27 .. 2^18), any sign and mantissa
            let exp = 100 + (x >> 32) as u32 % 46;
            (x as u32 & 0x807F_FFFF) | (exp << 23)
        });
    }
    check_f32_inputs(&inputs);
}

#[test]
#[ignore = "sweeps all 2^32 f32 (run with --release -- --ignored)"]
fn all_f32_inputs() {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    const CHUNK: u64 = 1 << 22;
    let next = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let start = next.fetch_add(CHUNK, std::sync::atomic::Ordering::Relaxed);
                if start >= 1 << 32 {
                    break;
                }
                let inputs: Vec<u32> = (start..start + CHUNK).map(|x| x as u32).collect();
                check_f32_inputs(&inputs);
            });
        }
    });
}

// ------------------------------------------------------------------------------------------------
// f64 sources.

fn check_f64_inputs(inputs: &[u64]) {
    let src: Vec<u8> = inputs.iter().flat_map(|x| x.to_le_bytes()).collect();

    let got = u32s(&host_matches_kernel(Dtype::F64, Dtype::F32, &src));
    let want: Vec<u32> = inputs.iter().map(|&x| (f64::from_bits(x) as f32).to_bits()).collect();
    same("F64->F32 vs `as f32`", inputs, &got, &want);

    // Correctly rounded, against an independent reference: round to odd into f32 (exact enough:
    // f32 keeps 13 and 16 more bits than f16 and bf16), then `half`'s f32 rounding. NaNs: the
    // payload rule is `half`'s (its software path), which the fix of the tie rule did not touch.
    let got = u16s(&host_matches_kernel(Dtype::F64, Dtype::F16, &src));
    let want: Vec<u16> = inputs
        .iter()
        .map(|&x| {
            let v = f64::from_bits(x);
            if v.is_nan() { f16::from_f64_const(v) } else { f16::from_f32(round_to_odd_f32(v)) }.to_bits()
        })
        .collect();
    same("F64->F16 vs correct rounding", inputs, &got, &want);

    let got = u16s(&host_matches_kernel(Dtype::F64, Dtype::BF16, &src));
    let want: Vec<u16> = inputs
        .iter()
        .map(|&x| {
            let v = f64::from_bits(x);
            if v.is_nan() { bf16::from_f64(v) } else { bf16::from_f32(round_to_odd_f32(v)) }.to_bits()
        })
        .collect();
    same("F64->BF16 vs correct rounding", inputs, &got, &want);
}

/// `x` rounded to f32 toward zero, with the last bit set when any bit was dropped ("round to
/// odd"): rounding that once more to a format at least two bits narrower is correctly rounded.
fn round_to_odd_f32(x: f64) -> f32 {
    if !x.is_finite() {
        return x as f32;
    }
    let mut t = x as f32; // round to nearest, possibly away from zero or to infinity
    if t.is_infinite() || (t as f64).abs() > x.abs() {
        // one step toward zero
        t = f32::from_bits(if t.is_infinite() {
            f32::MAX.to_bits() | (t.to_bits() & 0x8000_0000)
        } else {
            t.to_bits() - 1
        });
    }
    if t as f64 != x {
        t = f32::from_bits(t.to_bits() | 1);
    }
    t
}

#[test]
fn f64_sources_special_values_boundaries_and_random() {
    let mut v: Vec<u64> = vec![
        0,
        1 << 63,
        0x7FF0_0000_0000_0000,
        0xFFF0_0000_0000_0000,
        0x7FF8_0000_0000_0000,
        0xFFF8_0000_0000_0000,
        0x7FF0_0000_0000_0001, // NaN with payload only in the low word
        0x7FF0_0000_2000_0000,
        0x7FF0_0001_0000_0000,
        0x7FF4_0000_0000_0000,
        0x7FFF_FFFF_FFFF_FFFF,
        1,
        0x000F_FFFF_FFFF_FFFF,
        0x0010_0000_0000_0000,
        0x7FEF_FFFF_FFFF_FFFF,
        0x47EF_FFFF_E000_0000, // f32 max
        0x47EF_FFFF_F000_0000, // halfway to 2^128: rounds to inf
        0x47EF_FFFF_EFFF_FFFF,
        0x36A0_0000_0000_0000, // f32 min subnormal
        0x3690_0000_0000_0000, // half of it: ties to 0
        0x3690_0000_0000_0001,
        0x36A8_0000_0000_0000,
    ];
    // Every f32 rounding boundary sample, widened, and nudged in the bits f32 drops.
    for x in f32_special_inputs().into_iter().step_by(7) {
        let d = (f32::from_bits(x) as f64).to_bits();
        for n in [d, d.wrapping_add(1), d.wrapping_sub(1), d ^ 0x1000_0000, d | 0x0FFF_FFFF, d | 0x8000_0001] {
            v.push(n);
        }
    }
    let mut r = SplitMix(0x05EE_DF64);
    for i in 0..4_000_000u32 {
        let x = r.next();
        v.push(if i % 2 == 0 {
            x
        } else {
            // exponents around the f16/bf16/f32 ranges
            let exp = 800 + (x >> 52) % 400;
            (x & 0x800F_FFFF_FFFF_FFFF) | (exp << 52)
        });
    }
    check_f64_inputs(&v);
}

#[test]
fn f64_rounds_once_not_through_f32() {
    // 1 + 3*2^-11 - 2^-25: below the f16 tie between 1+2^-10 and 1+2^-9, so it rounds down to
    // 1+2^-10 (0x3C01); through f32 it first becomes the tie itself and then rounds to even
    // (0x3C02).
    let x = 1.0 + 3.0 * 2f64.powi(-11) - 2f64.powi(-25);
    assert_eq!(f16::from_f32_const(x as f32).to_bits(), 0x3C02);
    assert_eq!(u16s(&kernel(Dtype::F64, Dtype::F16, &x.to_le_bytes())), [0x3C01]);
    // The same for bf16: 1 + 3*2^-8 - 2^-25 -> 0x3F81, through f32 0x3F82.
    let x = 1.0 + 3.0 * 2f64.powi(-8) - 2f64.powi(-25);
    assert_eq!(bf16::from_f32(x as f32).to_bits(), 0x3F82);
    assert_eq!(u16s(&kernel(Dtype::F64, Dtype::BF16, &x.to_le_bytes())), [0x3F81]);
    // Unlike `half` 2.x, whose tie test looks at the upper 32 bits of the f64 only, every bit
    // counts: 1 + 2^-11 + 2^-40 is above the tie and rounds up (numpy agrees), where `half`
    // gives 0x3C00. The same for bf16 with 1 + 2^-8 + 2^-40.
    let x = 1.0 + 2f64.powi(-11) + 2f64.powi(-40);
    assert_eq!(f16::from_f64_const(x).to_bits(), 0x3C00);
    assert_eq!(u16s(&kernel(Dtype::F64, Dtype::F16, &x.to_le_bytes())), [0x3C01]);
    let x = 1.0 + 2f64.powi(-8) + 2f64.powi(-40);
    assert_eq!(u16s(&kernel(Dtype::F64, Dtype::BF16, &x.to_le_bytes())), [0x3F81]);
    // An exact tie still rounds to even.
    let x = 1.0 + 2f64.powi(-11);
    assert_eq!(u16s(&kernel(Dtype::F64, Dtype::F16, &x.to_le_bytes())), [0x3C00]);
}

// ------------------------------------------------------------------------------------------------
// fp8 sources against ml_dtypes.

fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("WEIGHTSTREAM_PYTHON") {
        return p.into();
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    if venv.is_file() {
        return venv;
    }
    "python3".into()
}

/// The tables of scripts/fp8_tables.py, or `None` (after one line saying why) without ml_dtypes.
fn ml_dtypes_tables() -> Option<serde_json::Value> {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("fp8.json");
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/fp8_tables.py");
    let py = python();
    match Command::new(&py).arg(&script).arg(&out).output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            let why = String::from_utf8_lossy(&o.stderr);
            eprintln!(
                "skipping fp8 vs ml_dtypes: {} {}: {}",
                py.display(),
                script.display(),
                why.lines().last().unwrap_or("failed")
            );
            return None;
        }
        Err(e) => {
            eprintln!("skipping fp8 vs ml_dtypes: cannot run {}: {e}", py.display());
            return None;
        }
    }
    Some(serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap())
}

#[test]
fn fp8_sources_all_256() {
    let inputs: Vec<u8> = (0..=u8::MAX).collect();
    let tables = ml_dtypes_tables();
    for from in [Dtype::F8_E4M3, Dtype::F8_E5M2] {
        for to in [Dtype::F32, Dtype::F16, Dtype::BF16] {
            let got = host_matches_kernel(from, to, &inputs);
            let got: Vec<u32> = match to {
                Dtype::F32 => u32s(&got),
                _ => u16s(&got).into_iter().map(u32::from).collect(),
            };
            // Independent of Python: the values are exact, so f32 goes through `half` to 16 bits.
            if to == Dtype::F32 {
                for (i, &g) in got.iter().enumerate() {
                    let x = f32::from_bits(g);
                    assert!(x.is_nan() || x == 0.0 || x.is_infinite() || x.abs() >= 2f32.powi(-16), "{from} {i:#x}");
                }
            }
            let Some(t) = &tables else { continue };
            let want: Vec<u32> =
                t[from.name()][to.name()].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
            same(&format!("{from}->{to} vs ml_dtypes"), &inputs, &got, &want);
        }
    }
}

#[test]
fn every_conversion_is_checked_here() {
    let checked = [
        (Dtype::F16, Dtype::F32),
        (Dtype::F16, Dtype::BF16),
        (Dtype::BF16, Dtype::F32),
        (Dtype::BF16, Dtype::F16),
        (Dtype::F32, Dtype::F16),
        (Dtype::F32, Dtype::BF16),
        (Dtype::F64, Dtype::F32),
        (Dtype::F64, Dtype::F16),
        (Dtype::F64, Dtype::BF16),
        (Dtype::F8_E4M3, Dtype::F32),
        (Dtype::F8_E4M3, Dtype::F16),
        (Dtype::F8_E4M3, Dtype::BF16),
        (Dtype::F8_E5M2, Dtype::F32),
        (Dtype::F8_E5M2, Dtype::F16),
        (Dtype::F8_E5M2, Dtype::BF16),
    ];
    for c in conversions() {
        assert!(checked.contains(&c), "{c:?} has no test");
    }
    assert_eq!(conversions().count(), checked.len());
}

#[test]
fn convert_host_large_buffers_match_kernel_math() {
    // Big enough for the parallel split, with an odd element count.
    let mut r = SplitMix(7);
    let n = 5_000_003usize;
    let f32src: Vec<u8> = (0..n).flat_map(|_| (r.next() as u32).to_le_bytes()).collect();
    for to in [Dtype::F16, Dtype::BF16] {
        host_matches_kernel(Dtype::F32, to, &f32src);
    }
    let f64src: Vec<u8> = (0..n / 2).flat_map(|_| r.next().to_le_bytes()).collect();
    for to in [Dtype::F32, Dtype::F16, Dtype::BF16] {
        host_matches_kernel(Dtype::F64, to, &f64src);
    }
    let h: Vec<u8> = (0..n * 2).map(|_| r.next() as u8).collect();
    for (from, to) in
        [(Dtype::F16, Dtype::F32), (Dtype::F16, Dtype::BF16), (Dtype::BF16, Dtype::F32), (Dtype::BF16, Dtype::F16)]
    {
        host_matches_kernel(from, to, &h);
    }
    for from in [Dtype::F8_E4M3, Dtype::F8_E5M2] {
        for to in [Dtype::F32, Dtype::F16, Dtype::BF16] {
            host_matches_kernel(from, to, &h);
        }
    }
    // Identity copies, and errors instead of panics on bad lengths.
    assert_eq!(host(Dtype::I32, Dtype::I32, &h[..12]), &h[..12]);
    let mut small = [0u8; 3];
    assert!(convert_host(Dtype::F32, Dtype::BF16, &f32src[..8], &mut small).is_err());
    assert!(convert_host(Dtype::F32, Dtype::BF16, &f32src[..7], &mut small).is_err());
    assert!(convert_host(Dtype::F16, Dtype::F8_E4M3, &f32src[..8], &mut [0u8; 4]).is_err());
}

#[test]
fn misaligned_buffers_take_the_byte_wise_path_with_the_same_bits() {
    // Backed by u64s, so an offset of 1 is misaligned for every element type: convert_host then
    // skips its typed loops, and must still give the kernel math's bits.
    let mut r = SplitMix(11);
    let words: Vec<u64> = (0..40_001).map(|_| r.next()).collect();
    let bytes: &[u8] = bytemuck::cast_slice(&words);
    for (from, to) in conversions() {
        let n = (bytes.len() - 1) / (from.bits() / 8) as usize / 2;
        let src_len = n * (from.bits() / 8) as usize;
        let src = &bytes[1..1 + src_len];
        let want = kernel(from, to, src);
        let mut out = vec![0u64; want.len() / 8 + 2];
        let out_bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut out);
        let dst = &mut out_bytes[1..1 + want.len()];
        convert_host(from, to, src, dst).unwrap();
        assert!(dst == &want[..], "{from}->{to} on misaligned buffers");
    }
}
