// The grouped GEMM of the fused mixture-of-experts path (moe.cu, issue 19) on the tensor cores:
// the gate/up projection ([E, 2I, H]) and the down projection ([E, H, I]) of every expert in one
// launch each, over the rows that moe_align grouped by expert.
//
//   moe_grouped_gemm_bf16(out, in, w, expert_offsets, tile_map, n, k, gated)
//       gated == 0 (down): out[s, j] = sum_l in[s, l] * w[e, j, l] for the slots s of expert
//       e, that is expert_offsets[e] <= s < expert_offsets[e + 1]; in [P, k], w [E, n, k],
//       out [P, n]. gated != 0 (gate/up with SiLU-and-mul): w [E, 2n, k] (gate rows, then
//       up rows), out[s, j] = silu(gate_j) * up_j in f32 (silu_and_mul's expf formula), one
//       rounding. tile_map from moe_align: entry y is (row tile << 10) | expert, or -1.
//       grid (ceil(n / 64), or / 32 gated; P / 64 + min(E, P)), block 128, kSmemBytes
//       (110,592) of dynamic shared memory (rvllm_kernels::reference::moe_grouped_gemm_launch).
//
// A block computes 64 output columns (32 gated, from their 32 gate and 32 up weight rows) of
// one tile of up to 64 rows of one expert (tile_map[blockIdx.y]). The grid follows from the
// shapes alone, so a decode step fits a CUDA graph, and it has no block for an idle expert: at
// batch 1 of 128 experts top 8, eight rows of blocks, all working. Each block streams its 64
// weight rows once through a 6-stage cp.async ring (16-byte copies, 128 contiguous bytes of a
// row a stage; five stages, 40 KiB of weights, in flight a block, since batch-1 decode has
// about two blocks an SM to keep the memory busy with) while mma.sync m16n8k16 (f32
// accumulate) consumes them; the 16-row slices of the tile past the expert's last row are
// neither loaded nor multiplied, so at batch 1 (one row an expert) the block is a weight
// stream with one MMA row slice. Warp w owns 16 of the block's weight rows (columns 16w..16w+15,
// or gated the gate and up rows of columns 8w..8w+7) for all of the tile's row slices. Rows,
// columns and the reduction tail past the operands are zero-filled in shared memory, never
// read from memory; any n and k work (k not a multiple of 8 falls back to element loads, as
// 16-byte copies need 16-byte aligned rows).
#include "common.cuh"

