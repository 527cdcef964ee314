//! `rvllm bench serve-merge`: one result out of the saved results of runs made one after
//! another, such as the shards of `rvllm bench serve --shard I/N` (a long run split because
//! one command may only run so long). The per-request measurements of every part are pooled
//! and the statistics recomputed; the duration is the parts' durations added up, which is
//! the whole run's when the parts ran back to back at the same concurrency (at
//! `--max-concurrency 1` the requests are sequential anyway).
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use clap::Args;
use serde_json::{json, Value};

use super::serve::{print_table, summarize, unix_now, RequestResult};

#[derive(Args, Clone, Debug)]
pub struct ServeMergeArgs {
    /// Results saved by `rvllm bench serve --save-result`, in the order they ran.
    #[arg(required = true, num_args = 1..)]
    pub results: Vec<PathBuf>,
    /// Where to write the merged result (JSON); printed only when left out.
    #[arg(long)]
    pub output: Option<PathBuf>,
}

/// Fields that must agree for parts to belong to one run.
const SAME_RUN: &[&str] = &[
    "model_id",
    "endpoint",
    "base_url",
    "request_rate",
    "max_concurrency",
    "random_input_len",
    "random_output_len",
    "dataset_name",
    "structured_output_ratio",
    "prefix_repetition_prefix_len",
    "prefix_repetition_suffix_len",
    "prefix_repetition_num_prefixes",
    "prefix_repetition_output_len",
];

pub fn run(args: ServeMergeArgs) -> Result<()> {
    let parts: Vec<Value> = args
        .results
        .iter()
        .map(|p| read_part(p))
        .collect::<Result<_>>()?;
    let merged = merge(&parts, &args.results)?;
    if let Some(out) = &args.output {
        std::fs::write(out, serde_json::to_string_pretty(&merged)?)
            .with_context(|| format!("writing {}", out.display()))?;
        println!("Merged result written to {}", out.display());
    }
    Ok(())
}

fn read_part(path: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is not JSON (expected a result saved by `rvllm bench serve --save-result`)",
            path.display()
        )
    })
}

/// The requests of one saved part, rebuilt from its per-request arrays.
fn requests_of(part: &Value, name: &str) -> Result<Vec<RequestResult>> {
    let array = |key: &str| -> Result<&Vec<Value>> {
        part[key].as_array().with_context(|| {
            format!(
                "{name} has no per-request `{key}` array: save it again with a current \
                 `rvllm bench serve --save-result`"
            )
        })
    };
    let (ins, outs, ttfts, e2es, itls, errors) = (
        array("input_lens")?,
        array("output_lens")?,
        array("ttfts")?,
        array("e2els")?,
        array("itls")?,
        array("errors")?,
    );
    let n = ins.len();
    for (key, a) in [
        ("output_lens", outs),
        ("ttfts", ttfts),
        ("e2els", e2es),
        ("itls", itls),
        ("errors", errors),
    ] {
        ensure!(
            a.len() == n,
            "{name}: `{key}` has {} entries but `input_lens` {n}; the file is damaged",
            a.len()
        );
    }
    let num = |v: &Value, key: &str, i: usize| -> Result<f64> {
        v.as_f64()
            .with_context(|| format!("{name}: `{key}`[{i}] is not a number"))
    };
    (0..n)
        .map(|i| {
            let error = errors[i].as_str().unwrap_or_default().to_string();
            Ok(RequestResult {
                ok: error.is_empty(),
                error,
                prompt_tokens: num(&ins[i], "input_lens", i)? as usize,
                output_tokens: num(&outs[i], "output_lens", i)? as usize,
                ttft_s: num(&ttfts[i], "ttfts", i)?,
                itl_s: itls[i]
                    .as_array()
                    .with_context(|| format!("{name}: `itls`[{i}] is not a list"))?
                    .iter()
                    .map(|v| num(v, "itls", i))
                    .collect::<Result<_>>()?,
                e2e_s: num(&e2es[i], "e2els", i)?,
                ..RequestResult::default()
            })
        })
        .collect()
}

