//! Freeing the KV blocks a sliding window leaves behind (issue 18, vLLM's sliding-window
//! manager), through the real engine on the tiny Mistral whose every layer has a window of 20:
//! outputs stay those of transformers (chunked prefill, async scheduling on and off), a long
//! request holds about window / block_size + 2 blocks, a cache too small for three long
//! requests without freeing runs them side by side with it, and a hybrid model (Gemma 2: every
//! other layer global) frees nothing.
use std::collections::HashMap;

use rvllm::engine::request::admit;
use rvllm::engine::{EngineArgs, Llm};
use rvllm::sampling::SamplingParams;
use rvllm::scheduler::{EngineCoreOutput, RequestId, TokenLogprobs};
use rvllm_tests::{engine_args, tiny_model, TinyReference};

const BLOCK: usize = 4;
const WINDOW: usize = 20;
const NEW_TOKENS: usize = 32;

/// The engine as `rvllm generate` builds it, with the window freeing on (from the model's
/// per-layer windows, by `Scheduler::set_layer_windows`'s rule) or off (as if a layer had no
/// window), whatever the engine's default.
fn engine(args: &EngineArgs, free_window_blocks: bool) -> Llm {
    let mut llm = Llm::new(args).unwrap_or_else(|e| panic!("loading {}: {e:#}", args.model));
    let c = &llm.core.config;
    let windows: Vec<Option<usize>> = (0..c.num_hidden_layers)
        .map(|i| c.layer_window(i).filter(|_| free_window_blocks))
        .collect();
    llm.core.scheduler.set_layer_windows(windows);
    llm
}

fn args(name: &str, num_kv_blocks: usize, async_scheduling: bool) -> EngineArgs {
    let mut a = engine_args(&tiny_model(name));
    a.device = "cpu".into();
    a.block_size = BLOCK;
    a.num_kv_blocks = Some(num_kv_blocks);
    a.max_model_len = Some((num_kv_blocks * BLOCK).min(512));
    // Chunked prefill: a prompt of 282 tokens goes in chunks of at most 32.
    a.max_num_batched_tokens = Some(32);
    a.no_async_scheduling = !async_scheduling;
    a
}

#[derive(Default)]
struct Run {
    tokens: HashMap<RequestId, Vec<u32>>,
    logprobs: HashMap<RequestId, Vec<TokenLogprobs>>,
    prompt_logprobs: HashMap<RequestId, Vec<TokenLogprobs>>,
    /// Most blocks each request held after a step, over the whole run and once only
    /// decodes run.
    most_held: HashMap<RequestId, usize>,
    most_held_decoding: HashMap<RequestId, usize>,
    most_running: usize,
    preemptions: u64,
}

/// Runs `prompts` to the end through the engine core, step by step, watching the blocks
/// each request holds. Returns the outputs by prompt index (request ids in prompt order).
fn run(llm: &mut Llm, prompts: &[Vec<u32>], params: &SamplingParams) -> (Vec<RequestId>, Run) {
    let core = &mut llm.core;
    let eos = core.config.eos_token_ids.clone();
    let mut ids = Vec::new();
    for p in prompts {
        let (_, reqs) = admit(p, params, core.max_model_len, core.config.vocab_size, &eos)
            .unwrap_or_else(|e| panic!("admission: {e}"));
        for r in reqs {
            ids.push(r.req_id);
            core.add_request(r).unwrap();
        }
    }
    let mut out = Run::default();
    let mut steps = 0;
    while core.has_unfinished() {
        steps += 1;
        assert!(steps < 5_000, "the engine does not make progress");
        let outputs: Vec<EngineCoreOutput> = core.step().expect("engine step");
        for o in outputs {
            out.tokens
                .entry(o.req_id)
                .or_default()
                .extend(&o.new_token_ids);
            out.logprobs
                .entry(o.req_id)
                .or_default()
                .extend(o.new_logprobs);
            if let Some(p) = o.prompt_logprobs {
                out.prompt_logprobs.insert(o.req_id, p);
            }
        }
        let s = &core.scheduler;
        out.most_running = out.most_running.max(s.num_running());
        for &id in &ids {
            let held = s.num_held_blocks(id);
            let m = out.most_held.entry(id).or_default();
            *m = (*m).max(held);
            // From the third token on, the last prefill chunk is done even with a step
            // scheduled ahead: only decodes run.
            if out.tokens.get(&id).is_some_and(|t| t.len() >= 3) {
                let m = out.most_held_decoding.entry(id).or_default();
                *m = (*m).max(held);
            }
        }
    }
    out.preemptions = core.scheduler.num_preemptions();
    assert_eq!(
        core.scheduler.num_free_blocks(),
        core.scheduler.num_total_blocks(),
        "blocks leaked"
    );
    (ids, out)
}

fn greedy(logprobs: usize, prompt_logprobs: Option<usize>) -> SamplingParams {
    SamplingParams {
        temperature: 0.0,
        ignore_eos: true,
        max_tokens: Some(NEW_TOKENS),
        logprobs: Some(logprobs),
        prompt_logprobs,
        ..SamplingParams::default()
    }
}

