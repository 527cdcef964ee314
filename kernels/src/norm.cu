// RMSNorm, plain and fused with the residual add, on bf16 rows with f32 arithmetic.
//
// Kernels (all extern "C"):
//   rms_norm_bf16(out, x, weight, eps, num_tokens, hidden)
//       out[t] = x[t] * rsqrt(mean(x[t]^2) + eps) * weight
//   fused_add_rms_norm_bf16(out, residual, x, weight, eps, num_tokens, hidden)
//       residual[t] += x[t] (stored back in bf16); out[t] = rmsnorm(residual[t]) * weight.
//       The norm is taken of the bf16-rounded sum, i.e. of exactly what the next layer's
//       residual holds, so that the fused and unfused paths agree bit for bit.
//   rms_norm_add_bf16(residual, x, weight, eps, num_tokens, hidden)
//       residual[t] += bf16(rmsnorm(x[t]) * weight): a block's output norm (Gemma's sandwich
//       norms) and the residual add in one launch. The normed row is rounded to bf16 before
//       the add, as rms_norm_bf16 stores it and add_bf16 reads it, so that the fused and
//       unfused paths agree bit for bit (same chunks a thread, same block sum).
//   grid (num_tokens), block 256 (any multiple of 32 up to 1024 works).
//   head_rms_norm_bf16(out, x, q_weight, k_weight, eps, num_tokens, row_stride,
//                      num_q_heads, num_kv_heads, head_dim)
//       Per-head RMSNorm of the q and k parts of fused qkv rows (Qwen3, Gemma 3; before RoPE):
//       head h < num_q_heads of row t (columns h * head_dim .. of the row) is normalized over
//       its head_dim values and scaled by q_weight, the num_kv_heads heads after it by
//       k_weight. Gemma's (1 + w) is folded into the weights at load. The v part is neither
//       read nor written. `out` may be `x` (the engine runs it in place): each lane reads and
//       writes only its own elements. grid (num_tokens, ceil(heads / warps a block)), a warp a
//       head; head_dim <= 256 stays in registers, larger heads are read twice.
//
// At decode these run once per token per layer, so their latency matters more than their
// bandwidth: rows with hidden % 8 == 0 and hidden <= 8 * 4 * blockDim (8192 at 256 threads)
// are read once with 16-byte loads and kept in registers between the sum and the scaling;
// other rows take a plain two-pass loop.
#include "common.cuh"

namespace {

constexpr int kMaxChunks = 4;  // 16-byte chunks per thread on the register path

__device__ __forceinline__ bool vector_path(int hidden, const void* a, const void* b,
                                            const void* c, const void* d) {
    const uintptr_t bits = reinterpret_cast<uintptr_t>(a) | reinterpret_cast<uintptr_t>(b) |
                           reinterpret_cast<uintptr_t>(c) | reinterpret_cast<uintptr_t>(d);
    return hidden % 8 == 0 && hidden / 8 <= kMaxChunks * (int)blockDim.x && bits % 16 == 0;
}

// out = v * inv * weight for the chunks this thread holds.
__device__ __forceinline__ void scale_chunks(elem_t* __restrict__ o,
                                             const elem_t* __restrict__ weight,
                                             const float (&v)[kMaxChunks][8], int chunks,
                                             float inv) {
#pragma unroll
    for (int c = 0; c < kMaxChunks; ++c) {
        const int i = threadIdx.x + c * blockDim.x;
        if (i < chunks) {
            float wf[8], r[8];
            elem8_to_f32(reinterpret_cast<const Elem8*>(weight)[i], wf);
#pragma unroll
            for (int e = 0; e < 8; ++e) r[e] = v[c][e] * inv * wf[e];
            reinterpret_cast<Elem8*>(o)[i] = f32_to_elem8(r);
        }
    }
}

// The block's sum of squares of `row`, this thread's 16-byte chunks kept in v (vector path).
// rms_norm and rms_norm_add both take it from here, so their sums agree bit for bit.
__device__ __forceinline__ float load_chunks_sum_squares(const elem_t* __restrict__ row,
                                                        float (&v)[kMaxChunks][8], int chunks,
                                                        float* scratch) {
    float ss = 0.0f;
#pragma unroll
    for (int c = 0; c < kMaxChunks; ++c) {
        const int i = threadIdx.x + c * blockDim.x;
        if (i < chunks) {
            elem8_to_f32(reinterpret_cast<const Elem8*>(row)[i], v[c]);
#pragma unroll
            for (int e = 0; e < 8; ++e) ss += v[c][e] * v[c][e];
        }
    }
    return block_sum(ss, scratch);
}

// rsqrt(mean(row^2) + eps) of a row read element by element (the plain path).
__device__ __forceinline__ float row_inv_rms(const elem_t* __restrict__ row, int hidden, float eps,
                                             float* scratch) {
    float ss = 0.0f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        const float v = to_f32(row[i]);
        ss += v * v;
    }
    ss = block_sum(ss, scratch);
    return rsqrtf(ss / (float)hidden + eps);
}

}  // namespace

