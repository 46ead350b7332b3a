// Per-element dtype conversion math, shared by the CUDA kernels (kernels/convert.cu, compiled by
// nvcc or NVRTC) and the host shim (kernels/host_shim.cpp, compiled by the `cc` crate for tests).
//
// Everything works on bit patterns with integer arithmetic only: no float unit, no
// flush-to-zero, no dependence on cuda_fp16.h / cuda_bf16.h / stdint.h, so that the device and
// the host give the same bits for every input.
//
// Semantics (checked by tests/convert_math.rs):
// - F32/F64 -> F16/BF16 and F16/BF16 -> F32 are a literal port of the `half` crate's (2.x)
//   software paths (`f16::from_f32_const`, `f16::from_f64_const`, `bf16::from_f32`,
//   `bf16::from_f64`, `to_f32_const`): round to nearest even, overflow to +-inf, NaN stays NaN
//   with its payload truncated and the quiet bit set. F64 -> F16/BF16 round once from the f64
//   value (no double rounding through f32) and, unlike `half` 2.x (whose tie test looks at the
//   upper 32 bits of the f64 only, so 1 + 2^-11 + 2^-40 becomes 1.0), take every mantissa bit
//   into account: correctly rounded, equal to numpy and ml_dtypes (tests/convert_load.rs).
// - F16 <-> BF16 go through f32 (exact), then round once.
// - F64 -> F32: IEEE round to nearest even; NaN keeps the upper payload bits and gets the quiet
//   bit (what x86 `cvtsd2ss`, i.e. Rust's `as f32`, produces).
// - F8_E4M3 (float8_e4m3fn: no inf, NaN = S.1111.111) and F8_E5M2 -> F16/BF16/F32 are exact;
//   NaN becomes the target's canonical quiet NaN with the sign kept (what ml_dtypes produces).
#ifndef WS_CONVERT_MATH_CUH
#define WS_CONVERT_MATH_CUH

#ifndef __CUDACC__
#define __host__
#define __device__
#define __forceinline__ inline __attribute__((always_inline))
#endif

typedef unsigned char ws_u8;
typedef unsigned short ws_u16;
typedef unsigned int ws_u32;
typedef unsigned long long ws_u64;

// Count of leading zero bits of a non-zero 32-bit value.
__host__ __device__ __forceinline__ int ws_clz32(ws_u32 x) {
#if defined(__CUDA_ARCH__)
    return __clz((int)x);
#else
    return __builtin_clz(x);
#endif
}

// ---------------------------------------------------------------------------------------------
// f32 -> f16 (`half::f16::from_f32_const`)
__host__ __device__ __forceinline__ ws_u16 ws_f32_to_f16(ws_u32 x) {
    ws_u32 sign = x & 0x80000000u;
    ws_u32 exp = x & 0x7F800000u;
    ws_u32 man = x & 0x007FFFFFu;
    if (exp == 0x7F800000u) {
        ws_u32 nan_bit = man == 0 ? 0u : 0x0200u;
        return (ws_u16)((sign >> 16) | 0x7C00u | nan_bit | (man >> 13));
    }
    ws_u32 half_sign = sign >> 16;
    int half_exp = (int)(exp >> 23) - 127 + 15;
    if (half_exp >= 0x1F) {
        return (ws_u16)(half_sign | 0x7C00u);
    }
    if (half_exp <= 0) {
        if (14 - half_exp > 24) {
            return (ws_u16)half_sign;
        }
        man |= 0x00800000u;
        ws_u32 half_man = man >> (14 - half_exp);
        ws_u32 round_bit = 1u << (13 - half_exp);
        if ((man & round_bit) != 0 && (man & (3u * round_bit - 1u)) != 0) {
            half_man += 1;
        }
        return (ws_u16)(half_sign | half_man);
    }
    ws_u32 r = half_sign | ((ws_u32)half_exp << 10) | (man >> 13);
    const ws_u32 round_bit = 0x00001000u;
    if ((man & round_bit) != 0 && (man & (3u * round_bit - 1u)) != 0) {
        r += 1;
    }
    return (ws_u16)r;
}

