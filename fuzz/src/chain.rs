// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Target `chain`: hostile descriptor chains through the daemon's request path, on real guest
//! memory.
//!
//! Guest memory is two 64 KiB regions with a 64 KiB hole between them. The input picks a daemon
//! configuration, the negotiated features, the queue size, ring addresses and indices, then a
//! sequence of [`Cmd`]s: chains the harness lays out (buffers, indirect tables) from
//! requests or raw bytes, raw descriptor / ring / memory writes, kicks that run the daemon's
//! own queue processing (`VhostUserBackend::handle_event`, as the vhost-user worker does),
//! direct `Device::process_chain` calls, translations that queue faults, event buffers,
//! config accesses and resets.
//!
//! Checked: no panic; a used length is 0 or the chain's whole writable size (never more, at
//! most `MAX_WRITABLE`), and then its last 4 bytes are a valid tail; the device writes guest
//! memory only inside the chain's device-writable buffers (and the used ring); event buffers
//! are used with 0 or 24 bytes and hold a well-formed fault record; config reads return the
//! size asked for.

use std::sync::{Arc, OnceLock};

use arbitrary::{Arbitrary, Unstructured};
use ownership::{Access, Requester};
use vhost_device_iommu::{
    device::Device,
    dirty::GuestMemory,
    engine::MAX_WRITABLE,
    vhost_user::IommuBackend,
    config::{Cli, Command, DaemonConfig, F_RING_EVENT_IDX, F_RING_INDIRECT_DESC},
};
use vhost_iommu_testkit::{
    VRING_DESC_F_INDIRECT as F_INDIRECT, VRING_DESC_F_NEXT as F_NEXT, VRING_DESC_F_WRITE as F_WRITE,
};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio::{
    FaultRecord, Status, EVENT_QUEUE, FAULT_SIZE, F_BYPASS_CONFIG, F_MAP_UNMAP, F_MMIO, F_PROBE,
    REQUEST_QUEUE, TAIL_SIZE,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;

use crate::enc::{Blob, Enc};
use crate::types::{Addr, Id, ReqBytes};
use crate::{enc_enum, enc_struct};

/// Guest memory: region 0 at 0, a hole, region 1.
pub const R0: (u64, u64) = (0, 0x1_0000);
pub const R1: (u64, u64) = (0x2_0000, 0x1_0000);
const MEM_END: u64 = R1.0 + R1.1;
/// Default ring addresses (request queue, then event queue), all in region 0.
const DESC: u64 = 0x0000;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const EV_DESC: u64 = 0x3000;
const EV_AVAIL: u64 = 0x3800;
const EV_USED: u64 = 0x3a00;
const EV_SIZE: u16 = 16;
/// Event buffers: 64 bytes per descriptor slot, below the data area.
const EV_BUFS: u64 = 0x3c00;
/// Largest request queue.
pub const MAX_QUEUE: u16 = 256;
/// Buffers the harness lays out go here, then into region 1.
const DATA: u64 = 0x4000;

/// The daemon configurations the input picks from.
#[rustfmt::skip]
pub const CONFIGS: &[&[&str]] = &[
    // Defaults but for the endpoints (PCI bus 0's 256, MSI region, 48-bit input range), a
    // 2-function group, MMIO, a reserved region on one endpoint. Every run builds a fresh
    // device: the default 65,536 endpoints would cost tens of milliseconds each time, and
    // page-table memory is capped at a few MiB in every configuration for the same reason
    // (the arena is allocated up front, and AddressSanitizer pays for its size on every run:
    // 256 MiB, the default, costs ~10 ms).
    &[
        "--poll-us", "0", "--queue-size", "256", "--endpoints", "00:00.0-00:1f.7",
        "--group", "00:06.0,00:06.1", "--mmio", "--reserved", "0x100000-0x10ffff@00:05.0",
        "--max-table-mib", "2",
    ],
    // 64 KiB pages, input and domain ranges not starting at 0, tight limits (NOMEM), a
    // small PROBE area, bypass on, a small fault backlog.
    &[
        "--poll-us", "0", "--queue-size", "256", "--endpoints", "1-8", "--group", "2-4",
        "--page-size-mask", "0x10000", "--input-range", "0x10000-0xffffffffff",
        "--domain-range", "1-4", "--max-domains", "2", "--max-mappings", "8",
        "--max-mappings-per-domain", "4", "--max-table-mib", "1", "--probe-size", "52",
        "--bypass", "--fault-backlog", "2", "--no-msi-region",
        "--reserved", "0x40000-0x4ffff:msi",
    ],
    // PROBE area of 0 bytes, no regions, polling on for 1 us.
    &[
        "--poll-us", "1", "--queue-size", "256", "--probe-size", "0", "--no-msi-region",
        "--endpoints", "0-15", "--max-table-mib", "2",
    ],
];

fn configs() -> &'static [DaemonConfig] {
    static CONFIGS_PARSED: OnceLock<Vec<DaemonConfig>> = OnceLock::new();
    CONFIGS_PARSED.get_or_init(|| CONFIGS.iter().map(|args| daemon_config(args)).collect())
}

