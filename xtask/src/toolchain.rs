//! CUDA toolkit detection and nvcc target-architecture handling.
//!
//! This file uses the standard library only, because `kernels/build.rs` includes it with
//! `#[path]`: the build script and `cargo xtask` must agree on which nvcc is used and which
//! architectures a build targets, and one copy of the logic guarantees that.
#![allow(dead_code)]

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where a toolkit was found; the order of the variants is the detection order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToolkitSource {
    CudaHome,
    Path,
    StandardPrefix,
    ProjectLocal,
}

impl fmt::Display for ToolkitSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ToolkitSource::CudaHome => "CUDA_HOME",
            ToolkitSource::Path => "nvcc on PATH",
            ToolkitSource::StandardPrefix => "standard prefix",
            ToolkitSource::ProjectLocal => "project-local toolkit (cargo xtask setup-cuda)",
        })
    }
}

/// The `release X.Y` of `nvcc --version`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct CudaVersion {
    pub major: u32,
    pub minor: u32,
}

impl CudaVersion {
    /// The driver API's encoding (`cuDriverGetVersion`): 12040 for 12.4.
    pub fn from_driver_code(code: i32) -> Option<Self> {
        if code <= 0 {
            return None;
        }
        let code = code as u32;
        Some(CudaVersion {
            major: code / 1000,
            minor: (code % 1000) / 10,
        })
    }

    pub fn driver_code(self) -> i32 {
        (self.major * 1000 + self.minor * 10) as i32
    }

    /// Parses "12.4", "12", "13.0.88".
    pub fn parse(s: &str) -> Option<Self> {
        let mut parts = s.trim().split('.');
        let major = parts.next()?.trim().parse().ok()?;
        let minor = match parts.next() {
            Some(m) => m.trim().parse().ok()?,
            None => 0,
        };
        Some(CudaVersion { major, minor })
    }
}

impl fmt::Display for CudaVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// Extracts the version from `nvcc --version` output ("... release 13.0, V13.0.88").
pub fn parse_nvcc_version(output: &str) -> Option<CudaVersion> {
    let idx = output.find("release ")?;
    let rest = &output[idx + "release ".len()..];
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    CudaVersion::parse(&rest[..end])
}

/// Runs `<nvcc> --version`; `Err` carries a message saying what went wrong.
pub fn nvcc_version(nvcc: &Path) -> Result<CudaVersion, String> {
    let out = Command::new(nvcc)
        .arg("--version")
        .output()
        .map_err(|e| format!("could not run {}: {e}", nvcc.display()))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(format!(
            "`{} --version` failed ({}): {}",
            nvcc.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    parse_nvcc_version(&text).ok_or_else(|| {
        format!(
            "`{} --version` printed no `release X.Y`: {}",
            nvcc.display(),
            text.trim()
        )
    })
}

/// A usable toolkit: the directory above `bin/nvcc`, and what `nvcc --version` said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CudaToolkit {
    pub root: PathBuf,
    pub nvcc: PathBuf,
    pub version: CudaVersion,
    pub source: ToolkitSource,
}

impl CudaToolkit {
    /// Extra include directories nvcc needs. A regular toolkit's nvcc.profile already adds
    /// `<root>/include`; the PyPI layout (`nvidia/cu13/`) has the runtime headers there too,
    /// and naming it explicitly costs nothing when the profile already does.
    pub fn include_dirs(&self) -> Vec<PathBuf> {
        let mut dirs = vec![self.root.join("include")];
        // The CUDA 12 PyPI layout splits the toolkit: nvidia/cuda_nvcc next to
        // nvidia/cuda_runtime and nvidia/cuda_cccl.
        if self.root.file_name().is_some_and(|n| n == "cuda_nvcc") {
            if let Some(parent) = self.root.parent() {
                dirs.push(parent.join("cuda_runtime").join("include"));
                dirs.push(parent.join("cuda_cccl").join("include"));
            }
        }
        dirs.retain(|d| d.is_dir());
        dirs
    }

    /// The architectures (`sm_XY` numbers) this nvcc can emit SASS for (`--list-gpu-code`).
    pub fn supported_archs(&self) -> Result<Vec<u32>, String> {
        let out = Command::new(&self.nvcc)
            .arg("--list-gpu-code")
            .output()
            .map_err(|e| format!("could not run {}: {e}", self.nvcc.display()))?;
        if !out.status.success() {
            return Err(format!(
                "`{} --list-gpu-code` failed ({})",
                self.nvcc.display(),
                out.status
            ));
        }
        Ok(parse_gpu_code_list(&String::from_utf8_lossy(&out.stdout)))
    }
}

/// Parses `nvcc --list-gpu-code` lines (`sm_80`, `sm_90a`) into numbers (80, 90).
pub fn parse_gpu_code_list(text: &str) -> Vec<u32> {
    let mut v: Vec<u32> = text
        .split_whitespace()
        .filter_map(|t| t.strip_prefix("sm_"))
        .filter_map(|t| {
            t.trim_end_matches(|c: char| c.is_ascii_alphabetic())
                .parse()
                .ok()
        })
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// Everything detection looks at, gathered up front so tests can build it from temp dirs.
#[derive(Clone, Debug, Default)]
pub struct DetectEnv {
    pub cuda_home: Option<PathBuf>,
    pub path: Option<OsString>,
    pub standard_prefixes: Vec<PathBuf>,
    /// `<repo>/.cuda`, where `cargo xtask setup-cuda` installs.
    pub project_local: Option<PathBuf>,
}

/// The project-local toolkit folder (git-ignored).
pub fn project_local_dir(repo_root: &Path) -> PathBuf {
    repo_root.join(".cuda")
}

/// Standard install prefixes, newest versioned `/usr/local/cuda-X.Y` first.
pub fn standard_prefixes() -> Vec<PathBuf> {
    let mut v = vec![PathBuf::from("/usr/local/cuda")];
    let mut versioned: Vec<(CudaVersion, PathBuf)> = std::fs::read_dir("/usr/local")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let ver = CudaVersion::parse(name.strip_prefix("cuda-")?)?;
            Some((ver, e.path()))
        })
        .collect();
    versioned.sort_by_key(|(v, _)| std::cmp::Reverse(*v));
    v.extend(versioned.into_iter().map(|(_, p)| p));
    v.extend(["/opt/cuda", "/usr/lib/cuda", "/usr/lib/nvidia-cuda-toolkit"].map(PathBuf::from));
    v
}

