// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! End to end against our daemon: a stock Debian 6.12 guest's virtio-iommu driver and VFIO
//! program it through an unpatched QEMU's `vhost-user-test-device-pci` (QEMU >= 10.2), and
//! what the guest maps is what our fast path translates (scenarios 1-5; scenario 6, QEMU's
//! built-in device on the same QEMU, is in tests/e2e.rs). One more case runs libvirt's q35
//! layout, an endpoint behind a `pcie-root-port`, with the daemon's default options.
//!
//! Runs when the rig is set up (scripts/e2e-setup.sh; see tests/e2e/README.md), prints SKIP
//! otherwise. The loop counts are smaller than the benchmark's: this checks function; the
//! performance comparison is scripts/e2e-bench.sh.

mod common;
#[path = "e2e/rig.rs"]
mod rig;

use std::process::Command;

use common::Daemon;
use rig::{pattern, GuestConfig, Iommu, Marker, RamFile, Rig};
use serde_json::{json, Value};
use vhost_device_iommu::viot::{build_viot, PciBdf};

/// Endpoint IDs (= requester IDs) of the rig's devices.
const EP: u64 = 0x28;
const GROUP_EPS: [u64; 2] = [0x30, 0x31];
/// The host-side DMA masters' cookies (exclusive owners of the endpoints' groups).
const EP_OWNER: u64 = 0xe2e0_0005;
const GROUP_OWNER: u64 = 0xe2e0_0006;
const PAGE: u64 = 4096;

fn start_daemon() -> (Daemon, std::path::PathBuf) {
    let daemon = Daemon::start(&[
        "--endpoints",
        "00:05.0,00:06.0-00:06.7",
        "--group",
        "00:06.0-00:06.7",
    ]);
    let viot = build_viot(PciBdf::new(0, 4, 0).unwrap(), &rig::endpoint_viot_ranges()).unwrap();
    let path = daemon.dir.path().join("viot.bin");
    std::fs::write(&path, viot).unwrap();
    (daemon, path)
}

fn ok(reply: Value) -> Result<Value, String> {
    if reply["ok"] == true {
        Ok(reply)
    } else {
        Err(format!("control socket: {reply}"))
    }
}

/// The host's view at each stop of the guest.
struct HostChecks<'a> {
    daemon: &'a Daemon,
    /// Domain of the 00:06 group at GROUP_ATTACHED, to check GROUP_REATTACHED moved it.
    group_domain_a: Option<u64>,
    /// Stats at GROUP_DONE: the guest has done all its VFIO work.
    final_stats: Option<Value>,
    final_domains: Option<Value>,
    stops: Vec<String>,
}