/// A `DaemonConfig` from `serve` arguments, as the daemon builds it.
pub fn daemon_config(args: &[&str]) -> DaemonConfig {
    use clap::Parser;
    let argv = [
        "vhost-device-iommu",
        "--socket-path",
        "/nonexistent/fuzz.sock",
    ]
    .into_iter()
    .chain(args.iter().copied());
    let cli = Cli::try_parse_from(argv).expect("fuzz config parses");
    let serve = match cli.command {
        Some(Command::Serve(s)) => s,
        Some(_) => unreachable!("fuzz configs are serve arguments"),
        None => cli.serve.expect("serve arguments"),
    };
    DaemonConfig::try_from(serve).expect("fuzz config is valid")
}

/// A guest address: somewhere in a region, in the hole, at a region's end, or anything.
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub enum GAddr {
    R0(u16),
    R1(u16),
    Hole(u16),
    EndR0(u8),
    EndR1(u8),
    Raw(u64),
}
enc_enum!(GAddr, 6;
    GAddr::R0(v) => 0 [v], GAddr::R1(v) => 1 [v], GAddr::Hole(v) => 2 [v],
    GAddr::EndR0(v) => 3 [v], GAddr::EndR1(v) => 4 [v], GAddr::Raw(v) => 5 [v],
);

impl GAddr {
    pub fn get(self) -> u64 {
        match self {
            GAddr::R0(v) => R0.0 + u64::from(v),
            GAddr::R1(v) => R1.0 + u64::from(v),
            GAddr::Hole(v) => R0.0 + R0.1 + u64::from(v),
            GAddr::EndR0(v) => R0.0 + R0.1 - u64::from(v),
            GAddr::EndR1(v) => R1.0 + R1.1 - u64::from(v),
            GAddr::Raw(v) => v,
        }
    }
}

/// A descriptor length.
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DLen {
    Small(u8),
    Mid(u16),
    Raw(u32),
}
enc_enum!(DLen, 3; DLen::Small(v) => 0 [v], DLen::Mid(v) => 1 [v], DLen::Raw(v) => 2 [v]);

impl DLen {
    pub fn get(self) -> u32 {
        match self {
            DLen::Small(v) => u32::from(v),
            DLen::Mid(v) => u32::from(v),
            DLen::Raw(v) => v,
        }
    }
}

/// The size of a device-writable buffer the harness allocates.
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub enum WLen {
    /// The 4-byte tail.
    Tail,
    /// probe_size + 4.
    Probe,
    Small(u8),
    Big(u16),
}
enc_enum!(WLen, 4;
    WLen::Tail => 0 [], WLen::Probe => 1 [], WLen::Small(v) => 2 [v], WLen::Big(v) => 3 [v],
);

/// One descriptor of a chain the harness lays out.
#[derive(Arbitrary, Clone, Debug, PartialEq, Eq)]
pub enum Part {
    /// Device-readable: a request.
    Request(ReqBytes),
    /// Device-readable: any bytes.
    Bytes(Blob),
    /// Device-writable, allocated by the harness.
    Writable(WLen),
    /// Any buffer, any flags (NEXT is managed by the harness).
    Raw { addr: GAddr, len: DLen, write: bool },
}
enc_enum!(Part, 4;
    Part::Request(r) => 0 [r], Part::Bytes(b) => 1 [b], Part::Writable(w) => 2 [w],
    Part::Raw { addr, len, write } => 3 [addr, len, write],
);

/// Up to 8 parts: a count byte, then the parts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Parts(pub Vec<Part>);

impl<'a> Arbitrary<'a> for Parts {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let n = u8::arbitrary(u)? % 9;
        let mut parts = Vec::new();
        for _ in 0..n {
            if u.is_empty() {
                break;
            }
            parts.push(Part::arbitrary(u)?);
        }
        Ok(Parts(parts))
    }
}

impl Enc for Parts {
    fn enc(&self, out: &mut Vec<u8>) {
        assert!(self.0.len() <= 8);
        (self.0.len() as u8).enc(out);
        for p in &self.0 {
            p.enc(out);
        }
    }
}

/// How a chain's descriptors are reached from the ring.
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// In the descriptor table, linked with NEXT.
    Direct,
    /// In an indirect table that one ring descriptor points to.
    Indirect,
    /// Indirect, with NEXT also set on the ring descriptor (the spec forbids it).
    IndirectNext,
    /// The first part direct, the rest in an indirect table chained after it (forbidden too).
    Mixed,
}
enc_enum!(Layout, 4;
    Layout::Direct => 0 [], Layout::Indirect => 1 [], Layout::IndirectNext => 2 [],
    Layout::Mixed => 3 [],
);

