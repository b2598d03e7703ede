// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The control socket as a user reaches it: `vhost-device-iommu ctl` against the real daemon,
//! and endpoints named by PCI address wherever the control socket takes one.

mod common;

use std::{
    io::{BufRead, BufReader},
    os::unix::net::UnixListener,
    path::Path,
    process::{Command, Output, Stdio},
    thread,
};

use common::*;
use serde_json::{json, Value};
use virtio::Status;

/// pci-testdev at 00:05.0.
const EP: u32 = 0x28;

fn ctl(control: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("ctl")
        .arg("--control-socket")
        .arg(control)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Runs `ctl`, expects `code`, and returns the reply it printed.
fn reply(control: &Path, args: &[&str], code: i32) -> (Value, String) {
    let out = ctl(control, args);
    let (stdout, stderr) = (
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    );
    assert_eq!(out.status.code(), Some(code), "{args:?}: {stdout} {stderr}");
    let reply = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{stdout:?}: {e}"));
    (reply, stderr)
}

#[test]
fn ctl_talks_to_the_daemon() {
    let d = Daemon::start(&["--group", "00:06.0,00:06.1"]);
    let mut dev = d.connect();
    assert_eq!(status_of(&mut dev, &attach(1, EP)), Status::Ok);
    assert_eq!(
        status_of(&mut dev, &map(1, 0x1000, 0x1fff, 0x8000)),
        Status::Ok
    );

    let (r, stderr) = reply(&d.control, &["use-dma-api", "00:05.0"], 0);
    assert_eq!(r, json!({"ok": true, "endpoint": EP, "bdf": "00:05.0"}));
    assert!(stderr.is_empty(), "{stderr}");
    let out = ctl(
        &d.control,
        &[
            "translate",
            "00:05.0",
            "0x1010",
            "--len",
            "16",
            "--access",
            "write",
        ],
    );
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.lines().count() > 1, "indented by default: {text}");
    let r: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(r["gpa"], 0x8010);
    assert_eq!(r["len"], 16);
    assert_eq!(r["bdf"], "00:05.0");

    // A refused translation: the reply on stdout (one line with --compact), one line on
    // stderr, status 1.
    let out = ctl(
        &d.control,
        &["--compact", "translate", "0000:00:05.0", "0x5000"],
    );
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    let r: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(r["fault"], "unmapped");
    assert_eq!(
        String::from_utf8(out.stderr).unwrap(),
        "vhost-device-iommu: ctl: translate: fault unmapped\n"
    );

    let (r, _) = reply(&d.control, &["stats"], 0);
    assert_eq!(r["stats"]["requests"]["attach"]["ok"], 1, "{r}");
    let (r, _) = reply(&d.control, &["domains"], 0);
    assert_eq!(r["domains"][0]["endpoints"], json!([EP]));
    assert_eq!(r["domains"][0]["bdfs"], json!(["00:05.0"]));
    let (r, _) = reply(&d.control, &["mappings", "1"], 0);
    assert_eq!(r["mappings"][0]["phys_start"], 0x8000, "{r}");

    let (r, _) = reply(&d.control, &["claim", "00:06.1", "--cookie", "7"], 0);
    let group = r["group"].as_u64().unwrap();
    let (r, _) = reply(&d.control, &["groups"], 0);
    let g = &r["groups"][group as usize];
    assert_eq!(g["endpoints"], json!([0x30, 0x31]));
    assert_eq!(g["bdfs"], json!(["00:06.0", "00:06.1"]));
    assert_eq!(g["owner"], 7);
    let (_, stderr) = reply(
        &d.control,
        &["release", "--group", &group.to_string(), "--cookie", "8"],
        1,
    );
    assert!(
        stderr.starts_with("vhost-device-iommu: ctl: release: "),
        "{stderr}"
    );
    reply(
        &d.control,
        &["release", "--group", &group.to_string(), "--cookie", "7"],
        0,
    );

    let (r, _) = reply(&d.control, &["raw", r#"{"cmd": "groups"}"#], 0);
    assert_eq!(r["groups"][group as usize]["owner"], Value::Null);
    let (r, stderr) = reply(&d.control, &["raw", r#"{"cmd":"nope"}"#], 1);
    assert_eq!(r["ok"], false);
    assert_eq!(
        stderr,
        "vhost-device-iommu: ctl: nope: unknown command \"nope\"\n"
    );
}

#[test]
fn ctl_says_why_it_got_no_reply() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.ctl");
    let out = ctl(&missing, &["stats"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8(out.stderr).unwrap(),
        format!(
            "vhost-device-iommu: ctl: control socket {}: No such file or directory (os error 2)\n",
            missing.display()
        )
    );

    // A peer that reads the request and never answers, then one that hangs up.
    let path = dir.path().join("silent.ctl");
    let listener = UnixListener::bind(&path).unwrap();
    let server = thread::spawn(move || {
        for hang_up in [false, true] {
            let (stream, _) = listener.accept().unwrap();
            let mut line = String::new();
            BufReader::new(&stream).read_line(&mut line).unwrap();
            assert_eq!(line, "{\"cmd\":\"stats\"}\n");
            if !hang_up {
                // Hold the connection until the client gives up.
                let _ = BufReader::new(&stream).read_line(&mut line);
            }
        }
    });
    let out = ctl(&path, &["--timeout", "1", "stats"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.ends_with(": no reply within 1 s\n"), "{stderr}");
    let out = ctl(&path, &["stats"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.ends_with(": the daemon closed the connection without a reply\n"),
        "{stderr}"
    );
    server.join().unwrap();
}

#[test]
fn the_control_socket_takes_endpoints_as_the_command_line_does() {
    let d = Daemon::start(&["--endpoints", "00:05.0,0001:02:03.4"]);
    let mut dev = d.connect();
    assert_eq!(status_of(&mut dev, &attach(1, EP)), Status::Ok);
    assert_eq!(
        status_of(&mut dev, &map(1, 0x1000, 0x1fff, 0x8000)),
        Status::Ok
    );
    let r = d.control(json!({"cmd": "use_dma_api", "endpoint": "00:05.0"}));
    assert_eq!(r, json!({"ok": true, "endpoint": EP, "bdf": "00:05.0"}));
    for endpoint in [
        json!("00:05.0"),
        json!("0000:00:05.0"),
        json!("0x28"),
        json!("40"),
        json!(40),
    ] {
        let r = d.control(json!({"cmd": "translate", "endpoint": endpoint, "iova": 0x1008}));
        assert_eq!(r["gpa"], 0x8008, "{endpoint}: {r}");
        assert_eq!((&r["endpoint"], &r["bdf"]), (&json!(EP), &json!("00:05.0")));
    }
    // A segment other than 0: ID = segment << 16 | requester ID.
    let r = d.control(json!({"cmd": "claim", "endpoint": "0001:02:03.4", "cookie": 1}));
    assert_eq!(r["ok"], true, "{r}");
    let r =
        d.control(json!({"cmd": "translate", "endpoint": "0001:02:03.4", "iova": 0, "owner": 1}));
    assert_eq!(r["fault"], "no_domain", "{r}");
    assert_eq!(
        (&r["endpoint"], &r["bdf"]),
        (&json!(0x1_021c), &json!("0001:02:03.4"))
    );
    let groups = d.control(json!({"cmd": "groups"}));
    let bdfs: Vec<&Value> = groups["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| &g["bdfs"])
        .collect();
    assert_eq!(bdfs, [&json!(["00:05.0"]), &json!(["0001:02:03.4"])]);
    assert_eq!(groups["groups"][0]["attached_bdfs"], json!(["00:05.0"]));

    for (endpoint, says) in [
        (
            json!("00:20.0"),
            "endpoint: invalid PCI address \"00:20.0\"",
        ),
        (json!("zz"), "endpoint: invalid endpoint \"zz\""),
        (
            json!(0x1_0000_0000u64),
            "endpoint: not a 32-bit endpoint ID",
        ),
        (json!(-1), "endpoint: not a 32-bit endpoint ID"),
        (
            json!([40]),
            "endpoint: expected an endpoint ID or a PCI address",
        ),
    ] {
        let r = d.control(json!({"cmd": "translate", "endpoint": endpoint, "iova": 0}));
        assert_eq!(r["ok"], false, "{endpoint}: {r}");
        let error = r["error"].as_str().unwrap();
        assert!(error.starts_with(says), "{endpoint}: {error}");
    }
    let r = d.control(json!({"cmd": "translate", "iova": 0}));
    assert_eq!(r["error"], "missing \"endpoint\"");
}
