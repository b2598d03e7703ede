// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The daemon's life: create the sockets, serve one frontend after another, stop cleanly.

use std::{
    fs, io,
    os::unix::{
        fs::{DirBuilderExt, FileTypeExt, PermissionsExt},
        io::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        net::{UnixListener, UnixStream},
    },
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use log::{info, warn};
use signal_hook::{consts::TERM_SIGNALS, iterator::Signals};
use thiserror::Error;
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use crate::{
    config::{CpuList, DaemonConfig, Listen},
    control,
    device::Device,
    vhost_user::{IommuBackend, FAULT_EVENT},
};

#[derive(Debug, Error)]
pub enum ServerError {
    #[error("{path}: {source}")]
    Socket { path: PathBuf, source: io::Error },
    #[error("{0}: exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("{0}: another process is listening on it")]
    InUse(PathBuf),
    #[error("device: {0}")]
    Device(io::Error),
    #[error("{0}")]
    Setup(#[from] crate::device::DeviceError),
    #[error("vhost-user: {0}")]
    VhostUser(String),
    #[error("signal handler: {0}")]
    Signals(io::Error),
    #[error("seccomp: {0}")]
    Seccomp(#[from] crate::seccomp::Error),
    #[error("--fd {fd}: {problem}")]
    InheritedFd { fd: RawFd, problem: FdProblem },
}

/// Why an `--fd` descriptor cannot be served on.
#[derive(Debug, Error)]
pub enum FdProblem {
    #[error("not an open file descriptor")]
    NotOpen,
    #[error("not a socket")]
    NotASocket,
    #[error("not a Unix domain socket")]
    NotUnix,
    #[error("not a stream socket")]
    NotStream,
    #[error("the socket is not listening (listen(2) it before handing it over)")]
    NotListening,
    #[error("{0}")]
    Io(io::Error),
}

/// An integer socket option of `fd` at level SOL_SOCKET.
fn socket_option(fd: RawFd, option: libc::c_int) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes to `value`, which outlives the call; a
    // descriptor that is not a socket is an error return.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r == 0 {
        Ok(value)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Takes over the listening socket a management layer handed over as `fd` (`--fd`), after
/// checking that it is one: open, a Unix stream socket, listening. The socket is made
/// blocking (a non-blocking one would make the accept loop spin) and close-on-exec. Its
/// path, if it has one, is left alone, now and at exit.
///
/// Call it once, before the process opens any descriptor of its own: until then the number
/// can only name what was inherited.
pub fn inherited_listener(fd: RawFd) -> Result<UnixListener, ServerError> {
    let fail = |problem| ServerError::InheritedFd { fd, problem };
    // SAFETY: F_GETFD takes no argument and only reads the descriptor table.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(fail(FdProblem::NotOpen));
    }
    let option = |option| {
        socket_option(fd, option).map_err(|e| match e.raw_os_error() {
            Some(libc::ENOTSOCK) => fail(FdProblem::NotASocket),
            _ => fail(FdProblem::Io(e)),
        })
    };
    if option(libc::SO_DOMAIN)? != libc::AF_UNIX {
        return Err(fail(FdProblem::NotUnix));
    }
    if option(libc::SO_TYPE)? != libc::SOCK_STREAM {
        return Err(fail(FdProblem::NotStream));
    }
    if option(libc::SO_ACCEPTCONN)? == 0 {
        return Err(fail(FdProblem::NotListening));
    }
    // SAFETY: F_SETFD with an int argument only changes the descriptor's flags.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) } < 0 {
        return Err(fail(FdProblem::Io(io::Error::last_os_error())));
    }
    // SAFETY: `fd` is open (checked above) and was inherited: nothing in this process owns
    // it, and the caller adopts it once.
    let listener = UnixListener::from(unsafe { OwnedFd::from_raw_fd(fd) });
    listener
        .set_nonblocking(false)
        .map_err(|e| fail(FdProblem::Io(e)))?;
    Ok(listener)
}

/// Creates a listening socket at `path` with `mode`, atomically: it is bound inside a private
/// directory, given its mode, then renamed into place, so it is never reachable with a wider
/// mode. A stale socket nobody listens on is replaced; anything else is refused.
pub fn bind_socket(path: &Path, mode: u32) -> Result<UnixListener, ServerError> {
    let fail = |source| ServerError::Socket {
        path: path.to_owned(),
        source,
    };
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(ServerError::InUse(path.to_owned()));
            }
            fs::remove_file(path).map_err(fail)?;
        }
        Ok(_) => return Err(ServerError::NotASocket(path.to_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(fail(e)),
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let private = parent.join(format!(".vhost-device-iommu.{}", std::process::id()));
    let _ = fs::remove_dir_all(&private);
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .map_err(fail)?;
    let staged = private.join("sock");
    let result = UnixListener::bind(&staged)
        .and_then(|l| fs::set_permissions(&staged, fs::Permissions::from_mode(mode)).map(|_| l))
        .and_then(|l| fs::rename(&staged, path).map(|_| l));
    let _ = fs::remove_dir_all(&private);
    result.map_err(fail)
}

/// Serves frontends until SIGINT/SIGTERM (which end the process after cleanup). On an error,
/// the sockets this process created are removed before it is returned.
pub fn run(config: DaemonConfig) -> Result<(), ServerError> {
    let mut created = Vec::new();
    let result = serve(&config, &mut created);
    for path in &created {
        let _ = fs::remove_file(path);
    }
    result
}

fn serve(config: &DaemonConfig, created: &mut Vec<PathBuf>) -> Result<(), ServerError> {
    // An inherited socket first, while its number can name nothing else.
    let listener = match &config.listen {
        Listen::Fd(fd) => inherited_listener(*fd)?,
        Listen::Path(path) => {
            let listener = bind_socket(path, config.socket_mode)?;
            created.push(path.clone());
            listener
        }
    };
    let device = Device::new(config)?;
    if let Some(path) = &config.control_socket {
        let control = bind_socket(path, config.socket_mode)?;
        created.push(path.clone());
        control::spawn(control, device.clone(), config.control_timeouts)
            .map_err(ServerError::Device)?;
        info!("control socket on {}", path.display());
    }
    if let Some(masters) = &config.masters {
        let listener = bind_socket(&masters.socket, config.socket_mode)?;
        created.push(masters.socket.clone());
        crate::masters::spawn(listener, device.clone(), masters).map_err(ServerError::Device)?;
        info!("DMA master socket on {}", masters.socket.display());
    }
    let current: Arc<Mutex<Option<ShutdownHandle>>> = Arc::default();
    spawn_signal_thread(created.clone(), current.clone(), device.clone())?;
    // Least privilege: the sockets exist; from here on, only what serving needs (every thread).
    crate::seccomp::apply_for(
        config.seccomp,
        crate::seccomp::Needs {
            state_file: config.state_file.is_some(),
            masters: config.masters.is_some(),
            worker_affinity: config.worker_cpus.is_some(),
        },
    )?;

    let mut listener = Listener::from(listener);
    loop {
        let backend = IommuBackend::new(device.clone()).map_err(ServerError::Device)?;
        // The request worker is spawned here and inherits this thread's CPUs.
        let mut daemon = with_affinity(config.worker_cpus.as_ref(), || {
            VhostUserDaemon::new(
                "vhost-device-iommu".into(),
                backend.clone(),
                GuestMemoryAtomic::new(GuestMemoryMmap::new()),
            )
        })
        .map_err(ServerError::Device)?
        .map_err(|e| ServerError::VhostUser(e.to_string()))?;
        for handler in daemon.get_epoll_handlers() {
            handler
                .register_listener(
                    device.faults().wake_fd().as_raw_fd(),
                    EventSet::IN,
                    u64::from(FAULT_EVENT),
                )
                .map_err(ServerError::Device)?;
        }
        info!("waiting for a frontend on {}", config.listen);
        daemon
            .start(&mut listener)
            .map_err(|e| ServerError::VhostUser(e.to_string()))?;
        backend.count_connection();
        info!("frontend connected");
        *current.lock().unwrap_or_else(|e| e.into_inner()) = daemon.shutdown_handle();
        let result = daemon.wait();
        *current.lock().unwrap_or_else(|e| e.into_inner()) = None;
        // Stop and join the worker before the device forgets the guest: a worker still
        // processing would leak this guest's state into the next frontend's device.
        backend.exit();
        drop(daemon);
        backend.close_exit_fds();
        device.disconnected();
        match result {
            Ok(()) => info!("frontend disconnected"),
            Err(e) => warn!("frontend connection ended: {e}"),
        }
    }
}

/// Runs `f` on this thread with its CPU affinity set to `cpus` (threads it spawns keep that
/// affinity), then restores the thread's own.
fn with_affinity<T>(cpus: Option<&CpuList>, f: impl FnOnce() -> T) -> io::Result<T> {
    let Some(cpus) = cpus else {
        return Ok(f());
    };
    let mut own = CpuSet::new();
    // SAFETY: sched_getaffinity writes at most size_of::<cpu_set_t>() bytes into `own`.
    if unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), own.raw_mut()) }
        != 0
    {
        return Err(io::Error::last_os_error());
    }
    let mut wanted = CpuSet::new();
    for &cpu in &cpus.0 {
        wanted.set(cpu);
    }
    wanted.apply().map_err(|e| {
        let why = if e.raw_os_error() == Some(libc::EINVAL) {
            "none of these CPUs is online and allowed to this process".to_string()
        } else {
            e.to_string()
        };
        io::Error::new(
            e.kind(),
            format!("--worker-cpus {}: {why}", cpus_text(cpus)),
        )
    })?;
    let result = f();
    own.apply()?;
    Ok(result)
}

