//! The GPU as the CUDA backend sees it: one context, one stream, raw device allocations,
//! kernels from rvllm-kernels' embedded fatbins, cuBLAS. Every call's result is checked and
//! every launch error names the kernel.
use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::Arc;

use anyhow::{anyhow, bail, ensure, Context, Result};
use cudarc::cublas::{result as blas, sys as blas_sys};
use cudarc::driver::{result as drv, sys, CudaContext};
use rvllm_kernels::KernelArgs;

use super::switches::CudaSettings;

/// Number of CUDA devices, or an error saying why none can be used (no libcuda, no driver).
pub fn device_count() -> Result<usize> {
    // SAFETY: only probes whether the driver library can be loaded.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        bail!("the CUDA driver library (libcuda.so) could not be loaded: install the NVIDIA driver, or run with --device cpu");
    }
    let n = std::panic::catch_unwind(CudaContext::device_count)
        .map_err(|_| anyhow!("the CUDA driver library (libcuda.so) could not be loaded: install the NVIDIA driver, or run with --device cpu"))?
        .map_err(|e| anyhow!("the CUDA driver failed to initialise: {e:?}"))?;
    Ok(n.max(0) as usize)
}

/// An error that says what to do when device `ordinal` does not exist.
fn check_ordinal(ordinal: usize) -> Result<()> {
    let count = device_count()?;
    if ordinal >= count {
        bail!("CUDA device {ordinal} requested but {count} present; run with --device cpu or check CUDA_VISIBLE_DEVICES");
    }
    Ok(())
}

/// Total memory in bytes and name of CUDA device `ordinal`, for defaults that depend on the
/// GPU. Device queries only: no context is created (the engine creates its own later).
pub fn memory_and_name(ordinal: usize) -> Result<(usize, String)> {
    check_ordinal(ordinal)?;
    drv::init().map_err(|e| anyhow!("the CUDA driver failed to initialise: {e:?}"))?;
    let dev = drv::device::get(ordinal as i32)
        .map_err(|e| anyhow!("opening CUDA device {ordinal}: {e:?}"))?;
    // SAFETY: `dev` is a valid device handle from the initialised driver.
    let total = unsafe { drv::device::total_mem(dev) }
        .map_err(|e| anyhow!("reading the memory of CUDA device {ordinal}: {e:?}"))?;
    let name = drv::device::get_name(dev).unwrap_or_else(|_| "unknown GPU".into());
    Ok((total, name))
}

/// A device allocation, freed on drop.
pub struct DevBuf {
    pub ptr: sys::CUdeviceptr,
    pub bytes: usize,
}

impl DevBuf {
    pub fn null() -> Self {
        Self { ptr: 0, bytes: 0 }
    }
}

impl Drop for DevBuf {
    fn drop(&mut self) {
        if self.ptr != 0 {
            // SAFETY: allocated by malloc_sync in Gpu::alloc and freed only here.
            unsafe {
                let _ = drv::free_sync(self.ptr);
            }
        }
    }
}

/// Page-locked host memory: the stream copies from and to it in order with the kernels,
/// without the host waiting. (A copy from ordinary memory may make the host wait for the
/// stream, so nothing could be queued behind a step still running; one to ordinary memory
/// always does.) The owner keeps a buffer unchanged until the copies using it are done.
pub struct PinnedBuf {
    ptr: *mut c_void,
    bytes: usize,
}

impl PinnedBuf {
    pub fn new(bytes: usize) -> Result<Self> {
        // SAFETY: plain page-locked allocation of at least one byte.
        let ptr = unsafe { drv::malloc_host(bytes.max(1), 0) }
            .map_err(|e| anyhow!("allocating {bytes} bytes of page-locked host memory: {e:?}"))?;
        // Zeroed, so that a reader never sees uninitialised memory.
        // SAFETY: `ptr` holds at least `bytes` bytes.
        unsafe { std::ptr::write_bytes(ptr as *mut u8, 0, bytes) };
        Ok(Self { ptr, bytes })
    }

