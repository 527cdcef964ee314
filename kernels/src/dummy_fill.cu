// `--load-format dummy` weights made in device memory (engine/src/backend/dummy_weight.rs):
// the same values the host makes, so that start-up writes 16 GB on the GPU rather than making
// 32 GB of f32 on the host and copying it up.
//
// Kernels (all extern "C"):
//   dummy_fill_bf16(out, ld_out, rows, cols, base, bound, part_cols, part_row, part_col)
//       out[r * ld_out + c] = round(dummy_value(base, (part_row + r) * part_cols + part_col + c,
//       bound)) for r < rows, c < cols: a rectangle of one checkpoint tensor (of rows
//       `part_cols` long) into a rectangle of the weight. grid-stride, block 256.
#include "common.cuh"

// dummy_value of dummy_weight.rs: element `i` of the stream based at `base` (one splitmix64
// stream every 2^16 elements), uniform in +-bound. The top 24 bits make u and 2u - 1 exact;
// the product with `bound` is the only rounding (explicit _rn ops: no contraction into an FMA).
RVLLM_DEVICE float dummy_value(uint64_t base, uint64_t i, float bound) {
    const uint64_t golden = 0x9E3779B97F4A7C15ull;
    const uint64_t chunk = base + (i >> 16) * 0xD6E8FEB86659FD93ull;
    uint64_t z = chunk + ((i & 0xffffull) + 1ull) * golden;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z = z ^ (z >> 31);
    const float u = __fmul_rn((float)(unsigned)(z >> 40), 1.0f / 16777216.0f);
    return __fmul_rn(__fsub_rn(__fmul_rn(2.0f, u), 1.0f), bound);
}

extern "C" __global__ void DT(dummy_fill_bf16, dummy_fill_f16)(
    elem_t* __restrict__ out, int64_t ld_out, int64_t rows, int64_t cols, uint64_t base,
    float bound, int64_t part_cols, int64_t part_row, int64_t part_col) {
    pdl_enter();
    const int64_t n = rows * cols;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += stride) {
        const int64_t r = e / cols, c = e - r * cols;
        const uint64_t i = (uint64_t)((part_row + r) * part_cols + part_col + c);
        out[r * ld_out + c] = from_f32(dummy_value(base, i, bound));
    }
}
