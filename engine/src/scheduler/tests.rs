//! Scheduler tests with hand-made requests and a fake runner that checks, every step, what
//! a real one relies on: chunks continue exactly where the KV cache ends, tokens are the
//! request's prompt + outputs, every earlier position's KV is in the request's blocks (and
//! was computed for the same prefix), no block is written while another request uses it,
//! and budgets hold.
use std::collections::{HashMap, HashSet};

use super::*;
use crate::sampling::SamplingParams;

fn config(
    max_num_seqs: usize,
    max_num_batched_tokens: usize,
    block_size: usize,
    num_kv_blocks: usize,
) -> SchedulerConfig {
    SchedulerConfig {
        max_num_seqs,
        max_num_batched_tokens,
        max_model_len: 1024,
        block_size,
        num_kv_blocks,
    }
}

fn request(id: RequestId, prompt_len: usize, max_tokens: usize) -> EngineRequest {
    EngineRequest {
        req_id: id,
        prompt_token_ids: (0..prompt_len as u32).map(|t| 1000 + t).collect(),
        sampling: SamplingParams::greedy(max_tokens),
        eos_token_ids: vec![2],
    }
}

/// The token the fake model produces: a function of the request and sampling step only,
/// like seeded sampling, so recomputation must reproduce it.
fn default_token(id: RequestId, step: usize) -> u32 {
    100 + (id as u32) * 10 + step as u32
}

#[derive(Default)]
struct Harness {
    /// What the fake runner's KV cache holds: per block, per slot, the whole token prefix
    /// whose last token was written there (real KV depends on the whole prefix).
    blocks: HashMap<u32, Vec<Option<Vec<u32>>>>,
    /// Tokens computed per request since it last (re)started.
    progress: HashMap<RequestId, usize>,
    runner_knows: HashSet<RequestId>,
    prompts: HashMap<RequestId, Vec<u32>>,
    outputs: HashMap<RequestId, Vec<u32>>,
    finished: HashMap<RequestId, (FinishReason, Option<u32>)>,
    steps: usize,
}

impl Harness {
    fn add(&mut self, s: &mut Scheduler, req: EngineRequest) {
        self.prompts
            .insert(req.req_id, req.prompt_token_ids.clone());
        self.outputs.insert(req.req_id, Vec::new());
        s.add_request(req).expect("request accepted");
    }

    fn step(
        &mut self,
        s: &mut Scheduler,
        token: &dyn Fn(RequestId, usize) -> u32,
    ) -> (SchedulerOutput, Vec<EngineCoreOutput>) {
        self.steps += 1;
        let so = s.schedule();
        let cfg = s.config().clone();
        let bs = cfg.block_size;
        let caching = s.kv.prefix_caching();
        let window = s.kv.sliding_window();
        assert!(
            so.total_tokens() <= cfg.max_num_batched_tokens,
            "token budget exceeded: {}",
            so.total_tokens()
        );
        assert!(so.scheduled.len() <= cfg.max_num_seqs);
        assert!(s.num_running() <= cfg.max_num_seqs);
        for id in so.finished.iter().chain(&so.preempted) {
            self.progress.remove(id);
        }
        for id in &so.finished {
            self.runner_knows.remove(id);
        }
        for nr in &so.new_requests {
            assert!(
                self.runner_knows.insert(nr.req_id),
                "NewRequestData sent twice for {}",
                nr.req_id
            );
            assert_eq!(&nr.prompt_token_ids, &self.prompts[&nr.req_id]);
        }
        let mut written = HashMap::new();
        let mut sampled = Vec::new();
        for sr in &so.scheduled {
            let id = sr.req_id;
            assert!(
                self.runner_knows.contains(&id),
                "runner never heard of {id}"
            );
            assert!(!sr.token_ids.is_empty());
            match self.progress.get(&id) {
                Some(&p) => assert_eq!(sr.start_pos, p, "chunk of {id} does not continue its KV"),
                None if !caching => assert_eq!(sr.start_pos, 0, "{id} (re)starts from scratch"),
                None => assert_eq!(sr.start_pos % bs, 0, "cached prefixes are whole blocks"),
            }
            let end = sr.start_pos + sr.token_ids.len();
            self.progress.insert(id, end);
            let known: Vec<u32> = self.prompts[&id]
                .iter()
                .chain(&self.outputs[&id])
                .copied()
                .collect();
            assert_eq!(
                sr.token_ids.as_slice(),
                &known[sr.start_pos..end],
                "wrong tokens for {id}"
            );
            assert_eq!(sr.sample, end == known.len());
            assert!(sr.block_table.len() * bs >= end, "block table too short");
            for &b in &sr.block_table {
                assert!((b as usize) < cfg.num_kv_blocks);
            }
            // Everything before the chunk that its queries can see must already be in the
            // cache, for this prefix; blocks wholly before that may be placeholders.
            let first_seen = window.map_or(0, |w| (sr.start_pos + 1).saturating_sub(w));
            for p in first_seen..sr.start_pos {
                let slot = &self
                    .blocks
                    .get(&sr.block_table[p / bs])
                    .map(|b| b[p % bs].clone());
                assert_eq!(
                    slot.as_ref().and_then(|s| s.as_deref()),
                    Some(&known[..=p]),
                    "{id}: KV at position {p} is missing or belongs to another prefix"
                );
            }
            for p in sr.start_pos..end {
                let b = sr.block_table[p / bs];
                if let Some(other) = written.insert(b, id) {
                    assert_eq!(other, id, "block {b} written by two requests in one step");
                }
                self.blocks.entry(b).or_insert_with(|| vec![None; bs])[p % bs] =
                    Some(known[..=p].to_vec());
            }
            assert_eq!(sr.num_output_tokens, self.outputs[&id].len());
            if sr.sample {
                sampled.push(SampledToken {
                    req_id: id,
                    token_id: token(id, sr.num_output_tokens),
                    logprobs: None,
                    prompt_logprobs: None,
                });
            }
        }
        // No block is both written this step and part of another request's table, and
        // without prefix caching no block is in two tables at all.
        let mut owner = HashMap::new();
        for sr in &so.scheduled {
            let skipped = window.map_or(0, |w| (sr.start_pos + 1).saturating_sub(w) / bs);
            for &b in &sr.block_table[skipped..] {
                if let Some(&w) = written.get(&b) {
                    assert_eq!(
                        w, sr.req_id,
                        "block {b} is written while {} reads it",
                        sr.req_id
                    );
                }
                if let Some(other) = owner.insert(b, sr.req_id) {
                    assert!(caching, "block {b} shared by {other} and {}", sr.req_id);
                }
            }
        }
        let outs = s.update_from_output(&so, &ModelRunnerOutput { sampled });
        for o in &outs {
            assert!(
                !self.finished.contains_key(&o.req_id),
                "output after finish for {}",
                o.req_id
            );
            self.outputs
                .get_mut(&o.req_id)
                .expect("output for a known request")
                .extend(&o.new_token_ids);
            if let Some(r) = o.finish_reason {
                self.finished.insert(o.req_id, (r, o.stop_token));
            }
        }
        (so, outs)
    }

