// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The device's life end to end: a Debian 6.12 guest holds VFIO mappings through our daemon
//! (in the single-endpoint group 00:05.0 and in the two-function group 00:06.x) while the host
//! pauses it, resets it, migrates it and restarts the daemon under it.
//!
//! - Stock QEMU 10.2: pause and resume (QMP `stop`/`cont`, twice while the guest waits and
//!   twice while it maps in a loop) keep every mapping; a guest reset (QMP `system_reset`;
//!   the generic device sends no RESET_DEVICE) gives the next boot a fresh device.
//! - The patched QEMU (scripts/qemu-patches): live migration to a second QEMU and daemon, then
//!   a migration to a file restored into a fresh QEMU and daemon; QEMU's built-in
//!   virtio-iommu migrated the same ways as the anchor; the daemon killed with SIGKILL and
//!   restarted with its `--state-file` while the guest holds mappings and while it maps in a
//!   loop, QEMU reconnecting (`reconnect-ms`).
//!
//! At every stop the host checks through the daemon's control socket that each page the guest
//! holds translates to the GPA the guest reported, and reads the guest's pattern there in guest
//! RAM (the RAM file of the QEMU running the guest); the guest counts the status of every
//! MAP/UNMAP it makes. Each migration prints a `MIGRATION ...` line (downtime, times, sizes;
//! `scripts/migration-bench.sh` collects them).

mod common;
#[path = "e2e/rig.rs"]
mod rig;

use std::{
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use common::Daemon;
use rig::{GuestConfig, Iommu, Marker, RamFile, Rig, Session};
use serde_json::{json, Value};
use vhost_device_iommu::viot::{build_viot, PciBdf};

const EP: u64 = 0x28;
const GROUP_EPS: [u64; 2] = [0x30, 0x31];
const EP_OWNER: u64 = 0xe2e0_0005;
const GROUP_OWNER: u64 = 0xe2e0_0006;
const PAGE: u64 = 4096;
const DAEMON_ARGS: [&str; 4] = [
    "--endpoints",
    "00:05.0,00:06.0-00:06.7",
    "--group",
    "00:06.0-00:06.7",
];
/// Where the guest's hold step maps its next buffers (`IOVA_HOLD_NEXT` in e2e-guest.c).
const IOVA_HOLD_NEXT: u64 = 0x7200_0000;

fn daemon(extra: &[&str]) -> Daemon {
    let mut args: Vec<&str> = DAEMON_ARGS.to_vec();
    args.extend_from_slice(extra);
    Daemon::start_logged(&args, "info")
}

/// The VIOT for the daemon's endpoints, in `dir`.
fn viot(dir: &Path) -> PathBuf {
    let table = build_viot(PciBdf::new(0, 4, 0).unwrap(), &rig::endpoint_viot_ranges()).unwrap();
    let path = dir.join("viot.bin");
    std::fs::write(&path, table).unwrap();
    path
}

/// The guest of these tests: probe, groups, then the hold step.
fn config(iommu: Iommu, viot: Option<PathBuf>, loop_ms: u64, extra: u64) -> GuestConfig {
    let mut config = GuestConfig::new(iommu);
    config.viot = viot;
    config.steps = vec!["iommu", "groups", "hold"];
    config.extra_append = vec![
        format!("e2e.hold_loop_ms={loop_ms}"),
        format!("e2e.hold_extra={extra}"),
    ];
    config
}

fn our_config(d: &Daemon, loop_ms: u64, extra: u64) -> GuestConfig {
    config(
        Iommu::VhostUser {
            socket: d.socket.clone(),
        },
        Some(viot(d.dir.path())),
        loop_ms,
        extra,
    )
}

fn ok(reply: Value) -> Result<Value, String> {
    if reply["ok"] == true {
        Ok(reply)
    } else {
        Err(format!("control socket: {reply}"))
    }
}

fn gpa_list(m: &Marker, key: &str) -> Result<Vec<u64>, String> {
    m.list(key)?
        .iter()
        .map(|g| u64::from_str_radix(g.trim_start_matches("0x"), 16).map_err(|e| e.to_string()))
        .collect()
}

/// One buffer the guest showed the host: where it is mapped and where it lives.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Buffer {
    endpoints: Vec<u64>,
    owner: u64,
    iova: u64,
    seed: u32,
    gpas: Vec<u64>,
}