namespace {

constexpr int kBM = 64;       // rows of the expert a tile
constexpr int kBN = 64;       // output columns a block (16 a warp)
constexpr int kBK = 64;       // reduction depth a stage
constexpr int kStages = 6;
constexpr int kThreads = 128;
constexpr int kLd = kBK + 8;  // padded shared row (144 B): ldmatrix rows fall in distinct banks
constexpr int kStageElems = (kBM + kBN) * kLd;
constexpr int kSmemBytes = kStages * kStageElems * 2;
constexpr int kBlocksPerSm = 2;  // 228 KiB of shared memory an SM (H100) / kSmemBytes
static_assert(kSmemBytes == 110592, "reference_moe.rs's MOE_GEMM_SMEM_BYTES");

__device__ __forceinline__ void cp_async16_or_zero(void* dst, const void* src, bool valid) {
    const uint32_t d = (uint32_t)__cvta_generic_to_shared(dst);
    const int bytes = valid ? 16 : 0;  // 0: writes 16 zero bytes, reads nothing
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Four 8x8 b16 matrices; lane l gives the address of row l % 8 of matrix l / 8, and lane T
// receives (row T/4, cols 2(T%4), +1) of each.
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void* p) {
    const uint32_t a = (uint32_t)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}

__device__ __forceinline__ void mma_16816(float c[4], const uint32_t a[4], uint32_t b0,
                                          uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32." RVLLM_MMA_AB ".f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// One operand's tile rows [0, load_rows) x reduction columns [k0, k0 + kBK) into `dst` (row
// stride kLd). `row(r)` is where tile row r starts in memory, or null for a row past the
// operand; null rows and columns past k are zeros. `any` is some readable address (a copy of
// zero bytes still names one).
template <bool kWide, typename RowFn>
__device__ __forceinline__ void load_tile(elem_t* dst, RowFn row, const elem_t* any,
                                          int load_rows, int k, int k0) {
    if (kWide) {
        constexpr int kChunks = kBK / 8;  // 16-byte pieces a row
        for (int c = threadIdx.x; c < load_rows * kChunks; c += kThreads) {
            const int r = c / kChunks, col = (c % kChunks) * 8;
            const elem_t* src = row(r);
            // k % 8 == 0: a piece lies wholly inside the row or wholly past it.
            const bool valid = src != nullptr && k0 + col < k;
            cp_async16_or_zero(dst + r * kLd + col, valid ? src + k0 + col : any, valid);
        }
    } else {
        for (int i = threadIdx.x; i < load_rows * kBK; i += kThreads) {
            const int r = i / kBK, col = i % kBK;
            const elem_t* src = row(r);
            dst[r * kLd + col] = src != nullptr && k0 + col < k ? src[k0 + col] : from_f32(0.0f);
        }
    }
}

// kGated: w holds 2n rows an expert (gate, then up) and out[s, j] = silu(gate_j) * up_j. Tile
// row r of the weights is then gate column n0 + 8 (r / 16) + r % 8 for r % 16 < 8 and the up
// column of the same index otherwise, so that warp w's two 8-column MMAs hold gate and up of
// the same 8 columns, in the same lanes and registers: the epilogue needs no exchange.
template <bool kWide, bool kGated>
__device__ __forceinline__ void grouped_gemm(elem_t* __restrict__ out,
                                             const elem_t* __restrict__ in,
                                             const elem_t* __restrict__ w,
                                             const int* __restrict__ expert_offsets,
                                             int e, int mt, int n, int k) {
    extern __shared__ __align__(16) unsigned char moe_gemm_smem[];
    elem_t* smem = reinterpret_cast<elem_t*>(moe_gemm_smem);
    constexpr int kCols = kGated ? kBN / 2 : kBN;  // output columns a block
    const int n0 = blockIdx.x * kCols;
    const int first = expert_offsets[e], count = expert_offsets[e + 1] - first;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const elem_t* we = w + (int64_t)e * (kGated ? 2 * n : n) * k;
    auto weight_row = [&](int r) -> const elem_t* {
        const int j = kGated ? n0 + (r / 16) * 8 + r % 8 : n0 + r;
        if (j >= n) return nullptr;
        return we + (int64_t)(kGated && (r & 8) ? n + j : j) * k;
    };
    const int k_tiles = (k + kBK - 1) / kBK;

    if (mt * kBM >= count) return;  // only a tile map that does not match the offsets
    const int row0 = first + mt * kBM;
    const int rows = min(kBM, count - mt * kBM);
    const int slices = (rows + 15) / 16;  // 16-row MMA slices holding rows
    const elem_t* at = in + (int64_t)row0 * k;
    auto input_row = [&](int r) -> const elem_t* {
        return r < rows ? at + (int64_t)r * k : nullptr;
    };
    auto load_stage = [&](int stage, int kt) {
        elem_t* sa = smem + stage * kStageElems;
        load_tile<kWide>(sa, input_row, at, slices * 16, k, kt * kBK);
        load_tile<kWide>(sa + kBM * kLd, weight_row, we, kBN, k, kt * kBK);
    };
    float acc[4][2][4];
#pragma unroll
    for (int s = 0; s < 4; ++s)
#pragma unroll
        for (int b = 0; b < 2; ++b)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[s][b][i] = 0.0f;

#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
        if (s < k_tiles) load_stage(s, s);
        cp_async_commit();  // empty groups too: the wait below counts groups
    }
    for (int kt = 0; kt < k_tiles; ++kt) {
        cp_async_wait<kStages - 2>();
        __syncthreads();  // stage kt landed for all threads; stage kt - 1 is consumed
        const int next = kt + kStages - 1;
        if (next < k_tiles) load_stage(next % kStages, next);
        cp_async_commit();
        const elem_t* sa = smem + (kt % kStages) * kStageElems;
        const elem_t* sb = sa + kBM * kLd;
#pragma unroll
        for (int kk = 0; kk < kBK; kk += 16) {
            // Matrices (cols 0-7, k 0-7), (0-7, 8-15), (8-15, 0-7), (8-15, 8-15) of the
            // warp's 16 columns: the B fragments of its two 8-column MMAs.
            uint32_t bf[4];
            ldmatrix_x4(bf, sb + (warp * 16 + (lane & 7) + (lane >> 4) * 8) * kLd + kk +
                                ((lane >> 3) & 1) * 8);
#pragma unroll
            for (int s = 0; s < 4; ++s) {
                if (s < slices) {
                    // (rows 0-7, k 0-7), (8-15, 0-7), (0-7, 8-15), (8-15, 8-15): a0..a3.
                    uint32_t af[4];
                    ldmatrix_x4(af, sa + (s * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * kLd +
                                        kk + (lane >> 4) * 8);
                    mma_16816(acc[s][0], af, bf[0], bf[1]);
                    mma_16816(acc[s][1], af, bf[2], bf[3]);
                }
            }
        }
    }
    cp_async_wait<0>();  // only empty groups are left

    // Accumulator i of slice s, block b: row s*16 + lane/4 (+8 for i >= 2), column
    // warp*16 + b*8 + 2(lane%4) (+1 for odd i); gated, gate (b = 0) and up (b = 1) of column
    // warp*8 + 2(lane%4) (+1).
    const int g = lane / 4, t = lane % 4;
#pragma unroll
    for (int s = 0; s < 4; ++s) {
        if (s >= slices) continue;
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int r = s * 16 + g + half * 8;
            if (r >= rows) continue;
            elem_t* orow = out + (int64_t)(row0 + r) * n;
            if constexpr (kGated) {
                const int c = n0 + warp * 8 + 2 * t;
                float v[2];
#pragma unroll
                for (int q = 0; q < 2; ++q) {
                    // expf, as silu_and_mul (activation.cu) computes it.
                    const float gate = acc[s][0][half * 2 + q], up = acc[s][1][half * 2 + q];
                    v[q] = gate / (1.0f + expf(-gate)) * up;
                }
                if (n % 2 == 0 && c + 1 < n) {
                    *reinterpret_cast<elem2_t*>(orow + c) = from_f32x2(v[0], v[1]);
                } else {
                    if (c < n) orow[c] = from_f32(v[0]);
                    if (c + 1 < n) orow[c + 1] = from_f32(v[1]);
                }
            } else {
#pragma unroll
                for (int b = 0; b < 2; ++b) {
                    const int c = n0 + warp * 16 + b * 8 + 2 * t;
                    const float v0 = acc[s][b][half * 2], v1 = acc[s][b][half * 2 + 1];
                    if (n % 2 == 0 && c + 1 < n) {
                        *reinterpret_cast<elem2_t*>(orow + c) = from_f32x2(v0, v1);
                    } else {
                        if (c < n) orow[c] = from_f32(v0);
                        if (c + 1 < n) orow[c + 1] = from_f32(v1);
                    }
                }
            }
        }
    }
}

}  // namespace

