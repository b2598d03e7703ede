// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Self-test of `vhost_iommu_testkit` against a throwaway toy backend.
//!
//! The toy is a `VhostUserBackend` with 2 queues and a 40-byte config space that answers every
//! well-formed request chain by writing a 4-byte tail `[0, 0, 0, 0]` as the last 4 writable
//! bytes (used len 4), and every malformed one with used len 0. A request whose first byte is
//! `0xEE` also fills one event-queue buffer with 24 bytes of `0xEE`.

use std::{
    io,
    os::unix::net::UnixListener,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, RwLock,
    },
    thread,
    time::{Duration, Instant},
};

use assert_matches::assert_matches;
use vhost::vhost_user::{Listener, VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_iommu_testkit::{
    Chain, Connection, Driver, Error, MemoryRegion, Options, RawDesc, WaitMode, CONFIG_SIZE,
};
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_bindings::{
    virtio_config::VIRTIO_F_VERSION_1,
    virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC},
};
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap,
};
use vmm_sys_util::{
    epoll::EventSet,
    event::{new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier},
};

// ---------------------------------------------------------------------------------------------
// The toy backend (throwaway).

const TOY_DEVICE_FEATURES: u64 = (1 << 0) | (1 << 2) | (1 << 4);
const TOY_EVENT_TRIGGER: u8 = 0xee;

fn toy_config() -> [u8; 40] {
    let mut c = [0u8; 40];
    c[0..8].copy_from_slice(&0xffff_ffff_ffff_f000u64.to_le_bytes()); // page_size_mask
    c[8..16].copy_from_slice(&0u64.to_le_bytes()); // input_range.start
    c[16..24].copy_from_slice(&u64::MAX.to_le_bytes()); // input_range.end
    c[24..28].copy_from_slice(&1u32.to_le_bytes()); // domain_range.start
    c[28..32].copy_from_slice(&0xffffu32.to_le_bytes()); // domain_range.end
    c[32..36].copy_from_slice(&512u32.to_le_bytes()); // probe_size
    c
}

/// Counters shared by every connection of one toy server.
#[derive(Debug, Default)]
struct ToyStats {
    connections: AtomicU64,
    requests: AtomicU64,
    malformed: AtomicU64,
    /// Readable bytes and readable descriptor count of the last well-formed request.
    last: Mutex<(Vec<u8>, usize)>,
}

struct Toy {
    event_idx: AtomicBool,
    mem: RwLock<Option<GuestMemoryAtomic<GuestMemoryMmap>>>,
    config: Mutex<[u8; 40]>,
    exit: (EventConsumer, EventNotifier),
    stats: Arc<ToyStats>,
}

/// What the toy makes of one chain.
struct Served {
    used_len: u32,
    event: bool,
}

impl Toy {
    fn new(stats: Arc<ToyStats>) -> Self {
        Self {
            event_idx: AtomicBool::new(false),
            mem: RwLock::new(None),
            config: Mutex::new(toy_config()),
            exit: new_event_consumer_and_notifier(EventFlag::NONBLOCK).unwrap(),
            stats,
        }
    }

