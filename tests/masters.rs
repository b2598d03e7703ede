// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! DMA masters in other processes (`--master-socket`, the vhost-iommu-client crate) against
//! the real daemon binary over real sockets, next to a guest driver (the testkit) over
//! vhost-user: translations, the IOMMU's promise across processes (UNMAP, DETACH, ATTACH
//! elsewhere and reset are answered only once no master can still reach the old pages),
//! masters that stall, die and reconnect, ownership, faults, virtio-queue over
//! `IommuMemory`, and hostile messages.
//!
//! Masters run as threads of this process (fast) and as child processes (this test binary
//! run again as `child_master`, killed with SIGKILL).

mod common;

use std::{
    io::{BufRead, BufReader, Read, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc, Arc,
    },
    thread,
    time::{Duration, Instant},
};

use common::{attach, detach, map, send, status, status_of, unmap, Daemon};
use serde_json::Value;
use tempfile::TempDir;
use vhost_iommu_client::{
    wire::{self, ErrorCode},
    Access, Error, Fault, Master,
};
use vhost_iommu_testkit::{Driver, Options};
use virtio::{
    FaultReason, FaultRecord, MapFlags, Request, Status, FAULT_F_ADDRESS, FAULT_F_READ,
    FAULT_F_WRITE, FAULT_SIZE,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, IommuMemory};

/// 00:05.0, 00:06.0 and 00:07.0: groups of their own.
const EP: u32 = 0x28;
const EP2: u32 = 0x30;
const EP3: u32 = 0x38;
const PAGE: u64 = 4096;
const IOVA: u64 = 0x4000_0000;

/// The daemon with a master socket, and where it is.
struct Rig {
    daemon: Daemon,
    masters: PathBuf,
    _dir: TempDir,
}

impl Rig {
    fn start(stall_ms: u64, extra: &[&str]) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let masters = dir.path().join("masters.sock");
        let stall = stall_ms.to_string();
        let mut args = vec![
            "--master-socket",
            masters.to_str().unwrap(),
            "--master-stall-ms",
            &stall,
        ];
        args.extend_from_slice(extra);
        let daemon = Daemon::start(&args);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !masters.exists() {
            assert!(Instant::now() < deadline, "no master socket");
            thread::sleep(Duration::from_millis(5));
        }
        Rig {
            daemon,
            masters,
            _dir: dir,
        }
    }

    fn master(&self) -> Master {
        Master::connect(&self.masters).expect("a master connects")
    }

    fn masters_stats(&self) -> Value {
        self.daemon.stats()["masters"].clone()
    }

    /// Waits until `masters.<key>` is `value`.
    fn wait_masters(&self, key: &str, value: u64) -> Value {
        self.daemon
            .wait_stats(&format!("masters.{key} == {value}"), |s| {
                s["masters"][key] == value
            })
    }
}

fn ok(dev: &mut Driver, request: &Request) {
    assert_eq!(status_of(dev, request), Status::Ok, "{request:?}");
}

fn map_ro(domain: u32, start: u64, end: u64, phys: u64) -> Request {
    Request::Map {
        domain,
        virt_start: start,
        virt_end: end,
        phys_start: phys,
        flags: MapFlags {
            read: true,
            write: false,
            mmio: false,
        },
    }
}

/// The guest attaches `EP` to domain 1 and maps `pages` pages at `IOVA` to a fresh buffer;
/// returns the buffer's GPA.
fn guest_maps(dev: &mut Driver, pages: u64) -> u64 {
    let buf = dev.memory().alloc(pages * PAGE, PAGE).unwrap();
    ok(dev, &attach(1, EP));
    ok(dev, &map(1, IOVA, IOVA + pages * PAGE - 1, buf.addr));
    buf.addr
}

fn fault_of(dev: &mut Driver) -> FaultRecord {
    let c = dev
        .wait_event(Duration::from_secs(10))
        .expect("a fault record");
    assert_eq!(c.used_len as usize, FAULT_SIZE);
    FaultRecord::from_bytes(c.data[..FAULT_SIZE].try_into().unwrap()).unwrap()
}

