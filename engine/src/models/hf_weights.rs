//! Weights of a Hugging Face folder: `model.safetensors`, or shards listed in
//! `model.safetensors.index.json`. Files are memory-mapped; only the tensors the model needs
//! are copied out, keeping their dtype (F32 / F16 / BF16); FP8 (E4M3) weights of a checkpoint
//! with an FP8 `quantization_config` are dequantized into F32 (`models/quant`).
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use half::{bf16, f16};
use indicatif::ProgressBar;
use memmap2::Mmap;
use rayon::prelude::*;
use safetensors::{Dtype, SafeTensors};

use super::config::ModelConfig;
use super::layout::expected_tensors;
use super::quant::Fp8Loader;
use super::weights::{HostData, HostTensor, WeightMap};

/// The safetensors files of a folder and, for each, the tensor names it holds (from the
/// index when sharded; `None` = read the single file's own header).
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index)
            .with_context(|| format!("cannot read {}", index.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", index.display()))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| anyhow::anyhow!("{} has no `weight_map` object", index.display()))?;
        let mut files: Vec<String> = Vec::new();
        for (tensor, file) in map {
            let f = file.as_str().ok_or_else(|| {
                anyhow::anyhow!(
                    "{}: weight_map[`{tensor}`] is not a file name",
                    index.display()
                )
            })?;
            ensure!(
                !f.contains("..") && !Path::new(f).is_absolute(),
                "{}: shard name `{f}` points outside the model folder",
                index.display()
            );
            if !files.iter().any(|x| x == f) {
                files.push(f.to_string());
            }
        }
        files.sort();
        let paths: Vec<PathBuf> = files.iter().map(|f| dir.join(f)).collect();
        for p in &paths {
            ensure!(
                p.is_file(),
                "shard {} listed in {} is missing",
                p.display(),
                index.display()
            );
        }
        return Ok(paths);
    }
    if single.is_file() {
        return Ok(vec![single]);
    }
    bail!(
        "no weights in {}: expected model.safetensors or model.safetensors.index.json (use --load-format dummy to run with random weights)",
        dir.display()
    )
}

fn map_file(path: &Path) -> Result<Mmap> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    // SAFETY: read-only mapping, dropped before this loader returns; a file modified while we
    // read it is outside what any reader can guard against.
    unsafe { Mmap::map(&file) }.with_context(|| format!("cannot memory-map {}", path.display()))
}

/// When the safetensors crate refuses a file, say which tensor is at fault where we can:
/// walk the header ourselves and find the first entry whose bytes fall outside the file.
fn diagnose(path: &Path, bytes: &[u8], err: &safetensors::SafeTensorError) -> anyhow::Error {
    let file = path.display();
    let detail = (|| -> Option<String> {
        let n = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?) as usize;
        let header = bytes.get(8..8usize.checked_add(n)?)?;
        let v: serde_json::Value = serde_json::from_slice(header).ok()?;
        let data_len = bytes.len() - 8 - n;
        let mut entries: Vec<(&String, &serde_json::Value)> = v.as_object()?.iter().collect();
        entries.sort_by_key(|(_, e)| {
            e.get("data_offsets")
                .and_then(|o| o.get(0))
                .and_then(|x| x.as_u64())
        });
        for (name, e) in entries {
            if name == "__metadata__" {
                continue;
            }
            let dtype = e.get("dtype").and_then(|d| d.as_str()).unwrap_or("?");
            if serde_json::from_value::<Dtype>(serde_json::Value::String(dtype.into())).is_err() {
                return Some(format!("tensor `{name}` has unknown dtype `{dtype}`"));
            }
            let off = e.get("data_offsets")?.as_array()?;
            let (a, b) = (off.first()?.as_u64()?, off.get(1)?.as_u64()?);
            if b as usize > data_len || a > b {
                return Some(format!(
                    "tensor `{name}` needs bytes {a}..{b} of the data section but the file holds only {data_len}: the file is truncated or its header is corrupt (re-download it)"
                ));
            }
        }
        None
    })();
    match detail {
        Some(d) => anyhow::anyhow!("invalid safetensors file {file}: {d}"),
        None => anyhow::anyhow!("invalid safetensors file {file}: {err}"),
    }
}

fn convert(path: &Path, name: &str, dtype: Dtype, data: &[u8]) -> Result<HostData> {
    Ok(match dtype {
        Dtype::F32 => HostData::F32(le_values(data, |c| {
            f32::from_le_bytes([c[0], c[1], c[2], c[3]])
        })),
        Dtype::F16 => HostData::F16(le_values(data, |c| f16::from_le_bytes([c[0], c[1]]))),
        Dtype::BF16 => HostData::BF16(le_values(data, |c| bf16::from_le_bytes([c[0], c[1]]))),
        other => bail!(
            "tensor `{name}` in {} has dtype {other:?}; supported dtypes are F32, F16 and BF16",
            path.display()
        ),
    })
}

/// Values a task of `le_values` copies: a few MB, so that a large tensor spreads over every
/// core while a small one stays on one.
const VALUES_PER_TASK: usize = 1 << 20;

