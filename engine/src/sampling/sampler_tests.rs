use std::collections::HashSet;

use super::*;

fn params(temperature: f32) -> SamplingParams {
    SamplingParams {
        temperature,
        max_tokens: Some(100),
        ..SamplingParams::default()
    }
}

/// Logits whose softmax is exactly `probs`.
fn logits_for(probs: &[f32]) -> Vec<f32> {
    probs.iter().map(|p| p.ln()).collect()
}

/// A reproducible, varied logits vector with distinct values.
fn varied_logits(vocab: usize) -> Vec<f32> {
    (0..vocab)
        .map(|i| rvllm_kernels::reference::gumbel_noise(7, 0, i) * 1.5)
        .collect()
}

/// Ids of the `k` largest logits, largest first.
fn top_k_indices(logits: &[f32], k: usize) -> Vec<u32> {
    top_logprobs(logits, 0, k).top.iter().map(|t| t.0).collect()
}

fn draws(s: &mut SeqSampler, logits: &[f32], n: usize) -> Vec<u32> {
    (0..n)
        .map(|step| s.sample(&mut logits.to_vec(), step).0)
        .collect()
}

#[test]
fn greedy_is_argmax_with_lowest_id_on_ties() {
    let mut s = SeqSampler::new(&SamplingParams::greedy(10), &[], &[]);
    assert_eq!(s.sample(&mut [0.1, 3.0, -1.0, 2.9], 0).0, 1);
    assert_eq!(s.sample(&mut [1.0, 5.0, 5.0], 0).0, 1);
    assert_eq!(s.sample(&mut [f32::NAN, -1.0], 0).0, 1, "NaN never wins");
    let logits = varied_logits(1000);
    assert_eq!(s.sample(&mut logits.clone(), 3).0, argmax(&logits));
    // Greedy ignores top-k/top-p/min-p and the seed.
    let p = SamplingParams {
        top_k: 3,
        top_p: 0.1,
        min_p: 0.9,
        seed: Some(5),
        ..SamplingParams::greedy(10)
    };
    let mut s = SeqSampler::new(&p, &[], &[]);
    assert_eq!(s.sample(&mut logits.clone(), 0).0, argmax(&logits));
}

#[test]
fn the_same_seed_reproduces_and_different_seeds_differ() {
    let logits = varied_logits(64);
    let run = |seed| {
        let mut s = SeqSampler::new(
            &SamplingParams {
                seed: Some(seed),
                ..params(1.5)
            },
            &[],
            &[],
        );
        draws(&mut s, &logits, 40)
    };
    assert_eq!(run(1), run(1));
    assert_ne!(run(1), run(2));
    // A draw depends on (seed, step) only: sampling step 30 alone gives the same token as
    // in the full run.
    let mut s = SeqSampler::new(
        &SamplingParams {
            seed: Some(1),
            ..params(1.5)
        },
        &[],
        &[],
    );
    assert_eq!(s.sample(&mut logits.clone(), 30).0, run(1)[30]);
    // Unseeded samplers pick their own seeds.
    let a = SeqSampler::new(&params(1.0), &[], &[]).seed();
    let b = SeqSampler::new(&params(1.0), &[], &[]).seed();
    assert_ne!(a, b);
}

#[test]
fn draws_follow_the_distribution() {
    let probs = [0.5f32, 0.3, 0.15, 0.05];
    let mut s = SeqSampler::new(
        &SamplingParams {
            seed: Some(3),
            ..params(1.0)
        },
        &[],
        &[],
    );
    let n = 20_000;
    let mut counts = [0usize; 4];
    for t in draws(&mut s, &logits_for(&probs), n) {
        counts[t as usize] += 1;
    }
    for (i, &p) in probs.iter().enumerate() {
        let freq = counts[i] as f32 / n as f32;
        assert!(
            (freq - p).abs() < 0.015,
            "token {i}: frequency {freq}, probability {p}"
        );
    }
}

