// The fused mixture-of-experts path (issue 19), in the shape vLLM and SGLang run it, with every
// size on the device so that a step fits a CUDA graph (the routing never crosses to the host):
//
//   router logits [T, E] (a GEMM) -> moe_topk_softmax -> moe_align (pairs sorted by expert)
//   -> moe_gather (each pair's input row) -> moe_grouped_gemm (gate/up, [2I, H] per expert)
//   -> silu_and_mul (activation.cu, over P = T * top_k rows) -> moe_grouped_gemm (down)
//   -> moe_unpermute (each token's expert rows, weighted, summed).
//
// Up to 8 tokens (decode) take moe_small.cu's two launches instead; both route with
// moe_topk.cuh's moe_route_token.
//
// The CPU reference of every kernel is `rvllm_kernels::reference` (reference_moe.rs); the
// engine's CPU backend (backend/cpu/moe.rs) computes the same function. The grouped GEMM
// (moe_gemm.cu) reads each expert's rows from the offsets on the device; a block whose expert
// has no row returns at once, so batch-1 decode reads only the selected experts' weights.
//
// Kernels (all extern "C"):
//   moe_topk_softmax_bf16(topk_ids, topk_weights, logits, tokens, experts, top_k, renormalize)
//       one warp a token (block 256: 8 tokens); experts <= 1024; softmax in f32 (expf), the
//       top_k largest probabilities, ties to the lower expert, divided by their sum when
//       renormalize != 0; a token's k entries are stored in ascending expert order.
//       topk_ids int [T, k], topk_weights f32 [T, k].
//   moe_align_bf16(expert_offsets, sorted_pairs, pair_slots, tile_map, topk_ids, pairs, experts)
//       one block of 1024 threads: expert_offsets [E + 1] (exclusive prefix of the counts),
//       sorted_pairs [P] (the pair id at each slot, grouped by expert; the order inside an
//       expert's group is the pair order), pair_slots [P] (each pair's slot); any number of
//       pairs, 1024 at a time. tile_map [P / 64 + min(E, P)]: the grouped GEMM's work, one
//       entry a tile of up to 64 rows of one expert, (row tile << 10) | expert, experts in
//       order and each expert's tiles in order, then -1 for the slots no tile needs (the
//       bound holds every routing: an expert's tiles are at most its rows / 64 plus one).
//   moe_gather_bf16(rows, x, sorted_pairs, pairs, hidden, top_k)
//       rows[s] = x[sorted_pairs[s] / top_k]; grid (P), block 256.
//   moe_grouped_gemm_bf16 (gate/up and down) lives in moe_gemm.cu: tensor-core tiles of 64
//       rows of an expert by 64 output columns.
//   moe_unpermute_bf16(out, rows, pair_slots, topk_weights, tokens, hidden, top_k)
//       out[t] = sum_j topk_weights[t, j] * rows[pair_slots[t * k + j]] (f32, j in order);
//       grid (T), block 256.
#include "common.cuh"
#include "moe_topk.cuh"

// Rows of one expert a tile of the grouped GEMM (moe_gemm.cu's kBM).
constexpr int kMoeGemmTileRows = 64;

extern "C" __global__ void DT(moe_topk_softmax_bf16, moe_topk_softmax_f16)(
    int* __restrict__ topk_ids, float* __restrict__ topk_weights, const elem_t* __restrict__ logits,
    int tokens, int experts, int top_k, int renormalize) {
    pdl_enter();
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int t = blockIdx.x * (blockDim.x / 32) + warp;
    if (t >= tokens || experts > kMoeMaxExperts || top_k > 32) return;
    int id, rank;
    float w;
    moe_route_token(logits + (int64_t)t * experts, experts, top_k, renormalize, id, w, rank);
    if (lane < top_k) {
        topk_ids[(int64_t)t * top_k + rank] = id;
        topk_weights[(int64_t)t * top_k + rank] = w;
    }
}