impl DetectEnv {
    pub fn from_process(repo_root: &Path) -> Self {
        let cuda_home = std::env::var_os("CUDA_HOME")
            .or_else(|| std::env::var_os("CUDA_PATH"))
            .filter(|s| !s.is_empty())
            .map(PathBuf::from);
        DetectEnv {
            cuda_home,
            path: std::env::var_os("PATH"),
            standard_prefixes: standard_prefixes(),
            project_local: Some(project_local_dir(repo_root)),
        }
    }
}

/// Result of detection: the chosen toolkit plus what doctor should report.
#[derive(Clone, Debug, Default)]
pub struct Detection {
    pub chosen: Option<CudaToolkit>,
    /// The toolkit of `$CUDA_HOME/bin/nvcc`, when that works.
    pub cuda_home: Option<CudaToolkit>,
    /// The toolkit of the first `nvcc` on PATH, when that works.
    pub path: Option<CudaToolkit>,
    /// Problems worth a line each (bad CUDA_HOME, broken nvcc, disagreement).
    pub problems: Vec<String>,
    /// Set when `nvcc --version` and `${CUDA_HOME}/bin/nvcc --version` disagree.
    pub disagreement: Option<String>,
    /// True when CUDA_HOME is set but holds no working nvcc: builds must not silently use
    /// another toolkit then.
    pub cuda_home_invalid: bool,
}

impl Detection {
    /// The sentence telling a user how to get a toolkit.
    pub fn fix_hint() -> &'static str {
        "run `cargo xtask setup-cuda` (installs nvcc into <repo>/.cuda), or set CUDA_HOME to a CUDA toolkit"
    }
}

fn toolkit_at_root(root: &Path, source: ToolkitSource) -> Option<Result<CudaToolkit, String>> {
    let nvcc = root.join("bin").join("nvcc");
    if !nvcc.is_file() {
        return None;
    }
    Some(toolkit_from_nvcc(&nvcc, source))
}

/// A toolkit from an nvcc path (the build script gets xtask's choice through `RVLLM_NVCC`).
pub fn toolkit_from_nvcc(nvcc: &Path, source: ToolkitSource) -> Result<CudaToolkit, String> {
    let version = nvcc_version(nvcc)?;
    // Resolve symlinks (/usr/bin/nvcc -> /usr/lib/nvidia-cuda-toolkit/bin/nvcc) so `root` is
    // where the headers are.
    let real = std::fs::canonicalize(nvcc).unwrap_or_else(|_| nvcc.to_path_buf());
    let root = real
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("/"));
    Ok(CudaToolkit {
        root,
        nvcc: nvcc.to_path_buf(),
        version,
        source,
    })
}

fn find_on_path(path: &OsString, program: &str) -> Option<PathBuf> {
    std::env::split_paths(path)
        .filter(|d| !d.as_os_str().is_empty())
        .map(|d| d.join(program))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        p.metadata()
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    }
    #[cfg(not(unix))]
    {
        p.is_file()
    }
}

