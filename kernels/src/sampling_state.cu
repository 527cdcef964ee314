// The GPU sampler's per-request state (layouts in sampling_state.cuh): filled when a request
// joins, applied to a step's logits, and advanced by the step's own sampled tokens.
//
// Kernels (extern "C"):
//   slot_init(tables, joins, data, n_joins)
//     joins: SlotJoin [n_joins]; data: int32, the lists the joins point into.
//     Writes each join's parameters into its slot and resets the slot's state: counts and
//     prompt mask (penalties), allowed mask, bias, stop ids and bad words from the lists; no
//     output recorded yet.
//     grid (n_joins), block 256.
//   logits_mask(logits, rows, row_slot, row_step, tables)
//     logits: f32 [rows, vocab], already through logits_process. Row r belongs to slot
//     row_slot[r] (-1: a padding row, left alone) at sampling step row_step[r]. While
//     row_step < min_tokens, the slot's stop ids (EOS unless ignore_eos, and stop_token_ids)
//     become -inf; every bad word whose other tokens end the output so far bans its last
//     token (vLLM's rule: words longer than the output plus one are skipped). Setting -inf
//     commutes with the bias and the penalties logits_process applied before.
//     grid (rows), block 128.
//   sample_commit(tokens, rows, row_slot, tables)
//     Records each row's sampled token in its slot: the count (with penalties) and the
//     output ring. Padding rows (slot -1) record nothing.
//     grid (ceil(rows / 128)), block 128.
#include "common.cuh"
#include "sampling_state.cuh"

extern "C" __global__ void __launch_bounds__(256)
    slot_init(const SamplingTables* __restrict__ tables, const SlotJoin* __restrict__ joins,
              const int32_t* __restrict__ data, int n_joins) {
    pdl_enter();
    if ((int)blockIdx.x >= n_joins) return;
    const SamplingTables t = *tables;
    const SlotJoin j = joins[blockIdx.x];
    const int64_t s = j.slot;
    const SlotParams& p = j.params;
    if (threadIdx.x == 0) {
        t.params[s] = p;
        t.history_len[s] = 0;
    }
    if (p.flags & RVLLM_SLOT_PENALTIES) {
        uint16_t* counts = t.counts + s * t.vocab;
        for (int i = threadIdx.x; i < t.vocab; i += blockDim.x) counts[i] = 0;
        uint32_t* mask = t.prompt_mask + s * t.words;
        for (int i = threadIdx.x; i < t.words; i += blockDim.x) mask[i] = 0;
        __syncthreads();
        for (int i = threadIdx.x; i < j.n_prompt; i += blockDim.x) {
            const int tok = data[j.prompt_at + i];
            if (tok >= 0 && tok < t.vocab) atomicOr(&mask[tok >> 5], 1u << (tok & 31));
        }
    }
    if (p.flags & RVLLM_SLOT_ALLOWED) {
        uint32_t* mask = t.allowed_mask + s * t.words;
        for (int i = threadIdx.x; i < t.words; i += blockDim.x) mask[i] = 0;
        __syncthreads();
        for (int i = threadIdx.x; i < j.n_allowed; i += blockDim.x) {
            const int tok = data[j.allowed_at + i];
            if (tok >= 0 && tok < t.vocab) atomicOr(&mask[tok >> 5], 1u << (tok & 31));
        }
    }
    for (int i = threadIdx.x; i < min(p.n_bias, RVLLM_BIAS_CAP); i += blockDim.x) {
        t.bias[s * RVLLM_BIAS_CAP + i] =
            BiasEntry{data[j.bias_at + 2 * i], __int_as_float(data[j.bias_at + 2 * i + 1])};
    }
    for (int i = threadIdx.x; i < min(p.n_stop, RVLLM_STOP_CAP); i += blockDim.x) {
        t.stops[s * RVLLM_STOP_CAP + i] = data[j.stops_at + i];
    }
    const int n_bad = min(p.n_bad, RVLLM_BAD_SEQS_CAP);
    int total = 0;
    for (int i = 0; i < n_bad; ++i) total += data[j.bad_at + i];
    for (int i = threadIdx.x; i < n_bad; i += blockDim.x) {
        t.bad_lens[s * RVLLM_BAD_SEQS_CAP + i] = data[j.bad_at + i];
    }
    for (int i = threadIdx.x; i < min(total, RVLLM_BAD_TOKENS_CAP); i += blockDim.x) {
        t.bad_tokens[s * RVLLM_BAD_TOKENS_CAP + i] = data[j.bad_at + n_bad + i];
    }
}