/// Prompts 4 (282 tokens, 14 windows) and 3 (48) of the fixture, with 32 tokens each: the
/// greedy tokens and every top-20 logprob (prompt logprobs too) are transformers', and the
/// run with freeing is bitwise the run without it (both chunked, with and without async
/// scheduling). Meanwhile a request holds at most the window's blocks and two more once it
/// decodes (plus the 8 of each prefill chunk scheduled or running while it prefills).
#[test]
fn freeing_the_window_s_blocks_changes_no_output() {
    let reference = TinyReference::load("mistral_window");
    let which = [4usize, 3];
    let prompts: Vec<Vec<u32>> = which
        .iter()
        .map(|&i| reference.prompts[i].prompt_ids.clone())
        .collect();
    assert!(prompts[0].len() > 3 * WINDOW, "a prompt of several windows");
    let params = greedy(20, Some(5));
    for async_scheduling in [true, false] {
        let what = format!("async scheduling {async_scheduling}");
        let a = args("mistral_window", 256, async_scheduling);
        let mut llm = engine(&a, true);
        assert_eq!(llm.core.scheduler.sliding_window(), Some(WINDOW));
        let (ids, got) = run(&mut llm, &prompts, &params);

        let mut plain = engine(&a, false);
        assert_eq!(plain.core.scheduler.sliding_window(), None, "{what}");
        let (plain_ids, kept) = run(&mut plain, &prompts, &params);

        for (k, (&i, &id)) in which.iter().zip(&ids).enumerate() {
            let what = format!("{what}, prompt {i}");
            let p = &reference.prompts[i];
            assert_eq!(
                got.tokens[&id], p.greedy_ids,
                "{what}: tokens differ from transformers"
            );
            let lps = &got.logprobs[&id];
            assert_eq!(lps.len(), NEW_TOKENS, "{what}");
            for (step, lp) in lps.iter().enumerate() {
                let row = reference.step_row(i, step);
                assert_eq!(lp.top.len(), 20);
                for &(tok, v) in &lp.top {
                    let w = row[tok as usize];
                    assert!(
                        (v - w).abs() <= 1e-3,
                        "{what} step {step} token {tok}: logprob {v}, transformers {w}"
                    );
                }
            }
            let plp = &got.prompt_logprobs[&id];
            assert_eq!(plp.len(), p.prompt_logprobs.len(), "{what}");
            for (j, (e, &w)) in plp.iter().zip(&p.prompt_logprobs).enumerate() {
                assert!(
                    (e.logprob - w).abs() <= 1e-3,
                    "{what} prompt position {j}: {} vs transformers {w}",
                    e.logprob
                );
            }

            // Freeing changes nothing at all: the same keys are read, in the same order.
            let pid = plain_ids[k];
            assert_eq!(got.tokens[&id], kept.tokens[&pid], "{what}");
            let bits = |v: &[TokenLogprobs]| -> Vec<(u32, Vec<(u32, u32)>)> {
                v.iter()
                    .map(|l| {
                        (
                            l.token_id,
                            l.top.iter().map(|t| (t.0, t.1.to_bits())).collect(),
                        )
                    })
                    .collect()
            };
            assert_eq!(
                bits(lps),
                bits(&kept.logprobs[&pid]),
                "{what}: logprobs moved"
            );
            assert_eq!(
                bits(plp),
                bits(&kept.prompt_logprobs[&pid]),
                "{what}: prompt logprobs moved"
            );

            // Without freeing a request holds every block of its sequence: seen after its
            // last step but one (the last frees them all before it returns, without async
            // scheduling), the prompt and all but two of its tokens.
            let len = p.prompt_ids.len() + NEW_TOKENS - 2;
            assert!(kept.most_held[&pid] >= len.div_ceil(BLOCK), "{what}");
            let decoding = got.most_held_decoding[&id];
            assert!(
                decoding <= WINDOW / BLOCK + 2,
                "{what}: {decoding} blocks held while decoding with a window of {WINDOW}"
            );
            // Prefilling, the chunk being scheduled and (async) the one still running.
            let chunks = if async_scheduling { 2 } else { 1 };
            assert!(
                got.most_held[&id] <= WINDOW / BLOCK + 2 + chunks * 32 / BLOCK,
                "{what}: {} blocks held while prefilling in chunks of 32",
                got.most_held[&id]
            );
        }
        assert_eq!(got.preemptions, 0, "{what}");
    }
}

