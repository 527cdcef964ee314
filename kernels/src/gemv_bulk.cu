// Batch-1 matrix-vector products for Hopper (sm_90+): y = W x with the weights streamed into
// shared memory by the bulk copy engine, and the small ops around a decoder's GEMVs fused in.
//
// Kernels (all extern "C", one signature):
//   gemv_bulk_<variant>_b1(y, x, w, n, k, rows_per_stage, norm_w, eps, evict_first)  4 stages
//   gemv_bulk_<variant>_s6_b1(...)                                           6 stages
//     w: bf16 [n, k] row-major; y: bf16 [n]; f32 accumulation. The variant says what x is and
//     what happens to y:
//       bf16           x [k];                         y = W x
//       silu_bf16      x = gate_up [2k], input silu(gate) * up (rounded to bf16 as
//                      silu_and_mul_bf16 stores it);   y = W silu(gate) * up
//       norm_bf16      x = residual [k], input rmsnorm(x) * norm_w (eps; rounded to bf16 as
//                      rms_norm_bf16 computes it);     y = W rmsnorm(x)
//       add_bf16       x [k];                         y = bf16(y + W x), the residual add
//                      (each row of y read and written by the block that owns it); the
//                      O projection after attention, so it also prefetches all its rows
//                      past the first stages into L2 before pdl_wait
//       silu_add_bf16  silu input and add output together.
//       gelu_bf16, gelu_add_bf16   as silu_bf16 and silu_add_bf16 with GeGLU's
//                      gelu_tanh(gate) * up (rounded as gelu_tanh_and_mul_bf16 stores it):
//                      Gemma's down projection. No E4M3 or `_s6` build.
//     norm_w / eps are read by the norm variant only. evict_first non-zero: the weights are
//     streamed with an L2 evict-first policy (each is read once a step; measured +1.1-1.3 %
//     batch-1 decode on an H200 over evict-normal streaming).
//   k a multiple of 8; rows_per_stage R in {1, 2, 4, 8} with R * k * 2 <= kStageBytes; the
//   pointers 16-byte aligned. Grid: at most one block per SM (the host takes min(groups, SMs)),
//   block 256, dynamic shared memory S * 32 KiB + 2k + 8 * (S + 1) bytes for S stages
//   (GemvBulk on the host; the engine runs 4 stages; the `_s6` build, a deeper pipeline that
//   covers the input prologue and the first loads' latency with more weight bytes in flight,
//   is launched only by gpu_kernels' reference test).
//   Measured on an H200 (batch-1 decode, Llama-3.1-8B): 4 compile-time stages 209.9 tok/s;
//   the stage count as a kernel argument, 198.0 at 4 and 193.9 at 3 (3 stages let two blocks
//   share an SM so consecutive GEMVs overlap, which did not pay).
//   On GPUs before sm_90 the kernels trap: the host uses gemv.cu there.
//   gemv_bulk_fp8_<variant>_b1(y, x, wq, w_scales, scale_kind, n, k, rows_per_stage, norm_w,
//                              eps, evict_first)                             4 stages
//   gemv_bulk_fp8_<variant>_s6_b1(...)                                      6 stages
//     the same five variants over E4M3 weights (`--quantization fp8` at batch 1; fp8_gemv.cu
//     takes 2 to 16 tokens): wq [n, k] codes, w_scales and scale_kind as fp8_gemv takes them
//     (0 per tensor, 1 per channel, 2 per 128 x 128 block), y rounded once as there. k a
//     multiple of 16 and at most 16,384; R the largest of {8, 4, 2, 1} with R * k <=
//     kStageBytes; dynamic shared memory S * 32 KiB + 2k + 8 * (S + 1) (GemvBulk::for_fp8_k;
//     the engine runs 4 stages, the `_s6` build is the kernel tests' comparison).
//
// Why: at batch 1 a decode step is a stream over every weight, so the GEMVs must run at the
// memory's bandwidth. A warp-per-row kernel keeps only a few loads in flight per thread and
// its short blocks spend much of their life starting and draining; on an H200 that left a
// quarter of the bandwidth unused. Here each block is persistent (one per SM) and keeps
// kStages groups of R whole rows (R * k * 2 contiguous bytes) in flight through
// cp.async.bulk, completing on an mbarrier per stage, while its 8 warps compute on the stage
// that has landed. The first stages are requested before pdl_wait: the weights depend on no
// earlier kernel, so their loads overlap the small kernels before the GEMV. Fusing the norm
// (input side) and the residual add (output side) removes both RMSNorm launches of a layer.
//
// What bounded it, measured on an H200 (batch-1 decode, one call, same machine): not the
// memory but each stage's compute. Every block took ~1 us a stage whatever the stage's bytes
// (the 28 KiB rows of the down projection as the 32 KiB of gate/up), and a fifth stage did
// not help. A thread multiplied its chunks one after another, each a shared-memory load and
// a chain of eight FMAs; loading a stage's chunks together and multiplying them apart
// (kDotBatch, the same order of additions) took decode from 233.6 to 242.2 tok/s. After that,
// the add variants' residual rows parked in shared memory (thread 0 had waited on the next
// row's residual before each refill) took it from 242.2 to 245.0; before it they had gained
// nothing. The norm weights fetched by the copy engine before pdl_wait (instead of by the
// threads after the block sum) took it from 230.7 to 233.6. Warps retiring stages through
// per-stage barriers without a block-wide one, with warp 0 refilling and summing, measured
// 218 (its refills came a stage later).
//
// The E4M3 build (issue 20: fp8_gemv, warp tiles streaming with __ldcs, reached ~2 TB/s on an
// H100) keeps the pipeline, the prologues and the epilogues, and changes the stage's compute,
// which bounded the bf16 kernel and has twice the weights a byte here. A CUDA-core dot
// product would cost ~3 instructions a weight (decode, widen to f32, FMA); instead the
// products run on the tensor cores (mma m16n8k16, f16 in, f32 accumulation) as in fp8_gemv:
// one cvt.rn.f16x2.e4m3x2 per two weights (exact) is the B operand as it comes, and four
// MMAs take a lane's 16-byte chunk. The input is A: rounded to f16 after scaling by a power
// of two that puts its largest magnitude in [2^14, 2^15) (exact for every value within 2^-28
// of it; the smaller ones lose bits below 2^-39 of it), the scale undone on the output. At one
// token A has one useful row, so the MMA's 8 columns are (row, segment) pairs of the stage
// (R rows x 8 / R segments of the row) and A's rows the segments' inputs: C's (s, s * R + r)
// are row r's partial products. A lane's A fragments are the same in every stage, so they are
// loaded once into registers (64 at most); a stage costs a lane one shared load, 8 cvt and 4
// MMAs per 16 weights. Block scales multiply each 64-column unit's partial (a unit lies in
// one 128-column tile, a stage's rows in one 128-row block).
#include <cuda_fp8.h>

