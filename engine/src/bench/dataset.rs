//! Synthetic prompt sets for `rvllm bench`, made of token ids: vLLM's `prefix_repetition`
//! (many prompts sharing a few long prefixes, the prefix cache's workload) and the
//! prefix-cache hit rate read from a server's /metrics.
use std::ops::Range;

use anyhow::{ensure, Result};
use clap::Args;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// `--dataset-name prefix_repetition`'s shape, with vLLM's flag names and defaults.
#[derive(Args, Clone, Debug, PartialEq, Eq)]
pub struct PrefixRepetitionArgs {
    /// prefix_repetition: tokens of each shared prefix.
    #[arg(long, default_value_t = 256)]
    pub prefix_repetition_prefix_len: usize,
    /// prefix_repetition: tokens of each prompt's own suffix, after its prefix.
    #[arg(long, default_value_t = 256)]
    pub prefix_repetition_suffix_len: usize,
    /// prefix_repetition: how many distinct prefixes the prompts share.
    #[arg(long, default_value_t = 10)]
    pub prefix_repetition_num_prefixes: usize,
    /// prefix_repetition: tokens to generate per request.
    #[arg(long, default_value_t = 128)]
    pub prefix_repetition_output_len: usize,
}

impl Default for PrefixRepetitionArgs {
    fn default() -> Self {
        Self {
            prefix_repetition_prefix_len: 256,
            prefix_repetition_suffix_len: 256,
            prefix_repetition_num_prefixes: 10,
            prefix_repetition_output_len: 128,
        }
    }
}

fn random_ids(rng: &mut StdRng, len: usize, ids: &Range<u32>) -> Vec<u32> {
    (0..len).map(|_| rng.random_range(ids.clone())).collect()
}

/// `num_prompts` prompts of `prefix_len + suffix_len` token ids drawn from `ids`: prompt `j`
/// starts with prefix `j % num_prefixes` (so each prefix is shared by `num_prompts /
/// num_prefixes` prompts, one more for the first `num_prompts % num_prefixes`) and ends with
/// its own random suffix; the order is shuffled, as vLLM does, so that prompts sharing a
/// prefix do not arrive together.
pub fn prefix_repetition_prompts(
    num_prompts: usize,
    shape: &PrefixRepetitionArgs,
    ids: Range<u32>,
    seed: u64,
) -> Result<Vec<Vec<u32>>> {
    let num_prefixes = shape.prefix_repetition_num_prefixes;
    ensure!(
        num_prefixes >= 1 && num_prefixes <= num_prompts,
        "--prefix-repetition-num-prefixes {num_prefixes} must be between 1 and --num-prompts \
         ({num_prompts}), so that every prefix has a prompt"
    );
    ensure!(
        shape.prefix_repetition_prefix_len + shape.prefix_repetition_suffix_len > 0,
        "--prefix-repetition-prefix-len and --prefix-repetition-suffix-len are both 0: the \
         prompts would be empty"
    );
    ensure!(!ids.is_empty(), "no token ids to draw prompts from");
    let mut rng = StdRng::seed_from_u64(seed);
    let prefixes: Vec<Vec<u32>> = (0..num_prefixes)
        .map(|_| random_ids(&mut rng, shape.prefix_repetition_prefix_len, &ids))
        .collect();
    let mut prompts: Vec<Vec<u32>> = (0..num_prompts)
        .map(|j| {
            let mut p = prefixes[j % num_prefixes].clone();
            p.extend(random_ids(
                &mut rng,
                shape.prefix_repetition_suffix_len,
                &ids,
            ));
            p
        })
        .collect();
    prompts.shuffle(&mut rng);
    Ok(prompts)
}

/// Prefix-cache hits and queries (tokens) from a Prometheus text page: rvllm's
/// `rvllm:prefix_cache_*_total` or vLLM's `vllm:prefix_cache_*_total`, summed over label
/// sets. None when the page has neither (a server without prefix-cache metrics).
pub fn prefix_cache_counters(metrics: &str) -> Option<(f64, f64)> {
    // Summed over label sets (one a model). rvllm exports both names, so its own series is
    // read when present and vLLM's otherwise (a vLLM server).
    let sum = |series: &str| -> Option<f64> {
        let mut found = None;
        for line in metrics.lines().filter(|l| !l.starts_with('#')) {
            if line.split(['{', ' ']).next() != Some(series) {
                continue;
            }
            if let Some(v) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
                *found.get_or_insert(0.0) += v;
            }
        }
        found
    };
    ["rvllm", "vllm"].iter().find_map(|ns| {
        Some((
            sum(&format!("{ns}:prefix_cache_hits_total"))?,
            sum(&format!("{ns}:prefix_cache_queries_total"))?,
        ))
    })
}

