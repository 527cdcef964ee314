//! The GPU sampler's state and logits kernels (sampling_state.cu, logits_process.cu) against
//! the CPU reference (`rvllm_kernels::reference`: `apply_processors`, `sample_token`,
//! `top_logprobs`), on random inputs with outputs poisoned first; and the draw of both
//! sampling kernels against the reference over thousands of rows of random parameters.
//! Without a CUDA device each test prints `SKIPPED: no CUDA device` and returns.
mod gpu_harness;

use gpu_harness::{gpu, rng, Buf, Elem, Gpu};
use rand::rngs::StdRng;
use rand::Rng;
use rvllm_kernels::args;
use rvllm_kernels::reference as cpu;
use rvllm_kernels::sampling_state::{
    as_bytes, SamplingTables, SlotJoin, SlotParams, SLOT_ALLOWED, SLOT_BIAS, SLOT_PENALTIES,
};
use rvllm_kernels::KernelArgs;

/// One request's sampling state as the test builds it, and its history.
#[derive(Default, Clone)]
struct Req {
    params: SlotParams,
    prompt: Vec<u32>,
    allowed: Option<Vec<u32>>,
    bias: Vec<(u32, f32)>,
    stops: Vec<u32>,
    bad: Vec<Vec<u32>>,
    output: Vec<u32>,
}

impl Req {
    fn processors(&self) -> cpu::Processors<'_> {
        cpu::Processors {
            allowed_token_ids: self.allowed.as_deref(),
            bad_words: &self.bad,
            min_tokens: self.params.min_tokens as usize,
            eos_and_stop: &self.stops,
            logit_bias: &self.bias,
            repetition_penalty: self.params.repetition_penalty,
            frequency_penalty: self.params.frequency_penalty,
            presence_penalty: self.params.presence_penalty,
        }
    }
}

fn random_req(r: &mut StdRng, vocab: usize, kind: usize) -> Req {
    let tok = |r: &mut StdRng| r.random_range(0..vocab as u32);
    let mut q = Req {
        params: SlotParams {
            temperature: [0.0, 0.7, 1.0, 1.4][kind % 4],
            top_p: 1.0,
            seed: r.random(),
            repetition_penalty: 1.0,
            ..SlotParams::default()
        },
        ..Req::default()
    };
    // Outputs with repeats, so counts above 1 occur.
    let pool: Vec<u32> = (0..12).map(|_| tok(r)).collect();
    q.output = (0..r.random_range(0..40))
        .map(|_| pool[r.random_range(0..pool.len())])
        .collect();
    let all = kind == 5;
    if kind == 1 || kind == 4 || all {
        q.params.flags |= SLOT_PENALTIES;
        if kind != 4 {
            q.params.repetition_penalty = r.random_range(0.5..2.0);
            q.prompt = (0..r.random_range(1..60)).map(|_| tok(r)).collect();
        }
        q.params.frequency_penalty = r.random_range(-1.0..1.5);
        q.params.presence_penalty = r.random_range(-1.0..1.5);
    }
    if kind == 2 || all {
        q.params.flags |= SLOT_BIAS;
        let mut ids: Vec<u32> = (0..r.random_range(1..40)).map(|_| tok(r)).collect();
        ids.extend(pool.iter().take(3));
        ids.sort();
        ids.dedup();
        q.bias = ids
            .into_iter()
            .map(|t| (t, r.random_range(-100.0f32..100.0)))
            .collect();
        q.params.flags |= SLOT_ALLOWED;
        let mut allowed: Vec<u32> = (0..r.random_range(1..500)).map(|_| tok(r)).collect();
        allowed.extend(pool.iter().take(6));
        q.allowed = Some(allowed);
    }
    if kind == 3 || kind == 4 || all {
        q.params.min_tokens = r.random_range(0..60);
        q.stops = (0..r.random_range(1..6)).map(|_| tok(r)).collect();
        q.params.n_stop = q.stops.len() as i32;
        // Bad words: one single token, one whose prefix ends the output, one that does not.
        let out = q.output.clone();
        q.bad.push(vec![tok(r)]);
        if out.len() >= 2 {
            q.bad
                .push(vec![out[out.len() - 2], out[out.len() - 1], tok(r)]);
        }
        q.bad.push(vec![tok(r), tok(r)]);
        q.params.n_bad = q.bad.len() as i32;
    }
    q.params.n_bias = q.bias.len() as i32;
    q
}

