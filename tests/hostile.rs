// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Hostile guests and faulty peers, against the real daemon binary: every resource a
//! guest can make the daemon allocate is capped and answered (NOMEM, an error line), counted,
//! and memory stays bounded; frontends that disconnect at any point, replace the memory table
//! under running rings, point rings outside memory, kick early, send garbage or never finish the
//! handshake leave the daemon up and serving the next frontend; SIGTERM accounts for every fault
//! record; sockets get the mode asked for.
//!
//! Every frontend call runs under the testkit's watchdog and every wait has a timeout. Tests
//! named after a failure mode began as reproducers of daemon bugs, fixed since.

mod common;

use std::{
    io::{Read, Write},
    os::unix::{fs::PermissionsExt, net::UnixStream},
    sync::atomic::Ordering,
    thread,
    time::{Duration, Instant},
};

use common::*;
use serde_json::{json, Value};
use vhost::{
    vhost_user::VhostUserProtocolFeatures, VhostBackend, VhostUserMemoryRegionInfo, VringConfigData,
};
use vhost_iommu_testkit::{
    Chain, Completion, Connection, Driver, Error as KitError, GuestRam, MemoryRegion, Options,
    RawDesc, Virtqueue, WaitMode,
};
use virtio::Status;

/// pci-testdev at 00:05.0, and three more endpoints of the default topology.
const EP: u32 = 0x28;
const EPS: [u32; 4] = [0x28, 0x30, 0x38, 0x40];
const PAGE: u64 = 0x1000;
/// Last IOVA of the default input range.
const INPUT_END: u64 = (1 << 48) - 1;
const VRING_WORKER: &str = "vring_worker";
/// VIRTIO_RING_F_EVENT_IDX and VHOST_USER_F_PROTOCOL_FEATURES.
const EVENT_IDX: u64 = 1 << 29;
const PROTOCOL_FEATURES: u64 = 1 << 30;

/// Testkit options with short timeouts: a daemon that stops answering fails a test in seconds.
fn quick() -> Options {
    Options {
        connect_timeout: Duration::from_secs(5),
        timeout: Duration::from_secs(5),
        ..Options::default()
    }
}

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

/// The next frontend is served: the whole set-up, an ATTACH and a DETACH, within the testkit's
/// timeouts; the daemon is alive and runs exactly one vring worker (none leaked or stuck).
fn assert_serves(d: &mut Daemon, after: &str) {
    let mut dev = Driver::connect(&d.socket, quick())
        .unwrap_or_else(|e| panic!("after {after}: the next frontend is not served: {e}"));
    for request in [attach(1, EP), detach(1, EP)] {
        let c = dev
            .request(&request.encode(), 4)
            .unwrap_or_else(|e| panic!("after {after}: {request:?} not answered: {e}"));
        assert_eq!(status(&c), Status::Ok, "after {after}: {request:?}");
    }
    drop(dev);
    assert!(
        d.alive(),
        "after {after}: the daemon exited: {:?}",
        d.exit_status()
    );
    d.wait_for("a single vring worker", || {
        d.threads_named(VRING_WORKER) == 1
    });
}

/// The device the next frontend finds is fresh: no domain, no mapping.
fn assert_fresh(d: &Daemon, after: &str) {
    let stats = d.stats();
    assert_eq!(
        (n(&stats["domains"]), n(&stats["mappings"])),
        (0, 0),
        "after {after}: state of an earlier frontend survived: {stats}"
    );
}

fn use_dma_api(d: &Daemon, endpoint: u32) {
    let reply = d.control(json!({"cmd": "use_dma_api", "endpoint": endpoint}));
    assert_eq!(reply["ok"], true, "{reply}");
}

fn translate(d: &Daemon, endpoint: u32, iova: u64) -> Value {
    d.control(json!({"cmd": "translate", "endpoint": endpoint, "iova": iova}))
}

/// Statuses of a batch of requests sent in one kick.
fn batch_statuses(dev: &mut Driver, requests: &[virtio::Request]) -> Vec<Status> {
    let bytes: Vec<Vec<u8>> = requests.iter().map(|r| r.encode()).collect();
    let chains: Vec<Chain<'_>> = bytes.iter().map(|b| Chain::request(b, 4)).collect();
    dev.batch(&chains)
        .expect("the batch completes")
        .iter()
        .map(status)
        .collect()
}

// ---- 1. bounded resources ----------------------------------------------------------------------

#[test]
fn domain_cap_is_nomem_counted_and_the_state_stays_intact() {
    let d = Daemon::start(&["--max-domains", "3", "--domain-range", "1-100"]);
    let mut dev = d.connect();
    for (domain, endpoint) in [(1, EPS[0]), (2, EPS[1]), (3, EPS[2])] {
        assert_eq!(status_of(&mut dev, &attach(domain, endpoint)), Status::Ok);
    }
    assert_eq!(
        status_of(&mut dev, &attach(4, EPS[3])),
        Status::NoMem,
        "a fourth domain"
    );
    assert_eq!(
        status_of(&mut dev, &attach_bypass(5, EPS[3])),
        Status::NoMem,
        "identity domains count too"
    );
    assert_eq!(
        status_of(&mut dev, &attach(1, EPS[3])),
        Status::Ok,
        "joining a live domain allocates nothing"
    );
    let stats = d.stats();
    assert_eq!(stats["domains"], 3, "{stats}");
    assert_eq!(stats["requests"]["attach"]["nomem"], 2, "{stats}");
    // The refused ATTACHes created nothing.
    let domains = d.control(json!({"cmd": "domains"}));
    let ids: Vec<u64> = domains["domains"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| n(&x["id"]))
        .collect();
    assert_eq!(ids, vec![1, 2, 3], "{domains}");
    // A domain dies with its last endpoint, and its slot is free again.
    assert_eq!(status_of(&mut dev, &detach(3, EPS[2])), Status::Ok);
    assert_eq!(status_of(&mut dev, &attach(4, EPS[2])), Status::Ok);
    assert_eq!(d.stats()["domains"], 3);
}

#[test]
fn mappings_per_domain_cap_is_nomem_and_counted() {
    let d = Daemon::start(&["--max-mappings-per-domain", "8"]);
    let mut dev = d.connect();
    use_dma_api(&d, EP);
    assert_eq!(status_of(&mut dev, &attach(1, EP)), Status::Ok);
    assert_eq!(status_of(&mut dev, &attach(2, EPS[1])), Status::Ok);
    let page = |i: u64| map(1, i * PAGE, i * PAGE + PAGE - 1, 0x10_0000 + i * PAGE);
    let first8: Vec<_> = (0..8).map(page).collect();
    assert!(batch_statuses(&mut dev, &first8)
        .iter()
        .all(|s| *s == Status::Ok));
    assert_eq!(status_of(&mut dev, &page(8)), Status::NoMem, "a ninth");
    assert_eq!(
        translate(&d, EP, 8 * PAGE)["fault"],
        "unmapped",
        "nothing of the refused MAP"
    );
    assert_eq!(
        status_of(&mut dev, &map(2, 0, PAGE - 1, 0)),
        Status::Ok,
        "another domain has its own budget"
    );
    assert_eq!(status_of(&mut dev, &unmap(1, 0, PAGE - 1)), Status::Ok);
    assert_eq!(
        status_of(&mut dev, &page(8)),
        Status::Ok,
        "UNMAP gives the slot back"
    );
    assert_eq!(translate(&d, EP, 7 * PAGE + 5)["gpa"], 0x10_7005);
    let stats = d.stats();
    assert_eq!(stats["requests"]["map"]["nomem"], 1, "{stats}");
    assert_eq!(stats["mappings"], 9, "{stats}");
}

