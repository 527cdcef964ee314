//! Reading an FP8 checkpoint: the E4M3 weights and their scale tensors are collected while
//! the safetensors files are read (a weight and its scale may sit in different shards), then
//! each weight is dequantized into f32.
use std::collections::HashMap;

use anyhow::{bail, ensure, Context, Result};
use safetensors::Dtype;

use super::config::{Fp8Checkpoint, WeightScaling};
use crate::backend::cpu::fp8::E4M3_TABLE;
use crate::types::{HostData, HostTensor};

/// Suffixes of the tensors that scale FP8 weights or the KV cache.
const SCALE_SUFFIXES: [&str; 5] = [
    ".weight_scale_inv",
    ".weight_scale",
    ".input_scale",
    ".k_scale",
    ".v_scale",
];

/// Collects an FP8 checkpoint's weights (as codes) and scales while the files are read.
#[derive(Debug)]
pub struct Fp8Loader<'a> {
    format: Option<&'a Fp8Checkpoint>,
    codes: HashMap<String, (Vec<usize>, Vec<u8>)>,
    scales: HashMap<String, HostTensor>,
}

impl<'a> Fp8Loader<'a> {
    /// For a checkpoint of `format` (None: unquantized, where any FP8 tensor is an error).
    pub fn new(format: Option<&'a Fp8Checkpoint>) -> Self {
        Self {
            format,
            codes: HashMap::new(),
            scales: HashMap::new(),
        }
    }

    /// Whether `name` is a scale tensor this loader keeps (only for FP8 checkpoints).
    pub fn is_scale(&self, name: &str) -> bool {
        self.format.is_some() && SCALE_SUFFIXES.iter().any(|s| name.ends_with(s))
    }

    pub fn add_scale(&mut self, name: &str, t: HostTensor) {
        self.scales.insert(name.to_string(), t);
    }

    /// Takes a wanted weight stored as FP8 (returns true); leaves any other dtype to the
    /// caller (false). An FP8 weight without an FP8 `quantization_config`, or in a format
    /// other than E4M3, is refused by name.
    pub fn take_weight(
        &mut self,
        file: &str,
        name: &str,
        dtype: Dtype,
        shape: &[usize],
        bytes: &[u8],
    ) -> Result<bool> {
        match dtype {
            Dtype::F8_E4M3 => {}
            Dtype::F8_E5M2 | Dtype::F8_E8M0 => bail!(
                "tensor `{name}` in {file} has dtype {dtype:?}; FP8 weights must be E4M3 (F8_E4M3)"
            ),
            _ => return Ok(false),
        }
        ensure!(
            self.format.is_some(),
            "tensor `{name}` in {file} is FP8 (F8_E4M3) but config.json has no FP8 quantization_config giving its scales"
        );
        self.codes
            .insert(name.to_string(), (shape.to_vec(), bytes.to_vec()));
        Ok(true)
    }

    /// Dequantize every collected weight into `out` (f32), and keep the checkpoint's
    /// per-layer KV-cache scales (`k_scale` / `v_scale`, one value each) there as 1-element
    /// tensors for `--kv-cache-dtype fp8`.
    pub fn finish(mut self, out: &mut HashMap<String, HostTensor>) -> Result<()> {
        let Some(format) = self.format else {
            return Ok(());
        };
        for (name, (shape, codes)) in self.codes.drain() {
            let scale_name = format.scale_name(&name);
            let scale = self.scales.get(&scale_name).with_context(|| {
                format!("FP8 weight `{name}` has no scale tensor `{scale_name}` in the model files")
            })?;
            let data = dequantize(&name, &shape, &codes, format.weights, &scale_name, scale)?;
            out.insert(
                name,
                HostTensor {
                    shape,
                    data: HostData::F32(data),
                },
            );
        }
        for (name, t) in self.scales.drain() {
            if name.ends_with(".k_scale") || name.ends_with(".v_scale") {
                ensure!(
                    t.numel() == 1,
                    "KV-cache scale `{name}` has shape {:?}, expected one value",
                    t.shape
                );
                out.insert(name, t);
            }
        }
        Ok(())
    }
}

