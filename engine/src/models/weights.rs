//! Host-side weights as loaded from disk, before a backend takes them.
//!
//! Names follow the Hugging Face Llama layout (`model.layers.{i}.self_attn.q_proj.weight`,
//! ...) whatever the source format: the GGUF loader renames and un-permutes Q/K so that every
//! backend sees one layout. Linear weights are `[out_features, in_features]`, row-major.
use std::collections::HashMap;

// The tensor types sit at the bottom (`types`) so that backends take them without
// importing `models`.
pub use crate::types::{DType, HostData, HostTensor};

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
