//! The tensors a decoder of any supported family needs, by Hugging Face name, with the shape the config
//! implies. Loaders read exactly these (and check each shape as they go), so a file whose
//! tensor disagrees with config.json is refused at load with the tensor named.
use super::config::ModelConfig;

/// One expected tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpectedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    /// `lm_head.weight` of a tied model may be absent: the embedding stands in for it.
    pub optional: bool,
}

fn t(name: String, shape: Vec<usize>) -> ExpectedTensor {
    ExpectedTensor {
        name,
        shape,
        optional: false,
    }
}

/// Every tensor the model reads, in file order of a typical checkpoint.
pub fn expected_tensors(c: &ModelConfig) -> Vec<ExpectedTensor> {
    let (h, q, kv, inter, v) = (
        c.hidden_size,
        c.q_size(),
        c.kv_size(),
        c.intermediate_size,
        c.vocab_size,
    );
    let mut out = vec![t("model.embed_tokens.weight".into(), vec![v, h])];
    for i in 0..c.num_hidden_layers {
        let p = format!("model.layers.{i}");
        out.push(t(format!("{p}.input_layernorm.weight"), vec![h]));
        let f = &c.family;
        if f.fused_projections {
            out.push(t(
                format!("{p}.self_attn.qkv_proj.weight"),
                vec![q + 2 * kv, h],
            ));
        } else {
            out.push(t(format!("{p}.self_attn.q_proj.weight"), vec![q, h]));
            out.push(t(format!("{p}.self_attn.k_proj.weight"), vec![kv, h]));
            out.push(t(format!("{p}.self_attn.v_proj.weight"), vec![kv, h]));
        }
        if f.qk_norm {
            out.push(t(format!("{p}.self_attn.q_norm.weight"), vec![c.head_dim]));
            out.push(t(format!("{p}.self_attn.k_norm.weight"), vec![c.head_dim]));
        }
        if c.attention_bias {
            out.push(t(format!("{p}.self_attn.q_proj.bias"), vec![q]));
            out.push(t(format!("{p}.self_attn.k_proj.bias"), vec![kv]));
            out.push(t(format!("{p}.self_attn.v_proj.bias"), vec![kv]));
        }
        out.push(t(format!("{p}.self_attn.o_proj.weight"), vec![h, q]));
        out.push(t(format!("{p}.post_attention_layernorm.weight"), vec![h]));
        if f.sandwich_norms {
            out.push(t(format!("{p}.pre_feedforward_layernorm.weight"), vec![h]));
            out.push(t(format!("{p}.post_feedforward_layernorm.weight"), vec![h]));
        }
        if let Some(m) = f.moe.as_ref().filter(|m| m.is_sparse(i)) {
            out.extend(
                super::moe::expected_tensors(c, m, i)
                    .into_iter()
                    .map(|(name, shape)| t(name, shape)),
            );
            continue;
        }
        if f.fused_projections {
            out.push(t(
                format!("{p}.mlp.gate_up_proj.weight"),
                vec![2 * inter, h],
            ));
        } else {
            out.push(t(format!("{p}.mlp.gate_proj.weight"), vec![inter, h]));
            out.push(t(format!("{p}.mlp.up_proj.weight"), vec![inter, h]));
        }
        out.push(t(format!("{p}.mlp.down_proj.weight"), vec![h, inter]));
    }
    out.push(t("model.norm.weight".into(), vec![h]));
    out.push(ExpectedTensor {
        name: "lm_head.weight".into(),
        shape: vec![v, h],
        optional: c.tie_word_embeddings,
    });
    out
}
