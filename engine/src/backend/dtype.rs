//! What `--dtype` means on each device. The CPU backend computes in float32. The CUDA backend
//! computes in bfloat16 or float16 (its kernels are built in both, kernels/src/common.cuh),
//! chosen as vLLM does: `auto` takes the checkpoint's `torch_dtype`, except that float32
//! (and a checkpoint that names none, such as a GGUF file) runs in bfloat16, which every
//! GPU rvllm supports (sm_80+) and which keeps float32's range.
use anyhow::{bail, Result};

use crate::types::Device;

/// The element type of the GPU's activations, weights and KV cache (both 2 bytes; arithmetic
/// inside the kernels is f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuDtype {
    Bf16,
    F16,
}

impl GpuDtype {
    /// vLLM's name of the type.
    pub fn name(self) -> &'static str {
        match self {
            GpuDtype::Bf16 => "bfloat16",
            GpuDtype::F16 => "float16",
        }
    }
}

/// `--dtype` under any of vLLM's spellings: `auto`, or the canonical type name.
fn canonical(flag: &str) -> Result<&'static str> {
    Ok(match flag {
        "auto" => "auto",
        "bfloat16" | "bf16" => "bfloat16",
        "float16" | "half" | "fp16" => "float16",
        "float32" | "float" | "fp32" => "float32",
        other => bail!(
            "unknown --dtype `{other}`: use auto, bfloat16, float16 or float32 (vLLM's names)"
        ),
    })
}

/// `--dtype`: `auto`, or a type the device computes in (bfloat16 or float16 on the GPU,
/// float32 on the CPU), under any of vLLM's spellings of it. Checked before the model loads.
pub fn check_dtype(flag: &str, device: Device) -> Result<()> {
    match device {
        Device::Cpu => check_cpu_dtype(flag),
        Device::Cuda => gpu_dtype(flag, None).map(|_| ()),
    }
}

/// The CPU backend's check: `auto` or float32.
pub fn check_cpu_dtype(flag: &str) -> Result<()> {
    match canonical(flag)? {
        "auto" | "float32" => Ok(()),
        _ => bail!(
            "--dtype {flag} is not supported here: the CPU backend computes in float32; pass \
             --dtype auto or float32 (or run on a GPU with --device cuda)"
        ),
    }
}

/// The type the CUDA backend computes in for `--dtype flag` and a checkpoint whose config
/// names `checkpoint` (config.json's `torch_dtype`, or `dtype` in newer transformers).
pub fn gpu_dtype(flag: &str, checkpoint: Option<&str>) -> Result<GpuDtype> {
    Ok(match canonical(flag)? {
        "bfloat16" => GpuDtype::Bf16,
        "float16" => GpuDtype::F16,
        "float32" => bail!(
            "--dtype {flag} is not supported here: the CUDA backend computes in bfloat16 or \
             float16; pass --dtype auto, bfloat16 or float16"
        ),
        _ => match checkpoint {
            Some("float16") => GpuDtype::F16,
            _ => GpuDtype::Bf16,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_follows_the_checkpoint_and_runs_float32_in_bfloat16() {
        assert_eq!(gpu_dtype("auto", Some("float16")).unwrap(), GpuDtype::F16);
        assert_eq!(gpu_dtype("auto", Some("bfloat16")).unwrap(), GpuDtype::Bf16);
        assert_eq!(gpu_dtype("auto", Some("float32")).unwrap(), GpuDtype::Bf16);
        assert_eq!(gpu_dtype("auto", None).unwrap(), GpuDtype::Bf16);
    }

    #[test]
    fn an_explicit_type_overrides_the_checkpoint() {
        assert_eq!(gpu_dtype("half", Some("bfloat16")).unwrap(), GpuDtype::F16);
        assert_eq!(gpu_dtype("fp16", None).unwrap(), GpuDtype::F16);
        assert_eq!(gpu_dtype("bf16", Some("float16")).unwrap(), GpuDtype::Bf16);
        assert_eq!(GpuDtype::F16.name(), "float16");
    }

    #[test]
    fn unsupported_types_say_what_to_pass() {
        let e = gpu_dtype("float32", Some("float32"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("bfloat16 or float16") && e.contains("--dtype auto"),
            "{e}"
        );
        let e = gpu_dtype("int8", None).unwrap_err().to_string();
        assert!(e.contains("unknown --dtype `int8`"), "{e}");
        assert!(check_cpu_dtype("fp32").is_ok() && check_cpu_dtype("auto").is_ok());
        let e = check_cpu_dtype("bfloat16").unwrap_err().to_string();
        assert!(e.contains("computes in float32"), "{e}");
    }
}