/// `codes` (row-major `[out, in]`) times their scales. The expected scale shape follows the
/// scaling; a scale tensor of any other shape is refused with both shapes named.
pub fn dequantize(
    name: &str,
    shape: &[usize],
    codes: &[u8],
    scaling: WeightScaling,
    scale_name: &str,
    scale: &HostTensor,
) -> Result<Vec<f32>> {
    ensure!(
        shape.len() == 2,
        "FP8 weight `{name}` has shape {shape:?}; only 2-D weights can be FP8"
    );
    let (rows, cols) = (shape[0], shape[1]);
    ensure!(
        codes.len() == rows * cols,
        "FP8 weight `{name}` is truncated"
    );
    let s = scale.to_f32();
    let numel = s.len();
    let (grid_rows, grid_cols, block_rows, block_cols) = match scaling {
        WeightScaling::Tensor => (1, 1, rows.max(1), cols.max(1)),
        WeightScaling::Channel => (rows, 1, 1, cols.max(1)),
        WeightScaling::Block { rows: br, cols: bc } => {
            (rows.div_ceil(br), cols.div_ceil(bc), br, bc)
        }
    };
    let shape_ok = match scaling {
        WeightScaling::Tensor => numel == 1 && scale.shape.iter().all(|&d| d == 1),
        WeightScaling::Channel => {
            scale.shape == [rows, 1] || scale.shape == [rows] || (rows == 1 && numel == 1)
        }
        WeightScaling::Block { .. } => scale.shape == [grid_rows, grid_cols],
    };
    ensure!(
        shape_ok,
        "scale `{scale_name}` has shape {:?}, but {scaling:?} scaling of a {shape:?} weight needs [{grid_rows}, {grid_cols}]",
        scale.shape
    );
    if let Some(bad) = s.iter().find(|v| !v.is_finite()) {
        bail!("scale `{scale_name}` holds {bad}");
    }
    let mut out = vec![0.0f32; codes.len()];
    for r in 0..rows {
        let srow = &s[(r / block_rows) * grid_cols..][..grid_cols];
        let (src, dst) = (&codes[r * cols..][..cols], &mut out[r * cols..][..cols]);
        for (c, (&q, o)) in src.iter().zip(dst.iter_mut()).enumerate() {
            *o = E4M3_TABLE[q as usize] * srow[c / block_cols];
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::fp8::f32_to_e4m3;

    fn scale(shape: &[usize], v: Vec<f32>) -> HostTensor {
        HostTensor {
            shape: shape.to_vec(),
            data: HostData::F32(v),
        }
    }

    #[test]
    fn ragged_blocks_take_the_scale_of_their_block() {
        // 3 x 5 weight, 2 x 2 blocks: a 2 x 3 grid whose last row and column are partial.
        let codes = vec![f32_to_e4m3(1.0); 15];
        let grid: Vec<f32> = (1..=6).map(|v| v as f32).collect();
        let blocks = WeightScaling::Block { rows: 2, cols: 2 };
        let w = dequantize("w", &[3, 5], &codes, blocks, "s", &scale(&[2, 3], grid)).unwrap();
        assert_eq!(&w[..5], &[1.0, 1.0, 2.0, 2.0, 3.0]);
        assert_eq!(&w[10..], &[4.0, 4.0, 5.0, 5.0, 6.0]);
        let err = dequantize(
            "w",
            &[3, 5],
            &codes,
            blocks,
            "s",
            &scale(&[2, 2], vec![1.0; 4]),
        )
        .unwrap_err();
        assert!(format!("{err}").contains("needs [2, 3]"), "{err}");
    }

    #[test]
    fn channel_and_tensor_scales() {
        let codes = vec![f32_to_e4m3(2.0); 4];
        let ch = dequantize(
            "w",
            &[2, 2],
            &codes,
            WeightScaling::Channel,
            "s",
            &scale(&[2, 1], vec![0.5, 3.0]),
        )
        .unwrap();
        assert_eq!(ch, vec![1.0, 1.0, 6.0, 6.0]);
        let t = dequantize(
            "w",
            &[2, 2],
            &codes,
            WeightScaling::Tensor,
            "s",
            &scale(&[], vec![0.25]),
        )
        .unwrap();
        assert_eq!(t, vec![0.5; 4]);
    }
}
