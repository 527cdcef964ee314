// Paged attention for decode: one new token per sequence, with that token's RoPE and KV-cache
// write fused in, reading the older K/V from the paged cache.
//
// Kernels (all extern "C"):
//   paged_attention_decode_hd{64,128,256}_g{1,2,4,8}(
//       out, partial_out, partial_ml, semaphores, q, k_new, v_new, qkv_stride, key_cache,
//       value_cache, block_tables, context_lens, positions, slot_mapping, inv_freq, scale,
//       num_heads, num_kv_heads, block_size, max_blocks_per_seq, target_partitions)
//     out:          bf16 [num_seqs, num_heads * HD]
//     partial_out:  f32  [num_seqs, num_heads, depth, HD]   (split-K scratch; depth = gridDim.z)
//     partial_ml:   f32  [num_seqs, num_heads, depth, 2]    (max in log2 units, sum)
//     semaphores:   int32 [num_seqs, gridDim.x], all zero before the first launch and left
//       zero by every launch; or null, and paged_attention_decode_reduce merges the partials.
//     q, k_new, v_new: bf16 rows of qkv_stride elements, one per sequence (the fused QKV
//       output of the step's decode tokens, before RoPE): sequence s's new token. Its position
//       is positions[s] and it is the last token of the context (index context_lens[s] - 1).
//     The kernel rotates q and k_new (HF "rotate half" with inv_freq, as rope_and_cache_bf16
//     does, both rounded to bf16), writes the rotated k and v into the cache at
//     slot_mapping[s] (skipped when negative: padding), and attends over the context with the
//     new token's K/V taken from registers, not the cache. inv_freq null: no rotation.
//     key_cache, value_cache: bf16 [num_blocks, block_size, num_kv_heads, HD]
//     block_tables: int32 [num_seqs, max_blocks_per_seq]; context_lens, positions,
//       slot_mapping: int32 [num_seqs]
//     target_partitions: a sequence of `ctx` tokens is cut into partitions of
//       partition_tokens(ctx, target) tokens: ceil(ctx / target) rounded up to a multiple of
//       64, at least 64 and at most 512 (so a context over 512 * target tokens gets more
//       than `target` partitions).
//   grid (num_kv_heads * ceil(G / GT), num_seqs, depth), block 128, dynamic shared memory
//   decode_smem_bytes(GT) (below; the host mirrors it), where G = num_heads / num_kv_heads
//   and depth >= 1 is free: block z takes partitions z, z + depth, z + 2 * depth, ... of its
//   sequence and merges them itself (online softmax), so the grid, the scratch and a CUDA
//   graph do not depend on the longest context. A sequence whose partitions all fall to one block
//   (one partition, or depth 1) is written to `out` directly; the others write one
//   normalised partial output and (max, sum) per block that had a partition, and
//   paged_attention_decode_reduce combines them (it skips the sequences written directly, so
//   it is launched whenever depth > 1). With `semaphores` the last of those blocks to finish
//   merges them into `out` itself instead (no reduce launch). Measured on an H200 inside CUDA
//   graphs, that merge is slower than the reduce kernel: one block per KV head walks every
//   partial, against a block per query head (batch 1, 384 tokens, 6 partitions: 13.8 against
//   11.2 us; batch-1 decode 218.8 against 221.1 tok/s), so the engine uses the reduce
//   (RVLLM_DECODE_REDUCE=fold selects the merge). The kernel with this epilogue compiled to
//   128 registers (122 without) and streamed large batches faster: 512 sequences x 384 tokens
//   236 us, 64 x 2,048 149 us, and the engine's default throughput run +2 % on one machine
//   (why the compiler's choice helps is not known; see BENCHMARKS.md).
//
//   paged_attention_decode_reduce(out, partial_out, partial_ml, context_lens, num_heads,
//                                 head_dim, depth, target_partitions)
//     grid (num_heads, num_seqs), block 256 (128 works); head_dim a multiple of 4, at most 256;
//     depth at most 2048.
//
//   paged_attention_decode_windowed_hd{64,80,96,128,256}_g{1,2,4,8}(..., target_partitions,
//       window, softcap)
//     The full kernel with a sliding window and an attention-logit soft-cap (0: none of
//     either), for the layers that have them (Mistral, Gemma's local layers, Gemma 2) and for
//     head dims 80 and 96 (Phi). window w > 0: the new token (context index ctx - 1) attends
//     the keys ctx - w .. ctx - 1, as the CPU reference and transformers do; the partitions
//     cut that range instead of the whole context, so no key before it is read and no
//     partition is empty. softcap s > 0: each scaled score x becomes s * tanh(x / s) before the
//     softmax (Gemma 2's attn_logit_softcapping). Head dims 80 and 96 take 8 lanes a key row
//     as 128 does, of which 5 or 6 hold dims.
//   paged_attention_decode_kvfp8_hd{64,80,96,128,256}_g{1,2,4,8}(..., window, softcap,
//       k_scale, v_scale)
//     The windowed kernel over the FP8 (E4M3) KV cache (`--kv-cache-dtype fp8`): key_cache
//     and value_cache hold one byte an element, read as code * k_scale (v_scale); the new
//     token's k and v are written as the codes of k / k_scale and v / v_scale (saturated to
//     +-448) and attended through those codes, as the CPU reference does. Its partials merge
//     through paged_attention_decode_reduce_windowed.
//   paged_attention_decode_compact_windowed_hd{64,128,256}_g{1,2,4,8}(..., window, softcap):
//     the compact kernel (below) with the same window and soft-cap, for batch 1.
//   paged_attention_decode_reduce_windowed(..., target_partitions, window): the reduce of
//     the windowed kernels' partials (their partitions follow the window).
//
//   paged_attention_decode_compact_hd{64,128,256}_g{1,2,4,8}: the same arguments and results
//     (semaphores too: their last-block merge; dynamic shared memory
//     compact_smem_bytes<HD, GT>()); the engine uses it at batch 1 (see the kernel below and
//     CudaBackend::decode_attention).
//
//   Choosing target_partitions (host, from the batch size alone so that one CUDA graph serves
//   every context): enough blocks for ~2 per SM, num_kv_heads * num_seqs * target >= 2 * SMs.
//   Batch 1 then cuts a 384-token context into 6 partitions of 64 (48 blocks instead of 2 of
//   256); large batches keep one partition per sequence and skip the reduce.
//
// Why this shape: decode attention is a pure stream over the KV cache, so each block owns one
// KV head and up to GT query heads of its group (GQA): K and V are read from memory once for
// the whole group. Each key row is read by HD/16 lanes (16 dims, two 16-byte pieces each).
// The rows stream through a per-thread ring of kStages chunks in shared memory (cp.async:
// each lane copies and later reads only its own pieces, so the ring needs no barriers): K
// chunks, then V chunks, with kStages - 1 chunks always in flight, so the V loads start while
// the scores are still being computed. The first chunks are requested before pdl_wait: the
// older K/V depend on no kernel of this step, so at batch 1 their loads overlap the QKV
// projection; only q and the new token wait for it. Fusing RoPE and the cache write removes a
// launch from every layer (at batch 1 on an H200, 2.9 us a layer inside the decode graph).
// Each partition runs a K loop (scores, q in registers), the softmax, then a V loop (the
// accumulators in registers), whose result joins the block's running output in shared
// memory; keeping q and the accumulators apart holds the kernel at 128 registers, four blocks
// an SM. H200, Llama-3.1-8B layer inside a CUDA graph (gpu_bench): 512 sequences x 384 tokens
// 236 us (3.42 TB/s of K/V), 64 x 2,048 149 us (3.60 TB/s), batch 1 x 32k 47 us (reduce).
#include "kv_fp8.cuh"

namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxPartition = 512;
constexpr int kUnroll = 3;
constexpr int kStages = 3;
constexpr int kRingStageBytes = kUnroll * 2 * kThreads * 16;
constexpr float kLog2e = 1.4426950408889634f;
constexpr int kReduceThreads = 256;
constexpr int kMaxReducePartitions = 2048;

// Dynamic shared memory of the GT variant: the K/V ring, the scores, the slots (the host's
// rvllm_kernels::decode_smem::full mirrors it).
__host__ __device__ constexpr int decode_smem_bytes(int gt, int stages = kStages) {
    return stages * kRingStageBytes + gt * kMaxPartition * 4 + kMaxPartition * 4;
}
// Blocks an SM must hold: four (of ~49 KiB shared memory each, <= 128 registers a thread) for
// up to 4 heads a block, which the split K and V loops allow (q lives in registers only in
// the first, the accumulators only in the second). With both live across one loop the kernel
// needed 168 registers (three blocks an SM) and decoded batches of 512-1,024 2-5 % slower
// than this one's predecessor; forcing four blocks on that shape spilled and ran 35-40 %
// slower.
__host__ __device__ constexpr int kMinBlocks(int gt) { return gt <= 4 ? 4 : 1; }