#include "common.cuh"
#include "gated_act.cuh"

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kStageBytes = 32 * 1024;
// Rows of y an add variant's block parks in shared memory (1 KiB). A block owns
// ceil(ceil(n / R) / grid) * R rows: 32 for a 4,096-wide residual on 132 SMs.
constexpr int kMaxOwnedRows = 512;
constexpr int kOwnedPerThread = kMaxOwnedRows / kThreads;

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(count));
}

// Requests `bytes` from global `src` into shared `dst`; the stage's barrier completes when
// they have landed. `policy` non-zero: an L2 cache policy (evict_first_policy) for the lines.
__device__ __forceinline__ void bulk_load(void* dst, const void* src, uint32_t bytes,
                                          uint64_t* bar, uint64_t policy) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)),
                 "r"(bytes)
                 : "memory");
    if (policy != 0) {
        asm volatile(
            "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint"
            " [%0], [%1], %2, [%3], %4;" ::"r"(smem_addr(dst)),
            "l"(src), "r"(bytes), "r"(smem_addr(bar)), "l"(policy)
            : "memory");
    } else {
        asm volatile(
            "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, "
            "[%3];" ::"r"(smem_addr(dst)),
            "l"(src), "r"(bytes), "r"(smem_addr(bar))
            : "memory");
    }
}

// An L2 policy that evicts these lines before any other: weights are read once a step, and
// streaming 16 GB through L2 would otherwise push out what is reused within the step (the
// kernels' code, activations, the O projection's prefetched rows).
__device__ __forceinline__ uint64_t evict_first_policy() {
    uint64_t policy;
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
    return policy;
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
    elem8_to_f32(*reinterpret_cast<const Elem8*>(&a), fa);
    elem8_to_f32(*reinterpret_cast<const Elem8*>(&b), fb);
    float s = 0.0f;
#pragma unroll
    for (int e = 0; e < 8; ++e) s = fmaf(fa[e], fb[e], s);
    return s;
}

