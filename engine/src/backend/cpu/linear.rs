//! `out = x @ w^T (+ bias)` with every output's bits independent of the product's width
//! (`linear`), and the row-parallel projections' product summed in f64 over fixed parts
//! (`row_parallel_linear`): the CPU backend's one route, the same arithmetic at every
//! tensor-parallel size. A one-row product is a fixed-order dot product a weight row
//! (`dot_rows`); more rows go through the `gemm` crate.
use anyhow::{ensure, Result};
use gemm::Parallelism;
use rayon::prelude::*;

use super::{CpuTensor, CpuVector, CpuWeight};
use crate::backend::parallel::{all_reduce_sum_f64, HostCommunicator};
use crate::backend::Activation;

/// Below this many rows the gemm crate's own threading pays off poorly, so the output
/// columns are split across threads instead.
const SPLIT_COLUMNS_BELOW_ROWS: usize = 32;

/// The gemm crate computes a product of at most this many outputs (`m × n`) with its
/// "horizontal" kernel: each output one SIMD dot product along the inner dimension, the
/// same arithmetic whatever the tile. Column blocks kept under it give every output the
/// bits it has in any other column block, so a rank's columns of a column-parallel
/// projection (QKV, gate/up, a vocabulary shard of the LM head) equal those of the whole
/// product; larger blocks would switch, with the block's width, between that kernel, the
/// packed one and the matrix-vector one, which add in other orders.
const HORIZONTAL_KERNEL_MAX_OUTPUTS: usize = 256;

/// Raw pointer that may cross to rayon workers; every worker writes a disjoint column range.
#[derive(Clone, Copy)]
struct SendPtr<T>(*mut T);
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

/// Checks a linear's shapes, sizes `out` to x's rows and fills it with the bias (the products
/// then add into it). False: nothing to compute (no rows or no outputs).
fn start_output(
    x: &CpuTensor,
    w: &CpuWeight,
    bias: Option<&CpuVector>,
    out: &mut CpuTensor,
) -> Result<bool> {
    let (m, k, n) = (x.rows, x.cols, w.rows);
    ensure!(
        w.cols == k,
        "linear: input has {k} features, weight is [{}, {}]",
        w.rows,
        w.cols
    );
    ensure!(
        out.cols == n,
        "linear: output has {} cols, weight has {n} outputs",
        out.cols
    );
    if let Some(b) = bias {
        ensure!(
            b.data.len() == n,
            "linear: bias has {} elements, expected {n}",
            b.data.len()
        );
    }
    out.set_rows(m)?;
    if m == 0 || n == 0 {
        return Ok(false);
    }
    if let Some(b) = bias {
        for row in out.as_mut_slice().chunks_mut(n) {
            row.copy_from_slice(&b.data);
        }
    }
    Ok(true)
}

/// `out = x @ w^T (+ bias)` through `product`: each output with the same bits whatever the
/// width, so that a rank's columns of a column-parallel projection equal the whole
/// product's, and the CPU backend gives the same logits at every tensor-parallel size,
/// without a group (`--tensor-parallel-size 1`) included.
pub fn linear(
    x: &CpuTensor,
    w: &CpuWeight,
    bias: Option<&CpuVector>,
    out: &mut CpuTensor,
) -> Result<()> {
    let (m, k, n) = (x.rows, x.cols, w.rows);
    if !start_output(x, w, bias, out)? {
        return Ok(());
    }
    let dst = out.as_mut_slice();
    let read_dst = bias.is_some();
    // SAFETY: shapes checked above; dst holds m * n, x m * k, w n * k elements.
    unsafe {
        product(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            x.as_slice().as_ptr(),
            k,
            w.data.as_ptr(),
            k,
            read_dst,
        )
    };
    Ok(())
}

