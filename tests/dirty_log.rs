// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The dirty-page log of live migration over a real vhost-user socket, driven by the rust-vmm
//! `vhost` frontend as QEMU drives it: LOG_SHMFD negotiated, SET_LOG_BASE with a memfd,
//! SET_FEATURES with `VHOST_F_LOG_ALL`. Every page the daemon writes (replies, used rings,
//! fault records, on the ring fast path and through virtio-queue) must then be marked in the
//! log, or a migrated guest would find stale memory on the destination.
//!
//! Each round stages its requests in the ring, takes a copy of all of guest memory and clears
//! the log, lets the device run, and checks the log two ways: every page the device must have
//! written (the writable buffers up to the used length, the used elements, the used index) is
//! marked; and every page that changed, outside what the driver itself writes meanwhile (its
//! descriptor tables and available rings), is marked.

mod common;

use std::{
    collections::BTreeSet,
    fs::File,
    os::{fd::AsRawFd, unix::fs::FileExt},
    time::Duration,
};

use common::*;
use serde_json::json;
use vhost::{
    vhost_user::{message::VhostUserVirtioFeatures, VhostUserProtocolFeatures},
    VhostBackend, VhostUserDirtyLogRegion,
};
use vhost_iommu_testkit::{Chain, Completion, Driver, MemoryRegion, Options, Virtqueue, WaitMode};
use virtio::Status;

const PAGE: u64 = 4096;
/// Guest RAM: two regions with a hole, as a VMM lays out RAM around a PCI hole.
const REGIONS: [MemoryRegion; 2] = [
    MemoryRegion::new(0, 8 << 20),
    MemoryRegion::new(16 << 20, 8 << 20),
];
const EP: u32 = 0x28;
const WAIT: Duration = Duration::from_secs(10);

/// The frontend's log: one bit per 4 KiB page of guest-physical addresses, in a memfd.
struct Log {
    file: File,
    bytes: usize,
}