    fn serve_chain(
        &self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Served {
        let malformed = Served {
            used_len: 0,
            event: false,
        };
        let mut readable = Vec::new();
        let mut readable_descs = 0;
        let mut writable = Vec::new();
        let mut last_has_next = false;
        let mut count = 0;
        for d in chain {
            count += 1;
            last_has_next = d.has_next();
            if !mem.check_range(d.addr(), d.len() as usize) {
                return malformed;
            }
            if d.is_write_only() {
                writable.push((d.addr(), d.len()));
            } else if !writable.is_empty() {
                return malformed; // readable after writable
            } else {
                let mut b = vec![0; d.len() as usize];
                if mem.read_slice(&mut b, d.addr()).is_err() {
                    return malformed;
                }
                readable.extend_from_slice(&b);
                readable_descs += 1;
            }
        }
        let writable_len: u64 = writable.iter().map(|(_, l)| u64::from(*l)).sum();
        if count == 0 || last_has_next || writable_len < 4 {
            return malformed; // empty, looping or truncated chain, or no room for the tail
        }
        // The last 4 writable bytes, which may straddle descriptors.
        let mut left = 4u64;
        for &(addr, len) in writable.iter().rev() {
            let n = left.min(u64::from(len));
            let at = GuestAddress(addr.0 + u64::from(len) - n);
            if mem.write_slice(&vec![0; n as usize], at).is_err() {
                return malformed;
            }
            left -= n;
            if left == 0 {
                break;
            }
        }
        let event = readable.first() == Some(&TOY_EVENT_TRIGGER);
        *self.stats.last.lock().unwrap() = (readable, readable_descs);
        Served { used_len: 4, event }
    }

    fn post_event(&self, mem: &GuestMemoryMmap, eventq: &VringRwLock) -> io::Result<()> {
        let chain = eventq.get_mut().get_queue_mut().pop_descriptor_chain(mem);
        let Some(chain) = chain else {
            return Ok(()); // no buffer: the event is dropped
        };
        let head = chain.head_index();
        let mut len = 0u32;
        if let Ok(mut w) = chain.writer(mem) {
            let n = w.available_bytes().min(24);
            if io::Write::write_all(&mut w, &[TOY_EVENT_TRIGGER; 24][..n]).is_ok() {
                len = n as u32;
            }
        }
        eventq.add_used(head, len).map_err(io::Error::other)?;
        if eventq.needs_notification().map_err(io::Error::other)? {
            eventq.signal_used_queue()?;
        }
        Ok(())
    }

    fn process_requests(&self, vrings: &[VringRwLock]) -> io::Result<()> {
        let Some(atomic) = self.mem.read().unwrap().clone() else {
            return Ok(());
        };
        let mem = atomic.memory();
        let chains: Vec<_> = match vrings[0].get_mut().get_queue_mut().iter(&*mem) {
            Ok(iter) => iter.collect(),
            Err(_) => return Ok(()), // not ready yet: spurious event
        };
        for chain in chains {
            let head = chain.head_index();
            let served = self.serve_chain(&mem, chain);
            if served.used_len == 0 {
                self.stats.malformed.fetch_add(1, Ordering::Relaxed);
            } else {
                self.stats.requests.fetch_add(1, Ordering::Relaxed);
            }
            vrings[0]
                .add_used(head, served.used_len)
                .map_err(io::Error::other)?;
            if served.event {
                self.post_event(&mem, &vrings[1])?;
            }
        }
        if vrings[0].needs_notification().map_err(io::Error::other)? {
            vrings[0].signal_used_queue()?;
        }
        Ok(())
    }
}

impl VhostUserBackend for Toy {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        2
    }

    fn max_queue_size(&self) -> usize {
        1024
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | TOY_DEVICE_FEATURES
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let config = self.config.lock().unwrap();
        let mut out = vec![0; size as usize];
        let start = (offset as usize).min(config.len());
        let end = (offset as usize + size as usize).min(config.len());
        out[..end - start].copy_from_slice(&config[start..end]);
        out
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        let mut config = self.config.lock().unwrap();
        let start = offset as usize;
        let Some(dst) = config.get_mut(start..start + buf.len()) else {
            return Err(io::Error::other("SET_CONFIG out of range"));
        };
        dst.copy_from_slice(buf);
        Ok(())
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        *self.mem.write().unwrap() = Some(mem);
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        Some((self.exit.0.try_clone().ok()?, self.exit.1.try_clone().ok()?))
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other("unexpected event set"));
        }
        match device_event {
            0 if self.event_idx.load(Ordering::Relaxed) => loop {
                vrings[0].disable_notification().map_err(io::Error::other)?;
                self.process_requests(vrings)?;
                if !vrings[0].enable_notification().map_err(io::Error::other)? {
                    break Ok(());
                }
            },
            0 => self.process_requests(vrings),
            1 => Ok(()), // event buffers posted: nothing to do until an event
            _ => Err(io::Error::other("unknown event")),
        }
    }
}

