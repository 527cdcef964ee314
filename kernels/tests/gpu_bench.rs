//! Timings of the kernels that decide decode and prefill speed, on Llama-3.1-8B shapes (32 query
//! heads, 8 KV heads, head dim 128, KV block 16). Not timed tests: they are `#[ignore]`d and
//! print a table; run them on a GPU with
//! `gpu_bench-<hash> --ignored --nocapture --test-threads=1`.
mod gpu_harness;

use gpu_harness::{gpu, inv_freq, Buf, Gpu};
use half::bf16;
use rvllm_kernels::{args, decode_smem, KernelArgs};

/// Fast deterministic filler (xorshift64*): bf16 values in [-1, 1), never all zero.
fn filler(n: usize, mut s: u64) -> Vec<bf16> {
    (0..n)
        .map(|_| {
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            let r = s.wrapping_mul(0x2545F4914F6CDD1D);
            bf16::from_f32(((r >> 40) as f32 / 8_388_608.0) - 1.0)
        })
        .collect()
}

struct DecodeSetup {
    q: Buf<bf16>,
    k: Buf<bf16>,
    v: Buf<bf16>,
    tables: Buf<i32>,
    ctx: Buf<i32>,
    max_blocks: usize,
}

const NH: usize = 32;
const NKV: usize = 8;
const HD: usize = 128;
const BS: usize = 16;

fn decode_setup(g: &Gpu, batch: usize, ctx: usize) -> DecodeSetup {
    let max_blocks = ctx.div_ceil(BS);
    let num_blocks = batch * max_blocks;
    // Physical blocks in a scrambled (but fixed) order, as after some churn in the allocator.
    let tables: Vec<i32> = (0..num_blocks)
        .map(|i| ((i * 7919) % num_blocks) as i32)
        .collect();
    let elems = num_blocks * BS * NKV * HD;
    DecodeSetup {
        // The new tokens' fused QKV rows (q, then k and v).
        q: g.upload(&filler(batch * (NH + 2 * NKV) * HD, 1)),
        k: g.upload(&filler(elems, 2)),
        v: g.upload(&filler(elems, 3)),
        tables: g.upload(&tables),
        ctx: g.upload(&vec![ctx as i32; batch]),
        max_blocks,
    }
}

/// (eager milliseconds, microseconds inside a CUDA graph of 32 calls) per call, with the grid
/// `target` blocks deep as the engine's graphs have it, RoPE of the new token included (its
/// cache write skipped, so that every call sees the same cache).
fn time_decode(
    g: &Gpu,
    s: &DecodeSetup,
    batch: usize,
    ctx: usize,
    target: usize,
    fold: bool,
) -> (f32, f32) {
    let depth = target;
    // Arrival counters (zero, and left zero by every call); null: the reduce kernel merges.
    let semaphores = g.upload(&vec![0i32; batch * NKV]);
    let sem = if fold { semaphores.ptr } else { 0 };
    let out = g.poisoned(batch * NH * HD, bf16::NAN);
    let po = g.poisoned(batch * NH * depth * HD, f32::NAN);
    let pml = g.poisoned(batch * NH * depth * 2, f32::NAN);
    let positions = g.upload(&vec![ctx as i32 - 1; batch]);
    let slots = g.upload(&vec![-1i32; batch]);
    let freqs = g.upload(&inv_freq(HD, 500_000.0));
    let f = g.function("attention_decode", "paged_attention_decode_hd128_g4");
    let smem = decode_smem::full(4);
    g.allow_smem(f, smem);
    let red = g.function("attention_decode", "paged_attention_decode_reduce");
    let scale = 1.0f32 / (HD as f32).sqrt();
    let stride = (NH + 2 * NKV) * HD;
    let k_new = s.q.ptr + (NH * HD * 2) as u64;
    let v_new = k_new + (NKV * HD * 2) as u64;
    let call = |stream: cudarc::driver::sys::CUstream| {
        g.launch_on_smem(
            stream,
            f,
            (NKV as u32, batch as u32, depth as u32),
            (128, 1, 1),
            smem,
            args::DecodeAttention {
                out: out.ptr,
                partial_out: po.ptr,
                partial_ml: pml.ptr,
                semaphores: sem,
                q: s.q.ptr,
                k_new,
                v_new,
                qkv_stride: stride as i32,
                key_cache: s.k.ptr,
                value_cache: s.v.ptr,
                block_tables: s.tables.ptr,
                context_lens: s.ctx.ptr,
                positions: positions.ptr,
                slot_mapping: slots.ptr,
                inv_freq: freqs.ptr,
                scale,
                num_heads: NH as i32,
                num_kv_heads: NKV as i32,
                block_size: BS as i32,
                max_blocks_per_seq: s.max_blocks as i32,
                target_partitions: target as i32,
            },
        );
        if depth > 1 && !fold {
            g.launch_on(
                stream,
                red,
                (NH as u32, batch as u32, 1),
                (256, 1, 1),
                args::PagedAttentionDecodeReduce {
                    out: out.ptr,
                    partial_out: po.ptr,
                    partial_ml: pml.ptr,
                    context_lens: s.ctx.ptr,
                    num_heads: NH as i32,
                    head_dim: HD as i32,
                    max_partitions: depth as i32,
                    target_partitions: target as i32,
                },
            );
        }
    };
    let eager = g.time_ms(20, || call(std::ptr::null_mut()));
    let graphed = g.graph_time_us(32, call);
    (eager, graphed)
}

