// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The request queue's ring fast path (src/ring.rs) at its edges, over a real vhost-user
//! socket: chains it must hand to virtio-queue's slow path (buffers across memory regions,
//! long chains, indirect tables, malformed chains) mixed into batches of simple ones, the
//! avail and used indices wrapping at 65535, and interrupt suppression (EVENT_IDX's
//! `used_event`, `VRING_AVAIL_F_NO_INTERRUPT`) decided exactly as the spec says.

mod common;

use std::time::{Duration, Instant};

use common::*;
use vhost_iommu_testkit::{Chain, Completion, MemoryRegion, Options, RawDesc, WaitMode};
use virtio::Status;

/// pci-testdev at 00:05.0.
const EP: u32 = 0x28;
const MIB: u64 = 1 << 20;
const WAIT: Duration = Duration::from_secs(10);

fn n(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

/// MAP then UNMAP of page `i`, encoded.
fn pair(i: u64) -> [Vec<u8>; 2] {
    let iova = 0x1000_0000 + (i << 12);
    [
        map(1, iova, iova + 0xfff, i << 12).encode(),
        unmap(1, iova, iova + 0xfff).encode(),
    ]
}

/// One request chain per MAP and UNMAP of `pairs`, in order (4-byte status tails).
fn chains(pairs: &[[Vec<u8>; 2]]) -> Vec<Chain<'_>> {
    pairs
        .iter()
        .flat_map(|[m, u]| [Chain::request(m, 4), Chain::request(u, 4)])
        .collect()
}

/// Waits for `count` completions of the request queue, in any order.
fn reap(dev: &mut vhost_iommu_testkit::Driver, count: usize) -> Vec<Completion> {
    let mut out = Vec::new();
    dev.requestq()
        .wait_n(count, WaitMode::Poll, WAIT, &mut out)
        .expect("completions");
    out.sort_by_key(|c| c.token);
    out
}

/// A request whose device-readable bytes start 10 bytes before `boundary` (the testkit's
/// allocator never lets a buffer straddle regions, so raw descriptors), its tail at `tail`.
fn straddling_request(
    dev: &mut vhost_iommu_testkit::Driver,
    boundary: u64,
    req: &[u8],
    tail: u64,
) -> [RawDesc; 2] {
    dev.memory().write(boundary - 10, &req[..10]).unwrap();
    if dev.memory().contains(boundary, req.len() as u64) {
        dev.memory().write(boundary, &req[10..]).unwrap();
    }
    [
        RawDesc::readable(boundary - 10, req.len() as u32).then(1),
        RawDesc::writable(tail, 4),
    ]
}