/// A toy server on a temporary socket: one `Listener` kept across connections, a fresh backend
/// and daemon per connection, in a thread that lives until the test process exits.
struct ToyServer {
    _dir: tempfile::TempDir,
    path: PathBuf,
    stats: Arc<ToyStats>,
}

fn serve_toy(path: &Path, stats: Arc<ToyStats>) {
    let mut listener = Listener::new(path, true).unwrap();
    loop {
        let backend = Arc::new(Toy::new(stats.clone()));
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut daemon = VhostUserDaemon::new("toy".into(), backend, mem).unwrap();
        if daemon.start(&mut listener).is_err() {
            return;
        }
        stats.connections.fetch_add(1, Ordering::SeqCst);
        let _ = daemon.wait();
        // Dropping the daemon signals the exit events and joins the worker thread.
    }
}

impl ToyServer {
    fn start() -> Self {
        Self::start_after(Duration::ZERO)
    }

    /// Binds the socket only after `delay`, to exercise the client's connect retries.
    fn start_after(delay: Duration) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("toy.sock");
        let stats = Arc::new(ToyStats::default());
        let (p, s) = (path.clone(), stats.clone());
        thread::spawn(move || {
            thread::sleep(delay);
            serve_toy(&p, s);
        });
        Self {
            _dir: dir,
            path,
            stats,
        }
    }

    fn connect(&self, options: Options) -> Driver {
        Driver::connect(&self.path, options).expect("connect to the toy backend")
    }
}

