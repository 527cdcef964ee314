//! The GGUF container: header, metadata key/values, tensor infos and the data section.
//!
//! Layout (versions 2 and 3, little-endian): magic `GGUF`, u32 version, u64 tensor count,
//! u64 metadata count, the metadata entries, the tensor infos, padding to
//! `general.alignment` (default 32), then the tensor data. Every read is bounds-checked so a
//! truncated or corrupt file gives an error naming the file and what was being read.
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use memmap2::Mmap;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most four dimensions.
const MAX_DIMS: u32 = 4;

/// One metadata value. Arrays hold values of a single type.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<GgufValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl GgufValue {
    /// Any integer type that fits in a u64 (negative values give None).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v as u64),
            GgufValue::U16(v) => Some(v as u64),
            GgufValue::U32(v) => Some(v as u64),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            GgufValue::I8(v) => Some(v as i64),
            GgufValue::I16(v) => Some(v as i64),
            GgufValue::I32(v) => Some(v as i64),
            GgufValue::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v as f64),
            GgufValue::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(v) => Some(v),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(v) => Some(v),
            _ => None,
        }
    }
}

/// Where one tensor lives and what it holds. `dims` is in ggml order: `dims[0]` is the
/// innermost (contiguous) dimension, so the row-major shape is `dims` reversed.
#[derive(Debug, Clone)]
pub struct GgufTensorInfo {
    pub name: String,
    pub dims: Vec<u64>,
    pub ggml_type: u32,
    /// Offset from the start of the data section.
    pub offset: u64,
}

impl GgufTensorInfo {
    /// Element count; saturates on a corrupt header so size checks fail instead of wrapping.
    pub fn numel(&self) -> u64 {
        self.dims.iter().fold(1u64, |a, &d| a.saturating_mul(d))
    }
    /// Row-major shape (outermost first), as Hugging Face names it.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// A parsed GGUF file with its bytes memory-mapped.
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, GgufValue>,
    pub tensors: Vec<GgufTensorInfo>,
    /// Absolute file offset of the data section.
    pub data_offset: u64,
    mmap: Mmap,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let Some(end) = end else {
            bail!(
                "file ends at byte {} while reading {what} ({n} bytes at offset {}): truncated or corrupt",
                self.buf.len(),
                self.pos
            );
        };
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    fn string(&mut self, what: &str) -> Result<String> {
        let len = self.u64(what)?;
        ensure!(
            len <= self.remaining() as u64,
            "{what}: string length {len} runs past the end of the file: truncated or corrupt"
        );
        let bytes = self.take(len as usize, what)?;
        // Token lists may hold invalid UTF-8 pieces in the wild; keep them readable rather
        // than refusing the whole file.
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }

