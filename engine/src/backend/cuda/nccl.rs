//! NCCL for the CUDA backend (issue 22): one communicator per GPU rank, its collectives
//! queued on the backend's own stream, so that an all-reduce between two GEMMs is captured
//! into a decode CUDA graph with the kernels around it (NCCL supports stream capture since
//! 2.9). Activations are reduced in their own type (bf16 or f16), as vLLM does.
//!
//! libnccl is opened at run time, the first time a communicator (or the version) is asked
//! for: a machine without NCCL runs one GPU exactly as before. It is opened here rather than
//! through cudarc's loader because that one searches `libnccl.so`, `libnccl.so.<CUDA major>`
//! and older numbers but never `libnccl.so.2`, the only name the runtime packages install
//! (apt's libnccl2, pip's nvidia-nccl-cu*); cudarc supplies the ABI types. The search is
//! vLLM's: `$VLLM_NCCL_SO_PATH`, else `libnccl.so.2`, else `libnccl.so`.
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use anyhow::{anyhow, bail, ensure, Context, Result};
use cudarc::nccl::sys::{ncclComm_t, ncclDataType_t, ncclRedOp_t, ncclUniqueId};

use super::backend::{CudaBackend, CudaTensor};
use super::device::{DevBuf, Gpu};
use super::elem::{GpuDtype, ELEM_BYTES};
use crate::backend::parallel::Communicator;
use crate::backend::Activation;

/// `RVLLM_NCCL_TP1=1`: a single-GPU engine still joins an NCCL group (of one) and calls its
/// all-reduces after O and down (`CudaSettings::nccl_at_tp1`, read with the other switches).
pub use super::switches::NCCL_AT_TP1_ENV;

/// All-reduces queued by this process (captured ones count once, at capture): what shows
/// that a run took the NCCL path at all.
static ALL_REDUCES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

pub fn all_reduces_queued() -> u64 {
    ALL_REDUCES.load(Ordering::Relaxed)
}

/// The library names tried, in order, after `$VLLM_NCCL_SO_PATH`.
pub const LIBRARY_NAMES: [&str; 2] = ["libnccl.so.2", "libnccl.so"];

/// NCCL's result code; 0 is success, anything else goes through `ncclGetErrorString`. Kept a
/// plain int (not cudarc's enum) so that a code this build does not know is still an error.
type NcclResult = c_int;
type Stream = *mut c_void;

/// The entry points used, resolved once.
struct Library {
    /// Which file was opened (for messages and `doctor`).
    name: String,
    get_version: unsafe extern "C" fn(*mut c_int) -> NcclResult,
    get_unique_id: unsafe extern "C" fn(*mut ncclUniqueId) -> NcclResult,
    comm_init_rank: unsafe extern "C" fn(*mut ncclComm_t, c_int, ncclUniqueId, c_int) -> NcclResult,
    comm_init_all: unsafe extern "C" fn(*mut ncclComm_t, c_int, *const c_int) -> NcclResult,
    comm_destroy: unsafe extern "C" fn(ncclComm_t) -> NcclResult,
    comm_abort: unsafe extern "C" fn(ncclComm_t) -> NcclResult,
    comm_get_async_error: unsafe extern "C" fn(ncclComm_t, *mut NcclResult) -> NcclResult,
    get_error_string: unsafe extern "C" fn(NcclResult) -> *const c_char,
    group_start: unsafe extern "C" fn() -> NcclResult,
    group_end: unsafe extern "C" fn() -> NcclResult,
    all_reduce: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        ncclDataType_t,
        ncclRedOp_t,
        ncclComm_t,
        Stream,
    ) -> NcclResult,
    all_gather: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        ncclDataType_t,
        ncclComm_t,
        Stream,
    ) -> NcclResult,
    broadcast: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        ncclDataType_t,
        c_int,
        ncclComm_t,
        Stream,
    ) -> NcclResult,
}

/// The library's candidates: `$VLLM_NCCL_SO_PATH` first when set, then `LIBRARY_NAMES`.
pub fn library_candidates() -> Vec<String> {
    let mut names: Vec<String> = std::env::var("VLLM_NCCL_SO_PATH")
        .ok()
        .filter(|p| !p.is_empty())
        .into_iter()
        .collect();
    names.extend(LIBRARY_NAMES.iter().map(|n| n.to_string()));
    names
}

