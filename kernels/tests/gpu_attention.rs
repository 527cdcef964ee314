//! Paged attention kernels (decode with its fused RoPE and cache write and split-K, chunked
//! prefill) against the CPU reference
//! `rvllm_kernels::reference::paged_attention`, on fresh random inputs (seed printed;
//! RVLLM_TEST_SEED replays one), outputs poisoned before each launch, cache slots that no
//! sequence owns filled with NaN (a read outside a context shows); GQA group sizes 1..16, head
//! dims 64, 128 and 256 (the windowed decode and prefill builds also 80 and 96), contexts from
//! 1 token to several KV blocks and partitions, sliding windows (the keys before a window
//! NaN too) and attention-logit soft-caps. Every case runs in both element types the
//! kernels are built for, bf16 and f16 (the `_f16` modules), each with its inputs and the
//! kernels' intermediate stores rounded to that type and at that type's tolerance.
//!
//! Without a CUDA device each test prints `SKIPPED: no CUDA device` and returns.
mod gpu_harness;

use gpu_harness::{assert_close, gpu, inv_freq, rng, Elem, Gpu};
use rand::seq::SliceRandom;
use rand::Rng;
use rvllm_kernels::args;
use rvllm_kernels::decode_smem;
use rvllm_kernels::gemv_bulk::GemvBulk;
use rvllm_kernels::reference as cpu;

