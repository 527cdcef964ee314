// Paged attention for decode: one query token per sequence, reading K/V from the paged cache.
//
// Kernels (all extern "C"):
//   paged_attention_decode_hd{64,128}_g{1,2,4,8}(
//       out, partial_out, partial_ml, q, key_cache, value_cache, block_tables, context_lens,
//       scale, num_heads, num_kv_heads, block_size, max_blocks_per_seq, q_stride,
//       target_partitions)
//     out:          bf16 [num_seqs, num_heads * HD]
//     partial_out:  f32  [num_seqs, num_heads, max_partitions, HD]   (split-K scratch)
//     partial_ml:   f32  [num_seqs, num_heads, max_partitions, 2]    (max in log2 units, sum)
//     q:            bf16 [num_seqs, q_stride], heads at the start of the row
//     key_cache, value_cache: bf16 [num_blocks, block_size, num_kv_heads, HD]
//     block_tables: int32 [num_seqs, max_blocks_per_seq]; context_lens: int32 [num_seqs]
//     target_partitions: how many pieces each sequence's context is split into, at most.
//       A sequence of `ctx` tokens is cut into partitions of partition_tokens(ctx, target)
//       tokens: ceil(ctx / target) rounded up to a multiple of 64, at least 64 and at most
//       512 (so a context over 512 * target tokens gets more than `target` partitions).
//   grid (num_kv_heads * ceil(G / GT), num_seqs, max_partitions), block 128, where
//   G = num_heads / num_kv_heads and max_partitions >= max(target, ceil(max context / 512));
//   blocks past a sequence's last partition exit at once. A sequence that fits in one
//   partition is written to `out` directly; the others write each partition's normalised
//   partial output and (max, sum), and paged_attention_decode_reduce combines them (it skips
//   the one-partition sequences, so it is launched whenever max_partitions > 1).
//
//   (A variant that fused this reduce into the last partition block, via an atomic counter,
//   measured slower in every configuration on the H100 (e.g. 11.1 vs 8.3 us at batch 1,
//   context 384): the single finishing block serialises the combine. Removed.)
//
//   paged_attention_decode_reduce(out, partial_out, partial_ml, context_lens, num_heads,
//                                 head_dim, max_partitions, target_partitions)
//     grid (num_heads, num_seqs), block 256 (128 works); head_dim a multiple of 4, at most 256;
//     max_partitions at most 2048 (e.g. partition 64 up to a 128k context).
//
//   Choosing target_partitions (host, from the batch size alone so that one CUDA graph serves
//   every context): enough blocks for ~2 per SM, num_kv_heads * num_seqs * target >= 2 * SMs.
//   Batch 1 then cuts a 384-token context into 6 partitions of 64 (48 blocks instead of 2 of
//   256); large batches keep one partition per sequence and skip the reduce. On an H200 a
//   fixed 256-token partition cost 14 us a layer at batch 1 and, with its reduce, 30 % of the
//   decode attention time at batch 512 (kernel profile, 2026-11-29).
//
// Why this shape: decode attention is a pure stream over the KV cache, so each block owns one
// KV head and up to GT query heads of its group (GQA): K and V are read from memory once for
// the whole group. Each key row is read by HD/16 lanes with 16-byte loads (two per lane), four
// tokens' loads are issued before the first use so that enough bytes are in flight, and the
// context is split into partitions so that batch 1 with a long context still fills the GPU.
#include "common.cuh"

namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxPartition = 512;
constexpr int kUnroll = 4;
constexpr float kLog2e = 1.4426950408889634f;
constexpr int kReduceThreads = 256;
constexpr int kMaxReducePartitions = 2048;

// Tokens in each partition of a `ctx`-token context split `target` ways (see the header).
__device__ __forceinline__ int partition_tokens(int ctx, int target) {
    const int t = max(target, 1);
    const int even = (ctx + t - 1) / t;
    return min(max((even + 63) / 64 * 64, 64), kMaxPartition);
}

