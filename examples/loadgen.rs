// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Load generator: plays VMM + guest driver over a real vhost-user socket and hammers the
//! request queue with MAP/UNMAP pairs, K requests per kick, busy-polling the used ring.
//!
//! ```text
//! # against a daemon that is already running
//! vhost-device-iommu --socket-path /tmp/viommu.sock &
//! cargo run --release --example loadgen -- --socket /tmp/viommu.sock --pid $!
//!
//! # or let it spawn the daemon built next to it (target/release/vhost-device-iommu);
//! # daemon arguments after `--`
//! cargo build --release --bin vhost-device-iommu
//! cargo run --release --example loadgen -- --spawn --batch 1,2,16,64 --duration 2 -- --poll-us 0
//!
//! # client on CPU 0, daemon on CPU 1 (two spinners sharing a CPU starve each other)
//! cargo run --release --example loadgen -- --spawn --pin 0,1
//! ```
//!
//! Each batch size K runs for `--duration` seconds: K MAPs of distinct 4 KiB pages posted, one
//! kick (or none, if the device suppressed notifications), wait for K completions by spinning
//! on the used ring, then K UNMAPs of the same pages the same way. IOVAs are laid out top-down
//! from 4 GiB (as Linux's IOVA allocator) and rotate through a window of pages. Reported:
//! requests/s, p50/p99 of the batch round-trip time (first post to last completion), and, when
//! the daemon's pid is known, the daemon's CPU time per request and its CPU use while idle.
//!
//! Direct chains run on a lean driver loop of its own (`Lean`, on rings the testkit hands
//! over): the 2K request buffers of a MAP batch and of an UNMAP batch are allocated once; a
//! batch rewrites each request's IOVA fields, its poisoned status tail (request and tail share
//! one cache line, as in Linux's request buffers), both descriptors of each chain (as Linux's
//! virtqueue_add does per request) and the available ring; one batch pair in 8 is timed
//! (latency samples and the deadline check), the others read no clock. `--indirect` keeps the
//! testkit's general path.
//!
//! This file is also compiled into `benches/request_path.rs` (`#[path]`), so it has a small
//! public API besides `main`.
#![allow(dead_code)]

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use vhost_iommu_testkit::{
    need_event, Chain, Completion, Driver, Options, WaitMode, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio::{MapFlags, Request};
use vm_memory::{Bytes, GuestMemoryBackend, VolatileMemory};

/// Endpoint 00:05.0 (BDF 0x28): inside the daemon's default endpoint range.
pub const DEFAULT_ENDPOINT: u32 = 0x28;
const PAGE: u64 = 4096;
/// IOVAs are allocated top-down from here.
const IOVA_TOP: u64 = 1 << 32;
/// Pages the MAP/UNMAP pairs rotate through (rounded up to a multiple of K).
const WINDOW_PAGES: usize = 1024;
/// GPAs the mappings point at (the daemon does not check them against guest memory).
const GPA_BASE: u64 = 0x10_0000;

/// How one load run is set up.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub queue_size: u16,
    pub event_idx: bool,
    /// Post every request as an indirect table (what Linux does with INDIRECT_DESC).
    pub indirect: bool,
    pub endpoint: u32,
    pub domain: u32,
    /// Keep one page mapped in every 2 MiB region the window touches, so page-table nodes
    /// stay allocated (as in a domain with other live mappings).
    pub anchored: bool,
    pub wait: WaitMode,
    /// Ask for a dirty-page log as QEMU does while migrating (LOG_SHMFD, SET_LOG_BASE with a
    /// memfd, `VHOST_F_LOG_ALL`): every page the daemon writes is then logged.
    pub dirty_log: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            queue_size: 256,
            event_idx: true,
            indirect: false,
            endpoint: DEFAULT_ENDPOINT,
            domain: 1,
            anchored: false,
            wait: WaitMode::Spin,
            dirty_log: false,
        }
    }
}

