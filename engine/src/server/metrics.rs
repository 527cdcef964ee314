//! /metrics in the Prometheus text format (version 0.0.4), with vLLM's metric names under an
//! `rvllm:` prefix, and the series that mean what vLLM's mean also under vLLM's own `vllm:`
//! names (`VLLM_FAMILIES`), so that tooling written for vLLM (an inference gateway's endpoint
//! picker, dashboards) balances and watches rvllm replicas unchanged. Engine gauges and
//! counters are read from the engine's snapshot at scrape time; latency histograms are
//! recorded here, at the edge, where a request's life is seen.
use std::fmt::Write;
use std::sync::Mutex;

/// Seconds; the bucket bounds vLLM uses for the same histograms.
const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
const TPOT_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];
const E2E_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];

/// The families (rvllm names without the prefix) repeated under `vllm:`: same type, labels
/// (vLLM's `model_name`) and values as vLLM's series of that name. rvllm's own additions
/// (free/total blocks, in-flight HTTP requests, HTTP errors, the runner's step counts) stay
/// `rvllm:` only. vLLM's `vllm:lora_requests_info` is absent, as vLLM omits it without
/// `--enable-lora`: rvllm serves no LoRA adapters.
pub const VLLM_FAMILIES: &[&str] = &[
    "num_requests_running",
    "num_requests_waiting",
    "kv_cache_usage_perc",
    "num_preemptions_total",
    "prompt_tokens_total",
    "generation_tokens_total",
    "prefix_cache_queries_total",
    "prefix_cache_hits_total",
    "request_success_total",
    "time_to_first_token_seconds",
    "time_per_output_token_seconds",
    "e2e_request_latency_seconds",
];

#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Per-bucket (not cumulative) counts; the last slot is +Inf.
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
            count: 0,
        }
    }

    pub fn observe(&mut self, v: f64) {
        if !v.is_finite() {
            return;
        }
        let i = self
            .bounds
            .iter()
            .position(|&b| v <= b)
            .unwrap_or(self.bounds.len());
        self.counts[i] += 1;
        self.sum += v;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str, labels: &str) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut cum = 0;
        for (i, b) in self.bounds.iter().enumerate() {
            cum += self.counts[i];
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{b}\"}} {cum}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", self.sum);
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", self.count);
    }
}

/// What the engine reports at scrape time (a copy of `EngineStats`' fields).
#[derive(Debug, Clone, Default)]
pub struct EngineGauges {
    pub num_running: usize,
    pub num_waiting: usize,
    pub kv_usage: f32,
    pub num_free_blocks: usize,
    pub num_total_blocks: usize,
    pub num_preemptions: u64,
    pub prompt_tokens_total: u64,
    pub generation_tokens_total: u64,
    pub prefix_cache_queries: u64,
    pub prefix_cache_hits: u64,
    /// How the runner's steps that sampled tokens ran: CUDA decode-graph replays (0 on the
    /// CPU, which has no graphs), eager launches (every CPU step), and the steps of either
    /// kind that applied grammar masks (structured output). Graph plus eager is every step.
    pub cuda_graph_decode_steps: u64,
    pub eager_steps: u64,
    pub grammar_mask_steps: u64,
}

#[derive(Debug)]
struct Recorded {
    ttft: Histogram,
    tpot: Histogram,
    e2e: Histogram,
    finished_stop: u64,
    finished_length: u64,
    finished_abort: u64,
    in_flight: i64,
    http_errors: u64,
}

/// Server-side metrics, shared by all handlers.
#[derive(Debug)]
pub struct ServerMetrics {
    inner: Mutex<Recorded>,
}

/// How one sequence (one of a request's `n`) ended, for the success counter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Finished {
    Stop,
    Length,
    Abort,
}

