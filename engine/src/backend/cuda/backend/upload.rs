//! Host weights to the GPU through page-locked staging buffers (`Gpu::upload_staged`): each
//! chunk is converted (or, already in the type, copied) on every core into one buffer while
//! the copy of the chunk before runs, so a checkpoint in the page cache goes up at the link's
//! speed rather than through the driver's synchronous pageable path.
use anyhow::Result;
use rayon::prelude::*;

use super::CudaBackend;
use crate::backend::cuda::device::DevBuf;
use crate::backend::cuda::elem::{bits_of, GpuDtype, ELEM_BYTES};
use crate::types::HostData;

/// Elements a core converts or copies at a time inside a chunk.
const PIECE: usize = 1 << 16;

/// Values `first..first + out.len()` of `data` as `dtype`'s bits, on every core.
fn convert_into(data: &HostData, dtype: GpuDtype, first: usize, out: &mut [u16]) {
    let range = first..first + out.len();
    let pieces = out.par_chunks_mut(PIECE).enumerate();
    match (data, dtype) {
        // Already in the type: a copy of the bits.
        (HostData::BF16(v), GpuDtype::Bf16) => pieces.for_each(|(p, o)| {
            let src = &v[range.start + p * PIECE..][..o.len()];
            o.iter_mut().zip(src).for_each(|(o, x)| *o = x.to_bits());
        }),
        (HostData::F16(v), GpuDtype::F16) => pieces.for_each(|(p, o)| {
            let src = &v[range.start + p * PIECE..][..o.len()];
            o.iter_mut().zip(src).for_each(|(o, x)| *o = x.to_bits());
        }),
        (HostData::F32(v), d) => pieces.for_each(|(p, o)| {
            let src = &v[range.start + p * PIECE..][..o.len()];
            o.iter_mut().zip(src).for_each(|(o, &x)| *o = bits_of(x, d));
        }),
        (HostData::F16(v), d) => pieces.for_each(|(p, o)| {
            let src = &v[range.start + p * PIECE..][..o.len()];
            o.iter_mut()
                .zip(src)
                .for_each(|(o, x)| *o = bits_of(x.to_f32(), d));
        }),
        (HostData::BF16(v), d) => pieces.for_each(|(p, o)| {
            let src = &v[range.start + p * PIECE..][..o.len()];
            o.iter_mut()
                .zip(src)
                .for_each(|(o, x)| *o = bits_of(x.to_f32(), d));
        }),
    }
}

fn len_of(data: &HostData) -> usize {
    match data {
        HostData::F32(v) => v.len(),
        HostData::F16(v) => v.len(),
        HostData::BF16(v) => v.len(),
    }
}

impl CudaBackend {
    /// Host data in this backend's type, in a new device buffer (a checkpoint already in the
    /// type is copied as it is: no pass of conversions over 16 GB on the start-up path).
    pub(super) fn upload_host_staged(&self, data: &HostData) -> Result<DevBuf> {
        let n = len_of(data);
        let buf = self.gpu.alloc(n * ELEM_BYTES)?;
        let dtype = self.dtype;
        self.gpu.upload_staged(buf.ptr, n, |first, out| {
            convert_into(data, dtype, first, out)
        })?;
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};

    /// Every chunk boundary and every pairing of host type and device type gives the bits a
    /// whole-slice conversion gives.
    #[test]
    fn chunks_convert_as_the_whole_does() {
        let x: Vec<f32> = (0..3 * PIECE + 17)
            .map(|i| (i as f32 * 0.37).sin() * 3.0)
            .collect();
        let datas = [
            HostData::F32(x.clone()),
            HostData::F16(x.iter().map(|&v| f16::from_f32(v)).collect()),
            HostData::BF16(x.iter().map(|&v| bf16::from_f32(v)).collect()),
        ];
        for data in &datas {
            for dtype in [GpuDtype::Bf16, GpuDtype::F16] {
                let want = crate::backend::cuda::elem::host_bits(data, dtype);
                let mut got = vec![0u16; x.len()];
                for (k, out) in got.chunks_mut(PIECE + 5).enumerate() {
                    convert_into(data, dtype, k * (PIECE + 5), out);
                }
                assert_eq!(got, want, "{dtype:?}");
            }
        }
    }
}
