//! Every dtype-dependent rvllm-kernels entry point the CUDA backend launches, each named in
//! both builds (`elem::Kernel`): one table, so that the GPU tests can check that each exists
//! in its module and a new launch cannot misspell one of its two names unnoticed.
use super::elem::{kernel, Kernel};

pub const EMBEDDING: Kernel = kernel!("embedding", "embedding_lookup_bf16", "embedding_lookup_f16");
pub const GATHER_ROWS: Kernel = kernel!("embedding", "gather_rows_bf16", "gather_rows_f16");
pub const RMS_NORM: Kernel = kernel!("norm", "rms_norm_bf16", "rms_norm_f16");
pub const FUSED_ADD_RMS_NORM: Kernel =
    kernel!("norm", "fused_add_rms_norm_bf16", "fused_add_rms_norm_f16");
pub const ROPE_AND_CACHE: Kernel =
    kernel!("rope_cache", "rope_and_cache_bf16", "rope_and_cache_f16");
pub const SILU_AND_MUL: Kernel = kernel!("activation", "silu_and_mul_bf16", "silu_and_mul_f16");
pub const ADD: Kernel = kernel!("activation", "add_bf16", "add_f16");
pub const TO_F32: Kernel = kernel!("activation", "bf16_to_f32", "f16_to_f32");
/// gemv.cu at batch 1 (GPUs without the bulk copy engine, or `RVLLM_GEMV=classic`).
pub const GEMV_B1: Kernel = kernel!("gemv", "gemv_bf16_b1", "gemv_f16_b1");
pub const GEMV_SILU_B1: Kernel = kernel!("gemv", "gemv_silu_bf16_b1", "gemv_silu_f16_b1");
pub const DECODE_REDUCE: Kernel = kernel!(
    "attention_decode",
    "paged_attention_decode_reduce",
    "paged_attention_decode_reduce_f16"
);
/// Prefill attention by head dim (the built ones).
pub const PREFILL: [(usize, Kernel); 2] = [
    (
        64,
        kernel!(
            "attention_prefill",
            "paged_attention_prefill_hd64",
            "paged_attention_prefill_hd64_f16"
        ),
    ),
    (
        128,
        kernel!(
            "attention_prefill",
            "paged_attention_prefill_hd128",
            "paged_attention_prefill_hd128_f16"
        ),
    ),
];

/// gemv_bulk.cu: `gemv_bulk_<variant>bf16<depth>_b1` and its f16 build.
macro_rules! bulk {
    ($variant:literal) => {
        [
            kernel!(
                "gemv_bulk",
                concat!("gemv_bulk_", $variant, "bf16_b1"),
                concat!("gemv_bulk_", $variant, "f16_b1")
            ),
            kernel!(
                "gemv_bulk",
                concat!("gemv_bulk_", $variant, "bf16_s6_b1"),
                concat!("gemv_bulk_", $variant, "f16_s6_b1")
            ),
        ]
    };
}

/// The bulk GEMV's variants, each at its two built pipeline depths ([4 stages, 6 stages]).
pub const GEMV_BULK_PLAIN: [Kernel; 2] = bulk!("");
pub const GEMV_BULK_SILU: [Kernel; 2] = bulk!("silu_");
pub const GEMV_BULK_NORM: [Kernel; 2] = bulk!("norm_");
pub const GEMV_BULK_ADD: [Kernel; 2] = bulk!("add_");
pub const GEMV_BULK_SILU_ADD: [Kernel; 2] = bulk!("silu_add_");

/// (head dim, query heads a block, the full kernel, the compact one) for each tile built.
macro_rules! decode_kernels {
    ($(($hd:literal, $gt:literal)),*) => {
        [$((
            $hd,
            $gt,
            kernel!(
                "attention_decode",
                concat!("paged_attention_decode_hd", $hd, "_g", $gt),
                concat!("paged_attention_decode_hd", $hd, "_g", $gt, "_f16")
            ),
            kernel!(
                "attention_decode",
                concat!("paged_attention_decode_compact_hd", $hd, "_g", $gt),
                concat!("paged_attention_decode_compact_hd", $hd, "_g", $gt, "_f16")
            ),
        )),*]
    };
}

/// The decode attention kernels of attention_decode.cu.
pub const DECODE: [(usize, usize, Kernel, Kernel); 8] = decode_kernels!(
    (64, 1),
    (64, 2),
    (64, 4),
    (64, 8),
    (128, 1),
    (128, 2),
    (128, 4),
    (128, 8)
);

/// Every entry point above.
pub fn all() -> Vec<Kernel> {
    let mut k = vec![
        EMBEDDING,
        GATHER_ROWS,
        RMS_NORM,
        FUSED_ADD_RMS_NORM,
        ROPE_AND_CACHE,
        SILU_AND_MUL,
        ADD,
        TO_F32,
        GEMV_B1,
        GEMV_SILU_B1,
        DECODE_REDUCE,
    ];
    k.extend(PREFILL.iter().map(|p| p.1));
    for depths in [
        GEMV_BULK_PLAIN,
        GEMV_BULK_SILU,
        GEMV_BULK_NORM,
        GEMV_BULK_ADD,
        GEMV_BULK_SILU_ADD,
    ] {
        k.extend(depths);
    }
    k.extend(DECODE.iter().flat_map(|d| [d.2, d.3]));
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
        assert_eq!(all.len(), 11 + 2 + 10 + 16);
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
}
