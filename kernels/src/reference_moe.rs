//! CPU references of the fused mixture-of-experts kernels (`moe.cu`), one function a kernel,
//! in f32. The engine's CPU backend (`backend/cpu/moe.rs`) computes the same layer. The grouped
//! GEMM's launch geometry (`moe_gemm.cu`) is here too, so the engine and the GPU tests launch it
//! the same way.

/// Rows of one expert a tile of the tensor-core grouped GEMM (`moe_gemm.cu`'s kBM, `moe.cu`'s
/// kMoeGemmTileRows).
pub const MOE_GEMM_TILE_ROWS: usize = 64;
/// Output columns a block of the grouped GEMM (kBN); half as many gated (each with its gate and
/// up weight rows).
pub const MOE_GEMM_TILE_COLS: usize = 64;
/// Threads a block of the grouped GEMM (kThreads).
pub const MOE_GEMM_THREADS: u32 = 128;
/// Dynamic shared memory a block of the grouped GEMM: 6 stages of a 64 x 64 input tile and a
/// 64 x 64 weight tile, rows padded to 72 elements (kSmemBytes, checked there).
pub const MOE_GEMM_SMEM_BYTES: u32 = 6 * (64 + 64) * (64 + 8) * 2;

/// Entries of `moe_align`'s tile map for `pairs` pairs of `experts` experts, the grouped GEMM's
/// grid height: every routing fits, since an expert with `c` rows has at most `c / 64 + 1`
/// tiles and at most `min(experts, pairs)` experts have rows.
pub fn moe_gemm_tile_slots(pairs: usize, experts: usize) -> usize {
    pairs / MOE_GEMM_TILE_ROWS + experts.min(pairs)
}

/// `(grid, block, dynamic shared bytes)` of `moe_grouped_gemm` with `n` output columns over
/// `pairs` rows of `experts` experts, `gated` (SiLU-and-mul of gate and up) or not: a block a
/// tile of 64 columns (32 gated) and tile-map entry. From the shape alone, so that a CUDA graph
/// may hold it.
pub fn moe_grouped_gemm_launch(
    n: usize,
    experts: usize,
    pairs: usize,
    gated: bool,
) -> ((u32, u32, u32), u32, u32) {
    let cols = if gated {
        MOE_GEMM_TILE_COLS / 2
    } else {
        MOE_GEMM_TILE_COLS
    };
    let grid = (
        n.div_ceil(cols).max(1) as u32,
        moe_gemm_tile_slots(pairs, experts).max(1) as u32,
        1,
    );
    (grid, MOE_GEMM_THREADS, MOE_GEMM_SMEM_BYTES)
}

/// `moe_align`'s tile map from its `offsets` (`[experts + 1]`): for each expert in order, each of
/// its tiles of up to 64 rows in order, as `(row tile << 10) | expert`, then -1 up to
/// [`moe_gemm_tile_slots`].
pub fn moe_gemm_tile_map(offsets: &[i32]) -> Vec<i32> {
    let experts = offsets.len() - 1;
    let pairs = offsets[experts] as usize;
    let mut map = Vec::new();
    for (e, span) in offsets.windows(2).enumerate() {
        let tiles = ((span[1] - span[0]) as usize).div_ceil(MOE_GEMM_TILE_ROWS);
        map.extend((0..tiles).map(|t| ((t << 10) | e) as i32));
    }
    map.resize(moe_gemm_tile_slots(pairs, experts), -1);
    map
}

/// `moe_topk_softmax`: each token's `top_k` experts (ascending) and weights from router logits
/// `[tokens, experts]`: softmax, the largest probabilities (ties to the lower expert), divided
/// by their sum when `renormalize`.
pub fn moe_topk_softmax(
    logits: &[f32],
    experts: usize,
    top_k: usize,
    renormalize: bool,
) -> (Vec<i32>, Vec<f32>) {
    let mut ids = Vec::new();
    let mut weights = Vec::new();
    for row in logits.chunks_exact(experts) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let exps: Vec<f32> = row.iter().map(|&l| (l - max).exp()).collect();
        let sum: f32 = exps.iter().sum();
        let mut order: Vec<usize> = (0..experts).collect();
        order.sort_by(|&a, &b| exps[b].total_cmp(&exps[a]));
        let top = &mut order[..top_k];
        let probs: Vec<f32> = top.iter().map(|&e| exps[e] / sum).collect();
        let norm = if renormalize { probs.iter().sum() } else { 1.0 };
        let mut picks: Vec<(usize, f32)> = top.iter().copied().zip(probs).collect();
        picks.sort_by_key(|p| p.0);
        for (e, p) in picks {
            ids.push(e as i32);
            weights.push(p / norm);
        }
    }
    (ids, weights)
}

