//! The block timeline of kernels/src/common.cuh (`RVLLM_TRACE_BLOCKS=<file>`, diagnostic; the
//! kernels must be built with `RVLLM_KERNEL_TRACE=1`, default builds carry no instrumentation):
//! every traced kernel's blocks record when they started, passed their PDL wait, saw their
//! first input and ended, into a ring on the device; the last `CAPACITY` records are written
//! to the file when the GPU is dropped. Inside CUDA graphs it is the only view of how the
//! kernels of a step overlap (Nsight Systems is not on every machine).
//!
//! File format: little-endian u64 records of 8: start, waited, first, end (globaltimer ns;
//! 0 where a kernel does not mark it), tag | SM << 8 | block << 16, and three zeros. Tags: 1
//! decode attention, 2 its reduce, 16 + 2 * input + add for gemv_bulk (input 0 plain,
//! 1 silu, 2 norm).

use std::ffi::CString;

use anyhow::{anyhow, bail, Result};
use cudarc::driver::{result as drv, sys};

use super::device::DevBuf;

/// Records kept (8 u64 each: 16 MiB), about a dozen batch-1 decode steps of an 8B model.
const CAPACITY: usize = 1 << 18;
const HEADER: usize = 8;

pub struct BlockTrace {
    buf: DevBuf,
    path: String,
}

impl BlockTrace {
    /// Allocates the ring and points every module's `rvllm_block_trace` at it, when `path`
    /// (`RVLLM_TRACE_BLOCKS`, `CudaSettings::trace_blocks`) names a file.
    pub fn new(path: Option<&str>, modules: &[sys::CUmodule]) -> Result<Option<Self>> {
        let Some(path) = path.map(str::to_string) else {
            return Ok(None);
        };
        let words = HEADER + 8 * CAPACITY;
        let ptr = unsafe { drv::malloc_sync(words * 8) }
            .map_err(|e| anyhow!("allocating the block trace: {e:?}"))?;
        let buf = DevBuf {
            ptr,
            bytes: words * 8,
        };
        let mut header = vec![0u64; words];
        header[1] = CAPACITY as u64;
        unsafe { drv::memcpy_htod_sync(buf.ptr, &header) }
            .map_err(|e| anyhow!("clearing the block trace: {e:?}"))?;
        let mut traced = 0;
        let name = CString::new("rvllm_block_trace").expect("no NUL");
        for &m in modules {
            // Modules without traced kernels, and every module of a default build, have no
            // such symbol.
            if let Ok((sym, bytes)) = unsafe { drv::module::get_global(m, name.clone()) } {
                if bytes == 8 {
                    unsafe { drv::memcpy_htod_sync(sym, &[buf.ptr]) }
                        .map_err(|e| anyhow!("setting rvllm_block_trace: {e:?}"))?;
                    traced += 1;
                }
            }
        }
        if traced == 0 {
            bail!(
                "RVLLM_TRACE_BLOCKS={path}: these kernels were built without the block timeline; \
                 rebuild them with RVLLM_KERNEL_TRACE=1 (e.g. `RVLLM_KERNEL_TRACE=1 cargo xtask \
                 gpu-test`), or unset RVLLM_TRACE_BLOCKS"
            );
        }
        eprintln!("RVLLM_TRACE_BLOCKS={path}: tracing kernel blocks (diagnostic)");
        Ok(Some(Self { buf, path }))
    }

    /// Writes the ring to the file (the stream must be idle).
    pub fn write(&self) -> Result<()> {
        let mut words = vec![0u64; self.buf.bytes / 8];
        unsafe { drv::memcpy_dtoh_sync(&mut words, self.buf.ptr) }
            .map_err(|e| anyhow!("reading the block trace: {e:?}"))?;
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        std::fs::write(&self.path, bytes)
            .map_err(|e| anyhow!("writing the block trace to {}: {e}", self.path))?;
        eprintln!(
            "wrote the block trace to {} ({} records seen)",
            self.path, words[0]
        );
        Ok(())
    }
}