/// What QEMU does when a migration starts: a log in shared memory covering guest RAM
/// (SET_LOG_BASE with a memfd), then SET_FEATURES with `VHOST_F_LOG_ALL`. Returns the log.
fn start_dirty_log(dev: &mut Driver) -> Result<std::fs::File, String> {
    use std::os::fd::{AsRawFd, FromRawFd};
    use vhost::{vhost_user::VhostUserVirtioFeatures, VhostBackend, VhostUserDirtyLogRegion};
    let top = dev
        .options()
        .memory
        .iter()
        .map(|r| r.end())
        .max()
        .unwrap_or(0);
    let bytes = (top / PAGE).div_ceil(8);
    // SAFETY: a static NUL-terminated name, no flags; the result is checked.
    let fd = unsafe { libc::memfd_create(c"dirty-log".as_ptr(), 0) };
    if fd < 0 {
        return Err(format!("memfd_create: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a new descriptor nothing else owns.
    let log = unsafe { std::fs::File::from_raw_fd(fd) };
    log.set_len(bytes).map_err(|e| format!("log: {e}"))?;
    let region = VhostUserDirtyLogRegion {
        mmap_size: bytes,
        mmap_offset: 0,
        mmap_handle: log.as_raw_fd(),
    };
    let features = dev.options().features_to_ack(dev.negotiated().features)
        | VhostUserVirtioFeatures::LOG_ALL.bits();
    let frontend = dev.connection().frontend();
    frontend
        .set_log_base(0, Some(region))
        .map_err(|e| format!("SET_LOG_BASE: {e}"))?;
    frontend
        .set_features(features)
        .map_err(|e| format!("SET_FEATURES with LOG_ALL: {e}"))?;
    Ok(log)
}

/// The result of one batch size.
#[derive(Debug, Clone)]
pub struct BatchResult {
    pub k: usize,
    pub requests: u64,
    pub elapsed: Duration,
    /// Batch round trips, nanoseconds, sorted.
    pub latencies_ns: Vec<u64>,
    /// Completions whose status was not OK, or whose used length was wrong.
    pub errors: u64,
    /// Daemon CPU time (all threads) during the run, if its pid is known.
    pub daemon_cpu: Option<Duration>,
    /// Load generator thread's CPU time during the run.
    pub client_cpu: Option<Duration>,
    pub kicks: u64,
}

impl BatchResult {
    pub fn requests_per_sec(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }

    pub fn percentile_ns(&self, p: f64) -> u64 {
        if self.latencies_ns.is_empty() {
            return 0;
        }
        let i = ((self.latencies_ns.len() - 1) as f64 * p).round() as usize;
        self.latencies_ns[i]
    }

    /// Daemon CPU nanoseconds per request.
    pub fn daemon_ns_per_request(&self) -> Option<f64> {
        self.daemon_cpu
            .map(|c| c.as_nanos() as f64 / self.requests.max(1) as f64)
    }

    pub fn client_ns_per_request(&self) -> Option<f64> {
        self.client_cpu
            .map(|c| c.as_nanos() as f64 / self.requests.max(1) as f64)
    }
}

/// A daemon child process on a socket in a private temporary directory; killed when dropped.
pub struct SpawnedDaemon {
    child: Child,
    _dir: tempfile::TempDir,
    pub socket: PathBuf,
}

impl SpawnedDaemon {
    /// Runs `program args... <socket_flag> <socket>` and waits for the socket to appear.
    /// With `cpu`, the process (all its threads) is bound to that CPU (through taskset).
    pub fn spawn_with(
        program: &Path,
        socket_flag: &str,
        args: &[String],
        envs: &[(&str, &str)],
        cpu: Option<usize>,
    ) -> std::io::Result<Self> {
        let dir = tempfile::tempdir()?;
        let socket = dir.path().join("viommu.sock");
        let mut cmd = match cpu {
            Some(cpu) => {
                let mut c = Command::new("taskset");
                c.arg("-c").arg(cpu.to_string()).arg(program);
                c
            }
            None => Command::new(program),
        };
        cmd.args(args)
            .arg(socket_flag)
            .arg(&socket)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            if let Some(status) = child.try_wait()? {
                return Err(std::io::Error::other(format!(
                    "{} exited with {status} before creating its socket",
                    program.display()
                )));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return Err(std::io::Error::other("daemon did not create its socket"));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(SpawnedDaemon {
            child,
            _dir: dir,
            socket,
        })
    }

    /// The vhost-device-iommu daemon with extra arguments.
    pub fn spawn(daemon: &Path, args: &[String], cpu: Option<usize>) -> std::io::Result<Self> {
        Self::spawn_with(daemon, "--socket-path", args, &[], cpu)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for SpawnedDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The daemon binary built next to this executable: `target/<profile>/vhost-device-iommu`
/// for `target/<profile>/examples/loadgen`.
pub fn default_daemon_path() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let mut dir = exe.parent()?;
    for _ in 0..3 {
        let candidate = dir.join("vhost-device-iommu");
        if candidate.is_file() {
            return Some(candidate);
        }
        dir = dir.parent()?;
    }
    None
}

/// Binds the calling thread to `cpu`, or lets it run anywhere (None). Returns whether it took.
pub fn pin_current_thread(cpu: Option<usize>) -> bool {
    const MAX: usize = 1024; // CPU_SETSIZE
    let cpus: Vec<usize> = match cpu {
        Some(c) if c < MAX => vec![c],
        Some(_) => return false,
        None => (0..MAX).collect(),
    };
    // SAFETY: cpu_set_t is a plain bit array (all-zero is the empty set); CPU_SET is given
    // indices below CPU_SETSIZE; pid 0 is the calling thread and the set's size is passed.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for c in cpus {
            libc::CPU_SET(c, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

/// CPU time of every thread of `pid` (from /proc/PID/task/*/schedstat, nanoseconds), or None.
pub fn process_cpu(pid: u32) -> Option<Duration> {
    let mut total = 0u64;
    let mut any = false;
    for entry in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let path = entry.ok()?.path().join("schedstat");
        if let Ok(s) = std::fs::read_to_string(path) {
            if let Some(ns) = s
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
            {
                total += ns;
                any = true;
            }
        }
    }
    if any {
        return Some(Duration::from_nanos(total));
    }
    // Fall back to utime + stime (clock ticks, usually 100 Hz).
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

/// CPU time of the calling thread.
pub fn thread_cpu() -> Option<Duration> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    s.split_whitespace()
        .next()?
        .parse()
        .ok()
        .map(Duration::from_nanos)
}

/// The daemon's CPU use over `window` while nobody sends it anything, in percent of one CPU.
pub fn idle_cpu_percent(pid: u32, window: Duration) -> Option<f64> {
    let before = process_cpu(pid)?;
    let start = Instant::now();
    std::thread::sleep(window);
    let after = process_cpu(pid)?;
    Some((after - before).as_secs_f64() / start.elapsed().as_secs_f64() * 100.0)
}

fn status_ok(c: &Completion) -> bool {
    c.used_len == 4 && c.data.len() == 4 && c.data[3] == 0 && c.data[0] == 0
}

/// A connected guest with the endpoint attached to the domain.
pub struct Guest {
    pub dev: Driver,
    pub opts: LoadOptions,
    /// Pages mapped for good (anchors), as IOVAs.
    anchors: Vec<u64>,
    /// The dirty-page log the daemon writes into (`dirty_log`).
    log: Option<std::fs::File>,
}

impl Guest {
    pub fn connect(socket: &Path, opts: LoadOptions) -> Result<Self, String> {
        let mut options = Options {
            queue_size: opts.queue_size,
            event_idx: opts.event_idx,
            wait: opts.wait,
            ..Options::default()
        };
        if opts.dirty_log {
            options.protocol_features |= vhost::vhost_user::VhostUserProtocolFeatures::LOG_SHMFD;
        }
        let mut dev = Driver::connect(socket, options).map_err(|e| format!("connect: {e}"))?;
        let log = if opts.dirty_log {
            Some(start_dirty_log(&mut dev)?)
        } else {
            None
        };
        let attach = Request::Attach {
            domain: opts.domain,
            endpoint: opts.endpoint,
            bypass: false,
        };
        let c = dev
            .request(&attach.encode(), 4)
            .map_err(|e| format!("ATTACH: {e}"))?;
        if !status_ok(&c) {
            return Err(format!("ATTACH refused: {:?}", c.data));
        }
        Ok(Guest {
            dev,
            opts,
            anchors: Vec::new(),
            log,
        })
    }

    /// Pages marked in the dirty-page log so far (0 without one).
    pub fn dirty_pages(&self) -> u64 {
        use std::os::unix::fs::FileExt;
        let Some(log) = &self.log else {
            return 0;
        };
        let len = log.metadata().map_or(0, |m| m.len()) as usize;
        let mut buf = vec![0u8; len];
        if log.read_exact_at(&mut buf, 0).is_err() {
            return 0;
        }
        buf.iter().map(|b| u64::from(b.count_ones())).sum()
    }

    fn send(&mut self, r: &Request) -> Result<(), String> {
        let c = self
            .dev
            .request(&r.encode(), 4)
            .map_err(|e| format!("{r:?}: {e}"))?;
        if status_ok(&c) {
            Ok(())
        } else {
            Err(format!("{r:?} refused: {:?}", c.data))
        }
    }

    /// Pages of the window for batch size `k`, as IOVAs (top-down from 4 GiB), skipping the
    /// first page of each 2 MiB region when anchored (those are mapped for good).
    fn window(&self, k: usize) -> Vec<u64> {
        let want = WINDOW_PAGES.div_ceil(k) * k;
        let mut pages = Vec::with_capacity(want);
        let mut iova = IOVA_TOP;
        while pages.len() < want {
            iova -= PAGE;
            if self.opts.anchored && iova % (2 << 20) == 0 {
                continue;
            }
            pages.push(iova);
        }
        pages
    }

    fn ensure_anchors(&mut self, pages: &[u64]) -> Result<(), String> {
        if !self.opts.anchored {
            return Ok(());
        }
        let lowest = pages.iter().copied().min().unwrap_or(IOVA_TOP);
        let mut region = lowest & !((2 << 20) - 1);
        while region < IOVA_TOP {
            if !self.anchors.contains(&region) {
                let r = Request::Map {
                    domain: self.opts.domain,
                    virt_start: region,
                    virt_end: region + PAGE - 1,
                    phys_start: GPA_BASE,
                    flags: RW,
                };
                self.send(&r)?;
                self.anchors.push(region);
            }
            region += 2 << 20;
        }
        Ok(())
    }

    /// Runs MAP/UNMAP batches of `k` requests for `duration` (after `warmup`), with the
    /// daemon's CPU time measured when `pid` is given.
    pub fn run(
        &mut self,
        k: usize,
        duration: Duration,
        warmup: Duration,
        pid: Option<u32>,
    ) -> Result<BatchResult, String> {
        if k == 0 || 2 * k > usize::from(self.opts.queue_size) && !self.opts.indirect {
            return Err(format!(
                "K={k} needs {} descriptors; the queue has {}",
                2 * k,
                self.opts.queue_size
            ));
        }
        let pages = self.window(k);
        self.ensure_anchors(&pages)?;
        let domain = self.opts.domain;
        let maps: Vec<Vec<u8>> = pages
            .iter()
            .enumerate()
            .map(|(i, &iova)| {
                Request::Map {
                    domain,
                    virt_start: iova,
                    virt_end: iova + PAGE - 1,
                    phys_start: GPA_BASE + i as u64 * PAGE,
                    flags: RW,
                }
                .encode()
            })
            .collect();
        let unmaps: Vec<Vec<u8>> = pages
            .iter()
            .map(|&iova| {
                Request::Unmap {
                    domain,
                    virt_start: iova,
                    virt_end: iova + PAGE - 1,
                }
                .encode()
            })
            .collect();
        let indirect = self.opts.indirect;
        if !indirect {
            return self.run_lean(k, &pages, duration, warmup, pid);
        }
        // Alternating MAP and UNMAP batches over the window.
        let mut batches: Vec<Vec<Chain<'_>>> = Vec::new();
        for g in 0..pages.len() / k {
            batches.push(
                maps[g * k..(g + 1) * k]
                    .iter()
                    .map(|b| make_chain(b, indirect))
                    .collect(),
            );
            batches.push(
                unmaps[g * k..(g + 1) * k]
                    .iter()
                    .map(|b| make_chain(b, indirect))
                    .collect(),
            );
        }
        let wait = self.opts.wait;
        let q = self.dev.requestq();
        let mut errors = 0u64;
        let mut b = 0usize;
        // One batch: post K chains, notify once (the device may have suppressed kicks), then
        // busy-poll the used ring. Like `Virtqueue::round_trip` with `WaitMode::Spin`, but it
        // reads the clock only once per 4096 empty polls instead of twice per completion
        // (a clock read costs ~50 ns on this kind of VM).
        let batch = |q: &mut vhost_iommu_testkit::Virtqueue,
                     chains: &[Chain<'_>],
                     errors: &mut u64|
         -> Result<Duration, String> {
            let start = Instant::now();
            for c in chains {
                q.post_chain(c).map_err(|e| format!("post: {e}"))?;
            }
            q.notify().map_err(|e| format!("kick: {e}"))?;
            let mut got = 0;
            let mut spins = 0u32;
            while got < chains.len() {
                match q.poll_used_tail().map_err(|e| format!("used ring: {e}"))? {
                    Some((_, used_len, tail)) => {
                        if used_len != 4 || tail[0] != 0 {
                            *errors += 1;
                        }
                        got += 1;
                    }
                    None => {
                        spins = spins.wrapping_add(1);
                        if spins % 4096 == 0 {
                            if start.elapsed() > Duration::from_secs(10) {
                                return Err(format!(
                                    "no completion in 10 s ({got} of {} done)",
                                    chains.len()
                                ));
                            }
                            if wait == WaitMode::Poll {
                                std::thread::yield_now();
                            }
                        }
                        std::hint::spin_loop();
                    }
                }
            }
            Ok(start.elapsed())
        };
        // Warm-up (also ends on an UNMAP batch so nothing stays mapped).
        let start = Instant::now();
        while start.elapsed() < warmup || b % 2 == 1 {
            batch(q, &batches[b], &mut errors)?;
            b = (b + 1) % batches.len();
        }
        let kicks0 = q.stats().kicks;
        let mut latencies = Vec::with_capacity(1 << 20);
        let meter = Meter::start(pid);
        let mut requests = 0u64;
        loop {
            // Check the clock only after a MAP+UNMAP pair of batches.
            for _ in 0..2 {
                let rt = batch(q, &batches[b], &mut errors)?;
                latencies.push(rt.as_nanos() as u64);
                requests += k as u64;
                b = (b + 1) % batches.len();
            }
            if meter.start.elapsed() >= duration {
                break;
            }
        }
        let kicks = q.stats().kicks - kicks0;
        Ok(meter.finish(k, requests, latencies, errors, kicks))
    }
}

/// Wall clock and CPU times at the start of a measured run.
struct Meter {
    pid: Option<u32>,
    start: Instant,
    daemon0: Option<Duration>,
    client0: Option<Duration>,
}

impl Meter {
    fn start(pid: Option<u32>) -> Self {
        let daemon0 = pid.and_then(process_cpu);
        let client0 = thread_cpu();
        Meter {
            pid,
            start: Instant::now(),
            daemon0,
            client0,
        }
    }

    /// The run's result: elapsed time, CPU used by the daemon and this thread since
    /// [`Meter::start`], and the sorted latency samples.
    fn finish(
        self,
        k: usize,
        requests: u64,
        mut latencies_ns: Vec<u64>,
        errors: u64,
        kicks: u64,
    ) -> BatchResult {
        let elapsed = self.start.elapsed();
        let since = |a: Option<Duration>, b: Option<Duration>| match (a, b) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a)),
            _ => None,
        };
        latencies_ns.sort_unstable();
        BatchResult {
            k,
            requests,
            elapsed,
            latencies_ns,
            errors,
            daemon_cpu: since(self.daemon0, self.pid.and_then(process_cpu)),
            client_cpu: since(self.client0, thread_cpu()),
            kicks,
        }
    }
}

/// The lean loop's request slots: one cache line per request, the request at 0 and its
/// status tail at [`TAIL_AT`], so the driver writes (and the device reads, then writes) one
/// line per request.
const SLOT: u64 = 64;
const TAIL_AT: u64 = 48;
/// Completions after which the far `used_event` is moved along (as the testkit does).
const USED_EVENT_REFRESH: u16 = 0x1000;
/// Batch pairs between two clock reads (each timed pair gives two latency samples and the
/// deadline check); the others read no clock at all.
const TIMED_EVERY: u64 = 8;

/// The load generator's own driver loop on rings the testkit handed over
/// ([`Virtqueue::begin_external`]): two sets of K chains (MAP, UNMAP), each a readable
/// request and a 4-byte writable tail in one [`SLOT`]. A batch rewrites the requests' IOVA
/// fields, their tails (poisoned, so a status the device did not write is seen), both
/// descriptors of each chain, K available entries and the available index; reaping reads
/// the used elements and the tails. No allocation, no lock, no system call unless the device
/// asks for a kick.
struct Lean<'m> {
    /// The descriptor table: each batch rewrites its chains' descriptors, as Linux's
    /// virtqueue_add does for every request (so the device reads them fresh from this CPU).
    desc: vm_memory::VolatileSlice<'m>,
    /// Guest address of the first request slot, and the MAP / UNMAP request sizes.
    slots_addr: u64,
    request_len: [u32; 2],
    avail: vm_memory::VolatileSlice<'m>,
    used: vm_memory::VolatileSlice<'m>,
    slots: vm_memory::VolatileSlice<'m>,
    size: u16,
    k: usize,
    avail_idx: u16,
    last_used: u16,
    used_event_base: u16,
    event_idx: bool,
    kick: &'m vmm_sys_util::eventfd::EventFd,
    kicks: u64,
    posted: u64,
    wait: WaitMode,
}

const POISON_TAIL: u32 = 0xa5a5_a5a5;

impl Lean<'_> {
    fn used_event_addr(&self) -> usize {
        4 + 2 * usize::from(self.size)
    }

    fn write_far_used_event(&mut self) -> Result<(), String> {
        if self.event_idx {
            self.used_event_base = self.last_used;
            let off = self.used_event_addr();
            self.avail
                .store(
                    self.last_used.wrapping_add(0x7fff).to_le(),
                    off,
                    Ordering::Relaxed,
                )
                .map_err(|e| format!("used_event: {e}"))?;
        }
        Ok(())
    }

    /// One batch: `set` 0 maps, 1 unmaps `pages` (the first of them is page `first` of the
    /// window). Returns the completions whose status was not OK.
    fn batch(&mut self, set: usize, pages: &[u64], first: usize) -> Result<u64, String> {
        let k = self.k;
        let err = |e: vm_memory::VolatileMemoryError| format!("guest memory: {e}");
        for (i, &iova) in pages.iter().enumerate() {
            let line = (set * k + i) * SLOT as usize;
            let s = &self.slots;
            s.get_ref::<u64>(line + 8).map_err(err)?.store(iova.to_le());
            s.get_ref::<u64>(line + 16)
                .map_err(err)?
                .store((iova + PAGE - 1).to_le());
            if set == 0 {
                let gpa = GPA_BASE + (first + i) as u64 * PAGE;
                s.get_ref::<u64>(line + 24).map_err(err)?.store(gpa.to_le());
            }
            s.get_ref::<u32>(line + TAIL_AT as usize)
                .map_err(err)?
                .store(POISON_TAIL);
            let head = (set * 2 * k + 2 * i) as u16;
            let addr = self.slots_addr + line as u64;
            let descs = [
                (addr, self.request_len[set], VRING_DESC_F_NEXT, head + 1),
                (addr + TAIL_AT, 4, VRING_DESC_F_WRITE, 0),
            ];
            for (j, (addr, len, flags, next)) in descs.into_iter().enumerate() {
                let at = 16 * usize::from(head + j as u16);
                let d = &self.desc;
                d.get_ref::<u64>(at).map_err(err)?.store(addr.to_le());
                d.get_ref::<u32>(at + 8).map_err(err)?.store(len.to_le());
                d.get_ref::<u16>(at + 12).map_err(err)?.store(flags.to_le());
                d.get_ref::<u16>(at + 14).map_err(err)?.store(next.to_le());
            }
            let slot = 4 + 2 * usize::from(self.avail_idx.wrapping_add(i as u16) % self.size);
            self.avail
                .get_ref::<u16>(slot)
                .map_err(err)?
                .store(head.to_le());
        }
        let old = self.avail_idx;
        self.avail_idx = old.wrapping_add(k as u16);
        // Release: the requests, tails and ring entries are visible before the index.
        self.avail
            .store(self.avail_idx.to_le(), 2, Ordering::Release)
            .map_err(err)?;
        self.posted += k as u64;
        // The index store must be visible before the device's suppression is read.
        std::sync::atomic::fence(Ordering::SeqCst);
        let need = if self.event_idx {
            let at = 4 + 8 * usize::from(self.size);
            let event = u16::from_le(self.used.load::<u16>(at, Ordering::Relaxed).map_err(err)?);
            need_event(event, self.avail_idx, old)
        } else {
            let flags = u16::from_le(self.used.load::<u16>(0, Ordering::Relaxed).map_err(err)?);
            flags & 1 == 0
        };
        if need {
            self.kick.write(1).map_err(|e| format!("kick: {e}"))?;
            self.kicks += 1;
        }
        let mut errors = 0;
        let mut seen = 0u64;
        let mut got = 0;
        let mut spins = 0u32;
        let mut started: Option<Instant> = None;
        while got < k {
            let idx = u16::from_le(self.used.load::<u16>(2, Ordering::Acquire).map_err(err)?);
            if idx == self.last_used {
                spins = spins.wrapping_add(1);
                if spins % 4096 == 0 {
                    let t = *started.get_or_insert_with(Instant::now);
                    if t.elapsed() > Duration::from_secs(10) {
                        return Err(format!("no completion in 10 s ({got} of {k} done)"));
                    }
                    if self.wait == WaitMode::Poll {
                        std::thread::yield_now();
                    }
                }
                std::hint::spin_loop();
                continue;
            }
            if usize::from(idx.wrapping_sub(self.last_used)) > k - got {
                return Err(format!(
                    "used index {idx} runs ahead of {} with {} chains in flight",
                    self.last_used,
                    k - got
                ));
            }
            while self.last_used != idx {
                let at = 4 + 8 * usize::from(self.last_used % self.size);
                let elem = u64::from_le(self.used.get_ref::<u64>(at).map_err(err)?.load());
                let (id, used_len) = (elem as u32, (elem >> 32) as u32);
                let rel = (id as usize).wrapping_sub(set * 2 * k);
                let i = rel / 2;
                if rel % 2 != 0 || i >= k || seen & (1 << i) != 0 {
                    return Err(format!(
                        "used element {{id: {id}}} names no chain in flight"
                    ));
                }
                seen |= 1 << i;
                let line = (set * k + i) * SLOT as usize;
                let tail = self
                    .slots
                    .get_ref::<u32>(line + TAIL_AT as usize)
                    .map_err(err)?
                    .load();
                if used_len != 4 || tail.to_le_bytes()[0] != 0 {
                    errors += 1;
                }
                self.last_used = self.last_used.wrapping_add(1);
                got += 1;
            }
        }
        if self.last_used.wrapping_sub(self.used_event_base) >= USED_EVENT_REFRESH {
            self.write_far_used_event()?;
        }
        Ok(errors)
    }
}

impl Guest {
    /// [`Guest::run`] on the lean loop ([`Lean`]); direct chains only.
    fn run_lean(
        &mut self,
        k: usize,
        pages: &[u64],
        duration: Duration,
        warmup: Duration,
        pid: Option<u32>,
    ) -> Result<BatchResult, String> {
        if k > 64 {
            return Err(format!("K={k}: the lean loop takes at most 64 per batch"));
        }
        let domain = self.opts.domain;
        let wait = self.opts.wait;
        let q = self.dev.requestq();
        let mem = q.memory().clone();
        let kick = q
            .kick_fd()
            .try_clone()
            .map_err(|e| format!("kick fd: {e}"))?;
        let rings = q.begin_external().map_err(|e| format!("rings: {e}"))?;
        if rings.size < 4 * k as u16 {
            return Err(format!("K={k} needs {} descriptors", 4 * k));
        }
        let buf = mem
            .alloc(2 * k as u64 * SLOT, 4096)
            .map_err(|e| format!("alloc: {e}"))?;
        let result = (|| -> Result<_, String> {
            // Two sets of K request templates, MAP (set 0) and UNMAP (set 1), written once;
            // each batch rewrites their addresses and writes their chains' descriptors.
            let mut request_len = [0u32; 2];
            for (set, request_len) in request_len.iter_mut().enumerate() {
                for i in 0..k {
                    let line = buf.addr + (set * k + i) as u64 * SLOT;
                    let template = if set == 0 {
                        Request::Map {
                            domain,
                            virt_start: 0,
                            virt_end: PAGE - 1,
                            phys_start: GPA_BASE,
                            flags: RW,
                        }
                    } else {
                        Request::Unmap {
                            domain,
                            virt_start: 0,
                            virt_end: PAGE - 1,
                        }
                    }
                    .encode();
                    mem.write(line, &template).map_err(|e| e.to_string())?;
                    *request_len = template.len() as u32;
                }
            }
            let n = usize::from(rings.size);
            let slice = |addr: u64, len: usize| {
                mem.mmap()
                    .get_slice(vm_memory::GuestAddress(addr), len)
                    .map_err(|e| format!("rings: {e}"))
            };
            let mut lean = Lean {
                desc: slice(rings.desc_table, 16 * n)?,
                slots_addr: buf.addr,
                request_len,
                avail: slice(rings.avail, 6 + 2 * n)?,
                used: slice(rings.used, 6 + 8 * n)?,
                slots: slice(buf.addr, 2 * k * SLOT as usize)?,
                size: rings.size,
                k,
                avail_idx: rings.avail_idx,
                last_used: rings.last_used,
                used_event_base: rings.last_used,
                event_idx: rings.event_idx,
                kick: &kick,
                kicks: 0,
                posted: 0,
                wait,
            };
            lean.write_far_used_event()?;
            let groups = pages.len() / k;
            let mut errors = 0u64;
            // Batch b: group b / 2, MAP when even, UNMAP when odd.
            let mut b = 0usize;
            let one = |lean: &mut Lean<'_>, b: &mut usize| -> Result<u64, String> {
                let g = *b / 2;
                let e = lean.batch(*b % 2, &pages[g * k..(g + 1) * k], g * k)?;
                *b = (*b + 1) % (2 * groups);
                Ok(e)
            };
            // Warm-up (also ends on an UNMAP batch so nothing stays mapped).
            let start = Instant::now();
            while start.elapsed() < warmup || b % 2 == 1 {
                errors += one(&mut lean, &mut b)?;
            }
            let kicks0 = lean.kicks;
            let mut latencies = Vec::with_capacity(1 << 18);
            let meter = Meter::start(pid);
            let mut requests = 0u64;
            let mut pairs = 0u64;
            loop {
                if pairs % TIMED_EVERY == 0 {
                    let mut t = Instant::now();
                    for _ in 0..2 {
                        errors += one(&mut lean, &mut b)?;
                        let now = Instant::now();
                        latencies.push((now - t).as_nanos() as u64);
                        t = now;
                    }
                    requests += 2 * k as u64;
                    pairs += 1;
                    if t - meter.start >= duration {
                        break;
                    }
                } else {
                    errors += one(&mut lean, &mut b)?;
                    errors += one(&mut lean, &mut b)?;
                    requests += 2 * k as u64;
                    pairs += 1;
                }
            }
            let result = meter.finish(k, requests, latencies, errors, lean.kicks - kicks0);
            Ok((
                result,
                lean.avail_idx,
                lean.last_used,
                lean.posted,
                lean.kicks,
            ))
        })();
        let _ = mem.free(buf);
        let (result, avail_idx, last_used, posted, kicks) = result?;
        q.end_external(avail_idx, last_used, posted, kicks)
            .map_err(|e| format!("rings: {e}"))?;
        Ok(result)
    }
}

fn make_chain(bytes: &[u8], indirect: bool) -> Chain<'_> {
    let c = Chain::request(bytes, 4);
    if indirect {
        c.indirect()
    } else {
        c
    }
}

