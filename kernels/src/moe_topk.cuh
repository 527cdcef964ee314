// One token's mixture-of-experts routing by one warp, shared by moe_topk_softmax (moe.cu) and
// the small-batch decode path's gate/up kernel (moe_small.cu), so that both route alike: softmax
// of the router logits in f32 (expf), the top_k largest probabilities, ties to the lower expert,
// divided by their sum when renormalize != 0, listed in ascending expert order.
#pragma once

#include "common.cuh"

constexpr int kMoeMaxExperts = 1024;

// Warp argmax of (value, index): the larger value, ties to the lower index.
RVLLM_DEVICE void warp_argmax(float& v, int& i) {
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, v, o);
        const int oi = __shfl_xor_sync(0xffffffffu, i, o);
        if (ov > v || (ov == v && oi < i)) {
            v = ov;
            i = oi;
        }
    }
}

// moe_route_token for experts <= 32 kPer: a lane holds kPer logits in registers, and every
// pick scans them all, so the bound is kept to the layer's (128 experts: 4, not 32).
template <int kPer>
RVLLM_DEVICE void moe_route_token_upto(const elem_t* __restrict__ row, int experts, int top_k,
                                       int renormalize, int& id, float& weight, int& rank) {
    const int lane = threadIdx.x % 32;
    float p[kPer];
    float mx = -INFINITY;
#pragma unroll
    for (int q = 0; q < kPer; ++q) {
        const int e = q * 32 + lane;
        p[q] = e < experts ? to_f32(row[e]) : -INFINITY;
        mx = fmaxf(mx, p[q]);
    }
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    float sum = 0.0f;
#pragma unroll
    for (int q = 0; q < kPer; ++q) {
        const int e = q * 32 + lane;
        p[q] = e < experts ? expf(p[q] - mx) : 0.0f;
        sum += p[q];
    }
    sum = warp_sum(sum);
    // Lane j keeps the j-th pick; picks are knocked out of p (set to -1) as they are taken.
    int my_id = 0;
    float my_w = 0.0f, picked = 0.0f;
    for (int j = 0; j < top_k; ++j) {
        float bv = -1.0f;
        int bi = kMoeMaxExperts;
#pragma unroll
        for (int q = 0; q < kPer; ++q) {
            const int e = q * 32 + lane;
            if (e < experts && (p[q] > bv || (p[q] == bv && e < bi))) {
                bv = p[q];
                bi = e;
            }
        }
        warp_argmax(bv, bi);
        // Only NaN logits leave nothing to pick: keep the id inside the expert table (moe_align
        // indexes shared memory by it); the layer's output is NaN either way.
        if (bi >= experts) bi = 0;
        const float prob = bv / sum;
        picked += prob;
        if (lane == j) {
            my_id = bi;
            my_w = prob;
        }
        // A static index, so that p stays in registers.
#pragma unroll
        for (int q = 0; q < kPer; ++q) {
            if (q * 32 + lane == bi) p[q] = -1.0f;
        }
    }
    const float norm = renormalize ? picked : 1.0f;
    // Ascending expert order: each pick's rank among the picks is its place (equal ids, only
    // from NaN logits, in pick order, so that every place is written).
    rank = 0;
    for (int j = 0; j < top_k; ++j) {
        const int other = __shfl_sync(0xffffffffu, my_id, j);
        if (lane < top_k && (other < my_id || (other == my_id && j < lane))) ++rank;
    }
    id = my_id;
    weight = my_w / norm;
}

// Routes the token whose logits are `row` ([experts]; experts <= kMoeMaxExperts, top_k <= 32;
// the whole warp calls it). Lane j < top_k returns the j-th pick in `id` and `weight`, and its
// place in ascending expert order in `rank`; other lanes' outputs mean nothing.
RVLLM_DEVICE void moe_route_token(const elem_t* __restrict__ row, int experts, int top_k,
                                  int renormalize, int& id, float& weight, int& rank) {
    if (experts <= 128) {
        moe_route_token_upto<4>(row, experts, top_k, renormalize, id, weight, rank);
    } else if (experts <= 256) {
        moe_route_token_upto<8>(row, experts, top_k, renormalize, id, weight, rank);
    } else {
        moe_route_token_upto<kMoeMaxExperts / 32>(row, experts, top_k, renormalize, id, weight,
                                                  rank);
    }
}
