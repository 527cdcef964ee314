//! The engine's kernel profile mode: `RVLLM_PROFILE_KERNELS=1` brackets every kernel launch
//! and cuBLAS call with CUDA events and sums the elapsed times per kernel name; `rvllm bench`
//! prints the table. Launches inside a CUDA graph capture are not bracketed (graphs replay
//! without host calls), so profile with `--enforce-eager` to see decode steps too. The events
//! serialize the kernels, so each time is the kernel's own, without the overlap programmatic
//! dependent launch gives; the table says where the time goes, not the step's total.
use std::collections::BTreeMap;
use std::sync::Mutex;

use cudarc::driver::{result as drv, sys};

/// Per-kernel call counts and GPU milliseconds.
#[derive(Default)]
pub struct KernelProfiler {
    /// Launches whose events have not been read yet: (kernel, start, end).
    pending: Mutex<Vec<(&'static str, sys::CUevent, sys::CUevent)>>,
    totals: Mutex<BTreeMap<&'static str, (u64, f64)>>,
}

// SAFETY: the events are only touched under the mutexes, from the engine thread's context.
unsafe impl Send for KernelProfiler {}
unsafe impl Sync for KernelProfiler {}

impl KernelProfiler {
    /// Records a start event on `stream`, unless the stream is being captured into a graph
    /// (or events cannot be made: the profile then misses that launch, the launch goes on).
    ///
    /// # Safety
    /// `stream` must be a live stream of the current context.
    pub unsafe fn begin(&self, stream: sys::CUstream) -> Option<sys::CUevent> {
        let mut status = sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
        // SAFETY: a valid stream and an out-pointer to a local.
        let ok = unsafe { sys::cuStreamIsCapturing(stream, &mut status) }.result();
        if ok.is_err() || status != sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE {
            return None;
        }
        let ev = drv::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT).ok()?;
        // SAFETY: the event was just created; the stream is valid.
        if unsafe { drv::event::record(ev, stream) }.is_err() {
            // SAFETY: created above and not recorded anywhere.
            unsafe {
                let _ = drv::event::destroy(ev);
            }
            return None;
        }
        Some(ev)
    }

    /// Records the end event of a launch begun with `begin`.
    ///
    /// # Safety
    /// `start` must come from `begin` on the same live `stream`, and be passed here once.
    pub unsafe fn end(&self, kernel: &'static str, start: sys::CUevent, stream: sys::CUstream) {
        let Ok(stop) = drv::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT) else {
            // SAFETY: `start` came from `begin` and is dropped from the profile here.
            unsafe {
                let _ = drv::event::destroy(start);
            }
            return;
        };
        // SAFETY: both events are valid; the stream is the one `start` was recorded on.
        let _ = unsafe { drv::event::record(stop, stream) };
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((kernel, start, stop));
    }

    /// Reads the events of every launch so far (call after a stream synchronize) and frees
    /// them.
    pub fn resolve(&self) {
        let pending = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
        let mut totals = self.totals.lock().unwrap_or_else(|e| e.into_inner());
        for (kernel, start, stop) in pending {
            // SAFETY: both events were recorded on one stream that has been synchronized.
            if let Ok(ms) = unsafe { drv::event::elapsed(start, stop) } {
                let t = totals.entry(kernel).or_insert((0, 0.0));
                t.0 += 1;
                t.1 += ms as f64;
            }
            // SAFETY: created by this profiler and no longer used.
            unsafe {
                let _ = drv::event::destroy(start);
                let _ = drv::event::destroy(stop);
            }
        }
    }

    /// Forgets every launch so far (call after a stream synchronize): the engine's start-up
    /// (the profiling pass, the graph captures' warm-up runs) would otherwise fill the table
    /// that is meant to show where the served steps' time goes.
    pub fn clear(&self) {
        self.resolve();
        self.totals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// The table: one line a kernel, the most time first.
    pub fn report(&self) -> String {
        report(&self.totals.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

fn report(totals: &BTreeMap<&'static str, (u64, f64)>) -> String {
    let all: f64 = totals.values().map(|t| t.1).sum();
    let mut rows: Vec<_> = totals.iter().collect();
    rows.sort_by(|a, b| b.1 .1.total_cmp(&a.1 .1));
    let mut out = format!(
        "kernel profile (the served steps' eager launches, serialized by events): {:.3} ms of GPU time\n",
        all
    );
    out.push_str(&format!(
        "  {:<34} {:>8} {:>12} {:>10} {:>7}\n",
        "kernel", "calls", "total ms", "mean us", "share"
    ));
    for (name, &(calls, ms)) in rows {
        out.push_str(&format!(
            "  {:<34} {:>8} {:>12.3} {:>10.2} {:>6.1}%\n",
            name,
            calls,
            ms,
            1e3 * ms / calls.max(1) as f64,
            if all > 0.0 { 100.0 * ms / all } else { 0.0 }
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_lists_kernels_by_time_with_their_share() {
        let mut t = BTreeMap::new();
        t.insert("gemv_bulk_bf16_b1", (4u64, 3.0f64));
        t.insert("rms_norm_bf16", (4, 1.0));
        let r = report(&t);
        let gemv = r.find("gemv_bulk_bf16_b1").unwrap();
        let norm = r.find("rms_norm_bf16").unwrap();
        assert!(gemv < norm, "the most time first:\n{r}");
        assert!(r.contains("75.0%") && r.contains("25.0%"), "{r}");
        assert!(r.contains("750.00"), "mean us of the GEMV:\n{r}");
        assert!(r.contains("4.000 ms"), "{r}");
    }
}
