// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The daemon over a real vhost-user socket, driven by the rust-vmm `vhost` frontend (through
//! the testkit's VMM + guest-driver model): negotiation, every request type, PROBE bytes,
//! faults on the event queue, reset, reconnect, malformed chains, signals.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_iommu_testkit::{Chain, Options, RawDesc, WaitMode, VRING_DESC_F_WRITE};
use virtio::{
    Config, FaultReason, FaultRecord, ResvMem, ResvMemType, Status, FAULT_F_ADDRESS, FAULT_F_READ,
    FAULT_F_WRITE, F_BYPASS, F_BYPASS_CONFIG, F_DOMAIN_RANGE, F_INPUT_RANGE, F_MAP_UNMAP, F_MMIO,
    F_PROBE,
};

const VERSION_1: u64 = 1 << 32;
const EVENT_IDX: u64 = 1 << 29;
const INDIRECT: u64 = 1 << 28;
/// pci-testdev at 00:05.0.
const EP: u32 = 0x28;

#[test]
fn features_protocol_features_and_config_space() {
    let d = Daemon::start(&["--domain-range", "1-1000"]);
    let mut dev = d.connect();
    let n = *dev.negotiated();
    let device_bits = F_INPUT_RANGE | F_DOMAIN_RANGE | F_MAP_UNMAP | F_PROBE | F_BYPASS_CONFIG;
    for bit in [VERSION_1, EVENT_IDX, INDIRECT, device_bits] {
        assert_eq!(n.features & bit, bit, "offered {:#x}", n.features);
    }
    assert_eq!(
        n.features & (F_BYPASS | F_MMIO),
        0,
        "spec F2; MMIO only with --mmio"
    );
    assert_eq!(n.acked_features & device_bits, device_bits);
    let wanted = VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK;
    assert!(n.protocol_features.contains(wanted));
    assert_eq!(n.queue_num, Some(2));

    let config: [u8; 40] = dev.config().unwrap().try_into().unwrap();
    assert_eq!(
        Config::from_bytes(&config),
        Config {
            page_size_mask: 0x1000,
            input_range_start: 0,
            input_range_end: (1 << 48) - 1,
            domain_range_start: 1,
            domain_range_end: 1000,
            probe_size: PROBE_SIZE,
            bypass: 0,
        }
    );
    // Partial reads at any offset return exactly the bytes asked for.
    assert_eq!(dev.get_config(36, 4).unwrap(), vec![0, 0, 0, 0]);
    assert_eq!(dev.get_config(8, 8).unwrap(), config[8..16].to_vec());
}

#[test]
fn mmio_feature_on_request() {
    let d = Daemon::start(&["--mmio"]);
    let dev = d.connect();
    assert_ne!(dev.negotiated().features & F_MMIO, 0);
}

#[test]
fn the_driver_may_write_only_bypass() {
    let d = Daemon::start(&[]);
    let mut dev = d.connect();
    // Bypass off: an unattached endpoint faults (spec G4).
    let tr = json!({"cmd": "translate", "endpoint": EP, "iova": 0x1000});
    assert_eq!(
        d.control(json!({"cmd": "use_dma_api", "endpoint": EP}))["ok"],
        true
    );
    assert_eq!(d.control(tr.clone())["fault"], "no_domain");
    dev.set_config(36, &[1]).unwrap();
    assert_eq!(dev.get_config(36, 1).unwrap(), vec![1]);
    assert_eq!(d.control(tr.clone())["gpa"], 0x1000, "bypass on: identity");
    // Spec C3: only 0 or 1; and no other field is writable. A refused write ends the
    // vhost-user connection (vhost-user-backend's rule), so check on a fresh connection.
    assert!(dev.set_config(36, &[2]).is_err());
    drop(dev);
    let mut dev = d.connect();
    assert!(dev.set_config(0, &[0xff; 8]).is_err());
    drop(dev);
    let mut dev = d.connect();
    let config: [u8; 40] = dev.config().unwrap().try_into().unwrap();
    assert_eq!(Config::from_bytes(&config).page_size_mask, 0x1000);
    assert_eq!(
        config[36], 0,
        "a new frontend starts from the initial config"
    );
}