// Tokens in each partition of a `ctx`-token context split `target` ways (see the header).
__device__ __forceinline__ int partition_tokens(int ctx, int target) {
    const int t = max(target, 1);
    const int even = (ctx + t - 1) / t;
    return min(max((even + 63) / 64 * 64, 64), kMaxPartition);
}

// The first key a new token at context index ctx - 1 attends with a `window` (0: none): the
// CPU reference's (qpos + 1).saturating_sub(w).
__device__ __forceinline__ int window_first(int ctx, int window) {
    return window > 0 ? max(ctx - window, 0) : 0;
}

// A score x (already scaled) capped to cap * tanh(x / cap), in log2 units; the kernels
// pre-scale q by scale alone when capping, by scale * log2(e) otherwise.
__device__ __forceinline__ float capped_log2(float x, float cap) {
    return cap * tanhf(x / cap) * kLog2e;
}

// What one decode attention block takes (grid: num_kv_heads * ceil(G / GT) columns, the
// sequences, depth), for the full and the compact kernel alike: the KV head, the query heads
// head0 .. head0 + nvalid - 1 of its group, the sequence, and that sequence's partitions
// (block z streams z, z + depth, ...; a block with z >= nparts has nothing to do).
// With a sliding window the partitions cut the window's tokens first .. ctx - 1 instead.
template <int GT>
struct DecodeTile {
    int groups_per_kv, kv_head, head0, nvalid, seq, z, depth, ctx, first, psize, nparts;
    __device__ __forceinline__ DecodeTile(int num_heads, int num_kv_heads,
                                          const int32_t* __restrict__ context_lens, int target,
                                          int window) {
        const int group = num_heads / num_kv_heads;
        groups_per_kv = (group + GT - 1) / GT;
        kv_head = blockIdx.x / groups_per_kv;
        head0 = kv_head * group + (blockIdx.x % groups_per_kv) * GT;
        nvalid = min(GT, kv_head * group + group - head0);
        seq = blockIdx.y;
        z = blockIdx.z;
        depth = gridDim.z;
        ctx = context_lens[seq];
        first = window_first(ctx, window);
        psize = partition_tokens(ctx - first, target);
        nparts = (ctx - first + psize - 1) / psize;
    }
};

__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(
                     (uint32_t)__cvta_generic_to_shared(dst)),
                 "l"(src));
}

__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::);
}

// The FP8 cache's pieces: 8 bytes (8 E4M3 codes), through L1 (.cg takes 16 bytes only).
__device__ __forceinline__ void cp_async8(void* dst, const void* src) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(
                     (uint32_t)__cvta_generic_to_shared(dst)),
                 "l"(src));
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Rotates the pairs (a[e], b[e]) by the angles of cos_t/sin_t[i0 + e] and rounds to bf16.
__device__ __forceinline__ void rotate8(Elem8& lo, Elem8& hi, const float* cos_t,
                                       const float* sin_t, int i0) {
    float a[8], b[8], y1[8], y2[8];
    elem8_to_f32(lo, a);
    elem8_to_f32(hi, b);
#pragma unroll
    for (int e = 0; e < 8; ++e) {
        const float c = cos_t[i0 + e], s = sin_t[i0 + e];
        y1[e] = a[e] * c - b[e] * s;
        y2[e] = b[e] * c + a[e] * s;
    }
    lo = f32_to_elem8(y1);
    hi = f32_to_elem8(y2);
}

// Whether this block is the last of its sequence's `parts` partition blocks (for its heads)
// to finish, the pattern of CUDA's threadFenceReduction sample: each block makes its partials
// visible device-wide before it is counted, and the last one resets the counter for the next
// launch (no block of this launch touches it again). Every thread of the block calls it.
__device__ __forceinline__ bool last_partition_block(int32_t* semaphores, int seq, int parts) {
    __shared__ bool last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        int32_t* sem = semaphores + (int64_t)seq * gridDim.x + blockIdx.x;
        last = atomicAdd(sem, 1) == parts - 1;
        if (last) *sem = 0;
    }
    __syncthreads();
    if (last) __threadfence();
    return last;
}

// Combines the `nblocks` partials of heads head0 .. head0 + nvalid - 1 of one sequence
// (normalised outputs and (max in log2 units, sum) per block, as decode_attention writes them)
// into `out`: weights w_b = l_b * 2^(m_b - M). The partials come from other blocks, so they are
// read through L2 (ld.global.cg), never from a possibly stale L1 line. m_scratch / w_scratch:
// GT floats of shared memory each.
template <int HD, int GT>
__device__ __forceinline__ void merge_partials(elem_t* __restrict__ out,
                                               const float* __restrict__ partial_out,
                                               const float* __restrict__ partial_ml,
                                               float* m_scratch, float* w_scratch, int seq,
                                               int head0, int nvalid, int num_heads, int nblocks,
                                               int depth) {
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    for (int g = warp; g < nvalid; g += kWarps) {
        const int64_t base = ((int64_t)seq * num_heads + head0 + g) * depth;
        float m = -INFINITY;
        for (int b = lane; b < nblocks; b += 32) m = fmaxf(m, __ldcg(&partial_ml[(base + b) * 2]));
        m = warp_max(m);
        float w = 0.0f;
        for (int b = lane; b < nblocks; b += 32)
            w += __ldcg(&partial_ml[(base + b) * 2 + 1]) *
                 exp2f(__ldcg(&partial_ml[(base + b) * 2]) - m);
        w = warp_sum(w);
        if (lane == 0) {
            m_scratch[g] = m;
            w_scratch[g] = w;
        }
    }
    __syncthreads();
    for (int idx = tid; idx < nvalid * HD; idx += kThreads) {
        const int g = idx / HD;
        const int d = idx % HD;
        const int64_t base = ((int64_t)seq * num_heads + head0 + g) * depth;
        float acc = 0.0f;
        for (int b = 0; b < nblocks; ++b) {
            const float wb = __ldcg(&partial_ml[(base + b) * 2 + 1]) *
                             exp2f(__ldcg(&partial_ml[(base + b) * 2]) - m_scratch[g]);
            acc = fmaf(wb, __ldcg(&partial_out[(base + b) * HD + d]), acc);
        }
        out[((int64_t)seq * num_heads + head0 + g) * HD + d] = from_f32(acc / w_scratch[g]);
    }
}