// Two blocks an SM is what the shared memory allows; saying so lets ptxas use the registers
// that allows (the default held it to 128 registers and spilled).
extern "C" __global__ void __launch_bounds__(kThreads, kBlocksPerSm)
    DT(moe_grouped_gemm_bf16, moe_grouped_gemm_f16)(
    elem_t* __restrict__ out, const elem_t* __restrict__ in, const elem_t* __restrict__ w,
    const int* __restrict__ expert_offsets, const int* __restrict__ tile_map, int n, int k,
    int gated) {
    pdl_enter();
    const int tile = tile_map[blockIdx.y];
    if (tile < 0 || (int)blockIdx.x * (gated ? kBN / 2 : kBN) >= n || blockDim.x != kThreads)
        return;
    const int e = tile & 1023, mt = tile >> 10;
    // Rows of a multiple of 8 elements start 16-byte aligned (device allocations are).
    if (k % 8 == 0) {
        if (gated) {
            grouped_gemm<true, true>(out, in, w, expert_offsets, e, mt, n, k);
        } else {
            grouped_gemm<true, false>(out, in, w, expert_offsets, e, mt, n, k);
        }
    } else if (gated) {
        grouped_gemm<false, true>(out, in, w, expert_offsets, e, mt, n, k);
    } else {
        grouped_gemm<false, false>(out, in, w, expert_offsets, e, mt, n, k);
    }
}