/// `dst[i, j] (+)= sum_l x[i, l] * w[j, l]`, `dst` `[m, n]` row-major; `x` and `w` rows of
/// stride `ldx` and `ldw`. Every output gets the same bits whatever `n` and wherever its
/// column sits, so that a rank's columns of a column-parallel projection (QKV, gate/up, a
/// vocabulary shard of the LM head) equal those of the whole product: one row takes
/// `dot_rows` (the gemm crate's kernels for one row add in orders that change with the
/// width), a few rows take the gemm crate's "horizontal" kernel in column blocks narrow
/// enough for it, and more take its packed kernel over the whole product.
///
/// # Safety
/// `dst` must be valid for `m * n` elements, `x` for `m` rows of stride `ldx` and `w` for `n`
/// rows of stride `ldw`, `k` elements each.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn product(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    x: *const f32,
    ldx: usize,
    w: *const f32,
    ldw: usize,
    read_dst: bool,
) {
    let threads = rayon::current_num_threads();
    let dst_ptr = SendPtr(dst);
    let (x_ptr, w_ptr) = (SendPtr(x as *mut f32), SendPtr(w as *mut f32));
    if m == 1 {
        // SAFETY (here and below): the caller's bounds; each task writes its own columns.
        let xs = std::slice::from_raw_parts(x, k);
        let block = one_row_block(n, threads);
        (0..n.div_ceil(block)).into_par_iter().for_each(|b| {
            let (d, wp) = (dst_ptr, w_ptr);
            let j0 = b * block;
            let cols = block.min(n - j0);
            let out = unsafe { std::slice::from_raw_parts_mut(d.0.add(j0), cols) };
            if read_dst {
                let mut v = vec![0.0f32; cols];
                unsafe { dot_rows(xs, wp.0.add(j0 * ldw), ldw, &mut v) };
                out.iter_mut().zip(v).for_each(|(o, v)| *o += v);
            } else {
                unsafe { dot_rows(xs, wp.0.add(j0 * ldw), ldw, out) };
            }
        });
    } else if m < SPLIT_COLUMNS_BELOW_ROWS {
        // Several column blocks per thread so that uneven progress evens out.
        let block = n
            .div_ceil(threads * 4)
            .next_multiple_of(16)
            .min(HORIZONTAL_KERNEL_MAX_OUTPUTS / m)
            .min(n);
        (0..n.div_ceil(block)).into_par_iter().for_each(|b| {
            let j0 = b * block;
            let cols = block.min(n - j0);
            let (d, xp, wp) = (dst_ptr, x_ptr, w_ptr);
            unsafe {
                gemm_strided(
                    m,
                    cols,
                    k,
                    d.0.add(j0),
                    n,
                    xp.0,
                    ldx,
                    wp.0.add(j0 * ldw),
                    ldw,
                    read_dst,
                    Parallelism::None,
                )
            };
        });
    } else {
        let par = if threads > 1 {
            Parallelism::Rayon(threads)
        } else {
            Parallelism::None
        };
        gemm_strided(m, n, k, dst, n, x, ldx, w, ldw, read_dst, par);
    }
}

/// Columns a task of a one-row product computes: several blocks a thread.
fn one_row_block(n: usize, threads: usize) -> usize {
    n.div_ceil(threads * 4).max(16)
}

/// Lanes of each of `dot`'s sums: two AVX vectors, so that two fused multiply-adds are in
/// flight (a matrix-vector product waits on memory, not on them).
const DOT_LANES: usize = 16;

