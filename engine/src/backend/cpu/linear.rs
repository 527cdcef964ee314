//! `out = x @ w^T (+ bias)` through the `gemm` crate.
use anyhow::{ensure, Result};
use gemm::Parallelism;
use rayon::prelude::*;

use super::{CpuTensor, CpuVector, CpuWeight};
use crate::backend::Activation;

/// Below this many rows the gemm crate takes its single-threaded matrix-vector path (and
/// its own threading pays off poorly), so we split the output columns across threads.
const SPLIT_COLUMNS_BELOW_ROWS: usize = 32;

/// Raw pointer that may cross to rayon workers; every worker writes a disjoint column range.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

pub fn linear(
    x: &CpuTensor,
    w: &CpuWeight,
    bias: Option<&CpuVector>,
    out: &mut CpuTensor,
) -> Result<()> {
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
        return Ok(());
    }
    let dst = out.as_mut_slice();
    if let Some(b) = bias {
        for row in dst.chunks_mut(n) {
            row.copy_from_slice(&b.data);
        }
    }
    let read_dst = bias.is_some();
    let dst_ptr = SendPtr(dst.as_mut_ptr());
    let threads = rayon::current_num_threads();
    if m < SPLIT_COLUMNS_BELOW_ROWS && threads > 1 {
        // Several column blocks per thread so that uneven progress evens out.
        let block = n.div_ceil(threads * 4).next_multiple_of(16).min(n);
        let blocks: Vec<usize> = (0..n).step_by(block).collect();
        let xs = x.as_slice();
        blocks.into_par_iter().for_each(|j0| {
            let cols = block.min(n - j0);
            let d = dst_ptr;
            // SAFETY: columns j0..j0+cols of a row-major [m, n] dst, rows j0.. of w; disjoint
            // per task, all within bounds checked above.
            unsafe {
                gemm_into(
                    m,
                    cols,
                    k,
                    d.0.add(j0),
                    n,
                    xs.as_ptr(),
                    w.data.as_ptr().add(j0 * k),
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
        // SAFETY: shapes checked above; dst holds m * n, x m * k, w n * k elements.
        unsafe {
            gemm_into(
                m,
                n,
                k,
                dst_ptr.0,
                n,
                x.as_slice().as_ptr(),
                w.data.as_ptr(),
                read_dst,
                par,
            )
        };
    }
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
    // gemm computes dst := alpha * dst + beta * lhs * rhs. lhs = x (row-major: col stride 1,
    // row stride k); rhs = w^T, i.e. rhs[l, j] = w[j, l]: col stride k, row stride 1.
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
        k as isize,
        w,
        k as isize,
        1,
        1.0f32,
        1.0f32,
        false,
        false,
        false,
        par,
    );
}
