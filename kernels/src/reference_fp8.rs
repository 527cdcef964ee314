//! FP8 E4M3 (the `e4m3fn` variant: no infinities, NaN = S.1111.111, largest finite 448) and
//! the scaled quantization rules of vLLM's `scaled_fp8_quant`: the reference every FP8 path
//! (checkpoint dequantization, `--quantization fp8` on the CPU and the GPU, the FP8 KV cache,
//! the FP8 kernels' GPU tests) is checked against. It lives here, below the engine, so that the
//! engine (`rvllm::backend::cpu::fp8` re-exports it) and the kernel tests share one codec.
//!
//! Encoding saturates (finite values past ±448, and infinities, become ±448, as vLLM clamps
//! before converting) and rounds to nearest, ties to even; NaN stays NaN. Decoding is a
//! 256-entry table.

/// The largest finite E4M3 value (`torch.finfo(torch.float8_e4m3fn).max`).
pub const E4M3_MAX: f32 = 448.0;

/// vLLM's floor on dynamic scales (`1 / (448 * 512)`), so an all-zero input gets a usable
/// scale instead of 0 (whose inverse would turn every zero into NaN).
pub const MIN_SCALE: f32 = 1.0 / (E4M3_MAX * 512.0);

const fn decode_code(code: u8) -> f32 {
    let sign = if code & 0x80 != 0 { -1.0 } else { 1.0 };
    let exp = ((code >> 3) & 0x0f) as i32;
    let mant = (code & 0x07) as f32;
    if exp == 0x0f && code & 0x07 == 0x07 {
        // Negation flips the sign bit, so 0xff decodes to a negative NaN.
        return if code & 0x80 != 0 {
            -f32::NAN
        } else {
            f32::NAN
        };
    }
    // 2^(exp - 7) without powi (not const): exponents run from -6 to 8.
    let mut scale = 1.0f32 / 64.0;
    let mut e = if exp == 0 { 1 } else { exp };
    while e > 1 {
        scale *= 2.0;
        e -= 1;
    }
    let frac = if exp == 0 {
        mant / 8.0
    } else {
        1.0 + mant / 8.0
    };
    sign * frac * scale
}

const fn build_table() -> [f32; 256] {
    let mut t = [0.0f32; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = decode_code(i as u8);
        i += 1;
    }
    t
}

/// Every code's value.
pub static E4M3_TABLE: [f32; 256] = build_table();

/// The value of an E4M3 code.
#[inline]
pub fn e4m3_to_f32(code: u8) -> f32 {
    E4M3_TABLE[code as usize]
}

/// The nearest E4M3 code (ties to even), saturating at ±448; NaN gives NaN (0x7f, or 0xff
/// when its sign bit is set), as torch's conversion of a clamped tensor does.
#[inline]
pub fn f32_to_e4m3(x: f32) -> u8 {
    let sign = ((x.to_bits() >> 24) & 0x80) as u8;
    if x.is_nan() {
        return sign | 0x7f;
    }
    let a = x.abs().min(E4M3_MAX);
    if a < 1.0 / 64.0 {
        // Subnormals are multiples of 2^-9; scaling by 512 is exact, and a result of 8 is
        // the smallest normal's code (0x08).
        return sign | (a * 512.0).round_ties_even() as u8;
    }
    let bits = a.to_bits();
    let mut exp = ((bits >> 23) & 0xff) as i32 - 127 + 7;
    let mant = bits & 0x7f_ffff;
    let mut m = mant >> 20;
    let rest = mant & 0xf_ffff;
    let half = 1 << 19;
    if rest > half || (rest == half && m & 1 == 1) {
        m += 1;
    }
    if m == 8 {
        m = 0;
        exp += 1;
    }
    // a <= 448 = 1.75 * 2^8 keeps (exp, m) at most (15, 6): never the NaN code.
    sign | ((exp as u8) << 3) | m as u8
}