#[test]
fn buffers_across_two_memory_regions_fall_back_and_keep_order() {
    let d = Daemon::start(&[]);
    // Contiguous regions: a buffer may straddle two (legal, slow path), and then a layout
    // with a hole where the same buffer runs out of memory (malformed).
    let contiguous = vec![
        MemoryRegion::new(0, 32 * MIB),
        MemoryRegion::new(32 * MIB, 16 * MIB),
        MemoryRegion::new(48 * MIB, 16 * MIB),
    ];
    let mut dev = d.connect_with(Options {
        memory: contiguous,
        ..Options::default()
    });
    assert_eq!(status_of(&mut dev, &attach(1, EP)), Status::Ok);
    let boundary = 32 * MIB;
    // Chain A: request across the first boundary, tail in the second region. Chain B:
    // request in the first region, tail across the second boundary (pre-filled with 0xa5).
    let second = 48 * MIB;
    let straddling = map(1, 0x2000_0000, 0x2000_0fff, 0).encode();
    let a = straddling_request(&mut dev, boundary, &straddling, boundary + 0x1000);
    let other = dev.memory().alloc(64, 16).unwrap();
    let map_b = map(1, 0x3000_0000, 0x3000_0fff, 0).encode();
    dev.memory().write(other.addr, &map_b).unwrap();
    dev.memory().fill(second - 2, 4, 0xa5).unwrap();
    let b = [
        RawDesc::readable(other.addr, map_b.len() as u32).then(1),
        RawDesc::writable(second - 2, 4),
    ];
    // Simple chains around them, one kick: completions come back in ring order.
    let [m0, u0] = pair(0);
    let [m1, u1] = pair(1);
    let q = dev.requestq();
    q.post_chain(&Chain::request(&m0, 4)).unwrap();
    q.post_chain(&Chain::request(&u0, 4)).unwrap();
    q.post_raw(&a).unwrap();
    q.post_raw(&b).unwrap();
    q.post_chain(&Chain::request(&m1, 4)).unwrap();
    q.post_chain(&Chain::request(&u1, 4)).unwrap();
    q.notify().unwrap();
    let done = reap(&mut dev, 6);
    for (i, c) in done.iter().enumerate() {
        if i == 2 || i == 3 {
            assert_eq!(c.used_len, 4, "straddling chain {i} is answered");
        } else {
            assert_eq!(status(c), Status::Ok, "chain {i}");
        }
    }
    // OK (0) in both tails, B's written across the boundary.
    let tail_a = dev.memory().read(boundary + 0x1000, 4).unwrap();
    assert_eq!(tail_a, vec![0, 0, 0, 0]);
    let tail_b = dev.memory().read(second - 2, 4).unwrap();
    assert_eq!(tail_b, vec![0, 0, 0, 0]);
    let stats = d.stats();
    assert_eq!(stats["mappings"], 2, "both MAPs took effect: {stats}");
    assert_eq!(n(&stats["malformed_chains"]), 0, "{stats}");
    drop(dev);

    // A hole after the first region: the same readable buffer runs out of guest memory.
    let holed = vec![
        MemoryRegion::new(0, 32 * MIB),
        MemoryRegion::new(48 * MIB, 16 * MIB),
    ];
    let mut dev = d.connect_with(Options {
        memory: holed,
        ..Options::default()
    });
    assert_eq!(status_of(&mut dev, &attach(1, EP)), Status::Ok);
    let raw = straddling_request(&mut dev, boundary, &straddling, boundary - 0x1000);
    let q = dev.requestq();
    q.post_chain(&Chain::request(&m0, 4)).unwrap();
    q.post_raw(&raw).unwrap();
    q.post_chain(&Chain::request(&u0, 4)).unwrap();
    q.notify().unwrap();
    let done = reap(&mut dev, 3);
    assert_eq!(status(&done[0]), Status::Ok);
    assert_eq!(done[1].used_len, 0, "readable buffer runs into the hole");
    assert_eq!(status(&done[2]), Status::Ok);
    let stats = d.stats();
    assert_eq!(n(&stats["malformed_chains"]), 1, "{stats}");
}

#[test]
fn avail_and_used_indices_wrap_at_65535_with_fallbacks_around_the_wrap() {
    let d = Daemon::start(&[]);
    let mut dev = d.connect();
    assert_eq!(status_of(&mut dev, &attach(1, EP)), Status::Ok);
    let requests: Vec<[Vec<u8>; 2]> = (0..64).map(pair).collect();
    let simple = chains(&requests);
    // Simple batches up to just before the wrap (the queue has 256 descriptors: 128 chains).
    let mut sent: u64 = 1;
    while sent + 128 < 65536 - 40 {
        for c in dev.batch(&simple).unwrap() {
            assert_eq!(status(&c), Status::Ok);
        }
        sent += 128;
    }
    // Across the wrap: every chain kind the fast path hands over, between simple ones.
    let bad = dev.memory().alloc(64, 16).unwrap();
    let mut malformed = 0;
    for round in 0..4u64 {
        let [m, u] = pair(100 + round);
        let [m2, u2] = pair(200 + round);
        let [m3, u3] = pair(300 + round);
        let kinds = [
            Chain::request(&m, 4),
            Chain::new().readable_split(&u, 10).writable(4), // 11 descriptors
            Chain::new().readable(&m2).writable(4).indirect(),
            Chain::new().readable(&u2).writable_split(4, 2).indirect(),
            Chain::request(&m3, 4),
            Chain::new().readable_split(&u3, 2).writable(4),
        ];
        let q = dev.requestq();
        let mut tokens = Vec::new();
        for (i, c) in kinds.iter().enumerate() {
            tokens.push(q.post_chain(c).unwrap());
            if i == 2 {
                // Readable after writable: returned unanswered by the slow path.
                q.post_raw(&[
                    RawDesc::writable(bad.addr, 4).then(1),
                    RawDesc::readable(bad.addr + 16, 20),
                ])
                .unwrap();
                malformed += 1;
            }
        }
        q.notify().unwrap();
        let done = reap(&mut dev, kinds.len() + 1);
        for c in &done {
            if tokens.contains(&c.token) {
                assert_eq!(status(c), Status::Ok, "round {round}");
            } else {
                assert_eq!(c.used_len, 0, "round {round}: the malformed chain");
            }
        }
        sent += kinds.len() as u64 + 1;
    }
    // And simple batches over and past the wrap.
    for _ in 0..2 {
        for c in dev.batch(&simple).unwrap() {
            assert_eq!(status(&c), Status::Ok);
        }
        sent += 128;
    }
    assert!(sent > 65536 + 128, "{sent}");
    let idx = dev.requestq().avail_idx();
    assert_eq!(u64::from(idx), sent % 65536);
    assert_eq!(dev.requestq().device_used_idx().unwrap(), idx);
    let stats = d.stats();
    assert_eq!(n(&stats["malformed_chains"]), malformed, "{stats}");
    assert_eq!(
        stats["mappings"], 0,
        "every MAP was undone in order: {stats}"
    );
    assert_eq!(n(&stats["broken_rings"]), 0, "{stats}");
    // GET_VRING_BASE reports the wrapped index; the queue resumes from it.
    let bases = dev.stop().unwrap();
    assert_eq!(bases[0], idx);
    dev.resume(bases).unwrap();
    assert_eq!(status_of(&mut dev, &attach(1, EP)), Status::Ok);
    assert_eq!(status_of(&mut dev, &map(1, 0x1000, 0x1fff, 0)), Status::Ok);
    assert_eq!(status_of(&mut dev, &unmap(1, 0x1000, 0x1fff)), Status::Ok);
}