impl HostChecks<'_> {
    fn translate(&self, endpoint: u64, iova: u64, owner: u64) -> Value {
        self.daemon.control(json!({
            "cmd": "translate", "endpoint": endpoint, "iova": iova, "len": PAGE,
            "access": "read", "owner": owner,
        }))
    }

    /// Scenario 3: every page of the buffer translates to the GPA the guest reported, and guest
    /// RAM at the translated GPA holds the guest's pattern.
    fn check_buffer(
        &self,
        m: &Marker,
        memory: &RamFile,
        endpoint: u64,
        owner: u64,
    ) -> Result<Option<u64>, String> {
        let iova = m.u64("iova")?;
        let len = m.u64("len")?;
        let seed = m.u64("pattern")? as u32;
        let gpas = m.list("gpas")?;
        let mut domain = None;
        for (i, reported) in gpas.iter().enumerate() {
            let offset = i as u64 * PAGE;
            let t = self.translate(endpoint, iova + offset, owner);
            let gpa = t["gpa"]
                .as_u64()
                .ok_or_else(|| format!("IOVA {:#x} did not translate: {t}", iova + offset))?;
            let reported = u64::from_str_radix(reported.trim_start_matches("0x"), 16)
                .map_err(|e| e.to_string())?;
            if gpa != reported {
                return Err(format!(
                    "IOVA {:#x}: daemon says GPA {gpa:#x}, the guest says {reported:#x}",
                    iova + offset
                ));
            }
            let n = (len - offset).min(PAGE) as usize;
            if memory.read(gpa, n)? != pattern(seed, offset, n) {
                return Err(format!("no pattern at GPA {gpa:#x}"));
            }
            domain = t["domain"].as_u64();
        }
        Ok(domain)
    }

    /// Scenario 5: both endpoints of the group translate identically (same domain, same GPA,
    /// or the same fault), and the daemon's group state agrees.
    fn check_group_consistent(&self, iova: u64) -> Result<Value, String> {
        // The answers name the endpoint asked about; everything else must be the same.
        let same = |mut t: Value| {
            if let Some(o) = t.as_object_mut() {
                o.remove("endpoint");
                o.remove("bdf");
            }
            t
        };
        let a = same(self.translate(GROUP_EPS[0], iova, GROUP_OWNER));
        let b = same(self.translate(GROUP_EPS[1], iova, GROUP_OWNER));
        if a != b {
            return Err(format!(
                "the group's endpoints disagree at {iova:#x}: {a} vs {b}"
            ));
        }
        let groups = ok(self.daemon.control(json!({"cmd": "groups"})))?;
        let group = groups["groups"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| {
                let members = g["endpoints"].as_array().cloned().unwrap_or_default();
                GROUP_EPS.iter().all(|e| members.contains(&json!(e)))
            })
            .cloned()
            .ok_or("no group with both functions")?;
        if let Some(d) = a["domain"].as_u64() {
            if group["domain"] != json!(d) {
                return Err(format!("translated through {d}, group state {group}"));
            }
        }
        Ok(a)
    }

    fn on_marker(&mut self, m: &Marker, memory: &RamFile) -> Result<(), String> {
        if m.wait().is_some() {
            self.stops.push(m.event.clone());
        }
        match m.event.as_str() {
            "MAPPED" => {
                ok(self
                    .daemon
                    .control(json!({"cmd": "claim", "endpoint": EP, "cookie": EP_OWNER})))?;
                let domain = self.check_buffer(m, memory, EP, EP_OWNER)?;
                if domain.is_none() {
                    return Err("a VFIO mapping translated without a domain".into());
                }
            }
            "UNMAPPED" => {
                // Scenario 3: the same translation is now refused; scenario 4: the refused
                // access is reported to the guest as a fault, which its driver logs.
                let t = self.translate(EP, m.u64("iova")?, EP_OWNER);
                if t["fault"] != "unmapped" {
                    return Err(format!("after UNMAP: {t}"));
                }
                ok(self
                    .daemon
                    .control(json!({"cmd": "release", "endpoint": EP, "cookie": EP_OWNER})))?;
            }
            "GROUP_ATTACHED" => {
                ok(self.daemon.control(
                    json!({"cmd": "claim", "endpoint": GROUP_EPS[0], "cookie": GROUP_OWNER}),
                ))?;
                let d = self.check_buffer(m, memory, GROUP_EPS[0], GROUP_OWNER)?;
                self.check_buffer(m, memory, GROUP_EPS[1], GROUP_OWNER)?;
                self.check_group_consistent(m.u64("iova")?)?;
                self.group_domain_a = d;
            }
            "GROUP_RELEASED" => {
                // Back on the default domain: whatever it is, both functions agree.
                self.check_group_consistent(0)?;
            }
            "GROUP_REATTACHED" => {
                // Linux may reuse the first domain's ID (the spec lets it once that domain died);
                // what must hold is that the new domain starts empty.
                let d = self.check_buffer(m, memory, GROUP_EPS[1], GROUP_OWNER)?;
                if d.is_none() || self.group_domain_a.is_none() {
                    return Err(format!("translations without a domain: {d:?}"));
                }
                self.check_group_consistent(m.u64("iova")?)?;
                // A fresh domain: the first domain's mapping is gone.
                let old = self.check_group_consistent(m.u64("old_iova")?)?;
                if old["ok"] != false {
                    return Err(format!("the old domain's IOVA still translates: {old}"));
                }
            }
            "GROUP_DONE" => {
                self.check_group_consistent(0)?;
                ok(self.daemon.control(
                    json!({"cmd": "release", "endpoint": GROUP_EPS[0], "cookie": GROUP_OWNER}),
                ))?;
                self.final_stats = Some(self.daemon.stats());
                self.final_domains = Some(ok(self.daemon.control(json!({"cmd": "domains"})))?);
            }
            _ => {}
        }
        Ok(())
    }
}