// f32 -> bf16 (`half::bf16::from_f32`)
__host__ __device__ __forceinline__ ws_u16 ws_f32_to_bf16(ws_u32 x) {
    if ((x & 0x7FFFFFFFu) > 0x7F800000u) {
        return (ws_u16)((x >> 16) | 0x0040u);
    }
    const ws_u32 round_bit = 0x00008000u;
    ws_u32 r = x >> 16;
    if ((x & round_bit) != 0 && (x & (3u * round_bit - 1u)) != 0) {
        r += 1;
    }
    return (ws_u16)r;
}

// f16 -> f32 (`half::f16::to_f32_const`; exact)
__host__ __device__ __forceinline__ ws_u32 ws_f16_to_f32(ws_u16 h) {
    ws_u32 i = h;
    if ((i & 0x7FFFu) == 0) {
        return i << 16;
    }
    ws_u32 half_sign = i & 0x8000u;
    ws_u32 half_exp = i & 0x7C00u;
    ws_u32 half_man = i & 0x03FFu;
    if (half_exp == 0x7C00u) {
        if (half_man == 0) {
            return (half_sign << 16) | 0x7F800000u;
        }
        return (half_sign << 16) | 0x7FC00000u | (half_man << 13);
    }
    ws_u32 sign = half_sign << 16;
    if (half_exp == 0) {
        // Subnormal: normalise. leading zeros of the 16-bit mantissa field, minus the 6 bits
        // above the 10-bit mantissa.
        int e = (ws_clz32(half_man) - 16) - 6;
        ws_u32 exp = (ws_u32)(127 - 15 - e) << 23;
        ws_u32 man = (half_man << (14 + e)) & 0x007FFFFFu;
        return sign | exp | man;
    }
    int unbiased_exp = (int)(half_exp >> 10) - 15;
    ws_u32 exp = (ws_u32)(unbiased_exp + 127) << 23;
    return sign | exp | (half_man << 13);
}

// bf16 -> f32 (`half::bf16::to_f32`; exact)
__host__ __device__ __forceinline__ ws_u32 ws_bf16_to_f32(ws_u16 b) {
    ws_u32 i = b;
    if ((i & 0x7FFFu) > 0x7F80u) {
        return (i | 0x0040u) << 16;
    }
    return i << 16;
}

// f16 -> bf16 and bf16 -> f16: through f32 (exact), one rounding.
__host__ __device__ __forceinline__ ws_u16 ws_f16_to_bf16(ws_u16 h) {
    return ws_f32_to_bf16(ws_f16_to_f32(h));
}

__host__ __device__ __forceinline__ ws_u16 ws_bf16_to_f16(ws_u16 b) {
    return ws_f32_to_f16(ws_bf16_to_f32(b));
}

// ---------------------------------------------------------------------------------------------
// f64 -> f32: IEEE round to nearest even over all 52 mantissa bits.
__host__ __device__ __forceinline__ ws_u32 ws_f64_to_f32(ws_u64 x) {
    ws_u32 sign = (ws_u32)(x >> 32) & 0x80000000u;
    int exp = (int)((x >> 52) & 0x7FFu);
    ws_u64 man = x & 0x000FFFFFFFFFFFFFull;
    if (exp == 0x7FF) {
        if (man == 0) {
            return sign | 0x7F800000u;
        }
        return sign | 0x7FC00000u | (ws_u32)(man >> 29);
    }
    int e = exp - 1023 + 127;
    if (e >= 0xFF) {
        return sign | 0x7F800000u;
    }
    if (e <= 0) {
        // f32 subnormal or zero. f64 subnormals are far below half the smallest f32 subnormal.
        if (exp == 0) {
            return sign;
        }
        ws_u64 full = man | 0x0010000000000000ull;
        int shift = 29 + 1 - e;  // >= 30
        if (shift > 54) {
            return sign;  // below half the smallest subnormal
        }
        ws_u64 m = full >> shift;
        ws_u64 rem = full & ((1ull << shift) - 1ull);
        ws_u64 halfway = 1ull << (shift - 1);
        if (rem > halfway || (rem == halfway && (m & 1ull) != 0)) {
            m += 1;
        }
        return sign | (ws_u32)m;
    }
    ws_u32 r = sign | ((ws_u32)e << 23) | (ws_u32)(man >> 29);
    ws_u64 rem = man & 0x1FFFFFFFull;
    const ws_u64 halfway = 0x10000000ull;
    if (rem > halfway || (rem == halfway && (r & 1u) != 0)) {
        r += 1;  // a carry into the exponent is the right result, up to +-inf
    }
    return r;
}

