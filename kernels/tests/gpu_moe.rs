//! The fused mixture-of-experts kernels (`moe.cu`, `moe_gemm.cu`) against their CPU references
//! (`rvllm_kernels::reference::moe_*`), chained as the engine will run them: routing, the
//! expert sort and tile map, gather, the gate/up grouped GEMM (plain, and gated: SiLU-and-mul
//! in its epilogue, as the engine runs it), the down grouped GEMM and the weighted un-permute. Shapes: batches of 1, 7, 64 and 1,024 tokens; routings where some
//! experts get no token and where one expert gets every token (at each batch size); Mixtral's
//! 8 experts top-2 and Qwen3-MoE's 128 top-8, and its hidden size and expert width (2,048 and
//! 768); reduction lengths that are no multiple of the grouped GEMM's 64-deep stages or of 8
//! (its element loads), output widths that are no multiple of its 64-column tiles or odd. Every
//! output is poisoned (NaN) first. Routing ids, offsets and slots must match exactly; the
//! numbers within the element type's tolerance.
//!
//! Without a CUDA device each test prints `SKIPPED: no CUDA device` and returns.
mod gpu_harness;

use cudarc::driver::sys::{CUfunction, CUstream};
use gpu_harness::{assert_close, gpu, rng, Buf, Elem, Gpu};
use rand::Rng;
use rvllm_kernels::{args, reference, KernelArgs};

struct Shape {
    tokens: usize,
    experts: usize,
    top_k: usize,
    hidden: usize,
    inter: usize,
    renormalize: bool,
    /// Router logits that send every token to expert 0 first.
    one_expert: bool,
}

fn shapes() -> Vec<Shape> {
    let s = |tokens, experts, top_k, hidden, inter, renormalize, one_expert| Shape {
        tokens,
        experts,
        top_k,
        hidden,
        inter,
        renormalize,
        one_expert,
    };
    vec![
        // Batch 1: most experts idle.
        s(1, 8, 2, 256, 128, true, false),
        s(1, 128, 8, 256, 64, true, false),
        s(1, 8, 2, 256, 128, true, true),
        s(7, 128, 8, 128, 64, false, false),
        s(7, 128, 8, 128, 64, true, true),
        // Rows of a length that is no multiple of 8: the grouped GEMM's scalar loads.
        s(7, 8, 2, 100, 36, true, false),
        // Qwen3-30B-A3B's hidden size and expert width (fewer experts): 32 stages of the
        // reduction, 24 and 32 column tiles.
        s(7, 16, 8, 2048, 768, true, false),
        // Reductions of 200 and 40 (16-byte loads, a zero-filled tail), 80 and 101 output
        // columns (partial tiles, an odd row length), 101-long rows (scalar loads).
        s(64, 8, 2, 200, 40, true, false),
        s(64, 8, 2, 101, 40, false, false),
        s(64, 8, 2, 256, 192, true, false),
        s(64, 16, 1, 128, 64, false, true),
        s(1024, 8, 2, 128, 64, true, false),
        s(1024, 128, 8, 128, 32, true, false),
        // Expert 0 gets all 1,024 tokens (and 8,192 pairs span eight of moe_align's chunks).
        s(1024, 128, 8, 128, 32, false, true),
        // 3,000 pairs: the last chunk of moe_align is partial.
        s(1000, 16, 3, 128, 32, false, false),
        // Top 1, every token to expert 0 and no other expert busy: 16 row tiles of one expert,
        // four a block (the grid's depth follows the average load, 128 rows).
        s(1024, 8, 1, 256, 128, false, true),
    ]
}

/// One launch of a chain kernel: its grid, block, dynamic shared bytes and typed arguments.
struct Launch<A> {
    grid: (u32, u32, u32),
    block: (u32, u32, u32),
    smem: u32,
    args: A,
}

impl<A: KernelArgs> Launch<A> {
    fn new(grid: (u32, u32, u32), block: u32, args: A) -> Launch<A> {
        Launch {
            grid,
            block: (block, 1, 1),
            smem: 0,
            args,
        }
    }

    /// Launches `kernel` (its bf16 name) of `e`'s build of `module` and waits.
    fn run(self, g: &Gpu, e: Elem, module: &str, kernel: &str) {
        let (module, kernel) = (e.module(module), e.kernel(kernel));
        g.launch_args_smem(
            &module, &kernel, self.grid, self.block, self.smem, self.args,
        )
    }

    /// Launches `f` on `stream` without waiting.
    fn on(self, g: &Gpu, stream: CUstream, f: CUfunction) {
        g.launch_on_smem(stream, f, self.grid, self.block, self.smem, self.args)
    }
}