/// The same long prompt again after another one took its first blocks: its cached prefix is
/// taken as far as the window of its first uncomputed token reaches back (the blocks before
/// that start as placeholders, as in vLLM; a whole-chain lookup would find nothing), and the
/// outputs are still transformers'.
#[test]
fn a_cached_long_prompt_is_reused_through_its_window() {
    let reference = TinyReference::load("mistral_window");
    let p = &reference.prompts[4];
    // 80 blocks: the prompt and its tokens need 79, so the filler (with freeing, a few
    // blocks at a time) takes the ones the window let go first: the prompt's first ones.
    let mut llm = engine(&args("mistral_window", 80, true), true);
    let filler = p.prompt_ids[1..201].to_vec();
    for (pass, prompt) in [&p.prompt_ids, &filler, &p.prompt_ids]
        .into_iter()
        .enumerate()
    {
        let (ids, got) = run(&mut llm, std::slice::from_ref(prompt), &greedy(5, None));
        if pass == 1 {
            continue;
        }
        assert_eq!(got.tokens[&ids[0]], p.greedy_ids, "pass {pass}");
        for (step, lp) in got.logprobs[&ids[0]].iter().enumerate() {
            let row = reference.step_row(4, step);
            for &(tok, v) in &lp.top {
                let w = row[tok as usize];
                assert!(
                    (v - w).abs() <= 1e-3,
                    "pass {pass} step {step} token {tok}: logprob {v}, transformers {w}"
                );
            }
        }
    }
    let whole = (p.prompt_ids.len() - 1) / BLOCK * BLOCK;
    assert_eq!(
        llm.core.scheduler.prefix_cache_hits(),
        whole as u64,
        "the last pass reads every full block of the prompt from the cache"
    );
}

/// Three requests of 200 prompt tokens and 32 generated (58 blocks of 4 each) in a cache of 64
/// blocks: without freeing they cannot run side by side (preemptions, or one at a time);
/// with it all three run at once and never preempt.
#[test]
fn a_cache_too_small_without_freeing_runs_every_request_at_once_with_it() {
    let reference = TinyReference::load("mistral_window");
    let long = &reference.prompts[4].prompt_ids;
    let prompts: Vec<Vec<u32>> = [0, 41, 82]
        .iter()
        .map(|&o| long[o..o + 200].to_vec())
        .collect();
    let params = greedy(1, None);
    let a = args("mistral_window", 64, true);

    let mut plain = engine(&a, false);
    let (_, kept) = run(&mut plain, &prompts, &params);
    assert!(
        kept.preemptions > 0 || kept.most_running < 3,
        "without freeing the cache was meant to be too small: {} preemptions, {} running at once",
        kept.preemptions,
        kept.most_running
    );

    let mut llm = engine(&a, true);
    let (ids, got) = run(&mut llm, &prompts, &params);
    assert_eq!(got.preemptions, 0);
    assert_eq!(got.most_running, 3, "all three at once");
    for id in ids {
        assert_eq!(got.tokens[&id].len(), NEW_TOKENS);
    }
}

/// Gemma 2's global layers read every key, so the model keeps every block: the scheduler
/// turns freeing off and a request of three windows ends holding all of its blocks.
#[test]
fn a_hybrid_model_frees_nothing() {
    let reference = TinyReference::load("gemma2");
    let prompt = reference.prompts[3].prompt_ids.clone(); // 48 tokens, window 16
    let mut llm = engine(&args("gemma2", 64, true), true);
    let c = &llm.core.config;
    assert!(
        (0..c.num_hidden_layers).any(|i| c.layer_window(i).is_some()),
        "the fixture has windowed layers"
    );
    assert_eq!(llm.core.scheduler.sliding_window(), None);
    let (ids, got) = run(&mut llm, std::slice::from_ref(&prompt), &greedy(1, None));
    let len = prompt.len() + NEW_TOKENS - 2;
    assert!(got.most_held[&ids[0]] >= len.div_ceil(BLOCK));
    assert_eq!(got.tokens[&ids[0]], reference.prompts[3].greedy_ids);
}

/// A model whose every layer has a window takes contexts longer than its KV cache, as in
/// vLLM: `--max-model-len 512` over a cache of 28 blocks of 4 (112 tokens) is accepted, and
/// the 282-token prompt with 32 tokens (79 blocks without freeing) runs to transformers'
/// tokens, chunked, with a step scheduled ahead. A hybrid model (Gemma 2) over the same cache
/// is refused at start-up with the reason.
#[test]
fn a_windowed_model_takes_contexts_longer_than_its_cache() {
    let reference = TinyReference::load("mistral_window");
    let mut a = args("mistral_window", 28, true);
    a.max_model_len = Some(512);
    let mut llm = Llm::new(&a).unwrap_or_else(|e| panic!("a windowed model: {e:#}"));
    assert_eq!(llm.core.scheduler.sliding_window(), Some(WINDOW));
    assert_eq!(llm.core.max_model_len, 512);
    let p = &reference.prompts[4];
    assert!(
        p.prompt_ids.len() + NEW_TOKENS > 28 * BLOCK,
        "longer than the cache"
    );
    let (ids, got) = run(
        &mut llm,
        std::slice::from_ref(&p.prompt_ids),
        &greedy(1, None),
    );
    assert_eq!(
        got.tokens[&ids[0]], p.greedy_ids,
        "tokens differ from transformers"
    );
    assert!(got.most_held[&ids[0]] <= 28);

    let mut hybrid = args("gemma2", 28, true);
    hybrid.max_model_len = Some(256); // the fixture's max_position_embeddings
    let err = match Llm::new(&hybrid) {
        Ok(_) => panic!("Gemma 2 needs every block of a 256-token context"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("--max-model-len 256") && err.contains("only 112 fit"),
        "{err}"
    );
}
