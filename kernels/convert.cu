// Elementwise dtype conversion kernels: one `extern "C"` kernel per (from, to) pair,
//
//     ws_convert_<from>_<to>(const void* src, void* dst, unsigned long long n)
//
// converting `n` elements with grid-stride loops. The per-element math lives in convert_math.cuh
// (also compiled for the host and tested there exhaustively); build.rs inlines that header for
// NVRTC, which gets no include path. When both pointers are 16-byte aligned:
//
// - narrowing and same-size pairs (F32/F64 -> narrower, F16 <-> BF16): each thread converts
//   groups of G elements, G = 16 / the destination element size, with 16-byte loads and one
//   16-byte store (consecutive threads store consecutive 16 bytes);
// - widening pairs (F16/BF16 -> F32, fp8 -> anything): each 16-byte destination vector is one
//   "chunk" of E = 16 / sizeof(D) elements, whose source is a 4- or 8-byte load. A thread handles
//   K chunks per iteration, a whole grid apart (an unrolled grid-stride loop), so that every load
//   and every store instruction of a warp covers consecutive bytes (whole 32-byte sectors; no
//   store is left half-written for a later instruction to complete) and each thread has 32
//   source bytes in flight;
// - fp8 sources convert through a 256-entry table in shared memory that each block fills from the
//   per-element function (so the bits are those of convert_math.cuh by construction) instead of
//   branching per element.
//
// The last n % G (or n % E) elements, and everything when a pointer is misaligned, are converted
// one by one (through the same table for fp8).
#include "convert_math.cuh"

template <typename S, typename D>
struct ws_group_size {
    static const int value = 16 / (sizeof(S) < sizeof(D) ? sizeof(S) : sizeof(D));
};

template <typename S, typename D, D (*F)(S)>
__device__ __forceinline__ void ws_convert_body(const void* src_, void* dst_, ws_u64 n) {
    const int G = ws_group_size<S, D>::value;
    const int SV = (int)(sizeof(S) * G / 16);  // 16-byte vectors per group, source side
    const int DV = (int)(sizeof(D) * G / 16);  // and destination side
    const S* __restrict__ src = static_cast<const S*>(src_);
    D* __restrict__ dst = static_cast<D*>(dst_);

    const ws_u64 tid = (ws_u64)blockIdx.x * blockDim.x + threadIdx.x;
    const ws_u64 stride = (ws_u64)gridDim.x * blockDim.x;
    ws_u64 scalar_from = 0;

    if ((((ws_u64)src_ | (ws_u64)dst_) & 15ull) == 0) {
        const ws_u64 groups = n / G;
        const uint4* __restrict__ s4 = reinterpret_cast<const uint4*>(src);
        uint4* __restrict__ d4 = reinterpret_cast<uint4*>(dst);
        for (ws_u64 g = tid; g < groups; g += stride) {
            union {
                uint4 v[SV];
                S e[G];
            } a;
            union {
                uint4 v[DV];
                D e[G];
            } b;
#pragma unroll
            for (int k = 0; k < SV; ++k) {
                a.v[k] = __ldcs(s4 + g * SV + k);  // streamed once: evict first
            }
#pragma unroll
            for (int i = 0; i < G; ++i) {
                b.e[i] = F(a.e[i]);
            }
#pragma unroll
            for (int k = 0; k < DV; ++k) {
                __stcs(d4 + g * DV + k, b.v[k]);
            }
        }
        scalar_from = groups * G;
    }
    for (ws_u64 i = scalar_from + tid; i < n; i += stride) {
        dst[i] = F(src[i]);
    }
}

// Converts one element with the per-element function.
template <typename S, typename D, D (*F)(S)>
struct ws_by_math {
    __device__ __forceinline__ D operator()(S x) const { return F(x); }
};

// Converts one fp8 element by looking it up in a 256-entry table in shared memory.
template <typename D>
struct ws_by_table {
    const D* table;
    __device__ __forceinline__ D operator()(ws_u8 x) const { return table[x]; }
};

template <int BYTES>
struct ws_vec;
template <>
struct ws_vec<4> {
    typedef unsigned int type;
};
template <>
struct ws_vec<8> {
    typedef uint2 type;
};

