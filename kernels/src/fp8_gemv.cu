// The FP8 linear of `--quantization fp8` at small batches (issue 20): 1 to 16 tokens, where a
// step is a stream over every weight. Weight-only FP8 (W8A16): the weights are E4M3 codes with
// f32 scales, the input stays in the compute type (no activation quantization, no extra
// launch), products accumulate in f32.
//
// Kernels (all extern "C"):
//   fp8_gemv_bf16(y, x, wq, w_scales, scale_kind, m, n, k, accumulate)
//       y[t, j] = sum_k x[t, k] * dequant(wq)[j, k] for x [m, k] in the compute type, plus
//       y[t, j] when accumulate is non-zero (the residual add, rounded once). m <= 16.
//   fp8_gemv_silu_bf16(y, gate_up, wq, w_scales, scale_kind, m, n, k, accumulate)
//       the same with the input silu(gate) * up of gate_up [1, 2k] (gate half, then up half),
//       rounded to the compute type as silu_and_mul stores it: the down projection without
//       the silu_and_mul launch. m = 1, k <= kMaxStagedK.
//   fp8_gemv_norm_bf16(y, x, norm_w, eps, wq, w_scales, scale_kind, m, n, k, accumulate)
//       the same with the input rmsnorm(x) * norm_w (eps), rounded as rms_norm stores it: QKV
//       and gate|up without the rms_norm launch. m = 1, k <= kMaxStagedK.
//   wq: E4M3 codes [n, k] row-major; scale_kind says what w_scales holds:
//       0 per tensor (w_scales[0]), 1 per channel (w_scales[j]), 2 per 128 x 128 block
//       (w_scales[(j / 128) * ceil(k / 128) + kk / 128], edge blocks partial), the
//       `weight_block_size: [128, 128]` of block-wise FP8 checkpoints.
//   Grid (ceil(n / 16)), block 256; pointers 16-byte aligned. k a multiple of 16 takes
//   16-byte loads; other k (tiny models) byte-wise loads, same results.
//
// Why this shape (gemv.cu's, with FP8 bytes): at batch 1 a decode step streams every weight
// once, so the kernel must keep enough bytes in flight and spend few instructions a byte.
// A block owns 16 weight rows; its 8 warps split k in tiles of 128 codes (one block-scale
// column), tile w, w + 8, ... to warp w, so the warps together read 1 KiB runs of each row.
// Each lane loads 16 codes (16 bytes) of its row per half-tile, kUnroll tiles at once, and the
// next tiles' loads are issued before the current ones are multiplied (2 x 128 bytes a lane
// in flight); the first tiles are requested before pdl_wait (weights depend on no kernel).
// Weights are streamed evict-first (__ldcs): each is read once a step.
//   The products run on the tensor cores (mma m16n8k16, f32 accumulation): A is the input
// (16 tokens, missing ones zero), B is 8 weight rows. A dot product's terms may be taken in
// any order, so lane (g, t) feeds the MMA the 16 contiguous columns t*16 ... t*16+15 of a
// 64-column half-tile for both operands (its row g of the weights, its tokens g and g + 8 of
// the input): loads stay 16 bytes wide and need no shuffles. Decoding is the hardware
// cvt.rn.f16x2.e4m3x2 (two codes an instruction, exact); the bf16 build widens the halves to
// f32 and packs them as bf16 (exact: E4M3 has 3 mantissa bits). That is ~2 instructions a
// weight (0.5 in f16) whatever the batch, where CUDA-core FMAs would cost 2 a weight and
// token: at 16 tokens far past what the memory's bandwidth leaves time for.
//   Per-tensor and per-channel scales multiply each output once; block scales multiply each
// tile's partial product (a tile is one block column, and a block's 16 rows lie in one block
// row). The fused variants stage their input (normed or silu'd, rounded as the unfused
// kernels store it) in shared memory once per block, all 256 threads computing it, so the
// tile loop reads it as the plain variant reads x.
#include <cuda_fp8.h>

