// Shared device helpers for rvllm's kernels: the element type and its f32 conversions,
// warp/block reductions. Every kernel file includes this; nothing here is a kernel entry point.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#define RVLLM_DEVICE __device__ __forceinline__

// The element type of activations, weights and the KV cache (arithmetic is f32 throughout).
// A kernel file is written once over `elem_t` and compiled twice: as itself for bf16, and
// through its `<stem>_f16.cu` wrapper, which defines RVLLM_F16 before including it, for IEEE
// half (f16 checkpoints, `--dtype float16`). Both types are 2 bytes, so layouts, strides and
// launch geometry are the same; only the conversions (and the prefill MMA's operand type)
// differ. `DT(bf16_name, f16_name)` names an entry point in each build: the engine picks the
// module (`norm` / `norm_f16`) and the name together.
#ifdef RVLLM_F16
typedef __half elem_t;
typedef __half2 elem2_t;
#define DT(bf16_name, f16_name) f16_name
#define RVLLM_MMA_AB "f16.f16"
RVLLM_DEVICE float to_f32(elem_t v) { return __half2float(v); }
RVLLM_DEVICE elem_t from_f32(float v) { return __float2half_rn(v); }
RVLLM_DEVICE float2 to_f32x2(elem2_t v) { return __half22float2(v); }
RVLLM_DEVICE elem2_t from_f32x2(float lo, float hi) { return __floats2half2_rn(lo, hi); }
RVLLM_DEVICE elem_t elem_from_bits(unsigned short bits) { return __ushort_as_half(bits); }
#else
typedef __nv_bfloat16 elem_t;
typedef __nv_bfloat162 elem2_t;
#define DT(bf16_name, f16_name) bf16_name
#define RVLLM_MMA_AB "bf16.bf16"
RVLLM_DEVICE float to_f32(elem_t v) { return __bfloat162float(v); }
RVLLM_DEVICE elem_t from_f32(float v) { return __float2bfloat16(v); }
// A bf16 is the top half of an f32, so a pair widens with a shift (the low element) and a
// mask (the high one), exactly. __bfloat1622float2 compiled to three instructions a pair
// (PRMT, then a shift for the high element), where f16's HADD2.F32 takes two; the batch-1
// GEMVs spend a good part of each stage converting weights (H200: the f16 build decoded
// 2.2 % faster than the bf16 one before this).
RVLLM_DEVICE float2 to_f32x2(elem2_t v) {
    const unsigned bits = *reinterpret_cast<const unsigned*>(&v);
    return make_float2(__uint_as_float(bits << 16), __uint_as_float(bits & 0xffff0000u));
}
RVLLM_DEVICE elem2_t from_f32x2(float lo, float hi) { return __floats2bfloat162_rn(lo, hi); }
RVLLM_DEVICE elem_t elem_from_bits(unsigned short bits) { return __ushort_as_bfloat16(bits); }
#endif

// Programmatic dependent launch (Hopper, sm_90+). The host launches every kernel with the
// programmatic-serialization attribute, so a kernel may start while the one before it in the
// stream is still running. Each kernel therefore calls `pdl_wait()` before it touches any
// memory an earlier kernel writes or reads (it returns once every earlier kernel has finished
// and its writes are visible), and `pdl_launch_dependents()` to let the next kernel start
// early. Work that depends on nothing earlier (streaming weights into registers) may go before
// the wait: that is how a GEMV overlaps its weight loads with the small kernels before it.
// Every block must reach `pdl_wait()` (call it before any early return), so that a kernel's
// completion always implies its predecessors' completion. A kernel may trigger its dependents
// before its own wait (the decode reduce does, so that the O projection's weight loads overlap
// the attention before it) when every block of it is placed by then, so that the early
// dependents cannot take the room its blocks need. Without the attribute (older GPUs,
// RVLLM_PDL=0, the kernel tests) both are no-ops.
RVLLM_DEVICE void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