/// Toolkit roots inside the project-local folder: `pip install --target` puts nvcc at
/// `nvidia/cu13/bin/nvcc` (`cu12` for CUDA 12); a plain toolkit copy has `bin/nvcc`.
pub fn project_local_roots(dir: &Path) -> Vec<PathBuf> {
    let mut roots = vec![dir.to_path_buf()];
    let mut cu: Vec<PathBuf> = std::fs::read_dir(dir.join("nvidia"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("cu"))
        })
        .collect();
    // Newest CUDA major first (cu13 before cu12).
    cu.sort();
    cu.reverse();
    roots.extend(cu);
    roots
}

/// Finds the CUDA toolkit: `CUDA_HOME`, then `nvcc` on PATH, then standard prefixes, then
/// the project-local toolkit. Also compares CUDA_HOME's nvcc with PATH's.
pub fn detect_cuda_with(env: &DetectEnv) -> Detection {
    let mut d = Detection::default();

    if let Some(home) = &env.cuda_home {
        match toolkit_at_root(home, ToolkitSource::CudaHome) {
            Some(Ok(tk)) => d.cuda_home = Some(tk),
            Some(Err(e)) => {
                d.cuda_home_invalid = true;
                d.problems
                    .push(format!("CUDA_HOME={}: {e}", home.display()));
            }
            None => {
                d.cuda_home_invalid = true;
                d.problems.push(format!(
                    "CUDA_HOME={} has no bin/nvcc; point CUDA_HOME at a CUDA toolkit or unset it",
                    home.display()
                ));
            }
        }
    }

    if let Some(nvcc) = env.path.as_ref().and_then(|p| find_on_path(p, "nvcc")) {
        match toolkit_from_nvcc(&nvcc, ToolkitSource::Path) {
            Ok(tk) => d.path = Some(tk),
            Err(e) => d.problems.push(format!("nvcc on PATH: {e}")),
        }
    }

    if let (Some(home), Some(path)) = (&d.cuda_home, &d.path) {
        if home.version != path.version {
            d.disagreement = Some(format!(
                "`nvcc --version` ({}, {}) and `${{CUDA_HOME}}/bin/nvcc --version` ({}, {}) disagree; \
                 put $CUDA_HOME/bin first on PATH or point CUDA_HOME at the toolkit you mean",
                path.version,
                path.nvcc.display(),
                home.version,
                home.nvcc.display()
            ));
        }
    }

    if env.cuda_home.is_some() {
        // An explicit CUDA_HOME is authoritative: never fall back to another toolkit.
        d.chosen = d.cuda_home.clone();
        return d;
    }
    if let Some(tk) = &d.path {
        d.chosen = Some(tk.clone());
        return d;
    }
    for prefix in &env.standard_prefixes {
        match toolkit_at_root(prefix, ToolkitSource::StandardPrefix) {
            Some(Ok(tk)) => {
                d.chosen = Some(tk);
                return d;
            }
            Some(Err(e)) => d.problems.push(e),
            None => {}
        }
    }
    if let Some(local) = &env.project_local {
        for root in project_local_roots(local) {
            match toolkit_at_root(&root, ToolkitSource::ProjectLocal) {
                Some(Ok(tk)) => {
                    d.chosen = Some(tk);
                    return d;
                }
                Some(Err(e)) => d.problems.push(e),
                None => {}
            }
        }
    }
    d
}

/// Detection with the real environment; `repo_root` locates the project-local toolkit.
pub fn detect_cuda(repo_root: &Path) -> Detection {
    detect_cuda_with(&DetectEnv::from_process(repo_root))
}

/// One target architecture: `sm_90a` is `CudaArch { number: 90, suffix: "a" }`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct CudaArch {
    pub number: u32,
    pub suffix: String,
}

impl fmt::Display for CudaArch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sm_{}{}", self.number, self.suffix)
    }
}

impl CudaArch {
    pub fn from_compute_capability(major: u32, minor: u32) -> Self {
        // Hopper's full feature set (wgmma, TMA) is `sm_90a`; later chips are fine plain.
        let suffix = if major == 9 && minor == 0 { "a" } else { "" };
        CudaArch {
            number: major * 10 + minor,
            suffix: suffix.to_string(),
        }
    }
}

/// The default when no GPU is present and no list is given: Ampere to Blackwell (B200/B300
/// `sm_100`, RTX 50 and RTX PRO `sm_120`), trimmed to what the nvcc in use can target (12.8
/// and newer know both Blackwells). rvllm's kernels use bf16 tensor-core MMA and
/// `__reduce_*_sync`, which need sm_80; Volta and Turing (7.x) can be named in `CUDA_ARCHS`
/// only once the kernels gain fallbacks for them. The Hopper-and-later paths (bulk copies,
/// programmatic dependent launch) are compiled for `__CUDA_ARCH__ >= 900` and chosen at run
/// time from the device's compute capability.
pub const DEFAULT_CUDA_ARCHS: &str = "80;86;89;90a;100;120";

