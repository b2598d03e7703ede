// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `--state-file`: a daemon that dies (SIGKILL at any point) or stops (SIGTERM) and is started
//! again with the same state file resumes the guest's state, and the frontend reconnects as
//! QEMU does with `reconnect-ms` (the same rings, started again from the used index). Every
//! request is applied at most once and answered with the status it got when it was applied,
//! also the ones the dead daemon applied but never answered.
//!
//! `VHOST_IOMMU_RESTART_ROUNDS` sets the number of kills of the randomized test (default 200).

mod common;

use std::{
    collections::BTreeMap,
    path::Path,
    thread,
    time::{Duration, Instant},
};

use common::*;
use ownership::reference::Reference;
use serde_json::{json, Value};
use vhost_device_iommu::config::{Cli, DaemonConfig};
use vhost_iommu_testkit::{Completion, Driver, Options, Token, WaitMode};
use virtio::{Request, Status};

const PAGE: u64 = 4096;
const TOPOLOGY: [&str; 6] = [
    "--endpoints",
    "0x10-0x17",
    "--group",
    "0x12,0x13",
    "--domain-range",
    "1-64",
];

fn topology() -> ownership::Topology {
    let mut argv = vec!["vhost-device-iommu", "--socket-path", "unused"];
    argv.extend_from_slice(&TOPOLOGY);
    let cli: Cli = clap::Parser::try_parse_from(argv).unwrap();
    DaemonConfig::try_from(cli.serve.unwrap()).unwrap().topology
}

fn start(state: &Path, extra: &[&str]) -> Daemon {
    start_crashing(state, extra, None)
}

/// [`start`], the daemon aborting right after its `crash`th commit (before publishing that
/// pass's answers), if given.
fn start_crashing(state: &Path, extra: &[&str], crash: Option<u64>) -> Daemon {
    let mut args: Vec<&str> = TOPOLOGY.to_vec();
    let state = state.to_str().unwrap();
    args.extend_from_slice(&["--state-file", state]);
    args.extend_from_slice(extra);
    let env: Vec<(&str, String)> = crash
        .map(|n| ("VHOST_IOMMU_TEST_CRASH_AFTER_COMMIT", n.to_string()))
        .into_iter()
        .collect();
    Daemon::start_with_env(&args, "info", &env)
}

fn options() -> Options {
    Options {
        timeout: Duration::from_secs(20),
        ..Options::default()
    }
}

/// splitmix64: the same load on every run (`VHOST_IOMMU_RESTART_SEED` picks another).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49eb_133b_111f);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A request of a MAP/UNMAP load with some ATTACH/DETACH, over 512 pages: enough overlap that
/// a request applied twice answers differently the second time.
fn random_request(rng: &mut Rng) -> Request {
    let domain = 1 + rng.below(4) as u32;
    let endpoint = 0x10 + rng.below(8) as u32;
    let page = rng.below(512);
    let pages = 1 + rng.below(3);
    match rng.below(100) {
        0..=3 => attach(domain, endpoint),
        4 => detach(domain, endpoint),
        5..=64 => map(
            domain,
            page * PAGE,
            (page + pages) * PAGE - 1,
            rng.below(1 << 16) * PAGE,
        ),
        _ => unmap(domain, page * PAGE, (page + pages) * PAGE - 1),
    }
}

/// The daemon's view of the guest state, as the reference would describe it.
fn daemon_state(d: &Daemon) -> Value {
    let domains = d.control(json!({"cmd": "domains"}))["domains"].clone();
    let mut out = Vec::new();
    for dom in domains.as_array().unwrap() {
        let id = dom["id"].as_u64().unwrap();
        let mappings = if dom["kind"] == "paging" {
            let reply = d.control(json!({"cmd": "mappings", "domain": id}));
            reply["mappings"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| json!([m["virt_start"], m["virt_end"], m["phys_start"]]))
                .collect()
        } else {
            Vec::new()
        };
        out.push(
            json!({"id": id, "kind": dom["kind"], "endpoints": dom["endpoints"],
            "mappings": mappings}),
        );
    }
    Value::Array(out)
}

fn reference_state(r: &Reference) -> Value {
    let mut out = Vec::new();
    for (&id, d) in &r.domains {
        let kind = match d.kind {
            ownership::DomainKind::Paging => "paging",
            ownership::DomainKind::Identity => "identity",
        };
        let mut endpoints: Vec<u32> = d
            .groups
            .iter()
            .flat_map(|g| r.groups[g.0 as usize].attached.iter().copied())
            .collect();
        endpoints.sort_unstable();
        let mappings: Vec<Value> = d
            .maps
            .values()
            .map(|m| json!([m.virt_start, m.virt_end, m.phys_start]))
            .collect();
        out.push(json!({"id": id, "kind": kind, "endpoints": endpoints,
            "mappings": mappings}));
    }
    Value::Array(out)
}