impl Default for ServerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ServerMetrics {
    pub fn new() -> Self {
        Self {
            inner: Mutex::new(Recorded {
                ttft: Histogram::new(TTFT_BUCKETS),
                tpot: Histogram::new(TPOT_BUCKETS),
                e2e: Histogram::new(E2E_BUCKETS),
                finished_stop: 0,
                finished_length: 0,
                finished_abort: 0,
                in_flight: 0,
                http_errors: 0,
            }),
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut Recorded) -> R) -> R {
        // A panic elsewhere while holding the lock leaves plain numbers: keep using them.
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut g)
    }

    /// One finished sequence: time to first token, end-to-end latency, and how many tokens
    /// it generated (time per output token is taken over the tokens after the first).
    pub fn record_sequence(
        &self,
        ttft_s: Option<f64>,
        e2e_s: f64,
        output_tokens: usize,
        how: Finished,
    ) {
        self.with(|m| {
            if let Some(t) = ttft_s {
                m.ttft.observe(t);
                if output_tokens > 1 {
                    m.tpot
                        .observe((e2e_s - t).max(0.0) / (output_tokens - 1) as f64);
                }
            }
            m.e2e.observe(e2e_s);
            match how {
                Finished::Stop => m.finished_stop += 1,
                Finished::Length => m.finished_length += 1,
                Finished::Abort => m.finished_abort += 1,
            }
        })
    }

    pub fn request_started(&self) {
        self.with(|m| m.in_flight += 1)
    }

    pub fn request_ended(&self) {
        self.with(|m| m.in_flight -= 1)
    }

    pub fn error_answered(&self) {
        self.with(|m| m.http_errors += 1)
    }

    pub fn render(&self, model: &str, engine: &EngineGauges) -> String {
        let labels = format!("model_name=\"{}\"", escape_label(model));
        let mut out = String::with_capacity(8192);
        let gauge = |out: &mut String, name: &str, help: &str, v: String| {
            let _ = writeln!(out, "# HELP rvllm:{name} {help}\n# TYPE rvllm:{name} gauge\nrvllm:{name}{{{labels}}} {v}");
        };
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP rvllm:{name} {help}\n# TYPE rvllm:{name} counter\nrvllm:{name}{{{labels}}} {v}");
        };
        gauge(
            &mut out,
            "num_requests_running",
            "Sequences the engine is running.",
            engine.num_running.to_string(),
        );
        gauge(
            &mut out,
            "num_requests_waiting",
            "Sequences waiting to be scheduled.",
            engine.num_waiting.to_string(),
        );
        gauge(
            &mut out,
            "kv_cache_usage_perc",
            "Fraction of KV-cache blocks in use (1 = full).",
            engine.kv_usage.to_string(),
        );
        gauge(
            &mut out,
            "kv_cache_free_blocks",
            "KV-cache blocks free.",
            engine.num_free_blocks.to_string(),
        );
        gauge(
            &mut out,
            "kv_cache_total_blocks",
            "KV-cache blocks in all.",
            engine.num_total_blocks.to_string(),
        );
        counter(
            &mut out,
            "num_preemptions_total",
            "Sequences preempted (KV freed, recomputed later).",
            engine.num_preemptions,
        );
        counter(
            &mut out,
            "prompt_tokens_total",
            "Prompt tokens prefilled.",
            engine.prompt_tokens_total,
        );
        counter(
            &mut out,
            "generation_tokens_total",
            "Tokens generated.",
            engine.generation_tokens_total,
        );
        counter(
            &mut out,
            "prefix_cache_queries_total",
            "Prompt tokens looked up in the prefix cache (first admissions of requests that \
             read it).",
            engine.prefix_cache_queries,
        );
        counter(
            &mut out,
            "prefix_cache_hits_total",
            "Prompt tokens found in the prefix cache (full blocks).",
            engine.prefix_cache_hits,
        );
        // Always present, 0 where they cannot happen (graphs on the CPU), so that a scrape
        // before and after a run gives a delta whatever the device.
        counter(
            &mut out,
            "cuda_graph_decode_steps_total",
            "Steps that sampled tokens by replaying a captured CUDA decode graph (0 on the CPU).",
            engine.cuda_graph_decode_steps,
        );
        counter(
            &mut out,
            "eager_steps_total",
            "Steps that sampled tokens with their kernels launched one by one (every CPU step; \
             on CUDA, batches no decode graph fits).",
            engine.eager_steps,
        );
        counter(
            &mut out,
            "grammar_mask_steps_total",
            "Steps (graph or eager) that applied structured-output grammar masks to some row.",
            engine.grammar_mask_steps,
        );
        self.with(|m| {
            gauge(&mut out, "server_requests_in_flight", "HTTP generation requests being answered.", m.in_flight.to_string());
            let _ = writeln!(
                out,
                "# HELP rvllm:request_success_total Sequences finished, by reason.\n# TYPE rvllm:request_success_total counter"
            );
            for (reason, v) in [("stop", m.finished_stop), ("length", m.finished_length), ("abort", m.finished_abort)] {
                let _ = writeln!(out, "rvllm:request_success_total{{{labels},finished_reason=\"{reason}\"}} {v}");
            }
            counter(&mut out, "http_request_errors_total", "Requests answered with an error status.", m.http_errors);
            m.ttft.render(&mut out, "rvllm:time_to_first_token_seconds", "Time to first token.", &labels);
            m.tpot.render(&mut out, "rvllm:time_per_output_token_seconds", "Time per output token after the first.", &labels);
            m.e2e.render(&mut out, "rvllm:e2e_request_latency_seconds", "End-to-end request latency.", &labels);
        });
        let vllm = vllm_copies(&out);
        out.push_str(&vllm);
        // vLLM's name for the KV usage before its V1 engine, still what older gateways read
        // (the Gateway API Inference Extension's first releases).
        let _ = writeln!(
            out,
            "# HELP vllm:gpu_cache_usage_perc KV-cache usage (1 = full); vLLM's older name of \
             vllm:kv_cache_usage_perc.\n# TYPE vllm:gpu_cache_usage_perc gauge\n\
             vllm:gpu_cache_usage_perc{{{labels}}} {}",
            engine.kv_usage
        );
        out
    }
}