    fn run_to_end(&mut self, s: &mut Scheduler, token: &dyn Fn(RequestId, usize) -> u32) {
        while s.has_unfinished() {
            assert!(self.steps < 10_000, "scheduler does not make progress");
            self.step(s, token);
        }
        // One more step delivers the last `finished` ids to the runner.
        let so = s.schedule();
        assert!(so.scheduled.is_empty());
        for id in so.finished {
            self.runner_knows.remove(&id);
        }
    }
}

#[test]
fn every_request_completes_and_no_block_leaks() {
    let mut s = Scheduler::new(config(4, 32, 4, 64));
    let mut h = Harness::default();
    for id in 0..10 {
        h.add(
            &mut s,
            request(id, 3 + (id as usize * 7) % 40, 5 + id as usize),
        );
    }
    h.run_to_end(&mut s, &default_token);
    for id in 0..10u64 {
        assert_eq!(h.finished[&id], (FinishReason::Length, None));
        let expected: Vec<u32> = (0..5 + id as usize)
            .map(|step| default_token(id, step))
            .collect();
        assert_eq!(h.outputs[&id], expected);
    }
    assert_eq!(s.num_free_blocks(), 64);
    assert_eq!(s.kv_usage(), 0.0);
    assert!(
        h.runner_knows.is_empty(),
        "the runner was told about every finished request"
    );
    assert_eq!((s.num_running(), s.num_waiting()), (0, 0));
}

#[test]
fn token_budget_chunks_a_long_prompt_next_to_decodes() {
    let mut s = Scheduler::new(config(8, 8, 4, 64));
    let mut h = Harness::default();
    h.add(&mut s, request(1, 4, 50));
    let (so, _) = h.step(&mut s, &default_token);
    assert_eq!(so.scheduled.len(), 1);
    assert!(so.scheduled[0].sample);

    h.add(&mut s, request(2, 20, 50));
    let mut chunks = Vec::new();
    loop {
        let (so, _) = h.step(&mut s, &default_token);
        assert_eq!(
            so.scheduled[0].req_id, 1,
            "the running decode is served first"
        );
        assert_eq!(so.scheduled[0].token_ids.len(), 1);
        let b = &so.scheduled[1];
        assert_eq!(b.req_id, 2);
        chunks.push((b.start_pos, b.token_ids.len(), b.sample));
        if b.sample {
            break;
        }
    }
    assert_eq!(chunks, vec![(0, 7, false), (7, 7, false), (14, 6, true)]);
    // Now both decode: 1 token each.
    let (so, _) = h.step(&mut s, &default_token);
    assert_eq!(
        so.scheduled
            .iter()
            .map(|r| r.token_ids.len())
            .collect::<Vec<_>>(),
        vec![1, 1]
    );
}

#[test]
fn waiting_prefill_is_admitted_within_the_remaining_budget() {
    let mut s = Scheduler::new(config(8, 10, 4, 64));
    let mut h = Harness::default();
    h.add(&mut s, request(1, 6, 3));
    h.add(&mut s, request(2, 6, 3));
    let (so, _) = h.step(&mut s, &default_token);
    let sizes: Vec<_> = so
        .scheduled
        .iter()
        .map(|r| (r.req_id, r.token_ids.len(), r.sample))
        .collect();
    assert_eq!(sizes, vec![(1, 6, true), (2, 4, false)]);
    assert_eq!(so.new_requests.len(), 2);
    let (so, _) = h.step(&mut s, &default_token);
    let sizes: Vec<_> = so
        .scheduled
        .iter()
        .map(|r| (r.req_id, r.token_ids.len(), r.sample))
        .collect();
    assert_eq!(sizes, vec![(1, 1, true), (2, 2, true)]);
    assert!(so.new_requests.is_empty());
}

#[test]
fn max_num_seqs_caps_running_requests() {
    let mut s = Scheduler::new(config(2, 100, 4, 64));
    let mut h = Harness::default();
    for id in 0..3 {
        h.add(&mut s, request(id, 5, 4));
    }
    let (so, _) = h.step(&mut s, &default_token);
    assert_eq!(so.scheduled.len(), 2);
    assert_eq!((s.num_running(), s.num_waiting()), (2, 1));
    h.run_to_end(&mut s, &default_token);
    assert_eq!(h.finished.len(), 3);
    assert_eq!(s.num_free_blocks(), 64);
}

