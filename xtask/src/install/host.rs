//! What this machine can run: its target triple, its glibc and the CUDA version its NVIDIA
//! driver supports. An artifact is checked against these before anything is unpacked.

use crate::dist::index::ArtifactEntry;
use crate::dist::manifest::{compare_versions, Manifest};
use crate::toolchain::CudaVersion;
use anyhow::{bail, Result};
use std::cmp::Ordering;

#[derive(Debug, Clone)]
pub struct Host {
    pub target: String,
    pub glibc: Option<String>,
    /// CUDA version the driver supports; `None` when no driver is loadable.
    pub driver: Option<CudaVersion>,
}

pub fn detect() -> Host {
    Host {
        target: host_triple(),
        glibc: glibc_version(),
        driver: driver_cuda_version(),
    }
}

/// The Rust target triple of this machine, as `rustc -vV` spells it for the common hosts.
pub fn host_triple() -> String {
    let arch = std::env::consts::ARCH;
    match std::env::consts::OS {
        "linux" => {
            let env = if cfg!(target_env = "musl") {
                "musl"
            } else {
                "gnu"
            };
            format!("{arch}-unknown-linux-{env}")
        }
        "macos" => format!("{arch}-apple-darwin"),
        "windows" => format!("{arch}-pc-windows-msvc"),
        os => format!("{arch}-unknown-{os}"),
    }
}

/// glibc's own answer (`gnu_get_libc_version`), else the first line of `ldd --version`.
pub fn glibc_version() -> Option<String> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: returns a pointer to a static NUL-terminated string inside glibc.
        let p = unsafe { libc::gnu_get_libc_version() };
        if !p.is_null() {
            // SAFETY: non-null, NUL-terminated, static.
            let s = unsafe { std::ffi::CStr::from_ptr(p) };
            return Some(s.to_string_lossy().into_owned());
        }
    }
    let out = std::process::Command::new("ldd")
        .arg("--version")
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let first = text.lines().next()?;
    if !(first.contains("GLIBC") || first.contains("GNU libc")) {
        return None; // musl's ldd, or something else
    }
    first
        .split_whitespace()
        .last()
        .filter(|v| v.contains('.'))
        .map(str::to_string)
}

/// The driver's CUDA version through cudarc's dynamically loaded driver API; only
/// `cuDriverGetVersion`, which needs no `cuInit` and so works without a visible GPU.
pub fn driver_cuda_version() -> Option<CudaVersion> {
    use cudarc::driver::sys;
    // SAFETY: only tries to open libcuda.
    if !unsafe { sys::is_culib_present() } {
        return None;
    }
    // cudarc panics if a symbol is missing from an unusual libcuda; treat that as no driver.
    std::panic::catch_unwind(|| {
        let mut code = 0i32;
        // SAFETY: writes one int.
        let r = unsafe { sys::cuDriverGetVersion(&mut code) };
        if r == sys::CUresult::CUDA_SUCCESS {
            CudaVersion::from_driver_code(code)
        } else {
            None
        }
    })
    .ok()
    .flatten()
}

/// Checks an artifact's manifest against this machine. Returns warnings for what can still
/// work (a CUDA artifact with no driver runs its CPU backend); refuses what cannot.
pub fn check(m: &Manifest, host: &Host) -> Result<Vec<String>> {
    let mut warnings = Vec::new();
    if m.target != host.target {
        bail!(
            "the artifact is built for {} but this machine is {}; pick an artifact for {} \
             (the index lists the targets it has)",
            m.target,
            host.target,
            host.target
        );
    }
    if let Some(need) = &m.min_glibc {
        match &host.glibc {
            Some(have) if compare_versions(have, need) == Ordering::Less => bail!(
                "the artifact needs glibc {need} or newer but this machine has glibc {have}; \
                 upgrade the OS, or build from source with `cargo xtask build`"
            ),
            Some(_) => {}
            None => warnings.push(format!(
                "could not find this machine's glibc version; the artifact needs glibc {need}"
            )),
        }
    }
    if let Some(cuda) = &m.cuda {
        let need = CudaVersion::parse(cuda).filter(|_| cuda.contains('.'));
        let Some(need) = need else {
            bail!("the artifact's manifest names CUDA version {cuda:?}, which is not MAJOR.MINOR");
        };
        match host.driver {
            Some(have) if have < need => bail!(
                "the artifact is built with CUDA {need} but the NVIDIA driver supports CUDA up \
                 to {have}; install a variant built for CUDA {have} or older (--cuda), or \
                 upgrade the driver"
            ),
            Some(_) => {}
            None => warnings.push(format!(
                "no NVIDIA driver found (libcuda did not load): the CUDA {need} backend of this \
                 artifact cannot run here until a driver supporting CUDA {need} is installed; \
                 the CPU backend works"
            )),
        }
    }
    Ok(warnings)
}

