// Token sampling on the GPU, one block per row of logits, so only the chosen ids (and their
// logprobs) cross to the host.
//
// Kernel (extern "C"):
//   sample_tokens(out_tokens, out_logprobs, logits, vocab, temperatures, top_ks, top_ps,
//                 min_ps, seeds, offsets, filtered_only)
//     logits: f32 [B, vocab]; per row b:
//       temperatures[b] (f32; < 1e-5 means greedy), top_ks[b] (int32; <= 0 or >= vocab
//       disables), top_ps[b] (f32 in (0, 1]; 1 disables), min_ps[b] (f32 in [0, 1]; 0 disables),
//       seeds[b], offsets[b] (uint64; the draw is a pure function of (seed, offset, logits),
//       the caller advances the offset each step). filtered_only != 0: rows without a filter
//       (greedy, or no top-k/top-p/min-p) are left alone, for the plain kernels to sample.
//     out_tokens: int32 [B]; out_logprobs: f32 [B], the chosen token's log-softmax of the raw
//       logits (before temperature and filtering, as vLLM reports it).
//   grid (B), block 1024 (kThreads).
//
//   For steps where no row filters (top-k off, top-p 1, min-p 0): the same draws, spread over
//   many blocks per row (a single block per row is compute-bound on one SM at batch 1):
//   sample_plain_partial(partials, logits, vocab, nchunks, temperatures, top_ks, seeds, offsets)
//     grid (nchunks, B), block 256; partials: int32 [B, nchunks, 5] scratch.
//   sample_plain_finish(out_tokens, out_logprobs, partials, logits, vocab, nchunks,
//                       temperatures, top_ks)
//     grid (B), block 32. Same tokens and logprobs as sample_tokens for such rows (same hash).
//     nchunks = clamp(528 / B, 4, 128) measured fastest on the H100: vocab 128256, batch 1:
//     4.8 us greedy / 6.1 us temperature (sample_tokens: 24 / 50 us); batch 64: 14 / 30 us
//     (25 / 51); batch 256: 52 / 100 us (67 / 108).
//
// Semantics (the CPU reference in reference.rs implements the same):
//   greedy: the first index of the largest logit.
//   random: z = logit / T. Filters in vLLM's order, each a threshold on z: min-p keeps
//   p >= min_p * p_max; top-k keeps values >= the k-th largest (ties kept); top-p keeps the
//   smallest set of the largest remaining values whose probability mass (renormalised over
//   what min-p and top-k kept) reaches top_p (ties kept). The draw is Gumbel-max:
//   argmax over kept i of z_i - log(-log(u_i)), with u_i from a counter-based hash of
//   (seed, offset, i), which samples exactly from the renormalised distribution and needs no
//   prefix sums. Thresholds come from radix selection over the order-preserving integer keys
//   of the logits (4 passes of 8 bits), with probability mass in 40-bit fixed point so that
//   the result does not depend on the order of floating-point additions.
#include "common.cuh"

