//! RoPE inverse frequencies for every supported scaling, computed as transformers'
//! `modeling_rope_utils` does (f64 here where it uses Python floats; the results agree to
//! the last f32 bit or one ulp).
use super::config::RopeScaling;

/// One RoPE: the inverse frequency of each rotated pair of dimensions, and the factor cos
/// and sin are multiplied by (YaRN's and LongRoPE's attention factor; 1 otherwise).
#[derive(Debug, Clone, PartialEq)]
pub struct Rope {
    pub inv_freq: Vec<f32>,
    pub attention_factor: f32,
}

fn base_freqs(theta: f32, dim: usize) -> Vec<f64> {
    (0..dim / 2)
        .map(|i| (theta as f64).powf(2.0 * i as f64 / dim as f64))
        .collect()
}

impl Rope {
    /// `dim` is the number of rotated dimensions of a head; `context_len` the longest
    /// context the model will run (LongRoPE's choice of factors).
    pub fn new(theta: f32, dim: usize, scaling: Option<&RopeScaling>, context_len: usize) -> Self {
        let pos = base_freqs(theta, dim);
        let plain = || pos.iter().map(|p| (1.0 / p) as f32).collect::<Vec<f32>>();
        match scaling {
            None => Self {
                inv_freq: plain(),
                attention_factor: 1.0,
            },
            Some(RopeScaling::Linear { factor }) => Self {
                inv_freq: plain().into_iter().map(|f| f / factor).collect(),
                attention_factor: 1.0,
            },
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                let mut inv = plain();
                let old = *original_max_position_embeddings as f32;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                for f in inv.iter_mut() {
                    let wavelen = 2.0 * std::f32::consts::PI / *f;
                    if wavelen < high_wavelen {
                        // high frequency: unchanged
                    } else if wavelen > low_wavelen {
                        *f /= factor;
                    } else {
                        let smooth = (old / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        *f = (1.0 - smooth) * *f / factor + smooth * *f;
                    }
                }
                Self {
                    inv_freq: inv,
                    attention_factor: 1.0,
                }
            }
            Some(RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                attention_factor,
                truncate,
            }) => {
                let (d, base, omax) = (
                    dim as f64,
                    theta as f64,
                    *original_max_position_embeddings as f64,
                );
                // The dimension at which a frequency turns `rotations` times over the
                // original context.
                let correction_dim = |rotations: f64| {
                    d * (omax / (rotations * 2.0 * std::f64::consts::PI)).ln() / (2.0 * base.ln())
                };
                let (mut low, mut high) = (
                    correction_dim(*beta_fast as f64),
                    correction_dim(*beta_slow as f64),
                );
                if *truncate {
                    (low, high) = (low.floor(), high.ceil());
                }
                let (low, mut high) = (low.max(0.0), high.min(d - 1.0));
                if low == high {
                    high += 0.001; // as transformers: no division by zero
                }
                let inv_freq = pos
                    .iter()
                    .enumerate()
                    .map(|(i, p)| {
                        // Share of the extrapolated (unscaled) frequency: 1 for the fast
                        // dimensions below `low`, 0 for the slow ones above `high`.
                        let ramp = (((i as f64 - low) / (high - low)) as f32).clamp(0.0, 1.0);
                        let extra = 1.0 - ramp;
                        let (fe, fi) = ((1.0 / p) as f32, (1.0 / (*factor as f64 * p)) as f32);
                        fi * (1.0 - extra) + fe * extra
                    })
                    .collect();
                Self {
                    inv_freq,
                    attention_factor: *attention_factor,
                }
            }
            Some(RopeScaling::LongRope {
                short_factor,
                long_factor,
                original_max_position_embeddings,
                attention_factor,
            }) => {
                let ext = if context_len > *original_max_position_embeddings {
                    long_factor
                } else {
                    short_factor
                };
                let inv_freq = pos
                    .iter()
                    .zip(ext)
                    .map(|(p, e)| (1.0 / (*e as f64 * p)) as f32)
                    .collect();
                Self {
                    inv_freq,
                    attention_factor: *attention_factor,
                }
            }
        }
    }
}

/// YaRN's default attention factor (transformers' `get_mscale`): `0.1 * mscale * ln(factor)
/// + 1` for factors above 1, the ratio of two such values when both `mscale` and
/// `mscale_all_dim` are given.
pub fn yarn_attention_factor(factor: f32, mscale: Option<f32>, mscale_all_dim: Option<f32>) -> f32 {
    let get = |m: f32| {
        if factor <= 1.0 {
            1.0
        } else {
            0.1 * m * factor.ln() + 1.0
        }
    };
    match (mscale, mscale_all_dim) {
        (Some(m), Some(a)) if m != 0.0 && a != 0.0 => get(m) / get(a),
        _ => get(1.0),
    }
}

/// LongRoPE's default attention factor: `sqrt(1 + ln(factor) / ln(original))` where `factor`
/// is how far the context was extended.
pub fn longrope_attention_factor(factor: f32, original_max_position_embeddings: usize) -> f32 {
    if factor <= 1.0 {
        1.0
    } else {
        (1.0 + factor.ln() / (original_max_position_embeddings as f32).ln()).sqrt()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yarn_keeps_fast_dims_and_interpolates_slow_ones() {
        let s = RopeScaling::Yarn {
            factor: 4.0,
            original_max_position_embeddings: 32,
            beta_fast: 32.0,
            beta_slow: 1.0,
            attention_factor: yarn_attention_factor(4.0, None, None),
            truncate: true,
        };
        let plain = Rope::new(10000.0, 128, None, 128).inv_freq;
        let r = Rope::new(10000.0, 128, Some(&s), 128);
        assert_eq!(
            r.inv_freq[0], plain[0],
            "the fastest dimension is extrapolated"
        );
        let last = plain.len() - 1;
        assert!((r.inv_freq[last] - plain[last] / 4.0).abs() <= 1e-12);
        assert!((r.attention_factor - (0.1 * 4f32.ln() + 1.0)).abs() < 1e-7);
    }

    #[test]
    fn longrope_picks_factors_by_context() {
        let s = RopeScaling::LongRope {
            short_factor: vec![1.0, 2.0],
            long_factor: vec![3.0, 4.0],
            original_max_position_embeddings: 100,
            attention_factor: 1.2,
        };
        let plain = Rope::new(10000.0, 4, None, 0).inv_freq;
        let short = Rope::new(10000.0, 4, Some(&s), 100);
        let long = Rope::new(10000.0, 4, Some(&s), 101);
        assert_eq!(short.inv_freq, vec![plain[0], plain[1] / 2.0]);
        assert_eq!(long.inv_freq, vec![plain[0] / 3.0, plain[1] / 4.0]);
        assert_eq!(long.attention_factor, 1.2);
    }
}