#[test]
fn attach_detach_statuses() {
    let d = Daemon::start(&["--domain-range", "1-100", "--group", "00:06.0,00:06.1"]);
    let mut dev = d.connect();
    assert_eq!(status_of(&mut dev, &attach(1, EP)), Status::Ok);
    assert_eq!(
        status_of(&mut dev, &attach(1, 0x1_0000)),
        Status::NoEnt,
        "A3"
    );
    assert_eq!(status_of(&mut dev, &attach(101, EP)), Status::Range);
    assert_eq!(
        status_of(&mut dev, &attach_bypass(1, 0x29)),
        Status::Inval,
        "A5"
    );
    assert_eq!(status_of(&mut dev, &attach_bypass(2, 0x29)), Status::Ok);
    // A6: attached elsewhere -> moved.
    assert_eq!(status_of(&mut dev, &attach(3, EP)), Status::Ok);
    // Flags the driver may not use without BYPASS_CONFIG acked are refused by parse (A2):
    // covered by the unacked-feature test below. Reserved bytes (A1):
    let mut bytes = attach(4, EP).encode();
    bytes[16] = 1;
    assert_eq!(
        status(&dev.request(&bytes, 4).unwrap()),
        Status::Inval,
        "A1"
    );
    assert_eq!(
        status_of(&mut dev, &detach(1, EP)),
        Status::Inval,
        "D3: moved to 3"
    );
    assert_eq!(
        status_of(&mut dev, &detach(3, 0x1_0000)),
        Status::NoEnt,
        "D2"
    );
    assert_eq!(status_of(&mut dev, &detach(3, EP)), Status::Ok);
    assert_eq!(status_of(&mut dev, &detach(3, EP)), Status::Inval);
    // The two-function group moves as one.
    assert_eq!(status_of(&mut dev, &attach(5, 0x30)), Status::Ok);
    let groups = d.control(json!({"cmd": "domains"}));
    let domain5 = groups["domains"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["id"] == 5)
        .cloned()
        .unwrap();
    assert_eq!(domain5["endpoints"], json!([0x30]));
    assert_eq!(status_of(&mut dev, &attach(5, 0x31)), Status::Ok);
    assert_eq!(status_of(&mut dev, &detach(5, 0x30)), Status::Ok);
    assert_eq!(status_of(&mut dev, &detach(5, 0x31)), Status::Ok);
    let stats = d.stats();
    assert_eq!(
        stats["domains"], 1,
        "only the bypass domain 2 is left: {stats}"
    );
    assert_eq!(stats["requests"]["attach"]["ok"], 5);
}

