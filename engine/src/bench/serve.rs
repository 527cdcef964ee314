//! `rvllm bench serve`: a load generator for any OpenAI-compatible server, shaped like
//! `vllm bench serve`. It sends random prompts as streaming requests (Poisson arrivals at
//! `--request-rate`, or all at once), times every chunk, and prints request and token
//! throughput with TTFT / TPOT / ITL / end-to-end latency (mean, median, p99).
//!
//! Prompts are made of random common words, so that any server and either endpoint reads
//! them; token counts in the results are the server's own (`usage`, asked for with
//! `stream_options.include_usage`), so they are exact whatever the tokenizer.
//! `--random-prompt-format ids` sends exact-length token-id prompts instead (completions only).
//! `--structured-output-ratio` constrains a share of the requests by a JSON schema and
//! counts the outputs valid against it (bench/structured.rs).
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use futures::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use super::dataset::{
    describe_hit_rate, prefix_cache_counters, prefix_repetition_prompts, PrefixRepetitionArgs,
};
use super::structured::{self, StructuredOutputArgs};

#[derive(Args, Clone, Debug)]
pub struct ServeBenchArgs {
    /// Server base URL (overrides --host/--port).
    #[arg(long)]
    pub base_url: Option<String>,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// /v1/completions or /v1/chat/completions.
    #[arg(long, default_value = "/v1/completions")]
    pub endpoint: String,
    /// Model name to request (default: the first one the server lists at /v1/models).
    #[arg(long)]
    pub model: Option<String>,
    /// random, or prefix_repetition (token-id prompts sharing a few long prefixes, shaped
    /// by the --prefix-repetition-* flags; /v1/completions only).
    #[arg(long, default_value = "random")]
    pub dataset_name: String,
    #[command(flatten)]
    pub prefix_repetition: PrefixRepetitionArgs,
    /// Prompt length: words (about one token each) or, with --random-prompt-format ids, tokens.
    #[arg(long, default_value_t = 1024)]
    pub random_input_len: usize,
    /// Tokens to generate per request (max_tokens).
    #[arg(long, default_value_t = 128)]
    pub random_output_len: usize,
    /// Lengths are drawn from [len * (1 - r), len * (1 + r)].
    #[arg(long, default_value_t = 0.0)]
    pub random_range_ratio: f64,
    /// text (random words; any endpoint) or ids (random token ids; /v1/completions only).
    #[arg(long, default_value = "text")]
    pub random_prompt_format: String,
    /// Token ids for --random-prompt-format ids (and prefix_repetition) are drawn from
    /// [100, 100 + this).
    #[arg(long, default_value_t = 1000)]
    pub random_vocab_size: u32,
    #[arg(long, default_value_t = 1000)]
    pub num_prompts: usize,
    /// Requests per second, Poisson arrivals; `inf` sends them all at once.
    #[arg(long, default_value = "inf")]
    pub request_rate: String,
    /// Most requests in flight at once.
    #[arg(long)]
    pub max_concurrency: Option<usize>,
    /// Ask the server to ignore EOS (vLLM's `ignore_eos`) so every request generates
    /// --random-output-len tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Write the results as JSON.
    #[arg(long)]
    pub save_result: bool,
    /// Where --save-result writes (default: a name made of model, rate and time).
    #[arg(long)]
    pub result_filename: Option<PathBuf>,
    #[arg(long)]
    pub result_dir: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Bearer token (default: $OPENAI_API_KEY, then $RVLLM_API_KEY).
    #[arg(long)]
    pub api_key: Option<String>,
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Give up on one request after this many seconds.
    #[arg(long, default_value_t = 600.0)]
    pub request_timeout_s: f64,
    /// Send only part I of N (`--shard 0/2`) of the --num-prompts requests: the prompts and
    /// arrival times are the whole run's, so shards run one after another (separate commands,
    /// e.g. when one command may not run long enough) and `rvllm bench serve-merge` adds
    /// their saved results up to the whole run's.
    #[arg(long, value_parser = parse_shard)]
    pub shard: Option<(usize, usize)>,
    #[command(flatten)]
    pub structured: StructuredOutputArgs,
}