fn dl_error() -> String {
    // SAFETY: dlerror returns null or a NUL-terminated message owned by libc.
    let msg = unsafe { libc::dlerror() };
    if msg.is_null() {
        "unknown error".into()
    } else {
        // SAFETY: non-null and NUL-terminated (above).
        unsafe { CStr::from_ptr(msg) }
            .to_string_lossy()
            .into_owned()
    }
}

impl Library {
    fn open() -> Result<Library> {
        let mut tried = Vec::new();
        for name in library_candidates() {
            let cname = CString::new(name.clone()).context("a NUL in $VLLM_NCCL_SO_PATH")?;
            // SAFETY: opens a shared library by name; the handle is kept for the process.
            let handle = unsafe { libc::dlopen(cname.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
            if handle.is_null() {
                tried.push(format!("{name} ({})", dl_error()));
                continue;
            }
            return Self::resolve(handle, name);
        }
        bail!(
            "NCCL could not be loaded (tried {}): install it (apt's libnccl2, or pip's \
             nvidia-nccl-cu12/cu13 and its lib folder on LD_LIBRARY_PATH) or name the file in \
             VLLM_NCCL_SO_PATH",
            tried.join("; ")
        )
    }

    fn resolve(handle: *mut c_void, name: String) -> Result<Library> {
        fn symbol<F: Copy>(handle: *mut c_void, lib: &str, sym: &str) -> Result<F> {
            let csym = CString::new(sym).expect("symbol names have no NUL");
            // SAFETY: looks a symbol up in a library that stays open.
            let ptr = unsafe { libc::dlsym(handle, csym.as_ptr()) };
            ensure!(
                !ptr.is_null(),
                "{lib} has no `{sym}` ({}): is it NCCL 2.x?",
                dl_error()
            );
            debug_assert_eq!(std::mem::size_of::<F>(), std::mem::size_of::<*mut c_void>());
            // SAFETY: F is the C function pointer type of `sym` as nccl.h declares it.
            Ok(unsafe { std::mem::transmute_copy::<*mut c_void, F>(&ptr) })
        }
        let l = name.as_str();
        Ok(Library {
            get_version: symbol(handle, l, "ncclGetVersion")?,
            get_unique_id: symbol(handle, l, "ncclGetUniqueId")?,
            comm_init_rank: symbol(handle, l, "ncclCommInitRank")?,
            comm_init_all: symbol(handle, l, "ncclCommInitAll")?,
            comm_destroy: symbol(handle, l, "ncclCommDestroy")?,
            comm_abort: symbol(handle, l, "ncclCommAbort")?,
            comm_get_async_error: symbol(handle, l, "ncclCommGetAsyncError")?,
            get_error_string: symbol(handle, l, "ncclGetErrorString")?,
            group_start: symbol(handle, l, "ncclGroupStart")?,
            group_end: symbol(handle, l, "ncclGroupEnd")?,
            all_reduce: symbol(handle, l, "ncclAllReduce")?,
            all_gather: symbol(handle, l, "ncclAllGather")?,
            broadcast: symbol(handle, l, "ncclBroadcast")?,
            name,
        })
    }

    /// `code` as an error naming `what`, or Ok.
    fn check(&self, code: NcclResult, what: &str) -> Result<()> {
        if code == 0 {
            return Ok(());
        }
        // SAFETY: ncclGetErrorString returns a static NUL-terminated string for any code.
        let text = unsafe { CStr::from_ptr((self.get_error_string)(code)) }.to_string_lossy();
        bail!("{what} failed: NCCL error {code} ({text}); NCCL_DEBUG=WARN says more")
    }
}

/// The process's NCCL, opened on first use; the error says what was tried.
fn library() -> Result<&'static Library> {
    static LIB: OnceLock<std::result::Result<Library, String>> = OnceLock::new();
    LIB.get_or_init(|| Library::open().map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow!("{e}"))
}

/// NCCL's version as (major, minor, patch) and the file it came from. Needs no GPU.
pub fn version() -> Result<((u32, u32, u32), String)> {
    let lib = library()?;
    let mut code: c_int = 0;
    // SAFETY: writes one int.
    lib.check(unsafe { (lib.get_version)(&mut code) }, "ncclGetVersion")?;
    Ok((decode_version(code), lib.name.clone()))
}

/// NCCL_VERSION_CODE: major*10000 + minor*100 + patch since 2.9, major*1000 + minor*100 +
/// patch before.
pub fn decode_version(code: c_int) -> (u32, u32, u32) {
    let code = code.max(0) as u32;
    if code >= 10000 {
        (code / 10000, code % 10000 / 100, code % 100)
    } else {
        (code / 1000, code % 1000 / 100, code % 100)
    }
}

/// The rendezvous token of one NCCL group: rank 0 makes it, every other rank receives its
/// bytes (the multi-host TCP rendezvous carries them) and joins with `NcclComm::join`.
#[derive(Clone, Copy)]
pub struct NcclUniqueId(ncclUniqueId);

impl NcclUniqueId {
    /// Size of the token on the wire.
    pub const BYTES: usize = 128;

