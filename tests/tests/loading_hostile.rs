//! Hostile and impossible model files through the real `rvllm generate` binary: values no model
//! can have must be refused at load with the field (as the file spells it) and the value named,
//! and metadata rvllm never reads must not cost memory.
//!
//! The GGUF cases rewrite the metadata of the tiny llama fixture on the fly (tensor infos and
//! data are copied as they are), the config.json cases edit a copy of a tiny HF folder.
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use rvllm_tests::{fixtures, rvllm_bin_for_test_device, test_device, tiny_model};
use serde_json::Value;

// ---- a minimal GGUF metadata rewriter -------------------------------------------------------

const T_U8: u32 = 0;
const T_U32: u32 = 4;
const T_F32: u32 = 6;
const T_STRING: u32 = 8;
const T_ARRAY: u32 = 9;

/// One metadata entry: key, value type and the value's encoded bytes.
#[derive(Clone)]
struct Kv {
    key: String,
    ty: u32,
    raw: Vec<u8>,
}

/// A GGUF file split into what the tests rewrite (metadata) and what they copy.
struct Gguf {
    version: u32,
    kvs: Vec<Kv>,
    n_tensors: u64,
    tensor_infos: Vec<u8>,
    alignment: usize,
    data: Vec<u8>,
}

struct Rd<'a> {
    b: &'a [u8],
    pos: usize,
}

impl Rd<'_> {
    fn take(&mut self, n: usize) -> &[u8] {
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        s
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take(4).try_into().unwrap())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take(8).try_into().unwrap())
    }
    fn string(&mut self) -> String {
        let n = self.u64() as usize;
        String::from_utf8(self.take(n).to_vec()).unwrap()
    }
    fn skip_value(&mut self, ty: u32) {
        match ty {
            0 | 1 | 7 => self.pos += 1,
            2 | 3 => self.pos += 2,
            4..=6 => self.pos += 4,
            10..=12 => self.pos += 8,
            T_STRING => {
                let n = self.u64() as usize;
                self.pos += n;
            }
            T_ARRAY => {
                let elem = self.u32();
                for _ in 0..self.u64() {
                    self.skip_value(elem);
                }
            }
            other => panic!("fixture has unknown GGUF type {other}"),
        }
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

impl Gguf {
    fn read(path: &Path) -> Gguf {
        let bytes = std::fs::read(path).unwrap();
        let mut r = Rd { b: &bytes, pos: 0 };
        assert_eq!(r.take(4), b"GGUF");
        let version = r.u32();
        let n_tensors = r.u64();
        let n_kv = r.u64();
        let mut kvs = Vec::new();
        for _ in 0..n_kv {
            let key = r.string();
            let ty = r.u32();
            let start = r.pos;
            r.skip_value(ty);
            kvs.push(Kv {
                key,
                ty,
                raw: bytes[start..r.pos].to_vec(),
            });
        }
        let infos_start = r.pos;
        for _ in 0..n_tensors {
            r.string();
            let dims = r.u32();
            r.pos += 8 * dims as usize + 4 + 8;
        }
        let tensor_infos = bytes[infos_start..r.pos].to_vec();
        let alignment = kvs
            .iter()
            .find(|kv| kv.key == "general.alignment")
            .map(|kv| u32::from_le_bytes(kv.raw[..4].try_into().unwrap()) as usize)
            .unwrap_or(32);
        let data_start = r.pos.div_ceil(alignment) * alignment;
        Gguf {
            version,
            kvs,
            n_tensors,
            tensor_infos,
            alignment,
            data: bytes[data_start..].to_vec(),
        }
    }

    /// Replace the entry under `key` (or add it).
    fn set(&mut self, key: &str, ty: u32, raw: Vec<u8>) -> &mut Self {
        let kv = Kv {
            key: key.into(),
            ty,
            raw,
        };
        match self.kvs.iter_mut().find(|k| k.key == key) {
            Some(k) => *k = kv,
            None => self.kvs.push(kv),
        }
        self
    }

    fn set_f32(&mut self, key: &str, v: f32) -> &mut Self {
        self.set(key, T_F32, v.to_le_bytes().to_vec())
    }

    fn set_str(&mut self, key: &str, v: &str) -> &mut Self {
        let mut raw = Vec::new();
        put_str(&mut raw, v);
        self.set(key, T_STRING, raw)
    }

    fn write(&self, path: &Path) {
        let mut out = Vec::new();
        out.extend_from_slice(b"GGUF");
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&self.n_tensors.to_le_bytes());
        out.extend_from_slice(&(self.kvs.len() as u64).to_le_bytes());
        for kv in &self.kvs {
            put_str(&mut out, &kv.key);
            out.extend_from_slice(&kv.ty.to_le_bytes());
            out.extend_from_slice(&kv.raw);
        }
        out.extend_from_slice(&self.tensor_infos);
        out.resize(out.len().div_ceil(self.alignment) * self.alignment, 0);
        out.extend_from_slice(&self.data);
        std::fs::write(path, out).unwrap();
    }
}