// CacheT: the cache's element type, elem_t or kv_fp8_t (the FP8 cache: each lane's two
// pieces of a key row are 8 codes each, read as 8 bytes into the first half of its ring slots
// and converted times k_scale / v_scale; the new token's k and v are rounded through the same
// codes, kept in new_kv likewise, so that it attends to what the cache holds).
template <int HD, int GT, int S, typename CacheT = elem_t>
__device__ __forceinline__ void decode_attention(
    elem_t* __restrict__ out, float* __restrict__ partial_out,
    float* __restrict__ partial_ml, int32_t* __restrict__ semaphores,
    const elem_t* __restrict__ q, const elem_t* __restrict__ k_new,
    const elem_t* __restrict__ v_new,
    int qkv_stride, CacheT* __restrict__ key_cache,
    CacheT* __restrict__ value_cache, const int32_t* __restrict__ block_tables,
    const int32_t* __restrict__ context_lens, const int32_t* __restrict__ positions,
    const int32_t* __restrict__ slot_mapping, const float* __restrict__ inv_freq, float scale,
    int num_heads, int num_kv_heads, int block_size, int max_blocks_per_seq,
    int target_partitions, int window, float softcap, float k_scale = 1.0f,
    float v_scale = 1.0f) {
    constexpr bool kFp8 = is_kv_fp8<CacheT>();
    // Lanes per token: 16 dims (two 16-byte pieces) each; head dims 80 and 96 round up to 8
    // lanes (a power of two, for the shuffles), of which the last 3 or 2 hold nothing.
    constexpr int kDimLanes = HD / 16;
    constexpr int LPT = kDimLanes <= 4 ? kDimLanes : kDimLanes <= 8 ? 8 : 16;
    constexpr int TPW = 32 / LPT;       // tokens per warp per step
    constexpr int TPB = TPW * kWarps;   // tokens per block per step
    constexpr int kChunk = TPB * kUnroll;
    constexpr int kHalf = HD / 2;
    static_assert(HD % 16 == 0 && 32 % LPT == 0 && kDimLanes <= LPT, "unsupported head dim");

    extern __shared__ __align__(16) unsigned char smem[];
    Elem8* ring = reinterpret_cast<Elem8*>(smem);  // [S][kUnroll][2][kThreads]
    auto scores = reinterpret_cast<float(*)[kMaxPartition]>(smem + S * kRingStageBytes);
    int32_t* slots =
        reinterpret_cast<int32_t*>(smem + S * kRingStageBytes + GT * kMaxPartition * 4);
    // After the stream the ring holds the cross-warp sums.
    auto red = reinterpret_cast<float(*)[GT][HD]>(smem);
    static_assert(kWarps * GT * HD * 4 <= S * kRingStageBytes, "ring too small");
    static_assert(decode_smem_bytes(GT, S) == S * kRingStageBytes + GT * kMaxPartition * 4 +
                                               kMaxPartition * 4,
                  "the layout above is decode_smem_bytes");
    __shared__ float cos_t[kHalf], sin_t[kHalf];
    __shared__ float run_max[GT], run_sum[GT], alpha[GT];
    __shared__ Elem8 new_kv[2][2][LPT];  // the new token's rotated k and its v, per lane
    __shared__ float out_acc[GT][HD];     // the block's output so far, unnormalised

    BlockTrace trace(1);
    const DecodeTile<GT> tile(num_heads, num_kv_heads, context_lens, target_partitions, window);
    const int groups_per_kv = tile.groups_per_kv, kv_head = tile.kv_head, head0 = tile.head0;
    const int nvalid = tile.nvalid, seq = tile.seq, z = tile.z, depth = tile.depth;
    const int ctx = tile.ctx, first = tile.first, psize = tile.psize, nparts = tile.nparts;
    if (z >= nparts) {
        pdl_enter();
        return;
    }
    // Blocks of this sequence with a partition; one alone merges them all and writes `out`.
    const bool direct = min(nparts, depth) == 1;
    const int new_t = ctx - 1;  // the token this step adds
    const int new_part = (new_t - first) / psize;

    const int tid = threadIdx.x;
    const int warp = tid >> 5;
    const int lane = tid & 31;
    const int tok_in_warp = lane / LPT;
    const int sub = lane % LPT;
    const bool holds_dims = sub < kDimLanes;  // false only for head dims 80 and 96
    const int64_t kv_row = (int64_t)num_kv_heads * HD;
    const int64_t head_off = (int64_t)kv_head * HD + sub * 8;
    const int32_t* table = block_tables + (int64_t)seq * max_blocks_per_seq;
    const bool rope = inv_freq != nullptr;

    if (rope) rope_table((float)positions[seq], inv_freq, kHalf, kThreads, cos_t, sin_t);
    if (tid < GT) {
        run_max[tid] = -INFINITY;
        run_sum[tid] = 0.0f;
    }

    // The partition being streamed: its first token, its length, its chunks, and the index of
    // the new token in it (-1 when it holds none).
    int start = 0, ntok = 0, nchunks = 0, new_ti = -1;
    auto begin_partition = [&](int p) {
        start = first + p * psize;
        ntok = min(psize, ctx - start);
        nchunks = (ntok + kChunk - 1) / kChunk;
        new_ti = p == new_part ? new_t - start : -1;
        for (int i = tid; i < ntok; i += kThreads) {
            const int t = start + i;
            slots[i] = table[t / block_size] * block_size + t % block_size;
        }
    };
    // Requests stream element i (K chunks 0..nchunks-1, then V chunks) into ring stage
    // i % S; always commits a group, so that wait_group counts stay uniform.
    auto issue = [&](int i) {
        if (i < 2 * nchunks) {
            const bool is_k = i < nchunks;
            const int base = (is_k ? i : i - nchunks) * kChunk;
            const CacheT* cache = is_k ? key_cache : value_cache;
            const int s = i % S;
#pragma unroll
            for (int u = 0; u < kUnroll; ++u) {
                const int ti = base + u * TPB + warp * TPW + tok_in_warp;
                if (ti < ntok && ti != new_ti && holds_dims) {
                    const CacheT* row = cache + (int64_t)slots[ti] * kv_row + head_off;
                    if constexpr (kFp8) {
                        cp_async8(&ring[((s * kUnroll + u) * 2 + 0) * kThreads + tid], row);
                        cp_async8(&ring[((s * kUnroll + u) * 2 + 1) * kThreads + tid],
                                  row + kHalf);
                    } else {
                        cp_async16(&ring[((s * kUnroll + u) * 2 + 0) * kThreads + tid], row);
                        cp_async16(&ring[((s * kUnroll + u) * 2 + 1) * kThreads + tid],
                                   row + kHalf);
                    }
                }
            }
        }
        cp_async_commit();
    };

    // Before the wait: the first partition's older K/V depend on no kernel of this step.
    begin_partition(z);
    __syncthreads();  // slots, cos/sin, running max/sum
#pragma unroll
    for (int i = 0; i < S - 1; ++i) issue(i);
    pdl_wait();
    trace.mark_waited();
    pdl_launch_dependents();

    // The new token: the block that streams its partition takes its k and v from the QKV
    // output (the lanes that own it in the chunk layout keep them in shared memory); the
    // first block of its KV head writes them to the cache.
    const int owner_part_block = new_part % depth;
    if (z == owner_part_block) {
        const int r = (new_t - first - new_part * psize) % kChunk;
        if (warp == (r % TPB) / TPW && tok_in_warp == r % TPW && holds_dims) {
            const int64_t off = (int64_t)seq * qkv_stride + (int64_t)kv_head * HD + sub * 8;
            Elem8 klo = *reinterpret_cast<const Elem8*>(k_new + off);
            Elem8 khi = *reinterpret_cast<const Elem8*>(k_new + off + kHalf);
            const Elem8 vlo = *reinterpret_cast<const Elem8*>(v_new + off);
            const Elem8 vhi = *reinterpret_cast<const Elem8*>(v_new + off + kHalf);
            if (rope) rotate8(klo, khi, cos_t, sin_t, sub * 8);
            if constexpr (kFp8) {
                const float inv_k = 1.0f / k_scale, inv_v = 1.0f / v_scale;
                const uint2 codes[2][2] = {
                    {elem8_to_kv_fp8(klo, inv_k), elem8_to_kv_fp8(khi, inv_k)},
                    {elem8_to_kv_fp8(vlo, inv_v), elem8_to_kv_fp8(vhi, inv_v)}};
#pragma unroll
                for (int kv = 0; kv < 2; ++kv)
#pragma unroll
                    for (int h = 0; h < 2; ++h)
                        *reinterpret_cast<uint2*>(&new_kv[kv][h][sub]) = codes[kv][h];
                const int64_t slot = slot_mapping[seq];
                if (blockIdx.x % groups_per_kv == 0 && slot >= 0) {
                    CacheT* kd = key_cache + slot * kv_row + head_off;
                    CacheT* vd = value_cache + slot * kv_row + head_off;
                    *reinterpret_cast<uint2*>(kd) = codes[0][0];
                    *reinterpret_cast<uint2*>(kd + kHalf) = codes[0][1];
                    *reinterpret_cast<uint2*>(vd) = codes[1][0];
                    *reinterpret_cast<uint2*>(vd + kHalf) = codes[1][1];
                }
            } else {
                new_kv[0][0][sub] = klo;
                new_kv[0][1][sub] = khi;
                new_kv[1][0][sub] = vlo;
                new_kv[1][1][sub] = vhi;
                const int64_t slot = slot_mapping[seq];
                if (blockIdx.x % groups_per_kv == 0 && slot >= 0) {
                    elem_t* kd = key_cache + slot * kv_row + head_off;
                    elem_t* vd = value_cache + slot * kv_row + head_off;
                    *reinterpret_cast<Elem8*>(kd) = klo;
                    *reinterpret_cast<Elem8*>(kd + kHalf) = khi;
                    *reinterpret_cast<Elem8*>(vd) = vlo;
                    *reinterpret_cast<Elem8*>(vd + kHalf) = vhi;
                }
            }
        }
    }
    for (int i = tid; i < GT * HD; i += kThreads) out_acc[i / HD][i % HD] = 0.0f;

    // Stream element i's row of token ti as 16 floats (the new token from new_kv).
    auto row_at = [&](int i, int u, int ti, bool is_k, float (&f)[16]) {
        const int s = i % S;
        if constexpr (kFp8) {
            uint2 lo = make_uint2(0, 0), hi = make_uint2(0, 0);  // codes of +0
            if (!holds_dims) {
            } else if (ti == new_ti) {
                lo = *reinterpret_cast<const uint2*>(&new_kv[is_k ? 0 : 1][0][sub]);
                hi = *reinterpret_cast<const uint2*>(&new_kv[is_k ? 0 : 1][1][sub]);
            } else {
                lo = *reinterpret_cast<const uint2*>(
                    &ring[((s * kUnroll + u) * 2 + 0) * kThreads + tid]);
                hi = *reinterpret_cast<const uint2*>(
                    &ring[((s * kUnroll + u) * 2 + 1) * kThreads + tid]);
            }
            const float sc = is_k ? k_scale : v_scale;
            kv_fp8x8_to_f32(lo, sc, f);
            kv_fp8x8_to_f32(hi, sc, f + 8);
        } else {
            Elem8 lo{}, hi{};
            if (!holds_dims) {
                // Zeros: these lanes' dot products and sums then add nothing.
            } else if (ti == new_ti) {
                lo = new_kv[is_k ? 0 : 1][0][sub];
                hi = new_kv[is_k ? 0 : 1][1][sub];
            } else {
                lo = ring[((s * kUnroll + u) * 2 + 0) * kThreads + tid];
                hi = ring[((s * kUnroll + u) * 2 + 1) * kThreads + tid];
            }
            elem8_to_f32(lo, f);
            elem8_to_f32(hi, f + 8);
        }
    };

    for (int p = z;;) {
        {
            // This lane's slice of each query head (rotated, rounded to bf16 as the cache
            // write path rounds it), pre-scaled so scores come out in log2 units. Reloaded
            // for each partition, so that q and the accumulators are never live together.
            float qf[GT][16];
            // Capped scores go through tanh in natural units, then to log2 units.
            const float qmul = softcap > 0.0f ? scale : scale * kLog2e;
#pragma unroll
            for (int g = 0; g < GT; ++g) {
                Elem8 lo{}, hi{};
                if (g < nvalid && holds_dims) {
                    const elem_t* qh =
                        q + (int64_t)seq * qkv_stride + (int64_t)(head0 + g) * HD;
                    lo = *reinterpret_cast<const Elem8*>(qh + sub * 8);
                    hi = *reinterpret_cast<const Elem8*>(qh + kHalf + sub * 8);
                    if (rope) rotate8(lo, hi, cos_t, sin_t, sub * 8);
                }
                elem8_to_f32(lo, qf[g]);
                elem8_to_f32(hi, qf[g] + 8);
#pragma unroll
                for (int e = 0; e < 16; ++e) qf[g][e] *= qmul;
            }
            // Phase 1: scores = q . k (the V chunks start streaming meanwhile).
            for (int i = 0; i < nchunks; ++i) {
                issue(i + S - 1);
                cp_async_wait<S - 1>();
#pragma unroll
                for (int u = 0; u < kUnroll; ++u) {
                    const int ti = i * kChunk + u * TPB + warp * TPW + tok_in_warp;
                    float f[16];
                    row_at(i, u, ti, true, f);
#pragma unroll
                    for (int g = 0; g < GT; ++g) {
                        float dot = 0.0f;
#pragma unroll
                        for (int e = 0; e < 16; ++e) dot = fmaf(qf[g][e], f[e], dot);
#pragma unroll
                        for (int o = LPT / 2; o > 0; o >>= 1)
                            dot += __shfl_xor_sync(0xffffffffu, dot, o);
                        if (sub == g % LPT && ti < ntok)
                            scores[g][ti] = softcap > 0.0f ? capped_log2(dot, softcap) : dot;
                    }
                }
            }
        }
        // Phase 2: softmax numerators against the running maximum, one warp per head.
        __syncthreads();
        trace.mark_first();  // the first partition's scores are done
        for (int g = warp; g < GT; g += kWarps) {
            float m = -INFINITY;
            for (int t = lane; t < ntok; t += 32) m = fmaxf(m, scores[g][t]);
            m = fmaxf(warp_max(m), run_max[g]);
            float sum = 0.0f;
            for (int t = lane; t < ntok; t += 32) {
                const float e = exp2f(scores[g][t] - m);
                scores[g][t] = e;
                sum += e;
            }
            sum = warp_sum(sum);
            if (lane == 0) {
                const float a = exp2f(run_max[g] - m);  // 0 for the first partition
                alpha[g] = a;
                run_sum[g] = run_sum[g] * a + sum;
                run_max[g] = m;
            }
        }
        __syncthreads();
        {
            // Phase 3: acc = sum_t p_t * v_t over this partition.
            float acc[GT][16];
#pragma unroll
            for (int g = 0; g < GT; ++g)
#pragma unroll
                for (int e = 0; e < 16; ++e) acc[g][e] = 0.0f;
            for (int i = nchunks; i < 2 * nchunks; ++i) {
                issue(i + S - 1);
                cp_async_wait<S - 1>();
#pragma unroll
                for (int u = 0; u < kUnroll; ++u) {
                    const int ti = (i - nchunks) * kChunk + u * TPB + warp * TPW + tok_in_warp;
                    if (ti < ntok) {
                        float f[16];
                        row_at(i, u, ti, false, f);
#pragma unroll
                        for (int g = 0; g < GT; ++g) {
                            const float pr = scores[g][ti];
#pragma unroll
                            for (int e = 0; e < 16; ++e) acc[g][e] = fmaf(pr, f[e], acc[g][e]);
                        }
                    }
                }
            }
            // Sum the warp's token groups (lanes that share `sub`), then the warps via shared
            // memory, into the block's running output (rescaled to the running maximum).
#pragma unroll
            for (int g = 0; g < GT; ++g)
#pragma unroll
                for (int e = 0; e < 16; ++e)
#pragma unroll
                    for (int o = LPT; o < 32; o <<= 1)
                        acc[g][e] += __shfl_xor_sync(0xffffffffu, acc[g][e], o);
            cp_async_wait<0>();
            __syncthreads();  // every warp is done with the ring before `red` overwrites it
            if (tok_in_warp == 0 && holds_dims) {
#pragma unroll
                for (int g = 0; g < GT; ++g)
#pragma unroll
                    for (int j = 0; j < 2; ++j)
#pragma unroll
                        for (int e = 0; e < 8; ++e)
                            red[warp][g][j * kHalf + sub * 8 + e] = acc[g][j * 8 + e];
            }
        }
        __syncthreads();
        for (int idx = tid; idx < GT * HD; idx += kThreads) {
            const int g = idx / HD;
            const int d = idx % HD;
            float sum = 0.0f;
#pragma unroll
            for (int w = 0; w < kWarps; ++w) sum += red[w][g][d];
            out_acc[g][d] = out_acc[g][d] * alpha[g] + sum;
        }
        p += depth;
        if (p >= nparts) break;
        __syncthreads();  // scores, slots and `red` (the ring) are free again
        begin_partition(p);
        __syncthreads();
#pragma unroll
        for (int i = 0; i < S - 1; ++i) issue(i);
    }
    __syncthreads();

    for (int idx = tid; idx < nvalid * HD; idx += kThreads) {
        const int g = idx / HD;
        const int d = idx % HD;
        const float o = out_acc[g][d] / run_sum[g];
        const int head = head0 + g;
        if (direct) {
            out[((int64_t)seq * num_heads + head) * HD + d] = from_f32(o);
        } else {
            const int64_t pi = ((int64_t)seq * num_heads + head) * depth + z;
            partial_out[pi * HD + d] = o;
            if (d == 0) {
                partial_ml[pi * 2] = run_max[g];
                partial_ml[pi * 2 + 1] = run_sum[g];
            }
        }
    }
    if (direct || semaphores == nullptr) return;

    // The last of this sequence's blocks (for these heads) to finish merges every block's
    // partial.
    if (!last_partition_block(semaphores, seq, min(nparts, depth))) return;
    merge_partials<HD, GT>(out, partial_out, partial_ml, run_max, run_sum, seq, head0, nvalid,
                           num_heads, min(nparts, depth), depth);
}

