//! `--load-format dummy` weights made in device memory by kernels/src/dummy_fill.cu: each
//! rectangle of one checkpoint tensor (`DummyWeight::blocks`) is one launch, so start-up writes
//! the weights on the GPU instead of making them as f32 on the host and copying them up. The
//! values are the host's (`dummy_value`), rounded to the type as `bits_of` rounds.
use anyhow::{ensure, Context, Result};

use super::{CudaBackend, CudaWeight};
use crate::backend::cuda::device::DevBuf;
use crate::backend::cuda::elem::{kernel, Kernel, ELEM_BYTES};
use crate::backend::dummy_weight::{DummyFill, DummyWeight};
use crate::backend::Backend;
use rvllm_kernels::args;

pub const DUMMY_FILL: Kernel<args::DummyFill> = kernel!(
    args::DummyFill,
    "dummy_fill",
    "dummy_fill_bf16",
    "dummy_fill_f16"
);

/// Threads a block, and blocks a launch at most (each thread loops over the rest).
const BLOCK: u32 = 256;
const MAX_BLOCKS: usize = 8192;

impl CudaBackend {
    /// Writes `w`'s values, rounded to this backend's type, into `out` (row-major, at least
    /// `w.shape()`'s elements) on the stream. Constant parts are left as they are.
    pub fn fill_dummy(&self, w: &DummyWeight, out: &DevBuf) -> Result<()> {
        let [rows, cols] = w.shape();
        ensure!(
            out.bytes >= rows * cols * ELEM_BYTES,
            "a {rows}x{cols} dummy weight does not fit {} bytes",
            out.bytes
        );
        for b in w.blocks() {
            let DummyFill::Uniform { base, bound } = b.fill else {
                continue;
            };
            let n = b.rows * b.cols;
            if n == 0 {
                continue;
            }
            let a = args::DummyFill {
                out: out.ptr + (b.out_row * cols * ELEM_BYTES) as u64,
                ld_out: cols as i64,
                rows: b.rows as i64,
                cols: b.cols as i64,
                base,
                bound,
                part_cols: b.part_cols as i64,
                part_row: b.part_row as i64,
                part_col: b.part_col as i64,
            };
            let blocks = n.div_ceil(BLOCK as usize).min(MAX_BLOCKS) as u32;
            self.launch(DUMMY_FILL, (blocks, 1, 1), BLOCK, a)?;
        }
        Ok(())
    }

    /// `Backend::upload_dummy_weight`: filled on the device. Weights quantized at upload
    /// (`--quantization fp8`) and constant parts (never a matrix in practice) are made on the
    /// host as the default does.
    pub(super) fn fill_dummy_weight(&self, name: &str, w: &DummyWeight) -> Result<CudaWeight> {
        let constant = w
            .parts
            .iter()
            .any(|p| matches!(p.fill, DummyFill::Constant(_)));
        if (self.fp8.online() && super::fp8::is_fp8_projection(name)) || constant {
            return self.upload_weight(name, w.to_host());
        }
        let [rows, cols] = w.shape();
        let buf = self.gpu.alloc(rows * cols * ELEM_BYTES)?;
        self.fill_dummy(w, &buf)
            .with_context(|| format!("filling dummy weight `{name}`"))?;
        self.count_upload(buf.bytes);
        Ok(CudaWeight {
            buf,
            rows,
            cols,
            fp8_scales: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cuda::elem::GpuDtype;

    /// The kernel's name in each build is one its argument struct was generated from.
    #[test]
    fn the_fill_kernel_is_declared_by_its_argument_struct() {
        let want = rvllm_kernels::Entry {
            module: "dummy_fill",
            name: "dummy_fill_bf16",
            f16: Some(("dummy_fill_f16", "dummy_fill_f16")),
        };
        assert_eq!(
            DUMMY_FILL.of(GpuDtype::F16),
            ("dummy_fill_f16", "dummy_fill_f16")
        );
        assert!(DUMMY_FILL.named().declared.contains(&want));
    }
}
