// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Notification races on both queues, with the daemon driven the way Linux's virtio_ring
//! decides whether to kick (`virtqueue_kick_prepare`): with VIRTIO_RING_F_EVENT_IDX, kick when
//! the device's `avail_event` lies among the entries published since the last decision
//! (`vring_need_event`); without it, kick unless the device set `VRING_USED_F_NO_NOTIFY`. A
//! device that suppresses notifications and then goes to sleep without looking at the ring
//! again strands whatever the driver posted in between: the driver saw "no kick needed" and
//! waits for a reply forever.
//!
//! Each configuration (EVENT_IDX on and off; polling adaptive (the default), fixed
//! (`--poll-mode fixed`) and off (`--poll-us 0`); on the ring fast path, and without EVENT_IDX
//! on the virtio-queue path too) runs two drivers at once against one daemon:
//!
//! - the request queue: one to three MAP/UNMAP requests written into the rings, then made
//!   available by one index store (as a driver's `virtqueue_add` does, however slow the test
//!   kit is at writing descriptors), sometimes after a spurious kick and a random pause, then
//!   a random pause and the conditional kick, then a busy wait for the replies as Linux's
//!   virtio-iommu driver does. Without EVENT_IDX a quarter of the rounds take the worst
//!   timing on purpose: a spurious kick once the device sleeps, and the index stored while
//!   the device is seen suppressing notifications for the empty pass that kick started;
//! - the event queue: faults reported in bursts of one to four (the control socket's
//!   `translate` of an unmapped IOVA by a DMA-API user), more than the driver has event
//!   buffers, so records wait in the backlog; each record reaped is checked (oldest first,
//!   none lost or repeated) and its buffer re-posted after a pause with the conditional kick,
//!   sometimes after a spurious one.
//!
//! The request driver and the daemon's queue worker are pinned to CPUs of their own, and the
//! configurations run one after the other: the races need driver and device running at the
//! same instant, as a vCPU and a device thread do on a host.
//!
//! A reply or record that does not come within the strand timeout is counted as stranded, and
//! an unconditional kick unsticks it so that the run goes on. A configuration fails unless
//! nothing stranded, every request was answered once and every record delivered and none
//! dropped.
//!
//! Knobs: `NOTIFY_RACE_REQUESTS` and `NOTIFY_RACE_RECORDS` (default 10000 each per
//! configuration), `NOTIFY_RACE_STRAND_MS` (default 2000), `NOTIFY_RACE_STOP_AFTER` (strands
//! that end a configuration early, default 20), `NOTIFY_RACE_SEED`.

mod common;

use std::{
    hint::spin_loop,
    thread,
    time::{Duration, Instant},
};

use common::*;
use serde_json::json;
use vhost_iommu_testkit::{Chain, Error, Options, Virtqueue, WaitMode};
use virtio::{FaultRecord, Status, FAULT_SIZE};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

/// pci-testdev at 00:05.0.
const EP: u32 = 0x28;
/// The page the request driver maps and unmaps, over and over.
const IOVA: u64 = 0x1000_0000;
/// Fault addresses: record `i` is at `FAULT_BASE + i * 4096` (never mapped).
const FAULT_BASE: u64 = 0x8000_0000;
/// Event buffers the driver keeps posted: fewer than a burst of faults.
const EVENT_BUFFERS: u16 = 2;
const MAX_BURST: u64 = 4;
/// Strands described one by one (all are counted).
const SHOWN: u64 = 5;
/// How long an unstuck request or record may take once kicked.
const RECOVERY: Duration = Duration::from_secs(10);

fn knob(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// xorshift64*: small, seedable, good enough for timing noise.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }
}

/// A random pause of up to `max_us` microseconds: none, a yield, or a busy wait (a driver
/// between two steps on a busy vCPU; the windows the races need are a few microseconds wide).
fn pause(rng: &mut Rng, max_us: u64) {
    match rng.below(8) {
        0 => {}
        1 => thread::yield_now(),
        _ => {
            let until = Instant::now() + Duration::from_nanos(rng.below(max_us * 1000));
            while Instant::now() < until {
                spin_loop();
            }
        }
    }
}

