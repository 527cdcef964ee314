//! The mixture-of-experts MLP on the CPU, written as the fused GPU path will run it, so that it
//! can serve as that path's reference: route (router GEMM, f32 softmax, top-k, optional
//! renormalization), sort the (token, expert) pairs by expert, gather each expert's rows, run
//! its SwiGLU as two GEMMs over them, and add each token's expert outputs, weighted, in
//! ascending expert order (the order of transformers' `index_add_`).
use anyhow::{ensure, Context, Result};
use gemm::Parallelism;
use rayon::prelude::*;

use super::linear::{gemm_into, linear, product};
use super::{CpuTensor, CpuWeight};
use crate::backend::parallel::{all_reduce_sum_f64, HostCommunicator};
use crate::backend::{Activation, MoeScratch};
use crate::types::MoeLayout;

/// Each token's `top_k` experts and routing weights, token-major (`[tokens * top_k]`); a
/// token's experts are listed in ascending order.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    pub experts: Vec<u32>,
    pub weights: Vec<f32>,
}

/// Routing from router logits `[tokens, num_experts]`: softmax in f32, the `top_k` largest
/// probabilities (ties to the lower expert), divided by their sum when `renormalize`.
pub fn route(logits: &[f32], layout: &MoeLayout) -> Routing {
    let (e, k) = (layout.num_experts, layout.top_k);
    let tokens = logits.len() / e.max(1);
    let mut experts = Vec::with_capacity(tokens * k);
    let mut weights = Vec::with_capacity(tokens * k);
    let mut order: Vec<usize> = Vec::with_capacity(e);
    let mut probs = vec![0.0f32; e];
    for row in logits.chunks_exact(e) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        for (p, &l) in probs.iter_mut().zip(row) {
            *p = (l - max).exp();
        }
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);
        order.clear();
        order.extend(0..e);
        // Stable: equal probabilities keep the lower expert first.
        order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
        let top = &mut order[..k];
        let norm = if layout.renormalize {
            top.iter().map(|&x| probs[x]).sum::<f32>()
        } else {
            1.0
        };
        top.sort_unstable();
        for &x in top.iter() {
            experts.push(x as u32);
            weights.push(probs[x] / norm);
        }
    }
    Routing { experts, weights }
}

/// `out = moe(x)` (see `Backend::moe`).
#[allow(clippy::too_many_arguments)]
pub fn moe(
    x: &CpuTensor,
    router: &CpuWeight,
    gate_up: &CpuWeight,
    down: &CpuWeight,
    layout: &MoeLayout,
    scratch: &mut MoeScratch<CpuTensor>,
    out: &mut CpuTensor,
) -> Result<()> {
    moe_summed(x, router, gate_up, down, layout, scratch, out, None)
}

/// How `row_parallel_moe` sums: the experts' down projections in parts of `part_len` of
/// their inner dimension, then the group's ranks (`comm`).
#[derive(Clone, Copy)]
struct Exact<'a> {
    part_len: usize,
    comm: Option<&'a HostCommunicator>,
}

/// `moe` summed as `linear::row_parallel_linear` sums (see `Backend::row_parallel_moe`): each
/// expert's gate/up with the same bits whatever its width (`product`), its down projection in
/// f32 parts of `part_len` added in f64, the weighted sum over the experts in f64, the ranks'
/// sums (`comm`) in f64, rounded once; so a model split over ranks gives one rank's bits.
#[allow(clippy::too_many_arguments)]
pub fn row_parallel_moe(
    x: &CpuTensor,
    router: &CpuWeight,
    gate_up: &CpuWeight,
    down: &CpuWeight,
    layout: &MoeLayout,
    part_len: usize,
    scratch: &mut MoeScratch<CpuTensor>,
    out: &mut CpuTensor,
    comm: Option<&HostCommunicator>,
) -> Result<()> {
    ensure!(
        part_len > 0 && layout.intermediate_size.is_multiple_of(part_len),
        "moe: the experts' width {} is not parts of {part_len}",
        layout.intermediate_size
    );
    let exact = Exact { part_len, comm };
    moe_summed(x, router, gate_up, down, layout, scratch, out, Some(exact))
}