/// `I/N` with I < N.
fn parse_shard(s: &str) -> std::result::Result<(usize, usize), String> {
    let bad = || format!("--shard `{s}`: give I/N with 0 <= I < N, e.g. 0/2");
    let (i, n) = s.split_once('/').ok_or_else(bad)?;
    let (i, n): (usize, usize) = (
        i.trim().parse().map_err(|_| bad())?,
        n.trim().parse().map_err(|_| bad())?,
    );
    if n == 0 || i >= n {
        return Err(bad());
    }
    Ok((i, n))
}

/// The requests of shard `i` of `n` among `total`: contiguous, sizes differing by one at most.
pub fn shard_range(total: usize, (i, n): (usize, usize)) -> std::ops::Range<usize> {
    total * i / n..total * (i + 1) / n
}

/// Synchronous entry point: builds its own runtime.
pub fn run(args: ServeBenchArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(run_async(args)).map(|_| ())
}

/// One request's measurements.
#[derive(Debug, Clone, Default)]
pub struct RequestResult {
    pub ok: bool,
    pub error: String,
    pub prompt_tokens: usize,
    pub output_tokens: usize,
    pub ttft_s: f64,
    /// Gaps between successive content chunks after the first.
    pub itl_s: Vec<f64>,
    pub e2e_s: f64,
    /// The generated text, chunks joined (empty from a server without a tokenizer).
    pub text: String,
    /// The choice's last `finish_reason` (stop, length, ...).
    pub finish_reason: Option<String>,
}

