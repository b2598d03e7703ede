// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The vhost-user frontend: the VMM side of the control protocol.

use std::{
    net::Shutdown,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    sync::{Arc, Condvar, Mutex, MutexGuard},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use log::{debug, warn};
use vhost::{
    vhost_user::{
        message::{VhostUserConfigFlags, VhostUserHeaderFlag},
        Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
    },
    VhostBackend, VringConfigData,
};

use super::{
    error::{Error, Result},
    queue::Virtqueue,
    ram::GuestRam,
};

/// Connects a unix stream socket to `path`, retrying while the backend is not listening yet
/// (the socket file missing, `ENOENT`, or not accepting, `ECONNREFUSED`) until `timeout`.
///
/// `Frontend::connect` retries only on `ECONNREFUSED`, 5 times: not enough for a daemon that
/// is still starting up.
pub fn connect_socket(path: &Path, timeout: Duration) -> Result<UnixStream> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) && Instant::now() + pause < deadline =>
            {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            Err(source) => {
                return Err(Error::Connect {
                    path: path.to_owned(),
                    source,
                })
            }
        }
    }
}

#[derive(Debug, Default)]
struct WatchdogState {
    deadline: Option<Instant>,
    fired: bool,
    quit: bool,
}

#[derive(Debug, Default)]
struct WatchdogShared {
    state: Mutex<WatchdogState>,
    cond: Condvar,
}

impl WatchdogShared {
    fn lock(&self) -> MutexGuard<'_, WatchdogState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Shuts the socket down when a request is not answered in time.
///
/// The vhost crate's socket reads retry on `EAGAIN`, so `SO_RCVTIMEO` would spin instead of
/// failing; shutting the socket down makes the pending read return end-of-file.
#[derive(Debug)]
struct Watchdog {
    shared: Arc<WatchdogShared>,
    sock: UnixStream,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    fn new(sock: UnixStream) -> Result<Self> {
        let shared = Arc::new(WatchdogShared::default());
        let thread_shared = shared.clone();
        let thread_sock = sock.try_clone()?;
        let thread = std::thread::Builder::new()
            .name("testkit-watchdog".into())
            .spawn(move || {
                let mut st = thread_shared.lock();
                while !st.quit {
                    st = match st.deadline {
                        None => thread_shared
                            .cond
                            .wait(st)
                            .unwrap_or_else(|e| e.into_inner()),
                        Some(d) => {
                            let now = Instant::now();
                            if now >= d {
                                let _ = thread_sock.shutdown(Shutdown::Both);
                                st.fired = true;
                                st.deadline = None;
                                st
                            } else {
                                thread_shared
                                    .cond
                                    .wait_timeout(st, d - now)
                                    .unwrap_or_else(|e| e.into_inner())
                                    .0
                            }
                        }
                    };
                }
            })?;
        Ok(Self {
            shared,
            sock,
            thread: Some(thread),
        })
    }

    fn arm(&self, timeout: Duration) {
        let mut st = self.shared.lock();
        st.deadline = Some(Instant::now() + timeout);
        st.fired = false;
        self.shared.cond.notify_one();
    }

    /// Returns whether the watchdog fired since [`Watchdog::arm`].
    fn disarm(&self) -> bool {
        let mut st = self.shared.lock();
        st.deadline = None;
        st.fired
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.shared.lock().quit = true;
        self.shared.cond.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What the handshake negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    /// Virtio features the backend offers (`GET_FEATURES`).
    pub features: u64,
    /// Virtio features acknowledged (`SET_FEATURES`); 0 before.
    pub acked_features: u64,
    /// Protocol features the backend offers; empty if it does not offer `PROTOCOL_FEATURES`.
    pub protocol_features: VhostUserProtocolFeatures,
    /// Protocol features acknowledged (`SET_PROTOCOL_FEATURES`).
    pub acked_protocol_features: VhostUserProtocolFeatures,
    /// `GET_QUEUE_NUM`, when `MQ` was negotiated.
    pub queue_num: Option<u64>,
}

impl Default for Negotiated {
    fn default() -> Self {
        Self {
            features: 0,
            acked_features: 0,
            protocol_features: VhostUserProtocolFeatures::empty(),
            acked_protocol_features: VhostUserProtocolFeatures::empty(),
            queue_num: None,
        }
    }
}

impl Negotiated {
    /// Whether virtio feature `bit` was acknowledged.
    pub fn has_feature(&self, bit: u32) -> bool {
        bit < 64 && self.acked_features & (1 << bit) != 0
    }

    /// Whether `f` was acknowledged.
    pub fn has_protocol_feature(&self, f: VhostUserProtocolFeatures) -> bool {
        self.acked_protocol_features.contains(f)
    }

