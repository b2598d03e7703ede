// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The request queue's engine while the frontend changes things under it, on both ring paths
//! (`--ring-fast-path on` and `off`), with and without EVENT_IDX: a queue disabled and
//! re-enabled (`SET_VRING_ENABLE`) or stopped and restarted (`GET_VRING_BASE`, then
//! `SET_VRING_NUM/BASE/ADDR/KICK/CALL/ENABLE`) while the engine works or polls, and the memory
//! table replaced (`SET_MEM_TABLE`, guest RAM grown then shrunk) under a steady load that
//! keeps the engine polling. Whatever happens, every request is answered exactly once and
//! correctly (the test kit rejects an answer to a chain not in flight), a disabled or
//! stopped queue is not touched, and requests made available meanwhile are answered once it
//! runs again. Kick suppression here is the plain case (no kick wanted while the engine
//! polls, one wanted once it sleeps); its races are `tests/notify_race.rs`'s.

mod common;

use std::{
    sync::atomic::{AtomicU64, AtomicU8, Ordering},
    thread,
    time::{Duration, Instant},
};

use common::*;
use vhost_iommu_testkit::{
    Driver, GuestRam, MemoryRegion, Options, RawDesc, Virtqueue, WaitMode, REQUEST_QUEUE,
};
use virtio::Status;

/// pci-testdev at 00:05.0.
const EP: u32 = 0x28;
const WAIT: Duration = Duration::from_secs(10);
const ROUNDS: usize = 40;

/// The writable length of a PROBE reply: properties, then the tail.
const PROBE_REPLY: usize = PROBE_SIZE as usize + 4;

/// PROBE of an endpoint that exists: the answer does not depend on the device's state (a stop
/// resets it) and is OK.
fn post(q: &mut Virtqueue, n: usize) {
    let request = probe(EP).encode();
    for _ in 0..n {
        q.post(&request, PROBE_REPLY).unwrap();
    }
}

/// Waits for every chain in flight; each must be answered OK.
fn drain(q: &mut Virtqueue, what: &str) {
    while q.in_flight() > 0 {
        let c = q
            .wait(WaitMode::Poll, WAIT)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(status(&c), Status::Ok, "{what}: {c:?}");
    }
    assert_eq!(q.device_used_idx().unwrap(), q.avail_idx(), "{what}");
}

fn options(event_idx: bool) -> Options {
    Options {
        event_idx,
        ..Options::default()
    }
}

/// The used index stays where it is for `how_long`.
fn assert_frozen(q: &Virtqueue, how_long: Duration, what: &str) {
    let frozen = q.device_used_idx().unwrap();
    let until = Instant::now() + how_long;
    while Instant::now() < until {
        assert_eq!(
            q.device_used_idx().unwrap(),
            frozen,
            "{what}: the device answered while the queue was off"
        );
        std::hint::spin_loop();
    }
}

#[test]
fn the_driver_need_not_kick_while_the_engine_polls_and_must_once_it_sleeps() {
    for fast in ["on", "off"] {
        // A poll window that outlasts a debug build's round trip by far, every time.
        let d = Daemon::start(&[
            "--ring-fast-path",
            fast,
            "--poll-us",
            "100000",
            "--poll-mode",
            "fixed",
        ]);
        for event_idx in [true, false] {
            let what = format!("fast path {fast}, event_idx {event_idx}");
            let mut dev = d.connect_with(options(event_idx));
            let q = dev.requestq();
            // Asleep at first: a kick is wanted.
            post(q, 1);
            assert!(q.notify().unwrap(), "{what}: the first request");
            drain(q, &what);
            for round in 0..20 {
                // Right after a reply the engine polls: no kick is wanted, none is needed.
                post(q, 1 + round % 3);
                assert!(!q.notify().unwrap(), "{what}: kick wanted while polling");
                drain(q, &what);
            }
            // Once the window is over the engine sleeps and wants the next kick.
            thread::sleep(Duration::from_millis(250));
            post(q, 2);
            assert!(q.notify().unwrap(), "{what}: no kick wanted at rest");
            drain(q, &what);
        }
    }
}