// kGelu: the gated input with GeGLU's activation (3, so that the trace tags of the other
// inputs keep their numbers).
enum Input { kPlain, kSilu, kNorm, kGelu };

// E4M3 weights (the FP8 build): fp8_gemv.cu's scale kinds.
enum ScaleKind { kPerTensor = 0, kPerChannel = 1, kBlock128 = 2 };
// The MMA's 8 weight columns, each (row r, segment s) of a stage: column s * R + r.
constexpr int kFp8Cols = 8;
// Columns of a row one MMA step covers: 4 lanes x 16 codes.
constexpr int kUnitCols = 64;
// Units a warp takes of each segment a stage: covers R * k <= 32 KiB at k <= kFp8MaxK.
constexpr int kMaxUnits = 8;
constexpr int kFp8MaxK = 16384;

// 16 E4M3 codes (a chunk of one weight row, as B of the MMA's column) times 16 input
// elements (f16 pairs, as A's row): c += A B over the chunk, in four m16n8k16 MMAs. Only A's
// row of this lane's group is given (rows g + 8 are zero). Codes 4j .. 4j + 3 are the MMA j's
// columns 2t, 2t + 1, 2t + 8, 2t + 9 (any order of a dot product's terms will do, as long as
// A takes the same one: xf's words 2j and 2j + 1).
__device__ __forceinline__ void fp8_mma_chunk(float (&c)[4], const uint32_t (&xf)[8],
                                              const uint4& codes16) {
    const uint32_t words[4] = {codes16.x, codes16.y, codes16.z, codes16.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const __half2_raw lo = __nv_cvt_fp8x2_to_halfraw2(
            (__nv_fp8x2_storage_t)(words[j] & 0xffffu), __NV_E4M3);
        const __half2_raw hi =
            __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(words[j] >> 16), __NV_E4M3);
        const uint32_t b0 = (uint32_t)lo.x | ((uint32_t)lo.y << 16);
        const uint32_t b1 = (uint32_t)hi.x | ((uint32_t)hi.y << 16);
        asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
            "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(xf[2 * j]), "r"(0u), "r"(xf[2 * j + 1]), "r"(0u), "r"(b0), "r"(b1));
    }
}

// Weight chunks (8 bf16) of a stage a thread multiplies at once.
constexpr int kDotBatch = 8;

// Input chunks (8 bf16) a thread loads before using any: their latencies overlap instead of
// adding up (the silu input of the down projection is 7 chunks a thread).
constexpr int kPrologueBatch = 8;