#[test]
fn top_k_never_leaves_the_k_most_likely() {
    let logits = varied_logits(500);
    let allowed: HashSet<u32> = top_k_indices(&logits, 5).into_iter().collect();
    let mut s = SeqSampler::new(
        &SamplingParams {
            top_k: 5,
            seed: Some(11),
            ..params(2.0)
        },
        &[],
        &[],
    );
    let seen: HashSet<u32> = draws(&mut s, &logits, 3000).into_iter().collect();
    assert!(seen.is_subset(&allowed), "{seen:?} outside {allowed:?}");
    assert_eq!(seen.len(), 5, "a high temperature reaches all 5");
    // top_k larger than the vocabulary keeps everything.
    let mut s = SeqSampler::new(
        &SamplingParams {
            top_k: 50,
            seed: Some(1),
            ..params(1.0)
        },
        &[],
        &[],
    );
    let seen: HashSet<u32> = draws(&mut s, &logits_for(&[0.25; 4]), 400)
        .into_iter()
        .collect();
    assert_eq!(seen.len(), 4);
}

#[test]
fn top_p_keeps_the_smallest_set_reaching_p() {
    let logits = logits_for(&[0.05, 0.5, 0.15, 0.3]);
    let run = |top_p: f32| -> HashSet<u32> {
        let mut s = SeqSampler::new(
            &SamplingParams {
                top_p,
                seed: Some(5),
                ..params(1.0)
            },
            &[],
            &[],
        );
        draws(&mut s, &logits, 3000).into_iter().collect()
    };
    assert_eq!(run(0.4), HashSet::from([1]));
    assert_eq!(run(0.75), HashSet::from([1, 3]));
    assert_eq!(run(0.9), HashSet::from([1, 3, 2]));
    assert_eq!(run(1.0).len(), 4);

    // On a large vocabulary with random logits, the kept set is exactly the nucleus.
    let logits = varied_logits(2000);
    let probs: Vec<f64> = {
        let lse = log_sum_exp(&logits) as f64;
        logits.iter().map(|&l| (l as f64 - lse).exp()).collect()
    };
    let order = top_k_indices(&logits, logits.len());
    let mut nucleus = HashSet::new();
    let mut cum = 0.0;
    for &i in &order {
        if cum >= 0.3 {
            break;
        }
        nucleus.insert(i);
        cum += probs[i as usize];
    }
    let seen = {
        let mut s = SeqSampler::new(
            &SamplingParams {
                top_p: 0.3,
                seed: Some(9),
                ..params(1.0)
            },
            &[],
            &[],
        );
        draws(&mut s, &logits, 5000)
            .into_iter()
            .collect::<HashSet<u32>>()
    };
    assert!(
        seen.is_subset(&nucleus),
        "{} tokens outside the nucleus",
        seen.difference(&nucleus).count()
    );
    assert!(
        seen.len() * 10 >= nucleus.len() * 8,
        "most of the nucleus gets drawn"
    );
}

#[test]
fn min_p_drops_tokens_below_a_fraction_of_the_top() {
    let logits = logits_for(&[0.5, 0.3, 0.15, 0.05]);
    let mut s = SeqSampler::new(
        &SamplingParams {
            min_p: 0.2,
            seed: Some(2),
            ..params(1.0)
        },
        &[],
        &[],
    );
    let seen: HashSet<u32> = draws(&mut s, &logits, 3000).into_iter().collect();
    assert_eq!(seen, HashSet::from([0, 1, 2]), "0.05 < 0.2 * 0.5");
    let mut s = SeqSampler::new(
        &SamplingParams {
            min_p: 1.0,
            seed: Some(2),
            ..params(1.0)
        },
        &[],
        &[],
    );
    let seen: HashSet<u32> = draws(&mut s, &logits, 500).into_iter().collect();
    assert_eq!(seen, HashSet::from([0]));
}

