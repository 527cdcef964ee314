//! The in-process communicator: the ranks are threads of one process sharing one
//! rendezvous. Each collective deposits every rank's buffer, then each rank computes its
//! result from all of them in rank order (so all ranks get identical bits), then waits
//! until every rank has read before any may deposit for the next collective.
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use anyhow::{bail, ensure, Result};

use super::Communicator;

#[derive(Debug, Default)]
struct Rendezvous {
    /// Each rank's buffer of the collective in progress.
    slots: Vec<Vec<f32>>,
    /// Ranks that have deposited (phase 1) and that have read (phase 2) this round.
    deposited: usize,
    read: usize,
    /// Bumped when a phase completes: a waiting rank wakes when its phase's counter moves.
    deposits_done: u64,
    reads_done: u64,
    aborted: bool,
}

#[derive(Debug)]
struct Shared {
    world: usize,
    state: Mutex<Rendezvous>,
    wake: Condvar,
}

/// One rank of an in-process group; `LocalGroup::new(n)` makes the n ranks.
#[derive(Debug, Clone)]
pub struct LocalGroup {
    rank: usize,
    shared: Arc<Shared>,
}

impl LocalGroup {
    /// The `world` ranks of one new group, rank i at index i.
    pub fn new(world: usize) -> Vec<LocalGroup> {
        let shared = Arc::new(Shared {
            world,
            state: Mutex::new(Rendezvous {
                slots: vec![Vec::new(); world],
                ..Default::default()
            }),
            wake: Condvar::new(),
        });
        (0..world)
            .map(|rank| LocalGroup {
                rank,
                shared: shared.clone(),
            })
            .collect()
    }

    fn lock(&self) -> MutexGuard<'_, Rendezvous> {
        // A rank that panicked while holding the lock left the state consistent (every
        // update is a plain store), so the poison is ignored; the group is aborted anyway.
        self.shared
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn wait_while<'a>(
        &self,
        guard: MutexGuard<'a, Rendezvous>,
        pending: impl FnMut(&mut Rendezvous) -> bool,
    ) -> MutexGuard<'a, Rendezvous> {
        self.shared
            .wake
            .wait_while(guard, pending)
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Deposits this rank's buffer (`deposit` fills its slot from `io`), waits for every
    /// rank's, hands all of them (rank order) to `use_all`, and returns once every rank has
    /// used them.
    fn exchange<S: ?Sized, T>(
        &self,
        what: &str,
        io: &mut S,
        deposit: impl FnOnce(&S, &mut Vec<f32>),
        use_all: impl FnOnce(&[Vec<f32>], &mut S) -> Result<T>,
    ) -> Result<T> {
        let world = self.shared.world;
        let mut st = self.lock();
        if st.aborted {
            bail!(
                "{what} on rank {}: the tensor-parallel group was aborted by a failing rank",
                self.rank
            );
        }
        st.slots[self.rank].clear();
        deposit(io, &mut st.slots[self.rank]);
        st.deposited += 1;
        if st.deposited == world {
            st.deposited = 0;
            st.deposits_done += 1;
            self.shared.wake.notify_all();
        } else {
            let round = st.deposits_done;
            st = self.wait_while(st, |s| s.deposits_done == round && !s.aborted);
        }
        if st.aborted {
            bail!(
                "{what} on rank {}: the tensor-parallel group was aborted by a failing rank",
                self.rank
            );
        }
        let result = use_all(&st.slots, io);
        if result.is_err() {
            st.aborted = true;
            self.shared.wake.notify_all();
            return result;
        }
        st.read += 1;
        if st.read == world {
            st.read = 0;
            st.reads_done += 1;
            self.shared.wake.notify_all();
        } else {
            let round = st.reads_done;
            st = self.wait_while(st, |s| s.reads_done == round && !s.aborted);
        }
        if st.aborted {
            bail!(
                "{what} on rank {}: the tensor-parallel group was aborted by a failing rank",
                self.rank
            );
        }
        result
    }
}

fn same_lengths(what: &str, slots: &[Vec<f32>]) -> Result<usize> {
    let n = slots[0].len();
    ensure!(
        slots.iter().all(|s| s.len() == n),
        "{what}: the ranks passed buffers of different lengths ({:?})",
        slots.iter().map(Vec::len).collect::<Vec<_>>()
    );
    Ok(n)
}