/// One batch's routing buffers (poisoned), which the chain's kernels pass between them, and
/// each kernel's launch over them.
struct Chain {
    tokens: usize,
    experts: usize,
    top_k: usize,
    hidden: usize,
    ids: Buf<i32>,
    weights: Buf<f32>,
    offsets: Buf<i32>,
    sorted: Buf<i32>,
    slots: Buf<i32>,
    tile_map: Buf<i32>,
}

impl Chain {
    fn new(g: &Gpu, tokens: usize, experts: usize, top_k: usize, hidden: usize) -> Chain {
        let p = tokens * top_k;
        Chain {
            tokens,
            experts,
            top_k,
            hidden,
            ids: g.poisoned(p, -1i32),
            weights: g.poisoned(p, f32::NAN),
            offsets: g.poisoned(experts + 1, -1i32),
            sorted: g.poisoned(p, -1i32),
            slots: g.poisoned(p, -1i32),
            tile_map: g.poisoned(reference::moe_gemm_tile_slots(p, experts), i32::MIN),
        }
    }

    fn pairs(&self) -> usize {
        self.tokens * self.top_k
    }

    fn topk(&self, logits: u64, renormalize: bool) -> Launch<args::MoeTopkSoftmax> {
        let grid = (self.tokens.div_ceil(8) as u32, 1, 1);
        Launch::new(
            grid,
            256,
            args::MoeTopkSoftmax {
                topk_ids: self.ids.ptr,
                topk_weights: self.weights.ptr,
                logits,
                tokens: self.tokens as i32,
                experts: self.experts as i32,
                top_k: self.top_k as i32,
                renormalize: renormalize as i32,
            },
        )
    }

    fn align(&self) -> Launch<args::MoeAlign> {
        Launch::new(
            (1, 1, 1),
            1024,
            args::MoeAlign {
                expert_offsets: self.offsets.ptr,
                sorted_pairs: self.sorted.ptr,
                pair_slots: self.slots.ptr,
                tile_map: self.tile_map.ptr,
                topk_ids: self.ids.ptr,
                pairs: self.pairs() as i32,
                experts: self.experts as i32,
            },
        )
    }

    fn gather(&self, rows: u64, x: u64) -> Launch<args::MoeGather> {
        let grid = (self.pairs() as u32, 1, 1);
        Launch::new(
            grid,
            256,
            args::MoeGather {
                rows,
                x,
                sorted_pairs: self.sorted.ptr,
                pairs: self.pairs() as i32,
                hidden: self.hidden as i32,
                top_k: self.top_k as i32,
            },
        )
    }

    /// The grouped GEMM: `out` [P, n] from
    /// `input` [P, k] and the experts' `w` [E, n (2n when gated), k].
    fn grouped_gemm(
        &self,
        out: u64,
        input: u64,
        w: u64,
        n: usize,
        k: usize,
        gated: bool,
    ) -> Launch<args::MoeGroupedGemm> {
        let (grid, block, smem) =
            reference::moe_grouped_gemm_launch(n, self.experts, self.pairs(), gated);
        let args = args::MoeGroupedGemm {
            out,
            r#in: input,
            w,
            expert_offsets: self.offsets.ptr,
            tile_map: self.tile_map.ptr,
            n: n as i32,
            k: k as i32,
            gated: gated as i32,
        };
        Launch {
            smem,
            ..Launch::new(grid, block, args)
        }
    }

    fn unpermute(&self, out: u64, rows: u64) -> Launch<args::MoeUnpermute> {
        let grid = (self.tokens as u32, 1, 1);
        Launch::new(
            grid,
            256,
            args::MoeUnpermute {
                out,
                rows,
                pair_slots: self.slots.ptr,
                topk_weights: self.weights.ptr,
                tokens: self.tokens as i32,
                hidden: self.hidden as i32,
                top_k: self.top_k as i32,
            },
        )
    }
}