#[test]
fn a_disabled_queue_is_left_alone_and_resumes_when_enabled() {
    for fast in ["on", "off"] {
        // A long poll window: the engine is still polling when the queue goes off.
        let d = Daemon::start(&[
            "--ring-fast-path",
            fast,
            "--poll-us",
            "2000",
            "--poll-mode",
            "fixed",
        ]);
        for event_idx in [true, false] {
            let what = format!("fast path {fast}, event_idx {event_idx}");
            let mut dev = d.connect_with(options(event_idx));
            let (q, _, conn) = dev.parts();
            for round in 0..ROUNDS {
                let what = format!("{what}, round {round}");
                post(q, 3);
                q.notify().unwrap();
                if round % 2 == 0 {
                    // Let the engine finish them: it polls for more.
                    drain(q, &what);
                }
                conn.enable_queue(REQUEST_QUEUE, false).unwrap();
                // Made available while the queue is off: left alone until it is back on.
                post(q, 3);
                q.notify().unwrap();
                assert_frozen(q, Duration::from_millis(3), &what);
                conn.enable_queue(REQUEST_QUEUE, true).unwrap();
                drain(q, &what);
            }
        }
        let stats = d.stats();
        assert_eq!(stats["malformed_chains"], 0, "{stats}");
        assert_eq!(stats["broken_rings"], 0, "{stats}");
    }
}

#[test]
fn a_stopped_queue_restarts_where_it_left_off() {
    for fast in ["on", "off"] {
        let d = Daemon::start(&["--ring-fast-path", fast]);
        for event_idx in [true, false] {
            let what = format!("fast path {fast}, event_idx {event_idx}");
            let mut dev = d.connect_with(options(event_idx));
            for round in 0..ROUNDS {
                let what = format!("{what}, round {round}");
                let q = dev.requestq();
                post(q, 3);
                q.notify().unwrap();
                if round % 2 == 0 {
                    drain(q, &what);
                }
                // Stopped while the engine works or polls: what it took is answered, the
                // base it reports is where it stopped.
                let bases = dev.stop().unwrap();
                let q = dev.requestq();
                assert_eq!(q.device_used_idx().unwrap(), bases[REQUEST_QUEUE as usize]);
                post(q, 2);
                q.notify().unwrap();
                assert_frozen(q, Duration::from_millis(1), &what);
                dev.resume(bases).unwrap();
                drain(dev.requestq(), &what);
            }
            // The device reset at each stop; it still answers requests that need state.
            assert_eq!(status_of(&mut dev, &attach(1, EP)), Status::Ok);
            assert_eq!(status_of(&mut dev, &map(1, 0x1000, 0x1fff, 0)), Status::Ok);
        }
        let stats = d.stats();
        assert_eq!(stats["malformed_chains"], 0, "{stats}");
    }
}

/// Phases of the memory-table test, driver and frontend in step.
const BASE_ONLY: u8 = 0;
const GROWN: u8 = 1;
/// The frontend is about to shrink the table: the driver stops using the extra memory.
const SHRINKING: u8 = 2;
/// The driver is done with the extra memory.
const LEFT: u8 = 3;
const SHRUNK: u8 = 4;
const DONE: u8 = 5;

/// One PROBE whose buffers are in `extra` (raw descriptors: the queue's allocator knows only
/// the first memory); its OK tail read back from there.
fn request_in(q: &mut Virtqueue, extra: &GuestRam, at: u64) -> Result<(), String> {
    let bytes = probe(EP).encode();
    let reply = at + 0x100;
    extra.write(at, &bytes).unwrap();
    extra.fill(reply, PROBE_REPLY, 0xa5).unwrap();
    q.post_raw(&[
        RawDesc::readable(at, bytes.len() as u32).then(1),
        RawDesc::writable(reply, PROBE_REPLY as u32),
    ])
    .unwrap();
    q.notify().unwrap();
    let c = q.wait(WaitMode::Poll, WAIT).map_err(|e| e.to_string())?;
    let tail = extra.read(reply + PROBE_SIZE as u64, 4).unwrap();
    if c.used_len as usize != PROBE_REPLY || tail != [Status::Ok as u8, 0, 0, 0] {
        return Err(format!("used length {}, tail {tail:02x?}", c.used_len));
    }
    Ok(())
}