pub async fn run_async(args: ServeBenchArgs) -> Result<Value> {
    let prefix_repetition = match args.dataset_name.as_str() {
        "random" => false,
        "prefix_repetition" => true,
        other => bail!("unknown --dataset-name `{other}`: use random or prefix_repetition"),
    };
    let rate = parse_rate(&args.request_rate)?;
    if args.num_prompts == 0 {
        bail!("--num-prompts must be at least 1");
    }
    if args.max_concurrency == Some(0) {
        bail!("--max-concurrency must be at least 1 (leave it out for no limit)");
    }
    let chat = args.endpoint.contains("chat");
    let ids_format = match args.random_prompt_format.as_str() {
        _ if prefix_repetition && chat => {
            bail!("--dataset-name prefix_repetition sends token ids: it needs /v1/completions")
        }
        _ if prefix_repetition => true,
        "text" => false,
        "ids" if chat => {
            bail!("--random-prompt-format ids needs /v1/completions (chat messages are text)")
        }
        "ids" => true,
        other => bail!("unknown --random-prompt-format `{other}`: use text or ids"),
    };
    let base = args
        .base_url
        .clone()
        .unwrap_or_else(|| format!("http://{}:{}", args.host, args.port));
    let base = base.trim_end_matches('/').to_string();
    let url = format!("{base}{}", args.endpoint);
    let api_key = args
        .api_key
        .clone()
        .or_else(|| std::env::var("OPENAI_API_KEY").ok())
        .or_else(|| std::env::var("RVLLM_API_KEY").ok());
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs_f64(args.request_timeout_s.max(1.0)))
        .pool_max_idle_per_host(usize::MAX)
        .build()
        .context("building the HTTP client")?;
    let model = match &args.model {
        Some(m) => m.clone(),
        None => first_model(&client, &base, api_key.as_deref()).await?,
    };

    let mut rng = StdRng::seed_from_u64(args.seed);
    let mut requests: Vec<Value> = if prefix_repetition {
        let ids = 100..100 + args.random_vocab_size.max(1);
        let out_len = args.prefix_repetition.prefix_repetition_output_len.max(1);
        prefix_repetition_prompts(args.num_prompts, &args.prefix_repetition, ids, args.seed)?
            .into_iter()
            .map(|p| build_body(&model, json!(p), out_len, chat, ids_format, &args))
            .collect()
    } else {
        random_requests(&mut rng, &model, chat, ids_format, &args)
    };
    let plan = structured::plan(&args.structured, args.num_prompts, args.seed)?;
    let mut constrained: Vec<bool> = requests
        .iter_mut()
        .enumerate()
        .map(|(i, body)| plan.as_ref().is_some_and(|p| p.apply(i, body)))
        .collect();
    let mut delays = arrival_delays(&mut rng, args.num_prompts, rate);
    if let Some(shard) = args.shard {
        let range = shard_range(args.num_prompts, shard);
        if range.is_empty() {
            bail!(
                "--shard {}/{} of {} prompts sends nothing: use fewer shards",
                shard.0,
                shard.1,
                args.num_prompts
            );
        }
        // The shard starts at once: its arrivals keep their gaps from the whole schedule.
        let offset = delays[range.start];
        delays = delays[range.clone()].iter().map(|d| *d - offset).collect();
        requests = requests.drain(range.clone()).collect();
        constrained = constrained.drain(range).collect();
    }
    let sent = requests.len();

    println!(
        "Benchmarking {url} with {sent} requests{} (rate {}, max concurrency {})",
        args.shard
            .map(|(i, n)| format!(" (shard {i}/{n} of {})", args.num_prompts))
            .unwrap_or_default(),
        args.request_rate,
        args.max_concurrency
            .map(|c| c.to_string())
            .unwrap_or_else(|| "unlimited".into())
    );
    let cache_before = scrape_prefix_cache(&client, &base, api_key.as_deref()).await;
    let limiter = args
        .max_concurrency
        .map(|c| Arc::new(tokio::sync::Semaphore::new(c)));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(requests.len());
    for (body, delay) in requests.into_iter().zip(delays) {
        // Arrivals follow the Poisson schedule even when the concurrency limit makes them wait.
        let wait = delay.saturating_sub(start.elapsed());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        let permit = match &limiter {
            Some(s) => Some(
                s.clone()
                    .acquire_owned()
                    .await
                    .context("concurrency limiter closed")?,
            ),
            None => None,
        };
        let client = client.clone();
        let url = url.clone();
        let key = api_key.clone();
        tasks.push(tokio::spawn(async move {
            let r = send_one(&client, &url, key.as_deref(), body, chat).await;
            drop(permit);
            r
        }));
    }
    let mut results = Vec::with_capacity(tasks.len());
    for t in tasks {
        results.push(t.await.unwrap_or_else(|e| RequestResult {
            error: format!("task failed: {e}"),
            ..Default::default()
        }));
    }
    let duration = start.elapsed().as_secs_f64();
    let summary = summarize(&results, duration);
    print_table(&summary, args.max_concurrency, &args.request_rate, &model);
    // This run's share of the server's counters (other clients' requests count too).
    let cache_after = scrape_prefix_cache(&client, &base, api_key.as_deref()).await;
    let cache_delta = cache_before
        .zip(cache_after)
        .map(|((h0, q0), (h1, q1))| ((h1 - h0).max(0.0), (q1 - q0).max(0.0)));
    match cache_delta {
        Some((hits, queries)) => println!(
            "Prefix cache hit rate (server /metrics, during the run): {}",
            describe_hit_rate(hits, queries)
        ),
        None => println!("Prefix cache hit rate: not reported by the server's /metrics"),
    }
    let tally = plan.as_ref().map(|p| {
        let outputs = results
            .iter()
            .zip(&constrained)
            .filter(|(r, &c)| c && r.ok)
            .map(|(r, _)| (r.text.as_str(), r.finish_reason.as_deref()));
        structured::tally(&p.schema, outputs)
    });
    if let Some(t) = &tally {
        t.print(args.structured.structured_output_ratio);
    }
    let failed: Vec<&RequestResult> = results.iter().filter(|r| !r.ok).collect();
    if let Some(f) = failed.first() {
        eprintln!(
            "{} requests failed; the first error: {}",
            failed.len(),
            f.error
        );
    }
    let mut out = summary.to_json();
    let obj = out.as_object_mut().context("summary is an object")?;
    obj.insert("date".into(), json!(unix_now()));
    obj.insert("endpoint".into(), json!(args.endpoint));
    obj.insert("base_url".into(), json!(base));
    obj.insert("model_id".into(), json!(model));
    obj.insert("num_prompts".into(), json!(sent));
    if let Some((i, n)) = args.shard {
        obj.insert("shard".into(), json!([i, n]));
        obj.insert("shard_of_prompts".into(), json!(args.num_prompts));
    }
    obj.insert("request_rate".into(), json!(args.request_rate));
    obj.insert("max_concurrency".into(), json!(args.max_concurrency));
    obj.insert("dataset_name".into(), json!(args.dataset_name));
    obj.insert(
        "structured_output_ratio".into(),
        json!(args.structured.structured_output_ratio),
    );
    if let Some(t) = &tally {
        if let Value::Object(fields) = t.to_json() {
            obj.extend(fields);
        }
        obj.insert(
            "structured_output_schema".into(),
            plan.as_ref().map(|p| p.schema.clone()).into(),
        );
        // Which requests were constrained, in the order of the per-request arrays.
        obj.insert("structured_output_constrained".into(), json!(constrained));
    }
    if prefix_repetition {
        let p = &args.prefix_repetition;
        obj.insert(
            "prefix_repetition_prefix_len".into(),
            json!(p.prefix_repetition_prefix_len),
        );
        obj.insert(
            "prefix_repetition_suffix_len".into(),
            json!(p.prefix_repetition_suffix_len),
        );
        obj.insert(
            "prefix_repetition_num_prefixes".into(),
            json!(p.prefix_repetition_num_prefixes),
        );
        obj.insert(
            "prefix_repetition_output_len".into(),
            json!(p.prefix_repetition_output_len),
        );
    } else {
        obj.insert("random_input_len".into(), json!(args.random_input_len));
        obj.insert("random_output_len".into(), json!(args.random_output_len));
    }
    if let Some((hits, queries)) = cache_delta {
        obj.insert("prefix_cache_hits".into(), json!(hits));
        obj.insert("prefix_cache_queries".into(), json!(queries));
        if queries > 0.0 {
            obj.insert("prefix_cache_hit_rate".into(), json!(hits / queries));
        }
    }
    obj.insert(
        "input_lens".into(),
        json!(results.iter().map(|r| r.prompt_tokens).collect::<Vec<_>>()),
    );
    obj.insert(
        "output_lens".into(),
        json!(results.iter().map(|r| r.output_tokens).collect::<Vec<_>>()),
    );
    obj.insert(
        "ttfts".into(),
        json!(results.iter().map(|r| r.ttft_s).collect::<Vec<_>>()),
    );
    obj.insert(
        "e2els".into(),
        json!(results.iter().map(|r| r.e2e_s).collect::<Vec<_>>()),
    );
    obj.insert(
        "itls".into(),
        json!(results.iter().map(|r| &r.itl_s).collect::<Vec<_>>()),
    );
    obj.insert(
        "generated_texts".into(),
        json!(results.iter().map(|r| &r.text).collect::<Vec<_>>()),
    );
    obj.insert(
        "errors".into(),
        json!(results.iter().map(|r| &r.error).collect::<Vec<_>>()),
    );
    if args.save_result {
        let name = args.result_filename.clone().unwrap_or_else(|| {
            let short = model
                .rsplit('/')
                .next()
                .unwrap_or(&model)
                .replace(['/', ' '], "_");
            PathBuf::from(format!(
                "rvllm-bench-serve-{}qps-{short}-{}.json",
                args.request_rate,
                unix_now()
            ))
        });
        let path = match &args.result_dir {
            Some(d) => {
                std::fs::create_dir_all(d)
                    .with_context(|| format!("creating --result-dir {}", d.display()))?;
                d.join(name)
            }
            None => name,
        };
        std::fs::write(&path, serde_json::to_string_pretty(&out)?)
            .with_context(|| format!("writing results to {}", path.display()))?;
        println!("Results written to {}", path.display());
    }
    if summary.completed == 0 {
        bail!(
            "every request failed (first error: {})",
            failed.first().map(|f| f.error.as_str()).unwrap_or("?")
        );
    }
    Ok(out)
}