#[test]
fn the_fused_moe_chain_matches_the_reference() {
    let Some(g) = gpu("the_fused_moe_chain_matches_the_reference") else {
        return;
    };
    let mut r = rng("moe_chain");
    for e in Elem::BOTH {
        for sh in shapes() {
            let (t, ex, k, h, i) = (sh.tokens, sh.experts, sh.top_k, sh.hidden, sh.inter);
            let p = t * k;
            let what = format!(
                "{} tokens {t} experts {ex} top {k} hidden {h} inter {i}",
                e.name()
            );
            // Router logits spread enough that the top k are not near-ties in bf16.
            let (mut logit_bits, mut logits) = e.random(&mut r, t * ex, 4.0);
            if sh.one_expert {
                for row in 0..t {
                    logit_bits[row * ex] = e.bits(8.0);
                    logits[row * ex] = e.widen(logit_bits[row * ex]);
                }
            }
            let d_logits = g.upload(&logit_bits);
            let c = Chain::new(&g, t, ex, k, h);
            c.topk(d_logits.ptr, sh.renormalize)
                .run(&g, e, "moe", "moe_topk_softmax_bf16");
            let (want_ids, want_w) = reference::moe_topk_softmax(&logits, ex, k, sh.renormalize);
            assert_eq!(g.download(&c.ids), want_ids, "{what}: routed experts");
            assert_close(
                &format!("{what}: routing weights"),
                &g.download(&c.weights),
                &want_w,
                1e-6,
                1e-5,
            );
            if sh.one_expert {
                assert!(want_ids.chunks(k).all(|c| c.contains(&0)), "{what}");
            }

            c.align().run(&g, e, "moe", "moe_align_bf16");
            let (want_off, want_sorted, want_slots) = reference::moe_align(&want_ids, ex);
            assert_eq!(g.download(&c.offsets), want_off, "{what}: expert offsets");
            assert_eq!(g.download(&c.sorted), want_sorted, "{what}: sorted pairs");
            assert_eq!(g.download(&c.slots), want_slots, "{what}: pair slots");
            let want_tiles = reference::moe_gemm_tile_map(&want_off);
            assert_eq!(
                g.download(&c.tile_map),
                want_tiles,
                "{what}: grouped GEMM tiles"
            );
            let idle = want_off.windows(2).filter(|w| w[0] == w[1]).count();
            if t * k < ex {
                assert!(idle > 0, "{what}: some expert should get no token");
            }
            if sh.one_expert {
                assert_eq!(want_off[1], t as i32, "{what}: expert 0 gets every token");
            }

            let (x_bits, x) = e.random(&mut r, t * h, 1.0);
            let d_x = g.upload(&x_bits);
            let rows = g.poisoned(p * h, e.nan());
            c.gather(rows.ptr, d_x.ptr)
                .run(&g, e, "moe", "moe_gather_bf16");
            let want_rows = reference::moe_gather(&x, &want_sorted, h, k);
            assert_eq!(g.download_as(e, &rows), want_rows, "{what}: gathered rows");

            // Gate/up: w_gu [E, 2I, H], plain (all 2I columns) and gated (SiLU-and-mul in the
            // epilogue, as the engine runs it); then down: w_d [E, H, I].
            let (wgu_bits, wgu) = e.random(&mut r, ex * 2 * i * h, 1.0 / (h as f32).sqrt());
            let (wd_bits, wd) = e.random(&mut r, ex * h * i, 1.0 / (i as f32).sqrt());
            let (d_wgu, d_wd) = (g.upload(&wgu_bits), g.upload(&wd_bits));
            let gate_up = g.poisoned(p * 2 * i, e.nan());
            let grouped = |out: u64, input: u64, w: u64, n: usize, kk: usize, gated: bool| {
                c.grouped_gemm(out, input, w, n, kk, gated).run(
                    &g,
                    e,
                    "moe_gemm",
                    "moe_grouped_gemm_bf16",
                )
            };
            grouped(gate_up.ptr, rows.ptr, d_wgu.ptr, 2 * i, h, false);
            let want_gu = reference::moe_grouped_gemm(&want_rows, &wgu, &want_off, 2 * i, h);
            let (atol, rtol) = e.tolerance();
            let got_gu = g.download_as(e, &gate_up);
            assert_close(&format!("{what}: gate/up"), &got_gu, &want_gu, atol, rtol);

            let act = g.poisoned(p * i, e.nan());
            grouped(act.ptr, rows.ptr, d_wgu.ptr, i, h, true);
            let want_act = reference::silu_and_mul(&want_gu, i);
            let got_act = g.download_as(e, &act);
            assert_close(&format!("{what}: gated"), &got_act, &want_act, atol, rtol);
            // The reference continues from the device's rounded activations, so that each
            // step is checked on its own.
            let down = g.poisoned(p * h, e.nan());
            grouped(down.ptr, act.ptr, d_wd.ptr, h, i, false);
            let want_down = reference::moe_grouped_gemm(&got_act, &wd, &want_off, h, i);
            let got_down = g.download_as(e, &down);
            assert_close(&format!("{what}: down"), &got_down, &want_down, atol, rtol);

            let out = g.poisoned(t * h, e.nan());
            c.unpermute(out.ptr, down.ptr)
                .run(&g, e, "moe", "moe_unpermute_bf16");
            let want_out = reference::moe_unpermute(&got_down, &want_slots, &want_w, h, k);
            assert_close(
                &format!("{what}: output"),
                &g.download_as(e, &out),
                &want_out,
                atol,
                rtol,
            );
        }
    }
}