#[test]
#[ignore = "benchmark: run on a GPU with --ignored"]
fn bench_decode_attention() {
    let Some(g) = gpu("bench_decode_attention") else {
        return;
    };
    println!(
        "decode attention on {}: Llama-3.1-8B layer (32 q heads, 8 kv heads, hd 128)",
        g.name
    );
    println!("Eager: one call timed alone (host launch gaps included). Graph: per call, 32 calls in one CUDA graph.");
    println!("Split sequences merge in the last block of each; `reduce`: in a separate kernel.");
    println!(
        "{:>6} {:>7} {:>9} {:>10} {:>9} {:>10} {:>9} {:>10}",
        "batch", "context", "target", "eager us", "GB/s", "graph us", "GB/s", "reduce us"
    );
    // Targets: partitions per sequence (the engine picks 2 * SMs / (batch * kv heads)).
    for &(batch, ctx, parts) in &[
        (1usize, 32768usize, &[64usize, 128, 512][..]),
        (1, 4096, &[8, 16, 33, 64][..]),
        (1, 1024, &[4, 8, 16, 33][..]),
        (1, 384, &[1, 3, 6, 33][..]),
        (1, 128, &[1, 2, 33][..]),
        (64, 2048, &[1, 4, 8][..]),
        (64, 4096, &[1, 8][..]),
        (256, 512, &[1, 2][..]),
        (512, 384, &[1, 2][..]),
    ] {
        let s = decode_setup(&g, batch, ctx);
        for &p in parts {
            let (ms, us) = time_decode(&g, &s, batch, ctx, p, true);
            let (_, us_reduce) = time_decode(&g, &s, batch, ctx, p, false);
            let bytes = (batch * ctx * NKV * HD * 2 * 2) as f64;
            println!(
                "{batch:>6} {ctx:>7} {p:>9} {:>10.1} {:>9.0} {:>10.1} {:>9.0} {:>10.1}",
                ms * 1e3,
                bytes / (ms as f64 * 1e-3) / 1e9,
                us,
                bytes / (us as f64 * 1e-6) / 1e9,
                us_reduce
            );
        }
    }
}