    /// Whether `VHOST_USER_F_PROTOCOL_FEATURES` was acknowledged (rings then start disabled and
    /// need `SET_VRING_ENABLE`).
    pub fn protocol_features_acked(&self) -> bool {
        self.acked_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0
    }
}

/// A vhost-user connection driven the way QEMU drives it.
///
/// Every helper runs under a watchdog: if the backend does not answer within the I/O timeout,
/// the socket is shut down and the call returns [`Error::Timeout`]. Use [`Connection::call`] to
/// run arbitrary [`Frontend`] requests under the same watchdog, or [`Connection::frontend`] for
/// unguarded raw access.
///
/// Dropping the connection shuts the socket down, even if the test cloned the `Frontend`.
pub struct Connection {
    // Field order: the frontend's socket closes before the watchdog joins its thread.
    frontend: Frontend,
    watchdog: Watchdog,
    path: PathBuf,
    io_timeout: Duration,
    negotiated: Negotiated,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("path", &self.path)
            .field("io_timeout", &self.io_timeout)
            .field("negotiated", &self.negotiated)
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// Connects to the backend at `path` (see [`connect_socket`]). `max_queues` bounds the queue
    /// indices the frontend accepts until `GET_QUEUE_NUM` says otherwise.
    pub fn connect(
        path: impl AsRef<Path>,
        connect_timeout: Duration,
        io_timeout: Duration,
        max_queues: u64,
    ) -> Result<Self> {
        let path = path.as_ref();
        let sock = connect_socket(path, connect_timeout)?;
        let watchdog = Watchdog::new(sock.try_clone()?)?;
        debug!("testkit: connected to {}", path.display());
        Ok(Self {
            frontend: Frontend::from_stream(sock, max_queues),
            watchdog,
            path: path.to_owned(),
            io_timeout,
            negotiated: Negotiated::default(),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The raw frontend, for odd message sequences. Calls made through it are not guarded by
    /// the watchdog: prefer [`Connection::call`].
    pub fn frontend(&mut self) -> &mut Frontend {
        &mut self.frontend
    }

    /// What was negotiated so far.
    pub fn negotiated(&self) -> &Negotiated {
        &self.negotiated
    }

    /// The timeout for each vhost-user request.
    pub fn io_timeout(&self) -> Duration {
        self.io_timeout
    }

    /// Changes the timeout for each vhost-user request.
    pub fn set_io_timeout(&mut self, timeout: Duration) {
        self.io_timeout = timeout;
    }

    /// Runs `f` on the frontend under the watchdog. `op` names the request in errors.
    pub fn call<T>(
        &mut self,
        op: &'static str,
        f: impl FnOnce(&mut Frontend) -> vhost::Result<T>,
    ) -> Result<T> {
        self.watchdog.arm(self.io_timeout);
        let result = f(&mut self.frontend);
        if self.watchdog.disarm() {
            return Err(Error::Timeout {
                op,
                timeout: self.io_timeout,
            });
        }
        result.map_err(|source| Error::Vhost { op, source })
    }

    /// Shuts the socket down: the backend sees the frontend disconnect.
    pub fn shutdown(&self) {
        let _ = self.watchdog.sock.shutdown(Shutdown::Both);
    }

    /// `GET_FEATURES`.
    pub fn get_features(&mut self) -> Result<u64> {
        let features = self.call("GET_FEATURES", |f| f.get_features())?;
        self.negotiated.features = features;
        Ok(features)
    }

    /// `GET_PROTOCOL_FEATURES` then `SET_PROTOCOL_FEATURES` with `offered & wanted`; needs
    /// `PROTOCOL_FEATURES` in the offered virtio features ([`Connection::get_features`] first).
    pub fn negotiate_protocol_features(
        &mut self,
        wanted: VhostUserProtocolFeatures,
    ) -> Result<VhostUserProtocolFeatures> {
        let offered = self.call("GET_PROTOCOL_FEATURES", |f| f.get_protocol_features())?;
        self.negotiated.protocol_features = offered;
        let acked = offered & wanted;
        self.call("SET_PROTOCOL_FEATURES", |f| f.set_protocol_features(acked))?;
        self.negotiated.acked_protocol_features = acked;
        Ok(acked)
    }

    /// Asks for a reply to every request (`NEED_REPLY`), which makes each `SET_*` synchronous.
    /// Only meaningful once `REPLY_ACK` is negotiated.
    pub fn set_need_reply(&mut self, on: bool) {
        let flags = if on {
            VhostUserHeaderFlag::NEED_REPLY
        } else {
            VhostUserHeaderFlag::empty()
        };
        self.frontend.set_hdr_flags(flags);
    }

    /// `GET_QUEUE_NUM` (needs `MQ`).
    pub fn get_queue_num(&mut self) -> Result<u64> {
        let n = self.call("GET_QUEUE_NUM", |f| f.get_queue_num())?;
        self.negotiated.queue_num = Some(n);
        Ok(n)
    }

    /// `SET_OWNER`.
    pub fn set_owner(&mut self) -> Result<()> {
        self.call("SET_OWNER", |f| f.set_owner())
    }

    /// `SET_FEATURES`.
    pub fn set_features(&mut self, features: u64) -> Result<()> {
        self.call("SET_FEATURES", |f| f.set_features(features))?;
        self.negotiated.acked_features = features;
        Ok(())
    }

    /// `SET_MEM_TABLE` with every region of `mem`.
    pub fn set_mem_table(&mut self, mem: &GuestRam) -> Result<()> {
        self.set_mem_tables(&[mem])
    }

    /// `SET_MEM_TABLE` with every region of each of `mems` (their guest-physical ranges must
    /// not overlap): guest RAM grown by another memory, as after a memory hot-plug.
    pub fn set_mem_tables(&mut self, mems: &[&GuestRam]) -> Result<()> {
        let mut regions = Vec::new();
        for mem in mems {
            regions.extend(mem.vhost_regions()?);
        }
        self.call("SET_MEM_TABLE", |f| f.set_mem_table(&regions).map(|_| ()))
    }

    /// `GET_CONFIG` of `size` bytes at `offset` (needs `CONFIG`).
    pub fn get_config(&mut self, offset: u32, size: u32) -> Result<Vec<u8>> {
        let buf = vec![0u8; size as usize];
        let (_, payload) = self.call("GET_CONFIG", |f| {
            f.get_config(offset, size, VhostUserConfigFlags::empty(), &buf)
        })?;
        Ok(payload)
    }

    /// `SET_CONFIG` of `data` at `offset` (needs `CONFIG`).
    pub fn set_config(&mut self, offset: u32, data: &[u8]) -> Result<()> {
        self.call("SET_CONFIG", |f| {
            f.set_config(offset, VhostUserConfigFlags::empty(), data)
        })
    }

    /// Starts `q` the way QEMU does: `SET_VRING_NUM`, `SET_VRING_BASE(base)`, `SET_VRING_ADDR`
    /// (VMM virtual addresses of the rings), `SET_VRING_KICK`, `SET_VRING_CALL`, then
    /// `SET_VRING_ENABLE(1)` if `PROTOCOL_FEATURES` was acknowledged.
    pub fn start_queue(&mut self, q: &Virtqueue, base: u16) -> Result<()> {
        let index = usize::from(q.index());
        let mem = q.memory();
        let config = VringConfigData {
            queue_max_size: q.size(),
            queue_size: q.size(),
            flags: 0,
            desc_table_addr: mem.host_address(q.desc_table_addr())?,
            used_ring_addr: mem.host_address(q.used_addr())?,
            avail_ring_addr: mem.host_address(q.avail_addr())?,
            log_addr: None,
        };
        let size = q.size();
        self.call("SET_VRING_NUM", |f| f.set_vring_num(index, size))?;
        self.call("SET_VRING_BASE", |f| f.set_vring_base(index, base))?;
        self.call("SET_VRING_ADDR", |f| f.set_vring_addr(index, &config))?;
        self.call("SET_VRING_KICK", |f| f.set_vring_kick(index, q.kick_fd()))?;
        self.call("SET_VRING_CALL", |f| f.set_vring_call(index, q.call_fd()))?;
        self.enable_queue(q.index(), true)
    }

    /// `SET_VRING_ENABLE`, if `PROTOCOL_FEATURES` was acknowledged (without it, rings are
    /// enabled by `SET_FEATURES` and this does nothing).
    pub fn enable_queue(&mut self, index: u16, enable: bool) -> Result<()> {
        if !self.negotiated.protocol_features_acked() {
            return Ok(());
        }
        self.call("SET_VRING_ENABLE", |f| {
            f.set_vring_enable(usize::from(index), enable)
        })
    }

    /// Stops queue `index`: `SET_VRING_ENABLE(0)` (when `PROTOCOL_FEATURES` was acknowledged)
    /// then `GET_VRING_BASE`, whose answer (the device's next available index) is returned.
    pub fn stop_queue(&mut self, index: u16) -> Result<u16> {
        self.enable_queue(index, false)?;
        let base = self.call("GET_VRING_BASE", |f| f.get_vring_base(usize::from(index)))?;
        u16::try_from(base).map_err(|_| Error::Device {
            queue: index,
            what: format!("GET_VRING_BASE answered {base}, not a 16-bit index"),
        })
    }

    /// `RESET_DEVICE` (needs the protocol feature of that name).
    pub fn reset_device(&mut self) -> Result<()> {
        self.call("RESET_DEVICE", |f| f.reset_device())
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        if self.watchdog.sock.shutdown(Shutdown::Both).is_err() {
            warn!("testkit: shutting down {} failed", self.path.display());
        }
    }
}
