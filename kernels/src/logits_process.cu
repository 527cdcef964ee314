// The logits of a step's sampled rows, from the LM head's output (elem_t) to what the
// samplers read (f32), with each row's logits processors applied on the way; and the
// logprobs of chosen tokens, from the raw (unprocessed) logits, as vLLM reports them.
// The CPU reference (reference.rs: apply_processors, top_logprobs) defines both.
//
// Kernels (extern "C"):
//   logits_process(out, raw, rows, row_slot, row_step, tables,
//                  temperatures, top_ks, top_ps, min_ps, seeds, offsets)
//     raw: elem_t [rows, vocab]; out: f32 [rows, vocab]. Row r belongs to slot row_slot[r]
//     (-1: a padding row, sampled greedily and unprocessed) at sampling step row_step[r].
//     Per element, in vLLM's order: NaN -> -inf; not in allowed_token_ids -> -inf;
//     + logit_bias; repetition penalty on tokens of the prompt or the output (l > 0 ? l / rp :
//     l * rp); minus frequency * count + presence for tokens in the output. Every operation
//     is rounded as the CPU reference rounds it (no fused or approximate arithmetic).
//     Block (0, r) also writes row r's sampling parameters into the samplers' per-row arrays
//     (the draw's offset is the row's step). min_tokens and bad words: logits_mask, after.
//     grid (chunks, rows), block 256.
//   token_logprobs(out_logprob, out_rank, out_ids, out_vals, k_stride, raw, vocab, chosen,
//                  row_k)
//     For each row with row_k[r] >= 0: the log-softmax of raw row r at chosen[r] and its
//     rank (how many values are >= it), and the row_k[r] (<= k_stride) largest, largest
//     first, the lower id first on ties, into out_ids / out_vals [rows, k_stride]. NaN counts
//     as -inf. Rows with row_k < 0 are skipped.
//     grid (rows), block 512.
#include "common.cuh"
#include "sampling_state.cuh"

namespace {

constexpr int kLogprobThreads = 512;

__device__ __forceinline__ bool bit_set(const uint32_t* mask, int i) {
    return (mask[i >> 5] >> (i & 31)) & 1u;
}

// The slot's bias for `tok` (0 when it has none): binary search of the sorted entries.
__device__ __forceinline__ float bias_of(const BiasEntry* b, int n, int tok) {
    int lo = 0, hi = n;
    while (lo < hi) {
        const int mid = (lo + hi) >> 1;
        if (b[mid].token < tok) lo = mid + 1; else hi = mid;
    }
    return lo < n && b[lo].token == tok ? b[lo].value : 0.0f;
}

// Order-preserving key of a 16-bit float; NaN ranks as -inf.
__device__ __forceinline__ uint32_t key16(elem_t v) {
    const elem_t w = isnan(to_f32(v)) ? from_f32(-INFINITY) : v;
    const uint32_t u = *reinterpret_cast<const unsigned short*>(&w);
    return (u & 0x8000u) ? (~u & 0xffffu) : (u | 0x8000u);
}

__device__ __forceinline__ float value_of(elem_t v) {
    const float f = to_f32(v);
    return isnan(f) ? -INFINITY : f;
}

}  // namespace

