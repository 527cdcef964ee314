// Rotary position embedding on q and k (in place), fused with writing k and v into the
// paged KV cache.
//
// Kernel (extern "C"):
//   rope_and_cache_bf16(q, k, v, key_cache, value_cache, positions, slot_mapping, inv_freq,
//                       num_tokens, num_heads, num_kv_heads, head_dim,
//                       q_stride, k_stride, v_stride)
//     q: [T, q_stride] with the heads at the start of each row (q_stride >= num_heads*head_dim;
//        strides let q, k, v live inside one fused QKV output), k, v likewise.
//     key_cache, value_cache: [num_blocks, block_size, num_kv_heads, head_dim], so a token's
//        slot s owns elements [s * num_kv_heads * head_dim, (s + 1) * ...).
//     positions, slot_mapping: int32 [T]; a negative slot skips the cache write (padding).
//     inv_freq: f32 [head_dim / 2], with any rope scaling (Llama 3) already applied on the host.
//     HF "rotate half": for i < head_dim/2, with a = pos * inv_freq[i],
//        x[i]' = x[i] cos a - x[i + hd/2] sin a,   x[i + hd/2]' = x[i + hd/2] cos a + x[i] sin a.
//   grid (num_tokens), block 256; head_dim even, at most 512.
//   rope_partial_and_cache_bf16(..., v_stride, rotary_dim, attention_factor)
//     The same with partial rotary (Phi-3/4's partial_rotary_factor, HF's q[..., :rotary_dim]):
//     only the first rotary_dim dims of each head are rotated (pairs i, i + rotary_dim/2,
//     inv_freq: f32 [rotary_dim / 2]); the others pass through to q, k and the cache. cos and
//     sin are multiplied by attention_factor (LongRoPE / YaRN's, as HF does; 1 for none): with
//     only part of each head rotated it cannot move into the softmax scale, as it does for
//     whole heads. rotary_dim even, at most head_dim.
//   rope_and_cache_kvfp8_bf16(..., v_stride, k_scale, v_scale),
//   rope_partial_and_cache_kvfp8_bf16(..., attention_factor, k_scale, v_scale)
//     The same for the FP8 (E4M3) KV cache (`--kv-cache-dtype fp8`): key_cache and
//     value_cache hold one byte an element, the saturated E4M3 code of k * (1 / k_scale) and
//     v * (1 / v_scale), k after its rotation and rounding to the compute type.
#include "kv_fp8.cuh"

constexpr int kMaxHalf = 256;  // head_dim up to 512

namespace {

template <typename CacheT>
__device__ __forceinline__ void rope_and_cache(
    elem_t* __restrict__ q, elem_t* __restrict__ k, const elem_t* __restrict__ v,
    CacheT* __restrict__ key_cache, CacheT* __restrict__ value_cache,
    const int32_t* __restrict__ positions, const int32_t* __restrict__ slot_mapping,
    const float* __restrict__ inv_freq, int num_tokens, int num_heads, int num_kv_heads,
    int head_dim, int q_stride, int k_stride, int v_stride, int rotary_dim,
    float attention_factor, float k_scale, float v_scale) {
    pdl_enter();
    // The FP8 cache's code of x is e4m3(x * (1 / scale)), as the CPU reference rounds it.
    const float inv_k = 1.0f / k_scale, inv_v = 1.0f / v_scale;
    __shared__ float cos_t[kMaxHalf], sin_t[kMaxHalf];
    const int t = blockIdx.x;
    if (t >= num_tokens) return;
    const int half = rotary_dim / 2;
    const float pos = (float)positions[t];
    const int64_t slot = slot_mapping[t];
    const int64_t kv_row = (int64_t)num_kv_heads * head_dim;
    elem_t* qrow = q + (int64_t)t * q_stride;
    elem_t* krow = k + (int64_t)t * k_stride;
    const elem_t* vrow = v + (int64_t)t * v_stride;

    // One angle per pair index, shared by every head of the token. The angle is rounded to
    // f32 as in the HF reference; its sine and cosine are taken in double precision. Angles
    // reach ~1e5 rad at long positions, where the f32 fast-math intrinsics (the build uses
    // --use_fast_math) lose all accuracy; double-precision functions are never replaced.
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        const float angle = pos * inv_freq[i];
        double sd, cd;
        sincos((double)angle, &sd, &cd);
        cos_t[i] = (float)cd * attention_factor;
        sin_t[i] = (float)sd * attention_factor;
    }
    __syncthreads();

