//! The runtime FP8 options, applied to a loaded model: `--quantization fp8` (vLLM's online
//! dynamic FP8) and `--kv-cache-dtype auto|fp8|fp8_e4m3`.
use anyhow::{bail, Result};

use super::super::loader::LoadedModel;
use crate::backend::cpu::fp8::{dynamic_scale, fake_quant_in_place};
use crate::types::{Device, HostData, HostTensor};

/// The KV cache's element type (`--kv-cache-dtype`, vLLM's spellings).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvCacheDtype {
    /// The model's compute type.
    #[default]
    Auto,
    /// E4M3 with per-layer scales (`fp8` and `fp8_e4m3`).
    Fp8E4m3,
}

impl KvCacheDtype {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "auto" => Self::Auto,
            "fp8" | "fp8_e4m3" => Self::Fp8E4m3,
            "fp8_e5m2" => bail!(
                "--kv-cache-dtype fp8_e5m2 is not supported: rvllm's FP8 KV cache is E4M3 \
                 (pass fp8 or fp8_e4m3, or auto)"
            ),
            other => bail!("unknown --kv-cache-dtype `{other}`: use auto, fp8 or fp8_e4m3"),
        })
    }
}

/// Whether a weight is one `--quantization fp8` rounds: the 2-D weights of the decoder
/// layers (projections and experts). Embeddings, the LM head and norms stay as loaded, as
/// vLLM leaves them.
fn is_layer_linear(name: &str, t: &HostTensor) -> bool {
    name.starts_with("model.layers.") && name.ends_with(".weight") && t.shape.len() == 2
}

/// Apply `--quantization` and `--kv-cache-dtype` to a loaded model, on `device`:
/// round the layer weights through E4M3 at a dynamic per-channel scale (amax of the row /
/// 448), and set the KV cache's per-layer scales. The CUDA backend stores the rounded
/// projections as E4M3 codes (the same codes: `backend/cuda/backend/fp8.rs`) and quantizes
/// their inputs per token; its FP8 KV cache stores the codes (`backend/cuda/backend/kv_fp8.rs`,
/// compute capability 8.9 or newer).
pub fn apply_runtime_options(
    model: &mut LoadedModel,
    quantization: Option<&str>,
    kv_cache_dtype: KvCacheDtype,
    device: Device,
) -> Result<()> {
    let quant = &model.config.family.quant;
    let on_gpu = device != Device::Cpu;
    match quantization {
        None => {}
        Some("fp8") => {
            if let Some(c) = quant
                .checkpoint
                .as_ref()
                .filter(|c| c.quant_method != "fp8")
            {
                bail!(
                    "--quantization fp8 does not match the checkpoint's quantization_config \
                     ({}); leave --quantization out to run the checkpoint as quantized",
                    c.quant_method
                );
            }
        }
        Some(other) => bail!("--quantization {other} is not supported; rvllm has fp8"),
    }
    if on_gpu && quant.checkpoint.is_some() {
        eprintln!(
            "note: the FP8 checkpoint's weights were dequantized at load; the CUDA backend runs \
             them in its compute type (no FP8 kernels yet), with the memory and speed of an \
             unquantized model"
        );
    }
    let online = quantization == Some("fp8") && quant.checkpoint.is_none();
    // The CUDA backend quantizes the projections as it uploads them, random ones included
    // (what the FP8 benchmarks run); the CPU rounds the loaded weights here, and dummy ones
    // do not exist yet.
    if online && model.weights.is_none() && !on_gpu {
        bail!(
            "--quantization fp8 with --load-format dummy on the CPU: the random weights are made \
             after load and would not be rounded through FP8; load real weights or leave the flag out"
        );
    }
    if online {
        if let Some(weights) = model.weights.as_mut() {
            for (name, t) in weights.tensors.iter_mut() {
                if !is_layer_linear(name, t) {
                    continue;
                }
                let mut data = match std::mem::replace(&mut t.data, HostData::F32(Vec::new())) {
                    HostData::F32(v) => v,
                    other => HostTensor {
                        shape: t.shape.clone(),
                        data: other,
                    }
                    .to_f32(),
                };
                // Per output channel (a row of the [out, in] weight), as the issue and
                // vLLM's channel-wise FP8 do: one outlier row does not coarsen the others.
                let cols = t.shape[1].max(1);
                for row in data.chunks_mut(cols) {
                    let scale = dynamic_scale(row);
                    fake_quant_in_place(row, scale);
                }
                t.data = HostData::F32(data);
            }
        }
        model.config.family.quant.online_fp8 = true;
    }
    if kv_cache_dtype == KvCacheDtype::Fp8E4m3 {
        let layers = model.config.num_hidden_layers;
        let scale_of = |name: String| -> f32 {
            model
                .weights
                .as_ref()
                .and_then(|w| w.tensors.get(&name))
                .map(|t| t.to_f32()[0])
                .filter(|s| s.is_finite() && *s > 0.0)
                .unwrap_or(1.0)
        };
        let scales = (0..layers)
            .map(|i| {
                let p = format!("model.layers.{i}.self_attn");
                (
                    scale_of(format!("{p}.k_scale")),
                    scale_of(format!("{p}.v_scale")),
                )
            })
            .collect();
        model.config.family.quant.kv_cache_fp8_scales = Some(scales);
    }
    Ok(())
}