/// A MAP of (nearly) the whole input range at a GPA no big leaf can take needs a level-1 node
/// per GiB, far more than the tables may hold: NOMEM at once, within the quick timeout (it
/// used to count its 2^27 regions one by one: about a second in a release build, more than
/// the timeout in a debug one), and the daemon goes on serving.
#[test]
fn a_map_of_the_whole_input_range_is_nomem_at_once() {
    let d = Daemon::start(&[]);
    let mut dev = d.connect_with(quick());
    use_dma_api(&d, EP);
    assert_eq!(status_of(&mut dev, &attach(1, EP)), Status::Ok);
    assert_eq!(status_of(&mut dev, &map(1, 0, PAGE - 1, 0)), Status::Ok);
    // From 4 GiB up (below is the x86 MSI window, which no MAP may cover).
    let whole = map(1, 1 << 32, INPUT_END, 0x2000);
    for _ in 0..3 {
        assert_eq!(status_of(&mut dev, &whole), Status::NoMem);
    }
    assert_eq!(
        translate(&d, EP, 5)["gpa"],
        5,
        "the earlier mapping is intact"
    );
    assert_eq!(translate(&d, EP, 1 << 40)["fault"], "unmapped");
    let stats = d.stats();
    assert_eq!(stats["requests"]["map"]["nomem"], 3, "{stats}");
    assert_eq!(stats["mappings"], 1, "{stats}");
}

#[test]
fn total_mappings_cap_is_nomem_and_counted() {
    let d = Daemon::start(&["--max-mappings", "10"]);
    let mut dev = d.connect();
    assert_eq!(status_of(&mut dev, &attach(1, EP)), Status::Ok);
    assert_eq!(status_of(&mut dev, &attach(2, EPS[1])), Status::Ok);
    let page = |domain, i: u64| map(domain, i * PAGE, i * PAGE + PAGE - 1, 0);
    let requests: Vec<_> = (0..6)
        .map(|i| page(1, i))
        .chain((0..4).map(|i| page(2, i)))
        .collect();
    assert!(batch_statuses(&mut dev, &requests)
        .iter()
        .all(|s| *s == Status::Ok));
    assert_eq!(status_of(&mut dev, &page(1, 6)), Status::NoMem);
    assert_eq!(status_of(&mut dev, &page(2, 4)), Status::NoMem);
    // Domain 2 dies with its last endpoint, and its four mappings go with it.
    assert_eq!(status_of(&mut dev, &detach(2, EPS[1])), Status::Ok);
    let more: Vec<_> = (6..10).map(|i| page(1, i)).collect();
    assert!(batch_statuses(&mut dev, &more)
        .iter()
        .all(|s| *s == Status::Ok));
    assert_eq!(status_of(&mut dev, &page(1, 10)), Status::NoMem);
    let stats = d.stats();
    assert_eq!(stats["requests"]["map"]["nomem"], 3, "{stats}");
    assert_eq!(stats["mappings"], 10, "{stats}");
}

/// An IOVA that shares no page-table node below the root with the previous ones (while
/// `i < 512`: a new level-3, level-2 and level-1 node each; then a new level-2 and level-1).
fn sparse_iova(i: u64) -> u64 {
    ((i % 512) << 39) | ((i / 512 % 512) << 30)
}

/// MAPs one page at `sparse_iova(i)` for increasing `i`, 64 per kick, until NOMEM. Returns the
/// IOVAs mapped and the first one refused.
fn fill_until_nomem(dev: &mut Driver) -> (Vec<u64>, u64) {
    let mut mapped = Vec::new();
    for round in 0..1000u64 {
        let iovas: Vec<u64> = (round * 64..round * 64 + 64).map(sparse_iova).collect();
        let requests: Vec<_> = iovas
            .iter()
            .map(|&iova| map(1, iova, iova + PAGE - 1, iova % (1 << 30)))
            .collect();
        for (iova, s) in iovas.iter().zip(batch_statuses(dev, &requests)) {
            match s {
                Status::Ok => mapped.push(*iova),
                Status::NoMem => return (mapped, *iova),
                other => panic!("MAP at {iova:#x}: {other:?}"),
            }
        }
    }
    panic!("no NOMEM after {} sparse MAPs", mapped.len());
}

#[test]
fn table_memory_cap_bounds_rss_keeps_state_and_comes_back_after_unmap() {
    let d = Daemon::start(&["--max-table-mib", "16"]);
    let mut dev = d.connect();
    use_dma_api(&d, EP);
    assert_eq!(status_of(&mut dev, &attach(1, EP)), Status::Ok);
    let rss_before = d.rss_kib();

    let (mapped, refused) = fill_until_nomem(&mut dev);
    let rss_full = d.rss_kib();
    let stats = d.stats();
    assert!(
        n(&stats["table_bytes"]) <= 16 << 20,
        "page tables beyond the cap: {stats}"
    );
    assert!(n(&stats["requests"]["map"]["nomem"]) >= 1, "{stats}");
    assert_eq!(n(&stats["mappings"]), mapped.len() as u64, "{stats}");
    assert!(
        rss_full.saturating_sub(rss_before) < 64 << 10,
        "RSS grew from {rss_before} KiB to {rss_full} KiB for {} mappings",
        mapped.len()
    );
    // After NOMEM the state is intact: earlier mappings translate, the refused one does not.
    for &iova in mapped.iter().step_by(97).chain(mapped.last()) {
        let reply = translate(&d, EP, iova + 0x123);
        assert_eq!(
            n(&reply["gpa"]),
            iova % (1 << 30) + 0x123,
            "{iova:#x}: {reply}"
        );
    }
    assert_eq!(translate(&d, EP, refused)["fault"], "unmapped");
    // More NOMEM, still nothing changed.
    assert_eq!(
        status_of(&mut dev, &map(1, refused, refused + PAGE - 1, 0)),
        Status::NoMem
    );
    assert_eq!(n(&d.stats()["mappings"]), mapped.len() as u64);

    // UNMAP gives the memory back: the tables shrink to the root, and the same number of
    // sparse MAPs fits again, without the process growing.
    assert_eq!(status_of(&mut dev, &unmap(1, 0, INPUT_END)), Status::Ok);
    let stats = d.stats();
    assert_eq!(stats["mappings"], 0, "{stats}");
    assert_eq!(stats["table_bytes"], 4096, "only the root is left: {stats}");
    let (again, _) = fill_until_nomem(&mut dev);
    assert_eq!(again.len(), mapped.len(), "the freed memory is reusable");
    let rss_again = d.rss_kib();
    println!(
        "{} sparse MAPs until NOMEM (16 MiB of tables); RSS {rss_before} -> {rss_full} KiB, \
         {rss_again} KiB after UNMAP and refill",
        mapped.len()
    );
    assert!(
        rss_again.saturating_sub(rss_full) < 8 << 10,
        "RSS grew from {rss_full} KiB to {rss_again} KiB refilling freed tables"
    );
    assert!(d.stats()["requests"]["map"]["ok"].as_u64().unwrap() >= 2 * mapped.len() as u64);
}

#[test]
fn fault_records_waiting_at_disconnect_are_dropped_counted_and_not_shown_to_the_next_guest() {
    let d = Daemon::start(&["--fault-backlog", "4"]);
    let silent = d.connect_with(Options {
        event_buffers: 0,
        ..quick()
    });
    use_dma_api(&d, EP);
    for i in 0..6u64 {
        assert_eq!(translate(&d, EP, i * PAGE)["fault"], "no_domain");
    }
    // (How many wait and how many overflowed is tests/daemon.rs's business, and racy: see
    // fault_backlog_never_exceeds_its_cap.)
    d.wait_stats("six reports", |s| s["faults"]["reported"] == 6);
    drop(silent);
    let mut next = d.connect_with(quick());
    thread::sleep(Duration::from_millis(200));
    assert!(
        next.poll_event().unwrap().is_none(),
        "a record of the previous guest reached the next one"
    );
    let stats = d.stats();
    assert_eq!(
        stats["faults"]["dropped"], 6,
        "overflowed or dropped at disconnect"
    );
    assert_eq!(stats["faults"]["backlog"], 0, "{stats}");
    // The next guest gets its own faults.
    assert_eq!(translate(&d, EP, 0x7000)["fault"], "no_domain");
    let event = next.wait_event(Duration::from_secs(5)).unwrap();
    assert_eq!(event.used_len, 24);
    let stats = d.stats();
    let f = &stats["faults"];
    assert_eq!(
        n(&f["reported"]),
        n(&f["delivered"]) + n(&f["dropped"]) + n(&f["backlog"]),
        "{stats}"
    );
}

