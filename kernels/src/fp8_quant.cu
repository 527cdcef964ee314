// Dynamic FP8 (E4M3) quantization of activations, as vLLM's scaled_fp8_quant: the input of an
// FP8 GEMM (issue 20). Codes are `sat_e4m3(x * (1 / scale))`, rounded to nearest even,
// finite values past ±448 and infinities saturating to ±448, NaN staying NaN
// (__nv_cvt_float_to_fp8 with __NV_SATFINITE). Scales are `max(amax / 448, 1 / (448 * 512))`
// (vLLM's floor, so an all-zero row gets a usable scale). Divisions are IEEE (__fdiv_rn,
// __frcp_rn) despite --use_fast_math, so the scales equal the CPU reference's bit for bit.
//
// Kernels (all extern "C"):
//   fp8_quant_per_token_bf16(out, scales, in, rows, cols)
//       one scale per row: grid (rows), block 256; out [rows, cols] codes, scales [rows].
//   fp8_absmax_bf16(amax, in, n)
//       amax[0] = max(amax[0], max |in|) (the caller zeroes it first); grid-stride loop,
//       one atomicMax a block (non-negative floats order as their bit patterns).
//   fp8_quant_per_tensor_bf16(out, scale, amax, in, n)
//       codes at the scale amax implies, which thread 0 of block 0 also stores in scale[0].
#include <cuda_fp8.h>

#include "common.cuh"

constexpr float kFp8Max = 448.0f;
constexpr float kFp8MinScale = 1.0f / (448.0f * 512.0f);

RVLLM_DEVICE float fp8_scale_of(float amax) {
    return fmaxf(__fdiv_rn(amax, kFp8Max), kFp8MinScale);
}

RVLLM_DEVICE unsigned char fp8_code(float x, float inv_scale) {
    return __nv_cvt_float_to_fp8(x * inv_scale, __NV_SATFINITE, __NV_E4M3);
}

// Max over the block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
RVLLM_DEVICE float block_max(float v) {
    __shared__ float warp_max[32];
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) warp_max[warp] = v;
    __syncthreads();
    const int warps = blockDim.x / 32;
    v = lane < warps ? warp_max[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

extern "C" __global__ void DT(fp8_quant_per_token_bf16, fp8_quant_per_token_f16)(
    unsigned char* __restrict__ out, float* __restrict__ scales, const elem_t* __restrict__ in,
    int rows, int cols) {
    pdl_enter();
    const int r = blockIdx.x;
    if (r >= rows) return;
    const elem_t* row = in + (int64_t)r * cols;
    float amax = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) amax = fmaxf(amax, fabsf(to_f32(row[c])));
    const float scale = fp8_scale_of(block_max(amax));
    const float inv = __frcp_rn(scale);
    unsigned char* dst = out + (int64_t)r * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) dst[c] = fp8_code(to_f32(row[c]), inv);
    if (threadIdx.x == 0) scales[r] = scale;
}

extern "C" __global__ void DT(fp8_absmax_bf16, fp8_absmax_f16)(
    float* __restrict__ amax, const elem_t* __restrict__ in, int64_t n) {
    pdl_enter();
    float m = 0.0f;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        m = fmaxf(m, fabsf(to_f32(in[i])));
    }
    m = block_max(m);
    if (threadIdx.x == 0) atomicMax(reinterpret_cast<int*>(amax), __float_as_int(m));
}

extern "C" __global__ void DT(fp8_quant_per_tensor_bf16, fp8_quant_per_tensor_f16)(
    unsigned char* __restrict__ out, float* __restrict__ scale, const float* __restrict__ amax,
    const elem_t* __restrict__ in, int64_t n) {
    pdl_enter();
    const float s = fp8_scale_of(amax[0]);
    const float inv = __frcp_rn(s);
    if (blockIdx.x == 0 && threadIdx.x == 0) scale[0] = s;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        out[i] = fp8_code(to_f32(in[i]), inv);
    }
}
