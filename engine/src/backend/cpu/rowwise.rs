//! Row-independent ops (norms, activation, gathers), parallel over rows.
use anyhow::{ensure, Result};
use rayon::prelude::*;

use super::{CpuTensor, CpuVector, CpuWeight};
use crate::backend::Activation;

/// Rows per rayon task: enough work per task that scheduling costs stay small.
fn rows_per_task(cols: usize) -> usize {
    (16 * 1024 / cols.max(1)).max(1)
}

pub fn embedding(table: &CpuWeight, ids: &[u32], out: &mut CpuTensor) -> Result<()> {
    ensure!(
        out.cols == table.cols,
        "embedding output has {} cols, table {}",
        out.cols,
        table.cols
    );
    if let Some(&bad) = ids.iter().find(|&&t| t as usize >= table.rows) {
        anyhow::bail!(
            "token id {bad} is outside the vocabulary (size {})",
            table.rows
        );
    }
    out.set_rows(ids.len())?;
    let h = table.cols;
    if h == 0 {
        return Ok(());
    }
    out.as_mut_slice()
        .par_chunks_mut(h)
        .zip(ids.par_iter())
        .for_each(|(row, &id)| {
            let id = id as usize;
            row.copy_from_slice(&table.data[id * h..(id + 1) * h]);
        });
    Ok(())
}

fn inv_rms(x: &[f32], eps: f32) -> f32 {
    let ss: f32 = x.iter().map(|v| v * v).sum();
    1.0 / (ss / x.len() as f32 + eps).sqrt()
}

pub fn rms_norm(x: &CpuTensor, w: &CpuVector, eps: f32, out: &mut CpuTensor) -> Result<()> {
    let h = x.cols;
    ensure!(
        w.data.len() == h && out.cols == h,
        "rms_norm: width {h}, weight {}, output {}",
        w.data.len(),
        out.cols
    );
    out.set_rows(x.rows)?;
    if h == 0 {
        return Ok(());
    }
    let step = rows_per_task(h) * h;
    out.as_mut_slice()
        .par_chunks_mut(step)
        .zip(x.as_slice().par_chunks(step))
        .for_each(|(o, xi)| {
            for (orow, xrow) in o.chunks_mut(h).zip(xi.chunks(h)) {
                let inv = inv_rms(xrow, eps);
                for ((o, &v), &g) in orow.iter_mut().zip(xrow).zip(&w.data) {
                    *o = v * inv * g;
                }
            }
        });
    Ok(())
}

/// `acc += x` (the residual stream update).
pub fn add_inplace(acc: &mut CpuTensor, x: &CpuTensor) -> Result<()> {
    crate::backend::check_same_shape("add", acc, x)?;
    let step = rows_per_task(x.cols.max(1)) * x.cols.max(1);
    acc.as_mut_slice()
        .par_chunks_mut(step)
        .zip(x.as_slice().par_chunks(step))
        .for_each(|(a, b)| {
            for (a, &b) in a.iter_mut().zip(b) {
                *a += b;
            }
        });
    Ok(())
}

pub fn add_rms_norm(
    residual: &mut CpuTensor,
    x: &CpuTensor,
    w: &CpuVector,
    eps: f32,
    out: &mut CpuTensor,
) -> Result<()> {
    let h = x.cols;
    ensure!(
        residual.cols == h && w.data.len() == h && out.cols == h,
        "add_rms_norm: width {h}, residual {}, weight {}, output {}",
        residual.cols,
        w.data.len(),
        out.cols
    );
    ensure!(
        residual.rows == x.rows,
        "add_rms_norm: residual has {} rows, x {}",
        residual.rows,
        x.rows
    );
    out.set_rows(x.rows)?;
    if h == 0 {
        return Ok(());
    }
    let step = rows_per_task(h) * h;
    out.as_mut_slice()
        .par_chunks_mut(step)
        .zip(residual.as_mut_slice().par_chunks_mut(step))
        .zip(x.as_slice().par_chunks(step))
        .for_each(|((o, r), xi)| {
            for ((orow, rrow), xrow) in o.chunks_mut(h).zip(r.chunks_mut(h)).zip(xi.chunks(h)) {
                for (r, &v) in rrow.iter_mut().zip(xrow) {
                    *r += v;
                }
                let inv = inv_rms(rrow, eps);
                for ((o, &v), &g) in orow.iter_mut().zip(rrow.iter()).zip(&w.data) {
                    *o = v * inv * g;
                }
            }
        });
    Ok(())
}

