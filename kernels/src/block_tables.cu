// The step's block tables, expanded on the device from a compact upload.
//
// Kernel (extern "C"):
//   expand_block_tables(tables, compact, offsets, num_seqs, stride)
//     tables:  int32 [>= num_seqs, stride], the fixed-address table every kernel reads
//     compact: int32, sequence s's block ids at [offsets[s], offsets[s + 1])
//     offsets: int32 [num_seqs + 1]
//     Row s gets its ids at the start; the rest of the row keeps what it held (no kernel
//     reads a table entry past the sequence's context).
//   grid (num_seqs), block 128.
//
//   feed_sampled_tokens(ids, feed, tokens, n)
//     ids:    int32, the step's token ids (the fixed-address array the embedding reads)
//     feed:   int32 [2 * n]: pairs (index into ids, row of tokens)
//     tokens: int32, the previous step's sampled token of each row
//     ids[feed[2i]] = tokens[feed[2i + 1]] for i < n.
//   grid (ceil(n / 256)), block 256.
//
// Why: a CUDA graph bakes in the table's row stride, which follows --max-model-len (8,192
// blocks for Llama 3.1's 131,072 tokens). Uploading the used rows whole cost 33 MB and ~15 ms
// a step at 1,024 sequences; the compact form is the ids themselves (a few hundred KB).
// With lookahead scheduling a step is uploaded before the step ahead of it has sampled its
// input tokens; those stay on the device and feed_sampled_tokens puts them in place.
#include "common.cuh"

extern "C" __global__ void expand_block_tables(int32_t* __restrict__ tables,
                                               const int32_t* __restrict__ compact,
                                               const int32_t* __restrict__ offsets,
                                               int num_seqs, int stride) {
    pdl_enter();
    const int s = blockIdx.x;
    if (s >= num_seqs) return;
    const int begin = offsets[s];
    const int len = min(offsets[s + 1] - begin, stride);
    int32_t* row = tables + (int64_t)s * stride;
    for (int j = threadIdx.x; j < len; j += blockDim.x) row[j] = compact[begin + j];
}

extern "C" __global__ void feed_sampled_tokens(int32_t* __restrict__ ids,
                                               const int32_t* __restrict__ feed,
                                               const int32_t* __restrict__ tokens, int n) {
    pdl_enter();
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) ids[feed[2 * i]] = tokens[feed[2 * i + 1]];
}
