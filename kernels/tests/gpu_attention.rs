//! Paged attention kernels (decode with split-K, chunked prefill) against the CPU reference
//! `rvllm_kernels::reference::paged_attention`, on fresh random inputs (seed printed;
//! RVLLM_TEST_SEED replays one), outputs poisoned before each launch, cache slots that no
//! sequence owns filled with NaN (a read outside a context shows), bf16 tolerance; GQA group
//! sizes 1..16, head dims 64 and 128, contexts from 1 token to several KV blocks and partitions.
//!
//! Without a CUDA device each test prints `SKIPPED: no CUDA device` and returns.
mod gpu_harness;

use gpu_harness::{arg, assert_close, gpu, random_bf16, rng, Gpu, ATOL, BF16_NAN, RTOL};
use half::bf16;
use rand::seq::SliceRandom;
use rand::Rng;
use rvllm_kernels::reference as cpu;

/// (heads, kv heads, head dim, [(chunk length, context length after the step)]).
type PrefillCase = (usize, usize, usize, &'static [(usize, usize)]);

/// A paged KV cache filled for the given context lengths, with shuffled physical blocks and
/// NaN in every slot no sequence owns (so a read outside a sequence's context shows).
struct TestCache {
    k: Vec<f32>,
    v: Vec<f32>,
    k_h: Vec<bf16>,
    v_h: Vec<bf16>,
    tables: Vec<i32>,
    max_blocks: usize,
    block_size: usize,
    nkv: usize,
    hd: usize,
}

impl TestCache {
    fn new(
        r: &mut rand::rngs::StdRng,
        ctx: &[usize],
        block_size: usize,
        nkv: usize,
        hd: usize,
        k_amp: f32,
    ) -> Self {
        let max_blocks = ctx
            .iter()
            .map(|c| c.div_ceil(block_size))
            .max()
            .unwrap_or(1)
            .max(1);
        let used: usize = ctx.iter().map(|c| c.div_ceil(block_size)).sum();
        let num_blocks = used + 3;
        let mut phys: Vec<i32> = (0..num_blocks as i32).collect();
        phys.shuffle(r);
        let width = nkv * hd;
        let mut k = vec![f32::NAN; num_blocks * block_size * width];
        let mut v = k.clone();
        let mut tables = vec![0i32; ctx.len() * max_blocks];
        let mut next = 0;
        for (s, &c) in ctx.iter().enumerate() {
            for j in 0..c.div_ceil(block_size) {
                tables[s * max_blocks + j] = phys[next];
                next += 1;
            }
            for t in 0..c {
                let slot =
                    tables[s * max_blocks + t / block_size] as usize * block_size + t % block_size;
                for e in 0..width {
                    k[slot * width + e] = bf16::from_f32(r.random_range(-k_amp..k_amp)).to_f32();
                    v[slot * width + e] = bf16::from_f32(r.random_range(-1.0f32..1.0)).to_f32();
                }
            }
        }
        let k_h = k.iter().map(|&x| bf16::from_f32(x)).collect();
        let v_h = v.iter().map(|&x| bf16::from_f32(x)).collect();
        Self {
            k,
            v,
            k_h,
            v_h,
            tables,
            max_blocks,
            block_size,
            nkv,
            hd,
        }
    }

    fn paged(&self) -> cpu::PagedKv<'_> {
        cpu::PagedKv {
            key_cache: &self.k,
            value_cache: &self.v,
            block_size: self.block_size,
            num_kv_heads: self.nkv,
            head_dim: self.hd,
        }
    }
}

/// The decode kernel variant for a GQA group size: GT query heads per block.
fn decode_group_tile(group: usize) -> usize {
    match group {
        1 => 1,
        2 => 2,
        3 | 4 => 4,
        _ => 8,
    }
}