/// Device state for `reqs` (slot i = request i), built through slot_init, and the outputs
/// recorded through sample_commit one token at a time.
struct State {
    tables: Buf<u8>,
    _arrays: Vec<Buf<u8>>,
}

fn device_state(g: &Gpu, reqs: &[Req], vocab: usize) -> State {
    let sizes = SamplingTables::array_bytes(reqs.len(), vocab);
    let arrays: Vec<Buf<u8>> = sizes
        .iter()
        .map(|&b| g.poisoned(b.max(1), 0xA5u8))
        .collect();
    let t = SamplingTables {
        params: arrays[0].ptr,
        counts: arrays[1].ptr,
        prompt_mask: arrays[2].ptr,
        allowed_mask: arrays[3].ptr,
        bias: arrays[4].ptr,
        stops: arrays[5].ptr,
        bad_tokens: arrays[6].ptr,
        bad_lens: arrays[7].ptr,
        history: arrays[8].ptr,
        history_len: arrays[9].ptr,
        vocab: vocab as i32,
        words: vocab.div_ceil(32) as i32,
    };
    let tables = g.upload(as_bytes(&[t]));
    let mut joins = Vec::new();
    let mut data: Vec<i32> = Vec::new();
    for (slot, q) in reqs.iter().enumerate() {
        let mut j = SlotJoin {
            params: q.params,
            slot: slot as i32,
            ..SlotJoin::default()
        };
        let put = |v: &[i32], data: &mut Vec<i32>| {
            let at = data.len() as i32;
            data.extend_from_slice(v);
            at
        };
        let ids = |v: &[u32]| v.iter().map(|&t| t as i32).collect::<Vec<_>>();
        j.prompt_at = put(&ids(&q.prompt), &mut data);
        j.n_prompt = q.prompt.len() as i32;
        if let Some(a) = &q.allowed {
            j.allowed_at = put(&ids(a), &mut data);
            j.n_allowed = a.len() as i32;
        }
        let bias: Vec<i32> = q
            .bias
            .iter()
            .flat_map(|&(t, v)| [t as i32, v.to_bits() as i32])
            .collect();
        j.bias_at = put(&bias, &mut data);
        j.stops_at = put(&ids(&q.stops), &mut data);
        let mut bad: Vec<i32> = q.bad.iter().map(|w| w.len() as i32).collect();
        for w in &q.bad {
            bad.extend(ids(w));
        }
        j.bad_at = put(&bad, &mut data);
        joins.push(j);
    }
    let d_joins = g.upload(as_bytes(&joins));
    let d_data = g.upload(&data);
    let mut init = args::SlotInit {
        tables: tables.ptr,
        joins: d_joins.ptr,
        data: d_data.ptr,
        n_joins: joins.len() as i32,
    };
    g.launch(
        "sampling_state",
        "slot_init",
        (joins.len() as u32, 1, 1),
        (256, 1, 1),
        init.params().as_mut_slice(),
    );
    // Record the outputs: step t commits token t of every request that has one.
    let longest = reqs.iter().map(|q| q.output.len()).max().unwrap_or(0);
    for t in 0..longest {
        let slots: Vec<i32> = reqs
            .iter()
            .enumerate()
            .map(|(i, q)| if t < q.output.len() { i as i32 } else { -1 })
            .collect();
        let toks: Vec<i32> = reqs
            .iter()
            .map(|q| q.output.get(t).map_or(0, |&x| x as i32))
            .collect();
        let (d_slots, d_toks) = (g.upload(&slots), g.upload(&toks));
        let mut commit = args::SampleCommit {
            tokens: d_toks.ptr,
            rows: reqs.len() as i32,
            row_slot: d_slots.ptr,
            tables: tables.ptr,
        };
        g.launch(
            "sampling_state",
            "sample_commit",
            ((reqs.len() as u32).div_ceil(128), 1, 1),
            (128, 1, 1),
            commit.params().as_mut_slice(),
        );
    }
    State {
        tables,
        _arrays: arrays,
    }
}

