//! The GGUF container: header, metadata key/values, tensor infos and the data section. Read by
//! the model loader (`models::gguf`) and the tokenizer (`tokenizer::gguf`), so it imports
//! neither.
//!
//! Layout (versions 2 and 3, little-endian): magic `GGUF`, u32 version, u64 tensor count,
//! u64 metadata count, the metadata entries, the tensor infos, padding to
//! `general.alignment` (default 32), then the tensor data. Every read is bounds-checked so a
//! truncated or corrupt file gives an error naming the file and what was being read.
//!
//! Memory stays proportional to what rvllm uses, whatever the header claims: metadata arrays
//! are held as typed vectors (one byte per u8 element), arrays under keys rvllm never reads
//! are skipped (only their element type and length are kept), and every count is checked
//! against the bytes left in the file before anything is allocated for it.
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use memmap2::Mmap;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most four dimensions.
const MAX_DIMS: u32 = 4;
/// Real files carry a few dozen metadata keys (the vocabulary is one array); this bounds the
/// map a hostile header can make us build.
pub const MAX_METADATA_ENTRIES: u64 = 1 << 16;
/// Far above any real model (4096 layers of ~15 tensors), and a bound on the tensor table.
pub const MAX_TENSORS: u64 = 1 << 18;
/// Arrays inside arrays are never read; walking them to skip is bounded in depth.
const MAX_ARRAY_DEPTH: u32 = 4;

/// The metadata arrays rvllm reads (the tokenizer's). Arrays under any other key are skipped
/// at open: a large array under a key nobody reads costs neither memory nor a copy.
pub const READ_ARRAY_KEYS: &[&str] = &[
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.scores",
    "tokenizer.ggml.merges",
];

/// A metadata value type, as GGUF numbers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufType {
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    F32,
    Bool,
    String,
    Array,
    U64,
    I64,
    F64,
}

impl GgufType {
    fn from_id(id: u32) -> Option<Self> {
        use GgufType::*;
        Some(match id {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }

    /// The GGUF type id.
    pub fn id(self) -> u32 {
        self as u32
    }

    /// The name GGUF tools (gguf-py, llama.cpp) print for this type.
    pub fn name(self) -> &'static str {
        use GgufType::*;
        match self {
            U8 => "u8",
            I8 => "i8",
            U16 => "u16",
            I16 => "i16",
            U32 => "u32",
            I32 => "i32",
            F32 => "f32",
            Bool => "bool",
            String => "string",
            Array => "array",
            U64 => "u64",
            I64 => "i64",
            F64 => "f64",
        }
    }

    /// Bytes per value in the file for fixed-size types.
    fn fixed_size(self) -> Option<usize> {
        use GgufType::*;
        match self {
            U8 | I8 | Bool => Some(1),
            U16 | I16 => Some(2),
            U32 | I32 | F32 => Some(4),
            U64 | I64 | F64 => Some(8),
            String | Array => None,
        }
    }

    /// The fewest bytes one value takes in the file (a string or array header for those).
    fn min_size(self) -> usize {
        match self {
            GgufType::String => 8,
            GgufType::Array => 12,
            t => t.fixed_size().unwrap_or(1),
        }
    }
}

impl std::fmt::Display for GgufType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A string array in one buffer: the strings back to back and where each ends. In memory it
/// takes what it takes in the file (eight bytes of length per string, then the text), where a
/// `Vec<String>` would take 24 bytes plus an allocation per string.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GgufStrings {
    text: String,
    ends: Vec<usize>,
}

impl GgufStrings {
    pub fn len(&self) -> usize {
        self.ends.len()
    }
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }
    pub fn get(&self, i: usize) -> Option<&str> {
        let end = *self.ends.get(i)?;
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        Some(&self.text[start..end])
    }
    pub fn iter(&self) -> impl Iterator<Item = &str> + '_ {
        (0..self.len()).filter_map(|i| self.get(i))
    }
    pub fn push(&mut self, s: &str) {
        self.text.push_str(s);
        self.ends.push(self.text.len());
    }
}

impl<S: AsRef<str>> FromIterator<S> for GgufStrings {
    fn from_iter<I: IntoIterator<Item = S>>(iter: I) -> Self {
        let mut out = GgufStrings::default();
        for s in iter {
            out.push(s.as_ref());
        }
        out
    }
}

