//! The NVIDIA driver and its GPUs, through cudarc's driver API (libcuda loaded at run time,
//! so xtask runs on machines without a driver and says so).

use crate::toolchain::CudaVersion;

#[derive(Clone, Debug, serde::Serialize)]
pub struct GpuInfo {
    pub index: usize,
    pub name: String,
    pub memory_bytes: u64,
    pub compute_capability: (u32, u32),
}

#[derive(Clone, Debug)]
pub struct DriverInfo {
    pub cuda_version: CudaVersion,
    pub gpus: Vec<GpuInfo>,
}

/// The oldest compute capability rvllm supports (Volta), as in vLLM's requirements.
pub const MIN_COMPUTE_CAPABILITY: (u32, u32) = (7, 0);

/// `Ok(None)` when libcuda cannot be loaded (no driver); `Err` when it loads but fails.
pub fn query_driver() -> Result<Option<DriverInfo>, String> {
    use cudarc::driver::{result, sys};
    // SAFETY: only probes whether the library can be opened.
    if !unsafe { sys::is_culib_present() } {
        return Ok(None);
    }
    // cudarc panics when a symbol it expects is missing from an old libcuda; turn that into
    // an error rather than a crash.
    let probe = std::panic::catch_unwind(|| -> Result<DriverInfo, String> {
        let mut code = 0i32;
        // SAFETY: cuDriverGetVersion writes one int; it may be called before cuInit.
        unsafe { sys::cuDriverGetVersion(&mut code) }
            .result()
            .map_err(|e| format!("cuDriverGetVersion: {e:?}"))?;
        let cuda_version = CudaVersion::from_driver_code(code)
            .ok_or_else(|| format!("the driver reported CUDA version code {code}"))?;
        result::init()
            .map_err(|e| format!("cuInit: {e:?} (is the GPU visible to this process?)"))?;
        let count = result::device::get_count().map_err(|e| format!("cuDeviceGetCount: {e:?}"))?;
        let mut gpus = Vec::new();
        for i in 0..count {
            let dev = result::device::get(i).map_err(|e| format!("cuDeviceGet({i}): {e:?}"))?;
            let name = result::device::get_name(dev).unwrap_or_else(|_| "unknown GPU".into());
            // SAFETY: `dev` came from cuDeviceGet.
            let (memory, major, minor) = unsafe {
                (
                    result::device::total_mem(dev).map_err(|e| format!("{e:?}"))?,
                    result::device::get_attribute(
                        dev,
                        sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
                    )
                    .map_err(|e| format!("{e:?}"))?,
                    result::device::get_attribute(
                        dev,
                        sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
                    )
                    .map_err(|e| format!("{e:?}"))?,
                )
            };
            gpus.push(GpuInfo {
                index: i as usize,
                name,
                memory_bytes: memory as u64,
                compute_capability: (major as u32, minor as u32),
            });
        }
        Ok(DriverInfo { cuda_version, gpus })
    });
    match probe {
        Ok(r) => r.map(Some),
        Err(_) => {
            Err("libcuda was found but is missing driver API functions (driver too old?)".into())
        }
    }
}

/// Whether a GPU meets the minimum compute capability.
pub fn supported(cc: (u32, u32)) -> bool {
    cc >= MIN_COMPUTE_CAPABILITY
}