/// The buffers of a HELD marker (the endpoint's and the group's), or of a HOLD_NEXT marker.
fn buffers(m: &Marker) -> Result<Vec<Buffer>, String> {
    let buffer = |prefix: &str, endpoints: &[u64], owner| -> Result<Buffer, String> {
        Ok(Buffer {
            endpoints: endpoints.to_vec(),
            owner,
            iova: m.u64(&format!("{prefix}_iova"))?,
            seed: m.u64(&format!("{prefix}_pattern"))? as u32,
            gpas: gpa_list(m, &format!("{prefix}_gpas"))?,
        })
    };
    Ok(vec![
        buffer("ep", &[EP], EP_OWNER)?,
        buffer("group", &GROUP_EPS, GROUP_OWNER)?,
    ])
}

/// Guest RAM holds each buffer's pattern at the GPAs the guest reported.
fn check_ram(memory: &RamFile, buffers: &[Buffer]) -> Result<(), String> {
    for b in buffers {
        for (i, &gpa) in b.gpas.iter().enumerate() {
            let want = rig::pattern(b.seed, i as u64 * PAGE, PAGE as usize);
            if memory.read(gpa, PAGE as usize)? != want {
                return Err(format!(
                    "guest RAM at GPA {gpa:#x}: not the pattern {:#x} of page {i}",
                    b.seed
                ));
            }
        }
    }
    Ok(())
}

/// Through the daemon's control socket, as a DMA master would (owner of the group): every page
/// of every buffer translates, on every endpoint of its group, to the GPA the guest reported,
/// and guest RAM there holds the guest's pattern.
fn check_daemon(d: &Daemon, memory: &RamFile, buffers: &[Buffer]) -> Result<(), String> {
    for b in buffers {
        let claim = json!({"cmd": "claim", "endpoint": b.endpoints[0], "cookie": b.owner});
        ok(d.control(claim))?;
        let result = (|| {
            for &e in &b.endpoints {
                for (i, &gpa) in b.gpas.iter().enumerate() {
                    let iova = b.iova + i as u64 * PAGE;
                    let t = d.control(json!({
                        "cmd": "translate", "endpoint": e, "iova": iova, "len": PAGE,
                        "access": "read", "owner": b.owner,
                    }));
                    if t["gpa"].as_u64() != Some(gpa) {
                        return Err(format!(
                            "endpoint {e:#x} IOVA {iova:#x}: the guest says GPA {gpa:#x}, the \
                             daemon {t}"
                        ));
                    }
                }
            }
            Ok(())
        })();
        ok(d.control(json!({"cmd": "release", "endpoint": b.endpoints[0], "cookie": b.owner})))?;
        result?;
    }
    check_ram(memory, buffers)
}

/// The daemon answered every request of the guest with OK, reported no fault, and never reset.
fn check_stats(d: &Daemon, what: &str) -> Result<Value, String> {
    let stats = d.stats();
    for t in ["attach", "detach", "map", "unmap", "probe"] {
        let errors: u64 = stats["requests"][t]
            .as_object()
            .map(|o| {
                o.iter()
                    .filter(|(s, _)| *s != "ok")
                    .map(|(_, n)| n.as_u64().unwrap_or(0))
                    .sum()
            })
            .unwrap_or(0);
        if errors != 0 {
            return Err(format!("{what}: {errors} {t} requests not OK: {stats}"));
        }
    }
    if stats["faults"]["reported"] != 0 {
        return Err(format!("{what}: faults reported: {stats}"));
    }
    if stats["resets"] != 0 {
        return Err(format!("{what}: the device was reset: {stats}"));
    }
    Ok(stats)
}

/// The loop's verdict: it ran, and every MAP/UNMAP succeeded.
fn check_loop(m: &Marker) -> Result<u64, String> {
    let pairs = m.u64("pairs")?;
    if m.u64("errors")? != 0 || pairs == 0 {
        return Err(format!("the guest's MAP/UNMAP loop: {}", m.line));
    }
    Ok(pairs)
}