/// A metadata array: its elements as one typed vector.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufArray {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    F32(Vec<f32>),
    Bool(Vec<bool>),
    Str(GgufStrings),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F64(Vec<f64>),
    /// An array under a key rvllm does not read, or an array of arrays (which nothing reads):
    /// its elements were stepped over, not stored.
    Skipped {
        elem: GgufType,
        len: u64,
    },
}

impl GgufArray {
    pub fn elem_type(&self) -> GgufType {
        match self {
            GgufArray::U8(_) => GgufType::U8,
            GgufArray::I8(_) => GgufType::I8,
            GgufArray::U16(_) => GgufType::U16,
            GgufArray::I16(_) => GgufType::I16,
            GgufArray::U32(_) => GgufType::U32,
            GgufArray::I32(_) => GgufType::I32,
            GgufArray::F32(_) => GgufType::F32,
            GgufArray::Bool(_) => GgufType::Bool,
            GgufArray::Str(_) => GgufType::String,
            GgufArray::U64(_) => GgufType::U64,
            GgufArray::I64(_) => GgufType::I64,
            GgufArray::F64(_) => GgufType::F64,
            GgufArray::Skipped { elem, .. } => *elem,
        }
    }

    /// The element count the file gives (also for a skipped array).
    pub fn len(&self) -> u64 {
        match self {
            GgufArray::U8(v) => v.len() as u64,
            GgufArray::I8(v) => v.len() as u64,
            GgufArray::U16(v) => v.len() as u64,
            GgufArray::I16(v) => v.len() as u64,
            GgufArray::U32(v) => v.len() as u64,
            GgufArray::I32(v) => v.len() as u64,
            GgufArray::F32(v) => v.len() as u64,
            GgufArray::Bool(v) => v.len() as u64,
            GgufArray::Str(v) => v.len() as u64,
            GgufArray::U64(v) => v.len() as u64,
            GgufArray::I64(v) => v.len() as u64,
            GgufArray::F64(v) => v.len() as u64,
            GgufArray::Skipped { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn is_skipped(&self) -> bool {
        matches!(self, GgufArray::Skipped { .. })
    }

    /// The strings of a string array.
    pub fn strings(&self) -> Option<&GgufStrings> {
        match self {
            GgufArray::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The elements of an integer array as i64 (u64 values above i64::MAX give None).
    pub fn to_i64s(&self) -> Option<Vec<i64>> {
        fn all<T: Copy>(v: &[T], f: impl Fn(T) -> Option<i64>) -> Option<Vec<i64>> {
            v.iter().map(|&x| f(x)).collect()
        }
        match self {
            GgufArray::U8(v) => all(v, |x| Some(x.into())),
            GgufArray::I8(v) => all(v, |x| Some(x.into())),
            GgufArray::U16(v) => all(v, |x| Some(x.into())),
            GgufArray::I16(v) => all(v, |x| Some(x.into())),
            GgufArray::U32(v) => all(v, |x| Some(x.into())),
            GgufArray::I32(v) => all(v, |x| Some(x.into())),
            GgufArray::U64(v) => all(v, |x| i64::try_from(x).ok()),
            GgufArray::I64(v) => Some(v.clone()),
            _ => None,
        }
    }

    /// The elements of a numeric array as f64.
    pub fn to_f64s(&self) -> Option<Vec<f64>> {
        match self {
            GgufArray::F32(v) => Some(v.iter().map(|&x| x.into()).collect()),
            GgufArray::F64(v) => Some(v.clone()),
            other => other
                .to_i64s()
                .map(|v| v.into_iter().map(|x| x as f64).collect()),
        }
    }
}

/// One metadata value.
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
    Array(GgufArray),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl GgufValue {
    pub fn value_type(&self) -> GgufType {
        match self {
            GgufValue::U8(_) => GgufType::U8,
            GgufValue::I8(_) => GgufType::I8,
            GgufValue::U16(_) => GgufType::U16,
            GgufValue::I16(_) => GgufType::I16,
            GgufValue::U32(_) => GgufType::U32,
            GgufValue::I32(_) => GgufType::I32,
            GgufValue::F32(_) => GgufType::F32,
            GgufValue::Bool(_) => GgufType::Bool,
            GgufValue::String(_) => GgufType::String,
            GgufValue::Array(_) => GgufType::Array,
            GgufValue::U64(_) => GgufType::U64,
            GgufValue::I64(_) => GgufType::I64,
            GgufValue::F64(_) => GgufType::F64,
        }
    }

    /// The type as a message names it: `u32`, `array of string`.
    pub fn type_description(&self) -> String {
        match self {
            GgufValue::Array(a) => format!("array of {}", a.elem_type()),
            v => v.value_type().name().to_string(),
        }
    }

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
    pub fn as_array(&self) -> Option<&GgufArray> {
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
    /// Indices into `tensors`, sorted by name: lookups stay logarithmic on a huge table.
    by_name: Vec<usize>,
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
    fn value_type(&mut self, what: &str) -> Result<GgufType> {
        let id = self.u32(what)?;
        GgufType::from_id(id)
            .with_context(|| format!("{what}: unknown metadata value type {id} (corrupt header?)"))
    }
    fn string_bytes(&mut self, what: &str) -> Result<&'a [u8]> {
        let len = self.u64(what)?;
        ensure!(
            len <= self.remaining() as u64,
            "{what}: string length {len} runs past the end of the file: truncated or corrupt"
        );
        self.take(len as usize, what)
    }
    fn string(&mut self, what: &str) -> Result<String> {
        // Token lists may hold invalid UTF-8 pieces in the wild; keep them readable rather
        // than refusing the whole file.
        Ok(String::from_utf8_lossy(self.string_bytes(what)?).into_owned())
    }

    fn value(&mut self, ty: GgufType, what: &str, keep_arrays: bool) -> Result<GgufValue> {
        Ok(match ty {
            GgufType::U8 => GgufValue::U8(self.array::<1>(what)?[0]),
            GgufType::I8 => GgufValue::I8(self.array::<1>(what)?[0] as i8),
            GgufType::U16 => GgufValue::U16(u16::from_le_bytes(self.array(what)?)),
            GgufType::I16 => GgufValue::I16(i16::from_le_bytes(self.array(what)?)),
            GgufType::U32 => GgufValue::U32(self.u32(what)?),
            GgufType::I32 => GgufValue::I32(i32::from_le_bytes(self.array(what)?)),
            GgufType::F32 => GgufValue::F32(f32::from_le_bytes(self.array(what)?)),
            GgufType::Bool => GgufValue::Bool(self.array::<1>(what)?[0] != 0),
            GgufType::String => GgufValue::String(self.string(what)?),
            GgufType::Array => GgufValue::Array(self.array_value(what, keep_arrays)?),
            GgufType::U64 => GgufValue::U64(self.u64(what)?),
            GgufType::I64 => GgufValue::I64(i64::from_le_bytes(self.array(what)?)),
            GgufType::F64 => GgufValue::F64(f64::from_le_bytes(self.array(what)?)),
        })
    }

    /// The header of an array (element type, length), checked against the bytes left: each
    /// element takes at least `min_size` bytes, so a length the file cannot hold is refused
    /// before anything is allocated or walked.
    fn array_header(&mut self, what: &str) -> Result<(GgufType, u64)> {
        let elem = self.value_type(what)?;
        let len = self.u64(what)?;
        let need = len.checked_mul(elem.min_size() as u64);
        ensure!(
            need.is_some_and(|n| n <= self.remaining() as u64),
            "{what}: array of {len} {elem} values runs past the end of the file: truncated or corrupt"
        );
        Ok((elem, len))
    }

    fn array_value(&mut self, what: &str, keep: bool) -> Result<GgufArray> {
        let (elem, len) = self.array_header(what)?;
        if !keep || elem == GgufType::Array {
            self.skip_elements(elem, len, what, 1)?;
            return Ok(GgufArray::Skipped { elem, len });
        }
        // `array_header` bounded len * element size by the bytes left, so these allocations
        // are no larger than the file.
        let n = len as usize;
        if elem == GgufType::String {
            let mut out = GgufStrings {
                text: String::new(),
                ends: Vec::with_capacity(n),
            };
            for _ in 0..n {
                let bytes = self.string_bytes(what)?;
                out.push(&String::from_utf8_lossy(bytes));
            }
            return Ok(GgufArray::Str(out));
        }
        let size = elem.fixed_size().expect("strings and arrays handled above");
        let bytes = self.take(n * size, what)?;
        fn le<const N: usize, T>(b: &[u8], f: fn([u8; N]) -> T) -> Vec<T> {
            b.chunks_exact(N)
                .map(|c| f(c.try_into().expect("chunks of N")))
                .collect()
        }
        Ok(match elem {
            GgufType::U8 => GgufArray::U8(bytes.to_vec()),
            GgufType::I8 => GgufArray::I8(bytes.iter().map(|&b| b as i8).collect()),
            GgufType::Bool => GgufArray::Bool(bytes.iter().map(|&b| b != 0).collect()),
            GgufType::U16 => GgufArray::U16(le(bytes, u16::from_le_bytes)),
            GgufType::I16 => GgufArray::I16(le(bytes, i16::from_le_bytes)),
            GgufType::U32 => GgufArray::U32(le(bytes, u32::from_le_bytes)),
            GgufType::I32 => GgufArray::I32(le(bytes, i32::from_le_bytes)),
            GgufType::F32 => GgufArray::F32(le(bytes, f32::from_le_bytes)),
            GgufType::U64 => GgufArray::U64(le(bytes, u64::from_le_bytes)),
            GgufType::I64 => GgufArray::I64(le(bytes, i64::from_le_bytes)),
            GgufType::F64 => GgufArray::F64(le(bytes, f64::from_le_bytes)),
            GgufType::String | GgufType::Array => unreachable!("handled above"),
        })
    }

    /// Step over `len` elements without storing them (nor touching fixed-size ones).
    fn skip_elements(&mut self, elem: GgufType, len: u64, what: &str, depth: u32) -> Result<()> {
        if let Some(size) = elem.fixed_size() {
            // Bounded by `array_header`: no overflow.
            self.take(len as usize * size, what)?;
            return Ok(());
        }
        for _ in 0..len {
            match elem {
                GgufType::String => {
                    self.string_bytes(what)?;
                }
                _ => {
                    ensure!(
                        depth < MAX_ARRAY_DEPTH,
                        "{what}: arrays nested too deeply (corrupt header)"
                    );
                    let (inner, n) = self.array_header(what)?;
                    self.skip_elements(inner, n, what, depth + 1)?;
                }
            }
        }
        Ok(())
    }
}

impl GgufFile {
    /// Open and parse a GGUF file, keeping the metadata arrays rvllm reads
    /// ([`READ_ARRAY_KEYS`]) and skipping every other array.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_keeping_arrays(path, &|key| READ_ARRAY_KEYS.contains(&key))
    }

    /// Open a GGUF file keeping the arrays under the keys `keep` accepts (tools and tests
    /// that read other arrays).
    pub fn open_keeping_arrays(path: &Path, keep: &dyn Fn(&str) -> bool) -> Result<Self> {
        let file = File::open(path)
            .with_context(|| format!("cannot open GGUF file {}", path.display()))?;
        // SAFETY: the mapping is read-only and we never hand out references that outlive
        // `self`; a file changed underneath us while loading is outside what we can guard.
        let mmap = unsafe { Mmap::map(&file) }
            .with_context(|| format!("cannot memory-map GGUF file {}", path.display()))?;
        Self::parse(path, mmap, keep)
            .with_context(|| format!("invalid GGUF file {}", path.display()))
    }

    fn parse(path: &Path, mmap: Mmap, keep: &dyn Fn(&str) -> bool) -> Result<Self> {
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
        // A metadata entry takes at least 13 bytes (key length, type, a one-byte value), a
        // tensor info at least 32 (name length, dims count, one dim, type, offset).
        let least = n_kv
            .checked_mul(13)
            .zip(n_tensors.checked_mul(32))
            .and_then(|(a, b)| a.checked_add(b));
        ensure!(
            least.is_some_and(|n| n <= c.remaining() as u64),
            "header claims {n_tensors} tensors and {n_kv} metadata entries, more than the file can hold"
        );
        ensure!(
            n_kv <= MAX_METADATA_ENTRIES,
            "header claims {n_kv} metadata entries; rvllm accepts at most {MAX_METADATA_ENTRIES}"
        );
        ensure!(
            n_tensors <= MAX_TENSORS,
            "header claims {n_tensors} tensors; rvllm accepts at most {MAX_TENSORS}"
        );
        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            let key = c.string(&format!("metadata key #{i}"))?;
            let ty = c.value_type(&format!("the type of metadata `{key}`"))?;
            let value = c.value(ty, &format!("metadata `{key}`"), keep(&key))?;
            // Two values for one key would let two readers of the file disagree on which
            // counts; llama.cpp refuses them too.
            ensure!(
                !metadata.contains_key(&key),
                "metadata `{key}` appears twice"
            );
            metadata.insert(key, value);
        }
        let mut tensors = Vec::with_capacity(n_tensors as usize);
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
        let mut by_name: Vec<usize> = (0..tensors.len()).collect();
        by_name.sort_unstable_by(|&a, &b| tensors[a].name.cmp(&tensors[b].name));
        if let Some(w) = by_name
            .windows(2)
            .find(|w| tensors[w[0]].name == tensors[w[1]].name)
        {
            bail!("tensor `{}` appears twice", tensors[w[0]].name);
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
            by_name,
            mmap,
        })
    }

    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    /// A string value; None when absent or not a string (see [`GgufFile::string`]).
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(|v| v.as_str())
    }

    /// A string value; absent is None, any other type an error naming the key and the type
    /// found.
    pub fn string(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(GgufValue::String(s)) => Ok(Some(s)),
            Some(v) => bail!(
                "metadata `{key}` has type {}, expected a string",
                v.type_description()
            ),
        }
    }

