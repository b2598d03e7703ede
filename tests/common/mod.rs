// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
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
use vhost_iommu_testkit::{Completion, Driver, Options};
use virtio::{MapFlags, Request, Status};

pub const PROBE_SIZE: u32 = 512;
pub const BIN: &str = env!("CARGO_BIN_EXE_vhost-device-iommu");

/// The daemon under test. Killed when dropped.
pub struct Daemon {
    child: Option<Child>,
    pub dir: TempDir,
    pub socket: PathBuf,
    pub control: PathBuf,
    /// How it was started, for [`Daemon::kill_and_restart`].
    args: Vec<String>,
    logged: Option<String>,
    env: Vec<(String, String)>,
}

impl Daemon {
    /// Starts the daemon with `--socket-path`, `--control-socket` and `args`, and waits until
    /// both sockets exist.
    pub fn start(args: &[&str]) -> Daemon {
        Self::spawn(args, None, &[])
    }

    /// As [`Daemon::start`], with `RUST_LOG=rust_log` and stderr captured in a file (read it with
    /// [`Daemon::log`]).
    pub fn start_logged(args: &[&str], rust_log: &str) -> Daemon {
        Self::spawn(args, Some(rust_log), &[])
    }

    /// As [`Daemon::start_logged`], with `env` added to the daemon's environment.
    pub fn start_with_env(args: &[&str], rust_log: &str, env: &[(&str, String)]) -> Daemon {
        Self::spawn(args, Some(rust_log), env)
    }

    fn spawn(args: &[&str], logged: Option<&str>, env: &[(&str, String)]) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("viommu.sock");
        let control = dir.path().join("viommu.ctl");
        let mut daemon = Daemon {
            child: None,
            dir,
            socket,
            control,
            args: args.iter().map(|a| a.to_string()).collect(),
            logged: logged.map(String::from),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
        };
        daemon.child = Some(daemon.command().spawn().expect("spawn the daemon"));
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

    fn command(&self) -> Command {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let mut command = Command::new(BIN);
        command
            .arg("--socket-path")
            .arg(&self.socket)
            .arg("--control-socket")
            .arg(&self.control)
            .args(&args)
            .args(seccomp_args(&args))
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null());
        if let Some(level) = &self.logged {
            // Appended to: a restarted daemon's lines follow the dead one's.
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.dir.path().join(LOG_FILE))
                .unwrap();
            command.env("RUST_LOG", level).stderr(log);
        }
        command
    }

    /// Kills the daemon with SIGKILL and starts it again with the same arguments, sockets and
    /// environment (what a crash and a supervisor's restart do); returns once the new one
    /// answers on its control socket.
    pub fn kill_and_restart(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.child = Some(self.command().spawn().expect("spawn the daemon again"));
        let deadline = Instant::now() + Duration::from_secs(20);
        // The dead daemon's socket files stay until the new one replaces them: wait for a
        // control connection, which only a live daemon accepts.
        while UnixStream::connect(&self.control).is_err() {
            assert!(
                Instant::now() < deadline,
                "the restarted daemon did not open its control socket"
            );
            assert!(self.alive(), "the restarted daemon exited: {}", self.log());
            thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Connects a frontend with default options (EVENT_IDX, indirect, all device features).
    pub fn connect(&self) -> Driver {
        self.connect_with(Options::default())
    }

    pub fn connect_with(&self, options: Options) -> Driver {
        Driver::connect(&self.socket, options).expect("frontend connects")
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
        self.terminate(signal)
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
pub fn send(dev: &mut Driver, request: &Request) -> Completion {
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
pub fn status_of(dev: &mut Driver, request: &Request) -> Status {
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

// ---- process inspection, captured logs, persistent control clients (tests/hostile.rs) ------

/// File in the daemon's temp dir that [`Daemon::start_logged`] sends stderr to.
pub const LOG_FILE: &str = "daemon.log";

impl Daemon {
    /// The captured stderr of a daemon started with [`Daemon::start_logged`].
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join(LOG_FILE)).unwrap_or_default()
    }

    /// The exit status, if the daemon has exited.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().unwrap().try_wait().unwrap()
    }

    /// Sends a signal with kill(1) and waits for the exit status, keeping the temp dir (and the
    /// captured log) for inspection.
    pub fn terminate(&mut self, signal: &str) -> ExitStatus {
        let pid = self.pid();
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .unwrap();
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.exit_status() {
                return status;
            }
            assert!(Instant::now() < deadline, "daemon ignored SIG{signal}");
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// A field of /proc/<pid>/status, as its number (kB for the Vm* fields).
    pub fn proc_status(&self, key: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in /proc/<pid>/status"))
    }

    /// Resident memory, in KiB.
    pub fn rss_kib(&self) -> u64 {
        self.proc_status("VmRSS")
    }

    /// Open file descriptors.
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .count()
    }

    /// Threads of the daemon named `name` (their `comm`).
    pub fn threads_named(&self, name: &str) -> usize {
        std::fs::read_dir(format!("/proc/{}/task", self.pid()))
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .filter(|comm| comm.trim_end() == name)
            .count()
    }

    /// Waits until `f()` holds (10 s at most).
    pub fn wait_for(&self, what: &str, f: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// A control client that keeps its connection.
    pub fn control_client(&self) -> ControlClient {
        ControlClient::connect(&self.control)
    }
}

/// A persistent control-socket connection: one request line, one reply line.
pub struct ControlClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl ControlClient {
    pub fn connect(path: &std::path::Path) -> ControlClient {
        let stream = UnixStream::connect(path).expect("control socket");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream
            .set_write_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        ControlClient {
            writer: stream.try_clone().unwrap(),
            reader: BufReader::new(stream),
        }
    }

    /// Sends raw bytes (a newline is not added).
    pub fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.writer.write_all(bytes)
    }

    /// Reads one reply line; None once the daemon closed the connection (end of file, or a
    /// reset: Linux resets a unix stream closed with unread data).
    pub fn read_reply(&mut self) -> Option<Value> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => None,
            Ok(_) => Some(
                serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad reply {line:?}: {e}")),
            ),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => None,
            Err(e) => panic!("control read: {e}"),
        }
    }

    /// Sends a request and reads the reply; None if either fails (the daemon went away).
    pub fn try_request(&mut self, request: &Value) -> Option<Value> {
        self.send_raw(format!("{request}\n").as_bytes()).ok()?;
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(n) if n > 0 => serde_json::from_str(&line).ok(),
            _ => None,
        }
    }

    pub fn request(&mut self, request: Value) -> Value {
        self.send_raw(format!("{request}\n").as_bytes()).unwrap();
        self.read_reply().expect("a reply")
    }
}