#[test]
fn out_of_blocks_preempts_the_newest_which_later_completes() {
    // 4 blocks of 4 tokens. Two 6-token prompts take 2 blocks each; the first to reach a
    // 9th token needs a 3rd block, so the newest (request 2) is preempted.
    let mut s = Scheduler::new(config(4, 64, 4, 4));
    let mut h = Harness::default();
    h.add(&mut s, request(1, 6, 6));
    h.add(&mut s, request(2, 6, 6));
    let mut preempted_at = None;
    while s.has_unfinished() {
        let (so, _) = h.step(&mut s, &default_token);
        if !so.preempted.is_empty() {
            assert_eq!(
                so.preempted,
                vec![2],
                "the newest running request is preempted"
            );
            assert!(so.scheduled.iter().all(|r| r.req_id == 1));
            assert_eq!(s.num_waiting(), 1);
            preempted_at.get_or_insert(h.outputs[&2].len());
        }
        // When it comes back it recomputes prompt + kept outputs from position 0, and the
        // runner is not sent its NewRequestData again (the harness checks both).
        assert!(h.steps < 100);
    }
    let kept = preempted_at.expect("a preemption happened");
    assert!(kept > 0, "request 2 had outputs when it was preempted");
    assert!(s.num_preemptions() >= 1);
    for id in [1, 2] {
        assert_eq!(h.finished[&id].0, FinishReason::Length);
        let expected: Vec<u32> = (0..6).map(|step| default_token(id, step)).collect();
        assert_eq!(
            h.outputs[&id], expected,
            "request {id} lost or changed tokens"
        );
    }
    assert_eq!(s.num_free_blocks(), 4);
}

#[test]
fn preempted_request_resumes_at_the_front_of_the_queue() {
    let mut s = Scheduler::new(config(2, 64, 4, 4));
    let mut h = Harness::default();
    // 6 + 10 tokens: each fits the 16-token cache alone, not both together.
    h.add(&mut s, request(1, 6, 10));
    h.add(&mut s, request(2, 6, 10));
    h.add(&mut s, request(3, 2, 2));
    // Run until request 2 gets preempted; request 3 waits behind it.
    while !h.step(&mut s, &default_token).0.preempted.contains(&2) {
        assert!(h.steps < 50);
    }
    assert_eq!(s.waiting.front(), Some(&2));
    h.run_to_end(&mut s, &default_token);
    assert_eq!(h.outputs[&1].len(), 10);
    assert_eq!(h.outputs[&2].len(), 10);
    assert_eq!(h.outputs[&3].len(), 2);
    assert_eq!(s.num_free_blocks(), 4);
}

#[test]
fn a_sequence_that_outgrows_the_whole_cache_ends_with_length() {
    // 2 blocks of 4 = 8 tokens; a 5-token prompt asking for 10 more cannot finish.
    let mut s = Scheduler::new(config(4, 64, 4, 2));
    let mut h = Harness::default();
    h.add(&mut s, request(1, 5, 10));
    h.run_to_end(&mut s, &default_token);
    assert_eq!(h.finished[&1], (FinishReason::Length, None));
    // Tokens at positions 0..8 were computed; the 8th token's output is the last one.
    assert_eq!(h.outputs[&1].len(), 4);
    assert_eq!(s.num_free_blocks(), 2);
}

#[test]
fn abort_frees_blocks_and_is_reported_once() {
    let mut s = Scheduler::new(config(4, 64, 4, 16));
    let mut h = Harness::default();
    h.add(&mut s, request(1, 10, 20));
    h.add(&mut s, request(2, 10, 20));
    h.step(&mut s, &default_token);
    assert_eq!(s.num_free_blocks(), 16 - 6);
    s.abort(1);
    assert_eq!(s.num_free_blocks(), 16 - 3);
    assert_eq!(s.num_running(), 1);
    let (so, outs) = h.step(&mut s, &default_token);
    assert_eq!(so.finished, vec![1]);
    assert!(so.scheduled.iter().all(|r| r.req_id == 2));
    assert!(outs.iter().all(|o| o.req_id == 2));
    s.abort(1); // twice: ignored
    s.abort(2);
    assert!(!s.has_unfinished());
    assert_eq!(s.num_free_blocks(), 16);
    assert_eq!(s.schedule().finished, vec![2]);

    // Aborting a waiting request.
    s.add_request(request(3, 4, 4)).unwrap();
    s.abort(3);
    assert_eq!(s.num_waiting(), 0);
    assert!(s.schedule().scheduled.is_empty());
}

#[test]
fn too_long_prompts_are_rejected_with_the_limit_and_the_setting() {
    let mut s = Scheduler::new(SchedulerConfig {
        max_num_seqs: 4,
        max_num_batched_tokens: 64,
        max_model_len: 100,
        block_size: 16,
        num_kv_blocks: 4,
    });
    let err = s.add_request(request(1, 101, 1)).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("101") && msg.contains("100") && msg.contains("--max-model-len"),
        "{msg}"
    );

    let err = s.add_request(request(2, 65, 1)).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("65") && msg.contains("4 blocks") && msg.contains("KV cache"),
        "{msg}"
    );

    let msg = s.add_request(request(3, 0, 1)).unwrap_err().to_string();
    assert!(msg.contains("empty prompt"), "{msg}");

    s.add_request(request(4, 64, 1))
        .expect("a prompt that exactly fits the cache is accepted");
    let msg = s.add_request(request(4, 5, 1)).unwrap_err().to_string();
    assert!(msg.contains("already"), "{msg}");
    assert_eq!(s.num_waiting(), 1);
}

/// A fake model emitting a fixed script of tokens, then 7s.
fn scripted(script: &'static [u32]) -> impl Fn(RequestId, usize) -> u32 {
    move |_, step| script.get(step).copied().unwrap_or(7)
}