// WT: the weights' type, elem_t (the compute type) or unsigned char (E4M3 codes, with
// w_scales and scale_kind as fp8_gemv.cu takes them; the compute type ignores both).
template <typename WT, Input kIn, bool kAdd, int kStages>
__device__ __forceinline__ void gemv_bulk(elem_t* __restrict__ y,
                                          const elem_t* __restrict__ x,
                                          const WT* __restrict__ w, int n, int k,
                                          int rows_per_stage,
                                          const elem_t* __restrict__ norm_w, float eps,
                                          int evict_first, const float* __restrict__ w_scales,
                                          int scale_kind) {
    constexpr bool kFp8 = sizeof(WT) == 1;
    BlockTrace trace((kFp8 ? 24 : 16) + kIn * 2 + kAdd);
    extern __shared__ __align__(128) unsigned char smem[];
    int4* stage_buf = reinterpret_cast<int4*>(smem);  // kStages x kStageBytes
    int4* xs = reinterpret_cast<int4*>(smem + kStages * kStageBytes);  // k bf16
    uint64_t* bars = reinterpret_cast<uint64_t*>(smem + kStages * kStageBytes + k * 2);
    __shared__ float partial[2][kWarps * (kFp8 ? kFp8Cols : 1)];
    __shared__ float scratch[32];
    __shared__ unsigned short resid_s[kAdd ? kMaxOwnedRows : 1];  // bf16 bits

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int R = rows_per_stage;
    const int k8 = k / 8;
    const int64_t row_bytes = (int64_t)k * sizeof(WT);
    const int groups = (n + R - 1) / R;
    const int warps_per_row = kWarps / R;
    const int row_in_group = warp / warps_per_row;
    const int part = warp % warps_per_row;

    // Asks for group g's rows (the last group may be short) into stage s.
    const uint64_t policy = evict_first ? evict_first_policy() : 0;
    auto request = [&](int g, int s) {
        const int rows = min(R, n - g * R);
        bulk_load(reinterpret_cast<unsigned char*>(stage_buf) + (int64_t)s * kStageBytes,
                  reinterpret_cast<const unsigned char*>(w) + g * R * row_bytes,
                  (uint32_t)(rows * row_bytes), &bars[s], policy);
    };

    if (tid == 0) {
        for (int s = 0; s <= kStages; ++s) mbar_init(&bars[s], 1);
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
    if (tid == 0) {
        // The norm weights go into xs by the copy engine (xs is free until the prologue, which
        // overwrites each chunk with the normed input by the thread that reads it): they
        // depend on no kernel, so their latency passes before pdl_wait, and no thread holds
        // a register or a load slot for them.
        if (kIn == kNorm) bulk_load(xs, norm_w, (uint32_t)(k * 2), &bars[kStages], 0);
        for (int s = 0; s < kStages; ++s) {
            const int g = blockIdx.x + s * gridDim.x;
            if (g < groups) request(g, s);
        }
    }
    if (kAdd && kIn == kPlain) {
        // The O projection follows decode attention, a chain of small latency-bound kernels
        // that leaves the memory idle: the rest of this block's rows go to L2 meanwhile, so
        // the stages after the first ones refill from L2.
        for (int g = blockIdx.x + (kStages + tid) * gridDim.x; g < groups;
             g += kThreads * gridDim.x) {
            const int rows = min(R, n - g * R);
            asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(
                             reinterpret_cast<const unsigned char*>(w) + g * R * row_bytes),
                         "r"((uint32_t)(rows * row_bytes))
                         : "memory");
        }
    }
    // Only now wait for the kernels that produce x.
    pdl_wait();
    trace.mark_waited();
    pdl_launch_dependents();
    // The residual rows this block adds into (add variants): requested now, beside x, and
    // parked in shared memory. Loaded in the loop, a stage ahead, the next row's residual
    // held thread 0 before it issued each refill: the compiler put its first use right
    // after the stage's barrier, so every stage waited one loaded-L2 round trip.
    const int iters = blockIdx.x < groups ? (groups - blockIdx.x + gridDim.x - 1) / gridDim.x : 0;
    const int owned = kAdd ? min(iters * R, kMaxOwnedRows) : 0;
    unsigned short own[kOwnedPerThread];
    if (kAdd) {
        const unsigned short* yr = reinterpret_cast<const unsigned short*>(y);
#pragma unroll
        for (int j = 0; j < kOwnedPerThread; ++j) {
            const int t = tid + j * kThreads;
            const int row = (blockIdx.x + (t / R) * gridDim.x) * R + t % R;
            own[j] = t < owned && row < n ? yr[row] : 0;
        }
    }
    const int4* xg = reinterpret_cast<const int4*>(x);
    // Loads chunks c0, c0 + kThreads, ... (up to kPrologueBatch of them) of x (and, for silu,
    // of the up half) before any is used.
    auto load_batch = [&](int c0, int4(&a)[kPrologueBatch], int4(&b)[kPrologueBatch]) {
#pragma unroll
        for (int j = 0; j < kPrologueBatch; ++j) {
            const int c = c0 + j * kThreads;
            if (c < k8) {
                a[j] = xg[c];
                if (kIn == kSilu || kIn == kGelu) b[j] = xg[k8 + c];
            }
        }
    };
    constexpr int kSpan = kThreads * kPrologueBatch;
    if (kIn == kNorm) {
        // The chunks of each thread and the block sum are rms_norm_bf16's, so the normed
        // input is the one that kernel would have stored. One batch covers k <= 16384, so the
        // inputs stay in registers between the sum and the scaling.
        int4 xv[kPrologueBatch], unused[kPrologueBatch];
        float ss = 0.0f;
        for (int c0 = tid; c0 < k8; c0 += kSpan) {
            load_batch(c0, xv, unused);
#pragma unroll
            for (int j = 0; j < kPrologueBatch; ++j) {
                if (c0 + j * kThreads >= k8) break;
                float v[8];
                elem8_to_f32(*reinterpret_cast<const Elem8*>(&xv[j]), v);
#pragma unroll
                for (int e = 0; e < 8; ++e) ss += v[e] * v[e];
            }
        }
        ss = block_sum(ss, scratch);
        const float inv = rsqrtf(ss / (float)k + eps);
        mbar_wait(&bars[kStages], 0);  // the norm weights, in xs
        for (int c0 = tid; c0 < k8; c0 += kSpan) {
            if (k8 > kSpan) load_batch(c0, xv, unused);  // else still in registers
            int4 wv[kPrologueBatch];
#pragma unroll
            for (int j = 0; j < kPrologueBatch; ++j)
                if (c0 + j * kThreads < k8) wv[j] = xs[c0 + j * kThreads];
#pragma unroll
            for (int j = 0; j < kPrologueBatch; ++j) {
                const int c = c0 + j * kThreads;
                if (c >= k8) break;
                float v[8], wf[8], r[8];
                elem8_to_f32(*reinterpret_cast<const Elem8*>(&xv[j]), v);
                elem8_to_f32(*reinterpret_cast<const Elem8*>(&wv[j]), wf);
#pragma unroll
                for (int e = 0; e < 8; ++e) r[e] = v[e] * inv * wf[e];
                const Elem8 o = f32_to_elem8(r);
                xs[c] = *reinterpret_cast<const int4*>(&o);
            }
        }
    } else {
        for (int c0 = tid; c0 < k8; c0 += kSpan) {
            int4 a[kPrologueBatch], b[kPrologueBatch];
            load_batch(c0, a, b);
#pragma unroll
            for (int j = 0; j < kPrologueBatch; ++j) {
                const int c = c0 + j * kThreads;
                if (c >= k8) break;
                if (kIn == kPlain) {
                    xs[c] = a[j];
                } else {
                    constexpr int kAct = kIn == kGelu ? kActGeluTanh : kActSilu;
                    const Elem8 v = gated_act8<kAct>(*reinterpret_cast<const Elem8*>(&a[j]),
                                                     *reinterpret_cast<const Elem8*>(&b[j]));
                    xs[c] = *reinterpret_cast<const int4*>(&v);
                }
            }
        }
    }
    if (kAdd) {
#pragma unroll
        for (int j = 0; j < kOwnedPerThread; ++j)
            if (tid + j * kThreads < owned) resid_s[tid + j * kThreads] = own[j];
    }
    __syncthreads();

    if constexpr (kFp8) {
        // The input as the MMA's A operand in f16, scaled by 2^xshift so that its largest
        // magnitude lies in [2^14, 2^15): every bf16 value within 2^-28 of it is then exact
        // in f16 (smaller ones lose bits below 2^-39 of the largest), and E4M3 codes decode
        // to f16 exactly, one instruction a pair, with f32 accumulation in the MMA. Each
        // lane's fragments are the same every stage (the same columns of other rows), so they
        // are loaded once into registers.
        float amax = 0.0f;
        for (int c = tid; c < k8; c += kThreads) {
            float v[8];
            elem8_to_f32(*reinterpret_cast<const Elem8*>(&xs[c]), v);
#pragma unroll
            for (int e = 0; e < 8; ++e) amax = fmaxf(amax, fabsf(v[e]));
        }
        amax = block_max(amax, scratch);
        int ex = 0;
        frexpf(amax, &ex);
        // Powers of two both ways kept normal floats (an input's largest magnitude below
        // 2^-111 is scaled less than it could be).
        const int xshift = amax > 0.0f && amax <= 3.0e38f ? max(-126, min(126, 15 - ex)) : 0;
        const float xscale = __int_as_float((127 + xshift) << 23);
        const float unscale = __int_as_float((127 - xshift) << 23);
        // xs becomes the scaled f16 input in place, each chunk by the thread that read it for
        // the maximum; the lanes then load their fragments as they are (up to 8 lanes of a
        // warp would otherwise convert the same elements).
        for (int c = tid; c < k8; c += kThreads) {
            float v[8];
            elem8_to_f32(*reinterpret_cast<const Elem8*>(&xs[c]), v);
            __half2 h[4];
#pragma unroll
            for (int p = 0; p < 4; ++p)
                h[p] = __floats2half2_rn(v[2 * p] * xscale, v[2 * p + 1] * xscale);
            xs[c] = *reinterpret_cast<const int4*>(h);
        }
        __syncthreads();
        // A stage's R rows are split into segs = 8 / R segments of seg_units units (64
        // columns) each, so that the MMA's 8 columns are (row, segment) pairs: A's row m holds
        // the input of segment m, and C's element (m, column s * R + r) is row r's product over
        // segment s where m = s. Warp w takes units w, w + 8, ... of every segment.
        const int segs = kFp8Cols / R;
        const int units = (k + kUnitCols - 1) / kUnitCols;
        const int seg_units = (units + segs - 1) / segs;
        const int gq = lane >> 2, tq = lane & 3;
        const int b_row = gq % R, b_seg = gq / R;  // this lane's B column
        uint32_t xf[kMaxUnits][8];
#pragma unroll
        for (int u = 0; u < kMaxUnits; ++u) {
            const int l = warp + u * kWarps;
            const int col = (gq * seg_units + l) * kUnitCols + tq * 16;
            const bool valid = gq < segs && l < seg_units && col < k;
            const int4 zero = make_int4(0, 0, 0, 0);
            const int4 a = valid ? xs[col / 8] : zero, b = valid ? xs[col / 8 + 1] : zero;
            const uint32_t words[8] = {(uint32_t)a.x, (uint32_t)a.y, (uint32_t)a.z, (uint32_t)a.w,
                                       (uint32_t)b.x, (uint32_t)b.y, (uint32_t)b.z, (uint32_t)b.w};
#pragma unroll
            for (int p = 0; p < 8; ++p) xf[u][p] = words[p];
        }
        const bool block_scaled = scale_kind == kBlock128;
        const int tiles = (k + 127) / 128;
        for (int i = 0;; ++i) {
            const int g = blockIdx.x + i * gridDim.x;
            if (g >= groups) break;
            const int s = i % kStages;
            // Block scales of the units of this lane's A segment (its useful C elements):
            // the group's R rows lie in one 128-row block, a unit in one 128-column tile.
            float sc[kMaxUnits];
            if (block_scaled) {
                const float* ts = w_scales + (int64_t)(g * R / 128) * tiles;
#pragma unroll
                for (int u = 0; u < kMaxUnits; ++u) {
                    const int unit = gq * seg_units + warp + u * kWarps;
                    sc[u] = gq < segs && warp + u * kWarps < seg_units && unit < units
                                ? ts[unit * kUnitCols / 128]
                                : 0.0f;
                }
            }
            // The row's per-tensor or per-channel scale, requested before the wait so that
            // warp 0's reduction does not wait on a global load each stage.
            const int out_row = g * R + lane;
            float row_scale = 1.0f;
            if (warp == 0 && lane < R && out_row < n) {
                if (scale_kind == kPerTensor) row_scale = w_scales[0];
                if (scale_kind == kPerChannel) row_scale = w_scales[out_row];
            }
            mbar_wait(&bars[s], (i / kStages) & 1);
            trace.mark_first();
            // All of the stage's chunks loaded before any is used (kDotBatch's reason).
            const unsigned char* st = reinterpret_cast<const unsigned char*>(stage_buf) +
                                      (int64_t)s * kStageBytes + (int64_t)b_row * k;
            uint4 wv[kMaxUnits];
#pragma unroll
            for (int u = 0; u < kMaxUnits; ++u) {
                const int l = warp + u * kWarps;
                const int col = (b_seg * seg_units + l) * kUnitCols + tq * 16;
                wv[u] = l < seg_units && col < k ? *reinterpret_cast<const uint4*>(st + col)
                                                 : make_uint4(0u, 0u, 0u, 0u);
            }
            // Even and odd units into two accumulators: half the chain of dependent MMAs.
            float c[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
#pragma unroll
            for (int u = 0; u < kMaxUnits; ++u) {
                if (warp + u * kWarps >= seg_units) break;
                if (block_scaled) {
                    float p[4] = {0.0f, 0.0f, 0.0f, 0.0f};
                    fp8_mma_chunk(p, xf[u], wv[u]);
                    c[u & 1][0] = fmaf(p[0], sc[u], c[u & 1][0]);
                    c[u & 1][1] = fmaf(p[1], sc[u], c[u & 1][1]);
                } else {
                    fp8_mma_chunk(c[u & 1], xf[u], wv[u]);
                }
            }
            // C's elements (gq, 2tq) and (gq, 2tq + 1): a (row, segment) product where the
            // column's segment is gq; each column has one such lane.
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int col = 2 * tq + e;
                if (col / R == gq) partial[i & 1][warp * kFp8Cols + col] = c[0][e] + c[1][e];
            }
            // Every warp is done with stage s: refill it.
            __syncthreads();
            if (tid == 0) {
                const int next = g + kStages * gridDim.x;
                if (next < groups) request(next, s);
            }
            if (warp == 0) {
                // Lane j < 8 adds column j over the warps, then the segments of a row are
                // added across lanes (columns s * R + r): lane r < R holds row r.
                float v = 0.0f;
                if (lane < kFp8Cols) {
#pragma unroll
                    for (int p = 0; p < kWarps; ++p) v += partial[i & 1][p * kFp8Cols + lane];
                }
                for (int off = R; off < kFp8Cols; off <<= 1)
                    v += __shfl_xor_sync(0xffffffffu, v, off);
                if (lane < R && out_row < n) {
                    v = v * row_scale * unscale;
                    if (kAdd) {
                        const int t = i * R + lane;
                        v += to_f32(t < kMaxOwnedRows ? elem_from_bits(resid_s[t]) : y[out_row]);
                    }
                    y[out_row] = from_f32(v);
                }
            }
        }
    } else {
        for (int i = 0;; ++i) {
            const int g = blockIdx.x + i * gridDim.x;
            if (g >= groups) break;
            const int s = i % kStages;
            mbar_wait(&bars[s], (i / kStages) & 1);
            trace.mark_first();
            const int row = g * R + row_in_group;
            const bool owner = part == 0 && lane == 0 && row < n;
            float acc = 0.0f;
            if (row < n) {
                // kDotBatch chunks' loads issued together and their dot products computed apart,
                // then added in chunk order (the sum of one chunk after another, as before): one
                // chunk at a time left each warp waiting on a shared-memory load and a chain of
                // eight FMAs per chunk.
                const int4* wr = stage_buf + (int64_t)s * (kStageBytes / 16) + (int64_t)row_in_group * k8;
                const int step = warps_per_row * 32;
                for (int c0 = part * 32 + lane; c0 < k8; c0 += kDotBatch * step) {
                    // Past the row's end a chunk is read again (clamped, no branch that would
                    // keep the loads apart) and its product dropped.
                    int4 wv[kDotBatch], xv[kDotBatch];
    #pragma unroll
                    for (int j = 0; j < kDotBatch; ++j) {
                        const int c = min(c0 + j * step, k8 - 1);
                        wv[j] = wr[c];
                        xv[j] = xs[c];
                    }
                    float d[kDotBatch];
    #pragma unroll
                    for (int j = 0; j < kDotBatch; ++j) d[j] = dot8(wv[j], xv[j]);
    #pragma unroll
                    for (int j = 0; j < kDotBatch; ++j)
                        if (c0 + j * step < k8) acc += d[j];
                }
            }
            acc = warp_sum(acc);
            if (lane == 0) partial[i & 1][warp] = acc;
            // Every warp is done with stage s (and partial[i & 1] is complete): refill the stage.
            __syncthreads();
            if (tid == 0) {
                const int next = g + kStages * gridDim.x;
                if (next < groups) request(next, s);
            }
            if (owner) {
                float sum = 0.0f;
                for (int p = 0; p < warps_per_row; ++p) sum += partial[i & 1][warp + p];
                // The residual add rounds once, as cuBLAS accumulating into y (beta = 1) does.
                // Only this block writes these rows; it parked the first kMaxOwnedRows of them
                // (a block owns more only on a grid far smaller than the SMs).
                if (kAdd) {
                    const int t = i * R + row_in_group;
                    sum += to_f32(t < kMaxOwnedRows ? elem_from_bits(resid_s[t])
                                                              : y[row]);
                }
                y[row] = from_f32(sum);
            }
        }
    }
}

