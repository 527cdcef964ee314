//! A GGUF file, read the way `rvllm serve model.gguf` reads it: header and metadata, the
//! model config, the tokenizer rebuilt from `tokenizer.ggml.*`, and every tensor
//! dequantized. Seeds: micro models covering each quantization type (make_seeds.py).
#![no_main]
use libfuzzer_sys::fuzz_target;
use rvllm::models::{load_model, LoadOptions};

fuzz_target!(|data: &[u8]| {
    let dir = rvllm_fuzz::scratch_dir();
    let path = rvllm_fuzz::write(dir, "model.gguf", data);
    let r = load_model(path.to_str().unwrap(), &LoadOptions::default());
    rvllm_fuzz::report("gguf", &r);
    if let Ok(m) = r {
        // A model that loads has every tensor the config asks for.
        assert!(m.weights.is_some(), "an Auto load returned no weights");
    }
});
