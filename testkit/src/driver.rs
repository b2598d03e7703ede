// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A virtio-iommu as a VMM plus guest driver see it: connection, memory, both queues.

use std::{
    collections::VecDeque,
    path::Path,
    time::{Duration, Instant},
};

use log::debug;
use vhost::vhost_user::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use virtio_bindings::{
    virtio_config::VIRTIO_F_VERSION_1,
    virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC},
};

use super::{
    connection::{Connection, Negotiated},
    error::{Error, Result},
    queue::{Chain, Completion, RawDesc, Token, Virtqueue, WaitMode},
    ram::{GuestRam, MemoryRegion, DEFAULT_MEMORY_SIZE},
};

/// Index of the virtio-iommu request queue.
pub const REQUEST_QUEUE: u16 = 0;
/// Index of the virtio-iommu event queue.
pub const EVENT_QUEUE: u16 = 1;
/// Number of virtio-iommu queues.
pub const NUM_QUEUES: u16 = 2;
/// Size of the virtio-iommu config space (`struct virtio_iommu_config`).
pub const CONFIG_SIZE: u32 = 40;

/// Feature bits reserved for the device type (virtio 1.x section 6: 0 to 23 and 50 to 127).
const DEVICE_FEATURE_BITS: u64 = 0x00ff_ffff | (!0u64 << 50);

/// How [`Driver::connect`] sets the device up. Start from `Options::default()` and override
/// fields: `Options { event_idx: false, ..Options::default() }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Guest RAM regions (default: 64 MiB at GPA 0).
    pub memory: Vec<MemoryRegion>,
    /// Request queue size (default 256, as QEMU's virtio-iommu).
    pub queue_size: u16,
    /// Event queue size (default 256).
    pub event_queue_size: u16,
    /// Acknowledge `VIRTIO_RING_F_EVENT_IDX` if offered (default true, as Linux).
    pub event_idx: bool,
    /// Acknowledge `VIRTIO_RING_F_INDIRECT_DESC` if offered (default true).
    pub indirect_desc: bool,
    /// Device-type feature bits to acknowledge when offered (default: all of them).
    pub device_features: u64,
    /// Other feature bits to acknowledge when offered (e.g. `VIRTIO_F_ACCESS_PLATFORM`;
    /// default none). `VERSION_1` and `PROTOCOL_FEATURES` are always acknowledged when offered.
    pub extra_features: u64,
    /// Protocol features to acknowledge when offered (default `CONFIG | MQ | REPLY_ACK |
    /// RESET_DEVICE`).
    pub protocol_features: VhostUserProtocolFeatures,
    /// Ask for a reply to every request once `REPLY_ACK` is negotiated (default true), so that
    /// the backend has applied each `SET_*` before the next step.
    pub need_reply: bool,
    /// How long to keep retrying the socket while the backend starts (default 10 s).
    pub connect_timeout: Duration,
    /// Timeout of each vhost-user request and of each wait for a completion (default 10 s).
    pub timeout: Duration,
    /// How [`Driver::request`] and friends wait (default [`WaitMode::Poll`]).
    pub wait: WaitMode,
    /// Ask for interrupts on the request queue (default false: Linux's virtio-iommu driver polls
    /// it and sets `VRING_AVAIL_F_NO_INTERRUPT`).
    pub request_interrupts: bool,
    /// Kick after every post even when the device suppressed notifications (default false).
    pub always_kick: bool,
    /// Per-head buffer slot size in guest memory; bigger chains use the allocator (default 512).
    pub slot_size: u32,
    /// Event buffers posted at start and re-posted as events are reaped (default: fill the
    /// queue, as Linux does).
    pub event_buffers: u16,
    /// Length of each event buffer (default 24, `struct virtio_iommu_fault`).
    pub event_buffer_len: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            memory: vec![MemoryRegion::new(0, DEFAULT_MEMORY_SIZE)],
            queue_size: 256,
            event_queue_size: 256,
            event_idx: true,
            indirect_desc: true,
            device_features: DEVICE_FEATURE_BITS,
            extra_features: 0,
            protocol_features: VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::RESET_DEVICE,
            need_reply: true,
            connect_timeout: Duration::from_secs(10),
            timeout: Duration::from_secs(10),
            wait: WaitMode::Poll,
            request_interrupts: false,
            always_kick: false,
            slot_size: 512,
            event_buffers: u16::MAX,
            event_buffer_len: 24,
        }
    }
}