#include "common.cuh"

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kGroups = 2;  // 8-row MMA column groups a block
constexpr int kRowsPerBlock = 8 * kGroups;
constexpr int kTileK = 128;  // codes of a row a warp takes at a time: one block-scale column
constexpr int kMaxStagedK = 16384;  // the fused variants' staged input (32 KiB)

enum ScaleKind { kPerTensor = 0, kPerChannel = 1, kBlock128 = 2 };
enum Input { kPlain, kSilu, kNorm };

// Shared memory of a block, declared once in each entry point (a template's own __shared__
// arrays would be allocated once per instantiation that entry point contains).
struct Shared {
    float partial[kWarps][kGroups][4][32];
    float scratch[32];
};

// 16 codes of weight row `row` (of n, each k long) from column c0; zeros past the row's end
// and for rows past the last. kVec (k a multiple of 16, so c0 < k means the whole chunk is
// inside): one streaming 16-byte load.
template <bool kVec>
RVLLM_DEVICE uint4 load_codes(const unsigned char* __restrict__ wq, int row, int n, int c0,
                              int k) {
    if (row >= n || c0 >= k) return make_uint4(0u, 0u, 0u, 0u);
    const unsigned char* p = wq + (int64_t)row * k + c0;
    if (kVec) return __ldcs(reinterpret_cast<const uint4*>(p));
    uint32_t w[4] = {0u, 0u, 0u, 0u};
#pragma unroll
    for (int e = 0; e < 16; ++e)
        if (c0 + e < k) w[e / 4] |= (uint32_t)p[e] << (8 * (e % 4));
    return make_uint4(w[0], w[1], w[2], w[3]);
}

// Elements c0 ... c0 + 15 of the input row at `row` (element bits, zeros past k).
template <bool kVec>
RVLLM_DEVICE void load_x16(const elem_t* row, int c0, int k, uint4 (&v)[2]) {
    if (kVec) {
        if (c0 < k) {
            v[0] = *reinterpret_cast<const uint4*>(row + c0);
            v[1] = *reinterpret_cast<const uint4*>(row + c0 + 8);
        } else {
            v[0] = v[1] = make_uint4(0u, 0u, 0u, 0u);
        }
        return;
    }
    const unsigned short* r = reinterpret_cast<const unsigned short*>(row);
    uint32_t w[8];
#pragma unroll
    for (int p = 0; p < 8; ++p) {
        const int c = c0 + 2 * p;
        const uint32_t lo = c < k ? r[c] : 0u, hi = c + 1 < k ? r[c + 1] : 0u;
        w[p] = lo | (hi << 16);
    }
    v[0] = make_uint4(w[0], w[1], w[2], w[3]);
    v[1] = make_uint4(w[4], w[5], w[6], w[7]);
}

// Word p (elements 2p, 2p + 1) of 16 elements held as two uint4.
RVLLM_DEVICE uint32_t word_of(const uint4 (&v)[2], int p) {
    const uint4& q = v[p / 4];
    switch (p % 4) {
        case 0: return q.x;
        case 1: return q.y;
        case 2: return q.z;
        default: return q.w;
    }
}

RVLLM_DEVICE uint32_t word_of(const uint4& q, int p) {
    switch (p) {
        case 0: return q.x;
        case 1: return q.y;
        case 2: return q.z;
        default: return q.w;
    }
}

// Two E4M3 codes (the low 16 bits; the first in the low byte) as a pair of the compute type,
// exactly, the first element in the low half (the MMA's operand order).
RVLLM_DEVICE uint32_t decode_pair(uint32_t codes) {
    const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(codes & 0xffffu),
                                                     __NV_E4M3);
#ifdef RVLLM_F16
    return (uint32_t)h.x | ((uint32_t)h.y << 16);
#else
    const float2 f = __half22float2(__half2(h));
    const __nv_bfloat162 b = __floats2bfloat162_rn(f.x, f.y);
    return *reinterpret_cast<const uint32_t*>(&b);
#endif
}

