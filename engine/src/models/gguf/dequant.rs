//! ggml tensor types: their block sizes, and dequantization of the quantized ones to f32.
//!
//! Block layouts (all little-endian, `d`/`m` are f16):
//! - Q4_0 (32 values, 18 bytes): d, 16 bytes of nibbles; value = (nibble - 8) * d.
//! - Q4_1 (32 values, 20 bytes): d, m, 16 bytes of nibbles; value = nibble * d + m.
//! - Q5_0 (32, 22): d, 4 bytes of high bits, 16 bytes of nibbles; value = (q5 - 16) * d.
//! - Q5_1 (32, 24): d, m, 4 bytes of high bits, nibbles; value = q5 * d + m.
//! - Q8_0 (32, 34): d, 32 signed bytes; value = q * d.
//!
//! In the 32-value formats byte j holds value j in its low nibble and value j + 16 in its high
//! nibble. The K-quants (256-value super-blocks) are documented at their functions.
use anyhow::{bail, ensure, Result};
use half::{bf16, f16};

use crate::models::weights::HostData;

/// ggml type ids as stored in GGUF tensor infos.
pub mod ggml_type {
    pub const F32: u32 = 0;
    pub const F16: u32 = 1;
    pub const Q4_0: u32 = 2;
    pub const Q4_1: u32 = 3;
    pub const Q5_0: u32 = 6;
    pub const Q5_1: u32 = 7;
    pub const Q8_0: u32 = 8;
    pub const Q4_K: u32 = 12;
    pub const Q5_K: u32 = 13;
    pub const Q6_K: u32 = 14;
    pub const BF16: u32 = 30;
}

/// Human-readable name of a ggml type id, for error messages.
pub fn type_name(t: u32) -> String {
    let known = [
        (0, "F32"),
        (1, "F16"),
        (2, "Q4_0"),
        (3, "Q4_1"),
        (6, "Q5_0"),
        (7, "Q5_1"),
        (8, "Q8_0"),
        (9, "Q8_1"),
        (10, "Q2_K"),
        (11, "Q3_K"),
        (12, "Q4_K"),
        (13, "Q5_K"),
        (14, "Q6_K"),
        (15, "Q8_K"),
        (16, "IQ2_XXS"),
        (17, "IQ2_XS"),
        (18, "IQ3_XXS"),
        (19, "IQ1_S"),
        (20, "IQ4_NL"),
        (21, "IQ3_S"),
        (22, "IQ2_S"),
        (23, "IQ4_XS"),
        (29, "IQ1_M"),
        (30, "BF16"),
        (34, "TQ1_0"),
        (35, "TQ2_0"),
    ];
    known
        .iter()
        .find(|(id, _)| *id == t)
        .map(|(_, n)| n.to_string())
        .unwrap_or_else(|| format!("type #{t}"))
}

/// (values per block, bytes per block) for the types this loader reads.
pub fn block_layout(t: u32) -> Option<(u64, u64)> {
    use ggml_type::*;
    Some(match t {
        F32 => (1, 4),
        F16 | BF16 => (1, 2),
        Q4_0 => (32, 18),
        Q4_1 => (32, 20),
        Q5_0 => (32, 22),
        Q5_1 => (32, 24),
        Q8_0 => (32, 34),
        Q4_K => (256, 144),
        Q5_K => (256, 176),
        Q6_K => (256, 210),
        _ => return None,
    })
}

pub const SUPPORTED_TYPES: &str = "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K";

/// Bytes a tensor of `numel` values of type `t` occupies; an error for unsupported types or
/// a row length that is not a whole number of blocks.
pub fn tensor_nbytes(t: u32, numel: u64, row_len: u64) -> Result<u64> {
    let Some((block, bytes)) = block_layout(t) else {
        bail!(
            "ggml type {} is not supported (supported: {SUPPORTED_TYPES})",
            type_name(t)
        );
    };
    ensure!(
        row_len.is_multiple_of(block),
        "rows of {row_len} values are not a whole number of {}-value {} blocks",
        block,
        type_name(t)
    );
    numel
        .checked_div(block)
        .and_then(|b| b.checked_mul(bytes))
        .ok_or_else(|| anyhow::anyhow!("tensor size overflows"))
}