template <int HD, int GT>
__device__ __forceinline__ void decode_attention(
    __nv_bfloat16* __restrict__ out, float* __restrict__ partial_out,
    float* __restrict__ partial_ml, const __nv_bfloat16* __restrict__ q,
    const __nv_bfloat16* __restrict__ key_cache, const __nv_bfloat16* __restrict__ value_cache,
    const int32_t* __restrict__ block_tables, const int32_t* __restrict__ context_lens,
    float scale, int num_heads, int num_kv_heads, int block_size, int max_blocks_per_seq,
    int q_stride, int target_partitions) {
    pdl_enter();
    constexpr int LPT = HD / 16;        // lanes per token: 16 dims (two 16-byte loads) each
    constexpr int TPW = 32 / LPT;       // tokens per warp per step
    constexpr int TPB = TPW * kWarps;   // tokens per block per step
    static_assert(HD % 16 == 0 && 32 % LPT == 0, "unsupported head dim");

    __shared__ float scores[GT][kMaxPartition];
    // Staging for the first V chunk, reused for the cross-warp sum at the end.
    constexpr int kStageBytes = kUnroll * kThreads * 2 * 16;
    constexpr int kRedBytes = kWarps * GT * HD * 4;
    __shared__ __align__(16) unsigned char staging[kStageBytes > kRedBytes ? kStageBytes : kRedBytes];
    auto vstage = reinterpret_cast<Bf16x8(*)[kThreads][2]>(staging);
    auto red = reinterpret_cast<float(*)[GT][HD]>(staging);
    __shared__ int32_t slots[kMaxPartition];
    __shared__ float head_max[GT], head_sum[GT];

    const int group = num_heads / num_kv_heads;
    const int groups_per_kv = (group + GT - 1) / GT;
    const int kv_head = blockIdx.x / groups_per_kv;
    const int head0 = kv_head * group + (blockIdx.x % groups_per_kv) * GT;
    const int nvalid = min(GT, kv_head * group + group - head0);  // heads of this block
    const int seq = blockIdx.y;
    const int part = blockIdx.z;
    const int ctx = context_lens[seq];
    const int partition_size = partition_tokens(ctx, target_partitions);
    const int start = part * partition_size;
    if (start >= ctx) return;
    const bool direct = ctx <= partition_size;  // one partition: no reduce for this sequence
    const int ntok = min(partition_size, ctx - start);

    const int tid = threadIdx.x;
    const int warp = tid >> 5;
    const int lane = tid & 31;
    const int tok_in_warp = lane / LPT;
    const int sub = lane % LPT;
    const int64_t kv_row = (int64_t)num_kv_heads * HD;
    const int64_t head_off = (int64_t)kv_head * HD + sub * 8;

    // Physical cache slot of every token of the partition, looked up once.
    const int32_t* table = block_tables + (int64_t)seq * max_blocks_per_seq;
    for (int i = tid; i < ntok; i += kThreads) {
        const int t = start + i;
        slots[i] = table[t / block_size] * block_size + t % block_size;
    }

    // This lane's slice of each query head, pre-scaled so scores come out in log2 units.
    float qf[GT][16];
#pragma unroll
    for (int g = 0; g < GT; ++g) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            float f[8];
            if (g < nvalid) {
                const Bf16x8 v = *reinterpret_cast<const Bf16x8*>(
                    q + (int64_t)seq * q_stride + (int64_t)(head0 + g) * HD + j * (HD / 2) +
                    sub * 8);
                bf16x8_to_f32(v, f);
            } else {
#pragma unroll
                for (int e = 0; e < 8; ++e) f[e] = 0.0f;
            }
#pragma unroll
            for (int e = 0; e < 8; ++e) qf[g][j * 8 + e] = f[e] * scale * kLog2e;
        }
    }
    __syncthreads();

    // Loads the K or V rows of chunk `base` (kUnroll steps of TPB tokens): 16 bytes x2 per lane.
    auto load_chunk = [&](const __nv_bfloat16* __restrict__ cache, int base,
                          Bf16x8(&dst)[kUnroll][2]) {
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            const int ti = base + u * TPB + warp * TPW + tok_in_warp;
            if (ti < ntok) {
                const __nv_bfloat16* row = cache + (int64_t)slots[ti] * kv_row + head_off;
                dst[u][0] = *reinterpret_cast<const Bf16x8*>(row);
                dst[u][1] = *reinterpret_cast<const Bf16x8*>(row + HD / 2);
            } else {
                dst[u][0] = Bf16x8{};
                dst[u][1] = Bf16x8{};
            }
        }
    };
    constexpr int kChunk = TPB * kUnroll;

    // Phase 1: scores = q . k for every token of the partition. The first chunk's V is loaded
    // together with the first K (for short contexts that is all of V: one memory round trip
    // saved). Holding it or the next K chunk in registers was tried: 165-211 registers for
    // GT=4, a third to half less occupancy.
    // The first V chunk goes straight to shared memory (cp.async, no registers held during
    // phase 1); each lane later reads back exactly the 32 bytes it copied, so no barrier.
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
        const int ti = u * TPB + warp * TPW + tok_in_warp;
        if (ti < ntok) {
            const __nv_bfloat16* row = value_cache + (int64_t)slots[ti] * kv_row + head_off;
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                const uint32_t dst = (uint32_t)__cvta_generic_to_shared(&vstage[u][tid][j]);
                asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst),
                             "l"(row + j * (HD / 2)));
            }
        }
    }
    asm volatile("cp.async.commit_group;\n" ::);
    for (int base = 0; base < ntok; base += kChunk) {
        Bf16x8 kbuf[kUnroll][2];
        load_chunk(key_cache, base, kbuf);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            float kf[16];
            bf16x8_to_f32(kbuf[u][0], kf);
            bf16x8_to_f32(kbuf[u][1], kf + 8);
            const int ti = base + u * TPB + warp * TPW + tok_in_warp;
#pragma unroll
            for (int g = 0; g < GT; ++g) {
                float dot = 0.0f;
#pragma unroll
                for (int e = 0; e < 16; ++e) dot = fmaf(qf[g][e], kf[e], dot);
#pragma unroll
                for (int o = LPT / 2; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
                if (sub == g % LPT && ti < ntok) scores[g][ti] = dot;
            }
        }
    }
    __syncthreads();

    // Phase 2: softmax numerators per head, one warp per head.
    for (int g = warp; g < GT; g += kWarps) {
        float m = -INFINITY;
        for (int i = lane; i < ntok; i += 32) m = fmaxf(m, scores[g][i]);
        m = warp_max(m);
        float s = 0.0f;
        for (int i = lane; i < ntok; i += 32) {
            const float p = exp2f(scores[g][i] - m);
            scores[g][i] = p;
            s += p;
        }
        s = warp_sum(s);
        if (lane == 0) {
            head_max[g] = m;
            head_sum[g] = s;
        }
    }
    __syncthreads();

    // Phase 3: acc = sum_t p_t * v_t.
    float acc[GT][16];