extern "C" __global__ void DT(rms_norm_bf16, rms_norm_f16)(
    elem_t* __restrict__ out, const elem_t* __restrict__ x, const elem_t* __restrict__ weight,
    float eps, int num_tokens, int hidden) {
    pdl_enter();
    __shared__ float scratch[32];
    const int t = blockIdx.x;
    if (t >= num_tokens) return;
    const elem_t* row = x + (int64_t)t * hidden;
    elem_t* o = out + (int64_t)t * hidden;
    if (vector_path(hidden, x, out, weight, row)) {
        const int chunks = hidden / 8;
        float v[kMaxChunks][8];
        const float ss = load_chunks_sum_squares(row, v, chunks, scratch);
        scale_chunks(o, weight, v, chunks, rsqrtf(ss / (float)hidden + eps));
        return;
    }
    const float inv = row_inv_rms(row, hidden, eps, scratch);
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        o[i] = from_f32(to_f32(row[i]) * inv * to_f32(weight[i]));
    }
}

extern "C" __global__ void DT(fused_add_rms_norm_bf16, fused_add_rms_norm_f16)(
    elem_t* __restrict__ out, elem_t* __restrict__ residual, const elem_t* __restrict__ x,
    const elem_t* __restrict__ weight, float eps, int num_tokens, int hidden) {
    pdl_enter();
    __shared__ float scratch[32];
    const int t = blockIdx.x;
    if (t >= num_tokens) return;
    elem_t* res = residual + (int64_t)t * hidden;
    const elem_t* xr = x + (int64_t)t * hidden;
    elem_t* o = out + (int64_t)t * hidden;
    if (vector_path(hidden, res, xr, o, weight)) {
        const int chunks = hidden / 8;
        float v[kMaxChunks][8];
        float ss = 0.0f;
#pragma unroll
        for (int c = 0; c < kMaxChunks; ++c) {
            const int i = threadIdx.x + c * blockDim.x;
            if (i < chunks) {
                float a[8], b[8];
                elem8_to_f32(reinterpret_cast<const Elem8*>(res)[i], a);
                elem8_to_f32(reinterpret_cast<const Elem8*>(xr)[i], b);
#pragma unroll
                for (int e = 0; e < 8; ++e) a[e] += b[e];
                const Elem8 s = f32_to_elem8(a);
                reinterpret_cast<Elem8*>(res)[i] = s;
                elem8_to_f32(s, v[c]);  // the rounded sum, as stored
#pragma unroll
                for (int e = 0; e < 8; ++e) ss += v[c][e] * v[c][e];
            }
        }
        ss = block_sum(ss, scratch);
        scale_chunks(o, weight, v, chunks, rsqrtf(ss / (float)hidden + eps));
        return;
    }
    float ss = 0.0f;
    // Each thread re-reads only the elements it wrote itself, so no barrier is needed
    // between the two passes over `res`.
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        elem_t s = from_f32(to_f32(res[i]) + to_f32(xr[i]));
        res[i] = s;
        float v = to_f32(s);
        ss += v * v;
    }
    ss = block_sum(ss, scratch);
    const float inv = rsqrtf(ss / (float)hidden + eps);
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        o[i] = from_f32(to_f32(res[i]) * inv * to_f32(weight[i]));
    }
}