// f64 -> f16: `half::f16::from_f64_const`, with the low 32 mantissa bits in the sticky bit.
__host__ __device__ __forceinline__ ws_u16 ws_f64_to_f16(ws_u64 val) {
    ws_u32 x = (ws_u32)(val >> 32);
    ws_u32 sign = x & 0x80000000u;
    ws_u32 exp = x & 0x7FF00000u;
    ws_u32 man = x & 0x000FFFFFu;
    if (exp == 0x7FF00000u) {
        ws_u32 nan_bit = (man == 0 && (ws_u32)val == 0) ? 0u : 0x0200u;
        return (ws_u16)((sign >> 16) | 0x7C00u | nan_bit | (man >> 10));
    }
    ws_u32 half_sign = sign >> 16;
    int half_exp = (int)(exp >> 20) - 1023 + 15;
    if (half_exp >= 0x1F) {
        return (ws_u16)(half_sign | 0x7C00u);
    }
    if (half_exp <= 0) {
        if (10 - half_exp > 21) {
            return (ws_u16)half_sign;
        }
        man |= 0x00100000u;
        ws_u32 half_man = man >> (11 - half_exp);
        ws_u32 round_bit = 1u << (10 - half_exp);
        if ((man & round_bit) != 0 && ((man & (3u * round_bit - 1u)) != 0 || (ws_u32)val != 0)) {
            half_man += 1;
        }
        return (ws_u16)(half_sign | half_man);
    }
    ws_u32 r = half_sign | ((ws_u32)half_exp << 10) | (man >> 10);
    const ws_u32 round_bit = 0x00000200u;
    if ((man & round_bit) != 0 && ((man & (3u * round_bit - 1u)) != 0 || (ws_u32)val != 0)) {
        r += 1;
    }
    return (ws_u16)r;
}

// f64 -> bf16: `half::bf16::from_f64`, with the low 32 mantissa bits in the sticky bit.
__host__ __device__ __forceinline__ ws_u16 ws_f64_to_bf16(ws_u64 val) {
    ws_u32 x = (ws_u32)(val >> 32);
    ws_u32 sign = x & 0x80000000u;
    ws_u32 exp = x & 0x7FF00000u;
    ws_u32 man = x & 0x000FFFFFu;
    if (exp == 0x7FF00000u) {
        ws_u32 nan_bit = (man == 0 && (ws_u32)val == 0) ? 0u : 0x0040u;
        return (ws_u16)((sign >> 16) | 0x7F80u | nan_bit | (man >> 13));
    }
    ws_u32 half_sign = sign >> 16;
    int half_exp = (int)(exp >> 20) - 1023 + 127;
    if (half_exp >= 0xFF) {
        return (ws_u16)(half_sign | 0x7F80u);
    }
    if (half_exp <= 0) {
        if (7 - half_exp > 21) {
            return (ws_u16)half_sign;
        }
        man |= 0x00100000u;
        ws_u32 half_man = man >> (14 - half_exp);
        ws_u32 round_bit = 1u << (13 - half_exp);
        if ((man & round_bit) != 0 && ((man & (3u * round_bit - 1u)) != 0 || (ws_u32)val != 0)) {
            half_man += 1;
        }
        return (ws_u16)(half_sign | half_man);
    }
    ws_u32 r = half_sign | ((ws_u32)half_exp << 7) | (man >> 13);
    const ws_u32 round_bit = 0x00001000u;
    if ((man & round_bit) != 0 && ((man & (3u * round_bit - 1u)) != 0 || (ws_u32)val != 0)) {
        r += 1;
    }
    return (ws_u16)r;
}

// ---------------------------------------------------------------------------------------------
// fp8 -> f32 (exact). NaN -> canonical quiet NaN with the sign.
__host__ __device__ __forceinline__ ws_u32 ws_f8e4m3_to_f32(ws_u8 v) {
    ws_u32 sign = ((ws_u32)v & 0x80u) << 24;
    ws_u32 exp = ((ws_u32)v >> 3) & 0xFu;
    ws_u32 man = (ws_u32)v & 0x7u;
    if (exp == 0xFu && man == 0x7u) {
        return sign | 0x7FC00000u;
    }
    if (exp == 0) {
        if (man == 0) {
            return sign;
        }
        // man * 2^-9: normalise the 3-bit mantissa.
        int lz = ws_clz32(man) - 29;  // 0..2 leading zeros within 3 bits
        ws_u32 m = (man << (lz + 1)) & 0x7u;
        ws_u32 e = (ws_u32)(127 - 7 - lz);
        return sign | (e << 23) | (m << 20);
    }
    return sign | ((exp - 7u + 127u) << 23) | (man << 20);
}

