//! The FP8 (E4M3) KV cache's kernels (`--kv-cache-dtype fp8`) against CPU references on fresh
//! random inputs (seed printed; RVLLM_TEST_SEED replays one): the cache write
//! (`rope_and_cache_kvfp8*`, `rope_partial_and_cache_kvfp8*`), decode attention with its fused
//! write (`paged_attention_decode_kvfp8_hd*`, merged by its last blocks or by
//! `paged_attention_decode_reduce_windowed`) and chunked prefill
//! (`paged_attention_prefill_kvfp8_hd*`), head dims 64, 80, 96, 128 and 256, with a sliding
//! window and a soft-cap once, in both compute types (bf16, f16). Scales are not powers of two,
//! so a kernel that forgets one is off by far more than the tolerance. Outputs are poisoned
//! (NaN) before each launch and every cache slot no sequence owns holds the NaN code (0x7f),
//! as do the keys before a window, so a read outside a context shows.
//!
//! Without a CUDA device each test prints `SKIPPED: no CUDA device` and returns.
mod gpu_harness;

use gpu_harness::{assert_close, gpu, inv_freq, rng, Elem, Gpu};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;
use rvllm_kernels::args;
use rvllm_kernels::decode_smem;
use rvllm_kernels::reference as cpu;
use rvllm_kernels::reference_fp8::{e4m3_to_f32, f32_to_e4m3};

/// The E4M3 NaN code: the poison of cache slots no sequence owns.
const NAN_CODE: u8 = 0x7f;
const K_SCALE: f32 = 0.0371;
const V_SCALE: f32 = 0.0123;

/// The value a cache code stands for.
fn dequant(code: u8, scale: f32) -> f32 {
    e4m3_to_f32(code) * scale
}

/// The code of `x` at `scale`, as the kernels round it: x * (1 / scale), saturated.
fn quant(x: f32, scale: f32) -> u8 {
    f32_to_e4m3(x * (1.0 / scale))
}

/// Dequantized cache values against exact ones: within half an E4M3 step (1/16 relative)
/// plus a little for the compute type's rounding before the write, and the subnormal step.
fn assert_fp8_close(what: &str, got: &[u8], want: &[f32], scale: f32) {
    let got: Vec<f32> = got.iter().map(|&c| dequant(c, scale)).collect();
    assert_close(what, &got, want, scale / 512.0, 0.07);
}

/// A paged FP8 cache with shuffled physical blocks: the codes (NaN where no sequence owns the
/// slot) and their values for the reference.
struct Fp8Cache {
    k: Vec<u8>,
    v: Vec<u8>,
    tables: Vec<i32>,
    max_blocks: usize,
    block_size: usize,
    nkv: usize,
    hd: usize,
}

impl Fp8Cache {
    fn new(r: &mut StdRng, ctx: &[usize], nkv: usize, hd: usize) -> Self {
        let block_size = 16;
        let max_blocks = ctx
            .iter()
            .map(|c| c.div_ceil(block_size))
            .max()
            .unwrap_or(1);
        let used: usize = ctx.iter().map(|c| c.div_ceil(block_size)).sum();
        let num_blocks = used + 2;
        let mut phys: Vec<i32> = (0..num_blocks as i32).collect();
        phys.shuffle(r);
        let width = nkv * hd;
        let mut k = vec![NAN_CODE; num_blocks * block_size * width];
        let mut v = k.clone();
        let mut tables = vec![0i32; ctx.len() * max_blocks];
        let mut next = 0;
        for (s, &c) in ctx.iter().enumerate() {
            for j in 0..c.div_ceil(block_size) {
                tables[s * max_blocks + j] = phys[next];
                next += 1;
            }
        }
        let mut cache = Self {
            k: Vec::new(),
            v: Vec::new(),
            tables,
            max_blocks,
            block_size,
            nkv,
            hd,
        };
        for (s, &c) in ctx.iter().enumerate() {
            for t in 0..c {
                let at = cache.slot(s, t) * width;
                for e in 0..width {
                    k[at + e] = quant(r.random_range(-3.0f32..3.0), K_SCALE);
                    v[at + e] = quant(r.random_range(-1.0f32..1.0), V_SCALE);
                }
            }
        }
        cache.k = k;
        cache.v = v;
        cache
    }