fn run_one(
    params: SamplingParams,
    eos: Vec<u32>,
    script: &'static [u32],
) -> (Vec<u32>, (FinishReason, Option<u32>)) {
    let mut s = Scheduler::new(config(4, 64, 4, 64));
    let mut h = Harness::default();
    let mut req = request(1, 3, 0);
    req.sampling = params;
    req.eos_token_ids = eos;
    h.add(&mut s, req);
    h.run_to_end(&mut s, &scripted(script));
    assert_eq!(s.num_free_blocks(), 64);
    (h.outputs[&1].clone(), h.finished[&1])
}

#[test]
fn eos_stops_and_is_included_in_the_output() {
    let (out, fin) = run_one(SamplingParams::greedy(10), vec![2], &[5, 6, 2, 9]);
    assert_eq!(out, vec![5, 6, 2]);
    assert_eq!(fin, (FinishReason::Stop, Some(2)));
    // Any of several EOS ids.
    let (out, fin) = run_one(SamplingParams::greedy(10), vec![2, 3], &[5, 3, 2]);
    assert_eq!((out, fin), (vec![5, 3], (FinishReason::Stop, Some(3))));
}

#[test]
fn ignore_eos_keeps_going_until_max_tokens() {
    let params = SamplingParams {
        ignore_eos: true,
        ..SamplingParams::greedy(4)
    };
    let (out, fin) = run_one(params, vec![2], &[5, 2, 2, 6, 6]);
    assert_eq!(out, vec![5, 2, 2, 6]);
    assert_eq!(fin, (FinishReason::Length, None));
}

#[test]
fn min_tokens_defers_eos_and_stop_token_ids() {
    let params = SamplingParams {
        min_tokens: 2,
        stop_token_ids: vec![9],
        ..SamplingParams::greedy(10)
    };
    // EOS at step 0 and a stop id at step 1 do not count; EOS at step 2 does.
    let (out, fin) = run_one(params, vec![2], &[2, 9, 2]);
    assert_eq!((out, fin), (vec![2, 9, 2], (FinishReason::Stop, Some(2))));
}

#[test]
fn stop_token_ids_stop_and_report_the_token() {
    let params = SamplingParams {
        stop_token_ids: vec![9, 11],
        ..SamplingParams::greedy(10)
    };
    let (out, fin) = run_one(params.clone(), vec![2], &[5, 11, 2]);
    assert_eq!((out, fin), (vec![5, 11], (FinishReason::Stop, Some(11))));
    // ignore_eos does not turn off stop_token_ids.
    let params = SamplingParams {
        ignore_eos: true,
        ..params
    };
    let (out, fin) = run_one(params, vec![2], &[2, 9]);
    assert_eq!((out, fin), (vec![2, 9], (FinishReason::Stop, Some(9))));
}

#[test]
fn max_tokens_and_max_model_len_end_with_length() {
    let (out, fin) = run_one(SamplingParams::greedy(3), vec![2], &[]);
    assert_eq!((out.len(), fin), (3, (FinishReason::Length, None)));
    // EOS on the last allowed token is a stop, not a length.
    let (_, fin) = run_one(SamplingParams::greedy(3), vec![2], &[5, 5, 2]);
    assert_eq!(fin, (FinishReason::Stop, Some(2)));

    let mut s = Scheduler::new(SchedulerConfig {
        max_model_len: 8,
        ..config(4, 64, 4, 64)
    });
    let mut h = Harness::default();
    let mut req = request(1, 5, 0);
    req.sampling.max_tokens = None;
    h.add(&mut s, req);
    h.run_to_end(&mut s, &default_token);
    assert_eq!(
        h.outputs[&1].len(),
        3,
        "5 prompt + 3 generated = max_model_len 8"
    );
    assert_eq!(h.finished[&1], (FinishReason::Length, None));
}

#[test]
fn logprobs_pass_through_and_prompt_logprobs_come_once() {
    let mut s = Scheduler::new(config(4, 64, 4, 64));
    let mut req = request(1, 3, 3);
    req.sampling.logprobs = Some(1);
    req.sampling.prompt_logprobs = Some(1);
    s.add_request(req).unwrap();
    let lp = |t: u32| TokenLogprobs {
        token_id: t,
        logprob: -0.5,
        rank: 1,
        top: vec![(t, -0.5)],
    };
    let mut prompt_lp_seen = 0;
    while s.has_unfinished() {
        let so = s.schedule();
        let sampled = so
            .scheduled
            .iter()
            .filter(|r| r.sample)
            .map(|r| SampledToken {
                req_id: r.req_id,
                token_id: 50,
                logprobs: Some(lp(50)),
                // A runner that recomputes the prompt may send them again; only one goes out.
                prompt_logprobs: Some(vec![lp(1001), lp(1002)]),
            })
            .collect();
        for o in s.update_from_output(&so, &ModelRunnerOutput { sampled }) {
            assert_eq!(o.new_logprobs, vec![lp(50)]);
            if let Some(p) = o.prompt_logprobs {
                assert_eq!(p.len(), 2);
                prompt_lp_seen += 1;
            }
        }
    }
    assert_eq!(prompt_lp_seen, 1);
}

#[test]
fn a_missing_sample_is_recomputed_not_lost() {
    let mut s = Scheduler::new(config(4, 64, 4, 64));
    s.add_request(request(1, 5, 2)).unwrap();
    let so = s.schedule();
    let outs = s.update_from_output(&so, &ModelRunnerOutput::default());
    assert!(outs.is_empty());
    let so = s.schedule();
    assert_eq!(so.scheduled.len(), 1);
    assert_eq!(
        (so.scheduled[0].start_pos, so.scheduled[0].token_ids.len()),
        (4, 1)
    );
    assert!(so.scheduled[0].sample);
}

