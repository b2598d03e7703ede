// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The vhost-user backend program conventions (QEMU's docs/interop/vhost-user.rst, "Backend
//! program conventions") and the command line's errors, on the real binary: `--fd` with a
//! listening socket handed over as a management layer does, `--print-capabilities`, and a
//! table of bad invocations with the option each error must name.

mod common;

use std::{
    os::unix::{
        io::{AsRawFd, RawFd},
        net::{UnixDatagram, UnixListener, UnixStream},
    },
    path::Path,
    process::{Child, Command, Output, Stdio},
    sync::Mutex,
    thread,
    time::{Duration, Instant},
};

use common::*;
use serde_json::{json, Value};
use vhost_iommu_testkit::{Driver, Options};
use virtio::Status;

/// pci-testdev at 00:05.0.
const EP: u32 = 0x28;

/// Held while a descriptor of this test process is inheritable, so that no other test here
/// spawns a child that would inherit it too.
static INHERITABLE: Mutex<()> = Mutex::new(());

fn set_cloexec(fd: RawFd, on: bool) {
    // SAFETY: F_GETFD/F_SETFD only read and set the flags of a descriptor this test owns.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFD);
        assert!(flags >= 0, "F_GETFD: {}", std::io::Error::last_os_error());
        let flags = if on {
            flags | libc::FD_CLOEXEC
        } else {
            flags & !libc::FD_CLOEXEC
        };
        assert_eq!(libc::fcntl(fd, libc::F_SETFD, flags), 0);
    }
}

fn is_nonblocking(fd: RawFd) -> bool {
    // SAFETY: F_GETFL only reads the flags of a descriptor this test owns.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    assert!(flags >= 0);
    flags & libc::O_NONBLOCK != 0
}

/// Spawns the daemon with `--fd <fd>` and `args`, `fd` inherited at its own number (the way
/// a management layer hands a socket over); stdout and stderr are captured.
fn spawn_with_fd(fd: RawFd, args: &[&str]) -> Child {
    let _only_this_child = INHERITABLE.lock().unwrap_or_else(|e| e.into_inner());
    set_cloexec(fd, false);
    let child = Command::new(BIN)
        .arg("--fd")
        .arg(fd.to_string())
        .args(args)
        .args(seccomp_args(args))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    set_cloexec(fd, true);
    child.expect("spawn the daemon")
}

fn wait_for_path(path: &Path, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("daemon exited: {status}");
        }
        assert!(Instant::now() < deadline, "no {}", path.display());
        thread::sleep(Duration::from_millis(5));
    }
}

fn control(path: &Path, request: Value) -> Value {
    ControlClient::connect(path).request(request)
}

fn sigterm(child: &mut Child) -> std::process::ExitStatus {
    let status = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "daemon ignored SIGTERM");
        thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn fd_serves_frontend_after_frontend_and_leaves_the_path_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (path, ctl) = (dir.path().join("mgmt.sock"), dir.path().join("viommu.ctl"));
    let listener = UnixListener::bind(&path).unwrap();
    // A management layer may hand over a non-blocking socket: the daemon must not spin on it.
    listener.set_nonblocking(true).unwrap();
    let fd = listener.as_raw_fd();
    let mut child = spawn_with_fd(fd, &["--control-socket", ctl.to_str().unwrap()]);
    wait_for_path(&ctl, &mut child);
    // The flag belongs to the shared open file description: the daemon cleared it before
    // creating its control socket.
    assert!(!is_nonblocking(fd), "the daemon made the socket blocking");

    {
        let mut dev = Driver::connect(&path, Options::default()).unwrap();
        assert_eq!(status_of(&mut dev, &attach(1, EP)), Status::Ok);
        assert_eq!(
            status_of(&mut dev, &map(1, 0x1000, 0x1fff, 0x8000)),
            Status::Ok
        );
        control(&ctl, json!({"cmd": "use_dma_api", "endpoint": "00:05.0"}));
        let t = control(
            &ctl,
            json!({"cmd": "translate", "endpoint": "00:05.0", "iova": 0x1010}),
        );
        assert_eq!(t["gpa"], 0x8010, "{t}");
    }
    // The second frontend on the same inherited socket finds a fresh device.
    let mut dev = Driver::connect(&path, Options::default()).unwrap();
    assert_eq!(
        status_of(&mut dev, &map(1, 0x1000, 0x1fff, 0)),
        Status::NoEnt
    );
    assert_eq!(status_of(&mut dev, &attach(1, EP)), Status::Ok);
    let stats = control(&ctl, json!({"cmd": "stats"}));
    assert_eq!(stats["stats"]["connections"], 2, "{stats}");
    drop(dev);

    let status = sigterm(&mut child);
    assert!(status.success(), "{status:?}");
    assert!(
        !ctl.exists(),
        "the control socket the daemon created is removed"
    );
    assert!(
        path.exists(),
        "the handed-over socket's path is not the daemon's to remove"
    );
    // The management layer's socket still works: a connection queues on it.
    listener.set_nonblocking(false).unwrap();
    let _client = UnixStream::connect(&path).unwrap();
    listener.accept().unwrap();
}

