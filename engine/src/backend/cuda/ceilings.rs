//! The device's own ceilings, measured in the same run as a benchmark (GPU.md: absolute
//! figures drift between machines, so engine figures are reported as fractions of these).
use anyhow::{anyhow, Result};
use cudarc::driver::{result as drv, sys};
use half::bf16;

use super::device::Gpu;

fn time_ms(gpu: &Gpu, iters: usize, mut body: impl FnMut() -> Result<()>) -> Result<f64> {
    let flags = sys::CUevent_flags::CU_EVENT_DEFAULT;
    let start = drv::event::create(flags).map_err(|e| anyhow!("{e:?}"))?;
    let end = drv::event::create(flags).map_err(|e| anyhow!("{e:?}"))?;
    body()?; // warm-up
    unsafe { drv::event::record(start, gpu.stream) }.map_err(|e| anyhow!("{e:?}"))?;
    for _ in 0..iters {
        body()?;
    }
    unsafe { drv::event::record(end, gpu.stream) }.map_err(|e| anyhow!("{e:?}"))?;
    gpu.sync()?;
    let ms = unsafe { drv::event::elapsed(start, end) }.map_err(|e| anyhow!("{e:?}"))? as f64;
    unsafe {
        let _ = drv::event::destroy(start);
        let _ = drv::event::destroy(end);
    }
    Ok(ms / iters as f64)
}

/// Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written.
pub fn copy_bandwidth(gpu: &Gpu) -> Result<f64> {
    let bytes = 1usize << 30;
    let a = gpu.alloc(bytes)?;
    let b = gpu.alloc(bytes)?;
    gpu.memset_zero(a.ptr, bytes)?;
    let ms = time_ms(gpu, 20, || gpu.copy_d2d(b.ptr, a.ptr, bytes))?;
    Ok(2.0 * bytes as f64 / (ms * 1e-3))
}

/// bf16 GEMM rate (FLOP/s) at 8192³ on random data through cuBLAS.
pub fn gemm_rate(gpu: &Gpu) -> Result<f64> {
    let n = 8192usize;
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let host: Vec<bf16> = (0..n * n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            bf16::from_f32(((state >> 40) as f32 / (1u64 << 24) as f32) - 0.5)
        })
        .collect();
    let bytes = n * n * 2;
    let a = gpu.alloc(bytes)?;
    let b = gpu.alloc(bytes)?;
    let c = gpu.alloc(bytes)?;
    gpu.upload(a.ptr, &host)?;
    gpu.upload(b.ptr, &host)?;
    let ms = time_ms(gpu, 20, || {
        gpu.gemm(
            super::elem::GpuDtype::Bf16,
            a.ptr,
            b.ptr,
            c.ptr,
            n,
            n,
            n,
            false,
        )
    })?;
    Ok(2.0 * (n as f64).powi(3) / (ms * 1e-3))
}

/// (copy bandwidth bytes/s, bf16 GEMM FLOP/s) on device 0.
pub fn measure_ceilings() -> Result<(f64, f64)> {
    let gpu = Gpu::new(0)?;
    Ok((copy_bandwidth(&gpu)?, gemm_rate(&gpu)?))
}