/// The small-batch decode path's two launches (`moe_small.cu`).
struct Small<'a> {
    c: &'a Chain,
    inter: usize,
    /// The down projection the gate/up kernel prefetches into L2, or 0 for none.
    w_down: u64,
}

impl Small<'_> {
    fn gate_up(
        &self,
        act: u64,
        x: u64,
        logits: u64,
        w: u64,
        renormalize: bool,
    ) -> Launch<args::MoeSmallGateUp> {
        let c = self.c;
        let (grid, block) =
            reference::moe_small_gate_up_launch(c.tokens, c.experts, c.top_k, self.inter);
        Launch::new(
            grid,
            block,
            args::MoeSmallGateUp {
                act,
                topk_ids: c.ids.ptr,
                topk_weights: c.weights.ptr,
                x,
                logits,
                w,
                w_down: self.w_down,
                tokens: c.tokens as i32,
                experts: c.experts as i32,
                top_k: c.top_k as i32,
                renormalize: renormalize as i32,
                inter: self.inter as i32,
                hidden: c.hidden as i32,
            },
        )
    }

    fn down(&self, out: u64, act: u64, w: u64) -> Launch<args::MoeSmallDown> {
        self.down_into(out, act, w, false)
    }

    /// `down`, adding into `out` when `accumulate` (the residual add fused).
    fn down_into(
        &self,
        out: u64,
        act: u64,
        w: u64,
        accumulate: bool,
    ) -> Launch<args::MoeSmallDown> {
        let c = self.c;
        let (grid, block) = reference::moe_small_down_launch(c.hidden);
        Launch::new(
            grid,
            block,
            args::MoeSmallDown {
                out,
                act,
                w,
                topk_ids: c.ids.ptr,
                topk_weights: c.weights.ptr,
                tokens: c.tokens as i32,
                experts: c.experts as i32,
                top_k: c.top_k as i32,
                hidden: c.hidden as i32,
                inter: self.inter as i32,
                accumulate: accumulate as i32,
            },
        )
    }
}