/// `out[j] = dot(x, w[j * ldw..][..x.len()])`, row after row: one stream through the weight
/// rows, which the hardware prefetcher follows best (reading four rows interleaved measured
/// ~40 % more CPU time a decode step). Runs the AVX2/FMA build where the CPU has it (the
/// same order, so the same bits on any machine with FMA).
///
/// # Safety
/// `w` must be valid for `out.len()` rows of stride `ldw`, `x.len()` elements each.
unsafe fn dot_rows(x: &[f32], w: *const f32, ldw: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("fma") && std::arch::is_x86_feature_detected!("avx2")
        {
            return dot_rows_fma(x, w, ldw, out);
        }
    }
    dot_rows_in_order(x, w, ldw, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_rows_fma(x: &[f32], w: *const f32, ldw: usize, out: &mut [f32]) {
    dot_rows_in_order(x, w, ldw, out)
}

#[inline(always)]
unsafe fn dot_rows_in_order(x: &[f32], w: *const f32, ldw: usize, out: &mut [f32]) {
    let k = x.len();
    for (j, o) in out.iter_mut().enumerate() {
        *o = dot(x, std::slice::from_raw_parts(w.add(j * ldw), k));
    }
}

/// `sums[j] += the f32 dot products of x's and row j's parts, each `chunk` long, added in
/// f64 in order`: a row-parallel projection's one row, each weight row read start to end.
///
/// # Safety
/// `w` must be valid for `sums.len()` contiguous rows of `x.len()` elements; `chunk` must
/// divide `x.len()`.
unsafe fn dot_rows_in_parts(x: &[f32], w: *const f32, chunk: usize, sums: &mut [f64]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("fma") && std::arch::is_x86_feature_detected!("avx2")
        {
            return dot_rows_in_parts_fma(x, w, chunk, sums);
        }
    }
    dot_rows_in_parts_in_order(x, w, chunk, sums)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_rows_in_parts_fma(x: &[f32], w: *const f32, chunk: usize, sums: &mut [f64]) {
    dot_rows_in_parts_in_order(x, w, chunk, sums)
}

#[inline(always)]
unsafe fn dot_rows_in_parts_in_order(x: &[f32], w: *const f32, chunk: usize, sums: &mut [f64]) {
    let k = x.len();
    for (j, s) in sums.iter_mut().enumerate() {
        let row = std::slice::from_raw_parts(w.add(j * k), k);
        for (xp, wp) in x.chunks_exact(chunk).zip(row.chunks_exact(chunk)) {
            *s += dot(xp, wp) as f64;
        }
    }
}

/// `sum_l x[l] * w[l]` in a fixed order: lane `l % DOT_LANES` accumulates with fused
/// multiply-adds, then the lanes are added pairwise.
#[inline(always)]
fn dot(x: &[f32], w: &[f32]) -> f32 {
    let mut acc = [0.0f32; DOT_LANES];
    let (xb, xt) = x.split_at(x.len() / DOT_LANES * DOT_LANES);
    let (wb, wt) = w[..x.len()].split_at(xb.len());
    for (xs, ws) in xb.chunks_exact(DOT_LANES).zip(wb.chunks_exact(DOT_LANES)) {
        for l in 0..DOT_LANES {
            acc[l] = xs[l].mul_add(ws[l], acc[l]);
        }
    }
    for (l, (&xv, &wv)) in xt.iter().zip(wt).enumerate() {
        acc[l] = xv.mul_add(wv, acc[l]);
    }
    let mut width = DOT_LANES;
    while width > 1 {
        width /= 2;
        for l in 0..width {
            acc[l] += acc[l + width];
        }
    }
    acc[0]
}

/// A row-parallel projection (O, down): `out = x @ w^T`, or `out += x @ w^T` with
/// `accumulate`, where `x`'s and `w`'s inner dimension is a rank's slice of the model's and
/// the ranks' products are summed through `comm`.
///
/// The inner dimension is cut into `chunk`-wide parts, each part's product is an f32
/// `product`, and the parts, the value added to, and the ranks' sums are added in f64 and
/// rounded to f32 once. A rank's slice is a whole number of parts (`row_parallel_parts`), so
/// every part is computed with the same bits whatever the number of ranks, and their f64
/// sum (exact unless the parts span more than 2^29 in magnitude) does not depend on how they
/// are grouped over ranks: the result is that of one rank, to the rare last-bit rounding of
/// a sum that is not exact. Summing f32 partials over ranks instead would round in another
/// order than one rank's GEMM (a few ulps of the largest logits).
pub fn row_parallel_linear(
    x: &CpuTensor,
    w: &CpuWeight,
    chunk: usize,
    accumulate: bool,
    out: &mut CpuTensor,
    comm: Option<&HostCommunicator>,
) -> Result<()> {
    let (m, k, n) = (x.rows, x.cols, w.rows);
    ensure!(
        w.cols == k,
        "row-parallel linear: input has {k} features, weight is [{}, {}]",
        w.rows,
        w.cols
    );
    ensure!(
        out.cols == n,
        "row-parallel linear: output has {} cols, weight has {n} outputs",
        out.cols
    );
    ensure!(
        chunk > 0 && k.is_multiple_of(chunk),
        "row-parallel linear: {k} input features are not parts of {chunk}"
    );
    if accumulate {
        ensure!(
            out.rows == m,
            "row-parallel linear: adding {m} rows into {}",
            out.rows
        );
    }
    out.set_rows(m)?;
    let mut wide: Vec<f64> = if accumulate {
        out.as_slice().iter().map(|&v| v as f64).collect()
    } else {
        vec![0.0; m * n]
    };
    if m == 1 && n > 0 {
        // One task a column block, every part inside it: one dispatch, not one a part.
        let block = one_row_block(n, rayon::current_num_threads());
        let (xs, ws) = (x.as_slice(), &w.data);
        wide.par_chunks_mut(block)
            .enumerate()
            .for_each(|(b, sums)| {
                // SAFETY: rows b * block.. of w (stride k), sums.len() of them: within its shape.
                unsafe { dot_rows_in_parts(xs, ws.as_ptr().add(b * block * k), chunk, sums) };
            });
    } else if m > 0 && n > 0 {
        let mut part = vec![0.0f32; m * n];
        for l0 in (0..k).step_by(chunk) {
            // SAFETY: columns l0..l0 + chunk of x's m rows and w's n rows (stride k), within
            // the shapes checked above; `part` holds m x n.
            unsafe {
                product(
                    m,
                    n,
                    chunk,
                    part.as_mut_ptr(),
                    x.as_slice().as_ptr().add(l0),
                    k,
                    w.data.as_ptr().add(l0),
                    k,
                    false,
                )
            };
            wide.par_chunks_mut(n)
                .zip(part.par_chunks(n))
                .for_each(|(s, p)| s.iter_mut().zip(p).for_each(|(s, &p)| *s += p as f64));
        }
    }
    if let Some(comm) = comm {
        all_reduce_sum_f64(comm, &mut wide)?;
    }
    out.as_mut_slice()
        .iter_mut()
        .zip(&wide)
        .for_each(|(o, &s)| *o = s as f32);
    Ok(())
}

/// dst[i, j] (+)= sum_l x[i, l] * w[j, l] for i < m, j < n; dst row stride `ld`.
///
/// # Safety
/// `dst` must be valid for `m` rows of stride `ld` (n columns each), `x` for `m * k` and
/// `w` for `n * k` elements.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn gemm_into(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    ld: usize,
    x: *const f32,
    w: *const f32,
    read_dst: bool,
    par: Parallelism,
) {
    gemm_strided(m, n, k, dst, ld, x, k, w, k, read_dst, par)
}