namespace {

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;
constexpr float kLog2e = 1.4426950408889634f;
constexpr double kMassScale = 1099511627776.0;  // 2^40

// Larger float => larger key (for non-NaN values).
__device__ __forceinline__ uint32_t order_key(float x) {
    uint32_t u = __float_as_uint(x);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ uint64_t mix64(uint64_t x) {
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ull;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebull;
    x ^= x >> 31;
    return x;
}

// The per-draw key, hashed once per row.
__device__ __forceinline__ uint64_t draw_key(uint64_t seed, uint64_t offset) {
    return mix64(seed ^ mix64(offset));
}

// Gumbel noise for element i of the draw: one splitmix64 step of the draw key's stream
// (a counter-based generator); reference.rs mirrors this exactly.
__device__ __forceinline__ float gumbel(uint64_t key, int i) {
    const uint64_t h = mix64(key + (uint64_t)i * 0x9E3779B97F4A7C15ull);
    // Clamped below 1: the top hash value's (h >> 40) + 0.5 rounds to 2^24, u would be 1 and
    // the noise +inf, letting that token win whatever its logit (~1 draw in 110 at vocab 150k).
    const float u = fminf(((float)(h >> 40) + 0.5f) * (1.0f / 16777216.0f), 0x1.fffffep-1f);
    return -logf(-logf(u));
}

// Four consecutive logits starting at i (a multiple of 4); out-of-range ones are invalid.
// One 16-byte load when the row allows it.
__device__ __forceinline__ void load4(const float* __restrict__ row, int i, int vocab, bool vec,
                                      float v[4], bool ok[4]) {
    if (vec && i < vocab) {
        const float4 f = *reinterpret_cast<const float4*>(row + i);
        v[0] = f.x; v[1] = f.y; v[2] = f.z; v[3] = f.w;
#pragma unroll
        for (int j = 0; j < 4; ++j) ok[j] = true;
    } else {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            ok[j] = i + j < vocab;
            v[j] = ok[j] ? row[i + j] : -INFINITY;
        }
    }
}

// Adds `value` to hist[bin] for every lane with `take`; all 32 lanes must call it together.
// Lanes with the same bin are merged first (match + warp reduction) so that one atomic per
// distinct bin leaves the warp: logits cluster in few bins of the high digits, and plain
// per-lane atomics on one address serialise (measured: 50x slower).
__device__ __forceinline__ void warp_hist_add(uint64_t* hist, bool take, uint32_t bin,
                                              uint64_t value, bool count) {
    const unsigned active = __ballot_sync(0xffffffffu, take);
    if (!take) return;
    const unsigned group = __match_any_sync(active, bin);
    const bool leader = (threadIdx.x & 31) == __ffs(group) - 1;
    uint64_t total;
    if (count) {
        total = __popc(group);
    } else {
        // Masses are < 2^41: two 20/21-bit halves, each summed exactly in 32 bits.
        const unsigned lo = __reduce_add_sync(group, (unsigned)(value & 0xFFFFFu));
        const unsigned hi = __reduce_add_sync(group, (unsigned)(value >> 20));
        total = ((uint64_t)hi << 20) + lo;
    }
    if (leader) atomicAdd(reinterpret_cast<unsigned long long*>(&hist[bin]), (unsigned long long)total);
}

__device__ __forceinline__ uint64_t mass_of(float l, float lmax, float inv_t) {
    const float e = __fmul_rn(__fmul_rn(__fsub_rn(l, lmax), inv_t), kLog2e);
    return (uint64_t)((double)exp2f(e) * kMassScale);
}

struct MaxArg {
    float m;    // running max
    int idx;    // first index reaching it
    float s;    // sum of exp(l - m)
};

__device__ __forceinline__ MaxArg combine(MaxArg a, MaxArg b) {
    MaxArg r;
    if (b.m > a.m || (b.m == a.m && b.idx < a.idx)) {
        r.m = b.m;
        r.idx = b.idx;
    } else {
        r.m = a.m;
        r.idx = a.idx;
    }
    const float sa = a.m == -INFINITY ? 0.0f : a.s * expf(a.m - r.m);
    const float sb = b.m == -INFINITY ? 0.0f : b.s * expf(b.m - r.m);
    r.s = sa + sb;
    return r;
}

__device__ MaxArg block_maxarg(MaxArg v, MaxArg* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        MaxArg w;
        w.m = __shfl_xor_sync(0xffffffffu, v.m, o);
        w.idx = __shfl_xor_sync(0xffffffffu, v.idx, o);
        w.s = __shfl_xor_sync(0xffffffffu, v.s, o);
        v = combine(v, w);
    }
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < (int)(blockDim.x >> 5) ? scratch[lane] : MaxArg{-INFINITY, 0x7fffffff, 0.0f};
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            MaxArg w;
            w.m = __shfl_xor_sync(0xffffffffu, v.m, o);
            w.idx = __shfl_xor_sync(0xffffffffu, v.idx, o);
            w.s = __shfl_xor_sync(0xffffffffu, v.s, o);
            v = combine(v, w);
        }
        if (lane == 0) scratch[0] = v;
    }
    __syncthreads();
    return scratch[0];
}

__device__ uint64_t block_sum_u64(uint64_t v, uint64_t* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < kWarps ? scratch[lane] : 0ull;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (lane == 0) scratch[0] = v;
    }
    __syncthreads();
    const uint64_t r = scratch[0];
    __syncthreads();
    return r;
}

