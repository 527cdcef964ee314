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
//   fp8_scaled_epilogue_bf16(out, acc, row_scales, col_scales, rows, cols, accumulate)
//       out[r, c] = acc[r, c] * row_scales[r] * col_scales[c], plus out[r, c] when accumulate
//       is non-zero. acc is bf16 in both builds (cuBLASLt's unit-scale FP8 product: bf16 holds
//       its range, f16 would overflow) and may be out itself (each thread reads its element
//       before writing it). Grid-stride over rows * cols, block 256.
//   fp8_scaled_mm_bf16(y, xq, x_scales, wq, w_scales, m, n, k, accumulate)
//       y[i, j] = x_scales[i] * w_scales[j] * sum_k e4m3(xq[i, k]) * e4m3(wq[j, k]), f32
//       accumulation, plus y[i, j] when accumulate is non-zero: the FP8 GEMM for shapes
//       cuBLASLt's FP8 kernels do not take (k or n not a multiple of 16, GPUs below sm_89).
//       One warp an output, 16 codes a lane a step when k is a multiple of 16;
//       grid (ceil(n / 8), m), block 256.
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

extern "C" __global__ void DT(fp8_scaled_epilogue_bf16, fp8_scaled_epilogue_f16)(
    elem_t* out, const __nv_bfloat16* acc, const float* __restrict__ row_scales,
    const float* __restrict__ col_scales, int rows, int cols, int accumulate) {
    pdl_enter();
    const int64_t n = (int64_t)rows * cols;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        const int r = (int)(i / cols), c = (int)(i % cols);
        float v = __bfloat162float(acc[i]) * row_scales[r] * col_scales[c];
        if (accumulate) v += to_f32(out[i]);
        out[i] = from_f32(v);
    }
}

RVLLM_DEVICE float e4m3_value(unsigned char code) {
    return __half2float(__half(__nv_cvt_fp8_to_halfraw(code, __NV_E4M3)));
}

extern "C" __global__ void DT(fp8_scaled_mm_bf16, fp8_scaled_mm_f16)(
    elem_t* __restrict__ y, const unsigned char* __restrict__ xq,
    const float* __restrict__ x_scales, const unsigned char* __restrict__ wq,
    const float* __restrict__ w_scales, int m, int n, int k, int accumulate) {
    pdl_enter();
    const int lane = threadIdx.x % 32;
    const int j = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const int i = blockIdx.y;
    if (j >= n || i >= m) return;
    const unsigned char* xrow = xq + (int64_t)i * k;
    const unsigned char* wrow = wq + (int64_t)j * k;
    float s = 0.0f;
    if (k % 16 == 0) {
        const uint4* xv = reinterpret_cast<const uint4*>(xrow);
        const uint4* wv = reinterpret_cast<const uint4*>(wrow);
        for (int c = lane; c < k / 16; c += 32) {
            const uint4 a = xv[c], b = wv[c];
            const unsigned char* ab = reinterpret_cast<const unsigned char*>(&a);
            const unsigned char* bb = reinterpret_cast<const unsigned char*>(&b);
#pragma unroll
            for (int e = 0; e < 16; ++e) s = fmaf(e4m3_value(ab[e]), e4m3_value(bb[e]), s);
        }
    } else {
        for (int c = lane; c < k; c += 32) s = fmaf(e4m3_value(xrow[c]), e4m3_value(wrow[c]), s);
    }
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (lane != 0) return;
    const int64_t at = (int64_t)i * n + j;
    float v = s * x_scales[i] * w_scales[j];
    if (accumulate) v += to_f32(y[at]);
    y[at] = from_f32(v);
}