#[derive(Arbitrary, Clone, Debug, PartialEq, Eq)]
pub enum Cmd {
    /// Lays out a chain and makes it available (does not kick).
    Chain { layout: Layout, parts: Parts },
    /// Writes one raw descriptor into the table (`slot` modulo the queue size).
    Desc {
        slot: u16,
        addr: GAddr,
        len: DLen,
        flags: u16,
        next: u16,
    },
    /// Writes one raw avail ring entry.
    AvailEntry { pos: u16, head: u16 },
    /// Moves the avail index by `delta` (the driver's claim of how many chains it added).
    AvailIdx { delta: u16 },
    /// Writes 8 bytes anywhere.
    Poke { at: GAddr, value: u64 },
    /// The vhost-user kick: the daemon processes the request queue itself.
    Kick,
    /// The harness pops up to `n` chains and hands each to `Device::process_chain`.
    Direct { n: u8 },
    /// A DMA master translates for an endpoint (faults go to the event queue backlog).
    Translate {
        endpoint: Id,
        iova: Addr,
        write: bool,
    },
    /// Posts an event buffer (writable parts of these sizes) and kicks the event queue.
    Event { lens: [u8; 3], readable_first: bool },
    /// VHOST_USER_SET_CONFIG.
    SetConfig { offset: u8, data: Blob },
    /// VHOST_USER_GET_CONFIG.
    GetConfig { offset: u8, size: u8 },
    /// RESET_DEVICE, or GET_VRING_BASE on the request queue.
    Reset { stop_vring: bool },
    /// The frontend disconnects and the next one starts again (same rings).
    Disconnect,
}
enc_enum!(Cmd, 13;
    Cmd::Chain { layout, parts } => 0 [layout, parts],
    Cmd::Desc { slot, addr, len, flags, next } => 1 [slot, addr, len, flags, next],
    Cmd::AvailEntry { pos, head } => 2 [pos, head],
    Cmd::AvailIdx { delta } => 3 [delta],
    Cmd::Poke { at, value } => 4 [at, value],
    Cmd::Kick => 5 [],
    Cmd::Direct { n } => 6 [n],
    Cmd::Translate { endpoint, iova, write } => 7 [endpoint, iova, write],
    Cmd::Event { lens, readable_first } => 8 [lens, readable_first],
    Cmd::SetConfig { offset, data } => 9 [offset, data],
    Cmd::GetConfig { offset, size } => 10 [offset, size],
    Cmd::Reset { stop_vring } => 11 [stop_vring],
    Cmd::Disconnect => 12 [],
);

/// Ring addresses other than the defaults.
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rings {
    pub desc: GAddr,
    pub avail: GAddr,
    pub used: GAddr,
}
enc_struct!(Rings; desc, avail, used);

/// The device and queue set-up.
#[derive(Arbitrary, Clone, Debug, PartialEq, Eq)]
pub struct Setup {
    /// Index into [`CONFIGS`].
    pub config: u8,
    /// Offered feature bits the driver does *not* acknowledge (bit i: MAP_UNMAP, PROBE, MMIO,
    /// BYPASS_CONFIG, INDIRECT_DESC, EVENT_IDX).
    pub refuse: u8,
    /// Queue size 2^(n % 9).
    pub size_log2: u8,
    pub rings: Option<Rings>,
    /// Initial next_avail / next_used (and avail idx): exercises index wrap-around.
    pub start_index: u16,
}
enc_struct!(Setup; config, refuse, size_log2, rings, start_index);

/// A whole input: set-up, then commands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Input {
    pub setup: Setup,
    pub cmds: Vec<Cmd>,
}

impl Input {
    pub fn decode(data: &[u8]) -> Option<Input> {
        let mut u = Unstructured::new(data);
        let setup = Setup::arbitrary(&mut u).ok()?;
        let mut cmds = Vec::new();
        while !u.is_empty() && cmds.len() < 64 {
            match Cmd::arbitrary(&mut u) {
                Ok(c) => cmds.push(c),
                Err(_) => break,
            }
        }
        Some(Input { setup, cmds })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.setup.enc(&mut out);
        for c in &self.cmds {
            c.enc(&mut out);
        }
        out
    }
}

/// Runs one fuzz input.
pub fn run(data: &[u8]) {
    if let Some(input) = Input::decode(data) {
        run_input(&input);
    }
}

/// Runs one input; returns the device, for its counters.
pub fn run_input(input: &Input) -> Arc<Device> {
    let mut h = Harness::new(&input.setup);
    h.run(&input.cmds);
    h.device.clone()
}

/// A chain as the device will see it.
struct Seen {
    head: u16,
    writable: u64,
    /// Device-writable buffers, in order.
    writes: Vec<(u64, u64)>,
}

