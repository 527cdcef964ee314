//! Engine flags shared by `rvllm generate`, `rvllm serve` and `rvllm bench`, spelled as vLLM's.
use clap::Args;

use crate::runner::MultiNode;

#[derive(Args, Clone, Debug)]
pub struct EngineArgs {
    /// Model: a Hugging Face folder, a .gguf file, a config.json (with --load-format dummy),
    /// or a hub id (org/name).
    #[arg(long, default_value = "")]
    pub model: String,
    /// Name the model is served and reported under (default: --model).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// cpu, cuda, or auto (cuda when a GPU and the cuda backend are present).
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// auto, bfloat16 or float16 on the GPU (auto: the checkpoint's torch_dtype, with
    /// float32 checkpoints and GGUF files in bfloat16); auto or float32 on the CPU.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// Longest prompt + output, in tokens (default: the model's max_position_embeddings,
    /// capped by what the KV cache holds).
    #[arg(long)]
    pub max_model_len: Option<usize>,
    /// Most requests running at once. Default, as vLLM's: 1024 on GPUs of 70 GiB or more
    /// other than the A100, else 256.
    #[arg(long)]
    pub max_num_seqs: Option<usize>,
    /// Token budget of one engine step (prefill chunks + decodes). Default, as vLLM's: on
    /// GPUs of 70 GiB or more other than the A100 16384 offline (generate, bench) and 8192
    /// for `serve`; else 8192.
    #[arg(long)]
    pub max_num_batched_tokens: Option<usize>,
    /// Ranks to split the model over, Megatron-style (vLLM's flag): on `--device cpu` the
    /// ranks are threads of this process; on CUDA one rank a GPU, joined through NCCL.
    #[arg(long, default_value_t = 1)]
    pub tensor_parallel_size: usize,
    /// Nodes (hosts) the --tensor-parallel-size ranks are split over, evenly (vLLM's flag;
    /// CPU only until the NCCL path exists). Node 0 serves; the others run `--headless`.
    #[arg(long, default_value_t = 1)]
    pub nnodes: usize,
    /// This node's index, 0 to --nnodes - 1 (0: the leader).
    #[arg(long, default_value_t = 0)]
    pub node_rank: usize,
    /// The leader's address, as the other nodes reach it (with --nnodes above 1).
    #[arg(long, default_value = "127.0.0.1")]
    pub master_addr: String,
    /// The port the leader listens on for the other nodes' ranks (with --nnodes above 1).
    #[arg(long, default_value_t = 29501)]
    pub master_port: u16,
    /// Tokens per KV-cache block.
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// Fraction of GPU memory the engine may use (weights + activations + KV cache).
    #[arg(long, default_value_t = 0.9)]
    pub gpu_memory_utilization: f32,
    /// KV cache size on the CPU backend, in GiB.
    #[arg(long, default_value_t = 2.0)]
    pub cpu_kv_cache_gb: f32,
    /// Use exactly this many KV blocks (skips memory-based sizing).
    #[arg(long, visible_alias = "num-gpu-blocks-override")]
    pub num_kv_blocks: Option<usize>,
    /// Disable CUDA graphs.
    #[arg(long)]
    pub enforce_eager: bool,
    /// auto (read weights from the model files) or dummy (random weights from config.json).
    #[arg(long, default_value = "auto")]
    pub load_format: String,
    /// Hide progress bars.
    #[arg(long)]
    pub disable_progress: bool,
    /// Reuse the KV blocks of prompt prefixes that earlier requests computed (full blocks
    /// only; the last prompt token is always computed; requests asking for prompt logprobs
    /// compute their whole prompt). On by default, as in vLLM; accepted to state it.
    #[arg(long, overrides_with = "no_enable_prefix_caching")]
    pub enable_prefix_caching: bool,
    /// Prefix caching off: every request computes its whole prompt.
    #[arg(long, overrides_with = "enable_prefix_caching")]
    pub no_enable_prefix_caching: bool,
    /// Schedule each step while the one before still runs, so that the host's work
    /// overlaps the device's (the default where the executor allows it: CUDA, and the CPU
    /// runner's thread). Accepted for vLLM compatibility.
    #[arg(long, overrides_with = "no_async_scheduling")]
    pub async_scheduling: bool,
    /// Schedule each step only after the last one's output is back.
    #[arg(long)]
    pub no_async_scheduling: bool,
    /// Set by `rvllm serve`: the batch defaults are the server's (vLLM's usage context).
    #[arg(skip)]
    pub serving: bool,
    /// `fp8`: vLLM's online dynamic FP8, the layer weights rounded through E4M3 at a
    /// per-output-channel scale of amax / 448 (weight-only on the CPU; on CUDA, sm_89 or
    /// newer, with per-token dynamic activation scales and FP8 GEMMs). An FP8 checkpoint
    /// needs no flag.
    #[arg(long)]
    pub quantization: Option<String>,
    /// `--kv-cache-dtype` (auto, fp8, fp8_e4m3): set by `rvllm generate`'s flag (the server
    /// reads vLLM's among its compatibility flags). None: auto.
    #[arg(skip)]
    pub kv_cache_dtype: Option<String>,
}