#[test]
fn fault_backlog_never_exceeds_its_cap() {
    let d = Daemon::start(&["--fault-backlog", "4"]);
    let _silent = d.connect_with(Options {
        event_buffers: 0,
        ..quick()
    });
    use_dma_api(&d, EP);
    let storms: Vec<_> = (0..4u64)
        .map(|k| {
            let mut c = d.control_client();
            thread::spawn(move || {
                for i in 0..2000u64 {
                    let iova = (k * 10_000 + i) * PAGE;
                    let reply =
                        c.request(json!({"cmd": "translate", "endpoint": EP, "iova": iova}));
                    assert_eq!(reply["fault"], "no_domain");
                }
            })
        })
        .collect();
    for t in storms {
        t.join().unwrap();
    }
    let stats = d.wait_stats("8000 reports", |s| s["faults"]["reported"] == 8000);
    assert_eq!(stats["faults"]["backlog"], 4, "{stats}");
    assert_eq!(stats["faults"]["dropped"], 7996, "{stats}");
}

/// Connects a control client and sends `stats`: Some(reply) when served, None when refused
/// (the error line is checked).
fn try_control_client(d: &Daemon) -> Option<ControlClient> {
    let mut c = d.control_client();
    // A refused client may be closed before the request is read: ignore write errors.
    let _ = c.send_raw(b"{\"cmd\":\"stats\"}\n");
    let reply = c.read_reply().expect("a reply line");
    if reply["ok"] == true {
        return Some(c);
    }
    assert_eq!(reply["error"], "too many control clients", "{reply}");
    None
}

#[test]
fn control_clients_are_capped_and_refusals_counted() {
    let d = Daemon::start(&[]);
    let mut held: Vec<ControlClient> = (0..16)
        .map(|i| try_control_client(&d).unwrap_or_else(|| panic!("client {i} refused")))
        .collect();
    // The 17th gets an error line, then end of file.
    let mut extra = d.control_client();
    let reply = extra.read_reply().expect("an error line");
    assert_eq!(reply["ok"], false, "{reply}");
    assert_eq!(reply["error"], "too many control clients");
    assert!(extra.read_reply().is_none(), "then the connection closes");
    // The 16 are still served.
    for c in &mut held {
        assert_eq!(c.request(json!({"cmd": "groups"}))["ok"], true);
    }
    // A slot frees when a client leaves (its thread notices the end of file).
    held.pop();
    let mut refused = 1;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut client = loop {
        if let Some(c) = try_control_client(&d) {
            break c;
        }
        refused += 1;
        assert!(Instant::now() < deadline, "the freed slot was never reused");
        thread::sleep(Duration::from_millis(5));
    };
    let stats = client.request(json!({"cmd": "stats"}));
    assert_eq!(
        stats["stats"]["control"]["refused_clients"], refused,
        "{stats}"
    );
    drop(held);
    drop(client);
    // All slots come back.
    d.wait_for("16 free slots", || {
        let clients: Vec<_> = (0..16).map_while(|_| try_control_client(&d)).collect();
        clients.len() == 16
    });
}

#[test]
fn control_lines_are_capped_and_bad_lines_answered() {
    let d = Daemon::start(&[]);
    let mut c = d.control_client();
    // Exactly 4096 bytes before the newline: accepted.
    let mut line = json!({"cmd": "stats"}).to_string();
    line.extend(std::iter::repeat_n(' ', 4096 - line.len()));
    line.push('\n');
    c.send_raw(line.as_bytes()).unwrap();
    assert_eq!(c.read_reply().unwrap()["ok"], true);
    // Garbage, unknown commands, wrong types: an error each, and the connection stays.
    for bad in [
        &b"\x00\xff\xfe\x01 not json\n"[..],
        b"{\"cmd\": \"reboot\"}\n",
        b"{\"cmd\": \"translate\", \"endpoint\": -1, \"iova\": 0}\n",
        b"{\"cmd\": \"translate\", \"endpoint\": 40, \"iova\": \"0xzz\"}\n",
        b"{\"cmd\": \"mappings\", \"domain\": 99999999999}\n",
        b"[1, 2, 3]\n",
        b"\n",
    ] {
        c.send_raw(bad).unwrap();
        let reply = c.read_reply().expect("a reply");
        assert_eq!(
            reply["ok"],
            false,
            "{:?}: {reply}",
            String::from_utf8_lossy(bad)
        );
    }
    assert_eq!(c.request(json!({"cmd": "stats"}))["ok"], true);
    // One byte more: an error line, then the connection closes.
    let mut long = json!({"cmd": "stats"}).to_string();
    long.extend(std::iter::repeat_n(' ', 4097 - long.len()));
    long.push('\n');
    c.send_raw(long.as_bytes()).unwrap();
    let reply = c.read_reply().expect("an error line");
    assert_eq!(reply["ok"], false, "{reply}");
    assert!(
        reply["error"]
            .as_str()
            .unwrap()
            .contains("longer than 4096"),
        "{reply}"
    );
    assert!(c.read_reply().is_none(), "then the connection closes");
    // A client that streams 16 MiB without a newline is cut off after 4 KiB; the writer sees
    // the connection close instead of blocking (far more than a socket buffer holds).
    let stream = UnixStream::connect(&d.control).unwrap();
    stream
        .set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let flood = thread::spawn(move || {
        let chunk = [b'x'; 4096];
        for _ in 0..4096 {
            if writer.write_all(&chunk).is_err() {
                return true;
            }
        }
        false
    });
    let mut reply = String::new();
    let mut reader = std::io::BufReader::new(stream);
    let _ = std::io::BufRead::read_line(&mut reader, &mut reply);
    assert!(reply.contains("longer than 4096"), "{reply:?}");
    assert!(
        flood.join().unwrap(),
        "the daemon kept reading a 16 MiB line"
    );
    let stats = d.stats();
    assert_eq!(stats["control"]["errors"], 7 + 2, "{stats}");
}

/// Control timeouts short enough for a test: a reply not taken within 1 s, a request line not
/// complete within 2 s of the connection or the previous reply.
const CONTROL_TIMEOUTS: &[&str] = &[
    "--control-write-timeout",
    "1",
    "--control-idle-timeout",
    "2",
];

/// A control connection that sends `requests` at once and never reads a reply.
fn deaf_control_client(d: &Daemon, requests: &[Value]) -> UnixStream {
    let stream = UnixStream::connect(&d.control).unwrap();
    stream
        .set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let lines: String = requests.iter().map(|r| format!("{r}\n")).collect();
    (&stream).write_all(lines.as_bytes()).unwrap();
    stream
}

/// Waits until a new control client is served (10 s at most); returns it and how many tries
/// were refused on the way.
fn served_control_client(d: &Daemon, what: &str) -> (ControlClient, u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut refused = 0;
    loop {
        if let Some(c) = try_control_client(d) {
            return (c, refused);
        }
        refused += 1;
        assert!(Instant::now() < deadline, "{what}: no slot came back");
        thread::sleep(Duration::from_millis(20));
    }
}

/// Reads what the daemon wrote until it closes the connection (10 s at most).
fn read_until_closed(stream: &UnixStream) -> Vec<u8> {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut bytes = Vec::new();
    match (&*stream).read_to_end(&mut bytes) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("the daemon did not close the connection: {e}"),
    }
    bytes
}