/// `moe_align`: per expert the start of its slots (`[experts + 1]`), the pair at each slot
/// (grouped by expert, pair order inside a group) and each pair's slot.
pub fn moe_align(topk_ids: &[i32], experts: usize) -> (Vec<i32>, Vec<i32>, Vec<i32>) {
    let mut offsets = vec![0i32; experts + 1];
    for &e in topk_ids {
        offsets[e as usize + 1] += 1;
    }
    for e in 0..experts {
        offsets[e + 1] += offsets[e];
    }
    let mut next = offsets.clone();
    let mut sorted = vec![0i32; topk_ids.len()];
    let mut slots = vec![0i32; topk_ids.len()];
    for (p, &e) in topk_ids.iter().enumerate() {
        let s = next[e as usize];
        next[e as usize] += 1;
        sorted[s as usize] = p as i32;
        slots[p] = s;
    }
    (offsets, sorted, slots)
}

/// `moe_gather`: `rows[s] = x[sorted_pairs[s] / top_k]`.
pub fn moe_gather(x: &[f32], sorted_pairs: &[i32], hidden: usize, top_k: usize) -> Vec<f32> {
    sorted_pairs
        .iter()
        .flat_map(|&p| {
            let t = p as usize / top_k;
            x[t * hidden..(t + 1) * hidden].iter().copied()
        })
        .collect()
}

/// `moe_grouped_gemm`: `out[s, j] = sum_l input[s, l] * w[e, j, l]` for the slots `s` of each
/// expert `e` (`offsets` from `moe_align`); `w` is `[experts, n, k]`.
pub fn moe_grouped_gemm(input: &[f32], w: &[f32], offsets: &[i32], n: usize, k: usize) -> Vec<f32> {
    let rows = input.len() / k;
    let mut out = vec![0.0f32; rows * n];
    for e in 0..offsets.len() - 1 {
        for s in offsets[e] as usize..offsets[e + 1] as usize {
            let x = &input[s * k..(s + 1) * k];
            for j in 0..n {
                let wr = &w[(e * n + j) * k..(e * n + j + 1) * k];
                out[s * n + j] = x.iter().zip(wr).map(|(a, b)| a * b).sum();
            }
        }
    }
    out
}

/// `moe_unpermute`: `out[t] = sum_j weights[t, j] * rows[pair_slots[t * top_k + j]]`.
pub fn moe_unpermute(
    rows: &[f32],
    pair_slots: &[i32],
    weights: &[f32],
    hidden: usize,
    top_k: usize,
) -> Vec<f32> {
    let tokens = pair_slots.len() / top_k;
    let mut out = vec![0.0f32; tokens * hidden];
    for t in 0..tokens {
        for j in 0..top_k {
            let p = t * top_k + j;
            let s = pair_slots[p] as usize;
            for i in 0..hidden {
                out[t * hidden + i] += weights[p] * rows[s * hidden + i];
            }
        }
    }
    out
}

/// Most tokens the small-batch decode path (`moe_small.cu`) takes (its kMoeSmallMaxTokens): a
/// warp routes a token and each lane keeps a partial sum a token, so the kernels hold eight in
/// registers; at 8 tokens of 128 experts top 8 about 50 experts are busy, and past it the
/// grouped GEMM's tensor cores reuse each weight for more rows than the GEMV's FMAs keep up
/// with.
pub const MOE_SMALL_MAX_TOKENS: usize = 8;
/// Output columns (one a warp) a block of each small-path kernel, and its threads.
pub const MOE_SMALL_COLS: usize = 8;
pub const MOE_SMALL_THREADS: u32 = 256;