// c += A (16 tokens x 16) * B (16 x 8 rows): PTX's mma.m16n8k16 fragments for 16-bit
// operands (a0/a2: token g, a1/a3: token g + 8; b0/b1: row g; c0/c1: token g, c2/c3: g + 8).
RVLLM_DEVICE void mma_16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                            uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32." RVLLM_MMA_AB ".f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// The fused variants' input (token 0) into xs: silu(gate) * up or rmsnorm(x) * norm_w,
// computed and rounded as silu_and_mul / rms_norm compute and store it (the sum of squares
// in another order: a last-bit difference in the norm's scale at most). Every thread takes
// part; the caller syncs before reading xs.
template <Input kIn, bool kVec>
RVLLM_DEVICE void stage_input(const elem_t* __restrict__ x, const elem_t* __restrict__ norm_w,
                              float eps, int k, elem_t* xs, float* scratch) {
    const int tid = threadIdx.x;
    float inv_rms = 0.0f;
    if (kIn == kNorm) {
        float ss = 0.0f;
        if (kVec) {
#pragma unroll 4
            for (int c = tid * 8; c < k; c += kThreads * 8) {
                float f[8];
                elem8_to_f32(*reinterpret_cast<const Elem8*>(x + c), f);
#pragma unroll
                for (int e = 0; e < 8; ++e) ss += f[e] * f[e];
            }
        } else {
            for (int c = tid; c < k; c += kThreads) {
                const float v = to_f32(x[c]);
                ss += v * v;
            }
        }
        inv_rms = rsqrtf(block_sum(ss, scratch) / (float)k + eps);
    }
    if (kVec) {
#pragma unroll 4
        for (int c = tid * 8; c < k; c += kThreads * 8) {
            float a[8], b[8], r[8];
            elem8_to_f32(*reinterpret_cast<const Elem8*>(x + c), a);
            elem8_to_f32(*reinterpret_cast<const Elem8*>(kIn == kSilu ? x + k + c : norm_w + c),
                         b);
#pragma unroll
            for (int e = 0; e < 8; ++e)
                r[e] = kIn == kSilu ? a[e] / (1.0f + expf(-a[e])) * b[e] : a[e] * inv_rms * b[e];
            *reinterpret_cast<Elem8*>(xs + c) = f32_to_elem8(r);
        }
    } else {
        for (int c = tid; c < k; c += kThreads) {
            const float a = to_f32(x[c]);
            const float b = to_f32(kIn == kSilu ? x[k + c] : norm_w[c]);
            xs[c] = from_f32(kIn == kSilu ? a / (1.0f + expf(-a)) * b : a * inv_rms * b);
        }
    }
}

// kWide: tokens 8 to 15 exist (m > 8), fed as the MMA's rows 8 to 15; otherwise those rows
// are zeros and never loaded. xs: the fused variants' staged input (null for kPlain).
template <Input kIn, bool kWide, bool kVec>
RVLLM_DEVICE void fp8_gemv(elem_t* y, const elem_t* __restrict__ x,
                           const elem_t* __restrict__ norm_w, float eps,
                           const unsigned char* __restrict__ wq,
                           const float* __restrict__ w_scales, int scale_kind, int m, int n,
                           int k, int accumulate, Shared& sh, elem_t* xs) {
    // Tiles a warp has in flight: 2 (8 loads of 16 bytes a lane, twice that while the next
    // batch lands); 1 in the wide build, whose second token of inputs would not fit the
    // registers beside them (128 a thread for two blocks an SM; 2 spilled).
    constexpr int kUnroll = kWide ? 1 : 2;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    // The MMA's groupID (token of A, weight row of B) and thread-in-group (which 16 columns).
    const int g = lane >> 2, t = lane & 3;
    const int row0 = blockIdx.x * kRowsPerBlock;
    const int tiles = (k + kTileK - 1) / kTileK;
    constexpr int kStep = kWarps * kUnroll;  // tiles between a warp's batches

    // Lane (g, t)'s codes of batch `first` (tiles first, first + kWarps, ...): row
    // row0 + 8q + g, columns tile * 128 + h * 64 + t * 16 ... + 15.
    auto load_weights = [&](int first, uint4(&dst)[kUnroll][kGroups][2]) {
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            const int tile = first + u * kWarps;
#pragma unroll
            for (int q = 0; q < kGroups; ++q)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int c0 = tile < tiles ? tile * kTileK + h * 64 + t * 16 : k;
                    dst[u][q][h] = load_codes<kVec>(wq, row0 + 8 * q + g, n, c0, k);
                }
        }
    };
    uint4 w[kUnroll][kGroups][2];
    load_weights(warp, w);
    pdl_wait();
    pdl_launch_dependents();

    const elem_t* xin = x;
    if (kIn != kPlain) {
        stage_input<kIn, kVec>(x, norm_w, eps, k, xs, sh.scratch);
        __syncthreads();
        xin = xs;
        m = 1;
    }
    const bool has_lo = g < m, has_hi = kWide && g + 8 < m;
    const elem_t* x_lo = xin + (int64_t)(has_lo ? g : 0) * k;
    const elem_t* x_hi = xin + (int64_t)(has_hi ? g + 8 : 0) * k;
    // Block scales: this block's rows lie in one 128-row block; a tile is one block column.
    const bool block_scaled = scale_kind == kBlock128;
    const float* tile_scales = w_scales + (int64_t)(row0 / 128) * tiles;

    float acc[kGroups][4];