/// Pools the parts' requests and recomputes the statistics; prints the usual table.
pub fn merge(parts: &[Value], names: &[PathBuf]) -> Result<Value> {
    ensure!(!parts.is_empty(), "give at least one result file");
    let first = &parts[0];
    let mut results = Vec::new();
    let mut duration = 0.0;
    let mut shards = Vec::new();
    // Prefix-cache tokens (hits, queries), when every part has them.
    let mut cache: Option<(f64, f64)> = Some((0.0, 0.0));
    for (part, path) in parts.iter().zip(names) {
        let counts = part["prefix_cache_hits"]
            .as_f64()
            .zip(part["prefix_cache_queries"].as_f64());
        cache = cache.zip(counts).map(|((h, q), (ph, pq))| (h + ph, q + pq));
        let name = path.display().to_string();
        for key in SAME_RUN {
            if part[key] != first[key] {
                bail!(
                    "{name} and {} differ in `{key}` ({} against {}): they are not parts of \
                     one run",
                    names[0].display(),
                    part[key],
                    first[key]
                );
            }
        }
        if let Some(shard) = part.get("shard").filter(|s| !s.is_null()) {
            if shards.contains(shard) {
                bail!("{name} repeats shard {shard}: each shard must be merged once");
            }
            shards.push(shard.clone());
        }
        duration += part["duration"]
            .as_f64()
            .with_context(|| format!("{name} has no `duration`"))?;
        results.extend(requests_of(part, &name)?);
    }
    let summary = summarize(&results, duration);
    let model = first["model_id"].as_str().unwrap_or("?");
    let rate = first["request_rate"].as_str().unwrap_or("inf");
    let concurrency = first["max_concurrency"].as_u64().map(|c| c as usize);
    println!(
        "Merged {} results ({} requests, durations added up)",
        parts.len(),
        results.len()
    );
    print_table(&summary, concurrency, rate, model);
    let mut out = summary.to_json();
    let obj = out.as_object_mut().context("summary is an object")?;
    for key in SAME_RUN {
        obj.insert(key.to_string(), first[*key].clone());
    }
    if let Some((hits, queries)) = cache {
        println!(
            "Prefix cache hit rate (server /metrics, during the runs): {}",
            super::dataset::describe_hit_rate(hits, queries)
        );
        obj.insert("prefix_cache_hits".into(), json!(hits));
        obj.insert("prefix_cache_queries".into(), json!(queries));
        if queries > 0.0 {
            obj.insert("prefix_cache_hit_rate".into(), json!(hits / queries));
        }
    }
    obj.insert("date".into(), json!(unix_now()));
    obj.insert("num_prompts".into(), json!(results.len()));
    obj.insert(
        "merged_from".into(),
        json!(names
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()),
    );
    obj.insert("shards".into(), json!(shards));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(shard: usize, ttfts: &[f64], duration: f64) -> Value {
        let n = ttfts.len();
        json!({
            "model_id": "m", "endpoint": "/v1/completions", "base_url": "http://x",
            "request_rate": "inf", "max_concurrency": 1, "random_input_len": 8,
            "random_output_len": 3, "duration": duration, "shard": [shard, 2],
            "input_lens": vec![8; n], "output_lens": vec![3; n], "ttfts": ttfts,
            "e2els": ttfts.iter().map(|t| t + 0.2).collect::<Vec<_>>(),
            "itls": vec![vec![0.1, 0.1]; n], "errors": vec![""; n],
        })
    }

    #[test]
    fn merging_shards_pools_requests_and_adds_durations() {
        let a = part(0, &[0.01, 0.03], 1.0);
        let b = part(1, &[0.02], 0.5);
        let names = [PathBuf::from("a.json"), PathBuf::from("b.json")];
        let m = merge(&[a, b], &names).unwrap();
        assert_eq!(m["completed"], 3);
        assert_eq!(m["duration"], 1.5);
        assert_eq!(m["total_output_tokens"], 9);
        assert!((m["mean_ttft_ms"].as_f64().unwrap() - 20.0).abs() < 1e-9);
        assert!((m["median_ttft_ms"].as_f64().unwrap() - 20.0).abs() < 1e-9);
        // TPOT = (e2e - ttft) / (tokens - 1) = 0.2 / 2.
        assert!((m["mean_tpot_ms"].as_f64().unwrap() - 100.0).abs() < 1e-9);
        assert!((m["request_throughput"].as_f64().unwrap() - 2.0).abs() < 1e-12);
    }

    #[test]
    fn refuses_parts_of_different_runs_repeated_shards_and_old_files() {
        let names = [PathBuf::from("a.json"), PathBuf::from("b.json")];
        let mut other = part(1, &[0.02], 0.5);
        other["max_concurrency"] = json!(4);
        let e = merge(&[part(0, &[0.01], 1.0), other], &names).unwrap_err();
        assert!(e.to_string().contains("max_concurrency"), "{e}");
        let e = merge(&[part(0, &[0.01], 1.0), part(0, &[0.01], 1.0)], &names).unwrap_err();
        assert!(e.to_string().contains("repeats shard"), "{e}");
        let mut old = part(0, &[0.01], 1.0);
        old.as_object_mut().unwrap().remove("e2els");
        let e = merge(&[old], &names[..1]).unwrap_err();
        assert!(e.to_string().contains("e2els"), "{e}");
    }
}