/// Compute capabilities (major, minor) of `gpus` that none of the artifact's kernels can run
/// on: a cubin runs on its own architecture (`sm_90`, `sm_90a`), a family cubin (`sm_100f`)
/// on later GPUs of the same major version, PTX (`compute_80`) on any later GPU through the
/// driver's JIT.
pub fn uncovered_gpus(caps: &[String], gpus: &[(u32, u32)]) -> Vec<(u32, u32)> {
    let parse = |c: &str| -> Option<(bool, u32, String)> {
        let (kind, rest) = c.split_once('_')?;
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        let suffix = rest[digits.len()..].to_string();
        Some((kind == "sm", digits.parse().ok()?, suffix))
    };
    let caps: Vec<(bool, u32, String)> = caps.iter().filter_map(|c| parse(c)).collect();
    gpus.iter()
        .copied()
        .filter(|&(major, minor)| {
            let n = major * 10 + minor;
            !caps
                .iter()
                .any(|(cubin, k, suffix)| match (cubin, suffix.as_str()) {
                    (true, "f") => *k / 10 == major && *k <= n,
                    (true, _) => *k == n,
                    (false, "") => *k <= n,
                    // Arch-specific PTX only JIT-compiles for that exact architecture.
                    (false, _) => *k == n,
                })
        })
        .collect()
}

/// A `--cuda` request: a CUDA version or the CPU variant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VariantRequest {
    Cuda(CudaVersion),
    Cpu,
}

impl VariantRequest {
    pub fn parse(s: &str) -> Result<VariantRequest> {
        let t = s.trim().to_ascii_lowercase();
        if t == "cpu" || t == "none" {
            return Ok(VariantRequest::Cpu);
        }
        // Accept `12.1` and the file-name spelling `cu121`.
        let v = if let Some(digits) = t.strip_prefix("cu") {
            (digits.len() >= 3 && digits.bytes().all(|c| c.is_ascii_digit())).then(|| {
                let (maj, min) = digits.split_at(digits.len() - 1);
                format!("{maj}.{min}")
            })
        } else {
            Some(t.clone())
        };
        match v
            .filter(|v| v.contains('.'))
            .and_then(|v| CudaVersion::parse(&v))
        {
            Some(cv) => Ok(VariantRequest::Cuda(cv)),
            None => bail!(
                "--cuda {s:?} is not a CUDA version; write MAJOR.MINOR (e.g. --cuda 12.1) or \
                 --cuda cpu"
            ),
        }
    }
}

