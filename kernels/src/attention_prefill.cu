// Prefill attention over variable-length (chunked) prompts, attending to the paged KV cache.
//
// Kernels (all extern "C"):
//   paged_attention_prefill_hd{64,128}(out, q, key_cache, value_cache, cu_seqlens_q,
//       context_lens, block_tables, scale, num_heads, num_kv_heads, block_size,
//       max_blocks_per_seq, q_stride)
//     out: bf16 [T, num_heads * HD]; q: bf16 [T, q_stride] (heads at the start of each row)
//     cu_seqlens_q: int32 [num_seqs + 1], the chunk of sequence s is rows
//        cu_seqlens_q[s] .. cu_seqlens_q[s+1] of q and out.
//     context_lens: int32 [num_seqs], tokens in the cache after this step (the chunk's own K/V
//        are already written there by rope_and_cache_bf16).
//     Causal with offset: with start = context_len - chunk_len, query i sees keys 0..start+i.
//   grid (ceil(max_chunk_len / 64), num_heads, num_seqs), block 128.
//   paged_attention_prefill_windowed_hd{64,80,96,128,256}(..., q_stride, window, softcap)
//     The same, plus: window > 0 is a sliding window (Mistral, Gemma's local layers): query i
//     (at position start + i) sees only keys > start + i - window, and key tiles wholly below
//     every row of the block are not read; softcap > 0 caps each scaled score s to
//     softcap * tanh(s / softcap) before the softmax (Gemma 2's attn_logit_softcapping).
//     0 turns either off. Head dim 256 streams 32-key tiles (64 would need 67 KiB of static
//     shared memory; 32 take 33 KiB).
//   paged_attention_prefill_kvfp8_hd{64,80,96,128,256}(..., window, softcap, k_scale, v_scale)
//     The windowed kernel over the FP8 (E4M3) KV cache (`--kv-cache-dtype fp8`): key_cache and
//     value_cache hold one byte an element, read as code * k_scale (v_scale), converted to the
//     compute type as the tiles are staged in shared memory.
//
// Flash-attention style: each warp owns 16 query rows, a block 64; K and V tiles of 64 keys are
// gathered from the paged cache into shared memory, S = Q K^T and O += P V run on the tensor
// cores (mma.sync m16n8k16, bf16 in, f32 accumulate) with an online softmax in registers.
#include "kv_fp8.cuh"