extern "C" __global__ void DT(moe_align_bf16, moe_align_f16)(
    int* __restrict__ expert_offsets, int* __restrict__ sorted_pairs, int* __restrict__ pair_slots,
    int* __restrict__ tile_map, const int* __restrict__ topk_ids, int pairs, int experts) {
    pdl_enter();
    __shared__ int counts[kMoeMaxExperts + 1];
    __shared__ int tiles[kMoeMaxExperts + 1];  // exclusive prefix of each expert's row tiles
    // The scans below take an expert a thread, whole warps.
    if (experts > kMoeMaxExperts || (int)blockDim.x < experts || blockDim.x % 32 != 0) return;
    for (int e = threadIdx.x; e <= experts; e += blockDim.x) counts[e] = 0;
    __syncthreads();
    for (int p = threadIdx.x; p < pairs; p += blockDim.x) atomicAdd(&counts[topk_ids[p] + 1], 1);
    __syncthreads();
    // Exclusive prefixes of the counts and of the row tiles (a block scan, thread e for expert
    // e: one thread's loop over 128 experts took microseconds of each batch-1 layer).
    {
        const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
        const int c = tid < experts ? counts[tid + 1] : 0;
        int cs = c, ts = (c + kMoeGemmTileRows - 1) / kMoeGemmTileRows;
        for (int o = 1; o < 32; o <<= 1) {
            const int a = __shfl_up_sync(0xffffffffu, cs, o);
            const int b = __shfl_up_sync(0xffffffffu, ts, o);
            if (lane >= o) {
                cs += a;
                ts += b;
            }
        }
        __shared__ int warp_counts[32], warp_tiles[32];
        if (lane == 31) {
            warp_counts[warp] = cs;
            warp_tiles[warp] = ts;
        }
        __syncthreads();
        if (warp == 0) {
            const bool live = lane < (int)blockDim.x / 32;
            int a = live ? warp_counts[lane] : 0, b = live ? warp_tiles[lane] : 0;
            for (int o = 1; o < 32; o <<= 1) {
                const int x = __shfl_up_sync(0xffffffffu, a, o);
                const int y = __shfl_up_sync(0xffffffffu, b, o);
                if (lane >= o) {
                    a += x;
                    b += y;
                }
            }
            warp_counts[lane] = a;
            warp_tiles[lane] = b;
        }
        __syncthreads();
        if (tid < experts) {
            counts[tid + 1] = cs + (warp > 0 ? warp_counts[warp - 1] : 0);
            tiles[tid + 1] = ts + (warp > 0 ? warp_tiles[warp - 1] : 0);
        }
        if (tid == 0) tiles[0] = 0;
    }
    __syncthreads();
    for (int e = threadIdx.x; e <= experts; e += blockDim.x) expert_offsets[e] = counts[e];
    for (int e = threadIdx.x; e < experts; e += blockDim.x) {
        for (int t = 0; t < tiles[e + 1] - tiles[e]; ++t) tile_map[tiles[e] + t] = (t << 10) | e;
    }
    const int slots = pairs / kMoeGemmTileRows + min(experts, pairs);
    for (int j = tiles[experts] + threadIdx.x; j < slots; j += blockDim.x) tile_map[j] = -1;
    // A pair's slot: its expert's start plus how many earlier pairs chose that expert, so the
    // order inside a group is the pair order (deterministic). A chunk of blockDim pairs at a
    // time, a pair a thread: the lanes of a warp with the same expert find each other
    // (match_any) and rank by lane; the warps then take turns, in order, to claim their
    // groups' slots from the expert's running start. (Each thread counting the earlier pairs
    // of its expert in the chunk took tens of microseconds a layer at batch 1,024.)
    __syncthreads();  // every expert_offsets read of counts above is done
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    for (int base = 0; base < pairs; base += blockDim.x) {
        const int p = base + threadIdx.x;
        const int e = p < pairs ? topk_ids[p] : -1;
        const unsigned peers = __match_any_sync(0xffffffffu, e);
        const int leader = __ffs(peers) - 1;
        const int rank = __popc(peers & ((1u << lane) - 1u));
        const int busy_warps = min((int)blockDim.x, pairs - base + 31) / 32;
        int start = 0;
        for (int w = 0; w < busy_warps; ++w) {
            if (warp == w && e >= 0 && lane == leader) {
                start = counts[e];
                counts[e] = start + __popc(peers);
            }
            __syncthreads();
        }
        start = __shfl_sync(0xffffffffu, start, leader);
        if (p < pairs) {
            sorted_pairs[start + rank] = p;
            pair_slots[p] = start + rank;
        }
    }
}

extern "C" __global__ void DT(moe_gather_bf16, moe_gather_f16)(
    elem_t* __restrict__ rows, const elem_t* __restrict__ x, const int* __restrict__ sorted_pairs,
    int pairs, int hidden, int top_k) {
    pdl_enter();
    const int s = blockIdx.x;
    if (s >= pairs) return;
    const elem_t* src = x + (int64_t)(sorted_pairs[s] / top_k) * hidden;
    elem_t* dst = rows + (int64_t)s * hidden;
    if (hidden % 8 == 0) {  // whole rows of 16-byte pieces, 16-byte aligned
        const Elem8* src8 = reinterpret_cast<const Elem8*>(src);
        Elem8* dst8 = reinterpret_cast<Elem8*>(dst);
        for (int i = threadIdx.x; i < hidden / 8; i += blockDim.x) dst8[i] = src8[i];
    } else {
        for (int i = threadIdx.x; i < hidden; i += blockDim.x) dst[i] = src[i];
    }
}

extern "C" __global__ void DT(moe_unpermute_bf16, moe_unpermute_f16)(
    elem_t* __restrict__ out, const elem_t* __restrict__ rows, const int* __restrict__ pair_slots,
    const float* __restrict__ topk_weights, int tokens, int hidden, int top_k) {
    pdl_enter();
    const int t = blockIdx.x;
    if (t >= tokens) return;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        float acc = 0.0f;
        for (int j = 0; j < top_k; ++j) {
            const int p = t * top_k + j;
            acc += topk_weights[p] * to_f32(rows[(int64_t)pair_slots[p] * hidden + i]);
        }
        out[(int64_t)t * hidden + i] = from_f32(acc);
    }
}