/// `gemm_into` with row strides of their own for `x` (`ldx`) and `w` (`ldw`): the product
/// over a slice of the inner dimension.
///
/// # Safety
/// `dst` must be valid for `m` rows of stride `ld` (n columns each), `x` for `m` rows of
/// stride `ldx` and `w` for `n` rows of stride `ldw`, `k` elements each.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_strided(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    ld: usize,
    x: *const f32,
    ldx: usize,
    w: *const f32,
    ldw: usize,
    read_dst: bool,
    par: Parallelism,
) {
    // gemm computes dst := alpha * dst + beta * lhs * rhs. lhs = x (row-major: col stride 1,
    // row stride ldx); rhs = w^T, i.e. rhs[l, j] = w[j, l]: col stride ldw, row stride 1.
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        ld as isize,
        read_dst,
        x,
        1,
        ldx as isize,
        w,
        ldw as isize,
        1,
        1.0f32,
        1.0f32,
        false,
        false,
        false,
        par,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fill(n: usize, seed: u32) -> Vec<f32> {
        (0..n as u32)
            .map(|i| ((i.wrapping_mul(2_654_435_761) ^ seed) % 2001) as f32 / 1000.0 - 1.0)
            .collect()
    }

    fn tensor(data: Vec<f32>, rows: usize, cols: usize) -> CpuTensor {
        CpuTensor { data, rows, cols }
    }

    /// A rank's rows of `w` (a column-parallel shard, any offset and width) give the bits of
    /// the same columns of the whole product, for one row, a few and many.
    #[test]
    fn a_column_shard_has_the_bits_of_the_whole_product() {
        let (k, n) = (200, 300);
        let w = fill(n * k, 1);
        for m in [1, 3, 17, 40] {
            let x = tensor(fill(m * k, 2), m, k);
            let mut whole = tensor(vec![0.0; m * n], 0, n);
            let wt = CpuWeight {
                data: w.clone(),
                rows: n,
                cols: k,
            };
            linear(&x, &wt, None, &mut whole).unwrap();
            for (j0, cols) in [(0, 150), (150, 150), (40, 24), (272, 28)] {
                let part = CpuWeight {
                    data: w[j0 * k..(j0 + cols) * k].to_vec(),
                    rows: cols,
                    cols: k,
                };
                let mut got = tensor(vec![0.0; m * cols], 0, cols);
                linear(&x, &part, None, &mut got).unwrap();
                for i in 0..m {
                    let want = &whole.as_slice()[i * n + j0..i * n + j0 + cols];
                    assert_eq!(&got.as_slice()[i * cols..(i + 1) * cols], want, "m {m}");
                }
            }
        }
    }

    /// The residual plus the parts' products, summed in f64 and rounded once: within the f32
    /// rounding of each part's products of the exact value, at one row (its own kernel) and
    /// several.
    #[test]
    fn a_row_parallel_product_rounds_the_f64_sum_once() {
        for m in [1, 5] {
            row_parallel_product_rounds_the_f64_sum_once(m);
        }
    }

    fn row_parallel_product_rounds_the_f64_sum_once(m: usize) {
        let (k, n, part) = (96, 67, 24);
        let xs = fill(m * k, 3);
        let ws = fill(n * k, 4);
        let mut whole = tensor(fill(m * n, 5), m, n);
        let residual = whole.as_slice().to_vec();
        let wt = CpuWeight {
            data: ws.clone(),
            rows: n,
            cols: k,
        };
        row_parallel_linear(&tensor(xs.clone(), m, k), &wt, part, true, &mut whole, None).unwrap();
        for (i, (&got, &r)) in whole.as_slice().iter().zip(&residual).enumerate() {
            let (row, col) = (i / n, i % n);
            let terms = (0..k).map(|l| xs[row * k + l] as f64 * ws[col * k + l] as f64);
            let exact = terms.clone().sum::<f64>() + r as f64;
            let scale = terms.map(f64::abs).sum::<f64>() + (r as f64).abs();
            let err = (got as f64 - exact).abs();
            assert!(err <= 1e-6 * scale, "{got} vs {exact} (scale {scale})");
        }
    }
}
