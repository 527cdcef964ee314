// Matrix-vector products for small batches (decode at batch 1..8): y = x W^T.
//
// Kernels (all extern "C"):
//   gemv_bf16_b{1,2,4,8}(y, x, w, m, n, k, split)
//     w: bf16 [n, k] row-major (HF linear layout); x: bf16 [m, k]; y: bf16 [m, n];
//     m <= the kernel's batch (1, 2, 4 or 8); k a multiple of 8; f32 accumulation.
//     split (1, 2, 4 or 8) warps share one output row (split-K inside the block), which
//     evens out the last wave when n is small next to the number of warps the GPU holds.
//     grid (ceil(n / (8 / split))), block 256.
//   gemv_silu_bf16_b1(y, gate_up, w, m, n, k, split)
//     as gemv_bf16_b1 with x = silu(gate) * up taken from gate_up: bf16 [m, 2k] (m = 1).
//   gemv_gelu_bf16_b1(y, gate_up, w, m, n, k, split)
//     the same with GeGLU's gelu_tanh(gate) * up (Gemma's down projection).
//   Each kernel starts its first weight loads before pdl_wait (common.cuh).
//   Measured on the H100 (gpu_bench): at m = 1 as fast as or faster than cuBLAS on every
//   Llama-3.1-8B matrix; at m >= 4 cuBLAS is faster (x is re-read per weight chunk here).
//
// Why: at batch 1 a decode step is a stream over all weights, so the linear layers must read
// them at the memory's bandwidth. Each warp streams one weight row with 16-byte loads, several
// in flight per lane (kUnroll), and reuses each loaded weight chunk for every row of x (x is
// small and stays in L1/L2). cuBLAS is the path for larger batches.
#include "common.cuh"
#include "gated_act.cuh"

namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kUnroll = 8;

__device__ __forceinline__ float dot8(const Elem8& a, const Elem8& b) {
    float fa[8], fb[8];
    elem8_to_f32(a, fa);
    elem8_to_f32(b, fb);
    float s = 0.0f;
#pragma unroll
    for (int e = 0; e < 8; ++e) s = fmaf(fa[e], fb[e], s);
    return s;
}

// What the GEMV reads: x itself, or act(gate) * up of the MLP's gate|up rows.
enum Input { kPlain, kSilu, kGelu };

// Row `b`'s chunk `idx` (8 values) of the GEMV input. Plain: x is [m, k]. kSilu / kGelu: x is
// the MLP's [m, 2k] gate|up output and the input is act(gate) * up, rounded to the element
// type exactly as silu_and_mul / gelu_tanh_and_mul store it, so that the fused and unfused
// paths agree bit for bit.
template <int kIn>
__device__ __forceinline__ Elem8 load_x(const elem_t* __restrict__ x, int b, int idx,
                                         int k8) {
    const int4* xv = reinterpret_cast<const int4*>(x);
    if (kIn == kPlain) {
        const int4 v = __ldg(xv + (int64_t)b * k8 + idx);
        return *reinterpret_cast<const Elem8*>(&v);
    }
    const int4 gv = __ldg(xv + (int64_t)b * 2 * k8 + idx);
    const int4 uv = __ldg(xv + (int64_t)b * 2 * k8 + k8 + idx);
    return gated_act8<kIn == kGelu ? kActGeluTanh : kActSilu>(
        *reinterpret_cast<const Elem8*>(&gv), *reinterpret_cast<const Elem8*>(&uv));
}

// Loads this lane's next kUnroll 16-byte weight chunks (zeros past the row's end).
__device__ __forceinline__ void load_w(int4 (&wv)[kUnroll], const int4* __restrict__ wrow,
                                       int base, int stride, int k8) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
        const int idx = base + u * stride;
        // Weights are read once per step: stream them past L1.
        wv[u] = idx < k8 ? __ldcs(wrow + idx) : make_int4(0, 0, 0, 0);
    }
}