impl Log {
    fn new() -> Log {
        let top = REGIONS.iter().map(|r| r.end()).max().unwrap();
        let bytes = (top / PAGE).div_ceil(8) as usize;
        // SAFETY: a static NUL-terminated name and no flags; the result is checked.
        let fd = unsafe { libc::memfd_create(c"dirty-log".as_ptr(), 0) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` is a new descriptor nothing else owns.
        let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        file.set_len(bytes as u64).unwrap();
        Log { file, bytes }
    }

    fn clear(&self) {
        self.file.write_all_at(&vec![0; self.bytes], 0).unwrap();
    }

    /// The pages whose bits are set.
    fn pages(&self) -> BTreeSet<u64> {
        let mut buf = vec![0u8; self.bytes];
        self.file.read_exact_at(&mut buf, 0).unwrap();
        (0..self.bytes as u64 * 8)
            .filter(|&bit| buf[(bit / 8) as usize] & (1 << (bit % 8)) != 0)
            .collect()
    }
}

fn options() -> Options {
    let mut o = Options {
        memory: REGIONS.to_vec(),
        ..Options::default()
    };
    o.protocol_features |= VhostUserProtocolFeatures::LOG_SHMFD;
    o
}

/// SET_FEATURES with the features the device was set up with, and `VHOST_F_LOG_ALL` if `log`.
fn set_log_all(dev: &mut Driver, log: bool) {
    let mut features = dev.options().features_to_ack(dev.negotiated().features);
    if log {
        features |= VhostUserVirtioFeatures::LOG_ALL.bits();
    }
    dev.connection().frontend().set_features(features).unwrap();
}

/// SET_LOG_BASE with the log's memfd, as QEMU sends it (LOG_SHMFD).
fn set_log_base(dev: &mut Driver, log: &Log) {
    let region = VhostUserDirtyLogRegion {
        mmap_size: log.bytes as u64,
        mmap_offset: 0,
        mmap_handle: log.file.as_raw_fd(),
    };
    dev.connection()
        .frontend()
        .set_log_base(0, Some(region))
        .unwrap();
}

/// A copy of all of guest memory, region by region.
fn snapshot(dev: &Driver) -> Vec<(u64, Vec<u8>)> {
    REGIONS
        .iter()
        .map(|r| (r.gpa, dev.memory().read(r.gpa, r.size as usize).unwrap()))
        .collect()
}

/// The pages that differ between two snapshots.
fn changed(before: &[(u64, Vec<u8>)], after: &[(u64, Vec<u8>)]) -> BTreeSet<u64> {
    let mut pages = BTreeSet::new();
    for ((gpa, a), (_, b)) in before.iter().zip(after) {
        for (i, (pa, pb)) in a
            .chunks(PAGE as usize)
            .zip(b.chunks(PAGE as usize))
            .enumerate()
        {
            if pa != pb {
                pages.insert(gpa / PAGE + i as u64);
            }
        }
    }
    pages
}

fn pages_of(addr: u64, len: u64) -> impl Iterator<Item = u64> {
    let last = (addr + len.max(1) - 1) / PAGE;
    addr / PAGE..=last
}

/// Pages the driver writes while the device runs (its descriptor tables and available rings:
/// used_event, indices), left out of the "changed" check.
fn driver_pages(q: &Virtqueue) -> BTreeSet<u64> {
    let n = u64::from(q.size());
    pages_of(q.desc_table_addr(), 16 * n)
        .chain(pages_of(q.avail_addr(), 6 + 2 * n))
        .collect()
}

/// Pages of a queue's used ring.
fn used_ring_pages(q: &Virtqueue) -> BTreeSet<u64> {
    pages_of(q.used_addr(), 6 + 8 * u64::from(q.size())).collect()
}

/// The pages the device must have written to complete `done` (in completion order, the first
/// at used position `first`): each writable buffer up to the used length, each used element,
/// the used index.
fn written_pages(q: &Virtqueue, first: u16, done: &[Completion]) -> BTreeSet<u64> {
    let mut pages = BTreeSet::new();
    let used = q.used_addr();
    pages.extend(pages_of(used + 2, 2));
    for (i, c) in done.iter().enumerate() {
        let slot = u64::from(first.wrapping_add(i as u16) % q.size());
        pages.extend(pages_of(used + 4 + 8 * slot, 8));
        let mut left = u64::from(c.used_len);
        for &(addr, len) in &c.writable {
            let n = left.min(u64::from(len));
            if n > 0 {
                pages.extend(pages_of(addr, n));
            }
            left -= n;
        }
        assert_eq!(left, 0, "used length past the writable buffers");
    }
    pages
}

/// Checks a round: what the device must have written and everything that changed outside the
/// driver's own pages is marked; nothing outside what changed and the used rings is.
fn check_round(
    what: &str,
    log: &Log,
    must: &BTreeSet<u64>,
    before: &[(u64, Vec<u8>)],
    after: &[(u64, Vec<u8>)],
    driver: &BTreeSet<u64>,
    used_rings: &BTreeSet<u64>,
) {
    let changed = changed(before, after);
    let want: BTreeSet<u64> = changed
        .iter()
        .filter(|p| !driver.contains(p))
        .chain(must)
        .copied()
        .collect();
    // A page is marked just after it is written: the driver may see a used index a moment
    // before its mark lands (QEMU reads the log only once the device stopped).
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    let mut dirty = log.pages();
    while !want.is_subset(&dirty) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
        dirty = log.pages();
    }
    let missing: Vec<_> = must.difference(&dirty).collect();
    assert!(
        missing.is_empty(),
        "{what}: pages the device wrote but did not log: {missing:x?} (logged {dirty:x?})"
    );
    let unlogged: Vec<_> = changed
        .iter()
        .filter(|p| !driver.contains(p) && !dirty.contains(p))
        .collect();
    assert!(
        unlogged.is_empty(),
        "{what}: pages that changed but were not logged: {unlogged:x?}"
    );
    let extra: Vec<_> = dirty
        .iter()
        .filter(|p| !changed.contains(p) && !used_rings.contains(p) && !must.contains(p))
        .collect();
    assert!(
        extra.is_empty(),
        "{what}: pages logged that the device had no business writing: {extra:x?}"
    );
}

/// Stages `chains` on the request queue, runs them as one kick, checks the log.
fn round(dev: &mut Driver, log: &Log, what: &str, chains: &[Chain<'_>]) -> Vec<Completion> {
    let q = dev.requestq();
    q.hold_avail(true);
    for c in chains {
        q.post_chain(c).unwrap();
    }
    let first = q.last_used_idx();
    let driver: BTreeSet<u64> = {
        let (rq, eq, _) = dev.parts();
        driver_pages(rq).union(&driver_pages(eq)).copied().collect()
    };
    let used_rings: BTreeSet<u64> = {
        let (rq, eq, _) = dev.parts();
        used_ring_pages(rq)
            .union(&used_ring_pages(eq))
            .copied()
            .collect()
    };
    // Cleared first: a late write of the previous round's is then logged, in a used ring.
    log.clear();
    let before = snapshot(dev);
    let q = dev.requestq();
    q.hold_avail(false);
    q.publish_avail().unwrap();
    q.kick().unwrap();
    let mut done = Vec::new();
    q.wait_n(chains.len(), WaitMode::Poll, WAIT, &mut done)
        .unwrap();
    let must = written_pages(dev.requestq(), first, &done);
    let after = snapshot(dev);
    check_round(what, log, &must, &before, &after, &driver, &used_rings);
    for c in &done {
        assert_eq!(status(c), Status::Ok, "{what}");
    }
    done
}

/// MAPs of `n` pages (one request each), a PROBE, and UNMAPs of the same pages.
fn load(dev: &mut Driver, log: &Log, what: &str, base: u64, n: u64, indirect: bool) {
    let maps: Vec<Vec<u8>> = (0..n)
        .map(|i| {
            let iova = base + i * PAGE;
            map(1, iova, iova + PAGE - 1, 0x40_0000 + i * PAGE).encode()
        })
        .collect();
    let unmaps: Vec<Vec<u8>> = (0..n)
        .map(|i| unmap(1, base + i * PAGE, base + (i + 1) * PAGE - 1).encode())
        .collect();
    let probe = probe(EP).encode();
    fn chain(bytes: &[u8], writable: usize, indirect: bool) -> Chain<'_> {
        let c = Chain::request(bytes, writable);
        if indirect {
            c.indirect()
        } else {
            c
        }
    }
    let mut chains: Vec<Chain<'_>> = maps.iter().map(|m| chain(m, 4, indirect)).collect();
    chains.push(chain(&probe, PROBE_SIZE as usize + 4, indirect));
    round(dev, log, &format!("{what}: MAP + PROBE"), &chains);
    let chains: Vec<Chain<'_>> = unmaps.iter().map(|m| chain(m, 4, indirect)).collect();
    round(dev, log, &format!("{what}: UNMAP"), &chains);
}

#[test]
fn every_page_the_daemon_writes_is_logged() {
    let d = Daemon::start(&[]);
    let mut dev = d.connect_with(options());
    assert!(
        dev.negotiated().features & VhostUserVirtioFeatures::LOG_ALL.bits() != 0,
        "the daemon offers VHOST_F_LOG_ALL"
    );
    assert_eq!(status_of(&mut dev, &attach(1, EP)), Status::Ok);
    let log = Log::new();
    set_log_base(&mut dev, &log);
    set_log_all(&mut dev, true);
    assert_eq!(d.stats()["dirty_log"]["on"], true);

    // The ring fast path: direct chains, most of the queue in one kick.
    load(&mut dev, &log, "fast path", 0x100_0000, 120, false);
    // virtio-queue's path: indirect chains, and replies split over buffers across pages.
    load(&mut dev, &log, "indirect", 0x200_0000, 40, true);
    let m = map(1, 0x300_0000, 0x300_0fff, 0x1000).encode();
    let split = Chain::new().readable(&m).writable_split(4, 4);
    let probe = probe(EP).encode();
    let probe_split = Chain::new()
        .readable(&probe)
        .writable_split(PROBE_SIZE as usize + 4, 3);
    round(&mut dev, &log, "split replies", &[split, probe_split]);

    // A fault record written into an event buffer, and the event queue's used ring.
    let claim = json!({"cmd": "claim", "endpoint": EP, "cookie": 77});
    assert_eq!(d.control(claim)["ok"], true);
    let driver: BTreeSet<u64> = {
        let (rq, eq, _) = dev.parts();
        driver_pages(rq).union(&driver_pages(eq)).copied().collect()
    };
    let used_rings: BTreeSet<u64> = {
        let (rq, eq, _) = dev.parts();
        used_ring_pages(rq)
            .union(&used_ring_pages(eq))
            .copied()
            .collect()
    };
    let first = dev.eventq().last_used_idx();
    log.clear();
    let before = snapshot(&dev);
    let tr = json!({"cmd": "translate", "endpoint": EP, "iova": 0x7000_0008u64, "access": "write", "owner": 77});
    assert_eq!(d.control(tr)["fault"], "unmapped");
    // Reaped without re-posting a buffer: the driver writes nothing meanwhile.
    let event = dev.eventq().wait(WaitMode::Poll, WAIT).unwrap();
    assert_eq!(event.used_len, 24);
    let must = written_pages(dev.eventq(), first, std::slice::from_ref(&event));
    let after = snapshot(&dev);
    check_round(
        "fault record",
        &log,
        &must,
        &before,
        &after,
        &driver,
        &used_rings,
    );

    // The memory table sent again (new regions in the daemon): still logged.
    let mem = dev.memory().clone();
    dev.connection().set_mem_table(&mem).unwrap();
    load(
        &mut dev,
        &log,
        "after a new memory table",
        0x400_0000,
        20,
        false,
    );

    // A VM stop and resume while migrating (GET_VRING_BASE, then the rings again, and, as
    // QEMU's vhost_dev_start does while logging, LOG_ALL and the log again).
    let bases = dev.stop().unwrap();
    dev.resume(bases).unwrap();
    set_log_all(&mut dev, true);
    set_log_base(&mut dev, &log);
    load(&mut dev, &log, "after a stop", 0x500_0000, 20, false);

    // The migration ends: SET_FEATURES without LOG_ALL. Nothing is logged any more.
    set_log_all(&mut dev, false);
    assert_eq!(d.stats()["dirty_log"]["on"], false);
    log.clear();
    for i in 0..50u64 {
        let iova = 0x600_0000 + i * PAGE;
        assert_eq!(
            status_of(&mut dev, &map(1, iova, iova + PAGE - 1, 0x1000)),
            Status::Ok
        );
    }
    assert_eq!(
        log.pages(),
        BTreeSet::new(),
        "logged after LOG_ALL was cleared"
    );
    let stats = d.stats();
    // Twice: the stop and resume above cleared LOG_ALL and set it again.
    assert_eq!(stats["dirty_log"]["starts"], 2, "{stats}");
}

/// Without a log nothing is marked and nothing breaks; a device state saved while logging
/// carries the driver's features only (`VHOST_F_LOG_ALL` is the frontend's, not the guest's),
/// so another daemon loads it.
#[test]
fn log_all_is_no_guest_feature() {
    use std::{io::Read, os::fd::OwnedFd, os::unix::net::UnixStream};
    use vhost::vhost_user::message::{VhostTransferStateDirection, VhostTransferStatePhase};
    use vhost::vhost_user::VhostUserFrontend;

    let d = Daemon::start(&[]);
    let mut o = options();
    o.protocol_features |= VhostUserProtocolFeatures::DEVICE_STATE;
    let mut dev = d.connect_with(o.clone());
    assert_eq!(status_of(&mut dev, &attach(1, EP)), Status::Ok);
    assert_eq!(
        status_of(&mut dev, &map(1, 0x1000, 0x1fff, 0x5000)),
        Status::Ok
    );
    let log = Log::new();
    set_log_base(&mut dev, &log);
    set_log_all(&mut dev, true);
    dev.stop().unwrap();
    let (mut reader, writer) = UnixStream::pair().unwrap();
    dev.connection()
        .frontend()
        .set_device_state_fd(
            VhostTransferStateDirection::SAVE,
            VhostTransferStatePhase::STOPPED,
            OwnedFd::from(writer),
        )
        .unwrap();
    let mut blob = Vec::new();
    reader.read_to_end(&mut blob).unwrap();
    dev.connection().frontend().check_device_state().unwrap();

    let d2 = Daemon::start(&[]);
    let mut dev2 = d2.connect_with(o);
    dev2.stop().unwrap();
    let (reader, mut writer) = UnixStream::pair().unwrap();
    dev2.connection()
        .frontend()
        .set_device_state_fd(
            VhostTransferStateDirection::LOAD,
            VhostTransferStatePhase::STOPPED,
            OwnedFd::from(reader),
        )
        .unwrap();
    std::io::Write::write_all(&mut writer, &blob).unwrap();
    drop(writer);
    dev2.connection()
        .frontend()
        .check_device_state()
        .unwrap_or_else(|e| panic!("the state saved while logging loads: {e}"));
    let t = d2.control(json!({"cmd": "claim", "endpoint": EP, "cookie": 5}));
    assert_eq!(t["ok"], true);
    let t = d2.control(json!({"cmd": "translate", "endpoint": EP, "iova": 0x1008, "owner": 5}));
    assert_eq!(t["gpa"], 0x5008, "{t}");
    assert_eq!(d2.stats()["dirty_log"]["on"], false);
}
