use super::*;

/// Deterministic pseudo-random values in [lo, hi).
fn values(n: usize, seed: u64, lo: f32, hi: f32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let u = (mix64(seed.wrapping_mul(1_000_003) ^ i as u64) >> 40) as f32 / 16_777_216.0;
            lo + (hi - lo) * u
        })
        .collect()
}

fn base() -> SampleParams {
    SampleParams {
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
        min_p: 0.0,
        seed: 1,
        offset: 0,
    }
}

/// The keep set by the definition, the slow way: every token sorted by key, masses summed
/// from the top.
fn brute_kept(logits: &[f32], p: &SampleParams) -> Vec<bool> {
    let lmax = logits[argmax(logits)];
    let mut floor = 0u32;
    if p.min_p > 0.0 {
        floor = order_key(lmax + p.temperature * p.min_p.ln());
    }
    let mut keys: Vec<u32> = logits.iter().map(|&l| order_key(l)).collect();
    keys.sort_unstable_by(|a, b| b.cmp(a));
    if p.top_k > 0 && (p.top_k as usize) < logits.len() {
        floor = floor.max(keys[p.top_k as usize - 1]);
    }
    if p.top_p < 1.0 {
        let inv_t = 1.0 / p.temperature;
        let mass_at_or_above = |tau: u32| -> u64 {
            logits
                .iter()
                .filter(|&&l| order_key(l) >= tau && order_key(l) >= floor)
                .map(|&l| top_p_mass(l, lmax, inv_t))
                .sum()
        };
        let total = mass_at_or_above(0);
        let need = (((p.top_p as f64) * (total as f64)).ceil() as u64).clamp(1, total);
        // The largest key whose at-or-above mass reaches need.
        let tau = keys
            .iter()
            .copied()
            .find(|&k| mass_at_or_above(k) >= need)
            .unwrap();
        floor = floor.max(tau);
    }
    logits.iter().map(|&l| order_key(l) >= floor).collect()
}

#[test]
fn filters_keep_the_expected_sets() {
    let logits = [1.0f32, 3.0, 2.0, 0.5, 3.0, -1.0];
    let b = base();
    assert_eq!(argmax(&logits), 1, "first of the tied maxima");
    assert!(allowed_tokens(&logits, &b).iter().all(|&a| a));
    let k2 = allowed_tokens(&logits, &SampleParams { top_k: 2, ..b });
    assert_eq!(k2, [false, true, false, false, true, false]);
    let k3 = allowed_tokens(&logits, &SampleParams { top_k: 3, ..b });
    assert_eq!(k3, [false, true, true, false, true, false]);
    // min-p 0.5 keeps logits >= 3 + ln 0.5 = 2.31.
    let mp = allowed_tokens(&logits, &SampleParams { min_p: 0.5, ..b });
    assert_eq!(mp, [false, true, false, false, true, false]);
    // The two 3.0s hold 0.768 of the mass.
    let p75 = allowed_tokens(&logits, &SampleParams { top_p: 0.75, ..b });
    assert_eq!(p75, [false, true, false, false, true, false]);
    let p78 = allowed_tokens(&logits, &SampleParams { top_p: 0.78, ..b });
    assert_eq!(p78, [false, true, true, false, true, false]);
    // Greedy keeps the first maximum only.
    let g = allowed_tokens(&logits, &SampleParams { top_k: 1, ..b });
    assert_eq!(g, [false, true, false, false, false, false]);
}

#[test]
fn keep_sets_match_the_definition_on_random_rows() {
    let mut case = 0u64;
    for vocab in [2usize, 7, 50, 300] {
        for trial in 0..40u64 {
            case += 1;
            let mut logits = values(vocab, case, -6.0, 6.0);
            // Ties, signed zeros and masked tokens, which the thresholds must treat as keys.
            if vocab > 4 {
                logits[1] = logits[0];
                logits[2] = 0.0;
                logits[3] = -0.0;
                logits[vocab - 1] = f32::NEG_INFINITY;
            }
            let r = values(4, case + 77, 0.0, 1.0);
            let p = SampleParams {
                temperature: [0.3, 0.7, 1.0, 1.7][trial as usize % 4],
                top_k: if r[0] < 0.5 {
                    0
                } else {
                    1 + (r[0] * vocab as f32) as i32 % vocab as i32
                },
                top_p: if r[1] < 0.3 { 1.0 } else { r[1] },
                min_p: if r[2] < 0.5 { 0.0 } else { r[2] * 0.5 },
                seed: case,
                offset: trial,
            };
            let got = allowed_tokens(&logits, &p);
            if p.is_greedy() {
                continue;
            }
            assert_eq!(got, brute_kept(&logits, &p), "vocab {vocab} {p:?}");
            let t = sample_token(&logits, &p);
            assert!(got[t], "vocab {vocab} {p:?}: token {t} not kept");
        }
    }
}