namespace {

constexpr int kBM = 64;  // query rows per block (16 per warp)
constexpr int kThreads = 128;
constexpr float kLog2e = 1.4426950408889634f;

__device__ __forceinline__ void mma_16816(float c[4], const uint32_t a[4], uint32_t b0,
                                               uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32." RVLLM_MMA_AB ".f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t pack_elem2(float lo, float hi) {
    elem2_t v = from_f32x2(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}

// Four 8x8 b16 matrices from shared memory; lane l gives the row address of row l % 8 of
// matrix l / 8. Without .trans lane T receives (row T/4, cols 2(T%4), +1) of each matrix; with
// .trans (rows 2(T%4), +1; col T/4), i.e. the mma B fragment of a row-major [k][n] tile.
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void* p) {
    const uint32_t a = (uint32_t)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], const void* p) {
    const uint32_t a = (uint32_t)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}

// CacheT: the cache's element type, elem_t or kv_fp8_t (the FP8 cache: each thread loads its
// 8 codes of a tile row, converts them times k_scale / v_scale to the compute type and stores
// them where cp.async would have, so the tiles and the MMA path are the same; the copy is
// synchronous, and the commit groups stay, empty, so the waits count the same).
template <int HD, int kBN, typename CacheT = elem_t>
__device__ __forceinline__ void prefill_attention(
    elem_t* __restrict__ out, const elem_t* __restrict__ q,
    const CacheT* __restrict__ key_cache, const CacheT* __restrict__ value_cache,
    const int32_t* __restrict__ cu_seqlens_q, const int32_t* __restrict__ context_lens,
    const int32_t* __restrict__ block_tables, float scale, int num_heads, int num_kv_heads,
    int block_size, int max_blocks_per_seq, int q_stride, int window, float softcap,
    float k_scale = 1.0f, float v_scale = 1.0f) {
    pdl_enter();
    constexpr int LD = HD + 8;  // padded row: conflict-free fragment reads
    constexpr int KSTEPS = HD / 16;
    constexpr int NT_S = kBN / 8;  // n-tiles of S
    constexpr int NT_O = HD / 8;   // n-tiles of O
    __shared__ __align__(16) uint16_t ks[kBN][LD];
    __shared__ __align__(16) uint16_t vs[kBN][LD];

    const int seq = blockIdx.z;
    const int head = blockIdx.y;
    const int q_begin = cu_seqlens_q[seq];
    const int q_len = cu_seqlens_q[seq + 1] - q_begin;
    // Heaviest (last, longest-causal) query tiles first, so that the grid's tail is short.
    const int row_base = (gridDim.x - 1 - blockIdx.x) * kBM;
    if (row_base >= q_len) return;
    const int ctx = context_lens[seq];
    const int start = ctx - q_len;
    const int kv_head = head / (num_heads / num_kv_heads);
    const int kend = min(ctx, start + min(q_len, row_base + kBM));  // exclusive
    // The block's first row sees keys from start + row_base - window + 1 on; the rows after
    // it see less far back. Tiles stay aligned to kBN from 0.
    const int kbegin = window > 0 ? max(0, start + row_base - window + 1) / kBN * kBN : 0;

    const int tid = threadIdx.x;
    const int warp = tid >> 5;
    const int lane = tid & 31;
    const int g = lane >> 2;
    const int t = lane & 3;
    const int row_a = row_base + warp * 16 + g;  // this thread's two rows
    const int row_b = row_a + 8;

    // Q fragments straight from global memory (read once per block).
    uint32_t qa[KSTEPS][4];
    {
        const elem_t* qa_row = q + (int64_t)(q_begin + row_a) * q_stride + head * HD;
        const elem_t* qb_row = q + (int64_t)(q_begin + row_b) * q_stride + head * HD;
        const bool va = row_a < q_len, vb = row_b < q_len;
#pragma unroll
        for (int kk = 0; kk < KSTEPS; ++kk) {
            const int c = kk * 16 + 2 * t;
            qa[kk][0] = va ? *reinterpret_cast<const uint32_t*>(qa_row + c) : 0u;
            qa[kk][1] = vb ? *reinterpret_cast<const uint32_t*>(qb_row + c) : 0u;
            qa[kk][2] = va ? *reinterpret_cast<const uint32_t*>(qa_row + c + 8) : 0u;
            qa[kk][3] = vb ? *reinterpret_cast<const uint32_t*>(qb_row + c + 8) : 0u;
        }
    }

    float o[NT_O][4];
#pragma unroll
    for (int n = 0; n < NT_O; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    float m_a = -INFINITY, m_b = -INFINITY, l_a = 0.0f, l_b = 0.0f;
    const float sl2 = scale * kLog2e;
    const int64_t kv_row = (int64_t)num_kv_heads * HD;
    const int32_t* table = block_tables + (int64_t)seq * max_blocks_per_seq;

    // K and V tiles are copied with cp.async (no registers, zero-filled past the end) in a
    // staggered pipeline: the next K tile loads while P V runs, the next V tile while Q K^T
    // runs. Commit groups alternate K, V, K, V...; `wait_group 1` leaves only the newest
    // group in flight.
    auto issue_tile = [&](uint16_t(*dst)[LD], const CacheT* __restrict__ cache, int kt) {
        if constexpr (is_kv_fp8<CacheT>()) {
            const float sc = cache == key_cache ? k_scale : v_scale;
            for (int idx = tid; idx < kBN * (HD / 8); idx += kThreads) {
                const int r = idx / (HD / 8);
                const int c = (idx % (HD / 8)) * 8;
                const int key = kt + r;
                Elem8 v{};  // zeros past the end, as cp.async's zero fill
                if (key < kend) {
                    const int64_t slot =
                        (int64_t)table[key / block_size] * block_size + key % block_size;
                    const CacheT* src = cache + slot * kv_row + (int64_t)kv_head * HD + c;
                    float f[8];
                    kv_fp8x8_to_f32(*reinterpret_cast<const uint2*>(src), sc, f);
                    v = f32_to_elem8(f);
                }
                *reinterpret_cast<Elem8*>(&dst[r][c]) = v;
            }
        } else {
            for (int idx = tid; idx < kBN * (HD / 8); idx += kThreads) {
                const int r = idx / (HD / 8);
                const int c = (idx % (HD / 8)) * 8;
                const int key = kt + r;
                const uint32_t d = (uint32_t)__cvta_generic_to_shared(&dst[r][c]);
                if (key < kend) {
                    const int64_t slot = (int64_t)table[key / block_size] * block_size + key % block_size;
                    const CacheT* src = cache + slot * kv_row + (int64_t)kv_head * HD + c;
                    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(src));
                } else {
                    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, 0;\n" ::"r"(d), "l"(cache));
                }
            }
        }
        asm volatile("cp.async.commit_group;\n" ::);
    };
    issue_tile(ks, key_cache, kbegin);
    issue_tile(vs, value_cache, kbegin);

    for (int kt = kbegin; kt < kend; kt += kBN) {
        const bool more = kt + kBN < kend;
        asm volatile("cp.async.wait_group 1;\n" ::);  // K tile kt has landed
        __syncthreads();

        // S = Q K^T for this warp's 16 rows and the tile's 64 keys.
        float s[NT_S][4];
#pragma unroll
        for (int n = 0; n < NT_S; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
        // One ldmatrix.x4 yields the B fragments of two n-tiles: matrices (keys +0..7, dims
        // +0..7), (keys +0..7, dims +8..15), (keys +8..15, dims +0..7), (keys +8..15, dims +8..15).
        const int lm_j = lane >> 3, lm_r = lane & 7;
#pragma unroll
        for (int kk = 0; kk < KSTEPS; ++kk) {
#pragma unroll
            for (int n = 0; n < NT_S; n += 2) {
                uint32_t b[4];
                ldmatrix_x4(b, &ks[n * 8 + lm_r + 8 * (lm_j >> 1)][kk * 16 + 8 * (lm_j & 1)]);
                mma_16816(s[n], qa[kk], b[0], b[1]);
                mma_16816(s[n + 1], qa[kk], b[2], b[3]);
            }
        }

        // Scale to log2 units, mask (causal with offset, and the tile's tail), row maxima.
        float mx_a = -INFINITY, mx_b = -INFINITY;
#pragma unroll
        for (int n = 0; n < NT_S; ++n) {
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const int key = kt + n * 8 + 2 * t + (c & 1);
                const int row = c < 2 ? row_a : row_b;
                const bool ok = key < kend && key <= start + row &&
                                (window <= 0 || key > start + row - window);
                float v = s[n][c];
                // tanhf, which --use_fast_math may make the hardware approximation.
                if (softcap > 0.0f) v = softcap * tanhf(v * scale / softcap) * kLog2e;
                else v *= sl2;
                s[n][c] = ok ? v : -INFINITY;
            }
            mx_a = fmaxf(mx_a, fmaxf(s[n][0], s[n][1]));
            mx_b = fmaxf(mx_b, fmaxf(s[n][2], s[n][3]));
        }
#pragma unroll
        for (int off = 1; off < 4; off <<= 1) {
            mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, off));
            mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, off));
        }
        const float new_a = fmaxf(m_a, mx_a), new_b = fmaxf(m_b, mx_b);
        // A row with nothing visible yet keeps -inf; subtract 0 then so no inf - inf appears.
        const float use_a = new_a == -INFINITY ? 0.0f : new_a;
        const float use_b = new_b == -INFINITY ? 0.0f : new_b;
        const float alpha_a = exp2f(m_a - use_a), alpha_b = exp2f(m_b - use_b);
        m_a = new_a;
        m_b = new_b;
        l_a *= alpha_a;
        l_b *= alpha_b;
