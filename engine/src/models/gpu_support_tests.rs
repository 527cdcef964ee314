//! The CUDA backend's rules (`backend/gpu_support.rs`) on decoders built from real configs:
//! building a `DecoderSpec` from a `ModelConfig` is the models' business, a layer above the
//! backend, so the tests that need both live here.
use super::config::{Architecture, FamilyConfig, MlpActivation, ModelConfig, RopeScaling};
use super::spec::DecoderSpec;
use crate::backend::gpu_support::{check_gpu_decoder, gpu_layout};

fn config() -> ModelConfig {
    ModelConfig {
        architecture: Architecture::Mistral,
        hidden_size: 256,
        intermediate_size: 512,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        num_key_value_heads: 1,
        head_dim: 128,
        vocab_size: 100,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_scaling: None,
        max_position_embeddings: 8192,
        tie_word_embeddings: false,
        attention_bias: false,
        sliding_window: None,
        bos_token_id: None,
        eos_token_ids: vec![],
        torch_dtype: None,
        family: FamilyConfig::default(),
    }
}

fn refused(c: &ModelConfig) -> String {
    check_gpu_decoder(&DecoderSpec::new(c), c.context_len())
        .expect_err("must be refused")
        .to_string()
}

/// Windows shorter than the context (Mistral), attention-logit and final-logit soft-caps
/// (Gemma 2) and Gemma 3's own RoPE for its sliding layers run on the GPU: windowed and
/// capped layers attend through the windowed prefill build, the runner caps the LM head's
/// logits before the sampler, and each layer hands the CUDA rotation its own inverse
/// frequencies.
#[test]
fn windows_soft_caps_and_the_local_rope_run_on_the_gpu() {
    let mut c = config();
    c.sliding_window = Some(4096);
    let spec = DecoderSpec::new(&c);
    check_gpu_decoder(&spec, c.context_len()).unwrap();
    assert_eq!(spec.layers[0].attention.sliding_window, Some(4096));

    let mut gemma2 = config();
    gemma2.head_dim = 256;
    gemma2.sliding_window = Some(4096);
    gemma2.family.sliding_layers = Some(vec![true, false]);
    gemma2.family.attn_logit_softcap = Some(50.0);
    gemma2.family.final_logit_softcap = Some(30.0);
    let spec = DecoderSpec::new(&gemma2);
    check_gpu_decoder(&spec, gemma2.context_len()).unwrap();
    assert_eq!(spec.final_logit_softcap, Some(30.0));
    assert!(spec
        .layers
        .iter()
        .all(|l| l.attention.softcap == Some(50.0)));

    let mut gemma3 = config();
    gemma3.head_dim = 256;
    gemma3.sliding_window = Some(1024);
    gemma3.family.sliding_layers = Some(vec![true, false]);
    gemma3.family.local_rope = Some(super::config::LocalRope {
        theta: 10000.0,
        scaling: None,
    });
    gemma3.rope_theta = 1_000_000.0;
    let spec = DecoderSpec::new(&gemma3);
    check_gpu_decoder(&spec, gemma3.context_len()).unwrap();
    assert!(spec.has_local_rope());
    assert_eq!(
        spec.layers.iter().map(|l| l.local_rope).collect::<Vec<_>>(),
        [true, false]
    );
}

/// Head sizes 80 and 96 (Phi) have prefill builds and attend for decodes through them;
/// sizes with no build at all are refused by name.
#[test]
fn head_dims_80_and_96_run_and_unbuilt_ones_are_named() {
    for hd in [80, 96] {
        let mut c = config();
        c.head_dim = hd;
        check_gpu_decoder(&DecoderSpec::new(&c), c.context_len()).unwrap();
    }
    let mut c = config();
    c.head_dim = 112;
    let e = refused(&c);
    assert!(
        e.contains("head_dim 112")
            && e.contains("[64, 80, 96, 128, 256]")
            && e.contains("--device cpu"),
        "{e}"
    );
}

/// Per-head q/k RMSNorm (Qwen3; norm.cu's head_rms_norm), GeGLU and Gemma's embedding scale
/// (activation.cu's gelu_tanh_and_mul and scale) have kernels. Gemma's (1 + w) norms are
/// folded into the weights at load and its extra norms are plain RMSNorms and adds.
#[test]
fn qk_norm_geglu_and_the_embedding_scale_run_on_the_gpu() {
    let mut c = config();
    c.family.qk_norm = true;
    c.family.activation = MlpActivation::GeluTanh;
    c.family.scale_embedding = true;
    c.family.norm_plus_one = true;
    c.family.sandwich_norms = true;
    check_gpu_decoder(&DecoderSpec::new(&c), c.context_len()).unwrap();
}

/// Head dim 256 (Gemma 3) has decode (full and compact kernels) and prefill (windowed build)
/// kernels.
#[test]
fn head_dim_256_runs_on_the_gpu() {
    let mut c = config();
    c.head_dim = 256;
    check_gpu_decoder(&DecoderSpec::new(&c), c.context_len()).unwrap();
}

/// Mixtures of experts run on moe.cu up to the routing kernel's limits (1024 experts, top 32);
/// past them the layer is named.
#[test]
fn mixture_of_experts_models_run_within_the_routing_kernels_limits() {
    let mut c = config();
    let moe = |num_experts, top_k| {
        Some(super::moe::MoeConfig {
            num_experts,
            top_k,
            intermediate_size: 256,
            renormalize: true,
            sparse_layers: vec![false, true],
        })
    };
    c.family.moe = moe(128, 8);
    check_gpu_decoder(&DecoderSpec::new(&c), c.context_len()).unwrap();
    c.family.moe = moe(2048, 8);
    let e = refused(&c);
    assert!(
        e.contains("layer 1 is a mixture of 2048 experts, top 8") && e.contains("--device cpu"),
        "{e}"
    );
    c.family.moe = moe(64, 33);
    assert!(refused(&c).contains("top 33"));
}

/// Partial rotary (Phi-3/4) runs on rope_cache.cu's rope_partial_and_cache, which scales cos
/// and sin by the attention factor itself (only the rotated dims carry it), so the layout
/// keeps its softmax scale and factor.
#[test]
fn partial_rotary_keeps_its_attention_factor_in_the_rotation() {
    let mut c = config();
    c.family.rotary_dim = Some(96);
    c.rope_scaling = Some(RopeScaling::Yarn {
        factor: 4.0,
        original_max_position_embeddings: 2048,
        beta_fast: 32.0,
        beta_slow: 1.0,
        attention_factor: 1.2,
        truncate: true,
    });
    let spec = DecoderSpec::new(&c);
    check_gpu_decoder(&spec, c.context_len()).unwrap();
    let a = &spec.layers[0].attention;
    assert_eq!(a.rotary_dim, 96);
    assert_eq!(gpu_layout(a), *a);
    assert!((a.rope_scale - 1.2).abs() < 1e-6, "{}", a.rope_scale);
}

#[test]
fn yarn_attention_factor_moves_into_the_softmax_scale() {
    let mut c = config();
    c.rope_scaling = Some(RopeScaling::Yarn {
        factor: 4.0,
        original_max_position_embeddings: 2048,
        beta_fast: 32.0,
        beta_slow: 1.0,
        attention_factor: 1.2,
        truncate: true,
    });
    let spec = DecoderSpec::new(&c);
    check_gpu_decoder(&spec, c.context_len()).unwrap();
    let l = gpu_layout(&spec.layers[0].attention);
    assert_eq!(l.rope_scale, 1.0);
    assert!((l.scale - 1.44 / (128f32).sqrt()).abs() < 1e-7);
}
