//! Engine flags shared by `rvllm generate`, `rvllm serve` and `rvllm bench`, spelled as vLLM's.
use clap::Args;

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
    /// auto: the backend's one compute type (bfloat16 on the GPU, float32 on the CPU);
    /// `rvllm serve` also takes that type's name and refuses any other.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// Longest prompt + output, in tokens (default: the model's max_position_embeddings,
    /// capped by what the KV cache holds).
    #[arg(long)]
    pub max_model_len: Option<usize>,
    /// Most requests running at once.
    #[arg(long, default_value_t = 256)]
    pub max_num_seqs: usize,
    /// Token budget of one engine step (prefill chunks + decodes).
    #[arg(long, default_value_t = 8192)]
    pub max_num_batched_tokens: usize,
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
    /// only; requests asking for prompt logprobs always compute their whole prompt). Off by
    /// default; `--no-enable-prefix-caching` states the default.
    #[arg(long, overrides_with = "no_enable_prefix_caching")]
    pub enable_prefix_caching: bool,
    /// Prefix caching off (the default), as vLLM spells it.
    #[arg(long)]
    pub no_enable_prefix_caching: bool,
}

impl Default for EngineArgs {
    fn default() -> Self {
        Self {
            model: String::new(),
            served_model_name: None,
            device: "auto".into(),
            dtype: "auto".into(),
            max_model_len: None,
            max_num_seqs: 256,
            max_num_batched_tokens: 8192,
            block_size: 16,
            gpu_memory_utilization: 0.9,
            cpu_kv_cache_gb: 2.0,
            num_kv_blocks: None,
            enforce_eager: false,
            load_format: "auto".into(),
            disable_progress: false,
            enable_prefix_caching: false,
            no_enable_prefix_caching: false,
        }
    }
}