/// No fault in the guest's kernel log, and its groups as expected.
fn check_guest(s: &Session<'_>) -> Result<(), String> {
    if let Some(l) = s.run.dmesg.iter().find(|l| l.contains("fault from")) {
        return Err(format!("the guest logged a fault: {l}"));
    }
    rig::assert_rig_groups(&s.run);
    Ok(())
}

/// Runs `scenario` on a session, panicking with the whole console on failure.
fn session(
    rig: &Rig,
    config: GuestConfig,
    scenario: impl FnOnce(&mut Session<'_>) -> Result<(), String>,
) -> Duration {
    let mut s = Session::start(rig, config, "A").unwrap_or_else(|e| panic!("{e}"));
    let t0 = Instant::now();
    if let Err(e) = scenario(&mut s) {
        panic!("{}", s.report(&e));
    }
    t0.elapsed()
}

/// Pause and resume (QMP `stop`/`cont`, what libvirt does for `virsh suspend`, snapshots
/// and managed save) on stock QEMU: twice while the guest waits holding its mappings, twice
/// while it maps and unmaps in a loop. QEMU stops the rings each time (GET_VRING_BASE), and
/// the device keeps everything.
#[test]
fn pause_and_resume_keep_the_guest_mappings() {
    let Some(rig) = Rig::get("pause_and_resume_keep_the_guest_mappings") else {
        return;
    };
    let d = daemon(&[]);
    let config = our_config(&d, 3000, 0);
    let took = session(&rig, config, |s| {
        let held = s.expect("HELD")?;
        let held_buffers = buffers(&held)?;
        let memory = s.vm(0).memory()?;
        check_daemon(&d, &memory, &held_buffers)?;
        for round in 0..2 {
            s.vm(0).execute("stop", json!({}))?;
            let status = s.vm(0).qmp()?.status()?;
            if status != "paused" {
                return Err(format!("round {round}: after stop the VM is {status}"));
            }
            check_daemon(&d, &memory, &held_buffers).map_err(|e| format!("paused: {e}"))?;
            s.vm(0).execute("cont", json!({}))?;
            check_daemon(&d, &memory, &held_buffers).map_err(|e| format!("resumed: {e}"))?;
        }
        s.go(&held)?;
        // Paused with requests in flight: the loop runs 3 s of guest time.
        for _ in 0..2 {
            thread::sleep(Duration::from_millis(400));
            s.vm(0).execute("stop", json!({}))?;
            thread::sleep(Duration::from_millis(200));
            check_daemon(&d, &memory, &held_buffers)
                .map_err(|e| format!("paused in the loop: {e}"))?;
            s.vm(0).execute("cont", json!({}))?;
        }
        let looped = s.expect("HOLD_LOOP")?;
        let pairs = check_loop(&looped)?;
        check_daemon(&d, &memory, &held_buffers)?;
        s.go(&looped)?;
        let next = s.expect("HOLD_NEXT")?;
        check_daemon(&d, &memory, &buffers(&next)?)?;
        s.go(&next)?;
        s.finish()?;
        check_guest(s)?;
        let stats = check_stats(&d, "after four pauses")?;
        eprintln!("pause/resume: {pairs} MAP/UNMAP pairs in the loop; daemon stats {stats}");
        Ok(())
    });
    eprintln!("pause_and_resume_keep_the_guest_mappings: {took:.1?}");
}

/// A guest reset on stock QEMU (QMP `system_reset`, with QEMU's generic device, which sends
/// no RESET_DEVICE): the next boot's driver starts its request queue on fresh rings, the
/// daemon sees the ring restart elsewhere and resets, and the second boot finds a device with
/// nothing of the first boot's left and runs its workload again.
#[test]
fn a_guest_reset_gives_the_next_boot_a_fresh_device() {
    let Some(rig) = Rig::get("a_guest_reset_gives_the_next_boot_a_fresh_device") else {
        return;
    };
    let d = daemon(&[]);
    let mut config = our_config(&d, 500, 0);
    config.no_reboot = false;
    let took = session(&rig, config, |s| {
        // First boot: everything held, the next buffers mapped too.
        let held = s.expect("HELD")?;
        let memory = s.vm(0).memory()?;
        check_daemon(&d, &memory, &buffers(&held)?)?;
        s.go(&held)?;
        let looped = s.expect("HOLD_LOOP")?;
        check_loop(&looped)?;
        s.go(&looped)?;
        let next = s.expect("HOLD_NEXT")?;
        check_daemon(&d, &memory, &buffers(&next)?)?;
        let first = check_stats(&d, "first boot")?;
        let first_mappings = first["mappings"].as_u64().unwrap_or(0);
        // The reset, instead of GO: the guest never unmaps.
        s.vm(0).execute("system_reset", json!({}))?;
        s.expect("INIT")?;
        // Second boot, holding its own buffers: the first boot's are gone.
        let held = s.expect("HELD")?;
        let stats = d.stats();
        if stats["resets"] != 1 {
            return Err(format!(
                "the ring restart was not taken for a reset: {stats}"
            ));
        }
        let domains = ok(d.control(json!({"cmd": "domains"})))?;
        for dom in domains["domains"].as_array().unwrap() {
            let id = dom["id"].as_u64().unwrap();
            let m = ok(d.control(json!({"cmd": "mappings", "domain": id})))?;
            let first_boot_only = m["mappings"]
                .as_array()
                .unwrap()
                .iter()
                .any(|m| m["virt_start"].as_u64() == Some(IOVA_HOLD_NEXT));
            if first_boot_only {
                return Err(format!(
                    "a mapping of the first boot survived the reset: {m}"
                ));
            }
        }
        // The second boot holds its two buffers; the first held those and the next two.
        if stats["mappings"].as_u64() >= Some(first_mappings) {
            return Err(format!(
                "{} mappings after the reset, {first_mappings} before: {stats}",
                stats["mappings"]
            ));
        }
        check_daemon(&d, &memory, &buffers(&held)?)?;
        s.go(&held)?;
        let looped = s.expect("HOLD_LOOP")?;
        check_loop(&looped)?;
        s.go(&looped)?;
        let next = s.expect("HOLD_NEXT")?;
        check_daemon(&d, &memory, &buffers(&next)?)?;
        s.go(&next)?;
        s.finish()?;
        check_guest(s)?;
        let inits = s.run.all("INIT").count();
        if inits != 2 {
            return Err(format!("{inits} boots"));
        }
        eprintln!("reset: daemon stats {}", d.stats());
        Ok(())
    });
    eprintln!("a_guest_reset_gives_the_next_boot_a_fresh_device: {took:.1?}");
}

/// Single-page mappings the guest adds to its held buffers in the migration runs: device state
/// worth comparing between our daemon and QEMU's built-in device.
const MIGRATION_EXTRA_PAGES: u64 = 1000;
/// Migrations here are local: bandwidth is not what is measured.
const MAX_BANDWIDTH: u64 = 4 << 30;
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(120);

/// What one migration cost, as `query-migrate` reports it on the source.
fn migration_line(device: &str, mode: &str, info: &Value, sizes: &str) -> String {
    format!(
        "MIGRATION device={device} mode={mode} downtime_ms={} total_ms={} setup_ms={} \
         ram_bytes={}{sizes}",
        info["downtime"], info["total-time"], info["setup-time"], info["ram"]["transferred"],
    )
}

/// Starts the guest's loop on QEMU `src`, migrates it live to QEMU `dst` (started with
/// `-incoming defer`) while the loop runs, and makes `dst` the active QEMU; `query-migrate`'s
/// last answer on the source.
fn migrate_live(
    s: &mut Session<'_>,
    held: &Marker,
    src: usize,
    dst: usize,
) -> Result<Value, String> {
    let uri = format!("unix:{}", s.vm(dst).dir.path().join("mig.sock").display());
    s.vm(dst)
        .execute("migrate-incoming", json!({ "uri": uri }))?;
    s.vm(src).execute(
        "migrate-set-parameters",
        json!({ "max-bandwidth": MAX_BANDWIDTH }),
    )?;
    s.go(held)?;
    // The guest is in its MAP/UNMAP loop when the migration starts and when it ends.
    thread::sleep(Duration::from_millis(300));
    s.vm(src).execute("migrate", json!({ "uri": uri }))?;
    let info = s.vm(src).qmp()?.wait_migration(MIGRATION_TIMEOUT)?;
    s.active = dst;
    let status = s
        .vm(dst)
        .qmp()?
        .wait_status_change("inmigrate", MIGRATION_TIMEOUT)?;
    if status != "running" {
        return Err(format!("the destination is {status} after the migration"));
    }
    Ok(info)
}

/// A migration through a file: the QEMU it was restored into (paused, not active yet),
/// `query-migrate` on the source, the device sections' sizes in the file, the file's size.
struct Restored {
    vm: usize,
    info: Value,
    sections: Vec<rig::Section>,
    file_bytes: u64,
}

/// Stops QEMU `src`, migrates it to a file, quits it, and (once `between` ran: the old daemon
/// goes, a fresh one comes) restores the file into a fresh QEMU started by `spawn`; the device
/// sections are those named like `section`.
fn migrate_through_a_file(
    s: &mut Session<'_>,
    src: usize,
    section: &str,
    between: impl FnOnce(),
    spawn: impl FnOnce(&mut Session<'_>) -> Result<usize, String>,
) -> Result<Restored, String> {
    let file = s.vm(src).dir.path().join("guest.mig");
    s.vm(src).execute("stop", json!({}))?;
    s.vm(src).execute(
        "migrate-set-parameters",
        json!({ "max-bandwidth": MAX_BANDWIDTH }),
    )?;
    s.vm(src).execute(
        "migrate",
        json!({ "uri": format!("file:{}", file.display()) }),
    )?;
    let info = s.vm(src).qmp()?.wait_migration(MIGRATION_TIMEOUT)?;
    let sizes = rig::migration_section_sizes(&file, section)?;
    let file_bytes = std::fs::metadata(&file).map_err(|e| e.to_string())?.len();
    s.vm(src).quit()?;
    between();
    let dst = spawn(s)?;
    s.vm(dst).execute(
        "migrate-incoming",
        json!({ "uri": format!("file:{}", file.display()) }),
    )?;
    let status = s
        .vm(dst)
        .qmp()?
        .wait_status_change("inmigrate", MIGRATION_TIMEOUT)?;
    if status != "paused" {
        return Err(format!("restored from the file, the VM is {status}"));
    }
    Ok(Restored {
        vm: dst,
        info,
        sections: sizes,
        file_bytes,
    })
}

fn sizes_text(sizes: &[rig::Section]) -> String {
    sizes
        .iter()
        .map(|s| {
            let fields: Vec<String> = s.fields.iter().map(|(f, b)| format!("{f}:{b}")).collect();
            format!(
                " section={} section_bytes={} fields={}",
                s.name,
                s.bytes,
                fields.join(",")
            )
        })
        .collect()
}

/// Live migration of a running guest with live VFIO mappings from QEMU A + daemon A to QEMU B
/// (`-incoming`) + daemon B, the guest mapping and unmapping in a loop across the switch-over;
/// then a migration of the paused guest to a file, restored into a fresh QEMU C + daemon C.
/// On B and on C the host finds every mapping, the guest carries on with every MAP/UNMAP OK,
/// and nothing was reset.
#[test]
fn live_migration_and_a_file_restore_carry_the_mappings() {
    let Some(rig) = Rig::get("live_migration_and_a_file_restore_carry_the_mappings") else {
        return;
    };
    let da = daemon(&[]);
    let mut config = our_config(&da, 4000, MIGRATION_EXTRA_PAGES);
    // Migrating the generic vhost-user device (scripts/qemu-patches/0001).
    config.qemu = rig::QemuBuild::Patched;
    let base = config.clone();
    let took = session(&rig, config, |s| {
        let held = s.expect("HELD")?;
        let held_buffers = buffers(&held)?;
        let extra = held.u64("extra")?;
        check_daemon(&da, &s.vm(0).memory()?, &held_buffers)?;
        let mappings = check_stats(&da, "A")?["mappings"].as_u64().unwrap_or(0);
        // (Besides the guest's default domains' own, if any.)
        if mappings < 2 + extra {
            return Err(format!("{mappings} mappings on A, {extra} extra + 2 held"));
        }

        // Live, A -> B, while the guest maps in its loop.
        let db = daemon(&[]);
        let mut cb = base.clone();
        cb.iommu = Iommu::VhostUser {
            socket: db.socket.clone(),
        };
        let b = s.spawn_with("B", &cb, &["-incoming", "defer"])?;
        let live = migrate_live(s, &held, 0, b)?;
        let saved_bytes = da.stats()["state"]["last_bytes"].as_u64().unwrap_or(0);
        let a_stats = da.stats();
        if a_stats["dirty_log"]["starts"] != 1 || a_stats["state"]["saved"] != 1 {
            return Err(format!("daemon A did not log and save once: {a_stats}"));
        }
        let looped = s.expect("HOLD_LOOP")?;
        let pairs = check_loop(&looped)?;
        let loop_ended_on = s.vm(s.last_from).label.clone();
        let memory_b = s.vm(b).memory()?;
        check_daemon(&db, &memory_b, &held_buffers).map_err(|e| format!("on B: {e}"))?;
        let b_stats = check_stats(&db, "B")?;
        if b_stats["state"]["loaded"] != 1 || b_stats["mappings"] != mappings {
            return Err(format!("daemon B: {b_stats}"));
        }
        s.go(&looped)?;
        let next = s.expect("HOLD_NEXT")?;
        let next_buffers = buffers(&next)?;
        check_daemon(&db, &memory_b, &next_buffers)?;
        eprintln!(
            "{} daemon_state_bytes={saved_bytes} loop_pairs={pairs} loop_ended_on={loop_ended_on}",
            migration_line("ours", "live", &live, "")
        );

        // To a file, and into a fresh QEMU C + daemon C.
        let dc = daemon(&[]);
        let mut cc = base.clone();
        cc.iommu = Iommu::VhostUser {
            socket: dc.socket.clone(),
        };
        let restored = migrate_through_a_file(
            s,
            b,
            "vhost-user-test-device",
            || drop(db),
            |s| s.spawn_with("C", &cc, &["-incoming", "defer"]),
        )?;
        let c = restored.vm;
        let memory_c = s.vm(c).memory()?;
        check_daemon(&dc, &memory_c, &held_buffers).map_err(|e| format!("on C: {e}"))?;
        check_daemon(&dc, &memory_c, &next_buffers).map_err(|e| format!("on C: {e}"))?;
        s.vm(c).execute("cont", json!({}))?;
        s.active = c;
        s.go(&next)?;
        s.finish()?;
        check_guest(s)?;
        let c_stats = check_stats(&dc, "C")?;
        if c_stats["state"]["loaded"] != 1 {
            return Err(format!("daemon C: {c_stats}"));
        }
        eprintln!(
            "{} file_bytes={}",
            migration_line(
                "ours",
                "file",
                &restored.info,
                &sizes_text(&restored.sections)
            ),
            restored.file_bytes
        );
        Ok(())
    });
    eprintln!("live_migration_and_a_file_restore_carry_the_mappings: {took:.1?}");
}

/// The anchor: the same guest behind QEMU's built-in virtio-iommu, on the same (patched) QEMU
/// binary, migrated the same ways. Its state is in QEMU; the host checks the guest's RAM on
/// the destination and the guest checks its MAP/UNMAP statuses.
#[test]
fn builtin_virtio_iommu_migrates_the_same_way() {
    let Some(rig) = Rig::get("builtin_virtio_iommu_migrates_the_same_way") else {
        return;
    };
    let mut config = config(Iommu::Builtin, None, 4000, MIGRATION_EXTRA_PAGES);
    // The same binary as the daemon's migration runs (the built-in device needs no patch).
    config.qemu = rig::QemuBuild::Patched;
    let took = session(&rig, config, |s| {
        let held = s.expect("HELD")?;
        let held_buffers = buffers(&held)?;
        check_ram(&s.vm(0).memory()?, &held_buffers)?;
        let b = s.spawn("B", &["-incoming", "defer"])?;
        let live = migrate_live(s, &held, 0, b)?;
        let looped = s.expect("HOLD_LOOP")?;
        let pairs = check_loop(&looped)?;
        let loop_ended_on = s.vm(s.last_from).label.clone();
        check_ram(&s.vm(b).memory()?, &held_buffers)?;
        s.go(&looped)?;
        let next = s.expect("HOLD_NEXT")?;
        check_ram(&s.vm(b).memory()?, &buffers(&next)?)?;
        eprintln!(
            "{} loop_pairs={pairs} loop_ended_on={loop_ended_on}",
            migration_line("builtin", "live", &live, "")
        );
        let restored = migrate_through_a_file(
            s,
            b,
            "virtio-iommu",
            || {},
            |s| s.spawn("C", &["-incoming", "defer"]),
        )?;
        let c = restored.vm;
        check_ram(&s.vm(c).memory()?, &held_buffers)?;
        s.vm(c).execute("cont", json!({}))?;
        s.active = c;
        s.go(&next)?;
        s.finish()?;
        check_guest(s)?;
        eprintln!(
            "{} file_bytes={}",
            migration_line(
                "builtin",
                "file",
                &restored.info,
                &sizes_text(&restored.sections)
            ),
            restored.file_bytes
        );
        Ok(())
    });
    eprintln!("builtin_virtio_iommu_migrates_the_same_way: {took:.1?}");
}

/// Waits until the daemon serves a frontend again (QEMU reconnected).
fn wait_reconnected(d: &Daemon) {
    d.wait_stats("QEMU to reconnect", |s| s["connections"] == 1);
}

/// The daemon killed with SIGKILL and started again with the same `--state-file` while the
/// guest holds mappings, then twice while the guest maps and unmaps in a loop: QEMU reconnects
/// (`reconnect-ms`, scripts/qemu-patches/0002), the restarted daemon has every mapping, and
/// every MAP/UNMAP of the guest is answered OK, at most once each.
#[test]
fn a_restarted_daemon_carries_on_under_qemu_reconnect() {
    let Some(rig) = Rig::get("a_restarted_daemon_carries_on_under_qemu_reconnect") else {
        return;
    };
    let state = tempfile::tempdir().unwrap();
    let state_file = state.path().join("viommu.state");
    let mut d = daemon(&["--state-file", state_file.to_str().unwrap()]);
    let mut config = our_config(&d, 6000, 0);
    config.qemu = rig::QemuBuild::Patched;
    config.reconnect_ms = Some(200);
    let took = session(&rig, config, |s| {
        let held = s.expect("HELD")?;
        let held_buffers = buffers(&held)?;
        let memory = s.vm(0).memory()?;
        check_daemon(&d, &memory, &held_buffers)?;
        let t = Instant::now();
        d.kill_and_restart();
        check_daemon(&d, &memory, &held_buffers).map_err(|e| format!("restarted: {e}"))?;
        wait_reconnected(&d);
        eprintln!(
            "restart while holding: QEMU reconnected after {:.2?}",
            t.elapsed()
        );
        s.go(&held)?;
        let mut replayed = 0;
        for round in 0..2 {
            thread::sleep(Duration::from_millis(1200));
            replayed += d.stats()["state"]["replayed"].as_u64().unwrap_or(0);
            let t = Instant::now();
            d.kill_and_restart();
            wait_reconnected(&d);
            eprintln!(
                "restart {round} in the loop: QEMU reconnected after {:.2?}",
                t.elapsed()
            );
            check_daemon(&d, &memory, &held_buffers)
                .map_err(|e| format!("restart {round} in the loop: {e}"))?;
        }
        let looped = s.expect("HOLD_LOOP")?;
        let pairs = check_loop(&looped)?;
        check_daemon(&d, &memory, &held_buffers)?;
        s.go(&looped)?;
        let next = s.expect("HOLD_NEXT")?;
        check_daemon(&d, &memory, &buffers(&next)?)?;
        s.go(&next)?;
        s.finish()?;
        check_guest(s)?;
        let stats = check_stats(&d, "the last daemon")?;
        replayed += stats["state"]["replayed"].as_u64().unwrap_or(0);
        eprintln!(
            "restart: {pairs} MAP/UNMAP pairs in the loop across 2 restarts, {replayed} \
             requests answered again from the state file"
        );
        Ok(())
    });
    eprintln!("a_restarted_daemon_carries_on_under_qemu_reconnect: {took:.1?}");
}