fn parse_rate(s: &str) -> Result<f64> {
    if s.eq_ignore_ascii_case("inf") {
        return Ok(f64::INFINITY);
    }
    let r: f64 = s.parse().with_context(|| {
        format!("--request-rate `{s}`: give a number of requests per second or inf")
    })?;
    if r.is_nan() || r <= 0.0 {
        bail!("--request-rate must be above 0 (or inf), got {s}");
    }
    Ok(r)
}

fn draw_len(rng: &mut StdRng, len: usize, ratio: f64) -> usize {
    if ratio <= 0.0 || len == 0 {
        return len;
    }
    let lo = ((len as f64) * (1.0 - ratio)).floor().max(1.0) as usize;
    let hi = ((len as f64) * (1.0 + ratio)).ceil() as usize;
    rng.random_range(lo..=hi.max(lo))
}

/// Send times, from the start, of a Poisson process of `rate` per second (exponential gaps,
/// drawn by inverse transform); all zero for an infinite rate.
pub fn arrival_delays(rng: &mut StdRng, n: usize, rate: f64) -> Vec<Duration> {
    let mut t = 0.0f64;
    (0..n)
        .map(|_| {
            if rate.is_finite() {
                let u: f64 = rng.random_range(f64::EPSILON..1.0);
                t += -u.ln() / rate;
            }
            Duration::from_secs_f64(t)
        })
        .collect()
}