#[test]
fn top_p_prefilter_matches_the_definition_at_full_vocabulary() {
    let vocab = 151_936;
    let logits = values(vocab, 3, -12.0, 12.0);
    for top_p in [0.1f32, 0.5, 0.9, 0.999] {
        let p = SampleParams {
            top_p,
            temperature: 0.8,
            ..base()
        };
        let got = allowed_tokens(&logits, &p);
        // The definition, directly: sorted keys, cumulative mass from the top.
        let lmax = logits[argmax(&logits)];
        let mut pairs: Vec<(u32, u64)> = logits
            .iter()
            .map(|&l| (order_key(l), top_p_mass(l, lmax, 1.0 / 0.8)))
            .collect();
        pairs.sort_unstable_by_key(|c| std::cmp::Reverse(c.0));
        let total: u64 = pairs.iter().map(|x| x.1).sum();
        let need = (((top_p as f64) * (total as f64)).ceil() as u64).clamp(1, total);
        let mut cum = 0;
        let mut tau = 0;
        for (k, m) in pairs {
            cum += m;
            if cum >= need {
                tau = k;
                break;
            }
        }
        let want: Vec<bool> = logits.iter().map(|&l| order_key(l) >= tau).collect();
        assert_eq!(got, want, "top_p {top_p}");
    }
}

#[test]
fn draws_are_a_pure_function_of_seed_and_step() {
    let logits = values(1000, 9, -3.0, 3.0);
    let p = SampleParams {
        top_p: 0.9,
        seed: 1234,
        offset: 17,
        ..base()
    };
    assert_eq!(sample_token(&logits, &p), sample_token(&logits, &p));
    let tokens: Vec<usize> = (0..32)
        .map(|offset| sample_token(&logits, &SampleParams { offset, ..p }))
        .collect();
    assert!(
        tokens.iter().any(|&t| t != tokens[0]),
        "32 steps drew one token: {tokens:?}"
    );
    let other_seed: Vec<usize> = (0..32)
        .map(|offset| {
            sample_token(
                &logits,
                &SampleParams {
                    offset,
                    seed: 99,
                    ..p
                },
            )
        })
        .collect();
    assert_ne!(tokens, other_seed);
    assert_eq!(gumbel_noise(5, 6, 7), gumbel_noise(5, 6, 7));
    assert_ne!(gumbel_noise(5, 6, 7), gumbel_noise(5, 7, 7));
}

#[test]
fn draws_follow_the_renormalised_distribution() {
    let logits = [0.0f32, 1.0, 2.0, -1.0];
    // top-k 3 drops the -1.0; temperature 0.5 sharpens.
    let p = SampleParams {
        temperature: 0.5,
        top_k: 3,
        seed: 42,
        ..base()
    };
    let draws = 20_000u64;
    let mut counts = [0usize; 4];
    for offset in 0..draws {
        counts[sample_token(&logits, &SampleParams { offset, ..p })] += 1;
    }
    let z: f64 = logits[..3].iter().map(|&l| (l as f64 * 2.0).exp()).sum();
    assert_eq!(counts[3], 0, "a token top-k removed was drawn");
    for (i, &c) in counts[..3].iter().enumerate() {
        let want = (logits[i] as f64 * 2.0).exp() / z;
        let got = c as f64 / draws as f64;
        assert!((got - want).abs() < 0.015, "token {i}: {got} vs {want}");
    }
}

#[test]
fn greedy_and_fully_masked_rows() {
    let logits = [0.5f32, 2.0, 2.0, -1.0];
    let greedy = SampleParams {
        temperature: 0.0,
        ..base()
    };
    assert_eq!(sample(&logits, &greedy).0, 1);
    assert_eq!(
        sample_token(
            &logits,
            &SampleParams {
                top_k: 1,
                temperature: 5.0,
                ..base()
            }
        ),
        1
    );
    let masked = [f32::NEG_INFINITY; 5];
    assert_eq!(sample_token(&masked, &base()), 0);
    assert_eq!(
        sample_token(
            &masked,
            &SampleParams {
                top_p: 0.5,
                min_p: 0.1,
                top_k: 2,
                ..base()
            }
        ),
        0
    );
    // One token left: always it.
    let mut one = [f32::NEG_INFINITY; 5];
    one[3] = -50.0;
    for offset in 0..50 {
        assert_eq!(sample_token(&one, &SampleParams { offset, ..base() }), 3);
    }
    let (tok, lp) = sample(&logits, &greedy);
    assert!((lp - log_softmax_at(&logits, tok)).abs() < 1e-7);
}