/// `groups` lists the groups in use (the defaults have 65,536); `all` lists every one.
#[test]
fn groups_lists_those_in_use_unless_all() {
    let listed = |reply: &serde_json::Value| -> Vec<u64> {
        assert_eq!(reply["ok"], true, "{reply}");
        reply["groups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g["endpoints"][0].as_u64().unwrap())
            .collect()
    };
    let d = Daemon::start(&[]);
    let reply = d.control(json!({"cmd": "groups"}));
    assert_eq!(reply["total"], 1 << 16);
    assert!(listed(&reply).is_empty(), "{reply}");
    // A DMA owner, then a guest attachment, put a group in use.
    assert_eq!(
        d.control(json!({"cmd": "claim", "endpoint": 0x100, "cookie": 7}))["ok"],
        true
    );
    let mut dev = d.connect();
    assert_eq!(status_of(&mut dev, &attach(1, EP)), Status::Ok);
    let reply = d.control(json!({"cmd": "groups"}));
    assert_eq!(listed(&reply), [u64::from(EP), 0x100]);
    assert_eq!(reply["groups"][1]["owner"], 7);
    assert_eq!(reply["groups"][0]["attached"], json!([EP]));
    let bad = d.control(json!({"cmd": "groups", "all": 1}));
    assert_eq!(bad["ok"], false, "{bad}");

    let d = Daemon::start(&["--endpoints", "00:05.0,00:06.0-00:06.1"]);
    let reply = d.control(json!({"cmd": "groups", "all": true}));
    assert_eq!(reply["total"], 3);
    assert_eq!(listed(&reply), [0x28, 0x30, 0x31]);
}

#[test]
fn map_unmap_statuses() {
    let d = Daemon::start(&[]);
    let mut dev = d.connect();
    assert_eq!(
        status_of(&mut dev, &map(1, 0x1000, 0x1fff, 0)),
        Status::NoEnt,
        "M4"
    );
    assert_eq!(status_of(&mut dev, &attach(1, EP)), Status::Ok);
    assert_eq!(
        status_of(&mut dev, &map(1, 0x1000, 0x2fff, 0x10_0000)),
        Status::Ok
    );
    assert_eq!(
        status_of(&mut dev, &map(1, 0x2000, 0x2fff, 0)),
        Status::Inval,
        "M2"
    );
    assert_eq!(
        status_of(&mut dev, &map(1, 0x3800, 0x47ff, 0)),
        Status::Range,
        "M1"
    );
    assert_eq!(
        status_of(&mut dev, &map(1, 0x3000, 0x3fff, 0x800)),
        Status::Range,
        "M1"
    );
    assert_eq!(
        status_of(&mut dev, &map(1, 1 << 48, (1 << 48) + 0xfff, 0)),
        Status::Range,
        "input range"
    );
    assert_eq!(
        status_of(&mut dev, &map(1, 0xfee0_0000, 0xfee0_0fff, 0)),
        Status::Inval,
        "R4"
    );
    let mut bytes = map(1, 0x5000, 0x5fff, 0).encode();
    bytes[32] = 8; // unknown flag
    assert_eq!(
        status(&dev.request(&bytes, 4).unwrap()),
        Status::Inval,
        "M3"
    );
    assert_eq!(status_of(&mut dev, &attach_bypass(2, 0x30)), Status::Ok);
    assert_eq!(
        status_of(&mut dev, &map(2, 0x1000, 0x1fff, 0)),
        Status::Inval,
        "M5"
    );
    assert_eq!(
        status_of(&mut dev, &unmap(2, 0x1000, 0x1fff)),
        Status::Inval,
        "U3"
    );
    assert_eq!(
        status_of(&mut dev, &unmap(9, 0x1000, 0x1fff)),
        Status::NoEnt,
        "U2"
    );
    assert_eq!(
        status_of(&mut dev, &unmap(1, 0x1000, 0x1fff)),
        Status::Range,
        "U4"
    );
    // U4: nothing was removed.
    let tr = json!({"cmd": "translate", "endpoint": EP, "iova": 0x1010});
    d.control(json!({"cmd": "use_dma_api", "endpoint": EP}));
    assert_eq!(d.control(tr.clone())["gpa"], 0x10_0010);
    assert_eq!(
        status_of(&mut dev, &unmap(1, 0, 0xffff_ffff)),
        Status::Ok,
        "U5"
    );
    assert_eq!(d.control(tr)["fault"], "unmapped");
    assert_eq!(
        status_of(&mut dev, &unmap(1, 0, 0xffff_ffff)),
        Status::Ok,
        "empty"
    );
    let mut bytes = unmap(1, 0, 0xfff).encode();
    bytes[24] = 1;
    assert_eq!(
        status(&dev.request(&bytes, 4).unwrap()),
        Status::Inval,
        "U1"
    );
}

#[test]
fn probe_output_is_byte_exact() {
    let d = Daemon::start(&["--reserved", "0x10000-0x1ffff:reserved@00:05.0"]);
    let mut dev = d.connect();
    let c = send(&mut dev, &probe(EP));
    assert_eq!(c.used_len, PROBE_SIZE + 4);
    let mut expected = vec![0u8; PROBE_SIZE as usize + 4];
    // Regions sorted by start: the reserved one, then the MSI doorbell. P5/P6: length 20
    // without the header, the next property 24 bytes on; R1/P4: reserved bytes zero; P8: the
    // rest zero; G3: the tail's reserved bytes zero.
    let mut at = 0;
    for r in [
        ResvMem {
            subtype: ResvMemType::Reserved,
            start: 0x10000,
            end: 0x1ffff,
        },
        ResvMem {
            subtype: ResvMemType::Msi,
            start: 0xfee0_0000,
            end: 0xfeef_ffff,
        },
    ] {
        expected[at..at + 2].copy_from_slice(&1u16.to_le_bytes());
        expected[at + 2..at + 4].copy_from_slice(&20u16.to_le_bytes());
        expected[at + 4] = r.subtype as u8;
        expected[at + 8..at + 16].copy_from_slice(&r.start.to_le_bytes());
        expected[at + 16..at + 24].copy_from_slice(&r.end.to_le_bytes());
        at += 24;
    }
    assert_eq!(c.data, expected);
    assert_eq!(status_of(&mut dev, &probe(0x1_0000)), Status::NoEnt, "P2");
    // P7: a buffer smaller than probe_size: INVAL, no property written.
    let c = dev.request(&probe(EP).encode(), 100).unwrap();
    assert_eq!(c.data[..96], [0u8; 96]);
    assert_eq!(status(&c), Status::Inval);
}

#[test]
fn unacked_features_gate_requests() {
    let d = Daemon::start(&[]);
    let options = Options {
        device_features: F_MAP_UNMAP,
        ..Options::default()
    };
    let mut dev = d.connect_with(options);
    // P3: PROBE not negotiated -> nothing written, used length 0.
    let c = dev
        .request(&probe(EP).encode(), PROBE_SIZE as usize + 4)
        .unwrap();
    assert_eq!(c.used_len, 0);
    // A2: the BYPASS flag without BYPASS_CONFIG is an unknown flag.
    assert_eq!(status_of(&mut dev, &attach_bypass(1, EP)), Status::Inval);
}

#[test]
fn a_fault_record_arrives_on_the_event_queue() {
    let d = Daemon::start(&[]);
    let mut dev = d.connect();
    assert_eq!(status_of(&mut dev, &attach(1, EP)), Status::Ok);
    assert_eq!(
        status_of(&mut dev, &map(1, 0x1000, 0x1fff, 0x8000)),
        Status::Ok
    );
    let claim = json!({"cmd": "claim", "endpoint": EP, "cookie": 77});
    assert_eq!(d.control(claim)["ok"], true);
    let tr =
        json!({"cmd": "translate", "endpoint": EP, "iova": 0x5008, "access": "write", "owner": 77});
    assert_eq!(d.control(tr)["fault"], "unmapped");
    let event = dev.wait_event(Duration::from_secs(10)).unwrap();
    assert_eq!(event.used_len, 24);
    let record = FaultRecord::from_bytes(&event.data[..24].try_into().unwrap()).unwrap();
    assert_eq!(
        record,
        FaultRecord {
            reason: FaultReason::Mapping,
            flags: FAULT_F_WRITE | FAULT_F_ADDRESS,
            endpoint: EP,
            address: 0x5008,
        }
    );
    // An unattached endpoint: reason DOMAIN.
    d.control(json!({"cmd": "use_dma_api", "endpoint": 0x30}));
    let tr = json!({"cmd": "translate", "endpoint": 0x30, "iova": 0x10});
    assert_eq!(d.control(tr)["fault"], "no_domain");
    let event = dev.wait_event(Duration::from_secs(10)).unwrap();
    let record = FaultRecord::from_bytes(&event.data[..24].try_into().unwrap()).unwrap();
    assert_eq!(record.reason, FaultReason::Domain);
    assert_eq!(record.flags, FAULT_F_READ | FAULT_F_ADDRESS);
    // A refused requester is a host matter: no record.
    let tr = json!({"cmd": "translate", "endpoint": EP, "iova": 0x5008, "owner": 5});
    assert_eq!(d.control(tr)["fault"], "not_owner");
    std::thread::sleep(Duration::from_millis(100));
    assert!(dev.poll_event().unwrap().is_none());
    let stats = d.stats();
    assert_eq!(stats["faults"]["delivered"], 2, "{stats}");
}

#[test]
fn faults_wait_for_event_buffers_in_a_bounded_backlog() {
    let d = Daemon::start(&["--fault-backlog", "4"]);
    let options = Options {
        event_buffers: 0,
        ..Options::default()
    };
    let mut dev = d.connect_with(options);
    d.control(json!({"cmd": "use_dma_api", "endpoint": EP}));
    for i in 0..10u64 {
        let tr = json!({"cmd": "translate", "endpoint": EP, "iova": i * 0x1000});
        assert_eq!(d.control(tr)["fault"], "no_domain");
    }
    let stats = d.wait_stats("the backlog", |s| s["faults"]["reported"] == 10);
    assert_eq!(stats["faults"]["backlog"], 4);
    assert_eq!(stats["faults"]["dropped"], 6, "oldest dropped and counted");
    // Buffers posted now: the four newest records arrive, oldest first.
    let q = dev.eventq();
    for _ in 0..4 {
        q.post_chain(&Chain::new().writable(24)).unwrap();
    }
    assert!(q.notify().unwrap(), "the device asked for a kick");
    let mut addresses = Vec::new();
    for _ in 0..4 {
        let e = dev.wait_event(Duration::from_secs(10)).unwrap();
        addresses.push(
            FaultRecord::from_bytes(&e.data[..24].try_into().unwrap())
                .unwrap()
                .address,
        );
    }
    assert_eq!(addresses, vec![0x6000, 0x7000, 0x8000, 0x9000]);
}

/// One event buffer, two faults: the first record fills the buffer, the second waits in the
/// backlog. The driver reaps the first and re-posts the buffer with a conditional kick; the
/// device must have asked for that kick (with EVENT_IDX, `avail_event` at the re-posted entry)
/// so that the second record arrives without any later fault to wake it.
#[test]
fn a_waiting_record_takes_the_reposted_buffer() {
    let d = Daemon::start(&[]);
    for event_idx in [true, false] {
        let mut dev = d.connect_with(Options {
            event_idx,
            event_buffers: 1,
            ..Options::default()
        });
        assert_eq!(status_of(&mut dev, &attach(1, EP)), Status::Ok);
        d.control(json!({"cmd": "use_dma_api", "endpoint": EP}));
        let before = d.stats()["faults"]["delivered"].as_u64().unwrap();
        for i in 0..2u64 {
            let tr = json!({"cmd": "translate", "endpoint": EP, "iova": 0x8000_0000 + (i << 12)});
            assert_eq!(d.control(tr)["fault"], "unmapped");
        }
        let stats = d.wait_stats("the first record delivered", |s| {
            s["faults"]["delivered"] == before + 1
        });
        assert_eq!(stats["faults"]["backlog"], 1, "{stats}");
        // Reaps the first record and re-posts its buffer with a conditional kick.
        let first = dev.wait_event(Duration::from_secs(10)).unwrap();
        assert_eq!(first.used_len as usize, 24);
        let q = dev.eventq();
        let kicked = q.stats().kicks;
        let second = q.wait(WaitMode::Interrupt, Duration::from_secs(5));
        let stats = d.stats();
        let second = second.unwrap_or_else(|e| {
            panic!(
                "event_idx {event_idx}: the second record stays in the backlog ({e}; driver \
                 kicks {kicked}, suppressed {}): {stats}",
                q.stats().kicks_suppressed
            )
        });
        let record = FaultRecord::from_bytes(&second.data[..24].try_into().unwrap());
        assert_eq!(record.unwrap().address, 0x8000_1000);
        assert_eq!(stats["faults"]["backlog"], 0, "{stats}");
    }
}

#[test]
fn device_reset_drops_attachments_and_domains_bypass_survives() {
    let d = Daemon::start(&[]);
    let mut dev = d.connect();
    dev.set_config(36, &[1]).unwrap();
    assert_eq!(status_of(&mut dev, &attach(1, EP)), Status::Ok);
    assert_eq!(status_of(&mut dev, &map(1, 0x1000, 0x1fff, 0)), Status::Ok);
    assert_eq!(d.stats()["domains"], 1);
    dev.reset().unwrap();
    let stats = d.stats();
    assert_eq!(stats["domains"], 0, "{stats}");
    assert_eq!(stats["mappings"], 0);
    assert!(stats["resets"].as_u64().unwrap() >= 1);
    assert_eq!(
        status_of(&mut dev, &map(1, 0x1000, 0x1fff, 0)),
        Status::NoEnt
    );
    assert_eq!(
        dev.get_config(36, 1).unwrap(),
        vec![1],
        "C2: bypass survives reset"
    );
}

#[test]
fn a_second_frontend_after_disconnect_finds_a_fresh_device() {
    let d = Daemon::start(&[]);
    {
        let mut dev = d.connect();
        assert_eq!(status_of(&mut dev, &attach(1, EP)), Status::Ok);
        assert_eq!(status_of(&mut dev, &map(1, 0x1000, 0x1fff, 0)), Status::Ok);
    }
    let mut dev = d.connect();
    assert_eq!(
        status_of(&mut dev, &map(1, 0x1000, 0x1fff, 0)),
        Status::NoEnt
    );
    assert_eq!(status_of(&mut dev, &attach(1, EP)), Status::Ok);
    drop(dev);
    // And a third, disconnecting in the middle of the handshake first.
    let mut conn = vhost_iommu_testkit::Connection::connect(
        &d.socket,
        Duration::from_secs(5),
        Duration::from_secs(5),
        2,
    )
    .unwrap();
    conn.get_features().unwrap();
    drop(conn);
    let mut dev = d.connect();
    assert_eq!(status_of(&mut dev, &attach(1, EP)), Status::Ok);
    let stats = d.stats();
    assert_eq!(stats["connections"], 4, "{stats}");
}

#[test]
fn malformed_chains_are_returned_and_the_queue_keeps_working() {
    let d = Daemon::start(&[]);
    let mut dev = d.connect();
    let good = attach(1, EP).encode();
    let buf = dev.memory().alloc(4096, 16).unwrap();
    dev.memory().write(buf.addr, &good).unwrap();
    let (r, w) = (buf.addr, buf.addr + 2048);
    let mem_end = 64 << 20;
    let cases: Vec<(&str, Vec<RawDesc>)> = vec![
        (
            "readable after writable",
            vec![RawDesc::writable(w, 4).then(1), RawDesc::readable(r, 20)],
        ),
        (
            "readable outside memory",
            vec![
                RawDesc::readable(mem_end + 0x1000, 20).then(1),
                RawDesc::writable(w, 4),
            ],
        ),
        (
            "writable outside memory",
            vec![
                RawDesc::readable(r, 20).then(1),
                RawDesc::writable(mem_end - 2, 4),
            ],
        ),
        (
            "no tail: writable too short",
            vec![RawDesc::readable(r, 20).then(1), RawDesc::writable(w, 3)],
        ),
        ("readable only", vec![RawDesc::readable(r, 20)]),
        ("writable only", vec![RawDesc::writable(w, 64)]),
        (
            "next outside the table",
            vec![RawDesc::readable(r, 20).then_index(4000)],
        ),
        (
            "a loop",
            vec![
                RawDesc::readable(r, 20).then(1),
                RawDesc::readable(r, 20).then(0),
            ],
        ),
        (
            "huge writable area",
            vec![
                RawDesc::readable(r, 20).then(1),
                RawDesc::writable(0, 8 << 20),
            ],
        ),
        (
            "write flag on an indirect table",
            vec![RawDesc::indirect(w, 32).with_flags(0x4 | VRING_DESC_F_WRITE)],
        ),
    ];
    for (what, chain) in cases {
        let c = dev
            .request_raw(&chain)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(c.used_len, 0, "{what}");
        assert_eq!(
            status_of(&mut dev, &attach(1, EP)),
            Status::Ok,
            "after {what}"
        );
    }
    // Unknown request type (G2) and a request shorter than its head.
    let c = dev.request(&[9, 0, 0, 0, 1, 0, 0, 0], 4).unwrap();
    assert_eq!(c.used_len, 0);
    assert_eq!(c.data, vec![0xa5; 4], "G2: nothing written");
    let c = dev.request(&[1, 0], 4).unwrap();
    assert_eq!(c.used_len, 0);
    // Known type, truncated body: INVAL.
    let c = dev.request(&good[..12], 4).unwrap();
    assert_eq!(status(&c), Status::Inval);
    assert_eq!(status_of(&mut dev, &attach(1, EP)), Status::Ok);
    // Every unanswered chain is accounted for: unusable descriptors, or no tail / no head /
    // unknown type (10 cases + 2 requests above).
    let stats = d.stats();
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    let unanswered = n(&stats["malformed_chains"])
        + n(&stats["requests"]["attach"]["no_reply"])
        + n(&stats["unknown_type"]);
    assert_eq!(unanswered, 12, "{stats}");
    assert!(n(&stats["malformed_chains"]) >= 4, "{stats}");
}

#[test]
fn split_and_indirect_requests_and_batches() {
    let d = Daemon::start(&[]);
    for event_idx in [true, false] {
        let mut dev = d.connect_with(Options {
            event_idx,
            ..Options::default()
        });
        let bytes = attach(1, EP).encode();
        let chain = Chain::new().readable_split(&bytes, 3).writable_split(4, 2);
        assert_eq!(status(&dev.request_chain(&chain).unwrap()), Status::Ok);
        let chain = Chain::new().readable(&bytes).writable(4).indirect();
        assert_eq!(status(&dev.request_chain(&chain).unwrap()), Status::Ok);
        // PROBE with its writable area split across descriptors.
        let p = probe(EP).encode();
        let chain = Chain::new()
            .readable(&p)
            .writable_split(PROBE_SIZE as usize + 4, 5);
        let c = dev.request_chain(&chain).unwrap();
        assert_eq!(status(&c), Status::Ok);
        assert_eq!(&c.data[..4], &[1, 0, 20, 0]);
        // 64 MAP/UNMAP requests per kick.
        let requests: Vec<Vec<u8>> = (0..32u64)
            .flat_map(|i| {
                [
                    map(1, i << 12, (i << 12) + 0xfff, i << 12).encode(),
                    unmap(1, i << 12, (i << 12) + 0xfff).encode(),
                ]
            })
            .collect();
        let chains: Vec<Chain<'_>> = requests
            .iter()
            .map(|r| Chain::new().readable(r).writable(4))
            .collect();
        for _ in 0..20 {
            for c in dev.batch(&chains).unwrap() {
                assert_eq!(status(&c), Status::Ok);
            }
        }
        drop(dev);
    }
    let stats = d.stats();
    assert_eq!(stats["requests"]["map"]["ok"], 2 * 20 * 32, "{stats}");
    assert_eq!(stats["mappings"], 0);
}

#[test]
fn sigterm_exits_cleanly_and_removes_the_sockets() {
    let d = Daemon::start(&[]);
    let mut dev = d.connect();
    assert_eq!(status_of(&mut dev, &attach(1, EP)), Status::Ok);
    let (socket, control) = (d.socket.clone(), d.control.clone());
    let status = d.signal("TERM");
    assert!(status.success(), "{status:?}");
    assert!(!socket.exists() && !control.exists());
}

#[test]
fn refuses_to_replace_a_file_and_to_steal_a_live_socket() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-socket");
    std::fs::write(&file, b"data").unwrap();
    let out = std::process::Command::new(BIN)
        .arg("--socket-path")
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a socket"));
    assert_eq!(std::fs::read(&file).unwrap(), b"data");
    let d = Daemon::start(&[]);
    let out = std::process::Command::new(BIN)
        .arg("--socket-path")
        .arg(&d.socket)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("another process"));
}