/// The tiny llama GGUF (SentencePiece tokenizer, arch `llama`).
fn tiny_gguf() -> Gguf {
    Gguf::read(&fixtures().join("gguf/tiny_llama_spm.gguf"))
}

// ---- running the binary ----------------------------------------------------------------------

struct Run {
    code: Option<i32>,
    stderr: String,
    /// Peak resident set of the child, in bytes.
    peak_rss: u64,
}

/// `rvllm generate --model MODEL` for two greedy tokens, waited for with wait4 so that the
/// child's own peak RSS is known (other tests' children do not mix in, as they would with
/// RUSAGE_CHILDREN).
fn generate(model: &Path) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let err_path = dir.path().join("stderr");
    let child = Command::new(rvllm_bin_for_test_device())
        .args(["generate", "--model", model.to_str().unwrap()])
        .args(["--device", &test_device(), "--prompt", "the cat"])
        .args(["--max-tokens", "2", "--temperature", "0"])
        .env("RUST_BACKTRACE", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .expect("running the rvllm binary");
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: plain syscall on our own child, with valid out-pointers.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let got = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(got, pid, "wait4: {}", std::io::Error::last_os_error());
    // The child is reaped: dropping `child` does not wait again.
    drop(child);
    let code = libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status));
    Run {
        code,
        stderr: std::fs::read_to_string(&err_path).unwrap(),
        // Linux reports ru_maxrss in KiB.
        peak_rss: usage.ru_maxrss as u64 * 1024,
    }
}

fn ok(run: &Run, what: &str) {
    assert_eq!(run.code, Some(0), "{what}: stderr:\n{}", run.stderr);
}

/// Exit 1 (an error, not a panic's 101) with stderr naming every needle.
fn refused(run: &Run, what: &str, needles: &[&str]) {
    assert_eq!(
        run.code,
        Some(1),
        "{what}: expected the load to be refused with exit 1; stderr:\n{}",
        run.stderr
    );
    assert!(
        !run.stderr.contains("panicked"),
        "{what}: panicked:\n{}",
        run.stderr
    );
    for n in needles {
        assert!(
            run.stderr.contains(n),
            "{what}: stderr does not say `{n}`:\n{}",
            run.stderr
        );
    }
}

// ---- GGUF ------------------------------------------------------------------------------------

#[test]
fn gguf_impossible_floats_are_refused_naming_the_key_and_value() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    // The unmodified file loads: every refusal below is the edited value's doing.
    tiny_gguf().write(&path);
    ok(&generate(&path), "the unmodified tiny GGUF");

    let theta = "llama.rope.freq_base";
    let eps = "llama.attention.layer_norm_rms_epsilon";
    let cases: &[(&str, f32, &str)] = &[
        (theta, f32::NAN, "NaN"),
        (theta, 0.0, "0"),
        (theta, -1.0, "-1"),
        (theta, f32::INFINITY, "inf"),
        (eps, f32::NAN, "NaN"),
        (eps, -1.0, "-1"),
    ];
    for &(key, value, shown) in cases {
        let mut g = tiny_gguf();
        g.set_f32(key, value).write(&path);
        let what = format!("{key} = {shown}");
        refused(
            &generate(&path),
            &what,
            &[&format!("`{key}` = {shown} "), "m.gguf"],
        );
    }

    let mut g = tiny_gguf();
    g.set_str("llama.rope.scaling.type", "linear")
        .set_f32("llama.rope.scaling.factor", 0.0)
        .write(&path);
    refused(
        &generate(&path),
        "linear scaling factor 0",
        &["`llama.rope.scaling.factor` = 0 "],
    );
}