pub struct Harness {
    mem: GuestMemory,
    device: Arc<Device>,
    backend: IommuBackend,
    vrings: Vec<VringRwLock<GuestMemoryAtomic<GuestMemory>>>,
    features: u64,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    /// The avail index the driver has published.
    avail_idx: u16,
    /// Next free descriptor slot.
    slot: u16,
    /// Next free byte of the data area.
    cursor: u64,
    probe_size: u32,
    ev_avail_idx: u16,
    ev_slot: u16,
    /// Descriptors of each event chain the device has not used yet, oldest first.
    ev_outstanding: std::collections::VecDeque<u16>,
    ev_used: u16,
}

impl Harness {
    pub fn new(setup: &Setup) -> Harness {
        let config = &configs()[usize::from(setup.config) % CONFIGS.len()];
        let mem = GuestMemory::from_ranges(&[
            (GuestAddress(R0.0), R0.1 as usize),
            (GuestAddress(R1.0), R1.1 as usize),
        ])
        .expect("guest memory");
        let atomic = GuestMemoryAtomic::new(mem.clone());
        let device = Device::new(config).expect("device");
        let backend = IommuBackend::new(device.clone()).expect("backend");
        backend
            .update_memory(atomic.clone())
            .expect("update_memory");

        let refusable = [
            F_MAP_UNMAP,
            F_PROBE,
            F_MMIO,
            F_BYPASS_CONFIG,
            F_RING_INDIRECT_DESC,
            F_RING_EVENT_IDX,
        ];
        let mut features = device.offered_features();
        for (i, f) in refusable.iter().enumerate() {
            if setup.refuse & (1 << i) != 0 {
                features &= !f;
            }
        }
        backend.acked_features(features);
        let event_idx = features & F_RING_EVENT_IDX != 0;
        backend.set_event_idx(event_idx);

        let size = 1u16 << (setup.size_log2 % 9);
        let (desc, avail, used) = match setup.rings {
            None => (DESC, AVAIL, USED),
            Some(r) => (r.desc.get(), r.avail.get(), r.used.get()),
        };
        let vrings: Vec<_> = [MAX_QUEUE, EV_SIZE]
            .into_iter()
            .map(|max| VringRwLock::new(atomic.clone(), max).expect("vring"))
            .collect();
        let rq = &vrings[usize::from(REQUEST_QUEUE)];
        rq.set_queue_size(size);
        // Misaligned ring addresses are refused: the queue keeps its defaults, as a frontend
        // would have failed SET_VRING_ADDR.
        let _ = rq.set_queue_info(desc, avail, used);
        rq.set_queue_next_avail(setup.start_index);
        rq.set_queue_next_used(setup.start_index);
        rq.set_queue_event_idx(event_idx);
        rq.set_queue_ready(true);
        rq.set_enabled(true);
        let eq = &vrings[usize::from(EVENT_QUEUE)];
        eq.set_queue_size(EV_SIZE);
        eq.set_queue_info(EV_DESC, EV_AVAIL, EV_USED)
            .expect("event queue addresses");
        eq.set_queue_event_idx(event_idx);
        eq.set_queue_ready(true);
        eq.set_enabled(true);
        let (desc, avail, used) = {
            let state = rq.get_ref();
            let q = state.get_queue();
            (q.desc_table(), q.avail_ring(), q.used_ring())
        };

        let h = Harness {
            mem,
            device,
            backend,
            vrings,
            features,
            size,
            desc,
            avail,
            used,
            avail_idx: setup.start_index,
            slot: 0,
            cursor: DATA,
            probe_size: config.config.probe_size,
            ev_avail_idx: 0,
            ev_slot: 0,
            ev_outstanding: Default::default(),
            ev_used: 0,
        };
        let _ = h.mem.write_obj(
            setup.start_index.to_le(),
            GuestAddress(avail.wrapping_add(2)),
        );
        let _ = h.mem.write_obj(
            setup.start_index.to_le(),
            GuestAddress(used.wrapping_add(2)),
        );
        h
    }

    pub fn run(&mut self, cmds: &[Cmd]) {
        for cmd in cmds {
            self.step(cmd);
        }
        // Whatever was left, the daemon's own processing runs once more.
        self.kick();
    }