// Radix selection of the largest key `tau` with weight(key >= tau) >= need, where the weight
// of element i is 1 (counts, use_mass false) or its fixed-point mass; only keys >= floor_key
// take part. `need` must not exceed the total weight.
__device__ uint32_t radix_select(const float* __restrict__ row, int vocab, bool vec, uint32_t floor_key,
                                 uint64_t need, bool use_mass, float lmax, float inv_t,
                                 uint64_t* hist, uint64_t* shared_out) {
    uint32_t prefix = 0, mask = 0;
    uint64_t above = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int b = threadIdx.x; b < 256; b += kThreads) hist[b] = 0;
        __syncthreads();
        for (int base = 0; base < vocab; base += 4 * kThreads) {
            float v[4];
            bool ok[4];
            load4(row, base + 4 * threadIdx.x, vocab, vec, v, ok);
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const uint32_t k = order_key(v[j]);
                const bool take = ok[j] && k >= floor_key && (k & mask) == prefix;
                warp_hist_add(hist, take, (k >> shift) & 255u,
                              use_mass && take ? mass_of(v[j], lmax, inv_t) : 1ull, !use_mass);
            }
        }
        __syncthreads();
        if (threadIdx.x < 32) {
            // Lane l owns bins 255-8l down to 248-8l: lanes in descending key order.
            const int lane = threadIdx.x;
            uint64_t local = 0;
            for (int j = 0; j < 8; ++j) local += hist[255 - 8 * lane - j];
            uint64_t incl = local;
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                const uint64_t v = __shfl_up_sync(0xffffffffu, incl, o);
                if (lane >= o) incl += v;
            }
            const unsigned hit = __ballot_sync(0xffffffffu, above + incl >= need);
            const int first = hit ? __ffs(hit) - 1 : 31;
            if (lane == first) {
                uint64_t cum = above + incl - local;
                int digit = 248 - 8 * lane;
                for (int j = 0; j < 8; ++j) {
                    const int b = 255 - 8 * lane - j;
                    if (cum + hist[b] >= need || j == 7) {
                        digit = b;
                        break;
                    }
                    cum += hist[b];
                }
                shared_out[0] = (uint64_t)digit;
                shared_out[1] = cum;
            }
        }
        __syncthreads();
        prefix |= (uint32_t)shared_out[0] << shift;
        mask |= 255u << shift;
        above = shared_out[1];
        __syncthreads();
    }
    return prefix;
}

}  // namespace

