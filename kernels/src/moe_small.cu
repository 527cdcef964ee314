// The small-batch decode path of the mixture-of-experts layer (issue 19): up to
// kMoeSmallMaxTokens tokens in two launches after the router GEMM, where moe.cu's path takes six
// (routing, align, gather, two grouped GEMMs, un-permute). At batch 1 of Qwen3-30B-A3B that
// chain of short kernels took half of the layer's 91 us; the weights of the 8 selected experts
// (75 MB) take ~25 us at the H100's bandwidth.
//
//   moe_small_gate_up_bf16(act, topk_ids, topk_weights, x, logits, w, w_down, tokens, experts,
//                          top_k, renormalize, inter, hidden)
//       Every block routes every token from the router logits [T, E] (moe_route_token, the
//       routing of moe_topk_softmax: same ids, same weights), block (0, 0) stores them
//       (topk_ids int [T, k], topk_weights f32 [T, k], for moe_small_down), and block (x, y)
//       takes the y-th distinct selected expert (ascending; blocks past the last return) and its
//       8 columns 8x..8x+7: act[p, j] = silu(x[t] . gate_j) * (x[t] . up_j) in f32 (silu_and_mul's
//       expf formula), one rounding, for each pair p = t * k + slot that chose the expert.
//       w [E, 2I, H] (gate rows, then up rows), act [T * k, I] in pair order (no sort).
//       grid (up to ceil(I / 8), min(E, T * k)), block 256: a narrower grid's blocks take
//       columns 8 gridDim.x apart, in turn.
//       w_down non-null: the down projection [E, H, I]; each block first asks L2 (sm_90's bulk
//       prefetch) for its share of its expert's down rows, so that moe_small_down after it
//       reads them from L2 while this kernel streams from memory (null: no prefetch).
//   moe_small_down_bf16(out, act, w, topk_ids, topk_weights, tokens, experts, top_k, hidden,
//                       inter, accumulate)
//       out[t, c] = sum over the token's picks p of topk_weights[p] * (act[p] . w[e_p, c]) in f32
//       (the weighted sum of moe_unpermute without rounding each expert's row first), one
//       rounding; accumulate != 0: out[t, c] += that sum (in f32, one rounding), the decoder's
//       residual add fused (out is then the residual stream). w [E, H, I]; out [T, H]. grid (up to ceil(H / 8)), block 256 (columns 8
//       gridDim.x apart, in turn, as above).
//   Both: T <= kMoeSmallMaxTokens, E <= 1024, top_k <= 32, H and I multiples of 8 (16-byte
//   rows); anything else returns at once (the host checks first: moe_small_fits).
//
// Why this shape: expert ids stay on the device (a CUDA graph holds every step), and a block
// knows its expert only after routing, so the weight stream cannot start before the logits
// are in; routing inside the gate/up kernel (a warp a token, each block on its own: 8 tokens
// of 128 logits is a few hundred cycles) costs that dependency once instead of a launch and
// two more (align, gather). Each warp owns one output column: at gate/up its gate and up rows,
// whole rows of 16-byte evict-first loads (__ldcs), kUnroll chunks of each in flight a lane
// (64 KiB a block at H 2,048), reused for every token that chose the expert (x comes through
// L1); at down one row of each distinct expert, the chunks of several experts in flight
// together, so each output element is its token's whole weighted sum and no combine launch
// is needed. A token that shares an expert with another is streamed once for both.
#include "common.cuh"
#include "moe_topk.cuh"

