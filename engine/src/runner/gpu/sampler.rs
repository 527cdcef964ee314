//! The device sampler: every sampled row of a step, whatever its parameters, is processed
//! and sampled on the GPU (logits_process.cu, sampling_state.cu, sampling.cu), so one
//! request's logprobs or penalties never move its neighbours off the fast path. Launches
//! only, after the per-step uploads: the same sequence runs eagerly and inside the decode
//! graphs. What comes back is the token ids and, for rows that ask, their logprobs.
//!
//! Structured output: the host builds the grammar masks of a step's constrained rows
//! (`slots::Grammars`) and `upload_masks` queues them into one persistent buffer (each
//! sampled row's mask index, then the packed masks), which `token_bitmask` applies to the
//! processed logits before the draw. Each decode size's sampling graph
//! (`graphs::DecodeGraphs`) captures that launch with the rest, and a step launches it after
//! the masks' upload, its body graph before them.
use anyhow::{ensure, Result};
use rvllm_kernels::args;
use rvllm_kernels::sampling_state::{as_bytes, SamplingTables, SlotJoin, SlotParams};
use rvllm_kernels::KernelArgs;

use super::slots::JoinBatch;
use crate::backend::cuda::device::{DevBuf, Gpu, PinnedBuf, PinnedPair};
use crate::backend::cuda::elem::{kernel, GpuDtype, Kernel};
use crate::sampling::params::MAX_LOGPROBS;

const LOGITS_PROCESS: Kernel<args::LogitsProcess> = kernel!(
    args::LogitsProcess,
    "logits_process",
    "logits_process_bf16",
    "logits_process_f16"
);
const TOKEN_LOGPROBS: Kernel<args::TokenLogprobs> = kernel!(
    args::TokenLogprobs,
    "logits_process",
    "token_logprobs_bf16",
    "token_logprobs_f16"
);

/// Bytes of joins (records and lists) one upload carries; a step whose joins need more
/// sends them in several uploads, waiting for the device between them.
const JOIN_BYTES: usize = 4 << 20;

/// A step's logprobs per sampled row, as the device leaves them.
pub struct RowLogprobs {
    pub logprob: f32,
    pub rank: u32,
    pub top: Vec<(u32, f32)>,
}

pub struct DeviceSampler {
    max_rows: usize,
    vocab: usize,
    dtype: GpuDtype,
    /// The per-slot arrays (the parameters first), and the `SamplingTables` struct that
    /// points at them.
    state: Vec<DevBuf>,
    tables: DevBuf,
    /// Per row: slot, sampling step, logprobs wanted (-1: none); staged page-locked.
    rows: DevBuf,
    rows_staging: PinnedPair,
    joins: DevBuf,
    joins_staging: PinnedPair,
    /// Per-row parameters the samplers read (written by logits_process):
    /// temperatures f32 | top_ks i32 | top_ps f32 | min_ps f32 | seeds u64 | offsets u64.
    row_params: DevBuf,
    /// The processed logits the samplers read (f32, [rows, vocab]).
    logits: DevBuf,
    /// Scratch of the two-kernel sampler (`[rows, nchunks, 5]` int32).
    partials: DevBuf,
    /// Sampled token ids, and their logprob as the sampler computes it (unused here).
    pub tokens: DevBuf,
    sampler_logprobs: DevBuf,
    /// logprob f32 [rows] | rank i32 [rows] | top ids i32 [rows, K] | top values f32 [rows, K].
    logprobs: DevBuf,
    /// Grammar masks: each sampled row's mask row i32 [rows] (-1: none) | the packed mask
    /// rows u32 [rows, words]; staged page-locked.
    grammar: DevBuf,
    grammar_staging: PinnedPair,
    /// Some row's mask index on the device is not -1 (the next unmasked step resets them).
    grammar_live: bool,
}