extern "C" __global__ void __launch_bounds__(256) DT(logits_process_bf16, logits_process_f16)(
    float* __restrict__ out, const elem_t* __restrict__ raw, int rows,
    const int32_t* __restrict__ row_slot, const int32_t* __restrict__ row_step,
    const SamplingTables* __restrict__ tables, float* __restrict__ temperatures,
    int32_t* __restrict__ top_ks, float* __restrict__ top_ps, float* __restrict__ min_ps,
    uint64_t* __restrict__ seeds, uint64_t* __restrict__ offsets) {
    pdl_enter();
    const int r = blockIdx.y;
    if (r >= rows) return;
    const SamplingTables t = *tables;
    const int64_t s = row_slot[r];
    SlotParams p{};
    if (s >= 0) p = t.params[s];
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        temperatures[r] = s >= 0 ? p.temperature : 0.0f;
        top_ks[r] = s >= 0 ? p.top_k : 0;
        top_ps[r] = s >= 0 ? p.top_p : 1.0f;
        min_ps[r] = s >= 0 ? p.min_p : 0.0f;
        seeds[r] = p.seed;
        offsets[r] = (uint64_t)(int64_t)row_step[r];
    }
    const int flags = s >= 0 ? p.flags : 0;
    const int vocab = t.vocab;
    const elem_t* in = raw + (int64_t)r * vocab;
    float* o = out + (int64_t)r * vocab;
    const uint32_t* allowed = t.allowed_mask + (s >= 0 ? s : 0) * t.words;
    const uint32_t* prompt = t.prompt_mask + (s >= 0 ? s : 0) * t.words;
    const uint16_t* counts = t.counts + (s >= 0 ? s : 0) * vocab;
    const BiasEntry* bias = t.bias + (s >= 0 ? s : 0) * RVLLM_BIAS_CAP;
    const int n_bias = min(p.n_bias, RVLLM_BIAS_CAP);
    const float rp = p.repetition_penalty;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < vocab; i += gridDim.x * blockDim.x) {
        float v = to_f32(in[i]);
        if (isnan(v)) v = -INFINITY;
        if (flags) {
            if ((flags & RVLLM_SLOT_ALLOWED) && !bit_set(allowed, i)) v = -INFINITY;
            if (flags & RVLLM_SLOT_BIAS) v = __fadd_rn(v, bias_of(bias, n_bias, i));
            if (flags & RVLLM_SLOT_PENALTIES) {
                const unsigned c = counts[i];
                if (rp != 1.0f && (c > 0 || bit_set(prompt, i))) {
                    v = v > 0.0f ? __fdiv_rn(v, rp) : __fmul_rn(v, rp);
                }
                if (c > 0) {
                    const float sub = __fadd_rn(__fmul_rn(p.frequency_penalty, (float)c),
                                                p.presence_penalty);
                    v = __fsub_rn(v, sub);
                }
            }
        }
        o[i] = v;
    }
}