#[test]
fn logits_processors_and_the_draw_match_the_cpu_reference() {
    let Some(g) = gpu("logits_processors_and_the_draw_match_the_cpu_reference") else {
        return;
    };
    let mut r = rng("logits_processors");
    for e in [Elem::Bf16, Elem::F16] {
        for &vocab in &[1000usize, 32_003, 151_936] {
            // Every kind of request twice, and a padding row (slot -1) at the end.
            let reqs: Vec<Req> = (0..12).map(|i| random_req(&mut r, vocab, i % 6)).collect();
            let state = device_state(&g, &reqs, vocab);
            let rows = reqs.len() + 1;
            let (mut raw, _) = e.random(&mut r, rows * vocab, 12.0);
            for _ in 0..rows {
                let i = r.random_range(0..raw.len());
                raw[i] = e.nan();
            }
            let d_raw = g.upload(&raw);
            let mut slots: Vec<i32> = (0..reqs.len() as i32).collect();
            slots.push(-1);
            let mut steps: Vec<i32> = reqs.iter().map(|q| q.output.len() as i32).collect();
            steps.push(0);
            let (d_slots, d_steps) = (g.upload(&slots), g.upload(&steps));
            let out = g.poisoned(rows * vocab, f32::NAN);
            let temps = g.poisoned(rows, f32::NAN);
            let ks = g.poisoned(rows, -7i32);
            let ps = g.poisoned(rows, f32::NAN);
            let mps = g.poisoned(rows, f32::NAN);
            let seeds = g.poisoned(rows, 7u64);
            let offs = g.poisoned(rows, 7u64);
            let mut process = args::LogitsProcess {
                out: out.ptr,
                raw: d_raw.ptr,
                rows: rows as i32,
                row_slot: d_slots.ptr,
                row_step: d_steps.ptr,
                tables: state.tables.ptr,
                temperatures: temps.ptr,
                top_ks: ks.ptr,
                top_ps: ps.ptr,
                min_ps: mps.ptr,
                seeds: seeds.ptr,
                offsets: offs.ptr,
            };
            let chunks = (vocab.div_ceil(2048) as u32).clamp(1, 64);
            g.launch(
                &e.module("logits_process"),
                &e.kernel("logits_process_bf16"),
                (chunks, rows as u32, 1),
                (256, 1, 1),
                process.params().as_mut_slice(),
            );
            let mut mask = args::LogitsMask {
                logits: out.ptr,
                rows: rows as i32,
                row_slot: d_slots.ptr,
                row_step: d_steps.ptr,
                tables: state.tables.ptr,
            };
            g.launch(
                "sampling_state",
                "logits_mask",
                (rows as u32, 1, 1),
                (128, 1, 1),
                mask.params().as_mut_slice(),
            );
            let got = g.download(&out);
            let (t_got, s_got, o_got) = (g.download(&temps), g.download(&seeds), g.download(&offs));
            for (i, q) in reqs.iter().enumerate() {
                let mut want: Vec<f32> = raw[i * vocab..(i + 1) * vocab]
                    .iter()
                    .map(|&b| e.widen(b))
                    .collect();
                cpu::apply_processors(&mut want, &q.processors(), &q.prompt, &q.output);
                let row = &got[i * vocab..(i + 1) * vocab];
                for (t, (&a, &b)) in row.iter().zip(&want).enumerate() {
                    assert!(
                        a.to_bits() == b.to_bits(),
                        "{} vocab {vocab}, request {i} (kind {}), token {t}: GPU {a} vs CPU {b}",
                        e.name(),
                        i % 6
                    );
                }
                assert_eq!(t_got[i], q.params.temperature);
                assert_eq!(s_got[i], q.params.seed);
                assert_eq!(o_got[i], q.output.len() as u64);
            }
            // The padding row: widened, NaN as -inf, sampled greedily.
            let pad = reqs.len();
            for t in 0..vocab {
                let w = e.widen(raw[pad * vocab + t]);
                let w = if w.is_nan() { f32::NEG_INFINITY } else { w };
                assert_eq!(got[pad * vocab + t].to_bits(), w.to_bits());
            }
            assert_eq!(t_got[pad], 0.0);
            eprintln!(
                "logits processors {} vocab {vocab}: {} requests bit-identical to the CPU reference",
                e.name(),
                reqs.len()
            );
        }
    }
}