impl DeviceSampler {
    pub fn new(gpu: &Gpu, max_rows: usize, vocab: usize, dtype: GpuDtype) -> Result<Self> {
        let sizes = SamplingTables::array_bytes(max_rows, vocab);
        let state = sizes
            .iter()
            .map(|&b| gpu.alloc(b))
            .collect::<Result<Vec<_>>>()?;
        let t = SamplingTables {
            params: state[0].ptr,
            counts: state[1].ptr,
            prompt_mask: state[2].ptr,
            allowed_mask: state[3].ptr,
            bias: state[4].ptr,
            stops: state[5].ptr,
            bad_tokens: state[6].ptr,
            bad_lens: state[7].ptr,
            history: state[8].ptr,
            history_len: state[9].ptr,
            vocab: i32::try_from(vocab)?,
            words: i32::try_from(vocab.div_ceil(32))?,
        };
        let tables = gpu.alloc(std::mem::size_of::<SamplingTables>())?;
        gpu.upload(tables.ptr, as_bytes(&[t]))?;
        // Params of a slot nobody joined yet are zeros: greedy, no processors.
        gpu.memset_zero(state[0].ptr, sizes[0])?;
        gpu.memset_zero(state[9].ptr, sizes[9])?;
        let grammar = gpu.alloc(Self::grammar_bytes(max_rows, vocab))?;
        // No row masked: the graph captures and their warm-ups read these indexes.
        gpu.upload(grammar.ptr, &vec![-1i32; max_rows])?;
        gpu.sync()?;
        Ok(Self {
            max_rows,
            vocab,
            dtype,
            state,
            tables,
            rows: gpu.alloc(3 * 4 * max_rows)?,
            rows_staging: PinnedPair::new(3 * 4 * max_rows)?,
            joins: gpu.alloc(JOIN_BYTES)?,
            joins_staging: PinnedPair::new(JOIN_BYTES)?,
            row_params: gpu.alloc(32 * max_rows)?,
            logits: gpu.alloc(max_rows * vocab * 4)?,
            partials: gpu.alloc(max_rows * 128 * 5 * 4)?,
            tokens: gpu.alloc(max_rows * 4)?,
            sampler_logprobs: gpu.alloc(max_rows * 4)?,
            logprobs: gpu.alloc(Self::logprob_bytes(max_rows))?,
            grammar,
            grammar_staging: PinnedPair::new(Self::grammar_bytes(max_rows, vocab))?,
            grammar_live: false,
        })
    }

    pub fn max_rows(&self) -> usize {
        self.max_rows
    }

    /// Bytes of the logprobs block for `rows` rows (the download of a step that asks).
    pub fn logprob_bytes(rows: usize) -> usize {
        rows * (8 + 8 * MAX_LOGPROBS)
    }

    /// Bytes of the grammar buffer: a mask index and a mask row for each of `rows` rows.
    fn grammar_bytes(rows: usize, vocab: usize) -> usize {
        4 * rows * (1 + vocab.div_ceil(32))
    }

    /// Queues the grammar masks of a step: `fill` gets the mask index of every row (all -1
    /// on entry; it sets the constrained sampled rows') and room for the mask rows, and
    /// returns how many it wrote. `constrained`: some row of the step has a grammar; when
    /// none has and the device's indexes are all -1 already, nothing is uploaded. Returns
    /// whether any row is masked.
    pub fn upload_masks(
        &mut self,
        gpu: &Gpu,
        constrained: bool,
        fill: impl FnOnce(&mut [i32], &mut [u32]) -> Result<usize>,
    ) -> Result<bool> {
        if !constrained && !self.grammar_live {
            return Ok(false);
        }
        let (n, words) = (self.max_rows, self.vocab.div_ceil(32));
        let buf = self.grammar_staging.take_turn();
        let all = buf.slice_mut::<u32>(n * (1 + words));
        let (index, masks) = all.split_at_mut(n);
        let index: &mut [i32] = bytemuck::cast_slice_mut(index);
        index.fill(-1);
        let written = if constrained { fill(index, masks)? } else { 0 };
        ensure!(
            written <= n,
            "{written} grammar masks for {n} rows; this is a bug"
        );
        buf.upload(gpu, self.grammar.ptr, 4 * (n + written * words))?;
        self.grammar_live = written > 0;
        Ok(written > 0)
    }

    /// Stops applying `slot`'s `min_tokens` from the next launch on (its grammar allows only
    /// end of sequence now). Queued on the stream, so steps queued before keep it.
    pub fn end_min_tokens(&self, gpu: &Gpu, slot: u32) -> Result<()> {
        let at = self.state[0].ptr
            + (slot as usize * std::mem::size_of::<SlotParams>()
                + std::mem::offset_of!(SlotParams, min_tokens)) as u64;
        gpu.memset_zero(at, 4)
    }