#pragma unroll
    for (int q = 0; q < kGroups; ++q)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[q][i] = 0.0f;

    for (int base = warp; base < tiles; base += kStep) {
        // The input's columns of this batch first (L2 hits), then the next batch's weights,
        // then the products: both kinds of load are in flight while the MMAs wait.
        uint4 xa[kUnroll][2][2], xb[kUnroll][2][2];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            const int tile = base + u * kWarps;
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int c0 = tile < tiles ? tile * kTileK + h * 64 + t * 16 : k;
                load_x16<kVec>(x_lo, has_lo ? c0 : k, k, xa[u][h]);
                if (kWide) load_x16<kVec>(x_hi, has_hi ? c0 : k, k, xb[u][h]);
            }
        }
        uint4 next[kUnroll][kGroups][2];
        load_weights(base + kStep, next);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            const int tile = base + u * kWarps;
            float part[kGroups][4];
#pragma unroll
            for (int q = 0; q < kGroups; ++q)
#pragma unroll
                for (int i = 0; i < 4; ++i) part[q][i] = 0.0f;
#pragma unroll
            for (int h = 0; h < 2; ++h)
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const uint32_t a0 = word_of(xa[u][h], 2 * j);
                    const uint32_t a2 = word_of(xa[u][h], 2 * j + 1);
                    const uint32_t a1 = kWide ? word_of(xb[u][h], 2 * j) : 0u;
                    const uint32_t a3 = kWide ? word_of(xb[u][h], 2 * j + 1) : 0u;
#pragma unroll
                    for (int q = 0; q < kGroups; ++q) {
                        const uint32_t codes = word_of(w[u][q][h], j);
                        mma_16816(part[q], a0, a1, a2, a3, decode_pair(codes),
                                  decode_pair(codes >> 16));
                    }
                }
            const float s = !block_scaled ? 1.0f : tile < tiles ? tile_scales[tile] : 0.0f;
#pragma unroll
            for (int q = 0; q < kGroups; ++q)
#pragma unroll
                for (int i = 0; i < 4; ++i) acc[q][i] = fmaf(part[q][i], s, acc[q][i]);
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
#pragma unroll
            for (int q = 0; q < kGroups; ++q)
#pragma unroll
                for (int h = 0; h < 2; ++h) w[u][q][h] = next[u][q][h];
    }

    // The warps' partial products, added in warp order by warp 0.
#pragma unroll
    for (int q = 0; q < kGroups; ++q)
#pragma unroll
        for (int i = 0; i < 4; ++i) sh.partial[warp][q][i][lane] = acc[q][i];
    __syncthreads();
    if (warp != 0) return;
#pragma unroll
    for (int q = 0; q < kGroups; ++q)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            float s = 0.0f;
