// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The device's life over a real vhost-user socket, driven by the rust-vmm `vhost` frontend:
//! what resets the guest's state and what keeps it, and the device-state transfer that carries
//! it from one daemon to another (VHOST_USER_PROTOCOL_F_DEVICE_STATE).
//!
//! The rule: only a reset resets. RESET_DEVICE, a request queue that starts again somewhere
//! else than where it stopped (fresh rings: the driver was reset; QEMU's generic vhost-user
//! device never sends RESET_DEVICE) and a frontend's disconnect reset the device;
//! GET_VRING_BASE (every VM stop: pause, snapshot, the end of a migration) and
//! SET_VRING_ENABLE only stop queues, and the guest finds its domains and mappings when they
//! run again where they stopped.

mod common;

use std::{
    io::{Read, Write},
    os::{fd::OwnedFd, unix::net::UnixStream},
    thread,
};

use common::*;
use ownership::{
    reference::{check_translation, Reference},
    Access, Fault, Requester,
};
use serde_json::{json, Value};
use vhost::vhost_user::{
    message::{VhostTransferStateDirection, VhostTransferStatePhase, VhostUserProtocolFeatures},
    VhostUserFrontend,
};
use vhost_device_iommu::config::{Cli, DaemonConfig};
use vhost_iommu_testkit::{Driver, Options};
use virtio::{Request, Status};

const PAGE: u64 = 4096;
/// The endpoints of the daemons here: eight, two of them (0x12, 0x13) one group.
const TOPOLOGY: [&str; 6] = [
    "--endpoints",
    "0x10-0x17",
    "--group",
    "0x12,0x13",
    "--domain-range",
    "1-64",
];
const ENDPOINTS: std::ops::RangeInclusive<u32> = 0x10..=0x17;

fn options() -> Options {
    let mut o = Options::default();
    o.protocol_features |= VhostUserProtocolFeatures::DEVICE_STATE;
    o
}

fn topology(extra: &[&str]) -> ownership::Topology {
    let mut argv = vec!["vhost-device-iommu", "--socket-path", "unused"];
    argv.extend_from_slice(&TOPOLOGY);
    argv.extend_from_slice(extra);
    let cli: Cli = clap::Parser::try_parse_from(argv).unwrap();
    DaemonConfig::try_from(cli.serve.unwrap()).unwrap().topology
}

/// A daemon with the topology above, logging at `info` (read with `Daemon::log`).
fn daemon(extra: &[&str]) -> Daemon {
    let mut args: Vec<&str> = TOPOLOGY.to_vec();
    args.extend_from_slice(extra);
    Daemon::start_logged(&args, "info")
}

/// A tiny deterministic generator (splitmix64): the same load on every run.
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

/// Sends `request` to the daemon and applies it to the reference; both must give the same
/// status.
fn apply(dev: &mut Driver, r: &mut Reference, request: &Request) {
    let got = status_of(dev, request);
    let want = reference_status(r, request);
    assert_eq!(
        got as u8, want as u8,
        "{request:?}: daemon {got:?}, reference {want:?}"
    );
}

/// A mixed guest load: ATTACH/DETACH over the endpoints and six domains (one identity), now
/// and then, MAP/UNMAP of 1-4 pages in the first 2048 pages, a few 2 MiB mappings.
fn load(dev: &mut Driver, r: &mut Reference, rng: &mut Rng, requests: usize) {
    let endpoints: Vec<u32> = ENDPOINTS.collect();
    for _ in 0..requests {
        let domain = 1 + rng.below(6) as u32;
        let endpoint = endpoints[rng.below(endpoints.len() as u64) as usize];
        let page = rng.below(2048);
        let pages = 1 + rng.below(4);
        let request = match rng.below(100) {
            0..=1 => {
                if domain == 6 {
                    attach_bypass(domain, endpoint)
                } else {
                    attach(domain, endpoint)
                }
            }
            2 => detach(domain, endpoint),
            3..=69 => map(
                domain,
                page * PAGE,
                (page + pages) * PAGE - 1,
                rng.below(1 << 20) * PAGE,
            ),
            70..=74 => map(
                domain,
                (1 << 30) + rng.below(8) * (2 << 20),
                (1 << 30) + (rng.below(8) + 1) * (2 << 20) - 1,
                rng.below(64) * (2 << 20),
            ),
            _ => unmap(domain, page * PAGE, (page + pages) * PAGE - 1),
        };
        apply(dev, r, &request);
    }
}