    fn step(&mut self, cmd: &Cmd) {
        match cmd {
            Cmd::Chain { layout, parts } => self.chain(*layout, &parts.0),
            Cmd::Desc {
                slot,
                addr,
                len,
                flags,
                next,
            } => {
                let at = self.desc.wrapping_add(16 * u64::from(slot % self.size));
                self.write_desc(at, addr.get(), len.get(), *flags, *next);
            }
            Cmd::AvailEntry { pos, head } => {
                let at = self.avail.wrapping_add(4 + 2 * u64::from(pos % self.size));
                let _ = self.mem.write_obj(head.to_le(), GuestAddress(at));
            }
            Cmd::AvailIdx { delta } => {
                self.avail_idx = self.avail_idx.wrapping_add(*delta);
                self.publish();
            }
            Cmd::Poke { at, value } => {
                let _ = self.mem.write_obj(value.to_le(), GuestAddress(at.get()));
            }
            Cmd::Kick => self.kick(),
            Cmd::Direct { n } => self.direct(*n),
            Cmd::Translate {
                endpoint,
                iova,
                write,
            } => self.translate(endpoint.get(), iova.get(4096), *write),
            Cmd::Event {
                lens,
                readable_first,
            } => self.event(lens, *readable_first),
            Cmd::SetConfig { offset, data } => {
                let _ = self.backend.set_config(u32::from(*offset), &data.0);
            }
            Cmd::GetConfig { offset, size } => {
                let got = self
                    .backend
                    .get_config(u32::from(*offset), u32::from(*size));
                assert_eq!(got.len(), usize::from(*size), "GET_CONFIG size");
            }
            Cmd::Reset { stop_vring } => {
                if *stop_vring {
                    let _ = self.backend.stop_vring(u32::from(REQUEST_QUEUE));
                } else {
                    self.backend.reset_device();
                }
            }
            Cmd::Disconnect => {
                self.backend.exit();
                self.device.disconnected();
                let backend = IommuBackend::new(self.device.clone()).expect("backend");
                backend
                    .update_memory(GuestMemoryAtomic::new(self.mem.clone()))
                    .expect("update_memory");
                backend.acked_features(self.features);
                backend.set_event_idx(self.features & F_RING_EVENT_IDX != 0);
                self.backend = backend;
            }
        }
    }

    /// The address of a descriptor table slot.
    fn slot_addr(&self, slot: u16) -> u64 {
        self.desc.wrapping_add(16 * u64::from(slot))
    }

    fn write_desc(&self, at: u64, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        let _ = self.mem.write_slice(&d, GuestAddress(at));
    }

    /// Allocates `len` bytes of the data area (wrapping around), or None if it cannot fit.
    fn alloc(&mut self, len: u64) -> Option<u64> {
        let len = len.max(1);
        if len > R1.1 {
            return None;
        }
        for _ in 0..3 {
            let end = if self.cursor < R1.0 {
                R0.0 + R0.1
            } else {
                MEM_END
            };
            if self.cursor + len <= end {
                let at = self.cursor;
                self.cursor += len;
                return Some(at);
            }
            self.cursor = if self.cursor < R1.0 { R1.0 } else { DATA };
        }
        None
    }

    /// A buffer holding `bytes`.
    fn buffer(&mut self, bytes: &[u8]) -> (u64, u32) {
        match self.alloc(bytes.len() as u64) {
            Some(at) => {
                let _ = self.mem.write_slice(bytes, GuestAddress(at));
                (at, bytes.len() as u32)
            }
            None => (DATA, 0),
        }
    }

    fn chain(&mut self, layout: Layout, parts: &[Part]) {
        // Lay out the buffers: (addr, len, flags without NEXT).
        let mut descs = Vec::new();
        for part in parts {
            let d = match part {
                Part::Request(r) => {
                    let (a, l) = self.buffer(&r.bytes());
                    (a, l, 0)
                }
                Part::Bytes(b) => {
                    let (a, l) = self.buffer(&b.0);
                    (a, l, 0)
                }
                Part::Writable(w) => {
                    let len = match w {
                        WLen::Tail => TAIL_SIZE as u64,
                        WLen::Probe => u64::from(self.probe_size) + TAIL_SIZE as u64,
                        WLen::Small(n) => u64::from(*n),
                        WLen::Big(n) => u64::from(*n) % 0x8000,
                    };
                    // Fill with a marker so that untouched bytes show.
                    match self.alloc(len) {
                        Some(at) => {
                            let _ = self
                                .mem
                                .write_slice(&vec![0xee; len as usize], GuestAddress(at));
                            (at, len as u32, F_WRITE)
                        }
                        None => (DATA, 0, F_WRITE),
                    }
                }
                Part::Raw { addr, len, write } => {
                    (addr.get(), len.get(), if *write { F_WRITE } else { 0 })
                }
            };
            descs.push(d);
        }
        if descs.is_empty() {
            // A chain with no buffer: a lone zero-length descriptor.
            descs.push((DATA, 0, 0));
        }
        let head = self.slot % self.size;
        match layout {
            Layout::Direct => {
                let n = descs.len();
                for (i, (addr, len, flags)) in descs.into_iter().enumerate() {
                    let slot = (self.slot + i as u16) % self.size;
                    let next = (slot + 1) % self.size;
                    let flags = if i + 1 < n { flags | F_NEXT } else { flags };
                    self.write_desc(self.slot_addr(slot), addr, len, flags, next);
                }
                self.slot = self.slot.wrapping_add(n as u16) % self.size;
            }
            Layout::Indirect | Layout::IndirectNext => {
                let table = self.indirect_table(&descs);
                let flags = if layout == Layout::IndirectNext {
                    F_INDIRECT | F_NEXT
                } else {
                    F_INDIRECT
                };
                let next = (head + 1) % self.size;
                self.write_desc(self.slot_addr(head), table.0, table.1, flags, next);
                self.slot = (head + 1) % self.size;
            }
            Layout::Mixed => {
                let (addr, len, flags) = descs[0];
                let next = (head + 1) % self.size;
                let rest = if descs.len() > 1 {
                    &descs[1..]
                } else {
                    &descs[..]
                };
                let table = self.indirect_table(rest);
                self.write_desc(self.slot_addr(head), addr, len, flags | F_NEXT, next);
                self.write_desc(self.slot_addr(next), table.0, table.1, F_INDIRECT, 0);
                self.slot = (head + 2) % self.size;
            }
        }
        let entry = self
            .avail
            .wrapping_add(4 + 2 * u64::from(self.avail_idx % self.size));
        let _ = self.mem.write_obj(head.to_le(), GuestAddress(entry));
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.publish();
    }