/// Runs paged decode attention (partition kernel + reduce when split) and returns the output.
#[allow(clippy::too_many_arguments)]
fn run_decode(
    g: &Gpu,
    c: &TestCache,
    q_h: &[bf16],
    q_stride: usize,
    nh: usize,
    ctx: &[usize],
    scale: f32,
    target: usize,
    spare_depth: usize,
) -> Vec<f32> {
    let num_seqs = ctx.len();
    let group = nh / c.nkv;
    let gt = decode_group_tile(group);
    // The grid must cover max(target, ceil(ctx / 512)) partitions; deeper grids are allowed
    // (the extra blocks exit at once) and `spare_depth` checks that.
    let max_ctx = ctx.iter().max().copied().unwrap_or(1);
    let max_parts = target.max(max_ctx.div_ceil(512)) + spare_depth;
    let (d_q, d_k, d_v) = (g.upload(q_h), g.upload(&c.k_h), g.upload(&c.v_h));
    let ctx_i: Vec<i32> = ctx.iter().map(|&x| x as i32).collect();
    let (d_tables, d_ctx) = (g.upload(&c.tables), g.upload(&ctx_i));
    let out = g.poisoned(num_seqs * nh * c.hd, BF16_NAN);
    let part_out = g.poisoned(num_seqs * nh * max_parts * c.hd, f32::NAN);
    let part_ml = g.poisoned(num_seqs * nh * max_parts * 2, f32::NAN);
    let (nh_, nkv_, bs_, mb_, qs_, ps_) = (
        nh as i32,
        c.nkv as i32,
        c.block_size as i32,
        c.max_blocks as i32,
        q_stride as i32,
        target as i32,
    );
    let grid = (
        (c.nkv * group.div_ceil(gt)) as u32,
        num_seqs as u32,
        max_parts as u32,
    );
    let kernel = format!("paged_attention_decode_hd{}_g{gt}", c.hd);
    g.launch(
        "attention_decode",
        &kernel,
        grid,
        (128, 1, 1),
        &mut [
            arg(&out.ptr),
            arg(&part_out.ptr),
            arg(&part_ml.ptr),
            arg(&d_q.ptr),
            arg(&d_k.ptr),
            arg(&d_v.ptr),
            arg(&d_tables.ptr),
            arg(&d_ctx.ptr),
            arg(&scale),
            arg(&nh_),
            arg(&nkv_),
            arg(&bs_),
            arg(&mb_),
            arg(&qs_),
            arg(&ps_),
        ],
    );
    if max_parts > 1 {
        let (hd_, mp_) = (c.hd as i32, max_parts as i32);
        // The reduce works with 128 or 256 threads; cover both.
        let reduce_block = if target % 2 == 1 { 128 } else { 256 };
        g.launch(
            "attention_decode",
            "paged_attention_decode_reduce",
            (nh as u32, num_seqs as u32, 1),
            (reduce_block, 1, 1),
            &mut [
                arg(&out.ptr),
                arg(&part_out.ptr),
                arg(&part_ml.ptr),
                arg(&d_ctx.ptr),
                arg(&nh_),
                arg(&hd_),
                arg(&mp_),
                arg(&ps_),
            ],
        );
    }
    g.download_bf16(&out)
}

#[test]
fn paged_attention_decode_matches_reference() {
    let Some(g) = gpu("paged_attention_decode_matches_reference") else {
        return;
    };
    let mut r = rng("decode");
    // (heads, kv heads, head dim, contexts, target partitions). Each launch mixes sequences
    // that fit one partition (written directly, skipped by the reduce) with split ones, except
    // the second: all direct, no reduce launched.
    let cases: &[(usize, usize, usize, &[usize], usize)] = &[
        (32, 8, 128, &[1, 15, 17, 300, 1000], 1), // 1000: two partitions of 512
        (32, 8, 128, &[1, 100, 500], 1),
        (32, 8, 128, &[700, 33, 129], 11), // partitions of 64: 11, 1, 3
        (9, 3, 64, &[5, 33, 129, 600], 2), // 600: 2 x 320; 129: 2 x 128
        (8, 8, 128, &[1, 64, 1100], 4),    // 1100: 4 x 320
        (16, 1, 64, &[3, 250], 33),        // 250: 4 x 64
        (16, 8, 128, &[16, 2000], 1),      // 2000: 4 x 512, beyond the target
        (12, 2, 64, &[40, 77], 2),         // 77: 2 x 64
    ];
    for (i, &(nh, nkv, hd, ctx, target)) in cases.iter().enumerate() {
        let c = TestCache::new(&mut r, ctx, 16, nkv, hd, 3.0);
        // q inside a wider (fused QKV) row: stride > nh * hd.
        let q_stride = (nh + 2 * nkv) * hd;
        let (q_h, q) = random_bf16(&mut r, ctx.len() * q_stride, 1.0);
        let scale = 1.0 / (hd as f32).sqrt();
        let cu: Vec<i32> = (0..=ctx.len() as i32).collect();
        let ctx_i: Vec<i32> = ctx.iter().map(|&x| x as i32).collect();
        let batch = cpu::AttentionBatch {
            cu_seqlens_q: &cu,
            context_lens: &ctx_i,
            block_tables: &c.tables,
            max_blocks_per_seq: c.max_blocks,
        };
        let want = cpu::paged_attention(&q, q_stride, nh, &c.paged(), &batch, scale);
        let spare = i % 2;
        let got = run_decode(&g, &c, &q_h, q_stride, nh, ctx, scale, target, spare);
        assert_close(
            &format!("decode nh{nh} nkv{nkv} hd{hd} ctx{ctx:?} target{target} spare{spare}"),
            &got,
            &want,
            ATOL,
            RTOL,
        );
    }
}