const RW: MapFlags = MapFlags {
    read: true,
    write: true,
    mmio: false,
};

/// One table row.
pub fn format_row(label: &str, r: &BatchResult) -> String {
    let opt = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{x:.0}"));
    format!(
        "| {label} | {} | {:.0} | {:.1} | {:.1} | {} | {} | {:.2} | {} |",
        r.k,
        r.requests_per_sec(),
        r.percentile_ns(0.50) as f64 / 1e3,
        r.percentile_ns(0.99) as f64 / 1e3,
        opt(r.daemon_ns_per_request()),
        opt(r.client_ns_per_request()),
        r.kicks as f64 / r.requests.max(1) as f64 * r.k as f64,
        r.errors
    )
}

pub const TABLE_HEADER: &str = "| backend | K per kick | requests/s | p50 batch us | p99 batch us | daemon CPU ns/req | client CPU ns/req | kicks per batch | errors |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|";

// ---- command line ------------------------------------------------------------------------

#[derive(clap::Parser, Debug)]
#[command(name = "loadgen", about = "MAP/UNMAP load over a vhost-user socket")]
struct Cli {
    /// Socket of a daemon that is already running.
    #[arg(long, value_name = "PATH", conflicts_with = "spawn")]
    socket: Option<PathBuf>,
    /// Spawn the daemon (killed at exit).
    #[arg(long)]
    spawn: bool,
    /// Daemon binary for --spawn (default: vhost-device-iommu next to this executable).
    #[arg(long, value_name = "PATH")]
    daemon: Option<PathBuf>,
    /// Pid of the daemon behind --socket, to measure its CPU time.
    #[arg(long)]
    pid: Option<u32>,
    /// Requests per kick, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2,16,64")]
    batch: Vec<usize>,
    /// Seconds per batch size.
    #[arg(long, default_value_t = 2.0)]
    duration: f64,
    /// Warm-up seconds per batch size.
    #[arg(long, default_value_t = 0.2)]
    warmup: f64,
    /// Request queue size.
    #[arg(long, default_value_t = 256)]
    queue_size: u16,
    /// Negotiate VIRTIO_RING_F_EVENT_IDX.
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    event_idx: String,
    /// Post each request as an indirect descriptor table (as Linux does).
    #[arg(long)]
    indirect: bool,
    /// Keep a page mapped in every 2 MiB region of the window (page-table nodes stay).
    #[arg(long)]
    anchored: bool,
    /// Have the daemon log every page it writes, as during a migration (SET_LOG_BASE).
    #[arg(long)]
    dirty_log: bool,
    /// Pin: CLIENT_CPU,DAEMON_CPU (e.g. 0,1), so the two spinners never share a CPU. The
    /// daemon is pinned only when spawned.
    #[arg(long, value_name = "CPU,CPU", value_delimiter = ',')]
    pin: Vec<usize>,
    /// Wait mode for completions.
    #[arg(long, default_value = "spin", value_parser = ["spin", "poll"])]
    wait: String,
    /// Endpoint to attach.
    #[arg(long, default_value_t = DEFAULT_ENDPOINT, value_parser = parse_u32)]
    endpoint: u32,
    /// Domain to attach it to.
    #[arg(long, default_value_t = 1)]
    domain: u32,
    /// Seconds of idleness over which the daemon's CPU use is measured at the end (0: skip).
    #[arg(long, default_value_t = 2.0)]
    idle: f64,
    /// Extra daemon arguments as one string (e.g. "--poll-us 0"); also accepted after `--`.
    #[arg(long, value_name = "ARGS", allow_hyphen_values = true)]
    daemon_args: Option<String>,
    #[arg(last = true)]
    rest: Vec<String>,
}

