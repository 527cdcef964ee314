//! An install artifact (`cargo xtask install`): the unpacker's first pass (`inspect`:
//! every entry checked against the manifest, nothing written) and, when that accepts the
//! archive, the second pass writing it into an empty folder. Input is a tar archive, gzipped
//! here unless it already is one (gzip's CRC would otherwise stop the fuzzer at the first
//! layer). Whatever the archive holds, nothing may land outside the destination folder.
//!
//! The unpacker lives in the xtask binary crate; its two files are compiled in here as they
//! are (`#[path]`), so xtask needs no library target for this.
#![no_main]
use std::io::Write;
use std::path::Path;

use flate2::write::GzEncoder;
use flate2::Compression;
use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../xtask/src/dist/manifest.rs"]
mod manifest;
/// unpack.rs names the manifest module by its place in xtask.
mod dist {
    pub(crate) use super::manifest;
}
#[allow(dead_code)]
#[path = "../../xtask/src/install/unpack.rs"]
mod unpack;

/// Every path under `dir`, symlinks included, resolves inside `root`.
fn all_inside(dir: &Path, root: &Path) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        let meta = std::fs::symlink_metadata(&p).unwrap();
        if meta.file_type().is_symlink() {
            if let Ok(target) = p.canonicalize() {
                assert!(
                    target.starts_with(root),
                    "{} points outside the install folder, at {}",
                    p.display(),
                    target.display()
                );
            }
        } else if meta.is_dir() {
            all_inside(&p, root);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let scratch = rvllm_fuzz::fresh_dir("unpack");
    let tarball = if data.starts_with(&[0x1f, 0x8b]) {
        data.to_vec()
    } else {
        let mut gz = GzEncoder::new(Vec::new(), Compression::fast());
        gz.write_all(data).unwrap();
        gz.finish().unwrap()
    };
    let path = rvllm_fuzz::write(&scratch, "artifact.tar.gz", &tarball);
    let r = unpack::inspect(&path);
    rvllm_fuzz::report("inspect", &r);
    let Ok(manifest) = r else { return };
    let dest = scratch.join("dest");
    std::fs::create_dir(&dest).unwrap();
    let r = unpack::unpack(&path, &dest, &manifest);
    rvllm_fuzz::report("unpack", &r);
    let root = dest.canonicalize().unwrap();
    all_inside(&dest, &root);
    let mut left: Vec<_> = std::fs::read_dir(&scratch)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    left.sort();
    assert_eq!(
        left,
        ["artifact.tar.gz", "dest"],
        "the unpacker wrote next to its destination"
    );
});