/// `x` rounded through E4M3 at `scale`: `decode(encode(x / scale)) * scale`, the value a
/// tensor quantized with that scale stands for. Divides by multiplying with the inverse, as
/// vLLM's kernels do.
#[inline]
pub fn fake_quant(x: f32, inv_scale: f32, scale: f32) -> f32 {
    e4m3_to_f32(f32_to_e4m3(x * inv_scale)) * scale
}

/// vLLM's dynamic per-tensor scale: `amax / 448` (floored at [`MIN_SCALE`]).
pub fn dynamic_scale(x: &[f32]) -> f32 {
    let amax = x
        .iter()
        .filter(|v| !v.is_nan())
        .fold(0.0f32, |m, v| m.max(v.abs()));
    (amax / E4M3_MAX).max(MIN_SCALE)
}

/// Quantize `x` with one scale (`scaled_fp8_quant(x, scale)`): the codes of `x / scale`.
pub fn quantize_with_scale(x: &[f32], scale: f32) -> Vec<u8> {
    let inv = 1.0 / scale;
    x.iter().map(|&v| f32_to_e4m3(v * inv)).collect()
}

/// `scaled_fp8_quant(x)` without a scale: the dynamic per-tensor scale and the codes.
pub fn quantize_per_tensor(x: &[f32]) -> (Vec<u8>, f32) {
    let scale = dynamic_scale(x);
    (quantize_with_scale(x, scale), scale)
}

/// Dynamic per-token quantization (`scaled_fp8_quant(..., use_per_token_if_dynamic=True)`):
/// one scale per row of `cols` values.
pub fn quantize_per_token(x: &[f32], cols: usize) -> (Vec<u8>, Vec<f32>) {
    let mut codes = Vec::with_capacity(x.len());
    let mut scales = Vec::with_capacity(x.len() / cols.max(1));
    for row in x.chunks(cols.max(1)) {
        let s = dynamic_scale(row);
        codes.extend(quantize_with_scale(row, s));
        scales.push(s);
    }
    (codes, scales)
}

/// Round every value of `x` through E4M3 at one scale, in place.
pub fn fake_quant_in_place(x: &mut [f32], scale: f32) {
    let inv = 1.0 / scale;
    for v in x {
        *v = fake_quant(*v, inv, scale);
    }
}

/// The FP8 GEMM of `--quantization fp8` (vLLM's `cutlass_scaled_mm` with per-token activation
/// and per-channel weight scales): `y[i, j] = sx[i] * sw[j] * sum_k x[i, k] w[j, k]` over the
/// decoded codes of `xq` (`[m, k]`) and `wq` (`[n, k]`), accumulated in f32.
pub fn scaled_mm(xq: &[u8], sx: &[f32], wq: &[u8], sw: &[f32], k: usize) -> Vec<f32> {
    let (m, n) = (sx.len(), sw.len());
    assert_eq!(
        xq.len(),
        m * k,
        "scaled_mm: x has {} codes for {m}x{k}",
        xq.len()
    );
    assert_eq!(
        wq.len(),
        n * k,
        "scaled_mm: w has {} codes for {n}x{k}",
        wq.len()
    );
    let wd: Vec<f32> = wq.iter().map(|&c| e4m3_to_f32(c)).collect();
    let mut y = vec![0.0f32; m * n];
    for i in 0..m {
        let xd: Vec<f32> = xq[i * k..(i + 1) * k]
            .iter()
            .map(|&c| e4m3_to_f32(c))
            .collect();
        for j in 0..n {
            let dot: f32 = xd
                .iter()
                .zip(&wd[j * k..(j + 1) * k])
                .map(|(a, b)| a * b)
                .sum();
            y[i * n + j] = dot * sx[i] * sw[j];
        }
    }
    y
}

/// The side of a weight-scale block of block-wise FP8 checkpoints (`weight_block_size:
/// [128, 128]`), the only block size the GPU's FP8 GEMV takes.
pub const SCALE_BLOCK: usize = 128;

/// How an FP8 weight's scales are laid out: one for the tensor, one per output channel (a
/// row of the `[n, k]` weight), or one per [`SCALE_BLOCK`]-square block (row-major over the
/// `[ceil(n / 128), ceil(k / 128)]` grid; edge blocks partial). Each multiplies the decoded
/// codes it covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightScales {
    PerTensor,
    PerChannel,
    Block128,
}