// The compact variant (paged_attention_decode_compact_*; same arguments and merges):
// the same partitions, outputs and partials, with a fraction of the code. Each block stages
// chunks of K and V in shared memory (two buffers: the next chunk loads while this one is
// used), one warp per query head computes one or two tokens' scores a lane and then sums the
// chunk's V rows into its lane's HD/32 dimensions. Nothing is unrolled beyond 16-byte
// pieces, so the kernel is a few KB of code instead of ~95 KB: at batch 1 a decode attention
// block runs once a layer, and its instructions may have to come from memory each time.
//
// Chunks of 64 tokens for head dims 64 and 128, 32 for 256 (about head 128's bytes: ~70 KB
// of shared memory with q, against ~145 KB with 64-token chunks), so that a bulk GEMV block
// (~136 KB of stages) still fits beside an attention block on one SM: with PDL the GEMVs
// before and after attention (QKV, O projection) have blocks resident while it runs.
template <int HD>
__host__ __device__ constexpr int compact_chunk() {
    return HD > 128 ? 32 : 64;
}

template <int HD, int GT>
__host__ __device__ constexpr int compact_smem_bytes() {
    // K and V chunks (two buffers, rows padded by 16 bytes against bank conflicts), q as
    // floats, the warps' probabilities, the new token's k and v (the host's
    // rvllm_kernels::decode_smem::compact mirrors it).
    return 4 * compact_chunk<HD>() * (HD * 2 + 16) + GT * HD * 4 +
           kWarps * compact_chunk<HD>() * 4 + 2 * HD * 2;
}

