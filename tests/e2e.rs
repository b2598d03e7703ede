// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! End to end: a stock Debian 6.12 guest under an unpatched QEMU (10.2) drives a virtio-iommu
//! through VFIO.
//!
//! Set-up: `scripts/e2e-setup.sh` (or `VHOST_IOMMU_E2E=1 cargo test`); without a rig these
//! tests print SKIP and pass. See tests/e2e/rig.rs for the knobs (VHOST_IOMMU_E2E,
//! VHOST_IOMMU_ACCEL, VHOST_IOMMU_CACHE, loop counts).
//!
//! They run against QEMU's built-in `virtio-iommu-pci` on the same QEMU binary the daemon's tests
//! use (scenario 6: the same guest workload passes there, so a failure against our daemon is
//! ours) and pin down what QEMU does with a VIOT given through `-acpitable`.

#[path = "e2e/rig.rs"]
mod rig;

use std::collections::BTreeSet;

use rig::{
    check_pattern, qemu_args, GuestConfig, Iommu, Marker, QemuBuild, Rig, EP_BDF, GROUP_BDFS,
};
use vhost_device_iommu::viot::{build_viot, build_viot_with, PciBdf, ViotOptions, ViotPciRange};

fn qemu_viot() -> Vec<u8> {
    let iommu = PciBdf::new(0, 4, 0).unwrap();
    let bus0 = ViotPciRange::identity(
        0,
        PciBdf::new(0, 0, 0).unwrap(),
        PciBdf::new(0, 0x1f, 7).unwrap(),
    );
    build_viot(iommu, &[bus0]).unwrap()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The host side of the guest's stops: MAPPED and GROUP_(RE)ATTACHED buffers must be in guest
/// RAM at the GPAs the guest printed; the stops must come in the guest's order.
fn builtin_checks() -> impl FnMut(&Marker, &rig::RamFile) -> Result<(), String> {
    let mut stops = Vec::new();
    move |m, memory| {
        if m.wait().is_some() {
            stops.push(m.event.clone());
        }
        match m.event.as_str() {
            "MAPPED" => {
                if m.get("bdf")? != EP_BDF {
                    return Err(format!("MAPPED for {}", m.get("bdf")?));
                }
                check_pattern(m, memory)
            }
            "GROUP_ATTACHED" | "GROUP_REATTACHED" => {
                let devices: BTreeSet<String> = m.list("devices")?.into_iter().collect();
                let want: BTreeSet<String> = GROUP_BDFS.iter().map(|s| s.to_string()).collect();
                if devices != want {
                    return Err(format!("group members {devices:?}, want {want:?}"));
                }
                check_pattern(m, memory)
            }
            "GROUP_DONE" => {
                let want = [
                    "MAPPED",
                    "UNMAPPED",
                    "GROUP_ATTACHED",
                    "GROUP_RELEASED",
                    "GROUP_REATTACHED",
                    "GROUP_DONE",
                ];
                if stops != want {
                    return Err(format!("stops {stops:?}, want {want:?}"));
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

/// Scenario 6: boot, groups, the VFIO loop and the host stops against QEMU's built-in device.
#[test]
fn builtin_virtio_iommu_full_workload() {
    let Some(rig) = Rig::get("builtin_virtio_iommu_full_workload") else {
        return;
    };
    let config = GuestConfig::new(Iommu::Builtin);
    let run = rig::run_guest(&rig, &config, builtin_checks()).unwrap_or_else(|e| panic!("{e}"));

    // The driver probed and said what it got from the config space.
    let iommu = run.find("IOMMU").expect("IOMMU marker");
    assert_eq!(iommu.get("probed").unwrap(), "1");
    assert_eq!(
        iommu.u64("input_bits").unwrap(),
        39,
        "QEMU 10's default aw-bits for virtio-iommu-pci on x86"
    );
    assert_eq!(iommu.get("page_mask").unwrap(), "0xfffffffffffff000");

    // QEMU's own VIOT is exactly what src/viot.rs builds for the same topology.
    let viot = run.find("VIOT").expect("VIOT marker");
    assert_eq!(viot.get("hex").unwrap(), hex(&qemu_viot()), "VIOT bytes");

    // Every endpoint on vfio-pci; 00:05.0 alone, 00:06.0 and 00:06.1 in one group.
    rig::assert_rig_groups(&run);

    // The VFIO loop ran; its numbers are the baseline for the daemon.
    for name in ["map4k_x1", "map4k_x32", "map2m"] {
        let rate = run.bench(name).unwrap_or_else(|| panic!("no BENCH {name}"));
        assert!(rate > 0.0, "{name}: {rate}");
        eprintln!("BASELINE builtin {name}: {rate:.0} map+unmap pairs/s");
    }
    for m in run.all("VFIO_INFO") {
        eprintln!("{}", m.line);
    }

    // The guest's kernel log: the driver is there, no fault was reported.
    assert!(
        run.dmesg.iter().any(|l| l.contains("virtio_iommu")),
        "dmesg: {:#?}",
        run.dmesg
    );
    let faults: Vec<&String> = run
        .dmesg
        .iter()
        .filter(|l| l.contains("fault from"))
        .collect();
    assert!(faults.is_empty(), "faults: {faults:#?}");
    eprintln!("guest run took {:.1?}", run.elapsed);
}

/// What QEMU does with a complete table given with `-acpitable file=`: it keeps the whole
/// header from the file (signature, revision, OEM and creator fields), rewrites only `length`
/// (warning if the file's differs) and the checksum (recomputed), and overrides a field only when
/// given as an option (`sig=`, `oem_id=`, ...; hw/acpi/core.c `acpi_table_install`). So the
/// guest sees our bytes unchanged: the daemon's `viot` subcommand fully decides the table.
#[test]
fn acpitable_file_keeps_our_viot() {
    let Some(rig) = Rig::get("acpitable_file_keeps_our_viot") else {
        return;
    };
    let options = ViotOptions {
        oem_id: *b"VHOSTU",
        oem_table_id: *b"VIOMMU00",
        oem_revision: 0x1234,
        creator_id: *b"VDIO",
        creator_revision: 0x5678,
        iommu_segment: 0,
    };
    let ranges = rig::endpoint_viot_ranges();
    for table in [
        qemu_viot(),
        build_viot_with(&options, PciBdf::new(0, 4, 0).unwrap(), &ranges).unwrap(),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("viot.bin");
        std::fs::write(&file, &table).unwrap();
        let mut config = GuestConfig::new(Iommu::None);
        config.viot = Some(file);
        config.steps = vec!["viot"];
        config.vfio = vec![];
        let run = rig::run_guest(&rig, &config, |_, _| Ok(())).unwrap_or_else(|e| panic!("{e}"));
        let seen = run.find("VIOT").expect("VIOT marker");
        assert_eq!(
            seen.get("hex").unwrap(),
            hex(&table),
            "the guest's VIOT differs from the file"
        );
    }
}

/// The harness itself: a failed host check ends the run at once (QEMU killed while the guest
/// waits) and the error carries the whole console; so does a deadline.
#[test]
fn harness_failures_carry_the_console_log() {
    let Some(rig) = Rig::get("harness_failures_carry_the_console_log") else {
        return;
    };
    let mut config = GuestConfig::new(Iommu::Builtin);
    config.steps = vec!["host"];
    config.vfio = vec![EP_BDF];
    let err = rig::run_guest(&rig, &config, |m, _| match m.event.as_str() {
        "MAPPED" => Err("deliberate failure".into()),
        _ => Ok(()),
    })
    .expect_err("the check fails");
    assert!(err.reason.contains("deliberate failure"), "{}", err.reason);
    assert!(
        err.run.find("DONE").is_none(),
        "the run went on after the failure"
    );
    let text = err.to_string();
    assert!(
        text.contains("E2E INIT kernel=") && text.contains("E2E MAPPED"),
        "{text}"
    );

    config.timeout = std::time::Duration::from_millis(300);
    let err = rig::run_guest(&rig, &config, |_, _| Ok(())).expect_err("deadline");
    assert!(err.reason.contains("timeout"), "{}", err.reason);
}

/// The vhost-user command line (no QEMU run here).
#[test]
fn vhost_user_command_line() {
    let rig = Rig {
        qemu: "/q".into(),
        kernel: "/k".into(),
        initrd: "/i".into(),
        kernel_release: "6.12".into(),
        qemu_patched: None,
        firmware: vec!["/usr/share/seabios".into(), "/usr/share/qemu".into()],
    };
    let mut config = GuestConfig::new(Iommu::VhostUser {
        socket: "/tmp/viommu.sock".into(),
    });
    config.viot = Some("/tmp/viot.bin".into());
    let args = qemu_args(&rig, &config, "/dev/shm/guest.mem".as_ref()).join(" ");
    for want in [
        "-chardev socket,id=viommu,path=/tmp/viommu.sock",
        "-device vhost-user-test-device-pci,chardev=viommu,virtio-id=23,num_vqs=2,config_size=40,addr=04.0",
        "-object memory-backend-file,id=mem,size=512M,mem-path=/dev/shm/guest.mem,share=on",
        "memory-backend=mem",
        "-acpitable file=/tmp/viot.bin",
        "-device pci-testdev,addr=05.0",
        "-device pci-testdev,addr=06.0,multifunction=on -device pci-testdev,addr=06.1",
        "-L /usr/share/seabios -L /usr/share/qemu",
        "-kernel /k -initrd /i",
    ] {
        assert!(args.contains(want), "missing {want:?} in {args}");
    }
    assert!(!args.contains("virtio-iommu-pci"));
}

/// The README's commands are the ones the suite runs: its QEMU device line (stock QEMU >= 10.2)
/// and its `viot` command (run as is by tests/e2e_daemon.rs, root-port case).
#[test]
fn readme_commands_are_the_tested_ones() {
    let readme = include_str!("../README.md");
    for want in [
        format!("-device {},addr=04.0", rig::vhost_user_device("viommu")),
        format!("vhost-device-iommu {}", rig::README_VIOT_ARGS.join(" ")),
        "-chardev socket,id=viommu,path=/tmp/viommu.sock".to_string(),
        "-acpitable file=viot.bin".to_string(),
    ] {
        assert!(readme.contains(&want), "README.md lacks {want:?}");
    }
    assert!(
        !readme.contains("-device vhost-user-device-pci"),
        "a command line with the pre-10.2 name"
    );
}

/// A test that needs a QEMU patch runs the patched binary, and fails clearly without one.
#[test]
fn patched_qemu_only_when_there_are_patches() {
    let mut rig = Rig {
        qemu: "/stock/qemu".into(),
        qemu_patched: None,
        kernel: "/k".into(),
        initrd: "/i".into(),
        kernel_release: "6.12".into(),
        firmware: vec![],
    };
    assert_eq!(
        rig.qemu_binary(QemuBuild::Stock),
        Ok(std::path::Path::new("/stock/qemu"))
    );
    let err = rig.qemu_binary(QemuBuild::Patched).unwrap_err();
    assert!(err.contains("scripts/qemu-patches has no patch"), "{err}");
    rig.qemu_patched = Some("/patched/qemu".into());
    assert_eq!(
        rig.qemu_binary(QemuBuild::Patched),
        Ok(std::path::Path::new("/patched/qemu"))
    );
    assert_eq!(GuestConfig::new(Iommu::Builtin).qemu, QemuBuild::Stock);
}

#[test]
fn endpoint_ids_of_guest_bdfs() {
    assert_eq!(rig::endpoint_id(EP_BDF), Ok(0x28));
    assert_eq!(rig::endpoint_id(rig::ROOT_PORT_EP_BDF), Ok(0x100));
    assert_eq!(rig::endpoint_id("0000:ff:1f.7"), Ok(0xffff));
    assert!(rig::endpoint_id("0001:00:05.0").is_err());
    assert!(rig::endpoint_id("0000:00:20.0").is_err());
}

#[test]
fn marker_parsing() {
    let m = Marker::parse("E2E MAPPED bdf=0000:00:05.0 iova=0x40000000 len=16384 wait=3").unwrap();
    assert_eq!(m.event, "MAPPED");
    assert_eq!(m.u64("iova").unwrap(), 0x4000_0000);
    assert_eq!(m.u64("len").unwrap(), 16384);
    assert_eq!(m.wait(), Some(3));
    // A kernel line that lost its newline in front of a marker.
    let m = Marker::parse("[    1.0] virtio_iommu: oopsE2E DONE status=ok failures=0").unwrap();
    assert_eq!(m.event, "DONE");
    assert_eq!(m.wait(), None);
    assert!(Marker::parse("vfio-pci 0000:00:05.0: E2E lowercase").is_none());
    assert!(Marker::parse("no marker").is_none());
    assert_eq!(
        rig::pattern(0x5eed0001, 8, 8),
        [8, 0, 0, 0, 1, 0, 0xed, 0x5e]
    );
}