namespace {

constexpr int kMoeSmallMaxTokens = 8;
constexpr int kMaxPairs = kMoeSmallMaxTokens * 32;  // top_k <= 32
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
static_assert(kMaxPairs <= kThreads, "distinct_experts takes one pair a thread");
// 16-byte weight chunks a lane loads before it multiplies any (per row at gate/up, of two).
constexpr int kUnroll = 8;

__device__ __forceinline__ float dot8(const int4& a, const int4& b) {
    float fa[8], fb[8];
    elem8_to_f32(*reinterpret_cast<const Elem8*>(&a), fa);
    elem8_to_f32(*reinterpret_cast<const Elem8*>(&b), fb);
    float s = 0.0f;
#pragma unroll
    for (int e = 0; e < 8; ++e) s = fmaf(fa[e], fb[e], s);
    return s;
}

__device__ __forceinline__ bool small_shape_ok(int tokens, int experts, int top_k, int hidden,
                                               int inter) {
    return tokens >= 1 && tokens <= kMoeSmallMaxTokens && experts >= 1 &&
           experts <= kMoeMaxExperts && top_k >= 1 && top_k <= 32 && top_k <= experts &&
           hidden % 8 == 0 && inter % 8 == 0 && hidden > 0 && inter > 0 &&
           blockDim.x == kThreads;
}

// The distinct experts of ids[0..pairs) (shared memory, written before the call), ascending,
// into uniq; returns how many. `first` is shared scratch of kMaxPairs. Every thread calls it.
__device__ __forceinline__ int distinct_experts(const int* ids, int pairs, int* first, int* uniq) {
    const int p = threadIdx.x;
    bool is_first = false;
    int id = -1;
    if (p < pairs) {
        id = ids[p];
        is_first = true;
        for (int q = 0; q < p; ++q) is_first &= ids[q] != id;
        first[p] = is_first;
    }
    const int count = __syncthreads_count(is_first);
    if (is_first) {
        int rank = 0;
        for (int q = 0; q < pairs; ++q) rank += first[q] && ids[q] < id;
        uniq[rank] = id;
    }
    __syncthreads();
    return count;
}

// Asks L2 for this block's share (blockIdx.x of gridDim.x) of `bytes` at `p` (16-byte aligned,
// a multiple of 16), 16 KiB a lane of the calling warp at a time (Hopper's bulk prefetch;
// nothing before sm_90).
__device__ __forceinline__ void prefetch_l2_share(const void* p, int64_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    constexpr int64_t kPiece = 16 * 1024;
    const int64_t pieces = (bytes + kPiece - 1) / kPiece;
    const int64_t lo = pieces * blockIdx.x / gridDim.x, hi = pieces * (blockIdx.x + 1) / gridDim.x;
    for (int64_t i = lo + threadIdx.x % 32; i < hi; i += 32) {
        const int64_t n = min(kPiece, bytes - i * kPiece);
        asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(
                         reinterpret_cast<const unsigned char*>(p) + i * kPiece),
                     "r"((uint32_t)n));
    }
#endif
}

// act[pt[t], c] for the tokens t with a pair (pt[t] >= 0) with expert e: one warp, gate and up
// rows c of the expert streamed once for all of them.
__device__ __forceinline__ void gate_up_column(elem_t* __restrict__ act,
                                               const elem_t* __restrict__ x,
                                               const elem_t* __restrict__ w,
                                               const int (&pt)[kMoeSmallMaxTokens], int e, int c,
                                               int inter, int hidden) {
    const int lane = threadIdx.x % 32, k8 = hidden / 8;
    const int4* xv = reinterpret_cast<const int4*>(x);
    const int4* gate = reinterpret_cast<const int4*>(w + ((int64_t)e * 2 * inter + c) * hidden);
    const int4* up = gate + (int64_t)inter * k8;
    float ag[kMoeSmallMaxTokens], au[kMoeSmallMaxTokens];
#pragma unroll
    for (int t = 0; t < kMoeSmallMaxTokens; ++t) ag[t] = au[t] = 0.0f;
    for (int base = lane; base < k8; base += 32 * kUnroll) {
        int4 gv[kUnroll], uv[kUnroll];
#pragma unroll
        for (int i = 0; i < kUnroll; ++i) {
            const int idx = base + 32 * i;
            const bool in = idx < k8;
            gv[i] = in ? __ldcs(gate + idx) : make_int4(0, 0, 0, 0);
            uv[i] = in ? __ldcs(up + idx) : make_int4(0, 0, 0, 0);
        }
#pragma unroll
        for (int i = 0; i < kUnroll; ++i) {
            const int idx = base + 32 * i;
            if (idx >= k8) break;
#pragma unroll
            for (int t = 0; t < kMoeSmallMaxTokens; ++t) {
                if (pt[t] < 0) continue;
                const int4 xc = __ldg(xv + (int64_t)t * k8 + idx);
                ag[t] += dot8(gv[i], xc);
                au[t] += dot8(uv[i], xc);
            }
        }
    }
#pragma unroll
    for (int t = 0; t < kMoeSmallMaxTokens; ++t) {
        if (pt[t] < 0) continue;
        const float g = warp_sum(ag[t]), u = warp_sum(au[t]);
        // expf, as silu_and_mul (activation.cu) computes it.
        if (lane == 0) act[(int64_t)pt[t] * inter + c] = from_f32(g / (1.0f + expf(-g)) * u);
    }
}