/// `--kv-cache-dtype` for the commands that build an engine from their own flags (`generate`,
/// `bench latency|throughput`); the server reads it among vLLM's compatibility flags.
#[derive(Args, Clone, Debug)]
pub struct KvCacheDtypeFlag {
    /// The KV cache's element type: auto (the compute type), fp8 or fp8_e4m3 (E4M3 with the
    /// checkpoint's k_scale / v_scale, else 1.0; the CPU, and CUDA GPUs of compute
    /// capability 8.9 or newer).
    #[arg(long, default_value = "auto")]
    pub kv_cache_dtype: String,
}

impl KvCacheDtypeFlag {
    /// `engine` with this flag applied.
    pub fn apply(&self, engine: &EngineArgs) -> EngineArgs {
        EngineArgs {
            kv_cache_dtype: Some(self.kv_cache_dtype.clone()),
            ..engine.clone()
        }
    }
}

/// The step limits an engine runs with, after the defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchLimits {
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
}

/// Whether vLLM would give this GPU its larger batch defaults: 70 GiB of memory or more, and
/// not an A100 (larger steps measured slower there).
pub fn is_large_gpu(total_bytes: usize, name: &str) -> bool {
    total_bytes >= 70 << 30 && !name.to_ascii_lowercase().contains("a100")
}

impl EngineArgs {
    /// `--nnodes`, `--node-rank`, `--master-addr`, `--master-port` checked: None on one node.
    pub fn multi_node(&self, device: crate::types::Device) -> anyhow::Result<Option<MultiNode>> {
        let (tp, n, rank) = (self.tensor_parallel_size, self.nnodes, self.node_rank);
        anyhow::ensure!(n >= 1, "--nnodes must be at least 1");
        anyhow::ensure!(
            rank < n,
            "--node-rank {rank} is not a node of --nnodes {n} (0 to {})",
            n - 1
        );
        if n == 1 {
            return Ok(None);
        }
        anyhow::ensure!(
            tp.is_multiple_of(n),
            "--tensor-parallel-size {tp} is not divisible by --nnodes {n}: every node runs the \
             same number of ranks (tp / nnodes)"
        );
        anyhow::ensure!(
            device == crate::types::Device::Cpu,
            "--nnodes {n}: ranks on several nodes run on --device cpu only until the NCCL path \
             exists (issue 22)"
        );
        Ok(Some(MultiNode {
            nnodes: n,
            node_rank: rank,
            master_addr: self.master_addr.clone(),
            master_port: self.master_port,
        }))
    }

    /// Whether prefix caching is on: the default, unless `--no-enable-prefix-caching` came
    /// last (the two flags override each other, the last one wins).
    pub fn prefix_caching(&self) -> bool {
        !self.no_enable_prefix_caching || self.enable_prefix_caching
    }

    /// --max-num-seqs and --max-num-batched-tokens, or vLLM's defaults for the device (on a
    /// `large_gpu`, see `is_large_gpu`) and the usage (offline or `serve`).
    pub fn batch_limits(&self, large_gpu: bool) -> BatchLimits {
        let seqs = if large_gpu { 1024 } else { 256 };
        let tokens = if large_gpu && !self.serving {
            16384
        } else {
            8192
        };
        BatchLimits {
            max_num_seqs: self.max_num_seqs.unwrap_or(seqs).max(1),
            max_num_batched_tokens: self.max_num_batched_tokens.unwrap_or(tokens).max(1),
        }
    }
}