#pragma unroll
            for (int v = 0; v < kWarps; ++v) s += sh.partial[v][q][i][lane];
            const int tok = g + 8 * (i >> 1);
            const int row = row0 + 8 * q + 2 * t + (i & 1);
            if (tok >= m || row >= n) continue;
            if (scale_kind == kPerTensor) s *= w_scales[0];
            if (scale_kind == kPerChannel) s *= w_scales[row];
            const int64_t at = (int64_t)tok * n + row;
            if (accumulate) s += to_f32(y[at]);
            y[at] = from_f32(s);
        }
}

}  // namespace

// 16-byte loads when k allows them; the wide build when tokens 8 to 15 exist.
#define RVLLM_FP8_GEMV_BODY(INPUT, XS)                                                          \
    __shared__ Shared sh;                                                                       \
    if (m > 8) {                                                                                \
        if ((k & 15) == 0)                                                                      \
            fp8_gemv<INPUT, true, true>(y, x, norm_w, eps, wq, w_scales, scale_kind, m, n, k,   \
                                        accumulate, sh, XS);                                        \
        else                                                                                    \
            fp8_gemv<INPUT, true, false>(y, x, norm_w, eps, wq, w_scales, scale_kind, m, n, k,  \
                                         accumulate, sh, XS);                                       \
    } else {                                                                                    \
        if ((k & 15) == 0)                                                                      \
            fp8_gemv<INPUT, false, true>(y, x, norm_w, eps, wq, w_scales, scale_kind, m, n, k,  \
                                         accumulate, sh, XS);                                       \
        else                                                                                    \
            fp8_gemv<INPUT, false, false>(y, x, norm_w, eps, wq, w_scales, scale_kind, m, n, k, \
                                          accumulate, sh, XS);                                      \
    }

// The fused variants take one token (m = 1): the narrow build only.
#define RVLLM_FP8_GEMV_FUSED_BODY(INPUT)                                                        \
    __shared__ Shared sh;                                                                       \
    __shared__ __align__(16) elem_t xs[kMaxStagedK];                                            \
    if (k > kMaxStagedK) { /* the host never asks: leave y alone */                             \
        pdl_enter();                                                                            \
        return;                                                                                 \
    }                                                                                           \
    if ((k & 15) == 0)                                                                          \
        fp8_gemv<INPUT, false, true>(y, x, norm_w, eps, wq, w_scales, scale_kind, m, n, k,      \
                                     accumulate, sh, xs);                                           \
    else                                                                                        \
        fp8_gemv<INPUT, false, false>(y, x, norm_w, eps, wq, w_scales, scale_kind, m, n, k,     \
                                      accumulate, sh, xs);

extern "C" __global__ void __launch_bounds__(kThreads, 2) DT(fp8_gemv_bf16, fp8_gemv_f16)(
    elem_t* y, const elem_t* __restrict__ x, const unsigned char* __restrict__ wq,
    const float* __restrict__ w_scales, int scale_kind, int m, int n, int k, int accumulate) {
    const elem_t* norm_w = nullptr;
    const float eps = 0.0f;
    m = min(m, 16);
    RVLLM_FP8_GEMV_BODY(kPlain, nullptr);
}

extern "C" __global__ void __launch_bounds__(kThreads, 2) DT(fp8_gemv_silu_bf16, fp8_gemv_silu_f16)(
    elem_t* y, const elem_t* __restrict__ gate_up, const unsigned char* __restrict__ wq,
    const float* __restrict__ w_scales, int scale_kind, int m, int n, int k, int accumulate) {
    const elem_t* x = gate_up;
    const elem_t* norm_w = nullptr;
    const float eps = 0.0f;
    RVLLM_FP8_GEMV_FUSED_BODY(kSilu);
}

extern "C" __global__ void __launch_bounds__(kThreads, 2) DT(fp8_gemv_norm_bf16, fp8_gemv_norm_f16)(
    elem_t* y, const elem_t* __restrict__ x, const elem_t* __restrict__ norm_w, float eps,
    const unsigned char* __restrict__ wq, const float* __restrict__ w_scales, int scale_kind,
    int m, int n, int k, int accumulate) {
    RVLLM_FP8_GEMV_FUSED_BODY(kNorm);
}
