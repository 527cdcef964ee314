//! The GPU sampler's per-request state, as `sampling_state.cuh` lays it out: the engine
//! fills these structs and the kernel tests use them too, so both sides agree on one layout
//! (the test below pins the sizes and offsets the header gives).

/// Most `logit_bias` entries a request may carry.
pub const BIAS_CAP: usize = 1024;
/// Most EOS and stop-token ids a request's `min_tokens` masks.
pub const STOP_CAP: usize = 1088;
/// Most bad-word token sequences a request may carry.
pub const BAD_SEQS_CAP: usize = 128;
/// Most tokens of all a request's bad words together.
pub const BAD_TOKENS_CAP: usize = 4096;
/// Recent output tokens kept per request: a bad word may be one longer.
pub const HISTORY: usize = 32;

/// `SlotParams::flags`: counts (and, with a repetition penalty, the prompt mask) are kept.
pub const SLOT_PENALTIES: i32 = 1;
/// `SlotParams::flags`: the allowed mask holds `allowed_token_ids`.
pub const SLOT_ALLOWED: i32 = 2;
/// `SlotParams::flags`: `n_bias` sorted logit-bias entries.
pub const SLOT_BIAS: i32 = 4;

/// One request's sampling parameters on the device (64 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SlotParams {
    /// Below 1e-5: greedy.
    pub temperature: f32,
    /// 0: off.
    pub top_k: i32,
    /// 1: off.
    pub top_p: f32,
    /// 0: off.
    pub min_p: f32,
    pub seed: u64,
    pub repetition_penalty: f32,
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
    pub min_tokens: i32,
    pub flags: i32,
    pub n_bias: i32,
    pub n_stop: i32,
    pub n_bad: i32,
    pub reserved: [i32; 2],
}

/// A request joining: its parameters, its slot, and where its lists start in the upload's
/// i32 data (bias entries are (token, f32 bits) pairs; bad words are their lengths, then
/// their tokens).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SlotJoin {
    pub params: SlotParams,
    pub slot: i32,
    pub prompt_at: i32,
    pub n_prompt: i32,
    pub allowed_at: i32,
    pub n_allowed: i32,
    pub bias_at: i32,
    pub stops_at: i32,
    pub bad_at: i32,
}

/// Device addresses of the state's arrays (`SamplingTables` in the header).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SamplingTables {
    pub params: u64,
    pub counts: u64,
    pub prompt_mask: u64,
    pub allowed_mask: u64,
    pub bias: u64,
    pub stops: u64,
    pub bad_tokens: u64,
    pub bad_lens: u64,
    pub history: u64,
    pub history_len: u64,
    pub vocab: i32,
    pub words: i32,
}

impl SamplingTables {
    /// Bytes of each array for `slots` requests and `vocab` tokens, in field order.
    pub fn array_bytes(slots: usize, vocab: usize) -> [usize; 10] {
        let words = vocab.div_ceil(32);
        [
            slots * std::mem::size_of::<SlotParams>(),
            slots * vocab * 2,
            slots * words * 4,
            slots * words * 4,
            slots * BIAS_CAP * 8,
            slots * STOP_CAP * 4,
            slots * BAD_TOKENS_CAP * 4,
            slots * BAD_SEQS_CAP * 4,
            slots * HISTORY * 4,
            slots * 4,
        ]
    }
}

/// The bytes of a plain-old-data value, for uploads.
pub fn as_bytes<T: Copy>(v: &[T]) -> &[u8] {
    // SAFETY: T is one of the repr(C) structs above (or a primitive): no padding is read
    // uninitialised because every struct here is made of 4- and 8-byte fields in order.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    #[test]
    fn layouts_match_the_header() {
        assert_eq!(size_of::<SlotParams>(), 64);
        assert_eq!(offset_of!(SlotParams, seed), 16);
        assert_eq!(offset_of!(SlotParams, min_tokens), 36);
        assert_eq!(offset_of!(SlotParams, n_bad), 52);
        assert_eq!(size_of::<SlotJoin>(), 96);
        assert_eq!(offset_of!(SlotJoin, slot), 64);
        assert_eq!(offset_of!(SlotJoin, bad_at), 92);
        assert_eq!(size_of::<SamplingTables>(), 88);
        assert_eq!(offset_of!(SamplingTables, vocab), 80);
        let header = include_str!("sampling_state.cuh");
        for (name, value) in [
            ("RVLLM_BIAS_CAP", BIAS_CAP as i64),
            ("RVLLM_STOP_CAP", STOP_CAP as i64),
            ("RVLLM_BAD_SEQS_CAP", BAD_SEQS_CAP as i64),
            ("RVLLM_BAD_TOKENS_CAP", BAD_TOKENS_CAP as i64),
            ("RVLLM_HISTORY", HISTORY as i64),
            ("RVLLM_SLOT_PENALTIES", SLOT_PENALTIES as i64),
            ("RVLLM_SLOT_ALLOWED", SLOT_ALLOWED as i64),
            ("RVLLM_SLOT_BIAS", SLOT_BIAS as i64),
        ] {
            let line = header
                .lines()
                .find(|l| l.starts_with(&format!("#define {name} ")))
                .unwrap_or_else(|| panic!("{name} not in sampling_state.cuh"));
            let got: i64 = line.split_whitespace().nth(2).unwrap().parse().unwrap();
            assert_eq!(got, value, "{name}");
        }
    }
}