#[test]
fn heavy_mixed_load_with_tiny_cache_never_loses_a_request() {
    // Many requests of mixed sizes through a cache that forces repeated preemption.
    let mut s = Scheduler::new(config(6, 24, 4, 12));
    let mut h = Harness::default();
    for id in 0..30u64 {
        let prompt = 1 + (id as usize * 13) % 30;
        let max_tokens = 1 + (id as usize * 7) % 15;
        h.add(&mut s, request(id, prompt, max_tokens));
    }
    h.run_to_end(&mut s, &default_token);
    assert_eq!(h.finished.len(), 30);
    for id in 0..30u64 {
        let max_tokens = 1 + (id as usize * 7) % 15;
        let prompt = 1 + (id as usize * 13) % 30;
        let out = &h.outputs[&id];
        // Either all max_tokens, or cut at the cache's 48-token capacity.
        if prompt + max_tokens <= 48 {
            assert_eq!(out.len(), max_tokens, "request {id}");
        } else {
            assert_eq!(h.finished[&id].0, FinishReason::Length);
        }
        let expected: Vec<u32> = (0..out.len()).map(|step| default_token(id, step)).collect();
        assert_eq!(out, &expected);
    }
    assert!(
        s.num_preemptions() > 0,
        "the cache was meant to be too small"
    );
    assert_eq!(s.num_free_blocks(), 12);
    assert!(h.runner_knows.is_empty());
}

/// Requests sharing a long system prompt, some repeated, through a cache small enough to
/// preempt: outputs must be exactly those without caching, with fewer tokens computed.
#[test]
fn prefix_caching_reuses_shared_prompts_without_changing_outputs() {
    let run = |caching: bool| {
        let mut s = Scheduler::new(config(4, 32, 4, 24)).with_prefix_caching(caching);
        let mut h = Harness::default();
        let system: Vec<u32> = (0..21).map(|t| 500 + t).collect();
        for id in 0..12u64 {
            let mut prompt = system.clone();
            prompt.extend((0..(id % 4) as u32 * 3).map(|t| 900 + t + (id % 3) as u32));
            let req = EngineRequest {
                req_id: id,
                prompt_token_ids: prompt,
                sampling: SamplingParams::greedy(6),
                eos_token_ids: vec![2],
            };
            h.add(&mut s, req);
        }
        let mut computed = 0;
        while s.has_unfinished() {
            assert!(h.steps < 1000);
            computed += h.step(&mut s, &default_token).0.total_tokens();
        }
        assert_eq!(s.num_free_blocks(), 24, "no block leaked");
        (h.outputs, computed, s.prefix_cache_hit_rate())
    };
    let (plain, plain_computed, plain_rate) = run(false);
    let (cached, cached_computed, rate) = run(true);
    assert_eq!(plain, cached);
    assert_eq!(plain_rate, 0.0);
    assert!(rate > 0.3, "hit rate {rate}");
    assert!(
        cached_computed * 10 < plain_computed * 7,
        "{cached_computed} tokens computed with caching, {plain_computed} without"
    );
}

#[test]
fn prefix_caching_skips_requests_that_want_prompt_logprobs() {
    let mut s = Scheduler::new(config(4, 64, 4, 64)).with_prefix_caching(true);
    let mut h = Harness::default();
    h.add(&mut s, request(1, 12, 2));
    h.run_to_end(&mut s, &default_token);
    let mut req = request(2, 12, 2);
    req.sampling.prompt_logprobs = Some(1);
    h.add(&mut s, req);
    let (so, _) = h.step(&mut s, &default_token);
    assert_eq!(so.scheduled[0].start_pos, 0);
    h.add(&mut s, request(3, 12, 2));
    let (so, _) = h.step(&mut s, &default_token);
    let r3 = so.scheduled.iter().find(|r| r.req_id == 3).unwrap();
    assert_eq!(
        r3.start_pos, 8,
        "two full blocks reused, the last one recomputed"
    );
}