pub fn silu_and_mul(gate_up: &CpuTensor, out: &mut CpuTensor) -> Result<()> {
    gated_mul("silu_and_mul", gate_up, out, |g| g / (1.0 + (-g).exp()))
}

/// `out = gelu_tanh(gate) * up`, GELU in transformers' `gelu_pytorch_tanh` form.
pub fn gelu_tanh_and_mul(gate_up: &CpuTensor, out: &mut CpuTensor) -> Result<()> {
    // sqrt(2 / pi)
    const K: f32 = 0.797_884_6;
    gated_mul("gelu_tanh_and_mul", gate_up, out, |g| {
        let inner = K * (g + 0.044715 * g * g * g);
        0.5 * g * (1.0 + inner.tanh())
    })
}

/// `out = act(gate) * up` for rows laid out `[gate | up]`: the one loop of every gated MLP.
fn gated_mul(
    op: &str,
    gate_up: &CpuTensor,
    out: &mut CpuTensor,
    act: impl Fn(f32) -> f32 + Sync,
) -> Result<()> {
    let i = out.cols;
    ensure!(
        gate_up.cols == 2 * i,
        "{op}: input has {} cols, output {i} (expected half)",
        gate_up.cols
    );
    out.set_rows(gate_up.rows)?;
    if i == 0 {
        return Ok(());
    }
    let rows = rows_per_task(2 * i);
    out.as_mut_slice()
        .par_chunks_mut(rows * i)
        .zip(gate_up.as_slice().par_chunks(rows * 2 * i))
        .for_each(|(o, gu)| {
            for (orow, gurow) in o.chunks_mut(i).zip(gu.chunks(2 * i)) {
                let (gate, up) = gurow.split_at(i);
                for ((o, &g), &u) in orow.iter_mut().zip(gate).zip(up) {
                    *o = act(g) * u;
                }
            }
        });
    Ok(())
}

/// Per-head RMSNorm over `[start, start + heads * hd)` of every row, in place.
pub fn head_rms_norm(
    x: &mut CpuTensor,
    start: usize,
    heads: usize,
    hd: usize,
    w: &CpuVector,
    eps: f32,
) -> Result<()> {
    ensure!(
        w.data.len() == hd && start + heads * hd <= x.cols,
        "head norm: weight of {} for head_dim {hd}, {heads} heads from column {start} of {}",
        w.data.len(),
        x.cols
    );
    let cols = x.cols;
    if cols == 0 {
        return Ok(());
    }
    x.as_mut_slice().par_chunks_mut(cols).for_each(|row| {
        for head in row[start..start + heads * hd].chunks_mut(hd) {
            let inv = inv_rms(head, eps);
            for (v, &g) in head.iter_mut().zip(&w.data) {
                *v = *v * inv * g;
            }
        }
    });
    Ok(())
}

/// `x *= factor`.
pub fn scale(x: &mut CpuTensor, factor: f32) -> Result<()> {
    x.as_mut_slice()
        .par_chunks_mut(16 * 1024)
        .for_each(|c| c.iter_mut().for_each(|v| *v *= factor));
    Ok(())
}

pub fn gather_rows(x: &CpuTensor, rows: &[u32], out: &mut CpuTensor) -> Result<()> {
    let c = x.cols;
    ensure!(
        out.cols == c,
        "gather_rows: input has {c} cols, output {}",
        out.cols
    );
    if let Some(&bad) = rows.iter().find(|&&r| r as usize >= x.rows) {
        anyhow::bail!(
            "gather_rows: row {bad} is outside the input's {} rows",
            x.rows
        );
    }
    out.set_rows(rows.len())?;
    if c == 0 {
        return Ok(());
    }
    let src = x.as_slice();
    for (orow, &r) in out.as_mut_slice().chunks_mut(c).zip(rows) {
        let r = r as usize;
        orow.copy_from_slice(&src[r * c..(r + 1) * c]);
    }
    Ok(())
}