const WORDS: &[&str] = &[
    "the", "of", "and", "to", "in", "is", "for", "that", "with", "on", "as", "it", "by", "this",
    "be", "from", "at", "or", "an", "are", "was", "but", "not", "have", "all", "can", "more",
    "one", "time", "new", "some", "about", "people", "year", "good", "first", "work", "day", "way",
    "world", "life", "water", "house", "light", "city", "music", "story", "river", "paper",
    "table", "green", "small", "large", "early", "night", "open", "plant",
];

fn random_words(rng: &mut StdRng, n: usize) -> String {
    let mut s = String::with_capacity(n * 6);
    for i in 0..n {
        if i > 0 {
            s.push(' ');
        }
        s.push_str(WORDS[rng.random_range(0..WORDS.len())]);
    }
    s
}

/// The `random` dataset's request bodies: random words or token ids, lengths drawn around
/// --random-input-len / --random-output-len.
fn random_requests(
    rng: &mut StdRng,
    model: &str,
    chat: bool,
    ids_format: bool,
    args: &ServeBenchArgs,
) -> Vec<Value> {
    (0..args.num_prompts)
        .map(|_| {
            let in_len = draw_len(rng, args.random_input_len, args.random_range_ratio);
            let out_len = draw_len(rng, args.random_output_len, args.random_range_ratio).max(1);
            let prompt = if ids_format {
                json!((0..in_len)
                    .map(|_| 100 + rng.random_range(0..args.random_vocab_size.max(1)))
                    .collect::<Vec<_>>())
            } else {
                json!(random_words(rng, in_len))
            };
            build_body(model, prompt, out_len, chat, ids_format, args)
        })
        .collect()
}