extern "C" __global__ void __launch_bounds__(128)
    logits_mask(float* __restrict__ logits, int rows, const int32_t* __restrict__ row_slot,
                const int32_t* __restrict__ row_step, const SamplingTables* __restrict__ tables) {
    pdl_enter();
    const int r = blockIdx.x;
    if (r >= rows) return;
    const int64_t s = row_slot[r];
    if (s < 0) return;
    const SamplingTables t = *tables;
    const SlotParams p = t.params[s];
    float* row = logits + (int64_t)r * t.vocab;
    if (row_step[r] < p.min_tokens) {
        for (int i = threadIdx.x; i < min(p.n_stop, RVLLM_STOP_CAP); i += blockDim.x) {
            const int tok = t.stops[s * RVLLM_STOP_CAP + i];
            if (tok >= 0 && tok < t.vocab) row[tok] = -INFINITY;
        }
    }
    const int n_bad = min(p.n_bad, RVLLM_BAD_SEQS_CAP);
    if (n_bad == 0) return;
    const int out_len = t.history_len[s];
    const int32_t* lens = t.bad_lens + s * RVLLM_BAD_SEQS_CAP;
    const int32_t* ring = t.history + s * RVLLM_HISTORY;
    for (int w = threadIdx.x; w < n_bad; w += blockDim.x) {
        int start = 0;
        for (int i = 0; i < w; ++i) start += lens[i];
        const int len = lens[w];
        if (len < 1 || len > RVLLM_HISTORY + 1 || start + len > RVLLM_BAD_TOKENS_CAP) continue;
        if (len > out_len + 1) continue;
        const int32_t* word = t.bad_tokens + s * RVLLM_BAD_TOKENS_CAP + start;
        // The word's first len - 1 tokens against the last len - 1 output tokens.
        bool match = true;
        for (int m = 0; m < len - 1 && match; ++m) {
            const int pos = out_len - (len - 1) + m;
            match = ring[pos % RVLLM_HISTORY] == word[m];
        }
        const int last = word[len - 1];
        if (match && last >= 0 && last < t.vocab) row[last] = -INFINITY;
    }
}

// Structured output's grammar mask (`reference::apply_token_bitmask`): a logit whose bit is
// clear in its row's packed mask (bit t % 32 of word t / 32, vocab / 32 words rounded up)
// becomes -inf. `row_mask[r]` picks the row's mask in `masks`; negative: the row has no
// grammar and is left as it is, so the masks buffer and the launch keep one shape whatever
// the batch asks (CUDA graphs). Masking after `logits_process` gives what masking before the
// processors gives (bias and penalties keep -inf at -inf and touch nothing else), so vLLM v1's
// order holds.
extern "C" __global__ void __launch_bounds__(256)
    token_bitmask(float* __restrict__ logits, int rows, int vocab,
                  const uint32_t* __restrict__ masks, const int32_t* __restrict__ row_mask) {
    pdl_enter();
    const int r = blockIdx.x;
    if (r >= rows) return;
    const int m = row_mask[r];
    if (m < 0) return;
    const int64_t words = (vocab + 31) / 32;
    const uint32_t* mask = masks + (int64_t)m * words;
    float* row = logits + (int64_t)r * vocab;
    for (int t = threadIdx.x; t < vocab; t += blockDim.x) {
        if (((mask[t >> 5] >> (t & 31)) & 1u) == 0) row[t] = -INFINITY;
    }
}

extern "C" __global__ void __launch_bounds__(128)
    sample_commit(const int32_t* __restrict__ tokens, int rows, const int32_t* __restrict__ row_slot,
                  const SamplingTables* __restrict__ tables) {
    pdl_enter();
    const int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    const int64_t s = row_slot[r];
    if (s < 0) return;
    const SamplingTables t = *tables;
    const int tok = tokens[r];
    if (tok < 0 || tok >= t.vocab) return;
    if (t.params[s].flags & RVLLM_SLOT_PENALTIES) {
        uint16_t* c = t.counts + s * t.vocab + tok;
        if (*c < 0xffff) *c += 1;
    }
    const int n = t.history_len[s];
    t.history[s * RVLLM_HISTORY + n % RVLLM_HISTORY] = tok;
    t.history_len[s] = n + 1;
}
