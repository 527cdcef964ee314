//! `--load-format dummy` weights made on the GPU (kernels/src/dummy_fill.cu) against the host's
//! values (`DummyWeight::to_host`, what the CPU backend uploads), bit for bit after the same
//! rounding to bf16 or f16: a tensor longer than one generator chunk, and a fused q/k/v stack
//! cut as a tensor-parallel rank cuts it (rows across the parts' boundaries, a column range).
//! The output buffer is poisoned first, so an element the kernel misses fails.
//!
//! Without a usable CUDA device the test prints a `SKIPPED` line and returns; built without
//! the `cuda` feature, one test says so.

/// Writes a line straight to stderr: the harness captures `eprintln!` of passing tests.
fn loud(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

#[cfg(not(feature = "cuda"))]
#[test]
fn dummy_weight_tests_need_the_cuda_feature() {
    loud("\n*** SKIPPED: gpu_dummy_weights: built without the cuda feature (cargo test --features cuda) ***");
}

#[cfg(feature = "cuda")]
mod gpu {
    use std::sync::Arc;

    use rvllm::backend::cuda::backend::{CudaBackend, StepLimits};
    use rvllm::backend::cuda::elem::{bits_of, GpuDtype};
    use rvllm::backend::cuda::Gpu;
    use rvllm::backend::dummy_weight::DummyWeight;

    use super::loud;

    fn gpu(test: &str) -> Option<Arc<Gpu>> {
        let found = match rvllm::engine::resolve_device("auto") {
            Ok(rvllm::engine::Device::Cuda) => rvllm::backend::cuda::device_count().unwrap_or(0),
            _ => 0,
        };
        if found == 0 {
            loud(&format!("\n*** SKIPPED: {test}: no CUDA device ***"));
            return None;
        }
        let gpu = Arc::new(Gpu::new(0).expect("a CUDA context"));
        gpu.bind().expect("binding the GPU");
        Some(gpu)
    }

    fn backend(gpu: &Arc<Gpu>, dtype: GpuDtype) -> CudaBackend {
        let limits = StepLimits {
            max_tokens: 16,
            max_seqs: 2,
            max_blocks_per_seq: 2,
        };
        CudaBackend::new(gpu.clone(), limits, 4, 4, 64, dtype).expect("a CUDA backend")
    }

    /// The device's 16 bits of `w` (filled into a poisoned buffer) and the host's.
    fn both(be: &CudaBackend, w: &DummyWeight) -> (Vec<u16>, Vec<u16>) {
        let [rows, cols] = w.shape();
        let n = rows * cols;
        let buf = be.gpu.alloc(n * 2).expect("allocating the output");
        // 0xFFFF is a NaN in both types: never a value the generator makes.
        be.gpu
            .upload(buf.ptr, &vec![0xFFFFu16; n])
            .expect("poisoning");
        be.fill_dummy(w, &buf).expect("filling");
        let mut got = vec![0u16; n];
        be.gpu.download(&mut got, buf.ptr).expect("downloading");
        let want = w
            .to_host()
            .to_f32()
            .iter()
            .map(|&x| bits_of(x, be.dtype))
            .collect();
        (got, want)
    }

    fn assert_same(got: &[u16], want: &[u16], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}");
        let wrong: Vec<usize> = (0..got.len()).filter(|&i| got[i] != want[i]).collect();
        assert!(
            wrong.is_empty(),
            "{what}: {} of {} elements differ, first at {} (device {:#06x}, host {:#06x})",
            wrong.len(),
            got.len(),
            wrong[0],
            got[wrong[0]],
            want[wrong[0]]
        );
    }

    #[test]
    fn device_fill_matches_the_host_values_bit_for_bit() {
        let Some(gpu) = gpu("device_fill_matches_the_host_values_bit_for_bit") else {
            return;
        };
        for dtype in [GpuDtype::Bf16, GpuDtype::F16] {
            let be = backend(&gpu, dtype);
            // 3 chunks of the generator and a bit: the chunks' streams must line up.
            let big = DummyWeight::new("model.layers.0.mlp.down_proj.weight", &[300, 700], 5);
            let (got, want) = both(&be, &big);
            assert_same(&got, &want, &format!("{dtype:?} whole"));

            // q (8 rows), k (4), v (4) of 96 columns, fused, then rank 1 of 2's rows (q 4..8,
            // k 2..4, v 2..4) and a column range, as the loader cuts fused weights.
            let part = |s: &str, rows| {
                DummyWeight::new(
                    &format!("model.layers.3.self_attn.{s}.weight"),
                    &[rows, 96],
                    9,
                )
            };
            let qkv = DummyWeight::stack(
                "qkv",
                vec![part("q_proj", 8), part("k_proj", 4), part("v_proj", 4)],
            )
            .unwrap();
            let cut = qkv
                .select_rows(&[4..8, 10..12, 14..16])
                .unwrap()
                .select_columns(32..80)
                .unwrap();
            assert_eq!(cut.shape(), [8, 48]);
            let (got, want) = both(&be, &cut);
            assert_same(&got, &want, &format!("{dtype:?} cut"));
            assert!(want.iter().any(|&b| b != want[0]), "values vary");
        }
    }
}