/// `data`'s little-endian values (safetensors' byte order), copied out of the mapped file by
/// every core: most of a large checkpoint's load is this copy out of the page cache, which
/// one thread does at a fraction of the memory's speed.
fn le_values<T>(data: &[u8], from_le: impl Fn(&[u8]) -> T + Sync) -> Vec<T>
where
    T: bytemuck::Pod + Send + Sync,
{
    let size = std::mem::size_of::<T>();
    let n = data.len() / size;
    // Uninitialized, not zeroed: zeroing first would be a second single-threaded pass.
    let mut out: Vec<T> = Vec::with_capacity(n);
    out.spare_capacity_mut()[..n]
        .par_chunks_mut(VALUES_PER_TASK)
        .zip(data[..n * size].par_chunks(VALUES_PER_TASK * size))
        .for_each(|(values, bytes)| {
            if cfg!(target_endian = "little") {
                // SAFETY: `MaybeUninit<T>` has `T`'s size; these are the task's own values,
                // `bytes.len()` bytes of them, each written here.
                let dst = unsafe {
                    std::slice::from_raw_parts_mut(values.as_mut_ptr().cast::<u8>(), bytes.len())
                };
                dst.copy_from_slice(bytes);
            } else {
                for (v, b) in values.iter_mut().zip(bytes.chunks_exact(size)) {
                    v.write(from_le(b));
                }
            }
        });
    // SAFETY: the tasks above wrote every one of the first n values.
    unsafe { out.set_len(n) };
    out
}

/// Read the tensors the config needs from the safetensors files of `dir`, checking each
/// tensor's shape against the config as it is read.
pub fn load_weights(dir: &Path, cfg: &ModelConfig, progress: &ProgressBar) -> Result<WeightMap> {
    let files = weight_files(dir)?;
    let expected = expected_tensors(cfg);
    let mut wanted: HashMap<&str, &[usize]> = expected
        .iter()
        .map(|e| (e.name.as_str(), e.shape.as_slice()))
        .collect();
    let mut map = WeightMap::default();
    let mut fp8 = Fp8Loader::new(cfg.family.quant.checkpoint.as_ref());
    for path in &files {
        let mmap = map_file(path)?;
        let st = SafeTensors::deserialize(&mmap).map_err(|e| diagnose(path, &mmap, &e))?;
        // Sorted for a deterministic first error.
        let names: BTreeMap<&str, ()> = st.names().into_iter().map(|n| (n, ())).collect();
        for name in names.keys() {
            if fp8.is_scale(name) {
                let view = st
                    .tensor(name)
                    .map_err(|e| anyhow::anyhow!("{}: tensor `{name}`: {e}", path.display()))?;
                let data = convert(path, name, view.dtype(), view.data())?;
                let shape = view.shape().to_vec();
                fp8.add_scale(name, HostTensor { shape, data });
                continue;
            }
            let Some(shape) = wanted.remove::<str>(name) else {
                if super::moe::is_stacked(cfg, name) {
                    // transformers 5's stacked experts: split into the names the model reads.
                    let view = st
                        .tensor(name)
                        .map_err(|e| anyhow::anyhow!("{}: tensor `{name}`: {e}", path.display()))?;
                    let data = convert(path, name, view.dtype(), view.data())?;
                    let shape = view.shape().to_vec();
                    let parts = super::moe::split_stacked(cfg, name, HostTensor { shape, data })
                        .with_context(|| path.display().to_string())?;
                    progress.inc(view.data().len() as u64);
                    for (part, t) in parts {
                        ensure!(
                            wanted.remove::<str>(&part).is_some(),
                            "{}: `{part}` is given twice (once inside `{name}`)",
                            path.display()
                        );
                        map.tensors.insert(part, t);
                    }
                }
                continue; // e.g. rotary_emb.inv_freq: not a weight we use.
            };
            let view = st
                .tensor(name)
                .map_err(|e| anyhow::anyhow!("{}: tensor `{name}`: {e}", path.display()))?;
            ensure!(
                view.shape() == shape,
                "tensor `{name}` in {} has shape {:?} but config.json implies {:?}",
                path.display(),
                view.shape(),
                shape
            );
            let file = path.display().to_string();
            if fp8.take_weight(&file, name, view.dtype(), shape, view.data())? {
                progress.inc(view.data().len() as u64);
                continue;
            }
            let data = convert(path, name, view.dtype(), view.data())?;
            progress.inc(view.data().len() as u64);
            map.tensors.insert(
                name.to_string(),
                HostTensor {
                    shape: shape.to_vec(),
                    data,
                },
            );
        }
    }
    fp8.finish(&mut map.tensors)?;
    let searched = files
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    for e in &expected {
        if !e.optional && !map.contains(&e.name) {
            bail!(
                "tensor `{}` (shape {:?}) is missing from {searched}",
                e.name,
                e.shape
            );
        }
    }
    Ok(map)
}

/// Bytes of the weight files, for a progress bar (an estimate: includes unused tensors).
pub fn weights_nbytes(dir: &Path) -> u64 {
    weight_files(dir)
        .map(|fs| {
            fs.iter()
                .filter_map(|p| std::fs::metadata(p).ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}
