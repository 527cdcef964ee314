//! Copies of CUDA libraries visible to the dynamic loader. rvllm loads cuBLAS and NCCL at run
//! time, so two different copies (say a conda env's NCCL and the system's) mean the one it
//! gets depends on search order: doctor names them all.

use std::collections::BTreeSet;
use std::path::PathBuf;

/// The libraries doctor checks, by file-name prefix (`libcublas.so*`, not `libcublasLt`).
pub const WATCHED: &[&str] = &["libcublas", "libcublasLt", "libnccl"];

/// Does `file_name` name a shared object of `lib` (`libnccl.so`, `libnccl.so.2.21.5`)?
fn is_copy_of(file_name: &str, lib: &str) -> bool {
    file_name
        .strip_prefix(lib)
        .is_some_and(|rest| rest == ".so" || rest.starts_with(".so."))
}

/// Paths that `ldconfig -p` lists for `lib`.
pub fn from_ldconfig(ldconfig_output: &str, lib: &str) -> Vec<PathBuf> {
    ldconfig_output
        .lines()
        .filter_map(|l| {
            let (name, path) = l.trim().split_once(" => ")?;
            let file = name.split_whitespace().next()?;
            is_copy_of(file, lib).then(|| PathBuf::from(path.trim()))
        })
        .collect()
}

/// Files in `dirs` (LD_LIBRARY_PATH) that are copies of `lib`.
pub fn from_dirs(dirs: &[PathBuf], lib: &str) -> Vec<PathBuf> {
    let mut v = Vec::new();
    for d in dirs {
        let Ok(rd) = std::fs::read_dir(d) else {
            continue;
        };
        for e in rd.flatten() {
            if is_copy_of(&e.file_name().to_string_lossy(), lib) {
                v.push(e.path());
            }
        }
    }
    v.sort();
    v
}

/// Distinct files behind `paths`: symlink chains (`libnccl.so -> libnccl.so.2 ->
/// libnccl.so.2.21.5`) count once.
pub fn distinct_copies(paths: &[PathBuf]) -> Vec<PathBuf> {
    let set: BTreeSet<PathBuf> = paths
        .iter()
        .map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf()))
        .collect();
    set.into_iter().collect()
}

/// For each watched library with more than one distinct copy, the copies.
pub fn duplicate_copies(
    ldconfig_output: &str,
    ld_library_path: &[PathBuf],
) -> Vec<(String, Vec<PathBuf>)> {
    let mut out = Vec::new();
    for lib in WATCHED {
        let mut all = from_ldconfig(ldconfig_output, lib);
        all.extend(from_dirs(ld_library_path, lib));
        let copies = distinct_copies(&all);
        if copies.len() > 1 {
            out.push((lib.to_string(), copies));
        }
    }
    out
}

/// `ldconfig -p`, from the usual places (it is in /sbin, often not on a user's PATH).
pub fn run_ldconfig() -> String {
    for exe in ["ldconfig", "/sbin/ldconfig", "/usr/sbin/ldconfig"] {
        if let Ok(out) = std::process::Command::new(exe).arg("-p").output() {
            if out.status.success() {
                return String::from_utf8_lossy(&out.stdout).into_owned();
            }
        }
    }
    String::new()
}

pub fn ld_library_path() -> Vec<PathBuf> {
    std::env::var_os("LD_LIBRARY_PATH")
        .map(|v| {
            std::env::split_paths(&v)
                .filter(|p| !p.as_os_str().is_empty())
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn touch(p: &Path) {
        std::fs::write(p, b"\x7fELF").unwrap();
    }

    #[test]
    fn symlinks_count_once_and_two_real_copies_are_reported() {
        let tmp = tempfile::tempdir().unwrap();
        let sys = tmp.path().join("sys");
        let conda = tmp.path().join("conda");
        std::fs::create_dir_all(&sys).unwrap();
        std::fs::create_dir_all(&conda).unwrap();
        touch(&sys.join("libnccl.so.2.21.5"));
        std::os::unix::fs::symlink("libnccl.so.2.21.5", sys.join("libnccl.so.2")).unwrap();
        std::os::unix::fs::symlink("libnccl.so.2", sys.join("libnccl.so")).unwrap();
        touch(&sys.join("libcublas.so.12"));
        touch(&sys.join("libcublasLt.so.12"));
        touch(&conda.join("libnccl.so.2"));

        let ldconfig = format!(
            "3 libs found in cache `/etc/ld.so.cache'\n\
             \tlibnccl.so.2 (libc6,x86-64) => {s}/libnccl.so.2\n\
             \tlibcublasLt.so.12 (libc6,x86-64) => {s}/libcublasLt.so.12\n\
             \tlibcublas.so.12 (libc6,x86-64) => {s}/libcublas.so.12\n",
            s = sys.display()
        );
        // Only the system copy: the symlink chain is one library.
        assert!(duplicate_copies(&ldconfig, std::slice::from_ref(&sys)).is_empty());

        // A second NCCL on LD_LIBRARY_PATH is named, cuBLAS (one copy) is not.
        let dups = duplicate_copies(&ldconfig, std::slice::from_ref(&conda));
        assert_eq!(dups.len(), 1, "{dups:?}");
        assert_eq!(dups[0].0, "libnccl");
        assert_eq!(dups[0].1.len(), 2);
        assert!(dups[0].1.iter().any(|p| p.starts_with(&conda)));
    }

    #[test]
    fn lt_is_not_mistaken_for_cublas() {
        assert!(is_copy_of("libcublas.so.12", "libcublas"));
        assert!(!is_copy_of("libcublasLt.so.12", "libcublas"));
        assert!(is_copy_of("libcublasLt.so", "libcublasLt"));
        assert!(!is_copy_of("libnccl-net.so", "libnccl"));
    }
}