impl Default for EngineArgs {
    fn default() -> Self {
        Self {
            model: String::new(),
            served_model_name: None,
            device: "auto".into(),
            dtype: "auto".into(),
            max_model_len: None,
            max_num_seqs: None,
            max_num_batched_tokens: None,
            tensor_parallel_size: 1,
            nnodes: 1,
            node_rank: 0,
            master_addr: "127.0.0.1".into(),
            master_port: 29501,
            block_size: 16,
            gpu_memory_utilization: 0.9,
            cpu_kv_cache_gb: 2.0,
            num_kv_blocks: None,
            enforce_eager: false,
            load_format: "auto".into(),
            disable_progress: false,
            enable_prefix_caching: false,
            no_enable_prefix_caching: false,
            async_scheduling: false,
            no_async_scheduling: false,
            serving: false,
            quantization: None,
            kv_cache_dtype: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_defaults_follow_vllms_per_device_and_usage() {
        let gib = 1usize << 30;
        assert!(is_large_gpu(80 * gib, "NVIDIA H100 80GB HBM3"));
        assert!(is_large_gpu(141 * gib, "NVIDIA H200"));
        assert!(!is_large_gpu(80 * gib, "NVIDIA A100-SXM4-80GB"));
        assert!(!is_large_gpu(24 * gib, "NVIDIA L4"));
        let mut args = EngineArgs::default();
        let limits = |a: &EngineArgs, large| {
            let l = a.batch_limits(large);
            (l.max_num_seqs, l.max_num_batched_tokens)
        };
        assert_eq!(limits(&args, false), (256, 8192));
        assert_eq!(limits(&args, true), (1024, 16384));
        args.serving = true;
        assert_eq!(limits(&args, true), (1024, 8192));
        // Given flags always win.
        args.max_num_seqs = Some(8);
        args.max_num_batched_tokens = Some(64);
        assert_eq!(limits(&args, true), (8, 64));
    }

    #[test]
    fn nodes_split_the_ranks_evenly_on_the_cpu_or_are_refused_by_name() {
        use crate::types::Device;
        use clap::Parser;
        let parse = |flags: &[&str]| {
            let argv = std::iter::once("rvllm").chain(flags.iter().copied());
            Cli::try_parse_from(argv).expect("flags parse").engine
        };
        let err =
            |flags: &[&str], device| format!("{:#}", parse(flags).multi_node(device).unwrap_err());
        assert_eq!(parse(&[]).multi_node(Device::Cpu).unwrap(), None);
        let two = [
            "--tensor-parallel-size",
            "4",
            "--nnodes",
            "2",
            "--node-rank",
            "1",
        ];
        let mn = parse(
            &[
                &two[..],
                &["--master-addr", "10.0.0.7", "--master-port", "4000"],
            ]
            .concat(),
        )
        .multi_node(Device::Cpu)
        .unwrap()
        .unwrap();
        assert_eq!((mn.nnodes, mn.node_rank, mn.master_port), (2, 1, 4000));
        assert_eq!(
            (mn.master_addr.as_str(), mn.ranks_of(1, 4)),
            ("10.0.0.7", 2..4)
        );
        assert!(err(
            &["--tensor-parallel-size", "3", "--nnodes", "2"],
            Device::Cpu
        )
        .contains("--tensor-parallel-size 3 is not divisible by --nnodes 2"));
        assert!(err(&["--nnodes", "2", "--node-rank", "2"], Device::Cpu)
            .contains("--node-rank 2 is not a node of --nnodes 2"));
        assert!(err(&two, Device::Cuda).contains("--device cpu only"));
    }

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        engine: EngineArgs,
    }

    fn prefix_caching(flags: &[&str]) -> bool {
        use clap::Parser;
        let argv = std::iter::once("rvllm").chain(flags.iter().copied());
        Cli::try_parse_from(argv)
            .expect("flags parse")
            .engine
            .prefix_caching()
    }

    #[test]
    fn prefix_caching_is_on_unless_turned_off_last() {
        assert!(prefix_caching(&[]), "on by default, as in vLLM v1");
        assert!(EngineArgs::default().prefix_caching());
        assert!(prefix_caching(&["--enable-prefix-caching"]));
        assert!(!prefix_caching(&["--no-enable-prefix-caching"]));
        assert!(!prefix_caching(&[
            "--enable-prefix-caching",
            "--no-enable-prefix-caching"
        ]));
        assert!(prefix_caching(&[
            "--no-enable-prefix-caching",
            "--enable-prefix-caching"
        ]));
        let off = EngineArgs {
            no_enable_prefix_caching: true,
            ..EngineArgs::default()
        };
        assert!(!off.prefix_caching());
    }
}