/// The small-batch path (1 to `MOE_SMALL_MAX_TOKENS` tokens) against its references: the
/// routing its gate/up kernel stores (exactly `moe_topk_softmax`'s), the activations in pair
/// order, and the down kernel's weighted sums (from the device's rounded activations). Shapes:
/// Qwen3-30B-A3B's at 1 and 8 tokens, most experts idle, every pair on one expert (top 1),
/// expert 0 in every token beside others, top 32 at 8 tokens (256 pairs, the kernels' most),
/// reductions of no whole 32 chunks a lane; the down kernel also adding into a residual.
/// Outputs poisoned first.
#[test]
fn the_small_batch_moe_path_matches_the_reference() {
    let Some(g) = gpu("the_small_batch_moe_path_matches_the_reference") else {
        return;
    };
    let mut r = rng("moe_small");
    let max = reference::MOE_SMALL_MAX_TOKENS;
    // (tokens, experts, top k, hidden, inter, renormalize, one expert first)
    let shapes = [
        (1, 128, 8, 2048, 768, true, false),
        (max, 128, 8, 2048, 768, true, false),
        (1, 8, 2, 256, 128, true, false),
        (2, 128, 8, 256, 64, false, false),
        (3, 128, 8, 136, 40, true, true),
        (max, 16, 1, 256, 64, false, true),
        (1, 16, 1, 256, 64, true, true),
        (max, 8, 2, 200, 48, true, true),
        (5, 64, 4, 4104, 24, false, false),
        (max, 64, 32, 128, 32, true, false),
    ];
    for e in Elem::BOTH {
        for &(t, ex, k, h, i, renormalize, one_expert) in &shapes {
            assert!(reference::moe_small_fits(t, ex, k, h, i));
            let p = t * k;
            let what = format!(
                "small path {} tokens {t} experts {ex} top {k} hidden {h} inter {i}",
                e.name()
            );
            let (mut logit_bits, mut logits) = e.random(&mut r, t * ex, 4.0);
            if one_expert {
                for row in 0..t {
                    logit_bits[row * ex] = e.bits(8.0);
                    logits[row * ex] = e.widen(logit_bits[row * ex]);
                }
            }
            let d_logits = g.upload(&logit_bits);
            let (x_bits, x) = e.random(&mut r, t * h, 1.0);
            let d_x = g.upload(&x_bits);
            let (wgu_bits, wgu) = e.random(&mut r, ex * 2 * i * h, 1.0 / (h as f32).sqrt());
            let (wd_bits, wd) = e.random(&mut r, ex * h * i, 1.0 / (i as f32).sqrt());
            let (d_wgu, d_wd) = (g.upload(&wgu_bits), g.upload(&wd_bits));
            let c = Chain::new(&g, t, ex, k, h);
            let mut small = Small {
                c: &c,
                inter: i,
                w_down: d_wd.ptr,
            };
            let act = g.poisoned(p * i, e.nan());
            small
                .gate_up(act.ptr, d_x.ptr, d_logits.ptr, d_wgu.ptr, renormalize)
                .run(&g, e, "moe_small", "moe_small_gate_up_bf16");
            let (want_ids, want_w) = reference::moe_topk_softmax(&logits, ex, k, renormalize);
            assert_eq!(g.download(&c.ids), want_ids, "{what}: routed experts");
            assert_close(
                &format!("{what}: routing weights"),
                &g.download(&c.weights),
                &want_w,
                1e-6,
                1e-5,
            );
            let (off, _, _) = reference::moe_align(&want_ids, ex);
            let busy = off.windows(2).filter(|w| w[1] > w[0]).count();
            if p < ex {
                assert!(busy < ex, "{what}: some expert should be idle");
            }
            if one_expert {
                assert!(
                    want_ids.chunks(k).all(|c| c[0] == 0),
                    "{what}: expert 0 first"
                );
                if k == 1 {
                    assert_eq!(busy, 1, "{what}: every pair on one expert");
                }
            }
            let (atol, rtol) = e.tolerance();
            let want_act = reference::moe_small_gate_up(&x, &want_ids, &wgu, k, h, i);
            let got_act = g.download_as(e, &act);
            assert_close(&format!("{what}: act"), &got_act, &want_act, atol, rtol);

            let out = g.poisoned(t * h, e.nan());
            small
                .down(out.ptr, act.ptr, d_wd.ptr)
                .run(&g, e, "moe_small", "moe_small_down_bf16");
            let want_out = reference::moe_small_down(&got_act, &want_ids, &want_w, &wd, k, h, i);
            let got_out = g.download_as(e, &out);
            assert_close(&format!("{what}: output"), &got_out, &want_out, atol, rtol);
            // A grid narrower than a block a column group (and no L2 prefetch): its blocks take
            // several groups each, computing each column as before.
            small.w_down = 0;
            let (act3, out3) = (g.poisoned(p * i, e.nan()), g.poisoned(t * h, e.nan()));
            let mut l = small.gate_up(act3.ptr, d_x.ptr, d_logits.ptr, d_wgu.ptr, renormalize);
            l.grid.0 = 3;
            l.run(&g, e, "moe_small", "moe_small_gate_up_bf16");
            assert_eq!(
                g.download_as(e, &act3),
                got_act,
                "{what}: act, 3 blocks wide"
            );
            let mut l = small.down(out3.ptr, act.ptr, d_wd.ptr);
            l.grid.0 = 3;
            l.run(&g, e, "moe_small", "moe_small_down_bf16");
            assert_eq!(
                g.download_as(e, &out3),
                got_out,
                "{what}: output, 3 blocks wide"
            );
            // Accumulating into a residual: out = residual + the layer, one rounding.
            let (res_bits, res) = e.random(&mut r, t * h, 2.0);
            let sum = g.upload(&res_bits);
            small.down_into(sum.ptr, act.ptr, d_wd.ptr, true).run(
                &g,
                e,
                "moe_small",
                "moe_small_down_bf16",
            );
            let want_sum: Vec<f32> = res.iter().zip(&want_out).map(|(a, b)| a + b).collect();
            assert_close(
                &format!("{what}: residual + output"),
                &g.download_as(e, &sum),
                &want_sum,
                atol,
                rtol,
            );
        }
    }
}

/// The small path's references are the grouped chain's: the same activations (sorted by
/// expert there, in pair order here) and the same layer output (no GPU needed).
#[test]
fn the_small_path_references_match_the_grouped_chain() {
    let mut r = rng("moe_small_reference");
    let (t, ex, k, h, i) = (3, 6, 2, 8, 4);
    let logits: Vec<f32> = (0..t * ex).map(|_| r.random_range(-2.0..2.0)).collect();
    let x: Vec<f32> = (0..t * h).map(|_| r.random_range(-1.0..1.0)).collect();
    let wgu: Vec<f32> = (0..ex * 2 * i * h)
        .map(|_| r.random_range(-1.0..1.0))
        .collect();
    let wd: Vec<f32> = (0..ex * h * i).map(|_| r.random_range(-1.0..1.0)).collect();
    let (ids, weights) = reference::moe_topk_softmax(&logits, ex, k, true);
    let (off, sorted, slots) = reference::moe_align(&ids, ex);
    let rows = reference::moe_gather(&x, &sorted, h, k);
    let gu = reference::moe_grouped_gemm(&rows, &wgu, &off, 2 * i, h);
    let act_sorted = reference::silu_and_mul(&gu, i);
    let act = reference::moe_small_gate_up(&x, &ids, &wgu, k, h, i);
    for (pair, &slot) in slots.iter().enumerate() {
        let s = slot as usize;
        assert_close(
            &format!("pair {pair}"),
            &act[pair * i..(pair + 1) * i],
            &act_sorted[s * i..(s + 1) * i],
            1e-5,
            1e-5,
        );
    }
    let down = reference::moe_grouped_gemm(&act_sorted, &wd, &off, h, i);
    let want = reference::moe_unpermute(&down, &slots, &weights, h, k);
    let got = reference::moe_small_down(&act, &ids, &weights, &wd, k, h, i);
    assert_close("layer output", &got, &want, 1e-5, 1e-5);
}

