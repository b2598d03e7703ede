// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Least privilege: an optional seccomp-bpf filter (rust-vmm's `seccompiler`) confining the
//! daemon, every thread of it, to the system calls serving needs.
//!
//! [`apply`] is called once the sockets exist and the long-lived threads (control, signals)
//! run, before the first frontend is served: binding sockets, creating directories, renaming,
//! changing modes, opening files, `execve`, `socket`, `connect`, `ptrace` and the like are
//! then out of reach. Threads created later (a vring worker per connection, a thread per
//! control client) inherit the filter.
//!
//! The allowlist was found empirically (the daemon under `--seccomp log` and strace through
//! tests/daemon.rs, tests/hostile.rs and the QEMU + Linux guest end-to-end test) and is
//! proved by running those suites with `--seccomp kill` (`VHOST_IOMMU_TEST_SECCOMP=kill`) and
//! by tests/seccomp.rs.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// What a system call outside the allowlist does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum SeccompMode {
    /// No filter.
    #[default]
    Off,
    /// The call runs and the kernel logs it (SECCOMP_RET_LOG: dmesg or the audit log): for
    /// finding calls missing from the allowlist.
    Log,
    /// The call is refused and the daemon exits (status 159) after printing the call's number.
    Trap,
    /// The kernel kills the daemon at once (SECCOMP_RET_KILL_PROCESS: killed by SIGSYS).
    Kill,
}

/// Why the filter could not be built or installed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("not supported on {0}")]
    Arch(&'static str),
    #[error("building the filter: {0}")]
    Build(seccompiler::BackendError),
    #[error("installing the SIGSYS handler: {0}")]
    Handler(std::io::Error),
    #[error("installing the filter: {0}")]
    Install(seccompiler::Error),
}

/// System calls allowed without conditions, by who needs them.
const ALLOWED: &[&[libc::c_long]] = &[
    // vhost-user and control sockets: accepting connections, messages carrying file
    // descriptors (SET_MEM_TABLE, SET_VRING_KICK/CALL/ERR), control lines, read and write
    // timeouts, shutdown on disconnect; descriptors duplicated (try_clone) and closed.
    &[
        libc::SYS_accept4,
        libc::SYS_recvmsg,
        libc::SYS_sendmsg,
        libc::SYS_recvfrom,
        libc::SYS_sendto,
        libc::SYS_read,
        libc::SYS_setsockopt,
        libc::SYS_shutdown,
        libc::SYS_fcntl,
        libc::SYS_close,
    ],
    // epoll and eventfd: an epoll loop per vring worker; kick, call, exit and fault-wake
    // eventfds (epoll_wait on x86_64, in `LEGACY`).
    &[
        libc::SYS_epoll_create1,
        libc::SYS_epoll_ctl,
        libc::SYS_epoll_pwait,
        libc::SYS_eventfd2,
    ],
    // Guest memory and the heap: SET_MEM_TABLE maps the frontend's regions (mmap, see
    // `NO_EXEC`) and a replaced table is unmapped; the memory-table check stats the region
    // files (statx, or fstat/newfstatat where statx is missing); the allocator grows, moves
    // and trims its memory.
    &[
        libc::SYS_munmap,
        libc::SYS_madvise,
        libc::SYS_mremap,
        libc::SYS_brk,
        libc::SYS_statx,
        libc::SYS_fstat,
        libc::SYS_newfstatat,
    ],
    // The page tables' read-side barrier. The ownership crate's epochs use swmr-barrier,
    // which registers MEMBARRIER_CMD_PRIVATE_EXPEDITED before main; from then on its readers
    // use compiler fences only and every grace period (an UNMAP, a detach while a translator
    // is registered) relies on membarrier() succeeding. Refusing it would silently break the
    // IOTLB-sync rule: it MUST stay allowed.
    &[libc::SYS_membarrier],
    // Threads: a vring worker per connection and a thread per control client, created
    // (clone3, or clone where clone3 is missing) and set up by glibc and Rust's std (robust
    // futex list, restartable sequences, signal masks, the stack-overflow guard's alternate
    // stack, CPU affinity, HashMap seeds), joined and synchronised (futex), yielding while
    // polling the request ring, telling a gap in a poll window the kernel made (another task
    // ran: getrusage's involuntary switches) from one the hypervisor made, sleeping (the
    // signal thread waits for in-flight fault records), reading the clock (where the vDSO
    // cannot), exiting.
    &[
        libc::SYS_clone,
        libc::SYS_clone3,
        libc::SYS_set_robust_list,
        libc::SYS_rseq,
        libc::SYS_rt_sigprocmask,
        libc::SYS_sigaltstack,
        libc::SYS_sched_getaffinity,
        libc::SYS_getrandom,
        libc::SYS_gettid,
        libc::SYS_futex,
        libc::SYS_sched_yield,
        libc::SYS_getrusage,
        libc::SYS_clock_nanosleep,
        libc::SYS_nanosleep,
        libc::SYS_clock_gettime,
        libc::SYS_exit,
    ],
    // Signals: the SIGINT/SIGTERM handler returns (rt_sigreturn); calls interrupted by a
    // signal resume (restart_syscall); a crash stays the crash it is (Rust's SIGSEGV handler
    // restores the default action, abort() raises SIGABRT: getpid, and tgkill in `filter`).
    &[
        libc::SYS_rt_sigreturn,
        libc::SYS_restart_syscall,
        libc::SYS_rt_sigaction,
        libc::SYS_getpid,
    ],
    // Logging (stderr) and the control socket's replies.
    &[libc::SYS_write],
    // Shutdown: the signal thread unlinks the sockets (unlink on x86_64, in `LEGACY`), then
    // the process exits.
    &[libc::SYS_unlinkat, libc::SYS_exit_group],
    // x86_64's older forms of the calls above (glibc uses them there).
    LEGACY,
];