fn rd_f16(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Decode `bytes` (exactly `tensor_nbytes` long) holding `numel` values of type `t`.
/// F16 and BF16 stay in their own type; everything quantized becomes f32.
pub fn dequantize(t: u32, bytes: &[u8], numel: usize) -> Result<HostData> {
    use ggml_type::*;
    let (block, bsize) = block_layout(t).ok_or_else(|| {
        anyhow::anyhow!(
            "ggml type {} is not supported (supported: {SUPPORTED_TYPES})",
            type_name(t)
        )
    })?;
    let (block, bsize) = (block as usize, bsize as usize);
    ensure!(
        numel.is_multiple_of(block) && bytes.len() == numel / block * bsize,
        "{} data of {} bytes does not hold {numel} values",
        type_name(t),
        bytes.len()
    );
    Ok(match t {
        F32 => HostData::F32(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        F16 => HostData::F16(
            bytes
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]))
                .collect(),
        ),
        BF16 => HostData::BF16(
            bytes
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]))
                .collect(),
        ),
        _ => {
            let mut out = vec![0f32; numel];
            let f: fn(&[u8], &mut [f32]) = match t {
                Q4_0 => q4_0_block,
                Q4_1 => q4_1_block,
                Q5_0 => q5_0_block,
                Q5_1 => q5_1_block,
                Q8_0 => q8_0_block,
                Q4_K => q4_k_block,
                Q5_K => q5_k_block,
                Q6_K => q6_k_block,
                _ => unreachable!("block_layout lists only handled types"),
            };
            // Blocks are independent: decode them in parallel (the embedding alone is
            // ~28M values for an 8B model).
            use rayon::prelude::*;
            out.par_chunks_mut(block)
                .zip(bytes.par_chunks(bsize))
                .for_each(|(o, b)| f(b, o));
            HostData::F32(out)
        }
    })
}

