//! The command line's errors, on the real binary: a table of bad invocations with the option
//! each error must name.

mod common;

use std::process::{Command, Output, Stdio};

use common::*;

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Bad invocations: the exit status, and what stderr must say (the option it names first).
#[test]
fn every_bad_invocation_names_its_option() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let s = sock.to_str().unwrap();
    let viot = dir.path().join("viot.bin");
    let v = viot.to_str().unwrap();
    #[rustfmt::skip]
    let table: &[(&[&str], i32, &[&str])] = &[
        // clap's value errors: status 2, "invalid value 'X' for '--option <NAME>'".
        (&["-s", s, "--page-size-mask", "zz"], 2, &["invalid value 'zz' for '--page-size-mask <MASK>'", "invalid number \"zz\""]),
        (&["-s", s, "--input-range", "5-4"], 2, &["'--input-range <RANGE>'"]),
        (&["-s", s, "--domain-range", "0-0x100000000"], 2, &["'--domain-range <RANGE>'"]),
        (&["-s", s, "--socket-mode", "999"], 2, &["'--socket-mode <MODE>'", "octal"]),
        (&["-s", s, "--endpoints", "00:20.0"], 2, &["'--endpoints <LIST>'", "PCI address"]),
        (&["-s", s, "--endpoints", "0-0x20000"], 2, &["'--endpoints <LIST>'", "65536"]),
        (&["-s", s, "--group", "00:06.0,zz"], 2, &["'--group <LIST>'"]),
        (&["-s", s, "--reserved", "1-2:weird"], 2, &["'--reserved <REGION>'"]),
        (&["-s", s, "--queue-size", "100"], 2, &["'--queue-size <N>'", "power of two"]),
        (&["-s", s, "--max-table-mib", "0"], 2, &["'--max-table-mib <MIB>'"]),
        (&["-s", s, "--probe-size", "x"], 2, &["'--probe-size <BYTES>'"]),
        (&["-s", s, "--seccomp", "strict"], 2, &["'--seccomp <MODE>'"]),
        (&["--bypass"], 2, &["--socket-path <PATH>"]),
        (&["viot", "-o", v, "--iommu", "0001:00:04.0"], 2, &["'--iommu <BDF>'", "segment 1"]),
        (&["viot", "-o", v, "--endpoints", "00:06.0-00:05.0"], 2, &["'--endpoints <LIST>'"]),
        // Checks across options: status 1, one line naming the options involved.
        (&["-s", s, "--probe-size", "8"], 1, &["--probe-size 8 cannot hold", "--reserved"]),
        (&["-s", s, "--page-size-mask", "0x800"], 1, &["--page-size-mask: granule 0x800"]),
        (&["-s", s, "--group", "01:00.0"], 1, &["--group, --endpoints: endpoint 0x100"]),
        (&["-s", s, "--group", "00:06.0", "--group", "00:06.0-00:06.1"], 1, &["--group: endpoint 0x30 is in two groups"]),
        (&["-s", s, "--reserved", "0xfee00000-0xfee00fff:msi"], 1, &["--reserved, --no-msi-region:"]),
        (&["-s", s, "--max-domains", "0"], 1, &["--max-domains:"]),
        (&["viot", "-o", "/nonexistent/dir/viot.bin"], 1, &["/nonexistent/dir/viot.bin: No such file"]),
    ];
    for (args, code, says) in table {
        let out = run(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(*code), "{args:?}: {stderr}");
        let first = stderr.lines().next().unwrap_or_default();
        for s in *says {
            assert!(stderr.contains(s), "{args:?}: {s:?} not in {stderr:?}");
        }
        if *code == 1 {
            assert_eq!(stderr.lines().count(), 1, "{args:?}: one line: {stderr}");
            assert!(first.starts_with("vhost-device-iommu: "), "{first}");
        } else {
            assert!(first.starts_with("error: "), "{first}");
        }
        assert!(!sock.exists(), "{args:?} created the socket");
    }
}
