//! Every dtype-dependent rvllm-kernels entry point the CUDA backend launches, each named in
//! both builds and typed by its argument struct (`elem::Kernel<args::...>`): one table, so that
//! a unit test checks each name against the signatures the kernels crate parsed from the
//! `.cu` files, and the GPU tests that each exists in its module.
use super::elem::{kernel, Kernel, NamedKernel};
use rvllm_kernels::args;

pub const EMBEDDING: Kernel<args::EmbeddingLookup> = kernel!(
    args::EmbeddingLookup,
    "embedding",
    "embedding_lookup_bf16",
    "embedding_lookup_f16"
);
pub const GATHER_ROWS: Kernel<args::GatherRows> = kernel!(
    args::GatherRows,
    "embedding",
    "gather_rows_bf16",
    "gather_rows_f16"
);
pub const RMS_NORM: Kernel<args::RmsNorm> =
    kernel!(args::RmsNorm, "norm", "rms_norm_bf16", "rms_norm_f16");
pub const FUSED_ADD_RMS_NORM: Kernel<args::FusedAddRmsNorm> = kernel!(
    args::FusedAddRmsNorm,
    "norm",
    "fused_add_rms_norm_bf16",
    "fused_add_rms_norm_f16"
);
/// `residual += rms_norm(x) * w` (a block's output norm and the residual add).
pub const RMS_NORM_ADD: Kernel<args::RmsNormAdd> = kernel!(
    args::RmsNormAdd,
    "norm",
    "rms_norm_add_bf16",
    "rms_norm_add_f16"
);
pub const HEAD_RMS_NORM: Kernel<args::HeadRmsNorm> = kernel!(
    args::HeadRmsNorm,
    "norm",
    "head_rms_norm_bf16",
    "head_rms_norm_f16"
);
pub const ROPE_AND_CACHE: Kernel<args::RopeAndCache> = kernel!(
    args::RopeAndCache,
    "rope_cache",
    "rope_and_cache_bf16",
    "rope_and_cache_f16"
);
/// Partial rotary (Phi-3/4): only the first `rotary_dim` dims of each head are rotated.
pub const ROPE_PARTIAL_AND_CACHE: Kernel<args::RopePartialAndCache> = kernel!(
    args::RopePartialAndCache,
    "rope_cache",
    "rope_partial_and_cache_bf16",
    "rope_partial_and_cache_f16"
);
pub const SILU_AND_MUL: Kernel<args::SiluAndMul> = kernel!(
    args::SiluAndMul,
    "activation",
    "silu_and_mul_bf16",
    "silu_and_mul_f16"
);
pub const GELU_TANH_AND_MUL: Kernel<args::GeluTanhAndMul> = kernel!(
    args::GeluTanhAndMul,
    "activation",
    "gelu_tanh_and_mul_bf16",
    "gelu_tanh_and_mul_f16"
);
pub const SCALE: Kernel<args::Scale> =
    kernel!(args::Scale, "activation", "scale_bf16", "scale_f16");
pub const SOFTCAP: Kernel<args::Softcap> =
    kernel!(args::Softcap, "activation", "softcap_bf16", "softcap_f16");
pub const ADD: Kernel<args::Add> = kernel!(args::Add, "activation", "add_bf16", "add_f16");
pub const TO_F32: Kernel<args::ElemToF32> =
    kernel!(args::ElemToF32, "activation", "bf16_to_f32", "f16_to_f32");