/// The IOVAs worth asking about: every page of the first 2052, and the 2 MiB area.
fn probe_iovas() -> Vec<u64> {
    let mut iovas: Vec<u64> = (0..2052).map(|p| p * PAGE + 8).collect();
    iovas.extend((0..18).map(|k| (1 << 30) + k * (1 << 20) + 0x123));
    iovas
}

/// Every endpoint's translation of every probe IOVA, as the control socket answers it
/// (`use_dma_api` first: the host face is not part of a device state).
fn translations(d: &Daemon) -> Vec<Value> {
    let mut client = d.control_client();
    let mut out = Vec::new();
    for e in ENDPOINTS {
        let reply = client.request(json!({"cmd": "use_dma_api", "endpoint": e}));
        assert_eq!(reply["ok"], true, "{reply}");
        for iova in probe_iovas() {
            let mut reply = client.request(
                json!({"cmd": "translate", "endpoint": e, "iova": iova, "access": "write"}),
            );
            if let Some(o) = reply.as_object_mut() {
                o.remove("len");
            }
            out.push(json!({"endpoint": e, "iova": iova, "reply": reply}));
        }
        let reply = client.request(json!({"cmd": "unuse_dma_api", "endpoint": e}));
        assert_eq!(reply["ok"], true, "{reply}");
    }
    out
}

/// `translations` agree with the reference model.
fn check_against(r: &Reference, answers: &[Value]) {
    for a in answers {
        let e = a["endpoint"].as_u64().unwrap() as u32;
        let iova = a["iova"].as_u64().unwrap();
        let reply = &a["reply"];
        let got = if reply["ok"] == true {
            Ok(ownership::Translation {
                gpa: reply["gpa"].as_u64().unwrap(),
                len: 1,
                domain: reply["domain"].as_u64().map(|d| d as u32),
                mmio: reply["mmio"] == true,
            })
        } else {
            Err(match reply["fault"].as_str().unwrap() {
                "no_domain" => Fault::NoDomain,
                "unmapped" => Fault::Unmapped,
                "out_of_range" => Fault::OutOfRange,
                "permission" => Fault::Permission,
                "reserved" => Fault::Reserved,
                other => panic!("unexpected fault {other} at {a}"),
            })
        };
        // The reference with a DMA-API user on every group, as the control client was.
        let mut r = r.clone();
        r.use_api(e).unwrap();
        let want = r.translate(Requester::DmaApi, e, iova, 1, Access::Write);
        check_translation(got, want, iova, 1).unwrap_or_else(|m| panic!("{m} for {a}"));
    }
}

/// The state of a stopped device through SET_DEVICE_STATE_FD(SAVE) and CHECK_DEVICE_STATE.
fn save(dev: &mut Driver) -> Vec<u8> {
    // A socket pair stands in for QEMU's pipe: the daemon only reads or writes a descriptor.
    let (mut reader, writer) = UnixStream::pair().unwrap();
    let frontend = dev.connection().frontend();
    let returned = frontend
        .set_device_state_fd(
            VhostTransferStateDirection::SAVE,
            VhostTransferStatePhase::STOPPED,
            OwnedFd::from(writer),
        )
        .expect("SET_DEVICE_STATE_FD(SAVE)");
    assert!(returned.is_none(), "the daemon uses the frontend's pipe");
    let mut bytes = Vec::new();
    reader.read_to_end(&mut bytes).unwrap();
    frontend.check_device_state().expect("CHECK_DEVICE_STATE");
    bytes
}

/// Loads `bytes` through SET_DEVICE_STATE_FD(LOAD); returns CHECK_DEVICE_STATE's verdict.
fn load_state(dev: &mut Driver, bytes: &[u8]) -> bool {
    let (reader, mut writer) = UnixStream::pair().unwrap();
    let frontend = dev.connection().frontend();
    frontend
        .set_device_state_fd(
            VhostTransferStateDirection::LOAD,
            VhostTransferStatePhase::STOPPED,
            OwnedFd::from(reader),
        )
        .expect("SET_DEVICE_STATE_FD(LOAD)");
    // The daemon may refuse before it read everything: a broken pipe is its answer too.
    let _ = writer.write_all(bytes);
    drop(writer);
    frontend.check_device_state().is_ok()
}