/// The references compose into the layer: gathered, multiplied and un-permuted, they give each
/// token's weighted sum of its experts' outputs (no GPU needed).
#[test]
fn the_references_compose_into_a_per_token_moe() {
    let mut r = rng("moe_reference");
    let (t, ex, k, h) = (5, 6, 2, 8);
    let logits: Vec<f32> = (0..t * ex).map(|_| r.random_range(-2.0..2.0)).collect();
    let x: Vec<f32> = (0..t * h).map(|_| r.random_range(-1.0..1.0)).collect();
    let w: Vec<f32> = (0..ex * h * h).map(|_| r.random_range(-1.0..1.0)).collect();
    let (ids, weights) = reference::moe_topk_softmax(&logits, ex, k, true);
    let (off, sorted, slots) = reference::moe_align(&ids, ex);
    let rows = reference::moe_gather(&x, &sorted, h, k);
    let y = reference::moe_grouped_gemm(&rows, &w, &off, h, h);
    let out = reference::moe_unpermute(&y, &slots, &weights, h, k);
    for tok in 0..t {
        let mut want = vec![0.0f32; h];
        for j in 0..k {
            let (e, wt) = (ids[tok * k + j] as usize, weights[tok * k + j]);
            for (o, want) in want.iter_mut().enumerate() {
                let wr = &w[(e * h + o) * h..(e * h + o + 1) * h];
                *want += wt
                    * wr.iter()
                        .zip(&x[tok * h..])
                        .map(|(a, b)| a * b)
                        .sum::<f32>();
            }
        }
        assert_close(
            &format!("token {tok}"),
            &out[tok * h..(tok + 1) * h],
            &want,
            1e-5,
            1e-5,
        );
        let s: f32 = weights[tok * k..(tok + 1) * k].iter().sum();
        assert!((s - 1.0).abs() < 1e-6, "renormalized weights sum to {s}");
    }
    assert_eq!(*off.last().unwrap() as usize, t * k);
}

/// The tile map lists each busy expert's rows once, in tiles of at most 64 in order, and fits
/// its bound for routings from batch 1 to every pair on one expert (no GPU needed).
#[test]
fn the_gemm_tile_map_covers_every_expert_row_once() {
    let mut r = rng("moe_tiles");
    let routings: Vec<(usize, Vec<i32>)> = vec![
        (128, vec![3, 17, 20, 41, 64, 90, 101, 127]),
        (8, vec![0; 1024]),
        (128, (0..8192).map(|_| r.random_range(0..128)).collect()),
        (16, (0..3000).map(|p| p % 7).collect()),
    ];
    for (experts, ids) in routings {
        let (off, _, _) = reference::moe_align(&ids, experts);
        let map = reference::moe_gemm_tile_map(&off);
        assert_eq!(
            map.len(),
            reference::moe_gemm_tile_slots(ids.len(), experts)
        );
        let mut covered = vec![0u8; ids.len()];
        for &tile in map.iter().take_while(|&&t| t >= 0) {
            let (e, mt) = ((tile & 1023) as usize, (tile >> 10) as usize);
            let start = off[e] as usize + mt * reference::MOE_GEMM_TILE_ROWS;
            assert!(
                start < off[e + 1] as usize,
                "tile {mt} of expert {e} is empty"
            );
            let end = (start + reference::MOE_GEMM_TILE_ROWS).min(off[e + 1] as usize);
            covered[start..end].iter_mut().for_each(|c| *c += 1);
        }
        assert!(covered.iter().all(|&c| c == 1), "{experts} experts");
        let used = map.iter().take_while(|&&t| t >= 0).count();
        assert!(map[used..].iter().all(|&t| t == -1));
    }
}

