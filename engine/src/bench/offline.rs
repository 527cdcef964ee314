//! `rvllm bench latency` and `rvllm bench throughput`: random prompts through the offline
//! engine, printed as vLLM prints them, plus the device ceilings measured in the same run.
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use clap::Args;
use rand::{Rng, SeedableRng};
use serde_json::json;

use super::dataset::{describe_hit_rate, prefix_repetition_prompts, PrefixRepetitionArgs};
use super::structured::{self, StructuredOutputArgs};
use crate::engine::{EngineArgs, FinishReason, KvCacheDtypeFlag, Llm};
use crate::models::config::ModelConfig;
use crate::sampling::{SamplingParams, StructuredOutput};

#[derive(Args, Clone, Debug)]
pub struct LatencyArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub kv_cache: KvCacheDtypeFlag,
    #[arg(long, default_value_t = 32)]
    pub input_len: usize,
    #[arg(long, default_value_t = 128)]
    pub output_len: usize,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 3)]
    pub num_iters_warmup: usize,
    #[arg(long, default_value_t = 5)]
    pub num_iters: usize,
    #[arg(long)]
    pub output_json: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Whether request `i` is one of an evenly spread `fraction` of them (shifted by `phase`).
fn picked(i: usize, fraction: f64, phase: f64) -> bool {
    let at = |k: usize| (k as f64 * fraction + phase).floor();
    fraction > 0.0 && at(i + 1) != at(i)
}

#[derive(Args, Clone, Debug)]
pub struct ThroughputArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub kv_cache: KvCacheDtypeFlag,
    /// random (--input-len random token ids per prompt) or prefix_repetition (prompts
    /// sharing a few long prefixes, shaped by the --prefix-repetition-* flags).
    #[arg(long, default_value = "random")]
    pub dataset_name: String,
    /// random: prompt tokens.
    #[arg(long, default_value_t = 256)]
    pub input_len: usize,
    /// random: tokens to generate per request (prefix_repetition takes
    /// --prefix-repetition-output-len).
    #[arg(long, default_value_t = 256)]
    pub output_len: usize,
    #[command(flatten)]
    pub prefix_repetition: PrefixRepetitionArgs,
    #[arg(long, default_value_t = 1000)]
    pub num_prompts: usize,
    #[arg(long)]
    pub output_json: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Share of the requests (spread evenly) that ask for `logprobs: 5`: a mixed workload,
    /// where those rows must not slow the others.
    #[arg(long, default_value_t = 0.0)]
    pub logprobs_fraction: f64,
    /// Share of the requests (spread evenly, offset from the logprob ones) with a
    /// repetition penalty of 1.1.
    #[arg(long, default_value_t = 0.0)]
    pub penalty_fraction: f64,
    /// A share of the requests constrained by a JSON schema, as `bench serve` sends them;
    /// the step profile then counts the steps with grammar masks beside the graph replays.
    #[command(flatten)]
    pub structured: StructuredOutputArgs,
}

/// The ids random prompts are drawn from: the lowest are skipped, since special tokens live
/// there in most vocabularies.
fn prompt_id_range(vocab: usize) -> std::ops::Range<u32> {
    (vocab / 100).min(1000) as u32..vocab as u32
}

fn random_prompts(n: usize, len: usize, vocab: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let ids = prompt_id_range(vocab);
    (0..n)
        .map(|_| (0..len).map(|_| rng.random_range(ids.clone())).collect())
        .collect()
}

/// `--dataset-name`'s prompts and tokens to generate per request.
fn throughput_prompts(args: &ThroughputArgs, vocab: usize) -> Result<(Vec<Vec<u32>>, usize)> {
    match args.dataset_name.as_str() {
        "random" => Ok((
            random_prompts(args.num_prompts, args.input_len, vocab, args.seed),
            args.output_len,
        )),
        "prefix_repetition" => Ok((
            prefix_repetition_prompts(
                args.num_prompts,
                &args.prefix_repetition,
                prompt_id_range(vocab),
                args.seed,
            )?,
            args.prefix_repetition.prefix_repetition_output_len,
        )),
        other => anyhow::bail!("unknown --dataset-name `{other}`: use random or prefix_repetition"),
    }
}