#[test]
fn a_master_translates_what_the_guest_mapped_through_iommu_memory() {
    let rig = Rig::start(10_000, &[]);
    let mut dev = rig.daemon.connect();
    let gpa = guest_maps(&mut dev, 2);
    let ro = dev.memory().alloc(PAGE, PAGE).unwrap().addr;
    ok(&mut dev, &map_ro(1, IOVA + 0x10_0000, IOVA + 0x10_0fff, ro));
    dev.memory().write(gpa, b"written by the guest").unwrap();
    dev.memory().write(ro, b"read only").unwrap();

    let master = rig.master();
    let endpoint = master.claim(EP, 0x5eed).unwrap();
    assert_eq!(endpoint.id(), EP);
    assert_eq!(endpoint.reserved_regions(), &[ownership::X86_MSI_REGION]);
    {
        let section = endpoint.section().unwrap();
        let t = section
            .translate(IOVA + 0x10, 0x10_0000, Access::Write)
            .unwrap();
        assert_eq!(t.gpa, gpa + 0x10);
        assert!(t.len >= PAGE - 0x10 && t.len <= 2 * PAGE - 0x10, "{t:?}");
        assert_eq!(t.domain, Some(1));
        let handle = section.handle().unwrap();
        assert_eq!(
            handle.translate(IOVA + 0x10, 0x10_0000, Access::Write),
            Ok(t)
        );
        section.finish().unwrap();
    }

    let mem = IommuMemory::new(dev.memory().mmap().clone(), endpoint, true, ());
    let mut read = [0u8; 20];
    mem.read_slice(&mut read, GuestAddress(IOVA)).unwrap();
    assert_eq!(&read, b"written by the guest");
    // Across the two pages, in both directions.
    mem.write_slice(b"written by the master", GuestAddress(IOVA + PAGE - 4))
        .unwrap();
    assert_eq!(
        dev.memory().read(gpa + PAGE - 4, 21).unwrap(),
        b"written by the master"
    );
    let mut ro_read = [0u8; 9];
    mem.read_slice(&mut ro_read, GuestAddress(IOVA + 0x10_0000))
        .unwrap();
    assert_eq!(&ro_read, b"read only");
    // The guest's permissions and holes hold.
    assert!(mem
        .write_slice(b"no", GuestAddress(IOVA + 0x10_0000))
        .is_err());
    assert!(mem
        .read_slice(&mut read, GuestAddress(IOVA + 2 * PAGE))
        .is_err());
    assert_eq!(dev.memory().read(ro, 9).unwrap(), b"read only");

    let stats = rig.masters_stats();
    assert_eq!(stats["connected"], 1, "{stats}");
    assert_eq!(stats["endpoints"], 1, "{stats}");
    // The counters the master keeps in its slots page, as the daemon reads them: two
    // translations in the section, five through vm-memory (two of them refused), at least
    // one IOTLB miss; and what it holds, with the guest's MAPs on the endpoint's domain.
    let own = master.stats();
    assert!(
        own.translations >= 7 && own.refused >= 2 && own.iotlb_misses >= 1,
        "{own:?}"
    );
    assert_eq!(stats["translations"], own.translations, "{stats}");
    assert_eq!(stats["iotlb_misses"], own.iotlb_misses, "{stats}");
    assert_eq!(stats["translations_refused"], own.refused, "{stats}");
    let listed = &stats["list"][0];
    assert_eq!(listed["translations"], own.translations, "{stats}");
    assert_eq!(
        listed["endpoints"],
        serde_json::json!([{
            "endpoint": EP, "bdf": "00:05.0", "group": listed["endpoints"][0]["group"],
            "hold": "owner", "domain": 1, "maps": 2, "unmaps": 0,
        }]),
        "{stats}"
    );
    drop(mem);
    drop(master);
    rig.wait_masters("connected", 0);
    rig.wait_masters("endpoints", 0);
    // A master gone leaves its counts in the totals, and no entry in the list.
    let stats = rig.masters_stats();
    assert_eq!(stats["translations"], own.translations, "{stats}");
    assert_eq!(stats["list"], serde_json::json!([]), "{stats}");
}

/// How the guest takes a mapping away.
#[derive(Clone, Copy, Debug)]
enum TakeAway {
    Unmap,
    Detach,
    AttachElsewhere,
    Reset,
}

/// A master thread holds a section with a translation for HOLD; the guest takes the mapping
/// away meanwhile. The answer comes only after the section ended, and then the page is gone.
#[test]
fn the_answer_waits_for_a_master_section_and_then_the_old_pages_are_gone() {
    const HOLD: Duration = Duration::from_millis(300);
    let rig = Rig::start(30_000, &[]);
    let master = Arc::new(rig.master());
    for op in [
        TakeAway::Unmap,
        TakeAway::Detach,
        TakeAway::AttachElsewhere,
        TakeAway::Reset,
    ] {
        let mut dev = rig.daemon.connect();
        let gpa = guest_maps(&mut dev, 1);
        let endpoint = Arc::new(master.claim(EP, 7).unwrap());
        let (tx, rx) = mpsc::channel();
        let holder = {
            let endpoint = endpoint.clone();
            thread::spawn(move || {
                let section = endpoint.section().unwrap();
                let t = section.translate(IOVA, 8, Access::Read).unwrap();
                tx.send(t.gpa).unwrap();
                thread::sleep(HOLD);
                let left = Instant::now();
                section.finish().unwrap();
                left
            })
        };
        assert_eq!(rx.recv().unwrap(), gpa);
        let asked = Instant::now();
        match op {
            TakeAway::Unmap => ok(&mut dev, &unmap(1, IOVA, IOVA + PAGE - 1)),
            TakeAway::Detach => ok(&mut dev, &detach(1, EP)),
            TakeAway::AttachElsewhere => ok(&mut dev, &attach(2, EP)),
            TakeAway::Reset => dev.reset().unwrap(),
        }
        let answered = Instant::now();
        let left = holder.join().unwrap();
        assert!(
            answered >= left,
            "{op:?} answered {:?} before the section ended",
            left - answered
        );
        assert!(answered - asked >= HOLD / 2, "{op:?}");
        let expected = match op {
            TakeAway::Unmap | TakeAway::AttachElsewhere => Fault::Unmapped,
            TakeAway::Detach | TakeAway::Reset => Fault::NoDomain,
        };
        match endpoint.translate(IOVA, 8, Access::Read) {
            Err(Error::Fault(f)) => assert_eq!(f, expected, "{op:?}"),
            other => panic!("{op:?}: {other:?}"),
        }
        drop(endpoint);
        // The guest's next life starts clean.
        drop(dev);
    }
    assert_eq!(rig.masters_stats()["cut_off"], 0);
}

