// Batch-1 matrix-vector products for Hopper (sm_90+): y = W x with the weights streamed into
// shared memory by the bulk copy engine.
//
// Kernels (all extern "C"):
//   gemv_bulk_bf16_b1(y, x, w, n, k, rows_per_stage)
//     w: bf16 [n, k] row-major; x: bf16 [k]; y: bf16 [n]; f32 accumulation.
//   gemv_bulk_silu_bf16_b1(y, gate_up, w, n, k, rows_per_stage)
//     the same with x = silu(gate) * up from gate_up: bf16 [2k] (rounded to bf16 as
//     silu_and_mul_bf16 stores it).
//   k a multiple of 8; rows_per_stage R in {1, 2, 4, 8} with R * k * 2 <= kStageBytes; the
//   pointers 16-byte aligned. Grid: at most one block per SM (gemv_bulk_grid on the host),
//   block 256, dynamic shared memory gemv_bulk_smem_bytes(k) (see the host).
//   On GPUs before sm_90 the kernels trap: the host uses gemv.cu there.
//
// Why: at batch 1 a decode step is a stream over every weight, so the GEMVs must run at the
// memory's bandwidth. A warp-per-row kernel keeps only a few loads in flight per thread and
// its short blocks spend much of their life starting and draining; on an H200 that left a
// quarter of the bandwidth unused. Here each block is persistent (one per SM) and keeps
// kStages groups of R whole rows (R * k * 2 contiguous bytes) in flight through
// cp.async.bulk, completing on an mbarrier per stage, while its 8 warps compute on the stage
// that has landed. The first stages are requested before pdl_wait: the weights depend on no
// earlier kernel, so their loads overlap the small kernels before the GEMV.
#include "common.cuh"

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kStages = 4;
constexpr int kStageBytes = 32 * 1024;

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(count));
}

// Requests `bytes` from global `src` into shared `dst`; the stage's barrier completes when
// they have landed.
__device__ __forceinline__ void bulk_load(void* dst, const void* src, uint32_t bytes,
                                          uint64_t* bar) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)),
                 "r"(bytes)
                 : "memory");
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::
            "r"(smem_addr(dst)),
        "l"(src), "r"(bytes), "r"(smem_addr(bar))
        : "memory");
}

__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
    asm volatile(
        "{\n"
        ".reg .pred done;\n"
        "WAIT_%=:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
        "@!done bra WAIT_%=;\n"
        "}\n" ::"r"(smem_addr(bar)),
        "r"(parity)
        : "memory");
}

__device__ __forceinline__ float dot8(const int4& a, const int4& b) {
    float fa[8], fb[8];
    bf16x8_to_f32(*reinterpret_cast<const Bf16x8*>(&a), fa);
    bf16x8_to_f32(*reinterpret_cast<const Bf16x8*>(&b), fb);
    float s = 0.0f;
#pragma unroll
    for (int e = 0; e < 8; ++e) s = fmaf(fa[e], fb[e], s);
    return s;
}