#pragma unroll
    for (int g = 0; g < GT; ++g)
#pragma unroll
        for (int e = 0; e < 16; ++e) acc[g][e] = 0.0f;
    asm volatile("cp.async.wait_group 0;\n" ::);
    for (int base = 0; base < ntok; base += kChunk) {
        Bf16x8 vfirst[kUnroll][2];
        if (base == 0) {
#pragma unroll
            for (int u = 0; u < kUnroll; ++u) {
                vfirst[u][0] = vstage[u][tid][0];
                vfirst[u][1] = vstage[u][tid][1];
            }
        } else {
            load_chunk(value_cache, base, vfirst);
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            const int ti = base + u * TPB + warp * TPW + tok_in_warp;
            if (ti < ntok) {
                float vf[16];
                bf16x8_to_f32(vfirst[u][0], vf);
                bf16x8_to_f32(vfirst[u][1], vf + 8);
#pragma unroll
                for (int g = 0; g < GT; ++g) {
                    const float p = scores[g][ti];
#pragma unroll
                    for (int e = 0; e < 16; ++e) acc[g][e] = fmaf(p, vf[e], acc[g][e]);
                }
            }
        }
    }
    // Sum the warp's token groups (lanes that share `sub`), then the warps via shared memory.
#pragma unroll
    for (int g = 0; g < GT; ++g)
#pragma unroll
        for (int e = 0; e < 16; ++e)