RVLLM_DEVICE void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Block timeline (diagnostic builds only: kernels compiled with RVLLM_KERNEL_TRACE=1 define
// RVLLM_BLOCK_TRACE; elsewhere BlockTrace is empty and costs nothing). The host sets the
// pointer when RVLLM_TRACE_BLOCKS names a file, else it stays null: a ring of records of 8
// u64 after a header of 8 (record count so far, capacity). Each block of a traced kernel
// stores, from thread 0, when it started, when its pdl_wait returned, when its first input
// landed (kernels that say), when it ended, and tag | SM << 8 | linear block index << 16.
// Inside CUDA graphs this is the only view of how the kernels of a step overlap. It is not
// compiled in by default because an H200 measured the instrumented build ~2.5 % slower at
// batch 1 than the one before it (BENCHMARKS.md, 2026-11-30), the cause not isolated.
#ifdef RVLLM_BLOCK_TRACE
__constant__ unsigned long long* rvllm_block_trace;

RVLLM_DEVICE unsigned long long global_ns() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

struct BlockTrace {
    unsigned long long start = 0, waited = 0, first = 0;
    unsigned tag;
    __device__ explicit BlockTrace(unsigned kernel_tag) : tag(kernel_tag) {
        if (rvllm_block_trace) start = global_ns();
    }
    __device__ void mark_waited() {
        if (start) waited = global_ns();
    }
    __device__ void mark_first() {
        if (start && !first) first = global_ns();
    }
    __device__ ~BlockTrace() {
        if (!start || threadIdx.x != 0) return;
        unsigned long long* buf = rvllm_block_trace;
        const unsigned long long i = atomicAdd(buf, 1ull) % buf[1];
        unsigned long long* r = buf + 8 + 8 * i;
        unsigned smid;
        asm volatile("mov.u32 %0, %%smid;" : "=r"(smid));
        const unsigned long long block =
            blockIdx.x + (unsigned long long)gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
        r[0] = start;
        r[1] = waited;
        r[2] = first;
        r[3] = global_ns();
        r[4] = tag | (smid << 8) | (block << 16);
    }
};
#else
struct BlockTrace {
    __device__ explicit BlockTrace(unsigned) {}
    __device__ void mark_waited() {}
    __device__ void mark_first() {}
};
#endif

// The prologue of a kernel with nothing to do before its inputs are ready.
RVLLM_DEVICE void pdl_enter() {
    pdl_wait();
    pdl_launch_dependents();
}

// Eight elements moved as one 16-byte access (the widest single load/store).
struct __align__(16) Elem8 {
    elem2_t h[4];
};

RVLLM_DEVICE void elem8_to_f32(const Elem8& v, float out[8]) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        float2 f = to_f32x2(v.h[i]);
        out[2 * i] = f.x;
        out[2 * i + 1] = f.y;
    }
}

RVLLM_DEVICE Elem8 f32_to_elem8(const float in[8]) {
    Elem8 v;
#pragma unroll
    for (int i = 0; i < 4; ++i) v.h[i] = from_f32x2(in[2 * i], in[2 * i + 1]);
    return v;
}

RVLLM_DEVICE float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

RVLLM_DEVICE float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the whole block; every thread gets the result. `scratch` holds >= 32 floats.
// Contains __syncthreads, so every thread of the block must call it.
RVLLM_DEVICE float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int nwarps = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();  // scratch may still be read by a previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nwarps ? scratch[lane] : 0.0f;
    return warp_sum(v);
}

// The RoPE table of one position for the decode attention kernels: cos and sin of
// pos * inv_freq[i] for i < half, written by the block's threads (thread i, i + stride, ...)
// into shared memory; the caller syncs. The angle is rounded to f32 as in the HF reference;
// its sine and cosine are taken in double precision: angles reach ~1e5 rad at long positions,
// where the f32 fast-math intrinsics (the build uses --use_fast_math) lose all accuracy, and
// double functions are never replaced. (rope_cache.cu keeps its own copy of this loop: moved
// here, its kernel compiled to different code, and that change has not been run on a GPU.)
RVLLM_DEVICE void rope_table(float pos, const float* __restrict__ inv_freq, int half, int stride,
                             float* cos_t, float* sin_t) {
    for (int i = threadIdx.x; i < half; i += stride) {
        const float angle = pos * inv_freq[i];
        double sd, cd;
        sincos((double)angle, &sd, &cd);
        cos_t[i] = (float)cd;
        sin_t[i] = (float)sd;
    }
}

RVLLM_DEVICE float block_max(float v, float* scratch) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int nwarps = (blockDim.x + 31) >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nwarps ? scratch[lane] : -INFINITY;
    return warp_max(v);
}