    /// An array that was read; absent is None, any other type (or an array skipped at open)
    /// an error naming the key.
    pub fn array(&self, key: &str) -> Result<Option<&GgufArray>> {
        match self.get(key) {
            None => Ok(None),
            Some(GgufValue::Array(a)) if a.is_skipped() => bail!(
                "metadata `{key}` (array of {}) was not read: open the file keeping this key",
                a.elem_type()
            ),
            Some(GgufValue::Array(a)) => Ok(Some(a)),
            Some(v) => bail!(
                "metadata `{key}` has type {}, expected an array",
                v.type_description()
            ),
        }
    }

    pub fn tensor_info(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.by_name
            .binary_search_by(|&i| self.tensors[i].name.as_str().cmp(name))
            .ok()
            .map(|i| &self.tensors[self.by_name[i]])
    }

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
    use super::{GgufArray, GgufValue};

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

    fn put_array(out: &mut Vec<u8>, a: &GgufArray) {
        out.extend_from_slice(&a.elem_type().id().to_le_bytes());
        out.extend_from_slice(&a.len().to_le_bytes());
        fn each<T: Copy, const N: usize>(out: &mut Vec<u8>, v: &[T], f: fn(T) -> [u8; N]) {
            v.iter().for_each(|&x| out.extend_from_slice(&f(x)));
        }
        match a {
            GgufArray::U8(v) => out.extend_from_slice(v),
            GgufArray::I8(v) => each(out, v, i8::to_le_bytes),
            GgufArray::U16(v) => each(out, v, u16::to_le_bytes),
            GgufArray::I16(v) => each(out, v, i16::to_le_bytes),
            GgufArray::U32(v) => each(out, v, u32::to_le_bytes),
            GgufArray::I32(v) => each(out, v, i32::to_le_bytes),
            GgufArray::F32(v) => each(out, v, f32::to_le_bytes),
            GgufArray::Bool(v) => v.iter().for_each(|&b| out.push(b as u8)),
            GgufArray::Str(v) => v.iter().for_each(|s| put_str(out, s)),
            GgufArray::U64(v) => each(out, v, u64::to_le_bytes),
            GgufArray::I64(v) => each(out, v, i64::to_le_bytes),
            GgufArray::F64(v) => each(out, v, f64::to_le_bytes),
            GgufArray::Skipped { .. } => panic!("the writer needs the elements"),
        }
    }

