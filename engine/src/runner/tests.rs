//! The runner driven by hand-made scheduler outputs, on a tiny random-weight model.
use super::*;
use crate::models::config::Architecture;
use crate::sampling::SamplingParams;
use crate::scheduler::{NewRequestData, RequestId, ScheduledRequest};

const BS: usize = 4;

fn tiny_config() -> ModelConfig {
    ModelConfig {
        architecture: Architecture::Qwen2,
        hidden_size: 48,
        intermediate_size: 80,
        num_hidden_layers: 2,
        num_attention_heads: 6,
        num_key_value_heads: 2,
        head_dim: 8,
        vocab_size: 97,
        rms_norm_eps: 1e-6,
        rope_theta: 10000.0,
        rope_scaling: None,
        max_position_embeddings: 512,
        tie_word_embeddings: true,
        attention_bias: true,
        sliding_window: None,
        bos_token_id: None,
        eos_token_ids: vec![96],
        torch_dtype: None,
        family: Default::default(),
    }
}

fn executor(blocks: usize) -> Box<dyn Executor> {
    let cfg = RunnerConfig {
        block_size: BS,
        num_kv_blocks: Some(blocks),
        ..RunnerConfig::default()
    };
    create_cpu_executor_from_parts(&tiny_config(), None, &cfg).unwrap()
}

/// A request as a minimal scheduler sees it: its tokens, a fixed block table, how far its
/// KV cache is filled.
struct Req {
    id: RequestId,
    prompt_len: usize,
    tokens: Vec<u32>,
    table: Vec<u32>,
    computed: usize,
    params: SamplingParams,
    sent: bool,
}

impl Req {
    fn new(id: RequestId, prompt: Vec<u32>, first_block: u32, params: SamplingParams) -> Self {
        let table = (first_block..first_block + 48).collect();
        Self {
            id,
            prompt_len: prompt.len(),
            tokens: prompt,
            table,
            computed: 0,
            params,
            sent: false,
        }
    }
    fn outputs(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }
}

/// One step: each request gets up to `budget` of its uncomputed tokens.
fn step(ex: &mut dyn Executor, reqs: &mut [&mut Req], budget: usize) -> ModelRunnerOutput {
    let mut so = SchedulerOutput::default();
    for r in reqs.iter_mut() {
        if !r.sent {
            r.sent = true;
            so.new_requests.push(NewRequestData {
                req_id: r.id,
                prompt_token_ids: r.tokens[..r.prompt_len].to_vec(),
                sampling: r.params.clone(),
            });
        }
        let n = (r.tokens.len() - r.computed).min(budget);
        so.scheduled.push(ScheduledRequest {
            req_id: r.id,
            token_ids: r.tokens[r.computed..r.computed + n].to_vec(),
            start_pos: r.computed,
            block_table: r.table.clone(),
            sample: r.computed + n == r.tokens.len(),
            num_output_tokens: r.tokens.len() - r.prompt_len,
        });
    }
    let out = ex.execute(&so).unwrap();
    assert_eq!(
        out.sampled.len(),
        so.scheduled.iter().filter(|s| s.sample).count()
    );
    for (r, s) in reqs.iter_mut().zip(&so.scheduled) {
        r.computed += s.token_ids.len();
    }
    for s in &out.sampled {
        let r = reqs
            .iter_mut()
            .find(|r| r.id == s.req_id)
            .expect("sampled an unscheduled request");
        r.tokens.push(s.token_id);
    }
    out
}

fn generate(ex: &mut dyn Executor, reqs: &mut [&mut Req], budget: usize, new_tokens: usize) {
    while reqs.iter().any(|r| r.outputs().len() < new_tokens) {
        step(ex, reqs, budget);
    }
}

fn prompt(n: usize, salt: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i * 31 + salt * 7 + 3) % 90)
        .collect()
}

#[test]
fn greedy_tokens_do_not_depend_on_chunking_or_batching() {
    let greedy = SamplingParams::greedy(12);
    let mut alone_a = Req::new(1, prompt(21, 1), 0, greedy.clone());
    generate(executor(128).as_mut(), &mut [&mut alone_a], 1000, 12);
    let mut alone_b = Req::new(2, prompt(9, 2), 0, greedy.clone());
    generate(executor(128).as_mut(), &mut [&mut alone_b], 1000, 12);

    let mut ex = executor(128);
    let mut a = Req::new(1, prompt(21, 1), 40, greedy.clone());
    let mut b = Req::new(2, prompt(9, 2), 3, greedy.clone());
    // Chunks of 5: a's prefill spans several steps while b finishes its prompt and decodes.
    generate(ex.as_mut(), &mut [&mut a, &mut b], 5, 12);
    assert_eq!(&a.outputs()[..12], &alone_a.outputs()[..12]);
    assert_eq!(&b.outputs()[..12], &alone_b.outputs()[..12]);
    assert!(
        a.outputs().iter().any(|&t| t != a.outputs()[0]),
        "a random model still varies its tokens"
    );
}