#[cfg(target_arch = "x86_64")]
const LEGACY: &[libc::c_long] = &[libc::SYS_epoll_wait, libc::SYS_unlink];
#[cfg(not(target_arch = "x86_64"))]
const LEGACY: &[libc::c_long] = &[];

/// mmap and mprotect are allowed only without PROT_EXEC: nothing maps code once serving.
const NO_EXEC: &[libc::c_long] = &[libc::SYS_mmap, libc::SYS_mprotect];

/// Opening files fails with EACCES instead of ending the daemon: the daemon opens no file once
/// serving, but glibc's malloc does, lazily, and copes with a refusal: it reads
/// /sys/devices/system/cpu/online (then /proc/stat) the first time a thread needs a ninth
/// arena (many control clients at once), falling back to sched_getaffinity, and
/// /proc/sys/vm/overcommit_memory the first time it shrinks a thread's heap, falling back to
/// madvise. The same in every mode (log included).
#[cfg(target_arch = "x86_64")]
const REFUSED: &[libc::c_long] = &[libc::SYS_openat, libc::SYS_open];
#[cfg(not(target_arch = "x86_64"))]
const REFUSED: &[libc::c_long] = &[libc::SYS_openat];

/// `--state-file`: a compaction replaces the snapshot whole (a new file renamed over the old
/// one) and may grow the journal. The filter cannot tell paths apart, so with a state file
/// the daemon may open, rename and truncate files once serving.
#[cfg(target_arch = "x86_64")]
const STATE_FILE: &[libc::c_long] = &[
    libc::SYS_openat,
    libc::SYS_open,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_rename,
    libc::SYS_ftruncate,
];
#[cfg(not(target_arch = "x86_64"))]
const STATE_FILE: &[libc::c_long] = &[
    libc::SYS_openat,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_ftruncate,
];

/// `--master-socket`: a page of reader slots per DMA master, in a memfd of its own created
/// when the master connects (memfd_create, ftruncate; sealed with fcntl and mapped without
/// PROT_EXEC, both allowed without it).
const MASTERS: &[libc::c_long] = &[libc::SYS_memfd_create, libc::SYS_ftruncate];

/// What the daemon's options add to the allowlist.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Needs {
    /// `--state-file` (see `STATE_FILE`).
    pub state_file: bool,
    /// `--master-socket` (see `MASTERS`).
    pub masters: bool,
    /// `--worker-cpus`: each connection's request worker is created on the CPUs asked for
    /// (`sched_setaffinity` on the calling thread only).
    pub worker_affinity: bool,
}

/// Exit status of a daemon stopped by `--seccomp trap` (128 + SIGSYS, as a shell reports a
/// death by SIGSYS).
pub const TRAP_EXIT_STATUS: i32 = 128 + libc::SIGSYS;

/// The system calls allowed, with or without conditions on their arguments.
pub fn allowed_syscalls() -> Vec<libc::c_long> {
    let mut all: Vec<_> = ALLOWED.iter().flat_map(|g| g.iter().copied()).collect();
    all.extend_from_slice(NO_EXEC);
    all.extend_from_slice(&[libc::SYS_prctl, libc::SYS_tgkill]);
    all.sort_unstable();
    all.dedup();
    all
}

/// A rule matching when argument `arg` (32 bits) compares to `value` with `op`.
fn arg_rule(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompRule, Error> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value)
        .and_then(|c| SeccompRule::new(vec![c]))
        .map_err(Error::Build)
}