    // 16-byte path: 8 pairs per work item, so a Llama-3-8B token (40 heads x 64 pairs) takes
    // two rounds of independent loads instead of ten dependent scalar ones (batch-1 decode runs
    // this once per layer; it is latency-bound).
    const uintptr_t align = reinterpret_cast<uintptr_t>(qrow) | reinterpret_cast<uintptr_t>(krow) |
                            reinterpret_cast<uintptr_t>(vrow) |
                            reinterpret_cast<uintptr_t>(key_cache) |
                            reinterpret_cast<uintptr_t>(value_cache);
    if (half % 8 == 0 && align % 16 == 0) {
        const int groups = half / 8;
        const int items = (num_heads + num_kv_heads) * groups;
        for (int idx = threadIdx.x; idx < items; idx += blockDim.x) {
            const int head = idx / groups;
            const int i = (idx - head * groups) * 8;
            elem_t* x = head < num_heads ? qrow + head * head_dim
                                                : krow + (head - num_heads) * head_dim;
            float a[8], b[8], y1[8], y2[8];
            elem8_to_f32(*reinterpret_cast<const Elem8*>(x + i), a);
            elem8_to_f32(*reinterpret_cast<const Elem8*>(x + i + half), b);
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                const float c = cos_t[i + e], s = sin_t[i + e];
                y1[e] = a[e] * c - b[e] * s;
                y2[e] = b[e] * c + a[e] * s;
            }
            const Elem8 r1 = f32_to_elem8(y1), r2 = f32_to_elem8(y2);
            *reinterpret_cast<Elem8*>(x + i) = r1;
            *reinterpret_cast<Elem8*>(x + i + half) = r2;
            if (head >= num_heads && slot >= 0) {
                CacheT* dst = key_cache + slot * kv_row + (head - num_heads) * head_dim;
                if constexpr (is_kv_fp8<CacheT>()) {
                    *reinterpret_cast<uint2*>(dst + i) = elem8_to_kv_fp8(r1, inv_k);
                    *reinterpret_cast<uint2*>(dst + i + half) = elem8_to_kv_fp8(r2, inv_k);
                } else {
                    *reinterpret_cast<Elem8*>(dst + i) = r1;
                    *reinterpret_cast<Elem8*>(dst + i + half) = r2;
                }
            }
        }
        // Partial rotary: k's unrotated dims go to the cache as they are (q's stay in place).
        if (slot >= 0 && rotary_dim < head_dim) {
            const int rest = head_dim - rotary_dim;
            for (int idx = threadIdx.x; idx < num_kv_heads * rest; idx += blockDim.x) {
                const int head = idx / rest;
                const int d = rotary_dim + (idx - head * rest);
                if constexpr (is_kv_fp8<CacheT>()) {
                    key_cache[slot * kv_row + head * head_dim + d] =
                        kv_fp8_encode(to_f32(krow[head * head_dim + d]), inv_k);
                } else {
                    key_cache[slot * kv_row + head * head_dim + d] = krow[head * head_dim + d];
                }
            }
        }
        if (slot >= 0) {
            for (int idx = threadIdx.x; idx < num_kv_heads * head_dim / 8; idx += blockDim.x) {
                if constexpr (is_kv_fp8<CacheT>()) {
                    reinterpret_cast<uint2*>(value_cache + slot * kv_row)[idx] =
                        elem8_to_kv_fp8(reinterpret_cast<const Elem8*>(vrow)[idx], inv_v);
                } else {
                    reinterpret_cast<Elem8*>(value_cache + slot * kv_row)[idx] =
                        reinterpret_cast<const Elem8*>(vrow)[idx];
                }
            }
        }
        return;
    }

    const int pairs = (num_heads + num_kv_heads) * half;
    for (int idx = threadIdx.x; idx < pairs; idx += blockDim.x) {
        const int head = idx / half;
        const int i = idx - head * half;
        const float c = cos_t[i], s = sin_t[i];
        elem_t* x;
        if (head < num_heads) {
            x = qrow + head * head_dim;
        } else {
            x = krow + (head - num_heads) * head_dim;
        }
        const float x1 = to_f32(x[i]);
        const float x2 = to_f32(x[i + half]);
        const elem_t y1 = from_f32(x1 * c - x2 * s);
        const elem_t y2 = from_f32(x2 * c + x1 * s);
        x[i] = y1;
        x[i + half] = y2;
        if (head >= num_heads && slot >= 0) {
            CacheT* dst = key_cache + slot * kv_row + (head - num_heads) * head_dim;
            if constexpr (is_kv_fp8<CacheT>()) {
                dst[i] = kv_fp8_encode(to_f32(y1), inv_k);
                dst[i + half] = kv_fp8_encode(to_f32(y2), inv_k);
            } else {
                dst[i] = y1;
                dst[i + half] = y2;
            }
        }
    }
    // Partial rotary: k's unrotated dims go to the cache as they are (q's stay in place).
    if (slot >= 0 && rotary_dim < head_dim) {
        const int rest = head_dim - rotary_dim;
        for (int idx = threadIdx.x; idx < num_kv_heads * rest; idx += blockDim.x) {
            const int head = idx / rest;
            const int d = rotary_dim + (idx - head * rest);
            if constexpr (is_kv_fp8<CacheT>()) {
                key_cache[slot * kv_row + head * head_dim + d] =
                    kv_fp8_encode(to_f32(krow[head * head_dim + d]), inv_k);
            } else {
                key_cache[slot * kv_row + head * head_dim + d] = krow[head * head_dim + d];
            }
        }
    }
    if (slot >= 0) {
        for (int idx = threadIdx.x; idx < num_kv_heads * head_dim; idx += blockDim.x) {
            const int head = idx / head_dim;
            const int d = idx - head * head_dim;
            if constexpr (is_kv_fp8<CacheT>()) {
                value_cache[slot * kv_row + idx] = kv_fp8_encode(to_f32(vrow[head * head_dim + d]), inv_v);
            } else {
                value_cache[slot * kv_row + idx] = vrow[head * head_dim + d];
            }
        }
    }
}

}  // namespace

