// The FP8 linear of `--quantization fp8` at small batches (issue 20): 1 to 8 tokens, where
// a step is a stream over every weight and the three launches of the GEMM path (quantize,
// cuBLASLt, epilogue) cost more than the product.
//
// Kernel (extern "C"):
//   fp8_gemv_bf16(y, xq, x_scales, wq, w_scales, m, n, k, accumulate)
//       y[t, j] = x_scales[t] * w_scales[j] * sum_k e4m3(xq[t, k]) * e4m3(wq[j, k]), f32
//       accumulation, plus y[t, j] when accumulate is non-zero (the residual add, rounded
//       once): the same operands, scales and result as fp8_scaled_mm (fp8_quant.cu), so a
//       request's numbers do not depend on which of the two its batch takes beyond the
//       order of the additions. xq / x_scales are fp8_quant_per_token's output.
//       m <= 8 (kMaxTokens); xq and wq 16-byte aligned; grid (ceil(n / 16)), block 256.
//   fp8_gemv_quant_bf16(y, x, wq, w_scales, m, n, k, accumulate)
//       the same product of x [m, k] in the compute type: each block quantizes it per token
//       itself (the row's amax, then fp8_quant_per_token's scale and codes, bit for bit), so
//       a linear is one launch. Every block reads all of x first (m * k elements from L2),
//       so the host takes it at batch 1 only, where that is a few KiB.
//   fp8_gemv_silu_bf16(y, gate_up, wq, w_scales, m, n, k, accumulate)
//       as fp8_gemv_quant with the input silu(gate) * up of gate_up [m, 2k] (gate half,
//       then up half), rounded to the compute type as silu_and_mul stores it: the down
//       projection without the silu_and_mul launch (the activation is not stored).
//   fp8_gemv_norm_bf16(y, x, norm_w, eps, wq, w_scales, m, n, k, accumulate)
//       as fp8_gemv_quant with the input rmsnorm(x) * norm_w (eps), rounded to the compute
//       type as rms_norm stores it: QKV and gate|up without the rms_norm launch (the normed
//       rows are not stored).
//
// Why this shape: a weight row is read once for all the batch's tokens, so the bytes are the
// weights' (n * k, half of bf16's) whatever m is. On sm_89+ the products go through the FP8
// tensor cores (mma.sync m16n8k32, E4M3 x E4M3 into f32): a block owns 16 weight rows (the
// MMA's M), the tokens are its N (8, the missing ones fed as zero codes) and its 8 warps split
// k between them, 64 codes of a row a step. The k order inside a step is free (a dot
// product's terms may be taken in any order), so each lane loads 16 contiguous codes of its
// two rows and of its token at the same offset with one 16-byte load each, and those bytes
// are the A and B fragments as they come: no decoding, no shuffles. Decoding E4M3 to f32 on
// the CUDA cores instead would take a conversion an element, and conversions run at a
// sixteenth of the FMA rate: far below the memory's bandwidth. The first weights of each warp
// are requested before pdl_wait (they depend on no kernel), and every batch's loads are
// issued before the previous batch's MMAs.
//
// Below sm_89 (no FP8 MMA; the engine refuses FP8 there, so only for completeness) a warp a
// row decodes each code with cuda_fp8.h's conversion, as fp8_scaled_mm does.
#include <cuda_fp8.h>

#include "common.cuh"

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRowsPerBlock = 16;
constexpr int kMaxTokens = 8;

// 16 codes of row `row` (of `rows`, each `k` long) from column c0, zeros past the row's end
// and for rows past the last. kVec (k a multiple of 16, so c0 < k means the whole chunk is
// inside): one 16-byte load.
template <bool kVec, bool kStream>
RVLLM_DEVICE uint4 load16(const unsigned char* __restrict__ base, int row, int rows, int c0,
                          int k) {
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (row >= rows || c0 >= k) return v;
    const unsigned char* p = base + (int64_t)row * k + c0;
    if (kVec) {
        const uint4* q = reinterpret_cast<const uint4*>(p);
        // Weights are read once a step: stream them past the caches (evict-first).
        return kStream ? __ldcs(q) : *q;
    }
    uint32_t w[4] = {0u, 0u, 0u, 0u};
#pragma unroll
    for (int e = 0; e < 16; ++e)
        if (c0 + e < k) w[e / 4] |= (uint32_t)p[e] << (8 * (e % 4));
    return make_uint4(w[0], w[1], w[2], w[3]);
}