#[test]
fn gguf_u32_architecture_is_named_as_the_wrong_type() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    let mut g = tiny_gguf();
    g.set("general.architecture", T_U32, 7u32.to_le_bytes().to_vec())
        .write(&path);
    let run = generate(&path);
    refused(&run, "u32 architecture", &["general.architecture", "u32"]);
    assert!(
        !run.stderr.contains("missing"),
        "the key is present, with the wrong type:\n{}",
        run.stderr
    );
}

/// 60 MB of u8 under a key nothing reads: the model loads and its peak RSS stays within a
/// small margin of the same model without the array (the old reader held 32 bytes per
/// element, 1.9 GB).
#[test]
fn gguf_unread_u8_array_costs_no_memory() {
    let dir = tempfile::tempdir().unwrap();
    let (plain, blob) = (dir.path().join("plain.gguf"), dir.path().join("blob.gguf"));
    tiny_gguf().write(&plain);
    let n: u64 = 60_000_000;
    let mut raw = Vec::with_capacity(12 + n as usize);
    raw.extend_from_slice(&T_U8.to_le_bytes());
    raw.extend_from_slice(&n.to_le_bytes());
    raw.resize(12 + n as usize, 0x5a);
    let mut g = tiny_gguf();
    g.set("hostile.unread_blob", T_ARRAY, raw).write(&blob);
    drop(g);

    let base = generate(&plain);
    ok(&base, "the tiny GGUF");
    let big = generate(&blob);
    ok(&big, "the tiny GGUF with a 60 MB unread array");
    let growth = big.peak_rss.saturating_sub(base.peak_rss);
    eprintln!(
        "peak RSS: {} MB without the array, {} MB with it (growth {} MB)",
        base.peak_rss >> 20,
        big.peak_rss >> 20,
        growth >> 20
    );
    assert!(
        growth < 100 << 20,
        "a 60 MB unread array raised peak RSS by {} MB ({} -> {} MB)",
        growth >> 20,
        base.peak_rss >> 20,
        big.peak_rss >> 20
    );
}

// ---- config.json -----------------------------------------------------------------------------

/// A copy of the tiny llama3 folder (llama3 rope scaling) with config.json edited.
fn edited_llama3(edit: impl FnOnce(&mut Value)) -> (tempfile::TempDir, PathBuf) {
    let src = tiny_model("llama3");
    let dir = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, dir.path().join(p.file_name().unwrap())).unwrap();
    }
    let cfg_path = dir.path().join("config.json");
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(&cfg_path, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    let path = dir.path().to_path_buf();
    (dir, path)
}

#[test]
fn config_json_impossible_values_are_refused_naming_the_field_and_value() {
    let (_d, path) = edited_llama3(|_| {});
    ok(&generate(&path), "the unmodified tiny llama3 folder");

    type Edit = Box<dyn Fn(&mut Value)>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "rope_theta 0",
            Box::new(|c| c["rope_theta"] = 0.0.into()),
            "`rope_theta` = 0 ",
        ),
        (
            "rope_theta -1",
            Box::new(|c| c["rope_theta"] = (-1.0).into()),
            "`rope_theta` = -1 ",
        ),
        (
            "rms_norm_eps -1",
            Box::new(|c| c["rms_norm_eps"] = (-1.0).into()),
            "`rms_norm_eps` = -1 ",
        ),
        (
            "llama3 factor 0",
            Box::new(|c| c["rope_scaling"]["factor"] = 0.0.into()),
            "`rope_scaling.factor` = 0 ",
        ),
        (
            // Without head_dim the head size is hidden_size / num_attention_heads, which
            // must come out whole.
            "hidden_size not divisible by the heads",
            Box::new(|c| {
                c.as_object_mut().unwrap().remove("head_dim");
                c["num_attention_heads"] = 3.into();
                c["num_key_value_heads"] = 3.into();
            }),
            "`hidden_size` = 64 ",
        ),
    ];
    for (what, edit, needle) in cases {
        let (_d, path) = edited_llama3(edit);
        refused(&generate(&path), what, &[needle, "config.json"]);
    }
}