/// What the control socket shows of the guest's state.
fn guest_view(d: &Daemon) -> Value {
    let stats = d.stats();
    let mut domains = d.control(json!({"cmd": "domains"}));
    // MAP and UNMAP counts are statistics, not state: a load counts its own MAPs.
    for domain in domains["domains"].as_array_mut().unwrap() {
        let domain = domain.as_object_mut().unwrap();
        domain.remove("maps");
        domain.remove("unmaps");
    }
    let groups = d.control(json!({"cmd": "groups"}))["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| json!([g["group"], g["domain"], g["attached"]]))
        .collect::<Vec<_>>();
    json!({
        "domains": domains["domains"],
        "groups": groups,
        "mappings": stats["mappings"],
        "backlog": stats["faults"]["backlog"],
    })
}

#[test]
fn pause_and_resume_keep_the_guest_state() {
    let d = daemon(&[]);
    let mut dev = d.connect_with(options());
    let mut r = Reference::new(topology(&[]));
    let mut rng = Rng(1);
    load(&mut dev, &mut r, &mut rng, 400);
    let before = translations(&d);
    check_against(&r, &before);
    for round in 0..2 {
        // QEMU's stop: GET_VRING_BASE on every ring; cont: the rings start again from there.
        let bases = dev.stop().unwrap();
        assert_eq!(translations(&d), before, "round {round}: stopped");
        dev.resume(bases).unwrap();
        assert_eq!(translations(&d), before, "round {round}: resumed");
    }
    assert_eq!(d.stats()["resets"], 0);
    // The guest carries on where it was.
    load(&mut dev, &mut r, &mut rng, 200);
    check_against(&r, &translations(&d));
}

#[test]
fn only_reset_device_and_a_disconnect_reset() {
    let d = daemon(&[]);
    let mut dev = d.connect_with(options());
    assert_eq!(status_of(&mut dev, &attach(1, 0x10)), Status::Ok);
    assert_eq!(status_of(&mut dev, &map(1, 0, PAGE - 1, 0)), Status::Ok);
    // SET_VRING_ENABLE off and on: queues only.
    dev.connection().enable_queue(0, false).unwrap();
    dev.connection().enable_queue(0, true).unwrap();
    assert_eq!(d.stats()["mappings"], 1);
    // A virtio reset as QEMU performs it: GET_VRING_BASE, RESET_DEVICE, rings restarted.
    dev.reset().unwrap();
    let stats = d.stats();
    assert_eq!(
        (stats["domains"].clone(), stats["resets"].clone()),
        (json!(0), json!(1))
    );

    // A frontend that never sends RESET_DEVICE (QEMU's generic vhost-user device): its reset
    // stops the rings and starts fresh ones at index 0, and that is the reset.
    let mut o = options();
    o.protocol_features -= VhostUserProtocolFeatures::RESET_DEVICE;
    drop(dev);
    let mut dev = d.connect_with(o);
    assert!(!dev
        .negotiated()
        .has_protocol_feature(VhostUserProtocolFeatures::RESET_DEVICE));
    assert_eq!(status_of(&mut dev, &attach(1, 0x10)), Status::Ok);
    // Stopped and resumed where it stopped: no reset.
    let bases = dev.stop().unwrap();
    dev.resume(bases).unwrap();
    assert_eq!(d.stats()["domains"], 1, "a resume is not a reset");
    assert_eq!(status_of(&mut dev, &map(1, 0, PAGE - 1, 0)), Status::Ok);
    dev.reset().unwrap();
    // The reset is seen when the fresh rings run: the first request finds no domain.
    assert_eq!(
        status_of(&mut dev, &map(1, PAGE, 2 * PAGE - 1, 0)),
        Status::NoEnt
    );
    let stats = d.stats();
    assert_eq!(
        (stats["domains"].clone(), stats["resets"].clone()),
        (json!(0), json!(2))
    );
    assert_eq!(status_of(&mut dev, &attach(1, 0x10)), Status::Ok);
    drop(dev);
    let dev = d.connect_with(options());
    assert_eq!(d.stats()["domains"], 0, "a disconnect resets");
    drop(dev);
}

#[test]
fn a_saved_state_loads_into_another_daemon() {
    // A backlog that keeps the control socket's faults too: the saved records stay oldest.
    let a = daemon(&["--fault-backlog", "100000"]);
    // No event buffers: fault records wait in the backlog and travel with the state.
    let mut o = options();
    o.event_buffers = 0;
    let mut dev_a = a.connect_with(o);
    let mut r = Reference::new(topology(&[]));
    let mut rng = Rng(7);
    load(&mut dev_a, &mut r, &mut rng, 3000);
    let mut client = a.control_client();
    client.request(json!({"cmd": "use_dma_api", "endpoint": 0x10}));
    for k in 0..3u64 {
        client.request(json!({"cmd": "translate", "endpoint": 0x10, "iova": 0x7000_0000 + k}));
    }
    client.request(json!({"cmd": "unuse_dma_api", "endpoint": 0x10}));
    drop(client);
    let view_a = guest_view(&a);
    assert_eq!(view_a["backlog"], 3, "{view_a}");
    assert!(
        view_a["mappings"].as_u64().unwrap() > 200,
        "a load worth the name: {view_a}"
    );
    dev_a.stop().unwrap();
    let bytes = save(&mut dev_a);
    assert_eq!(a.stats()["state"]["saved"], 1);
    // Asked only now: the control socket's faults go to the backlog too.
    let answers_a = translations(&a);
    check_against(&r, &answers_a);

    let b = daemon(&["--fault-backlog", "100000"]);
    let mut dev_b = b.connect_with(options());
    let bases = dev_b.stop().unwrap();
    assert!(load_state(&mut dev_b, &bytes), "{}", b.log());
    assert_eq!(b.stats()["state"]["loaded"], 1);
    assert_eq!(guest_view(&b), view_a);
    assert_eq!(translations(&b), answers_a);
    // B's guest posted event buffers: the records saved on A reach it once its queues run.
    dev_b.resume(bases).unwrap();
    for k in 0..3u64 {
        let c = dev_b
            .wait_event(std::time::Duration::from_secs(5))
            .expect("a saved fault record");
        let record = virtio::FaultRecord::from_bytes(c.data[..24].try_into().unwrap()).unwrap();
        assert_eq!((record.endpoint, record.address), (0x10, 0x7000_0000 + k));
    }
    // And the guest carries on on B where it was on A.
    load(&mut dev_b, &mut r, &mut rng, 300);
    check_against(&r, &translations(&b));
}

#[test]
fn a_bad_state_is_refused_and_changes_nothing() {
    let a = daemon(&[]);
    let mut dev_a = a.connect_with(options());
    let mut r = Reference::new(topology(&[]));
    load(&mut dev_a, &mut r, &mut Rng(3), 500);
    dev_a.stop().unwrap();
    let good = save(&mut dev_a);
    let other_topology = {
        let c = daemon(&["--group", "0x14,0x15"]);
        let mut dev_c = c.connect_with(options());
        assert_eq!(status_of(&mut dev_c, &attach(1, 0x10)), Status::Ok);
        dev_c.stop().unwrap();
        save(&mut dev_c)
    };

    // B holds a state of its own; every bad blob must leave it exactly so.
    let b = daemon(&["--max-mappings", "100000"]);
    let mut dev_b = b.connect_with(options());
    let mut rb = Reference::new(topology(&[]));
    load(&mut dev_b, &mut rb, &mut Rng(4), 300);
    dev_b.stop().unwrap();
    // After the translations: their faults fill the backlog, which must not change either.
    let answers = translations(&b);
    let view = guest_view(&b);

    let mut flipped = good.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 1;
    let mut newer = good.clone();
    newer[8] = 9;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        ("truncated header", good[..10].to_vec()),
        ("truncated body", good[..good.len() - 5].to_vec()),
        ("corrupt", flipped),
        ("another format version", newer),
        ("trailing bytes", [good.as_slice(), &[0]].concat()),
        ("other topology", other_topology),
        ("oversized", vec![0x5a; 64 << 20]),
        (
            "garbage",
            (0..4096u32).map(|i| (i * 7919 % 251) as u8).collect(),
        ),
    ];
    for (n, (what, bytes)) in cases.iter().enumerate() {
        assert!(!load_state(&mut dev_b, bytes), "{what}: accepted");
        assert_eq!(
            b.stats()["state"]["refused"],
            n as u64 + 1,
            "{what}: not counted"
        );
        assert_eq!(guest_view(&b), view, "{what}: changed the state");
    }
    assert_eq!(translations(&b), answers);
    let log = b.log();
    for needle in ["checksum", "another topology", "truncated", "larger than"] {
        assert!(
            log.contains(needle),
            "no clear error with {needle:?} in:\n{log}"
        );
    }
    // And a good one still loads after all that.
    assert!(load_state(&mut dev_b, &good));
    check_against(&r, &translations(&b));
    thread::yield_now();
}