/// "12.3 % (hits / queries tokens)", or a note that nothing was looked up.
pub fn describe_hit_rate(hits: f64, queries: f64) -> String {
    if queries <= 0.0 {
        return "no lookups (prefix caching off, or no request read the cache)".into();
    }
    format!(
        "{:.2} % ({hits:.0} of {queries:.0} prompt tokens)",
        100.0 * hits / queries
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_repetition_has_the_stated_shape() {
        let shape = PrefixRepetitionArgs {
            prefix_repetition_prefix_len: 24,
            prefix_repetition_suffix_len: 8,
            prefix_repetition_num_prefixes: 3,
            prefix_repetition_output_len: 5,
        };
        let prompts = prefix_repetition_prompts(10, &shape, 100..200, 7).unwrap();
        assert_eq!(prompts.len(), 10);
        assert!(prompts.iter().all(|p| p.len() == 32));
        assert!(prompts.iter().flatten().all(|t| (100..200).contains(t)));
        let mut groups = std::collections::HashMap::<&[u32], Vec<&[u32]>>::new();
        for p in &prompts {
            groups.entry(&p[..24]).or_default().push(&p[24..]);
        }
        let mut sizes: Vec<usize> = groups.values().map(Vec::len).collect();
        sizes.sort();
        assert_eq!(sizes, vec![3, 3, 4], "3 prefixes over 10 prompts");
        let suffixes: std::collections::HashSet<&[u32]> =
            groups.values().flatten().copied().collect();
        assert_eq!(suffixes.len(), 10, "every suffix its own");
        // Shuffled: the first prompts do not simply cycle through the prefixes.
        let firsts: Vec<&[u32]> = prompts.iter().map(|p| &p[..24]).collect();
        assert!(
            firsts.windows(3).any(|w| w[0] == w[1] || w[0] == w[2]),
            "not shuffled"
        );
        assert_eq!(
            prompts,
            prefix_repetition_prompts(10, &shape, 100..200, 7).unwrap(),
            "seeded"
        );
    }

    #[test]
    fn prefix_repetition_refuses_impossible_shapes() {
        let mut shape = PrefixRepetitionArgs::default();
        assert!(
            prefix_repetition_prompts(5, &shape, 0..10, 0).is_err(),
            "10 prefixes, 5 prompts"
        );
        shape.prefix_repetition_num_prefixes = 0;
        assert!(prefix_repetition_prompts(5, &shape, 0..10, 0).is_err());
        shape.prefix_repetition_num_prefixes = 1;
        shape.prefix_repetition_prefix_len = 0;
        shape.prefix_repetition_suffix_len = 0;
        assert!(prefix_repetition_prompts(5, &shape, 0..10, 0).is_err());
    }

    #[test]
    fn hit_counters_are_read_from_either_prefix() {
        let ours = "# TYPE rvllm:prefix_cache_hits_total counter\n\
                    rvllm:prefix_cache_hits_total{model_name=\"m\"} 32\n\
                    rvllm:prefix_cache_queries_total{model_name=\"m\"} 96\n";
        assert_eq!(prefix_cache_counters(ours), Some((32.0, 96.0)));
        let vllm = "vllm:prefix_cache_queries_total{engine=\"0\",model_name=\"m\"} 10.0\n\
                    vllm:prefix_cache_hits_total{engine=\"0\",model_name=\"m\"} 5.0\n\
                    vllm:prefix_cache_hits_total{engine=\"1\",model_name=\"m\"} 1.0\n\
                    vllm:prefix_cache_queries_created{model_name=\"m\"} 1.7e9\n";
        assert_eq!(prefix_cache_counters(vllm), Some((6.0, 10.0)));
        // rvllm's page carries both names for the same counts: read once, not twice.
        let both = format!("{ours}{}", ours.replace("rvllm:", "vllm:"));
        assert_eq!(prefix_cache_counters(&both), Some((32.0, 96.0)));
        assert_eq!(
            prefix_cache_counters("rvllm:num_requests_running 0\n"),
            None
        );
        assert!(describe_hit_rate(32.0, 96.0).starts_with("33.33 %"));
        assert!(describe_hit_rate(0.0, 0.0).starts_with("no lookups"));
    }
}