extern "C" __global__ void __launch_bounds__(kThreads)
    sample_tokens(int32_t* __restrict__ out_tokens, float* __restrict__ out_logprobs,
                  const float* __restrict__ logits, int vocab,
                  const float* __restrict__ temperatures, const int32_t* __restrict__ top_ks,
                  const float* __restrict__ top_ps, const float* __restrict__ min_ps,
                  const uint64_t* __restrict__ seeds, const uint64_t* __restrict__ offsets,
                  int filtered_only) {
    pdl_enter();
    __shared__ MaxArg scratch[kWarps];
    __shared__ uint64_t hist[256];
    __shared__ uint64_t sel[2];
    __shared__ uint64_t scratch64[kWarps];
    const int b = blockIdx.x;
    const float* row = logits + (int64_t)b * vocab;

    // Pass 1: max, first argmax and the sum of exponentials (online), for greedy and logprobs.
    // 16-byte loads need 16-byte aligned rows.
    const bool vec = vocab % 4 == 0 && (reinterpret_cast<uintptr_t>(logits) & 15) == 0;
    const float temp = temperatures[b];
    const bool greedy = temp < 1e-5f || top_ks[b] == 1;
    // IEEE division whatever the build's fast-math flags: the CPU reference divides too.
    const float inv_t = greedy ? 1.0f : __fdiv_rn(1.0f, temp);
    // No filter: the Gumbel draw needs no threshold and runs in the same pass as the max.
    const bool plain = !greedy && (top_ks[b] <= 0 || top_ks[b] >= vocab) && top_ps[b] >= 1.0f &&
                       min_ps[b] <= 0.0f;
    // Beside the plain kernels (which sample the other rows the same way), only rows with a
    // filter are this kernel's: a step mixing both runs both, inside one graph.
    if (filtered_only && (greedy || plain)) return;
    const uint64_t key = draw_key(seeds[b], offsets[b]);
    MaxArg acc{-INFINITY, 0x7fffffff, 0.0f};
    MaxArg best{-INFINITY, 0x7fffffff, 0.0f};
#pragma unroll 2
    for (int base = 0; base < vocab; base += 4 * kThreads) {
        float v[4];
        bool ok[4];
        const int i0 = base + 4 * threadIdx.x;
        load4(row, i0, vocab, vec, v, ok);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const float l = v[j];
            if (!ok[j]) continue;
            if (l > acc.m) {
                acc.s = acc.m == -INFINITY ? 1.0f : acc.s * expf(acc.m - l) + 1.0f;
                acc.m = l;
                acc.idx = i0 + j;
            } else if (l != -INFINITY) {
                acc.s += expf(l - acc.m);
            }
            if (plain) {
                const float score = __fadd_rn(__fmul_rn(l, inv_t), gumbel(key, i0 + j));
                if (score > best.m) {
                    best.m = score;
                    best.idx = i0 + j;
                }
            }
        }
    }
    const MaxArg all = block_maxarg(acc, scratch);
    const float lmax = all.m;
    const float lse = lmax + logf(all.s);

    int token = all.idx;
    if (plain) {
        token = block_maxarg(best, scratch).idx;
    } else if (!greedy) {
        const int top_k = top_ks[b];
        const float top_p = top_ps[b];
        const float min_p = min_ps[b];
        uint32_t floor_key = 0;
        if (min_p > 0.0f) {
            floor_key = order_key(__fadd_rn(lmax, __fmul_rn(temp, logf(min_p))));
        }
        if (top_k > 0 && top_k < vocab) {
            const uint32_t kth = radix_select(row, vocab, vec, 0u, (uint64_t)top_k, false, lmax, inv_t,
                                              hist, sel);
            floor_key = max(floor_key, kth);
        }
        if (top_p < 1.0f) {
            uint64_t local = 0;
            for (int base = 0; base < vocab; base += 4 * kThreads) {
                float v[4];
                bool ok[4];
                load4(row, base + 4 * threadIdx.x, vocab, vec, v, ok);
#pragma unroll
                for (int j = 0; j < 4; ++j)
                    if (ok[j] && order_key(v[j]) >= floor_key) local += mass_of(v[j], lmax, inv_t);
            }
            const uint64_t total = block_sum_u64(local, scratch64);
            double want = ceil((double)top_p * (double)total);
            uint64_t need = (uint64_t)want;
            need = need < 1 ? 1 : (need > total ? total : need);
            const uint32_t tp = radix_select(row, vocab, vec, floor_key, need, true, lmax, inv_t,
                                             hist, sel);
            floor_key = max(floor_key, tp);
        }
        // Gumbel-max over the kept set.
        for (int base = 0; base < vocab; base += 4 * kThreads) {
            float v[4];
            bool ok[4];
            const int i0 = base + 4 * threadIdx.x;
            load4(row, i0, vocab, vec, v, ok);
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                if (!ok[j] || order_key(v[j]) < floor_key) continue;
                const float score = __fadd_rn(__fmul_rn(v[j], inv_t), gumbel(key, i0 + j));
                if (score > best.m) {
                    best.m = score;
                    best.idx = i0 + j;
                }
            }
        }
        // combine() also merges sums; they are unused (0) here.
        const MaxArg win = block_maxarg(best, scratch);
        token = win.idx;
    }
    // A row with every logit -inf (everything masked) has no index: token 0, as the reference.
    if (token < 0 || token >= vocab) token = 0;
    if (threadIdx.x == 0) {
        out_tokens[b] = token;
        out_logprobs[b] = row[token] - lse;
    }
}