impl WeightScales {
    pub const ALL: [WeightScales; 3] = [Self::PerTensor, Self::PerChannel, Self::Block128];

    /// The `scale_kind` argument of kernels/src/fp8_gemv.cu.
    pub fn kernel_arg(self) -> i32 {
        match self {
            Self::PerTensor => 0,
            Self::PerChannel => 1,
            Self::Block128 => 2,
        }
    }

    /// How many scales an `[n, k]` weight has.
    pub fn count(self, n: usize, k: usize) -> usize {
        match self {
            Self::PerTensor => 1,
            Self::PerChannel => n,
            Self::Block128 => n.div_ceil(SCALE_BLOCK) * k.div_ceil(SCALE_BLOCK),
        }
    }
}

/// The small-batch FP8 linear (`fp8_gemv`, weight-only FP8): `y[i, j] = sum_k x[i, k] *
/// e4m3(wq[j, k])` in f32 over the input as it is (no activation quantization), scaled once
/// per output for per-tensor and per-channel scales, and per 128-column block (each block's
/// partial sum times its scale, then the blocks added) for block scales. `x` is `[m, k]`,
/// `wq` `[n, k]`.
pub fn weight_only_mm(
    x: &[f32],
    wq: &[u8],
    scales: &[f32],
    kind: WeightScales,
    k: usize,
) -> Vec<f32> {
    let k1 = k.max(1);
    let (m, n) = (x.len() / k1, wq.len() / k1);
    assert_eq!(
        x.len(),
        m * k,
        "weight_only_mm: x has {} values for k {k}",
        x.len()
    );
    assert_eq!(
        wq.len(),
        n * k,
        "weight_only_mm: w has {} codes for k {k}",
        wq.len()
    );
    assert_eq!(
        scales.len(),
        kind.count(n, k),
        "weight_only_mm: {} scales for {kind:?} of {n}x{k}",
        scales.len()
    );
    let wd: Vec<f32> = wq.iter().map(|&c| e4m3_to_f32(c)).collect();
    let kb = k.div_ceil(SCALE_BLOCK);
    let mut y = vec![0.0f32; m * n];
    for i in 0..m {
        let xr = &x[i * k..(i + 1) * k];
        for j in 0..n {
            let wr = &wd[j * k..(j + 1) * k];
            let dot = |lo: usize, hi: usize| -> f32 {
                xr[lo..hi].iter().zip(&wr[lo..hi]).map(|(a, b)| a * b).sum()
            };
            y[i * n + j] = match kind {
                WeightScales::PerTensor => dot(0, k) * scales[0],
                WeightScales::PerChannel => dot(0, k) * scales[j],
                WeightScales::Block128 => (0..kb)
                    .map(|b| {
                        let hi = ((b + 1) * SCALE_BLOCK).min(k);
                        dot(b * SCALE_BLOCK, hi) * scales[(j / SCALE_BLOCK) * kb + b]
                    })
                    .sum(),
            };
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_round_trips() {
        for code in 0..=255u8 {
            let v = e4m3_to_f32(code);
            if v.is_nan() {
                assert!(
                    code == 0x7f || code == 0xff,
                    "code {code:#x} decodes to NaN"
                );
                assert_eq!(f32_to_e4m3(v), code, "NaN keeps its sign");
                continue;
            }
            let back = f32_to_e4m3(v);
            // +0 and -0 are both codes; each comes back as itself.
            assert_eq!(back, code, "code {code:#x} = {v} re-encodes as {back:#x}");
        }
    }

    #[test]
    fn known_values_and_saturation() {
        assert_eq!(e4m3_to_f32(0x7e), 448.0);
        assert_eq!(e4m3_to_f32(0x01), 1.0 / 512.0);
        assert_eq!(e4m3_to_f32(0x08), 1.0 / 64.0);
        assert_eq!(e4m3_to_f32(0x38), 1.0);
        assert_eq!(f32_to_e4m3(1000.0), 0x7e);
        assert_eq!(f32_to_e4m3(-1e30), 0xfe);
        assert_eq!(f32_to_e4m3(f32::INFINITY), 0x7e);
        assert_eq!(f32_to_e4m3(f32::NEG_INFINITY), 0xfe);
        // 1 + 1/16 lies halfway between 1 and 1.125: ties go to the even mantissa (1.0);
        // 1 + 3/16 lies between 1.125 and 1.25 and goes to 1.25.
        assert_eq!(e4m3_to_f32(f32_to_e4m3(1.0625)), 1.0);
        assert_eq!(e4m3_to_f32(f32_to_e4m3(1.1875)), 1.25);
        // Halfway below the smallest subnormal rounds to zero, past it to 2^-9.
        assert_eq!(f32_to_e4m3(1.0 / 1024.0), 0x00);
        assert_eq!(f32_to_e4m3(1.01 / 1024.0), 0x01);
        // 464 is halfway between 448 and the (absent) 480: saturates to 448.
        assert_eq!(f32_to_e4m3(464.0), 0x7e);
    }

    #[test]
    fn per_tensor_scale_maps_amax_to_448() {
        let x = [0.5f32, -3.5, 1.25, 0.0];
        let (codes, scale) = quantize_per_tensor(&x);
        assert_eq!(scale, 3.5 / 448.0);
        assert_eq!(codes[1], 0xfe, "the largest magnitude becomes -448");
        let (zeros, s0) = quantize_per_tensor(&[0.0; 4]);
        assert_eq!(s0, MIN_SCALE);
        assert!(zeros.iter().all(|&c| c == 0));
        let (_, per_row) = quantize_per_token(&[1.0, -2.0, 4.0, 0.5], 2);
        assert_eq!(per_row, vec![2.0 / 448.0, 4.0 / 448.0]);
    }

    #[test]
    fn weight_only_mm_applies_each_scale_kind_to_its_codes() {
        // w = [[1, 2, ...]] decoded codes times the scale; x = ones.
        let k = 2 * SCALE_BLOCK + 3;
        let wq: Vec<u8> = (0..2 * k)
            .map(|i| f32_to_e4m3(if i < k { 1.0 } else { -0.5 }))
            .collect();
        let x = vec![1.0f32; k];
        let kf = k as f32;
        assert_eq!(
            weight_only_mm(&x, &wq, &[2.0], WeightScales::PerTensor, k),
            vec![2.0 * kf, -kf]
        );
        assert_eq!(
            weight_only_mm(&x, &wq, &[2.0, 4.0], WeightScales::PerChannel, k),
            vec![2.0 * kf, -2.0 * kf]
        );
        // Both rows lie in block row 0: scales 1, 2 and 4 for the columns' three blocks
        // (the last one 3 wide).
        let b = SCALE_BLOCK as f32;
        assert_eq!(
            weight_only_mm(&x, &wq, &[1.0, 2.0, 4.0], WeightScales::Block128, k),
            vec![b + 2.0 * b + 4.0 * 3.0, -0.5 * (b + 2.0 * b + 4.0 * 3.0)]
        );
        assert_eq!(WeightScales::Block128.count(129, 256), 4);
    }

    #[test]
    fn scaled_mm_applies_both_scales_to_the_decoded_product() {
        // x = [[1, 2]] at scale 0.5 (codes of 2 and 4), w rows [1, 1] and [-1, 0.5] at
        // scales 2 and 1: y = [0.5 * 2 * (2 + 4), 0.5 * 1 * (-2 + 2)] = [6, 0].
        let xq = quantize_with_scale(&[1.0, 2.0], 0.5);
        let wq: Vec<u8> = [1.0f32, 1.0, -1.0, 0.5]
            .iter()
            .map(|&v| f32_to_e4m3(v))
            .collect();
        let y = scaled_mm(&xq, &[0.5], &wq, &[2.0, 1.0], 2);
        assert_eq!(y, vec![6.0, 0.0]);
    }
}