#endif  // __CUDA_ARCH__ >= 900

}  // namespace

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define RVLLM_GEMV_BULK_BODY(IN, ADD, STAGES)                                                 \
    gemv_bulk<elem_t, IN, ADD, STAGES>(y, x, w, n, k, rows_per_stage, norm_w, eps, evict_first, \
                                       nullptr, 0)
// A geometry the layout does not cover (the host never asks) leaves y alone.
#define RVLLM_GEMV_BULK_FP8_BODY(IN, ADD, STAGES)                                              \
    if ((k & 15) != 0 || k > kFp8MaxK || rows_per_stage < 1 || kFp8Cols % rows_per_stage != 0 || \
        rows_per_stage * k > kStageBytes) {                                                    \
        pdl_enter();                                                                           \
        return;                                                                                \
    }                                                                                          \
    gemv_bulk<unsigned char, IN, ADD, STAGES>(y, x, wq, n, k, rows_per_stage, norm_w, eps,     \
                                              evict_first, w_scales, scale_kind)
#else
#define RVLLM_GEMV_BULK_BODY(IN, ADD, STAGES) __trap()
#define RVLLM_GEMV_BULK_FP8_BODY(IN, ADD, STAGES) __trap()
#endif

#define RVLLM_GEMV_BULK(BF16_NAME, F16_NAME, IN, ADD, STAGES)                                \
    extern "C" __global__ void __launch_bounds__(kThreads, 1)                                  \
        DT(gemv_bulk_##BF16_NAME##_b1, gemv_bulk_##F16_NAME##_b1)(                             \
            elem_t* __restrict__ y, const elem_t* __restrict__ x, const elem_t* __restrict__ w, \
            int n, int k, int rows_per_stage, const elem_t* __restrict__ norm_w, float eps,    \
            int evict_first) {                                                                 \
        RVLLM_GEMV_BULK_BODY(IN, ADD, STAGES);                                                 \
    }

