// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Least privilege: the daemon under its seccomp filter. Representative flows run
//! with `--seccomp kill`, so a system call missing from the allowlist kills the daemon and
//! fails the test: the handshake, every request type, config space, faults on the event
//! queue, the control socket (translate, claim, a translator registered across UNMAPs: the
//! page tables' membarrier), reset, a replaced memory table, reconnection, many control
//! clients at once, SIGTERM cleanup. A call outside the allowlist is shown to be logged,
//! trapped or fatal as the mode says.
//!
//! The whole daemon suite runs under the filter with `VHOST_IOMMU_TEST_SECCOMP=kill` (see
//! tests/common/mod.rs), the QEMU + Linux end-to-end test included.

mod common;

use std::{os::unix::process::ExitStatusExt, process::Command, time::Duration};

use common::*;
use serde_json::json;
use vhost_device_iommu::seccomp::{self, SeccompMode};
use vhost_iommu_testkit::{Chain, Options, WaitMode};
use virtio::{FaultReason, FaultRecord, Status};

/// pci-testdev at 00:05.0; 00:06.0 and 00:06.1 form one group.
const EP: u32 = 0x28;
const GROUP: [u32; 2] = [0x30, 0x31];
const PAGE: u64 = 0x1000;

fn quick() -> Options {
    Options {
        connect_timeout: Duration::from_secs(5),
        timeout: Duration::from_secs(5),
        ..Options::default()
    }
}