// What x is: fp8_quant_per_token's codes (with x_scales); the compute type, quantized per
// token by each block; gate_up ([m, 2k]), whose input is silu(gate) * up rounded to the
// compute type as silu_and_mul stores it, then quantized; or the residual stream, whose
// input is rmsnorm(x) * norm_w rounded as rms_norm stores it, then quantized.
enum Input { kCodes, kElem, kSilu, kNorm };

// Element c of token tok's input (kElem, kSilu, kNorm), as the unfused kernels would have
// stored it. inv_rms: kNorm's 1 / rms of the token's row.
template <Input kIn>
RVLLM_DEVICE float input_at(const elem_t* __restrict__ x, int tok, int c, int k,
                            const elem_t* __restrict__ norm_w, float inv_rms) {
    if (kIn == kNorm) {
        return to_f32(from_f32(to_f32(x[(int64_t)tok * k + c]) * inv_rms * to_f32(norm_w[c])));
    }
    if (kIn == kSilu) {
        const elem_t* row = x + (int64_t)tok * 2 * k;
        const float g = to_f32(row[c]), u = to_f32(row[k + c]);
        // silu_and_mul's expression (expf, not __expf), rounded as it stores it.
        return to_f32(from_f32(g / (1.0f + expf(-g)) * u));
    }
    return to_f32(x[(int64_t)tok * k + c]);
}