fn q4_0_block(b: &[u8], out: &mut [f32]) {
    let d = rd_f16(b, 0);
    let qs = &b[2..18];
    for j in 0..16 {
        out[j] = ((qs[j] & 0x0F) as i32 - 8) as f32 * d;
        out[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
    }
}

fn q4_1_block(b: &[u8], out: &mut [f32]) {
    let d = rd_f16(b, 0);
    let m = rd_f16(b, 2);
    let qs = &b[4..20];
    for j in 0..16 {
        out[j] = (qs[j] & 0x0F) as f32 * d + m;
        out[j + 16] = (qs[j] >> 4) as f32 * d + m;
    }
}

/// The fifth bit of value j comes from bit j of the 32-bit `qh` word.
fn q5_values(qh: u32, qs: &[u8], j: usize) -> (i32, i32) {
    let hi0 = ((qh >> j) & 1) << 4;
    let hi1 = ((qh >> (j + 16)) & 1) << 4;
    (
        ((qs[j] & 0x0F) as u32 | hi0) as i32,
        ((qs[j] >> 4) as u32 | hi1) as i32,
    )
}

fn q5_0_block(b: &[u8], out: &mut [f32]) {
    let d = rd_f16(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    for j in 0..16 {
        let (x0, x1) = q5_values(qh, qs, j);
        out[j] = (x0 - 16) as f32 * d;
        out[j + 16] = (x1 - 16) as f32 * d;
    }
}

fn q5_1_block(b: &[u8], out: &mut [f32]) {
    let d = rd_f16(b, 0);
    let m = rd_f16(b, 2);
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let qs = &b[8..24];
    for j in 0..16 {
        let (x0, x1) = q5_values(qh, qs, j);
        out[j] = x0 as f32 * d + m;
        out[j + 16] = x1 as f32 * d + m;
    }
}

fn q8_0_block(b: &[u8], out: &mut [f32]) {
    let d = rd_f16(b, 0);
    for j in 0..32 {
        out[j] = b[2 + j] as i8 as f32 * d;
    }
}

/// The 12 scale bytes of Q4_K/Q5_K pack eight 6-bit (scale, min) pairs: pairs 0..4 in the
/// low six bits of bytes 0..4 / 4..8; pairs 4..8 take their low four bits from the nibbles
/// of bytes 8..12 and their top two bits from the spare high bits of bytes 0..8.
fn k4_scale_min(j: usize, s: &[u8]) -> (f32, f32) {
    if j < 4 {
        ((s[j] & 63) as f32, (s[j + 4] & 63) as f32)
    } else {
        let sc = (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
        let m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
        (sc as f32, m as f32)
    }
}

/// Q4_K (256 values, 144 bytes): d, dmin, 12 scale bytes, 128 bytes of nibbles. Each 64-value
/// chunk uses 32 bytes: low nibbles are the first 32 values (sub-block 2i), high nibbles the
/// next 32 (sub-block 2i+1); value = d * scale * q - dmin * min.
fn q4_k_block(b: &[u8], out: &mut [f32]) {
    let d = rd_f16(b, 0);
    let dmin = rd_f16(b, 2);
    let scales = &b[4..16];
    let qs = &b[16..144];
    for chunk in 0..4 {
        let (s1, m1) = k4_scale_min(2 * chunk, scales);
        let (s2, m2) = k4_scale_min(2 * chunk + 1, scales);
        let q = &qs[chunk * 32..chunk * 32 + 32];
        let o = &mut out[chunk * 64..chunk * 64 + 64];
        for l in 0..32 {
            o[l] = d * s1 * (q[l] & 0x0F) as f32 - dmin * m1;
            o[l + 32] = d * s2 * (q[l] >> 4) as f32 - dmin * m2;
        }
    }
}

/// Q5_K (256 values, 176 bytes): d, dmin, 12 scale bytes, 32 bytes of high bits, 128 bytes of
/// nibbles. As Q4_K, plus a fifth bit: chunk i takes bits 2i (low half) and 2i+1 (high half)
/// of `qh[l]`.
fn q5_k_block(b: &[u8], out: &mut [f32]) {
    let d = rd_f16(b, 0);
    let dmin = rd_f16(b, 2);
    let scales = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..176];
    for chunk in 0..4 {
        let (s1, m1) = k4_scale_min(2 * chunk, scales);
        let (s2, m2) = k4_scale_min(2 * chunk + 1, scales);
        let q = &qs[chunk * 32..chunk * 32 + 32];
        let o = &mut out[chunk * 64..chunk * 64 + 64];
        for l in 0..32 {
            let h0 = ((qh[l] >> (2 * chunk)) & 1) << 4;
            let h1 = ((qh[l] >> (2 * chunk + 1)) & 1) << 4;
            o[l] = d * s1 * ((q[l] & 0x0F) | h0) as f32 - dmin * m1;
            o[l + 32] = d * s2 * ((q[l] >> 4) | h1) as f32 - dmin * m2;
        }
    }
}

/// Q6_K (256 values, 210 bytes): 128 bytes of low nibbles, 64 bytes of 2-bit high parts, 16
/// signed 8-bit scales (one per 16 values), d. Each 128-value half uses 64 low-nibble bytes
/// and 32 high bytes: value (32k + l) for k = 0..4 takes a low nibble from byte l or l+32 and
/// bits 2k..2k+2 of high byte l; value = d * scale * (q6 - 32).
fn q6_k_block(b: &[u8], out: &mut [f32]) {
    let ql_all = &b[0..128];
    let qh_all = &b[128..192];
    let sc_all = &b[192..208];
    let d = rd_f16(b, 208);
    for half in 0..2 {
        let ql = &ql_all[half * 64..half * 64 + 64];
        let qh = &qh_all[half * 32..half * 32 + 32];
        let sc = &sc_all[half * 8..half * 8 + 8];
        let o = &mut out[half * 128..half * 128 + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            o[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            o[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            o[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            o[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ggml_type::*;
    use super::*;

    fn f16b(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_le_bytes()
    }

    fn as_f32(h: HostData) -> Vec<f32> {
        match h {
            HostData::F32(v) => v,
            other => panic!("expected f32, got {other:?}"),
        }
    }

    /// Values 0..32 laid out as nibbles: value j in the low nibble of byte j, value j+16 in
    /// the high nibble.
    fn nibbles(q: &[u8; 32]) -> [u8; 16] {
        let mut out = [0u8; 16];
        for j in 0..16 {
            out[j] = q[j] | (q[j + 16] << 4);
        }
        out
    }

    fn sample_q4() -> [u8; 32] {
        let mut q = [0u8; 32];
        for (i, x) in q.iter_mut().enumerate() {
            *x = ((i * 7 + 3) % 16) as u8;
        }
        q
    }

    #[test]
    fn q4_0_hand_block() {
        let q = sample_q4();
        let mut b = f16b(0.5).to_vec();
        b.extend_from_slice(&nibbles(&q));
        let v = as_f32(dequantize(Q4_0, &b, 32).unwrap());
        for i in 0..32 {
            assert_eq!(v[i], (q[i] as f32 - 8.0) * 0.5, "value {i}");
        }
    }

    #[test]
    fn q4_1_hand_block() {
        let q = sample_q4();
        let mut b = f16b(0.25).to_vec();
        b.extend_from_slice(&f16b(-1.5));
        b.extend_from_slice(&nibbles(&q));
        let v = as_f32(dequantize(Q4_1, &b, 32).unwrap());
        for i in 0..32 {
            assert_eq!(v[i], q[i] as f32 * 0.25 - 1.5, "value {i}");
        }
    }

    #[test]
    fn q5_0_and_q5_1_hand_blocks() {
        let mut q = [0u8; 32];
        for (i, x) in q.iter_mut().enumerate() {
            *x = ((i * 11 + 5) % 32) as u8;
        }
        let low: [u8; 32] = std::array::from_fn(|i| q[i] & 0x0F);
        let mut qh = 0u32;
        for (i, x) in q.iter().enumerate() {
            qh |= ((*x as u32 >> 4) & 1) << i;
        }
        let mut b0 = f16b(2.0).to_vec();
        b0.extend_from_slice(&qh.to_le_bytes());
        b0.extend_from_slice(&nibbles(&low));
        let v = as_f32(dequantize(Q5_0, &b0, 32).unwrap());
        for i in 0..32 {
            assert_eq!(v[i], (q[i] as f32 - 16.0) * 2.0, "q5_0 value {i}");
        }
        let mut b1 = f16b(0.5).to_vec();
        b1.extend_from_slice(&f16b(1.0));
        b1.extend_from_slice(&qh.to_le_bytes());
        b1.extend_from_slice(&nibbles(&low));
        let v = as_f32(dequantize(Q5_1, &b1, 32).unwrap());
        for i in 0..32 {
            assert_eq!(v[i], q[i] as f32 * 0.5 + 1.0, "q5_1 value {i}");
        }
    }

    #[test]
    fn q8_0_hand_block_two_blocks() {
        let mut b = Vec::new();
        for (blk, d) in [(0, 0.125f32), (1, -2.0)] {
            b.extend_from_slice(&f16b(d));
            for j in 0..32i32 {
                b.push((j * 9 - 128 + blk) as i8 as u8);
            }
        }
        let v = as_f32(dequantize(Q8_0, &b, 64).unwrap());
        for j in 0..32i32 {
            assert_eq!(v[j as usize], (j * 9 - 128) as i8 as f32 * 0.125);
            assert_eq!(v[32 + j as usize], (j * 9 - 127) as i8 as f32 * -2.0);
        }
    }

    #[test]
    fn float_types_keep_their_dtype() {
        let b: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        assert_eq!(as_f32(dequantize(F32, &b, 2).unwrap()), vec![1.5, -2.0]);
        let b: Vec<u8> = f16b(3.0).into_iter().chain(f16b(-0.5)).collect();
        match dequantize(F16, &b, 2).unwrap() {
            HostData::F16(v) => assert_eq!(v, vec![f16::from_f32(3.0), f16::from_f32(-0.5)]),
            o => panic!("{o:?}"),
        }
        let b: Vec<u8> = bf16::from_f32(7.0).to_le_bytes().into_iter().collect();
        match dequantize(BF16, &b, 1).unwrap() {
            HostData::BF16(v) => assert_eq!(v[0].to_f32(), 7.0),
            o => panic!("{o:?}"),
        }
    }

    /// A Q4_K block with hand-chosen scales: sub-blocks 0..4 use the simple 6-bit layout,
    /// sub-blocks 4..8 the split one.
    #[test]
    fn q4_k_hand_block() {
        let sc: [u8; 8] = [1, 2, 3, 63, 17, 33, 50, 8];
        let mn: [u8; 8] = [0, 5, 10, 1, 62, 7, 20, 40];
        let mut scales = [0u8; 12];
        for j in 0..4 {
            scales[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
            scales[j + 4] = mn[j] | ((mn[j + 4] >> 4) << 6);
            scales[j + 8] = (sc[j + 4] & 0x0F) | ((mn[j + 4] & 0x0F) << 4);
        }
        let q: Vec<u8> = (0..256).map(|i| ((i * 5 + 1) % 16) as u8).collect();
        let mut qs = [0u8; 128];
        for chunk in 0..4 {
            for l in 0..32 {
                qs[chunk * 32 + l] = q[chunk * 64 + l] | (q[chunk * 64 + 32 + l] << 4);
            }
        }
        let (d, dmin) = (0.5f32, 0.25f32);
        let mut b = f16b(d).to_vec();
        b.extend_from_slice(&f16b(dmin));
        b.extend_from_slice(&scales);
        b.extend_from_slice(&qs);
        let v = as_f32(dequantize(Q4_K, &b, 256).unwrap());
        for i in 0..256 {
            let sub = i / 32;
            let want = d * sc[sub] as f32 * q[i] as f32 - dmin * mn[sub] as f32;
            assert_eq!(v[i], want, "value {i}");
        }
    }

    #[test]
    fn q6_k_hand_block() {
        let q: Vec<u8> = (0..256).map(|i| ((i * 13 + 7) % 64) as u8).collect();
        let sc: Vec<i8> = (0..16).map(|i| (i as i8 - 8) * 3).collect();
        let mut ql = [0u8; 128];
        let mut qh = [0u8; 64];
        for half in 0..2 {
            for l in 0..32 {
                let base = half * 128;
                let [a, b_, c, e] = [0, 32, 64, 96].map(|k| q[base + k + l]);
                ql[half * 64 + l] = (a & 0x0F) | ((c & 0x0F) << 4);
                ql[half * 64 + l + 32] = (b_ & 0x0F) | ((e & 0x0F) << 4);
                qh[half * 32 + l] = (a >> 4) | ((b_ >> 4) << 2) | ((c >> 4) << 4) | ((e >> 4) << 6);
            }
        }
        let d = 0.0625f32;
        let mut b = ql.to_vec();
        b.extend_from_slice(&qh);
        b.extend(sc.iter().map(|&s| s as u8));
        b.extend_from_slice(&f16b(d));
        let v = as_f32(dequantize(Q6_K, &b, 256).unwrap());
        for i in 0..256 {
            let want = d * sc[i / 16] as f32 * (q[i] as i32 - 32) as f32;
            assert_eq!(v[i], want, "value {i}");
        }
    }

    #[test]
    fn q5_k_hand_block() {
        let sc: [u8; 8] = [4, 9, 1, 30, 63, 2, 16, 45];
        let mn: [u8; 8] = [3, 0, 12, 60, 5, 33, 1, 18];
        let mut scales = [0u8; 12];
        for j in 0..4 {
            scales[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
            scales[j + 4] = mn[j] | ((mn[j + 4] >> 4) << 6);
            scales[j + 8] = (sc[j + 4] & 0x0F) | ((mn[j + 4] & 0x0F) << 4);
        }
        let q: Vec<u8> = (0..256).map(|i| ((i * 19 + 2) % 32) as u8).collect();
        let mut qh = [0u8; 32];
        let mut qs = [0u8; 128];
        for chunk in 0..4 {
            for l in 0..32 {
                let (a, b_) = (q[chunk * 64 + l], q[chunk * 64 + 32 + l]);
                qs[chunk * 32 + l] = (a & 0x0F) | ((b_ & 0x0F) << 4);
                qh[l] |= ((a >> 4) << (2 * chunk)) | ((b_ >> 4) << (2 * chunk + 1));
            }
        }
        let (d, dmin) = (0.25f32, 0.5f32);
        let mut b = f16b(d).to_vec();
        b.extend_from_slice(&f16b(dmin));
        b.extend_from_slice(&scales);
        b.extend_from_slice(&qh);
        b.extend_from_slice(&qs);
        let v = as_f32(dequantize(Q5_K, &b, 256).unwrap());
        for i in 0..256 {
            let sub = i / 32;
            let want = d * sc[sub] as f32 * q[i] as f32 - dmin * mn[sub] as f32;
            assert_eq!(v[i], want, "value {i}");
        }
    }

    /// Random blocks of every quantized type, dequantized by gguf-py (llama.cpp's Python
    /// package): tests/fixtures/gguf/make_quant_blocks.py.
    #[test]
    fn matches_gguf_py_on_random_blocks() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/gguf/quant_blocks.json");
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
        let types = doc["types"].as_object().unwrap();
        assert_eq!(types.len(), 8);
        for (name, entry) in types {
            let t = entry["ggml_type"].as_u64().unwrap() as u32;
            let hex = entry["hex"].as_str().unwrap();
            let bytes: Vec<u8> = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                .collect();
            let want: Vec<f32> = entry["values"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect();
            let got = as_f32(dequantize(t, &bytes, want.len()).unwrap());
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-6 * w.abs().max(1e-3),
                    "{name} value {i}: got {g}, gguf-py has {w}"
                );
            }
        }
    }

    #[test]
    fn unsupported_type_and_bad_sizes_are_errors() {
        let e = dequantize(10, &[0; 84], 256).unwrap_err().to_string();
        assert!(e.contains("Q2_K") && e.contains("not supported"), "{e}");
        assert!(dequantize(Q8_0, &[0; 33], 32).is_err());
        assert!(tensor_nbytes(Q4_0, 48, 48).is_err());
        assert_eq!(tensor_nbytes(Q4_1, 64, 32).unwrap(), 40);
    }
}