/// Waits (up to 5 s) until every thread of a starting daemon shows its filters.
fn wait_confined(d: &mut Daemon) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while std::time::Instant::now() < deadline
        && d.alive()
        && !d
            .thread_seccomp()
            .iter()
            .all(|(_, m, f)| (*m, *f) == (2, 2))
    {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Every thread of the daemon runs under both filters (the EACCES one for opening files and
/// the allowlist), and the daemon is alive.
fn assert_confined(d: &mut Daemon, when: &str) {
    assert!(
        d.alive(),
        "{when}: the daemon died: {:?} (signal 31 is SIGSYS: a system call outside the \
         allowlist)",
        d.exit_status()
    );
    let threads = d.thread_seccomp();
    assert!(!threads.is_empty());
    for (name, mode, filters) in &threads {
        assert_eq!(
            (*mode, *filters),
            (2, 2),
            "{when}: thread {name} is not filtered: {threads:?}"
        );
    }
}

#[test]
fn serving_under_seccomp_kill() {
    let mut d = Daemon::start_logged(&["--seccomp", "kill", "--group", "00:06.0,00:06.1"], "info");
    // The sockets appear just before the filters are installed (binding them is not allowed
    // afterwards), and the accept loop starts only after: give that moment to pass.
    wait_confined(&mut d);
    assert_confined(&mut d, "before any frontend");

    // Handshake: features, protocol features, memory table, both rings; config space.
    let mut dev = d.connect_with(quick());
    assert_eq!(dev.config().unwrap().len(), 40);
    dev.set_config(36, &[1]).unwrap();
    assert_eq!(dev.get_config(36, 1).unwrap(), vec![1]);
    dev.set_config(36, &[0]).unwrap();
    assert_confined(&mut d, "after the handshake (the vring worker came later)");
    assert!(d.threads_named("vring_worker") >= 1);

    // Every request type, one at a time and in a batch.
    assert_eq!(status_of(&mut dev, &attach(1, EP)), Status::Ok);
    assert_eq!(status_of(&mut dev, &attach_bypass(2, GROUP[0])), Status::Ok);
    for i in 0..16u64 {
        let page = map(1, i * PAGE, i * PAGE + PAGE - 1, 0x10_0000 + i * PAGE);
        assert_eq!(status_of(&mut dev, &page), Status::Ok);
    }
    let c = send(&mut dev, &probe(EP));
    assert_eq!(status(&c), Status::Ok);
    assert_eq!(&c.data[..4], &[1, 0, 20, 0], "a RESV_MEM property");
    let requests: Vec<Vec<u8>> = (16..48u64)
        .flat_map(|i| {
            let (s, e) = (i * PAGE, i * PAGE + PAGE - 1);
            [map(1, s, e, s).encode(), unmap(1, s, e).encode()]
        })
        .collect();
    let chains: Vec<Chain<'_>> = requests.iter().map(|r| Chain::request(r, 4)).collect();
    for c in dev.batch(&chains).unwrap() {
        assert_eq!(status(&c), Status::Ok);
    }
    // An unknown type is returned unanswered, a truncated body is INVAL (both logged).
    let unknown = dev.request(&[0x7f, 0, 0, 0, 0, 0, 0, 0], 4).unwrap();
    assert_eq!(unknown.used_len, 0);
    let truncated = dev.request(&attach(1, EP).encode()[..12], 4).unwrap();
    assert_eq!(status(&truncated), Status::Inval);

    // The control socket: every command.
    assert_eq!(
        d.control(json!({"cmd": "use_dma_api", "endpoint": EP}))["ok"],
        true
    );
    for cmd in ["stats", "domains", "groups"] {
        assert_eq!(d.control(json!({ "cmd": cmd }))["ok"], true, "{cmd}");
    }
    assert_eq!(
        d.control(json!({"cmd": "mappings", "domain": 1}))["total"],
        16
    );
    let claim = json!({"cmd": "claim", "endpoint": GROUP[1], "cookie": 9});
    assert_eq!(d.control(claim)["ok"], true);
    let tr = json!({"cmd": "translate", "endpoint": GROUP[0], "iova": 0x1234, "owner": 9});
    assert_eq!(d.control(tr)["gpa"], 0x1234, "identity domain");
    let release = json!({"cmd": "release", "endpoint": GROUP[0], "cookie": 9});
    assert_eq!(d.control(release)["ok"], true);
    assert_eq!(
        d.control(json!({"cmd": "unuse_dma_api", "endpoint": EP}))["ok"],
        true
    );

    // A translator stays registered (its control client keeps the connection) while the guest
    // unmaps: each grace period takes the heavy barrier, membarrier(2).
    let mut translator = d.control_client();
    let claim = json!({"cmd": "claim", "endpoint": EP, "cookie": 7});
    assert_eq!(translator.request(claim)["ok"], true);
    let tr = |iova: u64| json!({"cmd": "translate", "endpoint": EP, "iova": iova, "access": "write", "owner": 7});
    assert_eq!(translator.request(tr(0x5008))["gpa"], 0x10_5008);
    let before = d.stats()["grace_periods"].as_u64().unwrap();
    for i in 0..16u64 {
        let page = unmap(1, i * PAGE, i * PAGE + PAGE - 1);
        assert_eq!(status_of(&mut dev, &page), Status::Ok);
    }
    assert!(d.stats()["grace_periods"].as_u64().unwrap() >= before + 16);
    // The refused translation is a fault record on the event queue.
    assert_eq!(translator.request(tr(0x5008))["fault"], "unmapped");
    let event = dev.wait_event(Duration::from_secs(5)).unwrap();
    let record = FaultRecord::from_bytes(&event.data[..24].try_into().unwrap()).unwrap();
    assert_eq!(
        (record.reason, record.address),
        (FaultReason::Mapping, 0x5008)
    );
    drop(translator);
    assert_eq!(status_of(&mut dev, &detach(1, EP)), Status::Ok);
    assert_confined(&mut d, "after requests and control commands");

    // Device reset (GET_VRING_BASE, RESET_DEVICE, rings restarted) and a replaced memory
    // table (the old one unmapped).
    assert_eq!(status_of(&mut dev, &attach(1, EP)), Status::Ok);
    dev.reset().unwrap();
    assert_eq!(d.stats()["domains"], 0);
    let mem = dev.memory().clone();
    dev.connection().set_mem_table(&mem).unwrap();
    assert_eq!(status_of(&mut dev, &attach(1, EP)), Status::Ok);

    // Reconnection: a new frontend with interrupts on the request queue.
    drop(dev);
    let mut dev = d.connect_with(Options {
        request_interrupts: true,
        wait: WaitMode::Interrupt,
        ..quick()
    });
    assert_eq!(status_of(&mut dev, &attach(3, EP)), Status::Ok);
    // Counted by the accept loop once the handshake's thread runs: a moment, under load.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while d.stats()["connections"] != 2 {
        assert!(std::time::Instant::now() < deadline, "{}", d.stats());
        std::thread::sleep(std::time::Duration::from_millis(5));
    }

    // Many control clients at once: a thread each, and with them glibc's malloc arenas (the
    // ninth makes glibc try to open /sys/devices/system/cpu/online: refused, not fatal).
    // The control clients of the checks above are gone first (their slots come back when
    // their threads end, a moment after the close): the first of the 16 waits until it is
    // the only one.
    let mut first = d.control_client();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let stats = first.request(json!({"cmd": "stats"}));
        if stats["stats"]["control"]["clients"] == 1 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{stats}");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let mut clients = vec![first];
    clients.extend((1..16).map(|_| d.control_client()));
    for c in &mut clients {
        assert_eq!(c.request(json!({"cmd": "stats"}))["ok"], true);
    }
    let mut refused = d.control_client();
    assert!(refused.read_reply().unwrap()["error"]
        .as_str()
        .unwrap()
        .contains("too many"));
    // A line too long is answered with an error and the connection closed.
    clients[0].send_raw(&[b'x'; 5000]).unwrap();
    assert_eq!(clients[0].read_reply().unwrap()["ok"], false);
    drop(clients);
    assert_confined(&mut d, "after many control clients");

    // SIGTERM: the signal thread accounts, unlinks both sockets and exits 0, under the filter.
    let (socket, control) = (d.socket.clone(), d.control.clone());
    let exit = d.terminate("TERM");
    drop(dev);
    assert!(exit.success(), "{exit:?} (signal 31 is SIGSYS)");
    assert!(!socket.exists() && !control.exists(), "sockets left behind");
    let log = d.log();
    assert!(log.contains("seccomp filter installed"), "{log}");
    assert!(
        log.contains("fault records: 1 reported, 1 delivered"),
        "{log}"
    );
}

/// `log` and `trap` filter the same calls: the daemon serves and exits cleanly under both.
#[test]
fn log_and_trap_modes_serve_too() {
    for mode in ["log", "trap"] {
        let mut d = Daemon::start(&["--seccomp", mode]);
        let mut dev = d.connect_with(quick());
        let mut translator = d.control_client();
        assert_eq!(
            translator.request(json!({"cmd": "use_dma_api", "endpoint": EP}))["ok"],
            true
        );
        assert_eq!(status_of(&mut dev, &attach(1, EP)), Status::Ok);
        assert_eq!(status_of(&mut dev, &map(1, 0, PAGE - 1, 0)), Status::Ok);
        let tr = json!({"cmd": "translate", "endpoint": EP, "iova": 8});
        assert_eq!(translator.request(tr)["gpa"], 8, "{mode}");
        assert_eq!(status_of(&mut dev, &unmap(1, 0, PAGE - 1)), Status::Ok);
        dev.reset().unwrap();
        assert_confined(&mut d, mode);
        let exit = d.terminate("TERM");
        assert!(exit.success(), "{mode}: {exit:?}");
    }
}

/// Environment variable that makes [`helper_breaks_the_filter`] run.
const HELPER_ENV: &str = "VHOST_IOMMU_SECCOMP_HELPER";

/// Run by [`a_call_outside_the_allowlist_is_logged_trapped_or_fatal`] in a child process:
/// installs the daemon's filter, tries to open a file (refused, not fatal), then calls
/// getppid(2), which the daemon never does.
#[test]
#[ignore = "helper: runs in the child process of a_call_outside_the_allowlist_..."]
fn helper_breaks_the_filter() {
    let mode = match std::env::var(HELPER_ENV).as_deref() {
        Ok("log") => SeccompMode::Log,
        Ok("trap") => SeccompMode::Trap,
        Ok("kill") => SeccompMode::Kill,
        _ => return,
    };
    seccomp::apply(mode).unwrap();
    eprintln!("filter installed");
    let open = std::fs::File::open("/proc/self/status").map_err(|e| e.kind());
    eprintln!("open: {open:?}");
    let parent = std::os::unix::process::parent_id();
    eprintln!("getppid returned {parent}");
    std::process::exit(0);
}

#[test]
fn a_call_outside_the_allowlist_is_logged_trapped_or_fatal() {
    for mode in ["log", "trap", "kill"] {
        let out = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "helper_breaks_the_filter", "--ignored"])
            .args(["--nocapture", "--test-threads=1"])
            .env(HELPER_ENV, mode)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("filter installed") && stderr.contains("open: Err(PermissionDenied)"),
            "{mode}: {stderr}"
        );
        match mode {
            "log" => {
                assert!(out.status.success(), "{mode}: {:?} {stderr}", out.status);
                assert!(stderr.contains("getppid returned"), "{stderr}");
            }
            "trap" => {
                assert_eq!(
                    out.status.code(),
                    Some(seccomp::TRAP_EXIT_STATUS),
                    "{stderr}"
                );
                let message = format!("system call {} is not in the allowlist", libc::SYS_getppid);
                assert!(stderr.contains(&message), "{stderr}");
            }
            _ => {
                assert_eq!(out.status.signal(), Some(libc::SIGSYS), "{stderr}");
                assert!(!stderr.contains("getppid returned"), "{stderr}");
            }
        }
    }
}

