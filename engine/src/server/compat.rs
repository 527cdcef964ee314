//! `vllm serve` flags that scripts pass routinely and that rvllm has no machinery of its own
//! for. Each is accepted where its meaning holds for rvllm (one GPU, no request log, ...),
//! and refused with a message that says why and what to pass instead where it does not, so
//! that a vLLM launch script either works unchanged or fails at once, never silently serves
//! something else. README.md ("`vllm serve` flags") lists every flag and its status.
use anyhow::{bail, Result};
use clap::Args;

use super::validate::MAX_LOGPROBS;
use crate::backend::dtype::check_dtype;
use crate::engine::{resolve_device, EngineArgs};

#[derive(Args, Clone, Debug)]
#[command(next_help_heading = "vLLM compatibility")]
pub struct VllmCompatArgs {
    /// Pipeline stages: rvllm runs a model on one GPU, so only 1 is accepted.
    #[arg(long, default_value_t = 1)]
    pub pipeline_parallel_size: usize,
    /// Engine replicas: one per rvllm process, so only 1 is accepted (run one server per
    /// GPU behind a load balancer for more).
    #[arg(long, default_value_t = 1)]
    pub data_parallel_size: usize,
    /// Accepted, no effect: rvllm runs no code from model repositories (its architectures
    /// are built in).
    #[arg(long)]
    pub trust_remote_code: bool,
    /// Accepted, no effect (see --trust-remote-code).
    #[arg(long, conflicts_with = "trust_remote_code")]
    pub no_trust_remote_code: bool,
    /// Accepted, no effect: rvllm does not log requests.
    #[arg(long)]
    pub disable_log_requests: bool,
    /// Accepted with a notice: rvllm does not log requests.
    #[arg(long, conflicts_with = "disable_log_requests")]
    pub enable_log_requests: bool,
    /// Accepted, no effect: rvllm does not log requests.
    #[arg(long, value_name = "N")]
    pub max_log_len: Option<usize>,
    /// Accepted, no effect: rvllm logs no periodic stats (GET /metrics has them).
    #[arg(long)]
    pub disable_log_stats: bool,
    /// Accepted, no effect: the HTTP server prints only start-up, shutdown and engine errors.
    #[arg(long, value_parser = ["critical", "error", "warning", "info", "debug", "trace"])]
    pub uvicorn_log_level: Option<String>,
    /// Accepted, no effect: rvllm writes no access log.
    #[arg(long)]
    pub disable_uvicorn_access_log: bool,
    /// Accepted, no effect: the HTTP front end and the engine already share one process.
    #[arg(long)]
    pub disable_frontend_multiprocessing: bool,
    /// Most top log-probabilities per token a request may ask for (`logprobs`,
    /// `top_logprobs`, `prompt_logprobs`): 0 to 20.
    #[arg(long, default_value_t = MAX_LOGPROBS, allow_negative_numbers = true)]
    pub max_logprobs: i64,
    /// Only `vllm` is accepted: rvllm never takes default sampling parameters from the
    /// model's generation_config.json (it reads only its EOS ids there).
    #[arg(long, value_name = "vllm")]
    pub generation_config: Option<String>,
    /// Accepted when it names the model itself: rvllm reads the tokenizer from the model
    /// (the folder's tokenizer.json, or the one inside a GGUF).
    #[arg(long)]
    pub tokenizer: Option<String>,
    /// `auto` or `hf` (the Hugging Face fast tokenizer, the only kind rvllm has).
    #[arg(long)]
    pub tokenizer_mode: Option<String>,
    /// `auto` (the model's compute type), `fp8` or `fp8_e4m3` (E4M3 values: the CPU, and
    /// CUDA GPUs of compute capability 8.9 or newer); passed to the engine, which checks it.
    #[arg(long)]
    pub kv_cache_dtype: Option<String>,
    /// Seed for requests that bring none: the i-th such request samples with a seed
    /// derived from (this seed, i), so a restarted server given the same requests in the
    /// same order answers the same. Without it they are seeded at random.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Report tokens as `token_id:N` in logprobs by default (a request's
    /// `return_tokens_as_token_ids` still turns it on per request).
    #[arg(long)]
    pub return_tokens_as_token_ids: bool,
    /// `auto` or `string`: messages are rendered with their content as one string (text parts
    /// joined by newlines).
    #[arg(long)]
    pub chat_template_content_format: Option<String>,
    /// Accepted with a notice: rvllm preempts by recomputation and never swaps KV blocks to
    /// CPU memory.
    #[arg(long, value_name = "GIB", allow_negative_numbers = true)]
    pub swap_space: Option<f64>,
    /// Accepted, no effect: rvllm always splits long prompts into chunks within
    /// --max-num-batched-tokens.
    #[arg(long)]
    pub enable_chunked_prefill: bool,
    // Refused (hidden from --help; present only to say why).
    #[arg(long, hide = true)]
    pub no_enable_chunked_prefill: bool,
    /// Let the model call tools on its own (`tool_choice` "auto", the default when a
    /// request has `tools`); needs --tool-call-parser to read its calls.
    #[arg(long)]
    pub enable_auto_tool_choice: bool,
    /// How the model writes tool calls (vLLM's parsers: hermes, llama3_json, mistral,
    /// pythonic; see server/tools/).
    #[arg(long, value_name = "NAME", value_parser = parse_tool_call_parser)]
    pub tool_call_parser: Option<super::tools::ToolParserName>,
}