/// A steady stream of requests, one at a time as Linux's driver sends them, so that the
/// engine never stops polling; in the GROWN phase their buffers are in the extra memory.
/// `answered` counts them before, in and after the extra memory.
fn steady_load(q: &mut Virtqueue, extra: &GuestRam, phase: &AtomicU8, answered: &[AtomicU64; 3]) {
    loop {
        match phase.load(Ordering::Acquire) {
            GROWN => {
                let n = answered[1].load(Ordering::Relaxed);
                if let Err(e) = request_in(q, extra, 0x4000_0000 + (n % 64) * 0x1000) {
                    panic!("request {n} in the added memory: {e}");
                }
                answered[1].fetch_add(1, Ordering::Release);
            }
            SHRINKING => phase.store(LEFT, Ordering::Release),
            DONE => return,
            p => {
                post(q, 1);
                q.notify().unwrap();
                let c = q.wait(WaitMode::Poll, WAIT).expect("a reply");
                assert_eq!(status(&c), Status::Ok);
                answered[if p == SHRUNK { 2 } else { 0 }].fetch_add(1, Ordering::Release);
            }
        }
    }
}

#[test]
fn the_memory_table_replaced_under_a_polling_engine() {
    for fast in ["on", "off"] {
        // A long poll window: the engine never stops polling under the load.
        let d = Daemon::start(&[
            "--ring-fast-path",
            fast,
            "--poll-us",
            "2000",
            "--poll-mode",
            "fixed",
        ]);
        for event_idx in [true, false] {
            let what = format!("fast path {fast}, event_idx {event_idx}");
            let mut dev: Driver = d.connect_with(options(event_idx));
            let mem = dev.memory().clone();
            // 1 MiB of RAM at 1 GiB, hot-plugged then removed.
            let extra = GuestRam::new(&[MemoryRegion::new(0x4000_0000, 1 << 20)]).unwrap();
            let phase = AtomicU8::new(BASE_ONLY);
            let answered = [const { AtomicU64::new(0) }; 3];
            let (q, _, conn) = dev.parts();
            thread::scope(|s| {
                let load = s.spawn(|| steady_load(q, &extra, &phase, &answered));
                // Until the driver has had `n` answers in the phase counted by `i`, or
                // failed (its panic is reported by join).
                let until = |i: usize, n: u64| {
                    let deadline = Instant::now() + WAIT;
                    while answered[i].load(Ordering::Acquire) < n && !load.is_finished() {
                        assert!(Instant::now() < deadline, "{what}: the load stalled");
                        thread::yield_now();
                    }
                };
                until(0, 20);
                conn.set_mem_tables(&[&mem, &extra]).unwrap();
                phase.store(GROWN, Ordering::Release);
                until(1, 50);
                phase.store(SHRINKING, Ordering::Release);
                while phase.load(Ordering::Acquire) != LEFT && !load.is_finished() {
                    thread::yield_now();
                }
                conn.set_mem_table(&mem).unwrap();
                phase.store(SHRUNK, Ordering::Release);
                until(2, 20);
                phase.store(DONE, Ordering::Release);
                load.join().unwrap();
            });
            let answered = answered.map(|a| a.into_inner());
            eprintln!("{what}: requests answered before, in, after the added memory: {answered:?}");
            drain(dev.requestq(), &what);
        }
        let stats = d.stats();
        assert_eq!(stats["malformed_chains"], 0, "{stats}");
    }
}