#[test]
fn control_clients_that_never_read_their_replies_are_cut_off() {
    let d = Daemon::start(CONTROL_TIMEOUTS);
    // 512 mappings: a `mappings` reply of about 60 KiB.
    let mut dev = d.connect();
    assert_eq!(status_of(&mut dev, &attach(1, EP)), Status::Ok);
    for chunk in (0..512u64).collect::<Vec<_>>().chunks(64) {
        let maps: Vec<_> = chunk
            .iter()
            .map(|&i| map(1, i * PAGE, i * PAGE + PAGE - 1, 0x10_0000 + i * PAGE))
            .collect();
        assert!(batch_statuses(&mut dev, &maps)
            .iter()
            .all(|s| *s == Status::Ok));
    }
    // 16 clients, every slot, each asking for far more than a socket buffer holds (big
    // `mappings` and `groups` replies, many small `stats` ones) and reading none of it.
    let deaf: Vec<UnixStream> = (0..16)
        .map(|i| {
            let request = match i % 3 {
                0 => json!({"cmd": "mappings", "domain": 1}),
                1 => json!({"cmd": "groups", "all": true}),
                _ => json!({"cmd": "stats"}),
            };
            let count = if i % 3 == 2 { 2000 } else { 100 };
            deaf_control_client(&d, &vec![request; count])
        })
        .collect();
    // Each is cut off once a reply waits longer than the write timeout: the slots come back
    // and the clients see the connection closed, after the replies that fitted.
    let (mut client, _) = served_control_client(&d, "16 clients that never read");
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.request(json!({"cmd": "stats"}))["stats"]["control"]["write_timeouts"] != 16 {
        assert!(
            Instant::now() < deadline,
            "not every deaf client was cut off"
        );
        thread::sleep(Duration::from_millis(20));
    }
    for (i, stream) in deaf.iter().enumerate() {
        assert!(
            !read_until_closed(stream).is_empty(),
            "client {i}: no reply came before the cut-off"
        );
    }
    let stats = client.request(json!({"cmd": "stats"}));
    let control = &stats["stats"]["control"];
    assert_eq!(control["write_timeouts"], 16, "{stats}");
    assert_eq!(control["idle_timeouts"], 0, "{stats}");
    assert_eq!(control["clients"], 1, "{stats}");
    drop(client);
    // Every slot is free again, and the model served throughout.
    d.wait_for("16 free slots", || {
        let clients: Vec<_> = (0..16).map_while(|_| try_control_client(&d)).collect();
        clients.len() == 16
    });
    assert_eq!(status_of(&mut dev, &detach(1, EP)), Status::Ok);
}

#[test]
fn control_clients_that_send_no_whole_line_are_cut_off_and_busy_ones_kept() {
    let d = Daemon::start(CONTROL_TIMEOUTS);
    // One busy client: a request every 200 ms for 4 s, twice the idle timeout.
    let mut busy = d.control_client();
    assert_eq!(busy.request(json!({"cmd": "stats"}))["ok"], true);
    // 15 idle ones: 8 silent, 7 trickling a byte every 200 ms and never a newline.
    let silent: Vec<UnixStream> = (0..8)
        .map(|_| UnixStream::connect(&d.control).unwrap())
        .collect();
    let trickling: Vec<UnixStream> = (0..7)
        .map(|_| UnixStream::connect(&d.control).unwrap())
        .collect();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(4) {
        assert_eq!(
            busy.request(json!({"cmd": "stats"}))["ok"],
            true,
            "the busy client is served after {:?}",
            start.elapsed()
        );
        for t in &trickling {
            let _ = (&*t).write_all(b" ");
        }
        thread::sleep(Duration::from_millis(200));
    }
    // The idle ones were told why and disconnected; their slots came back.
    for stream in silent.iter().chain(&trickling) {
        let said = String::from_utf8(read_until_closed(stream)).unwrap();
        let reply: Value = serde_json::from_str(&said).unwrap_or_else(|e| panic!("{said:?}: {e}"));
        assert_eq!(reply["ok"], false, "{reply}");
        assert!(reply["error"].as_str().unwrap().contains("idle"), "{reply}");
    }
    let stats = busy.request(json!({"cmd": "stats"}));
    let control = &stats["stats"]["control"];
    assert_eq!(control["idle_timeouts"], 15, "{stats}");
    assert_eq!(control["write_timeouts"], 0, "{stats}");
    assert_eq!(control["clients"], 1, "{stats}");
    let held: Vec<_> = (0..15).map_while(|_| try_control_client(&d)).collect();
    assert_eq!(held.len(), 15, "every slot came back");
}

// ---- 2. faulty frontends -----------------------------------------------------------------------

/// One step of the VMM's set-up, as QEMU sends them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    GetFeatures,
    ProtocolFeatures,
    SetOwner,
    SetFeatures,
    SetMemTable,
    VringNum(usize),
    VringBase(usize),
    VringAddr(usize),
    VringKick(usize),
    VringCall(usize),
    VringEnable(usize),
    /// One ATTACH posted and kicked, not waited for.
    Request,
    /// An ATTACH and 100 MAPs posted and kicked, not waited for.
    Requests,
}

const HANDSHAKE: &[Step] = &[
    Step::GetFeatures,
    Step::ProtocolFeatures,
    Step::SetOwner,
    Step::SetFeatures,
    Step::SetMemTable,
    Step::VringNum(0),
    Step::VringBase(0),
    Step::VringAddr(0),
    Step::VringKick(0),
    Step::VringCall(0),
    Step::VringEnable(0),
    Step::VringNum(1),
    Step::VringBase(1),
    Step::VringAddr(1),
    Step::VringKick(1),
    Step::VringCall(1),
    Step::VringEnable(1),
    Step::Request,
    Step::Requests,
];
/// Steps of HANDSHAKE that set the device up; requests follow.
const SET_UP: usize = 17;

/// The steps of HANDSHAKE from `first` to `last`, both included.
fn steps(first: Step, last: Step) -> &'static [Step] {
    let at = |s| HANDSHAKE.iter().position(|x| *x == s).unwrap();
    &HANDSHAKE[at(first)..=at(last)]
}

/// A frontend driven one message at a time: the raw `Connection`, guest memory, both rings.
struct RawFrontend {
    conn: Connection,
    mem: GuestRam,
    queues: Vec<Virtqueue>,
    offered: u64,
    /// Queue sizes sent by SET_VRING_NUM (default: the rings' own).
    sizes: [u16; 2],
    /// Features SET_FEATURES acknowledges; 0: what a Linux guest would.
    acked: u64,
}

impl RawFrontend {
    fn connect(d: &Daemon) -> RawFrontend {
        let mem = GuestRam::with_size(16 << 20).unwrap();
        let conn =
            Connection::connect(&d.socket, Duration::from_secs(5), Duration::from_secs(5), 2)
                .expect("connect");
        let queues = vec![
            Virtqueue::new(&mem, 0, 256, 128).unwrap(),
            Virtqueue::new(&mem, 1, 64, 24).unwrap(),
        ];
        RawFrontend {
            conn,
            mem,
            queues,
            offered: 0,
            sizes: [256, 64],
            acked: 0,
        }
    }

    fn ring_config(&self, q: usize) -> VringConfigData {
        let vq = &self.queues[q];
        VringConfigData {
            queue_max_size: vq.size(),
            queue_size: vq.size(),
            flags: 0,
            desc_table_addr: self.mem.host_address(vq.desc_table_addr()).unwrap(),
            used_ring_addr: self.mem.host_address(vq.used_addr()).unwrap(),
            avail_ring_addr: self.mem.host_address(vq.avail_addr()).unwrap(),
            log_addr: None,
        }
    }