#[test]
fn prompt_logprobs_arrive_with_the_last_prompt_chunk_whatever_the_chunking() {
    let params = SamplingParams {
        prompt_logprobs: Some(3),
        logprobs: Some(2),
        ..SamplingParams::greedy(3)
    };
    // Longer than one LM-head chunk of rows (64), so the logits arrive in several pieces.
    let p = prompt(150, 3);
    let mut whole = Req::new(7, p.clone(), 0, params.clone());
    let out = step(executor(128).as_mut(), &mut [&mut whole], 1000);
    let want = out.sampled[0]
        .prompt_logprobs
        .clone()
        .expect("prompt logprobs were asked for");
    assert_eq!(
        want.len(),
        149,
        "one entry per prompt token after the first"
    );
    for (e, &t) in want.iter().zip(&p[1..]) {
        assert_eq!(e.token_id, t);
        assert!(e.logprob <= 0.0 && e.top.len() == 3);
    }
    let lp = out.sampled[0]
        .logprobs
        .as_ref()
        .expect("sample logprobs were asked for");
    assert_eq!(lp.token_id, out.sampled[0].token_id);

    let mut ex = executor(128);
    let mut chunked = Req::new(7, p, 50, params);
    for _ in 0..2 {
        let out = step(ex.as_mut(), &mut [&mut chunked], 60);
        assert!(
            out.sampled.is_empty(),
            "no sample before the prompt is done"
        );
    }
    let out = step(ex.as_mut(), &mut [&mut chunked], 60);
    let got = out.sampled[0]
        .prompt_logprobs
        .clone()
        .expect("delivered with the final chunk");
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g.token_id, w.token_id);
        assert!((g.logprob - w.logprob).abs() < 1e-4, "{g:?} vs {w:?}");
        assert_eq!(
            g.top.iter().map(|t| t.0).collect::<Vec<_>>(),
            w.top.iter().map(|t| t.0).collect::<Vec<_>>()
        );
    }
    let out = step(ex.as_mut(), &mut [&mut chunked], 60);
    assert!(
        out.sampled[0].prompt_logprobs.is_none(),
        "delivered once only"
    );
}

#[test]
fn finished_requests_are_forgotten_and_bad_outputs_are_errors() {
    let mut ex = executor(64);
    let mut r = Req::new(3, prompt(5, 0), 0, SamplingParams::greedy(2));
    step(ex.as_mut(), &mut [&mut r], 100);
    let so = SchedulerOutput {
        finished: vec![3],
        ..SchedulerOutput::default()
    };
    assert!(ex.execute(&so).unwrap().sampled.is_empty());
    // The runner no longer knows request 3: scheduling it again is an error, not a panic.
    let again = ScheduledRequest {
        req_id: 3,
        token_ids: vec![1],
        start_pos: 5,
        block_table: vec![0, 1],
        sample: true,
        num_output_tokens: 1,
    };
    let so = SchedulerOutput {
        scheduled: vec![again.clone()],
        ..SchedulerOutput::default()
    };
    assert!(ex
        .execute(&so)
        .unwrap_err()
        .to_string()
        .contains("never sent"));

    let short_table = SchedulerOutput {
        new_requests: vec![NewRequestData {
            req_id: 4,
            prompt_token_ids: vec![1; 9],
            sampling: SamplingParams::greedy(1),
        }],
        scheduled: vec![ScheduledRequest {
            req_id: 4,
            token_ids: vec![1; 9],
            start_pos: 0,
            ..again.clone()
        }],
        ..SchedulerOutput::default()
    };
    let err = ex.execute(&short_table).unwrap_err().to_string();
    assert!(err.contains("block table"), "{err}");
    let bad_block = SchedulerOutput {
        scheduled: vec![ScheduledRequest {
            req_id: 4,
            token_ids: vec![1; 2],
            start_pos: 0,
            block_table: vec![64],
            ..again
        }],
        ..SchedulerOutput::default()
    };
    assert!(
        ex.execute(&bad_block).is_err(),
        "a block past the cache is refused"
    );
}

#[test]
fn kv_cache_sizing_follows_memory_or_the_override() {
    let c = tiny_config();
    let per_token = c.kv_bytes_per_token(4);
    let cfg = RunnerConfig {
        block_size: 16,
        kv_cache_bytes: per_token * 16 * 10 + 5,
        ..RunnerConfig::default()
    };
    assert_eq!(kv_blocks_for(&c, &cfg, 4).unwrap(), 10);
    let cfg = RunnerConfig {
        num_kv_blocks: Some(3),
        ..cfg
    };
    assert_eq!(kv_blocks_for(&c, &cfg, 4).unwrap(), 3);
    let cfg = RunnerConfig {
        num_kv_blocks: None,
        kv_cache_bytes: 100,
        ..cfg
    };
    let err = kv_blocks_for(&c, &cfg, 4).unwrap_err().to_string();
    assert!(err.contains("--cpu-kv-cache-gb"), "{err}");
    let ex = executor(16);
    assert_eq!((ex.num_kv_blocks(), ex.block_size()), (16, BS));
    assert!(ex.device_name().starts_with("cpu"));
}
