//! Which slice of each weight a rank holds (vLLM's `ColumnParallelLinear`,
//! `QKVParallelLinear`, `MergedColumnParallelLinear`, `RowParallelLinear`,
//! `VocabParallelEmbedding` / `ParallelLMHead`).
use std::ops::Range;

use anyhow::{ensure, Result};

use crate::types::{HostData, HostTensor};

/// The vocabulary is padded to a multiple of this before it is split (vLLM's
/// `DEFAULT_VOCAB_PADDING_SIZE`).
pub const VOCAB_PADDING: usize = 64;

/// Rank `rank` of `size` ranks. `TpShard::whole()` (size 1) keeps every tensor as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TpShard {
    pub rank: usize,
    pub size: usize,
}

impl TpShard {
    pub fn whole() -> Self {
        Self { rank: 0, size: 1 }
    }
    pub fn is_whole(&self) -> bool {
        self.size == 1
    }

    /// This rank's part of `n` equal parts, as a range of `0..n * unit`.
    fn part(&self, n: usize, unit: usize) -> Range<usize> {
        let per = n / self.size;
        self.rank * per * unit..(self.rank + 1) * per * unit
    }

    /// The KV heads this rank holds: its equal part, or, with fewer KV heads than ranks,
    /// the one head its group of `size / kv_heads` ranks shares (vLLM's replication: rank r
    /// holds head r / (size / kv_heads), the head its query heads use).
    pub fn kv_heads(&self, kv_heads: usize) -> Range<usize> {
        if kv_heads >= self.size {
            self.part(kv_heads, 1)
        } else {
            let h = self.rank / (self.size / kv_heads);
            h..h + 1
        }
    }

    /// Rows of the vocabulary-parallel embedding and LM head each rank holds: an equal part
    /// of the vocabulary padded to `VOCAB_PADDING` (vLLM's split).
    pub fn vocab_rows_per_rank(&self, vocab: usize) -> usize {
        vocab.next_multiple_of(VOCAB_PADDING).div_ceil(self.size)
    }

    /// The token ids whose rows this rank holds. The last ranks' parts run past the
    /// vocabulary (padding) and may hold fewer ids, or none.
    pub fn vocab(&self, vocab: usize) -> Range<usize> {
        let per = self.vocab_rows_per_rank(vocab);
        (self.rank * per).min(vocab)..((self.rank + 1) * per).min(vocab)
    }

    /// This rank's part of a `[vocab, hidden]` table (embedding, LM head): its `vocab` rows,
    /// then zero rows up to `vocab_rows_per_rank`, so that every rank's logits have the same
    /// width and the padding's logits are zero.
    pub fn vocab_rows(&self, t: &HostTensor) -> Result<HostTensor> {
        ensure!(
            t.shape.len() == 2,
            "a vocabulary table must be 2-D, not {:?}",
            t.shape
        );
        let (vocab, hidden) = (t.shape[0], t.shape[1]);
        let mut part = rows(t, &[self.vocab(vocab)])?;
        let per = self.vocab_rows_per_rank(vocab);
        if let HostData::F32(v) = &mut part.data {
            v.resize(per * hidden, 0.0);
        }
        part.shape = vec![per, hidden];
        Ok(part)
    }