/// Every chain in flight on the request queue, completed (the restarted daemon answers the
/// rewound ones too).
fn complete_all(dev: &mut Driver) -> Vec<Completion> {
    let n = dev.requestq().in_flight();
    let mut done = Vec::new();
    dev.requestq()
        .wait_n(n, WaitMode::Poll, Duration::from_secs(20), &mut done)
        .expect("every request is answered after the restart");
    done
}

/// Checks completions against the reference in ring order: each request's status is what
/// the reference gives applying it once.
fn check(
    r: &mut Reference,
    posted: &mut Vec<(Token, Request)>,
    done: Vec<Completion>,
    round: usize,
) {
    let mut by_token: BTreeMap<Token, Status> = done.iter().map(|c| (c.token, status(c))).collect();
    for (token, request) in posted.drain(..) {
        let got = by_token
            .remove(&token)
            .unwrap_or_else(|| panic!("round {round}: {request:?} never answered"));
        let want = reference_status(r, &request);
        assert_eq!(
            got as u8, want as u8,
            "round {round}: {request:?} answered {got:?}, applied once it gives {want:?}"
        );
    }
    assert!(by_token.is_empty(), "round {round}: answers to nothing");
}

#[test]
fn sigkill_at_random_points_loses_nothing_and_applies_nothing_twice() {
    let rounds: usize = std::env::var("VHOST_IOMMU_RESTART_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let seed = std::env::var("VHOST_IOMMU_RESTART_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut rng = Rng(seed);
    let mut r = Reference::new(topology());
    // A small journal: the state is written whole every few passes, crashes included.
    let journal = ["--state-journal-records", "300", "--queue-size", "128"];
    let mut d = start(&state, &journal);
    let mut o = options();
    o.queue_size = 128;
    o.event_queue_size = 128;
    let mut dev = d.connect_with(o);
    let mut posted: Vec<(Token, Request)> = Vec::new();
    let (mut replayed, mut killed_mid_load, mut crashes) = (0u64, 0usize, 0usize);
    let mut compactions = 0u64;
    let started = Instant::now();
    for round in 0..rounds {
        // A burst of requests, kicked; the daemon dies somewhere in it (or before, or after).
        let burst = 1 + rng.below(48) as usize;
        for _ in 0..burst {
            let request = random_request(&mut rng);
            let token = dev.requestq().post(&request.encode(), 4).unwrap();
            posted.push((token, request));
        }
        dev.requestq().kick().unwrap();
        let delay = rng.below(1500);
        if delay > 0 {
            thread::sleep(Duration::from_micros(delay));
        }
        let answered_before = dev.requestq().device_used_idx().unwrap();
        d.signal("KILL");
        if answered_before != dev.requestq().avail_idx() {
            killed_mid_load += 1;
        }
        // Every other daemon dies by itself between a commit and its answers, the one point
        // a kill from outside almost never lands on: the next one must answer that pass
        // from its journal.
        let crash = (round % 2 == 0).then_some(1);
        d = start_crashing(&state, &journal, crash);
        let reconnected = dev.reconnect(&d.socket);
        if crash.is_some() {
            // Its first pass (the rewound requests, or a new one) ends it, maybe while the
            // frontend is still setting it up.
            if reconnected.is_ok() && d.alive() {
                let request = random_request(&mut rng);
                let token = dev.requestq().post(&request.encode(), 4).unwrap();
                posted.push((token, request));
                dev.requestq().kick().unwrap();
            }
            let died = Instant::now() + Duration::from_secs(10);
            while d.alive() {
                assert!(
                    Instant::now() < died,
                    "round {round}: no crash after a commit"
                );
                thread::sleep(Duration::from_millis(1));
            }
            crashes += 1;
            d = start(&state, &journal);
            dev.reconnect(&d.socket).unwrap();
        } else {
            reconnected.unwrap();
        }
        let done = complete_all(&mut dev);
        check(&mut r, &mut posted, done, round);
        assert_eq!(
            daemon_state(&d),
            reference_state(&r),
            "round {round}: the restarted daemon's state"
        );
        let stats = d.stats();
        replayed += stats["state"]["replayed"].as_u64().unwrap();
        compactions += stats["state"]["compactions"].as_u64().unwrap();
    }
    eprintln!(
        "{rounds} kills and {crashes} crashes after a commit in {:.1} s: {killed_mid_load} \
         kills with requests unanswered, {replayed} requests answered from the journal \
         instead of applied again, {compactions} state rewrites; {} mappings at the end",
        started.elapsed().as_secs_f64(),
        r.domains.values().map(|d| d.maps.len()).sum::<usize>()
    );
    assert!(
        killed_mid_load > rounds / 10,
        "the kills should land in the middle of the load now and then"
    );
    assert!(
        replayed > 0,
        "a crash between a commit and its answers must be answered from the journal"
    );
    assert!(compactions > 0, "the journal should fill now and then");
}

#[test]
fn sigterm_saves_everything_and_a_reset_is_kept_too() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let d = start(&state, &["--fault-backlog", "64"]);
    let mut o = options();
    o.event_buffers = 0;
    let mut dev = d.connect_with(o.clone());
    assert_eq!(status_of(&mut dev, &attach(1, 0x10)), Status::Ok);
    assert_eq!(
        status_of(&mut dev, &map(1, 0, PAGE - 1, 0x5000)),
        Status::Ok
    );
    dev.set_config(36, &[1]).unwrap();
    // A fault record waiting for an event buffer travels with a graceful stop.
    let mut client = d.control_client();
    client.request(json!({"cmd": "use_dma_api", "endpoint": 0x10}));
    client.request(json!({"cmd": "translate", "endpoint": 0x10, "iova": 0x9000}));
    drop(client);
    assert_eq!(d.stats()["faults"]["backlog"], 1);
    assert!(d.signal("TERM").success());

    let d = start(&state, &[]);
    dev.reconnect(&d.socket).unwrap();
    assert_eq!(d.stats()["faults"]["backlog"], 1, "the record waits again");
    assert_eq!(dev.get_config(36, 1).unwrap(), vec![1], "bypass survives");
    let reply = d.control(json!({"cmd": "mappings", "domain": 1}));
    assert_eq!(reply["total"], 1, "{reply}");
    assert_eq!(
        status_of(&mut dev, &map(1, PAGE, 2 * PAGE - 1, 0)),
        Status::Ok
    );
    // A reset is the guest's state too: after it, a restart finds nothing.
    dev.reset().unwrap();
    d.signal("KILL");
    let d = start(&state, &[]);
    dev.reconnect(&d.socket).unwrap();
    assert_eq!(d.stats()["domains"], 0);
    assert_eq!(
        dev.get_config(36, 1).unwrap(),
        vec![1],
        "bypass survives a reset"
    );
}

