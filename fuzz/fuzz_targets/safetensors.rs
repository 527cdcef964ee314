//! `model.safetensors` of a Hugging Face folder: the header (JSON behind a length prefix),
//! the offsets it claims, dtype conversion and the shape checks against config.json, with
//! the diagnosis the loader adds when the safetensors crate refuses a file. config.json is
//! fixed (fuzz/fixtures/config.json, a micro Llama); the weights file is the input.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rvllm::models::{load_model, LoadOptions};

fuzz_target!(|data: &[u8]| {
    let dir = rvllm_fuzz::scratch_dir().join("st");
    if !dir.is_dir() {
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(
            rvllm_fuzz::fuzz_fixture("config.json"),
            dir.join("config.json"),
        )
        .unwrap();
    }
    rvllm_fuzz::write(&dir, "model.safetensors", data);
    let r = load_model(dir.to_str().unwrap(), &LoadOptions::default());
    rvllm_fuzz::report("safetensors", &r);
});
