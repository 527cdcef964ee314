// Elementwise kernels: the gated MLP activation and small add/convert helpers.
//
// Kernels (all extern "C"):
//   silu_and_mul_bf16(out, in, num_tokens, inter)
//       in: [T, 2*inter] (gate half, then up half); out[t, i] = silu(gate) * up, f32 inside.
//       grid (ceil(inter / 256), num_tokens), block 256.
//   add_bf16(out, a, b, n)            out = a + b (f32 add, one rounding); grid-stride loop.
//   f32_to_bf16(out, in, n)           round to nearest even; grid-stride loop.
//   bf16_to_f32(out, in, n)           exact; grid-stride loop.
#include "common.cuh"

extern "C" __global__ void silu_and_mul_bf16(__nv_bfloat16* __restrict__ out,
                                             const __nv_bfloat16* __restrict__ in,
                                             int num_tokens, int inter) {
    pdl_enter();
    const int t = blockIdx.y;
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= num_tokens || i >= inter) return;
    const __nv_bfloat16* row = in + (int64_t)t * 2 * inter;
    const float g = __bfloat162float(row[i]);
    const float u = __bfloat162float(row[inter + i]);
    // expf (not __expf) so that the result matches a CPU f32 reference to rounding.
    out[(int64_t)t * inter + i] = __float2bfloat16(g / (1.0f + expf(-g)) * u);
}

extern "C" __global__ void add_bf16(__nv_bfloat16* __restrict__ out,
                                    const __nv_bfloat16* __restrict__ a,
                                    const __nv_bfloat16* __restrict__ b, int64_t n) {
    pdl_enter();
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        out[i] = __float2bfloat16(__bfloat162float(a[i]) + __bfloat162float(b[i]));
    }
}

extern "C" __global__ void f32_to_bf16(__nv_bfloat16* __restrict__ out,
                                       const float* __restrict__ in, int64_t n) {
    pdl_enter();
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        out[i] = __float2bfloat16(in[i]);
    }
}

extern "C" __global__ void bf16_to_f32(float* __restrict__ out,
                                       const __nv_bfloat16* __restrict__ in, int64_t n) {
    pdl_enter();
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        out[i] = __bfloat162float(in[i]);
    }
}