#[test]
fn filters_combine_and_stay_inside_their_intersection() {
    let logits = varied_logits(1000);
    let p = SamplingParams {
        top_k: 40,
        top_p: 0.8,
        min_p: 0.05,
        seed: Some(4),
        ..params(0.8)
    };
    let mut s = SeqSampler::new(&p, &[], &[]);
    let allowed: HashSet<u32> = top_k_indices(&logits, 40).into_iter().collect();
    let scaled: Vec<f32> = logits.iter().map(|l| l / 0.8).collect();
    let max = scaled.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for t in draws(&mut s, &logits, 3000) {
        assert!(allowed.contains(&t));
        assert!(
            (scaled[t as usize] - max).exp() >= 0.05,
            "token {t} under min_p"
        );
    }
}

#[test]
fn repetition_penalty_divides_positive_and_multiplies_negative_logits() {
    let p = SamplingParams {
        repetition_penalty: 2.0,
        ..params(1.0)
    };
    let mut s = SeqSampler::new(&p, &[0, 1], &[]);
    s.record_output(3);
    let mut logits = vec![2.0, -2.0, 1.0, 4.0, -1.0];
    s.apply_penalties(&mut logits);
    assert_eq!(logits, vec![1.0, -4.0, 1.0, 2.0, -1.0]);
    // It changes the greedy choice: token 0 was the best before, it is not after.
    let g = SamplingParams {
        repetition_penalty: 3.0,
        ..SamplingParams::greedy(5)
    };
    let mut s = SeqSampler::new(&g, &[0], &[]);
    assert_eq!(s.sample(&mut [3.0, 2.0], 0).0, 1);
}

#[test]
fn frequency_and_presence_penalties_use_output_counts_only() {
    let p = SamplingParams {
        frequency_penalty: 0.5,
        presence_penalty: 0.25,
        ..params(1.0)
    };
    let mut s = SeqSampler::new(&p, &[2, 2, 2], &[]);
    for t in [1, 1, 2] {
        s.record_output(t);
    }
    let mut logits = vec![0.0; 4];
    s.apply_penalties(&mut logits);
    assert_eq!(
        logits,
        vec![0.0, -1.25, -0.75, 0.0],
        "the prompt's 2s do not count"
    );
    // Negative values encourage repetition.
    let p = SamplingParams {
        presence_penalty: -1.0,
        ..params(1.0)
    };
    let mut s = SeqSampler::new(&p, &[], &[]);
    s.record_output(0);
    let mut logits = vec![0.0, 0.0];
    s.apply_penalties(&mut logits);
    assert_eq!(logits, vec![1.0, 0.0]);
}

#[test]
fn min_tokens_masks_eos_and_stop_ids_until_reached() {
    let eos = 2;
    let p = SamplingParams {
        min_tokens: 2,
        stop_token_ids: vec![3],
        ..SamplingParams::greedy(10)
    };
    let mut s = SeqSampler::new(&p, &[], &[eos]);
    let logits = vec![0.0, 1.0, 9.0, 8.0];
    assert_eq!(s.sample(&mut logits.clone(), 0).0, 1);
    assert_eq!(s.sample(&mut logits.clone(), 1).0, 1);
    assert_eq!(s.sample(&mut logits.clone(), 2).0, eos);
    // ignore_eos leaves EOS alone (it just does not stop the sequence) but still masks stop ids.
    let p = SamplingParams {
        ignore_eos: true,
        ..p
    };
    let mut s = SeqSampler::new(&p, &[], &[eos]);
    assert_eq!(s.sample(&mut logits.clone(), 0).0, eos);
    assert_eq!(s.sample(&mut [0.0, 1.0, -9.0, 8.0], 0).0, 1);
    // Seeded sampling never draws a masked token either.
    let p = SamplingParams {
        min_tokens: 50,
        seed: Some(1),
        ..params(1.0)
    };
    let mut s = SeqSampler::new(&p, &[], &[eos]);
    assert!(draws(&mut s, &[1.0, 1.0, 5.0], 50)
        .iter()
        .all(|&t| t != eos));
}