#[test]
fn token_logprobs_match_the_cpu_reference() {
    let Some(g) = gpu("token_logprobs_match_the_cpu_reference") else {
        return;
    };
    let mut r = rng("token_logprobs");
    const K: usize = 20;
    for e in [Elem::Bf16, Elem::F16] {
        for &vocab in &[1000usize, 49_152, 151_936] {
            let rows = 9;
            // Coarse values make ties at the top common; a few NaN and -inf.
            let mut raw: Vec<u16> = (0..rows * vocab)
                .map(|_| e.bits((r.random_range(-40i32..40) as f32) * 0.25))
                .collect();
            for _ in 0..rows * 3 {
                let i = r.random_range(0..raw.len());
                raw[i] = if r.random() {
                    e.nan()
                } else {
                    e.bits(f32::NEG_INFINITY)
                };
            }
            let ks: Vec<i32> = vec![0, 1, 5, 20, -1, 20, 3, 20, 7];
            let chosen: Vec<i32> = (0..rows)
                .map(|i| {
                    if i == 6 {
                        vocab as i32 + 3
                    } else {
                        r.random_range(0..vocab as i32)
                    }
                })
                .collect();
            let (d_raw, d_ks, d_ch) = (g.upload(&raw), g.upload(&ks), g.upload(&chosen));
            let lp = g.poisoned(rows, f32::NAN);
            let rank = g.poisoned(rows, -5i32);
            let ids = g.poisoned(rows * K, -5i32);
            let vals = g.poisoned(rows * K, f32::NAN);
            let mut a = args::TokenLogprobs {
                out_logprob: lp.ptr,
                out_rank: rank.ptr,
                out_ids: ids.ptr,
                out_vals: vals.ptr,
                k_stride: K as i32,
                raw: d_raw.ptr,
                vocab: vocab as i32,
                chosen: d_ch.ptr,
                row_k: d_ks.ptr,
            };
            g.launch(
                &e.module("logits_process"),
                &e.kernel("token_logprobs_bf16"),
                (rows as u32, 1, 1),
                (512, 1, 1),
                a.params().as_mut_slice(),
            );
            let (lp, rank, ids, vals) = (
                g.download(&lp),
                g.download(&rank),
                g.download(&ids),
                g.download(&vals),
            );
            for i in 0..rows {
                if ks[i] < 0 {
                    assert!(lp[i].is_nan() && rank[i] == -5, "row {i} was skipped");
                    continue;
                }
                let logits: Vec<f32> = raw[i * vocab..(i + 1) * vocab]
                    .iter()
                    .map(|&b| e.widen(b))
                    .collect();
                let want = cpu::top_logprobs(&logits, chosen[i] as u32, ks[i] as usize);
                let what = format!("{} vocab {vocab} row {i}", e.name());
                assert_eq!(rank[i] as u32, want.rank, "{what}: rank");
                let close = |a: f32, b: f32| a == b || (a - b).abs() <= 1e-3;
                assert!(
                    close(lp[i], want.logprob),
                    "{what}: logprob {} vs {}",
                    lp[i],
                    want.logprob
                );
                for (j, &(id, v)) in want.top.iter().enumerate() {
                    assert_eq!(ids[i * K + j] as u32, id, "{what}: top {j} id");
                    assert!(
                        close(vals[i * K + j], v),
                        "{what}: top {j} {} vs {v}",
                        vals[i * K + j]
                    );
                }
            }
            eprintln!(
                "token logprobs {} vocab {vocab}: identical ids and ranks, values within 1e-3",
                e.name()
            );
        }
    }
}