fn cpus_text(cpus: &CpuList) -> String {
    cpus.0
        .iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// A `cpu_set_t`.
struct CpuSet(libc::cpu_set_t);

impl CpuSet {
    fn new() -> Self {
        // SAFETY: cpu_set_t is a plain bit array; all zeros is the empty set.
        CpuSet(unsafe { std::mem::zeroed() })
    }

    fn set(&mut self, cpu: usize) {
        // SAFETY: CPU_SET writes the bit of `cpu` inside the set (`cpu` <= MAX_CPU, checked
        // when the option was parsed, is below CPU_SETSIZE).
        unsafe { libc::CPU_SET(cpu, &mut self.0) }
    }

    fn raw_mut(&mut self) -> &mut libc::cpu_set_t {
        &mut self.0
    }

    /// Makes the set this thread's affinity.
    fn apply(&self) -> io::Result<()> {
        // SAFETY: sched_setaffinity reads size_of::<cpu_set_t>() bytes from the set.
        let rc =
            unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &self.0) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// On SIGINT/SIGTERM: stop serving, account for fault records still waiting, remove the
/// sockets this process created, exit 0.
fn spawn_signal_thread(
    sockets: Vec<PathBuf>,
    current: Arc<Mutex<Option<ShutdownHandle>>>,
    device: Arc<Device>,
) -> Result<(), ServerError> {
    let mut signals = Signals::new(TERM_SIGNALS).map_err(ServerError::Signals)?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(signal) = signals.forever().next() {
                info!("signal {signal}: shutting down");
                // The guest's state stays in the state file for the next daemon: written
                // whole now, and the disconnect that follows is no reset.
                device.shut_down();
                if let Some(handle) = current.lock().unwrap_or_else(|e| e.into_inner()).take() {
                    handle.shutdown();
                }
                // No record may go unaccounted: refuse new ones (counted as dropped), drop
                // the waiting ones, let the worker finish the one it is writing.
                let waiting = device.faults().close();
                let deadline = std::time::Instant::now() + std::time::Duration::from_millis(200);
                let mut a = device.faults().accounts();
                while a.in_flight > 0 && std::time::Instant::now() < deadline {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                    a = device.faults().accounts();
                }
                info!(
                    "fault records: {} reported, {} delivered, {} dropped ({} waiting at exit)",
                    a.reported,
                    a.delivered,
                    a.dropped + a.in_flight,
                    waiting
                );
                for path in &sockets {
                    let _ = fs::remove_file(path);
                }
                std::process::exit(0);
            }
        })
        .map_err(ServerError::Signals)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_are_created_with_the_mode_and_never_replace_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = bind_socket(&path, 0o600).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(
            bind_socket(&path, 0o600),
            Err(ServerError::InUse(_))
        ));
        drop(listener);
        // Stale socket: replaced.
        bind_socket(&path, 0o640).unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o640
        );
        let file = dir.path().join("file");
        fs::write(&file, b"keep me").unwrap();
        assert!(matches!(
            bind_socket(&file, 0o600),
            Err(ServerError::NotASocket(_))
        ));
        assert_eq!(fs::read(&file).unwrap(), b"keep me");
    }
}
