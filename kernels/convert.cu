// Elementwise dtype conversion kernels: one `extern "C"` kernel per (from, to) pair,
//
//     ws_convert_<from>_<to>(const void* src, void* dst, unsigned long long n)
//
// converting `n` elements. Grid-stride loops; when both pointers are 16-byte aligned, each thread
// converts groups of G elements with 16-byte loads and stores (G = 16 / the smaller element
// size), then the last n % G elements are done one by one. Misaligned pointers take the scalar
// path throughout. The per-element math lives in convert_math.cuh (also compiled for the host and
// tested there exhaustively). build.rs inlines that header for NVRTC, which gets no include path.
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

#define WS_KERNEL(suffix, S, D, fn)                                                         \
    extern "C" __global__ void __launch_bounds__(256)                                       \
        ws_convert_##suffix(const void* src, void* dst, unsigned long long n) {             \
        ws_convert_body<S, D, fn>(src, dst, n);                                             \
    }

WS_CONVERT_PAIRS(WS_KERNEL)