impl Options {
    /// The virtio features to acknowledge out of `offered`.
    pub fn features_to_ack(&self, offered: u64) -> u64 {
        let mut wanted = (1u64 << VIRTIO_F_VERSION_1)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | (self.device_features & DEVICE_FEATURE_BITS)
            | self.extra_features;
        if self.event_idx {
            wanted |= 1 << VIRTIO_RING_F_EVENT_IDX;
        }
        if self.indirect_desc {
            wanted |= 1 << VIRTIO_RING_F_INDIRECT_DESC;
        }
        offered & wanted
    }
}

/// A virtio-iommu device behind a vhost-user socket, set up like QEMU plus a Linux guest would:
/// request queue 0, event queue 1 filled with event buffers, 40-byte config space.
///
/// Dropping it disconnects.
#[derive(Debug)]
pub struct Driver {
    // Queues first: they free their guest memory before the connection goes away.
    requestq: Virtqueue,
    eventq: Virtqueue,
    conn: Connection,
    mem: GuestRam,
    options: Options,
    others: VecDeque<Completion>,
}

impl Driver {
    /// Connects to `socket` and performs the whole set-up: `GET_FEATURES`,
    /// `GET/SET_PROTOCOL_FEATURES`, `GET_QUEUE_NUM` (with `MQ`), `SET_OWNER`, then
    /// [`Driver::start`].
    pub fn connect(socket: impl AsRef<Path>, options: Options) -> Result<Self> {
        let mem = GuestRam::new(&options.memory)?;
        let mut conn = Connection::connect(
            socket,
            options.connect_timeout,
            options.timeout,
            u64::from(NUM_QUEUES),
        )?;
        let requestq = Virtqueue::new(&mem, REQUEST_QUEUE, options.queue_size, options.slot_size)?;
        let eventq = Virtqueue::new(
            &mem,
            EVENT_QUEUE,
            options.event_queue_size,
            options.event_buffer_len.try_into().unwrap_or(0),
        )?;

        let offered = conn.get_features()?;
        if offered & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            let acked = conn.negotiate_protocol_features(options.protocol_features)?;
            if options.need_reply && acked.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                conn.set_need_reply(true);
            }
            if acked.contains(VhostUserProtocolFeatures::MQ) {
                let n = conn.get_queue_num()?;
                if n < u64::from(NUM_QUEUES) {
                    return Err(Error::Unsupported(format!(
                        "{NUM_QUEUES} queues (GET_QUEUE_NUM says {n})"
                    )));
                }
            }
        }
        conn.set_owner()?;

        let mut dev = Self {
            requestq,
            eventq,
            conn,
            mem,
            options,
            others: VecDeque::new(),
        };
        dev.start()?;
        Ok(dev)
    }

    /// Starts the device on fresh rings (every chain in flight is forgotten): `SET_FEATURES`,
    /// `SET_MEM_TABLE`, both queues started ([`Connection::start_queue`]) and enabled, event
    /// buffers posted.
    pub fn start(&mut self) -> Result<()> {
        self.requestq.reinit()?;
        self.eventq.reinit()?;
        self.others.clear();
        self.configure([0, 0])?;
        let n = self.options.event_buffers.min(self.eventq.size());
        for _ in 0..n {
            self.eventq
                .post_chain(&Chain::new().writable(self.options.event_buffer_len))?;
        }
        if n > 0 {
            self.eventq.notify()?;
        }
        Ok(())
    }

    /// Restarts the queues after [`Driver::stop`] without touching the rings, as QEMU does when
    /// a stopped VM resumes: same messages as [`Driver::start`], with `SET_VRING_BASE(bases)`
    /// (what `stop` returned). Chains posted meanwhile are processed once the queues run.
    pub fn resume(&mut self, bases: [u16; 2]) -> Result<()> {
        self.configure(bases)
    }

    fn configure(&mut self, bases: [u16; 2]) -> Result<()> {
        let acked = self
            .options
            .features_to_ack(self.conn.negotiated().features);
        self.conn.set_features(acked)?;
        self.conn.set_mem_table(&self.mem)?;
        let event_idx = self.conn.negotiated().has_feature(VIRTIO_RING_F_EVENT_IDX);
        self.requestq.set_event_idx(event_idx)?;
        self.requestq
            .set_interrupts(self.options.request_interrupts)?;
        self.eventq.set_event_idx(event_idx)?;
        self.eventq.set_interrupts(true)?;
        self.conn.start_queue(&self.requestq, bases[0])?;
        self.conn.start_queue(&self.eventq, bases[1])?;
        debug!("testkit: queues started, features {acked:#x}, event_idx {event_idx}");
        Ok(())
    }

    /// Stops both queues (`SET_VRING_ENABLE(0)`, `GET_VRING_BASE`) and returns the bases the
    /// device reported, request queue first.
    pub fn stop(&mut self) -> Result<[u16; 2]> {
        Ok([
            self.conn.stop_queue(REQUEST_QUEUE)?,
            self.conn.stop_queue(EVENT_QUEUE)?,
        ])
    }

    /// Device reset as QEMU performs it: stop both queues, `RESET_DEVICE` if negotiated, then
    /// [`Driver::start`] again on zeroed rings. Chains in flight are forgotten.
    pub fn reset(&mut self) -> Result<()> {
        self.stop()?;
        if self
            .conn
            .negotiated()
            .has_protocol_feature(VhostUserProtocolFeatures::RESET_DEVICE)
        {
            self.conn.reset_device()?;
        }
        self.start()
    }

    /// Connects again after the backend went away (it crashed, or was restarted), as QEMU
    /// does with `reconnect-ms`: the whole handshake on a new connection, then both queues
    /// started again on the same rings, each from the used index the device left in guest
    /// memory (a dead backend cannot report its avail index, so requests it took but did not
    /// answer come again). Chains in flight stay in flight.
    pub fn reconnect(&mut self, socket: impl AsRef<Path>) -> Result<()> {
        let mut conn = Connection::connect(
            socket,
            self.options.connect_timeout,
            self.options.timeout,
            u64::from(NUM_QUEUES),
        )?;
        let offered = conn.get_features()?;
        if offered & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            let acked = conn.negotiate_protocol_features(self.options.protocol_features)?;
            if self.options.need_reply && acked.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                conn.set_need_reply(true);
            }
            if acked.contains(VhostUserProtocolFeatures::MQ) {
                conn.get_queue_num()?;
            }
        }
        conn.set_owner()?;
        self.conn = conn;
        let bases = [
            self.requestq.device_used_idx()?,
            self.eventq.device_used_idx()?,
        ];
        self.configure(bases)
    }

    /// Disconnects (same as dropping).
    pub fn disconnect(self) {}

    /// The whole config space (`GET_CONFIG` of 40 bytes at offset 0).
    pub fn config(&mut self) -> Result<Vec<u8>> {
        self.conn.get_config(0, CONFIG_SIZE)
    }

    /// `GET_CONFIG` of `size` bytes at `offset`.
    pub fn get_config(&mut self, offset: u32, size: u32) -> Result<Vec<u8>> {
        self.conn.get_config(offset, size)
    }

    /// `SET_CONFIG` of `data` at `offset`.
    pub fn set_config(&mut self, offset: u32, data: &[u8]) -> Result<()> {
        self.conn.set_config(offset, data)
    }

    fn notify_requests(&mut self) -> Result<()> {
        if self.options.always_kick {
            self.requestq.kick()
        } else {
            self.requestq.notify().map(|_| ())
        }
    }

    /// Sends one request (`readable` bytes in one descriptor, `writable_len` bytes in another)
    /// and waits for its completion.
    pub fn request(&mut self, readable: &[u8], writable_len: usize) -> Result<Completion> {
        self.request_chain(&Chain::request(readable, writable_len))
    }

    /// Sends one chain and waits for its completion. Completions of other chains reaped
    /// meanwhile are kept for [`Driver::take_other_completions`].
    pub fn request_chain(&mut self, chain: &Chain<'_>) -> Result<Completion> {
        let token = self.requestq.post_chain(chain)?;
        self.notify_requests()?;
        self.wait_token(token)
    }

    /// Sends one raw (possibly malformed) chain and waits for its completion.
    pub fn request_raw(&mut self, descs: &[RawDesc]) -> Result<Completion> {
        let token = self.requestq.post_raw(descs)?;
        self.notify_requests()?;
        self.wait_token(token)
    }

    fn wait_token(&mut self, token: Token) -> Result<Completion> {
        let deadline = Instant::now() + self.options.timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let c = self.requestq.wait(self.options.wait, left)?;
            if c.token == token {
                return Ok(c);
            }
            self.others.push_back(c);
        }
    }

    /// Completions of chains other than the one a `request*` call waited for.
    pub fn take_other_completions(&mut self) -> Vec<Completion> {
        self.others.drain(..).collect()
    }

    /// Posts every chain, notifies once, waits for all; completions in posting order.
    /// Completions of other chains reaped meanwhile are kept for
    /// [`Driver::take_other_completions`].
    pub fn batch(&mut self, chains: &[Chain<'_>]) -> Result<Vec<Completion>> {
        let mut tokens = Vec::with_capacity(chains.len());
        for c in chains {
            tokens.push(self.requestq.post_chain(c)?);
        }
        self.notify_requests()?;
        let mut out = Vec::with_capacity(chains.len());
        let deadline = Instant::now() + self.options.timeout;
        while out.len() < tokens.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            let c = self.requestq.wait(self.options.wait, left)?;
            // Tokens increase with posting order, so ours form a contiguous range.
            if tokens.first() <= Some(&c.token) && Some(&c.token) <= tokens.last() {
                out.push(c);
            } else {
                self.others.push_back(c);
            }
        }
        out.sort_by_key(|c| c.token);
        Ok(out)
    }

    fn repost_event_buffer(&mut self) -> Result<()> {
        if self.options.event_buffers > 0 {
            self.eventq
                .post_chain(&Chain::new().writable(self.options.event_buffer_len))?;
            self.eventq.notify()?;
        }
        Ok(())
    }

    /// An event the device already published, if any (the buffer is re-posted).
    pub fn poll_event(&mut self) -> Result<Option<Completion>> {
        let c = self.eventq.poll_used()?;
        if c.is_some() {
            self.repost_event_buffer()?;
        }
        Ok(c)
    }

    /// Waits up to `timeout` for an event on the event queue (sleeping on the call eventfd);
    /// the buffer is re-posted.
    pub fn wait_event(&mut self, timeout: Duration) -> Result<Completion> {
        let c = self.eventq.wait(WaitMode::Interrupt, timeout)?;
        self.repost_event_buffer()?;
        Ok(c)
    }

    /// The request queue, the event queue and the connection at once, for a test that drives
    /// them from different threads (a request-queue driver, an event-queue driver, and the
    /// frontend restarting queues or replacing the memory table meanwhile).
    pub fn parts(&mut self) -> (&mut Virtqueue, &mut Virtqueue, &mut Connection) {
        (&mut self.requestq, &mut self.eventq, &mut self.conn)
    }

    /// The request queue, for batching, raw posting and measurements.
    pub fn requestq(&mut self) -> &mut Virtqueue {
        &mut self.requestq
    }

    /// The event queue.
    pub fn eventq(&mut self) -> &mut Virtqueue {
        &mut self.eventq
    }

    /// Guest memory (shared with the backend).
    pub fn memory(&self) -> &GuestRam {
        &self.mem
    }

    /// The vhost-user connection (raw frontend access, odd sequences).
    pub fn connection(&mut self) -> &mut Connection {
        &mut self.conn
    }

    /// What was negotiated.
    pub fn negotiated(&self) -> &Negotiated {
        self.conn.negotiated()
    }

    /// The options the device was set up with.
    pub fn options(&self) -> &Options {
        &self.options
    }
}