    fn slot(&self, seq: usize, t: usize) -> usize {
        self.tables[seq * self.max_blocks + t / self.block_size] as usize * self.block_size
            + t % self.block_size
    }

    /// Poisons the keys and values of sequence `seq` before token `first`.
    fn poison_keys_before(&mut self, seq: usize, first: usize) {
        let width = self.nkv * self.hd;
        for t in 0..first {
            let at = self.slot(seq, t) * width;
            self.k[at..at + width].fill(NAN_CODE);
            self.v[at..at + width].fill(NAN_CODE);
        }
    }

    /// The reference's attention over these codes.
    fn attend(
        &self,
        q: &[f32],
        q_stride: usize,
        nh: usize,
        batch: &cpu::AttentionBatch,
        window: usize,
        softcap: f32,
    ) -> Vec<f32> {
        let k: Vec<f32> = self.k.iter().map(|&c| dequant(c, K_SCALE)).collect();
        let v: Vec<f32> = self.v.iter().map(|&c| dequant(c, V_SCALE)).collect();
        let kv = cpu::PagedKv {
            key_cache: &k,
            value_cache: &v,
            block_size: self.block_size,
            num_kv_heads: self.nkv,
            head_dim: self.hd,
        };
        let scale = 1.0 / (self.hd as f32).sqrt();
        cpu::paged_attention_windowed(
            q,
            q_stride,
            nh,
            &kv,
            batch,
            scale,
            (window > 0).then_some(window),
            (softcap > 0.0).then_some(softcap),
        )
    }
}