// out[t, c] for every token t: one warp, row c of each distinct expert uniq[u] streamed once,
// several experts' chunks in flight together; use_pair[u][t] is token t's pair with expert u
// (-1: none) and use_weight[u][t] its routing weight.
__device__ __forceinline__ void down_column(elem_t* __restrict__ out,
                                            const elem_t* __restrict__ act,
                                            const elem_t* __restrict__ w, const int* uniq,
                                            const int (*use_pair)[kMoeSmallMaxTokens],
                                            const float (*use_weight)[kMoeSmallMaxTokens],
                                            int distinct, int tokens, int c, int hidden,
                                            int inter, int accumulate) {
    const int lane = threadIdx.x % 32, k8 = inter / 8;
    const int per_row = (k8 + 31) / 32;  // chunks of a row a lane
    const int items = distinct * per_row;
    const int4* wv = reinterpret_cast<const int4*>(w);
    const int4* av = reinterpret_cast<const int4*>(act);
    float acc[kMoeSmallMaxTokens];
#pragma unroll
    for (int t = 0; t < kMoeSmallMaxTokens; ++t) acc[t] = 0.0f;
    // Item q: chunk lane + 32 (q % per_row) of row c of the (q / per_row)-th distinct expert;
    // kUnroll of them in flight, across experts.
    for (int q0 = 0; q0 < items; q0 += kUnroll) {
        int4 wc[kUnroll];
#pragma unroll
        for (int i = 0; i < kUnroll; ++i) {
            const int q = q0 + i, u = q / per_row, idx = lane + 32 * (q % per_row);
            wc[i] = q < items && idx < k8
                        ? __ldcs(wv + ((int64_t)uniq[u] * hidden + c) * k8 + idx)
                        : make_int4(0, 0, 0, 0);
        }
#pragma unroll
        for (int i = 0; i < kUnroll; ++i) {
            const int q = q0 + i, u = q / per_row, idx = lane + 32 * (q % per_row);
            if (q >= items) break;
            if (idx >= k8) continue;
#pragma unroll
            for (int t = 0; t < kMoeSmallMaxTokens; ++t) {
                if (t >= tokens) break;
                const int p = use_pair[u][t];
                if (p < 0) continue;
                acc[t] += use_weight[u][t] * dot8(wc[i], __ldg(av + (int64_t)p * k8 + idx));
            }
        }
    }
#pragma unroll
    for (int t = 0; t < kMoeSmallMaxTokens; ++t) {
        if (t >= tokens) break;
        const float s = warp_sum(acc[t]);
        elem_t* o = out + (int64_t)t * hidden + c;
        if (lane == 0) *o = from_f32(accumulate ? to_f32(*o) + s : s);
    }
}

}  // namespace