    /// QKV stacked along the first dim (a weight `[q + 2 kv, in]` or a bias): this rank's
    /// query heads, then its KV heads' k, then their v.
    pub fn qkv(
        &self,
        t: &HostTensor,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> Result<HostTensor> {
        if self.is_whole() {
            return Ok(t.clone());
        }
        let (q, kv) = (heads * head_dim, kv_heads * head_dim);
        let mine = self.kv_heads(kv_heads);
        let kv_rows = mine.start * head_dim..mine.end * head_dim;
        let shift = |r: &Range<usize>, by: usize| r.start + by..r.end + by;
        rows(
            t,
            &[
                self.part(heads, head_dim),
                shift(&kv_rows, q),
                shift(&kv_rows, q + kv),
            ],
        )
    }

    /// `[gate | up]` stacked along the first dim (`[2 · inter, in]`), repeated `blocks` times
    /// (a mixture's experts one after the other): this rank's slice of each gate and up.
    pub fn gate_up(&self, t: &HostTensor, inter: usize, blocks: usize) -> Result<HostTensor> {
        if self.is_whole() {
            return Ok(t.clone());
        }
        let mine = self.part(inter, 1);
        let ranges: Vec<Range<usize>> = (0..2 * blocks)
            .map(|b| mine.start + b * inter..mine.end + b * inter)
            .collect();
        rows(t, &ranges)
    }

    /// A row-parallel weight `[out, in]` (O, down): this rank's `in` columns, `n` equal parts
    /// of `unit` columns (heads of `head_dim`, or single MLP channels).
    pub fn columns(&self, t: &HostTensor, n: usize, unit: usize) -> Result<HostTensor> {
        if self.is_whole() {
            return Ok(t.clone());
        }
        ensure!(
            t.shape.len() == 2,
            "a row-parallel weight must be 2-D, not {:?}",
            t.shape
        );
        let (r, c) = (t.shape[0], t.shape[1]);
        ensure!(c == n * unit, "{c} columns are not {n} parts of {unit}");
        let keep = self.part(n, unit);
        let data = t.to_f32();
        let mut out = Vec::with_capacity(r * keep.len());
        for row in data.chunks_exact(c) {
            out.extend_from_slice(&row[keep.clone()]);
        }
        Ok(HostTensor {
            shape: vec![r, keep.len()],
            data: HostData::F32(out),
        })
    }
}

/// The listed ranges of `t`'s first dimension, stacked (f32).
fn rows(t: &HostTensor, ranges: &[Range<usize>]) -> Result<HostTensor> {
    let inner: usize = t.shape[1..].iter().product();
    let first = t.shape[0];
    ensure!(
        ranges.iter().all(|r| r.end <= first),
        "a shard's rows {ranges:?} exceed the tensor's {first}"
    );
    let data = t.to_f32();
    let mut out = Vec::with_capacity(ranges.iter().map(|r| r.len()).sum::<usize>() * inner);
    for r in ranges {
        out.extend_from_slice(&data[r.start * inner..r.end * inner]);
    }
    let mut shape = t.shape.clone();
    shape[0] = out.len() / inner.max(1);
    Ok(HostTensor {
        shape,
        data: HostData::F32(out),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(shape: &[usize]) -> HostTensor {
        let n = shape.iter().product::<usize>();
        HostTensor {
            shape: shape.to_vec(),
            data: HostData::F32((0..n).map(|i| i as f32).collect()),
        }
    }

    #[test]
    fn kv_heads_split_or_replicate_as_vllm() {
        let at = |rank, size, kv| TpShard { rank, size }.kv_heads(kv);
        assert_eq!(at(1, 2, 4), 2..4);
        // 2 KV heads over 4 ranks: ranks 0, 1 share head 0; ranks 2, 3 head 1.
        assert_eq!(
            (0..4).map(|r| at(r, 4, 2)).collect::<Vec<_>>(),
            vec![0..1, 0..1, 1..2, 1..2]
        );
        assert_eq!(at(3, 4, 1), 0..1);
    }

    #[test]
    fn the_vocabulary_splits_padded_as_vllm() {
        // 101 ids padded to 128: 64 a rank of 2 (the second holds 37 and 27 zero rows), 32
        // a rank of 4 (the last holds 5); 3 ranks take 43 each of the 128.
        let parts = |size| {
            (0..size)
                .map(|rank| TpShard { rank, size }.vocab(101))
                .collect::<Vec<_>>()
        };
        assert_eq!(parts(2), vec![0..64, 64..101]);
        assert_eq!(parts(4), vec![0..32, 32..64, 64..96, 96..101]);
        assert_eq!(parts(3), vec![0..43, 43..86, 86..101]);
        assert_eq!(parts(1), vec![0..101]);
        let table = seq(&[101, 2]);
        let last = TpShard { rank: 1, size: 2 }.vocab_rows(&table).unwrap();
        assert_eq!(last.shape, vec![64, 2]);
        let v = last.to_f32();
        assert_eq!(&v[..4], &[128.0, 129.0, 130.0, 131.0]);
        assert_eq!(v[73], 200.0 + 1.0);
        assert!(v[74..].iter().all(|&x| x == 0.0));
    }

    #[test]
    fn qkv_gate_up_and_columns_take_this_ranks_slices() {
        // 4 query heads, 2 KV heads, head_dim 1, one input column: rows are q0..q3 k0 k1 v0 v1.
        let qkv = seq(&[8, 1]);
        let s = TpShard { rank: 1, size: 2 };
        assert_eq!(
            s.qkv(&qkv, 4, 2, 1).unwrap().to_f32(),
            vec![2.0, 3.0, 5.0, 7.0]
        );
        let s4 = TpShard { rank: 3, size: 4 };
        assert_eq!(s4.qkv(&qkv, 4, 2, 1).unwrap().to_f32(), vec![3.0, 5.0, 7.0]);
        // Two experts of [gate(4) | up(4)] rows.
        let gu = seq(&[16, 1]);
        assert_eq!(
            s.gate_up(&gu, 4, 2).unwrap().to_f32(),
            vec![2.0, 3.0, 6.0, 7.0, 10.0, 11.0, 14.0, 15.0]
        );
        let o = seq(&[2, 4]);
        let part = s.columns(&o, 2, 2).unwrap();
        assert_eq!(part.shape, vec![2, 2]);
        assert_eq!(part.to_f32(), vec![2.0, 3.0, 6.0, 7.0]);
    }
}
