//! Minimal CUDA plumbing for the kernel tests: a context on device 0, the embedded fatbins,
//! raw device buffers, checked launches (every launch is followed by a synchronize so that an
//! execution error is reported against the kernel that caused it), the element types the
//! kernels are built for (`Elem`: bf16 and f16, with their module and kernel names, rounding,
//! random data and tolerances) and the comparison rule.
#![allow(dead_code)]

use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::Arc;

use cudarc::driver::{result as drv, sys, CudaContext};
use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rvllm_kernels::KernelArgs;

/// bf16 tolerances (GPU.md): |got - want| <= ATOL + RTOL * |want|.
pub const ATOL: f32 = 2e-2;
pub const RTOL: f32 = 1.6e-2;

/// f16 tolerances: about 10 ulps (f16's unit roundoff is 4.9e-4), tighter than bf16's.
pub const ATOL_F16: f32 = 5e-3;
pub const RTOL_F16: f32 = 5e-3;

/// The 2-byte element type of a kernel build. Every dtype-dependent kernel file is compiled
/// twice (common.cuh): as itself for bf16, and through `<stem>_f16.cu` for IEEE half, whose
/// entry points are the bf16 names with `bf16` replaced by `f16` (or `_f16` appended to names
/// without `bf16`). Device buffers of either type hold the raw bits (`u16`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Elem {
    Bf16,
    F16,
}

impl Elem {
    pub const BOTH: [Elem; 2] = [Elem::Bf16, Elem::F16];

    /// For messages: "bf16" or "f16".
    pub fn name(self) -> &'static str {
        match self {
            Elem::Bf16 => "bf16",
            Elem::F16 => "f16",
        }
    }

    /// The kernel module (fatbin) of `stem` in this type: `norm` / `norm_f16`.
    pub fn module(self, stem: &str) -> String {
        match self {
            Elem::Bf16 => stem.to_string(),
            Elem::F16 => format!("{stem}_f16"),
        }
    }

    /// The entry point named `bf16_name` in the bf16 build, in this type's build:
    /// `rms_norm_bf16` -> `rms_norm_f16`, `paged_attention_prefill_hd64` ->
    /// `paged_attention_prefill_hd64_f16`.
    pub fn kernel(self, bf16_name: &str) -> String {
        match self {
            Elem::Bf16 => bf16_name.to_string(),
            Elem::F16 if bf16_name.contains("bf16") => bf16_name.replace("bf16", "f16"),
            Elem::F16 => format!("{bf16_name}_f16"),
        }
    }

    /// `x` rounded to nearest even in this type, as raw bits.
    pub fn bits(self, x: f32) -> u16 {
        match self {
            Elem::Bf16 => bf16::from_f32(x).to_bits(),
            Elem::F16 => f16::from_f32(x).to_bits(),
        }
    }

    /// The value of raw `bits` of this type, widened to f32 (exact).
    pub fn widen(self, bits: u16) -> f32 {
        match self {
            Elem::Bf16 => bf16::from_bits(bits).to_f32(),
            Elem::F16 => f16::from_bits(bits).to_f32(),
        }
    }

    /// `x` rounded to this type (nearest even), as f32: what a kernel store keeps.
    pub fn round(self, x: f32) -> f32 {
        self.widen(self.bits(x))
    }

    /// Rounds every value of `x` to this type in place.
    pub fn round_all(self, x: &mut [f32]) {
        for v in x {
            *v = self.round(*v);
        }
    }

    /// A quiet NaN of this type (the poison of outputs).
    pub fn nan(self) -> u16 {
        match self {
            Elem::Bf16 => bf16::NAN.to_bits(),
            Elem::F16 => f16::NAN.to_bits(),
        }
    }

    /// `n` uniform values in [-amp, amp), rounded to this type; returns (raw bits for the
    /// device, the same values as f32 for the reference).
    pub fn random(self, rng: &mut StdRng, n: usize, amp: f32) -> (Vec<u16>, Vec<f32>) {
        let h: Vec<u16> = (0..n)
            .map(|_| self.bits(rng.random_range(-amp..amp)))
            .collect();
        let f = h.iter().map(|&b| self.widen(b)).collect();
        (h, f)
    }

    /// (atol, rtol) for outputs of this type: |got - want| <= atol + rtol |want|.
    pub fn tolerance(self) -> (f32, f32) {
        match self {
            Elem::Bf16 => (ATOL, RTOL),
            Elem::F16 => (ATOL_F16, RTOL_F16),
        }
    }
}

pub struct Gpu {
    _ctx: Arc<CudaContext>,
    modules: HashMap<String, sys::CUmodule>,
    pub name: String,
}