#[test]
fn fd_must_be_a_listening_unix_stream_socket() {
    let pair = UnixStream::pair().unwrap();
    let datagram = UnixDatagram::unbound().unwrap();
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let file = std::fs::File::open("/dev/null").unwrap();
    let cases: [(RawFd, &str); 4] = [
        (
            pair.0.as_raw_fd(),
            "the socket is not listening (listen(2) it before handing it over)",
        ),
        (datagram.as_raw_fd(), "not a stream socket"),
        (tcp.as_raw_fd(), "not a Unix domain socket"),
        (file.as_raw_fd(), "not a socket"),
    ];
    for (fd, problem) in cases {
        let out = spawn_with_fd(fd, &[]).wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{problem}: {out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            stderr,
            format!("vhost-device-iommu: --fd {fd}: {problem}\n")
        );
    }
}

fn run(args: &[&str]) -> Output {
    let _no_inheritable_descriptor = INHERITABLE.lock().unwrap_or_else(|e| e.into_inner());
    Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn print_capabilities_prints_the_conventions_json_and_exits() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("never.sock");
    let help = String::from_utf8(run(&["--help"]).stdout).unwrap();
    let mut outputs = Vec::new();
    for args in [
        &["--print-capabilities"][..],
        // Every other argument is ignored, bad ones included, and nothing is served.
        &[
            "--socket-path",
            socket.to_str().unwrap(),
            "--print-capabilities",
        ],
        &["--page-size-mask", "zz", "--print-capabilities"],
        &["viot", "--print-capabilities"],
    ] {
        let out = run(args);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {out:?}");
        assert!(out.stderr.is_empty(), "{args:?}: {out:?}");
        outputs.push(String::from_utf8(out.stdout).unwrap());
    }
    assert!(!socket.exists());
    assert!(outputs.iter().all(|o| *o == outputs[0]));
    let text = &outputs[0];
    assert!(
        text.starts_with("{\n  \"type\": \"iommu\",\n  \"features\": ["),
        "{text}"
    );
    let caps: Value = serde_json::from_str(text).unwrap();
    assert_eq!(caps.as_object().unwrap().len(), 2, "{caps}");
    let features: Vec<&str> = caps["features"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    assert!(features.len() >= 20, "{features:?}");
    for f in &features {
        assert!(
            help.contains(&format!("--{f} ")) || help.contains(&format!("--{f}\n")),
            "{f}"
        );
    }
    // An operand after `--` is not the option.
    let out = run(&["--", "--print-capabilities"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
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
        (&["-s", s, "--fd", "3"], 2, &["'--fd <FD>'", "'--socket-path <PATH>'"]),
        (&["--fd=-3"], 2, &["'--fd <FD>'"]),
        (&["--bypass"], 2, &["--socket-path <PATH>|--fd <FD>"]),
        (&["viot", "-o", v, "--iommu", "0001:00:04.0"], 2, &["'--iommu <BDF>'", "segment 1"]),
        (&["viot", "-o", v, "--endpoints", "00:06.0-00:05.0"], 2, &["'--endpoints <LIST>'"]),
        (&["ctl", "-c", s, "translate", "00:05.0", "zz"], 2, &["'<IOVA>'"]),
        (&["ctl", "-c", s, "translate", "00:20.0", "0"], 2, &["'<ENDPOINT>'"]),
        (&["ctl", "-c", s, "claim", "00:05.0"], 2, &["--cookie <COOKIE>"]),
        (&["ctl", "-c", s, "--timeout", "0", "stats"], 2, &["'--timeout <SECONDS>'"]),
        (&["ctl", "-c", s, "raw", "{"], 2, &["'<JSON>'", "not JSON"]),
        // Checks across options: status 1, one line naming the options involved.
        (&["-s", s, "--probe-size", "8"], 1, &["--probe-size 8 cannot hold", "--reserved"]),
        (&["-s", s, "--page-size-mask", "0x800"], 1, &["--page-size-mask: granule 0x800"]),
        (&["-s", s, "--group", "0001:00:00.0"], 1, &["--group, --endpoints: endpoint 0x10000"]),
        (&["-s", s, "--group", "00:06.0", "--group", "00:06.0-00:06.1"], 1, &["--group: endpoint 0x30 is in two groups"]),
        (&["-s", s, "--reserved", "0xfee00000-0xfee00fff:msi"], 1, &["--reserved, --no-msi-region:"]),
        (&["-s", s, "--max-domains", "0"], 1, &["--max-domains:"]),
        (&["--fd", "1000"], 1, &["--fd 1000: not an open file descriptor"]),
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