/// (heads, kv heads, head dim, contexts, target partitions, grid depth).
type DecodeCase = (usize, usize, usize, &'static [usize], usize, usize);
/// A decode case, its window (0: none) and soft-cap (0: none).
type WindowedDecodeCase = (DecodeCase, usize, f32);

/// (heads, kv heads, head dim, [(chunk length, context length after the step)]).
type PrefillCase = (usize, usize, usize, &'static [(usize, usize)]);
/// A prefill case, its window (0: none) and soft-cap (0: none).
type WindowedCase = (PrefillCase, usize, f32);

/// A paged KV cache of element type `elem` filled for the given context lengths, with shuffled
/// physical blocks and NaN in every slot no sequence owns (so a read outside a sequence's
/// context shows). `k`, `v`: the values (rounded to `elem`) as f32; `k_h`, `v_h`: their bits.
struct TestCache {
    elem: Elem,
    k: Vec<f32>,
    v: Vec<f32>,
    k_h: Vec<u16>,
    v_h: Vec<u16>,
    tables: Vec<i32>,
    max_blocks: usize,
    block_size: usize,
    nkv: usize,
    hd: usize,
}

impl TestCache {
    fn new(
        r: &mut rand::rngs::StdRng,
        elem: Elem,
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
                    k[slot * width + e] = elem.round(r.random_range(-k_amp..k_amp));
                    v[slot * width + e] = elem.round(r.random_range(-1.0f32..1.0));
                }
            }
        }
        // Exact: the values are already rounded; NaN stays NaN.
        let k_h = k.iter().map(|&x| elem.bits(x)).collect();
        let v_h = v.iter().map(|&x| elem.bits(x)).collect();
        Self {
            elem,
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

    /// The cache slot of token `t` of sequence `seq`.
    fn slot(&self, seq: usize, t: usize) -> usize {
        self.tables[seq * self.max_blocks + t / self.block_size] as usize * self.block_size
            + t % self.block_size
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

/// One decode launch's inputs: the new tokens' raw q/k/v rows (bits of the cache's element
/// type), where they go, and the RoPE table (None: no rotation).
struct DecodeStep<'a> {
    qkv_h: &'a [u16],
    stride: usize,
    nh: usize,
    ctx: &'a [usize],
    positions: &'a [i32],
    slots: &'a [i32],
    inv_freq: Option<&'a [f32]>,
    scale: f32,
    target: usize,
    depth: usize,
    /// The last block of each sequence merges the partials (arrival counters); false: the
    /// separate reduce kernel does.
    fold: bool,
    /// The compact kernel (merged as `fold` says).
    compact: bool,
    /// The windowed build (`paged_attention_decode_windowed_*`, and its reduce) with this
    /// window and soft-cap (0: none); None: the plain build.
    windowed: Option<(usize, f32)>,
}

/// Runs paged decode attention (partition kernel, merged in its last blocks or by the reduce
/// kernel) on a cache whose new token slots hold NaN; returns the output and the caches after
/// the launch. With `fold`, also checks that every arrival counter is back at zero.
fn run_decode(g: &Gpu, c: &TestCache, st: &DecodeStep) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let e = c.elem;
    let module = e.module("attention_decode");
    let num_seqs = st.ctx.len();
    let nh = st.nh;
    let group = nh / c.nkv;
    let gt = decode_group_tile(group);
    let depth = st.depth;
    let mut k_h = c.k_h.clone();
    let mut v_h = c.v_h.clone();
    let width = c.nkv * c.hd;
    // Every new token's slot, the padding rows' too (whose kernel must leave it alone).
    for (s, &n) in st.ctx.iter().enumerate() {
        let at = c.slot(s, n - 1) * width;
        k_h[at..at + width].fill(e.nan());
        v_h[at..at + width].fill(e.nan());
    }
    let (d_qkv, d_k, d_v) = (g.upload(st.qkv_h), g.upload(&k_h), g.upload(&v_h));
    let ctx_i: Vec<i32> = st.ctx.iter().map(|&x| x as i32).collect();
    let (d_tables, d_ctx) = (g.upload(&c.tables), g.upload(&ctx_i));
    let (d_pos, d_slots) = (g.upload(st.positions), g.upload(st.slots));
    let d_freq = st.inv_freq.map(|f| g.upload(f));
    let freq_ptr = d_freq.as_ref().map_or(0, |b| b.ptr);
    let out = g.poisoned(num_seqs * nh * c.hd, e.nan());
    let part_out = g.poisoned(num_seqs * nh * depth * c.hd, f32::NAN);
    let part_ml = g.poisoned(num_seqs * nh * depth * 2, f32::NAN);
    let columns = c.nkv * group.div_ceil(gt);
    let semaphores = g.upload(&vec![0i32; num_seqs * columns]);
    let sem_ptr = if st.fold { semaphores.ptr } else { 0 };
    let k_ptr = d_qkv.ptr + (nh * c.hd * 2) as u64;
    let v_ptr = k_ptr + (width * 2) as u64;
    let (nh_, nkv_, bs_, mb_, qs_, tg_) = (
        nh as i32,
        c.nkv as i32,
        c.block_size as i32,
        c.max_blocks as i32,
        st.stride as i32,
        st.target as i32,
    );
    let grid = (columns as u32, num_seqs as u32, depth as u32);
    let (kernel, smem) = match (st.compact, st.windowed) {
        (true, None) => (
            e.kernel(&format!("paged_attention_decode_compact_hd{}_g{gt}", c.hd)),
            decode_smem::compact(c.hd, gt),
        ),
        (true, Some(_)) => (
            e.kernel(&format!(
                "paged_attention_decode_compact_windowed_hd{}_g{gt}",
                c.hd
            )),
            decode_smem::compact(c.hd, gt),
        ),
        (false, None) => (
            e.kernel(&format!("paged_attention_decode_hd{}_g{gt}", c.hd)),
            decode_smem::full(gt),
        ),
        (false, Some(_)) => (
            e.kernel(&format!("paged_attention_decode_windowed_hd{}_g{gt}", c.hd)),
            decode_smem::full(gt),
        ),
    };
    let (window, softcap) = st.windowed.unwrap_or((0, 0.0));
    let window_ = window as i32;
    // The three builds take the same parameters (the windowed one two more); one literal.
    macro_rules! decode_args {
        ($ty:ident $(, $field:ident)*) => {
            args::$ty {
                out: out.ptr,
                partial_out: part_out.ptr,
                partial_ml: part_ml.ptr,
                semaphores: sem_ptr,
                q: d_qkv.ptr,
                k_new: k_ptr,
                v_new: v_ptr,
                qkv_stride: qs_,
                key_cache: d_k.ptr,
                value_cache: d_v.ptr,
                block_tables: d_tables.ptr,
                context_lens: d_ctx.ptr,
                positions: d_pos.ptr,
                slot_mapping: d_slots.ptr,
                inv_freq: freq_ptr,
                scale: st.scale,
                num_heads: nh_,
                num_kv_heads: nkv_,
                block_size: bs_,
                max_blocks_per_seq: mb_,
                target_partitions: tg_,
                $($field,)*
            }
        };
    }
    match (st.compact, st.windowed) {
        (true, None) => {
            let a = decode_args!(DecodeAttentionCompact);
            g.launch_args_smem(&module, &kernel, grid, (128, 1, 1), smem, a);
        }
        (true, Some(_)) => {
            let window = window_;
            let a = decode_args!(DecodeAttentionCompactWindowed, window, softcap);
            g.launch_args_smem(&module, &kernel, grid, (128, 1, 1), smem, a);
        }
        (false, None) => {
            let a = decode_args!(DecodeAttention);
            g.launch_args_smem(&module, &kernel, grid, (128, 1, 1), smem, a);
        }
        (false, Some(_)) => {
            let window = window_;
            let a = decode_args!(DecodeAttentionWindowed, window, softcap);
            g.launch_args_smem(&module, &kernel, grid, (128, 1, 1), smem, a);
        }
    }
    if st.fold {
        assert!(
            g.download(&semaphores).iter().all(|&n| n == 0),
            "{}: {kernel} left an arrival counter set",
            e.name()
        );
    } else if depth > 1 {
        let (hd_, dp_) = (c.hd as i32, depth as i32);
        // The reduce works with 128 or 256 threads; cover both.
        let reduce_block = if st.target % 2 == 1 { 128 } else { 256 };
        let grid = (nh as u32, num_seqs as u32, 1);
        let a = args::PagedAttentionDecodeReduce {
            out: out.ptr,
            partial_out: part_out.ptr,
            partial_ml: part_ml.ptr,
            context_lens: d_ctx.ptr,
            num_heads: nh_,
            head_dim: hd_,
            max_partitions: dp_,
            target_partitions: tg_,
        };
        if st.windowed.is_some() {
            let a = args::PagedAttentionDecodeReduceWindowed {
                out: a.out,
                partial_out: a.partial_out,
                partial_ml: a.partial_ml,
                context_lens: a.context_lens,
                num_heads: a.num_heads,
                head_dim: a.head_dim,
                max_partitions: a.max_partitions,
                target_partitions: a.target_partitions,
                window: window_,
            };
            let reduce = e.kernel("paged_attention_decode_reduce_windowed");
            g.launch_args(&module, &reduce, grid, (reduce_block, 1, 1), a);
        } else {
            let reduce = e.kernel("paged_attention_decode_reduce");
            g.launch_args(&module, &reduce, grid, (reduce_block, 1, 1), a);
        }
    }
    (
        g.download_as(e, &out),
        g.download_as(e, &d_k),
        g.download_as(e, &d_v),
    )
}

/// At batch 1 the compact decode kernel shares SMs with the bulk GEMVs launched before and
/// after it (PDL): each of its blocks, static arrays and the per-block reservation included,
/// must leave room for a GEMV block of 4,096-element rows (the O projection of Gemma-3-12B
/// and Llama-3.1-8B) in an H100's 228 KiB of shared memory. (No GPU needed.)
#[test]
fn compact_decode_attention_leaves_room_for_a_gemv_block() {
    const SM_SHARED: u32 = 228 * 1024;
    const RESERVED: u32 = 1024; // per block
                                // gemv_bulk's static shared memory is at most 2,304 bytes (GemvBulk::MAX_SHARED).
    let gemv = GemvBulk::for_k(4096, 4).unwrap().shared_bytes + 2304 + RESERVED;
    for hd in [64, 128, 256] {
        for gt in [1, 2, 4, 8] {
            // Static: the RoPE table (HD floats), the merge's scratch and flag.
            let static_bytes = (hd * 4 + 2 * gt * 4 + 16) as u32;
            let block = decode_smem::compact(hd, gt) + static_bytes + RESERVED;
            assert!(
                block + gemv <= SM_SHARED,
                "hd {hd} g{gt}: {block} bytes of compact attention and {gemv} of GEMV pass \
                 {SM_SHARED}"
            );
        }
    }
}

#[test]
fn paged_attention_decode_matches_reference() {
    let Some(g) = gpu("paged_attention_decode_matches_reference") else {
        return;
    };
    let mut r = rng("decode");
    // (heads, kv heads, head dim, contexts, target partitions, grid depth). Each launch mixes
    // sequences that fit one partition (written directly, skipped by the reduce) with split
    // ones, except the second: all direct, no reduce launched. Depths below a sequence's
    // partition count make blocks stream several partitions and merge them; depths above it
    // leave blocks with nothing to do.
    let cases: &[DecodeCase] = &[
        (32, 8, 128, &[1, 15, 17, 300, 1000], 1, 2), // 1000: two partitions of 512
        (32, 8, 128, &[1, 100, 500], 1, 1),
        (32, 8, 128, &[700, 33, 129], 11, 11), // partitions of 64: 11, 1, 3
        (9, 3, 64, &[5, 33, 129, 600], 2, 3),  // 600: 2 x 320; 129: 2 x 128
        (8, 8, 128, &[1, 64, 1100], 4, 2),     // 1100: 4 x 320, two a block
        (16, 1, 64, &[3, 250], 33, 33),        // 250: 4 x 64
        (16, 8, 128, &[16, 2000], 1, 1),       // 2000: 4 x 512 in one block
        (12, 2, 64, &[40, 77], 2, 2),          // 77: 2 x 64
        (32, 8, 128, &[3000, 65], 33, 5),      // 3000: 24 x 128, five a block
        (64, 8, 128, &[200, 900], 3, 3),       // GQA group 8
        (8, 4, 256, &[1, 40, 700], 2, 2),      // head dim 256 (Gemma 3): 700 = 2 x 384
        (16, 2, 256, &[300, 65], 33, 5),       // 256, group 8, partitions of 64
        (4, 1, 256, &[1000], 1, 1),            // 256, group 4, 2 x 512 in one block
        (16, 8, 256, &[129], 33, 33),          // Gemma-3-12B batch 1: 64 + 64 + 1
        (16, 8, 256, &[384], 33, 33),          // its benchmark's last step: 6 x 64
    ];
    for e in Elem::BOTH {
        for (i, &case) in cases.iter().enumerate() {
            check_decode(&g, &mut r, e, i, case, None);
        }
    }
}

/// The windowed decode builds (`paged_attention_decode_windowed_hd*`, the compact
/// `paged_attention_decode_compact_windowed_hd{64,128,256}*`, and
/// `paged_attention_decode_reduce_windowed`), which the engine runs for windowed and capped
/// layers and head dims 80 and 96 (`cuda/backend/windowed_decode.rs`), against
/// `reference::paged_attention_windowed`: windows shorter and longer than the context, inside
/// one 16-token block and spanning several, equal to the context and of one token; soft-caps
/// (Gemma 2's 50, a tight 5 that saturates) and none; head dims 64, 80, 96, 128 and 256, GQA
/// groups 1 to 16, split and unsplit contexts. Every key before a sequence's window is NaN in
/// the cache, so a kernel that reads one fails.
#[test]
fn paged_attention_decode_windowed_and_softcapped_matches_reference() {
    let Some(g) = gpu("paged_attention_decode_windowed_and_softcapped_matches_reference") else {
        return;
    };
    let mut r = rng("decode_windowed");
    // ((heads, kv heads, head dim, contexts, target partitions, grid depth), window, soft-cap)
    let cases: &[WindowedDecodeCase] = &[
        ((32, 8, 128, &[1, 15, 17, 300, 1000], 1, 2), 256, 0.0), // cuts 300 and 1000
        ((8, 4, 256, &[1, 40, 700, 1040], 2, 2), 1024, 0.0),     // Gemma 3 local: cuts 1040
        ((16, 8, 256, &[300, 65, 2000], 33, 5), 1024, 50.0),     // partitions of 64
        ((4, 1, 256, &[1000], 1, 1), 0, 50.0),                   // Gemma 2 global: cap only
        ((9, 3, 64, &[5, 33, 129, 600], 2, 3), 10, 0.0),         // inside one block
        ((12, 2, 64, &[40, 77, 500], 2, 2), 7, 5.0),             // group 6, tight cap
        ((8, 8, 128, &[1, 64, 1100], 4, 2), 100, 30.0),          // several blocks
        ((16, 1, 64, &[3, 250, 4000], 33, 33), 3000, 0.0),       // group 16, 24 x 128
        ((32, 8, 128, &[3000, 65], 33, 5), 4096, 50.0),          // longer than every context
        ((4, 2, 64, &[200, 17], 2, 2), 200, 0.0),                // the whole context
        ((5, 1, 80, &[1, 33, 200, 700], 2, 2), 100, 30.0),       // head dim 80, group 5
        ((8, 2, 80, &[300, 1, 64, 65], 11, 11), 0, 0.0),         // 80 unwindowed (Phi)
        ((2, 1, 80, &[2, 40], 1, 1), 1, 0.0),                    // only the new token
        ((6, 3, 96, &[90, 150, 513], 3, 3), 100, 0.0),           // head dim 96, group 2
        ((4, 4, 96, &[513, 17, 96], 1, 1), 0, 0.0),              // 96: 2 x 512 in one block
        ((32, 4, 96, &[700, 129], 4, 2), 64, 50.0),              // 96, group 8
        ((16, 8, 256, &[1, 130, 700], 33, 33), 100, 50.0),       // 256: cut and capped
        ((16, 8, 256, &[1500], 33, 7), 1024, 0.0),               // Gemma 3 local, batch 1
    ];
    for e in Elem::BOTH {
        for (i, &(case, window, softcap)) in cases.iter().enumerate() {
            check_decode(&g, &mut r, e, i, case, Some((window, softcap)));
        }
    }
}

/// One decode case in element type `e` against the CPU reference: fresh inputs, new tokens
/// rotated (except case 1) and written by the kernel (odd cases: the last sequence is padding
/// and writes nothing), every merge the build has; `windowed`: the windowed build with that
/// window and soft-cap, the keys before each window NaN.
fn check_decode(
    g: &Gpu,
    r: &mut rand::rngs::StdRng,
    e: Elem,
    i: usize,
    (nh, nkv, hd, ctx, target, depth): DecodeCase,
    windowed: Option<(usize, f32)>,
) {
    let ty = e.name();
    let (atol, rtol) = e.tolerance();
    let mut c = TestCache::new(r, e, ctx, 16, nkv, hd, 3.0);
    let width = nkv * hd;
    let (window, softcap) = windowed.unwrap_or((0, 0.0));
    if window > 0 {
        for (s, &n) in ctx.iter().enumerate() {
            for t in 0..n.saturating_sub(window) {
                let at = c.slot(s, t) * width;
                c.k[at..at + width].fill(f32::NAN);
                c.v[at..at + width].fill(f32::NAN);
                c.k_h[at..at + width].fill(e.nan());
                c.v_h[at..at + width].fill(e.nan());
            }
        }
    }
    // The new tokens' raw q, k, v inside fused QKV rows.
    let stride = (nh + 2 * nkv) * hd;
    let (qkv_h, qkv) = e.random(r, ctx.len() * stride, 1.0);
    let scale = 1.0 / (hd as f32).sqrt();
    let cu: Vec<i32> = (0..=ctx.len() as i32).collect();
    let ctx_i: Vec<i32> = ctx.iter().map(|&x| x as i32).collect();
    let positions: Vec<i32> = ctx_i.iter().map(|&x| x - 1 + 7 * (i as i32 % 2)).collect();
    // The new token's cache slot; the last sequence of odd cases is padding (no write).
    let mut slots: Vec<i32> = ctx
        .iter()
        .enumerate()
        .map(|(s, &n)| c.slot(s, n - 1) as i32)
        .collect();
    if i % 2 == 1 {
        *slots.last_mut().unwrap() = -1;
    }
    let rope = i != 1; // one case without rotation (q and k given rotated)
    let freqs = inv_freq(hd, 500_000.0);
    // Reference: rotate q and the new k (rounded to the element type as the kernel stores
    // them), put the new k and v in the cache, attend.
    let mut q = qkv.clone();
    if rope {
        cpu::rope_inplace(&mut q, stride, nh + nkv, hd, &positions, &freqs);
        e.round_all(&mut q);
    }
    for (s, &n) in ctx.iter().enumerate() {
        let slot = c.slot(s, n - 1) * width;
        let row = s * stride + nh * hd;
        c.k[slot..slot + width].copy_from_slice(&q[row..row + width]);
        c.v[slot..slot + width].copy_from_slice(&qkv[row + width..row + 2 * width]);
    }
    let batch = cpu::AttentionBatch {
        cu_seqlens_q: &cu,
        context_lens: &ctx_i,
        block_tables: &c.tables,
        max_blocks_per_seq: c.max_blocks,
    };
    let want = match windowed {
        None => cpu::paged_attention(&q, stride, nh, &c.paged(), &batch, scale),
        Some(_) => cpu::paged_attention_windowed(
            &q,
            stride,
            nh,
            &c.paged(),
            &batch,
            scale,
            (window > 0).then_some(window),
            (softcap > 0.0).then_some(softcap),
        ),
    };
    // (last-block merge, compact kernel): head dims 80 and 96 have no compact build.
    let variants: &[(bool, bool)] = if matches!(hd, 64 | 128 | 256) {
        &[(true, false), (false, false), (false, true), (true, true)]
    } else {
        &[(true, false), (false, false)]
    };
    for &(fold, compact) in variants {
        let step = DecodeStep {
            qkv_h: &qkv_h,
            stride,
            nh,
            ctx,
            positions: &positions,
            slots: &slots,
            inv_freq: rope.then_some(&freqs[..]),
            scale,
            target,
            depth,
            fold,
            compact,
            windowed,
        };
        let (got, k_after, v_after) = run_decode(g, &c, &step);
        let merge = match (fold, compact) {
            (true, false) => "last-block merge",
            (false, false) => "reduce kernel",
            (false, true) => "compact kernel, reduce kernel",
            (true, true) => "compact kernel, last-block merge",
        };
        let build = match windowed {
            None => String::new(),
            Some(_) => format!(" windowed: window {window} softcap {softcap}"),
        };
        let what = format!(
            "{ty} decode nh{nh} nkv{nkv} hd{hd} ctx{ctx:?} target{target} depth{depth}{build} \
             ({merge})"
        );
        assert_close(&what, &got, &want, atol, rtol);
        // The new tokens' K/V went to their slots (and nowhere for the padding row).
        for (s, &slot) in slots.iter().enumerate() {
            let at = c.slot(s, ctx[s] - 1) * width;
            let (k_got, v_got) = (&k_after[at..at + width], &v_after[at..at + width]);
            if slot < 0 {
                assert!(
                    k_got.iter().chain(v_got).all(|x| x.is_nan()),
                    "{what}: the padding row wrote the cache"
                );
            } else {
                assert_close(
                    &format!("{what} new k, seq {s}"),
                    k_got,
                    &c.k[at..at + width],
                    atol,
                    rtol,
                );
                assert_close(
                    &format!("{what} new v, seq {s}"),
                    v_got,
                    &c.v[at..at + width],
                    0.0,
                    0.0,
                );
            }
        }
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
    for e in Elem::BOTH {
        let ty = e.name();
        let (atol, rtol) = e.tolerance();
        for &(nh, nkv, hd, seqs) in cases {
            let ctx: Vec<usize> = seqs.iter().map(|s| s.1).collect();
            let c = TestCache::new(&mut r, e, &ctx, 16, nkv, hd, 3.0);
            let mut cu = vec![0i32];
            for s in seqs {
                cu.push(cu.last().unwrap() + s.0 as i32);
            }
            let total = *cu.last().unwrap() as usize;
            let q_stride = nh * hd + 64; // a padded row
            let (q_h, q) = e.random(&mut r, total * q_stride, 1.0);
            let scale = 1.0 / (hd as f32).sqrt();
            let (d_q, d_k, d_v) = (g.upload(&q_h), g.upload(&c.k_h), g.upload(&c.v_h));
            let ctx_i: Vec<i32> = ctx.iter().map(|&x| x as i32).collect();
            let (d_cu, d_ctx, d_tables) = (g.upload(&cu), g.upload(&ctx_i), g.upload(&c.tables));
            let out = g.poisoned(total * nh * hd, e.nan());
            let max_chunk = seqs.iter().map(|s| s.0).max().unwrap();
            let (nh_, nkv_, bs_, mb_, qs_) = (
                nh as i32,
                nkv as i32,
                16i32,
                c.max_blocks as i32,
                q_stride as i32,
            );
            let kernel = e.kernel(&format!("paged_attention_prefill_hd{hd}"));
            g.launch_args(
                &e.module("attention_prefill"),
                &kernel,
                (max_chunk.div_ceil(64) as u32, nh as u32, seqs.len() as u32),
                (128, 1, 1),
                args::PrefillAttention {
                    out: out.ptr,
                    q: d_q.ptr,
                    key_cache: d_k.ptr,
                    value_cache: d_v.ptr,
                    cu_seqlens_q: d_cu.ptr,
                    context_lens: d_ctx.ptr,
                    block_tables: d_tables.ptr,
                    scale,
                    num_heads: nh_,
                    num_kv_heads: nkv_,
                    block_size: bs_,
                    max_blocks_per_seq: mb_,
                    q_stride: qs_,
                },
            );
            let batch = cpu::AttentionBatch {
                cu_seqlens_q: &cu,
                context_lens: &ctx_i,
                block_tables: &c.tables,
                max_blocks_per_seq: c.max_blocks,
            };
            let want = cpu::paged_attention(&q, q_stride, nh, &c.paged(), &batch, scale);
            assert_close(
                &format!("{ty} {kernel} nh{nh} nkv{nkv} seqs{seqs:?}"),
                &g.download_as(e, &out),
                &want,
                atol,
                rtol,
            );
        }
    }
}

/// The windowed / soft-capped prefill builds (`paged_attention_prefill_windowed_hd*`) against
/// `reference::paged_attention_windowed`: head dims 64, 80, 96, 128 and 256 (Gemma 3's, on
/// 32-key tiles), windows shorter than one key tile, than the chunk and than the context, and
/// none; soft-caps (Gemma 2's 50, and a tight 5 that saturates) and none; chunks after a cached
/// prefix, so the window cuts into the cache. The cases with one-row chunks (decode-shaped,
/// with a padding row's context of 1 among them) are how the engine ran decodes of windowed
/// layers before the windowed decode build; they still check the kernel's single-row tiles.
#[test]
fn paged_attention_prefill_windowed_and_softcapped_matches_reference() {
    let Some(g) = gpu("paged_attention_prefill_windowed_and_softcapped_matches_reference") else {
        return;
    };
    let mut r = rng("prefill_windowed");
    let cases: &[WindowedCase] = &[
        (
            (8, 2, 128, &[(70, 70), (37, 87), (130, 130), (5, 205)]),
            16,
            0.0,
        ),
        ((4, 2, 256, &[(70, 70), (37, 87), (100, 300)]), 48, 50.0),
        ((2, 1, 256, &[(129, 129), (1, 40)]), 0, 5.0),
        ((6, 3, 96, &[(90, 150), (64, 64)]), 100, 0.0),
        ((5, 1, 80, &[(33, 33), (70, 200)]), 7, 30.0),
        ((9, 3, 64, &[(17, 17), (64, 100), (1, 33)]), 4096, 0.0),
        ((8, 8, 64, &[(150, 150)]), 64, 50.0),
        // Decode steps as the engine launches them.
        (
            (8, 2, 80, &[(1, 300), (1, 1), (1, 64), (1, 65), (40, 140)]),
            100,
            0.0,
        ),
        ((4, 4, 96, &[(1, 513), (1, 17), (1, 96)]), 0, 0.0),
        ((16, 8, 256, &[(1, 1040), (1, 5), (1, 1024)]), 1024, 0.0),
        ((8, 1, 128, &[(1, 700), (1, 513), (1, 1)]), 512, 50.0),
        ((4, 2, 64, &[(1, 200), (17, 17)]), 0, 30.0),
        ((2, 1, 80, &[(1, 2), (1, 40)]), 1, 0.0),
    ];
    for e in Elem::BOTH {
        let ty = e.name();
        let (atol, rtol) = e.tolerance();
        for &((nh, nkv, hd, seqs), window, softcap) in cases {
            let ctx: Vec<usize> = seqs.iter().map(|s| s.1).collect();
            let c = TestCache::new(&mut r, e, &ctx, 16, nkv, hd, 3.0);
            let mut cu = vec![0i32];
            for s in seqs {
                cu.push(cu.last().unwrap() + s.0 as i32);
            }
            let total = *cu.last().unwrap() as usize;
            let q_stride = nh * hd + 64;
            let (q_h, q) = e.random(&mut r, total * q_stride, 1.0);
            let scale = 1.0 / (hd as f32).sqrt();
            let (d_q, d_k, d_v) = (g.upload(&q_h), g.upload(&c.k_h), g.upload(&c.v_h));
            let ctx_i: Vec<i32> = ctx.iter().map(|&x| x as i32).collect();
            let (d_cu, d_ctx, d_tables) = (g.upload(&cu), g.upload(&ctx_i), g.upload(&c.tables));
            let out = g.poisoned(total * nh * hd, e.nan());
            let max_chunk = seqs.iter().map(|s| s.0).max().unwrap();
            let kernel = e.kernel(&format!("paged_attention_prefill_windowed_hd{hd}"));
            g.launch_args(
                &e.module("attention_prefill"),
                &kernel,
                (max_chunk.div_ceil(64) as u32, nh as u32, seqs.len() as u32),
                (128, 1, 1),
                args::PrefillAttentionWindowed {
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
                    block_size: 16,
                    max_blocks_per_seq: c.max_blocks as i32,
                    q_stride: q_stride as i32,
                    window: window as i32,
                    softcap,
                },
            );
            let batch = cpu::AttentionBatch {
                cu_seqlens_q: &cu,
                context_lens: &ctx_i,
                block_tables: &c.tables,
                max_blocks_per_seq: c.max_blocks,
            };
            let want = cpu::paged_attention_windowed(
                &q,
                q_stride,
                nh,
                &c.paged(),
                &batch,
                scale,
                (window > 0).then_some(window),
                (softcap > 0.0).then_some(softcap),
            );
            assert_close(
                &format!(
                    "{ty} {kernel} nh{nh} nkv{nkv} window {window} softcap {softcap} seqs{seqs:?}"
                ),
                &g.download_as(e, &out),
                &want,
                atol,
                rtol,
            );
        }
    }
}

/// Timings (`--ignored --nocapture`, bf16) of a Gemma-3-12B local layer's decode attention
/// (16 query heads, 8 KV heads, head dim 256, window 1024): the windowed decode build the
/// engine now runs, the plain decode build on the same contexts (no window: the cost of a
/// window that never cuts), and the windowed prefill build with one query row per sequence
/// (how the engine ran these layers' decodes before). Each with its reduce where split, eager
/// launches back to back, median of 20; partition targets as the engine picks them on a
/// 132-SM H100. Batch 1 also times the compact builds the engine runs there (plain and
/// windowed), against the full ones; 384 tokens is the last step of the Gemma-3-12B batch-1
/// benchmark (128-token prompt, 256 tokens out).
#[test]
#[ignore]
fn bench_windowed_decode_attention() {
    let Some(g) = gpu("bench_windowed_decode_attention") else {
        return;
    };
    const NH: usize = 16;
    const NKV: usize = 8;
    const HD: usize = 256;
    const BS: usize = 16;
    const WINDOW: usize = 1024;
    let e = Elem::Bf16;
    let module = e.module("attention_decode");
    let prefill_module = e.module("attention_prefill");
    let gt = decode_group_tile(NH / NKV);
    let smem = decode_smem::full(gt);
    let plain = g.function(&module, &format!("paged_attention_decode_hd{HD}_g{gt}"));
    let windowed = g.function(
        &module,
        &format!("paged_attention_decode_windowed_hd{HD}_g{gt}"),
    );
    g.allow_smem(plain, smem);
    g.allow_smem(windowed, smem);
    let compact_smem = decode_smem::compact(HD, gt);
    let compact = g.function(
        &module,
        &format!("paged_attention_decode_compact_hd{HD}_g{gt}"),
    );
    let compact_windowed = g.function(
        &module,
        &format!("paged_attention_decode_compact_windowed_hd{HD}_g{gt}"),
    );
    g.allow_smem(compact, compact_smem);
    g.allow_smem(compact_windowed, compact_smem);
    let reduce = g.function(&module, "paged_attention_decode_reduce");
    let reduce_windowed = g.function(&module, "paged_attention_decode_reduce_windowed");
    let prefill = g.function(
        &prefill_module,
        &format!("paged_attention_prefill_windowed_hd{HD}"),
    );
    // (sequences, context, target partitions = grid depth)
    for &(batch, ctx, target) in &[
        (1usize, 384usize, 33usize),
        (1, 4096, 33),
        (256, 512, 1),
        (32, 8192, 2),
    ] {
        let max_blocks = ctx.div_ceil(BS);
        let width = NKV * HD;
        // Small finite values: the timings do not depend on them.
        let fill = e.bits(0.01);
        let cache_len = batch * max_blocks * BS * width;
        let (k, v) = (
            g.upload(&vec![fill; cache_len]),
            g.upload(&vec![fill; cache_len]),
        );
        let tables: Vec<i32> = (0..(batch * max_blocks) as i32).collect();
        let tables = g.upload(&tables);
        let ctx_lens = g.upload(&vec![ctx as i32; batch]);
        let positions = g.upload(&vec![ctx as i32 - 1; batch]);
        let slots = g.upload(&vec![-1i32; batch]);
        let cu: Vec<i32> = (0..=batch as i32).collect();
        let cu = g.upload(&cu);
        let stride = (NH + 2 * NKV) * HD;
        let qkv = g.upload(&vec![fill; batch * stride]);
        let freqs = g.upload(&inv_freq(HD, 10_000.0));
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
            ($ty:ident $(, $field:ident: $value:expr)*) => {
                args::$ty {
                    out: out.ptr,
                    partial_out: po.ptr,
                    partial_ml: pml.ptr,
                    semaphores: 0,
                    q: qkv.ptr,
                    k_new,
                    v_new,
                    qkv_stride: stride as i32,
                    key_cache: k.ptr,
                    value_cache: v.ptr,
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
        macro_rules! reduce_args {
            ($ty:ident $(, $field:ident: $value:expr)*) => {
                args::$ty {
                    out: out.ptr,
                    partial_out: po.ptr,
                    partial_ml: pml.ptr,
                    context_lens: ctx_lens.ptr,
                    num_heads: NH as i32,
                    head_dim: HD as i32,
                    max_partitions: target as i32,
                    target_partitions: target as i32,
                    $($field: $value,)*
                }
            };
        }
        let null = std::ptr::null_mut();
        let plain_us = 1e3
            * g.time_ms(20, || {
                g.launch_on_smem(
                    null,
                    plain,
                    grid,
                    (128, 1, 1),
                    smem,
                    decode_args!(DecodeAttention),
                );
                if target > 1 {
                    let a = reduce_args!(PagedAttentionDecodeReduce);
                    g.launch_on(null, reduce, reduce_grid, (128, 1, 1), a);
                }
            });
        let windowed_us = 1e3
            * g.time_ms(20, || {
                let a = decode_args!(DecodeAttentionWindowed, window: WINDOW as i32, softcap: 0.0);
                g.launch_on_smem(null, windowed, grid, (128, 1, 1), smem, a);
                if target > 1 {
                    let a = reduce_args!(PagedAttentionDecodeReduceWindowed, window: WINDOW as i32);
                    g.launch_on(null, reduce_windowed, reduce_grid, (128, 1, 1), a);
                }
            });
        let prefill_us = 1e3
            * g.time_ms(20, || {
                let a = args::PrefillAttentionWindowed {
                    out: out.ptr,
                    q: qkv.ptr,
                    key_cache: k.ptr,
                    value_cache: v.ptr,
                    cu_seqlens_q: cu.ptr,
                    context_lens: ctx_lens.ptr,
                    block_tables: tables.ptr,
                    scale,
                    num_heads: NH as i32,
                    num_kv_heads: NKV as i32,
                    block_size: BS as i32,
                    max_blocks_per_seq: max_blocks as i32,
                    q_stride: stride as i32,
                    window: WINDOW as i32,
                    softcap: 0.0,
                };
                g.launch_on(null, prefill, (1, NH as u32, batch as u32), (128, 1, 1), a);
            });
        let got = g.download_as(e, &out);
        assert!(
            got.iter().all(|x| x.is_finite()),
            "batch {batch} ctx {ctx}: an attention output is not finite"
        );
        println!(
            "gemma-3 local layer decode attention, batch {batch} x {ctx} tokens (window \
             {WINDOW}, target {target}): windowed decode {windowed_us:.1} us, plain decode (no \
             window) {plain_us:.1} us, windowed prefill one row a sequence {prefill_us:.1} us"
        );
        if batch == 1 {
            // The compact kernel's last-block merge: no reduce launch.
            let sem = g.upload(&vec![0i32; grid.0 as usize]);
            let compact_fold_us = 1e3
                * g.time_ms(20, || {
                    let mut a = decode_args!(DecodeAttentionCompact);
                    a.semaphores = sem.ptr;
                    g.launch_on_smem(null, compact, grid, (128, 1, 1), compact_smem, a);
                });
            let compact_windowed_fold_us = 1e3
                * g.time_ms(20, || {
                    let mut a = decode_args!(
                        DecodeAttentionCompactWindowed,
                        window: WINDOW as i32,
                        softcap: 0.0
                    );
                    a.semaphores = sem.ptr;
                    g.launch_on_smem(null, compact_windowed, grid, (128, 1, 1), compact_smem, a);
                });
            assert!(
                g.download(&sem).iter().all(|&n| n == 0),
                "batch 1 ctx {ctx}: the compact kernel left an arrival counter set"
            );
            let compact_us = 1e3
                * g.time_ms(20, || {
                    let a = decode_args!(DecodeAttentionCompact);
                    g.launch_on_smem(null, compact, grid, (128, 1, 1), compact_smem, a);
                    if target > 1 {
                        let a = reduce_args!(PagedAttentionDecodeReduce);
                        g.launch_on(null, reduce, reduce_grid, (128, 1, 1), a);
                    }
                });
            let compact_windowed_us = 1e3
                * g.time_ms(20, || {
                    let a = decode_args!(
                        DecodeAttentionCompactWindowed,
                        window: WINDOW as i32,
                        softcap: 0.0
                    );
                    g.launch_on_smem(null, compact_windowed, grid, (128, 1, 1), compact_smem, a);
                    if target > 1 {
                        let a =
                            reduce_args!(PagedAttentionDecodeReduceWindowed, window: WINDOW as i32);
                        g.launch_on(null, reduce_windowed, reduce_grid, (128, 1, 1), a);
                    }
                });
            let got = g.download_as(e, &out);
            assert!(
                got.iter().all(|x| x.is_finite()),
                "batch 1 ctx {ctx}: a compact attention output is not finite"
            );
            println!(
                "  batch 1 compact builds: windowed {compact_windowed_us:.1} us (full \
                 {windowed_us:.1}), plain {compact_us:.1} us (full {plain_us:.1}); with the \
                 last-block merge instead of the reduce launch: windowed \
                 {compact_windowed_fold_us:.1} us, plain {compact_fold_us:.1} us; {} bytes of \
                 shared memory a block (full: {smem})",
                compact_smem
            );
        }
    }
}
