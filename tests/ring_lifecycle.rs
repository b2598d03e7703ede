//! The request queue's engine while the frontend changes things under it, on both ring paths
//! (`--ring-fast-path on` and `off`), with and without EVENT_IDX: a queue disabled and
//! re-enabled (`SET_VRING_ENABLE`) or stopped and restarted (`GET_VRING_BASE`, then
//! `SET_VRING_NUM/BASE/ADDR/KICK/CALL/ENABLE`) while the engine works or polls. Whatever
//! happens, every request is answered exactly once and
//! correctly (the test kit rejects an answer to a chain not in flight), a disabled or
//! stopped queue is not touched, and requests made available meanwhile are answered once it
//! runs again. Kick suppression here is the plain case (no kick wanted while the engine
//! polls, one wanted once it sleeps); its races are `tests/notify_race.rs`'s.

mod common;

use std::{
    thread,
    time::{Duration, Instant},
};

use common::*;
use vhost_device_iommu::testkit::{Options, Virtqueue, WaitMode, REQUEST_QUEUE};
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
        // A poll window that outlasts a debug build's round trip by far.
        let d = Daemon::start(&["--ring-fast-path", fast, "--poll-us", "100000"]);
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
        let d = Daemon::start(&["--ring-fast-path", fast, "--poll-us", "2000"]);
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