extern "C" __global__ void DT(rms_norm_add_bf16, rms_norm_add_f16)(
    elem_t* __restrict__ residual, const elem_t* __restrict__ x,
    const elem_t* __restrict__ weight, float eps, int num_tokens, int hidden) {
    pdl_enter();
    __shared__ float scratch[32];
    const int t = blockIdx.x;
    if (t >= num_tokens) return;
    const elem_t* row = x + (int64_t)t * hidden;
    elem_t* res = residual + (int64_t)t * hidden;
    if (vector_path(hidden, x, res, weight, row)) {
        const int chunks = hidden / 8;
        float v[kMaxChunks][8];
        const float ss = load_chunks_sum_squares(row, v, chunks, scratch);
        const float inv = rsqrtf(ss / (float)hidden + eps);
#pragma unroll
        for (int c = 0; c < kMaxChunks; ++c) {
            const int i = threadIdx.x + c * blockDim.x;
            if (i < chunks) {
                float wf[8], r[8], normed[8], acc[8];
                elem8_to_f32(reinterpret_cast<const Elem8*>(weight)[i], wf);
#pragma unroll
                for (int e = 0; e < 8; ++e) r[e] = v[c][e] * inv * wf[e];
                elem8_to_f32(f32_to_elem8(r), normed);  // as rms_norm stores it
                elem8_to_f32(reinterpret_cast<const Elem8*>(res)[i], acc);
#pragma unroll
                for (int e = 0; e < 8; ++e) acc[e] += normed[e];
                reinterpret_cast<Elem8*>(res)[i] = f32_to_elem8(acc);
            }
        }
        return;
    }
    const float inv = row_inv_rms(row, hidden, eps, scratch);
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        const float normed = to_f32(from_f32(to_f32(row[i]) * inv * to_f32(weight[i])));
        res[i] = from_f32(to_f32(res[i]) + normed);
    }
}

extern "C" __global__ void DT(head_rms_norm_bf16, head_rms_norm_f16)(
    elem_t* out, const elem_t* x, const elem_t* __restrict__ q_weight,
    const elem_t* __restrict__ k_weight, float eps, int num_tokens, int row_stride,
    int num_q_heads, int num_kv_heads, int head_dim) {
    pdl_enter();
    constexpr int kPerLane = 8;  // head_dim <= 256 in registers
    const int t = blockIdx.x;
    const int lane = threadIdx.x & 31;
    const int head = blockIdx.y * (blockDim.x >> 5) + (threadIdx.x >> 5);
    // Whole warps leave together, so the warp reduction below sees all 32 lanes.
    if (t >= num_tokens || head >= num_q_heads + num_kv_heads) return;
    const elem_t* w = head < num_q_heads ? q_weight : k_weight;
    const int64_t base = (int64_t)t * row_stride + (int64_t)head * head_dim;
    const elem_t* src = x + base;
    elem_t* dst = out + base;
    if (head_dim <= 32 * kPerLane) {
        float v[kPerLane];
        float ss = 0.0f;
#pragma unroll
        for (int c = 0; c < kPerLane; ++c) {
            const int i = lane + 32 * c;
            v[c] = i < head_dim ? to_f32(src[i]) : 0.0f;
            ss += v[c] * v[c];
        }
        const float inv = rsqrtf(warp_sum(ss) / (float)head_dim + eps);
#pragma unroll
        for (int c = 0; c < kPerLane; ++c) {
            const int i = lane + 32 * c;
            if (i < head_dim) dst[i] = from_f32(v[c] * inv * to_f32(w[i]));
        }
        return;
    }
    float ss = 0.0f;
    for (int i = lane; i < head_dim; i += 32) {
        const float v = to_f32(src[i]);
        ss += v * v;
    }
    const float inv = rsqrtf(warp_sum(ss) / (float)head_dim + eps);
    for (int i = lane; i < head_dim; i += 32) {
        dst[i] = from_f32(to_f32(src[i]) * inv * to_f32(w[i]));
    }
}