#pragma unroll
        for (int n = 0; n < NT_O; ++n) {
            o[n][0] *= alpha_a;
            o[n][1] *= alpha_a;
            o[n][2] *= alpha_b;
            o[n][3] *= alpha_b;
        }

        __syncthreads();  // every warp is done with ks: refill it while P V runs
        if (more) {
            issue_tile(ks, key_cache, kt + kBN);
        } else {
            asm volatile("cp.async.commit_group;\n" ::);  // keep the group count uniform
        }
        asm volatile("cp.async.wait_group 1;\n" ::);  // V tile kt has landed
        __syncthreads();

        // P (bf16) as the A operand: the accumulator layout of two adjacent n-tiles is the
        // A-fragment layout of one k=16 step.
#pragma unroll
        for (int kk = 0; kk < kBN / 16; ++kk) {
            float p[2][4];
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                p[h][0] = exp2f(s[2 * kk + h][0] - use_a);
                p[h][1] = exp2f(s[2 * kk + h][1] - use_a);
                p[h][2] = exp2f(s[2 * kk + h][2] - use_b);
                p[h][3] = exp2f(s[2 * kk + h][3] - use_b);
                l_a += p[h][0] + p[h][1];
                l_b += p[h][2] + p[h][3];
            }
            uint32_t pa[4];
            pa[0] = pack_elem2(p[0][0], p[0][1]);
            pa[1] = pack_elem2(p[0][2], p[0][3]);
            pa[2] = pack_elem2(p[1][0], p[1][1]);
            pa[3] = pack_elem2(p[1][2], p[1][3]);
            // Transposed loads of V (row-major [key][dim]): matrices (keys +0..7, dims +0..7),
            // (keys +8..15, dims +0..7), (keys +0..7, dims +8..15), (keys +8..15, dims +8..15).