extern "C" __global__ void DT(rope_and_cache_bf16, rope_and_cache_f16)(
    elem_t* __restrict__ q, elem_t* __restrict__ k, const elem_t* __restrict__ v,
    elem_t* __restrict__ key_cache, elem_t* __restrict__ value_cache,
    const int32_t* __restrict__ positions, const int32_t* __restrict__ slot_mapping,
    const float* __restrict__ inv_freq, int num_tokens, int num_heads, int num_kv_heads,
    int head_dim, int q_stride, int k_stride, int v_stride) {
    rope_and_cache(q, k, v, key_cache, value_cache, positions, slot_mapping, inv_freq,
                   num_tokens, num_heads, num_kv_heads, head_dim, q_stride, k_stride, v_stride,
                   head_dim, 1.0f, 1.0f, 1.0f);
}

extern "C" __global__ void DT(rope_partial_and_cache_bf16, rope_partial_and_cache_f16)(
    elem_t* __restrict__ q, elem_t* __restrict__ k, const elem_t* __restrict__ v,
    elem_t* __restrict__ key_cache, elem_t* __restrict__ value_cache,
    const int32_t* __restrict__ positions, const int32_t* __restrict__ slot_mapping,
    const float* __restrict__ inv_freq, int num_tokens, int num_heads, int num_kv_heads,
    int head_dim, int q_stride, int k_stride, int v_stride, int rotary_dim,
    float attention_factor) {
    rope_and_cache(q, k, v, key_cache, value_cache, positions, slot_mapping, inv_freq,
                   num_tokens, num_heads, num_kv_heads, head_dim, q_stride, k_stride, v_stride,
                   rotary_dim, attention_factor, 1.0f, 1.0f);
}

// The FP8 (E4M3) KV cache's builds: the same, writing the codes of k / k_scale and
// v / v_scale (1 byte an element) into key_cache and value_cache.
extern "C" __global__ void DT(rope_and_cache_kvfp8_bf16, rope_and_cache_kvfp8_f16)(
    elem_t* __restrict__ q, elem_t* __restrict__ k, const elem_t* __restrict__ v,
    uint8_t* __restrict__ key_cache, uint8_t* __restrict__ value_cache,
    const int32_t* __restrict__ positions, const int32_t* __restrict__ slot_mapping,
    const float* __restrict__ inv_freq, int num_tokens, int num_heads, int num_kv_heads,
    int head_dim, int q_stride, int k_stride, int v_stride, float k_scale, float v_scale) {
    rope_and_cache(q, k, v, key_cache, value_cache, positions, slot_mapping, inv_freq,
                   num_tokens, num_heads, num_kv_heads, head_dim, q_stride, k_stride, v_stride,
                   head_dim, 1.0f, k_scale, v_scale);
}

extern "C" __global__ void DT(rope_partial_and_cache_kvfp8_bf16,
                              rope_partial_and_cache_kvfp8_f16)(
    elem_t* __restrict__ q, elem_t* __restrict__ k, const elem_t* __restrict__ v,
    uint8_t* __restrict__ key_cache, uint8_t* __restrict__ value_cache,
    const int32_t* __restrict__ positions, const int32_t* __restrict__ slot_mapping,
    const float* __restrict__ inv_freq, int num_tokens, int num_heads, int num_kv_heads,
    int head_dim, int q_stride, int k_stride, int v_stride, int rotary_dim,
    float attention_factor, float k_scale, float v_scale) {
    rope_and_cache(q, k, v, key_cache, value_cache, positions, slot_mapping, inv_freq,
                   num_tokens, num_heads, num_kv_heads, head_dim, q_stride, k_stride, v_stride,
                   rotary_dim, attention_factor, k_scale, v_scale);
}