    fn value(&mut self, ty: u32, what: &str, depth: u32) -> Result<GgufValue> {
        Ok(match ty {
            0 => GgufValue::U8(self.array::<1>(what)?[0]),
            1 => GgufValue::I8(self.array::<1>(what)?[0] as i8),
            2 => GgufValue::U16(u16::from_le_bytes(self.array(what)?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.array(what)?)),
            4 => GgufValue::U32(self.u32(what)?),
            5 => GgufValue::I32(i32::from_le_bytes(self.array(what)?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.array(what)?)),
            7 => GgufValue::Bool(self.array::<1>(what)?[0] != 0),
            8 => GgufValue::String(self.string(what)?),
            9 => {
                ensure!(
                    depth < 4,
                    "{what}: arrays nested too deeply (corrupt header)"
                );
                let elem_ty = self.u32(what)?;
                let len = self.u64(what)?;
                // Every element takes at least one byte: a length beyond the file is corrupt,
                // and checking it first stops a huge allocation.
                ensure!(
                    len <= self.remaining() as u64,
                    "{what}: array length {len} runs past the end of the file: truncated or corrupt"
                );
                // Capacity is capped: a corrupt length must fail on reading, not on allocating.
                let mut items = Vec::with_capacity((len as usize).min(1 << 16));
                for _ in 0..len {
                    items.push(self.value(elem_ty, what, depth + 1)?);
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::U64(self.u64(what)?),
            11 => GgufValue::I64(i64::from_le_bytes(self.array(what)?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.array(what)?)),
            other => bail!("{what}: unknown metadata value type {other} (corrupt header?)"),
        })
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path)
            .with_context(|| format!("cannot open GGUF file {}", path.display()))?;
        // SAFETY: the mapping is read-only and we never hand out references that outlive
        // `self`; a file changed underneath us while loading is outside what we can guard.
        let mmap = unsafe { Mmap::map(&file) }
            .with_context(|| format!("cannot memory-map GGUF file {}", path.display()))?;
        Self::parse(path, mmap).with_context(|| format!("invalid GGUF file {}", path.display()))
    }

    fn parse(path: &Path, mmap: Mmap) -> Result<Self> {
        let mut c = Cursor {
            buf: &mmap[..],
            pos: 0,
        };
        let magic = c.array::<4>("the magic number")?;
        ensure!(
            &magic == MAGIC,
            "bad magic number {:?} (expected \"GGUF\"): not a GGUF file",
            String::from_utf8_lossy(&magic)
        );
        let version = c.u32("the version")?;
        ensure!(
            version == 2 || version == 3,
            "GGUF version {version} is not supported (only versions 2 and 3)"
        );
        let n_tensors = c.u64("the tensor count")?;
        let n_kv = c.u64("the metadata count")?;
        ensure!(
            n_tensors <= c.remaining() as u64 && n_kv <= c.remaining() as u64,
            "header claims {n_tensors} tensors and {n_kv} metadata entries, more than the file can hold"
        );
        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            let key = c.string(&format!("metadata key #{i}"))?;
            let ty = c.u32(&format!("the type of metadata `{key}`"))?;
            let value = c.value(ty, &format!("metadata `{key}`"), 0)?;
            metadata.insert(key, value);
        }
        let mut tensors = Vec::with_capacity((n_tensors as usize).min(1 << 16));
        for i in 0..n_tensors {
            let name = c.string(&format!("tensor info #{i}"))?;
            let what = format!("tensor info of `{name}`");
            let n_dims = c.u32(&what)?;
            ensure!(
                (1..=MAX_DIMS).contains(&n_dims),
                "tensor `{name}` has {n_dims} dimensions (ggml allows 1 to {MAX_DIMS})"
            );
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(c.u64(&what)?);
            }
            let ggml_type = c.u32(&what)?;
            let offset = c.u64(&what)?;
            tensors.push(GgufTensorInfo {
                name,
                dims,
                ggml_type,
                offset,
            });
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => v
                .as_u64()
                .filter(|a| *a > 0 && a.is_power_of_two())
                .ok_or_else(|| anyhow::anyhow!("general.alignment is {v:?}, not a power of two"))?,
        };
        let data_offset = (c.pos as u64).div_ceil(alignment) * alignment;
        ensure!(
            data_offset <= mmap.len() as u64,
            "the data section would start at byte {data_offset} but the file has only {} bytes: truncated",
            mmap.len()
        );
        Ok(Self {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            data_offset,
            mmap,
        })
    }

    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(|v| v.as_str())
    }

    pub fn tensor_info(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The raw bytes of a tensor, `nbytes` long; an error if they lie outside the file.
    pub fn tensor_bytes(&self, info: &GgufTensorInfo, nbytes: u64) -> Result<&[u8]> {
        let start = self.data_offset.checked_add(info.offset);
        let end = start.and_then(|s| s.checked_add(nbytes));
        match (start, end) {
            (Some(s), Some(e)) if e <= self.mmap.len() as u64 => Ok(&self.mmap[s as usize..e as usize]),
            _ => bail!(
                "tensor `{}` in {} needs bytes {}..{}+{nbytes} but the file has only {} bytes: truncated or corrupt",
                info.name,
                self.path.display(),
                self.data_offset,
                info.offset,
                self.mmap.len()
            ),
        }
    }
}

#[cfg(test)]
pub(crate) mod test_writer {
    //! A minimal GGUF writer for tests: builds files the reader must accept or reject.
    use super::GgufValue;

    pub struct TestTensor {
        pub name: String,
        pub dims: Vec<u64>,
        pub ggml_type: u32,
        pub data: Vec<u8>,
    }

    fn put_str(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }

    fn type_id(v: &GgufValue) -> u32 {
        match v {
            GgufValue::U8(_) => 0,
            GgufValue::I8(_) => 1,
            GgufValue::U16(_) => 2,
            GgufValue::I16(_) => 3,
            GgufValue::U32(_) => 4,
            GgufValue::I32(_) => 5,
            GgufValue::F32(_) => 6,
            GgufValue::Bool(_) => 7,
            GgufValue::String(_) => 8,
            GgufValue::Array(_) => 9,
            GgufValue::U64(_) => 10,
            GgufValue::I64(_) => 11,
            GgufValue::F64(_) => 12,
        }
    }

    fn put_value(out: &mut Vec<u8>, v: &GgufValue) {
        match v {
            GgufValue::U8(x) => out.push(*x),
            GgufValue::I8(x) => out.push(*x as u8),
            GgufValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
            GgufValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
            GgufValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
            GgufValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
            GgufValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
            GgufValue::Bool(x) => out.push(*x as u8),
            GgufValue::String(s) => put_str(out, s),
            GgufValue::Array(items) => {
                let elem = items.first().map(type_id).unwrap_or(4);
                out.extend_from_slice(&elem.to_le_bytes());
                out.extend_from_slice(&(items.len() as u64).to_le_bytes());
                for it in items {
                    put_value(out, it);
                }
            }
            GgufValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
            GgufValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
            GgufValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        }
    }

