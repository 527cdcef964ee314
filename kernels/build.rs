//! Compiles every `src/*.cu` into a fatbin with nvcc (feature `cuda`) and generates the table
//! that `src/lib.rs` embeds. Without the feature nothing is compiled. Either way the kernels'
//! signatures become the typed argument structs of `rvllm_kernels::args` (launch_args.rs).
//!
//! Inputs (all optional; `cargo xtask build` sets the RVLLM_* ones from its own detection):
//! - `RVLLM_NVCC`: the nvcc to use; else CUDA_HOME, PATH, standard prefixes, `<repo>/.cuda`.
//! - `RVLLM_CUDA_ARCHS` / `CUDA_ARCHS` (`80;90a`): targets; else the GPUs present; else
//!   the documented default list (trimmed to what nvcc supports).
//! - `RVLLM_DRIVER_CUDA_VERSION` (`13000`, or `none`): decides whether PTX is embedded.
//! - `RVLLM_JOBS` / `MAX_JOBS`: parallel nvcc jobs; default min(cores, free memory / 2 GiB).
//! - `RVLLM_NO_CCACHE=1`: do not wrap nvcc with ccache (>= 4, used when found).
//! - `RVLLM_PREBUILT_KERNELS=<dir>`: take `<name>.fatbin` files from `dir` instead of nvcc.
//! - `RVLLM_KERNELS_SRC=<dir>`: compile the `.cu` files of another folder (bench-build uses a
//!   scratch copy so that it never edits the repository's kernels).

#[path = "../xtask/src/jobs.rs"]
mod jobs;
mod launch_args;
#[path = "../xtask/src/toolchain.rs"]
mod toolchain;

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use toolchain::{CudaArch, CudaToolkit, CudaVersion};

/// The first four bytes of every fatbin (0xBA55ED50, little-endian).
const FATBIN_MAGIC: [u8; 4] = [0x50, 0xed, 0x55, 0xba];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=../xtask/src/toolchain.rs");
    println!("cargo:rerun-if-changed=../xtask/src/jobs.rs");
    for var in [
        "RVLLM_NVCC",
        "CUDA_HOME",
        "CUDA_PATH",
        "RVLLM_CUDA_ARCHS",
        "CUDA_ARCHS",
        "RVLLM_DRIVER_CUDA_VERSION",
        "RVLLM_PREBUILT_KERNELS",
        "RVLLM_KERNELS_SRC",
        "RVLLM_KERNEL_TRACE",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    if let Err(e) = run() {
        // Cargo prints the build script's stderr when it fails; one clear paragraph.
        eprintln!("\nerror: rvllm-kernels: {e}\n");
        std::process::exit(1);
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn run() -> Result<(), String> {
    let out_dir = PathBuf::from(env("OUT_DIR").ok_or("OUT_DIR is not set (run through cargo)")?);
    let manifest_dir =
        PathBuf::from(env("CARGO_MANIFEST_DIR").ok_or("CARGO_MANIFEST_DIR is not set")?);
    let repo_root = manifest_dir.parent().unwrap_or(&manifest_dir).to_path_buf();

    let src_dir = env("RVLLM_KERNELS_SRC")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest_dir.join("src"));
    println!("cargo:rerun-if-changed={}", src_dir.display());
    println!("cargo:rerun-if-changed=launch_args.rs");
    let sources = list_sources(&src_dir)?;
    write_args(&src_dir, &sources, &out_dir)?;

    if env("CARGO_FEATURE_CUDA").is_none() {
        return write_table(&out_dir, &[], "none (built without the `cuda` feature)");
    }
    let fatbin_dir = out_dir.join("fatbin");
    std::fs::create_dir_all(&fatbin_dir)
        .map_err(|e| format!("creating {}: {e}", fatbin_dir.display()))?;

    let (kernels, archs_text) = if let Some(pre) = env("RVLLM_PREBUILT_KERNELS") {
        take_prebuilt(Path::new(&pre), &sources, &fatbin_dir)?
    } else {
        compile_all(&repo_root, &src_dir, &sources, &fatbin_dir, &out_dir)?
    };
    write_table(&out_dir, &kernels, &archs_text)?;
    publish(&out_dir, &fatbin_dir, &kernels, &archs_text);
    Ok(())
}

/// Kernel stems (file names without `.cu`), sorted.
fn list_sources(src_dir: &Path) -> Result<Vec<String>, String> {
    let rd =
        std::fs::read_dir(src_dir).map_err(|e| format!("reading {}: {e}", src_dir.display()))?;
    let mut names: Vec<String> = rd
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_suffix(".cu").map(str::to_string)
        })
        .collect();
    names.sort();
    for n in &names {
        if !n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!(
                "kernel file `{n}.cu`: name it with letters, digits and `_` only"
            ));
        }
    }
    Ok(names)
}