#[test]
fn paged_attention_prefill_matches_reference() {
    let Some(g) = gpu("paged_attention_prefill_matches_reference") else {
        return;
    };
    let mut r = rng("prefill");
    // (heads, kv heads, head dim, [(chunk length, context length after the step)])
    let cases: &[PrefillCase] = &[
        (8, 2, 128, &[(70, 70), (37, 87), (130, 130), (5, 205)]),
        (9, 3, 64, &[(17, 17), (64, 100), (1, 33)]),
        (4, 4, 128, &[(200, 260)]),
        (32, 8, 128, &[(129, 129), (3, 3)]),
    ];
    for &(nh, nkv, hd, seqs) in cases {
        let ctx: Vec<usize> = seqs.iter().map(|s| s.1).collect();
        let c = TestCache::new(&mut r, &ctx, 16, nkv, hd, 3.0);
        let mut cu = vec![0i32];
        for s in seqs {
            cu.push(cu.last().unwrap() + s.0 as i32);
        }
        let total = *cu.last().unwrap() as usize;
        let q_stride = nh * hd + 64; // a padded row
        let (q_h, q) = random_bf16(&mut r, total * q_stride, 1.0);
        let scale = 1.0 / (hd as f32).sqrt();
        let (d_q, d_k, d_v) = (g.upload(&q_h), g.upload(&c.k_h), g.upload(&c.v_h));
        let ctx_i: Vec<i32> = ctx.iter().map(|&x| x as i32).collect();
        let (d_cu, d_ctx, d_tables) = (g.upload(&cu), g.upload(&ctx_i), g.upload(&c.tables));
        let out = g.poisoned(total * nh * hd, BF16_NAN);
        let max_chunk = seqs.iter().map(|s| s.0).max().unwrap();
        let (nh_, nkv_, bs_, mb_, qs_) = (
            nh as i32,
            nkv as i32,
            16i32,
            c.max_blocks as i32,
            q_stride as i32,
        );
        let kernel = format!("paged_attention_prefill_hd{hd}");
        g.launch(
            "attention_prefill",
            &kernel,
            (max_chunk.div_ceil(64) as u32, nh as u32, seqs.len() as u32),
            (128, 1, 1),
            &mut [
                arg(&out.ptr),
                arg(&d_q.ptr),
                arg(&d_k.ptr),
                arg(&d_v.ptr),
                arg(&d_cu.ptr),
                arg(&d_ctx.ptr),
                arg(&d_tables.ptr),
                arg(&scale),
                arg(&nh_),
                arg(&nkv_),
                arg(&bs_),
                arg(&mb_),
                arg(&qs_),
            ],
        );
        let batch = cpu::AttentionBatch {
            cu_seqlens_q: &cu,
            context_lens: &ctx_i,
            block_tables: &c.tables,
            max_blocks_per_seq: c.max_blocks,
        };
        let want = cpu::paged_attention(&q, q_stride, nh, &c.paged(), &batch, scale);
        assert_close(
            &format!("prefill nh{nh} nkv{nkv} hd{hd} seqs{seqs:?}"),
            &g.download_bf16(&out),
            &want,
            ATOL,
            RTOL,
        );
    }
}
