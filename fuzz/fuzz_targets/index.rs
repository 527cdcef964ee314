//! `model.safetensors.index.json` of a sharded Hugging Face folder: which shard files to
//! open. The folder holds the micro model split in two real shards (fuzz/fixtures), so an
//! index that names them loads the whole model. Whatever the index says, no path it yields
//! may leave the model folder.
#![no_main]
use std::path::Component;

use libfuzzer_sys::fuzz_target;
use rvllm::models::hf_weights::weight_files;
use rvllm::models::{load_model, LoadOptions};

const SHARDS: [&str; 2] = [
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
];

fuzz_target!(|data: &[u8]| {
    let dir = rvllm_fuzz::scratch_dir().join("index");
    if !dir.is_dir() {
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["config.json"].iter().chain(SHARDS.iter()) {
            std::fs::copy(rvllm_fuzz::fuzz_fixture(f), dir.join(f)).unwrap();
        }
    }
    rvllm_fuzz::write(&dir, "model.safetensors.index.json", data);
    if let Ok(files) = weight_files(&dir) {
        for f in &files {
            let rel = f
                .strip_prefix(&dir)
                .expect("a shard path outside the model folder");
            assert!(
                rel.components().all(|c| matches!(c, Component::Normal(_))),
                "shard path {} leaves the model folder",
                f.display()
            );
        }
    }
    let r = load_model(dir.to_str().unwrap(), &LoadOptions::default());
    rvllm_fuzz::report("index", &r);
});
