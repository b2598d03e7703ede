// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! End to end: a real device behind our virtio-iommu. The example back-end
//! `examples/vhost-user-blk` (a virtio-blk device over a file) serves QEMU's
//! `vhost-user-blk-pci` at 00:08.0 with `iommu_platform=on,x-external-iommu=on` (the patched
//! QEMU: scripts/qemu-patches/0100), the VIOT puts 00:08.0 behind our daemon's virtio-iommu, and
//! the back-end translates every ring and buffer address through the daemon's tables with the
//! vhost-iommu-client crate. The guest's stock virtio_blk driver must negotiate
//! VIRTIO_F_ACCESS_PLATFORM, so everything it hands the device is an IOVA it mapped through the
//! guest's virtio-iommu driver, i.e. through our daemon.
//!
//! Shown: the guest writes a pattern with O_DIRECT and reads it back; the backing file holds
//! it; the daemon's `stats` count the guest's MAPs and UNMAPs for the endpoint and the master's
//! translations. The negative case is the back-end's test hook (`--test-misdirect`): a read of
//! one sector has its data DMA sent to an IOVA the guest never mapped, as a buggy device would;
//! the translation is refused, the read fails with EIO in the guest, and the fault record
//! reaches the guest's virtio-iommu driver, which logs it.
//!
//! Runs when the rig is set up with the patched QEMU and the example is built (`cargo test`
//! builds examples; `cargo test --test e2e_blk` alone does not: run
//! `cargo build --example vhost-user-blk` first). See tests/e2e/README.md.

mod common;
#[path = "e2e/rig.rs"]
mod rig;

use std::{
    fs::{self, File},
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use common::Daemon;
use rig::{pattern, GuestConfig, Iommu, QemuBuild, Rig};
use serde_json::Value;
use vhost_device_iommu::viot::{build_viot, PciBdf, ViotPciRange};

/// Where the block device sits in the guest, and its endpoint ID (= requester ID).
const BLK_ADDR: &str = "08.0";
const BLK_BDF: &str = "0000:00:08.0";
const BLK_EP: u64 = 0x40;
/// The disk, and the sector whose data DMA the back-end's hook misdirects (2 MiB in: away from
/// the partition scan at the start and from the pattern at 4 MiB).
const DISK_BYTES: u64 = 16 << 20;
const BAD_SECTOR: u64 = 4096;
/// An IOVA the guest never maps: its DMA API allocates top-down below 4 GiB, a few MiB here.
const BAD_IOVA: u64 = 0xdead_0000;

/// The example binary, next to this test's (target/<profile>/examples/).
fn example_binary() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let profile_dir = exe.parent()?.parent()?;
    let bin = profile_dir.join("examples/vhost-user-blk");
    bin.is_file().then_some(bin)
}

/// The back-end's process, killed when dropped; its log in a file.
struct Backend {
    child: Child,
    log: PathBuf,
}