template <int MT, int kIn>
__device__ __forceinline__ void gemv(elem_t* __restrict__ y,
                                     const elem_t* __restrict__ x,
                                     const elem_t* __restrict__ w, int m, int n, int k,
                                     int split) {
    __shared__ float partial[kWarpsPerBlock][MT];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int part = warp % split;  // this warp's share of the row's 16-byte chunks
    const int row = blockIdx.x * (kWarpsPerBlock / split) + warp / split;
    const bool active = row < n;
    const int k8 = k / 8;
    // Chunk c of the row goes to warp part (c / 32) % split: each warp instruction still
    // reads 512 contiguous bytes.
    const int stride = 32 * split;
    const int step = stride * kUnroll;
    const int4* wrow = reinterpret_cast<const int4*>(w + (int64_t)(active ? row : 0) * k);
    int base = lane + 32 * part;
    int4 wv[kUnroll];
    // The weights depend on no earlier kernel: the first chunks are in flight before the
    // wait, overlapping the kernels this GEMV waits for (norms, RoPE, attention).
    if (active) load_w(wv, wrow, base, stride, k8);
    pdl_wait();
    pdl_launch_dependents();
    float acc[MT];
#pragma unroll
    for (int b = 0; b < MT; ++b) acc[b] = 0.0f;
    if (active) {
        for (; base < k8; base += step) {
#pragma unroll
            for (int u = 0; u < kUnroll; ++u) {
                const int idx = base + u * stride;
                if (idx < k8) {
                    const Elem8 wb = *reinterpret_cast<const Elem8*>(&wv[u]);
#pragma unroll
                    for (int b = 0; b < MT; ++b) {
                        if (b < m) acc[b] += dot8(wb, load_x<kIn>(x, b, idx, k8));
                    }
                }
            }
            if (base + step < k8) load_w(wv, wrow, base + step, stride, k8);
        }
    }
#pragma unroll
    for (int b = 0; b < MT; ++b) acc[b] = warp_sum(acc[b]);
    if (split == 1) {
        if (lane == 0 && active) {
#pragma unroll
            for (int b = 0; b < MT; ++b)
                if (b < m) y[(int64_t)b * n + row] = from_f32(acc[b]);
        }
        return;
    }
    if (lane == 0) {
#pragma unroll
        for (int b = 0; b < MT; ++b) partial[warp][b] = acc[b];
    }
    __syncthreads();
    if (part == 0 && lane < MT && lane < m && active) {
        float s = 0.0f;
        for (int p = 0; p < split; ++p) s += partial[warp + p][lane];
        y[(int64_t)lane * n + row] = from_f32(s);
    }
}

}  // namespace

#define RVLLM_GEMV(MT, MINB)                                                                       \
    extern "C" __global__ void __launch_bounds__(kWarpsPerBlock * 32, MINB)                    \
        DT(gemv_bf16_b##MT, gemv_f16_b##MT)(elem_t* __restrict__ y,                           \
                                            const elem_t* __restrict__ x,                     \
                                            const elem_t* __restrict__ w, int m, int n, int k, \
                                            int split) {                                       \
        gemv<MT, kPlain>(y, x, w, m, n, k, split);                                              \
    }

// Minimum resident blocks: 4 (<= 64 registers) where that costs no spills.
RVLLM_GEMV(1, 4)
RVLLM_GEMV(2, 4)
RVLLM_GEMV(4, 3)
RVLLM_GEMV(8, 2)

// The MLP's down projection at batch 1 with SiLU-and-mul fused into its input: x is the
// [1, 2k] gate|up activation; one launch (and one pass over x) fewer per layer.
extern "C" __global__ void __launch_bounds__(kWarpsPerBlock * 32, 4)
    DT(gemv_silu_bf16_b1, gemv_silu_f16_b1)(elem_t* __restrict__ y,
                                            const elem_t* __restrict__ gate_up,
                                            const elem_t* __restrict__ w, int m, int n, int k,
                                            int split) {
    gemv<1, kSilu>(y, gate_up, w, m, n, k, split);
}

// The same with GeGLU (Gemma), where gemv_bulk does not apply (GPUs before sm_90, rows past
// a stage: Gemma-3-27B's 21,504-wide down projection).
extern "C" __global__ void __launch_bounds__(kWarpsPerBlock * 32, 4)
    DT(gemv_gelu_bf16_b1, gemv_gelu_f16_b1)(elem_t* __restrict__ y,
                                            const elem_t* __restrict__ gate_up,
                                            const elem_t* __restrict__ w, int m, int n, int k,
                                            int split) {
    gemv<1, kGelu>(y, gate_up, w, m, n, k, split);
}