/// Whether the small-batch path takes `tokens` tokens of this layer: at most
/// [`MOE_SMALL_MAX_TOKENS`], top 32 and 1,024 experts, rows of whole 16-byte chunks.
pub fn moe_small_fits(
    tokens: usize,
    experts: usize,
    top_k: usize,
    hidden: usize,
    inter: usize,
) -> bool {
    (1..=MOE_SMALL_MAX_TOKENS).contains(&tokens)
        && (1..=experts.min(32)).contains(&top_k)
        && experts <= 1024
        && hidden > 0
        && inter > 0
        && hidden.is_multiple_of(8)
        && inter.is_multiple_of(8)
}

/// `(grid, block)` of `moe_small_gate_up`: a block 8 columns of one distinct expert, as many
/// expert rows as the step could select (those past the routing's return at once).
pub fn moe_small_gate_up_launch(
    tokens: usize,
    experts: usize,
    top_k: usize,
    inter: usize,
) -> ((u32, u32, u32), u32) {
    // Blocks across the columns: 32, or enough for 256 blocks in all, at most one a column
    // group. On an H100 the Qwen3-30B-A3B layer's gate/up took 29.8 us at 32 against 36.3 at
    // all 96 column groups (one token; 32 was within 6 % of the best width at 2, 4 and 8).
    let rows = experts.min(tokens * top_k).max(1);
    let across = 32.max(256usize.div_ceil(rows));
    let grid = (
        inter.div_ceil(MOE_SMALL_COLS).clamp(1, across) as u32,
        rows as u32,
        1,
    );
    (grid, MOE_SMALL_THREADS)
}

/// `(grid, block)` of `moe_small_down`: a block 8 output columns of every token.
pub fn moe_small_down_launch(hidden: usize) -> ((u32, u32, u32), u32) {
    (
        (hidden.div_ceil(MOE_SMALL_COLS).max(1) as u32, 1, 1),
        MOE_SMALL_THREADS,
    )
}

/// `moe_small_gate_up`'s activations `[tokens * top_k, inter]` in pair order: pair `p` of token
/// `p / top_k` and expert `ids[p]`, `silu(x . gate) * (x . up)` for every column, from `w_gu`
/// (`[experts, 2 * inter, hidden]`, gate rows then up rows). The routing is
/// [`moe_topk_softmax`]'s.
pub fn moe_small_gate_up(
    x: &[f32],
    ids: &[i32],
    w_gu: &[f32],
    top_k: usize,
    hidden: usize,
    inter: usize,
) -> Vec<f32> {
    let dot = |a: &[f32], b: &[f32]| -> f32 { a.iter().zip(b).map(|(a, b)| a * b).sum() };
    let mut act = vec![0.0f32; ids.len() * inter];
    for (p, &e) in ids.iter().enumerate() {
        let xt = &x[p / top_k * hidden..(p / top_k + 1) * hidden];
        let we = &w_gu[e as usize * 2 * inter * hidden..(e as usize + 1) * 2 * inter * hidden];
        for j in 0..inter {
            let g = dot(xt, &we[j * hidden..(j + 1) * hidden]);
            let u = dot(xt, &we[(inter + j) * hidden..(inter + j + 1) * hidden]);
            act[p * inter + j] = g / (1.0 + (-g).exp()) * u;
        }
    }
    act
}

/// `moe_small_down`: `out[t, c] = sum_j weights[p] * (act[p] . w_d[ids[p], c])` over the pairs
/// `p = t * top_k + j` of each token (`w_d` is `[experts, hidden, inter]`).
pub fn moe_small_down(
    act: &[f32],
    ids: &[i32],
    weights: &[f32],
    w_d: &[f32],
    top_k: usize,
    hidden: usize,
    inter: usize,
) -> Vec<f32> {
    let tokens = ids.len() / top_k;
    let mut out = vec![0.0f32; tokens * hidden];
    for (p, (&e, &wt)) in ids.iter().zip(weights).enumerate() {
        let a = &act[p * inter..(p + 1) * inter];
        for c in 0..hidden {
            let row =
                &w_d[(e as usize * hidden + c) * inter..(e as usize * hidden + c + 1) * inter];
            out[p / top_k * hidden + c] += wt * a.iter().zip(row).map(|(a, b)| a * b).sum::<f32>();
        }
    }
    out
}
