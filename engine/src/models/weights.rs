//! Host-side weights as loaded from disk, before a backend takes them.
//!
//! Names follow the Hugging Face Llama layout (`model.layers.{i}.self_attn.q_proj.weight`,
//! ...) whatever the source format: the GGUF loader renames and un-permutes Q/K so that every
//! backend sees one layout. Linear weights are `[out_features, in_features]`, row-major.
use std::collections::HashMap;

use half::{bf16, f16};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    BF16,
}

/// Element storage of a host tensor. Quantized GGUF tensors are dequantized to F32 at load.
#[derive(Debug, Clone)]
pub enum HostData {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
}

#[derive(Debug, Clone)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: HostData,
}

impl HostTensor {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn dtype(&self) -> DType {
        match self.data {
            HostData::F32(_) => DType::F32,
            HostData::F16(_) => DType::F16,
            HostData::BF16(_) => DType::BF16,
        }
    }
    pub fn to_f32(&self) -> Vec<f32> {
        match &self.data {
            HostData::F32(v) => v.clone(),
            HostData::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            HostData::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
        }
    }
    pub fn to_bf16(&self) -> Vec<bf16> {
        match &self.data {
            HostData::F32(v) => v.iter().map(|&x| bf16::from_f32(x)).collect(),
            HostData::F16(v) => v.iter().map(|x| bf16::from_f32(x.to_f32())).collect(),
            HostData::BF16(v) => v.clone(),
        }
    }
}

/// All weights of a model by (HF-layout) name.
#[derive(Debug, Default)]
pub struct WeightMap {
    pub tensors: HashMap<String, HostTensor>,
}

impl WeightMap {
    /// Take a tensor out, checking its shape; the error names the tensor and both shapes.
    pub fn take(&mut self, name: &str, shape: &[usize]) -> anyhow::Result<HostTensor> {
        let t = self
            .tensors
            .remove(name)
            .ok_or_else(|| anyhow::anyhow!("weight `{name}` is missing from the model files"))?;
        anyhow::ensure!(
            t.shape == shape,
            "weight `{name}` has shape {:?} but config.json implies {:?}",
            t.shape,
            shape
        );
        Ok(t)
    }
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}