    pub fn new() -> Result<Self> {
        let lib = library()?;
        let mut id = ncclUniqueId {
            internal: [0; Self::BYTES],
        };
        // SAFETY: writes one ncclUniqueId.
        lib.check(unsafe { (lib.get_unique_id)(&mut id) }, "ncclGetUniqueId")?;
        Ok(Self(id))
    }

    pub fn to_bytes(&self) -> [u8; Self::BYTES] {
        self.0.internal.map(|c| c as u8)
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let bytes: &[u8; Self::BYTES] = bytes.try_into().map_err(|_| {
            anyhow!(
                "an NCCL unique id is {} bytes, got {}",
                Self::BYTES,
                bytes.len()
            )
        })?;
        Ok(Self(ncclUniqueId {
            internal: bytes.map(|b| b as c_char),
        }))
    }
}

impl fmt::Debug for NcclUniqueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The token is an address to connect to: not secret, but not worth printing whole.
        write!(f, "NcclUniqueId({})", hex::encode(&self.to_bytes()[..8]))
    }
}

fn nccl_type(dtype: GpuDtype) -> ncclDataType_t {
    match dtype {
        GpuDtype::Bf16 => ncclDataType_t::ncclBfloat16,
        GpuDtype::F16 => ncclDataType_t::ncclFloat16,
    }
}

/// One GPU's rank of an NCCL group. Its collectives are queued on its GPU's stream (the
/// backend's) and return without waiting for the device; the buffers are `CudaTensor`s of
/// the group's element type, their current rows.
pub struct NcclComm {
    lib: &'static Library,
    comm: ncclComm_t,
    gpu: Arc<Gpu>,
    rank: usize,
    world: usize,
    dtype: GpuDtype,
    /// One element for `barrier`'s all-reduce.
    token: DevBuf,
    aborted: AtomicBool,
}

// SAFETY: the communicator is used by the thread that owns its rank (NCCL allows a
// communicator on any one thread at a time); `abort` is the one call meant to come from
// another thread, and NCCL documents ncclCommAbort for exactly that.
unsafe impl Send for NcclComm {}
unsafe impl Sync for NcclComm {}