fn take_prebuilt(
    dir: &Path,
    sources: &[String],
    fatbin_dir: &Path,
) -> Result<(Vec<String>, String), String> {
    println!("cargo:rerun-if-changed={}", dir.display());
    let rd = std::fs::read_dir(dir).map_err(|e| {
        format!(
            "RVLLM_PREBUILT_KERNELS={}: {e}; point it at a folder of <kernel>.fatbin files",
            dir.display()
        )
    })?;
    let mut kernels = Vec::new();
    for entry in rd.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(stem) = name.strip_suffix(".fatbin") else {
            continue;
        };
        let bytes = std::fs::read(entry.path())
            .map_err(|e| format!("reading {}: {e}", entry.path().display()))?;
        if !bytes.starts_with(&FATBIN_MAGIC) {
            return Err(format!("{} is not a CUDA fatbin", entry.path().display()));
        }
        std::fs::write(fatbin_dir.join(&name), &bytes)
            .map_err(|e| format!("copying {name}: {e}"))?;
        kernels.push(stem.to_string());
    }
    kernels.sort();
    for s in sources {
        if !kernels.contains(s) {
            println!(
                "cargo:warning=kernel `{s}.cu` has no prebuilt fatbin in {}; it is missing from this build",
                dir.display()
            );
        }
    }
    let archs = std::fs::read_to_string(dir.join("built_archs.txt"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown (prebuilt kernels without built_archs.txt)".into());
    println!(
        "cargo:warning=using {} prebuilt kernel(s) from {} ({archs})",
        kernels.len(),
        dir.display()
    );
    Ok((kernels, archs))
}

fn find_toolkit(repo_root: &Path) -> Result<CudaToolkit, String> {
    if let Some(nvcc) = env("RVLLM_NVCC") {
        return toolchain::toolkit_from_nvcc(Path::new(&nvcc), toolchain::ToolkitSource::Path)
            .map_err(|e| format!("RVLLM_NVCC: {e}"));
    }
    let d = toolchain::detect_cuda(repo_root);
    d.chosen.ok_or_else(|| {
        let mut msg = String::from("the `cuda` feature needs nvcc, and no CUDA toolkit was found");
        for p in &d.problems {
            let _ = write!(msg, "\n  - {p}");
        }
        let _ = write!(msg, "\nfix: {}", toolchain::Detection::fix_hint());
        msg
    })
}

/// Targets: explicit list, else the GPUs present, else the default list trimmed to nvcc.
fn resolve_archs(tk: &CudaToolkit, gpus: &[(u32, u32)]) -> Result<Vec<CudaArch>, String> {
    let supported = tk.supported_archs()?;
    let explicit = env("RVLLM_CUDA_ARCHS").or_else(|| env("CUDA_ARCHS"));
    if let Some(list) = explicit {
        let archs = toolchain::parse_cuda_archs(&list).map_err(|e| format!("CUDA_ARCHS: {e}"))?;
        let (ok, bad) = toolchain::filter_supported(&archs, &supported);
        if !bad.is_empty() {
            return Err(format!(
                "nvcc {} cannot compile for {}; it supports sm_{}. Change CUDA_ARCHS / --cuda-archs",
                tk.version,
                bad.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", "),
                supported.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(" sm_")
            ));
        }
        return Ok(ok);
    }
    let wanted: Vec<CudaArch> = if gpus.is_empty() {
        toolchain::parse_cuda_archs(toolchain::DEFAULT_CUDA_ARCHS)?
    } else {
        let mut v: Vec<CudaArch> = gpus
            .iter()
            .map(|&(a, b)| CudaArch::from_compute_capability(a, b))
            .collect();
        v.sort();
        v.dedup();
        v
    };
    let (ok, dropped) = toolchain::filter_supported(&wanted, &supported);
    if !dropped.is_empty() {
        println!(
            "cargo:warning=nvcc {} cannot target {}; skipped",
            tk.version,
            dropped
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if ok.is_empty() {
        return Err(format!(
            "nvcc {} supports none of the target architectures; set CUDA_ARCHS",
            tk.version
        ));
    }
    Ok(ok)
}

struct Job {
    stem: String,
    hash: String,
}

fn compile_all(
    repo_root: &Path,
    src_dir: &Path,
    sources: &[String],
    fatbin_dir: &Path,
    out_dir: &Path,
) -> Result<(Vec<String>, String), String> {
    let started = Instant::now();
    let tk = find_toolkit(repo_root)?;
    let driver = driver_probe::probe();
    let archs = resolve_archs(&tk, &driver.gpus)?;
    let driver_version = match env("RVLLM_DRIVER_CUDA_VERSION").as_deref() {
        Some("none") => None,
        Some(v) => v
            .parse::<i32>()
            .ok()
            .and_then(CudaVersion::from_driver_code),
        None => driver.version,
    };
    let with_ptx = toolchain::should_embed_ptx(tk.version, driver_version);
    let jobs = jobs::resolve_jobs(
        env("RVLLM_JOBS").as_deref(),
        env("MAX_JOBS").as_deref(),
        jobs::cpu_cores(),
        jobs::mem_available_bytes(),
    )?;
    let ccache = if env("RVLLM_NO_CCACHE").is_some_and(|v| v != "0") {
        None
    } else {
        toolchain::find_ccache(std::env::var_os("PATH").as_ref())
    };

    let mut flags: Vec<String> = Vec::new();
    if ccache.is_some() {
        // ccache treats a bare `-fatbin` as a link step and will not cache it; with `-c` in
        // front it caches, and nvcc still honours the later `-fatbin`.
        flags.push("-c".into());
    }
    flags.extend(["-fatbin", "-O3", "-std=c++17", "--use_fast_math"].map(String::from));
    if env("RVLLM_KERNEL_TRACE").is_some_and(|v| v != "0") {
        // The block timeline of common.cuh (a diagnostic build; see block_trace.rs).
        flags.push("-DRVLLM_BLOCK_TRACE".into());
    }
    flags.extend(toolchain::gencode_flags(&archs, with_ptx));
    for inc in tk.include_dirs() {
        flags.push(format!("-I{}", inc.display()));
    }
    let mut archs_text = archs
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(" ");
    if with_ptx {
        if let Some(newest) = archs.iter().max() {
            let _ = write!(
                archs_text,
                " +PTX compute_{}{}",
                newest.number, newest.suffix
            );
        }
    }

    // Which kernels changed: a hash of the flags, nvcc, the .cu and every header it includes.
    let fixed = format!("{}|{}|{}", tk.nvcc.display(), tk.version, flags.join(" "));
    let mut todo = Vec::new();
    for stem in sources {
        let hash = format!("{:016x}", source_hash(src_dir, stem, &fixed)?);
        let stamp = fatbin_dir.join(format!("{stem}.hash"));
        let fresh = fatbin_dir.join(format!("{stem}.fatbin")).is_file()
            && std::fs::read_to_string(&stamp).is_ok_and(|s| s == hash);
        if !fresh {
            todo.push(Job {
                stem: stem.clone(),
                hash,
            });
        }
    }

    let basedir = if src_dir.starts_with(repo_root) {
        repo_root
    } else {
        src_dir
    };
    let results = run_parallel(&todo, jobs.jobs, |job| {
        let out = fatbin_dir.join(format!("{}.fatbin", job.stem));
        let mut cmd = match &ccache {
            Some((exe, _)) => {
                let mut c = Command::new(exe);
                c.arg(&tk.nvcc).env("CCACHE_BASEDIR", basedir);
                c
            }
            None => Command::new(&tk.nvcc),
        };
        cmd.current_dir(src_dir)
            .args(&flags)
            .arg("-o")
            .arg(&out)
            .arg(format!("{}.cu", job.stem));
        let t = Instant::now();
        let output = cmd
            .output()
            .map_err(|e| format!("running {}: {e}", tk.nvcc.display()))?;
        let took = t.elapsed();
        if !output.status.success() {
            return Err(format!(
                "nvcc failed on {}.cu ({}):\n{}{}",
                job.stem,
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        let bytes = std::fs::read(&out).map_err(|e| format!("reading {}: {e}", out.display()))?;
        if !bytes.starts_with(&FATBIN_MAGIC) {
            return Err(format!(
                "nvcc wrote {} but it is not a fatbin",
                out.display()
            ));
        }
        std::fs::write(fatbin_dir.join(format!("{}.hash", job.stem)), &job.hash)
            .map_err(|e| format!("writing the stamp of {}: {e}", job.stem))?;
        Ok(took)
    });

    let mut errors = Vec::new();
    for (job, res) in todo.iter().zip(&results) {
        match res {
            Ok(took) => println!(
                "cargo:warning=compiled {}.cu in {:.2} s",
                job.stem,
                took.as_secs_f64()
            ),
            Err(e) => errors.push(e.clone()),
        }
    }
    if !errors.is_empty() {
        return Err(errors.join("\n\n"));
    }
    let total = started.elapsed();
    let ccache_text = match &ccache {
        Some((_, v)) => format!("ccache {v}"),
        None => "no ccache".into(),
    };
    println!(
        "cargo:warning=kernels: {} compiled, {} unchanged, {:.2} s; nvcc {} ({}), {} job(s) ({}), {ccache_text}, targets {archs_text}",
        todo.len(),
        sources.len() - todo.len(),
        total.as_secs_f64(),
        tk.version,
        tk.nvcc.display(),
        jobs.jobs,
        jobs.reason,
    );
    let report = format!(
        "{{\"compiled\":{},\"unchanged\":{},\"seconds\":{:.3},\"jobs\":{},\"nvcc_version\":\"{}\",\"ccache\":{},\"archs\":\"{}\"}}\n",
        todo.len(),
        sources.len() - todo.len(),
        total.as_secs_f64(),
        jobs.jobs,
        tk.version,
        ccache.is_some(),
        archs_text
    );
    std::fs::write(out_dir.join("kernel_build.json"), report)
        .map_err(|e| format!("writing kernel_build.json: {e}"))?;
    Ok((sources.to_vec(), archs_text))
}

/// Runs `f` over `items` on at most `jobs` threads; results come back in input order.
fn run_parallel<T: Sync, R: Send>(items: &[T], jobs: usize, f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let next = Arc::new(Mutex::new(0usize));
    let results: Mutex<Vec<Option<R>>> = Mutex::new((0..items.len()).map(|_| None).collect());
    std::thread::scope(|s| {
        for _ in 0..jobs.min(items.len()).max(1) {
            s.spawn(|| loop {
                let i = {
                    let mut n = next.lock().unwrap_or_else(|p| p.into_inner());
                    let i = *n;
                    *n += 1;
                    i
                };
                let Some(item) = items.get(i) else { break };
                let r = f(item);
                results.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(r);
            });
        }
    });
    results
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
        .into_iter()
        .flatten()
        .collect()
}

/// FNV-1a: stable across toolchains (unlike `DefaultHasher`), and plenty for change detection.
fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// Hash of the fixed flags, `<stem>.cu` and every local header it includes, transitively.
fn source_hash(src_dir: &Path, stem: &str, fixed: &str) -> Result<u64, String> {
    let mut h = fnv1a(0xcbf29ce484222325, fixed.as_bytes());
    let mut seen = BTreeSet::new();
    let mut queue = vec![format!("{stem}.cu")];
    while let Some(file) = queue.pop() {
        if !seen.insert(file.clone()) {
            continue;
        }
        let path = src_dir.join(&file);
        let Ok(text) = std::fs::read_to_string(&path) else {
            if file.ends_with(".cu") {
                return Err(format!("reading {}", path.display()));
            }
            // A system header written with quotes: not ours to track.
            continue;
        };
        h = fnv1a(h, file.as_bytes());
        h = fnv1a(h, text.as_bytes());
        for line in text.lines() {
            let l = line.trim_start();
            if let Some(rest) = l.strip_prefix("#include").map(str::trim_start) {
                if let Some(name) = rest.strip_prefix('"').and_then(|r| r.split('"').next()) {
                    queue.push(name.to_string());
                }
            }
        }
    }
    Ok(h)
}

/// `args.rs` in OUT_DIR: one argument struct a kernel signature (launch_args.rs).
fn write_args(src_dir: &Path, sources: &[String], out_dir: &Path) -> Result<(), String> {
    let (sigs, skipped) = launch_args::parse_dir(src_dir, sources)?;
    for s in &skipped {
        println!("cargo:warning=no typed arguments for a kernel: {s}");
    }
    write_if_changed(&out_dir.join("args.rs"), &launch_args::render(&sigs))
}

/// Rewrites `path` only on change, so that the crate is not recompiled for nothing.
fn write_if_changed(path: &Path, text: &str) -> Result<(), String> {
    if std::fs::read_to_string(path).ok().as_deref() != Some(text) {
        std::fs::write(path, text).map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    Ok(())
}

/// `kernels.rs` in OUT_DIR: the names, the archs, and one aligned `include_bytes!` each.
fn write_table(out_dir: &Path, kernels: &[String], archs: &str) -> Result<(), String> {
    let mut s = String::new();
    let _ = writeln!(s, "/// Every kernel module in this build, by file stem.");
    let _ = writeln!(s, "pub const KERNEL_NAMES: &[&str] = &{kernels:?};");
    let _ = writeln!(s, "const BUILT_ARCHS: &str = {archs:?};");
    for (i, k) in kernels.iter().enumerate() {
        let path = out_dir.join("fatbin").join(format!("{k}.fatbin"));
        let path = path
            .to_str()
            .ok_or_else(|| format!("OUT_DIR path is not UTF-8: {}", path.display()))?;
        let _ = writeln!(
            s,
            "static K{i}: &Aligned<[u8]> = &Aligned(*include_bytes!({path:?}));"
        );
    }
    let _ = writeln!(s, "fn lookup(name: &str) -> Option<&'static [u8]> {{");
    if kernels.is_empty() {
        // No kernels (no `cuda` feature): a plain body, which clippy accepts.
        let _ = writeln!(s, "    let _ = name;\n    None\n}}");
    } else {
        let _ = writeln!(s, "    match name {{");
        for (i, k) in kernels.iter().enumerate() {
            let _ = writeln!(s, "        {k:?} => Some(&K{i}.0),");
        }
        let _ = writeln!(s, "        _ => None,\n    }}\n}}");
    }
    write_if_changed(&out_dir.join("kernels.rs"), &s)
}

/// Copies the fatbins to `<target>/<profile>/rvllm-kernels/` (a path that does not change
/// between builds), where `cargo xtask dist` packages them and `RVLLM_PREBUILT_KERNELS` can
/// point. Best effort: the embedded copy is what the engine uses.
fn publish(out_dir: &Path, fatbin_dir: &Path, kernels: &[String], archs: &str) {
    // OUT_DIR is <target>/<profile>/build/rvllm-kernels-<hash>/out.
    let Some(profile_dir) = out_dir.ancestors().nth(3) else {
        return;
    };
    if out_dir
        .ancestors()
        .nth(2)
        .and_then(Path::file_name)
        .is_none_or(|n| n != "build")
    {
        return;
    }
    let dest = profile_dir.join("rvllm-kernels");
    if std::fs::create_dir_all(&dest).is_err() {
        return;
    }
    if let Ok(rd) = std::fs::read_dir(&dest) {
        for e in rd.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }
    for k in kernels {
        let _ = std::fs::copy(
            fatbin_dir.join(format!("{k}.fatbin")),
            dest.join(format!("{k}.fatbin")),
        );
    }
    let _ = std::fs::write(dest.join("built_archs.txt"), format!("{archs}\n"));
    let _ = std::fs::copy(
        out_dir.join("kernel_build.json"),
        dest.join("kernel_build.json"),
    );
}

/// Asks libcuda (when present) for the driver's CUDA version and the GPUs' compute
/// capabilities, so that a plain `cargo build --features cuda` targets the GPUs present.
mod driver_probe {
    use super::CudaVersion;
    use std::ffi::{c_char, c_int, c_void, CStr};

    #[derive(Default)]
    pub struct Probe {
        pub version: Option<CudaVersion>,
        pub gpus: Vec<(u32, u32)>,
    }

    type FnInt = unsafe extern "C" fn(*mut c_int) -> c_int;
    type FnInit = unsafe extern "C" fn(u32) -> c_int;
    type FnGet = unsafe extern "C" fn(*mut c_int, c_int) -> c_int;
    type FnAttr = unsafe extern "C" fn(*mut c_int, c_int, c_int) -> c_int;

    const CC_MAJOR: c_int = 75;
    const CC_MINOR: c_int = 76;

    unsafe fn sym(lib: *mut c_void, name: &CStr) -> Option<*mut c_void> {
        let p = libc::dlsym(lib, name.as_ptr());
        (!p.is_null()).then_some(p)
    }

    pub fn probe() -> Probe {
        let mut out = Probe::default();
        // SAFETY: dlopen/dlsym with NUL-terminated names; the symbols have the documented
        // CUDA driver API signatures; the library stays loaded for the process lifetime.
        unsafe {
            let lib = libc::dlopen(c"libcuda.so.1".as_ptr() as *const c_char, libc::RTLD_NOW);
            if lib.is_null() {
                return out;
            }
            let (Some(init), Some(ver), Some(count), Some(get), Some(attr)) = (
                sym(lib, c"cuInit"),
                sym(lib, c"cuDriverGetVersion"),
                sym(lib, c"cuDeviceGetCount"),
                sym(lib, c"cuDeviceGet"),
                sym(lib, c"cuDeviceGetAttribute"),
            ) else {
                return out;
            };
            let init: FnInit = std::mem::transmute(init);
            let ver: FnInt = std::mem::transmute(ver);
            let count: FnInt = std::mem::transmute(count);
            let get: FnGet = std::mem::transmute(get);
            let attr: FnAttr = std::mem::transmute(attr);
            let mut v = 0;
            if ver(&mut v) == 0 {
                out.version = CudaVersion::from_driver_code(v);
            }
            if init(0) != 0 {
                return out;
            }
            let mut n = 0;
            if count(&mut n) != 0 {
                return out;
            }
            for i in 0..n {
                let (mut dev, mut major, mut minor) = (0, 0, 0);
                if get(&mut dev, i) == 0
                    && attr(&mut major, CC_MAJOR, dev) == 0
                    && attr(&mut minor, CC_MINOR, dev) == 0
                {
                    out.gpus.push((major as u32, minor as u32));
                }
            }
        }
        out
    }
}