#pragma unroll
            for (int o = LPT; o < 32; o <<= 1)
                acc[g][e] += __shfl_xor_sync(0xffffffffu, acc[g][e], o);
    __syncthreads();  // every warp is done with its staged V before `red` overwrites it
    if (tok_in_warp == 0) {
#pragma unroll
        for (int g = 0; g < GT; ++g)
#pragma unroll
            for (int j = 0; j < 2; ++j)
#pragma unroll
                for (int e = 0; e < 8; ++e)
                    red[warp][g][j * (HD / 2) + sub * 8 + e] = acc[g][j * 8 + e];
    }
    __syncthreads();

    for (int idx = tid; idx < nvalid * HD; idx += kThreads) {
        const int g = idx / HD;
        const int d = idx % HD;
        float s = 0.0f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) s += red[w][g][d];
        const float o = s / head_sum[g];
        const int head = head0 + g;
        if (direct) {
            out[((int64_t)seq * num_heads + head) * HD + d] = __float2bfloat16(o);
        } else {
            const int64_t pi = ((int64_t)seq * num_heads + head) * gridDim.z + part;
            partial_out[pi * HD + d] = o;
            if (d == 0) {
                partial_ml[pi * 2] = head_max[g];
                partial_ml[pi * 2 + 1] = head_sum[g];
            }
        }
    }
}

}  // namespace

#define RVLLM_DECODE_ATTENTION(HD, GT)                                                         \
    extern "C" __global__ void __launch_bounds__(kThreads)                                     \
        paged_attention_decode_hd##HD##_g##GT(                                                 \
            __nv_bfloat16* __restrict__ out, float* __restrict__ partial_out,                  \
            float* __restrict__ partial_ml, const __nv_bfloat16* __restrict__ q,               \
            const __nv_bfloat16* __restrict__ key_cache,                                       \
            const __nv_bfloat16* __restrict__ value_cache,                                     \
            const int32_t* __restrict__ block_tables, const int32_t* __restrict__ context_lens, \
            float scale, int num_heads, int num_kv_heads, int block_size,                      \
            int max_blocks_per_seq, int q_stride, int target_partitions) {                     \
        decode_attention<HD, GT>(out, partial_out, partial_ml, q, key_cache, value_cache,      \
                                 block_tables, context_lens, scale, num_heads, num_kv_heads,   \
                                 block_size, max_blocks_per_seq, q_stride, target_partitions); \
    }

RVLLM_DECODE_ATTENTION(64, 1)
RVLLM_DECODE_ATTENTION(64, 2)
RVLLM_DECODE_ATTENTION(64, 4)
RVLLM_DECODE_ATTENTION(64, 8)
RVLLM_DECODE_ATTENTION(128, 1)
RVLLM_DECODE_ATTENTION(128, 2)
RVLLM_DECODE_ATTENTION(128, 4)
RVLLM_DECODE_ATTENTION(128, 8)

// Combines the partitions of one (sequence, head): weights w_p = l_p * 2^(m_p - M) in shared
// memory, then every thread sums a float4 column slice over a strided subset of the partitions
// (many independent loads in flight, instead of one long dependent loop), and the slices are
// added in shared memory.
extern "C" __global__ void __launch_bounds__(kReduceThreads)
    paged_attention_decode_reduce(__nv_bfloat16* __restrict__ out,
                                  const float* __restrict__ partial_out,
                                  const float* __restrict__ partial_ml,
                                  const int32_t* __restrict__ context_lens, int num_heads,
                                  int head_dim, int max_partitions, int target_partitions) {
    pdl_enter();
    __shared__ float w[kMaxReducePartitions];
    __shared__ __align__(16) float red[kReduceThreads * 4];
    __shared__ float scratch[32];
    const int head = blockIdx.x;
    const int seq = blockIdx.y;
    const int tid = threadIdx.x;
    const int nthreads = blockDim.x;  // 128 or 256 (kReduceThreads at most)
    const int ctx = context_lens[seq];
    const int partition_size = partition_tokens(ctx, target_partitions);
    // One partition: the attention kernel wrote `out` itself.
    if (ctx <= partition_size) return;
    const int nparts = min((ctx + partition_size - 1) / partition_size,
                           min(max_partitions, kMaxReducePartitions));
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
        out[((int64_t)seq * num_heads + head) * head_dim + d] = __float2bfloat16(sum / wsum);
    }
}