    fn step(&mut self, step: Step) -> Result<(), KitError> {
        match step {
            Step::GetFeatures => self.offered = self.conn.get_features()?,
            Step::ProtocolFeatures => {
                self.conn.negotiate_protocol_features(
                    VhostUserProtocolFeatures::CONFIG
                        | VhostUserProtocolFeatures::MQ
                        | VhostUserProtocolFeatures::REPLY_ACK
                        | VhostUserProtocolFeatures::RESET_DEVICE,
                )?;
                self.conn.set_need_reply(true);
            }
            Step::SetOwner => self.conn.set_owner()?,
            Step::SetFeatures => {
                let acked = if self.acked != 0 {
                    self.acked
                } else {
                    Options::default().features_to_ack(self.offered)
                };
                self.conn.set_features(acked)?;
                let event_idx = acked & EVENT_IDX != 0;
                for q in &mut self.queues {
                    q.set_event_idx(event_idx)?;
                }
            }
            Step::SetMemTable => self.conn.set_mem_table(&self.mem)?,
            Step::VringNum(q) => {
                let size = self.sizes[q];
                self.conn
                    .call("SET_VRING_NUM", |f| f.set_vring_num(q, size))?
            }
            Step::VringBase(q) => self
                .conn
                .call("SET_VRING_BASE", |f| f.set_vring_base(q, 0))?,
            Step::VringAddr(q) => {
                let config = self.ring_config(q);
                self.conn
                    .call("SET_VRING_ADDR", |f| f.set_vring_addr(q, &config))?
            }
            Step::VringKick(q) => {
                let fd = self.queues[q].kick_fd().try_clone()?;
                self.conn
                    .call("SET_VRING_KICK", |f| f.set_vring_kick(q, &fd))?
            }
            Step::VringCall(q) => {
                let fd = self.queues[q].call_fd().try_clone()?;
                self.conn
                    .call("SET_VRING_CALL", |f| f.set_vring_call(q, &fd))?
            }
            Step::VringEnable(q) => self.conn.enable_queue(q as u16, true)?,
            Step::Request => {
                self.queues[0].post(&attach(1, EP).encode(), 4)?;
                self.queues[0].kick()?;
            }
            Step::Requests => {
                let q = &mut self.queues[0];
                q.post(&attach(1, EP).encode(), 4)?;
                for i in 0..100u64 {
                    q.post(&map(1, i * PAGE, i * PAGE + PAGE - 1, 0).encode(), 4)?;
                }
                q.kick()?;
            }
        }
        Ok(())
    }

    fn run(&mut self, steps: &[Step]) {
        for &step in steps {
            self.step(step)
                .unwrap_or_else(|e| panic!("{step:?} failed: {e}"));
        }
    }

    /// Posts one ATTACH, kicks, and waits up to `timeout` for its completion.
    fn request(&mut self, timeout: Duration) -> Result<Completion, KitError> {
        let q = &mut self.queues[0];
        q.post(&attach(1, EP).encode(), 4)?;
        q.kick()?;
        q.wait(WaitMode::Poll, timeout)
    }
}

#[test]
fn disconnect_at_every_stage_of_the_handshake() {
    let mut d = Daemon::start(&[]);
    assert_eq!(HANDSHAKE[SET_UP], Step::Request);
    for k in 0..=HANDSHAKE.len() {
        let after = match k {
            0 => "connect".to_string(),
            _ => format!("{:?}", HANDSHAKE[k - 1]),
        };
        let mut f = RawFrontend::connect(&d);
        f.run(&HANDSHAKE[..k]);
        if k == SET_UP {
            // The handshake is complete: the device works before we walk away.
            let c = f.request(Duration::from_secs(5)).unwrap();
            assert_eq!(status(&c), Status::Ok);
        }
        drop(f);
        assert_serves(&mut d, &format!("a disconnect after {after}"));
        if k <= SET_UP {
            // (With requests still in flight, see the ignored test below.)
            assert_fresh(&d, &after);
        }
    }
    let stats = d.stats();
    assert_eq!(
        n(&stats["connections"]),
        2 * (HANDSHAKE.len() as u64 + 1),
        "{stats}"
    );
}

/// Posts an ATTACH and `maps` MAPs on a 1024-entry ring, kicks, and disconnects without waiting
/// (after `linger`).
fn disconnect_with_requests_in_flight(d: &Daemon, maps: u64, linger: Duration) {
    let mut dev = d.connect_with(Options {
        queue_size: 1024,
        ..quick()
    });
    let mut requests = vec![attach(1, EP).encode()];
    requests.extend((0..maps).map(|i| map(1, i * PAGE, i * PAGE + PAGE - 1, 0).encode()));
    let q = dev.requestq();
    for r in &requests {
        q.post_chain(&Chain::request(r, 4)).unwrap();
    }
    q.kick().unwrap();
    if !linger.is_zero() {
        thread::sleep(linger);
    }
}

#[test]
fn disconnect_with_requests_in_flight_the_next_frontend_is_served() {
    let mut d = Daemon::start(&[]);
    for round in 0..20u64 {
        let linger = Duration::from_micros(round % 4 * 150);
        disconnect_with_requests_in_flight(&d, 500, linger);
        assert_serves(&mut d, &format!("round {round}"));
    }
}

#[test]
fn disconnect_with_requests_in_flight_leaves_nothing_to_the_next_frontend() {
    let mut d = Daemon::start(&[]);
    for round in 0..100u64 {
        let linger = Duration::from_micros(round % 4 * 150);
        disconnect_with_requests_in_flight(&d, 500, linger);
        // Connecting waits for the old connection to be torn down (its worker joined).
        let dev = Driver::connect(&d.socket, quick()).expect("next frontend");
        assert_fresh(&d, &format!("round {round}"));
        drop(dev);
    }
    assert!(d.alive());
}

/// One connection of four kinds: clean, abandoned with requests in flight, abandoned in the
/// middle of the handshake, reset then used.
fn cycle(d: &mut Daemon, i: u64) {
    match i % 4 {
        0 => assert_serves(d, "a clean cycle"),
        1 => disconnect_with_requests_in_flight(d, 100, Duration::ZERO),
        2 => {
            let mut f = RawFrontend::connect(d);
            f.run(steps(Step::GetFeatures, Step::VringBase(0)));
        }
        _ => {
            let mut dev = d.connect_with(quick());
            dev.reset().unwrap();
            assert_eq!(status_of(&mut dev, &attach(2, EP)), Status::Ok);
        }
    }
}

#[test]
fn reconnect_cycles_leak_no_threads_or_mappings() {
    let mut d = Daemon::start(&[]);
    for i in 0..12 {
        cycle(&mut d, i);
    }
    assert_serves(&mut d, "warm-up");
    let (vm, rss) = (d.proc_status("VmSize"), d.rss_kib());
    for i in 0..40 {
        cycle(&mut d, i);
    }
    // assert_serves checks that exactly one vring worker runs.
    assert_serves(&mut d, "40 cycles");
    let (vm_now, rss_now) = (d.proc_status("VmSize"), d.rss_kib());
    assert!(
        vm_now.saturating_sub(vm) < 256 << 10,
        "address space grew from {vm} KiB to {vm_now} KiB over 40 connections of 64 MiB each"
    );
    assert!(
        rss_now.saturating_sub(rss) < 16 << 10,
        "RSS grew from {rss} KiB to {rss_now} KiB over 40 connections"
    );
}

/// The daemon's descriptor count once the last connection's teardown (which runs after the
/// frontend sees its socket close) is over: the same for 10 reads 20 ms apart.
fn settled_fd_count(d: &Daemon) -> usize {
    let deadline = Instant::now() + Duration::from_secs(10);
    let (mut last, mut same) = (d.fd_count(), 0);
    while same < 10 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
        let now = d.fd_count();
        same = if now == last { same + 1 } else { 0 };
        last = now;
    }
    last
}

#[test]
fn reconnect_cycles_leak_no_file_descriptors() {
    let mut d = Daemon::start(&[]);
    for i in 0..12 {
        cycle(&mut d, i);
    }
    assert_serves(&mut d, "warm-up");
    let fds = settled_fd_count(&d);
    for i in 0..40 {
        cycle(&mut d, i);
    }
    assert_serves(&mut d, "40 cycles");
    assert_eq!(
        settled_fd_count(&d),
        fds,
        "file descriptors leaked over 40 connections"
    );
    // The consequence: with 64 descriptors, a hundred reconnects.
    d.limit_open_files(64);
    for i in 0..100 {
        assert_serves(&mut d, &format!("reconnect {i} with 64 file descriptors"));
    }
}

/// Posts `k` MAP/UNMAP pairs and kicks; returns how many chains are in flight.
fn post_map_unmap(dev: &mut Driver, k: u64) -> usize {
    let q = dev.requestq();
    for i in 0..k {
        let (s, e) = (i * PAGE, i * PAGE + PAGE - 1);
        q.post(&map(1, s, e, s).encode(), 4).unwrap();
        q.post(&unmap(1, s, e).encode(), 4).unwrap();
    }
    q.kick().unwrap();
    2 * k as usize
}