#[test]
fn logprobs_are_the_log_softmax_of_the_raw_logits() {
    let logits = vec![1.0f32, 3.0, 2.0, -1.0, 3.0];
    let lp = top_logprobs(&logits, 2, 3);
    let total: f32 = logits
        .iter()
        .map(|&l| (l - log_sum_exp(&logits)).exp())
        .sum();
    assert!((total - 1.0).abs() < 1e-6);
    assert_eq!(lp.token_id, 2);
    let expected = 2.0 - (logits.iter().map(|&l| (l as f64).exp()).sum::<f64>()).ln() as f32;
    assert!((lp.logprob - expected).abs() < 1e-6);
    let ids: Vec<u32> = lp.top.iter().map(|t| t.0).collect();
    assert_eq!(ids, vec![1, 4, 2], "highest first, lower id first on ties");
    assert!(lp.top.windows(2).all(|w| w[0].1 >= w[1].1));
    assert!(lp.top.iter().all(|t| t.1 <= 0.0));
    // Ranks count the tokens at least as likely (vLLM's rule): 3.0 twice, then 2.0.
    assert_eq!(lp.rank, 3);
    assert_eq!(
        top_logprobs(&logits, 1, 0).rank,
        2,
        "a tie shares the higher count"
    );
    assert_eq!(top_logprobs(&logits, 3, 0).rank, 5);
    assert_eq!(
        top_logprobs(&[f32::NAN, 1.0], 1, 0).rank,
        1,
        "NaN ranks last"
    );

    // Huge logits stay finite.
    let lp = top_logprobs(&[1000.0, 999.0], 1, 2);
    assert!((lp.logprob - (-1.0 - (1.0 + (-1.0f64).exp()).ln() as f32)).abs() < 1e-5);
    assert!(lp.top.iter().all(|t| t.1.is_finite()));
    assert!(top_logprobs(&[0.0; 3], 0, 0).top.is_empty());

    // The sampler reports raw logprobs, not those after temperature or penalties.
    let p = SamplingParams {
        temperature: 0.3,
        repetition_penalty: 1.5,
        logprobs: Some(2),
        seed: Some(1),
        ..params(1.0)
    };
    let mut s = SeqSampler::new(&p, &[1], &[]);
    let (tok, lp) = s.sample(&mut logits.clone(), 0);
    assert_eq!(lp, Some(top_logprobs(&logits, tok, 2)));
    // None unless asked for.
    let mut s = SeqSampler::new(&params(1.0), &[], &[]);
    assert!(s.sample(&mut logits.clone(), 0).1.is_none());
}

#[test]
fn degenerate_logits_do_not_panic() {
    let mut s = SeqSampler::new(
        &SamplingParams {
            top_p: 0.5,
            top_k: 2,
            min_p: 0.5,
            ..params(1.0)
        },
        &[],
        &[],
    );
    assert_eq!(s.sample(&mut [], 0).0, 0);
    let (t, _) = s.sample(&mut [f32::NEG_INFINITY; 4], 0);
    assert!(t < 4);
    let (t, _) = s.sample(&mut [f32::NAN, 1.0, f32::NAN], 0);
    assert_eq!(t, 1);
    let lp = top_logprobs(&[f32::NEG_INFINITY; 3], 0, 2);
    assert_eq!(lp.logprob, f32::NEG_INFINITY);
    assert_eq!(
        top_logprobs(&[1.0], 7, 1).logprob,
        f32::NEG_INFINITY,
        "an id outside the vocabulary"
    );
}