#[test]
fn kv_fp8_cache_write_matches_reference() {
    let Some(g) = gpu("kv_fp8_cache_write_matches_reference") else {
        return;
    };
    let mut r = rng("kv_fp8_cache_write");
    for e in Elem::BOTH {
        let ty = e.name();
        // (tokens, heads, kv heads, head dim, rotated dims): the 16-byte path, the scalar
        // path (head_dim / 2 not a multiple of 8), partial rotary.
        for &(tokens, nh, nkv, hd, rot) in &[
            (5usize, 8usize, 2usize, 128usize, 128usize),
            (7, 4, 4, 64, 64),
            (3, 4, 1, 256, 256),
            (4, 6, 2, 36, 36),
            (6, 8, 2, 128, 96),
        ] {
            let bs = 16usize;
            let num_blocks = 4usize;
            let width = nkv * hd;
            let stride = (nh + 2 * nkv) * hd;
            // k up to 20: past 448 * K_SCALE = 16.6, so the write must saturate.
            let (qkv_h, qkv) = e.random(&mut r, tokens * stride, 20.0);
            let positions: Vec<i32> = (0..tokens).map(|_| r.random_range(0..70_000)).collect();
            let mut slots: Vec<i32> = (0..(num_blocks * bs) as i32).collect();
            slots.shuffle(&mut r);
            let mut slots = slots[..tokens].to_vec();
            slots[tokens - 1] = -1; // padding: no write
            let freqs = inv_freq(rot, 500_000.0);
            let d_qkv = g.upload(&qkv_h);
            let kc = g.poisoned(num_blocks * bs * width, NAN_CODE);
            let vc = g.poisoned(num_blocks * bs * width, NAN_CODE);
            let (d_pos, d_slots, d_freq) =
                (g.upload(&positions), g.upload(&slots), g.upload(&freqs));
            let k_ptr = d_qkv.ptr + (nh * hd * 2) as u64;
            let v_ptr = k_ptr + (width * 2) as u64;
            let (n, nh_, nkv_, hd_, st) = (
                tokens as i32,
                nh as i32,
                nkv as i32,
                hd as i32,
                stride as i32,
            );
            let (module, grid, block) =
                (e.module("rope_cache"), (tokens as u32, 1, 1), (256, 1, 1));
            let kernel = if rot == hd {
                e.kernel("rope_and_cache_kvfp8_bf16")
            } else {
                e.kernel("rope_partial_and_cache_kvfp8_bf16")
            };
            if rot == hd {
                let a = args::RopeAndCacheKvfp8 {
                    q: d_qkv.ptr,
                    k: k_ptr,
                    v: v_ptr,
                    key_cache: kc.ptr,
                    value_cache: vc.ptr,
                    positions: d_pos.ptr,
                    slot_mapping: d_slots.ptr,
                    inv_freq: d_freq.ptr,
                    num_tokens: n,
                    num_heads: nh_,
                    num_kv_heads: nkv_,
                    head_dim: hd_,
                    q_stride: st,
                    k_stride: st,
                    v_stride: st,
                    k_scale: K_SCALE,
                    v_scale: V_SCALE,
                };
                g.launch_args(&module, &kernel, grid, block, a);
            } else {
                let a = args::RopePartialAndCacheKvfp8 {
                    q: d_qkv.ptr,
                    k: k_ptr,
                    v: v_ptr,
                    key_cache: kc.ptr,
                    value_cache: vc.ptr,
                    positions: d_pos.ptr,
                    slot_mapping: d_slots.ptr,
                    inv_freq: d_freq.ptr,
                    num_tokens: n,
                    num_heads: nh_,
                    num_kv_heads: nkv_,
                    head_dim: hd_,
                    q_stride: st,
                    k_stride: st,
                    v_stride: st,
                    rotary_dim: rot as i32,
                    attention_factor: 1.0,
                    k_scale: K_SCALE,
                    v_scale: V_SCALE,
                };
                g.launch_args(&module, &kernel, grid, block, a);
            }
            // Reference: q and k rotated and rounded to the compute type, then quantized.
            let mut want = qkv.clone();
            cpu::rope_partial_inplace(
                &mut want,
                stride,
                nh + nkv,
                hd,
                rot,
                &positions,
                &freqs,
                1.0,
            );
            e.round_all(&mut want);
            let what = format!("{ty} {kernel} T{tokens} nh{nh} nkv{nkv} hd{hd} rot{rot}");
            let (got_k, got_v) = (g.download(&kc), g.download(&vc));
            let mut written = vec![false; num_blocks * bs];
            for (t, &slot) in slots.iter().enumerate() {
                if slot < 0 {
                    continue;
                }
                let s = slot as usize;
                written[s] = true;
                let row = t * stride + nh * hd;
                let k_want: Vec<f32> = want[row..row + width]
                    .iter()
                    .map(|x| x.clamp(-448.0 * K_SCALE, 448.0 * K_SCALE))
                    .collect();
                // v past 448 * V_SCALE (5.5) saturates too.
                let v_want: Vec<f32> = qkv[row + width..row + 2 * width]
                    .iter()
                    .map(|x| x.clamp(-448.0 * V_SCALE, 448.0 * V_SCALE))
                    .collect();
                let (k_got, v_got) = (
                    &got_k[s * width..(s + 1) * width],
                    &got_v[s * width..(s + 1) * width],
                );
                assert_fp8_close(&format!("{what} k, token {t}"), k_got, &k_want, K_SCALE);
                // v is not rotated; its codes may still differ from the reference's by one
                // step where x / v_scale falls within an ulp of a rounding tie (the kernel's
                // fast-math reciprocal).
                assert_fp8_close(&format!("{what} v, token {t}"), v_got, &v_want, V_SCALE);
                assert!(
                    k_want
                        .iter()
                        .zip(k_got)
                        .any(|(w, &c)| w.abs() >= 448.0 * K_SCALE
                            && dequant(c, K_SCALE).abs() == 448.0 * K_SCALE)
                        || k_want.iter().all(|w| w.abs() < 448.0 * K_SCALE),
                    "{what}: k past the E4M3 range did not saturate to 448 * k_scale"
                );
            }
            // The padding token and every other slot: untouched.
            for (s, _) in written.iter().enumerate().filter(|(_, w)| !**w) {
                let at = s * width;
                assert!(
                    got_k[at..at + width]
                        .iter()
                        .chain(&got_v[at..at + width])
                        .all(|&c| c == NAN_CODE),
                    "{what}: slot {s} written though no token maps to it"
                );
            }
            // q is rotated in place as in the compute-type cache's build.
            let got_q = g.download_as(e, &d_qkv);
            let (atol, rtol) = e.tolerance();
            for t in 0..tokens {
                let q = t * stride..t * stride + nh * hd;
                assert_close(
                    &format!("{what} q, token {t}"),
                    &got_q[q.clone()],
                    &want[q],
                    atol,
                    rtol,
                );
            }
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

/// (heads, kv heads, head dim, contexts, target partitions, grid depth, window, soft-cap).
type DecodeCase = (
    usize,
    usize,
    usize,
    &'static [usize],
    usize,
    usize,
    usize,
    f32,
);

#[test]
fn kv_fp8_decode_attention_matches_reference() {
    let Some(g) = gpu("kv_fp8_decode_attention_matches_reference") else {
        return;
    };
    let mut r = rng("kv_fp8_decode");
    let cases: &[DecodeCase] = &[
        (32, 8, 128, &[1, 15, 17, 300, 1000], 1, 2, 0, 0.0), // 1000: two partitions of 512
        (9, 3, 64, &[5, 33, 129, 600], 2, 3, 0, 0.0),
        (8, 4, 256, &[1, 40, 700], 2, 2, 0, 0.0),
        (16, 2, 256, &[300, 65], 33, 5, 0, 0.0), // partitions of 64
        (5, 1, 80, &[1, 33, 200, 700], 2, 2, 0, 0.0),
        (6, 3, 96, &[90, 150, 513], 3, 3, 0, 0.0),
        (12, 2, 64, &[40, 77, 500], 2, 2, 100, 30.0), // windowed and capped, group 6
        (4, 1, 128, &[3000], 33, 5, 0, 0.0),          // batch 1, long context
    ];
    for e in Elem::BOTH {
        for (i, &case) in cases.iter().enumerate() {
            for fold in [false, true] {
                check_decode(&g, &mut r, e, i, case, fold);
            }
        }
    }
}

/// One decode case: fresh codes in the cache, the new tokens' q/k/v in fused QKV rows (rotated
/// by the kernel except in case 1), the kernel's written codes checked against the reference's
/// rounding, then its output against the reference's attention over the cache it left.
fn check_decode(
    g: &Gpu,
    r: &mut StdRng,
    e: Elem,
    i: usize,
    (nh, nkv, hd, ctx, target, depth, window, softcap): DecodeCase,
    fold: bool,
) {
    let ty = e.name();
    let mut c = Fp8Cache::new(r, ctx, nkv, hd);
    // The new token (index n - 1) sees the keys from n - window on.
    for (s, &n) in ctx.iter().enumerate().filter(|_| window > 0) {
        c.poison_keys_before(s, n.saturating_sub(window));
    }
    let width = nkv * hd;
    // The new token's slot starts as NaN: the kernel must write it.
    for (s, &n) in ctx.iter().enumerate() {
        let at = c.slot(s, n - 1) * width;
        c.k[at..at + width].fill(NAN_CODE);
        c.v[at..at + width].fill(NAN_CODE);
    }
    let stride = (nh + 2 * nkv) * hd;
    let (qkv_h, qkv) = e.random(r, ctx.len() * stride, 1.0);
    let ctx_i: Vec<i32> = ctx.iter().map(|&x| x as i32).collect();
    let positions: Vec<i32> = ctx_i.iter().map(|&x| x - 1 + 7 * (i as i32 % 2)).collect();
    let slots: Vec<i32> = ctx
        .iter()
        .enumerate()
        .map(|(s, &n)| c.slot(s, n - 1) as i32)
        .collect();
    let rope = i != 1;
    let freqs = inv_freq(hd, 500_000.0);
    let scale = 1.0 / (hd as f32).sqrt();

    let (d_qkv, d_k, d_v) = (g.upload(&qkv_h), g.upload(&c.k), g.upload(&c.v));
    let (d_tables, d_ctx) = (g.upload(&c.tables), g.upload(&ctx_i));
    let (d_pos, d_slots, d_freq) = (g.upload(&positions), g.upload(&slots), g.upload(&freqs));
    let num_seqs = ctx.len();
    let out = g.poisoned(num_seqs * nh * hd, e.nan());
    let part_out = g.poisoned(num_seqs * nh * depth * hd, f32::NAN);
    let part_ml = g.poisoned(num_seqs * nh * depth * 2, f32::NAN);
    let group = nh / nkv;
    let gt = decode_group_tile(group);
    let columns = nkv * group.div_ceil(gt);
    let semaphores = g.upload(&vec![0i32; num_seqs * columns]);
    let module = e.module("attention_decode");
    let kernel = e.kernel(&format!("paged_attention_decode_kvfp8_hd{hd}_g{gt}"));
    let k_ptr = d_qkv.ptr + (nh * hd * 2) as u64;
    let a = args::DecodeAttentionKvFp8 {
        out: out.ptr,
        partial_out: part_out.ptr,
        partial_ml: part_ml.ptr,
        semaphores: if fold { semaphores.ptr } else { 0 },
        q: d_qkv.ptr,
        k_new: k_ptr,
        v_new: k_ptr + (width * 2) as u64,
        qkv_stride: stride as i32,
        key_cache: d_k.ptr,
        value_cache: d_v.ptr,
        block_tables: d_tables.ptr,
        context_lens: d_ctx.ptr,
        positions: d_pos.ptr,
        slot_mapping: d_slots.ptr,
        inv_freq: if rope { d_freq.ptr } else { 0 },
        scale,
        num_heads: nh as i32,
        num_kv_heads: nkv as i32,
        block_size: c.block_size as i32,
        max_blocks_per_seq: c.max_blocks as i32,
        target_partitions: target as i32,
        window: window as i32,
        softcap,
        k_scale: K_SCALE,
        v_scale: V_SCALE,
    };
    let grid = (columns as u32, num_seqs as u32, depth as u32);
    g.launch_args_smem(
        &module,
        &kernel,
        grid,
        (128, 1, 1),
        decode_smem::full(gt),
        a,
    );
    if fold {
        assert!(
            g.download(&semaphores).iter().all(|&n| n == 0),
            "{ty}: {kernel} left an arrival counter set"
        );
    } else if depth > 1 {
        let a = args::PagedAttentionDecodeReduceWindowed {
            out: out.ptr,
            partial_out: part_out.ptr,
            partial_ml: part_ml.ptr,
            context_lens: d_ctx.ptr,
            num_heads: nh as i32,
            head_dim: hd as i32,
            max_partitions: depth as i32,
            target_partitions: target as i32,
            window: window as i32,
        };
        let reduce = e.kernel("paged_attention_decode_reduce_windowed");
        g.launch_args(
            &module,
            &reduce,
            (nh as u32, num_seqs as u32, 1),
            (256, 1, 1),
            a,
        );
    }

    // Reference: q and the new k rotated and rounded to the compute type.
    let mut q = qkv.clone();
    if rope {
        cpu::rope_inplace(&mut q, stride, nh + nkv, hd, &positions, &freqs);
        e.round_all(&mut q);
    }
    let what = format!(
        "{ty} {kernel} nh{nh} nkv{nkv} ctx{ctx:?} target{target} depth{depth} window{window} \
         softcap{softcap}{}",
        if fold { " (last-block merge)" } else { "" }
    );
    let (k_after, v_after) = (g.download(&d_k), g.download(&d_v));
    for (s, &n) in ctx.iter().enumerate() {
        let at = c.slot(s, n - 1) * width;
        let row = s * stride + nh * hd;
        assert_fp8_close(
            &format!("{what} new k, seq {s}"),
            &k_after[at..at + width],
            &q[row..row + width],
            K_SCALE,
        );
        assert_fp8_close(
            &format!("{what} new v, seq {s}"),
            &v_after[at..at + width],
            &qkv[row + width..row + 2 * width],
            V_SCALE,
        );
    }
    // Everything else in the cache is as it was.
    let new_slots: Vec<usize> = ctx
        .iter()
        .enumerate()
        .map(|(s, &n)| c.slot(s, n - 1))
        .collect();
    for slot in 0..c.k.len() / width {
        if new_slots.contains(&slot) {
            continue;
        }
        let at = slot * width;
        assert!(
            k_after[at..at + width] == c.k[at..at + width]
                && v_after[at..at + width] == c.v[at..at + width],
            "{what}: slot {slot} changed though no new token maps to it"
        );
    }
    // Attention over the cache the kernel left (its new tokens' codes included).
    c.k = k_after;
    c.v = v_after;
    let cu: Vec<i32> = (0..=num_seqs as i32).collect();
    let batch = cpu::AttentionBatch {
        cu_seqlens_q: &cu,
        context_lens: &ctx_i,
        block_tables: &c.tables,
        max_blocks_per_seq: c.max_blocks,
    };
    let want = c.attend(&q, stride, nh, &batch, window, softcap);
    let (atol, rtol) = e.tolerance();
    assert_close(&what, &g.download_as(e, &out), &want, atol, rtol);
}

/// (heads, kv heads, head dim, [(chunk length, context length after the step)], window,
/// soft-cap).
type PrefillCase = (usize, usize, usize, &'static [(usize, usize)], usize, f32);

#[test]
fn kv_fp8_prefill_attention_matches_reference() {
    let Some(g) = gpu("kv_fp8_prefill_attention_matches_reference") else {
        return;
    };
    let mut r = rng("kv_fp8_prefill");
    let cases: &[PrefillCase] = &[
        (
            8,
            2,
            128,
            &[(70, 70), (37, 87), (130, 130), (5, 205)],
            0,
            0.0,
        ),
        (9, 3, 64, &[(17, 17), (64, 100), (1, 33)], 0, 0.0),
        (4, 2, 256, &[(100, 100), (33, 80)], 0, 0.0),
        (5, 1, 80, &[(40, 90), (65, 65)], 0, 0.0),
        (6, 3, 96, &[(70, 140), (3, 3)], 0, 0.0),
        (8, 4, 64, &[(100, 400), (20, 20), (1, 300)], 24, 30.0), // windowed and capped
    ];
    for e in Elem::BOTH {
        let ty = e.name();
        let (atol, rtol) = e.tolerance();
        for &(nh, nkv, hd, seqs, window, softcap) in cases {
            let ctx: Vec<usize> = seqs.iter().map(|s| s.1).collect();
            let mut c = Fp8Cache::new(&mut r, &ctx, nkv, hd);
            if window > 0 {
                // The chunk's first query (at position total - n) sees the keys after
                // total - n - window; the kernel reads whole 64-key tiles from the one that
                // holds the first of those (masking the rest, whose values must stay finite:
                // a masked key's probability 0 times a NaN value is NaN), so no block reads a
                // key before that tile.
                for (seq, &(n, total)) in seqs.iter().enumerate() {
                    let first_tile = (total - n + 1).saturating_sub(window) / 64 * 64;
                    c.poison_keys_before(seq, first_tile);
                }
            }
            let mut cu = vec![0i32];
            for s in seqs {
                cu.push(cu.last().unwrap() + s.0 as i32);
            }
            let total = *cu.last().unwrap() as usize;
            let q_stride = nh * hd + 64; // a padded row
            let (q_h, q) = e.random(&mut r, total * q_stride, 1.0);
            let scale = 1.0 / (hd as f32).sqrt();
            let (d_q, d_k, d_v) = (g.upload(&q_h), g.upload(&c.k), g.upload(&c.v));
            let ctx_i: Vec<i32> = ctx.iter().map(|&x| x as i32).collect();
            let (d_cu, d_ctx, d_tables) = (g.upload(&cu), g.upload(&ctx_i), g.upload(&c.tables));
            let out = g.poisoned(total * nh * hd, e.nan());
            let max_chunk = seqs.iter().map(|s| s.0).max().unwrap();
            let kernel = e.kernel(&format!("paged_attention_prefill_kvfp8_hd{hd}"));
            g.launch_args(
                &e.module("attention_prefill"),
                &kernel,
                (max_chunk.div_ceil(64) as u32, nh as u32, seqs.len() as u32),
                (128, 1, 1),
                args::PrefillAttentionKvFp8 {
                    out: out.ptr,
                    q: d_q.ptr,
                    key_cache: d_k.ptr,
                    value_cache: d_v.ptr,
                    cu_seqlens_q: d_cu.ptr,
                    context_lens: d_ctx.ptr,
                    block_tables: d_tables.ptr,
                    scale,
                    num_heads: nh as i32,
                    num_kv_heads: nkv as i32,
                    block_size: c.block_size as i32,
                    max_blocks_per_seq: c.max_blocks as i32,
                    q_stride: q_stride as i32,
                    window: window as i32,
                    softcap,
                    k_scale: K_SCALE,
                    v_scale: V_SCALE,
                },
            );
            let batch = cpu::AttentionBatch {
                cu_seqlens_q: &cu,
                context_lens: &ctx_i,
                block_tables: &c.tables,
                max_blocks_per_seq: c.max_blocks,
            };
            let want = c.attend(&q, q_stride, nh, &batch, window, softcap);
            assert_close(
                &format!(
                    "{ty} {kernel} nh{nh} nkv{nkv} seqs{seqs:?} window{window} softcap{softcap}"
                ),
                &g.download_as(e, &out),
                &want,
                atol,
                rtol,
            );
        }
    }
}

/// Decode attention over an FP8 cache against the bf16 cache's builds on a Llama-3.1-8B layer
/// (32 heads, 8 KV heads, head dim 128): the plain kernel, its windowed build with no window
/// (the FP8 kernel's template) and the FP8 build, each with its reduce where split, eager
/// launches back to back, median of 20; partition targets as the engine picks them on a
/// 132-SM H100. Prints the times (`--nocapture`).
#[test]
#[ignore]
fn bench_kv_fp8_decode_attention() {
    let Some(g) = gpu("bench_kv_fp8_decode_attention") else {
        return;
    };
    const NH: usize = 32;
    const NKV: usize = 8;
    const HD: usize = 128;
    const BS: usize = 16;
    let e = Elem::Bf16;
    let module = e.module("attention_decode");
    let gt = decode_group_tile(NH / NKV);
    let smem = decode_smem::full(gt);
    let plain = g.function(&module, &format!("paged_attention_decode_hd{HD}_g{gt}"));
    let windowed = g.function(
        &module,
        &format!("paged_attention_decode_windowed_hd{HD}_g{gt}"),
    );
    let fp8 = g.function(
        &module,
        &format!("paged_attention_decode_kvfp8_hd{HD}_g{gt}"),
    );
    for f in [plain, windowed, fp8] {
        g.allow_smem(f, smem);
    }
    let reduce = g.function(&module, "paged_attention_decode_reduce");
    let reduce_windowed = g.function(&module, "paged_attention_decode_reduce_windowed");
    // (sequences, context, target partitions = grid depth)
    for &(batch, ctx, target) in &[(1usize, 4096usize, 33usize), (64, 2048, 1), (256, 512, 1)] {
        let max_blocks = ctx.div_ceil(BS);
        let width = NKV * HD;
        let cache_len = batch * max_blocks * BS * width;
        // Small finite values: the timings do not depend on them.
        let fill = e.bits(0.01);
        let (k, v) = (
            g.upload(&vec![fill; cache_len]),
            g.upload(&vec![fill; cache_len]),
        );
        let code = quant(0.01, 1.0);
        let (k8, v8) = (
            g.upload(&vec![code; cache_len]),
            g.upload(&vec![code; cache_len]),
        );
        let tables: Vec<i32> = (0..(batch * max_blocks) as i32).collect();
        let tables = g.upload(&tables);
        let ctx_lens = g.upload(&vec![ctx as i32; batch]);
        let positions = g.upload(&vec![ctx as i32 - 1; batch]);
        let slots = g.upload(&vec![-1i32; batch]);
        let stride = (NH + 2 * NKV) * HD;
        let qkv = g.upload(&vec![fill; batch * stride]);
        let freqs = g.upload(&inv_freq(HD, 500_000.0));
        let out = g.poisoned(batch * NH * HD, e.nan());
        let po = g.poisoned(batch * NH * target * HD, f32::NAN);
        let pml = g.poisoned(batch * NH * target * 2, f32::NAN);
        let k_new = qkv.ptr + (NH * HD * 2) as u64;
        let v_new = k_new + (width * 2) as u64;
        let scale = 1.0 / (HD as f32).sqrt();
        let grid = (
            (NKV * (NH / NKV).div_ceil(gt)) as u32,
            batch as u32,
            target as u32,
        );
        let reduce_grid = (NH as u32, batch as u32, 1);
        macro_rules! decode_args {
            ($ty:ident, $k:expr, $v:expr $(, $field:ident: $value:expr)*) => {
                args::$ty {
                    out: out.ptr,
                    partial_out: po.ptr,
                    partial_ml: pml.ptr,
                    semaphores: 0,
                    q: qkv.ptr,
                    k_new,
                    v_new,
                    qkv_stride: stride as i32,
                    key_cache: $k,
                    value_cache: $v,
                    block_tables: tables.ptr,
                    context_lens: ctx_lens.ptr,
                    positions: positions.ptr,
                    slot_mapping: slots.ptr,
                    inv_freq: freqs.ptr,
                    scale,
                    num_heads: NH as i32,
                    num_kv_heads: NKV as i32,
                    block_size: BS as i32,
                    max_blocks_per_seq: max_blocks as i32,
                    target_partitions: target as i32,
                    $($field: $value,)*
                }
            };
        }
        let reduce_args = args::PagedAttentionDecodeReduce {
            out: out.ptr,
            partial_out: po.ptr,
            partial_ml: pml.ptr,
            context_lens: ctx_lens.ptr,
            num_heads: NH as i32,
            head_dim: HD as i32,
            max_partitions: target as i32,
            target_partitions: target as i32,
        };
        let reduce_windowed_args = args::PagedAttentionDecodeReduceWindowed {
            out: out.ptr,
            partial_out: po.ptr,
            partial_ml: pml.ptr,
            context_lens: ctx_lens.ptr,
            num_heads: NH as i32,
            head_dim: HD as i32,
            max_partitions: target as i32,
            target_partitions: target as i32,
            window: 0,
        };
        let null = std::ptr::null_mut();
        let (bk, bv) = (k.ptr, v.ptr);
        let plain_us = 1e3
            * g.time_ms(20, || {
                let a = decode_args!(DecodeAttention, bk, bv);
                g.launch_on_smem(null, plain, grid, (128, 1, 1), smem, a);
                if target > 1 {
                    g.launch_on(null, reduce, reduce_grid, (128, 1, 1), reduce_args);
                }
            });
        let windowed_us = 1e3
            * g.time_ms(20, || {
                let a = decode_args!(DecodeAttentionWindowed, bk, bv, window: 0, softcap: 0.0);
                g.launch_on_smem(null, windowed, grid, (128, 1, 1), smem, a);
                if target > 1 {
                    let r = reduce_windowed_args;
                    g.launch_on(null, reduce_windowed, reduce_grid, (128, 1, 1), r);
                }
            });
        let (fk, fv) = (k8.ptr, v8.ptr);
        let fp8_us = 1e3
            * g.time_ms(20, || {
                let a = decode_args!(
                    DecodeAttentionKvFp8, fk, fv,
                    window: 0, softcap: 0.0, k_scale: 1.0, v_scale: 1.0
                );
                g.launch_on_smem(null, fp8, grid, (128, 1, 1), smem, a);
                if target > 1 {
                    let r = reduce_windowed_args;
                    g.launch_on(null, reduce_windowed, reduce_grid, (128, 1, 1), r);
                }
            });
        let got = g.download_as(e, &out);
        assert!(
            got.iter().all(|x| x.is_finite()),
            "batch {batch} ctx {ctx}: an attention output is not finite"
        );
        let gb = |bytes: usize, us: f32| bytes as f64 / (us as f64 * 1e3);
        let bf16_bytes = 2 * cache_len * 2;
        println!(
            "llama-3.1-8b decode attention, batch {batch} x {ctx} tokens (target {target}): \
             bf16 cache plain {plain_us:.1} us ({:.0} GB/s), windowed build {windowed_us:.1} us; \
             FP8 cache {fp8_us:.1} us ({:.0} GB/s of codes)",
            gb(bf16_bytes, plain_us),
            gb(bf16_bytes / 2, fp8_us),
        );
    }
}
