// Row gathers on bf16 matrices.
//
// Kernels (all extern "C"):
//   embedding_lookup_bf16(out, table, ids, num_tokens, hidden, vocab)
//       out[t, :] = table[ids[t], :]; an id outside [0, vocab) gives a row of zeros (the host
//       validates ids, this only keeps a bad id from reading out of bounds).
//       grid (num_tokens), block 256.
//   gather_rows_bf16(out, in, rows, num_rows, cols)
//       out[r, :] = in[rows[r], :]: picks the last hidden state of each sequence before the
//       LM head so that logits are computed only where they are needed.
//       grid (num_rows), block 256.
#include "common.cuh"

// Copies one row of `cols` bf16, 16 bytes per access when the row allows it.
__device__ __forceinline__ void copy_row(elem_t* __restrict__ dst,
                                         const elem_t* __restrict__ src, int cols) {
    const bool vec = (cols % 8 == 0) && ((reinterpret_cast<uintptr_t>(dst) |
                                          reinterpret_cast<uintptr_t>(src)) % 16 == 0);
    if (vec) {
        const Elem8* s = reinterpret_cast<const Elem8*>(src);
        Elem8* d = reinterpret_cast<Elem8*>(dst);
        for (int i = threadIdx.x; i < cols / 8; i += blockDim.x) d[i] = s[i];
    } else {
        for (int i = threadIdx.x; i < cols; i += blockDim.x) dst[i] = src[i];
    }
}

extern "C" __global__ void DT(embedding_lookup_bf16, embedding_lookup_f16)(
    elem_t* __restrict__ out, const elem_t* __restrict__ table, const int32_t* __restrict__ ids,
    int num_tokens, int hidden, int vocab) {
    pdl_enter();
    const int t = blockIdx.x;
    if (t >= num_tokens) return;
    const int id = ids[t];
    elem_t* dst = out + (int64_t)t * hidden;
    if (id < 0 || id >= vocab) {
        for (int i = threadIdx.x; i < hidden; i += blockDim.x) dst[i] = from_f32(0.0f);
        return;
    }
    copy_row(dst, table + (int64_t)id * hidden, hidden);
}

extern "C" __global__ void DT(gather_rows_bf16, gather_rows_f16)(
    elem_t* __restrict__ out, const elem_t* __restrict__ in, const int32_t* __restrict__ rows,
    int num_rows, int cols) {
    pdl_enter();
    const int r = blockIdx.x;
    if (r >= num_rows) return;
    copy_row(out + (int64_t)r * cols, in + (int64_t)rows[r] * cols, cols);
}