impl Backend {
    fn start(bin: &Path, dir: &Path, master_socket: &Path) -> (Backend, PathBuf, PathBuf) {
        let socket = dir.join("blk.sock");
        let disk = dir.join("disk.img");
        File::create(&disk).unwrap().set_len(DISK_BYTES).unwrap();
        let log = dir.join("blk.log");
        let child = Command::new(bin)
            .arg("--socket")
            .arg(&socket)
            .arg("--file")
            .arg(&disk)
            .arg("--master-socket")
            .arg(master_socket)
            .args(["--endpoint", "00:08.0", "--once", "--test-misdirect"])
            .arg(format!("{BAD_SECTOR}:{BAD_IOVA:#x}"))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .expect("start examples/vhost-user-blk");
        let backend = Backend { child, log };
        if let Err(e) = rig::wait_for_path(&socket, Duration::from_secs(10)) {
            panic!("{e}\nback-end log:\n{}", backend.log());
        }
        (backend, socket, disk)
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The master's entry for the block device's endpoint in `stats`: (master, endpoint).
fn master_entry(stats: &Value) -> Option<(Value, Value)> {
    stats["masters"]["list"].as_array()?.iter().find_map(|m| {
        let ep = m["endpoints"]
            .as_array()?
            .iter()
            .find(|e| e["endpoint"] == BLK_EP)?;
        Some((m.clone(), ep.clone()))
    })
}

fn count(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or(0)
}

#[test]
fn a_block_device_behind_the_viommu() {
    let Some(rig) = Rig::get("a_block_device_behind_the_viommu") else {
        return;
    };
    let Some(bin) = example_binary() else {
        let msg = "a_block_device_behind_the_viommu: examples/vhost-user-blk is not built \
                   (run `cargo build --example vhost-user-blk`, or the whole `cargo test`)";
        if std::env::var("VHOST_IOMMU_E2E").as_deref() == Ok("1") {
            panic!("{msg}");
        }
        eprintln!("SKIP {msg}");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let master_socket = dir.path().join("masters.sock");
    let daemon = Daemon::start(&[
        "--endpoints",
        "00:08.0",
        "--master-socket",
        master_socket.to_str().unwrap(),
    ]);
    rig::wait_for_path(&master_socket, Duration::from_secs(10)).unwrap();
    let viot_path = dir.path().join("viot.bin");
    let blk = PciBdf::new(0, 8, 0).unwrap();
    fs::write(
        &viot_path,
        build_viot(
            PciBdf::new(0, 4, 0).unwrap(),
            &[ViotPciRange::identity(0, blk, blk)],
        )
        .unwrap(),
    )
    .unwrap();
    let (backend, blk_socket, disk_path) = Backend::start(&bin, dir.path(), &master_socket);

    let mut config = GuestConfig::new(Iommu::VhostUser {
        socket: daemon.socket.clone(),
    });
    // x-external-iommu is scripts/qemu-patches/0100: stock QEMU maps a vhost-user device's
    // ring addresses as guest-physical and clears ACCESS_PLATFORM from the back-end's features
    // unless one of its own IOMMUs translates the device.
    config.qemu = QemuBuild::Patched;
    config.viot = Some(viot_path);
    config.steps = vec!["viot", "iommu", "blk"];
    config.vfio = Vec::new();
    config.extra_append = vec![
        // Every dma_unmap reaches the virtio-iommu at once (no flush queue).
        "iommu.strict=1".into(),
        format!("e2e.blk_bdf={BLK_BDF}"),
        format!("e2e.blk_ep={BLK_EP}"),
        format!("e2e.blk_bad_sector={BAD_SECTOR}"),
    ];
    config.extra_args = vec![
        "-chardev".into(),
        format!("socket,id=blk0,path={}", blk_socket.display()),
        "-device".into(),
        format!(
            "vhost-user-blk-pci,chardev=blk0,addr={BLK_ADDR},num-queues=1,disable-legacy=on,\
             iommu_platform=on,x-external-iommu=on"
        ),
    ];

    // At BLK_IO the guest has written and read its pattern and waits: the host's view.
    let mut at_io: Option<(Value, Value, u64)> = None;
    let result = rig::run_guest(&rig, &config, |m, _memory| {
        if m.event != "BLK_IO" {
            return Ok(());
        }
        let offset = m.u64("offset")?;
        let len = m.u64("len")?;
        let seed = m.u64("pattern")? as u32;
        let mut on_disk = vec![0u8; len as usize];
        File::open(&disk_path)
            .and_then(|f| f.read_exact_at(&mut on_disk, offset))
            .map_err(|e| format!("backing file: {e}"))?;
        if on_disk != pattern(seed, 0, len as usize) {
            return Err(format!(
                "the backing file does not hold the guest's pattern at {offset:#x}"
            ));
        }
        let stats = daemon.stats();
        let (master, endpoint) =
            master_entry(&stats).ok_or_else(|| format!("no master holds {BLK_EP:#x}: {stats}"))?;
        at_io = Some((master, endpoint, len));
        Ok(())
    });
    let run = match result {
        Ok(run) => run,
        Err(e) => panic!(
            "{e}\nback-end log:\n{}\ndaemon: {}",
            backend.log(),
            daemon.stats()
        ),
    };
    let (master, endpoint, bytes) = at_io.expect("the guest never reached BLK_IO");
    let device = run.find("BLK_DEVICE").expect("BLK_DEVICE");
    assert_eq!(
        device.get("access_platform").unwrap(),
        "1",
        "{}",
        device.line
    );
    assert_eq!(
        device.get("driver").unwrap(),
        "virtio_blk",
        "{}",
        device.line
    );
    assert_ne!(
        device.get("group").unwrap(),
        "-1",
        "not in an IOMMU group: {}",
        device.line
    );
    let io = run.find("BLK_IO").unwrap();
    assert_eq!(io.u64("mismatched_words").unwrap(), 0, "{}", io.line);
    assert_eq!(io.u64("read").unwrap(), bytes, "{}", io.line);

    // The guest's DMA API mapped the rings and every buffer through our daemon, and unmapped
    // the buffers after each request; the back-end translated through those mappings.
    let (maps, unmaps) = (count(&endpoint, "maps"), count(&endpoint, "unmaps"));
    let translations = count(&master, "translations");
    assert!(maps > 0 && unmaps > 0, "endpoint {endpoint}");
    assert!(translations > 0, "master {master}");
    assert_eq!(endpoint["hold"], "dma_api", "{endpoint}");

    // The negative case: refused, EIO in the guest, the fault in its log.
    let bad = run.find("BLK_MISDIRECTED").expect("BLK_MISDIRECTED");
    assert_eq!(bad.get("errno").unwrap(), "5", "{}", bad.line);
    // A read request: the device writes guest memory.
    let fault = format!("page fault from EP {BLK_EP} at {BAD_IOVA:#x} [W]");
    assert!(
        run.dmesg.iter().any(|l| l.contains(&fault)),
        "no '{fault}' in the guest's dmesg: {:#?}",
        run.dmesg
    );
    assert!(
        run.dmesg
            .iter()
            .any(|l| l.contains("I/O error") && l.contains(&format!("sector {BAD_SECTOR}"))),
        "no I/O error at sector {BAD_SECTOR} in the guest's dmesg: {:#?}",
        run.dmesg
    );
    let after = run.find("BLK_AFTER").expect("BLK_AFTER");
    assert_eq!(after.get("match").unwrap(), "1", "{}", after.line);

    let stats = daemon.stats();
    let masters = &stats["masters"];
    assert!(count(masters, "faults") >= 1, "{stats}");
    assert!(count(masters, "translations_refused") >= 1, "{stats}");
    assert_eq!(count(masters, "cut_off"), 0, "{stats}");
    println!(
        "BLK written={bytes} read={bytes} endpoint={BLK_EP:#x} maps={maps} unmaps={unmaps} \
         translations={translations} iotlb_misses={} (at the read-back); after the \
         misdirected read: translations={} refused={} faults={}",
        count(&master, "iotlb_misses"),
        count(masters, "translations"),
        count(masters, "translations_refused"),
        count(masters, "faults"),
    );
    drop(backend);
    print!(
        "back-end log:\n{}",
        fs::read_to_string(dir.path().join("blk.log")).unwrap()
    );
}
