//! NCCL's version for `doctor`, asked of the library itself: the loader opens it by the names
//! rvllm's CUDA backend tries (`$VLLM_NCCL_SO_PATH`, `libnccl.so.2`, `libnccl.so`) and
//! `ncclGetVersion` answers without a GPU. The file's real path comes from the loader too.
use std::ffi::{c_char, c_int, c_void, CStr, CString};

/// The library names tried after `$VLLM_NCCL_SO_PATH` (the engine's `nccl::LIBRARY_NAMES`).
const NAMES: [&str; 2] = ["libnccl.so.2", "libnccl.so"];

/// Which NCCL the engine would load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NcclInfo {
    pub version: (u32, u32, u32),
    /// The file the loader opened.
    pub path: String,
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

fn candidates() -> Vec<String> {
    let mut names: Vec<String> = std::env::var("VLLM_NCCL_SO_PATH")
        .ok()
        .filter(|p| !p.is_empty())
        .into_iter()
        .collect();
    names.extend(NAMES.iter().map(|n| n.to_string()));
    names
}

/// The NCCL the loader finds, or a line saying what was tried.
pub fn probe() -> Result<NcclInfo, String> {
    let mut tried = Vec::new();
    for name in candidates() {
        let Ok(cname) = CString::new(name.clone()) else {
            tried.push(format!("{name} (a NUL in the name)"));
            continue;
        };
        // SAFETY: opens a shared library by name; closed below.
        let handle = unsafe { libc::dlopen(cname.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if handle.is_null() {
            tried.push(name);
            continue;
        }
        let result = version_of(handle, &name);
        // SAFETY: opened above; nothing from it is used after this.
        unsafe { libc::dlclose(handle) };
        return result;
    }
    Err(format!("not found (tried {})", tried.join(", ")))
}

fn version_of(handle: *mut c_void, name: &str) -> Result<NcclInfo, String> {
    let sym = c"ncclGetVersion";
    // SAFETY: looks a symbol up in an open library.
    let f = unsafe { libc::dlsym(handle, sym.as_ptr()) };
    if f.is_null() {
        return Err(format!("{name} has no ncclGetVersion: not an NCCL library"));
    }
    // SAFETY: ncclGetVersion(int*) -> ncclResult_t, as nccl.h declares it.
    let get: unsafe extern "C" fn(*mut c_int) -> c_int = unsafe { std::mem::transmute(f) };
    let mut code: c_int = 0;
    // SAFETY: writes one int.
    let rc = unsafe { get(&mut code) };
    if rc != 0 {
        return Err(format!(
            "{name}: ncclGetVersion failed with NCCL error {rc}"
        ));
    }
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    // SAFETY: `f` is an address inside the library; dladdr fills `info` with static strings.
    let path = if unsafe { libc::dladdr(f, &mut info) } != 0 && !info.dli_fname.is_null() {
        // SAFETY: non-null, NUL-terminated, owned by the loader while the library is open.
        unsafe { CStr::from_ptr(info.dli_fname as *const c_char) }
            .to_string_lossy()
            .into_owned()
    } else {
        name.to_string()
    };
    Ok(NcclInfo {
        version: decode_version(code),
        path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_codes_of_both_schemes() {
        assert_eq!(decode_version(22105), (2, 21, 5));
        assert_eq!(decode_version(2804), (2, 8, 4));
    }

    /// Whatever this machine has, the probe answers without panicking; with NCCL present
    /// (VLLM_NCCL_SO_PATH or the loader path) it is a 2.x.
    #[test]
    fn probe_answers_either_way() {
        match probe() {
            Ok(info) => {
                assert_eq!(info.version.0, 2, "{info:?}");
                assert!(info.path.contains("nccl"), "{info:?}");
            }
            Err(e) => assert!(e.starts_with("not found (tried "), "{e}"),
        }
    }
}