template <bool kSilu>
__device__ __forceinline__ void gemv_bulk(__nv_bfloat16* __restrict__ y,
                                          const __nv_bfloat16* __restrict__ x,
                                          const __nv_bfloat16* __restrict__ w, int n, int k,
                                          int rows_per_stage) {
    extern __shared__ __align__(128) unsigned char smem[];
    int4* stages = reinterpret_cast<int4*>(smem);  // kStages x kStageBytes
    int4* xs = reinterpret_cast<int4*>(smem + kStages * kStageBytes);  // k bf16
    uint64_t* bars = reinterpret_cast<uint64_t*>(smem + kStages * kStageBytes + k * 2);
    __shared__ float partial[2][kWarps];

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int R = rows_per_stage;
    const int k8 = k / 8;
    const int64_t row_bytes = (int64_t)k * 2;
    const int groups = (n + R - 1) / R;
    const int warps_per_row = kWarps / R;
    const int row_in_group = warp / warps_per_row;
    const int part = warp % warps_per_row;

    // Asks for group g's rows (the last group may be short) into stage s.
    auto request = [&](int g, int s) {
        const int rows = min(R, n - g * R);
        bulk_load(reinterpret_cast<unsigned char*>(stages) + (int64_t)s * kStageBytes,
                  reinterpret_cast<const unsigned char*>(w) + g * R * row_bytes,
                  (uint32_t)(rows * row_bytes), &bars[s]);
    };

    if (tid == 0) {
        for (int s = 0; s < kStages; ++s) mbar_init(&bars[s], 1);
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
    if (tid == 0) {
        for (int s = 0; s < kStages; ++s) {
            const int g = blockIdx.x + s * gridDim.x;
            if (g < groups) request(g, s);
        }
    }
    // Only now wait for the kernels that produce x.
    pdl_wait();
    pdl_launch_dependents();
    const int4* xg = reinterpret_cast<const int4*>(x);
    for (int c = tid; c < k8; c += kThreads) {
        if (!kSilu) {
            xs[c] = xg[c];
        } else {
            float g[8], u[8], a[8];
            const int4 gv = xg[c], uv = xg[k8 + c];
            bf16x8_to_f32(*reinterpret_cast<const Bf16x8*>(&gv), g);
            bf16x8_to_f32(*reinterpret_cast<const Bf16x8*>(&uv), u);
#pragma unroll
            for (int e = 0; e < 8; ++e) a[e] = g[e] / (1.0f + expf(-g[e])) * u[e];
            const Bf16x8 v = f32_to_bf16x8(a);
            xs[c] = *reinterpret_cast<const int4*>(&v);
        }
    }
    __syncthreads();

    for (int i = 0;; ++i) {
        const int g = blockIdx.x + i * gridDim.x;
        if (g >= groups) break;
        const int s = i % kStages;
        mbar_wait(&bars[s], (i / kStages) & 1);
        const int row = g * R + row_in_group;
        float acc = 0.0f;
        if (row < n) {
            const int4* wr = stages + (int64_t)s * (kStageBytes / 16) + (int64_t)row_in_group * k8;
            for (int c = part * 32 + lane; c < k8; c += warps_per_row * 32)
                acc += dot8(wr[c], xs[c]);
        }
        acc = warp_sum(acc);
        if (lane == 0) partial[i & 1][warp] = acc;
        // Every warp is done with stage s (and partial[i & 1] is complete): refill the stage.
        __syncthreads();
        if (tid == 0) {
            const int next = g + kStages * gridDim.x;
            if (next < groups) request(next, s);
        }
        if (part == 0 && lane == 0 && row < n) {
            float sum = 0.0f;
            for (int p = 0; p < warps_per_row; ++p) sum += partial[i & 1][warp + p];
            y[row] = __float2bfloat16(sum);
        }
    }
}

#endif  // __CUDA_ARCH__ >= 900

}  // namespace

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define RVLLM_GEMV_BULK_BODY(SILU) gemv_bulk<SILU>(y, x, w, n, k, rows_per_stage)
#else
#define RVLLM_GEMV_BULK_BODY(SILU) __trap()
#endif

extern "C" __global__ void __launch_bounds__(kThreads, 1)
    gemv_bulk_bf16_b1(__nv_bfloat16* __restrict__ y, const __nv_bfloat16* __restrict__ x,
                      const __nv_bfloat16* __restrict__ w, int n, int k, int rows_per_stage) {
    RVLLM_GEMV_BULK_BODY(false);
}

extern "C" __global__ void __launch_bounds__(kThreads, 1)
    gemv_bulk_silu_bf16_b1(__nv_bfloat16* __restrict__ y, const __nv_bfloat16* __restrict__ x,
                           const __nv_bfloat16* __restrict__ w, int n, int k,
                           int rows_per_stage) {
    RVLLM_GEMV_BULK_BODY(true);
}