RVLLM_GEMV_BULK(bf16, f16, kPlain, false, 4)
RVLLM_GEMV_BULK(silu_bf16, silu_f16, kSilu, false, 4)
RVLLM_GEMV_BULK(norm_bf16, norm_f16, kNorm, false, 4)
RVLLM_GEMV_BULK(add_bf16, add_f16, kPlain, true, 4)
RVLLM_GEMV_BULK(silu_add_bf16, silu_add_f16, kSilu, true, 4)
RVLLM_GEMV_BULK(bf16_s6, f16_s6, kPlain, false, 6)
RVLLM_GEMV_BULK(silu_bf16_s6, silu_f16_s6, kSilu, false, 6)
RVLLM_GEMV_BULK(norm_bf16_s6, norm_f16_s6, kNorm, false, 6)
RVLLM_GEMV_BULK(add_bf16_s6, add_f16_s6, kPlain, true, 6)
RVLLM_GEMV_BULK(silu_add_bf16_s6, silu_add_f16_s6, kSilu, true, 6)
RVLLM_GEMV_BULK(gelu_bf16, gelu_f16, kGelu, false, 4)
RVLLM_GEMV_BULK(gelu_add_bf16, gelu_add_f16, kGelu, true, 4)

// E4M3 weights (`--quantization fp8` at batch 1): gemv_bulk_fp8_<variant>_b1 (4 stages, the
// engine's) and gemv_bulk_fp8_<variant>_s6_b1 (6 stages, the kernel tests' comparison).
#define RVLLM_GEMV_BULK_FP8(BF16_NAME, F16_NAME, IN, ADD, STAGES)                              \
    extern "C" __global__ void __launch_bounds__(kThreads, 1)                                  \
        DT(gemv_bulk_fp8_##BF16_NAME##_b1, gemv_bulk_fp8_##F16_NAME##_b1)(                     \
            elem_t* __restrict__ y, const elem_t* __restrict__ x,                              \
            const unsigned char* __restrict__ wq, const float* __restrict__ w_scales,          \
            int scale_kind, int n, int k, int rows_per_stage,                                  \
            const elem_t* __restrict__ norm_w, float eps, int evict_first) {                   \
        RVLLM_GEMV_BULK_FP8_BODY(IN, ADD, STAGES);                                             \
    }

RVLLM_GEMV_BULK_FP8(bf16, f16, kPlain, false, 4)
RVLLM_GEMV_BULK_FP8(silu_bf16, silu_f16, kSilu, false, 4)
RVLLM_GEMV_BULK_FP8(norm_bf16, norm_f16, kNorm, false, 4)
RVLLM_GEMV_BULK_FP8(add_bf16, add_f16, kPlain, true, 4)
RVLLM_GEMV_BULK_FP8(silu_add_bf16, silu_add_f16, kSilu, true, 4)
RVLLM_GEMV_BULK_FP8(bf16_s6, f16_s6, kPlain, false, 6)
RVLLM_GEMV_BULK_FP8(silu_bf16_s6, silu_f16_s6, kSilu, false, 6)
RVLLM_GEMV_BULK_FP8(norm_bf16_s6, norm_f16_s6, kNorm, false, 6)
RVLLM_GEMV_BULK_FP8(add_bf16_s6, add_f16_s6, kPlain, true, 6)
RVLLM_GEMV_BULK_FP8(silu_add_bf16_s6, silu_add_f16_s6, kSilu, true, 6)