fn parse_u32(s: &str) -> Result<u32, String> {
    match s.strip_prefix("0x") {
        Some(h) => u32::from_str_radix(h, 16),
        None => s.parse(),
    }
    .map_err(|e| e.to_string())
}

fn main() {
    use clap::Parser;
    let cli = Cli::parse();
    let mut daemon_args: Vec<String> = cli
        .daemon_args
        .as_deref()
        .map(|s| s.split_whitespace().map(String::from).collect())
        .unwrap_or_default();
    daemon_args.extend(cli.rest.iter().cloned());
    let spawned;
    let (socket, pid) = if let Some(socket) = &cli.socket {
        (socket.clone(), cli.pid)
    } else if cli.spawn {
        let bin = cli
            .daemon
            .clone()
            .or_else(default_daemon_path)
            .unwrap_or_else(|| {
                eprintln!("loadgen: no daemon binary next to this executable; pass --daemon PATH");
                std::process::exit(2)
            });
        spawned =
            SpawnedDaemon::spawn(&bin, &daemon_args, cli.pin.get(1).copied()).unwrap_or_else(|e| {
                eprintln!("loadgen: spawning {}: {e}", bin.display());
                std::process::exit(1)
            });
        println!("daemon: {} {}", bin.display(), daemon_args.join(" "));
        (spawned.socket.clone(), Some(spawned.pid()))
    } else {
        eprintln!("loadgen: give --socket PATH or --spawn");
        std::process::exit(2)
    };
    let opts = LoadOptions {
        queue_size: cli.queue_size,
        event_idx: cli.event_idx == "on",
        indirect: cli.indirect,
        endpoint: cli.endpoint,
        domain: cli.domain,
        anchored: cli.anchored,
        wait: if cli.wait == "spin" {
            WaitMode::Spin
        } else {
            WaitMode::Poll
        },
        dirty_log: cli.dirty_log,
    };
    if let Some(&cpu) = cli.pin.first() {
        if !pin_current_thread(Some(cpu)) {
            eprintln!("loadgen: could not pin to CPU {cpu}");
        }
    }
    println!("options: {opts:?}, pin: {:?}", cli.pin);
    let mut guest = Guest::connect(&socket, opts).unwrap_or_else(|e| {
        eprintln!("loadgen: {e}");
        std::process::exit(1)
    });
    println!("{TABLE_HEADER}");
    for &k in &cli.batch {
        match guest.run(
            k,
            Duration::from_secs_f64(cli.duration),
            Duration::from_secs_f64(cli.warmup),
            pid,
        ) {
            Ok(r) => println!("{}", format_row("daemon", &r)),
            Err(e) => {
                eprintln!("loadgen: K={k}: {e}");
                std::process::exit(1)
            }
        }
    }
    if let (Some(pid), true) = (pid, cli.idle > 0.0) {
        match idle_cpu_percent(pid, Duration::from_secs_f64(cli.idle)) {
            Some(p) => println!(
                "daemon CPU while idle (connected, {:.1} s): {p:.2}%",
                cli.idle
            ),
            None => println!("daemon CPU while idle: /proc/{pid} unreadable"),
        }
    }
}