template <int HD, int GT>
__device__ __forceinline__ void decode_attention_compact(
    elem_t* __restrict__ out, float* __restrict__ partial_out,
    float* __restrict__ partial_ml, int32_t* __restrict__ semaphores, const elem_t* __restrict__ q,
    const elem_t* __restrict__ k_new, const elem_t* __restrict__ v_new,
    int qkv_stride, elem_t* __restrict__ key_cache,
    elem_t* __restrict__ value_cache, const int32_t* __restrict__ block_tables,
    const int32_t* __restrict__ context_lens, const int32_t* __restrict__ positions,
    const int32_t* __restrict__ slot_mapping, const float* __restrict__ inv_freq, float scale,
    int num_heads, int num_kv_heads, int block_size, int max_blocks_per_seq,
    int target_partitions, int window, float softcap) {
    constexpr int kRow = HD * 2 + 16;  // bytes of a staged row
    constexpr int kPieces = HD / 8;    // 16-byte pieces of a row
    constexpr int kDims = HD / 32;     // output dimensions of a lane
    constexpr int kHalf = HD / 2;
    constexpr int kHeadsPerWarp = (GT + kWarps - 1) / kWarps;
    constexpr int kCompactChunk = compact_chunk<HD>();
    constexpr int kTokPerLane = kCompactChunk / 32;  // scores a lane computes per chunk
    static_assert(kDims == 2 || kDims == 4 || kDims == 8,
                  "compact decode attention: head dim 64, 128 or 256");
    BlockTrace trace(3);
    extern __shared__ __align__(16) unsigned char smem[];
    unsigned char* kv_buf = smem;  // [2 buffers][K, V][kCompactChunk][kRow]
    float* qs = reinterpret_cast<float*>(smem + 4 * kCompactChunk * kRow);  // [GT][HD]
    float* probs = qs + GT * HD;                                             // [kWarps][chunk]
    elem_t* new_kv =
        reinterpret_cast<elem_t*>(probs + kWarps * kCompactChunk);  // k [HD], v [HD]
    static_assert(4 * kCompactChunk * kRow + GT * HD * 4 + kWarps * kCompactChunk * 4 +
                          2 * HD * 2 ==
                      compact_smem_bytes<HD, GT>(),
                  "the layout above is compact_smem_bytes");
    __shared__ float cos_t[kHalf], sin_t[kHalf];

    const DecodeTile<GT> tile(num_heads, num_kv_heads, context_lens, target_partitions, window);
    const int groups_per_kv = tile.groups_per_kv, kv_head = tile.kv_head, head0 = tile.head0;
    const int nvalid = tile.nvalid, seq = tile.seq, z = tile.z, depth = tile.depth;
    const int ctx = tile.ctx, first = tile.first, psize = tile.psize, nparts = tile.nparts;
    if (z >= nparts) {
        pdl_enter();
        return;
    }
    const bool direct = min(nparts, depth) == 1;
    const int new_t = ctx - 1;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int64_t kv_row = (int64_t)num_kv_heads * HD;
    const int64_t head_off = (int64_t)kv_head * HD;
    const int32_t* table = block_tables + (int64_t)seq * max_blocks_per_seq;
    const bool rope = inv_freq != nullptr;
    if (rope) rope_table((float)positions[seq], inv_freq, kHalf, kThreads, cos_t, sin_t);
    // Every warp rotates with the table (the q loop's threads are not the ones that wrote
    // it: without this barrier warps 2-3 read it unwritten, which broke query head 1).
    __syncthreads();

    // Stages tokens [t0, t0 + n) into buffer b (the new token's row is never read from the
    // cache) and commits one group.
    auto load_chunk = [&](int t0, int n, int b) {
        for (int i = tid; i < 2 * n * kPieces; i += kThreads) {
            const int is_v = i / (n * kPieces);
            const int ti = (i % (n * kPieces)) / kPieces;
            const int piece = i % kPieces;
            const int t = t0 + ti;
            if (t == new_t) continue;
            const int64_t slot = (int64_t)table[t / block_size] * block_size + t % block_size;
            const elem_t* src =
                (is_v ? value_cache : key_cache) + slot * kv_row + head_off + piece * 8;
            cp_async16(kv_buf + ((b * 2 + is_v) * kCompactChunk + ti) * kRow + piece * 16, src);
        }
        cp_async_commit();
    };
    // The chunk after (p, c): the partition's next 64 tokens, else the block's next partition.
    auto next_chunk = [&](int& p, int& c) {
        ++c;
        if (first + p * psize + c * kCompactChunk >= min(ctx, first + (p + 1) * psize)) {
            p += depth;
            c = 0;
        }
    };
    auto chunk_span = [&](int p, int c, int& t0, int& n) {
        t0 = first + p * psize + c * kCompactChunk;
        n = min(kCompactChunk, min(ctx, first + (p + 1) * psize) - t0);
    };

    int t0, n;
    chunk_span(z, 0, t0, n);
    load_chunk(t0, n, 0);  // the older context depends on no kernel of this step
    pdl_wait();
    trace.mark_waited();
    pdl_launch_dependents();

    // This block's query heads, rotated and rounded to bf16 as the cache path rounds them,
    // pre-scaled so that scores come out in log2 units; the new token's rotated k and its v.
    // Capped scores go through tanh in natural units, then to log2 units.
    const float qscale = softcap > 0.0f ? scale : scale * kLog2e;
    for (int i = tid; i < GT * kHalf; i += kThreads) {
        const int g = i / kHalf, d = i % kHalf;
        float a = 0.0f, b = 0.0f;
        if (g < nvalid) {
            const elem_t* qh = q + (int64_t)seq * qkv_stride + (int64_t)(head0 + g) * HD;
            a = to_f32(qh[d]);
            b = to_f32(qh[d + kHalf]);
            if (rope) {
                const float y1 = a * cos_t[d] - b * sin_t[d], y2 = b * cos_t[d] + a * sin_t[d];
                a = to_f32(from_f32(y1));
                b = to_f32(from_f32(y2));
            }
        }
        qs[g * HD + d] = a * qscale;
        qs[g * HD + d + kHalf] = b * qscale;
    }
    const int new_part = (new_t - first) / psize;
    const bool writes_cache = z == new_part % depth && blockIdx.x % groups_per_kv == 0;
    const int64_t slot_new = slot_mapping[seq];
    for (int d = tid; d < kHalf; d += kThreads) {
        const int64_t off = (int64_t)seq * qkv_stride + head_off;
        elem_t ka = k_new[off + d], kb = k_new[off + d + kHalf];
        if (rope) {
            const float a = to_f32(ka), b = to_f32(kb);
            ka = from_f32(a * cos_t[d] - b * sin_t[d]);
            kb = from_f32(b * cos_t[d] + a * sin_t[d]);
        }
        const elem_t va = v_new[off + d], vb = v_new[off + d + kHalf];
        new_kv[d] = ka;
        new_kv[d + kHalf] = kb;
        new_kv[HD + d] = va;
        new_kv[HD + d + kHalf] = vb;
        if (writes_cache && slot_new >= 0) {
            key_cache[slot_new * kv_row + head_off + d] = ka;
            key_cache[slot_new * kv_row + head_off + d + kHalf] = kb;
            value_cache[slot_new * kv_row + head_off + d] = va;
            value_cache[slot_new * kv_row + head_off + d + kHalf] = vb;
        }
    }

    float m[kHeadsPerWarp], l[kHeadsPerWarp], acc[kHeadsPerWarp][kDims];
#pragma unroll
    for (int j = 0; j < kHeadsPerWarp; ++j) {
        m[j] = -INFINITY;
        l[j] = 0.0f;
#pragma unroll
        for (int e = 0; e < kDims; ++e) acc[j][e] = 0.0f;
    }
    for (int p = z, c = 0, buf = 0;;) {
        int np = p, nc = c;
        next_chunk(np, nc);
        const bool more = np < nparts;
        if (more) {
            int nt0, nn;
            chunk_span(np, nc, nt0, nn);
            load_chunk(nt0, nn, buf ^ 1);
        } else {
            cp_async_commit();  // uniform group counts
        }
        cp_async_wait<1>();
        __syncthreads();  // the chunk, q and the new token are in shared memory
        trace.mark_first();
        chunk_span(p, c, t0, n);
        const unsigned char* kb = kv_buf + (buf * 2) * kCompactChunk * kRow;
        const unsigned char* vb = kb + kCompactChunk * kRow;
        float* pw = probs + warp * kCompactChunk;
#pragma unroll
        for (int j = 0; j < kHeadsPerWarp; ++j) {
            const int g = warp + j * kWarps;
            if (g >= nvalid) break;
            const float* qg = qs + g * HD;
            float sc[kTokPerLane];
#pragma unroll
            for (int h = 0; h < kTokPerLane; ++h) {
                const int ti = lane + 32 * h;
                sc[h] = -INFINITY;
                if (ti < n) {
                    const unsigned char* row = t0 + ti == new_t
                                                   ? reinterpret_cast<const unsigned char*>(new_kv)
                                                   : kb + ti * kRow;
                    float dot = 0.0f;
#pragma unroll 2
                    for (int pc = 0; pc < kPieces; ++pc) {
                        float f[8];
                        elem8_to_f32(*reinterpret_cast<const Elem8*>(row + pc * 16), f);
                        const float4 q0 = *reinterpret_cast<const float4*>(qg + pc * 8);
                        const float4 q1 = *reinterpret_cast<const float4*>(qg + pc * 8 + 4);
                        dot = fmaf(q0.x, f[0], dot);
                        dot = fmaf(q0.y, f[1], dot);
                        dot = fmaf(q0.z, f[2], dot);
                        dot = fmaf(q0.w, f[3], dot);
                        dot = fmaf(q1.x, f[4], dot);
                        dot = fmaf(q1.y, f[5], dot);
                        dot = fmaf(q1.z, f[6], dot);
                        dot = fmaf(q1.w, f[7], dot);
                    }
                    sc[h] = softcap > 0.0f ? capped_log2(dot, softcap) : dot;
                }
            }
            float smax = sc[0];
#pragma unroll
            for (int h = 1; h < kTokPerLane; ++h) smax = fmaxf(smax, sc[h]);
            const float mn = fmaxf(m[j], warp_max(smax));
            const float alpha = exp2f(m[j] - mn);  // 0 for the first chunk
            float psum = 0.0f;
#pragma unroll
            for (int h = 0; h < kTokPerLane; ++h) {
                const float pr = lane + 32 * h < n ? exp2f(sc[h] - mn) : 0.0f;
                pw[lane + 32 * h] = pr;
                psum += pr;
            }
            l[j] = l[j] * alpha + warp_sum(psum);
            m[j] = mn;
            __syncwarp();
#pragma unroll
            for (int e = 0; e < kDims; ++e) acc[j][e] *= alpha;
            for (int ti = 0; ti < n; ++ti) {
                const float pt = pw[ti];
                const unsigned char* row =
                    t0 + ti == new_t ? reinterpret_cast<const unsigned char*>(new_kv + HD)
                                     : vb + ti * kRow;
                if constexpr (kDims == 8) {
                    // One 16-byte piece a lane: a row in 4 wavefronts (pairs would conflict).
                    float f[8];
                    elem8_to_f32(*reinterpret_cast<const Elem8*>(row + lane * 16), f);
#pragma unroll
                    for (int e = 0; e < 8; ++e) acc[j][e] = fmaf(pt, f[e], acc[j][e]);
                } else {
                    const elem2_t* v2 =
                        reinterpret_cast<const elem2_t*>(row + lane * kDims * 2);
#pragma unroll
                    for (int e = 0; e < kDims / 2; ++e) {
                        const float2 f = to_f32x2(v2[e]);
                        acc[j][2 * e] = fmaf(pt, f.x, acc[j][2 * e]);
                        acc[j][2 * e + 1] = fmaf(pt, f.y, acc[j][2 * e + 1]);
                    }
                }
            }
            __syncwarp();  // pw is rewritten by this warp's next head
        }
        __syncthreads();  // buffer `buf` is free for the chunk after next
        if (!more) break;
        p = np;
        c = nc;
        buf ^= 1;
    }
    cp_async_wait<0>();

#pragma unroll
    for (int j = 0; j < kHeadsPerWarp; ++j) {
        const int g = warp + j * kWarps;
        if (g >= nvalid) break;
        const int head = head0 + g;
#pragma unroll
        for (int e = 0; e < kDims; ++e) {
            const int d = lane * kDims + e;
            const float o = acc[j][e] / l[j];
            if (direct) {
                out[((int64_t)seq * num_heads + head) * HD + d] = from_f32(o);
            } else {
                partial_out[(((int64_t)seq * num_heads + head) * depth + z) * HD + d] = o;
            }
        }
        if (!direct && lane == 0) {
            const int64_t pi = ((int64_t)seq * num_heads + head) * depth + z;
            partial_ml[pi * 2] = m[j];
            partial_ml[pi * 2 + 1] = l[j];
        }
    }
    if (direct || semaphores == nullptr) return;

    // The last block of this sequence (for these heads) merges the partials, as the full
    // kernel's epilogue does (see there): no reduce launch.
    __shared__ float merge_m[GT], merge_w[GT];
    if (!last_partition_block(semaphores, seq, min(nparts, depth))) return;
    merge_partials<HD, GT>(out, partial_out, partial_ml, merge_m, merge_w, seq, head0, nvalid,
                           num_heads, min(nparts, depth), depth);
}

}  // namespace