extern "C" __global__ void __launch_bounds__(kThreads)
    DT(moe_small_gate_up_bf16, moe_small_gate_up_f16)(
    elem_t* __restrict__ act, int* __restrict__ topk_ids, float* __restrict__ topk_weights,
    const elem_t* __restrict__ x, const elem_t* __restrict__ logits,
    const elem_t* __restrict__ w, const elem_t* __restrict__ w_down, int tokens, int experts,
    int top_k, int renormalize, int inter, int hidden) {
    pdl_enter();
    __shared__ int ids[kMaxPairs], first[kMaxPairs], uniq[kMaxPairs];
    __shared__ float weights[kMaxPairs];
    __shared__ int pair_of[kMoeSmallMaxTokens];  // the token's pair with this block's expert
    if (!small_shape_ok(tokens, experts, top_k, hidden, inter)) return;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int pairs = tokens * top_k;
    for (int t = warp; t < tokens; t += kWarps) {
        int id, rank;
        float wt;
        moe_route_token(logits + (int64_t)t * experts, experts, top_k, renormalize, id, wt,
                        rank);
        if (lane < top_k) {
            ids[t * top_k + rank] = id;
            weights[t * top_k + rank] = wt;
        }
    }
    __syncthreads();
    if (blockIdx.x == 0 && blockIdx.y == 0 && tid < pairs) {
        topk_ids[tid] = ids[tid];
        topk_weights[tid] = weights[tid];
    }
    const int distinct = distinct_experts(ids, pairs, first, uniq);
    if ((int)blockIdx.y >= distinct) return;  // the whole block: fewer experts than pairs
    const int e = uniq[blockIdx.y];
    if (tid < tokens) {
        int p = -1;
        for (int j = 0; j < top_k; ++j) p = ids[tid * top_k + j] == e ? tid * top_k + j : p;
        pair_of[tid] = p;
    }
    __syncthreads();
    int pt[kMoeSmallMaxTokens];
#pragma unroll
    for (int t = 0; t < kMoeSmallMaxTokens; ++t) pt[t] = t < tokens ? pair_of[t] : -1;
    if (w_down != nullptr && warp == 0) {
        prefetch_l2_share(w_down + (int64_t)e * hidden * inter, (int64_t)hidden * inter * 2);
    }

    // Column c of this warp, then c + 8 * gridDim.x, ... (the grid may be narrower than I / 8).
    for (int c = blockIdx.x * kWarps + warp; c < inter; c += gridDim.x * kWarps) {
        gate_up_column(act, x, w, pt, e, c, inter, hidden);
    }
}

extern "C" __global__ void __launch_bounds__(kThreads)
    DT(moe_small_down_bf16, moe_small_down_f16)(
    elem_t* __restrict__ out, const elem_t* __restrict__ act, const elem_t* __restrict__ w,
    const int* __restrict__ topk_ids, const float* __restrict__ topk_weights, int tokens,
    int experts, int top_k, int hidden, int inter, int accumulate) {
    pdl_enter();
    __shared__ int ids[kMaxPairs], first[kMaxPairs], uniq[kMaxPairs];
    // Per distinct expert and token: the token's pair with that expert (-1: none), its weight.
    __shared__ int use_pair[kMaxPairs][kMoeSmallMaxTokens];
    __shared__ float use_weight[kMaxPairs][kMoeSmallMaxTokens];
    if (!small_shape_ok(tokens, experts, top_k, hidden, inter)) return;
    const int tid = threadIdx.x, warp = tid / 32;
    const int pairs = tokens * top_k;
    if (tid < pairs) ids[tid] = topk_ids[tid];
    __syncthreads();
    const int distinct = distinct_experts(ids, pairs, first, uniq);
    for (int i = tid; i < distinct * tokens; i += kThreads) {
        const int u = i / tokens, t = i % tokens, e = uniq[u];
        int p = -1;
        for (int j = 0; j < top_k; ++j) p = ids[t * top_k + j] == e ? t * top_k + j : p;
        use_pair[u][t] = p;
        use_weight[u][t] = p >= 0 ? topk_weights[p] : 0.0f;
    }
    __syncthreads();
    // Output column c of this warp, then c + 8 * gridDim.x, ...
    for (int c = blockIdx.x * kWarps + warp; c < hidden; c += gridDim.x * kWarps) {
        down_column(out, act, w, uniq, use_pair, use_weight, distinct, tokens, c, hidden, inter,
                    accumulate);
    }
}