/// Reads the call eventfd's counter: how many times the device signalled since the last read.
fn signals(dev: &mut vhost_iommu_testkit::Driver) -> u64 {
    dev.requestq().call_fd().read().unwrap_or(0)
}

/// Waits up to 2 s for at least one signal (the device writes the eventfd just after it
/// publishes the used index, so a completion can be seen first).
fn await_signals(dev: &mut vhost_iommu_testkit::Driver) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let s = signals(dev);
        if s > 0 || Instant::now() > deadline {
            return s;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn interrupts_follow_used_event_and_no_interrupt_exactly() {
    let d = Daemon::start(&[]);
    for event_idx in [true, false] {
        let mut dev = d.connect_with(Options {
            event_idx,
            request_interrupts: false,
            ..Options::default()
        });
        assert_eq!(status_of(&mut dev, &attach(1, EP)), Status::Ok);
        let requests: Vec<[Vec<u8>; 2]> = (0..4).map(pair).collect();
        let chains = chains(&requests);
        // Interrupts off (used_event far away, or NO_INTERRUPT): never signalled.
        for _ in 0..50 {
            for c in dev.batch(&chains).unwrap() {
                assert_eq!(status(&c), Status::Ok);
            }
        }
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(signals(&mut dev), 0, "event_idx {event_idx}: suppressed");
        if event_idx {
            // used_event inside the next batch: exactly one signal, however the device splits
            // the batch into passes; used_event past it: none.
            let q = dev.requestq();
            let used_event = q.avail_addr() + 4 + 2 * u64::from(q.size());
            for (offset, expected) in [(3u16, 1u64), (7, 1), (0, 1), (8, 0), (200, 0)] {
                let q = dev.requestq();
                let at = q.last_used_idx().wrapping_add(offset);
                q.memory()
                    .store_u16(used_event, at, std::sync::atomic::Ordering::SeqCst)
                    .unwrap();
                for c in dev.batch(&chains).unwrap() {
                    assert_eq!(status(&c), Status::Ok);
                }
                let got = if expected > 0 {
                    await_signals(&mut dev)
                } else {
                    std::thread::sleep(Duration::from_millis(50));
                    signals(&mut dev)
                };
                assert_eq!(got, expected, "used_event at +{offset}");
            }
        }
        drop(dev);
        // Interrupts on: every request is answered with a signal the driver sleeps on.
        let mut dev = d.connect_with(Options {
            event_idx,
            request_interrupts: true,
            wait: WaitMode::Interrupt,
            ..Options::default()
        });
        assert_eq!(status_of(&mut dev, &attach(1, EP)), Status::Ok);
        for _ in 0..20 {
            for c in dev.batch(&chains).unwrap() {
                assert_eq!(status(&c), Status::Ok);
            }
        }
        assert!(dev.requestq().stats().interrupts > 0);
    }
}