/// Spins until `f()` holds, for 200 us at most.
fn spin_until(mut f: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_micros(200);
    while !f() && Instant::now() < until {
        spin_loop();
    }
}

/// When a reply or record counts as stranded, and how many strands end a configuration
/// early (each costs the strand timeout).
#[derive(Debug, Clone, Copy)]
struct Limits {
    strand: Duration,
    stop_after: u64,
}

#[derive(Debug, Default)]
struct Tally {
    done: u64,
    stranded: u64,
    /// Kick decisions that said no: the driver relied on the device to look again.
    suppressed: u64,
}

/// The request queue's driver: `count` MAP/UNMAP requests of one page, alternating.
fn drive_requests(q: &mut Virtqueue, count: u64, seed: u64, limits: Limits) -> Tally {
    let mut rng = Rng::new(seed);
    let requests = [
        map(1, IOVA, IOVA + 0xfff, 0x20_0000).encode(),
        unmap(1, IOVA, IOVA + 0xfff).encode(),
    ];
    let mut tally = Tally::default();
    let mut sent = 0u64;
    // Chains are written ahead and made available by one index store, as a driver does.
    q.hold_avail(true);
    while sent < count && tally.stranded < limits.stop_after {
        let burst = (1 + rng.below(3)).min(count - sent);
        for _ in 0..burst {
            q.post(&requests[(sent % 2) as usize], 4).unwrap();
            sent += 1;
        }
        if !q.event_idx() && rng.one_in(4) {
            // The worst timing, which random pauses hit only rarely (the flag is visible
            // without EVENT_IDX): once the device sleeps with notifications on, a spurious
            // kick; the new index published the moment the device is seen suppressing
            // notifications for the pass that kick started.
            spin_until(|| q.needs_kick().unwrap());
            q.kick().unwrap();
            spin_until(|| !q.needs_kick().unwrap());
            // Somewhere in the pass (it lasts about a microsecond in a debug build).
            let until = Instant::now() + Duration::from_nanos(rng.below(1000));
            while Instant::now() < until {
                spin_loop();
            }
            q.publish_avail().unwrap();
        } else {
            if rng.one_in(2) {
                // Nothing the device can see yet: it runs a pass that finds nothing.
                q.kick().unwrap();
            }
            pause(&mut rng, 60);
            q.publish_avail().unwrap();
            pause(&mut rng, 2);
        }
        q.notify().unwrap();
        let mut waiting = burst;
        while waiting > 0 {
            let c = match q.wait(WaitMode::Poll, limits.strand) {
                Ok(c) => c,
                Err(Error::WaitTimeout { in_flight, .. }) => {
                    if tally.stranded < SHOWN {
                        eprintln!(
                            "request queue: {in_flight} requests stranded after request \
                             {sent} (used index {}, avail index {})",
                            q.device_used_idx().unwrap(),
                            q.avail_idx()
                        );
                    }
                    tally.stranded += in_flight as u64;
                    q.kick().unwrap();
                    q.wait(WaitMode::Poll, RECOVERY)
                        .expect("a kick unsticks the request queue")
                }
                Err(e) => panic!("request queue: {e}"),
            };
            assert_eq!(c.tail(4), [Status::Ok as u8, 0, 0, 0], "reply {c:?}");
            waiting -= 1;
            tally.done += 1;
        }
    }
    tally.suppressed = q.stats().kicks_suppressed;
    tally
}