/// Drives the scheduler as the engine does with lookahead: each step is scheduled before the
/// previous one's output is folded in, and the fake runner fills placeholders from that
/// output, as the real runners do. Returns every request's outputs and finish reason, and
/// checks that each chunk computed the request's real tokens at their positions, reading KV
/// that was computed for the same context (prefix caching included).
fn run_lookahead(
    s: &mut Scheduler,
    prompts: &HashMap<RequestId, Vec<u32>>,
    token: &dyn Fn(RequestId, usize) -> u32,
) -> HashMap<RequestId, (Vec<u32>, Option<FinishReason>)> {
    let mut results: HashMap<RequestId, (Vec<u32>, Option<FinishReason>)> = HashMap::new();
    let mut computed: Vec<(RequestId, usize, Vec<u32>)> = Vec::new();
    let mut in_flight: Option<(SchedulerOutput, ModelRunnerOutput)> = None;
    let bs = s.config().block_size;
    let window = s.sliding_window();
    // Per block, per slot: the token context whose last token's KV the slot holds.
    let mut kv: HashMap<u32, Vec<Option<Vec<u32>>>> = HashMap::new();
    let mut steps = 0;
    loop {
        steps += 1;
        assert!(steps < 10_000, "scheduler does not make progress");
        let so = s.schedule();
        let prev: HashMap<RequestId, u32> = in_flight
            .as_ref()
            .map(|(_, o)| o.sampled.iter().map(|t| (t.req_id, t.token_id)).collect())
            .unwrap_or_default();
        let mut sampled = Vec::new();
        for sr in &so.scheduled {
            let mut tokens = sr.token_ids.clone();
            for (k, t) in tokens.iter_mut().enumerate() {
                if *t == PLACEHOLDER_TOKEN {
                    assert_eq!(
                        k,
                        sr.token_ids.len() - 1,
                        "only the last token can be pending"
                    );
                    *t = *prev.get(&sr.req_id).unwrap_or_else(|| {
                        panic!("{}: placeholder with no step sampling it", sr.req_id)
                    });
                }
            }
            // The KV the chunk reads: each earlier position's slot must hold that position
            // computed after the same context (with prefix caching, possibly by another
            // request). The whole context is checked against the final sequence below.
            let slot = |kv: &HashMap<u32, Vec<Option<Vec<u32>>>>, p: usize| {
                kv.get(&sr.block_table[p / bs])
                    .and_then(|b| b[p % bs].clone())
            };
            let mut context = match sr.start_pos {
                0 => Vec::new(),
                start => slot(&kv, start - 1)
                    .unwrap_or_else(|| panic!("{}: no KV at {}", sr.req_id, start - 1)),
            };
            assert_eq!(context.len(), sr.start_pos);
            let first_seen = window.map_or(0, |w| (sr.start_pos + 1).saturating_sub(w));
            for p in first_seen..sr.start_pos {
                assert_eq!(
                    slot(&kv, p).as_deref(),
                    Some(&context[..=p]),
                    "{}: KV at {p} belongs to another context",
                    sr.req_id
                );
            }
            for (k, &t) in tokens.iter().enumerate() {
                context.push(t);
                let p = sr.start_pos + k;
                kv.entry(sr.block_table[p / bs])
                    .or_insert_with(|| vec![None; bs])[p % bs] = Some(context.clone());
            }
            computed.push((sr.req_id, 0, context));
            if sr.sample {
                sampled.push(SampledToken {
                    req_id: sr.req_id,
                    token_id: token(sr.req_id, sr.num_output_tokens),
                    logprobs: None,
                    prompt_logprobs: None,
                });
            }
        }
        if let Some((pso, pout)) = in_flight.take() {
            for o in s.update_from_output(&pso, &pout) {
                let r = results.entry(o.req_id).or_default();
                assert!(r.1.is_none(), "output after finish for {}", o.req_id);
                r.0.extend(&o.new_token_ids);
                r.1 = o.finish_reason;
            }
        }
        if so.scheduled.is_empty() && !s.has_unfinished() {
            break;
        }
        in_flight = Some((so, ModelRunnerOutput { sampled }));
    }
    for (id, start, tokens) in computed {
        let seq: Vec<u32> = prompts[&id]
            .iter()
            .chain(&results[&id].0)
            .copied()
            .collect();
        for (k, &t) in tokens.iter().enumerate() {
            // A step past the end is the wasted one after a stop on a pending token.
            if let Some(&want) = seq.get(start + k) {
                assert_eq!(
                    t,
                    want,
                    "{id}: position {} computed the wrong token",
                    start + k
                );
            }
        }
    }
    results
}

/// Adds `requests` to `s` and runs them with lookahead scheduling (`run_lookahead`, the token
/// rule `token`); each request's tokens must be those of `plain`, a plain run of the same
/// requests. Returns the lookahead run's outputs and finish reasons.
fn lookahead_matches_plain(
    s: &mut Scheduler,
    requests: &[EngineRequest],
    plain: &Harness,
    token: &dyn Fn(RequestId, usize) -> u32,
) -> HashMap<RequestId, (Vec<u32>, Option<FinishReason>)> {
    let prompts = requests
        .iter()
        .map(|r| (r.req_id, r.prompt_token_ids.clone()))
        .collect();
    for r in requests {
        s.add_request(r.clone()).unwrap();
    }
    let got = run_lookahead(s, &prompts, token);
    for r in requests {
        assert_eq!(
            got[&r.req_id].0, plain.outputs[&r.req_id],
            "request {}'s tokens",
            r.req_id
        );
    }
    got
}

#[test]
fn lookahead_scheduling_gives_the_same_outputs_under_preemption_and_stops() {
    // The heavy mixed load through a tiny cache, with some requests hitting EOS on a token
    // that is still pending when the next step is scheduled.
    let token = |id: RequestId, step: usize| {
        if id % 4 == 1 && step == 3 {
            2
        } else {
            default_token(id, step)
        }
    };
    let requests: Vec<EngineRequest> = (0..30u64)
        .map(|id| request(id, 1 + (id as usize * 13) % 30, 1 + (id as usize * 7) % 15))
        .collect();
    let mut sync = Scheduler::new(config(6, 24, 4, 12));
    let mut h = Harness::default();
    for r in &requests {
        h.add(&mut sync, r.clone());
    }
    h.run_to_end(&mut sync, &token);

    let mut s = Scheduler::new(config(6, 24, 4, 12));
    let got = lookahead_matches_plain(&mut s, &requests, &h, &token);
    for r in &requests {
        let id = r.req_id;
        assert_eq!(
            got[&id].1,
            Some(h.finished[&id].0),
            "request {id}'s finish reason"
        );
    }
    assert!(
        s.num_preemptions() > 0,
        "the cache was meant to be too small"
    );
    assert_eq!(s.num_free_blocks(), 12, "blocks leaked");
    assert!(got.values().any(|(out, _)| out.last() == Some(&2)));
}

#[test]
fn lookahead_does_not_schedule_a_request_whose_pending_token_is_its_last() {
    // max_tokens 2: the second step's token ends it, so the step after schedules nothing.
    let mut s = Scheduler::new(config(4, 64, 4, 64));
    s.add_request(request(7, 5, 2)).unwrap();
    let first = s.schedule();
    assert_eq!(first.scheduled[0].token_ids.len(), 5);
    let second = s.schedule();
    assert_eq!(second.scheduled[0].token_ids, vec![PLACEHOLDER_TOKEN]);
    assert_eq!(second.scheduled[0].start_pos, 5);
    assert_eq!(second.scheduled[0].num_output_tokens, 1);
    let out = |t| ModelRunnerOutput {
        sampled: vec![SampledToken {
            req_id: 7,
            token_id: t,
            logprobs: None,
            prompt_logprobs: None,
        }],
    };
    assert!(s.update_from_output(&first, &out(40))[0]
        .finish_reason
        .is_none());
    assert!(
        s.schedule().scheduled.is_empty(),
        "its pending token is its last"
    );
    let last = s.update_from_output(&second, &out(41));
    assert_eq!(last[0].finish_reason, Some(FinishReason::Length));
    assert!(!s.has_unfinished());
}