#[test]
fn memory_table_replaced_with_the_same_layout_while_requests_are_in_flight() {
    let d = Daemon::start(&[]);
    let mut dev = d.connect_with(quick());
    assert_eq!(status_of(&mut dev, &attach(1, EP)), Status::Ok);
    let mem = dev.memory().clone();
    for round in 0..20 {
        let posted = post_map_unmap(&mut dev, 32);
        dev.connection().set_mem_table(&mem).unwrap();
        let mut done = Vec::new();
        dev.requestq()
            .wait_n(posted, WaitMode::Poll, Duration::from_secs(5), &mut done)
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert!(
            done.iter().all(|c| status(c) == Status::Ok),
            "round {round}"
        );
    }
    let stats = d.stats();
    assert_eq!(stats["requests"]["map"]["ok"], 20 * 32, "{stats}");
    assert_eq!(stats["mappings"], 0);
}

/// Memory tables describing the same memfd differently.
fn other_layouts(mem: &GuestRam) -> Vec<(&'static str, Vec<VhostUserMemoryRegionInfo>)> {
    let region = mem.vhost_regions().unwrap()[0];
    let half = region.memory_size / 2;
    let split = vec![
        VhostUserMemoryRegionInfo {
            memory_size: half,
            ..region
        },
        VhostUserMemoryRegionInfo {
            guest_phys_addr: region.guest_phys_addr + half,
            memory_size: half,
            userspace_addr: region.userspace_addr + half,
            mmap_offset: region.mmap_offset + half,
            ..region
        },
    ];
    vec![
        ("split in two regions", split),
        (
            "moved to 4 GiB",
            vec![VhostUserMemoryRegionInfo {
                guest_phys_addr: 4 << 30,
                ..region
            }],
        ),
        (
            "shrunk to 16 KiB",
            vec![VhostUserMemoryRegionInfo {
                memory_size: 16 << 10,
                ..region
            }],
        ),
        (
            "shrunk to 256 KiB",
            vec![VhostUserMemoryRegionInfo {
                memory_size: 256 << 10,
                ..region
            }],
        ),
    ]
}

#[test]
fn memory_table_replaced_with_another_layout_while_requests_are_in_flight() {
    let mut d = Daemon::start(&[]);
    for which in 0..4 {
        let mut dev = d.connect_with(Options {
            timeout: Duration::from_secs(1),
            ..quick()
        });
        assert_eq!(status_of(&mut dev, &attach(1, EP)), Status::Ok);
        let (name, regions) = other_layouts(dev.memory()).swap_remove(which);
        let posted = post_map_unmap(&mut dev, 16);
        let table = dev
            .connection()
            .call("SET_MEM_TABLE", |f| f.set_mem_table(&regions));
        // Requests complete (same bytes at the same addresses), come back unanswered (buffers
        // outside the new memory), or never come back (rings outside it): never a hang beyond
        // the timeout, never a crash.
        let mut done = Vec::new();
        let waited =
            dev.requestq()
                .wait_n(posted, WaitMode::Poll, Duration::from_secs(1), &mut done);
        for c in &done {
            assert!(
                c.used_len == 0 || status(c) == Status::Ok,
                "{name}: used {}",
                c.used_len
            );
        }
        if name == "split in two regions" {
            assert!(
                table.is_ok() && waited.is_ok(),
                "{name}: {table:?} {waited:?}"
            );
            assert_eq!(status_of(&mut dev, &map(1, 0, PAGE - 1, 0)), Status::Ok);
        }
        drop(dev);
        assert_serves(&mut d, &format!("a memory table {name}"));
    }
}

#[test]
fn memory_table_swapped_for_fresh_memory_under_a_started_ring() {
    let mut d = Daemon::start(&[]);
    let mut dev = d.connect_with(quick());
    assert_eq!(status_of(&mut dev, &attach(1, EP)), Status::Ok);
    let fresh = GuestRam::with_size(64 << 20).unwrap();
    dev.connection().set_mem_table(&fresh).unwrap();
    dev.requestq().kick().unwrap();
    thread::sleep(Duration::from_millis(200));
    drop(dev);
    assert_serves(&mut d, "a memory table swapped for zeroed memory");
}

#[test]
fn ring_addresses_outside_guest_memory() {
    let mut d = Daemon::start(&[]);
    // VMM addresses outside every region: refused.
    let mut f = RawFrontend::connect(&d);
    f.run(steps(Step::GetFeatures, Step::VringBase(0)));
    let mut config = f.ring_config(0);
    config.desc_table_addr += 1 << 40;
    let refused = f
        .conn
        .call("SET_VRING_ADDR", |fe| fe.set_vring_addr(0, &config));
    assert!(refused.is_err(), "rings outside memory were accepted");
    let _ = f.queues[0].kick();
    drop(f);
    assert_serves(&mut d, "SET_VRING_ADDR outside memory");

    // Rings that start inside memory and run past its end: every access is checked.
    let mem_end = 16u64 << 20;
    for (name, desc, avail, used) in [
        ("descriptor table", mem_end - 16, 0x1000, 0x2000),
        ("used ring", 0x1000, 0x2000, mem_end - 8),
    ] {
        ring_running_past_the_end_of_memory(&mut d, name, desc, avail, used);
    }
}

#[test]
fn available_ring_running_past_the_end_of_memory() {
    let mut d = Daemon::start(&[]);
    let mem_end = 16u64 << 20;
    ring_running_past_the_end_of_memory(&mut d, "available ring", 0x1000, mem_end - 4, 0x2000);
}