/// gemv.cu at batch 1: GPUs without the bulk copy engine (before sm_90), and rows gemv_bulk
/// cannot stage.
pub const GEMV_B1: Kernel<args::Gemv> = kernel!(args::Gemv, "gemv", "gemv_bf16_b1", "gemv_f16_b1");
pub const GEMV_SILU_B1: Kernel<args::GemvSiluB1> = kernel!(
    args::GemvSiluB1,
    "gemv",
    "gemv_silu_bf16_b1",
    "gemv_silu_f16_b1"
);
/// GeGLU (Gemma) fused into the batch-1 down projection's input where gemv_bulk does not apply.
pub const GEMV_GELU_B1: Kernel<args::GemvGeluB1> = kernel!(
    args::GemvGeluB1,
    "gemv",
    "gemv_gelu_bf16_b1",
    "gemv_gelu_f16_b1"
);
pub const DECODE_REDUCE: Kernel<args::PagedAttentionDecodeReduce> = kernel!(
    args::PagedAttentionDecodeReduce,
    "attention_decode",
    "paged_attention_decode_reduce",
    "paged_attention_decode_reduce_f16"
);
macro_rules! prefill_windowed {
    ($hd:literal) => {
        (
            $hd,
            kernel!(
                args::PrefillAttentionWindowed,
                "attention_prefill",
                concat!("paged_attention_prefill_windowed_hd", $hd),
                concat!("paged_attention_prefill_windowed_hd", $hd, "_f16")
            ),
        )
    };
}

/// Prefill attention by head dim (the built ones).
pub const PREFILL: [(usize, Kernel<args::PrefillAttention>); 2] = [
    (
        64,
        kernel!(
            args::PrefillAttention,
            "attention_prefill",
            "paged_attention_prefill_hd64",
            "paged_attention_prefill_hd64_f16"
        ),
    ),
    (
        128,
        kernel!(
            args::PrefillAttention,
            "attention_prefill",
            "paged_attention_prefill_hd128",
            "paged_attention_prefill_hd128_f16"
        ),
    ),
];

/// Prefill attention with a sliding window and soft-cap (0 and 0.0: none), by head dim; the
/// engine runs the head dims the plain builds lack (256) through it.
pub const PREFILL_WINDOWED: [(usize, Kernel<args::PrefillAttentionWindowed>); 5] = [
    prefill_windowed!(64),
    prefill_windowed!(80),
    prefill_windowed!(96),
    prefill_windowed!(128),
    prefill_windowed!(256),
];

/// gemv_bulk.cu: `gemv_bulk_<variant>bf16_b1` and its f16 build (4 pipeline stages; the
/// 6-stage builds measured slower and are the kernel tests' benchmarks only).
macro_rules! bulk {
    ($variant:literal) => {
        kernel!(
            args::GemvBulk,
            "gemv_bulk",
            concat!("gemv_bulk_", $variant, "bf16_b1"),
            concat!("gemv_bulk_", $variant, "f16_b1")
        )
    };
}

/// The bulk GEMV's variants.
pub const GEMV_BULK_PLAIN: Kernel<args::GemvBulk> = bulk!("");
pub const GEMV_BULK_SILU: Kernel<args::GemvBulk> = bulk!("silu_");
pub const GEMV_BULK_NORM: Kernel<args::GemvBulk> = bulk!("norm_");
pub const GEMV_BULK_ADD: Kernel<args::GemvBulk> = bulk!("add_");
pub const GEMV_BULK_SILU_ADD: Kernel<args::GemvBulk> = bulk!("silu_add_");
pub const GEMV_BULK_GELU: Kernel<args::GemvBulk> = bulk!("gelu_");
pub const GEMV_BULK_GELU_ADD: Kernel<args::GemvBulk> = bulk!("gelu_add_");

/// gemv_bulk.cu's E4M3 build, `gemv_bulk_fp8_<variant>bf16_b1`: `--quantization fp8` at
/// batch 1 on sm_90+.
macro_rules! bulk_fp8 {
    ($variant:literal) => {
        kernel!(
            args::GemvBulkFp8,
            "gemv_bulk",
            concat!("gemv_bulk_fp8_", $variant, "bf16_b1"),
            concat!("gemv_bulk_fp8_", $variant, "f16_b1")
        )
    };
}

