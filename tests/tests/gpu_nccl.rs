//! NCCL on the CUDA backend (issue 22). One GPU: a group of one through the backend's
//! `all_reduce_sum` leaves the activations as they are, and the engine on the NCCL path
//! (`RVLLM_NCCL_TP1=1`: communicator created, all-reduces after O and down) gives the same
//! greedy tokens as without it. Two or more GPUs: all-reduce, all-gather and broadcast against
//! CPU references (outputs poisoned first), ranks joining by a unique id's bytes from their own
//! threads, and the engine at `--tensor-parallel-size 2` against 1 by the bf16 top-5 rule.
//!
//! Without enough GPUs (or without NCCL) each test prints a loud `SKIPPED` line and passes;
//! built without the `cuda` feature, one test says so.

/// Writes a line straight to stderr: the harness captures `eprintln!` of passing tests.
fn loud(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

#[cfg(not(feature = "cuda"))]
#[test]
fn nccl_tests_need_the_cuda_feature() {
    loud(
        "\n*** SKIPPED: gpu_nccl: built without the cuda feature (cargo test --features cuda) ***",
    );
}

#[cfg(feature = "cuda")]
mod gpu {
    use std::path::{Path, PathBuf};
    use std::sync::{Arc, Mutex, MutexGuard};

    use rvllm::backend::cuda::backend::{CudaBackend, CudaTensor, StepLimits};
    use rvllm::backend::cuda::elem::GpuDtype;
    use rvllm::backend::cuda::nccl::{self, NcclComm, NcclUniqueId};
    use rvllm::backend::cuda::Gpu;
    use rvllm::backend::parallel::Communicator;
    use rvllm::backend::Backend;
    use rvllm::engine::{EngineArgs, Llm, RequestOutput};
    use rvllm::sampling::SamplingParams;
    use rvllm::types::TokenLogprobs;
    use rvllm_tests::check_greedy_against_reference;

    use super::loud;

    /// One test on the GPUs at a time: engines size their KV cache from free memory, and
    /// NCCL groups of parallel tests would contend for the same devices.
    static GPU_LOCK: Mutex<()> = Mutex::new(());

    /// The lock and the device count when `needed` CUDA devices and NCCL are usable;
    /// otherwise a loud SKIPPED line and None.
    fn gpus(test: &str, needed: usize) -> Option<(MutexGuard<'static, ()>, usize)> {
        let found = match rvllm::engine::resolve_device("auto") {
            Ok(rvllm::engine::Device::Cuda) => rvllm::backend::cuda::device_count().unwrap_or(0),
            _ => 0,
        };
        if found < needed {
            loud(&format!(
                "\n*** SKIPPED: {test}: needs {needed} GPU{}, found {found} ***",
                if needed == 1 { "" } else { "s" }
            ));
            return None;
        }
        if let Err(e) = nccl::version() {
            loud(&format!(
                "\n*** SKIPPED: {test}: NCCL not found ({e:#}) ***"
            ));
            return None;
        }
        Some((GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner()), found))
    }

    fn backend(gpu: &Arc<Gpu>) -> CudaBackend {
        gpu.bind().expect("binding the GPU");
        let limits = StepLimits {
            max_tokens: 64,
            max_seqs: 4,
            max_blocks_per_seq: 4,
        };
        CudaBackend::new(gpu.clone(), limits, 4, 4, 64, GpuDtype::Bf16).expect("a CUDA backend")
    }

    /// Values bf16 holds exactly whose sums over a few ranks it holds exactly too, so the
    /// device's sums must equal the host's bit for bit.
    fn exact_values(rank: usize, n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7 + rank * 13) % 31) as f32 * 0.5 - 7.0)
            .collect()
    }

    fn to_host(be: &CudaBackend, t: &CudaTensor) -> Vec<f32> {
        be.gpu.bind().expect("binding the GPU");
        let mut v = Vec::new();
        be.to_host(t, &mut v).expect("download");
        v
    }

    fn upload(be: &CudaBackend, rows: usize, cols: usize, data: &[f32]) -> CudaTensor {
        be.gpu.bind().expect("binding the GPU");
        be.activation_from_host(rows, cols, data).expect("upload")
    }

    #[test]
    fn a_group_of_one_leaves_activations_unchanged() {
        let Some(_lock) = gpus("a_group_of_one_leaves_activations_unchanged", 1) else {
            return;
        };
        let gpu = Arc::new(Gpu::new(0).expect("a CUDA context"));
        let be = backend(&gpu);
        let (rows, cols) = (3, 80);
        let data = exact_values(0, rows * cols);
        let mut x = upload(&be, rows, cols, &data);
        let err = be
            .all_reduce_sum(&mut x)
            .expect_err("a backend in no group has nothing to reduce with");
        assert!(format!("{err:#}").contains("NCCL group"), "{err:#}");

        let mut comms = NcclComm::group_of(std::slice::from_ref(&gpu), GpuDtype::Bf16)
            .expect("an NCCL group of one GPU");
        assert_eq!((comms[0].rank(), comms[0].world_size()), (0, 1));
        be.join_nccl_group(comms.remove(0))
            .expect("joining the group");
        let before = nccl::all_reduces_queued();
        be.all_reduce_sum(&mut x).expect("all-reduce");
        assert!(nccl::all_reduces_queued() > before);
        assert_eq!(to_host(&be, &x), data);
        be.nccl().expect("joined").barrier().expect("barrier");

        let again = NcclComm::group_of(std::slice::from_ref(&gpu), GpuDtype::Bf16)
            .expect("a second group")
            .remove(0);
        assert!(be.join_nccl_group(again).is_err(), "a backend joins once");
        let f16 = NcclComm::group_of(std::slice::from_ref(&gpu), GpuDtype::F16)
            .expect("an f16 group")
            .remove(0);
        let other = backend(&gpu);
        assert!(
            other.join_nccl_group(f16).is_err(),
            "an f16 group on a bf16 backend"
        );
    }

    #[test]
    fn collectives_over_gpus_of_one_process_match_the_cpu() {
        let Some((_lock, found)) = gpus("collectives_over_gpus_of_one_process_match_the_cpu", 2)
        else {
            return;
        };
        for world in [2, found.min(4)] {
            let devices: Vec<Arc<Gpu>> = (0..world)
                .map(|i| Arc::new(Gpu::new(i).expect("a CUDA context")))
                .collect();
            let comms = NcclComm::group_of(&devices, GpuDtype::Bf16).expect("an NCCL group");
            let bes: Vec<CudaBackend> = devices.iter().map(backend).collect();
            let (rows, cols) = (2, 96);
            let n = rows * cols;

            let mut xs: Vec<CudaTensor> = (0..world)
                .map(|r| upload(&bes[r], rows, cols, &exact_values(r, n)))
                .collect();
            NcclComm::grouped(|| {
                for (c, x) in comms.iter().zip(xs.iter_mut()) {
                    c.all_reduce_sum(x)?;
                }
                Ok(())
            })
            .expect("all-reduce");
            let want: Vec<f32> = (0..n)
                .map(|i| (0..world).map(|r| exact_values(r, n)[i]).sum())
                .collect();
            for r in 0..world {
                assert_eq!(
                    to_host(&bes[r], &xs[r]),
                    want,
                    "all-reduce on rank {r} of {world}"
                );
            }

            let sends: Vec<CudaTensor> = (0..world)
                .map(|r| upload(&bes[r], rows, cols, &exact_values(r + 5, n)))
                .collect();
            let mut outs: Vec<CudaTensor> = (0..world)
                .map(|r| upload(&bes[r], rows * world, cols, &vec![f32::NAN; n * world]))
                .collect();
            NcclComm::grouped(|| {
                for ((c, s), o) in comms.iter().zip(&sends).zip(outs.iter_mut()) {
                    c.all_gather(s, o)?;
                }
                Ok(())
            })
            .expect("all-gather");
            let gathered: Vec<f32> = (0..world).flat_map(|r| exact_values(r + 5, n)).collect();
            for r in 0..world {
                assert_eq!(
                    to_host(&bes[r], &outs[r]),
                    gathered,
                    "all-gather on rank {r}"
                );
            }

            let root = world - 1;
            let mut bufs: Vec<CudaTensor> = (0..world)
                .map(|r| upload(&bes[r], rows, cols, &exact_values(r + 9, n)))
                .collect();
            NcclComm::grouped(|| {
                for (c, b) in comms.iter().zip(bufs.iter_mut()) {
                    c.broadcast(b, root)?;
                }
                Ok(())
            })
            .expect("broadcast");
            for r in 0..world {
                assert_eq!(
                    to_host(&bes[r], &bufs[r]),
                    exact_values(root + 9, n),
                    "broadcast to rank {r}"
                );
            }
        }
    }

    #[test]
    fn ranks_join_by_the_unique_ids_bytes_from_their_own_threads() {
        let Some(_lock) = gpus(
            "ranks_join_by_the_unique_ids_bytes_from_their_own_threads",
            2,
        ) else {
            return;
        };
        let world = 2;
        let id = NcclUniqueId::new().expect("an NCCL unique id");
        let wire = id.to_bytes().to_vec();
        let (rows, cols) = (1, 128);
        let results: Vec<Vec<f32>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..world)
                .map(|rank| {
                    let wire = wire.clone();
                    s.spawn(move || {
                        let gpu = Arc::new(Gpu::new(rank).expect("a CUDA context"));
                        let be = backend(&gpu);
                        let id = NcclUniqueId::from_bytes(&wire).expect("the id's bytes");
                        let comm = NcclComm::join(gpu.clone(), &id, rank, world, GpuDtype::Bf16)
                            .expect("joining by unique id");
                        be.join_nccl_group(comm).expect("joining the backend");
                        let mut x = upload(&be, rows, cols, &exact_values(rank, rows * cols));
                        be.all_reduce_sum(&mut x).expect("all-reduce");
                        be.nccl().expect("joined").barrier().expect("barrier");
                        to_host(&be, &x)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("rank thread"))
                .collect()
        });
        let want: Vec<f32> = (0..rows * cols)
            .map(|i| exact_values(0, rows * cols)[i] + exact_values(1, rows * cols)[i])
            .collect();
        for (rank, got) in results.iter().enumerate() {
            assert_eq!(got, &want, "rank {rank}");
        }
    }

    // ---- The engine -------------------------------------------------------------------

    fn fixture(name: &str) -> PathBuf {
        let root = std::env::var_os("RVLLM_FIXTURES_DIR")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures"));
        let dir = root.join("tiny").join(name);
        assert!(
            dir.join("config.json").is_file(),
            "missing fixture {}",
            dir.display()
        );
        dir
    }

    fn engine(model: &Path, tp: usize, eager: bool) -> Llm {
        let args = EngineArgs {
            model: model.to_str().expect("UTF-8 path").to_string(),
            device: "cuda".into(),
            dtype: "bfloat16".into(),
            max_model_len: Some(256),
            gpu_memory_utilization: 0.3,
            enforce_eager: eager,
            tensor_parallel_size: tp,
            disable_progress: true,
            ..EngineArgs::default()
        };
        Llm::new(&args).unwrap_or_else(|e| panic!("starting the engine at TP {tp}: {e:#}"))
    }

    /// `n` greedy tokens of every prompt, all in one batch, and `step` of each step's
    /// logprobs (top 5).
    fn greedy_steps<T>(
        llm: &mut Llm,
        prompts: &[Vec<u32>],
        n: usize,
        step: impl Fn(&TokenLogprobs) -> T,
    ) -> Vec<(Vec<u32>, Vec<T>)> {
        let params = SamplingParams {
            temperature: 0.0,
            ignore_eos: true,
            max_tokens: Some(n),
            logprobs: Some(5),
            ..SamplingParams::default()
        };
        let outs: Vec<RequestOutput> = llm
            .generate(prompts, std::slice::from_ref(&params), |_| {})
            .unwrap_or_else(|e| panic!("generate: {e:#}"));
        outs.into_iter()
            .map(|o| {
                let c = &o.outputs[0];
                (c.token_ids.clone(), c.logprobs.iter().map(&step).collect())
            })
            .collect()
    }

    /// Greedy tokens and top-5 ids per step of every prompt, all in one batch.
    fn greedy(llm: &mut Llm, prompts: &[Vec<u32>], n: usize) -> Vec<(Vec<u32>, Vec<Vec<u32>>)> {
        greedy_steps(llm, prompts, n, |l| {
            l.top.iter().map(|(id, _)| *id).collect()
        })
    }

    fn prompts() -> Vec<Vec<u32>> {
        vec![vec![1, 15, 27, 99, 4, 8], (2..40).collect(), vec![7; 12]]
    }

    /// One run of the prompts on each path: greedy tokens and, per prompt, every step's
    /// chosen-token logprob then its top-5 logprobs.
    struct Tp1Runs {
        plain: (Vec<Vec<u32>>, Vec<Vec<f32>>),
        via_nccl: (Vec<Vec<u32>>, Vec<Vec<f32>>),
        /// All-reduces the NCCL run queued.
        queued: u64,
    }

    /// The same prompts on the plain path and on the NCCL path at tensor-parallel size 1
    /// (`RVLLM_NCCL_TP1=1`, read when the engine starts).
    fn plain_and_nccl_at_tp1(model: &Path, eager: bool) -> Tp1Runs {
        let run = |nccl: bool| {
            if nccl {
                std::env::set_var(nccl::NCCL_AT_TP1_ENV, "1");
            } else {
                std::env::remove_var(nccl::NCCL_AT_TP1_ENV);
            }
            let out = greedy_logprobs(&mut engine(model, 1, eager), &prompts(), 32);
            std::env::remove_var(nccl::NCCL_AT_TP1_ENV);
            out
        };
        let plain = run(false);
        let before = nccl::all_reduces_queued();
        let via_nccl = run(true);
        Tp1Runs {
            plain,
            via_nccl,
            queued: nccl::all_reduces_queued() - before,
        }
    }

    /// On one GPU (the test is skipped without), with decode graphs then eager: the prompts on
    /// the plain path and on the NCCL path at TP 1, checked to have queued all-reduces, then
    /// handed to `check` with whether the run was eager.
    fn each_tp1_run(test: &str, check: impl Fn(bool, &Tp1Runs)) {
        let Some(_lock) = gpus(test, 1) else {
            return;
        };
        let model = fixture("llama3_hd64");
        for eager in [false, true] {
            let runs = plain_and_nccl_at_tp1(&model, eager);
            assert!(
                runs.queued > 0,
                "RVLLM_NCCL_TP1=1 queued no all-reduce: the engine did not take the NCCL path"
            );
            check(eager, &runs);
        }
    }

    /// Greedy tokens of every prompt (one batch) and, per prompt, every step's chosen-token
    /// logprob followed by its top-5 logprobs.
    fn greedy_logprobs(
        llm: &mut Llm,
        prompts: &[Vec<u32>],
        n: usize,
    ) -> (Vec<Vec<u32>>, Vec<Vec<f32>>) {
        greedy_steps(llm, prompts, n, |l| {
            std::iter::once(l.logprob)
                .chain(l.top.iter().map(|t| t.1))
                .collect::<Vec<f32>>()
        })
        .into_iter()
        .map(|(tokens, steps)| (tokens, steps.concat()))
        .unzip()
    }

    /// The acceptance check of the one-GPU NCCL path: a group of one, its all-reduces
    /// called (and captured into the decode graphs), the same greedy tokens as without.
    #[test]
    fn the_nccl_path_on_one_gpu_gives_the_same_tokens() {
        each_tp1_run(
            "the_nccl_path_on_one_gpu_gives_the_same_tokens",
            |eager, runs| {
                for (i, (a, b)) in runs.plain.0.iter().zip(&runs.via_nccl.0).enumerate() {
                    assert_eq!(
                        a, b,
                        "prompt {i} (eager {eager}): tokens differ on the NCCL path"
                    );
                }
            },
        );
    }

    /// The NCCL path is the single-GPU path plus one in-place all-reduce per row-parallel
    /// projection, not a path of its own: the fused kernels stay (rank 0 of a group adds the
    /// residual in the projection's fused store, as one GPU does, and the all-reduce sums the
    /// residual in place), and an in-place all-reduce over a group of one changes nothing
    /// (NCCL queues no work for it). So every logprob is the plain path's, bit for bit; an
    /// unfused TP path rounds in other places and fails here.
    #[test]
    fn the_nccl_path_on_one_gpu_runs_the_single_gpu_kernels() {
        each_tp1_run(
            "the_nccl_path_on_one_gpu_runs_the_single_gpu_kernels",
            |eager, runs| {
                assert_eq!(
                    runs.plain.0, runs.via_nccl.0,
                    "eager {eager}: tokens differ"
                );
                for (i, (a, b)) in runs.plain.1.iter().zip(&runs.via_nccl.1).enumerate() {
                    let worst = a
                        .iter()
                        .zip(b)
                        .map(|(x, y)| (x - y).abs())
                        .fold(0f32, f32::max);
                    loud(&format!(
                        "gpu_nccl: prompt {i} (eager {eager}): max |logprob difference| of \
                         the NCCL path at TP 1 = {worst:e} (expected 0)"
                    ));
                    let same_bits = a.len() == b.len()
                        && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
                    assert!(
                        same_bits,
                        "prompt {i} (eager {eager}): the NCCL path's logprobs differ from the \
                         plain path's (max {worst:e}): it does not run the single-GPU kernels"
                    );
                }
            },
        );
    }

    /// `--tensor-parallel-size 2` against 1, by the bf16 rule: identical greedy tokens, or at
    /// the first difference each side's token in the other's top 5. Both with decode graphs
    /// (every rank replays its own, the all-reduces captured) and eager; TP 2 runs the
    /// runner's ranks on GPUs 0 and 1 (`runner/gpu/tensor_parallel.rs`).
    #[test]
    fn tensor_parallel_two_matches_one_by_the_top5_rule() {
        let Some(_lock) = gpus("tensor_parallel_two_matches_one_by_the_top5_rule", 2) else {
            return;
        };
        for (name, eager) in [
            ("llama3_hd64", false),
            ("qwen2_hd128", false),
            ("llama3_hd64", true),
        ] {
            let model = fixture(name);
            let one = greedy(&mut engine(&model, 1, eager), &prompts(), 32);
            let before = nccl::all_reduces_queued();
            let two = greedy(&mut engine(&model, 2, eager), &prompts(), 32);
            assert!(
                nccl::all_reduces_queued() > before,
                "{name}: TP 2 queued no NCCL all-reduce"
            );
            let failures: Vec<String> = one
                .iter()
                .zip(&two)
                .enumerate()
                .filter_map(|(i, (a, b))| {
                    check_greedy_against_reference(
                        &format!("{name} prompt {i} (eager {eager}) TP 2 vs 1"),
                        &b.0,
                        &b.1,
                        &a.0,
                        &a.1,
                        0,
                    )
                })
                .collect();
            assert!(failures.is_empty(), "{}", failures.join("\n"));
        }
    }
}