fn short_timeouts() -> Options {
    Options {
        timeout: Duration::from_secs(10),
        ..Options::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Tests.

#[test]
fn handshake_and_config() {
    let toy = ToyServer::start();
    let mut dev = toy.connect(Options::default());
    let n = *dev.negotiated();
    assert_eq!(n.features, Toy::new(Arc::default()).features());
    assert_eq!(
        n.acked_features, n.features,
        "everything the toy offers is wanted"
    );
    assert!(n.has_feature(VIRTIO_F_VERSION_1));
    assert!(n.protocol_features_acked());
    assert_eq!(
        n.acked_protocol_features,
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
    );
    assert_eq!(n.queue_num, Some(2));

    let config = dev.config().unwrap();
    assert_eq!(config.len(), CONFIG_SIZE as usize);
    assert_eq!(config, toy_config());
    assert_eq!(dev.get_config(32, 4).unwrap(), 512u32.to_le_bytes());
    dev.set_config(36, &[1]).unwrap();
    assert_eq!(dev.config().unwrap()[36], 1);
    // The toy pads reads past its 40 bytes; the frontend refuses reads past 4 KiB itself.
    assert_matches!(dev.get_config(0, 0x2000), Err(Error::Vhost { .. }));

    // Device-specific bits can be declined.
    drop(dev);
    let dev = toy.connect(Options {
        device_features: 1 << 2,
        event_idx: false,
        indirect_desc: false,
        ..Options::default()
    });
    let n = *dev.negotiated();
    assert_eq!(
        n.acked_features,
        (1 << VIRTIO_F_VERSION_1) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() | (1 << 2)
    );
}

#[test]
fn thousand_requests_one_at_a_time() {
    let toy = ToyServer::start();
    let mut dev = toy.connect(short_timeouts());
    for i in 0u32..1000 {
        let req = i.to_le_bytes();
        let reply = dev.request(&req, 8).unwrap();
        assert_eq!(reply.used_len, 4);
        assert_eq!(reply.tail(4), [0, 0, 0, 0]);
        assert_eq!(
            &reply.data[..4],
            [0xa5; 4],
            "bytes before the tail stay untouched"
        );
        assert_eq!(toy.stats.last.lock().unwrap().0, req);
    }
    let q = dev.requestq();
    assert_eq!(q.in_flight(), 0);
    assert_eq!(q.num_free(), 256);
    assert_eq!(q.stats().completed, 1000);
    assert_eq!(toy.stats.requests.load(Ordering::Relaxed), 1000);
}

#[test]
fn batches_of_64_per_kick() {
    let toy = ToyServer::start();
    let mut dev = toy.connect(short_timeouts());
    let payloads: Vec<[u8; 8]> = (0u64..64).map(|i| i.to_le_bytes()).collect();
    let chains: Vec<Chain> = payloads.iter().map(|p| Chain::request(p, 4)).collect();
    for _ in 0..50 {
        let kicks_before = dev.requestq().stats().kicks;
        let replies = dev.batch(&chains).unwrap();
        assert_eq!(replies.len(), 64);
        assert!(replies.windows(2).all(|w| w[0].token < w[1].token));
        assert!(replies.iter().all(|r| r.used_len == 4 && r.data == [0; 4]));
        assert!(dev.requestq().stats().kicks - kicks_before <= 1);
    }
    // The measurement hook: K per kick, busy-poll reaping, timed.
    let mut out = Vec::new();
    let q = dev.requestq();
    let elapsed = q
        .round_trip(&chains, WaitMode::Spin, Duration::from_secs(10), &mut out)
        .unwrap();
    assert_eq!(out.len(), 64);
    assert!(elapsed > Duration::ZERO);
    assert_eq!(toy.stats.requests.load(Ordering::Relaxed), 51 * 64);
    assert_eq!(dev.requestq().num_free(), 256);
}

#[test]
fn split_and_indirect_chains() {
    let toy = ToyServer::start();
    let mut dev = toy.connect(short_timeouts());
    let req: Vec<u8> = (0u8..24).collect();

    let reply = dev
        .request_chain(&Chain::new().readable_split(&req, 3).writable(4))
        .unwrap();
    assert_eq!((reply.used_len, reply.data.as_slice()), (4, &[0u8; 4][..]));
    assert_eq!(*toy.stats.last.lock().unwrap(), (req.clone(), 3));

    let reply = dev
        .request_chain(&Chain::request(&req, 4).indirect())
        .unwrap();
    assert_eq!(reply.used_len, 4);
    assert_eq!(*toy.stats.last.lock().unwrap(), (req.clone(), 1));

    // Split readable and writable parts inside an indirect table; the tail straddles two
    // writable descriptors of 3 bytes.
    let reply = dev
        .request_chain(
            &Chain::new()
                .readable_split(&req, 4)
                .writable_split(6, 2)
                .indirect(),
        )
        .unwrap();
    assert_eq!(reply.used_len, 4);
    assert_eq!(reply.data, [0xa5, 0xa5, 0, 0, 0, 0]);
    assert_eq!(*toy.stats.last.lock().unwrap(), (req.clone(), 4));

    // Bigger than a slot: buffers come from the allocator and go back to it.
    let free_before = dev.memory().free_bytes();
    let big = vec![7u8; 10_000];
    let reply = dev.request(&big, 3000).unwrap();
    assert_eq!((reply.used_len, reply.data.len()), (4, 3000));
    assert_eq!(toy.stats.last.lock().unwrap().0, big);
    assert_eq!(dev.memory().free_bytes(), free_before);
}

#[test]
fn event_idx_on_and_off() {
    let toy = ToyServer::start();
    for event_idx in [true, false] {
        for wait in [WaitMode::Poll, WaitMode::Spin, WaitMode::Interrupt] {
            let mut dev = toy.connect(Options {
                event_idx,
                wait,
                request_interrupts: wait == WaitMode::Interrupt,
                ..short_timeouts()
            });
            assert_eq!(
                dev.negotiated().has_feature(VIRTIO_RING_F_EVENT_IDX),
                event_idx
            );
            for i in 0u16..100 {
                let reply = dev.request(&i.to_le_bytes(), 4).unwrap();
                assert_eq!(reply.used_len, 4);
            }
            let chains: Vec<Chain> = (0..32).map(|_| Chain::request(b"batch", 4)).collect();
            for _ in 0..10 {
                assert_eq!(dev.batch(&chains).unwrap().len(), 32);
            }
            let q = dev.requestq();
            let calls = q.call_fd().read().unwrap_or(0);
            match (event_idx, wait) {
                // Interrupts off on the request queue: with EVENT_IDX the device honours it...
                (true, WaitMode::Poll | WaitMode::Spin) => assert_eq!(calls, 0),
                // ...without, virtio-queue ignores VRING_AVAIL_F_NO_INTERRUPT and signals.
                (false, WaitMode::Poll | WaitMode::Spin) => assert!(calls > 0),
                // Interrupts on: every completion after a reap is signalled (consumed while
                // waiting, or still pending if the completion was seen before sleeping).
                (_, WaitMode::Interrupt) => assert!(q.stats().interrupts + calls > 0),
            }
            assert!(q.stats().kicks > 0);
        }
    }
}

#[test]
fn reconnect_after_drop_and_reset() {
    // The client starts first: connect retries until the server binds.
    let toy = ToyServer::start_after(Duration::from_millis(200));
    for round in 1..=3u64 {
        let mut dev = toy.connect(short_timeouts());
        assert_eq!(dev.request(b"hello", 4).unwrap().used_len, 4);
        // The server counts a connection once `start` returns, possibly after our request.
        let deadline = Instant::now() + Duration::from_secs(10);
        while toy.stats.connections.load(Ordering::SeqCst) < round && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(toy.stats.connections.load(Ordering::SeqCst), round);
        for _ in 0..3 {
            dev.reset().unwrap();
            assert_eq!(dev.requestq().avail_idx(), 0);
            assert_eq!(dev.request(b"after reset", 4).unwrap().used_len, 4);
        }
        let bases = dev.stop().unwrap();
        // The device consumed the one request since the last reset, and no event buffer.
        assert_eq!(bases, [1, 0]);
        // Dropping disconnects; the server serves the next connection.
    }
    assert_eq!(toy.stats.requests.load(Ordering::Relaxed), 12);
}

#[test]
fn stop_and_resume_keeps_the_rings() {
    let toy = ToyServer::start();
    let mut dev = toy.connect(short_timeouts());
    assert_eq!(dev.request(b"before", 4).unwrap().used_len, 4);
    let bases = dev.stop().unwrap();
    assert_eq!(bases, [1, 0]);
    // Posted and kicked while the queue is stopped: nothing happens...
    let token = dev
        .requestq()
        .post_chain(&Chain::from_parts(&[b"while", b" stopped"], &[2, 2]))
        .unwrap();
    dev.requestq().kick().unwrap();
    assert_matches!(
        dev.requestq()
            .wait(WaitMode::Poll, Duration::from_millis(50)),
        Err(Error::WaitTimeout { in_flight: 1, .. })
    );
    // ...until the queues run again, on the same rings.
    dev.resume(bases).unwrap();
    let c = dev
        .requestq()
        .wait(WaitMode::Poll, Duration::from_secs(10))
        .unwrap();
    assert_eq!(
        (c.token, c.used_len, c.data.as_slice()),
        (token, 4, &[0u8; 4][..])
    );
    assert_eq!(
        *toy.stats.last.lock().unwrap(),
        (b"while stopped".to_vec(), 2)
    );
    assert_eq!(dev.request(b"after", 4).unwrap().used_len, 4);
    assert_eq!(dev.stop().unwrap(), [3, 0]);
}

#[test]
fn malformed_chains_get_len_0() {
    let toy = ToyServer::start();
    let mut dev = toy.connect(short_timeouts());
    let mem = dev.memory().clone();
    let a = mem.alloc(64, 8).unwrap().addr;
    let b = mem.alloc(64, 8).unwrap().addr;
    let outside = 1 << 40;
    let cases: [(&str, Vec<RawDesc>); 6] = [
        (
            "readable after writable",
            vec![RawDesc::writable(b, 4).then(1), RawDesc::readable(a, 8)],
        ),
        (
            "loop",
            vec![
                RawDesc::readable(a, 8).then(1),
                RawDesc::writable(b, 4).then(0),
            ],
        ),
        (
            "address outside memory",
            vec![
                RawDesc::readable(outside, 8).then(1),
                RawDesc::writable(b, 4),
            ],
        ),
        (
            "zero-length writable",
            vec![RawDesc::readable(a, 8).then(1), RawDesc::writable(b, 0)],
        ),
        (
            "next outside the table",
            vec![RawDesc::readable(a, 8).then_index(999)],
        ),
        ("readable only", vec![RawDesc::readable(a, 8)]),
    ];
    for (what, descs) in &cases {
        let reply = dev.request_raw(descs).unwrap();
        assert_eq!(reply.used_len, 0, "{what}");
        assert!(reply.data.is_empty());
    }
    assert_eq!(toy.stats.malformed.load(Ordering::Relaxed), 6);

    // A well-formed raw chain, and the queue still works after the broken ones.
    mem.fill(b, 8, 0xff).unwrap();
    let reply = dev
        .request_raw(&[RawDesc::readable(a, 8).then(1), RawDesc::writable(b, 8)])
        .unwrap();
    assert_eq!(reply.used_len, 4);
    assert_eq!(
        mem.read(b, 8).unwrap(),
        [0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0]
    );
    assert_eq!(dev.request(b"ok", 4).unwrap().used_len, 4);
    assert_eq!(dev.requestq().num_free(), 256);
}

#[test]
fn event_queue() {
    let toy = ToyServer::start();
    let mut dev = toy.connect(short_timeouts());
    assert_eq!(
        dev.eventq().in_flight(),
        256,
        "the event queue is filled at start"
    );
    assert!(dev.poll_event().unwrap().is_none());
    assert_matches!(
        dev.wait_event(Duration::from_millis(50)),
        Err(Error::WaitTimeout { queue: 1, .. })
    );
    for _ in 0..300 {
        assert_eq!(dev.request(&[TOY_EVENT_TRIGGER], 4).unwrap().used_len, 4);
        let ev = dev.wait_event(Duration::from_secs(10)).unwrap();
        assert_eq!(ev.used_len, 24);
        assert_eq!(ev.data, [TOY_EVENT_TRIGGER; 24]);
        assert_eq!(dev.eventq().in_flight(), 256, "buffers are re-posted");
    }
}

#[test]
fn two_memory_regions() {
    let toy = ToyServer::start();
    let mut dev = toy.connect(Options {
        memory: vec![
            MemoryRegion::new(0, 16 << 20),
            MemoryRegion::new(1 << 32, 16 << 20),
        ],
        ..short_timeouts()
    });
    let mem = dev.memory().clone();
    let (a, b) = ((1u64 << 32) + 0x1000, (1u64 << 32) + 0x2000);
    mem.write(a, b"high").unwrap();
    mem.fill(b, 4, 0xff).unwrap();
    let reply = dev
        .request_raw(&[RawDesc::readable(a, 4).then(1), RawDesc::writable(b, 4)])
        .unwrap();
    assert_eq!(reply.used_len, 4);
    assert_eq!(mem.read(b, 4).unwrap(), [0; 4]);
    assert_eq!(toy.stats.last.lock().unwrap().0, b"high");
}

#[test]
fn long_run_wraps_the_ring_indices() {
    let toy = ToyServer::start();
    let mut dev = toy.connect(Options {
        queue_size: 64,
        ..short_timeouts()
    });
    // Two descriptors per chain: 32 chains fill the 64 descriptors.
    let chains: Vec<Chain> = (0..32).map(|_| Chain::request(b"wrap", 4)).collect();
    let q = dev.requestq();
    let mut out = Vec::with_capacity(32);
    // 70 400 requests: the 16-bit ring indices wrap around.
    for _ in 0..2200 {
        out.clear();
        q.round_trip(&chains, WaitMode::Poll, Duration::from_secs(10), &mut out)
            .unwrap();
        assert!(out.iter().all(|c| c.used_len == 4));
    }
    assert_eq!(q.stats().completed, 70_400);
    assert_eq!(q.last_used_idx(), (70_400 % 65_536) as u16);
    assert_eq!(q.num_free(), 64);
}

#[test]
fn silent_backend_times_out_instead_of_hanging() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("silent.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let t = thread::spawn(move || {
        let (sock, _) = listener.accept().unwrap();
        // Accept, never answer; hold the socket until the test is done (bounded).
        let _ = done_rx.recv_timeout(Duration::from_secs(10));
        drop(sock);
    });
    let mut conn =
        Connection::connect(&path, Duration::from_secs(5), Duration::from_millis(200), 2).unwrap();
    let start = Instant::now();
    assert_matches!(
        conn.get_features(),
        Err(Error::Timeout {
            op: "GET_FEATURES",
            ..
        })
    );
    assert!(start.elapsed() < Duration::from_secs(2));
    // The connection is shut down: later requests fail at once.
    assert_matches!(conn.set_owner(), Err(Error::Vhost { .. }));
    done_tx.send(()).unwrap();
    t.join().unwrap();

    // Nobody listening at all: a bounded retry, then an error.
    let start = Instant::now();
    assert_matches!(
        Connection::connect(
            dir.path().join("nobody.sock"),
            Duration::from_millis(100),
            Duration::from_secs(1),
            2
        ),
        Err(Error::Connect { .. })
    );
    assert!(start.elapsed() < Duration::from_secs(2));
}

