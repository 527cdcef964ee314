//! What the CUDA kernels can run, decided from the decoder's description alone (no GPU
//! needed, so the rules are unit-tested everywhere). A model that needs anything else is
//! refused at load, the feature named, rather than run wrongly.
use anyhow::{bail, Result};

use super::AttentionLayout;
use crate::models::config::MlpActivation;
use crate::models::spec::DecoderSpec;

/// Head sizes with prefill and decode attention kernels (kernels/src/attention_*.cu).
pub const GPU_HEAD_DIMS: [usize; 2] = [64, 128];

/// Refuses what the CUDA backend's kernels do not do yet. `context_len` is the longest
/// context the model will see (`--max-model-len`, else `max_position_embeddings`).
pub fn check_gpu_decoder(spec: &DecoderSpec, context_len: usize) -> Result<()> {
    let cpu = "run it with --device cpu";
    let Some(first) = spec.layers.first() else {
        return Ok(());
    };
    let hd = first.attention.head_dim;
    if !GPU_HEAD_DIMS.contains(&hd) {
        bail!("head_dim {hd} has no CUDA attention kernel (built: {GPU_HEAD_DIMS:?}); {cpu}");
    }
    // The CUDA attention kernels take no window: a window shorter than the context would
    // be ignored and give other tokens than transformers past it.
    if let Some((i, w)) = spec
        .layers
        .iter()
        .enumerate()
        .find_map(|(i, l)| l.attention.sliding_window.map(|w| (i, w)))
        .filter(|&(_, w)| w < context_len)
    {
        bail!(
            "layer {i} attends within a sliding window of {w} tokens, shorter than the context of \
             {context_len} tokens, and the CUDA attention kernels take no window yet; pass \
             --max-model-len {w} (or less) so that the window never matters, or {cpu}"
        );
    }
    for l in &spec.layers {
        let a = &l.attention;
        if a.softcap.is_some() {
            bail!("attention logit soft-capping (attn_logit_softcapping) is not implemented by the CUDA kernels; {cpu}");
        }
        if a.rotary_dim != a.head_dim {
            bail!(
                "partial rotary embeddings (partial_rotary_factor: {} of {} dims rotated) are not implemented by the CUDA RoPE kernels; {cpu}",
                a.rotary_dim,
                a.head_dim
            );
        }
        if l.qk_norm {
            bail!("per-head q/k RMSNorm (q_norm / k_norm) is not implemented by the CUDA kernels; {cpu}");
        }
        if l.activation != MlpActivation::Silu {
            bail!(
                "the GeGLU MLP (gelu_pytorch_tanh) is not implemented by the CUDA kernels; {cpu}"
            );
        }
    }
    if spec.embed_scale.is_some() {
        bail!("the scaled embedding (Gemma's sqrt(hidden_size)) is not implemented by the CUDA backend; {cpu}");
    }
    if spec.final_logit_softcap.is_some() {
        bail!("final logit soft-capping (final_logit_softcapping) is not implemented by the CUDA sampler; {cpu}");
    }
    if spec.has_local_rope() {
        bail!("a separate RoPE for sliding layers (rope_local_base_freq) is not implemented by the CUDA backend; {cpu}");
    }
    Ok(())
}

/// The layout the GPU kernels run: they rotate without scaling cos and sin, so YaRN's and
/// LongRoPE's attention factor `m` moves into the softmax scale. With every dim rotated (the
/// only case `check_gpu_decoder` lets through) q and k each carry one `m`, so scores carry
/// `m^2`; v is never rotated and the cache holds k without it.
pub fn gpu_layout(layout: &AttentionLayout) -> AttentionLayout {
    AttentionLayout {
        scale: layout.scale * layout.rope_scale * layout.rope_scale,
        rope_scale: 1.0,
        ..*layout
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::config::{Architecture, FamilyConfig, ModelConfig, RopeScaling};

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

    #[test]
    fn a_window_shorter_than_the_context_is_refused_unless_max_model_len_fits_it() {
        let mut c = config();
        c.sliding_window = Some(4096);
        let e = refused(&c);
        assert!(
            e.contains("sliding window of 4096") && e.contains("--max-model-len 4096"),
            "{e}"
        );
        c.family.max_model_len = Some(4096);
        check_gpu_decoder(&DecoderSpec::new(&c), c.context_len()).unwrap();
    }

    #[test]
    fn features_the_kernels_lack_are_named() {
        let mut c = config();
        c.head_dim = 96;
        assert!(refused(&c).contains("head_dim 96"));
        let mut c = config();
        c.family.qk_norm = true;
        assert!(refused(&c).contains("q_norm"));
        let mut c = config();
        c.family.rotary_dim = Some(96);
        assert!(refused(&c).contains("partial_rotary_factor"));
        let mut c = config();
        c.family.attn_logit_softcap = Some(50.0);
        assert!(refused(&c).contains("attn_logit_softcapping"));
        let mut c = config();
        c.family.activation = MlpActivation::GeluTanh;
        assert!(refused(&c).contains("gelu_pytorch_tanh"));
        let mut c = config();
        c.family.final_logit_softcap = Some(30.0);
        assert!(refused(&c).contains("final_logit_softcapping"));
        let mut c = config();
        c.family.scale_embedding = true;
        assert!(refused(&c).contains("embedding"));
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
}