impl Communicator for LocalGroup {
    type Buf = [f32];
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.shared.world
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        if self.shared.world == 1 {
            return Ok(());
        }
        let what = "all_reduce_sum";
        let deposit = |b: &[f32], slot: &mut Vec<f32>| slot.extend_from_slice(b);
        self.exchange(what, buf, deposit, |slots, buf| {
            ensure!(
                same_lengths(what, slots)? == buf.len(),
                "{what}: length mismatch"
            );
            buf.copy_from_slice(&slots[0]);
            for s in &slots[1..] {
                buf.iter_mut().zip(s).for_each(|(b, x)| *b += x);
            }
            Ok(())
        })
    }
    fn all_gather(&self, send: &[f32], out: &mut [f32]) -> Result<()> {
        let what = "all_gather";
        let deposit = |io: &(&[f32], &mut [f32]), slot: &mut Vec<f32>| slot.extend_from_slice(io.0);
        self.exchange(what, &mut (send, out), deposit, |slots, (_, out)| {
            let n = same_lengths(what, slots)?;
            ensure!(
                out.len() == n * slots.len(),
                "{what}: the output holds {} values, not {} ranks × {n}",
                out.len(),
                slots.len()
            );
            for (dst, s) in out.chunks_exact_mut(n.max(1)).zip(slots) {
                dst.copy_from_slice(s);
            }
            Ok(())
        })
    }
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()> {
        let what = "broadcast";
        ensure!(
            root < self.shared.world,
            "{what}: root {root} is not a rank"
        );
        let is_root = self.rank == root;
        let deposit = |b: &[f32], slot: &mut Vec<f32>| {
            if is_root {
                slot.extend_from_slice(b)
            }
        };
        self.exchange(what, buf, deposit, |slots, buf| {
            ensure!(
                slots[root].len() == buf.len(),
                "{what}: the root sent {} values, this rank expects {}",
                slots[root].len(),
                buf.len()
            );
            buf.copy_from_slice(&slots[root]);
            Ok(())
        })
    }
    fn barrier(&self) -> Result<()> {
        self.exchange("barrier", &mut [0.0f32][..], |_, _| {}, |_, _| Ok(()))
    }
    fn abort(&self) {
        self.lock().aborted = true;
        self.shared.wake.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` on every rank of a new group of `world`, each on its own thread.
    fn on_ranks<T: Send>(world: usize, f: impl Fn(LocalGroup) -> T + Sync) -> Vec<T> {
        let ranks = LocalGroup::new(world);
        std::thread::scope(|s| {
            let handles: Vec<_> = ranks
                .into_iter()
                .map(|g| {
                    let f = &f;
                    s.spawn(move || f(g))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn all_reduce_sums_in_rank_order_on_every_rank_many_times() {
        let out = on_ranks(4, |g| {
            let mut last = Vec::new();
            for round in 0..200 {
                let r = g.rank() as f32;
                let mut buf = vec![r + round as f32, 1e8 * (r - 1.5), 0.1 * r];
                g.all_reduce_sum(&mut buf).unwrap();
                last = buf;
            }
            last
        });
        // Rank order: ((1e8·-1.5 + 1e8·-0.5) + 1e8·0.5) + 1e8·1.5, exactly 0.
        let expect = vec![6.0 + 4.0 * 199.0, 0.0, ((0.0f32 + 0.1) + 0.2) + 0.3];
        for o in &out {
            assert_eq!(o, &expect);
        }
    }

    #[test]
    fn all_gather_broadcast_and_barrier() {
        let out = on_ranks(3, |g| {
            let mut gathered = vec![0.0; 6];
            let r = g.rank() as f32;
            g.all_gather(&[r, 10.0 * r], &mut gathered).unwrap();
            g.barrier().unwrap();
            let mut b = vec![r; 2];
            g.broadcast(&mut b, 2).unwrap();
            (gathered, b)
        });
        for (gathered, b) in out {
            assert_eq!(gathered, vec![0.0, 0.0, 1.0, 10.0, 2.0, 20.0]);
            assert_eq!(b, vec![2.0, 2.0]);
        }
    }

    #[test]
    fn an_aborting_rank_releases_the_others_with_an_error() {
        let out = on_ranks(3, |g| {
            if g.rank() == 1 {
                g.abort();
                return None;
            }
            Some(g.all_reduce_sum(&mut [1.0]).is_err())
        });
        assert_eq!(out, vec![Some(true), None, Some(true)]);
    }

    #[test]
    fn mismatched_lengths_are_an_error_not_a_hang() {
        let out = on_ranks(2, |g| {
            let mut buf = vec![1.0; 1 + g.rank()];
            g.all_reduce_sum(&mut buf).is_err()
        });
        assert_eq!(out, vec![true, true]);
    }
}
