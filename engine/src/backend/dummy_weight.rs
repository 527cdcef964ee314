//! `--load-format dummy` weights as a description rather than data: which checkpoint tensors a
//! weight stacks (fused q/k/v, gate/up, a mixture's experts) and which rows and columns of the
//! stack a tensor-parallel rank keeps. Every element is a pure function of its tensor's name,
//! the seed and its index in that tensor (`dummy_value`), so a backend can make a weight where
//! it lives (the CUDA backend fills device memory with a kernel, no host copy of 16 GB) and
//! still get exactly the values the host makes (`to_host`, the CPU backend's path).
// A weight's kept rows are a list of ranges, often of one: `vec![0..rows]` is meant.
#![allow(clippy::single_range_in_vec_init)]
use std::ops::Range;

use anyhow::{ensure, Result};
use rayon::prelude::*;

use crate::hash::{splitmix64_finalize, GOLDEN};
use crate::types::{HostData, HostTensor};

/// Elements a splitmix64 stream runs for before the next one starts (the host once generated
/// one stream a chunk in parallel; the values keep that layout).
pub const DUMMY_CHUNK_LOG2: u32 = 16;
/// How far apart the streams of consecutive chunks start.
pub const DUMMY_CHUNK_STRIDE: u64 = 0xD6E8_FEB8_6659_FD93;

/// Element `i` of the tensor whose stream base is `base` (`name_hash(name) ^ seed`): uniform in
/// ±`bound`, from the top 24 bits of splitmix64 (so `u` and `2u - 1` are exact in f32, and the
/// only rounding is the product with `bound`). kernels/src/dummy_fill.cu computes the same.
pub fn dummy_value(base: u64, i: u64, bound: f32) -> f32 {
    let chunk = base.wrapping_add((i >> DUMMY_CHUNK_LOG2).wrapping_mul(DUMMY_CHUNK_STRIDE));
    let within = (i & ((1 << DUMMY_CHUNK_LOG2) - 1)) + 1;
    let z = splitmix64_finalize(chunk.wrapping_add(within.wrapping_mul(GOLDEN)));
    let u = (z >> 40) as f32 / (1u64 << 24) as f32; // [0, 1)
    (2.0 * u - 1.0) * bound
}

/// FNV-1a of a tensor's name: each tensor its own stream.
pub fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// How a checkpoint tensor's elements are made.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DummyFill {
    /// `dummy_value(base, i, bound)`.
    Uniform { base: u64, bound: f32 },
    /// Every element the same (norm weights: 1).
    Constant(f32),
}

/// One checkpoint tensor of a stack: its rows (of the stack's columns) and its values.
#[derive(Debug, Clone, PartialEq)]
pub struct DummyPart {
    pub rows: usize,
    pub fill: DummyFill,
}

/// A rectangle of a weight that comes from one part: what one kernel launch fills.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DummyBlock {
    pub fill: DummyFill,
    /// Where it goes in the weight: the first row (the columns are the weight's all).
    pub out_row: usize,
    /// Where it comes from in its part: first row and column, and the part's row length.
    pub part_row: usize,
    pub part_col: usize,
    pub part_cols: usize,
    pub rows: usize,
    pub cols: usize,
}

/// A dummy 2-D weight: checkpoint tensors stacked along the first dimension, of which the
/// listed rows and columns are kept.
#[derive(Debug, Clone, PartialEq)]
pub struct DummyWeight {
    pub parts: Vec<DummyPart>,
    /// The columns of every part.
    pub cols: usize,
    /// Rows of the stack kept, in order.
    pub rows: Vec<Range<usize>>,
    /// Columns kept.
    pub columns: Range<usize>,
}