// Elements c ... c + 7 of token tok's input, zeros past k. kVec: k a multiple of 16 and c of
// 8, so the eight are in or out together and 16-byte aligned.
template <Input kIn, bool kVec>
RVLLM_DEVICE void input8(const elem_t* __restrict__ x, int tok, int c, int k, float (&f)[8],
                         const elem_t* __restrict__ norm_w, float inv_rms) {
    if (!kVec) {
#pragma unroll
        for (int e = 0; e < 8; ++e)
            f[e] = c + e < k ? input_at<kIn>(x, tok, c + e, k, norm_w, inv_rms) : 0.0f;
        return;
    }
    if (c >= k) {
#pragma unroll
        for (int e = 0; e < 8; ++e) f[e] = 0.0f;
        return;
    }
    if (kIn == kSilu) {
        const elem_t* row = x + (int64_t)tok * 2 * k;
        float g[8], u[8], a[8];
        elem8_to_f32(*reinterpret_cast<const Elem8*>(row + c), g);
        elem8_to_f32(*reinterpret_cast<const Elem8*>(row + k + c), u);
#pragma unroll
        for (int e = 0; e < 8; ++e) a[e] = g[e] / (1.0f + expf(-g[e])) * u[e];
        elem8_to_f32(f32_to_elem8(a), f);
    } else if (kIn == kNorm) {
        float v[8], w[8], r[8];
        elem8_to_f32(*reinterpret_cast<const Elem8*>(x + (int64_t)tok * k + c), v);
        elem8_to_f32(*reinterpret_cast<const Elem8*>(norm_w + c), w);
        // rms_norm's expression, rounded as it stores it.
#pragma unroll
        for (int e = 0; e < 8; ++e) r[e] = v[e] * inv_rms * w[e];
        elem8_to_f32(f32_to_elem8(r), f);
    } else {
        elem8_to_f32(*reinterpret_cast<const Elem8*>(x + (int64_t)tok * k + c), f);
    }
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890

constexpr int kTileK = 64;  // codes of a row one MMA pair covers: 4 lanes x 16
constexpr int kUnroll = 4;  // tiles a warp has in flight

// c += A (16 x 32, rows g and g + 8: a0/a2 and a1/a3) * B (32 x 8, token g: b0/b1), the
// fragment layout of PTX's mma.m16n8k32 for 8-bit operands.
RVLLM_DEVICE void mma_e4m3(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                           uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// fp8_quant.cu's dynamic scale (bit for bit: IEEE division despite --use_fast_math).
RVLLM_DEVICE float fp8_scale_of(float amax) {
    return fmaxf(__fdiv_rn(amax, 448.0f), 1.0f / (448.0f * 512.0f));
}

// 16 codes of token tok's input from column c0 (zeros past its end): fp8_quant_per_token's
// codes (the same product with the inverse scale, the same saturating conversion).
template <Input kIn, bool kVec>
RVLLM_DEVICE uint4 quantize16(const elem_t* __restrict__ x, int tok, int c0, int k, float inv,
                              const elem_t* __restrict__ norm_w, float inv_rms) {
    float f[2][8];
    input8<kIn, kVec>(x, tok, c0, k, f[0], norm_w, inv_rms);
    input8<kIn, kVec>(x, tok, c0 + 8, k, f[1], norm_w, inv_rms);
    uint32_t w[4];
#pragma unroll
    for (int p = 0; p < 4; ++p) {
        const float* q = f[p / 2] + 4 * (p % 2);
        // The first element of a pair goes to the low byte.
        const uint32_t lo = __nv_cvt_float2_to_fp8x2(make_float2(q[0] * inv, q[1] * inv),
                                                     __NV_SATFINITE, __NV_E4M3);
        const uint32_t hi = __nv_cvt_float2_to_fp8x2(make_float2(q[2] * inv, q[3] * inv),
                                                     __NV_SATFINITE, __NV_E4M3);
        w[p] = lo | (hi << 16);
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
}

// kIn other than kCodes: each block quantizes the input per token on the fly (amax over the
// row first, as fp8_quant_per_token, then codes as the tiles need them).
template <bool kVec, Input kIn>
RVLLM_DEVICE void fp8_gemv_mma(elem_t* y, const void* __restrict__ x,
                               const float* __restrict__ x_scales,
                               const unsigned char* __restrict__ wq,
                               const float* __restrict__ w_scales, int m, int n, int k,
                               int accumulate, const elem_t* __restrict__ norm_w, float eps) {
    __shared__ float partial[kWarps][4][32];
    __shared__ float token_inv_rms[kMaxTokens];
    __shared__ float scratch[32];
    __shared__ int token_amax[kMaxTokens];  // non-negative floats order as their bits
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    // The MMA's groupID (row of A, column of B) and thread-in-group (which 16 codes of a tile).
    const int g = lane >> 2, t = lane & 3;
    const int row0 = blockIdx.x * kRowsPerBlock;
    const int ra = row0 + g, rb = row0 + g + 8;
    const int tiles = (k + kTileK - 1) / kTileK;
    constexpr int kBatch = kUnroll * kWarps;  // tiles between a warp's batches
    const unsigned char* xq = static_cast<const unsigned char*>(x);
    const elem_t* xe = static_cast<const elem_t*>(x);

    // Lane (g, t)'s codes of tile `tile`: columns tile * 64 + t * 16 ... + 15.
    uint4 wa[kUnroll], wb[kUnroll];
    auto load_weights = [&](int base, uint4(&a)[kUnroll], uint4(&b)[kUnroll]) {
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            const int tile = base + u * kWarps;
            const int c0 = tile < tiles ? tile * kTileK + t * 16 : k;
            a[u] = load16<kVec, true>(wq, ra, n, c0, k);
            b[u] = load16<kVec, true>(wq, rb, n, c0, k);
        }
    };
    load_weights(warp, wa, wb);
    constexpr bool kQuant = kIn != kCodes;
    if (kQuant && threadIdx.x < kMaxTokens) token_amax[threadIdx.x] = 0;
    pdl_wait();
    pdl_launch_dependents();

    float inv = 0.0f, inv_rms = 0.0f;  // kQuant: 1 / token g's scale; kNorm: its 1 / rms
    if (kQuant) {
        if (kIn == kNorm) {
            // rms_norm's sum of squares (its order of additions may differ: a last-bit
            // difference in the scale at most).
            for (int tok = 0; tok < m; ++tok) {
                float ss = 0.0f;
#pragma unroll 4
                for (int c = threadIdx.x * 8; c < k; c += kThreads * 8) {
                    float f[8];
                    input8<kElem, kVec>(xe, tok, c, k, f, norm_w, 0.0f);
#pragma unroll
                    for (int e = 0; e < 8; ++e) ss += f[e] * f[e];
                }
                ss = block_sum(ss, scratch);
                if (threadIdx.x == 0) token_inv_rms[tok] = rsqrtf(ss / (float)k + eps);
            }
        }
        __syncthreads();  // token_amax zeroed, token_inv_rms written
        for (int tok = 0; tok < m; ++tok) {
            const float tok_inv_rms = kIn == kNorm ? token_inv_rms[tok] : 0.0f;
            float a = 0.0f;
            // Unrolled so that a thread's loads are in flight together: until this pass ends
            // the block streams only its first weights (the down projection's 14,336-wide
            // silu input is 7 chunks a thread, in one wave of blocks).
#pragma unroll 4
            for (int c = threadIdx.x * 8; c < k; c += kThreads * 8) {
                float f[8];
                input8<kIn, kVec>(xe, tok, c, k, f, norm_w, tok_inv_rms);
#pragma unroll
                for (int e = 0; e < 8; ++e) a = fmaxf(a, fabsf(f[e]));
            }
            a = warp_max(a);
            if (lane == 0) atomicMax(&token_amax[tok], __float_as_int(a));
        }
        __syncthreads();
        if (g < m) {
            inv = __frcp_rn(fp8_scale_of(__int_as_float(token_amax[g])));
            if (kIn == kNorm) inv_rms = token_inv_rms[g];
        }
    }

    float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int base = warp; base < tiles; base += kBatch) {
        uint4 xv[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            const int tile = base + u * kWarps;
            const int c0 = tile < tiles ? tile * kTileK + t * 16 : k;
            if (kQuant) {
                xv[u] = g < m ? quantize16<kIn, kVec>(xe, g, c0, k, inv, norm_w, inv_rms)
                              : make_uint4(0u, 0u, 0u, 0u);
            } else {
                xv[u] = load16<kVec, false>(xq, g, m, c0, k);
            }
        }
        uint4 na[kUnroll], nb[kUnroll];
        load_weights(base + kBatch, na, nb);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            mma_e4m3(c, wa[u].x, wb[u].x, wa[u].y, wb[u].y, xv[u].x, xv[u].y);
            mma_e4m3(c, wa[u].z, wb[u].z, wa[u].w, wb[u].w, xv[u].z, xv[u].w);
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            wa[u] = na[u];
            wb[u] = nb[u];
        }
    }

    // The warps' partial products, added in warp order by warp 0.
#pragma unroll
    for (int i = 0; i < 4; ++i) partial[warp][i][lane] = c[i];
    __syncthreads();
    if (warp != 0) return;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        float s = 0.0f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) s += partial[w][i][lane];
        // c0, c1: row g, tokens 2t and 2t + 1; c2, c3: row g + 8.
        const int row = i < 2 ? ra : rb;
        const int tok = 2 * t + (i & 1);
        if (row >= n || tok >= m) continue;
        const int64_t at = (int64_t)tok * n + row;
        const float sx =
            kQuant ? fp8_scale_of(__int_as_float(token_amax[tok])) : x_scales[tok];
        float v = s * sx * w_scales[row];
        if (accumulate) v += to_f32(y[at]);
        y[at] = from_f32(v);
    }
}

