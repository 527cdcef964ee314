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
// Why: a CUDA graph bakes in the table's row stride, which follows --max-model-len (8,192
// blocks for Llama 3.1's 131,072 tokens). Uploading the used rows whole cost 33 MB and ~15 ms
// a step at 1,024 sequences; the compact form is the ids themselves (a few hundred KB).
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