/// vLLM's counting: queries and hits are the tokens of first admissions that read the cache;
/// a request asking prompt logprobs reads nothing and counts nothing, and a preempted
/// request's recompute (which does reuse its own cached blocks) is no new query.
#[test]
fn prefix_cache_counters_count_first_admissions_that_read_the_cache() {
    let mut s = Scheduler::new(config(4, 64, 4, 64)).with_prefix_caching(true);
    let mut h = Harness::default();
    h.add(&mut s, request(1, 12, 2));
    h.run_to_end(&mut s, &default_token);
    assert_eq!((s.prefix_cache_queries(), s.prefix_cache_hits()), (12, 0));
    let mut wants_logprobs = request(2, 12, 2);
    wants_logprobs.sampling.prompt_logprobs = Some(1);
    h.add(&mut s, wants_logprobs);
    h.run_to_end(&mut s, &default_token);
    assert_eq!(
        (s.prefix_cache_queries(), s.prefix_cache_hits()),
        (12, 0),
        "a request that skips the lookup is not a query"
    );
    // The same 12-token prompt: two full blocks hit, the third is recomputed for its last
    // token.
    h.add(&mut s, request(3, 12, 2));
    h.run_to_end(&mut s, &default_token);
    assert_eq!((s.prefix_cache_queries(), s.prefix_cache_hits()), (24, 8));
    assert!((s.prefix_cache_hit_rate() - 8.0 / 24.0).abs() < 1e-6);

    // Off: nothing is counted.
    let mut off = Scheduler::new(config(4, 64, 4, 64));
    let mut h = Harness::default();
    h.add(&mut off, request(1, 12, 2));
    h.add(&mut off, request(2, 12, 2));
    h.run_to_end(&mut off, &default_token);
    assert_eq!(
        (off.prefix_cache_queries(), off.prefix_cache_hits()),
        (0, 0)
    );
}

#[test]
fn a_preempted_recompute_reuses_its_blocks_without_counting_a_query() {
    // 6 blocks of 4: two 8-token prompts generating 12 tokens each cannot both finish.
    let mut s = Scheduler::new(config(4, 64, 4, 6)).with_prefix_caching(true);
    let mut h = Harness::default();
    let distinct = |id: RequestId| EngineRequest {
        req_id: id,
        prompt_token_ids: (0..8).map(|t| 3000 + 100 * id as u32 + t).collect(),
        sampling: SamplingParams::greedy(12),
        eos_token_ids: vec![2],
    };
    h.add(&mut s, distinct(1));
    h.add(&mut s, distinct(2));
    h.run_to_end(&mut s, &default_token);
    assert!(
        s.num_preemptions() > 0,
        "the cache was meant to be too small"
    );
    assert_eq!(
        (s.prefix_cache_queries(), s.prefix_cache_hits()),
        (16, 0),
        "only the two first admissions count"
    );
    for id in [1, 2] {
        let expected: Vec<u32> = (0..12).map(|step| default_token(id, step)).collect();
        assert_eq!(h.outputs[&id], expected);
    }
    assert_eq!(s.num_free_blocks(), 6);
}

/// `n` greedy requests on a shared system prompt of `system_len` tokens, request `id` adding
/// `(id % kinds) * step` tokens of one of two suffixes (by the id's parity) and generating
/// `max_tokens(id)`: prompts whose prefixes the cache can share, of mixed lengths.
fn shared_prompt_requests(
    system_len: u32,
    n: u64,
    (kinds, step): (u64, u32),
    max_tokens: impl Fn(u64) -> usize,
) -> Vec<EngineRequest> {
    (0..n)
        .map(|id| {
            let mut prompt: Vec<u32> = (0..system_len).map(|t| 700 + t).collect();
            prompt.extend((0..(id % kinds) as u32 * step).map(|t| 950 + t + (id % 2) as u32));
            EngineRequest {
                req_id: id,
                prompt_token_ids: prompt,
                sampling: SamplingParams::greedy(max_tokens(id)),
                eos_token_ids: vec![2],
            }
        })
        .collect()
}

/// `requests` run to the end by plain scheduling (no cache, no lookahead, no window) through
/// the harness: the outputs the other modes must give.
fn plain_run(cfg: SchedulerConfig, requests: &[EngineRequest]) -> Harness {
    let mut plain = Scheduler::new(cfg);
    let mut h = Harness::default();
    for r in requests {
        h.add(&mut plain, r.clone());
    }
    h.run_to_end(&mut plain, &default_token);
    h
}

/// Lookahead scheduling with prefix caching, shared prompts and preemption: the outputs are
/// those of plain scheduling without the cache, every computed token is a known one (the
/// runner's placeholders are filled from the step before), and the cache was used.
#[test]
fn lookahead_with_prefix_caching_gives_the_same_outputs() {
    let requests = shared_prompt_requests(13, 16, (5, 2), |id| 1 + (id as usize * 5) % 9);
    let h = plain_run(config(5, 24, 4, 20), &requests);

    let mut s = Scheduler::new(config(5, 24, 4, 20)).with_prefix_caching(true);
    lookahead_matches_plain(&mut s, &requests, &h, &default_token);
    assert!(
        s.prefix_cache_hits() > 0,
        "no request reused the system prompt"
    );
    assert_eq!(s.num_free_blocks(), 20, "blocks leaked");
}

/// Requests of `prompt_len` tokens generating `max_tokens`, ids from 0.
fn long_requests(n: u64, prompt_len: usize, max_tokens: usize) -> Vec<EngineRequest> {
    (0..n)
        .map(|id| request(id, prompt_len, max_tokens))
        .collect()
}