/// The lines of `VLLM_FAMILIES`' families in `rendered` (rvllm's series) again, under
/// `vllm:`. A family runs from its `# HELP` line to the next one.
fn vllm_copies(rendered: &str) -> String {
    let mut out = String::with_capacity(rendered.len());
    let mut copying = false;
    for line in rendered.lines() {
        if let Some(rest) = line.strip_prefix("# HELP rvllm:") {
            let family = rest.split(' ').next().unwrap_or_default();
            copying = VLLM_FAMILIES.contains(&family);
        }
        if !copying {
            continue;
        }
        let copied = if let Some(rest) = line.strip_prefix("rvllm:") {
            format!("vllm:{rest}")
        } else {
            line.replacen(" rvllm:", " vllm:", 1)
        };
        out.push_str(&copied);
        out.push('\n');
    }
    out
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_value(text: &str, series: &str) -> f64 {
        let line = text
            .lines()
            .find(|l| l.starts_with(series))
            .unwrap_or_else(|| panic!("no {series} in\n{text}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = ServerMetrics::new();
        m.record_sequence(Some(0.003), 1.2, 11, Finished::Length);
        m.record_sequence(Some(0.2), 0.4, 1, Finished::Stop);
        let g = EngineGauges {
            num_running: 2,
            num_free_blocks: 7,
            num_total_blocks: 9,
            ..Default::default()
        };
        let t = m.render("smol", &g);
        let l = "model_name=\"smol\"";
        assert_eq!(
            sample_value(
                &t,
                &format!("rvllm:time_to_first_token_seconds_bucket{{{l},le=\"0.005\"}}")
            ),
            1.0
        );
        assert_eq!(
            sample_value(
                &t,
                &format!("rvllm:time_to_first_token_seconds_bucket{{{l},le=\"0.25\"}}")
            ),
            2.0
        );
        assert_eq!(
            sample_value(
                &t,
                &format!("rvllm:time_to_first_token_seconds_bucket{{{l},le=\"+Inf\"}}")
            ),
            2.0
        );
        assert_eq!(
            sample_value(
                &t,
                &format!("rvllm:time_to_first_token_seconds_count{{{l}}}")
            ),
            2.0
        );
        // Only the sequence with more than one token has a time per output token: (1.2-0.003)/10.
        assert_eq!(
            sample_value(
                &t,
                &format!("rvllm:time_per_output_token_seconds_count{{{l}}}")
            ),
            1.0
        );
        assert!(
            (sample_value(
                &t,
                &format!("rvllm:time_per_output_token_seconds_sum{{{l}}}")
            ) - 0.1197)
                .abs()
                < 1e-9
        );
        assert_eq!(
            sample_value(&t, &format!("rvllm:num_requests_running{{{l}}}")),
            2.0
        );
        assert_eq!(
            sample_value(&t, &format!("rvllm:kv_cache_free_blocks{{{l}}}")),
            7.0
        );
        assert_eq!(
            sample_value(
                &t,
                &format!("rvllm:request_success_total{{{l},finished_reason=\"length\"}}")
            ),
            1.0
        );
    }

    #[test]
    fn prefix_cache_counters_are_counters_in_tokens() {
        let g = EngineGauges {
            prefix_cache_queries: 96,
            prefix_cache_hits: 32,
            ..Default::default()
        };
        let t = ServerMetrics::new().render("smol", &g);
        let l = "model_name=\"smol\"";
        for (name, v) in [("queries", 96.0), ("hits", 32.0)] {
            let series = format!("rvllm:prefix_cache_{name}_total");
            assert!(t.contains(&format!("# TYPE {series} counter")), "{t}");
            assert_eq!(sample_value(&t, &format!("{series}{{{l}}}")), v);
        }
    }

    #[test]
    fn step_counts_are_rvllm_counters_only() {
        let g = EngineGauges {
            cuda_graph_decode_steps: 120,
            eager_steps: 7,
            grammar_mask_steps: 90,
            ..Default::default()
        };
        let t = ServerMetrics::new().render("smol", &g);
        let l = "model_name=\"smol\"";
        for (name, v) in [
            ("cuda_graph_decode_steps_total", 120.0),
            ("eager_steps_total", 7.0),
            ("grammar_mask_steps_total", 90.0),
        ] {
            assert!(t.contains(&format!("# TYPE rvllm:{name} counter\n")), "{t}");
            assert_eq!(sample_value(&t, &format!("rvllm:{name}{{{l}}}")), v);
            // vLLM has no such series: nothing to copy under its prefix.
            assert!(
                !t.lines()
                    .any(|line| line.starts_with(&format!("vllm:{name}"))),
                "{t}"
            );
        }
    }

    #[test]
    fn vllm_names_carry_the_same_series_for_gateways() {
        let m = ServerMetrics::new();
        m.record_sequence(Some(0.02), 0.5, 4, Finished::Stop);
        let g = EngineGauges {
            num_running: 3,
            num_waiting: 5,
            kv_usage: 0.25,
            num_free_blocks: 6,
            num_total_blocks: 8,
            num_preemptions: 2,
            prompt_tokens_total: 40,
            generation_tokens_total: 12,
            ..Default::default()
        };
        let t = m.render("smol", &g);
        let l = "model_name=\"smol\"";
        // What the Gateway API Inference Extension's endpoint picker and vLLM dashboards read.
        for (family, kind, v) in [
            ("num_requests_running", "gauge", 3.0),
            ("num_requests_waiting", "gauge", 5.0),
            ("kv_cache_usage_perc", "gauge", 0.25),
            ("gpu_cache_usage_perc", "gauge", 0.25),
            ("num_preemptions_total", "counter", 2.0),
            ("prompt_tokens_total", "counter", 40.0),
            ("generation_tokens_total", "counter", 12.0),
        ] {
            assert!(
                t.contains(&format!("# TYPE vllm:{family} {kind}\n")),
                "{family}: {t}"
            );
            assert_eq!(
                sample_value(&t, &format!("vllm:{family}{{{l}}}")),
                v,
                "{family}"
            );
        }
        for series in [
            format!("time_to_first_token_seconds_count{{{l}}}"),
            format!("e2e_request_latency_seconds_bucket{{{l},le=\"0.5\"}}"),
            format!("request_success_total{{{l},finished_reason=\"stop\"}}"),
        ] {
            assert_eq!(
                sample_value(&t, &format!("vllm:{series}")),
                sample_value(&t, &format!("rvllm:{series}")),
                "{series}"
            );
            assert_eq!(sample_value(&t, &format!("vllm:{series}")), 1.0, "{series}");
        }
        assert!(t.contains("# TYPE vllm:time_per_output_token_seconds histogram"));
        // rvllm's own series are not vLLM's and keep their prefix only.
        for own in [
            "kv_cache_free_blocks",
            "server_requests_in_flight",
            "http_request_errors_total",
        ] {
            assert!(t.contains(&format!("rvllm:{own}")), "{own}");
            assert!(
                !t.lines()
                    .any(|line| line.starts_with(&format!("vllm:{own}"))),
                "{own}"
            );
        }
    }

    #[test]
    fn every_sample_line_has_a_type_line() {
        let t = ServerMetrics::new().render("a\"b", &EngineGauges::default());
        for line in t.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            let base = name
                .trim_end_matches("_bucket")
                .trim_end_matches("_sum")
                .trim_end_matches("_count");
            assert!(
                t.contains(&format!("# TYPE {name} "))
                    || t.contains(&format!("# TYPE {base} histogram")),
                "{name} has no TYPE line"
            );
        }
        assert!(t.contains("model_name=\"a\\\"b\""));
    }
}