/// The oldest architecture the kernels compile for (see [`DEFAULT_CUDA_ARCHS`]).
pub const KERNELS_MIN_ARCH: u32 = 80;

/// Parses `CUDA_ARCHS`-style lists: `80;90a`, `8.0 9.0a`, `sm_80,sm_90a`, `compute_86`.
pub fn parse_cuda_archs(list: &str) -> Result<Vec<CudaArch>, String> {
    let mut out = Vec::new();
    for item in list.split(|c: char| c == ';' || c == ',' || c.is_whitespace()) {
        let item = item.trim();
        if item.is_empty() {
            continue;
        }
        let bare = item
            .strip_prefix("sm_")
            .or_else(|| item.strip_prefix("compute_"))
            .unwrap_or(item)
            .to_ascii_lowercase();
        let digits_end = bare
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(bare.len());
        let (num, suffix) = bare.split_at(digits_end);
        let number = if let Some((maj, min)) = num.split_once('.') {
            match (maj.parse::<u32>(), min.parse::<u32>()) {
                (Ok(a), Ok(b)) if b < 10 => Some(a * 10 + b),
                _ => None,
            }
        } else {
            num.parse::<u32>().ok()
        };
        let valid_suffix = suffix.is_empty() || suffix == "a" || suffix == "f";
        match number {
            Some(n) if (30..=300).contains(&n) && valid_suffix => {
                out.push(CudaArch { number: n, suffix: suffix.to_string() })
            }
            _ => {
                return Err(format!(
                    "`{item}` is not a CUDA architecture; write compute capabilities like `80;86;90a` (or `8.0 9.0a`)"
                ))
            }
        }
    }
    if out.is_empty() {
        return Err(format!(
            "no CUDA architecture in `{list}`; write e.g. `80;90a`"
        ));
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// Comma-free, cargo-env-friendly form: `80;90a`.
pub fn format_cuda_archs(archs: &[CudaArch]) -> String {
    archs
        .iter()
        .map(|a| format!("{}{}", a.number, a.suffix))
        .collect::<Vec<_>>()
        .join(";")
}

/// Splits `archs` into those `supported` (numbers from `--list-gpu-code`) and those not.
pub fn filter_supported(archs: &[CudaArch], supported: &[u32]) -> (Vec<CudaArch>, Vec<CudaArch>) {
    archs
        .iter()
        .cloned()
        .partition(|a| supported.contains(&a.number))
}

/// nvcc `-gencode` flags: SASS for every arch, plus PTX of the newest arch when `with_ptx`
/// (PTX is only loadable by a driver at least as new as nvcc, so the caller decides).
pub fn gencode_flags(archs: &[CudaArch], with_ptx: bool) -> Vec<String> {
    let mut flags: Vec<String> = archs
        .iter()
        .map(|a| {
            format!(
                "-gencode=arch=compute_{n}{s},code=sm_{n}{s}",
                n = a.number,
                s = a.suffix
            )
        })
        .collect();
    if with_ptx {
        if let Some(newest) = archs.iter().max() {
            flags.push(format!(
                "-gencode=arch=compute_{n}{s},code=compute_{n}{s}",
                n = newest.number,
                s = newest.suffix
            ));
        }
    }
    flags
}

/// Whether PTX should be embedded: only when nvcc is no newer than the driver (a newer PTX
/// ISA fails to JIT). Without a driver we embed it, since the target machine is unknown.
pub fn should_embed_ptx(nvcc: CudaVersion, driver: Option<CudaVersion>) -> bool {
    match driver {
        Some(d) => nvcc <= d,
        None => true,
    }
}

/// ccache's version from `ccache --version` ("ccache version 4.7.5").
pub fn parse_ccache_version(output: &str) -> Option<CudaVersion> {
    let first = output.lines().next()?;
    let v = first.trim().strip_prefix("ccache version ")?;
    CudaVersion::parse(v.split_whitespace().next()?)
}

/// Finds ccache on PATH when its version is >= 4 (older ones cannot cache nvcc).
pub fn find_ccache(path: Option<&OsString>) -> Option<(PathBuf, CudaVersion)> {
    let exe = find_on_path(path?, "ccache")?;
    let out = Command::new(&exe).arg("--version").output().ok()?;
    let ver = parse_ccache_version(&String::from_utf8_lossy(&out.stdout))?;
    (ver.major >= 4).then_some((exe, ver))
}

#[cfg(test)]
#[path = "toolchain_tests.rs"]
mod tests;