/// Scenarios 1-5 in one guest run.
#[test]
fn linux_guest_drives_the_daemon_through_vfio() {
    let Some(rig) = Rig::get("linux_guest_drives_the_daemon_through_vfio") else {
        return;
    };
    let (daemon, viot) = start_daemon();
    let mut config = GuestConfig::new(Iommu::VhostUser {
        socket: daemon.socket.clone(),
    });
    config.viot = Some(viot);
    config.n4k = 2000;
    config.rounds32 = 100;
    config.n2m = 50;
    let mut host = HostChecks {
        daemon: &daemon,
        group_domain_a: None,
        final_stats: None,
        final_domains: None,
        stops: Vec::new(),
    };
    let run = rig::run_guest(&rig, &config, |m, memory| host.on_marker(m, memory))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        host.stops,
        [
            "MAPPED",
            "UNMAPPED",
            "GROUP_ATTACHED",
            "GROUP_RELEASED",
            "GROUP_REATTACHED",
            "GROUP_DONE"
        ]
    );

    // Scenario 1: the driver probed and read our config space.
    let iommu = run.find("IOMMU").expect("IOMMU marker");
    assert_eq!(iommu.get("probed").unwrap(), "1");
    assert_eq!(iommu.u64("input_bits").unwrap(), 48, "from our input_range");
    assert_eq!(
        iommu.get("page_mask").unwrap(),
        "0x1000",
        "from our page_size_mask"
    );
    // ... and put 00:05.0 alone, 00:06.0 and 00:06.1 together, into IOMMU groups.
    rig::assert_rig_groups(&run);

    // Scenario 2: the VFIO loop ran without error; the daemon counted it; nothing leaked.
    for name in ["map4k_x1", "map4k_x32", "map2m"] {
        let rate = run.bench(name).unwrap_or_else(|| panic!("no BENCH {name}"));
        eprintln!("daemon {name}: {rate:.0} map+unmap pairs/s (functional run, small counts)");
    }
    let stats = host.final_stats.expect("stats at GROUP_DONE");
    let count = |t: &str, s: &str| stats["requests"][t][s].as_u64().unwrap_or(0);
    let vfio_maps = config.n4k + 32 * config.rounds32 + config.n2m;
    assert!(count("map", "ok") >= vfio_maps, "{stats}");
    assert!(count("unmap", "ok") >= vfio_maps, "{stats}");
    for t in ["attach", "detach", "map", "unmap", "probe"] {
        let errors: u64 = stats["requests"][t]
            .as_object()
            .unwrap()
            .iter()
            .filter(|(status, _)| *status != "ok")
            .map(|(_, n)| n.as_u64().unwrap())
            .sum();
        assert_eq!(errors, 0, "{t} errors: {stats}");
    }
    assert!(count("probe", "ok") >= 3, "one PROBE per endpoint: {stats}");
    assert!(count("attach", "ok") >= 5, "{stats}");
    assert_eq!(stats["malformed_chains"], 0);
    // After every claim/release cycle only the groups' default domains are left, empty.
    let domains = host.final_domains.unwrap();
    let domains = domains["domains"].as_array().unwrap();
    assert!(domains.len() <= 2, "leaked domains: {domains:?}");
    assert!(
        domains.iter().all(|d| d["mappings"] == 0),
        "leaked mappings: {domains:?}"
    );

    // Scenario 4: the fault we provoked at UNMAPPED reached the guest's driver.
    let fault_line = format!("page fault from EP {EP} at");
    assert!(
        run.dmesg.iter().any(|l| l.contains(&fault_line)),
        "no '{fault_line}' in the guest's dmesg: {:#?}",
        run.dmesg
    );
    assert!(
        stats["faults"]["delivered"].as_u64().unwrap() >= 1,
        "{stats}"
    );
    eprintln!("guest run took {:.1?}", run.elapsed);
}