fn target() -> Result<TargetArch, Error> {
    let arch = std::env::consts::ARCH;
    TargetArch::try_from(arch).map_err(|_| Error::Arch(arch))
}

/// The filters for `mode` (none for [`SeccompMode::Off`]), in the order they are installed:
/// the one refusing to open files (EACCES), then the allowlist, whose mismatch action is the
/// mode's (last: installing a filter takes a prctl the allowlist refuses).
pub fn filters(mode: SeccompMode) -> Result<Vec<BpfProgram>, Error> {
    filters_for(mode, Needs::default())
}

/// [`filters`] for a daemon whose options need `needs`.
pub fn filters_for(mode: SeccompMode, needs: Needs) -> Result<Vec<BpfProgram>, Error> {
    let mut extra: Vec<libc::c_long> = Vec::new();
    if needs.state_file {
        extra.extend_from_slice(STATE_FILE);
    }
    if needs.masters {
        extra.extend_from_slice(MASTERS);
    }
    let refused: Vec<libc::c_long> = REFUSED
        .iter()
        .copied()
        .filter(|nr| !extra.contains(nr))
        .collect();
    let mismatch = match mode {
        SeccompMode::Off => return Ok(Vec::new()),
        SeccompMode::Log => SeccompAction::Log,
        SeccompMode::Trap => SeccompAction::Trap,
        SeccompMode::Kill => SeccompAction::KillProcess,
    };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = ALLOWED
        .iter()
        .flat_map(|group| group.iter())
        .chain(REFUSED)
        .chain(&extra)
        .map(|&nr| (nr, Vec::new()))
        .collect();
    if needs.worker_affinity {
        // The calling thread's own affinity (pid 0), nothing else's.
        rules.insert(
            libc::SYS_sched_setaffinity,
            vec![arg_rule(0, SeccompCmpOp::Eq, 0)?],
        );
    }
    let no_exec = arg_rule(2, SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64), 0)?;
    for &nr in NO_EXEC {
        rules.insert(nr, vec![no_exec.clone()]);
    }
    // Threads name themselves (PR_SET_NAME), nothing else.
    rules.insert(
        libc::SYS_prctl,
        vec![arg_rule(0, SeccompCmpOp::Eq, libc::PR_SET_NAME as u64)?],
    );
    // Signals to this process only (abort() raising SIGABRT).
    rules.insert(
        libc::SYS_tgkill,
        vec![arg_rule(
            0,
            SeccompCmpOp::Eq,
            u64::from(std::process::id()),
        )?],
    );
    let allowlist = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, target()?)
        .map_err(Error::Build)?;
    let refused = SeccompFilter::new(
        refused.iter().map(|&nr| (nr, Vec::new())).collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EACCES as u32),
        target()?,
    )
    .map_err(Error::Build)?;
    [refused, allowlist]
        .into_iter()
        .map(|f| BpfProgram::try_from(f).map_err(Error::Build))
        .collect()
}

/// Installs the filters for `mode` on every thread of the process (TSYNC). Irreversible.
pub fn apply(mode: SeccompMode) -> Result<(), Error> {
    apply_for(mode, Needs::default())
}

/// [`apply`] for a daemon whose options need `needs`.
pub fn apply_for(mode: SeccompMode, needs: Needs) -> Result<(), Error> {
    let programs = filters_for(mode, needs)?;
    if programs.is_empty() {
        return Ok(());
    }
    if mode == SeccompMode::Trap {
        install_sigsys_handler()?;
    }
    // Kernel precedence across filters: kill > trap > EACCES > log > allow.
    for program in &programs {
        seccompiler::apply_filter_all_threads(program).map_err(Error::Install)?;
    }
    log::info!(
        "seccomp filter installed on every thread ({} system calls allowed; others: {})",
        allowed_syscalls().len(),
        match mode {
            SeccompMode::Log => "logged by the kernel",
            SeccompMode::Trap => "the daemon exits naming the call",
            _ => "the kernel kills the daemon",
        }
    );
    Ok(())
}

/// The kernel's `siginfo_t` for a SIGSYS (`_sigsys` of its union, which starts at the first
/// pointer-aligned offset after the three ints, as the C layout of this struct does).
#[repr(C)]
struct SigsysInfo {
    signo: libc::c_int,
    errno: libc::c_int,
    code: libc::c_int,
    call_addr: *mut libc::c_void,
    syscall: libc::c_int,
    arch: libc::c_uint,
}

/// si_code of a SIGSYS raised by a seccomp filter.
const SYS_SECCOMP: libc::c_int = 1;