pub const GEMV_BULK_FP8_PLAIN: Kernel<args::GemvBulkFp8> = bulk_fp8!("");
pub const GEMV_BULK_FP8_SILU: Kernel<args::GemvBulkFp8> = bulk_fp8!("silu_");
pub const GEMV_BULK_FP8_NORM: Kernel<args::GemvBulkFp8> = bulk_fp8!("norm_");
pub const GEMV_BULK_FP8_ADD: Kernel<args::GemvBulkFp8> = bulk_fp8!("add_");
pub const GEMV_BULK_FP8_SILU_ADD: Kernel<args::GemvBulkFp8> = bulk_fp8!("silu_add_");

/// fp8_quant.cu: `--quantization fp8`'s per-token activation quantization, the scaled
/// epilogue after cuBLASLt's FP8 GEMM, and the warp-an-output FP8 GEMM for other shapes.
pub const FP8_QUANT_PER_TOKEN: Kernel<args::Fp8QuantPerToken> = kernel!(
    args::Fp8QuantPerToken,
    "fp8_quant",
    "fp8_quant_per_token_bf16",
    "fp8_quant_per_token_f16"
);
pub const FP8_SCALED_EPILOGUE: Kernel<args::Fp8ScaledEpilogue> = kernel!(
    args::Fp8ScaledEpilogue,
    "fp8_quant",
    "fp8_scaled_epilogue_bf16",
    "fp8_scaled_epilogue_f16"
);
pub const FP8_SCALED_MM: Kernel<args::Fp8ScaledMm> = kernel!(
    args::Fp8ScaledMm,
    "fp8_quant",
    "fp8_scaled_mm_bf16",
    "fp8_scaled_mm_f16"
);
/// fp8_gemv.cu: the FP8 linear at 1 to 16 tokens, weight-only (W8A16): the E4M3 weights are
/// streamed once and decoded on the fly, the input stays in the compute type (not quantized).
pub const FP8_GEMV: Kernel<args::Fp8Gemv> =
    kernel!(args::Fp8Gemv, "fp8_gemv", "fp8_gemv_bf16", "fp8_gemv_f16");
/// fp8_gemv.cu with RMSNorm in each block's prologue (batch 1; weight-only, no quantization).
pub const FP8_GEMV_NORM: Kernel<args::Fp8GemvNorm> = kernel!(
    args::Fp8GemvNorm,
    "fp8_gemv",
    "fp8_gemv_norm_bf16",
    "fp8_gemv_norm_f16"
);
/// fp8_gemv.cu with silu_and_mul in each block's prologue (batch 1; weight-only, no
/// quantization).
pub const FP8_GEMV_SILU: Kernel<args::Fp8GemvSilu> = kernel!(
    args::Fp8GemvSilu,
    "fp8_gemv",
    "fp8_gemv_silu_bf16",
    "fp8_gemv_silu_f16"
);

/// (head dim, query heads a block, the full kernel, the compact one) for each tile built.
macro_rules! decode_kernels {
    ($(($hd:literal, $gt:literal)),*) => {
        [$((
            $hd,
            $gt,
            kernel!(
                args::DecodeAttention,
                "attention_decode",
                concat!("paged_attention_decode_hd", $hd, "_g", $gt),
                concat!("paged_attention_decode_hd", $hd, "_g", $gt, "_f16")
            ),
            kernel!(
                args::DecodeAttentionCompact,
                "attention_decode",
                concat!("paged_attention_decode_compact_hd", $hd, "_g", $gt),
                concat!("paged_attention_decode_compact_hd", $hd, "_g", $gt, "_f16")
            ),
        )),*]
    };
}

/// The decode attention kernels of attention_decode.cu.
#[allow(clippy::type_complexity)]
pub const DECODE: [(
    usize,
    usize,
    Kernel<args::DecodeAttention>,
    Kernel<args::DecodeAttentionCompact>,
); 12] = decode_kernels!(
    (64, 1),
    (64, 2),
    (64, 4),
    (64, 8),
    (128, 1),
    (128, 2),
    (128, 4),
    (128, 8),
    (256, 1),
    (256, 2),
    (256, 4),
    (256, 8)
);