#pragma unroll
            for (int n = 0; n < NT_O; n += 2) {
                uint32_t b[4];
                ldmatrix_x4_trans(b, &vs[kk * 16 + lm_r + 8 * (lm_j & 1)][n * 8 + 8 * (lm_j >> 1)]);
                mma_16816(o[n], pa, b[0], b[1]);
                mma_16816(o[n + 1], pa, b[2], b[3]);
            }
        }
        __syncthreads();  // every warp is done with vs
        if (more) {
            issue_tile(vs, value_cache, kt + kBN);
        } else {
            asm volatile("cp.async.commit_group;\n" ::);
        }
    }
    asm volatile("cp.async.wait_group 0;\n" ::);

    // Each thread summed only its own columns of l; the quad holds the whole row.
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
        l_a += __shfl_xor_sync(0xffffffffu, l_a, off);
        l_b += __shfl_xor_sync(0xffffffffu, l_b, off);
    }
    const float inv_a = l_a > 0.0f ? 1.0f / l_a : 0.0f;
    const float inv_b = l_b > 0.0f ? 1.0f / l_b : 0.0f;
    const int64_t out_stride = (int64_t)num_heads * HD;
#pragma unroll
    for (int n = 0; n < NT_O; ++n) {
        const int col = head * HD + n * 8 + 2 * t;
        if (row_a < q_len) {
            *reinterpret_cast<elem2_t*>(out + (q_begin + row_a) * out_stride + col) =
                from_f32x2(o[n][0] * inv_a, o[n][1] * inv_a);
        }
        if (row_b < q_len) {
            *reinterpret_cast<elem2_t*>(out + (q_begin + row_b) * out_stride + col) =
                from_f32x2(o[n][2] * inv_b, o[n][3] * inv_b);
        }
    }
}

}  // namespace

#define RVLLM_PREFILL_ATTENTION(HD, MINB)                                                         \
    extern "C" __global__ void __launch_bounds__(kThreads, MINB)                               \
        DT(paged_attention_prefill_hd##HD, paged_attention_prefill_hd##HD##_f16)(              \
        elem_t* __restrict__ out, const elem_t* __restrict__ q,                                \
        const elem_t* __restrict__ key_cache,                                                  \
        const elem_t* __restrict__ value_cache,                                                \
        const int32_t* __restrict__ cu_seqlens_q, const int32_t* __restrict__ context_lens,    \
        const int32_t* __restrict__ block_tables, float scale, int num_heads, int num_kv_heads, \
        int block_size, int max_blocks_per_seq, int q_stride) {                                \
        prefill_attention<HD, 64>(out, q, key_cache, value_cache, cu_seqlens_q, context_lens,  \
                                  block_tables, scale, num_heads, num_kv_heads, block_size,    \
                                  max_blocks_per_seq, q_stride, 0, 0.0f);                      \
    }