/// libvirt's q35 layout: an endpoint behind a `pcie-root-port` (bus 1, outside the first
/// defaults' bus 0), bound to vfio-pci in the guest and mapped through VFIO, served by the daemon
/// with its default options and described to the guest by the VIOT the README's `viot` command
/// writes. Every page the guest maps translates on the host side to the GPA the guest reports.
#[test]
fn root_port_endpoint_with_the_defaults() {
    let Some(rig) = Rig::get("root_port_endpoint_with_the_defaults") else {
        return;
    };
    let daemon = Daemon::start(&[]);
    let out = Command::new(env!("CARGO_BIN_EXE_vhost-device-iommu"))
        .args(rig::README_VIOT_ARGS)
        .current_dir(daemon.dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let viot = daemon.dir.path().join("viot.bin");
    let table = std::fs::read(&viot).unwrap();

    let mut config = GuestConfig::new(Iommu::VhostUser {
        socket: daemon.socket.clone(),
    });
    config.viot = Some(viot);
    config.extra_args = rig::ROOT_PORT_ARGS.iter().map(|a| a.to_string()).collect();
    config.vfio = vec![rig::ROOT_PORT_EP_BDF];
    config.ep = rig::ROOT_PORT_EP_BDF;
    config.steps = vec!["viot", "iommu", "groups", "bench", "host"];
    config.n4k = 200;
    config.rounds32 = 10;
    config.n2m = 10;
    let host = HostChecks {
        daemon: &daemon,
        group_domain_a: None,
        final_stats: None,
        final_domains: None,
        stops: Vec::new(),
    };
    const OWNER: u64 = 0xe2e0_0100;
    let mut translated = Vec::new();
    let run = rig::run_guest(&rig, &config, |m, memory| {
        match m.event.as_str() {
            "MAPPED" => {
                let ep = rig::endpoint_id(m.get("bdf")?)?;
                if ep >> 8 == 0 {
                    return Err(format!("{ep:#x} is on bus 0, not behind the root port"));
                }
                ok(daemon.control(json!({"cmd": "claim", "endpoint": ep, "cookie": OWNER})))?;
                if host.check_buffer(m, memory, ep, OWNER)?.is_none() {
                    return Err("a VFIO mapping translated without a domain".into());
                }
                translated.push(ep);
            }
            "UNMAPPED" => {
                let ep = rig::endpoint_id(m.get("bdf")?)?;
                let t = host.translate(ep, m.u64("iova")?, OWNER);
                if t["fault"] != "unmapped" {
                    return Err(format!("after UNMAP: {t}"));
                }
                ok(daemon.control(json!({"cmd": "release", "endpoint": ep, "cookie": OWNER})))?;
            }
            _ => {}
        }
        Ok(())
    })
    .unwrap_or_else(|e| panic!("{e}"));

    // The guest saw the README's table, probed the device and put the endpoint in a group.
    let seen = run.find("VIOT").expect("VIOT marker");
    let hex: String = table.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(seen.get("hex").unwrap(), hex, "the guest's VIOT");
    let iommu = run.find("IOMMU").expect("IOMMU marker");
    assert_eq!(iommu.get("probed").unwrap(), "1");
    let device = run
        .all("DEVICE")
        .find(|m| m.get("bdf").unwrap() == rig::ROOT_PORT_EP_BDF)
        .expect("DEVICE marker for the endpoint behind the root port");
    assert_eq!(device.get("driver").unwrap(), "vfio-pci", "{}", device.line);
    assert_eq!(
        device.get("parent").unwrap(),
        "0000:00:07.0",
        "behind the root port: {}",
        device.line
    );
    assert!(device.u64("group").is_ok(), "{}", device.line);
    assert_eq!(translated, [0x100], "the host translated for 01:00.0");

    // The VFIO loop went through the daemon without an error.
    let stats = daemon.stats();
    let count = |t: &str, s: &str| stats["requests"][t][s].as_u64().unwrap_or(0);
    let vfio_maps = config.n4k + 32 * config.rounds32 + config.n2m;
    assert!(count("map", "ok") >= vfio_maps, "{stats}");
    assert!(count("unmap", "ok") >= vfio_maps, "{stats}");
    for t in ["attach", "detach", "map", "unmap", "probe"] {
        let errors: u64 = stats["requests"][t]
            .as_object()
            .unwrap()
            .iter()
            .filter(|(status, _)| *status != "ok")
            .map(|(_, n)| n.as_u64().unwrap())
            .sum();
        assert_eq!(errors, 0, "{t} errors: {stats}");
    }
    let fault_line = "page fault from EP 256 at";
    assert!(
        run.dmesg.iter().any(|l| l.contains(fault_line)),
        "no '{fault_line}' in the guest's dmesg: {:#?}",
        run.dmesg
    );
    eprintln!("guest run took {:.1?}", run.elapsed);
}