#[test]
fn a_stalled_master_is_cut_off_within_the_bound_and_the_unmap_completes() {
    let rig = Rig::start(100, &[]);
    let mut dev = rig.daemon.connect();
    guest_maps(&mut dev, 1);
    let master = rig.master();
    assert_eq!(master.stall_bound(), Duration::from_millis(100));
    let endpoint = Arc::new(master.claim(EP, 7).unwrap());
    let (entered_tx, entered_rx) = mpsc::channel();
    let (quit_tx, quit_rx) = mpsc::channel::<()>();
    let staller = {
        let endpoint = endpoint.clone();
        thread::spawn(move || {
            let section = endpoint.section().unwrap();
            section.translate(IOVA, 8, Access::Read).unwrap();
            entered_tx.send(()).unwrap();
            quit_rx.recv().unwrap();
            section.finish()
        })
    };
    entered_rx.recv().unwrap();
    let asked = Instant::now();
    ok(&mut dev, &unmap(1, IOVA, IOVA + PAGE - 1));
    let waited = asked.elapsed();
    assert!(waited >= Duration::from_millis(90), "{waited:?}");
    assert!(waited < Duration::from_secs(5), "{waited:?}");
    let stats = rig.wait_masters("cut_off", 1);
    assert_eq!(stats["masters"]["cut_off"], 1);
    rig.daemon
        .wait_for("the master sees it is revoked", || master.is_revoked());
    assert!(matches!(endpoint.section(), Err(Error::Revoked)));
    quit_tx.send(()).unwrap();
    assert!(matches!(staller.join().unwrap(), Err(Error::Revoked)));
    // Nothing left behind: the group can be claimed by another cookie.
    rig.wait_masters("connected", 0);
    rig.wait_masters("endpoints", 0);
    let other = rig.master();
    let endpoint2 = other.claim(EP, 8).unwrap();
    ok(&mut dev, &map(1, IOVA, IOVA + PAGE - 1, 0x10_0000));
    assert_eq!(
        endpoint2.translate(IOVA, 1, Access::Read).unwrap().gpa,
        0x10_0000
    );
    // Later UNMAPs do not wait for anyone.
    let asked = Instant::now();
    ok(&mut dev, &unmap(1, IOVA, IOVA + PAGE - 1));
    assert!(asked.elapsed() < Duration::from_secs(2));
    drop(endpoint);
}

// ---- child-process masters ---------------------------------------------------------------

const CHILD_ENV: &str = "VHOST_IOMMU_TEST_CHILD_MASTER";
const READY: &str = "child-master-ready";

/// Not a test on its own: the body of a master in a child process (this binary run again with
/// `CHILD_ENV=socket,endpoint,cookie`; cookie 0 means DMA-API use). It takes the endpoint,
/// enters a section, says `ready` and waits to be killed.
#[test]
fn child_master() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let mut parts = spec.split(',');
    let socket = parts.next().unwrap();
    let endpoint: u32 = parts.next().unwrap().parse().unwrap();
    let cookie: u64 = parts.next().unwrap().parse().unwrap();
    let master = Master::connect(socket).unwrap();
    let endpoint = if cookie == 0 {
        master.use_dma_api(endpoint).unwrap()
    } else {
        master.claim(endpoint, cookie).unwrap()
    };
    let section = endpoint.section().unwrap();
    let _ = section.translate(IOVA, 8, Access::Read);
    // libtest prints "test child_master ... " first, without a newline.
    println!("{READY}");
    std::io::stdout().flush().unwrap();
    loop {
        thread::sleep(Duration::from_secs(60));
    }
}

/// A master process holding a section, ready; killed when dropped.
struct ChildMaster(Child);

