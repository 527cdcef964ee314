//! The TCP group over real loopback sockets, ranks as threads: the same bits as the
//! in-process group, errors (never hangs) when a rank dies or aborts, mismatched processes
//! refused by name at the rendezvous.
use std::net::TcpListener;
use std::time::{Duration, Instant};

use super::super::wire::{accept_all, connect, join, Hello, Role};
use super::super::LocalGroup;
use super::*;

const FP: u64 = 0xfeed;

fn hello(world: usize, role: Role, fingerprint: u64) -> Hello {
    Hello {
        world,
        nnodes: 1,
        fingerprint,
        role,
    }
}

/// Runs `f` on every rank of a new TCP group of `world` ranks (threads, loopback sockets).
fn on_ranks<T: Send>(world: usize, f: impl Fn(TcpGroup) -> T + Sync) -> Vec<T> {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let timeout = Duration::from_secs(20);
    let deadline = Instant::now() + timeout;
    std::thread::scope(|s| {
        let f = &f;
        let addr = &addr;
        let members: Vec<_> = (1..world)
            .map(|rank| {
                s.spawn(move || {
                    let mut sock = connect(addr, deadline).unwrap();
                    join(&mut sock, &hello(world, Role::Rank(rank), FP), deadline).unwrap();
                    f(TcpGroup::member(rank, world, sock, timeout).unwrap())
                })
            })
            .collect();
        let got = accept_all(&listener, &hello(world, Role::Rank(0), FP), &[], deadline).unwrap();
        let leader = TcpGroup::leader(world, got.ranks.into_values().collect(), timeout).unwrap();
        let mut out = vec![f(leader)];
        out.extend(members.into_iter().map(|h| h.join().unwrap()));
        out
    })
}

/// Values whose sum depends on the order of addition.
fn inputs(rank: usize, round: usize) -> Vec<f32> {
    (0..64)
        .map(|i| {
            let x = ((rank * 7919 + round * 131 + i * 17) % 1000) as f32;
            (x - 500.0) * 10f32.powi((i % 9) as i32 - 4)
        })
        .collect()
}

#[test]
fn all_reduce_holds_the_in_process_groups_bits_on_every_rank() {
    let rounds = 50;
    let tcp = on_ranks(4, |g| {
        (0..rounds)
            .map(|round| {
                let mut b = inputs(g.rank(), round);
                g.all_reduce_sum(&mut b).unwrap();
                b
            })
            .collect::<Vec<_>>()
    });
    let local: Vec<Vec<Vec<f32>>> = std::thread::scope(|s| {
        let hs: Vec<_> = LocalGroup::new(4)
            .into_iter()
            .map(|g| {
                s.spawn(move || {
                    (0..rounds)
                        .map(|round| {
                            let mut b = inputs(g.rank(), round);
                            g.all_reduce_sum(&mut b).unwrap();
                            b
                        })
                        .collect()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let bits = |v: &Vec<Vec<f32>>| -> Vec<Vec<u32>> {
        v.iter()
            .map(|r| r.iter().map(|x| x.to_bits()).collect())
            .collect()
    };
    for (t, l) in tcp.iter().zip(&local) {
        assert_eq!(bits(t), bits(l));
    }
    // And the order matters for these inputs, so the check above can fail.
    let reversed: Vec<f32> = (0..64)
        .map(|i| {
            (0..4)
                .rev()
                .map(|r| inputs(r, 0)[i])
                .fold(0.0, |a, x| a + x)
        })
        .collect();
    let reversed_bits: Vec<u32> = reversed.iter().map(|x| x.to_bits()).collect();
    assert_ne!(bits(&tcp[0])[0], reversed_bits);
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
fn a_dead_or_aborting_rank_is_an_error_on_every_other_rank() {
    for dead in [0, 2] {
        let started = Instant::now();
        let out = on_ranks(3, |g| {
            if g.rank() == dead {
                drop(g); // the process "dies": its sockets close
                return None;
            }
            let first = g.all_reduce_sum(&mut [1.0]);
            let later = g.all_reduce_sum(&mut [1.0]);
            Some((format!("{:#}", first.unwrap_err()), later.is_err()))
        });
        assert!(started.elapsed() < Duration::from_secs(10));
        for (rank, o) in out.iter().enumerate() {
            if rank == dead {
                continue;
            }
            let (msg, later_failed) = o.as_ref().unwrap();
            assert!(msg.contains("closed"), "rank {rank}: {msg}");
            assert!(later_failed);
        }
    }
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
fn mismatched_lengths_and_collectives_are_errors_on_every_rank() {
    let out = on_ranks(2, |g| {
        let mut buf = vec![1.0; 1 + g.rank()];
        format!("{:#}", g.all_reduce_sum(&mut buf).unwrap_err())
    });
    assert!(
        out.iter().all(|m| m.contains("different lengths")),
        "{out:?}"
    );
    let out = on_ranks(2, |g| match g.rank() {
        0 => format!("{:#}", g.barrier().unwrap_err()),
        _ => format!("{:#}", g.all_reduce_sum(&mut [1.0]).unwrap_err()),
    });
    assert!(
        out.iter()
            .all(|m| m.contains("rank 1 called all_reduce_sum while rank 0 called barrier")),
        "{out:?}"
    );
}

#[test]
fn the_rendezvous_refuses_a_mismatched_process_and_times_out_on_a_missing_one() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    let member = std::thread::spawn(move || {
        let mut s = connect(&addr, deadline).unwrap();
        format!(
            "{:#}",
            join(&mut s, &hello(2, Role::Rank(1), FP + 1), deadline).unwrap_err()
        )
    });
    let leader = accept_all(&listener, &hello(2, Role::Rank(0), FP), &[], deadline);
    let leader_msg = format!("{:#}", leader.err().expect("refused"));
    let member_msg = member.join().unwrap();
    for m in [&leader_msg, &member_msg] {
        assert!(m.contains("rank 1 loaded a different model"), "{m}");
    }

    // A stray connection (junk, then one that says nothing) is dropped, not fatal.
    let addr = listener.local_addr().unwrap();
    let mut junk = std::net::TcpStream::connect(addr).unwrap();
    std::io::Write::write_all(&mut junk, b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let _silent = std::net::TcpStream::connect(addr).unwrap();
    let started = Instant::now();
    let soon = Instant::now() + Duration::from_millis(300);
    let err = accept_all(&listener, &hello(3, Role::Rank(0), FP), &[], soon)
        .err()
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        format!("{err:#}").contains("ranks [1, 2]) never joined"),
        "{err:#}"
    );
}