impl NcclComm {
    /// The ranks of a group made of these GPUs of this process, rank i on `gpus[i]`
    /// (ncclCommInitAll). With one GPU it is a group of one, whose all-reduce leaves the data
    /// as it is: the single-GPU engine runs the NCCL path that way.
    pub fn group_of(gpus: &[Arc<Gpu>], dtype: GpuDtype) -> Result<Vec<NcclComm>> {
        ensure!(!gpus.is_empty(), "an NCCL group needs at least one GPU");
        let lib = library()?;
        let ordinals: Vec<c_int> = gpus.iter().map(|g| g.ctx.ordinal() as c_int).collect();
        let mut seen = ordinals.clone();
        seen.sort_unstable();
        seen.dedup();
        ensure!(
            seen.len() == ordinals.len(),
            "an NCCL group of one process needs distinct GPUs, got ordinals {ordinals:?}"
        );
        let mut comms: Vec<ncclComm_t> = vec![std::ptr::null_mut(); gpus.len()];
        gpus[0].bind()?;
        // SAFETY: `comms` has room for one communicator per listed device.
        lib.check(
            unsafe {
                (lib.comm_init_all)(comms.as_mut_ptr(), gpus.len() as c_int, ordinals.as_ptr())
            },
            &format!("creating an NCCL group of GPUs {ordinals:?} (ncclCommInitAll)"),
        )?;
        let world = gpus.len();
        // Owned (destroyed on drop, errors included) before anything else can fail.
        let mut out: Vec<NcclComm> = comms
            .into_iter()
            .zip(gpus)
            .enumerate()
            .map(|(rank, (comm, gpu))| Self::wrap(lib, comm, gpu.clone(), rank, world, dtype))
            .collect();
        for comm in &mut out {
            comm.alloc_token()?;
        }
        // One thread drives every rank here, so the warm-up is one NCCL group.
        Self::grouped(|| out.iter().try_for_each(NcclComm::token_all_reduce))?;
        for comm in &out {
            comm.settle()?;
        }
        Ok(out)
    }

    /// Joins the group that `id` names as `rank` of `world`, on `gpu` (ncclCommInitRank).
    /// Returns once every rank has joined: each rank calls it from its own thread or process.
    pub fn join(
        gpu: Arc<Gpu>,
        id: &NcclUniqueId,
        rank: usize,
        world: usize,
        dtype: GpuDtype,
    ) -> Result<NcclComm> {
        ensure!(
            rank < world,
            "NCCL rank {rank} is outside a group of {world}"
        );
        let lib = library()?;
        gpu.bind()?;
        let mut comm: ncclComm_t = std::ptr::null_mut();
        // SAFETY: writes one communicator; the id is passed by value as nccl.h takes it.
        lib.check(
            unsafe { (lib.comm_init_rank)(&mut comm, world as c_int, id.0, rank as c_int) },
            &format!("joining an NCCL group of {world} as rank {rank} (ncclCommInitRank)"),
        )?;
        let mut this = Self::wrap(lib, comm, gpu, rank, world, dtype);
        this.alloc_token()?;
        this.token_all_reduce()?;
        this.settle()?;
        Ok(this)
    }

    fn wrap(
        lib: &'static Library,
        comm: ncclComm_t,
        gpu: Arc<Gpu>,
        rank: usize,
        world: usize,
        dtype: GpuDtype,
    ) -> NcclComm {
        NcclComm {
            lib,
            comm,
            token: DevBuf::null(),
            gpu,
            rank,
            world,
            dtype,
            aborted: AtomicBool::new(false),
        }
    }

    /// A one-element all-reduce. NCCL connects a group's ranks at its first collective and
    /// allocates as it does, which a stream being captured into a graph forbids: the
    /// constructors run this once (vLLM's warm-up), so the first captured one is not the first.
    fn token_all_reduce(&self) -> Result<()> {
        let ptr = self.token.ptr as *mut c_void;
        // SAFETY: one element of the token buffer on this rank's GPU.
        self.lib.check(
            unsafe {
                (self.lib.all_reduce)(
                    ptr,
                    ptr,
                    1,
                    nccl_type(self.dtype),
                    ncclRedOp_t::ncclSum,
                    self.comm,
                    self.stream(),
                )
            },
            &format!("a one-element all-reduce on rank {}", self.rank),
        )
    }

    /// Waits for this rank's stream, then raises what NCCL reported meanwhile.
    fn settle(&self) -> Result<()> {
        self.gpu.bind()?;
        self.gpu.sync()?;
        self.check_async()
    }

    /// The barrier's element, in the rank's own context.
    fn alloc_token(&mut self) -> Result<()> {
        self.gpu.bind()?;
        self.token = self.gpu.alloc(ELEM_BYTES)?;
        self.gpu.memset_zero(self.token.ptr, ELEM_BYTES)
    }