    /// The first `n` values of type `T` (plain integers and floats).
    pub fn slice<T: Copy>(&self, n: usize) -> &[T] {
        assert!(
            n * std::mem::size_of::<T>() <= self.bytes,
            "pinned buffer overrun"
        );
        // SAFETY: in bounds (checked), page-locked memory aligned to a page.
        unsafe { std::slice::from_raw_parts(self.ptr as *const T, n) }
    }

    pub fn slice_mut<T: Copy>(&mut self, n: usize) -> &mut [T] {
        assert!(
            n * std::mem::size_of::<T>() <= self.bytes,
            "pinned buffer overrun"
        );
        // SAFETY: as `slice`, and `&mut self` makes it the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr as *mut T, n) }
    }

    /// Queues a copy of the first `bytes` bytes to `dst` on the GPU's stream.
    pub fn upload(&self, gpu: &Gpu, dst: sys::CUdeviceptr, bytes: usize) -> Result<()> {
        anyhow::ensure!(
            bytes <= self.bytes,
            "an upload of {bytes} bytes from {}",
            self.bytes
        );
        // SAFETY: the buffer holds `bytes` bytes; the owner keeps it until the copy is done.
        unsafe { sys::cuMemcpyHtoDAsync_v2(dst, self.ptr, bytes, gpu.stream).result() }
            .map_err(|e| anyhow!("queueing a copy to the GPU: {e:?}"))
    }

    /// Queues a copy of `bytes` bytes from `src` into this buffer on the GPU's stream.
    pub fn download(&mut self, gpu: &Gpu, src: sys::CUdeviceptr, bytes: usize) -> Result<()> {
        anyhow::ensure!(
            bytes <= self.bytes,
            "a download of {bytes} bytes into {}",
            self.bytes
        );
        // SAFETY: as `upload`.
        unsafe { sys::cuMemcpyDtoHAsync_v2(self.ptr, src, bytes, gpu.stream).result() }
            .map_err(|e| anyhow!("queueing a copy from the GPU: {e:?}"))
    }
}

