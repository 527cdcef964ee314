//! The streaming stop-string search against a naive reference (the whole text searched for
//! every stop string after every piece, the earliest match winning), on random pieces and
//! stop strings that share characters of 1 to 4 bytes, and once through a real tokenizer.
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;

/// What the server did before the automaton: find each stop string in the whole text, take
/// the earliest (the first listed at equal starts), and hold back the longest one's length
/// less one characters while streaming.
struct Reference {
    stops: Vec<String>,
    include: bool,
    hold: usize,
    text: String,
    emitted: usize,
}

impl Reference {
    fn new(p: &SamplingParams) -> Self {
        let longest = p.stop.iter().map(|s| s.chars().count()).max().unwrap_or(0);
        Self {
            stops: p.stop.iter().filter(|s| !s.is_empty()).cloned().collect(),
            include: p.include_stop_str_in_output,
            hold: if p.include_stop_str_in_output {
                0
            } else {
                longest.saturating_sub(1)
            },
            text: String::new(),
            emitted: 0,
        }
    }

    fn push(&mut self, piece: &str) -> Option<String> {
        self.text.push_str(piece);
        let (pos, s) = self
            .stops
            .iter()
            .filter_map(|s| self.text.find(s.as_str()).map(|p| (p, s.clone())))
            .min_by_key(|(p, _)| *p)?;
        self.text
            .truncate(if self.include { pos + s.len() } else { pos });
        Some(s)
    }

    fn take(&mut self, finished: bool) -> String {
        let mut end = self.text.len();
        if !finished && self.hold > 0 {
            end = self
                .text
                .char_indices()
                .rev()
                .nth(self.hold - 1)
                .map(|(i, _)| i)
                .unwrap_or(0);
        }
        if end <= self.emitted {
            return String::new();
        }
        let s = self.text[self.emitted..end].to_string();
        self.emitted = end;
        s
    }
}

const CHARS: [&str; 6] = ["a", "b", "a", " ", "é", "😀"];

fn random_string(rng: &mut StdRng, max_chars: usize) -> String {
    let n = rng.random_range(0..=max_chars);
    (0..n)
        .map(|_| CHARS[rng.random_range(0..CHARS.len())])
        .collect()
}

#[test]
fn streaming_search_matches_the_naive_reference() {
    let mut rng = StdRng::seed_from_u64(7);
    let mut stopped = 0;
    for case in 0..3000 {
        let stop: Vec<String> = (0..rng.random_range(0..6))
            .map(|_| random_string(&mut rng, 4))
            .collect();
        let params = SamplingParams {
            stop,
            include_stop_str_in_output: rng.random_bool(0.3),
            ..Default::default()
        };
        let mut seq = SeqOutput::new(0, None, &[], &params);
        let mut reference = Reference::new(&params);
        let mut sent = (String::new(), String::new());
        for _ in 0..rng.random_range(1..40) {
            let piece = random_string(&mut rng, 3);
            let got = seq.push_piece(&piece).map(|k| seq.stops.strings[k].clone());
            let want = reference.push(&piece);
            assert_eq!(
                got, want,
                "case {case}: {params:?}, text {:?}",
                reference.text
            );
            assert_eq!(seq.text, reference.text, "case {case}: {params:?}");
            let finished = got.is_some();
            sent.0 += &seq.take_emittable(finished);
            sent.1 += &reference.take(finished);
            assert_eq!(sent.0, sent.1, "case {case}: {params:?}: what was streamed");
            if finished {
                stopped += 1;
                break;
            }
        }
        assert_eq!(
            seq.take_emittable(true),
            reference.take(true),
            "case {case}"
        );
    }
    assert!(stopped > 500, "too few cases hit a stop string: {stopped}");
}

#[test]
fn earliest_start_wins_within_one_piece_and_ties_go_to_the_first_listed() {
    let params = |stop: &[&str]| SamplingParams {
        stop: stop.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    // "bc" ends first, but "abcd" starts earlier in the same piece.
    let mut seq = SeqOutput::new(0, None, &[], &params(&["bc", "abcd"]));
    assert_eq!(seq.push_piece("xabcd"), Some(1));
    assert_eq!(seq.text, "x");
    // Across pieces only what is complete counts: "bc" completes before "abcd" can.
    let mut seq = SeqOutput::new(0, None, &[], &params(&["abcd", "bc"]));
    assert_eq!(seq.push_piece("xab"), None);
    assert_eq!(seq.push_piece("c"), Some(1));
    assert_eq!(seq.text, "xa");
    // Same start: the first in the request's list.
    let mut seq = SeqOutput::new(0, None, &[], &params(&["ab", "a"]));
    assert_eq!(seq.push_piece("zab"), Some(0));
    assert_eq!(seq.text, "z");
}

#[test]
fn the_sequences_of_a_request_share_their_stop_strings() {
    let params = SamplingParams {
        stop: vec!["x".repeat(1000); 64],
        n: 16,
        ..Default::default()
    };
    let seqs = SeqOutput::for_request(16, None, &[], &params);
    assert_eq!(seqs.len(), 16);
    assert!(seqs.iter().all(|s| Arc::ptr_eq(&s.stops, &seqs[0].stops)));
    assert_eq!(seqs[3].index, 3);
}

fn tiny_tokenizer() -> Arc<Tokenizer> {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny/llama3");
    Arc::new(
        Tokenizer::from_file(
            &dir.join("tokenizer.json"),
            Some(&dir.join("tokenizer_config.json")),
        )
        .unwrap(),
    )
}

fn core_output(ids: &[u32], last: bool) -> EngineCoreOutput {
    EngineCoreOutput {
        req_id: 1,
        new_token_ids: ids.to_vec(),
        new_logprobs: vec![],
        prompt_logprobs: None,
        finish_reason: last.then_some(FinishReason::Length),
        stop_token: None,
    }
}

/// Real token pieces: a stop string spread over several tokens is found, the text streamed
/// before it never holds any of it, and include_stop_str_in_output keeps it.
#[test]
fn stop_strings_across_real_token_boundaries() {
    let tok = tiny_tokenizer();
    let text = "The quick brown fox jumps over the lazy dog again";
    let ids = tok.encode(text, false).unwrap();
    assert!(ids.len() > 8, "{ids:?}");
    for include in [false, true] {
        let params = SamplingParams {
            stop: vec!["lazy dog".into(), "s over t".into(), "never".into()],
            include_stop_str_in_output: include,
            ..Default::default()
        };
        let mut seq = SeqOutput::for_request(1, Some(tok.clone()), &[], &params).remove(0);
        let mut streamed = String::new();
        let mut reason = None;
        for (i, id) in ids.iter().enumerate() {
            let (d, stopped) = seq.process(core_output(&[*id], i + 1 == ids.len()));
            streamed += &d.text;
            if stopped {
                reason = d.stop_reason;
                break;
            }
            // Held back until it cannot be a stop string's start; with
            // include_stop_str_in_output nothing is cut, so nothing is held back.
            assert!(
                include || !streamed.contains("s over"),
                "held back text was sent: {streamed:?}"
            );
        }
        assert_eq!(reason, Some(StopReason::Str("s over t".into())));
        let want = if include {
            "The quick brown fox jumps over t"
        } else {
            "The quick brown fox jump"
        };
        assert_eq!(streamed, want);
    }
}