    pub fn dtype(&self) -> GpuDtype {
        self.dtype
    }

    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// The library file this communicator came from.
    pub fn library_name(&self) -> &str {
        &self.lib.name
    }

    fn live(&self) -> Result<()> {
        ensure!(
            !self.aborted.load(Ordering::Acquire),
            "the NCCL group of rank {} was aborted (another rank failed)",
            self.rank
        );
        Ok(())
    }

    fn stream(&self) -> Stream {
        self.gpu.stream as Stream
    }

    /// Elements of `t`'s current rows.
    fn elems(t: &CudaTensor) -> usize {
        t.rows() * t.cols()
    }

    /// Raises an error the device side reported since the last call (a peer that died, a
    /// network failure): NCCL reports those here, not from the enqueueing calls.
    pub fn check_async(&self) -> Result<()> {
        self.live()?;
        let mut code: NcclResult = 0;
        // SAFETY: a live communicator; writes one int.
        self.lib.check(
            unsafe { (self.lib.comm_get_async_error)(self.comm, &mut code) },
            "ncclCommGetAsyncError",
        )?;
        self.lib
            .check(code, &format!("an NCCL collective of rank {}", self.rank))
    }

    /// Runs `f`'s collectives of several communicators from one thread as one NCCL group
    /// (ncclGroupStart / ncclGroupEnd): what one thread driving several GPUs must do, or the
    /// first rank's collective waits for the others forever.
    pub fn grouped<R>(f: impl FnOnce() -> Result<R>) -> Result<R> {
        let lib = library()?;
        // SAFETY: no arguments; balanced by the group_end below on every path.
        lib.check(unsafe { (lib.group_start)() }, "ncclGroupStart")?;
        let out = f();
        // SAFETY: closes the group opened above.
        let end = lib.check(unsafe { (lib.group_end)() }, "ncclGroupEnd");
        let out = out?;
        end?;
        Ok(out)
    }
}

impl Communicator for NcclComm {
    type Buf = CudaTensor;

    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    /// In place, in the activation type. NCCL's ring and tree orders are fixed for a given
    /// group and size, so every rank holds the same bits and a run reproduces itself; the
    /// order is NCCL's, not rank order (a group of one leaves the data unchanged).
    fn all_reduce_sum(&self, buf: &mut CudaTensor) -> Result<()> {
        self.live()?;
        ALL_REDUCES.fetch_add(1, Ordering::Relaxed);
        let n = Self::elems(buf);
        let ptr = buf.ptr() as *mut c_void;
        // SAFETY: `buf` holds n elements of the group's type on this rank's GPU; the
        // stream is this GPU's.
        self.lib.check(
            unsafe {
                (self.lib.all_reduce)(
                    ptr,
                    ptr,
                    n,
                    nccl_type(self.dtype),
                    ncclRedOp_t::ncclSum,
                    self.comm,
                    self.stream(),
                )
            },
            &format!("an all-reduce of {n} elements on rank {}", self.rank),
        )
    }

    /// `out`'s current rows hold world × `send`'s elements: rank r's `send` at element
    /// r × len (rank-major; a vocabulary-parallel gather transposes afterwards).
    fn all_gather(&self, send: &CudaTensor, out: &mut CudaTensor) -> Result<()> {
        self.live()?;
        let n = Self::elems(send);
        ensure!(
            Self::elems(out) == n * self.world,
            "an all-gather of {n} elements over {} ranks into {} elements",
            self.world,
            Self::elems(out)
        );
        // SAFETY: sizes checked above; both buffers on this rank's GPU.
        self.lib.check(
            unsafe {
                (self.lib.all_gather)(
                    send.ptr() as *const c_void,
                    out.ptr() as *mut c_void,
                    n,
                    nccl_type(self.dtype),
                    self.comm,
                    self.stream(),
                )
            },
            &format!("an all-gather of {n} elements on rank {}", self.rank),
        )
    }