#[test]
fn raw_frontend_odd_sequences() {
    use vhost::VhostBackend;
    let toy = ToyServer::start();
    // Disconnect mid-handshake, then a full device on the next connection.
    {
        let mut conn =
            Connection::connect(&toy.path, Duration::from_secs(5), Duration::from_secs(5), 2)
                .unwrap();
        conn.get_features().unwrap();
        conn.call("SET_OWNER", |f| f.set_owner()).unwrap();
    }
    let mut dev = toy.connect(short_timeouts());
    // A kick with nothing posted is harmless; so is posting without kicking, then kicking.
    dev.requestq().kick().unwrap();
    let token = dev.requestq().post(b"late kick", 4).unwrap();
    dev.requestq().kick().unwrap();
    let c = dev
        .requestq()
        .wait(WaitMode::Poll, Duration::from_secs(10))
        .unwrap();
    assert_eq!((c.token, c.used_len), (token, 4));
    // A second SET_OWNER on the same connection is refused by the backend.
    assert_matches!(
        dev.connection().set_owner(),
        Err(Error::Vhost {
            op: "SET_OWNER",
            ..
        })
    );
}

/// Not a benchmark: a quick throughput figure of the toy with busy-poll reaping.
/// `cargo test --release -p vhost-iommu-testkit --test selftest -- --ignored --nocapture throughput`
#[test]
#[ignore]
fn throughput() {
    let toy = ToyServer::start();
    let mut dev = toy.connect(short_timeouts());
    let req = [0u8; 24];
    for k in [1usize, 2, 16, 64] {
        let chains: Vec<Chain> = (0..k).map(|_| Chain::request(&req, 4)).collect();
        let q = dev.requestq();
        let mut out = Vec::with_capacity(k);
        for _ in 0..1000 {
            out.clear();
            q.round_trip(&chains, WaitMode::Spin, Duration::from_secs(10), &mut out)
                .unwrap();
        }
        let (kicks0, supp0) = (q.stats().kicks, q.stats().kicks_suppressed);
        let start = Instant::now();
        let (mut n, mut batches, mut rtt) = (0u64, 0u64, Duration::ZERO);
        while start.elapsed() < Duration::from_secs(2) {
            out.clear();
            rtt += q
                .round_trip(&chains, WaitMode::Spin, Duration::from_secs(10), &mut out)
                .unwrap();
            n += k as u64;
            batches += 1;
        }
        let secs = start.elapsed().as_secs_f64();
        println!(
            "{k:>2} per kick: {:>9.0} req/s, batch RTT {:>6.2} us, kicks {} suppressed {}",
            n as f64 / secs,
            rtt.as_secs_f64() * 1e6 / batches as f64,
            q.stats().kicks - kicks0,
            q.stats().kicks_suppressed - supp0,
        );
    }
}