    /// Encode one value (without its type id).
    pub fn put_value(out: &mut Vec<u8>, v: &GgufValue) {
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
            GgufValue::Array(a) => put_array(out, a),
            GgufValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
            GgufValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
            GgufValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        }
    }

    /// Serialize a GGUF v3 file with alignment 32; `raw` entries are (key, type id, encoded
    /// value) for values the enum cannot express (nested arrays, lying lengths).
    pub fn write_raw(
        metadata: &[(&str, GgufValue)],
        raw: &[(&str, u32, Vec<u8>)],
        tensors: &[TestTensor],
    ) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(b"GGUF");
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&((metadata.len() + raw.len()) as u64).to_le_bytes());
        for (k, v) in metadata {
            put_str(&mut out, k);
            out.extend_from_slice(&v.value_type().id().to_le_bytes());
            put_value(&mut out, v);
        }
        for (k, ty, bytes) in raw {
            put_str(&mut out, k);
            out.extend_from_slice(&ty.to_le_bytes());
            out.extend_from_slice(bytes);
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

    /// Serialize a GGUF v3 file with alignment 32.
    pub fn write(metadata: &[(&str, GgufValue)], tensors: &[TestTensor]) -> Vec<u8> {
        write_raw(metadata, &[], tensors)
    }
}