// One 16-byte destination vector from the source vector holding its elements.
template <typename S, typename D, typename V, typename C>
__device__ __forceinline__ uint4 ws_widen_vec(V v, const C& conv) {
    const int E = (int)(16 / sizeof(D));
    union {
        V v;
        S e[E];
    } a;
    union {
        uint4 v;
        D e[E];
    } b;
    a.v = v;
#pragma unroll
    for (int i = 0; i < E; ++i) {
        b.e[i] = conv(a.e[i]);
    }
    return b.v;
}

// Widening pairs (sizeof(D) > sizeof(S)); see the top of the file.
template <typename S, typename D, typename C>
__device__ __forceinline__ void ws_widen_body(const void* src_, void* dst_, ws_u64 n, const C& conv) {
    const int E = (int)(16 / sizeof(D));    // elements per 16-byte destination vector (a chunk)
    const int CB = E * (int)sizeof(S);      // source bytes of a chunk: 4 or 8
    const int K = 32 / CB;                  // chunks per thread per iteration: 32 source bytes
    typedef typename ws_vec<CB>::type V;

    const ws_u64 tid = (ws_u64)blockIdx.x * blockDim.x + threadIdx.x;
    const ws_u64 stride = (ws_u64)gridDim.x * blockDim.x;
    ws_u64 scalar_from = 0;

    if ((((ws_u64)src_ | (ws_u64)dst_) & 15ull) == 0) {
        const ws_u64 chunks = n / E;
        const V* __restrict__ s = static_cast<const V*>(src_);
        uint4* __restrict__ d = static_cast<uint4*>(dst_);
        ws_u64 c = tid;
        for (; c + (ws_u64)(K - 1) * stride < chunks; c += (ws_u64)K * stride) {
            V a[K];
#pragma unroll
            for (int k = 0; k < K; ++k) {
                a[k] = __ldcs(s + c + (ws_u64)k * stride);  // streamed once: evict first
            }
#pragma unroll
            for (int k = 0; k < K; ++k) {
                __stcs(d + c + (ws_u64)k * stride, ws_widen_vec<S, D>(a[k], conv));
            }
        }
        for (; c < chunks; c += stride) {
            __stcs(d + c, ws_widen_vec<S, D>(__ldcs(s + c), conv));
        }
        scalar_from = chunks * E;
    }
    const S* __restrict__ src = static_cast<const S*>(src_);
    D* __restrict__ dst = static_cast<D*>(dst_);
    for (ws_u64 i = scalar_from + tid; i < n; i += stride) {
        dst[i] = conv(src[i]);
    }
}

// Which body a pair takes: the group body (narrowing, same size) ...
template <typename S, typename D, D (*F)(S), bool WIDEN = (sizeof(D) > sizeof(S))>
struct ws_kernel_impl {
    static __device__ __forceinline__ void run(const void* src, void* dst, ws_u64 n) {
        ws_convert_body<S, D, F>(src, dst, n);
    }
};

// ... the widening body with the per-element math (F16/BF16 -> F32) ...
template <typename S, typename D, D (*F)(S)>
struct ws_kernel_impl<S, D, F, true> {
    static __device__ __forceinline__ void run(const void* src, void* dst, ws_u64 n) {
        ws_widen_body<S, D>(src, dst, n, ws_by_math<S, D, F>());
    }
};

// ... or, for fp8 sources, with a table that the block first fills from the same function.
template <typename D, D (*F)(ws_u8)>
struct ws_kernel_impl<ws_u8, D, F, true> {
    static __device__ __forceinline__ void run(const void* src, void* dst, ws_u64 n) {
        __shared__ D table[256];
        for (unsigned int i = threadIdx.x; i < 256u; i += blockDim.x) {
            table[i] = F((ws_u8)i);
        }
        __syncthreads();
        ws_by_table<D> conv;
        conv.table = table;
        ws_widen_body<ws_u8, D>(src, dst, n, conv);
    }
};

// 256 threads (what src/convert/cuda.rs launches) and at least 8 blocks per SM: at most 32
// registers, so that 2048 threads fill an sm_80/sm_90 multiprocessor (ptxas spills nothing).
#define WS_KERNEL(suffix, S, D, fn)                                                         \
    extern "C" __global__ void __launch_bounds__(256, 8)                                    \
        ws_convert_##suffix(const void* src, void* dst, unsigned long long n) {             \
        ws_kernel_impl<S, D, fn>::run(src, dst, n);                                         \
    }

WS_CONVERT_PAIRS(WS_KERNEL)