#else

RVLLM_DEVICE float e4m3_to_f32(unsigned char code) {
    return __half2float(__half(__nv_cvt_fp8_to_halfraw(code, __NV_E4M3)));
}

// A warp a row (rows w and w + 8 of the block's 16), every token in turn; other inputs than
// codes quantized per token by each warp as fp8_quant_per_token does.
template <Input kIn>
RVLLM_DEVICE void fp8_gemv_portable(elem_t* y, const void* __restrict__ x,
                                    const float* __restrict__ x_scales,
                                    const unsigned char* __restrict__ wq,
                                    const float* __restrict__ w_scales, int m, int n, int k,
                                    int accumulate, const elem_t* __restrict__ norm_w,
                                    float eps) {
    pdl_enter();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const unsigned char* xq = static_cast<const unsigned char*>(x);
    const elem_t* xe = static_cast<const elem_t*>(x);
    for (int r = warp; r < kRowsPerBlock; r += kWarps) {
        const int row = blockIdx.x * kRowsPerBlock + r;
        if (row >= n) break;
        const unsigned char* wrow = wq + (int64_t)row * k;
        for (int tok = 0; tok < m; ++tok) {
            float sx = 0.0f, inv = 0.0f, inv_rms = 0.0f;
            if (kIn == kNorm) {
                float ss = 0.0f;
                for (int c = lane; c < k; c += 32) {
                    const float v = to_f32(xe[(int64_t)tok * k + c]);
                    ss += v * v;
                }
                inv_rms = rsqrtf(warp_sum(ss) / (float)k + eps);
            }
            if (kIn != kCodes) {
                float a = 0.0f;
                for (int c = lane; c < k; c += 32)
                    a = fmaxf(a, fabsf(input_at<kIn>(xe, tok, c, k, norm_w, inv_rms)));
                sx = fmaxf(__fdiv_rn(warp_max(a), 448.0f), 1.0f / (448.0f * 512.0f));
                inv = __frcp_rn(sx);
            } else {
                sx = x_scales[tok];
            }
            float s = 0.0f;
            for (int c = lane; c < k; c += 32) {
                const unsigned char code =
                    kIn != kCodes ? __nv_cvt_float_to_fp8(input_at<kIn>(xe, tok, c, k, norm_w, inv_rms) * inv,
                                                          __NV_SATFINITE, __NV_E4M3)
                                  : xq[(int64_t)tok * k + c];
                s = fmaf(e4m3_to_f32(code), e4m3_to_f32(wrow[c]), s);
            }
            s = warp_sum(s);
            if (lane != 0) continue;
            const int64_t at = (int64_t)tok * n + row;
            float v = s * sx * w_scales[row];
            if (accumulate) v += to_f32(y[at]);
            y[at] = from_f32(v);
        }
    }
}