/// Formats `n` in decimal at the end of `buf`; returns where it starts.
fn decimal(mut n: u64, buf: &mut [u8; 20]) -> usize {
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return at;
        }
    }
}

/// SIGSYS under `--seccomp trap`: says which call was refused, then exits. Async-signal-safe:
/// no allocation, no lock, only write(2) and _exit(2), both allowed by the filter.
extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes SA_SIGINFO handlers a valid siginfo_t (128 bytes, larger than
    // SigsysInfo); for SIGSYS its union holds `_sigsys`, which SigsysInfo mirrors. Only
    // plain integers are read.
    let (code, nr) = unsafe {
        let info = &*(info as *const SigsysInfo);
        (info.code, info.syscall)
    };
    let mut digits = [0u8; 20];
    let start = decimal(u64::try_from(nr).unwrap_or(0), &mut digits);
    let parts: [&[u8]; 3] = if code == SYS_SECCOMP {
        [
            b"vhost-device-iommu: seccomp: system call ",
            &digits[start..],
            b" is not in the allowlist; exiting (run with --seccomp log to find every missing call)\n",
        ]
    } else {
        [b"vhost-device-iommu: SIGSYS received; exiting\n", b"", b""]
    };
    for part in parts {
        // SAFETY: `part` is a valid buffer of `part.len()` bytes for the duration of the call.
        unsafe { libc::write(libc::STDERR_FILENO, part.as_ptr().cast(), part.len()) };
    }
    // SAFETY: _exit is async-signal-safe and ends the process without running anything else.
    unsafe { libc::_exit(TRAP_EXIT_STATUS) };
}

fn install_sigsys_handler() -> Result<(), Error> {
    // SAFETY: an all-zero sigaction is a valid value (empty mask, no flags) completed below.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_sigsys as *const () as libc::sighandler_t;
    action.sa_flags = libc::SA_SIGINFO;
    // SAFETY: `action` is a valid sigaction whose handler is async-signal-safe (see
    // `on_sigsys`); the old action is not asked for (null).
    let r = unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) };
    if r != 0 {
        return Err(Error::Handler(std::io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_mode_but_off_builds_the_filters() {
        assert!(filters(SeccompMode::Off).unwrap().is_empty());
        for mode in [SeccompMode::Log, SeccompMode::Trap, SeccompMode::Kill] {
            let programs = filters(mode).unwrap();
            assert_eq!(programs.len(), 2);
            for program in programs {
                assert!(!program.is_empty() && program.len() < 4096, "{mode:?}");
            }
        }
    }

    /// A memfd per DMA master only with --master-socket; longer filters for more needs.
    #[test]
    fn masters_add_memfds_to_the_allowlist() {
        assert!(!allowed_syscalls().contains(&libc::SYS_memfd_create));
        let len = |needs| filters_for(SeccompMode::Kill, needs).unwrap()[1].len();
        let plain = len(Needs::default());
        let masters = len(Needs {
            masters: true,
            ..Needs::default()
        });
        let both = len(Needs {
            masters: true,
            state_file: true,
            ..Needs::default()
        });
        assert!(
            plain < masters && masters < both,
            "{plain} {masters} {both}"
        );
    }

    /// sched_setaffinity only with --worker-cpus, and then only on the calling thread.
    #[test]
    fn worker_cpus_add_the_calling_threads_affinity() {
        assert!(!allowed_syscalls().contains(&libc::SYS_sched_setaffinity));
        let len = |needs| filters_for(SeccompMode::Kill, needs).unwrap()[1].len();
        let pinned = len(Needs {
            worker_affinity: true,
            ..Needs::default()
        });
        assert!(len(Needs::default()) < pinned);
    }

    #[test]
    fn the_allowlist_keeps_membarrier_and_leaves_out_process_creation() {
        let allowed = allowed_syscalls();
        assert!(allowed.contains(&libc::SYS_membarrier));
        for nr in [
            libc::SYS_execve,
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_bind,
            libc::SYS_ptrace,
            libc::SYS_openat,
            libc::SYS_getppid,
        ] {
            assert!(!allowed.contains(&nr), "{nr}");
        }
    }

    #[test]
    fn decimal_formats() {
        let mut buf = [0u8; 20];
        let at = decimal(0, &mut buf);
        assert_eq!(&buf[at..], b"0");
        let at = decimal(435, &mut buf);
        assert_eq!(&buf[at..], b"435");
        let at = decimal(u64::MAX, &mut buf);
        assert_eq!(&buf[at..], u64::MAX.to_string().as_bytes());
    }
}