fn parse_tool_call_parser(s: &str) -> Result<super::tools::ToolParserName, String> {
    s.parse()
}

fn same_model(tokenizer: &str, model: &str) -> bool {
    if tokenizer == model {
        return true;
    }
    match (
        std::fs::canonicalize(tokenizer),
        std::fs::canonicalize(model),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

impl VllmCompatArgs {
    /// Check every flag against `engine` (whose `model` is already set). Returns the
    /// notices to print for flags accepted without effect that a user may expect to do
    /// something; an error for a flag rvllm cannot honour.
    pub fn check(&self, engine: &EngineArgs) -> Result<Vec<String>> {
        let mut notes = Vec::new();
        // --tensor-parallel-size is an engine flag (`EngineArgs`), checked at start-up.
        for (flag, v) in [("--pipeline-parallel-size", self.pipeline_parallel_size)] {
            if v != 1 {
                bail!(
                    "{flag} {v}: rvllm runs a model on one GPU and cannot split it; pass {flag} 1 \
                     (or leave it out) and a model that fits one GPU"
                );
            }
        }
        if self.data_parallel_size != 1 {
            bail!(
                "--data-parallel-size {}: one rvllm process runs one engine; pass 1 (or leave it \
                 out) and run one `rvllm serve` per GPU behind a load balancer",
                self.data_parallel_size
            );
        }
        if !(0..=MAX_LOGPROBS).contains(&self.max_logprobs) {
            bail!(
                "--max-logprobs {}: rvllm returns at most {MAX_LOGPROBS} log-probabilities per token \
                 (-1, the whole vocabulary, is not served); pass a value from 0 to {MAX_LOGPROBS}",
                self.max_logprobs
            );
        }
        if let Some(g) = self.generation_config.as_deref().filter(|g| *g != "vllm") {
            bail!(
                "--generation-config {g}: rvllm does not take default sampling parameters from a \
                 generation_config.json; requests get vLLM's own defaults, which is what \
                 --generation-config vllm asks for: pass that or leave the flag out"
            );
        }
        if let Some(t) = &self.tokenizer {
            if !same_model(t, &engine.model) {
                bail!(
                    "--tokenizer {t}: rvllm reads the tokenizer from the model itself (`{}`: the \
                     folder's tokenizer.json, or the one inside a GGUF) and cannot load another; \
                     leave --tokenizer out or pass the model again",
                    engine.model
                );
            }
        }
        if let Some(m) = self
            .tokenizer_mode
            .as_deref()
            .filter(|m| !matches!(*m, "auto" | "hf"))
        {
            bail!(
                "--tokenizer-mode {m}: rvllm has only the Hugging Face fast tokenizer; pass \
                 --tokenizer-mode auto (or hf) or leave it out"
            );
        }
        if let Some(f) = self
            .chat_template_content_format
            .as_deref()
            .filter(|f| !matches!(*f, "auto" | "string"))
        {
            bail!(
                "--chat-template-content-format {f}: rvllm renders each message's content as one \
                 string (text parts joined); pass auto or string, or leave it out"
            );
        }
        if let Some(s) = self.swap_space {
            if !(s >= 0.0 && s.is_finite()) {
                bail!("--swap-space must be 0 or more GiB, got {s}");
            }
            notes.push(format!(
                "--swap-space {s} has no effect: rvllm preempts by recomputation and never swaps \
                 KV blocks to CPU memory"
            ));
        }
        if self.enable_log_requests {
            notes.push("--enable-log-requests has no effect: rvllm does not log requests".into());
        }
        if self.no_enable_chunked_prefill {
            bail!(
                "--no-enable-chunked-prefill: rvllm always splits long prompts into chunks within \
                 --max-num-batched-tokens and cannot turn that off; leave the flag out"
            );
        }
        if self.enable_auto_tool_choice && self.tool_call_parser.is_none() {
            bail!(
                "--enable-auto-tool-choice requires --tool-call-parser (one of {}): it says how \
                 the model writes its calls",
                super::tools::ToolParserName::NAMES.join(", ")
            );
        }
        check_dtype(&engine.dtype, resolve_device(&engine.device)?)?;
        Ok(notes)
    }
}

/// A well-mixed seed for the `i`-th unseeded request of a server started with `--seed`.
pub fn request_seed(server_seed: u64, i: u64) -> u64 {
    // splitmix64 over the pair.
    crate::hash::splitmix64(server_seed ^ i.wrapping_mul(crate::hash::GOLDEN))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Device;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        compat: VllmCompatArgs,
        #[command(flatten)]
        engine: EngineArgs,
    }

    /// Parse flags (with --device cpu and a model) and check them.
    fn check(flags: &[&str]) -> Result<Vec<String>> {
        let mut argv = vec!["serve", "--model", "m.gguf", "--device", "cpu"];
        argv.extend_from_slice(flags);
        let cli = Cli::try_parse_from(argv)?;
        cli.compat.check(&cli.engine)
    }

    fn refused(flags: &[&str], words: &str) {
        let e = check(flags).expect_err("should be refused").to_string();
        assert!(e.contains(words), "`{e}` lacks `{words}`");
    }

    #[test]
    #[cfg(feature = "cpu")] // check() resolves --device cpu
    fn routine_vllm_flags_are_accepted() {
        let notes = check(&[
            "--tensor-parallel-size",
            "1",
            "--pipeline-parallel-size",
            "1",
            "--trust-remote-code",
            "--disable-log-requests",
            "--disable-log-stats",
            "--max-logprobs",
            "5",
            "--generation-config",
            "vllm",
            "--tokenizer",
            "m.gguf",
            "--tokenizer-mode",
            "auto",
            "--kv-cache-dtype",
            "auto",
            "--dtype",
            "auto",
            "--seed",
            "0",
            "--uvicorn-log-level",
            "warning",
            "--no-enable-prefix-caching",
            "--enable-chunked-prefill",
            "--disable-frontend-multiprocessing",
        ])
        .unwrap();
        assert!(notes.is_empty(), "{notes:?}");
        assert!(check(&["--dtype", "float32"]).is_ok(), "the CPU's own type");
        assert!(check(&["--dtype", "float"]).is_ok());
        assert!(
            check(&["--kv-cache-dtype", "fp8"]).is_ok(),
            "the engine checks it"
        );
        let notes = check(&["--swap-space", "4", "--enable-log-requests"]).unwrap();
        assert_eq!(notes.len(), 2, "{notes:?}");
    }

    #[test]
    #[cfg(feature = "cpu")] // check() resolves --device cpu
    fn flags_rvllm_cannot_honour_are_refused_with_the_reason() {
        assert!(
            check(&["--tensor-parallel-size", "2"]).is_ok(),
            "an engine flag, checked against the model at start-up"
        );
        refused(&["--pipeline-parallel-size", "4"], "one GPU");
        refused(&["--data-parallel-size", "2"], "load balancer");
        refused(&["--dtype", "bfloat16"], "CPU backend computes in float32");
        refused(&["--dtype", "half"], "float32");
        refused(&["--dtype", "int8"], "unknown --dtype");
        refused(&["--max-logprobs", "21"], "at most 20");
        refused(&["--max-logprobs", "-1"], "whole vocabulary");
        refused(&["--generation-config", "auto"], "--generation-config vllm");
        refused(&["--tokenizer", "other/tok"], "tokenizer from the model");
        refused(&["--tokenizer-mode", "mistral"], "fast tokenizer");
        refused(&["--chat-template-content-format", "openai"], "one string");
        refused(&["--swap-space", "-1"], "0 or more");
        refused(&["--no-enable-chunked-prefill"], "chunks");
        refused(
            &["--enable-auto-tool-choice"],
            "requires --tool-call-parser",
        );
        assert!(check(&["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]).is_ok());
        assert!(check(&["--tool-call-parser", "mistral"]).is_ok());
        let e = check(&["--tool-call-parser", "granite"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`granite`") && e.contains("hermes, llama3_json, mistral, pythonic"),
            "{e}"
        );
        assert!(check(&["--uvicorn-log-level", "loud"]).is_err());
    }

    #[test]
    fn dtype_follows_the_device() {
        assert!(check_dtype("auto", Device::Cuda).is_ok());
        assert!(check_dtype("bfloat16", Device::Cuda).is_ok());
        assert!(check_dtype("bf16", Device::Cuda).is_ok());
        assert!(check_dtype("float16", Device::Cuda).is_ok());
        let e = check_dtype("float32", Device::Cuda)
            .unwrap_err()
            .to_string();
        assert!(e.contains("bfloat16 or float16"), "{e}");
        assert!(check_dtype("float32", Device::Cpu).is_ok());
    }

    #[test]
    fn request_seeds_differ_per_request_and_per_server_seed() {
        assert_eq!(request_seed(7, 0), request_seed(7, 0));
        assert_ne!(request_seed(7, 0), request_seed(7, 1));
        assert_ne!(request_seed(7, 0), request_seed(8, 0));
    }
}
