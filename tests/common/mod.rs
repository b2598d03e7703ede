//! Harness shared by the integration tests: the real daemon binary as a child process on a temp
//! socket, its control socket, and request helpers.
#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::{json, Value};
use tempfile::TempDir;
use vhost_device_iommu::testkit::{Completion, Device, Options};
use virtio::{MapFlags, Request, Status};

pub const PROBE_SIZE: u32 = 512;
pub const BIN: &str = env!("CARGO_BIN_EXE_vhost-device-iommu");

/// The daemon under test. Killed when dropped.
pub struct Daemon {
    child: Option<Child>,
    pub dir: TempDir,
    pub socket: PathBuf,
    pub control: PathBuf,
}

impl Daemon {
    /// Starts the daemon with `--socket-path`, `--control-socket` and `args`, and waits until
    /// both sockets exist.
    pub fn start(args: &[&str]) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("viommu.sock");
        let control = dir.path().join("viommu.ctl");
        let child = Command::new(BIN)
            .arg("--socket-path")
            .arg(&socket)
            .arg("--control-socket")
            .arg(&control)
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn the daemon");
        let daemon = Daemon {
            child: Some(child),
            dir,
            socket,
            control,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(daemon.socket.exists() && daemon.control.exists()) {
            assert!(
                Instant::now() < deadline,
                "daemon did not create its sockets"
            );
            thread::sleep(Duration::from_millis(5));
        }
        daemon
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Connects a frontend with default options (EVENT_IDX, indirect, all device features).
    pub fn connect(&self) -> Device {
        self.connect_with(Options::default())
    }

    pub fn connect_with(&self, options: Options) -> Device {
        Device::connect(&self.socket, options).expect("frontend connects")
    }

    /// Sends one control request and returns the reply.
    pub fn control(&self, request: Value) -> Value {
        let stream = UnixStream::connect(&self.control).expect("control socket");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut writer = stream.try_clone().unwrap();
        writeln!(writer, "{request}").unwrap();
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad reply {line:?}: {e}"))
    }

    pub fn stats(&self) -> Value {
        let reply = self.control(json!({"cmd": "stats"}));
        assert_eq!(reply["ok"], true, "{reply}");
        reply["stats"].clone()
    }

    /// Waits until `f(stats)` holds (the daemon updates some counters after replying).
    pub fn wait_stats(&self, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let stats = self.stats();
            if f(&stats) {
                return stats;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {stats}"
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends a signal with kill(1) and waits for the exit status.
    pub fn signal(mut self, signal: &str) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "daemon ignored SIG{signal}");
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Whether the daemon process is still running.
    pub fn alive(&mut self) -> bool {
        self.child.as_mut().unwrap().try_wait().unwrap().is_none()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Sends a request and returns its completion.
pub fn send(dev: &mut Device, request: &Request) -> Completion {
    dev.request(&request.encode(), request.writable_len(PROBE_SIZE))
        .expect("request completes")
}

/// The status in a completion's tail.
pub fn status(c: &Completion) -> Status {
    assert_eq!(
        c.used_len as usize,
        c.data.len(),
        "the whole writable area is written"
    );
    Status::try_from(c.tail(4)[0]).expect("a valid status")
}

/// Sends a request and returns its status.
pub fn status_of(dev: &mut Device, request: &Request) -> Status {
    status(&send(dev, request))
}

pub fn attach(domain: u32, endpoint: u32) -> Request {
    Request::Attach {
        domain,
        endpoint,
        bypass: false,
    }
}

pub fn attach_bypass(domain: u32, endpoint: u32) -> Request {
    Request::Attach {
        domain,
        endpoint,
        bypass: true,
    }
}

pub fn detach(domain: u32, endpoint: u32) -> Request {
    Request::Detach { domain, endpoint }
}

pub const RW: MapFlags = MapFlags {
    read: true,
    write: true,
    mmio: false,
};

pub fn map(domain: u32, virt_start: u64, virt_end: u64, phys_start: u64) -> Request {
    Request::Map {
        domain,
        virt_start,
        virt_end,
        phys_start,
        flags: RW,
    }
}

pub fn unmap(domain: u32, virt_start: u64, virt_end: u64) -> Request {
    Request::Unmap {
        domain,
        virt_start,
        virt_end,
    }
}

pub fn probe(endpoint: u32) -> Request {
    Request::Probe { endpoint }
}