impl DummyWeight {
    /// Checkpoint tensor `name` of `shape` (its leading dimension as rows, the rest as
    /// columns): norm weights 1, matrices uniform in ±1/sqrt(in), anything else in ±0.02.
    pub fn new(name: &str, shape: &[usize], seed: u64) -> Self {
        let rows = shape.first().copied().unwrap_or(1);
        let cols = shape.iter().skip(1).product::<usize>();
        let fill = if name.contains("norm") {
            DummyFill::Constant(1.0)
        } else {
            let bound = if shape.len() == 2 {
                1.0 / (shape[1].max(1) as f32).sqrt()
            } else {
                0.02
            };
            DummyFill::Uniform {
                base: name_hash(name) ^ seed,
                bound,
            }
        };
        Self {
            parts: vec![DummyPart { rows, fill }],
            cols,
            rows: vec![0..rows],
            columns: 0..cols,
        }
    }

    fn stack_rows(&self) -> usize {
        self.parts.iter().map(|p| p.rows).sum()
    }

    fn is_whole(&self) -> bool {
        self.rows == [0..self.stack_rows()] && self.columns == (0..self.cols)
    }

    /// (rows, columns) kept.
    pub fn shape(&self) -> [usize; 2] {
        [self.rows.iter().map(|r| r.len()).sum(), self.columns.len()]
    }

    /// Whole weights stacked along the first dimension (fusing q/k/v, gate/up, experts).
    pub fn stack(name: &str, weights: Vec<DummyWeight>) -> Result<Self> {
        let cols = weights.first().map_or(0, |w| w.cols);
        ensure!(
            weights.iter().all(|w| w.cols == cols && w.is_whole()),
            "cannot fuse `{name}`: inner shapes differ"
        );
        let parts: Vec<DummyPart> = weights.into_iter().flat_map(|w| w.parts).collect();
        let rows = parts.iter().map(|p| p.rows).sum::<usize>();
        Ok(Self {
            parts,
            cols,
            rows: vec![0..rows],
            columns: 0..cols,
        })
    }

    /// The rows listed (ranges of the rows kept now), stacked in order.
    pub fn select_rows(&self, picks: &[Range<usize>]) -> Result<Self> {
        let kept: Vec<usize> = self.rows.iter().flat_map(|r| r.clone()).collect();
        let mut rows: Vec<Range<usize>> = Vec::new();
        for p in picks {
            ensure!(
                p.end <= kept.len(),
                "rows {p:?} of a weight of {} rows",
                kept.len()
            );
            for &r in &kept[p.clone()] {
                match rows.last_mut() {
                    Some(last) if last.end == r => last.end += 1,
                    _ => rows.push(r..r + 1),
                }
            }
        }
        Ok(Self {
            rows,
            ..self.clone()
        })
    }

    /// The columns `pick` (of the columns kept now).
    pub fn select_columns(&self, pick: Range<usize>) -> Result<Self> {
        ensure!(
            pick.end <= self.columns.len(),
            "columns {pick:?} of a weight of {} columns",
            self.columns.len()
        );
        let start = self.columns.start + pick.start;
        Ok(Self {
            columns: start..start + pick.len(),
            ..self.clone()
        })
    }

    /// The weight as rectangles of one part each, in output order.
    pub fn blocks(&self) -> Vec<DummyBlock> {
        let mut out = Vec::new();
        let mut out_row = 0;
        for r in &self.rows {
            let mut part_start = 0;
            for part in &self.parts {
                let part_end = part_start + part.rows;
                let (lo, hi) = (r.start.max(part_start), r.end.min(part_end));
                if lo < hi {
                    out.push(DummyBlock {
                        fill: part.fill,
                        out_row: out_row + (lo - r.start),
                        part_row: lo - part_start,
                        part_col: self.columns.start,
                        part_cols: self.cols,
                        rows: hi - lo,
                        cols: self.columns.len(),
                    });
                }
                part_start = part_end;
            }
            out_row += r.len();
        }
        out
    }

