//! From a `SchedulerOutput` to the `ForwardBatch` a model runs, and what each logits row
//! is for.
use anyhow::{bail, ensure, Result};

use crate::backend::{ForwardBatch, SeqSlice};
use crate::scheduler::SchedulerOutput;

/// What one logits row of the step is used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowUse {
    /// Logprob of prompt token `target` (the token after this row's position) for the
    /// request at `sched_index` of `SchedulerOutput::scheduled`.
    PromptLogprob { sched_index: usize, target: u32 },
    /// Sample the next token of the request at `sched_index`.
    Sample { sched_index: usize },
}

/// Builds the step's batch. `prompt_logprobs_for(i)` gives, for scheduled request `i`, its
/// prompt when its prompt logprobs are still to be computed (None otherwise).
pub fn build_forward_batch<'a>(
    so: &SchedulerOutput,
    block_size: usize,
    prompt_logprobs_for: impl Fn(usize) -> Option<&'a [u32]>,
) -> Result<(ForwardBatch, Vec<RowUse>)> {
    ensure!(block_size > 0, "block size is zero");
    let mut b = ForwardBatch::default();
    let mut uses = Vec::new();
    for (si, sr) in so.scheduled.iter().enumerate() {
        let n = sr.token_ids.len();
        ensure!(n > 0, "request {} was scheduled with no tokens", sr.req_id);
        let end = sr.start_pos + n;
        if sr.block_table.len() * block_size < end {
            bail!(
                "request {} needs {end} KV slots but its block table has {} blocks of {block_size}",
                sr.req_id,
                sr.block_table.len()
            );
        }
        let offset = b.token_ids.len();
        b.seqs.push(SeqSlice {
            token_offset: offset,
            num_tokens: n,
            context_len: end,
            block_table: sr.block_table.clone(),
        });
        for (i, &tok) in sr.token_ids.iter().enumerate() {
            let pos = sr.start_pos + i;
            b.token_ids.push(tok);
            b.positions.push(pos as u32);
            let block = sr.block_table[pos / block_size];
            b.slot_mapping
                .push(block * block_size as u32 + (pos % block_size) as u32);
        }
        if let Some(prompt) = prompt_logprobs_for(si) {
            // Row at position p predicts prompt token p + 1.
            for pos in sr.start_pos..end.min(prompt.len().saturating_sub(1)) {
                b.logits_rows.push((offset + pos - sr.start_pos) as u32);
                uses.push(RowUse::PromptLogprob {
                    sched_index: si,
                    target: prompt[pos + 1],
                });
            }
        }
        if sr.sample {
            b.logits_rows.push((offset + n - 1) as u32);
            uses.push(RowUse::Sample { sched_index: si });
        }
    }
    Ok((b, uses))
}