#[test]
#[ignore = "benchmark: run on a GPU with --ignored"]
fn bench_prefill_attention() {
    let Some(g) = gpu("bench_prefill_attention") else {
        return;
    };
    println!(
        "prefill attention on {}: 32 q heads, 8 kv heads, hd 128, one chunk per sequence",
        g.name
    );
    println!(
        "{:>5} {:>6} {:>10} {:>9}",
        "seqs", "chunk", "time (us)", "TFLOP/s"
    );
    for &(seqs, len) in &[(1usize, 2048usize), (1, 512), (16, 256), (4, 4096)] {
        let s = decode_setup(&g, seqs, len);
        let q = g.upload(&filler(seqs * len * NH * HD, 5));
        let out = g.poisoned(seqs * len * NH * HD, bf16::NAN);
        let cu: Vec<i32> = (0..=seqs).map(|i| (i * len) as i32).collect();
        let cu = g.upload(&cu);
        let f = g.function("attention_prefill", "paged_attention_prefill_hd128");
        let scale = 1.0f32 / (HD as f32).sqrt();
        let ms = g.time_ms(10, || {
            g.launch_async(
                f,
                (len.div_ceil(64) as u32, NH as u32, seqs as u32),
                (128, 1, 1),
                args::PrefillAttention {
                    out: out.ptr,
                    q: q.ptr,
                    key_cache: s.k.ptr,
                    value_cache: s.v.ptr,
                    cu_seqlens_q: cu.ptr,
                    context_lens: s.ctx.ptr,
                    block_tables: s.tables.ptr,
                    scale,
                    num_heads: NH as i32,
                    num_kv_heads: NKV as i32,
                    block_size: BS as i32,
                    max_blocks_per_seq: s.max_blocks as i32,
                    q_stride: (NH * HD) as i32,
                }
                .params()
                .as_mut_slice(),
            );
        });
        // Causal: half of the QK^T and PV products, 2 flops per multiply-add.
        let flops = seqs as f64 * 4.0 * (NH * HD) as f64 * (len * len) as f64 / 2.0;
        println!(
            "{seqs:>5} {len:>6} {:>10.1} {:>9.1}",
            ms * 1e3,
            flops / (ms as f64 * 1e-3) / 1e12
        );
    }
}

#[test]
#[ignore = "benchmark: run on a GPU with --ignored"]
fn bench_sampling() {
    let Some(g) = gpu("bench_sampling") else {
        return;
    };
    let vocab = 128_256usize;
    println!("sample_tokens on {}, vocab {vocab}", g.name);
    println!("{:>6} {:>28} {:>10}", "rows", "mode", "time (us)");
    for &b in &[1usize, 64, 256] {
        let logits: Vec<f32> = filler(b * vocab, 9)
            .iter()
            .map(|x| x.to_f32() * 10.0)
            .collect();
        let d_logits = g.upload(&logits);
        for (mode, t, k, p, mp) in [
            ("greedy", 0.0f32, 0i32, 1.0f32, 0.0f32),
            ("temperature", 0.8, 0, 1.0, 0.0),
            ("top-k 50 + top-p 0.9", 0.8, 50, 0.9, 0.0),
            ("top-p 0.95 + min-p 0.05", 0.8, 0, 0.95, 0.05),
        ] {
            let (dt, dk, dp, dm) = (
                g.upload(&vec![t; b]),
                g.upload(&vec![k; b]),
                g.upload(&vec![p; b]),
                g.upload(&vec![mp; b]),
            );
            let (ds, doff) = (g.upload(&vec![7u64; b]), g.upload(&vec![3u64; b]));
            let tokens = g.poisoned(b, -1i32);
            let lps = g.poisoned(b, f32::NAN);
            let f = g.function("sampling", "sample_tokens");
            let ms = g.time_ms(10, || {
                g.launch_async(
                    f,
                    (b as u32, 1, 1),
                    (1024, 1, 1),
                    args::SampleTokens {
                        out_tokens: tokens.ptr,
                        out_logprobs: lps.ptr,
                        logits: d_logits.ptr,
                        vocab: vocab as i32,
                        temperatures: dt.ptr,
                        top_ks: dk.ptr,
                        top_ps: dp.ptr,
                        min_ps: dm.ptr,
                        seeds: ds.ptr,
                        offsets: doff.ptr,
                        filtered_only: 0,
                    }
                    .params()
                    .as_mut_slice(),
                );
            });
            // The multi-block path for rows without filters, timed from a CUDA graph (both
            // launches) as the engine would replay it.
            let plain_us = if k == 0 && p >= 1.0 && mp <= 0.0 {
                let nchunks = (528 / b).clamp(4, 128);
                let partials = g.poisoned(b * nchunks * 5, -1i32);
                let (fp, ff) = (
                    g.function("sampling", "sample_plain_partial"),
                    g.function("sampling", "sample_plain_finish"),
                );
                let us = g.graph_time_us(8, |st| {
                    g.launch_on(
                        st,
                        fp,
                        (nchunks as u32, b as u32, 1),
                        (256, 1, 1),
                        args::SamplePlainPartial {
                            partials: partials.ptr,
                            logits: d_logits.ptr,
                            vocab: vocab as i32,
                            nchunks: nchunks as i32,
                            temperatures: dt.ptr,
                            top_ks: dk.ptr,
                            seeds: ds.ptr,
                            offsets: doff.ptr,
                        },
                    );
                    g.launch_on(
                        st,
                        ff,
                        (b as u32, 1, 1),
                        (32, 1, 1),
                        args::SamplePlainFinish {
                            out_tokens: tokens.ptr,
                            out_logprobs: lps.ptr,
                            partials: partials.ptr,
                            logits: d_logits.ptr,
                            vocab: vocab as i32,
                            nchunks: nchunks as i32,
                            temperatures: dt.ptr,
                            top_ks: dk.ptr,
                        },
                    );
                });
                format!("   plain path ({nchunks} chunks/row, graph): {us:.1} us")
            } else {
                String::new()
            };
            println!("{b:>6} {mode:>28} {:>10.1}{plain_us}", ms * 1e3);
        }
    }
}