    /// The weight's values in f32 on the host, made on every core.
    pub fn to_host(&self) -> HostTensor {
        let [rows, cols] = self.shape();
        let mut data = vec![0.0f32; rows * cols];
        for b in self.blocks() {
            let dst = &mut data[b.out_row * cols..(b.out_row + b.rows) * cols];
            dst.par_chunks_mut(cols.max(1))
                .enumerate()
                .for_each(|(r, row)| fill_row(&b, r, row));
        }
        HostTensor {
            shape: vec![rows, cols],
            data: HostData::F32(data),
        }
    }
}

/// Row `r` of block `b`.
fn fill_row(b: &DummyBlock, r: usize, row: &mut [f32]) {
    match b.fill {
        DummyFill::Constant(v) => row.fill(v),
        DummyFill::Uniform { base, bound } => {
            let first = ((b.part_row + r) * b.part_cols + b.part_col) as u64;
            for (c, x) in row.iter_mut().enumerate() {
                *x = dummy_value(base, first + c as u64, bound);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The generator as the host ran it before `dummy_value`: one splitmix64 stream a chunk.
    fn streamed(base: u64, n: usize, bound: f32) -> Vec<f32> {
        let mut out = Vec::with_capacity(n);
        for ci in 0..n.div_ceil(1 << DUMMY_CHUNK_LOG2) {
            let mut s = base.wrapping_add((ci as u64).wrapping_mul(DUMMY_CHUNK_STRIDE));
            for _ in 0..(1usize << DUMMY_CHUNK_LOG2).min(n - out.len()) {
                s = s.wrapping_add(GOLDEN);
                let u = (splitmix64_finalize(s) >> 40) as f32 / (1u64 << 24) as f32;
                out.push((2.0 * u - 1.0) * bound);
            }
        }
        out
    }

    fn values(t: &HostTensor) -> Vec<f32> {
        t.to_f32()
    }

    #[test]
    fn values_are_the_per_chunk_streams_and_bounded() {
        let w = DummyWeight::new("x.weight", &[300, 400], 7);
        let got = values(&w.to_host());
        let bound = 1.0 / 20.0;
        assert_eq!(got, streamed(name_hash("x.weight") ^ 7, 300 * 400, bound));
        assert!(got.iter().all(|v| v.abs() <= bound));
        assert_ne!(
            got,
            values(&DummyWeight::new("y.weight", &[300, 400], 7).to_host())
        );
        let norm = DummyWeight::new("l.input_layernorm.weight", &[8], 7).to_host();
        assert_eq!(norm.shape, vec![8, 1]);
        assert!(values(&norm).iter().all(|&v| v == 1.0));
    }

    #[test]
    fn stacks_and_slices_keep_each_elements_value() {
        let (a, b) = (
            DummyWeight::new("a.weight", &[5, 6], 1),
            DummyWeight::new("b.weight", &[3, 6], 1),
        );
        let (ha, hb) = (values(&a.to_host()), values(&b.to_host()));
        let stack = DummyWeight::stack("ab", vec![a.clone(), b]).unwrap();
        assert_eq!(values(&stack.to_host()), [ha.clone(), hb.clone()].concat());
        // Rows 3..6 (across the parts' boundary) and 7, then columns 2..5 of those.
        let cut = stack.select_rows(&[3..6, 7..8]).unwrap();
        let cut = cut.select_columns(2..5).unwrap();
        assert_eq!(cut.shape(), [4, 3]);
        let row = |v: &[f32], r: usize| v[r * 6 + 2..r * 6 + 5].to_vec();
        let want = [row(&ha, 3), row(&ha, 4), row(&hb, 0), row(&hb, 2)].concat();
        assert_eq!(values(&cut.to_host()), want);
        assert_eq!(cut.blocks().len(), 3);
        // A second cut is taken of the first's rows.
        let again = cut.select_rows(&[1..3]).unwrap();
        assert_eq!(
            values(&again.to_host()),
            [row(&ha, 4), row(&hb, 0)].concat()
        );
        assert!(DummyWeight::stack("bad", vec![cut, a.clone()]).is_err());
        assert!(a.select_rows(&[4..6]).is_err());
        assert!(a.select_columns(5..7).is_err());
    }
}