/// Picks the artifact for this machine: the requested variant, else the newest CUDA variant
/// the driver can run, else (no driver) the CPU variant, else the newest CUDA variant.
pub fn pick_artifact<'a>(
    entries: &'a [ArtifactEntry],
    host: &Host,
    request: Option<&VariantRequest>,
    what: &str,
) -> Result<&'a ArtifactEntry> {
    let mine: Vec<&ArtifactEntry> = entries.iter().filter(|a| a.target == host.target).collect();
    let list = || {
        entries
            .iter()
            .map(|a| format!("{}/{}", a.target, a.variant))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if mine.is_empty() {
        bail!(
            "{what} has no artifact for this machine ({}); it has: {}",
            host.target,
            list()
        );
    }
    let cuda_of = |a: &ArtifactEntry| a.cuda.as_deref().and_then(CudaVersion::parse);
    match request {
        Some(VariantRequest::Cpu) => mine
            .into_iter()
            .find(|a| a.cuda.is_none())
            .ok_or_else(|| anyhow::anyhow!("{what} has no CPU variant; it has: {}", list())),
        Some(VariantRequest::Cuda(v)) => mine
            .into_iter()
            .find(|a| cuda_of(a) == Some(*v))
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "{what} has no CUDA {v} variant for {}; it has: {}",
                    host.target,
                    list()
                )
            }),
        None => {
            let mut cuda: Vec<(&ArtifactEntry, CudaVersion)> = mine
                .iter()
                .filter_map(|a| cuda_of(a).map(|v| (*a, v)))
                .collect();
            cuda.sort_by_key(|(_, v)| *v);
            let cpu = mine.iter().find(|a| a.cuda.is_none()).copied();
            match host.driver {
                Some(d) => {
                    if let Some((a, _)) = cuda.iter().rev().find(|(_, v)| *v <= d) {
                        return Ok(a);
                    }
                    if let Some(a) = cpu {
                        return Ok(a);
                    }
                    bail!(
                        "the NVIDIA driver supports CUDA up to {d} but {what} only has {}; \
                         upgrade the driver",
                        list()
                    )
                }
                None => cpu
                    .or_else(|| cuda.last().map(|(a, _)| *a))
                    .ok_or_else(|| anyhow::anyhow!("{what} lists no usable artifact")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(cuda: Option<&str>, glibc: Option<&str>) -> Manifest {
        Manifest {
            schema: 1,
            name: "rvllm".into(),
            version: "0.1.0".into(),
            commit: "a".repeat(40),
            target: "x86_64-unknown-linux-gnu".into(),
            cuda: cuda.map(Into::into),
            compute_capabilities: vec![],
            min_glibc: glibc.map(Into::into),
            files: vec![],
        }
    }

    fn host(driver: Option<(u32, u32)>, glibc: &str) -> Host {
        Host {
            target: "x86_64-unknown-linux-gnu".into(),
            glibc: Some(glibc.into()),
            driver: driver.map(|(major, minor)| CudaVersion { major, minor }),
        }
    }

    #[test]
    fn refuses_a_driver_older_than_the_artifact() {
        let m = manifest(Some("12.4"), None);
        let e = check(&m, &host(Some((12, 1)), "2.36"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("CUDA 12.4") && e.contains("up to 12.1"), "{e}");
        assert!(check(&m, &host(Some((12, 4)), "2.36")).unwrap().is_empty());
        assert!(check(&m, &host(Some((13, 0)), "2.36")).unwrap().is_empty());
        // No driver: allowed, with a warning.
        let w = check(&m, &host(None, "2.36")).unwrap();
        assert_eq!(w.len(), 1);
        assert!(w[0].contains("no NVIDIA driver"));
    }

    #[test]
    fn refuses_an_older_glibc_and_another_target() {
        let m = manifest(None, Some("2.39"));
        let e = check(&m, &host(None, "2.36")).unwrap_err().to_string();
        assert!(e.contains("glibc 2.39") && e.contains("2.36"), "{e}");
        assert!(check(&m, &host(None, "2.39")).is_ok());
        let mut other = host(None, "2.40");
        other.target = "aarch64-unknown-linux-gnu".into();
        assert!(check(&m, &other)
            .unwrap_err()
            .to_string()
            .contains("aarch64"));
    }

    #[test]
    fn finds_gpus_the_kernels_do_not_cover() {
        let caps: Vec<String> = ["sm_80", "sm_90a", "compute_90a"]
            .map(String::from)
            .to_vec();
        assert_eq!(
            uncovered_gpus(&caps, &[(8, 0), (9, 0), (8, 9), (7, 5)]),
            vec![(8, 9), (7, 5)]
        );
        let ptx: Vec<String> = ["compute_80", "sm_100f"].map(String::from).to_vec();
        assert_eq!(
            uncovered_gpus(&ptx, &[(7, 5), (8, 6), (10, 3), (12, 0)]),
            vec![(7, 5)]
        );
    }

    #[test]
    fn parses_variant_requests() {
        assert_eq!(VariantRequest::parse("cpu").unwrap(), VariantRequest::Cpu);
        let v121 = VariantRequest::Cuda(CudaVersion {
            major: 12,
            minor: 1,
        });
        assert_eq!(VariantRequest::parse("12.1").unwrap(), v121);
        assert_eq!(VariantRequest::parse("cu121").unwrap(), v121);
        assert_eq!(
            VariantRequest::parse("cu130").unwrap(),
            VariantRequest::Cuda(CudaVersion {
                major: 13,
                minor: 0
            })
        );
        for bad in ["12", "gpu", "cu1", "12.x"] {
            assert!(VariantRequest::parse(bad).is_err(), "{bad}");
        }
    }

    fn entry(cuda: Option<&str>) -> ArtifactEntry {
        ArtifactEntry {
            target: "x86_64-unknown-linux-gnu".into(),
            cuda: cuda.map(Into::into),
            variant: crate::dist::manifest::variant_name(cuda),
            file: "f".into(),
            size: 1,
            sha256: "0".into(),
            version: "0.1.0".into(),
            commit: "a".repeat(40),
        }
    }

    #[test]
    fn picks_the_variant_the_driver_can_run() {
        let all = vec![entry(Some("11.8")), entry(Some("12.1")), entry(None)];
        let pick = |d, r: Option<VariantRequest>| {
            pick_artifact(&all, &host(d, "2.36"), r.as_ref(), "test").map(|a| a.variant.clone())
        };
        assert_eq!(pick(Some((12, 4)), None).unwrap(), "cu121");
        assert_eq!(pick(Some((12, 0)), None).unwrap(), "cu118");
        assert_eq!(pick(Some((11, 0)), None).unwrap(), "cpu");
        assert_eq!(pick(None, None).unwrap(), "cpu");
        assert_eq!(
            pick(None, Some(VariantRequest::parse("11.8").unwrap())).unwrap(),
            "cu118"
        );
        assert!(pick(None, Some(VariantRequest::parse("13.0").unwrap()))
            .unwrap_err()
            .to_string()
            .contains("no CUDA 13.0 variant"));
        let cuda_only = vec![entry(Some("11.8")), entry(Some("12.1"))];
        let a = pick_artifact(&cuda_only, &host(None, "2.36"), None, "t").unwrap();
        assert_eq!(a.variant, "cu121");
    }

    #[test]
    fn detects_this_machine() {
        let h = detect();
        assert!(h.target.contains(std::env::consts::ARCH));
        if cfg!(all(target_os = "linux", target_env = "gnu")) {
            let g = h.glibc.expect("glibc version");
            assert!(g.starts_with("2."), "{g}");
        }
    }
}