#[test]
fn seq_sampler_equals_the_reference_processors_and_draw() {
    use rvllm_kernels::reference as ops;
    let vocab = 64;
    let prompt = [3u32, 9, 9, 20, 41];
    let eos = [0u32];
    for case in 0..48u64 {
        let p = SamplingParams {
            temperature: [0.0, 0.6, 1.0, 1.4][case as usize % 4],
            top_k: [0, 5, 20][case as usize % 3],
            top_p: [1.0, 0.9, 0.5][(case as usize / 3) % 3],
            min_p: [0.0, 0.05][(case as usize / 2) % 2],
            seed: Some(case),
            repetition_penalty: [1.0, 1.2][case as usize % 2],
            frequency_penalty: [0.0, 0.4, -0.3][(case as usize / 4) % 3],
            presence_penalty: [0.0, 0.7][(case as usize / 5) % 2],
            min_tokens: (case % 6) as usize,
            stop_token_ids: vec![7],
            logit_bias: if case % 3 == 0 {
                vec![(5, 3.0), (30, -100.0)]
            } else {
                vec![]
            },
            allowed_token_ids: (case % 4 == 1).then(|| (0..vocab as u32).step_by(3).collect()),
            bad_words_token_ids: vec![vec![12], vec![6, 15], vec![9, 9, 18]],
            ..params(1.0)
        };
        let mut s = SeqSampler::new(&p, &prompt, &eos);
        let mut output = Vec::new();
        for step in 0..12 {
            let mut logits = varied_logits(vocab);
            logits[(step * 7 + case as usize) % vocab] = f32::NAN;
            let mut want = logits.clone();
            let eos_and_stop = [0u32, 7];
            ops::apply_processors(
                &mut want,
                &ops::Processors {
                    allowed_token_ids: p.allowed_token_ids.as_deref(),
                    bad_words: &p.bad_words_token_ids,
                    min_tokens: p.min_tokens,
                    eos_and_stop: &eos_and_stop,
                    logit_bias: &p.logit_bias,
                    repetition_penalty: p.repetition_penalty,
                    frequency_penalty: p.frequency_penalty,
                    presence_penalty: p.presence_penalty,
                },
                &prompt,
                &output,
            );
            let want_token = ops::sample_token(&want, &s.draw_params(step)) as u32;
            let mut got = logits.clone();
            let (token, _) = s.sample(&mut got, step);
            assert_eq!(
                got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "case {case} step {step}: processed logits differ"
            );
            assert_eq!(token, want_token, "case {case} step {step}");
            // Steer the output through bad-word prefixes now and then.
            let fed = if step % 4 == 1 { 6 } else { token };
            s.record_output(fed);
            output.push(fed);
        }
    }
}

#[test]
fn bad_words_bias_and_allowed_ids_steer_the_sampler() {
    let logits = varied_logits(50);
    let best = argmax(&logits);
    // The best token as a bad word: never chosen greedily.
    let p = SamplingParams {
        bad_words_token_ids: vec![vec![best]],
        ..SamplingParams::greedy(10)
    };
    let mut s = SeqSampler::new(&p, &[], &[]);
    assert_ne!(s.sample(&mut logits.clone(), 0).0, best);
    // A two-token bad word only after its prefix.
    let p = SamplingParams {
        bad_words_token_ids: vec![vec![4, best]],
        ..SamplingParams::greedy(10)
    };
    let mut s = SeqSampler::new(&p, &[], &[]);
    assert_eq!(s.sample(&mut logits.clone(), 0).0, best);
    s.record_output(4);
    assert_ne!(s.sample(&mut logits.clone(), 1).0, best);
    // +100 bias forces a token; allowed ids restrict every draw.
    let p = SamplingParams {
        logit_bias: vec![(17, 100.0)],
        seed: Some(3),
        ..params(1.0)
    };
    let mut s = SeqSampler::new(&p, &[], &[]);
    assert!(draws(&mut s, &logits, 100).iter().all(|&t| t == 17));
    let p = SamplingParams {
        allowed_token_ids: Some(vec![2, 11, 40]),
        seed: Some(3),
        ..params(1.0)
    };
    let mut s = SeqSampler::new(&p, &[], &[]);
    let seen: HashSet<u32> = draws(&mut s, &logits, 300).into_iter().collect();
    assert_eq!(seen, HashSet::from([2, 11, 40]));
}