fn build_body(
    model: &str,
    prompt: Value,
    max_tokens: usize,
    chat: bool,
    ids_format: bool,
    args: &ServeBenchArgs,
) -> Value {
    let mut body = json!({
        "model": model,
        "max_tokens": max_tokens,
        "temperature": args.temperature,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    if chat {
        body["messages"] = json!([{"role": "user", "content": prompt}]);
    } else {
        body["prompt"] = prompt;
    }
    if ids_format {
        // vLLM's extension: token ids in every chunk, so a model without a tokenizer (whose
        // text is empty) still shows when each token arrives.
        body["return_token_ids"] = json!(true);
    }
    if args.ignore_eos {
        body["ignore_eos"] = json!(true);
    }
    body
}

async fn first_model(client: &reqwest::Client, base: &str, key: Option<&str>) -> Result<String> {
    let mut req = client.get(format!("{base}/v1/models"));
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let resp = req
        .send()
        .await
        .with_context(|| format!("GET {base}/v1/models (is the server up?)"))?;
    let status = resp.status();
    let v: Value = resp
        .json()
        .await
        .with_context(|| format!("reading {base}/v1/models"))?;
    if !status.is_success() {
        bail!(
            "GET {base}/v1/models answered {status}: {v}; pass --model (and --api-key if needed)"
        );
    }
    v["data"][0]["id"]
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("{base}/v1/models lists no model; pass --model"))
}

/// Send one streaming request and time its chunks.
/// The server's prefix-cache (hits, queries) counters now, if its /metrics has them (a
/// server without /metrics, or without these counters, gives None: the run goes on).
async fn scrape_prefix_cache(
    client: &reqwest::Client,
    base: &str,
    key: Option<&str>,
) -> Option<(f64, f64)> {
    let mut req = client.get(format!("{base}/metrics"));
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let resp = req.send().await.ok()?;
    if !resp.status().is_success() {
        return None;
    }
    prefix_cache_counters(&resp.text().await.ok()?)
}

async fn send_one(
    client: &reqwest::Client,
    url: &str,
    key: Option<&str>,
    body: Value,
    chat: bool,
) -> RequestResult {
    let start = Instant::now();
    let mut r = RequestResult::default();
    let mut req = client.post(url).json(&body);
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let resp = match req.send().await {
        Ok(x) => x,
        Err(e) => {
            r.error = format!("sending: {e}");
            return r;
        }
    };
    if !resp.status().is_success() {
        let status = resp.status();
        r.error = format!("{status}: {}", resp.text().await.unwrap_or_default());
        return r;
    }
    let mut parser = SseParser::default();
    let mut stream = resp.bytes_stream();
    let mut last_chunk: Option<Instant> = None;
    let mut content_chunks = 0usize;
    let mut done = false;
    while let Some(item) = stream.next().await {
        let bytes = match item {
            Ok(b) => b,
            Err(e) => {
                r.error = format!("reading the stream: {e}");
                return r;
            }
        };
        for ev in parser.push(&bytes) {
            if ev == "[DONE]" {
                done = true;
                continue;
            }
            let v: Value = match serde_json::from_str(&ev) {
                Ok(v) => v,
                Err(e) => {
                    r.error = format!("a stream chunk is not JSON ({e}): {ev}");
                    return r;
                }
            };
            if v.get("error").is_some() {
                r.error = format!("error in stream: {}", v["error"]);
                return r;
            }
            if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
                r.prompt_tokens = u["prompt_tokens"].as_u64().unwrap_or(0) as usize;
                r.output_tokens = u["completion_tokens"].as_u64().unwrap_or(0) as usize;
            }
            let mut has_content = false;
            for c in v["choices"].as_array().into_iter().flatten() {
                let t = if chat {
                    c["delta"]["content"].as_str()
                } else {
                    c["text"].as_str()
                };
                let t = t.unwrap_or_default();
                r.text.push_str(t);
                if let Some(f) = c["finish_reason"].as_str() {
                    r.finish_reason = Some(f.to_string());
                }
                // A server without a tokenizer (dummy weights) streams token ids only.
                has_content |=
                    !t.is_empty() || c["token_ids"].as_array().is_some_and(|ids| !ids.is_empty());
            }
            if has_content {
                let now = Instant::now();
                match last_chunk {
                    None => r.ttft_s = (now - start).as_secs_f64(),
                    Some(prev) => r.itl_s.push((now - prev).as_secs_f64()),
                }
                last_chunk = Some(now);
                content_chunks += 1;
            }
        }
    }
    r.e2e_s = start.elapsed().as_secs_f64();
    if !done {
        r.error = "the stream ended without `data: [DONE]`".into();
        return r;
    }
    if r.output_tokens == 0 {
        // A server that does not report usage: one token per content chunk.
        r.output_tokens = content_chunks;
    }
    if last_chunk.is_none() {
        r.ttft_s = r.e2e_s;
    }
    r.ok = true;
    r
}

/// Splits a byte stream into SSE `data:` payloads (events end with a blank line).
#[derive(Default)]
pub struct SseParser {
    buf: Vec<u8>,
}

impl SseParser {
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        loop {
            let text = &self.buf;
            let end = text
                .windows(2)
                .position(|w| w == b"\n\n")
                .map(|p| (p, 2))
                .or_else(|| {
                    text.windows(4)
                        .position(|w| w == b"\r\n\r\n")
                        .map(|p| (p, 4))
                });
            let Some((pos, sep)) = end else { break };
            let event: Vec<u8> = self.buf.drain(..pos + sep).collect();
            let event = String::from_utf8_lossy(&event[..pos]).to_string();
            let data: Vec<&str> = event
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(|l| l.strip_prefix(' ').unwrap_or(l))
                .collect();
            if !data.is_empty() {
                out.push(data.join("\n"));
            }
        }
        out
    }
}

/// numpy's default (linear) percentile of an unsorted sample; 0 for an empty one.
pub fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = (p / 100.0).clamp(0.0, 1.0) * (v.len() - 1) as f64;
    let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
    v[lo] + (v[hi] - v[lo]) * (rank - lo as f64)
}

pub fn mean(values: &[f64]) -> f64 {
    if values.is_empty() {
        0.0
    } else {
        values.iter().sum::<f64>() / values.len() as f64
    }
}

/// Mean, median and p99 of one latency, in milliseconds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Dist {
    pub mean_ms: f64,
    pub median_ms: f64,
    pub p99_ms: f64,
}