#[test]
fn a_frontend_that_disconnects_ends_the_guest_state() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let d = start(&state, &[]);
    let mut dev = d.connect_with(options());
    assert_eq!(status_of(&mut dev, &attach(1, 0x10)), Status::Ok);
    drop(dev);
    // The daemon saw the VM go; the next one starts fresh, also after a restart.
    let dev = d.connect_with(options());
    assert_eq!(d.stats()["domains"], 0);
    drop(dev);
    d.signal("KILL");
    let d = start(&state, &[]);
    assert_eq!(d.stats()["domains"], 0);
}

#[test]
fn a_bad_state_file_is_refused_until_told_to_start_fresh() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    {
        let d = start(&state, &[]);
        let mut dev = d.connect_with(options());
        assert_eq!(status_of(&mut dev, &attach(1, 0x10)), Status::Ok);
        d.signal("KILL");
    }
    let socket = dir.path().join("refused.sock");
    let refuse = |extra: &[&str], needle: &str| {
        let mut args: Vec<&str> = TOPOLOGY.to_vec();
        let path = state.to_str().unwrap();
        let socket = socket.to_str().unwrap();
        args.extend_from_slice(&["--socket-path", socket, "--state-file", path]);
        args.extend_from_slice(extra);
        let out = std::process::Command::new(BIN)
            .args(&args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{extra:?}: {stderr}");
        assert!(
            stderr.contains(needle) && stderr.contains("--fresh-state"),
            "{extra:?}: {stderr:?} should say {needle:?}"
        );
    };
    // Other options: another topology fingerprint.
    refuse(&["--group", "0x14,0x15"], "another topology");
    // Damage.
    let good = std::fs::read(&state).unwrap();
    let mut bad = good.clone();
    let last = bad.len() - 1;
    bad[last] ^= 0x55;
    std::fs::write(&state, &bad).unwrap();
    refuse(&[], "checksum");
    std::fs::write(&state, "not a state file at all, just text\n".repeat(4)).unwrap();
    refuse(&[], "bad magic");
    // And the way out: start fresh, replacing it.
    let d = start(&state, &["--fresh-state"]);
    assert_eq!(d.stats()["domains"], 0);
    d.signal("KILL");
    let d = start(&state, &[]);
    assert_eq!(d.stats()["domains"], 0);
    let mode = std::fs::metadata(&state).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o600
    );
}