    fn broadcast(&self, buf: &mut CudaTensor, root: usize) -> Result<()> {
        self.live()?;
        ensure!(
            root < self.world,
            "broadcast from rank {root} in a group of {}",
            self.world
        );
        let n = Self::elems(buf);
        let ptr = buf.ptr() as *mut c_void;
        // SAFETY: in place, n elements on this rank's GPU.
        self.lib.check(
            unsafe {
                (self.lib.broadcast)(
                    ptr,
                    ptr,
                    n,
                    nccl_type(self.dtype),
                    root as c_int,
                    self.comm,
                    self.stream(),
                )
            },
            &format!("a broadcast of {n} elements from rank {root}"),
        )
    }

    /// A one-element all-reduce, then the host waits for this rank's stream: every rank has
    /// reached the barrier once it returns. Not for use inside a graph capture.
    fn barrier(&self) -> Result<()> {
        self.live()?;
        self.token_all_reduce()?;
        self.settle()
    }

    fn abort(&self) {
        if !self.aborted.swap(true, Ordering::AcqRel) {
            // SAFETY: the communicator is live until here and never used after (`live`).
            let _ = unsafe { (self.lib.comm_abort)(self.comm) };
        }
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        if !self.aborted.load(Ordering::Acquire) && !self.comm.is_null() {
            let _ = self.gpu.bind();
            // SAFETY: owned, live, and used by nothing after this.
            let _ = unsafe { (self.lib.comm_destroy)(self.comm) };
        }
    }
}

impl fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NcclComm")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("gpu", &self.gpu.name)
            .field("dtype", &self.dtype.name())
            .field("library", &self.lib.name)
            .finish()
    }
}

impl CudaBackend {
    /// Makes this backend a rank of `comm`'s group: `all_reduce_sum` goes through it. Once
    /// only, before any graph is captured (a captured graph keeps the collectives it saw).
    pub fn join_nccl_group(&self, comm: NcclComm) -> Result<()> {
        ensure!(
            comm.dtype == self.dtype,
            "an NCCL group of {} activations on a {} backend",
            comm.dtype.name(),
            self.dtype.name()
        );
        ensure!(
            Arc::ptr_eq(&comm.gpu, &self.gpu),
            "the NCCL rank's GPU is not this backend's"
        );
        self.nccl
            .set(comm)
            .map_err(|_| anyhow!("this CUDA backend already belongs to an NCCL group"))
    }

    /// The group this backend is a rank of, if any.
    pub fn nccl(&self) -> Option<&NcclComm> {
        self.nccl.get()
    }

    pub(super) fn nccl_all_reduce_sum(&self, x: &mut CudaTensor) -> Result<()> {
        match self.nccl.get() {
            Some(comm) => comm.all_reduce_sum(x),
            None => bail!(
                "all_reduce_sum on a CUDA backend that belongs to no NCCL group \
                 (a sharded model needs --tensor-parallel-size on the CUDA device)"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_codes_of_both_schemes() {
        assert_eq!(decode_version(22105), (2, 21, 5));
        assert_eq!(decode_version(22703), (2, 27, 3));
        assert_eq!(decode_version(2804), (2, 8, 4));
        assert_eq!(decode_version(-1), (0, 0, 0));
    }

    /// No GPU needed: with NCCL on the loader path (or in VLLM_NCCL_SO_PATH) it loads and
    /// answers 2.x; without, the error names what was tried instead of panicking.
    #[test]
    fn the_library_loads_without_a_gpu_or_says_what_was_tried() {
        match version() {
            Ok(((major, _, _), name)) => {
                assert_eq!(major, 2, "{name}");
                assert!(name.contains("nccl"), "{name}");
            }
            Err(e) => {
                let e = format!("{e:#}");
                assert!(e.contains("NCCL could not be loaded (tried"), "{e}");
                assert!(e.contains("libnccl.so.2"), "{e}");
            }
        }
    }

    #[test]
    fn unique_id_bytes_round_trip_and_wrong_lengths_fail() {
        let bytes: Vec<u8> = (0..128u8).map(|b| b.wrapping_mul(7)).collect();
        let id = NcclUniqueId::from_bytes(&bytes).unwrap();
        assert_eq!(id.to_bytes().to_vec(), bytes);
        assert!(NcclUniqueId::from_bytes(&bytes[..127]).is_err());
        assert!(NcclUniqueId::from_bytes(&[0u8; 129]).is_err());
    }
}