__host__ __device__ __forceinline__ ws_u32 ws_f8e5m2_to_f32(ws_u8 v) {
    ws_u32 sign = ((ws_u32)v & 0x80u) << 24;
    ws_u32 exp = ((ws_u32)v >> 2) & 0x1Fu;
    ws_u32 man = (ws_u32)v & 0x3u;
    if (exp == 0x1Fu) {
        return man == 0 ? (sign | 0x7F800000u) : (sign | 0x7FC00000u);
    }
    if (exp == 0) {
        if (man == 0) {
            return sign;
        }
        int lz = ws_clz32(man) - 30;  // 0..1 leading zeros within 2 bits
        ws_u32 m = (man << (lz + 1)) & 0x3u;
        ws_u32 e = (ws_u32)(127 - 15 - lz);
        return sign | (e << 23) | (m << 21);
    }
    return sign | ((exp - 15u + 127u) << 23) | (man << 21);
}

// Every fp8 value is exact in f16 and bf16, and the canonical NaN maps to the canonical NaN,
// so the narrowing from f32 never rounds.
__host__ __device__ __forceinline__ ws_u16 ws_f8e4m3_to_f16(ws_u8 v) {
    return ws_f32_to_f16(ws_f8e4m3_to_f32(v));
}
__host__ __device__ __forceinline__ ws_u16 ws_f8e4m3_to_bf16(ws_u8 v) {
    return (ws_u16)(ws_f8e4m3_to_f32(v) >> 16);
}
__host__ __device__ __forceinline__ ws_u16 ws_f8e5m2_to_f16(ws_u8 v) {
    return ws_f32_to_f16(ws_f8e5m2_to_f32(v));
}
__host__ __device__ __forceinline__ ws_u16 ws_f8e5m2_to_bf16(ws_u8 v) {
    return (ws_u16)(ws_f8e5m2_to_f32(v) >> 16);
}

// ---------------------------------------------------------------------------------------------
// The conversion table: X(suffix, source bits type, destination bits type, function).
// Kernels are `ws_convert_<suffix>`, host shim functions `ws_host_convert_<suffix>`; the Rust
// table in src/convert/mod.rs lists the same suffixes.
#define WS_CONVERT_PAIRS(X)                              \
    X(f32_f16, ws_u32, ws_u16, ws_f32_to_f16)            \
    X(f32_bf16, ws_u32, ws_u16, ws_f32_to_bf16)          \
    X(f16_f32, ws_u16, ws_u32, ws_f16_to_f32)            \
    X(bf16_f32, ws_u16, ws_u32, ws_bf16_to_f32)          \
    X(f16_bf16, ws_u16, ws_u16, ws_f16_to_bf16)          \
    X(bf16_f16, ws_u16, ws_u16, ws_bf16_to_f16)          \
    X(f64_f32, ws_u64, ws_u32, ws_f64_to_f32)            \
    X(f64_f16, ws_u64, ws_u16, ws_f64_to_f16)            \
    X(f64_bf16, ws_u64, ws_u16, ws_f64_to_bf16)          \
    X(f8e4m3_f16, ws_u8, ws_u16, ws_f8e4m3_to_f16)       \
    X(f8e4m3_bf16, ws_u8, ws_u16, ws_f8e4m3_to_bf16)     \
    X(f8e4m3_f32, ws_u8, ws_u32, ws_f8e4m3_to_f32)       \
    X(f8e5m2_f16, ws_u8, ws_u16, ws_f8e5m2_to_f16)       \
    X(f8e5m2_bf16, ws_u8, ws_u16, ws_f8e5m2_to_bf16)     \
    X(f8e5m2_f32, ws_u8, ws_u32, ws_f8e5m2_to_f32)

#endif  // WS_CONVERT_MATH_CUH