#[allow(clippy::too_many_arguments)]
fn moe_summed(
    x: &CpuTensor,
    router: &CpuWeight,
    gate_up: &CpuWeight,
    down: &CpuWeight,
    layout: &MoeLayout,
    scratch: &mut MoeScratch<CpuTensor>,
    out: &mut CpuTensor,
    exact: Option<Exact>,
) -> Result<()> {
    let (e, k, inter) = (layout.num_experts, layout.top_k, layout.intermediate_size);
    let (tokens, h) = (x.rows, x.cols);
    ensure!(
        router.rows == e && router.cols == h,
        "moe: router is [{}, {}], expected [{e}, {h}]",
        router.rows,
        router.cols
    );
    ensure!(
        gate_up.rows == e * 2 * inter && gate_up.cols == h,
        "moe: stacked gate/up is [{}, {}], expected [{}, {h}]",
        gate_up.rows,
        gate_up.cols,
        e * 2 * inter
    );
    ensure!(
        down.rows == e * h && down.cols == inter,
        "moe: stacked down is [{}, {}], expected [{}, {inter}]",
        down.rows,
        down.cols,
        e * h
    );
    ensure!((1..=e).contains(&k), "moe: top_k {k} of {e} experts");
    ensure!(
        out.cols == h,
        "moe: output has {} cols, expected {h}",
        out.cols
    );
    let s = scratch;
    let gate_up_rows = s
        .gate_up
        .as_mut()
        .context("moe: the CPU backend needs the scratch's gate_up rows")?;
    ensure!(
        s.rows.cols == h && gate_up_rows.cols == 2 * inter && s.act.cols == inter,
        "moe: scratch buffers do not match the layout"
    );
    out.set_rows(tokens)?;
    if tokens == 0 {
        return Ok(());
    }
    linear(x, router, None, &mut s.router_logits)?;
    let routing = route(s.router_logits.as_slice(), layout);

    // Counting sort of the (token, expert) pairs by expert: slot[p] is pair p's row.
    let pairs = tokens * k;
    s.rows.set_rows(pairs)?;
    gate_up_rows.set_rows(pairs)?;
    s.act.set_rows(pairs)?;
    let mut starts = vec![0usize; e + 1];
    for &x in &routing.experts {
        starts[x as usize + 1] += 1;
    }
    for i in 0..e {
        starts[i + 1] += starts[i];
    }
    let mut next = starts.clone();
    let mut slot = vec![0usize; pairs];
    {
        let rows = s.rows.as_mut_slice();
        let xs = x.as_slice();
        for (p, &ex) in routing.experts.iter().enumerate() {
            let r = next[ex as usize];
            next[ex as usize] += 1;
            slot[p] = r;
            let t = p / k;
            rows[r * h..(r + 1) * h].copy_from_slice(&xs[t * h..(t + 1) * h]);
        }
    }

    // Each expert's rows, gate/up, activation (and f64 output) segments, disjoint, for the
    // experts with work.
    let mut wide_rows = vec![0.0f64; if exact.is_some() { pairs * h } else { 0 }];
    let mut segments = Vec::new();
    {
        let (mut rows, mut gu, mut act, mut wide) = (
            s.rows.as_mut_slice(),
            gate_up_rows.as_mut_slice(),
            s.act.as_mut_slice(),
            wide_rows.as_mut_slice(),
        );
        for ex in 0..e {
            let n = starts[ex + 1] - starts[ex];
            let (r, rest_r) = rows.split_at_mut(n * h);
            let (g, rest_g) = gu.split_at_mut(n * 2 * inter);
            let (a, rest_a) = act.split_at_mut(n * inter);
            let (wd, rest_w) = wide.split_at_mut(if exact.is_some() { n * h } else { 0 });
            (rows, gu, act, wide) = (rest_r, rest_g, rest_a, rest_w);
            if n > 0 {
                segments.push((ex, n, r, g, a, wd));
            }
        }
    }
    // Few experts with work (decode, or a small batch): thread each GEMM instead.
    let threads = rayon::current_num_threads();
    let par = if segments.len() < threads && threads > 1 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    segments
        .into_par_iter()
        .for_each(|(ex, n, rows, gu, act, wide)| {
            let w_gu = &gate_up.data[ex * 2 * inter * h..(ex + 1) * 2 * inter * h];
            let w_down = &down.data[ex * h * inter..(ex + 1) * h * inter];
            // SAFETY: gu holds n x 2*inter, rows n x h, w_gu 2*inter x h elements (checked shapes).
            if exact.is_some() {
                unsafe {
                    product(
                        n,
                        2 * inter,
                        h,
                        gu.as_mut_ptr(),
                        rows.as_ptr(),
                        h,
                        w_gu.as_ptr(),
                        h,
                        false,
                    )
                };
            } else {
                unsafe {
                    gemm_into(
                        n,
                        2 * inter,
                        h,
                        gu.as_mut_ptr(),
                        2 * inter,
                        rows.as_ptr(),
                        w_gu.as_ptr(),
                        false,
                        par,
                    )
                };
            }
            for (a, g) in act.chunks_exact_mut(inter).zip(gu.chunks_exact(2 * inter)) {
                let (gate, up) = g.split_at(inter);
                for ((o, &g), &u) in a.iter_mut().zip(gate).zip(up) {
                    *o = g / (1.0 + (-g).exp()) * u;
                }
            }
            if let Some(Exact { part_len, .. }) = exact {
                // Each part's product in `rows` (the inputs are no longer needed), added in f64.
                for l0 in (0..inter).step_by(part_len) {
                    // SAFETY: columns l0..l0 + part_len of act's n rows and w_down's h rows
                    // (stride inter); rows holds n x h.
                    unsafe {
                        product(
                            n,
                            h,
                            part_len,
                            rows.as_mut_ptr(),
                            act.as_ptr().add(l0),
                            inter,
                            w_down.as_ptr().add(l0),
                            inter,
                            false,
                        )
                    };
                    wide.iter_mut()
                        .zip(rows.iter())
                        .for_each(|(s, &p)| *s += p as f64);
                }
                return;
            }
            // The expert's outputs replace its inputs, which are no longer needed.
            // SAFETY: rows holds n x h, act n x inter, w_down h x inter elements.
            unsafe {
                gemm_into(
                    n,
                    h,
                    inter,
                    rows.as_mut_ptr(),
                    h,
                    act.as_ptr(),
                    w_down.as_ptr(),
                    false,
                    par,
                )
            };
        });

    if let Some(Exact { comm, .. }) = exact {
        let mut sum = vec![0.0f64; tokens * h];
        sum.par_chunks_mut(h).enumerate().for_each(|(t, o)| {
            for p in t * k..(t + 1) * k {
                let w = routing.weights[p] as f64;
                let r = &wide_rows[slot[p] * h..(slot[p] + 1) * h];
                o.iter_mut().zip(r).for_each(|(o, &v)| *o += v * w);
            }
        });
        if let Some(comm) = comm {
            all_reduce_sum_f64(comm, &mut sum)?;
        }
        out.as_mut_slice()
            .iter_mut()
            .zip(&sum)
            .for_each(|(o, &v)| *o = v as f32);
        return Ok(());
    }
    let rows = s.rows.as_slice();
    out.as_mut_slice()
        .par_chunks_mut(h)
        .enumerate()
        .for_each(|(t, o)| {
            o.fill(0.0);
            for p in t * k..(t + 1) * k {
                let w = routing.weights[p];
                let r = &rows[slot[p] * h..(slot[p] + 1) * h];
                for (o, &v) in o.iter_mut().zip(r) {
                    *o += v * w;
                }
            }
        });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::backend::Backend;

    fn layout(e: usize, k: usize, inter: usize, renormalize: bool) -> MoeLayout {
        MoeLayout {
            num_experts: e,
            top_k: k,
            intermediate_size: inter,
            renormalize,
        }
    }

    /// A deterministic pseudo-random fill in [-scale, scale).
    fn fill(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect()
    }

    #[test]
    fn routing_picks_the_top_k_in_expert_order_and_renormalizes() {
        let logits = [0.0, 2.0, 1.0, 3.0, /* token 2 */ 5.0, 5.0, 0.0, -1.0];
        let z: f32 = [0.0f32, 2.0, 1.0, 3.0].iter().map(|l| l.exp()).sum();
        let r = route(&logits, &layout(4, 2, 1, false));
        assert_eq!(r.experts, vec![1, 3, 0, 1]);
        assert!((r.weights[0] - 2f32.exp() / z).abs() < 1e-6);
        assert!((r.weights[1] - 3f32.exp() / z).abs() < 1e-6);
        let r = route(&logits, &layout(4, 2, 1, true));
        assert!((r.weights[0] + r.weights[1] - 1.0).abs() < 1e-6);
        assert_eq!((r.weights[2], r.weights[3]), (0.5, 0.5));
    }

    /// The op against a direct per-token evaluation, for routings where some experts get no
    /// token, where one expert gets every token, and several batch sizes.
    #[test]
    fn matches_a_per_token_evaluation() {
        let be = CpuBackend::new();
        let (h, inter) = (24, 10);
        for (e, k, tokens, renormalize, one_expert) in [
            (8, 2, 1, true, false),
            (8, 3, 7, false, false),
            (4, 1, 64, false, true),
            (16, 4, 33, true, false),
            (16, 2, 3, false, false),
        ] {
            let l = layout(e, k, inter, renormalize);
            let mut router = fill(e * h, 1, 0.5);
            let gate_up = fill(e * 2 * inter * h, 2, 0.3);
            let down = fill(e * h * inter, 3, 0.3);
            let mut xs = fill(tokens * h, 4, 1.0);
            if one_expert {
                // Positive inputs, a zero router row for expert 2 and negative rows for the
                // others: expert 2 wins every token.
                for t in 0..tokens {
                    for j in 0..h {
                        xs[t * h + j] = 1.0 + j as f32 * 0.01;
                    }
                }
                router.iter_mut().for_each(|w| *w = -w.abs());
                router[2 * h..3 * h].iter_mut().for_each(|w| *w = 0.0);
            }
            let w = |data: &Vec<f32>, rows, cols| CpuWeight {
                data: data.clone(),
                rows,
                cols,
            };
            let (wr, wgu, wd) = (
                w(&router, e, h),
                w(&gate_up, e * 2 * inter, h),
                w(&down, e * h, inter),
            );
            let x = be.activation_from_host(tokens, h, &xs).unwrap();
            let mut scratch = MoeScratch {
                router_logits: be.alloc_activation(tokens, e).unwrap(),
                rows: be.alloc_activation(tokens * k, h).unwrap(),
                gate_up: Some(be.alloc_activation(tokens * k, 2 * inter).unwrap()),
                act: be.alloc_activation(tokens * k, inter).unwrap(),
            };
            let mut out = be.alloc_activation(tokens, h).unwrap();
            moe(&x, &wr, &wgu, &wd, &l, &mut scratch, &mut out).unwrap();
            let got = out.as_slice();

            let mut used = vec![0usize; e];
            for t in 0..tokens {
                let xt = &xs[t * h..(t + 1) * h];
                let logits: Vec<f32> = (0..e)
                    .map(|ex| (0..h).map(|j| router[ex * h + j] * xt[j]).sum())
                    .collect();
                let r = route(&logits, &l);
                let mut want = vec![0.0f32; h];
                for (&ex, &wt) in r.experts.iter().zip(&r.weights) {
                    let ex = ex as usize;
                    used[ex] += 1;
                    let row = |m: usize| &gate_up[(ex * 2 * inter + m) * h..][..h];
                    let act: Vec<f32> = (0..inter)
                        .map(|m| {
                            let g: f32 = row(m).iter().zip(xt).map(|(a, b)| a * b).sum();
                            let u: f32 = row(inter + m).iter().zip(xt).map(|(a, b)| a * b).sum();
                            g / (1.0 + (-g).exp()) * u
                        })
                        .collect();
                    for (j, o) in want.iter_mut().enumerate() {
                        let d = &down[(ex * h + j) * inter..][..inter];
                        *o += wt * d.iter().zip(&act).map(|(a, b)| a * b).sum::<f32>();
                    }
                }
                for j in 0..h {
                    let (a, b) = (got[t * h + j], want[j]);
                    assert!(
                        (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                        "e={e} k={k} tokens={tokens} token {t} dim {j}: {a} vs {b}"
                    );
                }
            }
            if one_expert {
                assert_eq!(used[2], tokens, "{used:?}");
            } else if tokens * k < e {
                assert!(used.contains(&0), "some expert idle: {used:?}");
            }
        }
    }
}