impl Daemon {
    /// Lowers the daemon's open-file limit (soft and hard) while it runs.
    pub fn limit_open_files(&self, n: u64) {
        let limit = libc::rlimit {
            rlim_cur: n,
            rlim_max: n,
        };
        // SAFETY: prlimit only reads `limit` (valid for the call) and writes nothing (the old
        // limit pointer is null); the pid is our child's.
        let r = unsafe {
            libc::prlimit(
                self.pid() as libc::pid_t,
                libc::RLIMIT_NOFILE,
                &limit,
                std::ptr::null_mut(),
            )
        };
        assert_eq!(r, 0, "prlimit: {}", std::io::Error::last_os_error());
    }
}

// ---- seccomp (tests/seccomp.rs; any suite with VHOST_IOMMU_TEST_SECCOMP) ---------------------

/// Environment variable that runs every daemon a test starts under `--seccomp <mode>` (`off`,
/// `log`, `trap` or `kill`; `1` means `kill`), unless the test chose a mode itself: e.g.
/// `VHOST_IOMMU_TEST_SECCOMP=kill cargo test --test daemon --test hostile`.
pub const SECCOMP_ENV: &str = "VHOST_IOMMU_TEST_SECCOMP";

/// The `--seccomp` arguments [`SECCOMP_ENV`] adds to a daemon started with `args`.
pub fn seccomp_args(args: &[&str]) -> Vec<String> {
    match std::env::var(SECCOMP_ENV) {
        Ok(mode) if !mode.is_empty() && !args.contains(&"--seccomp") => {
            let mode = if mode == "1" {
                "kill".to_string()
            } else {
                mode
            };
            vec!["--seccomp".into(), mode]
        }
        _ => Vec::new(),
    }
}

impl Daemon {
    /// The `Seccomp:` field of every thread's /proc status (2 = filtered), and how many filters
    /// each thread has.
    pub fn thread_seccomp(&self) -> Vec<(String, u64, u64)> {
        std::fs::read_dir(format!("/proc/{}/task", self.pid()))
            .unwrap()
            .filter_map(|t| {
                let dir = t.ok()?.path();
                let comm = std::fs::read_to_string(dir.join("comm")).ok()?;
                let status = std::fs::read_to_string(dir.join("status")).ok()?;
                let field = |key: &str| {
                    status
                        .lines()
                        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
                        .and_then(|v| v.trim().parse().ok())
                };
                Some((
                    comm.trim_end().to_string(),
                    field("Seccomp")?,
                    field("Seccomp_filters")?,
                ))
            })
            .collect()
    }
}

/// Applies `request` to the reference model and returns the status the device must answer.
pub fn reference_status(r: &mut ownership::reference::Reference, request: &Request) -> Status {
    use ownership::DomainKind;
    let result = match *request {
        Request::Attach {
            domain,
            endpoint,
            bypass,
        } => {
            let kind = if bypass {
                DomainKind::Identity
            } else {
                DomainKind::Paging
            };
            r.attach(domain, endpoint, kind)
        }
        Request::Detach { domain, endpoint } => r.detach(domain, endpoint),
        Request::Map {
            domain,
            virt_start,
            virt_end,
            phys_start,
            flags,
        } => r.map(
            domain,
            virt_start,
            virt_end,
            phys_start,
            vhost_device_iommu::request::perms_of(flags),
        ),
        Request::Unmap {
            domain,
            virt_start,
            virt_end,
        } => r.unmap(domain, virt_start, virt_end).map(|_| ()),
        Request::Probe { endpoint } => r.probe(endpoint).map(|_| ()),
    };
    match result {
        Ok(()) => Status::Ok,
        Err(e) => vhost_device_iommu::request::status_of(&e),
    }
}