/// The processors written out the slow, obvious way.
fn naive_processors(logits: &mut [f32], p: &Processors<'_>, prompt: &[u32], output: &[u32]) {
    for l in logits.iter_mut() {
        if l.is_nan() {
            *l = f32::NEG_INFINITY;
        }
    }
    for t in 0..logits.len() as u32 {
        if p.allowed_token_ids.is_some_and(|a| !a.contains(&t)) {
            logits[t as usize] = f32::NEG_INFINITY;
        }
    }
    for w in p.bad_words {
        let n = w.len();
        if n > output.len() + 1 {
            continue;
        }
        if output[output.len() + 1 - n..] == w[..n - 1] {
            logits[w[n - 1] as usize] = f32::NEG_INFINITY;
        }
    }
    if output.len() < p.min_tokens {
        for &t in p.eos_and_stop {
            logits[t as usize] = f32::NEG_INFINITY;
        }
    }
    for &(t, b) in p.logit_bias {
        logits[t as usize] += b;
    }
    for t in 0..logits.len() as u32 {
        let l = &mut logits[t as usize];
        if p.repetition_penalty != 1.0 && (prompt.contains(&t) || output.contains(&t)) {
            *l = if *l > 0.0 {
                *l / p.repetition_penalty
            } else {
                *l * p.repetition_penalty
            };
        }
        let count = output.iter().filter(|&&o| o == t).count();
        if count > 0 {
            *l -= p.frequency_penalty * count as f32 + p.presence_penalty;
        }
    }
}

#[test]
fn processors_match_a_naive_implementation() {
    let vocab = 40;
    let bad_words = vec![
        vec![5u32],
        vec![7, 8],
        vec![1, 2, 3],
        vec![9, 9, 9, 9, 9, 9],
    ];
    let allowed: Vec<u32> = (0..vocab as u32).filter(|t| t % 3 != 0).collect();
    let bias = [(2u32, 100.0f32), (11, -100.0), (12, 0.5)];
    for case in 0..60u64 {
        let mut logits = values(vocab, case, -5.0, 5.0);
        logits[(case % vocab as u64) as usize] = f32::NAN;
        let prompt: Vec<u32> = values(6, case + 1, 0.0, vocab as f32)
            .iter()
            .map(|&v| v as u32)
            .collect();
        let mut output: Vec<u32> = values((case % 9) as usize, case + 2, 0.0, 12.0)
            .iter()
            .map(|&v| v as u32)
            .collect();
        if case % 4 == 0 {
            output.extend([1, 2]); // the prefix of bad word [1, 2, 3]
        }
        if case % 5 == 0 {
            output.push(7);
        }
        let p = Processors {
            allowed_token_ids: (case % 3 == 0).then_some(&allowed[..]),
            bad_words: &bad_words,
            min_tokens: (case % 7) as usize,
            eos_and_stop: &[0, 13],
            logit_bias: if case % 2 == 0 { &bias } else { &[] },
            repetition_penalty: [1.0, 1.3, 0.8][case as usize % 3],
            frequency_penalty: [0.0, 0.5, -1.0][(case as usize / 2) % 3],
            presence_penalty: [0.0, -0.5, 1.5][(case as usize / 3) % 3],
        };
        let mut got = logits.clone();
        apply_processors(&mut got, &p, &prompt, &output);
        let mut want = logits.clone();
        naive_processors(&mut want, &p, &prompt, &output);
        assert_eq!(
            got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            "case {case}: {p:?} output {output:?}"
        );
        if output.ends_with(&[1, 2]) {
            assert_eq!(got[3], f32::NEG_INFINITY, "bad word [1, 2, 3] completed");
        }
        assert_eq!(got[5], f32::NEG_INFINITY, "single-token bad word");
    }
}

#[test]
fn bias_and_allowed_ids_decide_the_draw() {
    let logits = values(100, 4, -3.0, 3.0);
    let mut biased = logits.clone();
    apply_processors(
        &mut biased,
        &Processors {
            logit_bias: &[(42, 100.0)],
            ..Default::default()
        },
        &[],
        &[],
    );
    let allowed = [3u32, 60, 61];
    let mut only = logits.clone();
    apply_processors(
        &mut only,
        &Processors {
            allowed_token_ids: Some(&allowed),
            ..Default::default()
        },
        &[],
        &[],
    );
    for offset in 0..200 {
        let p = SampleParams { offset, ..base() };
        assert_eq!(sample_token(&biased, &p), 42);
        assert!(allowed.contains(&(sample_token(&only, &p) as u32)));
    }
}