impl Dist {
    fn of(seconds: &[f64]) -> Self {
        Self {
            mean_ms: mean(seconds) * 1e3,
            median_ms: percentile(seconds, 50.0) * 1e3,
            p99_ms: percentile(seconds, 99.0) * 1e3,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub completed: usize,
    pub failed: usize,
    pub duration_s: f64,
    pub total_input: usize,
    pub total_output: usize,
    pub request_throughput: f64,
    pub output_throughput: f64,
    pub total_token_throughput: f64,
    pub ttft: Dist,
    pub tpot: Dist,
    pub itl: Dist,
    pub e2el: Dist,
}

pub fn summarize(results: &[RequestResult], duration_s: f64) -> Summary {
    let ok: Vec<&RequestResult> = results.iter().filter(|r| r.ok).collect();
    let total_input = ok.iter().map(|r| r.prompt_tokens).sum();
    let total_output = ok.iter().map(|r| r.output_tokens).sum();
    let ttfts: Vec<f64> = ok.iter().map(|r| r.ttft_s).collect();
    let tpots: Vec<f64> = ok
        .iter()
        .filter(|r| r.output_tokens > 1)
        .map(|r| (r.e2e_s - r.ttft_s) / (r.output_tokens - 1) as f64)
        .collect();
    let itls: Vec<f64> = ok.iter().flat_map(|r| r.itl_s.iter().copied()).collect();
    let e2es: Vec<f64> = ok.iter().map(|r| r.e2e_s).collect();
    let d = duration_s.max(1e-9);
    Summary {
        completed: ok.len(),
        failed: results.len() - ok.len(),
        duration_s,
        total_input,
        total_output,
        request_throughput: ok.len() as f64 / d,
        output_throughput: total_output as f64 / d,
        total_token_throughput: (total_input + total_output) as f64 / d,
        ttft: Dist::of(&ttfts),
        tpot: Dist::of(&tpots),
        itl: Dist::of(&itls),
        e2el: Dist::of(&e2es),
    }
}

impl Summary {
    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "completed": self.completed,
            "failed": self.failed,
            "duration": self.duration_s,
            "total_input_tokens": self.total_input,
            "total_output_tokens": self.total_output,
            "request_throughput": self.request_throughput,
            "output_throughput": self.output_throughput,
            "total_token_throughput": self.total_token_throughput,
        });
        for (name, d) in [
            ("ttft", &self.ttft),
            ("tpot", &self.tpot),
            ("itl", &self.itl),
            ("e2el", &self.e2el),
        ] {
            v[format!("mean_{name}_ms")] = json!(d.mean_ms);
            v[format!("median_{name}_ms")] = json!(d.median_ms);
            v[format!("p99_{name}_ms")] = json!(d.p99_ms);
        }
        v
    }
}

pub(crate) fn print_table(
    s: &Summary,
    max_concurrency: Option<usize>,
    request_rate: &str,
    model: &str,
) {
    let line = |k: &str, v: String| println!("{k:<40} {v:<10}");
    let head = |t: &str| println!("{:-^50}", t);
    println!("{:=^50}", " Serving Benchmark Result ");
    line("Model:", model.to_string());
    line("Successful requests:", s.completed.to_string());
    if s.failed > 0 {
        line("Failed requests:", s.failed.to_string());
    }
    if let Some(c) = max_concurrency {
        line("Maximum request concurrency:", c.to_string());
    }
    line("Request rate configured (RPS):", request_rate.to_string());
    line("Benchmark duration (s):", format!("{:.2}", s.duration_s));
    line("Total input tokens:", s.total_input.to_string());
    line("Total generated tokens:", s.total_output.to_string());
    line(
        "Request throughput (req/s):",
        format!("{:.2}", s.request_throughput),
    );
    line(
        "Output token throughput (tok/s):",
        format!("{:.2}", s.output_throughput),
    );
    line(
        "Total Token throughput (tok/s):",
        format!("{:.2}", s.total_token_throughput),
    );
    for (title, key, d) in [
        ("Time to First Token", "TTFT", &s.ttft),
        ("Time per Output Token (excl. 1st token)", "TPOT", &s.tpot),
        ("Inter-token Latency", "ITL", &s.itl),
        ("End-to-end Latency", "E2EL", &s.e2el),
    ] {
        head(title);
        line(&format!("Mean {key} (ms):"), format!("{:.2}", d.mean_ms));
        line(
            &format!("Median {key} (ms):"),
            format!("{:.2}", d.median_ms),
        );
        line(&format!("P99 {key} (ms):"), format!("{:.2}", d.p99_ms));
    }
    println!("{}", "=".repeat(50));
}

pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_match_numpy_linear() {
        let v = [4.0, 1.0, 3.0, 2.0];
        assert_eq!(percentile(&v, 50.0), 2.5);
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(percentile(&v, 100.0), 4.0);
        assert!((percentile(&v, 99.0) - 3.97).abs() < 1e-12);
        assert_eq!(mean(&v), 2.5);
        assert_eq!(percentile(&[], 50.0), 0.0);
    }

    #[test]
    fn poisson_arrivals_are_seeded_and_have_the_right_mean_gap() {
        let a = arrival_delays(&mut StdRng::seed_from_u64(7), 20000, 50.0);
        let b = arrival_delays(&mut StdRng::seed_from_u64(7), 20000, 50.0);
        assert_eq!(a, b, "same seed, same schedule");
        assert!(a.windows(2).all(|w| w[0] <= w[1]));
        let mean_gap = a.last().unwrap().as_secs_f64() / 20000.0;
        assert!((mean_gap - 0.02).abs() < 0.001, "mean gap {mean_gap}");
        let inf = arrival_delays(&mut StdRng::seed_from_u64(7), 5, f64::INFINITY);
        assert!(inf.iter().all(|d| d.is_zero()));
    }

    #[test]
    fn shards_split_the_run_into_contiguous_parts() {
        for (total, n) in [(1000usize, 2usize), (7, 3), (5, 5)] {
            let ranges: Vec<_> = (0..n).map(|i| shard_range(total, (i, n))).collect();
            assert_eq!(ranges[0].start, 0);
            assert_eq!(ranges[n - 1].end, total);
            for w in ranges.windows(2) {
                assert_eq!(w[0].end, w[1].start);
            }
            assert!(ranges.iter().all(|r| r.len() + 1 >= total / n));
        }
        assert_eq!(parse_shard("1/2"), Ok((1, 2)));
        assert!(parse_shard("2/2").is_err());
        assert!(parse_shard("0/0").is_err());
        assert!(parse_shard("half").is_err());
    }

    #[test]
    fn sse_parser_handles_split_events() {
        let mut p = SseParser::default();
        assert!(p.push(b"data: {\"a\"").is_empty());
        assert_eq!(
            p.push(b":1}\n\ndata: [DONE]\n"),
            vec!["{\"a\":1}".to_string()]
        );
        assert_eq!(p.push(b"\n"), vec!["[DONE]".to_string()]);
        assert_eq!(
            p.push(b": comment\r\n\r\ndata:x\r\n\r\n"),
            vec!["x".to_string()]
        );
    }

    #[test]
    fn summary_computes_throughput_and_tpot() {
        let r = |ttft: f64, e2e: f64, out: usize| RequestResult {
            ok: true,
            prompt_tokens: 10,
            output_tokens: out,
            ttft_s: ttft,
            itl_s: vec![(e2e - ttft) / (out - 1).max(1) as f64; out.saturating_sub(1)],
            e2e_s: e2e,
            ..Default::default()
        };
        let results = vec![
            r(0.1, 1.1, 11),
            r(0.3, 2.3, 21),
            RequestResult {
                error: "x".into(),
                ..Default::default()
            },
        ];
        let s = summarize(&results, 2.0);
        assert_eq!(
            (s.completed, s.failed, s.total_input, s.total_output),
            (2, 1, 20, 32)
        );
        assert_eq!(s.request_throughput, 1.0);
        assert_eq!(s.output_throughput, 16.0);
        assert!((s.tpot.mean_ms - 100.0).abs() < 1e-9);
        assert!((s.ttft.median_ms - 200.0).abs() < 1e-9);
        assert!((s.itl.mean_ms - 100.0).abs() < 1e-9);
        assert!(s.to_json()["p99_e2el_ms"].as_f64().unwrap() > 2000.0);
    }

    #[test]
    fn rate_parsing() {
        assert!(parse_rate("inf").unwrap().is_infinite());
        assert_eq!(parse_rate("2.5").unwrap(), 2.5);
        assert!(parse_rate("0").is_err());
        assert!(parse_rate("fast").is_err());
    }
}