#define RVLLM_DECODE_ATTENTION_COMPACT(HD, GT)                                                 \
    extern "C" __global__ void __launch_bounds__(kThreads)                                     \
        DT(paged_attention_decode_compact_hd##HD##_g##GT,                                      \
           paged_attention_decode_compact_hd##HD##_g##GT##_f16)(                               \
            elem_t* __restrict__ out, float* __restrict__ partial_out,                         \
            float* __restrict__ partial_ml, int32_t* __restrict__ semaphores,                  \
            const elem_t* __restrict__ q, const elem_t* __restrict__ k_new,                    \
            const elem_t* __restrict__ v_new, int qkv_stride,                                  \
            elem_t* __restrict__ key_cache, elem_t* __restrict__ value_cache,                  \
            const int32_t* __restrict__ block_tables, const int32_t* __restrict__ context_lens, \
            const int32_t* __restrict__ positions, const int32_t* __restrict__ slot_mapping,   \
            const float* __restrict__ inv_freq, float scale, int num_heads, int num_kv_heads,  \
            int block_size, int max_blocks_per_seq, int target_partitions) {                   \
        decode_attention_compact<HD, GT>(out, partial_out, partial_ml, semaphores, q, k_new,   \
                                         v_new,                                                \
                                         qkv_stride, key_cache, value_cache, block_tables,     \
                                         context_lens, positions, slot_mapping, inv_freq,      \
                                         scale, num_heads, num_kv_heads, block_size,           \
                                         max_blocks_per_seq, target_partitions, 0, 0.0f);      \
    }

RVLLM_DECODE_ATTENTION_COMPACT(64, 1)
RVLLM_DECODE_ATTENTION_COMPACT(64, 2)
RVLLM_DECODE_ATTENTION_COMPACT(64, 4)
RVLLM_DECODE_ATTENTION_COMPACT(64, 8)
RVLLM_DECODE_ATTENTION_COMPACT(128, 1)
RVLLM_DECODE_ATTENTION_COMPACT(128, 2)
RVLLM_DECODE_ATTENTION_COMPACT(128, 4)
RVLLM_DECODE_ATTENTION_COMPACT(128, 8)
RVLLM_DECODE_ATTENTION_COMPACT(256, 1)
RVLLM_DECODE_ATTENTION_COMPACT(256, 2)
RVLLM_DECODE_ATTENTION_COMPACT(256, 4)
RVLLM_DECODE_ATTENTION_COMPACT(256, 8)