/// `Cpus_allowed_list` of each thread of the daemon, by name.
fn thread_cpus(d: &Daemon) -> Vec<(String, String)> {
    std::fs::read_dir(format!("/proc/{}/task", d.pid()))
        .unwrap()
        .filter_map(|t| {
            let dir = t.ok()?.path();
            let comm = std::fs::read_to_string(dir.join("comm")).ok()?;
            let status = std::fs::read_to_string(dir.join("status")).ok()?;
            let cpus = status
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))?
                .trim()
                .to_string();
            Some((comm.trim_end().to_string(), cpus))
        })
        .collect()
}

/// Polls `f` for up to 5 s; its last answer.
fn settle<T>(mut f: impl FnMut() -> (bool, T)) -> T {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (done, value) = f();
        if done || std::time::Instant::now() > deadline {
            return value;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn worker_cpus_pin_each_connections_worker_only_under_seccomp_kill() {
    let mut d = Daemon::start_logged(&["--seccomp", "kill", "--worker-cpus", "0"], "info");
    wait_confined(&mut d);
    // The process's CPUs, as a thread started before any worker has them (a new thread is
    // named a moment after it starts: wait for the name).
    let own = settle(|| {
        let signals = thread_cpus(&d).into_iter().find(|(n, _)| n == "signals");
        (signals.is_some(), signals)
    })
    .map(|(_, c)| c)
    .expect("the signal thread");
    for connection in 0..2 {
        let mut dev = d.connect_with(quick());
        assert_eq!(status_of(&mut dev, &attach(1, EP)), Status::Ok);
        assert_confined(&mut d, "serving with --worker-cpus");
        let placed = |(name, cpus): &(String, String)| {
            cpus == if name == "vring_worker" {
                "0"
            } else {
                own.as_str()
            }
        };
        let threads = settle(|| {
            let threads = thread_cpus(&d);
            let done =
                threads.iter().any(|(n, _)| n == "vring_worker") && threads.iter().all(placed);
            (done, threads)
        });
        assert!(
            threads.iter().any(|(n, _)| n == "vring_worker"),
            "connection {connection}: no worker: {threads:?}"
        );
        for t in &threads {
            assert!(placed(t), "connection {connection}: {t:?}: {threads:?}");
        }
        // The next connection gets a worker of its own, created as this one ends.
        drop(dev);
    }
}