#[cfg(test)]
mod tests {
    use super::test_writer::{write, write_raw, TestTensor};
    use super::*;

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn open_all(bytes: &[u8]) -> (tempfile::TempDir, Result<GgufFile>) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.gguf");
        std::fs::write(&p, bytes).unwrap();
        let g = GgufFile::open_keeping_arrays(&p, &|_| true);
        (dir, g)
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
        assert!(g.tensor_info("t3").is_none());
        // Asking for more bytes than exist is an error naming the tensor, not a panic.
        let e = g.tensor_bytes(t2, 1 << 20).unwrap_err().to_string();
        assert!(e.contains("t2") && e.contains("m.gguf"), "{e}");
    }

    /// Every element type comes back as its own typed vector, equal to what was written.
    #[test]
    fn arrays_are_typed_vectors() {
        let strings: GgufStrings = ["x", "", "héllo", "▁the"].into_iter().collect();
        let arrays = vec![
            ("a.u8", GgufArray::U8(vec![0, 7, 255])),
            ("a.i8", GgufArray::I8(vec![-128, 0, 127])),
            ("a.u16", GgufArray::U16(vec![1, 65535])),
            ("a.i16", GgufArray::I16(vec![-32768, 5])),
            ("a.u32", GgufArray::U32(vec![70000, u32::MAX])),
            ("a.i32", GgufArray::I32(vec![-70000, 3])),
            ("a.f32", GgufArray::F32(vec![1.5, -0.25])),
            ("a.bool", GgufArray::Bool(vec![true, false, true])),
            ("a.str", GgufArray::Str(strings.clone())),
            ("a.u64", GgufArray::U64(vec![1 << 40])),
            ("a.i64", GgufArray::I64(vec![-(1 << 40), 2])),
            ("a.f64", GgufArray::F64(vec![0.125])),
            ("a.empty", GgufArray::F32(vec![])),
        ];
        let meta: Vec<(&str, GgufValue)> = arrays
            .iter()
            .map(|(k, a)| (*k, GgufValue::Array(a.clone())))
            .collect();
        let (_d, g) = open_all(&write(&meta, &[]));
        let g = g.unwrap();
        for (k, a) in &arrays {
            assert_eq!(g.array(k).unwrap(), Some(a), "{k}");
        }
        let s = g.array("a.str").unwrap().unwrap().strings().unwrap();
        assert_eq!(s.len(), 4);
        assert_eq!(s.get(2), Some("héllo"));
        assert_eq!(s.get(4), None);
        assert_eq!(s.iter().collect::<Vec<_>>(), ["x", "", "héllo", "▁the"]);
        let ints = g.array("a.i16").unwrap().unwrap().to_i64s();
        assert_eq!(ints, Some(vec![-32768, 5]));
        assert_eq!(
            g.array("a.u8").unwrap().unwrap().to_f64s(),
            Some(vec![0.0, 7.0, 255.0])
        );
        assert_eq!(g.array("a.str").unwrap().unwrap().to_i64s(), None);
        assert_eq!(
            g.array("a.u64").unwrap().unwrap().to_i64s(),
            Some(vec![1 << 40])
        );
        assert_eq!(g.array("a.missing").unwrap(), None);
        let e = g.array("a.empty").unwrap().unwrap();
        assert!(e.is_empty() && e.elem_type() == GgufType::F32);
    }

    /// Arrays under keys rvllm does not read are stepped over: the entry records the element
    /// type and length only, and the keys after it still read correctly.
    #[test]
    fn unread_arrays_are_skipped_keeping_type_and_length() {
        let tokens: GgufStrings = ["<s>", "a", "b"].into_iter().collect();
        let meta = vec![
            ("other.u8", GgufValue::Array(GgufArray::U8(vec![9; 1000]))),
            (
                "other.str",
                GgufValue::Array(GgufArray::Str(["p", "q"].into_iter().collect())),
            ),
            (
                "tokenizer.ggml.tokens",
                GgufValue::Array(GgufArray::Str(tokens.clone())),
            ),
            ("general.name", GgufValue::String("after".into())),
        ];
        // An array of arrays (never read, even where a key would be kept).
        let mut nested = Vec::new();
        nested.extend_from_slice(&GgufType::Array.id().to_le_bytes());
        nested.extend_from_slice(&2u64.to_le_bytes());
        for n in [1u64, 2] {
            nested.extend_from_slice(&GgufType::I32.id().to_le_bytes());
            nested.extend_from_slice(&n.to_le_bytes());
            for _ in 0..n {
                nested.extend_from_slice(&5i32.to_le_bytes());
            }
        }
        let bytes = write_raw(&meta, &[("tokenizer.ggml.merges", 9, nested)], &[]);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.gguf");
        std::fs::write(&p, bytes).unwrap();
        let g = GgufFile::open(&p).unwrap();
        let skipped = |elem, len| Some(GgufValue::Array(GgufArray::Skipped { elem, len }));
        assert_eq!(g.get("other.u8").cloned(), skipped(GgufType::U8, 1000));
        assert_eq!(g.get("other.str").cloned(), skipped(GgufType::String, 2));
        assert_eq!(
            g.get("tokenizer.ggml.merges").cloned(),
            skipped(GgufType::Array, 2)
        );
        assert_eq!(
            g.array("tokenizer.ggml.tokens").unwrap(),
            Some(&GgufArray::Str(tokens))
        );
        assert_eq!(g.get_str("general.name"), Some("after"));
        let e = g.array("other.u8").unwrap_err().to_string();
        assert!(e.contains("other.u8") && e.contains("not read"), "{e}");
    }

    /// Lengths the file cannot hold, wrong types asked for, unknown types and repeated keys
    /// are errors naming the key, found before anything is allocated.
    #[test]
    fn lying_array_headers_and_wrong_types_are_named() {
        for (elem, len) in [
            (GgufType::U8, 1u64 << 40),
            (GgufType::F64, u64::MAX / 4),
            (GgufType::String, 1 << 30),
            (GgufType::Array, u64::MAX),
        ] {
            let mut raw = Vec::new();
            raw.extend_from_slice(&elem.id().to_le_bytes());
            raw.extend_from_slice(&len.to_le_bytes());
            raw.extend_from_slice(&[0u8; 64]);
            for keep in [true, false] {
                let dir = tempfile::tempdir().unwrap();
                let p = dir.path().join("m.gguf");
                std::fs::write(&p, write_raw(&[], &[("k.huge", 9, raw.clone())], &[])).unwrap();
                let e = format!(
                    "{:#}",
                    GgufFile::open_keeping_arrays(&p, &|_| keep).unwrap_err()
                );
                assert!(
                    e.contains("k.huge") && e.contains("past the end"),
                    "{elem} x {len}: {e}"
                );
            }
        }
        let (_d, g) = open_all(&write_raw(&[], &[("k.odd", 13, vec![0; 8])], &[]));
        let e = format!("{:#}", g.unwrap_err());
        assert!(e.contains("k.odd") && e.contains("type 13"), "{e}");

        let twice = [
            ("k.a", GgufValue::U32(1)),
            ("k.a", GgufValue::String("x".into())),
        ];
        let (_d, g) = open_all(&write(&twice, &[]));
        let e = format!("{:#}", g.unwrap_err());
        assert!(e.contains("`k.a` appears twice"), "{e}");

        let (_d, g) = open_all(&write(&[("k.n", GgufValue::U32(7))], &[]));
        let g = g.unwrap();
        let e = g.string("k.n").unwrap_err().to_string();
        assert!(e.contains("k.n") && e.contains("type u32"), "{e}");
        let e = g.array("k.n").unwrap_err().to_string();
        assert!(e.contains("type u32"), "{e}");
        assert_eq!(g.string("k.none").unwrap(), None);
    }

    #[test]
    fn repeated_tensor_names_are_refused() {
        let t = || TestTensor {
            name: "w".into(),
            dims: vec![1],
            ggml_type: 0,
            data: f32_bytes(&[1.0]),
        };
        let (_d, g) = open_all(&write(&[], &[t(), t()]));
        let e = format!("{:#}", g.unwrap_err());
        assert!(e.contains("tensor `w` appears twice"), "{e}");
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
        // So are counts of entries the file cannot hold.
        let mut many = bytes.clone();
        many[16..24].copy_from_slice(&1_000u64.to_le_bytes());
        std::fs::write(&p, &many).unwrap();
        let e = format!("{:#}", GgufFile::open(&p).unwrap_err());
        assert!(e.contains("more than the file can hold"), "{e}");
    }
}