/// y = x W^T through cuBLAS (bf16 in and out, f32 compute), as the engine's linear layers.
#[allow(clippy::too_many_arguments)]
fn cublas_linear(
    handle: cudarc::cublas::sys::cublasHandle_t,
    y: u64,
    x: u64,
    w: u64,
    m: usize,
    n: usize,
    k: usize,
) {
    use cudarc::cublas::{result as blas, sys as bs};
    let (alpha, beta) = (1.0f32, 0.0f32);
    unsafe {
        blas::gemm_ex(
            handle,
            bs::cublasOperation_t::CUBLAS_OP_T,
            bs::cublasOperation_t::CUBLAS_OP_N,
            n as i32,
            m as i32,
            k as i32,
            &alpha as *const f32 as *const _,
            w as *const _,
            bs::cudaDataType::CUDA_R_16BF,
            k as i32,
            x as *const _,
            bs::cudaDataType::CUDA_R_16BF,
            k as i32,
            &beta as *const f32 as *const _,
            y as *mut _,
            bs::cudaDataType::CUDA_R_16BF,
            n as i32,
            bs::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            bs::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
        .expect("cublasGemmEx");
    }
}

#[test]
#[ignore = "benchmark: run on a GPU with --ignored"]
fn bench_gemv_vs_cublas() {
    let Some(g) = gpu("bench_gemv_vs_cublas") else {
        return;
    };
    let handle = cudarc::cublas::result::create_handle().expect("cuBLAS handle");
    println!(
        "small-batch linear layers on {}: gemv_bf16 vs cuBLAS GemmEx (bf16, f32 compute)",
        g.name
    );
    println!("weights rotate over several copies so that L2 does not hold them; GB/s counts weight bytes");
    println!(
        "{:>8} {:>6} {:>6} {:>2} {:>9} {:>9} {:>9} {:>9} {:>11} {:>9}",
        "layer",
        "n",
        "k",
        "m",
        "split1 us",
        "split2 us",
        "split4 us",
        "best GB/s",
        "cublas us",
        "GB/s"
    );
    for &(name, n, k) in &[
        ("qkv", 6144usize, 4096usize),
        ("o_proj", 4096, 4096),
        ("gate_up", 28672, 4096),
        ("down", 4096, 14336),
        ("lm_head", 128256, 4096),
    ] {
        let bytes = n * k * 2;
        let copies = (400_000_000usize.div_ceil(bytes)).clamp(2, 8);
        let host = filler(n * k, 11);
        let ws: Vec<Buf<bf16>> = (0..copies).map(|_| g.upload(&host)).collect();
        for &m in &[1usize, 2, 4] {
            let x = g.upload(&filler(m * k, 12));
            let y1 = g.poisoned(m * n, bf16::NAN);
            let y2 = g.poisoned(m * n, bf16::NAN);
            let bt = [1usize, 2, 4, 8].into_iter().find(|&b| b >= m).unwrap();
            let f = g.function("gemv", &format!("gemv_bf16_b{bt}"));
            let reps = 4 * copies;
            let mut ours = Vec::new();
            for split in [1i32, 2, 4] {
                let blocks = n.div_ceil(8 / split as usize) as u32;
                ours.push(
                    g.time_ms(10, || {
                        for i in 0..reps {
                            g.launch_async(
                                f,
                                (blocks, 1, 1),
                                (256, 1, 1),
                                args::Gemv {
                                    y: y1.ptr,
                                    x: x.ptr,
                                    w: ws[i % copies].ptr,
                                    m: m as i32,
                                    n: n as i32,
                                    k: k as i32,
                                    split,
                                }
                                .params()
                                .as_mut_slice(),
                            );
                        }
                    }) * 1e3
                        / reps as f32,
                );
            }
            let theirs = g.time_ms(10, || {
                for i in 0..reps {
                    cublas_linear(handle, y2.ptr, x.ptr, ws[i % copies].ptr, m, n, k);
                }
            }) * 1e3
                / reps as f32;
            let (a, b) = (g.download_bf16(&y1), g.download_bf16(&y2));
            let rel = a
                .iter()
                .zip(&b)
                .map(|(p, q)| (p - q).abs() / q.abs().max(1.0))
                .fold(0.0f32, f32::max);
            assert!(
                rel < 3e-2,
                "{name} m{m}: gemv and cuBLAS differ by {rel} (relative)"
            );
            let gbs = |us: f32| bytes as f64 / (us as f64 * 1e-6) / 1e9;
            let best = ours.iter().cloned().fold(f32::INFINITY, f32::min);
            println!(
                "{name:>8} {n:>6} {k:>6} {m:>2} {:>9.1} {:>9.1} {:>9.1} {:>9.0} {theirs:>11.1} {:>9.0}",
                ours[0],
                ours[1],
                ours[2],
                gbs(best),
                gbs(theirs)
            );
        }
    }
}

#[test]
#[ignore = "benchmark: run on a GPU with --ignored"]
fn bench_decode_step_kernels() {
    let Some(g) = gpu("bench_decode_step_kernels") else {
        return;
    };
    // One batch-1 decode token of the Llama-3.1-8B shape, kernel by kernel, each timed as one
    // of 32 identical calls in a CUDA graph (as the engine replays decode steps).
    let (hidden, inter, vocab) = (4096usize, 14336usize, 128_256usize);
    let qkv_w = (NH + 2 * NKV) * HD;
    println!(
        "batch-1 decode kernels on {} (per call, from a CUDA graph of 32 calls)",
        g.name
    );
    let table = g.upload(&filler(vocab * hidden, 21));
    let ids = g.upload(&[1234i32]);
    let h = g.poisoned(hidden, bf16::NAN);
    let res = g.upload(&filler(hidden, 22));
    let x = g.upload(&filler(hidden, 23));
    let w = g.upload(&filler(hidden, 24));
    let qkv = g.upload(&filler(qkv_w, 25));
    let gate_up = g.upload(&filler(2 * inter, 26));
    let act = g.poisoned(inter, bf16::NAN);
    let kc = g.upload(&filler(64 * BS * NKV * HD, 27));
    let vc = g.upload(&filler(64 * BS * NKV * HD, 28));
    let pos = g.upload(&[383i32]);
    let slot = g.upload(&[500i32]);
    let inv: Vec<f32> = (0..HD / 2)
        .map(|i| 500_000f32.powf(-(2.0 * i as f32) / HD as f32))
        .collect();
    let inv = g.upload(&inv);
    let logits: Vec<f32> = filler(vocab, 29)
        .iter()
        .map(|v| v.to_f32() * 10.0)
        .collect();
    let logits = g.upload(&logits);
    let samp = (
        g.upload(&[0.0f32]),
        g.upload(&[0i32]),
        g.upload(&[1.0f32]),
        g.upload(&[0.0f32]),
        g.upload(&[1u64]),
        g.upload(&[2u64]),
    );
    let tok = g.poisoned(1, -1i32);
    let lp = g.poisoned(1, f32::NAN);
    let eps = 1e-5f32;
    let q_ptr = qkv.ptr;
    let k_ptr = q_ptr + (NH * HD * 2) as u64;
    let v_ptr = k_ptr + (NKV * HD * 2) as u64;
    let mut rows: Vec<(&str, f32)> = Vec::new();
    let f = g.function("embedding", "embedding_lookup_bf16");
    rows.push((
        "embedding_lookup",
        g.graph_time_us(32, |st| {
            g.launch_on(
                st,
                f,
                (1, 1, 1),
                (256, 1, 1),
                args::EmbeddingLookup {
                    out: h.ptr,
                    table: table.ptr,
                    ids: ids.ptr,
                    num_tokens: 1,
                    hidden: hidden as i32,
                    vocab: vocab as i32,
                },
            )
        }),
    ));
    let f = g.function("norm", "fused_add_rms_norm_bf16");
    rows.push((
        "fused_add_rms_norm (x2/layer)",
        g.graph_time_us(32, |st| {
            g.launch_on(
                st,
                f,
                (1, 1, 1),
                (256, 1, 1),
                args::FusedAddRmsNorm {
                    out: h.ptr,
                    residual: res.ptr,
                    x: x.ptr,
                    weight: w.ptr,
                    eps,
                    num_tokens: 1,
                    hidden: hidden as i32,
                },
            )
        }),
    ));
    let f = g.function("rope_cache", "rope_and_cache_bf16");
    rows.push((
        "rope_and_cache",
        g.graph_time_us(32, |st| {
            g.launch_on(
                st,
                f,
                (1, 1, 1),
                (256, 1, 1),
                args::RopeAndCache {
                    q: q_ptr,
                    k: k_ptr,
                    v: v_ptr,
                    key_cache: kc.ptr,
                    value_cache: vc.ptr,
                    positions: pos.ptr,
                    slot_mapping: slot.ptr,
                    inv_freq: inv.ptr,
                    num_tokens: 1,
                    num_heads: NH as i32,
                    num_kv_heads: NKV as i32,
                    head_dim: HD as i32,
                    q_stride: qkv_w as i32,
                    k_stride: qkv_w as i32,
                    v_stride: qkv_w as i32,
                },
            )
        }),
    ));
    let f = g.function("activation", "silu_and_mul_bf16");
    rows.push((
        "silu_and_mul",
        g.graph_time_us(32, |st| {
            g.launch_on(
                st,
                f,
                (inter.div_ceil(2048) as u32, 1, 1),
                (256, 1, 1),
                args::SiluAndMul {
                    out: act.ptr,
                    r#in: gate_up.ptr,
                    num_tokens: 1,
                    inter: inter as i32,
                },
            )
        }),
    ));
    let s = decode_setup(&g, 1, 384);
    rows.push((
        "decode attention ctx 384 (target 33)",
        time_decode(&g, &s, 1, 384, 33, true).1,
    ));
    for (name, n, k) in [
        ("gemv qkv", qkv_w, hidden),
        ("gemv o_proj", hidden, hidden),
        ("gemv gate_up", 2 * inter, hidden),
        ("gemv down", hidden, inter),
    ] {
        let wm = g.upload(&filler(n * k, 30));
        let xin = g.upload(&filler(k, 31));
        let y = g.poisoned(n, bf16::NAN);
        let f = g.function("gemv", "gemv_bf16_b1");
        // One weight matrix replayed 32 times: small ones sit in L2, so this is a lower bound.
        rows.push((
            name,
            g.graph_time_us(32, |st| {
                g.launch_on(
                    st,
                    f,
                    (n.div_ceil(2) as u32, 1, 1),
                    (256, 1, 1),
                    args::Gemv {
                        y: y.ptr,
                        x: xin.ptr,
                        w: wm.ptr,
                        m: 1,
                        n: n as i32,
                        k: k as i32,
                        split: 4,
                    },
                )
            }),
        ));
    }
    let f = g.function("sampling", "sample_tokens");
    rows.push((
        "sample_tokens greedy (per token)",
        g.graph_time_us(32, |st| {
            g.launch_on(
                st,
                f,
                (1, 1, 1),
                (1024, 1, 1),
                args::SampleTokens {
                    out_tokens: tok.ptr,
                    out_logprobs: lp.ptr,
                    logits: logits.ptr,
                    vocab: vocab as i32,
                    temperatures: samp.0.ptr,
                    top_ks: samp.1.ptr,
                    top_ps: samp.2.ptr,
                    min_ps: samp.3.ptr,
                    seeds: samp.4.ptr,
                    offsets: samp.5.ptr,
                    filtered_only: 0,
                },
            )
        }),
    ));
    for (name, us) in &rows {
        println!("{name:>34} {us:>8.1} us");
    }
}

/// One cuBLASLt bf16 matmul set-up for row-major `y[m, n] = x[m, k] @ w[n, k]^T` (the
/// engine's linear layers: "TN" in cuBLASLt's column-major terms) and the first `want`
/// algorithms its heuristic offers for it, best guess first.
struct LtGemm {
    desc: cudarc::cublaslt::sys::cublasLtMatmulDesc_t,
    layouts: [cudarc::cublaslt::sys::cublasLtMatrixLayout_t; 3],
    algos: Vec<cudarc::cublaslt::sys::cublasLtMatmulHeuristicResult_t>,
}

const LT_BENCH_WORKSPACE: usize = 32 << 20;

impl LtGemm {
    fn new(
        h: cudarc::cublaslt::sys::cublasLtHandle_t,
        m: usize,
        n: usize,
        k: usize,
        want: usize,
    ) -> Self {
        use cudarc::cublaslt::{result as lt, sys as ls};
        use ls::cublasLtMatmulDescAttributes_t as A;
        unsafe {
            let desc = lt::create_matmul_desc(
                ls::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                ls::cudaDataType::CUDA_R_32F,
            )
            .expect("matmul desc");
            let (op_t, op_n) = (1i32, 0i32);
            lt::set_matmul_desc_attribute(
                desc,
                A::CUBLASLT_MATMUL_DESC_TRANSA,
                &op_t as *const i32 as *const _,
                4,
            )
            .unwrap();
            lt::set_matmul_desc_attribute(
                desc,
                A::CUBLASLT_MATMUL_DESC_TRANSB,
                &op_n as *const i32 as *const _,
                4,
            )
            .unwrap();
            let bf = ls::cudaDataType::CUDA_R_16BF;
            let layouts = [
                lt::create_matrix_layout(bf, k as u64, n as u64, k as i64).unwrap(),
                lt::create_matrix_layout(bf, k as u64, m as u64, k as i64).unwrap(),
                lt::create_matrix_layout(bf, n as u64, m as u64, n as i64).unwrap(),
            ];
            let pref = lt::create_matmul_pref().unwrap();
            let ws = LT_BENCH_WORKSPACE;
            lt::set_matmul_pref_attribute(
                pref,
                ls::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &ws as *const usize as *const _,
                std::mem::size_of::<usize>(),
            )
            .unwrap();
            let mut algos = vec![std::mem::zeroed::<ls::cublasLtMatmulHeuristicResult_t>(); want];
            let mut found = 0i32;
            ls::cublasLtMatmulAlgoGetHeuristic(
                h,
                desc,
                layouts[0],
                layouts[1],
                layouts[2],
                layouts[2],
                pref,
                want as i32,
                algos.as_mut_ptr(),
                &mut found,
            )
            .result()
            .expect("cublasLtMatmulAlgoGetHeuristic");
            lt::destroy_matmul_pref(pref).unwrap();
            algos.truncate(found.max(0) as usize);
            Self {
                desc,
                layouts,
                algos,
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        h: cudarc::cublaslt::sys::cublasLtHandle_t,
        i: usize,
        y: u64,
        x: u64,
        w: u64,
        ws: u64,
    ) {
        let (alpha, beta) = (1.0f32, 0.0f32);
        let [a, b, c] = self.layouts;
        unsafe {
            cudarc::cublaslt::result::matmul(
                h,
                self.desc,
                &alpha as *const f32 as *const _,
                &beta as *const f32 as *const _,
                w as *const _,
                a,
                x as *const _,
                b,
                y as *const _,
                c,
                y as *mut _,
                c,
                &self.algos[i].algo,
                ws as *mut _,
                LT_BENCH_WORKSPACE,
                std::ptr::null_mut(),
            )
            .expect("cublasLtMatmul");
        }
    }
}

impl Drop for LtGemm {
    fn drop(&mut self) {
        use cudarc::cublaslt::result as lt;
        unsafe {
            for l in self.layouts {
                let _ = lt::destroy_matrix_layout(l);
            }
            let _ = lt::destroy_matmul_desc(self.desc);
        }
    }
}

/// The prefill and mixed-step GEMMs of the benchmark shapes (`--ignored --nocapture`): the
/// engine's cublasGemmEx call against cuBLASLt's first heuristic pick and the best of its
/// first 16 picks timed one by one, in TFLOP/s; each pick's output checked against GemmEx's.
/// The question it answers: how much a per-shape algorithm search would give the throughput
/// runs' steps of ~1,000-16,000 tokens.
#[test]
#[ignore = "benchmark: run on a GPU with --ignored"]
fn bench_gemm_algos() {
    let Some(g) = gpu("bench_gemm_algos") else {
        return;
    };
    let blas = cudarc::cublas::result::create_handle().expect("cuBLAS handle");
    let lt = cudarc::cublaslt::result::create_handle().expect("cuBLASLt handle");
    let ws = g.poisoned(LT_BENCH_WORKSPACE / 4, 0u32);
    println!(
        "bf16 GEMM y = x W^T on {}: TFLOP/s of GemmEx | Lt heuristic #1 | best of 16 (its index)",
        g.name
    );
    for &(name, n, k) in &[
        ("llama qkv", 6144usize, 4096usize),
        ("llama o", 4096, 4096),
        ("llama gate_up", 28672, 4096),
        ("llama down", 4096, 14336),
        ("gemma qkv", 8192, 3840),
        ("gemma o", 3840, 4096),
        ("gemma gate_up", 30720, 3840),
        ("gemma down", 3840, 15360),
        ("qwen3 qkv", 6144, 4096),
        ("qwen3 gate_up", 24576, 4096),
        ("qwen3 down", 4096, 12288),
    ] {
        let w = g.upload(&filler(n * k, 21));
        let mut row = format!("{name:>14} n{n:>6} k{k:>6}");
        for &m in &[512usize, 1024, 1840, 4096, 16384] {
            let x = g.upload(&filler(m * k, 22));
            let y = g.poisoned(m * n, bf16::NAN);
            let flops = 2.0 * (m * n * k) as f64;
            let tf = |ms: f32| flops / (ms as f64 * 1e-3) / 1e12;
            let reps = 10;
            let ex = g.time_ms(reps, || cublas_linear(blas, y.ptr, x.ptr, w.ptr, m, n, k));
            // Outputs checked at the smaller sizes only (poisoning and reading back a 16k-row
            // output for each pick would take longer than the timings).
            let check = m * n <= 64 << 20;
            let want = if check {
                g.download_bf16(&y)
            } else {
                Vec::new()
            };
            let plan = LtGemm::new(lt, m, n, k, 16);
            let mut best = (f32::INFINITY, usize::MAX);
            let mut first = f32::NAN;
            for i in 0..plan.algos.len() {
                if check {
                    g.upload_into(&y, &vec![bf16::NAN; m * n]);
                }
                let ms = g.time_ms(reps, || plan.run(lt, i, y.ptr, x.ptr, w.ptr, ws.ptr));
                if check {
                    let got = g.download_bf16(&y);
                    let bad = got
                        .iter()
                        .zip(&want)
                        .filter(|(a, b)| a.is_nan() || (*a - *b).abs() > 0.05 + 0.02 * b.abs())
                        .count();
                    assert_eq!(
                        bad, 0,
                        "{name} m{m}: cuBLASLt pick {i} differs from GemmEx in {bad} outputs"
                    );
                }
                if i == 0 {
                    first = ms;
                }
                if ms < best.0 {
                    best = (ms, i);
                }
            }
            row.push_str(&format!(
                " | m{m}: {:.0} {:.0} {:.0}({})",
                tf(ex),
                tf(first),
                tf(best.0),
                best.1
            ));
        }
        println!("{row}");
    }
}