/// Runs `requests` through the harness (which checks that every key a chunk's queries can
/// see is in its blocks), returning the most blocks any request held after a step.
fn run_windowed(s: &mut Scheduler, h: &mut Harness, requests: &[EngineRequest]) -> usize {
    for r in requests {
        h.add(s, r.clone());
    }
    let mut most_held = 0;
    while s.has_unfinished() {
        assert!(h.steps < 10_000, "scheduler does not make progress");
        h.step(s, &default_token);
        for r in requests {
            most_held = most_held.max(s.num_held_blocks(r.req_id));
        }
    }
    h.run_to_end(s, &default_token);
    most_held
}

#[test]
fn a_sliding_window_frees_the_blocks_behind_it_so_more_requests_fit() {
    // Three requests of 40 + 20 tokens (15 blocks of 4 each) in a cache of 16 blocks: without
    // freeing they take turns through preemptions; with a window of 8 each holds a few.
    let requests = long_requests(3, 40, 20);
    let mut full = Scheduler::new(config(4, 16, 4, 16));
    let mut h_full = Harness::default();
    let most_full = run_windowed(&mut full, &mut h_full, &requests);
    assert!(
        full.num_preemptions() > 0,
        "the cache was meant to be too small"
    );
    assert_eq!(most_full, 15);

    let mut s = Scheduler::new(config(4, 16, 4, 16)).with_layer_windows([Some(8), Some(8)]);
    assert_eq!(s.sliding_window(), Some(8));
    let mut h = Harness::default();
    let most = run_windowed(&mut s, &mut h, &requests);
    assert_eq!(
        s.num_preemptions(),
        0,
        "every request fits beside the others"
    );
    // The window's 2 blocks, the one it starts in, and a prefill chunk of 16 tokens (4).
    assert!(most <= 2 + 1 + 4, "a request held {most} blocks");
    for r in &requests {
        assert_eq!(h.outputs[&r.req_id], h_full.outputs[&r.req_id]);
        assert_eq!(h.finished[&r.req_id], (FinishReason::Length, None));
    }
    assert_eq!(s.num_free_blocks(), 16, "blocks leaked");
}

#[test]
fn any_layer_without_a_window_keeps_every_block() {
    let s = Scheduler::new(config(4, 16, 4, 16)).with_layer_windows([Some(8), None, Some(8)]);
    assert_eq!(s.sliding_window(), None, "a global layer reads every block");
    let s = Scheduler::new(config(4, 16, 4, 16)).with_layer_windows([Some(8), Some(32)]);
    assert_eq!(s.sliding_window(), Some(32), "the widest window decides");
    let mut s = s;
    s.set_layer_windows(std::iter::empty());
    assert_eq!(s.sliding_window(), None);
}

#[test]
fn a_step_still_running_keeps_the_blocks_it_reads() {
    let mut s = Scheduler::new(config(4, 16, 4, 64)).with_layer_windows([Some(8)]);
    s.add_request(request(1, 40, 4)).unwrap();
    let first = s.schedule(); // positions 0..16: its queries read keys from 0 on
    let second = s.schedule(); // 16..32, while the first still runs
    assert_eq!(second.scheduled[0].start_pos, 16);
    assert_eq!(s.num_held_blocks(1), 8, "the running step's keys stay");
    let mut distinct = second.scheduled[0].block_table.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 8, "no placeholder yet");
    s.update_from_output(&first, &ModelRunnerOutput::default());
    // Now the earliest query still to run is at 16 (the second step): keys from 9 on.
    let third = s.schedule();
    assert_eq!(third.scheduled[0].start_pos, 32);
    assert_eq!(s.num_held_blocks(1), 10 - 2);
    assert_eq!(
        &third.scheduled[0].block_table[..2],
        &[crate::kv::NULL_BLOCK; 2]
    );
    assert_eq!(
        &third.scheduled[0].block_table[2..8],
        &second.scheduled[0].block_table[2..8]
    );
    assert_eq!(s.num_free_blocks(), 64 - 8);
    s.update_from_output(&second, &ModelRunnerOutput::default());
    s.update_from_output(&third, &ModelRunnerOutput::default());
    s.abort(1);
    assert_eq!(
        s.num_free_blocks(),
        64,
        "placeholders are never freed twice"
    );
}

/// The window with lookahead scheduling, preemptions and prefix caching (long shared
/// prompts, so that cached chains outlive the window): the outputs of plain scheduling.
#[test]
fn a_sliding_window_with_lookahead_and_prefix_caching_gives_the_same_outputs() {
    let requests = shared_prompt_requests(30, 12, (4, 5), |id| 3 + (id as usize * 5) % 17);
    let h = plain_run(config(5, 24, 4, 200), &requests);

    for caching in [false, true] {
        let mut s = Scheduler::new(config(5, 24, 4, 24))
            .with_prefix_caching(caching)
            .with_layer_windows([Some(7)]);
        lookahead_matches_plain(&mut s, &requests, &h, &default_token);
        assert_eq!(s.num_free_blocks(), 24, "blocks leaked (caching {caching})");
        if caching {
            assert!(
                s.prefix_cache_hits() > 0,
                "no request reused the system prompt"
            );
        }

        // Step by step, through the harness's checks, in a cache that preempts: a
        // recompute starts from the blocks its window sees, if cached.
        let mut s = Scheduler::new(config(5, 24, 4, 14))
            .with_prefix_caching(caching)
            .with_layer_windows([Some(7)]);
        let mut hw = Harness::default();
        for r in &requests {
            hw.add(&mut s, r.clone());
        }
        hw.run_to_end(&mut s, &default_token);
        for r in &requests {
            assert_eq!(
                hw.outputs[&r.req_id], h.outputs[&r.req_id],
                "request {}",
                r.req_id
            );
        }
        assert!(
            s.num_preemptions() > 0,
            "the cache was meant to be too small"
        );
        assert_eq!(s.num_free_blocks(), 14, "blocks leaked (caching {caching})");
    }
}