impl Drop for PinnedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new`; owners wait for their copies before dropping.
        unsafe {
            let _ = drv::free_host(self.ptr);
        }
    }
}

/// Two page-locked staging buffers used in turn: an upload may still be queued behind the
/// step before when the next step's data is written, so consecutive steps never share one.
pub struct PinnedPair {
    bufs: [PinnedBuf; 2],
    next: usize,
}

impl PinnedPair {
    pub fn new(bytes: usize) -> Result<Self> {
        Ok(Self {
            bufs: [PinnedBuf::new(bytes)?, PinnedBuf::new(bytes)?],
            next: 0,
        })
    }

    /// The buffer whose turn it is (the other one's turn comes next).
    pub fn take_turn(&mut self) -> &mut PinnedBuf {
        let i = self.next;
        self.next ^= 1;
        &mut self.bufs[i]
    }
}

/// Bytes of each of the two page-locked buffers that host data streams to the GPU through.
pub const UPLOAD_CHUNK_BYTES: usize = 16 << 20;

/// Two page-locked buffers used in turn by `Gpu::upload_staged`, each with the event of the
/// last copy out of it: the host fills one while the other's copy runs.
pub struct UploadStaging {
    bufs: [(PinnedBuf, StreamEvent); 2],
}

impl UploadStaging {
    fn new() -> Result<Self> {
        let one =
            || -> Result<_> { Ok((PinnedBuf::new(UPLOAD_CHUNK_BYTES)?, StreamEvent::new()?)) };
        Ok(Self {
            bufs: [one()?, one()?],
        })
    }
}

/// A point in the GPU's stream that the host can wait for.
pub struct StreamEvent(sys::CUevent);

impl StreamEvent {
    pub fn new() -> Result<Self> {
        drv::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)
            .map(Self)
            .map_err(|e| anyhow!("creating a CUDA event: {e:?}"))
    }

    /// Marks the stream's current end.
    pub fn record(&self, gpu: &Gpu) -> Result<()> {
        // SAFETY: a valid event and stream.
        unsafe { drv::event::record(self.0, gpu.stream) }
            .map_err(|e| anyhow!("recording a CUDA event: {e:?}"))
    }

    /// Waits until the stream has passed the mark.
    pub fn wait(&self) -> Result<()> {
        // SAFETY: a valid event.
        unsafe { sys::cuEventSynchronize(self.0).result() }.map_err(|e| {
            anyhow!("a GPU kernel failed (reported when a step's tokens were read): {e:?}; rerun with CUDA_LAUNCH_BLOCKING=1 to name it")
        })
    }
}

impl Drop for StreamEvent {
    fn drop(&mut self) {
        // SAFETY: created in `new`, used by nothing else.
        unsafe {
            let _ = sys::cuEventSynchronize(self.0);
            let _ = sys::cuEventDestroy_v2(self.0);
        }
    }
}

pub struct Gpu {
    /// The page-locked buffers host data goes up through (`upload_staged`), made on first
    /// use. First, so that it is dropped while the context still lives.
    upload_staging: std::sync::Mutex<Option<UploadStaging>>,
    pub ctx: Arc<CudaContext>,
    pub stream: sys::CUstream,
    pub blas: blas_sys::cublasHandle_t,
    modules: HashMap<&'static str, sys::CUmodule>,
    functions: std::sync::Mutex<HashMap<(&'static str, &'static str), sys::CUfunction>>,
    pub name: String,
    pub compute_capability: (i32, i32),
    /// Launch kernels with programmatic dependent launch (sm_90+; `RVLLM_PDL=0` turns it
    /// off): each may start while the previous one finishes (see kernels/src/common.cuh).
    pub pdl: bool,
    /// The run's diagnostic settings, read once at start-up.
    pub settings: CudaSettings,
    /// Streaming multiprocessors (sizes persistent grids).
    pub sm_count: u32,
    /// The most shared memory a block may opt in to (227 KiB on Hopper and B200, 99 KiB on
    /// Ampere's smaller chips, Ada and the RTX Blackwells).
    pub smem_per_block_optin: u32,
    /// Per-kernel GPU times (`RVLLM_PROFILE_KERNELS=1`).
    pub profiler: Option<super::profiler::KernelProfiler>,
    /// Diagnostic only (`RVLLM_SKIP_KERNELS=pat1,pat2`): kernels whose name contains a
    /// pattern are not launched, so a benchmark shows what they cost inside CUDA graphs,
    /// where the event profile cannot look. The outputs are wrong while it is set.
    skip_kernels: Vec<String>,
    /// The kernels' block timeline (`RVLLM_TRACE_BLOCKS=<file>`, diagnostic), written on drop.
    block_trace: Option<super::block_trace::BlockTrace>,
}

// SAFETY: the raw handles are only used from the engine thread that owns the Gpu; the
// context is bound to whichever thread calls `bind`.
unsafe impl Send for Gpu {}
unsafe impl Sync for Gpu {}

impl Gpu {
    /// Device `ordinal` with the settings of this process's environment.
    pub fn new(ordinal: usize) -> Result<Self> {
        Self::with_settings(ordinal, CudaSettings::from_env()?)
    }

    /// Device `ordinal`, every kernel module loaded, with `settings`.
    pub fn with_settings(ordinal: usize, settings: CudaSettings) -> Result<Self> {
        check_ordinal(ordinal)?;
        let ctx = std::panic::catch_unwind(|| CudaContext::new(ordinal))
            .map_err(|_| anyhow!("the CUDA driver library could not be loaded"))?
            .map_err(|e| anyhow!("creating a CUDA context on device {ordinal}: {e:?}"))?;
        ctx.bind_to_thread()
            .map_err(|e| anyhow!("binding the CUDA context: {e:?}"))?;
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        let compute_capability = ctx.compute_capability().map_err(|e| anyhow!("{e:?}"))?;
        let stream = drv::stream::create(drv::stream::StreamKind::NonBlocking)
            .map_err(|e| anyhow!("creating a CUDA stream: {e:?}"))?;
        let handle = blas::create_handle().map_err(|e| {
            anyhow!("cuBLAS could not be initialised ({e:?}): is libcublas (CUDA 12/13) installed and on the loader path?")
        })?;
        // SAFETY: handle and stream are valid and live as long as self.
        unsafe { blas::set_stream(handle, stream as _) }
            .map_err(|e| anyhow!("cublasSetStream: {e:?}"))?;
        let mut modules = HashMap::new();
        for &stem in rvllm_kernels::KERNEL_NAMES {
            let image = rvllm_kernels::fatbin(stem)
                .ok_or_else(|| anyhow!("kernel module `{stem}` is missing from this build"))?;
            // The driver wants the fatbin in memory it can read until load returns; a
            // NUL-terminated copy is not needed for fatbins, only for PTX text.
            let module = unsafe { drv::module::load_data(image.as_ptr() as *const c_void) }.map_err(|e| {
                anyhow!(
                    "loading kernel module `{stem}` on {name} (sm_{}{}): {e:?}. This build's kernels target {}; \
                     rebuild with CUDA_ARCHS including this GPU (`cargo xtask build --cuda-archs ...`)",
                    compute_capability.0,
                    compute_capability.1,
                    rvllm_kernels::built_archs()
                )
            })?;
            modules.insert(stem, module);
        }
        let block_trace = super::block_trace::BlockTrace::new(
            settings.trace_blocks.as_deref(),
            &modules.values().copied().collect::<Vec<_>>(),
        )?;
        let pdl = settings.pdl_on(compute_capability);
        let sm_count = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| anyhow!("reading the multiprocessor count: {e:?}"))?
            .max(1) as u32;
        let smem_per_block_optin = ctx
            .attribute(
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            )
            .map_err(|e| anyhow!("reading the shared memory a block may use: {e:?}"))?
            .max(0) as u32;
        Ok(Self {
            upload_staging: Default::default(),
            ctx,
            stream,
            blas: handle,
            modules,
            functions: Default::default(),
            name,
            compute_capability,
            pdl,
            sm_count,
            smem_per_block_optin,
            profiler: settings
                .profile_kernels
                .then(super::profiler::KernelProfiler::default),
            skip_kernels: {
                let skip = settings.skip_kernels.clone();
                if !skip.is_empty() {
                    eprintln!(
                        "WARNING: RVLLM_SKIP_KERNELS={} — kernels matching it are not launched; \
                         every output of this run is wrong (timing diagnostic only)",
                        skip.join(",")
                    );
                }
                skip
            },
            block_trace,
            settings,
        })
    }

    /// Bind the context to the calling thread (the engine thread may differ from the loader's).
    pub fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| anyhow!("binding the CUDA context: {e:?}"))
    }

    pub fn function(&self, module: &'static str, kernel: &'static str) -> Result<sys::CUfunction> {
        let mut cache = self.functions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = cache.get(&(module, kernel)) {
            return Ok(*f);
        }
        let m = *self
            .modules
            .get(module)
            .ok_or_else(|| anyhow!("kernel module `{module}` is not in this build"))?;
        let cname = CString::new(kernel).expect("kernel names have no NUL");
        // SAFETY: module is loaded and outlives self.
        let f = unsafe { drv::module::get_function(m, cname) }
            .map_err(|e| anyhow!("kernel `{kernel}` not found in module `{module}`: {e:?}"))?;
        cache.insert((module, kernel), f);
        Ok(f)
    }

    /// Launches the one entry point of argument struct `A` (a kernel built once, under one
    /// name: `args::ExpandBlockTables`, `args::SampleTokens`, ...). Kernels built per element
    /// type, or several under one signature, go through `CudaBackend`'s `Kernel<A>` table.
    pub fn launch_args<A: KernelArgs>(
        &self,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        shared_bytes: u32,
        mut args: A,
    ) -> Result<()> {
        let [entry] = A::ENTRIES else {
            bail!(
                "{} has {} entry points; launch one by name",
                std::any::type_name::<A>(),
                A::ENTRIES.len()
            );
        };
        if entry.f16.is_some() {
            bail!(
                "`{}` has a build per element type; launch it through the backend's kernel table",
                entry.name
            );
        }
        let params = args.params();
        self.launch_params(entry.module, entry.name, grid, block, shared_bytes, params)
    }

    /// `launch` with the parameter array of an argument struct.
    pub fn launch_params(
        &self,
        module: &'static str,
        kernel: &'static str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        shared_bytes: u32,
        mut params: rvllm_kernels::Params<'_>,
    ) -> Result<()> {
        self.launch(
            module,
            kernel,
            grid,
            block,
            shared_bytes,
            params.as_mut_slice(),
        )
    }

    /// Launch a kernel on the stream. `params` are pointers to each argument's value.
    pub fn launch(
        &self,
        module: &'static str,
        kernel: &'static str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        shared_bytes: u32,
        params: &mut [*mut c_void],
    ) -> Result<()> {
        let f = self.function(module, kernel)?;
        if self
            .skip_kernels
            .iter()
            .any(|p| kernel.contains(p.as_str()))
        {
            return Ok(());
        }
        // Static and dynamic shared memory together may not pass 48 KiB without the opt-in
        // (decode attention: 46 KiB dynamic + 3 KiB static), so any dynamic size sets it.
        if shared_bytes > 0 {
            ensure!(
                shared_bytes <= self.smem_per_block_optin,
                "kernel `{kernel}` needs {shared_bytes} B of shared memory a block; {} \
                 (sm_{}{}) allows {} B. This configuration is not supported on this GPU",
                self.name,
                self.compute_capability.0,
                self.compute_capability.1,
                self.smem_per_block_optin
            );
            // SAFETY: f is a valid function handle.
            unsafe {
                drv::function::set_function_attribute(
                    f,
                    sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    shared_bytes as i32,
                )
            }
            .map_err(|e| {
                anyhow!("kernel `{kernel}`: setting {shared_bytes} B of shared memory: {e:?}")
            })?;
        }
        // SAFETY: the Gpu's own stream, live as long as self.
        let started = self
            .profiler
            .as_ref()
            .and_then(|p| unsafe { p.begin(self.stream) });
        let launched = if self.pdl {
            // SAFETY: a zeroed attribute is a valid plain-old-data value; the one field
            // written is the one the id selects.
            let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
            attr.id =
                sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
            attr.value.programmaticStreamSerializationAllowed = 1;
            let config = sys::CUlaunchConfig {
                gridDimX: grid.0,
                gridDimY: grid.1,
                gridDimZ: grid.2,
                blockDimX: block.0,
                blockDimY: block.1,
                blockDimZ: block.2,
                sharedMemBytes: shared_bytes,
                hStream: self.stream,
                attrs: &mut attr,
                numAttrs: 1,
            };
            // SAFETY: as below; config and attr outlive the call.
            unsafe {
                sys::cuLaunchKernelEx(&config, f, params.as_mut_ptr(), std::ptr::null_mut())
                    .result()
            }
        } else {
            // SAFETY: the caller passes argument pointers matching the kernel's signature.
            unsafe { drv::launch_kernel(f, grid, block, shared_bytes, self.stream, params) }
        };
        if let (Some(p), Some(start)) = (&self.profiler, started) {
            // SAFETY: `start` was begun on this stream just above.
            unsafe { p.end(kernel, start, self.stream) };
        }
        launched.map_err(|e| {
            anyhow!("launching kernel `{kernel}` (grid {grid:?}, block {block:?}): {e:?}")
        })
    }

    pub fn alloc(&self, bytes: usize) -> Result<DevBuf> {
        if bytes == 0 {
            return Ok(DevBuf::null());
        }
        // SAFETY: plain device allocation.
        let ptr = unsafe { drv::malloc_sync(bytes) }.map_err(|e| {
            let (free, total) = drv::mem_get_info().unwrap_or((0, 0));
            anyhow!(
                "allocating {:.2} GiB on {} failed ({e:?}); {:.2} of {:.2} GiB free. Lower --gpu-memory-utilization, \
                 --max-num-seqs or --max-model-len",
                bytes as f64 / (1u64 << 30) as f64,
                self.name,
                free as f64 / (1u64 << 30) as f64,
                total as f64 / (1u64 << 30) as f64
            )
        })?;
        Ok(DevBuf { ptr, bytes })
    }

    /// Copies `n` 16-bit values to `dst` through the page-locked staging buffers:
    /// `fill(first, chunk)` writes values `first..first + chunk.len()` into one, whose copy then
    /// runs on the stream while the next chunk is filled. (A copy from pageable memory is
    /// synchronous and staged by the driver, one chunk at a time, with no overlap.) Returns once
    /// every value is in page-locked memory; the copies are ordered before later work on the
    /// stream, and a download waits for them.
    pub fn upload_staged(
        &self,
        dst: sys::CUdeviceptr,
        n: usize,
        mut fill: impl FnMut(usize, &mut [u16]),
    ) -> Result<()> {
        let mut guard = self
            .upload_staging
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let staging = match &mut *guard {
            Some(s) => s,
            none => none.insert(UploadStaging::new()?),
        };
        let per = UPLOAD_CHUNK_BYTES / 2;
        for (k, first) in (0..n).step_by(per).enumerate() {
            let len = per.min(n - first);
            let (buf, copied) = &mut staging.bufs[k % 2];
            // The buffer's previous copy must have left it before it is overwritten.
            copied.wait()?;
            fill(first, buf.slice_mut::<u16>(len));
            buf.upload(self, dst + (first * 2) as u64, len * 2)?;
            copied.record(self)?;
        }
        Ok(())
    }

    pub fn upload<T: Copy>(&self, dst: sys::CUdeviceptr, src: &[T]) -> Result<()> {
        // SAFETY: dst holds at least size_of_val(src) bytes (callers allocate from the source).
        unsafe { drv::memcpy_htod_sync(dst, src) }.map_err(|e| anyhow!("copy to the GPU: {e:?}"))
    }

    /// Upload on the stream; the host slice must stay alive and unchanged until the stream
    /// has consumed it (callers keep step buffers alive for the step).
    pub fn upload_async<T: Copy>(&self, dst: sys::CUdeviceptr, src: &[T]) -> Result<()> {
        unsafe { drv::memcpy_htod_async(dst, src, self.stream) }
            .map_err(|e| anyhow!("async copy to the GPU: {e:?}"))
    }

    pub fn download<T: Copy>(&self, dst: &mut [T], src: sys::CUdeviceptr) -> Result<()> {
        self.sync()?;
        // SAFETY: src holds at least size_of_val(dst) bytes.
        unsafe { drv::memcpy_dtoh_sync(dst, src) }.map_err(|e| anyhow!("copy from the GPU: {e:?}"))
    }

    pub fn memset_zero(&self, dst: sys::CUdeviceptr, bytes: usize) -> Result<()> {
        unsafe { drv::memset_d8_async(dst, 0, bytes, self.stream) }
            .map_err(|e| anyhow!("memset: {e:?}"))
    }

    pub fn copy_d2d(
        &self,
        dst: sys::CUdeviceptr,
        src: sys::CUdeviceptr,
        bytes: usize,
    ) -> Result<()> {
        unsafe { drv::memcpy_dtod_async(dst, src, bytes, self.stream) }
            .map_err(|e| anyhow!("device copy: {e:?}"))
    }

    pub fn sync(&self) -> Result<()> {
        // SAFETY: valid stream.
        unsafe { drv::stream::synchronize(self.stream) }.map_err(|e| {
            anyhow!("a GPU kernel failed (reported at stream synchronize): {e:?}; rerun with CUDA_LAUNCH_BLOCKING=1 to name it")
        })?;
        if let Some(p) = &self.profiler {
            p.resolve();
        }
        Ok(())
    }

    pub fn mem_info(&self) -> Result<(usize, usize)> {
        drv::mem_get_info().map_err(|e| anyhow!("cuMemGetInfo: {e:?}"))
    }

    /// Row-major `y[m, n] = x[m, k] @ w[n, k]^T` in `dtype` with f32 accumulation (beta = 0,
    /// or 1 to accumulate into y).
    #[allow(clippy::too_many_arguments)] // a BLAS call: the shape and operands, as cuBLAS takes them
    pub fn gemm(
        &self,
        dtype: super::elem::GpuDtype,
        x: sys::CUdeviceptr,
        w: sys::CUdeviceptr,
        y: sys::CUdeviceptr,
        m: usize,
        n: usize,
        k: usize,
        accumulate: bool,
    ) -> Result<()> {
        let alpha = 1.0f32;
        let beta = if accumulate { 1.0f32 } else { 0.0 };
        // SAFETY: the Gpu's own stream, live as long as self.
        let started = self
            .profiler
            .as_ref()
            .and_then(|p| unsafe { p.begin(self.stream) });
        let ty = super::elem::blas_type(dtype);
        // Column-major view: y^T[n, m] = w[n, k] (as k×n col-major, transposed) · x^T[k, m].
        let done = unsafe {
            blas::gemm_ex(
                self.blas,
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                n as i32,
                m as i32,
                k as i32,
                &alpha as *const f32 as *const c_void,
                w as *const c_void,
                ty,
                k as i32,
                x as *const c_void,
                ty,
                k as i32,
                &beta as *const f32 as *const c_void,
                y as *mut c_void,
                ty,
                n as i32,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
            )
        };
        if let (Some(p), Some(start)) = (&self.profiler, started) {
            // SAFETY: `start` was begun on this stream just above.
            let name = match dtype {
                super::elem::GpuDtype::Bf16 => "cublas_gemm_bf16",
                super::elem::GpuDtype::F16 => "cublas_gemm_f16",
            };
            unsafe { p.end(name, start, self.stream) };
        }
        done.map_err(|e| anyhow!("cuBLAS {} GEMM ({m}x{k} @ {k}x{n}): {e:?}", dtype.name()))
    }
}

impl Drop for Gpu {
    fn drop(&mut self) {
        unsafe {
            let _ = drv::stream::synchronize(self.stream);
        }
        if let Some(trace) = &self.block_trace {
            if let Err(e) = trace.write() {
                eprintln!("{e:#}");
            }
        }
        unsafe {
            let _ = blas::destroy_handle(self.blas);
            for (_, m) in self.modules.drain() {
                let _ = drv::module::unload(m);
            }
            let _ = drv::stream::destroy(self.stream);
        }
    }
}

/// Context for errors raised while a step runs on the GPU.
pub trait GpuContext<T> {
    fn gpu_ctx(self, what: &str) -> Result<T>;
}

impl<T> GpuContext<T> for Result<T> {
    fn gpu_ctx(self, what: &str) -> Result<T> {
        self.with_context(|| what.to_string())
    }
}
