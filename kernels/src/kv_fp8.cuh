// Device helpers of the FP8 (E4M3) KV cache, for the kernels that read or write the cache
// (rope_cache.cu, attention_decode.cu, attention_prefill.cu). Kept out of common.cuh so that the
// other kernel modules, which never see the cache, do not depend on it.
#pragma once

#include "common.cuh"

// The FP8 (E4M3) KV cache (`--kv-cache-dtype fp8`, vLLM's per-tensor scales): a cache element
// is the E4M3 code of x / scale, saturated to +-448 as vLLM's cache write does (NaN stays NaN),
// read back as code * scale in f32. Byte i of a packed group is element i. The conversions are
// single `cvt` instructions on sm_89 and newer and emulated below (the engine refuses the FP8
// cache there). The kernels that read or write the cache take its element type as a template
// parameter: `elem_t` (the bf16 / f16 builds, unchanged) or `kv_fp8_t`.
#include <cuda_fp8.h>

typedef uint8_t kv_fp8_t;

// Whether a cache element type is the FP8 one.
template <typename CacheT>
__host__ __device__ constexpr bool is_kv_fp8() {
    return sizeof(CacheT) == 1;
}

RVLLM_DEVICE kv_fp8_t kv_fp8_encode(float x, float inv_scale) {
    return __nv_cvt_float_to_fp8(x * inv_scale, __NV_SATFINITE, __NV_E4M3);
}

RVLLM_DEVICE float kv_fp8_decode(kv_fp8_t code, float scale) {
    const __half_raw h = __nv_cvt_fp8_to_halfraw(code, __NV_E4M3);
    return __half2float(__half(h)) * scale;
}

// Eight elements (8 bytes, `uint2`) to f32, times `scale`.
RVLLM_DEVICE void kv_fp8x8_to_f32(uint2 codes, float scale, float out[8]) {
    const unsigned words[2] = {codes.x, codes.y};
#pragma unroll
    for (int w = 0; w < 2; ++w)
#pragma unroll
        for (int p = 0; p < 2; ++p) {
            const __nv_fp8x2_storage_t pair = (words[w] >> (16 * p)) & 0xffffu;
            const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(pair, __NV_E4M3);
            const float2 f = __half22float2(__half2(h));
            out[4 * w + 2 * p] = f.x * scale;
            out[4 * w + 2 * p + 1] = f.y * scale;
        }
}

// Eight f32 to their codes at 1 / `inv_scale`.
RVLLM_DEVICE uint2 f32x8_to_kv_fp8(const float in[8], float inv_scale) {
    unsigned words[2];
#pragma unroll
    for (int w = 0; w < 2; ++w) {
        const unsigned lo = __nv_cvt_float2_to_fp8x2(
            make_float2(in[4 * w] * inv_scale, in[4 * w + 1] * inv_scale), __NV_SATFINITE,
            __NV_E4M3);
        const unsigned hi = __nv_cvt_float2_to_fp8x2(
            make_float2(in[4 * w + 2] * inv_scale, in[4 * w + 3] * inv_scale), __NV_SATFINITE,
            __NV_E4M3);
        words[w] = lo | (hi << 16);
    }
    return make_uint2(words[0], words[1]);
}

// Eight compute-type elements (one 16-byte Elem8) to their codes.
RVLLM_DEVICE uint2 elem8_to_kv_fp8(const Elem8& v, float inv_scale) {
    float f[8];
    elem8_to_f32(v, f);
    return f32x8_to_kv_fp8(f, inv_scale);
}