/// Starts queue 0 with rings at these guest addresses (whose VMM addresses are valid), posts a
/// chain in descriptor 0, moves the avail index and kicks.
fn ring_running_past_the_end_of_memory(
    d: &mut Daemon,
    name: &str,
    desc: u64,
    avail: u64,
    used: u64,
) {
    {
        let mut f = RawFrontend::connect(d);
        f.run(steps(Step::GetFeatures, Step::VringBase(0)));
        let host = |gpa: u64| f.mem.host_address(gpa).unwrap();
        let config = VringConfigData {
            queue_max_size: 256,
            queue_size: 256,
            flags: 0,
            desc_table_addr: host(desc),
            used_ring_addr: host(used),
            avail_ring_addr: host(avail),
            log_addr: None,
        };
        let accepted = f
            .conn
            .call("SET_VRING_ADDR", |fe| fe.set_vring_addr(0, &config));
        if accepted.is_ok() {
            for step in steps(Step::VringKick(0), Step::VringEnable(0)) {
                let _ = f.step(*step);
            }
            // A request in the table's first slot, and the avail index moved past it.
            let _ = f.mem.write(desc, &RawDesc::readable(0x8000, 24).encode(0));
            let _ = f.mem.store_u16(avail + 2, 1, Ordering::Release);
            for _ in 0..3 {
                let _ = f.queues[0].kick();
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
    assert_serves(d, &format!("a {name} running past the end of memory"));
}

#[test]
fn kicks_before_the_queue_is_ready_are_harmless() {
    let mut d = Daemon::start(&[]);
    // With PROTOCOL_FEATURES: rings start disabled; kick at every step of the ring set-up.
    let mut f = RawFrontend::connect(&d);
    f.run(steps(Step::GetFeatures, Step::SetMemTable));
    f.queues[0].kick().unwrap();
    for &step in steps(Step::VringNum(0), Step::VringEnable(0)) {
        f.step(step).unwrap();
        f.queues[0].kick().unwrap();
    }
    let c = f.request(Duration::from_secs(5)).expect("the queue works");
    assert_eq!(status(&c), Status::Ok);
    drop(f);
    assert_serves(&mut d, "kicks before the ring was ready");

    // Without PROTOCOL_FEATURES the rings are enabled by SET_FEATURES: a kick between
    // SET_VRING_KICK and SET_VRING_ADDR finds a queue with no address at all.
    let mut f = RawFrontend::connect(&d);
    f.step(Step::GetFeatures).unwrap();
    f.acked = Options::default().features_to_ack(f.offered) & !PROTOCOL_FEATURES;
    for step in [
        Step::SetOwner,
        Step::SetFeatures,
        Step::SetMemTable,
        Step::VringNum(0),
        Step::VringKick(0),
    ] {
        f.step(step).unwrap();
        f.queues[0].kick().unwrap();
    }
    for step in [Step::VringCall(0), Step::VringBase(0), Step::VringAddr(0)] {
        f.step(step).unwrap();
        f.queues[0].kick().unwrap();
    }
    // Without REPLY_ACK nothing says SET_VRING_ADDR was applied before the next kick; a request
    // with a reply does (the backend handles messages in order).
    f.step(Step::GetFeatures).unwrap();
    let c = f.request(Duration::from_secs(5)).expect("the queue works");
    assert_eq!(status(&c), Status::Ok);
    drop(f);
    assert_serves(&mut d, "kicks before SET_VRING_ADDR");
}

#[test]
fn kick_before_vring_addr_with_data_at_guest_address_zero() {
    let mut d = Daemon::start(&[]);
    let mut f = RawFrontend::connect(&d);
    f.mem.write(0, &[0x53, 0xff, 0x00, 0xf0]).unwrap();
    f.step(Step::GetFeatures).unwrap();
    f.acked = Options::default().features_to_ack(f.offered) & !PROTOCOL_FEATURES;
    for step in [
        Step::SetOwner,
        Step::SetFeatures,
        Step::SetMemTable,
        Step::VringNum(0),
        Step::VringKick(0),
    ] {
        f.step(step).unwrap();
    }
    f.queues[0].kick().unwrap();
    thread::sleep(Duration::from_millis(200));
    drop(f);
    assert_serves(&mut d, "a kick before SET_VRING_ADDR");
}

#[test]
fn get_vring_base_while_requests_are_posted() {
    let mut d = Daemon::start(&["--poll-us", "0"]);
    let mut dev = d.connect_with(quick());
    let mut requests = vec![attach(1, EP).encode()];
    requests.extend((0..99u64).map(|i| map(1, i * PAGE, i * PAGE + PAGE - 1, 0).encode()));
    for r in &requests {
        dev.requestq().post(r, 4).unwrap();
    }
    dev.requestq().kick().unwrap();
    let bases = dev.stop().expect("GET_VRING_BASE answers");
    assert!(bases[0] <= 100, "base {} beyond what was posted", bases[0]);
    // Stopped: the guest keeps posting (its kicks go nowhere), then the VMM resumes.
    thread::sleep(Duration::from_millis(100));
    // Fresh IOVAs: the stop may have come before or after any of the first requests.
    let late = [
        attach(1, EP).encode(),
        map(1, 200 * PAGE, 201 * PAGE - 1, 0).encode(),
    ];
    for r in &late {
        dev.requestq().post(r, 4).unwrap();
    }
    dev.requestq().kick().unwrap();
    dev.resume(bases).expect("the queues restart");
    dev.requestq().kick().unwrap();
    let outstanding = dev.requestq().in_flight();
    let mut done = Vec::new();
    dev.requestq()
        .wait_n(
            outstanding,
            WaitMode::Poll,
            Duration::from_secs(5),
            &mut done,
        )
        .expect("every request completes once the queue runs again");
    // A stop only stops: every request, before and after it, finds domain 1.
    for c in &done {
        assert_eq!(status(c), Status::Ok, "{c:?}");
    }
    assert_eq!(dev.requestq().in_flight(), 0);
    assert_eq!(
        status_of(&mut dev, &map(1, 300 * PAGE, 301 * PAGE - 1, 0)),
        Status::Ok
    );

    // GET_VRING_BASE with requests posted, then the frontend goes away (a VM shutting down).
    for r in &requests {
        dev.requestq().post(r, 4).unwrap();
    }
    dev.requestq().kick().unwrap();
    dev.stop().expect("GET_VRING_BASE answers");
    thread::sleep(Duration::from_millis(100));
    for r in &late {
        dev.requestq().post(r, 4).unwrap();
    }
    drop(dev);
    assert_serves(&mut d, "GET_VRING_BASE with requests posted");
}

#[test]
fn get_vring_base_while_the_worker_polls() {
    let mut d = Daemon::start(&["--poll-us", "2000000", "--poll-mode", "fixed"]);
    let mut dev = d.connect_with(quick());
    assert_eq!(status_of(&mut dev, &attach(1, EP)), Status::Ok);
    dev.connection()
        .stop_queue(0)
        .expect("GET_VRING_BASE answers");
    dev.requestq().post(&attach(2, EP).encode(), 4).unwrap();
    thread::sleep(Duration::from_millis(200));
    drop(dev);
    assert_serves(&mut d, "GET_VRING_BASE while the worker polled");
}

#[test]
fn avail_index_running_ahead_of_the_ring() {
    let mut d = Daemon::start(&[]);
    let mut dev = d.connect_with(quick());
    assert_eq!(status_of(&mut dev, &attach(1, EP)), Status::Ok);
    let q = dev.requestq();
    let bogus = q.avail_idx().wrapping_add(q.size() + 1);
    let at = q.avail_addr() + 2;
    q.memory().store_u16(at, bogus, Ordering::Release).unwrap();
    q.kick().unwrap();
    thread::sleep(Duration::from_millis(200));
    drop(dev);
    assert_serves(&mut d, "an avail index past the ring");
}

#[test]
fn queue_sizes_the_device_cannot_use() {
    let mut d = Daemon::start(&["--queue-size", "256"]);
    for size in [100u16, 255, 512, 0, 1, 32768] {
        let mut f = RawFrontend::connect(&d);
        f.sizes[0] = size;
        f.run(steps(Step::GetFeatures, Step::SetMemTable));
        let num = f.step(Step::VringNum(0));
        if size == 0 || size > 256 {
            assert!(num.is_err(), "SET_VRING_NUM {size} accepted (max 256)");
        }
        if num.is_ok() {
            let rest = steps(Step::VringBase(0), Step::VringEnable(0))
                .iter()
                .try_for_each(|s| f.step(*s));
            if rest.is_ok() {
                // Whatever ring the device uses, the request completes or times out.
                let _ = f.request(Duration::from_millis(500));
            }
        }
        drop(f);
        assert_serves(&mut d, &format!("SET_VRING_NUM {size}"));
    }
}

/// A vhost-user message header: request, flags (version 1), payload size.
fn header(request: u32, flags: u32, size: u32) -> Vec<u8> {
    [request, flags, size]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect()
}

/// xorshift64: reproducible garbage.
fn garbage(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn garbage_on_the_vhost_user_socket() {
    let mut d = Daemon::start(&[]);
    let get_features = header(1, 1, 0);
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("random bytes", garbage(1, 4096)),
        ("more random bytes", garbage(0xdead_beef, 100)),
        ("a truncated header", get_features[..5].to_vec()),
        ("a bad version", header(1, 0x7, 0)),
        ("an unknown request", header(0xdead, 1, 0)),
        ("request 0", header(0, 1, 0)),
        ("a huge payload size", header(1, 1, 0xffff_ffff)),
        ("a payload shorter than announced", {
            let mut m = header(2, 1, 8); // SET_FEATURES
            m.extend([1, 2, 3]);
            m
        }),
        ("SET_MEM_TABLE without fds", {
            let mut m = header(5, 1, 8 + 32);
            m.extend(u32::MAX.to_le_bytes());
            m.extend([0u8; 36]);
            m
        }),
        ("SET_VRING_NUM of queue 200", {
            let mut m = header(8, 1, 8);
            m.extend(200u32.to_le_bytes());
            m.extend(16u32.to_le_bytes());
            m
        }),
        ("a reply flag from the frontend", header(1, 1 | 0x4, 0)),
    ];
    // A valid request followed by garbage.
    let mut mixed = get_features.clone();
    mixed.extend(garbage(7, 64));
    cases.push(("garbage after a valid request", mixed));
    for (name, bytes) in cases {
        let mut s = UnixStream::connect(&d.socket).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(&bytes);
        // The daemon answers, closes, or waits for more: all fine, as long as it lives.
        let mut sink = [0u8; 256];
        let _ = s.read(&mut sink);
        drop(s);
        assert_serves(&mut d, &format!("{name} on the socket"));
    }
}

#[test]
fn a_frontend_that_never_acks_features_but_kicks() {
    let mut d = Daemon::start(&[]);
    let mut f = RawFrontend::connect(&d);
    f.run(&[Step::GetFeatures, Step::SetOwner, Step::SetMemTable]);
    for step in steps(Step::VringNum(0), Step::VringCall(0)) {
        f.step(*step).unwrap();
    }
    // The ring was never enabled (no SET_FEATURES, and SET_VRING_ENABLE needs
    // PROTOCOL_FEATURES): the request must not be processed.
    let waited = f.request(Duration::from_millis(500));
    assert!(
        matches!(waited, Err(KitError::WaitTimeout { .. })),
        "{waited:?}"
    );
    for _ in 0..10 {
        f.queues[0].kick().unwrap();
    }
    drop(f);
    assert_serves(&mut d, "kicks without SET_FEATURES");
    assert_eq!(
        d.stats()["requests"]["attach"]["ok"],
        1,
        "only assert_serves'"
    );
}

#[test]
fn a_memory_region_larger_than_its_file() {
    let mut d = Daemon::start(&[]);
    let mem = GuestRam::new(&[MemoryRegion::new(0, 1 << 20)]).unwrap();
    let mut conn =
        Connection::connect(&d.socket, Duration::from_secs(5), Duration::from_secs(5), 2).unwrap();
    let mut q = Virtqueue::new(&mem, 0, 16, 64).unwrap();
    let offered = conn.get_features().unwrap();
    conn.set_owner().unwrap();
    // Without PROTOCOL_FEATURES the rings run as soon as they are set up.
    conn.set_features(Options::default().features_to_ack(offered) & !PROTOCOL_FEATURES)
        .unwrap();
    q.set_event_idx(true).unwrap();
    let mut regions = mem.vhost_regions().unwrap();
    regions[0].memory_size = 64 << 20;
    let table = conn.call("SET_MEM_TABLE", |f| f.set_mem_table(&regions));
    // Without REPLY_ACK a refused table shows only as the daemon ending the connection, which
    // the next message may or may not find yet: both outcomes are fine, a SIGBUS is not.
    if table.is_ok() && conn.start_queue(&q, 0).is_ok() {
        let buf = mem.alloc(64, 16).unwrap();
        q.post_raw(&[
            RawDesc::readable(32 << 20, 24).then(1),
            RawDesc::writable(buf.addr, 4),
        ])
        .unwrap();
        q.kick().unwrap();
        thread::sleep(Duration::from_millis(200));
    }
    drop(q);
    drop(conn);
    assert!(
        d.alive(),
        "the daemon died: {:?} (signal 7 is SIGBUS)",
        d.exit_status()
    );
    assert_serves(&mut d, "a region larger than its file");
}

// ---- 4. clean shutdown ---------------------------------------------------------------------------

/// The accounting line the daemon logs at exit: (reported, delivered, dropped, waiting).
fn fault_accounting(log: &str) -> (u64, u64, u64, u64) {
    let line = log
        .lines()
        .find_map(|l| l.split_once("fault records: ").map(|(_, rest)| rest))
        .unwrap_or_else(|| panic!("no accounting line in the log:\n{log}"));
    let numbers: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap())
        .collect();
    assert_eq!(numbers.len(), 4, "{line}");
    (numbers[0], numbers[1], numbers[2], numbers[3])
}

#[test]
fn sigterm_accounts_for_every_fault_record() {
    let mut d = Daemon::start_logged(&["--fault-backlog", "8"], "info");
    let mut dev = d.connect_with(Options {
        event_buffers: 3,
        ..quick()
    });
    use_dma_api(&d, EP);
    for i in 0..3u64 {
        assert_eq!(translate(&d, EP, i * PAGE)["fault"], "no_domain");
    }
    d.wait_stats("3 delivered", |s| s["faults"]["delivered"] == 3);
    for i in 3..20u64 {
        assert_eq!(translate(&d, EP, i * PAGE)["fault"], "no_domain");
    }
    let stats = d.wait_stats("20 reported", |s| s["faults"]["reported"] == 20);
    let f = &stats["faults"];
    assert_eq!(n(&f["dropped"]) + n(&f["backlog"]), 17, "{stats}");
    for _ in 0..3 {
        assert_eq!(dev.eventq().poll_used().unwrap().unwrap().used_len, 24);
    }
    let status = d.terminate("TERM");
    assert!(status.success(), "{status:?}");
    let (reported, delivered, dropped, waiting) = fault_accounting(&d.log());
    assert_eq!((reported, delivered, dropped), (20, 3, 17));
    assert_eq!(reported, delivered + dropped, "every record accounted for");
    // The waiting records are dropped at exit, by the signal handler or, when the frontend's
    // connection was shut down first, by the disconnect.
    assert!(
        waiting == n(&f["backlog"]) || waiting == 0,
        "{waiting} waiting at exit"
    );
    drop(dev);
}

#[test]
fn sigterm_during_a_fault_storm_loses_no_record() {
    for round in 0..40 {
        let mut d = Daemon::start_logged(&["--fault-backlog", "64"], "info");
        // The guest posts 16 event buffers and never reaps them: 16 delivered, the rest wait
        // or are dropped.
        let dev = d.connect_with(Options {
            event_buffers: 16,
            ..quick()
        });
        use_dma_api(&d, EP);
        let storms: Vec<_> = (0..2)
            .map(|k| {
                let mut c = d.control_client();
                thread::spawn(move || {
                    let mut sent = 0u64;
                    let deadline = Instant::now() + Duration::from_secs(10);
                    while Instant::now() < deadline {
                        let iova = (k * 1_000_000 + sent) * PAGE;
                        let request = json!({"cmd": "translate", "endpoint": EP, "iova": iova});
                        if c.try_request(&request).is_none() {
                            break;
                        }
                        sent += 1;
                    }
                    sent
                })
            })
            .collect();
        d.wait_stats("a storm of faults", |s| n(&s["faults"]["reported"]) > 200);
        let status = d.terminate("TERM");
        assert!(status.success(), "round {round}: {status:?}");
        let sent: u64 = storms.into_iter().map(|t| t.join().unwrap()).sum();
        let (reported, delivered, dropped, waiting) = fault_accounting(&d.log());
        assert_eq!(
            reported,
            delivered + dropped,
            "round {round}: {reported} reported, {delivered} delivered, {dropped} dropped \
             ({waiting} waiting)"
        );
        assert!(delivered <= 16, "round {round}: {delivered} delivered");
        assert!(reported <= sent + 2, "round {round}: {reported} of {sent}");
        drop(dev);
    }
}

// ---- 5. least privilege --------------------------------------------------------------------------

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Nothing but the sockets (and the log) in the daemon's directory: no staging directory left
/// (the daemon removes it just after the socket appears, so a moment is allowed).
fn assert_only_sockets(d: &Daemon) {
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    loop {
        let mut names: Vec<String> = std::fs::read_dir(d.dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n != LOG_FILE)
            .collect();
        names.sort();
        if names == ["viommu.ctl", "viommu.sock"] || std::time::Instant::now() > deadline {
            assert_eq!(names, vec!["viommu.ctl", "viommu.sock"]);
            return;
        }
        thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn both_sockets_default_to_0600() {
    let d = Daemon::start(&[]);
    assert_eq!(mode(&d.socket), 0o600);
    assert_eq!(mode(&d.control), 0o600);
    assert_only_sockets(&d);
}

#[test]
fn socket_mode_applies_to_both_sockets() {
    let d = Daemon::start(&["--socket-mode", "0640"]);
    assert_eq!(mode(&d.socket), 0o640);
    assert_eq!(mode(&d.control), 0o640);
    assert_only_sockets(&d);
    // And they work.
    assert_eq!(d.stats()["connections"], 0);
    let mut dev = d.connect_with(quick());
    assert_eq!(status_of(&mut dev, &attach(1, EP)), Status::Ok);
}