impl ChildMaster {
    fn start(socket: &Path, endpoint: u32, cookie: u64) -> ChildMaster {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "child_master",
                "--exact",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env(
                CHILD_ENV,
                format!("{},{endpoint},{cookie}", socket.display()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        loop {
            match lines.next() {
                Some(Ok(line)) if line.trim_end().ends_with(READY) => break,
                Some(Ok(_)) => continue,
                other => {
                    let _ = child.kill();
                    panic!("child master did not get ready: {other:?}");
                }
            }
        }
        ChildMaster(child)
    }

    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for ChildMaster {
    fn drop(&mut self) {
        self.kill();
    }
}

#[test]
fn a_master_killed_mid_dma_leaves_nothing_behind() {
    // A bound no test waits for: only the master's death can end the UNMAP's wait.
    let rig = Rig::start(30_000, &[]);
    let mut dev = rig.daemon.connect();
    guest_maps(&mut dev, 1);
    let mut child = ChildMaster::start(&rig.masters, EP, 77);
    assert_eq!(rig.masters_stats()["endpoints"], 1);
    let killer = thread::spawn(move || {
        thread::sleep(Duration::from_millis(300));
        child.kill();
        Instant::now()
    });
    let asked = Instant::now();
    ok(&mut dev, &unmap(1, IOVA, IOVA + PAGE - 1));
    let answered = Instant::now();
    let killed = killer.join().unwrap();
    assert!(answered >= killed, "answered before the master died");
    assert!(answered - asked < Duration::from_secs(10));
    rig.wait_masters("connected", 0);
    let stats = rig.wait_masters("endpoints", 0);
    assert_eq!(stats["masters"]["cut_off"], 0, "{stats}");
    // The exclusive claim died with it.
    let master = rig.master();
    let endpoint = master.claim(EP, 78).unwrap();
    assert!(matches!(
        endpoint.translate(IOVA, 1, Access::Read),
        Err(Error::Fault(Fault::Unmapped))
    ));
}

#[test]
fn exclusive_claims_are_exclusive_and_masters_reconnect() {
    let rig = Rig::start(10_000, &[]);
    let mut dev = rig.daemon.connect();
    let gpa = guest_maps(&mut dev, 1);
    let a = rig.master();
    let b = rig.master();
    let held = a.claim(EP, 1).unwrap();
    let refused = |r: Result<vhost_iommu_client::Endpoint, Error>| match r {
        Err(Error::Refused(code)) => code,
        other => panic!("{other:?}"),
    };
    assert_eq!(refused(b.claim(EP, 2)), ErrorCode::Busy);
    assert_eq!(refused(b.use_dma_api(EP)), ErrorCode::Busy);
    assert_eq!(refused(b.claim(EP, 0)), ErrorCode::InvalidOwner);
    assert_eq!(refused(b.claim(EP, u64::MAX)), ErrorCode::InvalidOwner);
    assert_eq!(refused(a.claim(EP, 1)), ErrorCode::AlreadyHeld);
    assert_eq!(refused(b.claim(0xdead_0000, 2)), ErrorCode::UnknownEndpoint);
    // DMA-API users share; an exclusive claim is then refused.
    let shared_a = a.use_dma_api(EP2).unwrap();
    let shared_b = b.use_dma_api(EP2).unwrap();
    assert_eq!(refused(rig.master().claim(EP2, 5)), ErrorCode::InUse);
    drop((shared_a, shared_b));
    // Released explicitly: b can have it.
    held.release().unwrap();
    let mine = b.claim(EP, 2).unwrap();
    assert_eq!(mine.translate(IOVA, 1, Access::Read).unwrap().gpa, gpa);
    drop(mine);
    drop(b);
    // Reconnecting, many times over.
    for round in 0..20u64 {
        let m = rig.master();
        let e = m.claim(EP, 100 + round).unwrap();
        assert_eq!(e.translate(IOVA, 1, Access::Read).unwrap().gpa, gpa);
        drop((e, m));
        // Gone once the daemon noticed the hang-up (a, still connected, remains).
        rig.wait_masters("connected", 1);
    }
    drop(a);
    rig.wait_masters("connected", 0);
    let stats = rig.wait_masters("endpoints", 0);
    assert_eq!(stats["masters"]["cut_off"], 0);
    assert!(
        stats["masters"]["served"].as_u64().unwrap() >= 23,
        "{stats}"
    );
}

/// The daemon answers a release only once every section of the master ended: from inside a
/// section a request would wait for itself. It is refused, and a release (or a drop) from
/// there is deferred to the next request.
#[test]
fn requests_from_inside_a_section_are_refused_and_releases_deferred() {
    let rig = Rig::start(10_000, &[]);
    let mut dev = rig.daemon.connect();
    guest_maps(&mut dev, 1);
    let master = rig.master();
    let endpoint = master.claim(EP, 1).unwrap();
    let other = master.use_dma_api(EP2).unwrap();
    let section = endpoint.section().unwrap();
    assert!(matches!(master.claim(EP3, 1), Err(Error::InSection)));
    assert!(matches!(other.release(), Err(Error::InSection)));
    section.translate(IOVA, 1, Access::Read).unwrap();
    drop(section);
    assert_eq!(rig.masters_stats()["endpoints"], 2);
    // The next request releases EP2 first.
    let third = master.claim(EP3, 1).unwrap();
    assert_eq!(rig.masters_stats()["endpoints"], 2);
    drop(third);
    drop(endpoint);
    assert_eq!(rig.masters_stats()["endpoints"], 0);
    assert_eq!(rig.masters_stats()["cut_off"], 0);
}

#[test]
fn a_refused_translation_reaches_the_guest_event_queue() {
    let rig = Rig::start(10_000, &["--fault-backlog", "16"]);
    let mut dev = rig.daemon.connect();
    let gpa = dev.memory().alloc(PAGE, PAGE).unwrap().addr;
    ok(&mut dev, &attach(1, EP));
    ok(&mut dev, &map_ro(1, IOVA, IOVA + PAGE - 1, gpa));
    let master = rig.master();
    let endpoint = master.claim(EP, 9).unwrap();
    let other = master.use_dma_api(EP2).unwrap();

    let cases = [
        (
            &endpoint,
            IOVA + 5 * PAGE,
            Access::Write,
            Fault::Unmapped,
            FaultReason::Mapping,
            FAULT_F_WRITE,
            EP,
        ),
        (
            &endpoint,
            IOVA + 8,
            Access::Write,
            Fault::Permission,
            FaultReason::Mapping,
            FAULT_F_WRITE,
            EP,
        ),
        (
            &other,
            0x1234,
            Access::Read,
            Fault::NoDomain,
            FaultReason::Domain,
            FAULT_F_READ,
            EP2,
        ),
        (
            &endpoint,
            1 << 60,
            Access::Read,
            Fault::OutOfRange,
            FaultReason::Mapping,
            FAULT_F_READ,
            EP,
        ),
    ];
    for (e, iova, access, fault, reason, flag, id) in cases {
        match e.translate(iova, 4, access) {
            Err(Error::Fault(f)) => assert_eq!(f, fault),
            other => panic!("{other:?}"),
        }
        let record = fault_of(&mut dev);
        assert_eq!(
            record,
            FaultRecord {
                reason,
                flags: flag | FAULT_F_ADDRESS,
                endpoint: id,
                address: iova,
            }
        );
    }
    // Through vm-memory too.
    let mem = IommuMemory::new(dev.memory().mmap().clone(), endpoint, true, ());
    let mut byte = [0u8; 1];
    assert!(mem
        .read_slice(&mut byte, GuestAddress(IOVA + 3 * PAGE))
        .is_err());
    let record = fault_of(&mut dev);
    assert_eq!(
        (record.address, record.flags),
        (IOVA + 3 * PAGE, FAULT_F_READ | FAULT_F_ADDRESS)
    );
    let stats = rig.daemon.stats();
    assert_eq!(stats["masters"]["faults"], 5, "{stats}");
    assert_eq!(master.stats().faults_reported, 5);
    // Host-side refusals are not the guest's business.
    drop(mem);
    let gone = master.claim(EP3, 3).unwrap();
    gone.release().unwrap();
    assert_eq!(rig.daemon.stats()["masters"]["faults"], 5);
}

/// The guest posts no event buffers: a master's faults wait in the same bounded backlog as the
/// daemon's own (the oldest dropped and counted), and are delivered once buffers come.
#[test]
fn master_faults_share_the_bounded_backlog() {
    let rig = Rig::start(10_000, &["--fault-backlog", "16"]);
    let mut dev = rig.daemon.connect_with(Options {
        event_buffers: 0,
        ..Options::default()
    });
    ok(&mut dev, &attach(1, EP));
    let master = rig.master();
    let endpoint = master.claim(EP, 9).unwrap();
    for i in 0..200u64 {
        assert!(endpoint
            .translate(IOVA + i * PAGE, 1, Access::Read)
            .is_err());
    }
    let stats = rig
        .daemon
        .wait_stats("200 master faults", |s| s["masters"]["faults"] == 200);
    assert_eq!(stats["faults"]["backlog"], 16, "{stats}");
    assert_eq!(stats["faults"]["dropped"], 184, "{stats}");
    assert_eq!(master.stats().faults_dropped, 0);
}

// ---- virtio-queue over IommuMemory -------------------------------------------------------

/// A device backend's view: virtio-queue drives a split ring whose descriptor table, rings
/// and buffers the guest placed at IOVAs (mapped through the daemon), over
/// `IommuMemory<GuestMemoryMmap, Endpoint>`. The guest side is written by hand here.
#[test]
fn virtio_queue_runs_over_iommu_memory_at_iovas() {
    use virtio_queue::{Queue, QueueT};
    const SIZE: u16 = 16;
    const RING_IOVA: u64 = 0x8000_0000;
    const BUF_IOVA: u64 = 0x9000_0000;
    let rig = Rig::start(10_000, &[]);
    let mut dev = rig.daemon.connect();
    let guest = dev.memory().clone();
    // Rings: descriptors (16 x 16 bytes), avail (4 + 2 x 16 + 2), used (4 + 8 x 16 + 2): a page
    // each. Buffers: a readable request and a writable reply per chain.
    let rings = guest.alloc(3 * PAGE, PAGE).unwrap().addr;
    let bufs = guest.alloc(2 * PAGE, PAGE).unwrap().addr;
    ok(&mut dev, &attach(1, EP));
    ok(
        &mut dev,
        &map(1, RING_IOVA, RING_IOVA + 3 * PAGE - 1, rings),
    );
    ok(&mut dev, &map_ro(1, BUF_IOVA, BUF_IOVA + PAGE - 1, bufs));
    ok(
        &mut dev,
        &map(1, BUF_IOVA + PAGE, BUF_IOVA + 2 * PAGE - 1, bufs + PAGE),
    );
    let (desc, avail, used) = (rings, rings + PAGE, rings + 2 * PAGE);
    // Chain i: descriptor 2i (readable, 16 bytes at BUF_IOVA + 64i) -> 2i+1 (writable, 32 bytes
    // at BUF_IOVA + PAGE + 64i).
    const CHAINS: u16 = 4;
    for i in 0..CHAINS {
        let d = desc + 32 * u64::from(i);
        let write_desc = |at: u64, addr: u64, len: u32, flags: u16, next: u16| {
            let mut bytes = Vec::new();
            bytes.extend_from_slice(&addr.to_le_bytes());
            bytes.extend_from_slice(&len.to_le_bytes());
            bytes.extend_from_slice(&flags.to_le_bytes());
            bytes.extend_from_slice(&next.to_le_bytes());
            guest.write(at, &bytes).unwrap();
        };
        write_desc(d, BUF_IOVA + 64 * u64::from(i), 16, 1, 2 * i + 1);
        write_desc(d + 16, BUF_IOVA + PAGE + 64 * u64::from(i), 32, 2, 0);
        guest
            .write(
                bufs + 64 * u64::from(i),
                format!("request {i:8}").as_bytes(),
            )
            .unwrap();
        guest
            .write(avail + 4 + 2 * u64::from(i), &(2 * i).to_le_bytes())
            .unwrap();
    }
    guest.write(avail + 2, &CHAINS.to_le_bytes()).unwrap();

    let master = rig.master();
    let endpoint = master.claim(EP, 0xb10c).unwrap();
    let mem = IommuMemory::new(guest.mmap().clone(), endpoint, true, ());
    let mut queue = Queue::new(SIZE).unwrap();
    queue.set_size(SIZE);
    let split = |addr: u64| (Some(addr as u32), Some((addr >> 32) as u32));
    let (lo, hi) = split(RING_IOVA);
    queue.set_desc_table_address(lo, hi);
    let (lo, hi) = split(RING_IOVA + PAGE);
    queue.set_avail_ring_address(lo, hi);
    let (lo, hi) = split(RING_IOVA + 2 * PAGE);
    queue.set_used_ring_address(lo, hi);
    queue.set_ready(true);
    assert!(
        queue.is_valid(&mem),
        "rings at IOVAs are valid through the IOMMU"
    );
    let mut served = 0;
    while let Some(chain) = queue.pop_descriptor_chain(&mem) {
        let head = chain.head_index();
        let mut request = Vec::new();
        let mut reply_at = None;
        for d in chain.clone() {
            if d.is_write_only() {
                reply_at = Some((d.addr(), d.len()));
            } else {
                let mut bytes = vec![0u8; d.len() as usize];
                chain.memory().read_slice(&mut bytes, d.addr()).unwrap();
                request.extend_from_slice(&bytes);
            }
        }
        let (addr, len) = reply_at.unwrap();
        let reply = format!(
            "{:<32}",
            format!("reply to {}", String::from_utf8_lossy(&request))
        );
        chain
            .memory()
            .write_slice(&reply.as_bytes()[..len as usize], addr)
            .unwrap();
        // The device may not write a buffer the guest mapped read-only.
        let readable = chain.clone().readable().next().unwrap();
        assert!(chain.memory().write_slice(b"x", readable.addr()).is_err());
        queue.add_used(&mem, head, len).unwrap();
        served += 1;
    }
    assert_eq!(served, CHAINS);
    // The guest sees the used ring and the replies at their GPAs.
    assert_eq!(guest.read_u16(used + 2).unwrap(), CHAINS);
    for i in 0..CHAINS {
        let id = guest.read_u32(used + 4 + 8 * u64::from(i)).unwrap();
        assert_eq!(id, 2 * u32::from(i));
        let reply = guest.read(bufs + PAGE + 64 * u64::from(i), 32).unwrap();
        assert_eq!(
            reply,
            format!("{:<32}", format!("reply to request {i:8}")).as_bytes()
        );
    }
    // Once the guest unmaps the rings, the queue is unusable for the device.
    ok(&mut dev, &unmap(1, RING_IOVA, RING_IOVA + 3 * PAGE - 1));
    assert!(!queue.is_valid(&mem));
    assert!(queue.pop_descriptor_chain(&mem).is_none());
}

// ---- hostile masters -----------------------------------------------------------------------

fn raw(rig: &Rig) -> UnixStream {
    let s = UnixStream::connect(&rig.masters).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Waits until the daemon counts `n` masters connected (closed ones are counted out by their
/// threads, a moment after the close).
fn wait_connected(rig: &Rig, n: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while rig.masters_stats()["connected"] != n {
        assert!(
            std::time::Instant::now() < deadline,
            "not {n} masters connected: {}",
            rig.masters_stats()
        );
        thread::sleep(Duration::from_millis(5));
    }
}

/// Reads until the daemon closes the connection; returns the bytes.
fn read_to_close(mut s: UnixStream) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

#[test]
fn hostile_master_messages_end_that_master_only() {
    let rig = Rig::start(10_000, &["--max-masters", "3"]);
    let mut dev = rig.daemon.connect();
    let gpa = guest_maps(&mut dev, 1);
    let good = rig.master();
    let endpoint = good.claim(EP, 1).unwrap();
    let error = |code: ErrorCode| wire::Reply::Error(code).encode();
    // Garbage header, a header with flags, an oversized payload, an unknown kind, a request
    // before HELLO, a wrong version, a bad HELLO length.
    let cases: Vec<(Vec<u8>, Vec<u8>)> = vec![
        (vec![0xff; 64], error(ErrorCode::BadMessage)),
        (vec![1, 0, 1, 0, 8, 0, 0, 0], error(ErrorCode::BadMessage)),
        (
            vec![1, 0, 0, 0, 0xff, 0xff, 0, 0],
            error(ErrorCode::BadMessage),
        ),
        (
            vec![0x77, 0, 0, 0, 0, 0, 0, 0],
            error(ErrorCode::BadMessage),
        ),
        (
            wire::Request::Claim {
                endpoint: EP,
                cookie: 2,
            }
            .encode(),
            error(ErrorCode::BadMessage),
        ),
        (
            wire::Request::Hello {
                version: 99,
                slots: 1,
            }
            .encode(),
            error(ErrorCode::Version),
        ),
        (
            vec![1, 0, 0, 0, 4, 0, 0, 0, 1, 0, 0, 0],
            error(ErrorCode::BadMessage),
        ),
    ];
    for (bytes, expected) in cases {
        // The previous case's connection is gone (else --max-masters turns this one away).
        wait_connected(&rig, 1);
        let mut s = raw(&rig);
        s.write_all(&bytes).unwrap();
        assert_eq!(read_to_close(s), expected, "{bytes:02x?}");
    }
    // After a good HELLO: a second HELLO, a short payload, a bad fault reason.
    for bad in [
        wire::Request::Hello {
            version: wire::VERSION,
            slots: 1,
        }
        .encode(),
        vec![2, 0, 0, 0, 3, 0, 0, 0, 1, 2, 3],
        {
            let mut f = wire::Request::Fault(wire::FaultReport {
                endpoint: EP,
                reason: wire::FaultReason::Unmapped,
                access: wire::FaultAccess::Read,
                iova: 0,
            })
            .encode();
            f[wire::HEADER + 4] = 0;
            f
        },
    ] {
        wait_connected(&rig, 1);
        let mut s = raw(&rig);
        s.write_all(
            &wire::Request::Hello {
                version: wire::VERSION,
                slots: 1,
            }
            .encode(),
        )
        .unwrap();
        s.write_all(&bad).unwrap();
        let bytes = read_to_close(s);
        assert!(
            bytes.ends_with(&error(ErrorCode::BadMessage)),
            "{bad:02x?}: {bytes:02x?}"
        );
    }
    // A master that connects and says nothing does not hold anything up; one beyond
    // --max-masters is turned away.
    wait_connected(&rig, 1);
    let _silent = raw(&rig);
    let _silent2 = raw(&rig);
    // The bad masters above are gone and the silent ones counted (not a fixed sleep: the
    // machine may be loaded).
    wait_connected(&rig, 3);
    let turned_away = raw(&rig);
    assert_eq!(read_to_close(turned_away), error(ErrorCode::TooMany));
    let stats = rig.masters_stats();
    // Every case but the wrong version (answered, not a malformed message).
    assert_eq!(stats["bad_messages"], 9, "{stats}");
    assert!(stats["refused"].as_u64().unwrap() >= 1, "{stats}");
    // The good master and the guest never noticed.
    assert_eq!(endpoint.translate(IOVA, 1, Access::Read).unwrap().gpa, gpa);
    ok(&mut dev, &unmap(1, IOVA, IOVA + PAGE - 1));
    assert!(rig.daemon.stats()["masters"]["cut_off"] == 0);
}

// ---- all of it at once ---------------------------------------------------------------------

/// IOVA slots the guest cycles through, and versions of each (GPA pages per slot).
const SLOTS: u64 = 8;
const VERSIONS: u64 = 256;
const STRESS_IOVA: u64 = 0x6000_0000;

/// The guest maps slot k at version v to page (k, v) of a pool, whose first word holds v, and
/// publishes v in `unmapped[k]` once the UNMAP of version v is answered. A master that
/// translated slot k to version w in a section, and still holds the section, must never see
/// `unmapped[k]` >= w: that UNMAP's grace period waits for the section. Through vm-memory (its
/// IOTLB caches translations across sections), a read of slot k after `unmapped[k]` = u must
/// never return a version <= u. Masters that stall are cut off and reconnect, master
/// processes are killed mid-section, and the guest unmaps flat out throughout.
#[test]
fn masters_that_stall_die_and_reconnect_next_to_a_guest_unmapping_flat_out() {
    let secs: u64 = std::env::var("VHOST_IOMMU_MASTER_STRESS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let rig = Arc::new(Rig::start(200, &[]));
    let stop = Arc::new(AtomicBool::new(false));
    let unmapped: Arc<Vec<AtomicU64>> = Arc::new((0..SLOTS).map(|_| AtomicU64::new(0)).collect());
    let (mem_tx, mem_rx) = mpsc::channel::<GuestMemoryMmap>();
    let guest = {
        let (rig, stop, unmapped) = (rig.clone(), stop.clone(), unmapped.clone());
        thread::spawn(move || {
            let mut dev = rig.daemon.connect();
            let pool = dev
                .memory()
                .alloc(SLOTS * VERSIONS * PAGE, PAGE)
                .unwrap()
                .addr;
            let page = |k: u64, v: u64| pool + (k * VERSIONS + v % VERSIONS) * PAGE;
            ok(&mut dev, &attach(1, EP));
            for k in 0..SLOTS {
                dev.memory().write(page(k, 1), &1u64.to_le_bytes()).unwrap();
                ok(
                    &mut dev,
                    &map(
                        1,
                        STRESS_IOVA + k * PAGE,
                        STRESS_IOVA + k * PAGE + PAGE - 1,
                        page(k, 1),
                    ),
                );
            }
            mem_tx.send(dev.memory().mmap().clone()).unwrap();
            let mut version = vec![1u64; SLOTS as usize];
            let (mut unmaps, mut longest) = (0u64, Duration::ZERO);
            while !stop.load(Ordering::Relaxed) {
                for k in 0..SLOTS {
                    let iova = STRESS_IOVA + k * PAGE;
                    let v = version[k as usize];
                    let asked = Instant::now();
                    let c = send(&mut dev, &unmap(1, iova, iova + PAGE - 1));
                    longest = longest.max(asked.elapsed());
                    assert_eq!(status(&c), Status::Ok);
                    unmapped[k as usize].store(v, Ordering::Release);
                    unmaps += 1;
                    let next = v + 1;
                    dev.memory()
                        .write(page(k, next), &next.to_le_bytes())
                        .unwrap();
                    ok(&mut dev, &map(1, iova, iova + PAGE - 1, page(k, next)));
                    version[k as usize] = next;
                }
            }
            (unmaps, longest, pool)
        })
    };
    let guest_ram = mem_rx.recv().unwrap();
    let violations = Arc::new(AtomicU64::new(0));
    let checks = Arc::new(AtomicU64::new(0));
    let revoked_checkers = Arc::new(AtomicU64::new(0));
    // Checkers: one master, two threads, the section API and vm-memory.
    let checker_master = Arc::new(rig.master());
    let checker_ep = Arc::new(checker_master.claim(EP, 0xc0de).unwrap());
    let checkers: Vec<_> = (0..2)
        .map(|n| {
            let (stop, unmapped, violations, checks, revoked) = (
                stop.clone(),
                unmapped.clone(),
                violations.clone(),
                checks.clone(),
                revoked_checkers.clone(),
            );
            let (ep, ram) = (checker_ep.clone(), guest_ram.clone());
            thread::spawn(move || {
                let mut k = n as u64;
                let mut rounds = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    k = (k + 1) % SLOTS;
                    let iova = STRESS_IOVA + k * PAGE;
                    let Ok(section) = ep.section() else {
                        revoked.fetch_add(1, Ordering::Relaxed);
                        return;
                    };
                    let seen = match section.translate(iova, 8, Access::Read) {
                        Ok(t) => {
                            // The version, from the page the translation points to.
                            let mut word = [0u8; 8];
                            ram.read_slice(&mut word, GuestAddress(t.gpa)).unwrap();
                            Some(u64::from_le_bytes(word))
                        }
                        Err(_) => None,
                    };
                    // The DMA, holding the translation: a while, now and then a long one.
                    let spins = if rounds % 64 == 0 { 20_000 } else { 200 };
                    for _ in 0..spins {
                        std::hint::spin_loop();
                    }
                    rounds += 1;
                    // Still holding version w's page: its UNMAP must not have been answered.
                    let u = unmapped[k as usize].load(Ordering::Acquire);
                    let bad = seen.is_some_and(|w| w <= u);
                    if section.finish().is_err() {
                        revoked.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    if bad {
                        violations.fetch_add(1, Ordering::Relaxed);
                        eprintln!(
                            "slot {k}: version {seen:?} still held when UNMAP of {u} was answered"
                        );
                    }
                    checks.fetch_add(1, Ordering::Relaxed);
                    // Outside any section: leave the CPUs to the guest and the daemon now and
                    // then (a preempted section holds every UNMAP up).
                    if rounds % 4 == 0 {
                        thread::sleep(Duration::from_micros(20));
                    }
                }
            })
        })
        .collect();
    // The vm-memory path, with its IOTLB: another connection claiming EP under the same
    // cookie (an owner may claim again), reading the version through IommuMemory.
    let vm_checker = {
        let (stop, unmapped, violations, checks, revoked, rig) = (
            stop.clone(),
            unmapped.clone(),
            violations.clone(),
            checks.clone(),
            revoked_checkers.clone(),
            rig.clone(),
        );
        let ram = guest_ram.clone();
        thread::spawn(move || {
            let master = rig.master();
            let mem = IommuMemory::new(ram, master.claim(EP, 0xc0de).unwrap(), true, ());
            let mut k = 0;
            while !stop.load(Ordering::Relaxed) {
                k = (k + 3) % SLOTS;
                let u = unmapped[k as usize].load(Ordering::Acquire);
                let mut word = [0u8; 8];
                let seen = mem
                    .read_slice(&mut word, GuestAddress(STRESS_IOVA + k * PAGE))
                    .ok()
                    .map(|()| u64::from_le_bytes(word));
                if master.is_revoked() {
                    revoked.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                if seen.is_some_and(|w| w <= u) {
                    violations.fetch_add(1, Ordering::Relaxed);
                    eprintln!(
                        "vm-memory, slot {k}: version {seen:?} after UNMAP of {u} was answered"
                    );
                }
                checks.fetch_add(1, Ordering::Relaxed);
                thread::sleep(Duration::from_micros(20));
            }
        })
    };
    // A master that stalls in a section until it is cut off, then reconnects, over and over.
    let stalls = Arc::new(AtomicU64::new(0));
    let staller = {
        let (stop, rig, stalls) = (stop.clone(), rig.clone(), stalls.clone());
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let master = rig.master();
                let ep = master.use_dma_api(EP2).unwrap();
                let section = ep.section().unwrap();
                let until = Instant::now() + Duration::from_secs(10);
                while !master.is_revoked() && Instant::now() < until {
                    thread::sleep(Duration::from_millis(5));
                }
                assert!(
                    matches!(section.finish(), Err(Error::Revoked)),
                    "not cut off in 10 s"
                );
                stalls.fetch_add(1, Ordering::Relaxed);
                // Time for the guest to unmap with nobody stalling.
                thread::sleep(Duration::from_millis(500));
            }
        })
    };
    // Master processes killed in the middle of a section, one after another.
    let kills = Arc::new(AtomicU64::new(0));
    let killer = {
        let (stop, rig, kills) = (stop.clone(), rig.clone(), kills.clone());
        thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let mut child = ChildMaster::start(&rig.masters, EP3, 0);
                n += 1;
                thread::sleep(Duration::from_millis(20 + (n * 37) % 150));
                child.kill();
                kills.fetch_add(1, Ordering::Relaxed);
                thread::sleep(Duration::from_millis(200));
            }
        })
    };
    thread::sleep(Duration::from_secs(secs));
    stop.store(true, Ordering::Relaxed);
    let (unmaps, longest, _) = guest.join().unwrap();
    for c in checkers {
        c.join().unwrap();
    }
    vm_checker.join().unwrap();
    staller.join().unwrap();
    killer.join().unwrap();
    let (checks, violations) = (
        checks.load(Ordering::Relaxed),
        violations.load(Ordering::Relaxed),
    );
    eprintln!(
        "{unmaps} UNMAPs (longest {longest:?}), {checks} checks, {} stalls cut off, {} masters \
         killed, {} checkers revoked (preempted past the bound)",
        stalls.load(Ordering::Relaxed),
        kills.load(Ordering::Relaxed),
        revoked_checkers.load(Ordering::Relaxed),
    );
    assert_eq!(
        violations, 0,
        "a master reached pages whose UNMAP was answered"
    );
    assert!(
        unmaps >= 16 && checks >= 100,
        "{unmaps} UNMAPs, {checks} checks"
    );
    assert!(stalls.load(Ordering::Relaxed) >= 1);
    assert!(kills.load(Ordering::Relaxed) >= 1);
    // A stall never held the guest much past the bound (generous: this machine is shared).
    assert!(
        longest < Duration::from_secs(5),
        "an UNMAP took {longest:?}"
    );
    drop(checker_ep);
    drop(checker_master);
    rig.wait_masters("connected", 0);
    let stats = rig.daemon.wait_stats("every endpoint released", |s| {
        s["masters"]["endpoints"] == 0
    });
    assert!(
        stats["masters"]["cut_off"].as_u64().unwrap() >= stalls.load(Ordering::Relaxed),
        "{stats}"
    );
}