/// Every entry point above.
pub fn all() -> Vec<NamedKernel> {
    let mut k = vec![
        EMBEDDING.named(),
        GATHER_ROWS.named(),
        RMS_NORM.named(),
        FUSED_ADD_RMS_NORM.named(),
        RMS_NORM_ADD.named(),
        HEAD_RMS_NORM.named(),
        ROPE_AND_CACHE.named(),
        ROPE_PARTIAL_AND_CACHE.named(),
        SILU_AND_MUL.named(),
        GELU_TANH_AND_MUL.named(),
        SCALE.named(),
        SOFTCAP.named(),
        ADD.named(),
        TO_F32.named(),
        GEMV_B1.named(),
        GEMV_SILU_B1.named(),
        GEMV_GELU_B1.named(),
        DECODE_REDUCE.named(),
    ];
    k.extend(PREFILL.iter().map(|p| p.1.named()));
    for bulk in [
        GEMV_BULK_PLAIN,
        GEMV_BULK_SILU,
        GEMV_BULK_NORM,
        GEMV_BULK_ADD,
        GEMV_BULK_SILU_ADD,
        GEMV_BULK_GELU,
        GEMV_BULK_GELU_ADD,
    ] {
        k.push(bulk.named());
    }
    k.extend(DECODE.iter().flat_map(|d| [d.2.named(), d.3.named()]));
    k.extend(PREFILL_WINDOWED.iter().map(|p| p.1.named()));
    k.extend(super::moe::kernels());
    k.extend(super::backend::windowed_decode::kernels());
    k.extend(super::backend::kv_fp8::kernels());
    k.extend([
        FP8_QUANT_PER_TOKEN.named(),
        FP8_SCALED_EPILOGUE.named(),
        FP8_SCALED_MM.named(),
        FP8_GEMV.named(),
        FP8_GEMV_SILU.named(),
        FP8_GEMV_NORM.named(),
        GEMV_BULK_FP8_PLAIN.named(),
        GEMV_BULK_FP8_SILU.named(),
        GEMV_BULK_FP8_NORM.named(),
        GEMV_BULK_FP8_ADD.named(),
        GEMV_BULK_FP8_SILU_ADD.named(),
    ]);
    k
}

#[cfg(test)]
mod tests {
    use super::super::elem::GpuDtype;
    use super::*;

    /// The f16 build's names follow kernels/src/common.cuh: module `<stem>_f16`, `f16` for
    /// `bf16` in the entry point, or `_f16` appended where the name has no `bf16`.
    #[test]
    fn every_kernel_names_its_f16_build_by_the_rule() {
        let all = all();
        assert_eq!(all.len(), 18 + 2 + 7 + 24 + 5 + 7 + 6 + 5 + 33 + 27);
        for k in &all {
            let (m, n) = k.of(GpuDtype::Bf16);
            let (m16, n16) = k.of(GpuDtype::F16);
            assert_eq!(m16, format!("{m}_f16"), "{n}");
            let want = if n.contains("bf16") {
                n.replace("bf16", "f16")
            } else {
                format!("{n}_f16")
            };
            assert_eq!(n16, want, "{n}");
        }
        let mut names: Vec<_> = all.iter().map(|k| k.of(GpuDtype::Bf16)).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), all.len(), "a kernel is listed twice");
    }

    /// Each entry point the backend names is one that its argument struct was generated from
    /// (the same module and names in both builds): a misspelled name, or a kernel launched
    /// with another kernel's arguments, fails here without a GPU.
    #[test]
    fn every_kernel_is_declared_by_its_argument_struct() {
        for k in all() {
            let (module, name) = k.of(GpuDtype::Bf16);
            let want = rvllm_kernels::Entry {
                module,
                name,
                f16: Some(k.of(GpuDtype::F16)),
            };
            assert!(
                k.declared.contains(&want),
                "{module}.{name} is not among its argument struct's entry points {:?}",
                k.declared
            );
        }
    }
}