/// The event queue's driver: faults reported in bursts through `control`, each record reaped
/// in order and its buffer re-posted with a conditional kick.
fn drive_events(
    q: &mut Virtqueue,
    control: &mut ControlClient,
    count: u64,
    seed: u64,
    limits: Limits,
) -> Tally {
    let mut rng = Rng::new(seed);
    let mut tally = Tally::default();
    let mut reported = 0u64;
    while reported < count && tally.stranded < limits.stop_after {
        let burst = (1 + rng.below(MAX_BURST)).min(count - reported);
        for _ in 0..burst {
            let iova = FAULT_BASE + (reported << 12);
            let reply = control.request(json!({"cmd": "translate", "endpoint": EP, "iova": iova}));
            assert_eq!(reply["fault"], "unmapped", "{reply}");
            reported += 1;
            pause(&mut rng, 20);
        }
        while tally.done < reported {
            let c = match q.wait(WaitMode::Interrupt, limits.strand) {
                Ok(c) => c,
                Err(Error::WaitTimeout { .. }) => {
                    if tally.stranded < SHOWN {
                        eprintln!(
                            "event queue: record {} of {reported} stranded ({} buffers posted)",
                            tally.done,
                            q.in_flight()
                        );
                    }
                    tally.stranded += 1;
                    q.kick().unwrap();
                    q.wait(WaitMode::Interrupt, RECOVERY)
                        .expect("a kick unsticks the event queue")
                }
                Err(e) => panic!("event queue: {e}"),
            };
            assert_eq!(c.used_len as usize, FAULT_SIZE);
            let record = FaultRecord::from_bytes(&c.data[..FAULT_SIZE].try_into().unwrap())
                .expect("a fault record");
            assert_eq!(
                record.address,
                FAULT_BASE + (tally.done << 12),
                "records arrive oldest first, none lost or repeated"
            );
            tally.done += 1;
            pause(&mut rng, 20);
            q.post_chain(&Chain::new().writable(FAULT_SIZE)).unwrap();
            pause(&mut rng, 20);
            if rng.one_in(4) {
                q.kick().unwrap();
            }
            q.notify().unwrap();
        }
    }
    tally.suppressed = q.stats().kicks_suppressed;
    tally
}

/// The CPUs this process may run on.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data, valid when zeroed; sched_getaffinity writes at most
    // the size passed into it, and CPU_ISSET reads inside it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&cpu| libc::CPU_ISSET(cpu, &set))
            .collect()
    }
}

/// Pins thread `tid` (0: the calling thread) to `cpu`.
fn pin(tid: libc::pid_t, cpu: usize) {
    // SAFETY: as in `allowed_cpus`; sched_setaffinity only reads the set.
    let r = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    assert_eq!(r, 0, "pinning {tid}: {}", std::io::Error::last_os_error());
}

/// The daemon's queue worker thread (vhost-user-backend names it `vring_worker`).
fn worker_tid(d: &Daemon) -> libc::pid_t {
    std::fs::read_dir(format!("/proc/{}/task", d.pid()))
        .unwrap()
        .filter_map(|t| {
            let t = t.ok()?;
            let comm = std::fs::read_to_string(t.path().join("comm")).ok()?;
            (comm.trim_end() == "vring_worker").then(|| t.file_name().to_str()?.parse().ok())?
        })
        .next()
        .expect("the daemon's vring_worker thread")
}

