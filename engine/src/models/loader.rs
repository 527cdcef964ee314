//! `load_model`: one entry point for every way of naming a model (HF folder, .gguf file,
//! config.json for dummy weights, hub id).
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::config::ModelConfig;
use super::weights::WeightMap;
use super::{gguf, hf_config, hf_weights, hub};
use crate::tokenizer::Tokenizer;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LoadFormat {
    /// Read the weights from the model files.
    #[default]
    Auto,
    /// Config only: the model makes random weights (benchmarks without weight files).
    Dummy,
}

#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    pub load_format: LoadFormat,
    /// Show a progress bar on stderr while reading weights (drawn only on a terminal).
    pub progress: bool,
}

#[derive(Debug)]
pub struct LoadedModel {
    pub config: ModelConfig,
    /// None for `LoadFormat::Dummy`.
    pub weights: Option<WeightMap>,
    /// None when the model files carry no tokenizer.
    pub tokenizer: Option<Tokenizer>,
    /// What was loaded (a path), for messages.
    pub source: String,
}

/// A byte-counting progress bar on stderr (hidden when stderr is not a terminal).
pub(crate) fn bytes_progress_bar(total: u64, message: &str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(
        "{msg} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(message.to_string());
    bar
}

fn weights_bar(opts: &LoadOptions, total: u64) -> ProgressBar {
    if opts.progress {
        bytes_progress_bar(total, "loading weights")
    } else {
        ProgressBar::hidden()
    }
}

/// Load the model `spec` names.
pub fn load_model(spec: &str, opts: &LoadOptions) -> Result<LoadedModel> {
    let path = Path::new(spec);
    if path.exists() {
        return load_path(path, opts);
    }
    if hub::looks_like_repo_id(spec) {
        let dir = hub::resolve(&hub::HubSettings::from_env(), spec, opts.progress)
            .with_context(|| format!("fetching model `{spec}` from the Hugging Face hub"))?;
        return load_hf_folder(&dir, opts);
    }
    bail!("model `{spec}` not found: no such file or folder, and not a hub id of the form org/name")
}

fn is_gguf(path: &Path) -> bool {
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        return true;
    }
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .is_ok()
        && &magic == b"GGUF"
}

fn load_path(path: &Path, opts: &LoadOptions) -> Result<LoadedModel> {
    if path.is_file() {
        if is_gguf(path) {
            return load_gguf(path, opts);
        }
        if path.extension().is_some_and(|e| e == "json") {
            // A config.json: its folder is the model (weights there unless dummy).
            let dir = path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            return load_hf_folder_with_config(dir, path, opts);
        }
        bail!(
            "{} is neither a .gguf file nor a config.json; pass a model folder, a .gguf file or a hub id",
            path.display()
        );
    }
    if !path.join("config.json").is_file() {
        // A folder with a single GGUF file in it is that file.
        let ggufs: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("cannot list {}", path.display()))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.extension()
                    .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
            })
            .collect();
        if ggufs.len() == 1 {
            return load_gguf(&ggufs[0], opts);
        }
        bail!(
            "{} has no config.json{}: a model folder needs config.json (and safetensors weights), or pass a .gguf file",
            path.display(),
            if ggufs.len() > 1 { " and several .gguf files" } else { "" }
        );
    }
    load_hf_folder(path, opts)
}

fn load_hf_folder(dir: &Path, opts: &LoadOptions) -> Result<LoadedModel> {
    load_hf_folder_with_config(dir, &dir.join("config.json"), opts)
}

fn load_hf_folder_with_config(
    dir: &Path,
    config_path: &Path,
    opts: &LoadOptions,
) -> Result<LoadedModel> {
    let mut config = hf_config::read_config(config_path)?;
    let tok_json = dir.join("tokenizer.json");
    let tokenizer = if tok_json.is_file() {
        let tok_cfg = dir.join("tokenizer_config.json");
        Some(Tokenizer::from_file(
            &tok_json,
            tok_cfg.is_file().then_some(tok_cfg.as_path()),
        )?)
    } else {
        None
    };
    fill_eos_from_tokenizer(&mut config, tokenizer.as_ref());
    let weights = match opts.load_format {
        LoadFormat::Dummy => None,
        LoadFormat::Auto => {
            let bar = weights_bar(opts, hf_weights::weights_nbytes(dir));
            let w = hf_weights::load_weights(dir, &config, &bar)?;
            bar.finish_and_clear();
            Some(w)
        }
    };
    Ok(LoadedModel {
        config,
        weights,
        tokenizer,
        source: dir.display().to_string(),
    })
}

fn load_gguf(path: &Path, opts: &LoadOptions) -> Result<LoadedModel> {
    let file = gguf::GgufFile::open(path)?;
    let mut config = gguf::read_config(&file)?;
    let tokenizer = crate::tokenizer::gguf::from_gguf(&file)?;
    fill_eos_from_tokenizer(&mut config, tokenizer.as_ref());
    let weights = match opts.load_format {
        LoadFormat::Dummy => None,
        LoadFormat::Auto => {
            let bar = weights_bar(opts, gguf::weights_nbytes(&file, &config));
            let w = gguf::load_weights(&file, &config, &bar)?;
            bar.finish_and_clear();
            Some(w)
        }
    };
    Ok(LoadedModel {
        config,
        weights,
        tokenizer,
        source: path.display().to_string(),
    })
}

/// A config without EOS ids takes the tokenizer's EOS token, so generation can stop.
fn fill_eos_from_tokenizer(config: &mut ModelConfig, tokenizer: Option<&Tokenizer>) {
    if config.eos_token_ids.is_empty() {
        if let Some(id) = tokenizer.and_then(|t| t.eos_token_id()) {
            config.eos_token_ids.push(id);
        }
    }
}