    /// Queues the joins' upload and the kernel that writes them into their slots. Joins too
    /// large for one upload go in groups, the device finishing each before the next reuses
    /// the buffers.
    pub fn init_slots(&mut self, gpu: &Gpu, batch: &JoinBatch) -> Result<()> {
        let mut start = 0;
        while start < batch.joins.len() {
            // The largest run of joins from `start` whose lists fit one upload.
            let mut end = start;
            let mut data_end = lists_start(batch, start);
            let first_data = data_end;
            while end < batch.joins.len() {
                let next_end = lists_start(batch, end + 1).max(data_end);
                let bytes = (end + 1 - start) * std::mem::size_of::<SlotJoin>()
                    + 4 * (next_end - first_data);
                if bytes > JOIN_BYTES && end > start {
                    break;
                }
                ensure!(
                    bytes <= JOIN_BYTES,
                    "one request's sampling lists take {bytes} bytes; the GPU sampler uploads at most {JOIN_BYTES}"
                );
                data_end = next_end;
                end += 1;
            }
            if start > 0 {
                gpu.sync()?; // the staging and device buffers are reused
            }
            let mut joins: Vec<SlotJoin> = batch.joins[start..end].to_vec();
            for j in &mut joins {
                for at in [
                    &mut j.prompt_at,
                    &mut j.allowed_at,
                    &mut j.bias_at,
                    &mut j.stops_at,
                    &mut j.bad_at,
                ] {
                    *at -= first_data as i32;
                }
            }
            let records = as_bytes(&joins);
            let data = as_bytes(&batch.data[first_data..data_end]);
            let buf = self.joins_staging.take_turn();
            let staged = buf.slice_mut::<u8>(records.len() + data.len());
            staged[..records.len()].copy_from_slice(records);
            staged[records.len()..].copy_from_slice(data);
            buf.upload(gpu, self.joins.ptr, records.len() + data.len())?;
            let n = (end - start) as u32;
            gpu.launch_args(
                (n, 1, 1),
                (256, 1, 1),
                0,
                args::SlotInit {
                    tables: self.tables.ptr,
                    joins: self.joins.ptr,
                    data: self.joins.ptr + records.len() as u64,
                    n_joins: n as i32,
                },
            )?;
            start = end;
        }
        Ok(())
    }

    /// Queues the upload of the step's rows: each sampled row's slot (-1 for padding), its
    /// sampling step and how many top logprobs it wants (-1: none).
    pub fn upload_rows(
        &mut self,
        gpu: &Gpu,
        slots: &[i32],
        steps: &[i32],
        logprobs: &[i32],
    ) -> Result<()> {
        let n = self.max_rows;
        ensure!(
            slots.len() <= n,
            "{} sampled rows; at most {n}",
            slots.len()
        );
        let buf = self.rows_staging.take_turn();
        let st = buf.slice_mut::<i32>(3 * n);
        st.fill(-1);
        st[..slots.len()].copy_from_slice(slots);
        st[n..n + steps.len()].copy_from_slice(steps);
        st[2 * n..2 * n + logprobs.len()].copy_from_slice(logprobs);
        buf.upload(gpu, self.rows.ptr, 3 * 4 * n)
    }

    /// Everything from the LM head's logits (`raw`, `rows` x vocab in the compute type) to
    /// the sampled tokens and logprobs, grammar masks included: what sampling graphs capture.
    /// Launches only. `filtered`: some row may have a filter (top-k, top-p, min-p); decode
    /// graphs are captured with it.
    pub fn launch(&self, gpu: &Gpu, raw: u64, rows: usize, filtered: bool) -> Result<()> {
        self.launch_with(gpu, raw, rows, filtered, true)
    }

