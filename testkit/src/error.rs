// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Errors of the test kit.

use std::{io, path::PathBuf, time::Duration};

/// Everything that can go wrong while driving a backend.
///
/// Device misbehaviour is reported through [`Error::Device`], [`Error::Timeout`] and
/// [`Error::WaitTimeout`], so that a buggy backend fails a test with a message instead of
/// panicking or hanging it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Creating or mapping the memfd that backs guest memory failed.
    #[error("cannot create guest memory: {0}")]
    MemoryCreate(String),
    /// A guest memory access fell outside guest memory.
    #[error("guest memory access at {addr:#x} (+{len} bytes) failed: {reason}")]
    GuestAccess {
        /// Guest-physical address of the access.
        addr: u64,
        /// Length of the access.
        len: u64,
        /// What vm-memory reported.
        reason: String,
    },
    /// The guest memory allocator has no free range big enough.
    #[error("out of guest memory: cannot allocate {len} bytes aligned to {align}")]
    OutOfGuestMemory {
        /// Requested length.
        len: u64,
        /// Requested alignment.
        align: u64,
    },
    /// A caller passed an argument the kit cannot honour.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The socket could not be connected before the connect timeout.
    #[error("cannot connect to {path}: {source}")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// Last error seen.
        #[source]
        source: io::Error,
    },
    /// A vhost-user request failed (the backend NACKed it, closed the socket, sent garbage...).
    #[error("vhost-user {op} failed: {source}")]
    Vhost {
        /// The request, e.g. `"SET_VRING_ADDR"`.
        op: &'static str,
        /// The error from the vhost crate.
        #[source]
        source: vhost::Error,
    },
    /// The backend did not answer a vhost-user request in time; the connection was shut down.
    #[error("vhost-user {op}: no answer within {timeout:?}, connection shut down")]
    Timeout {
        /// The request.
        op: &'static str,
        /// The timeout that expired.
        timeout: Duration,
    },
    /// The backend does not offer something the set-up needs.
    #[error("backend does not support {0}")]
    Unsupported(String),
    /// Not enough free descriptors to post a chain.
    #[error("queue {queue} full: {needed} descriptors needed, {free} free")]
    QueueFull {
        /// Queue index.
        queue: u16,
        /// Descriptors the chain needs.
        needed: usize,
        /// Descriptors free.
        free: usize,
    },
    /// No completion arrived before the timeout.
    #[error("queue {queue}: no completion within {timeout:?} ({in_flight} chains in flight)")]
    WaitTimeout {
        /// Queue index.
        queue: u16,
        /// The timeout that expired.
        timeout: Duration,
        /// Chains posted and not completed.
        in_flight: usize,
    },
    /// The device broke the virtio rules (spec 2.7 "Split Virtqueues").
    #[error("device misbehaved on queue {queue}: {what}")]
    Device {
        /// Queue index.
        queue: u16,
        /// What it did.
        what: String,
    },
    /// An eventfd or other OS-level operation failed.
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
}

/// Result of the test kit.
pub type Result<T> = std::result::Result<T, Error>;