#endif

}  // namespace

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
#define RVLLM_FP8_GEMV_BODY(INPUT)                                                            \
    if ((k & 15) == 0) {                                                                      \
        fp8_gemv_mma<true, INPUT>(y, x, x_scales, wq, w_scales, m, n, k, accumulate, norm_w, \
                                  eps);                                                       \
    } else {                                                                                  \
        fp8_gemv_mma<false, INPUT>(y, x, x_scales, wq, w_scales, m, n, k, accumulate, norm_w, \
                                   eps);                                                      \
    }
#else
#define RVLLM_FP8_GEMV_BODY(INPUT) \
    fp8_gemv_portable<INPUT>(y, x, x_scales, wq, w_scales, m, n, k, accumulate, norm_w, eps)
#endif

// Tokens past kMaxTokens have no column in the MMA: the host never asks for them.
extern "C" __global__ void __launch_bounds__(kThreads) DT(fp8_gemv_bf16, fp8_gemv_f16)(
    elem_t* y, const unsigned char* __restrict__ xq, const float* __restrict__ x_scales,
    const unsigned char* __restrict__ wq, const float* __restrict__ w_scales, int m, int n,
    int k, int accumulate) {
    const void* x = xq;
    const elem_t* norm_w = nullptr;
    const float eps = 0.0f;
    m = min(m, kMaxTokens);
    RVLLM_FP8_GEMV_BODY(kCodes);
}

extern "C" __global__ void __launch_bounds__(kThreads) DT(fp8_gemv_quant_bf16, fp8_gemv_quant_f16)(
    elem_t* y, const elem_t* __restrict__ x, const unsigned char* __restrict__ wq,
    const float* __restrict__ w_scales, int m, int n, int k, int accumulate) {
    const float* x_scales = nullptr;
    const elem_t* norm_w = nullptr;
    const float eps = 0.0f;
    m = min(m, kMaxTokens);
    RVLLM_FP8_GEMV_BODY(kElem);
}

extern "C" __global__ void __launch_bounds__(kThreads) DT(fp8_gemv_silu_bf16, fp8_gemv_silu_f16)(
    elem_t* y, const elem_t* __restrict__ gate_up, const unsigned char* __restrict__ wq,
    const float* __restrict__ w_scales, int m, int n, int k, int accumulate) {
    const elem_t* x = gate_up;
    const float* x_scales = nullptr;
    const elem_t* norm_w = nullptr;
    const float eps = 0.0f;
    m = min(m, kMaxTokens);
    RVLLM_FP8_GEMV_BODY(kSilu);
}

extern "C" __global__ void __launch_bounds__(kThreads) DT(fp8_gemv_norm_bf16, fp8_gemv_norm_f16)(
    elem_t* y, const elem_t* __restrict__ x, const elem_t* __restrict__ norm_w, float eps,
    const unsigned char* __restrict__ wq, const float* __restrict__ w_scales, int m, int n,
    int k, int accumulate) {
    const float* x_scales = nullptr;
    m = min(m, kMaxTokens);
    RVLLM_FP8_GEMV_BODY(kNorm);
}
