// Host build of the kernels' per-element math (kernels/convert_math.cuh), so that tests run the
// very code the GPU runs. Built by build.rs with the `cc` crate; no C++ runtime is needed.
//
// `ws_host_convert_<suffix>(src, dst, n)` converts `n` little-endian elements from `src` to
// `dst`; neither pointer needs any alignment. Callers (src/convert/cpu.rs) check the lengths.
#include <string.h>

#include "convert_math.cuh"

#define WS_HOST_CONVERT(suffix, S, D, fn)                                                  \
    extern "C" void ws_host_convert_##suffix(const void* src, void* dst, ws_u64 n) {     \
        const unsigned char* s = static_cast<const unsigned char*>(src);                 \
        unsigned char* d = static_cast<unsigned char*>(dst);                             \
        for (ws_u64 i = 0; i < n; ++i) {                                                  \
            S x;                                                                          \
            memcpy(&x, s + i * sizeof(S), sizeof(S));                                     \
            D y = fn(x);                                                                  \
            memcpy(d + i * sizeof(D), &y, sizeof(D));                                     \
        }                                                                                 \
    }

WS_CONVERT_PAIRS(WS_HOST_CONVERT)