/// The draw: sample_tokens (every row) and the plain two-kernel path (rows without filters)
/// pick the reference's token for thousands of rows of random parameters.
#[test]
fn both_samplers_draw_the_reference_token_for_thousands_of_rows() {
    let Some(g) = gpu("both_samplers_draw_the_reference_token_for_thousands_of_rows") else {
        return;
    };
    let mut r = rng("sampler_draws");
    let (rows, vocab) = (2048usize, 32_000usize);
    let params: Vec<cpu::SampleParams> = (0..rows)
        .map(|i| cpu::SampleParams {
            temperature: [0.0, 0.3, 0.8, 1.0, 1.7][i % 5],
            top_k: [0, 0, 1, 20, 500][(i / 5) % 5],
            top_p: [1.0, 1.0, 0.95, 0.5, 0.1][(i / 25) % 5],
            min_p: [0.0, 0.0, 0.05, 0.3][(i / 125) % 4],
            seed: r.random(),
            offset: r.random_range(0..100_000),
        })
        .collect();
    let logits: Vec<f32> = (0..rows * vocab)
        .map(|_| r.random_range(-6.0f32..6.0))
        .collect();
    let d_logits = g.upload(&logits);
    let col = |f: &dyn Fn(&cpu::SampleParams) -> f32| params.iter().map(f).collect::<Vec<f32>>();
    let temps = g.upload(&col(&|p| p.temperature));
    let top_ps = g.upload(&col(&|p| p.top_p));
    let min_ps = g.upload(&col(&|p| p.min_p));
    let top_ks = g.upload(&params.iter().map(|p| p.top_k).collect::<Vec<i32>>());
    let seeds = g.upload(&params.iter().map(|p| p.seed).collect::<Vec<u64>>());
    let offs = g.upload(&params.iter().map(|p| p.offset).collect::<Vec<u64>>());
    let tokens = g.poisoned(rows, -1i32);
    let lps = g.poisoned(rows, f32::NAN);
    let mut full = args::SampleTokens {
        out_tokens: tokens.ptr,
        out_logprobs: lps.ptr,
        logits: d_logits.ptr,
        vocab: vocab as i32,
        temperatures: temps.ptr,
        top_ks: top_ks.ptr,
        top_ps: top_ps.ptr,
        min_ps: min_ps.ptr,
        seeds: seeds.ptr,
        offsets: offs.ptr,
        filtered_only: 0,
    };
    g.launch(
        "sampling",
        "sample_tokens",
        (rows as u32, 1, 1),
        (1024, 1, 1),
        full.params().as_mut_slice(),
    );
    let got_full = g.download(&tokens);
    let nchunks = (528 / rows).clamp(4, 128) as i32;
    let partials = g.poisoned(rows * nchunks as usize * 5, -1i32);
    let plain_tokens = g.poisoned(rows, -1i32);
    let mut partial = args::SamplePlainPartial {
        partials: partials.ptr,
        logits: d_logits.ptr,
        vocab: vocab as i32,
        nchunks,
        temperatures: temps.ptr,
        top_ks: top_ks.ptr,
        seeds: seeds.ptr,
        offsets: offs.ptr,
    };
    g.launch(
        "sampling",
        "sample_plain_partial",
        (nchunks as u32, rows as u32, 1),
        (256, 1, 1),
        partial.params().as_mut_slice(),
    );
    let mut finish = args::SamplePlainFinish {
        out_tokens: plain_tokens.ptr,
        out_logprobs: lps.ptr,
        partials: partials.ptr,
        logits: d_logits.ptr,
        vocab: vocab as i32,
        nchunks,
        temperatures: temps.ptr,
        top_ks: top_ks.ptr,
    };
    g.launch(
        "sampling",
        "sample_plain_finish",
        (rows as u32, 1, 1),
        (32, 1, 1),
        finish.params().as_mut_slice(),
    );
    let got_plain = g.download(&plain_tokens);
    let (mut plain_rows, mut mismatches) = (0, Vec::new());
    for (i, p) in params.iter().enumerate() {
        let want = cpu::sample_token(&logits[i * vocab..(i + 1) * vocab], p);
        if got_full[i] as usize != want {
            mismatches.push(format!(
                "sample_tokens row {i} {p:?}: {} vs {want}",
                got_full[i]
            ));
        }
        let filters = (p.top_k > 1 && (p.top_k as usize) < vocab) || p.top_p < 1.0 || p.min_p > 0.0;
        if p.is_greedy() || !filters {
            plain_rows += 1;
            if got_plain[i] as usize != want {
                mismatches.push(format!("plain row {i} {p:?}: {} vs {want}", got_plain[i]));
            }
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} mismatches:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
    eprintln!(
        "draws: {rows} rows (sample_tokens) and {plain_rows} plain rows pick the reference's token"
    );
}

#[test]
fn token_bitmask_matches_the_cpu_reference() {
    let Some(g) = gpu("token_bitmask_matches_the_cpu_reference") else {
        return;
    };
    let mut r = rng("token_bitmask");
    for &vocab in &[1000usize, 49_152, 151_937] {
        let words = vocab.div_ceil(32);
        let (rows, buffer_rows, n_masks) = (11usize, 13usize, 5usize);
        // Masks from all-clear to all-set, and random ones; bits past the vocabulary set, as a
        // careless producer would leave them.
        let masks: Vec<u32> = (0..n_masks * words)
            .map(|i| match i / words {
                0 => 0,
                1 => u32::MAX,
                _ => r.random(),
            })
            .collect();
        // Rows without a grammar (-1) stay as they are; the rest pick a mask, some the same.
        let row_mask: Vec<i32> = (0..buffer_rows)
            .map(|_| r.random_range(-1..n_masks as i32))
            .collect();
        let logits: Vec<f32> = (0..buffer_rows * vocab)
            .map(|i| match i % 97 {
                0 => f32::NEG_INFINITY,
                _ => r.random_range(-30.0..30.0f32),
            })
            .collect();
        let d_logits = g.upload(&logits);
        let d_masks = g.upload(&masks);
        let d_rows = g.upload(&row_mask);
        let mut a = args::TokenBitmask {
            logits: d_logits.ptr,
            rows: rows as i32,
            vocab: vocab as i32,
            masks: d_masks.ptr,
            row_mask: d_rows.ptr,
        };
        g.launch(
            "sampling_state",
            "token_bitmask",
            (buffer_rows as u32, 1, 1),
            (256, 1, 1),
            a.params().as_mut_slice(),
        );
        let got = g.download(&d_logits);
        for row in 0..buffer_rows {
            let mut want = logits[row * vocab..(row + 1) * vocab].to_vec();
            let m = row_mask[row];
            // Rows past `rows` (a graph's padding) are never touched.
            if row < rows && m >= 0 {
                let m = m as usize;
                cpu::apply_token_bitmask(&mut want, &masks[m * words..(m + 1) * words]);
            }
            for (t, (a, b)) in got[row * vocab..(row + 1) * vocab]
                .iter()
                .zip(&want)
                .enumerate()
            {
                assert!(
                    a.to_bits() == b.to_bits(),
                    "vocab {vocab}, row {row} (mask {m}), token {t}: GPU {a} vs CPU {b}"
                );
            }
        }
        eprintln!("token_bitmask vocab {vocab}: {rows} rows bit-identical to the CPU reference");
    }
}
