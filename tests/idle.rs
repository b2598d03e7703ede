// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A daemon whose guest has gone quiet uses no CPU: after a burst of requests the request
//! worker polls at most one window (`--poll-us`) and then sleeps until the next kick, in every
//! poll mode. CPU time is read from each thread's `schedstat` (nanoseconds run), so a poller
//! that never stops shows up as a whole CPU, a slow leak as milliseconds.

mod common;

use std::{collections::HashMap, thread, time::Duration};

use common::*;
use virtio::Status;

/// pci-testdev at 00:05.0.
const EP: u32 = 0x28;
/// How long the idle daemon is watched.
const WATCH: Duration = Duration::from_secs(2);
/// At most this share of one CPU while idle (20 ms over the two seconds: a poller would use
/// all of it, an idle daemon uses none; the margin is for the control socket's stats reply).
const IDLE_SHARE: f64 = 0.01;

/// Nanoseconds each thread of the process has run so far, by thread ID.
fn run_ns(pid: u32) -> HashMap<String, u64> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| {
            let t = t.ok()?;
            let s = std::fs::read_to_string(t.path().join("schedstat")).ok()?;
            let ns = s.split_whitespace().next()?.parse().ok()?;
            Some((t.file_name().to_string_lossy().into_owned(), ns))
        })
        .collect()
}

/// Nanoseconds run between two readings, over the threads alive at both (short-lived threads,
/// e.g. one per control connection, come and go; the request worker stays).
fn ran_between(before: &HashMap<String, u64>, after: &HashMap<String, u64>) -> u64 {
    after
        .iter()
        .filter_map(|(tid, &ns)| Some(ns.saturating_sub(*before.get(tid)?)))
        .sum()
}

fn n(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

#[test]
fn no_cpu_while_the_guest_idles_after_a_burst() {
    for (mode, args) in [
        ("adaptive (default)", &[][..]),
        ("fixed", &["--poll-mode", "fixed"][..]),
        (
            "fixed, 20 ms budget",
            &["--poll-mode", "fixed", "--poll-us", "20000"][..],
        ),
        ("off", &["--poll-us", "0"][..]),
    ] {
        let d = Daemon::start(args);
        let mut dev = d.connect();
        assert_eq!(status_of(&mut dev, &attach(1, EP)), Status::Ok, "{mode}");
        for i in 0..2000u64 {
            let iova = 0x10_0000 + (i % 64) * 0x1000;
            assert_eq!(
                status_of(&mut dev, &map(1, iova, iova + 0xfff, 0x20_0000)),
                Status::Ok,
                "{mode}"
            );
            assert_eq!(
                status_of(&mut dev, &unmap(1, iova, iova + 0xfff)),
                Status::Ok,
                "{mode}"
            );
        }
        let pacing = d.stats()["pacing"].clone();
        let windows = n(&pacing["windows"]["started"]) + n(&pacing["windows"]["skipped"]);
        if mode == "off" {
            assert_eq!(windows, 0, "{mode}: {pacing}");
        } else {
            assert!(
                windows > 0,
                "{mode}: the worker never considered polling: {pacing}"
            );
        }
        // Longer than any window here: the worker is asleep from now on.
        thread::sleep(Duration::from_millis(100));
        let sleeps = n(&d.stats()["pacing"]["sleeps"]);
        let before = run_ns(d.pid());
        thread::sleep(WATCH);
        let used = ran_between(&before, &run_ns(d.pid()));
        let share = used as f64 / WATCH.as_nanos() as f64;
        assert!(
            share < IDLE_SHARE,
            "{mode}: the daemon ran {:.1} ms of {WATCH:?} while the guest was idle",
            used as f64 / 1e6
        );
        // Nothing woke the worker meanwhile (the stats request above is served elsewhere).
        assert_eq!(n(&d.stats()["pacing"]["sleeps"]), sleeps, "{mode}");
        drop(dev);
    }
}