extern "C" __global__ void __launch_bounds__(kLogprobThreads) DT(token_logprobs_bf16, token_logprobs_f16)(
    float* __restrict__ out_logprob, int32_t* __restrict__ out_rank, int32_t* __restrict__ out_ids,
    float* __restrict__ out_vals, int k_stride, const elem_t* __restrict__ raw, int vocab,
    const int32_t* __restrict__ chosen, const int32_t* __restrict__ row_k) {
    pdl_enter();
    __shared__ float red_m[kLogprobThreads / 32];
    __shared__ float red_s[kLogprobThreads / 32];
    __shared__ int red_c[kLogprobThreads / 32];
    __shared__ int hist[256];
    __shared__ int sel[2];
    __shared__ int n_list;
    __shared__ int list_id[64];
    __shared__ uint32_t list_key[64];
    const int r = blockIdx.x;
    const int k = min(row_k[r], min(k_stride, 64));
    if (row_k[r] < 0) return;
    const elem_t* row = raw + (int64_t)r * vocab;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int tok = chosen[r];
    const bool tok_ok = tok >= 0 && tok < vocab;
    const uint32_t tok_key = tok_ok ? key16(row[tok]) : 0u;

    // Max, sum of exponentials (online), and the chosen token's rank.
    float m = -INFINITY, sum = 0.0f;
    int above = 0;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float v = value_of(row[i]);
        if (v > m) {
            sum = (m == -INFINITY ? 0.0f : sum * __expf(m - v)) + 1.0f;
            m = v;
        } else if (v != -INFINITY) {
            sum += __expf(v - m);
        }
        above += key16(row[i]) >= tok_key;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float m2 = __shfl_xor_sync(0xffffffffu, m, o);
        const float s2 = __shfl_xor_sync(0xffffffffu, sum, o);
        const float mm = fmaxf(m, m2);
        sum = (m == -INFINITY ? 0.0f : sum * __expf(m - mm)) +
              (m2 == -INFINITY ? 0.0f : s2 * __expf(m2 - mm));
        m = mm;
        above += __shfl_xor_sync(0xffffffffu, above, o);
    }
    if (lane == 0) {
        red_m[warp] = m;
        red_s[warp] = sum;
        red_c[warp] = above;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        float M = -INFINITY, S = 0.0f;
        int C = 0;
        for (int w = 0; w < kLogprobThreads / 32; ++w) {
            const float mm = fmaxf(M, red_m[w]);
            S = (M == -INFINITY ? 0.0f : S * __expf(M - mm)) +
                (red_m[w] == -INFINITY ? 0.0f : red_s[w] * __expf(red_m[w] - mm));
            M = mm;
            C += red_c[w];
        }
        red_m[0] = M;
        red_s[0] = logf(S);
        out_rank[r] = tok_ok ? C : vocab + 1;
        const bool finite = M != -INFINITY && M != INFINITY;
        out_logprob[r] = tok_ok && finite && value_of(row[tok]) != -INFINITY
                             ? (value_of(row[tok]) - M) - logf(S)
                             : -INFINITY;
        n_list = 0;
    }
    __syncthreads();
    const float M = red_m[0], lnS = red_s[0];
    if (k <= 0) return;

    // The k-th largest key: two radix passes of 8 bits over the 16-bit keys.
    uint32_t prefix = 0;
    int need = k, greater = 0;
    for (int pass = 0; pass < 2; ++pass) {
        const int shift = pass == 0 ? 8 : 0;
        for (int b = threadIdx.x; b < 256; b += blockDim.x) hist[b] = 0;
        __syncthreads();
        for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
            const uint32_t key = key16(row[i]);
            if (pass == 1 && (key >> 8) != prefix) continue;
            atomicAdd(&hist[(key >> shift) & 255u], 1);
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            int cum = 0, digit = 0;
            for (int b = 255; b >= 0; --b) {
                if (cum + hist[b] >= need) { digit = b; break; }
                cum += hist[b];
            }
            sel[0] = digit;
            sel[1] = cum;
        }
        __syncthreads();
        prefix = pass == 0 ? (uint32_t)sel[0] : (prefix << 8) | (uint32_t)sel[0];
        need -= sel[1];
        greater += sel[1];
        __syncthreads();
    }
    const uint32_t kth = prefix;
    // Every key above the k-th (fewer than k of them), then the lowest ids among its ties.
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        const uint32_t key = key16(row[i]);
        if (key > kth) {
            const int at = atomicAdd(&n_list, 1);
            if (at < 64) { list_id[at] = i; list_key[at] = key; }
        }
    }
    __syncthreads();
    // Ties are taken in id order, a block-wide chunk at a time: `taken` of them already sit
    // after the `greater` keys above the k-th.
    int ties_left = k - greater, taken = 0;
    for (int base = 0; base < vocab && ties_left > 0; base += blockDim.x) {
        const int i = base + threadIdx.x;
        const bool tie = i < vocab && key16(row[i]) == kth;
        const unsigned ballot = __ballot_sync(0xffffffffu, tie);
        if (lane == 0) red_c[warp] = __popc(ballot);
        __syncthreads();
        int before = 0, total = 0;
        for (int w = 0; w < kLogprobThreads / 32; ++w) {
            if (w < warp) before += red_c[w];
            total += red_c[w];
        }
        before += __popc(ballot & ((1u << lane) - 1u));
        if (tie && before < ties_left) {
            const int at = greater + taken + before;
            if (at < 64) { list_id[at] = i; list_key[at] = kth; }
        }
        taken += min(total, ties_left);
        ties_left -= total;
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        // Insertion sort: key descending, id ascending.
        for (int a = 1; a < k; ++a) {
            const int id = list_id[a];
            const uint32_t key = list_key[a];
            int b = a - 1;
            while (b >= 0 && (list_key[b] < key || (list_key[b] == key && list_id[b] > id))) {
                list_id[b + 1] = list_id[b];
                list_key[b + 1] = list_key[b];
                --b;
            }
            list_id[b + 1] = id;
            list_key[b + 1] = key;
        }
        const bool finite = M != -INFINITY && M != INFINITY;
        for (int a = 0; a < k; ++a) {
            const float v = value_of(row[list_id[a]]);
            out_ids[(int64_t)r * k_stride + a] = list_id[a];
            out_vals[(int64_t)r * k_stride + a] = finite && v != -INFINITY ? (v - M) - lnS : -INFINITY;
        }
    }
}
