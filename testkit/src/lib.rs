// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Test kit: a model of "VMM + guest driver" that drives any vhost-user backend over a real unix
//! socket.
//!
//! A crate of its own, for development only: the daemon's library and binary never link it (nor
//! the frontend half of the vhost-user protocol it needs).
//!
//! Integration tests, examples (the load generator) and benchmarks use it to talk to the daemon
//! exactly as QEMU plus a Linux guest would, without either:
//!
//! - [`GuestRam`]: memfd-backed guest RAM (one or more regions, 64 MiB at GPA 0 by default),
//!   shared with the backend through `SET_MEM_TABLE`, with a small allocator and byte accessors.
//! - [`Connection`]: the vhost-user frontend (the VMM side of the protocol). Every message it
//!   sends is guarded by a watchdog, so a backend that never answers fails the test with
//!   [`Error::Timeout`] instead of hanging it. The raw [`vhost::vhost_user::Frontend`] is exposed
//!   for tests that need odd message sequences.
//! - [`Virtqueue`]: a split virtqueue driver laid out in guest memory. It posts well-formed
//!   requests ([`Chain`]: device-readable buffers then device-writable buffers, optionally split
//!   over several descriptors or put in an indirect table) and arbitrary or malformed ones
//!   ([`RawDesc`]), kicks (honouring `VRING_USED_F_NO_NOTIFY` and `avail_event` when asked), and
//!   reaps completions by busy-polling the used ring or by waiting on the call eventfd
//!   ([`WaitMode`]), always with a timeout.
//! - [`Driver`]: the convenience layer. [`Driver::connect`] performs the whole VMM-like set-up
//!   of a virtio-iommu (request queue 0, event queue 1, 40-byte config space), so that a test
//!   reads like:
//!
//! ```no_run
//! use vhost_iommu_testkit::{Driver, Options};
//!
//! # fn main() -> Result<(), vhost_iommu_testkit::Error> {
//! let mut dev = Driver::connect("/tmp/iommu.sock", Options::default())?;
//! let config = dev.config()?;
//! assert_eq!(config.len(), 40);
//! let reply = dev.request(&[1, 0, 0, 0, 0, 0, 0, 0], 4)?;
//! assert_eq!(reply.used_len, 4);
//! assert_eq!(reply.tail(4), &[0, 0, 0, 0]);
//! # Ok(())
//! # }
//! ```
//!
//! The kit deals in raw bytes (readable bytes plus a writable length); encoding virtio-iommu
//! requests is the job of the `virtio` crate.
//!
//! Device misbehaviour (a used id that was never posted, a used length larger than the writable
//! buffers, no answer before the timeout, ...) is reported as an [`Error`], never as a panic or a
//! hang.

mod connection;
mod driver;
mod error;
mod queue;
mod ram;

pub use self::{
    connection::{connect_socket, Connection, Negotiated},
    driver::{Driver, Options, CONFIG_SIZE, EVENT_QUEUE, NUM_QUEUES, REQUEST_QUEUE},
    error::{Error, Result},
    queue::{
        need_event, Chain, Completion, ExternalRings, QueueStats, RawDesc, RawNext, Token,
        Virtqueue, WaitMode, DEFAULT_POISON, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT,
        VRING_DESC_F_WRITE,
    },
    ram::{GuestBuf, GuestRam, MemoryRegion, DEFAULT_MEMORY_SIZE},
};