// One chunk of a row: max, first argmax, sum of exp(l - max) and, when the row samples, the
// best Gumbel score and its index. partials[b][c] = {max, argmax, sum, best, best index}.
extern "C" __global__ void __launch_bounds__(256)
    sample_plain_partial(int32_t* __restrict__ partials, const float* __restrict__ logits,
                         int vocab, int nchunks, const float* __restrict__ temperatures,
                         const int32_t* __restrict__ top_ks, const uint64_t* __restrict__ seeds,
                         const uint64_t* __restrict__ offsets) {
    pdl_enter();
    __shared__ MaxArg scratch[8];
    const int c = blockIdx.x, b = blockIdx.y;
    const float* row = logits + (int64_t)b * vocab;
    const bool vec = vocab % 4 == 0 && (reinterpret_cast<uintptr_t>(logits) & 15) == 0;
    const int chunk = ((vocab + nchunks - 1) / nchunks + 3) / 4 * 4;
    const int begin = c * chunk, end = min(vocab, begin + chunk);
    const float temp = temperatures[b];
    const bool greedy = temp < 1e-5f || top_ks[b] == 1;
    const float inv_t = greedy ? 1.0f : __fdiv_rn(1.0f, temp);
    const uint64_t key = draw_key(seeds[b], offsets[b]);
    MaxArg acc{-INFINITY, 0x7fffffff, 0.0f};
    MaxArg best{-INFINITY, 0x7fffffff, 0.0f};
    for (int i0 = begin + 4 * threadIdx.x; i0 < end; i0 += 4 * blockDim.x) {
        float v[4];
        bool ok[4];
        load4(row, i0, end, vec, v, ok);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const float l = v[j];
            if (!ok[j]) continue;
            if (l > acc.m) {
                acc.s = acc.m == -INFINITY ? 1.0f : acc.s * expf(acc.m - l) + 1.0f;
                acc.m = l;
                acc.idx = i0 + j;
            } else if (l != -INFINITY) {
                acc.s += expf(l - acc.m);
            }
            if (!greedy) {
                const float score = __fadd_rn(__fmul_rn(l, inv_t), gumbel(key, i0 + j));
                if (score > best.m) {
                    best.m = score;
                    best.idx = i0 + j;
                }
            }
        }
    }
    const MaxArg all = block_maxarg(acc, scratch);
    const MaxArg win = greedy ? best : block_maxarg(best, scratch);
    if (threadIdx.x == 0) {
        int32_t* p = partials + ((int64_t)b * nchunks + c) * 5;
        p[0] = __float_as_int(all.m);
        p[1] = all.idx;
        p[2] = __float_as_int(all.s);
        p[3] = __float_as_int(win.m);
        p[4] = win.idx;
    }
}

// Combines a row's chunks (in index order, so ties keep the first index) into the token and
// its raw-logit logprob. One warp per row.
extern "C" __global__ void sample_plain_finish(int32_t* __restrict__ out_tokens,
                                               float* __restrict__ out_logprobs,
                                               const int32_t* __restrict__ partials,
                                               const float* __restrict__ logits, int vocab,
                                               int nchunks, const float* __restrict__ temperatures,
                                               const int32_t* __restrict__ top_ks) {
    pdl_enter();
    const int b = blockIdx.x;
    const int lane = threadIdx.x & 31;
    MaxArg acc{-INFINITY, 0x7fffffff, 0.0f};
    MaxArg best{-INFINITY, 0x7fffffff, 0.0f};
    for (int c = lane; c < nchunks; c += 32) {
        const int32_t* p = partials + ((int64_t)b * nchunks + c) * 5;
        acc = combine(acc, MaxArg{__int_as_float(p[0]), p[1], __int_as_float(p[2])});
        const MaxArg cand{__int_as_float(p[3]), p[4], 0.0f};
        if (cand.m > best.m || (cand.m == best.m && cand.idx < best.idx)) best = cand;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        MaxArg w;
        w.m = __shfl_xor_sync(0xffffffffu, acc.m, o);
        w.idx = __shfl_xor_sync(0xffffffffu, acc.idx, o);
        w.s = __shfl_xor_sync(0xffffffffu, acc.s, o);
        acc = combine(acc, w);
        MaxArg x;
        x.m = __shfl_xor_sync(0xffffffffu, best.m, o);
        x.idx = __shfl_xor_sync(0xffffffffu, best.idx, o);
        if (x.m > best.m || (x.m == best.m && x.idx < best.idx)) best = x;
    }
    if (lane == 0) {
        const float temp = temperatures[b];
        const bool greedy = temp < 1e-5f || top_ks[b] == 1;
        int token = greedy ? acc.idx : best.idx;
        if (token < 0 || token >= vocab) token = 0;  // every logit -inf: token 0, as the reference
        out_tokens[b] = token;
        out_logprobs[b] = logits[(int64_t)b * vocab + token] - (acc.m + logf(acc.s));
    }
}