    /// Serialize a GGUF v3 file with alignment 32.
    pub fn write(metadata: &[(&str, GgufValue)], tensors: &[TestTensor]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(b"GGUF");
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
        for (k, v) in metadata {
            put_str(&mut out, k);
            out.extend_from_slice(&type_id(v).to_le_bytes());
            put_value(&mut out, v);
        }
        let mut offset = 0u64;
        let mut offsets = Vec::new();
        for t in tensors {
            put_str(&mut out, &t.name);
            out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&t.ggml_type.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            offsets.push(offset);
            offset = (offset + t.data.len() as u64).div_ceil(32) * 32;
        }
        while out.len() % 32 != 0 {
            out.push(0);
        }
        let base = out.len();
        for (t, off) in tensors.iter().zip(offsets) {
            out.resize(base + off as usize, 0);
            out.extend_from_slice(&t.data);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::test_writer::{write, TestTensor};
    use super::*;

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn reads_metadata_of_every_type_and_tensor_infos() {
        let meta = vec![
            ("a.u8", GgufValue::U8(7)),
            ("a.i8", GgufValue::I8(-7)),
            ("a.u16", GgufValue::U16(700)),
            ("a.i16", GgufValue::I16(-700)),
            ("a.u32", GgufValue::U32(70000)),
            ("a.i32", GgufValue::I32(-70000)),
            ("a.f32", GgufValue::F32(1.5)),
            ("a.bool", GgufValue::Bool(true)),
            ("a.str", GgufValue::String("héllo".into())),
            (
                "a.arr",
                GgufValue::Array(vec![
                    GgufValue::String("x".into()),
                    GgufValue::String("y".into()),
                ]),
            ),
            (
                "a.nested",
                GgufValue::Array(vec![GgufValue::Array(vec![GgufValue::I32(1)])]),
            ),
            ("a.u64", GgufValue::U64(1 << 40)),
            ("a.i64", GgufValue::I64(-(1 << 40))),
            ("a.f64", GgufValue::F64(0.25)),
        ];
        let tensors = vec![
            TestTensor {
                name: "t1".into(),
                dims: vec![3, 2],
                ggml_type: 0,
                data: f32_bytes(&[1., 2., 3., 4., 5., 6.]),
            },
            TestTensor {
                name: "t2".into(),
                dims: vec![5],
                ggml_type: 0,
                data: f32_bytes(&[9.; 5]),
            },
        ];
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.gguf");
        std::fs::write(&p, write(&meta, &tensors)).unwrap();
        let g = GgufFile::open(&p).unwrap();
        assert_eq!(g.version, 3);
        for (k, v) in &meta {
            assert_eq!(g.get(k), Some(v), "{k}");
        }
        let t1 = g.tensor_info("t1").unwrap();
        assert_eq!(t1.shape(), vec![2, 3]);
        let b = g.tensor_bytes(t1, 24).unwrap();
        assert_eq!(&b[..4], &1f32.to_le_bytes());
        let t2 = g.tensor_info("t2").unwrap();
        assert_eq!(t2.offset % 32, 0);
        assert_eq!(&g.tensor_bytes(t2, 20).unwrap()[16..], &9f32.to_le_bytes());
        // Asking for more bytes than exist is an error naming the tensor, not a panic.
        let e = g.tensor_bytes(t2, 1 << 20).unwrap_err().to_string();
        assert!(e.contains("t2") && e.contains("m.gguf"), "{e}");
    }

    #[test]
    fn bad_magic_and_truncation_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.gguf");
        std::fs::write(&p, b"GGML\x03\0\0\0").unwrap();
        let e = format!("{:#}", GgufFile::open(&p).unwrap_err());
        assert!(e.contains("bad.gguf") && e.contains("magic"), "{e}");

        let bytes = write(&[("general.name", GgufValue::String("x".repeat(100)))], &[]);
        for cut in [3, 10, 30, 60, bytes.len() - 1] {
            std::fs::write(&p, &bytes[..cut]).unwrap();
            let e = format!("{:#}", GgufFile::open(&p).unwrap_err());
            assert!(e.contains("bad.gguf"), "{e}");
        }
        // A string length far beyond the file is caught before allocating.
        let mut huge = bytes.clone();
        let key_len_at = 24;
        huge[key_len_at..key_len_at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        std::fs::write(&p, &huge).unwrap();
        let e = format!("{:#}", GgufFile::open(&p).unwrap_err());
        assert!(e.contains("past the end"), "{e}");
    }
}
