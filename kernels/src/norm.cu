// RMSNorm, plain and fused with the residual add, on bf16 rows with f32 arithmetic.
//
// Kernels (all extern "C"):
//   rms_norm_bf16(out, x, weight, eps, num_tokens, hidden)
//       out[t] = x[t] * rsqrt(mean(x[t]^2) + eps) * weight
//   fused_add_rms_norm_bf16(out, residual, x, weight, eps, num_tokens, hidden)
//       residual[t] += x[t] (stored back in bf16); out[t] = rmsnorm(residual[t]) * weight.
//       The norm is taken of the bf16-rounded sum, i.e. of exactly what the next layer's
//       residual holds, so that the fused and unfused paths agree bit for bit.
//   grid (num_tokens), block 256 (any multiple of 32 up to 1024 works).
#include "common.cuh"

extern "C" __global__ void rms_norm_bf16(__nv_bfloat16* __restrict__ out,
                                         const __nv_bfloat16* __restrict__ x,
                                         const __nv_bfloat16* __restrict__ weight, float eps,
                                         int num_tokens, int hidden) {
    __shared__ float scratch[32];
    const int t = blockIdx.x;
    if (t >= num_tokens) return;
    const __nv_bfloat16* row = x + (int64_t)t * hidden;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        float v = __bfloat162float(row[i]);
        ss += v * v;
    }
    ss = block_sum(ss, scratch);
    const float inv = rsqrtf(ss / (float)hidden + eps);
    __nv_bfloat16* o = out + (int64_t)t * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        o[i] = __float2bfloat16(__bfloat162float(row[i]) * inv * __bfloat162float(weight[i]));
    }
}

extern "C" __global__ void fused_add_rms_norm_bf16(__nv_bfloat16* __restrict__ out,
                                                   __nv_bfloat16* __restrict__ residual,
                                                   const __nv_bfloat16* __restrict__ x,
                                                   const __nv_bfloat16* __restrict__ weight,
                                                   float eps, int num_tokens, int hidden) {
    __shared__ float scratch[32];
    const int t = blockIdx.x;
    if (t >= num_tokens) return;
    __nv_bfloat16* res = residual + (int64_t)t * hidden;
    const __nv_bfloat16* xr = x + (int64_t)t * hidden;
    float ss = 0.0f;
    // Each thread re-reads only the elements it wrote itself, so no barrier is needed
    // between the two passes over `res`.
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        __nv_bfloat16 s = __float2bfloat16(__bfloat162float(res[i]) + __bfloat162float(xr[i]));
        res[i] = s;
        float v = __bfloat162float(s);
        ss += v * v;
    }
    ss = block_sum(ss, scratch);
    const float inv = rsqrtf(ss / (float)hidden + eps);
    __nv_bfloat16* o = out + (int64_t)t * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        o[i] = __float2bfloat16(__bfloat162float(res[i]) * inv * __bfloat162float(weight[i]));
    }
}
