//! config.json (and generation_config.json after a NUL byte, when there is one) of a
//! Hugging Face folder, read as `rvllm serve --load-format dummy config.json` reads it: the
//! architecture, sizes, RoPE scaling, EOS ids and the sanity limits that keep a corrupt
//! config from sizing allocations; then what the engine computes from an accepted config.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rvllm::models::layout::expected_tensors;
use rvllm::models::{load_model, LoadFormat, LoadOptions};

fuzz_target!(|data: &[u8]| {
    let dir = rvllm_fuzz::scratch_dir().join("config");
    std::fs::create_dir_all(&dir).unwrap();
    let (config, generation) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], Some(&data[i + 1..])),
        None => (data, None),
    };
    let path = rvllm_fuzz::write(&dir, "config.json", config);
    let gen_path = dir.join("generation_config.json");
    match generation {
        Some(g) => {
            rvllm_fuzz::write(&dir, "generation_config.json", g);
        }
        None => {
            let _ = std::fs::remove_file(&gen_path);
        }
    }
    let opts = LoadOptions {
        load_format: LoadFormat::Dummy,
        ..LoadOptions::default()
    };
    let r = load_model(path.to_str().unwrap(), &opts);
    rvllm_fuzz::report("config", &r);
    if let Ok(m) = r {
        // Whatever the loader accepts, the engine can size (weights, KV cache, RoPE table)
        // without overflow or a NaN.
        let c = &m.config;
        let _ = (c.q_size(), c.kv_size(), c.num_parameters());
        let _ = c.kv_bytes_per_token(2);
        let _ = expected_tensors(c).len();
        for f in c.rope_inv_freq() {
            assert!(
                f.is_finite(),
                "a config the loader accepted gives RoPE frequency {f}"
            );
        }
    }
});