// Register caps for occupancy (ncu on the H100: 176 registers allowed 2 blocks per SM, 8 warps,
// and the kernel was latency-bound at 28% of SM throughput).
RVLLM_PREFILL_ATTENTION(64, 4)
RVLLM_PREFILL_ATTENTION(128, 3)

// The windowed / soft-capped builds and the other head dims (not yet run on a GPU; the
// engine does not launch them yet). Head dim 256 holds 64 q and 128 accumulator registers a
// thread, so it takes one block an SM's register cap.
#define RVLLM_PREFILL_ATTENTION_WINDOWED(HD, BN, MINB)                                            \
    extern "C" __global__ void __launch_bounds__(kThreads, MINB)                               \
        DT(paged_attention_prefill_windowed_hd##HD,                                            \
           paged_attention_prefill_windowed_hd##HD##_f16)(                                     \
        elem_t* __restrict__ out, const elem_t* __restrict__ q,                                \
        const elem_t* __restrict__ key_cache,                                                  \
        const elem_t* __restrict__ value_cache,                                                \
        const int32_t* __restrict__ cu_seqlens_q, const int32_t* __restrict__ context_lens,    \
        const int32_t* __restrict__ block_tables, float scale, int num_heads, int num_kv_heads, \
        int block_size, int max_blocks_per_seq, int q_stride, int window, float softcap) {     \
        prefill_attention<HD, BN>(out, q, key_cache, value_cache, cu_seqlens_q, context_lens,  \
                                  block_tables, scale, num_heads, num_kv_heads, block_size,    \
                                  max_blocks_per_seq, q_stride, window, softcap);              \
    }

RVLLM_PREFILL_ATTENTION_WINDOWED(64, 64, 4)
RVLLM_PREFILL_ATTENTION_WINDOWED(80, 64, 3)
RVLLM_PREFILL_ATTENTION_WINDOWED(96, 64, 3)
RVLLM_PREFILL_ATTENTION_WINDOWED(128, 64, 3)
RVLLM_PREFILL_ATTENTION_WINDOWED(256, 32, 1)

// The FP8 (E4M3) KV cache's builds (`--kv-cache-dtype fp8`): the windowed kernel reading a
// cache of one byte an element, dequantized times k_scale / v_scale while the tiles are
// staged (window and soft-cap 0: the plain attention).
#define RVLLM_PREFILL_ATTENTION_KV_FP8(HD, BN, MINB)                                              \
    extern "C" __global__ void __launch_bounds__(kThreads, MINB)                               \
        DT(paged_attention_prefill_kvfp8_hd##HD, paged_attention_prefill_kvfp8_hd##HD##_f16)(  \
        elem_t* __restrict__ out, const elem_t* __restrict__ q,                                \
        const uint8_t* __restrict__ key_cache,                                                 \
        const uint8_t* __restrict__ value_cache,                                               \
        const int32_t* __restrict__ cu_seqlens_q, const int32_t* __restrict__ context_lens,    \
        const int32_t* __restrict__ block_tables, float scale, int num_heads, int num_kv_heads, \
        int block_size, int max_blocks_per_seq, int q_stride, int window, float softcap,       \
        float k_scale, float v_scale) {                                                        \
        prefill_attention<HD, BN, kv_fp8_t>(out, q, key_cache, value_cache, cu_seqlens_q,      \
                                            context_lens, block_tables, scale, num_heads,      \
                                            num_kv_heads, block_size, max_blocks_per_seq,      \
                                            q_stride, window, softcap, k_scale, v_scale);      \
    }

RVLLM_PREFILL_ATTENTION_KV_FP8(64, 64, 4)
RVLLM_PREFILL_ATTENTION_KV_FP8(80, 64, 3)
RVLLM_PREFILL_ATTENTION_KV_FP8(96, 64, 3)
RVLLM_PREFILL_ATTENTION_KV_FP8(128, 64, 3)
RVLLM_PREFILL_ATTENTION_KV_FP8(256, 32, 1)
