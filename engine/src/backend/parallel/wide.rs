//! Sums over the ranks wider than the f32 buffers the collectives carry: the CPU's
//! row-parallel products are all-reduced in f64 (`cpu::linear::row_parallel_linear`), so
//! that the group's sum rounds to f32 once, as one rank's does.
use anyhow::Result;

use super::HostCommunicator;

/// Every rank's `buf` becomes the element-wise sum over the ranks, added in f64 in rank
/// order (so every rank holds the same bits). The values travel through `all_gather` as
/// the bit patterns of two f32s each (no arithmetic touches them on the way, so every bit
/// arrives), and each rank adds them up itself.
pub fn all_reduce_sum_f64(comm: &HostCommunicator, buf: &mut [f64]) -> Result<()> {
    let world = comm.world_size();
    if world == 1 {
        return Ok(());
    }
    let send: Vec<f32> = buf
        .iter()
        .flat_map(|v| {
            let bits = v.to_bits();
            [
                f32::from_bits(bits as u32),
                f32::from_bits((bits >> 32) as u32),
            ]
        })
        .collect();
    let mut all = vec![0.0f32; send.len() * world];
    comm.all_gather(&send, &mut all)?;
    let value = |pair: &[f32]| {
        f64::from_bits(u64::from(pair[0].to_bits()) | (u64::from(pair[1].to_bits()) << 32))
    };
    let per_rank = send.len();
    for (i, b) in buf.iter_mut().enumerate() {
        let mut sum = value(&all[2 * i..2 * i + 2]);
        for r in 1..world {
            let at = r * per_rank + 2 * i;
            sum += value(&all[at..at + 2]);
        }
        *b = sum;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::parallel::{Communicator, LocalGroup};
    use std::sync::Arc;

    #[test]
    fn f64_sums_keep_every_bit_and_add_in_rank_order() {
        let ranks = LocalGroup::new(3);
        let out: Vec<Vec<f64>> = std::thread::scope(|s| {
            let handles: Vec<_> = ranks
                .into_iter()
                .map(|g| {
                    s.spawn(move || {
                        let r = g.rank() as f64;
                        let comm: Arc<HostCommunicator> = Arc::new(g);
                        // 1 + 2^-40 needs 41 bits: lost in f32, kept here.
                        let mut buf = vec![1.0 + 2f64.powi(-40) * r, 1e300 * (r - 1.0), -0.0];
                        all_reduce_sum_f64(comm.as_ref(), &mut buf).unwrap();
                        buf
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for o in &out {
            assert_eq!(o[0], 3.0 + 3.0 * 2f64.powi(-40));
            assert_eq!(o[1], 0.0);
            assert_eq!(o[2].to_bits(), (-0.0f64).to_bits());
        }
    }
}