/// Timings of the MoE kernels on Qwen3-30B-A3B's layer (128 experts, top 8, hidden 2,048,
/// expert width 768, bf16) inside CUDA graphs, at batch sizes from 1 to 1,024 with random
/// routing: each grouped GEMM alone (gate/up gated, and the bandwidth of the weights of the
/// experts it reads), and the whole chain from the routing to the un-permute (router GEMM
/// excluded); then, at 1, 2, 4 and 8 tokens, the small-batch path's two kernels (each alone,
/// and the pair) beside the grouped chain on the same routing. Each graph replays the same
/// experts, so some of their weights may come from L2 (50 MiB on an H100) as in the grouped
/// rows.
/// Not a timed test: `gpu_moe-<hash> --ignored --nocapture`.
#[test]
#[ignore]
fn qwen3_moe_layer_timings() {
    let Some(g) = gpu("qwen3_moe_layer_timings") else {
        return;
    };
    let e = Elem::Bf16;
    let (ex, k, h, i) = (128usize, 8usize, 2048usize, 768usize);
    let mut r = rng("moe_bench");
    // Weights: one random MiB of values repeated (the values do not matter, the bytes do).
    let (pattern, _) = e.random(&mut r, 1 << 19, 0.03);
    let tiled = |n: usize| -> Vec<u16> { pattern.iter().copied().cycle().take(n).collect() };
    let w_gu = g.upload(&tiled(ex * 2 * i * h));
    let w_d = g.upload(&tiled(ex * h * i));
    let gemm = g.function(&e.module("moe_gemm"), &e.kernel("moe_grouped_gemm_bf16"));
    g.allow_smem(gemm, reference::MOE_GEMM_SMEM_BYTES);
    let f = |name: &str| g.function(&e.module("moe"), &e.kernel(name));
    let (topk, align, gather, unpermute) = (
        f("moe_topk_softmax_bf16"),
        f("moe_align_bf16"),
        f("moe_gather_bf16"),
        f("moe_unpermute_bf16"),
    );
    println!(
        "batch | experts used | gate/up us | GB/s | down us | GB/s | whole layer us (x48 = ms)"
    );
    for t in [1usize, 8, 64, 200, 512, 1024] {
        let p = t * k;
        let (logits, _) = e.random(&mut r, t * ex, 4.0);
        let logits = g.upload(&logits);
        let (x, _) = e.random(&mut r, t * h, 1.0);
        let x = g.upload(&x);
        let c = Chain::new(&g, t, ex, k, h);
        let rows = g.poisoned(p * h, e.nan());
        let act = g.poisoned(p * i, e.nan());
        let out = g.poisoned(t * h, e.nan());
        let route = |st| {
            c.topk(logits.ptr, true).on(&g, st, topk);
            c.align().on(&g, st, align);
            c.gather(rows.ptr, x.ptr).on(&g, st, gather);
        };
        let grouped = |st, out: u64, input: u64, w: u64, n: usize, kk: usize, gated: bool| {
            c.grouped_gemm(out, input, w, n, kk, gated).on(&g, st, gemm)
        };
        let gate_up_gemm = |st| grouped(st, act.ptr, rows.ptr, w_gu.ptr, i, h, true);
        let down_gemm = |st| grouped(st, rows.ptr, act.ptr, w_d.ptr, h, i, false);
        let combine = |st| c.unpermute(out.ptr, rows.ptr).on(&g, st, unpermute);
        // One eager pass leaves the routing, rows and activations in place for the GEMMs alone.
        route(std::ptr::null_mut());
        gate_up_gemm(std::ptr::null_mut());
        g.sync();
        let off = g.download(&c.offsets);
        let used = off.windows(2).filter(|w| w[1] > w[0]).count();
        let gu_us = g.graph_time_us(16, gate_up_gemm);
        let d_us = g.graph_time_us(16, down_gemm);
        let layer_us = g.graph_time_us(8, |st| {
            route(st);
            gate_up_gemm(st);
            down_gemm(st);
            combine(st);
        });
        let gb = |bytes: usize, us: f32| bytes as f32 / us / 1e3;
        println!(
            "{t:5} | {used:12} | {gu_us:10.1} | {:4.0} | {d_us:7.1} | {:4.0} | {layer_us:.1} ({:.2})",
            gb(used * 2 * i * h * 2, gu_us),
            gb(used * h * i * 2, d_us),
            layer_us * 48.0 / 1e3
        );
        assert!(
            g.download_as(e, &out).iter().all(|v| v.is_finite()),
            "batch {t}: the layer left NaN"
        );
    }

    // The small-batch path beside the grouped one at the same batch and routing.
    let (gate_up_small, down_small) = (
        g.function(&e.module("moe_small"), &e.kernel("moe_small_gate_up_bf16")),
        g.function(&e.module("moe_small"), &e.kernel("moe_small_down_bf16")),
    );
    println!(
        "small path | batch | experts used | gate/up us | GB/s | down us | GB/s | \
         layer us (x48 = ms) | grouped path layer us | speed-up"
    );
    for t in [1usize, 2, 4, 8] {
        assert!(t <= reference::MOE_SMALL_MAX_TOKENS);
        let p = t * k;
        let (logits, _) = e.random(&mut r, t * ex, 4.0);
        let logits = g.upload(&logits);
        let (x, _) = e.random(&mut r, t * h, 1.0);
        let x = g.upload(&x);
        let c = Chain::new(&g, t, ex, k, h);
        let small = Small {
            c: &c,
            inter: i,
            w_down: w_d.ptr,
        };
        let no_prefetch = Small { w_down: 0, ..small };
        let rows = g.poisoned(p * h, e.nan());
        let act = g.poisoned(p * i, e.nan());
        let out = g.poisoned(t * h, e.nan());
        // Each kernel at a grid `width` blocks wide (0: the engine's); gate/up alone without
        // the down rows' L2 prefetch, so that its figure is its own stream.
        let gate_up_at = |st, width: u32| {
            let mut l = no_prefetch.gate_up(act.ptr, x.ptr, logits.ptr, w_gu.ptr, true);
            if width > 0 {
                l.grid.0 = width;
            }
            l.on(&g, st, gate_up_small)
        };
        let down_at = |st, width: u32| {
            let mut l = small.down(out.ptr, act.ptr, w_d.ptr);
            if width > 0 {
                l.grid.0 = width;
            }
            l.on(&g, st, down_small)
        };
        let gate_up = |st| gate_up_at(st, 0);
        let down = |st| down_at(st, 0);
        gate_up(std::ptr::null_mut());
        down(std::ptr::null_mut());
        g.sync();
        let mut ids = g.download(&c.ids);
        ids.sort_unstable();
        ids.dedup();
        let used = ids.len();
        assert!(
            g.download_as(e, &out).iter().all(|v| v.is_finite()),
            "small path batch {t}: the layer left NaN"
        );
        let gu_us = g.graph_time_us(16, gate_up);
        let d_us = g.graph_time_us(16, down);
        // The layer as the engine runs it: gate/up prefetching the down rows into L2.
        let layer_us = g.graph_time_us(8, |st| {
            small
                .gate_up(act.ptr, x.ptr, logits.ptr, w_gu.ptr, true)
                .on(&g, st, gate_up_small);
            down(st);
        });
        let unfetched_us = g.graph_time_us(8, |st| {
            gate_up(st);
            down(st);
        });
        // The grouped path over the same routing (its own routing kernel recomputes it).
        let grouped_us = g.graph_time_us(8, |st| {
            c.topk(logits.ptr, true).on(&g, st, topk);
            c.align().on(&g, st, align);
            c.gather(rows.ptr, x.ptr).on(&g, st, gather);
            c.grouped_gemm(act.ptr, rows.ptr, w_gu.ptr, i, h, true)
                .on(&g, st, gemm);
            c.grouped_gemm(rows.ptr, act.ptr, w_d.ptr, h, i, false)
                .on(&g, st, gemm);
            c.unpermute(out.ptr, rows.ptr).on(&g, st, unpermute);
        });
        let gb = |bytes: usize, us: f32| bytes as f32 / us / 1e3;
        let (gu_bytes, d_bytes) = (used * 2 * i * h * 2, used * h * i * 2);
        println!(
            "small path | {t:5} | {used:12} | {gu_us:10.1} | {:4.0} | {d_us:7.1} | {:4.0} | \
             {layer_us:6.1} ({:.2}) [{:4.0} GB/s] | {grouped_us:21.1} | {:.2}x",
            gb(gu_bytes, gu_us),
            gb(d_bytes, d_us),
            layer_us * 48.0 / 1e3,
            gb(gu_bytes + d_bytes, layer_us),
            grouped_us / layer_us
        );
        // Narrower grids: fewer blocks, each routing once for several column groups.
        let widths = |full: u32, f: &dyn Fn(CUstream, u32)| -> String {
            [full, full / 2, full / 3, full / 4, full / 8]
                .iter()
                .map(|&w| format!("{w}: {:.1}", g.graph_time_us(16, |st| f(st, w))))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let full_gu = reference::moe_small_gate_up_launch(t, ex, k, i).0 .0;
        let full_d = reference::moe_small_down_launch(h).0 .0;
        println!(
            "small path | {t:5} | layer without the down rows' L2 prefetch: {unfetched_us:.1} us"
        );
        println!(
            "small path | {t:5} | gate/up us by grid width {{{}}} | down us by grid width {{{}}}",
            widths(full_gu, &gate_up_at),
            widths(full_d, &down_at)
        );
    }
}