    fn indirect_table(&mut self, descs: &[(u64, u32, u16)]) -> (u64, u32) {
        let n = descs.len();
        let Some(table) = self.alloc(16 * n as u64) else {
            return (DATA, 0);
        };
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let flags = if i + 1 < n { flags | F_NEXT } else { flags };
            self.write_desc(table + 16 * i as u64, addr, len, flags, i as u16 + 1);
        }
        (table, 16 * n as u32)
    }

    fn publish(&self) {
        let _ = self.mem.write_obj(
            self.avail_idx.to_le(),
            GuestAddress(self.avail.wrapping_add(2)),
        );
    }

    fn rq(&self) -> &VringRwLock<GuestMemoryAtomic<GuestMemory>> {
        &self.vrings[usize::from(REQUEST_QUEUE)]
    }

    /// The chains the device will pop next, as a copy of the queue sees them.
    fn predict(&self) -> Vec<Seen> {
        let state = self.rq().get_ref().get_queue().state();
        let Ok(mut q) = Queue::try_from(state) else {
            return Vec::new();
        };
        let mut seen = Vec::new();
        while let Some(chain) = q.pop_descriptor_chain(&self.mem) {
            seen.push(self.seen(chain));
            if seen.len() > usize::from(self.size) {
                break;
            }
        }
        seen
    }

    fn seen<M>(&self, chain: virtio_queue::DescriptorChain<M>) -> Seen
    where
        M: std::ops::Deref<Target = GuestMemory>,
    {
        let head = chain.head_index();
        let mut writes = Vec::new();
        let mut writable = 0u64;
        for d in chain {
            if d.is_write_only() {
                writes.push((d.addr().0, u64::from(d.len())));
                writable += u64::from(d.len());
            }
        }
        Seen {
            head,
            writable,
            writes,
        }
    }

    fn snapshot(&self) -> Vec<u8> {
        let mut buf = vec![0u8; (R0.1 + R1.1) as usize];
        let (a, b) = buf.split_at_mut(R0.1 as usize);
        self.mem
            .read_slice(a, GuestAddress(R0.0))
            .expect("region 0");
        self.mem
            .read_slice(b, GuestAddress(R1.0))
            .expect("region 1");
        buf
    }

    /// The guest address of snapshot byte `i`.
    fn gpa(i: usize) -> u64 {
        let i = i as u64;
        if i < R0.1 {
            R0.0 + i
        } else {
            R1.0 + i - R0.1
        }
    }

    /// Checks that every byte that changed lies in one of `allowed`.
    fn check_writes(before: &[u8], after: &[u8], allowed: &[(u64, u64)], what: &str) {
        const CHUNK: usize = 256;
        for (c, (a, b)) in before.chunks(CHUNK).zip(after.chunks(CHUNK)).enumerate() {
            if a == b {
                continue;
            }
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                if x == y {
                    continue;
                }
                let gpa = Self::gpa(c * CHUNK + i);
                assert!(
                    allowed.iter().any(|&(s, l)| gpa >= s && gpa - s < l),
                    "{what}: the device wrote {gpa:#x} ({x:#04x} -> {y:#04x}), outside {allowed:x?}"
                );
            }
        }
    }

    /// Reads `n` bytes at offset `at` of the writable area `writes`.
    fn read_area(&self, writes: &[(u64, u64)], mut at: u64, n: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for &(addr, len) in writes {
            if out.len() == n {
                break;
            }
            if at >= len {
                at -= len;
                continue;
            }
            let take = (len - at).min((n - out.len()) as u64) as usize;
            let mut buf = vec![0u8; take];
            self.mem
                .read_slice(&mut buf, GuestAddress(addr.wrapping_add(at)))
                .expect("written area is readable");
            out.extend_from_slice(&buf);
            at = 0;
        }
        out
    }

    /// A used length is 0 or the whole writable area, whose last 4 bytes are then a tail.
    fn check_used(&self, seen: &Seen, used: u32) {
        assert!(
            u64::from(used) <= seen.writable,
            "used length {used} > {} writable bytes",
            seen.writable
        );
        assert!(used as usize <= MAX_WRITABLE, "used length {used}");
        if used == 0 {
            return;
        }
        assert_eq!(u64::from(used), seen.writable, "partial used length");
        assert!(
            used as usize >= TAIL_SIZE,
            "used length {used} without a tail"
        );
        let tail = self.read_area(&seen.writes, u64::from(used) - TAIL_SIZE as u64, TAIL_SIZE);
        assert!(
            Status::try_from(tail[0]).is_ok() && tail[1..] == [0, 0, 0],
            "bad tail {tail:?}"
        );
    }

    /// The vhost-user worker's path: `handle_event` on the request queue.
    fn kick(&mut self) {
        let seen = self.predict();
        if seen.is_empty() {
            self.backend
                .handle_event(REQUEST_QUEUE, EventSet::IN, &self.vrings, 0)
                .expect("handle_event");
            return;
        }
        let size = u64::from(self.size);
        let overlaps = |a: &(u64, u64), b: &(u64, u64)| {
            a.1 > 0 && b.1 > 0 && a.0 < b.0.saturating_add(b.1) && b.0 < a.0.saturating_add(a.1)
        };
        let used_ring = (self.used, 6 + 8 * size);
        let writes: Vec<(u64, u64)> = seen.iter().flat_map(|s| s.writes.clone()).collect();
        let mut tables = vec![(self.desc, 16 * size)];
        tables.extend(self.indirect_tables());
        // The checks below hold when the chains cannot change under the device: no writable
        // buffer covers a descriptor table (direct or indirect), a ring or another buffer, and
        // the used ring (the device writes its flags, entries and avail_event) covers no
        // descriptor table nor the avail ring.
        let clean = !overlaps(&used_ring, &(self.avail, 6 + 2 * size))
            && !tables.iter().any(|t| overlaps(&used_ring, t))
            && writes.iter().enumerate().all(|(i, w)| {
                !tables.iter().any(|t| overlaps(w, t))
                    && !overlaps(w, &(self.avail, 6 + 2 * size))
                    && !overlaps(w, &used_ring)
                    && !writes[i + 1..].iter().any(|v| overlaps(w, v))
            });
        let before = self.snapshot();
        let used_before = self.rq().get_ref().get_queue().next_used();
        self.backend
            .handle_event(REQUEST_QUEUE, EventSet::IN, &self.vrings, 0)
            .expect("handle_event");
        let used_after = self.rq().get_ref().get_queue().next_used();
        let after = self.snapshot();

        let added = used_after.wrapping_sub(used_before);
        let valid: Vec<&Seen> = seen.iter().filter(|s| s.head < self.size).collect();
        if !clean || usize::from(added) != valid.len() {
            return;
        }
        let mut allowed = writes.clone();
        allowed.push(used_ring);
        Self::check_writes(&before, &after, &allowed, "kick");
        for (k, s) in valid.iter().enumerate() {
            let slot = u64::from(used_before.wrapping_add(k as u16) % self.size);
            let at = self.used.wrapping_add(4 + 8 * slot);
            let id: u32 = self.mem.read_obj(GuestAddress(at)).expect("used ring");
            let len: u32 = self
                .mem
                .read_obj(GuestAddress(at.wrapping_add(4)))
                .expect("used ring");
            assert_eq!(id, u32::from(s.head), "used ring entry {k}");
            self.check_used(s, len);
        }
    }

    /// Indirect tables reachable from the descriptor table (raw walk).
    fn indirect_tables(&self) -> Vec<(u64, u64)> {
        let mut table = vec![0u8; 16 * usize::from(self.size)];
        if self
            .mem
            .read_slice(&mut table, GuestAddress(self.desc))
            .is_err()
        {
            return Vec::new();
        }
        table
            .chunks_exact(16)
            .filter(|d| u16::from_le_bytes([d[12], d[13]]) & F_INDIRECT != 0)
            .map(|d| {
                let addr = u64::from_le_bytes(d[..8].try_into().expect("8 bytes"));
                let len = u32::from_le_bytes(d[8..12].try_into().expect("4 bytes"));
                (addr, u64::from(len))
            })
            .collect()
    }

    /// The harness's own loop: pop, `Device::process_chain`, add_used.
    fn direct(&mut self, n: u8) {
        let rq = &self.vrings[usize::from(REQUEST_QUEUE)];
        for _ in 0..n.max(1) {
            let chain = {
                let mut state = rq.get_mut();
                state.get_queue_mut().pop_descriptor_chain(&self.mem)
            };
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            let seen = self.seen(chain.clone());
            let before = self.snapshot();
            let used = self.device.process_chain(&self.mem, chain);
            let after = self.snapshot();
            Self::check_writes(&before, &after, &seen.writes, "process_chain");
            self.check_used(&seen, used);
            let _ = rq.add_used(head, used);
        }
    }

    fn translate(&mut self, endpoint: u32, iova: u64, write: bool) {
        // The VMM's own devices: DMA-API users of the endpoints they translate for.
        let _ = self.device.iommu().use_dma_api(endpoint);
        let service = self.device.translation_service();
        let access = if write { Access::Write } else { Access::Read };
        let _ = service.translate(Requester::DmaApi, endpoint, iova, 4096, access);
    }

    /// Posts one event buffer and kicks the event queue. The harness drives the event queue
    /// as a well-behaved driver (descriptors reused only once used, one 64-byte buffer per
    /// descriptor slot); hostile rings are the request queue's business.
    fn event(&mut self, lens: &[u8; 3], readable_first: bool) {
        let eq = &self.vrings[usize::from(EVENT_QUEUE)];
        let used_now = eq.get_ref().get_queue().next_used();
        for _ in 0..used_now.wrapping_sub(self.ev_used) {
            self.ev_outstanding.pop_front();
        }
        self.ev_used = used_now;
        let mut descs = Vec::new();
        if readable_first {
            descs.push((DATA, 8u32, 0u16));
        }
        for &l in lens.iter().filter(|&&l| l > 0) {
            descs.push((0, u32::from(l % 64), F_WRITE));
        }
        let n = descs.len() as u16;
        let busy: u16 = self.ev_outstanding.iter().sum();
        if n > 0 && busy + n <= EV_SIZE {
            let head = self.ev_slot;
            for (i, (addr, len, flags)) in descs.into_iter().enumerate() {
                let slot = (self.ev_slot + i as u16) % EV_SIZE;
                let addr = if flags & F_WRITE != 0 {
                    EV_BUFS + 64 * u64::from(slot)
                } else {
                    addr
                };
                let flags = if i + 1 < usize::from(n) {
                    flags | F_NEXT
                } else {
                    flags
                };
                let next = (slot + 1) % EV_SIZE;
                self.write_desc(EV_DESC + 16 * u64::from(slot), addr, len, flags, next);
            }
            self.ev_slot = (self.ev_slot + n) % EV_SIZE;
            self.ev_outstanding.push_back(n);
            let entry = EV_AVAIL + 4 + 2 * u64::from(self.ev_avail_idx % EV_SIZE);
            let _ = self.mem.write_obj(head.to_le(), GuestAddress(entry));
            self.ev_avail_idx = self.ev_avail_idx.wrapping_add(1);
            let _ = self
                .mem
                .write_obj(self.ev_avail_idx.to_le(), GuestAddress(EV_AVAIL + 2));
        }

        let eq = &self.vrings[usize::from(EVENT_QUEUE)];
        let used_before = eq.get_ref().get_queue().next_used();
        // The fault backlog's eventfd, then the driver's kick, as the worker sees them.
        for id in [vhost_device_iommu::vhost_user::FAULT_EVENT, EVENT_QUEUE] {
            self.backend
                .handle_event(id, EventSet::IN, &self.vrings, 0)
                .expect("handle_event (eventq)");
        }
        let used_after = eq.get_ref().get_queue().next_used();
        for k in 0..used_after.wrapping_sub(used_before) {
            let at = EV_USED + 4 + 8 * u64::from(used_before.wrapping_add(k) % EV_SIZE);
            let id: u32 = self.mem.read_obj(GuestAddress(at)).expect("used ring");
            let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).expect("used ring");
            assert!(id < u32::from(EV_SIZE));
            assert!(
                len == 0 || len as usize == FAULT_SIZE,
                "event used length {len}"
            );
            if len as usize == FAULT_SIZE {
                // The record is the first 24 writable bytes of the chain at `id`.
                let mut writes = Vec::new();
                let mut slot = id as u16;
                for _ in 0..EV_SIZE {
                    let base = EV_DESC + 16 * u64::from(slot);
                    let addr: u64 = self.mem.read_obj(GuestAddress(base)).expect("desc");
                    let len: u32 = self.mem.read_obj(GuestAddress(base + 8)).expect("desc");
                    let flags: u16 = self.mem.read_obj(GuestAddress(base + 12)).expect("desc");
                    let next: u16 = self.mem.read_obj(GuestAddress(base + 14)).expect("desc");
                    if flags & F_WRITE != 0 {
                        writes.push((addr, u64::from(len)));
                    }
                    if flags & F_NEXT == 0 {
                        break;
                    }
                    slot = next % EV_SIZE;
                }
                // Buffers over the event rings themselves may have changed since: skip.
                if writes
                    .iter()
                    .any(|&(a, l)| a < 0x4000 && a.saturating_add(l) > EV_DESC)
                {
                    continue;
                }
                let bytes: [u8; FAULT_SIZE] = self
                    .read_area(&writes, 0, FAULT_SIZE)
                    .try_into()
                    .expect("24 bytes");
                let rec = FaultRecord::from_bytes(&bytes).expect("well-formed fault record");
                assert_eq!(rec.to_bytes(), bytes, "fault record not canonical");
            }
        }
    }
}