// The compact kernel with a window and a soft-cap (as the full kernel's windowed build), for
// batch 1 of the windowed and capped layers of head dims 64, 128 and 256.
#define RVLLM_DECODE_ATTENTION_COMPACT_WINDOWED(HD, GT)                                        \
    extern "C" __global__ void __launch_bounds__(kThreads)                                     \
        DT(paged_attention_decode_compact_windowed_hd##HD##_g##GT,                             \
           paged_attention_decode_compact_windowed_hd##HD##_g##GT##_f16)(                      \
            elem_t* __restrict__ out, float* __restrict__ partial_out,                         \
            float* __restrict__ partial_ml, int32_t* __restrict__ semaphores,                  \
            const elem_t* __restrict__ q, const elem_t* __restrict__ k_new,                    \
            const elem_t* __restrict__ v_new, int qkv_stride,                                  \
            elem_t* __restrict__ key_cache, elem_t* __restrict__ value_cache,                  \
            const int32_t* __restrict__ block_tables, const int32_t* __restrict__ context_lens, \
            const int32_t* __restrict__ positions, const int32_t* __restrict__ slot_mapping,   \
            const float* __restrict__ inv_freq, float scale, int num_heads, int num_kv_heads,  \
            int block_size, int max_blocks_per_seq, int target_partitions, int window,         \
            float softcap) {                                                                   \
        decode_attention_compact<HD, GT>(out, partial_out, partial_ml, semaphores, q, k_new,   \
                                         v_new,                                                \
                                         qkv_stride, key_cache, value_cache, block_tables,     \
                                         context_lens, positions, slot_mapping, inv_freq,      \
                                         scale, num_heads, num_kv_heads, block_size,           \
                                         max_blocks_per_seq, target_partitions, window,        \
                                         softcap);                                             \
    }

RVLLM_DECODE_ATTENTION_COMPACT_WINDOWED(64, 1)
RVLLM_DECODE_ATTENTION_COMPACT_WINDOWED(64, 2)
RVLLM_DECODE_ATTENTION_COMPACT_WINDOWED(64, 4)
RVLLM_DECODE_ATTENTION_COMPACT_WINDOWED(64, 8)
RVLLM_DECODE_ATTENTION_COMPACT_WINDOWED(128, 1)
RVLLM_DECODE_ATTENTION_COMPACT_WINDOWED(128, 2)
RVLLM_DECODE_ATTENTION_COMPACT_WINDOWED(128, 4)
RVLLM_DECODE_ATTENTION_COMPACT_WINDOWED(128, 8)
RVLLM_DECODE_ATTENTION_COMPACT_WINDOWED(256, 1)
RVLLM_DECODE_ATTENTION_COMPACT_WINDOWED(256, 2)
RVLLM_DECODE_ATTENTION_COMPACT_WINDOWED(256, 4)
RVLLM_DECODE_ATTENTION_COMPACT_WINDOWED(256, 8)

#define RVLLM_DECODE_ATTENTION(HD, GT)                                                         \
    extern "C" __global__ void __launch_bounds__(kThreads, kMinBlocks(GT))                    \
        DT(paged_attention_decode_hd##HD##_g##GT,                                              \
           paged_attention_decode_hd##HD##_g##GT##_f16)(                                       \
            elem_t* __restrict__ out, float* __restrict__ partial_out,                         \
            float* __restrict__ partial_ml, int32_t* __restrict__ semaphores,                  \
            const elem_t* __restrict__ q, const elem_t* __restrict__ k_new,                    \
            const elem_t* __restrict__ v_new,                                                  \
            int qkv_stride, elem_t* __restrict__ key_cache,                                    \
            elem_t* __restrict__ value_cache, const int32_t* __restrict__ block_tables,        \
            const int32_t* __restrict__ context_lens, const int32_t* __restrict__ positions,   \
            const int32_t* __restrict__ slot_mapping, const float* __restrict__ inv_freq,      \
            float scale, int num_heads, int num_kv_heads, int block_size,                      \
            int max_blocks_per_seq, int target_partitions) {                                   \
        decode_attention<HD, GT, kStages>(                                                     \
            out, partial_out, partial_ml, semaphores, q, k_new, v_new, qkv_stride, key_cache,     \
            value_cache,                                                                          \
            block_tables, context_lens, positions, slot_mapping, inv_freq, scale, num_heads,      \
            num_kv_heads, block_size, max_blocks_per_seq, target_partitions, 0, 0.0f);            \
    }

RVLLM_DECODE_ATTENTION(64, 1)
RVLLM_DECODE_ATTENTION(64, 2)
RVLLM_DECODE_ATTENTION(64, 4)
RVLLM_DECODE_ATTENTION(64, 8)
RVLLM_DECODE_ATTENTION(128, 1)
RVLLM_DECODE_ATTENTION(128, 2)
RVLLM_DECODE_ATTENTION(128, 4)
RVLLM_DECODE_ATTENTION(128, 8)
// Head dim 256 (Gemma 3): 16 lanes a key row (sm_90a: the same registers as head dim 128
// and no spills); batch 1 runs the compact kernel, as for 64 and 128.
RVLLM_DECODE_ATTENTION(256, 1)
RVLLM_DECODE_ATTENTION(256, 2)
RVLLM_DECODE_ATTENTION(256, 4)
RVLLM_DECODE_ATTENTION(256, 8)

// The full kernel with a window and a soft-cap (see the header). Separate entry points, so
// that the plain ones above keep their code (both compile the checks away where 0) and their
// signature; the engine launches these for windowed and capped layers and head dims 80/96.
#define RVLLM_DECODE_ATTENTION_WINDOWED(HD, GT)                                                \
    extern "C" __global__ void __launch_bounds__(kThreads, kMinBlocks(GT))                    \
        DT(paged_attention_decode_windowed_hd##HD##_g##GT,                                     \
           paged_attention_decode_windowed_hd##HD##_g##GT##_f16)(                              \
            elem_t* __restrict__ out, float* __restrict__ partial_out,                         \
            float* __restrict__ partial_ml, int32_t* __restrict__ semaphores,                  \
            const elem_t* __restrict__ q, const elem_t* __restrict__ k_new,                    \
            const elem_t* __restrict__ v_new, int qkv_stride, elem_t* __restrict__ key_cache, \
            elem_t* __restrict__ value_cache, const int32_t* __restrict__ block_tables,        \
            const int32_t* __restrict__ context_lens, const int32_t* __restrict__ positions,   \
            const int32_t* __restrict__ slot_mapping, const float* __restrict__ inv_freq,      \
            float scale, int num_heads, int num_kv_heads, int block_size,                      \
            int max_blocks_per_seq, int target_partitions, int window, float softcap) {        \
        decode_attention<HD, GT, kStages>(                                                     \
            out, partial_out, partial_ml, semaphores, q, k_new, v_new, qkv_stride, key_cache,  \
            value_cache, block_tables, context_lens, positions, slot_mapping, inv_freq, scale, \
            num_heads, num_kv_heads, block_size, max_blocks_per_seq, target_partitions,        \
            window, softcap);                                                                  \
    }

RVLLM_DECODE_ATTENTION_WINDOWED(64, 1)
RVLLM_DECODE_ATTENTION_WINDOWED(64, 2)
RVLLM_DECODE_ATTENTION_WINDOWED(64, 4)
RVLLM_DECODE_ATTENTION_WINDOWED(64, 8)
RVLLM_DECODE_ATTENTION_WINDOWED(80, 1)
RVLLM_DECODE_ATTENTION_WINDOWED(80, 2)
RVLLM_DECODE_ATTENTION_WINDOWED(80, 4)
RVLLM_DECODE_ATTENTION_WINDOWED(80, 8)
RVLLM_DECODE_ATTENTION_WINDOWED(96, 1)
RVLLM_DECODE_ATTENTION_WINDOWED(96, 2)
RVLLM_DECODE_ATTENTION_WINDOWED(96, 4)
RVLLM_DECODE_ATTENTION_WINDOWED(96, 8)
RVLLM_DECODE_ATTENTION_WINDOWED(128, 1)
RVLLM_DECODE_ATTENTION_WINDOWED(128, 2)
RVLLM_DECODE_ATTENTION_WINDOWED(128, 4)
RVLLM_DECODE_ATTENTION_WINDOWED(128, 8)
RVLLM_DECODE_ATTENTION_WINDOWED(256, 1)
RVLLM_DECODE_ATTENTION_WINDOWED(256, 2)
RVLLM_DECODE_ATTENTION_WINDOWED(256, 4)
RVLLM_DECODE_ATTENTION_WINDOWED(256, 8)