/// Prints to the process's stderr directly: the test harness captures `eprintln!` of passing
/// tests, and a skip must be seen.
fn loud(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// The GPU, or `None` after printing a loud skip line when there is no usable CUDA device.
/// On a machine with a GPU, a build without the kernels is an error, not a skip.
pub fn gpu(test: &str) -> Option<Gpu> {
    let count = match std::panic::catch_unwind(CudaContext::device_count) {
        Ok(Ok(n)) => n,
        Ok(Err(e)) => {
            loud(&format!(
                "SKIPPED: no CUDA device ({test}: driver error {e:?})"
            ));
            return None;
        }
        Err(_) => {
            loud(&format!(
                "SKIPPED: no CUDA device ({test}: libcuda could not be loaded)"
            ));
            return None;
        }
    };
    if count < 1 {
        loud(&format!(
            "SKIPPED: no CUDA device ({test}: the driver reports none)"
        ));
        return None;
    }
    let ctx = CudaContext::new(0).expect("creating a CUDA context on device 0");
    ctx.bind_to_thread().expect("binding the CUDA context");
    let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
    let mut modules = HashMap::new();
    for &stem in rvllm_kernels::KERNEL_NAMES {
        let image = rvllm_kernels::fatbin(stem).expect("listed kernel module is embedded");
        let m = unsafe { drv::module::load_data(image.as_ptr() as *const c_void) }.unwrap_or_else(
            |e| {
                panic!(
                    "loading kernel module `{stem}` on {name}: {e:?} (built for {})",
                    rvllm_kernels::built_archs()
                )
            },
        );
        modules.insert(stem.to_string(), m);
    }
    assert!(
        !modules.is_empty(),
        "this test binary has no kernels: build it with `--features cuda` (nvcc needed)"
    );
    Some(Gpu {
        _ctx: ctx,
        modules,
        name,
    })
}

/// A device allocation of `len` elements of `T`, freed on drop.
pub struct Buf<T> {
    pub ptr: sys::CUdeviceptr,
    pub len: usize,
    _t: std::marker::PhantomData<T>,
}

impl<T> Drop for Buf<T> {
    fn drop(&mut self) {
        unsafe {
            let _ = drv::free_sync(self.ptr);
        }
    }
}

/// A kernel argument: a pointer to the argument's value, as cuLaunchKernel wants it.
pub fn arg<T>(v: &T) -> *mut c_void {
    v as *const T as *mut c_void
}

impl Gpu {
    fn bind(&self) {
        self._ctx
            .bind_to_thread()
            .expect("binding the CUDA context");
    }

    pub fn function(&self, module: &str, kernel: &str) -> sys::CUfunction {
        self.bind();
        let m = *self
            .modules
            .get(module)
            .unwrap_or_else(|| panic!("kernel module `{module}` is not embedded in this build"));
        let name = CString::new(kernel).expect("kernel name without NUL");
        unsafe { drv::module::get_function(m, name) }
            .unwrap_or_else(|e| panic!("kernel `{kernel}` not found in module `{module}`: {e:?}"))
    }

    /// Launches on the default stream and waits; any launch or execution error panics with the
    /// kernel's name.
    pub fn launch(
        &self,
        module: &str,
        kernel: &str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        args: &mut [*mut c_void],
    ) {
        let f = self.function(module, kernel);
        unsafe { drv::launch_kernel(f, grid, block, 0, std::ptr::null_mut(), args) }
            .unwrap_or_else(|e| {
                panic!("launching `{kernel}` grid {grid:?} block {block:?}: {e:?}")
            });
        drv::ctx::synchronize()
            .unwrap_or_else(|e| panic!("`{kernel}` failed while running: {e:?}"));
    }

    /// `launch` with a kernel's typed arguments (`rvllm_kernels::args`); panics when `kernel`
    /// is not one of the entry points of `A`.
    pub fn launch_args<A: KernelArgs>(
        &self,
        module: &str,
        kernel: &str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        args: A,
    ) {
        self.launch_args_smem(module, kernel, grid, block, 0, args)
    }

    /// `launch_args` with `shared_bytes` of dynamic shared memory.
    pub fn launch_args_smem<A: KernelArgs>(
        &self,
        module: &str,
        kernel: &str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        shared_bytes: u32,
        mut args: A,
    ) {
        assert!(
            A::takes(kernel),
            "`{kernel}` does not take {}",
            std::any::type_name::<A>()
        );
        let mut params = args.params();
        self.launch_smem(
            module,
            kernel,
            grid,
            block,
            shared_bytes,
            params.as_mut_slice(),
        )
    }

    /// `launch` with `shared_bytes` of dynamic shared memory (raising the kernel's limit
    /// past the 48 KiB default when needed).
    pub fn launch_smem(
        &self,
        module: &str,
        kernel: &str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        shared_bytes: u32,
        args: &mut [*mut c_void],
    ) {
        let f = self.function(module, kernel);
        self.allow_smem(f, shared_bytes);
        unsafe { drv::launch_kernel(f, grid, block, shared_bytes, std::ptr::null_mut(), args) }
            .unwrap_or_else(|e| {
                panic!("launching `{kernel}` grid {grid:?} block {block:?}: {e:?}")
            });
        drv::ctx::synchronize()
            .unwrap_or_else(|e| panic!("`{kernel}` failed while running: {e:?}"));
    }

    /// The device's compute capability (major, minor).
    pub fn compute_capability(&self) -> (i32, i32) {
        self._ctx
            .compute_capability()
            .expect("reading the compute capability")
    }

    /// Launches without waiting (for timing loops).
    pub fn launch_async(
        &self,
        f: sys::CUfunction,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        args: &mut [*mut c_void],
    ) {
        unsafe { drv::launch_kernel(f, grid, block, 0, std::ptr::null_mut(), args) }
            .unwrap_or_else(|e| panic!("launch grid {grid:?} block {block:?}: {e:?}"));
    }

    /// Launches on `stream` without waiting, with a kernel's typed arguments
    /// (`rvllm_kernels::args`).
    pub fn launch_on<A: KernelArgs>(
        &self,
        stream: sys::CUstream,
        f: sys::CUfunction,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        args: A,
    ) {
        self.launch_on_smem(stream, f, grid, block, 0, args)
    }

    /// `launch_on` with `shared_bytes` of dynamic shared memory (the function's limit must
    /// allow it: `allow_smem`).
    pub fn launch_on_smem<A: KernelArgs>(
        &self,
        stream: sys::CUstream,
        f: sys::CUfunction,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        shared_bytes: u32,
        mut args: A,
    ) {
        let mut params = args.params();
        unsafe { drv::launch_kernel(f, grid, block, shared_bytes, stream, params.as_mut_slice()) }
            .unwrap_or_else(|e| panic!("launch grid {grid:?} block {block:?}: {e:?}"));
    }

    /// Raises `f`'s dynamic shared memory limit to `shared_bytes`.
    pub fn allow_smem(&self, f: sys::CUfunction, shared_bytes: u32) {
        unsafe {
            drv::function::set_function_attribute(
                f,
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                shared_bytes as i32,
            )
        }
        .unwrap_or_else(|e| panic!("{shared_bytes} B of shared memory: {e:?}"));
    }

    /// Per-repetition time in microseconds of `body` replayed from a CUDA graph that holds
    /// `per_graph` repetitions (as the engine's decode graphs do: no host launch gaps).
    /// Median of 20 replays.
    pub fn graph_time_us(&self, per_graph: usize, mut body: impl FnMut(sys::CUstream)) -> f32 {
        self.bind();
        let stream = drv::stream::create(drv::stream::StreamKind::NonBlocking).expect("stream");
        unsafe {
            drv::stream::begin_capture(
                stream,
                sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED,
            )
            .expect("begin capture");
        }
        for _ in 0..per_graph {
            body(stream);
        }
        let graph = unsafe { drv::stream::end_capture(stream) }.expect("end capture");
        let exec = unsafe { drv::graph::instantiate(graph, sys::CUgraphInstantiate_flags(0)) }
            .expect("instantiate");
        let flags = sys::CUevent_flags::CU_EVENT_DEFAULT;
        let (start, end) = (
            drv::event::create(flags).expect("event"),
            drv::event::create(flags).expect("event"),
        );
        let mut times = Vec::new();
        unsafe {
            drv::graph::launch(exec, stream).expect("graph launch"); // warm-up
            for _ in 0..20 {
                drv::event::record(start, stream).expect("record");
                drv::graph::launch(exec, stream).expect("graph launch");
                drv::event::record(end, stream).expect("record");
                drv::stream::synchronize(stream).expect("sync");
                times.push(
                    drv::event::elapsed(start, end).expect("elapsed") * 1e3 / per_graph as f32,
                );
            }
            let _ = drv::graph::exec_destroy(exec);
            let _ = drv::graph::destroy(graph);
            let _ = drv::event::destroy(start);
            let _ = drv::event::destroy(end);
            let _ = drv::stream::destroy(stream);
        }
        times.sort_by(|a, b| a.total_cmp(b));
        times[times.len() / 2]
    }

    pub fn sync(&self) {
        drv::ctx::synchronize().expect("synchronize");
    }

    pub fn upload<T: Copy>(&self, data: &[T]) -> Buf<T> {
        self.bind();
        let bytes = std::mem::size_of_val(data).max(4);
        let ptr = unsafe { drv::malloc_sync(bytes) }.expect("cuMemAlloc");
        if !data.is_empty() {
            unsafe { drv::memcpy_htod_sync(ptr, data) }.expect("copy to device");
        }
        Buf {
            ptr,
            len: data.len(),
            _t: std::marker::PhantomData,
        }
    }

    /// Overwrites the start of `buf` with `data`.
    pub fn upload_into<T: Copy>(&self, buf: &Buf<T>, data: &[T]) {
        self.bind();
        assert!(
            data.len() <= buf.len,
            "upload_into: {} elements into a buffer of {}",
            data.len(),
            buf.len
        );
        if !data.is_empty() {
            unsafe { drv::memcpy_htod_sync(buf.ptr, data) }.expect("copy to device");
        }
    }

    /// A buffer of `len` copies of `poison` (NaN for floats): unwritten outputs stay visible.
    pub fn poisoned<T: Copy>(&self, len: usize, poison: T) -> Buf<T> {
        self.upload(&vec![poison; len])
    }

    pub fn download<T: Copy + Default>(&self, buf: &Buf<T>) -> Vec<T> {
        self.bind();
        let mut out = vec![T::default(); buf.len];
        if buf.len > 0 {
            unsafe { drv::memcpy_dtoh_sync(&mut out, buf.ptr) }.expect("copy to host");
        }
        out
    }

    pub fn download_bf16(&self, buf: &Buf<bf16>) -> Vec<f32> {
        self.download(buf).iter().map(|v| v.to_f32()).collect()
    }

    /// A buffer of raw `e` elements, widened to f32.
    pub fn download_as(&self, e: Elem, buf: &Buf<u16>) -> Vec<f32> {
        self.download(buf).into_iter().map(|b| e.widen(b)).collect()
    }

    /// Median time of `reps` runs of `body` in milliseconds, timed with device events.
    pub fn time_ms(&self, reps: usize, mut body: impl FnMut()) -> f32 {
        self.bind();
        let flags = sys::CUevent_flags::CU_EVENT_DEFAULT;
        let (start, end) = (
            drv::event::create(flags).expect("event"),
            drv::event::create(flags).expect("event"),
        );
        body(); // warm-up
        self.sync();
        let mut times = Vec::with_capacity(reps);
        for _ in 0..reps {
            unsafe {
                drv::event::record(start, std::ptr::null_mut()).expect("record");
                body();
                drv::event::record(end, std::ptr::null_mut()).expect("record");
            }
            self.sync();
            times.push(unsafe { drv::event::elapsed(start, end) }.expect("elapsed"));
        }
        unsafe {
            let _ = drv::event::destroy(start);
            let _ = drv::event::destroy(end);
        }
        times.sort_by(|a, b| a.total_cmp(b));
        times[times.len() / 2]
    }
}

/// RoPE inverse frequencies for `head_dim` and base `theta` (no scaling).
pub fn inv_freq(head_dim: usize, theta: f32) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| theta.powf(-(2.0 * i as f32) / head_dim as f32))
        .collect()
}

/// A fresh RNG per test; the seed is printed so that a failure can be replayed with
/// RVLLM_TEST_SEED.
pub fn rng(test: &str) -> StdRng {
    let seed = std::env::var("RVLLM_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random::<u64>());
    eprintln!("{test}: seed {seed}");
    StdRng::seed_from_u64(seed)
}

/// Asserts |got - want| <= atol + rtol |want| elementwise (NaN fails), naming the worst ones.
pub fn assert_close(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
    assert_eq!(
        got.len(),
        want.len(),
        "{what}: length {} vs reference {}",
        got.len(),
        want.len()
    );
    let mut bad = Vec::new();
    let mut worst = 0.0f32;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs();
        let ok = err <= atol + rtol * w.abs();
        if !ok || g.is_nan() {
            bad.push((i, g, w));
        }
        if !err.is_nan() {
            worst = worst.max(err);
        }
    }
    assert!(
        bad.is_empty(),
        "{what}: {} of {} elements out of tolerance (max abs err {worst}); first: {:?}",
        bad.len(),
        got.len(),
        &bad[..bad.len().min(8)]
    );
    eprintln!(
        "{what}: ok, {} elements, max abs err {worst:.3e}",
        got.len()
    );
}
