//! Dtype conversion: which pairs exist, the size of their output, and the host path ([`cpu`]).
//! The CUDA kernels of the same pairs are `crate::cuda::kernels` (feature `cuda`).
//!
//! The conversions are F32↔F16, F32↔BF16, F16↔BF16, F64→{F32, F16, BF16} and
//! F8_E4M3/F8_E5M2→{F16, BF16, F32}, plus the identity for every dtype (a copy). Rounding is to
//! nearest even, NaN stays NaN, and values too large for the target become ±inf; results equal the
//! `half` crate's software conversions bit for bit (and ml_dtypes for fp8, `float8_e4m3fn` having
//! no infinity). The per-element code of the kernels (`kernels/convert_math.cuh`) is also compiled
//! for the host, see [`cpu::convert_with_kernel_math`], and [`cpu::convert_host`] gives the same
//! bits.
//!
//! ```
//! use weightstream::{convert, Dtype};
//! assert!(convert::supported(Dtype::F32, Dtype::BF16));
//! assert!(!convert::supported(Dtype::BF16, Dtype::I8));
//! assert_eq!(convert::output_len(Dtype::F32, Dtype::BF16, 4096), Some(2048));
//!
//! let src: Vec<u8> = [1.0f32, -2.5, f32::INFINITY].iter().flat_map(|x| x.to_le_bytes()).collect();
//! let mut dst = vec![0u8; 6];
//! convert::convert_host(Dtype::F32, Dtype::BF16, &src, &mut dst)?;
//! assert_eq!(dst, [0x80, 0x3f, 0x20, 0xc0, 0x80, 0x7f]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod cpu;
mod lanes;
pub(crate) mod workers;

pub use cpu::{convert_host, convert_with_kernel_math};

use crate::error::{Error, Result};
use crate::format::Dtype;

/// Every conversion between two different dtypes that has a kernel, with the suffix of its names
/// (`ws_convert_<suffix>` on the device, `ws_host_convert_<suffix>` in the host shim). Must list
/// the same pairs as `WS_CONVERT_PAIRS` in `kernels/convert_math.cuh`.
pub(crate) const TABLE: [(Dtype, Dtype, &str); 15] = [
    (Dtype::F32, Dtype::F16, "f32_f16"),
    (Dtype::F32, Dtype::BF16, "f32_bf16"),
    (Dtype::F16, Dtype::F32, "f16_f32"),
    (Dtype::BF16, Dtype::F32, "bf16_f32"),
    (Dtype::F16, Dtype::BF16, "f16_bf16"),
    (Dtype::BF16, Dtype::F16, "bf16_f16"),
    (Dtype::F64, Dtype::F32, "f64_f32"),
    (Dtype::F64, Dtype::F16, "f64_f16"),
    (Dtype::F64, Dtype::BF16, "f64_bf16"),
    (Dtype::F8_E4M3, Dtype::F16, "f8e4m3_f16"),
    (Dtype::F8_E4M3, Dtype::BF16, "f8e4m3_bf16"),
    (Dtype::F8_E4M3, Dtype::F32, "f8e4m3_f32"),
    (Dtype::F8_E5M2, Dtype::F16, "f8e5m2_f16"),
    (Dtype::F8_E5M2, Dtype::BF16, "f8e5m2_bf16"),
    (Dtype::F8_E5M2, Dtype::F32, "f8e5m2_f32"),
];

/// The conversions between two different dtypes (each has a kernel), as `(from, to)`.
pub fn conversions() -> impl Iterator<Item = (Dtype, Dtype)> {
    TABLE.iter().map(|&(f, t, _)| (f, t))
}

/// True when `from` can be converted to `to`: one of [`conversions`], or `from == to` (a copy).
pub fn supported(from: Dtype, to: Dtype) -> bool {
    from == to || suffix(from, to).is_some()
}

/// Bytes that `src_len` bytes of `from` take once converted to `to`; `None` when the pair is not
/// [`supported`], when `src_len` is not a whole number of `from` elements, or on overflow.
pub fn output_len(from: Dtype, to: Dtype, src_len: u64) -> Option<u64> {
    if from == to {
        return Some(src_len);
    }
    suffix(from, to)?;
    let (fb, tb) = (from.bits() / 8, to.bits() / 8);
    if src_len % fb != 0 {
        return None;
    }
    (src_len / fb).checked_mul(tb)
}

/// The position in [`TABLE`] of a conversion between two different dtypes.
pub(crate) fn table_index(from: Dtype, to: Dtype) -> Option<usize> {
    TABLE.iter().position(|&(f, t, _)| f == from && t == to)
}

/// The kernel-name suffix of a conversion between two different dtypes.
pub(crate) fn suffix(from: Dtype, to: Dtype) -> Option<&'static str> {
    table_index(from, to).map(|i| TABLE[i].2)
}

/// Checks a conversion request: the pair is supported and the buffer lengths fit. Returns the
/// number of elements.
pub(crate) fn check(from: Dtype, to: Dtype, src_len: usize, dst_len: usize) -> Result<usize> {
    if !supported(from, to) {
        return Err(conversion_error(from, to, "no such conversion".into()));
    }
    let Some(want) = output_len(from, to, src_len as u64) else {
        return Err(conversion_error(
            from,
            to,
            format!("source of {src_len} bytes is not a whole number of {from} elements"),
        ));
    };
    if want != dst_len as u64 {
        return Err(conversion_error(
            from,
            to,
            format!("source of {src_len} bytes needs a destination of {want} bytes, not {dst_len}"),
        ));
    }
    if from == to {
        return Ok(src_len);
    }
    Ok(src_len / (from.bits() / 8) as usize)
}

pub(crate) fn conversion_error(from: Dtype, to: Dtype, message: String) -> Error {
    Error::Conversion { from: from.name(), to: to.name(), message }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_and_lengths() {
        assert_eq!(conversions().count(), 15);
        for d in Dtype::ALL {
            assert!(supported(d, d));
            assert_eq!(output_len(d, d, 7), Some(7));
        }
        assert!(!supported(Dtype::F16, Dtype::F64));
        assert!(!supported(Dtype::F32, Dtype::F8_E4M3));
        assert_eq!(output_len(Dtype::F32, Dtype::F16, 6), None);
        assert_eq!(output_len(Dtype::F8_E4M3, Dtype::F32, 3), Some(12));
        assert_eq!(output_len(Dtype::F64, Dtype::BF16, 16), Some(4));
        assert_eq!(output_len(Dtype::F8_E5M2, Dtype::F32, u64::MAX), None);
        assert_eq!(output_len(Dtype::I8, Dtype::F32, 4), None);
        assert!(check(Dtype::F32, Dtype::F16, 8, 3).is_err());
        assert!(check(Dtype::F32, Dtype::F16, 7, 3).is_err());
        assert!(check(Dtype::I32, Dtype::F16, 8, 4).is_err());
        assert_eq!(check(Dtype::F32, Dtype::F16, 8, 4).unwrap(), 2);
    }
}
