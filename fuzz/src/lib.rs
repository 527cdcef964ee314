//! What the fuzz targets share: the fixture paths, a scratch folder for the readers that
//! take a path, and a switch that prints why an input was refused (to check that the seeds
//! reach the deep parts of a reader: `RVLLM_FUZZ_VERBOSE=1 cargo fuzz run T corpus/T -- -runs=0`).
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// `tests/fixtures/<rel>` of this checkout.
pub fn repo_fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(rel)
}

/// The SentencePiece-style tokenizer embedded in the tiny GGUF fixture (with its chat
/// template): the second tokenizer kind the detokenizer and chat targets run against.
pub fn spm_fixture_tokenizer() -> rvllm::tokenizer::Tokenizer {
    let g = rvllm::models::gguf::GgufFile::open(&repo_fixture("gguf/tiny_llama_spm.gguf"))
        .expect("the fixture GGUF opens");
    rvllm::tokenizer::gguf::from_gguf(&g)
        .expect("the fixture GGUF tokenizer loads")
        .expect("the fixture GGUF has a tokenizer")
}

/// `fuzz/fixtures/<rel>` (written by make_seeds.py).
pub fn fuzz_fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(rel)
}

/// This process's scratch folder: in /dev/shm where there is one, because the GGUF and
/// safetensors readers memory-map a file for every input. Removed at exit.
pub fn scratch_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = Path::new("/dev/shm");
        let base = if base.is_dir() {
            base.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("rvllm-fuzz-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("cannot create the fuzz scratch folder");
        extern "C" fn cleanup() {
            if let Some(d) = DIR.get() {
                let _ = std::fs::remove_dir_all(d);
            }
        }
        // SAFETY: registers a plain extern "C" fn with no captured state.
        unsafe { libc::atexit(cleanup) };
        dir
    })
}

/// A fresh empty folder `name` inside the scratch folder.
pub fn fresh_dir(name: &str) -> PathBuf {
    let d = scratch_dir().join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("cannot create a fuzz scratch folder");
    d
}

/// Write `data` to `dir/name`.
pub fn write(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, data).expect("cannot write a fuzz input file");
    p
}

/// With RVLLM_FUZZ_VERBOSE set, print why an input was refused.
pub fn report<T>(what: &str, r: &anyhow::Result<T>) {
    static ON: OnceLock<bool> = OnceLock::new();
    if *ON.get_or_init(|| std::env::var_os("RVLLM_FUZZ_VERBOSE").is_some()) {
        match r {
            Ok(_) => eprintln!("{what}: ok"),
            Err(e) => eprintln!("{what}: {e:#}"),
        }
    }
}