#[test]
fn top_logprobs_ranks_and_orders() {
    let logits = [1.0f32, 3.0, 3.0, f32::NAN, 0.0];
    let lp = top_logprobs(&logits, 2, 3);
    let z: f64 = [1.0f64, 3.0, 3.0, 0.0].iter().map(|v| v.exp()).sum();
    assert!((lp.logprob as f64 - (3.0 - z.ln())).abs() < 1e-6);
    assert_eq!(lp.rank, 2, "two tokens at or above 3.0");
    let ids: Vec<u32> = lp.top.iter().map(|t| t.0).collect();
    assert_eq!(ids, [1, 2, 0], "highest first, lower id first on ties");
    assert_eq!(top_logprobs(&logits, 3, 0).rank, 5, "NaN ranks last");
    assert_eq!(
        top_logprobs(&logits, 9, 0).rank,
        6,
        "outside the vocabulary"
    );
    assert_eq!(top_logprobs(&logits, 9, 0).logprob, f32::NEG_INFINITY);
}

/// The draw by its definition: every kept token's score computed, the first largest wins.
fn naive_draw(logits: &[f32], p: &SampleParams) -> usize {
    if p.is_greedy() || logits[argmax(logits)] == f32::NEG_INFINITY {
        return argmax(logits);
    }
    let kept = brute_kept(logits, p);
    let inv_t = 1.0 / p.temperature;
    let mut best = None;
    let mut best_score = f32::NEG_INFINITY;
    for (i, &l) in logits.iter().enumerate() {
        let score = l * inv_t + gumbel_noise(p.seed, p.offset, i);
        if kept[i] && score > best_score {
            best = Some(i);
            best_score = score;
        }
    }
    best.unwrap_or_else(|| argmax(logits))
}

#[test]
fn the_draw_equals_its_definition() {
    let mut case = 0u64;
    for vocab in [3usize, 40, 2000] {
        for trial in 0..60u64 {
            case += 1;
            // Wide logits (most tokens far below the top, where the draw skips work), with
            // signed zeros as maxima now and then.
            let mut logits = values(vocab, case + 1000, -40.0, 8.0);
            if trial % 5 == 0 {
                logits.iter_mut().for_each(|l| *l = l.min(-1.0));
                logits[vocab / 2] = -0.0;
                logits[vocab - 1] = 0.0;
            }
            let r = values(3, case + 2000, 0.0, 1.0);
            let p = SampleParams {
                temperature: [0.05, 0.5, 1.0, 3.0][trial as usize % 4],
                top_k: if r[0] < 0.5 {
                    0
                } else {
                    2 + (r[0] * 10.0) as i32
                },
                top_p: if r[1] < 0.5 { 1.0 } else { r[1] },
                min_p: if r[2] < 0.7 { 0.0 } else { r[2] - 0.7 },
                seed: case,
                offset: trial,
            };
            assert_eq!(
                sample_token(&logits, &p),
                naive_draw(&logits, &p),
                "vocab {vocab} {p:?}"
            );
        }
    }
    // Many tokens a few units below the top: the large noises decide, which an
    // over-eager skip would miss.
    let logits = values(20_000, 77, -12.0, 0.0);
    for offset in 0..300 {
        let p = SampleParams {
            offset,
            temperature: 1.0 + (offset % 3) as f32,
            ..base()
        };
        assert_eq!(sample_token(&logits, &p), naive_draw(&logits, &p), "{p:?}");
    }
}

#[test]
fn the_top_hash_value_gives_finite_noise() {
    // (h >> 40) + 0.5 rounds to 2^24 for the top hash value: unclamped, u = 1 and the noise
    // is +inf, so that token would win whatever its logit.
    let vocab = 150_000;
    let (offset, hit) = (0..1000u64)
        .find_map(|offset| {
            (0..vocab)
                .find(|&i| {
                    let key = super::draw_key(9, offset);
                    let h = mix64(key.wrapping_add((i as u64).wrapping_mul(0x9E3779B97F4A7C15)));
                    h >> 40 == 0xFF_FFFF
                })
                .map(|i| (offset, i))
        })
        .expect("a top hash value within 1000 draws");
    let noise = gumbel_noise(9, offset, hit);
    assert!(noise.is_finite() && noise > 16.0, "{noise}");
    let mut logits = values(vocab, 5, -1.0, 1.0);
    logits[hit] = -60.0;
    let p = SampleParams {
        seed: 9,
        offset,
        ..base()
    };
    assert_ne!(sample_token(&logits, &p), hit);
}