/// One configuration's run; what went wrong, if anything.
fn race(event_idx: bool, poll: &str, fast: bool) -> Vec<String> {
    let requests = knob("NOTIFY_RACE_REQUESTS", 10_000);
    let records = knob("NOTIFY_RACE_RECORDS", 10_000);
    let limits = Limits {
        strand: Duration::from_millis(knob("NOTIFY_RACE_STRAND_MS", 2_000)),
        stop_after: knob("NOTIFY_RACE_STOP_AFTER", 20),
    };
    let seed = knob("NOTIFY_RACE_SEED", 0x6e6f_7469_6679)
        ^ u64::from(event_idx) << 2
        ^ u64::from(poll != "off") << 1
        ^ u64::from(poll == "fixed") << 3
        ^ u64::from(fast);
    let mut args = vec!["--ring-fast-path", if fast { "on" } else { "off" }];
    match poll {
        "off" => args.extend(["--poll-us", "0"]),
        "fixed" => args.extend(["--poll-mode", "fixed"]),
        _ => {}
    }
    let d = Daemon::start(&args);
    let mut dev = d.connect_with(Options {
        event_idx,
        event_buffers: EVENT_BUFFERS,
        ..Options::default()
    });
    assert_eq!(
        dev.negotiated().has_feature(VIRTIO_RING_F_EVENT_IDX),
        event_idx
    );
    assert_eq!(status_of(&mut dev, &attach(1, EP)), Status::Ok);
    assert_eq!(
        d.control(json!({"cmd": "use_dma_api", "endpoint": EP}))["ok"],
        true
    );
    // The driver and the device on CPUs of their own, as a vCPU and a device thread are on a
    // host: the races need both running at once, which a scheduler that puts them on one CPU
    // of a small machine rarely lets happen.
    let cpus = allowed_cpus();
    let cpus = (cpus.len() >= 2).then(|| (cpus[0], cpus[1]));
    if let Some((_, device_cpu)) = cpus {
        pin(worker_tid(&d), device_cpu);
    }
    let mut control = d.control_client();
    let started = Instant::now();
    let (requestq, eventq, _) = dev.parts();
    let (req, ev) = thread::scope(|s| {
        let r = s.spawn(|| {
            if let Some((driver_cpu, _)) = cpus {
                pin(0, driver_cpu);
            }
            drive_requests(requestq, requests, seed, limits)
        });
        let e =
            s.spawn(|| drive_events(eventq, &mut control, records, seed.rotate_left(17), limits));
        (r.join().unwrap(), e.join().unwrap())
    });
    let elapsed = started.elapsed();
    let stats = d.stats();
    let config = format!("event_idx {event_idx}, poll {poll}, ring fast path {fast}");
    eprintln!(
        "{config}: {} requests ({} stranded, {} kicks suppressed), {} fault records ({} \
         stranded, {} kicks suppressed) in {:.1} s; spurious wake-ups {}, polled requests {}",
        req.done,
        req.stranded,
        req.suppressed,
        ev.done,
        ev.stranded,
        ev.suppressed,
        elapsed.as_secs_f64(),
        stats["spurious_wakeups"],
        stats["polled_requests"],
    );
    let mut problems = Vec::new();
    if (req.stranded, ev.stranded) != (0, 0) {
        problems.push(format!(
            "{config}: {} requests and {} fault records stranded{}",
            req.stranded,
            ev.stranded,
            if req.stranded.max(ev.stranded) >= limits.stop_after {
                " (stopped early)"
            } else {
                ""
            }
        ));
        return problems;
    }
    // Every request answered once, every record delivered, none dropped.
    let answered = stats["requests"]["map"]["ok"].as_u64().unwrap_or(0)
        + stats["requests"]["unmap"]["ok"].as_u64().unwrap_or(0);
    let faults = &stats["faults"];
    if (req.done, answered) != (requests, requests)
        || ev.done != records
        || faults["reported"] != records
        || faults["delivered"] != records
        || faults["dropped"] != 0
        || faults["backlog"] != 0
    {
        problems.push(format!(
            "{config}: {} of {requests} requests reaped, {answered} answered, {} of {records} \
             records reaped: {stats}",
            req.done, ev.done
        ));
    }
    problems
}

/// Every configuration in turn (one at a time: each pins its driver and its device). The
/// virtio-queue path (`--ring-fast-path off`) polls and passes on code of its own: it runs
/// without EVENT_IDX, where the request queue's races are.
#[test]
fn nothing_strands_on_either_queue() {
    let mut problems = Vec::new();
    for event_idx in [true, false] {
        for poll in ["adaptive", "fixed", "off"] {
            problems.extend(race(event_idx, poll, true));
        }
    }
    for poll in ["adaptive", "fixed", "off"] {
        problems.extend(race(false, poll, false));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