// The FP8 (E4M3) KV cache's builds (`--kv-cache-dtype fp8`): the windowed kernel over a cache
// of one byte an element, dequantized times k_scale / v_scale (window and soft-cap 0: the
// plain attention). Batch 1 runs them too (no compact FP8 build); their partials merge through
// paged_attention_decode_reduce_windowed.
#define RVLLM_DECODE_ATTENTION_KV_FP8(HD, GT)                                                  \
    extern "C" __global__ void __launch_bounds__(kThreads, kMinBlocks(GT))                    \
        DT(paged_attention_decode_kvfp8_hd##HD##_g##GT,                                        \
           paged_attention_decode_kvfp8_hd##HD##_g##GT##_f16)(                                 \
            elem_t* __restrict__ out, float* __restrict__ partial_out,                         \
            float* __restrict__ partial_ml, int32_t* __restrict__ semaphores,                  \
            const elem_t* __restrict__ q, const elem_t* __restrict__ k_new,                    \
            const elem_t* __restrict__ v_new, int qkv_stride, uint8_t* __restrict__ key_cache, \
            uint8_t* __restrict__ value_cache, const int32_t* __restrict__ block_tables,       \
            const int32_t* __restrict__ context_lens, const int32_t* __restrict__ positions,   \
            const int32_t* __restrict__ slot_mapping, const float* __restrict__ inv_freq,      \
            float scale, int num_heads, int num_kv_heads, int block_size,                      \
            int max_blocks_per_seq, int target_partitions, int window, float softcap,          \
            float k_scale, float v_scale) {                                                    \
        decode_attention<HD, GT, kStages, kv_fp8_t>(                                           \
            out, partial_out, partial_ml, semaphores, q, k_new, v_new, qkv_stride, key_cache,  \
            value_cache, block_tables, context_lens, positions, slot_mapping, inv_freq, scale, \
            num_heads, num_kv_heads, block_size, max_blocks_per_seq, target_partitions,        \
            window, softcap, k_scale, v_scale);                                                \
    }

RVLLM_DECODE_ATTENTION_KV_FP8(64, 1)
RVLLM_DECODE_ATTENTION_KV_FP8(64, 2)
RVLLM_DECODE_ATTENTION_KV_FP8(64, 4)
RVLLM_DECODE_ATTENTION_KV_FP8(64, 8)
RVLLM_DECODE_ATTENTION_KV_FP8(80, 1)
RVLLM_DECODE_ATTENTION_KV_FP8(80, 2)
RVLLM_DECODE_ATTENTION_KV_FP8(80, 4)
RVLLM_DECODE_ATTENTION_KV_FP8(80, 8)
RVLLM_DECODE_ATTENTION_KV_FP8(96, 1)
RVLLM_DECODE_ATTENTION_KV_FP8(96, 2)
RVLLM_DECODE_ATTENTION_KV_FP8(96, 4)
RVLLM_DECODE_ATTENTION_KV_FP8(96, 8)
RVLLM_DECODE_ATTENTION_KV_FP8(128, 1)
RVLLM_DECODE_ATTENTION_KV_FP8(128, 2)
RVLLM_DECODE_ATTENTION_KV_FP8(128, 4)
RVLLM_DECODE_ATTENTION_KV_FP8(128, 8)
RVLLM_DECODE_ATTENTION_KV_FP8(256, 1)
RVLLM_DECODE_ATTENTION_KV_FP8(256, 2)
RVLLM_DECODE_ATTENTION_KV_FP8(256, 4)
RVLLM_DECODE_ATTENTION_KV_FP8(256, 8)

namespace {

// Combines the partitions of one (sequence, head): weights w_p = l_p * 2^(m_p - M) in shared
// memory, then every thread sums a float4 column slice over a strided subset of the partitions
// (many independent loads in flight, instead of one long dependent loop), and the slices are
// added in shared memory.
// `window` as the windowed kernel took it (0 for the plain ones).
__device__ __forceinline__ void decode_reduce(elem_t* __restrict__ out,
                                              const float* __restrict__ partial_out,
                                              const float* __restrict__ partial_ml,
                                              const int32_t* __restrict__ context_lens,
                                              int num_heads, int head_dim, int max_partitions,
                                              int target_partitions, int window) {
    // The next kernel (at batch 1 the O projection's GEMV) may start at once: it streams its
    // weights while the attention blocks run, and its own pdl_wait still waits for this
    // kernel, which waits for them. (Attention itself triggers only after its wait: every one
    // of its blocks is then placed, so nothing launched early can crowd them out.)
    BlockTrace trace(2);
    pdl_launch_dependents();
    pdl_wait();
    trace.mark_waited();
    __shared__ float w[kMaxReducePartitions];
    __shared__ __align__(16) float red[kReduceThreads * 4];
    __shared__ float scratch[32];
    const int head = blockIdx.x;
    const int seq = blockIdx.y;
    const int tid = threadIdx.x;
    const int nthreads = blockDim.x;  // 128 or 256 (kReduceThreads at most)
    const int ctx = context_lens[seq];
    const int len = ctx - window_first(ctx, window);  // the tokens the partitions cut
    const int partition_size = partition_tokens(len, target_partitions);
    // Partials: one per block that had a partition. One alone wrote `out` itself.
    const int nparts = min((len + partition_size - 1) / partition_size,
                           min(max_partitions, kMaxReducePartitions));
    if (nparts <= 1) return;
    const int64_t base = ((int64_t)seq * num_heads + head) * max_partitions;

    float m = -INFINITY;
    for (int p = tid; p < nparts; p += nthreads) m = fmaxf(m, partial_ml[(base + p) * 2]);
    m = block_max(m, scratch);
    float wsum = 0.0f;
    for (int p = tid; p < nparts; p += nthreads) {
        const float wp = partial_ml[(base + p) * 2 + 1] * exp2f(partial_ml[(base + p) * 2] - m);
        w[p] = wp;
        wsum += wp;
    }
    wsum = block_sum(wsum, scratch);  // its barriers also publish w[]

    const int cols = head_dim / 4;
    const int slices = nthreads / cols;
    const int col = tid % cols;
    const int slice = tid / cols;
    float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if (slice < slices) {
#pragma unroll 4
        for (int p = slice; p < nparts; p += slices) {
            const float4 v =
                *reinterpret_cast<const float4*>(partial_out + (base + p) * head_dim + col * 4);
            const float wp = w[p];
            acc.x = fmaf(wp, v.x, acc.x);
            acc.y = fmaf(wp, v.y, acc.y);
            acc.z = fmaf(wp, v.z, acc.z);
            acc.w = fmaf(wp, v.w, acc.w);
        }
    }
    *reinterpret_cast<float4*>(&red[tid * 4]) = acc;
    __syncthreads();
    for (int d = tid; d < head_dim; d += nthreads) {
        float sum = 0.0f;
        for (int sl = 0; sl < slices; ++sl) sum += red[(sl * cols + d / 4) * 4 + d % 4];
        out[((int64_t)seq * num_heads + head) * head_dim + d] = from_f32(sum / wsum);
    }
}

}  // namespace

extern "C" __global__ void __launch_bounds__(kReduceThreads)
    DT(paged_attention_decode_reduce, paged_attention_decode_reduce_f16)(
        elem_t* __restrict__ out, const float* __restrict__ partial_out,
        const float* __restrict__ partial_ml, const int32_t* __restrict__ context_lens,
        int num_heads, int head_dim, int max_partitions, int target_partitions) {
    decode_reduce(out, partial_out, partial_ml, context_lens, num_heads, head_dim,
                  max_partitions, target_partitions, 0);
}

extern "C" __global__ void __launch_bounds__(kReduceThreads)
    DT(paged_attention_decode_reduce_windowed, paged_attention_decode_reduce_windowed_f16)(
        elem_t* __restrict__ out, const float* __restrict__ partial_out,
        const float* __restrict__ partial_ml, const int32_t* __restrict__ context_lens,
        int num_heads, int head_dim, int max_partitions, int target_partitions, int window) {
    decode_reduce(out, partial_out, partial_ml, context_lens, num_heads, head_dim,
                  max_partitions, target_partitions, window);
}