    /// `launch`, with the grammar masks applied only when `masked` (an eager step with no
    /// constrained row skips that kernel).
    pub fn launch_with(
        &self,
        gpu: &Gpu,
        raw: u64,
        rows: usize,
        filtered: bool,
        masked: bool,
    ) -> Result<()> {
        let n = self.max_rows as u64;
        let (slot, step, want) = (self.rows.ptr, self.rows.ptr + 4 * n, self.rows.ptr + 8 * n);
        let p = self.row_params.ptr;
        let (temps, ks, ps, mps, seeds, offs) =
            (p, p + 4 * n, p + 8 * n, p + 12 * n, p + 16 * n, p + 24 * n);
        let (lg, tables, tokens) = (self.logits.ptr, self.tables.ptr, self.tokens.ptr);
        let r = rows as i32;
        let vocab = self.vocab as i32;
        let chunks = (self.vocab.div_ceil(2048) as u32).clamp(1, 64);
        let (module, name) = LOGITS_PROCESS.of(self.dtype);
        let mut process = args::LogitsProcess {
            out: lg,
            raw,
            rows: r,
            row_slot: slot,
            row_step: step,
            tables,
            temperatures: temps,
            top_ks: ks,
            top_ps: ps,
            min_ps: mps,
            seeds,
            offsets: offs,
        };
        gpu.launch_params(
            module,
            name,
            (chunks, rows as u32, 1),
            (256, 1, 1),
            0,
            process.params(),
        )?;
        gpu.launch_args(
            (rows as u32, 1, 1),
            (128, 1, 1),
            0,
            args::LogitsMask {
                logits: lg,
                rows: r,
                row_slot: slot,
                row_step: step,
                tables,
            },
        )?;
        if masked {
            // After the processors, which keep -inf at -inf: the same logits as masking
            // first (the CPU sampler's order), and min_tokens and bad words only add -inf.
            gpu.launch_args(
                (rows as u32, 1, 1),
                (256, 1, 1),
                0,
                args::TokenBitmask {
                    logits: lg,
                    rows: r,
                    vocab,
                    masks: self.grammar.ptr + 4 * n,
                    row_mask: self.grammar.ptr,
                },
            )?;
        }
        let lp = self.sampler_logprobs.ptr;
        // The plain kernels sample every row without a filter (and greedy ones); rows with
        // top-k, top-p or min-p are then sampled by sample_tokens, which leaves the others.
        // Both draw the same function, so a row's token does not depend on which one ran.
        // nchunks = clamp(528 / B, 4, 128): measured fastest on the H100 (sampling.cu).
        let nchunks = (528 / rows).clamp(4, 128) as i32;
        let parts = self.partials.ptr;
        gpu.launch_args(
            (nchunks as u32, rows as u32, 1),
            (256, 1, 1),
            0,
            args::SamplePlainPartial {
                partials: parts,
                logits: lg,
                vocab,
                nchunks,
                temperatures: temps,
                top_ks: ks,
                seeds,
                offsets: offs,
            },
        )?;
        gpu.launch_args(
            (rows as u32, 1, 1),
            (32, 1, 1),
            0,
            args::SamplePlainFinish {
                out_tokens: tokens,
                out_logprobs: lp,
                partials: parts,
                logits: lg,
                vocab,
                nchunks,
                temperatures: temps,
                top_ks: ks,
            },
        )?;
        if filtered {
            gpu.launch_args(
                (rows as u32, 1, 1),
                (1024, 1, 1),
                0,
                args::SampleTokens {
                    out_tokens: tokens,
                    out_logprobs: lp,
                    logits: lg,
                    vocab,
                    temperatures: temps,
                    top_ks: ks,
                    top_ps: ps,
                    min_ps: mps,
                    seeds,
                    offsets: offs,
                    filtered_only: 1,
                },
            )?;
        }
        gpu.launch_args(
            ((rows as u32).div_ceil(128), 1, 1),
            (128, 1, 1),
            0,
            args::SampleCommit {
                tokens,
                rows: r,
                row_slot: slot,
                tables,
            },
        )?;
        let o = self.logprobs.ptr;
        let (module, name) = TOKEN_LOGPROBS.of(self.dtype);
        let mut logprobs = args::TokenLogprobs {
            out_logprob: o,
            out_rank: o + 4 * n,
            out_ids: o + 8 * n,
            out_vals: o + 8 * n + 4 * n * MAX_LOGPROBS as u64,
            k_stride: MAX_LOGPROBS as i32,
            raw,
            vocab,
            chosen: tokens,
            row_k: want,
        };
        gpu.launch_params(
            module,
            name,
            (rows as u32, 1, 1),
            (512, 1, 1),
            0,
            logprobs.params(),
        )
    }

    /// Queues the copy of the step's tokens into `tokens` and, with `logprobs`, of the
    /// logprobs block into `logprobs`.
    pub fn download(
        &self,
        gpu: &Gpu,
        tokens: &mut PinnedBuf,
        logprobs: Option<&mut PinnedBuf>,
        rows: usize,
    ) -> Result<()> {
        tokens.download(gpu, self.tokens.ptr, rows * 4)?;
        if let Some(buf) = logprobs {
            buf.download(gpu, self.logprobs.ptr, Self::logprob_bytes(self.max_rows))?;
        }
        Ok(())
    }

    /// Row `r`'s logprobs with its `k` top entries, from a finished logprobs download.
    pub fn read_logprobs(&self, src: &PinnedBuf, r: usize, k: usize) -> RowLogprobs {
        let n = self.max_rows;
        let block: &[i32] = src.slice(Self::logprob_bytes(n) / 4);
        let k = k.min(MAX_LOGPROBS);
        let ids = &block[2 * n + r * MAX_LOGPROBS..][..k];
        let vals = &block[2 * n + n * MAX_LOGPROBS + r * MAX_LOGPROBS..][..k];
        RowLogprobs {
            logprob: f32::from_bits(block[r] as u32),
            rank: block[n + r] as u32,
            top: ids
                .iter()
                .zip(vals)
                .map(|(&i, &v)| (i as u32, f32::from_bits(v as u32)))
                .collect(),
        }
    }
}

/// Where join `i`'s lists start in the data (the data's end for i == len).
fn lists_start(batch: &JoinBatch, i: usize) -> usize {
    batch.joins.get(i).map_or(batch.data.len(), |j| {
        [j.prompt_at, j.allowed_at, j.bias_at, j.stops_at, j.bad_at]
            .into_iter()
            .min()
            .unwrap_or(0) as usize
    })
}
