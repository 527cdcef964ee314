//! Host-side tensors as read from model files, before a backend uploads them. Linear weights
//! are `[out_features, in_features]`, row-major.
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
