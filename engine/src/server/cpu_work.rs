//! Where a request's CPU-heavy preparation runs: parsing its body, rendering its chat
//! template and tokenizing its prompts. Never on the async worker threads (a few of them
//! serve every connection, and one busy for seconds would hold up `/health` and the
//! streams behind it), but on tokio's blocking threads, at most `size` at once (a
//! semaphore), so a burst of large prompts queues instead of taking every core from the
//! engine.
use std::sync::Arc;

use tokio::sync::Semaphore;

use super::error::ApiError;

pub struct CpuWork {
    permits: Arc<Semaphore>,
    size: usize,
}

impl CpuWork {
    pub fn new(size: usize) -> Self {
        let size = size.max(1);
        Self {
            permits: Arc::new(Semaphore::new(size)),
            size,
        }
    }

    /// Half the cores, between 2 and 8: tokenizing is one core per request, and the engine
    /// (the CPU backend computes on every core) must keep most of them.
    pub fn for_this_machine() -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Self::new((cores / 2).clamp(2, 8))
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// Run `f` on a blocking thread once a permit is free. The permit goes with the work,
    /// so a client that hangs up frees its permit only when its work is done: the bound is
    /// on the work actually running.
    pub async fn run<T, F>(&self, f: F) -> Result<T, ApiError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ApiError::unavailable("the server is shutting down"))?;
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            f()
        })
        .await
        .map_err(|e| ApiError::internal(format!("preparing the request failed: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    /// No more than `size` jobs run at once, and the async threads stay free meanwhile.
    #[test]
    fn at_most_size_jobs_run_at_once_off_the_async_threads() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let work = Arc::new(CpuWork::new(2));
            let running = Arc::new(AtomicUsize::new(0));
            let most = Arc::new(AtomicUsize::new(0));
            let jobs: Vec<_> = (0..6)
                .map(|_| {
                    let (work, running, most) = (work.clone(), running.clone(), most.clone());
                    tokio::spawn(async move {
                        work.run(move || {
                            let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                            most.fetch_max(now, Ordering::SeqCst);
                            std::thread::sleep(Duration::from_millis(100));
                            running.fetch_sub(1, Ordering::SeqCst);
                        })
                        .await
                    })
                })
                .collect();
            // The single async worker still runs other tasks while the jobs block.
            let t = std::time::Instant::now();
            tokio::time::sleep(Duration::from_millis(10)).await;
            assert!(t.elapsed() < Duration::from_millis(90), "{:?}", t.elapsed());
            for j in jobs {
                j.await.unwrap().unwrap();
            }
            assert_eq!(most.load(Ordering::SeqCst), 2);
        });
    }
}