/// Bytes one decoded token reads from the weights, counted as GPU.md does for the batch-1
/// ceiling: every parameter, embedding table included, so figures compare with the peers';
/// a mixture of experts counts only the experts a token is routed to, and `--quantization
/// fp8` one byte for each projection weight (the embedding and LM head stay `elem_bytes`).
pub fn weight_bytes(c: &ModelConfig, elem_bytes: usize) -> u64 {
    let active = c.num_active_parameters();
    if !c.family.quant.online_fp8 {
        return active * elem_bytes as u64;
    }
    let embed = c.vocab_size as u64 * c.hidden_size as u64;
    let tables = if c.tie_word_embeddings {
        embed
    } else {
        2 * embed
    };
    tables * elem_bytes as u64 + (active - tables)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// Copy bandwidth and bf16 GEMM rate of the device, measured now (CUDA builds only).
fn device_ceilings(llm: &Llm) -> Option<(f64, f64)> {
    let _ = llm;
    #[cfg(feature = "cuda")]
    if llm.core.executor.device_name().starts_with("cuda") {
        return crate::backend::cuda::measure_ceilings().ok();
    }
    None
}

pub fn run_latency(args: LatencyArgs) -> Result<()> {
    let mut llm = Llm::new(&args.kv_cache.apply(&args.engine))?;
    let cfg = llm.core.config.clone();
    let params = SamplingParams {
        temperature: 1.0,
        ignore_eos: true,
        max_tokens: Some(args.output_len),
        seed: Some(args.seed),
        ..SamplingParams::default()
    };
    let prompts = random_prompts(args.batch_size, args.input_len, cfg.vocab_size, args.seed);
    for _ in 0..args.num_iters_warmup {
        llm.generate(&prompts, std::slice::from_ref(&params), |_| {})?;
    }
    let mut latencies = Vec::new();
    let mut ttfts = Vec::new();
    let mut decode_rates = Vec::new();
    for _ in 0..args.num_iters.max(1) {
        let t0 = Instant::now();
        let outs = llm.generate(&prompts, std::slice::from_ref(&params), |_| {})?;
        let lat = t0.elapsed().as_secs_f64();
        let ttft = outs
            .iter()
            .filter_map(|o| o.time_to_first_token)
            .map(|d| d.as_secs_f64())
            .fold(0.0, f64::max);
        latencies.push(lat);
        ttfts.push(ttft);
        if args.output_len > 1 && lat > ttft {
            decode_rates.push((args.output_len - 1) as f64 / (lat - ttft));
        }
    }
    let mut sorted = latencies.clone();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let avg = latencies.iter().sum::<f64>() / latencies.len() as f64;
    let avg_ttft = ttfts.iter().sum::<f64>() / ttfts.len() as f64;
    let decode = if decode_rates.is_empty() {
        0.0
    } else {
        decode_rates.iter().sum::<f64>() / decode_rates.len() as f64
    };
    println!("Avg latency: {avg:.4} seconds");
    for p in [10.0, 25.0, 50.0, 75.0, 90.0, 99.0] {
        println!(
            "{p:.0}% percentile latency: {:.4} seconds",
            percentile(&sorted, p)
        );
    }
    println!(
        "Avg time to first token ({} x {} tokens): {:.2} ms",
        args.batch_size,
        args.input_len,
        avg_ttft * 1e3
    );
    println!(
        "Decode: {decode:.1} steps/s per sequence, {:.1} tok/s over the batch",
        decode * args.batch_size as f64
    );
    print_step_profile(&llm);
    let mut out = json!({
        "avg_latency": avg,
        "latencies": latencies,
        "percentiles": {"50": percentile(&sorted, 50.0), "90": percentile(&sorted, 90.0), "99": percentile(&sorted, 99.0)},
        "avg_ttft_s": avg_ttft,
        "decode_steps_per_s": decode,
        "decode_tokens_per_s": decode * args.batch_size as f64,
        "batch_size": args.batch_size, "input_len": args.input_len, "output_len": args.output_len,
        "device": llm.core.executor.device_name(),
    });
    if let Some((copy_bw, gemm_flops)) = device_ceilings(&llm) {
        let bytes = weight_bytes(&cfg, 2) as f64;
        let ceiling = copy_bw / bytes;
        println!(
            "Device ceilings (measured now): copy {:.2} TB/s, bf16 GEMM {:.0} TFLOP/s; weights {:.2} GB \
             -> batch-1 decode ceiling {ceiling:.1} tok/s; achieved {:.1}% of it",
            copy_bw / 1e12, gemm_flops / 1e12, bytes / 1e9, 100.0 * decode / ceiling
        );
        out["copy_bandwidth_bytes_per_s"] = json!(copy_bw);
        out["bf16_gemm_flops"] = json!(gemm_flops);
        out["decode_ceiling_tokens_per_s"] = json!(ceiling);
        out["fraction_of_bandwidth_ceiling"] = json!(decode / ceiling);
    }
    if let Some(p) = &args.output_json {
        std::fs::write(p, serde_json::to_string_pretty(&out)?)?;
    }
    Ok(())
}

fn print_step_profile(llm: &Llm) {
    let ex = &llm.core.executor;
    println!(
        "Engine steps: {}",
        llm.core.profile.summary(ex.device_wait())
    );
    if let Some(detail) = ex.profile_detail() {
        println!("Engine steps: {detail}");
    }
}

pub fn run_throughput(args: ThroughputArgs) -> Result<()> {
    anyhow::ensure!(
        matches!(args.dataset_name.as_str(), "random" | "prefix_repetition"),
        "unknown --dataset-name `{}`: use random or prefix_repetition",
        args.dataset_name
    );
    let mut llm = Llm::new(&args.kv_cache.apply(&args.engine))?;
    let cfg = llm.core.config.clone();
    let (prompts, output_len) = throughput_prompts(&args, cfg.vocab_size)?;
    let params = SamplingParams {
        temperature: 1.0,
        top_p: 1.0,
        ignore_eos: true,
        max_tokens: Some(output_len),
        ..SamplingParams::default()
    };
    let bar = crate::cli::progress::bar(
        args.num_prompts as u64,
        "throughput",
        args.engine.disable_progress,
    );
    let t0 = Instant::now();
    anyhow::ensure!(
        (0.0..=1.0).contains(&args.logprobs_fraction)
            && (0.0..=1.0).contains(&args.penalty_fraction),
        "--logprobs-fraction and --penalty-fraction are shares between 0 and 1"
    );
    let plan = structured::plan(&args.structured, prompts.len(), args.seed)?;
    let constrained = |i: usize| plan.as_ref().filter(|p| p.constrained.contains(&i));
    let per_request: Vec<SamplingParams> = (0..prompts.len())
        .map(|i| SamplingParams {
            structured_output: constrained(i)
                .map(|p| StructuredOutput::JsonSchema(p.schema.clone())),
            logprobs: picked(i, args.logprobs_fraction, 0.0).then_some(5),
            repetition_penalty: if picked(i, args.penalty_fraction, 0.5) {
                1.1
            } else {
                1.0
            },
            ..params.clone()
        })
        .collect();
    let outs = llm.generate(&prompts, &per_request, |d| bar.set_position(d as u64))?;
    let elapsed = t0.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let prompt_tokens: usize = outs.iter().map(|o| o.prompt_token_ids.len()).sum();
    let output_tokens: usize = outs
        .iter()
        .flat_map(|o| &o.outputs)
        .map(|c| c.token_ids.len())
        .sum();
    let total = prompt_tokens + output_tokens;
    println!(
        "Throughput: {:.2} requests/s, {:.2} total tokens/s, {:.2} output tokens/s",
        outs.len() as f64 / elapsed,
        total as f64 / elapsed,
        output_tokens as f64 / elapsed
    );
    println!("Total num prompt tokens:  {prompt_tokens}");
    println!("Total num output tokens:  {output_tokens}");
    let scheduler = &llm.core.scheduler;
    let (hits, queries) = (
        scheduler.prefix_cache_hits(),
        scheduler.prefix_cache_queries(),
    );
    println!(
        "Prefix cache hit rate: {}",
        describe_hit_rate(hits as f64, queries as f64)
    );
    let tally = plan.as_ref().map(|p| {
        let outputs = outs
            .iter()
            .enumerate()
            .filter(|(i, _)| constrained(*i).is_some())
            .flat_map(|(_, o)| &o.outputs)
            .map(|c| {
                let finish = match c.finish_reason {
                    Some(FinishReason::Stop) => Some("stop"),
                    Some(_) => Some("length"),
                    None => None,
                };
                (c.text.as_str(), finish)
            });
        structured::tally(&p.schema, outputs)
    });
    if let Some(t) = &tally {
        t.print(args.structured.structured_output_ratio);
    }
    print_step_profile(&llm);
    let mut out = json!({
        "elapsed_time": elapsed,
        "num_requests": outs.len(),
        "total_num_tokens": total,
        "requests_per_second": outs.len() as f64 / elapsed,
        "tokens_per_second": total as f64 / elapsed,
        "output_tokens_per_second": output_tokens as f64 / elapsed,
        "dataset_name": args.dataset_name,
        "prefix_cache_queries": queries,
        "prefix_cache_hits": hits,
        "prefix_cache_hit_rate": scheduler.prefix_cache_hit_rate(),
        "device": llm.core.executor.device_name(),
        "structured_output_ratio": args.structured.structured_output_ratio,
    });
    if let (Some(t), Some(fields)) = (&tally, out.as_object_mut()) {
        if let serde_json::Value::Object(more) = t.to_json() {
            fields.extend(more);
        }
    }
    if let Some((copy_bw, gemm_flops)) = device_ceilings(&llm) {
        let flops_per_token = 2.0 * cfg.num_active_parameters() as f64;
        let ceiling = gemm_flops / flops_per_token;
        println!(
            "Device ceilings (measured now): copy {:.2} TB/s, bf16 GEMM {:.0} TFLOP/s -> compute ceiling \
             {ceiling:.0} tok/s; achieved {:.1}% of it",
            copy_bw / 1e12, gemm_flops / 1e12, 100.0 * total as f64 / elapsed / ceiling
        );
        out["copy_bandwidth_bytes_per_s"] = json!(copy_bw);
        out["bf16_gemm_flops"] = json!(gemm_flops);
        out["compute_ceiling_tokens_per_s"] = json!(ceiling);
    }
    if let Some(p) = &args.output_json {
        std::fs::write(p, serde_json::to_string_pretty(&out)?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn picked_spreads_a_share_evenly() {
        let n = |f: f64, phase: f64| (0..1000).filter(|&i| super::picked(i, f, phase)).count();
        assert_eq!(n(0.1, 0.0), 100);
        assert_eq!(n(0.1, 0.5), 100);
        assert_eq!(n(0.0, 0.0), 0);
        assert_eq!(n(1.0, 0.0), 1000);
        let both = (0..1000)
            .filter(|&i| super::picked(i, 0.1, 0.0) && super::picked(i, 0.1, 0.5))
            .count();
        assert_eq!(both, 0, "the two shares do not overlap at 10 %");
    }
}
