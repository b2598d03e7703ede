// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! DMA masters in other processes: the master socket (`--master-socket`).
//!
//! A device backend linking the `vhost-iommu-client` crate connects here, gets the page
//! tables' memfd (mapped read-only on its side, see `shared.rs`) and a page of reader slots of
//! its own, takes DMA ownership of endpoints, and translates IOVAs itself. The daemon's grace
//! periods wait for its sections like for its own readers (`ownership::epoch`): no UNMAP,
//! DETACH, ATTACH elsewhere or reset is answered while a master may still use what it took
//! away. A master that keeps a section past `--master-stall-ms` is cut off: revoked in its
//! slots page (it refuses every section from then on), disconnected, counted in `stats`
//! (`masters.cut_off`). A master that goes away (its socket hangs up) leaves nothing: its
//! slots are no longer watched and every endpoint it held is released.
//!
//! The protocol is `vhost_iommu_client::wire`; every message from a master is hostile input
//! (checked there and in [`Session`]). One thread per master; at most `--max-masters`.

mod shared;

use std::{
    io::{self, Read, Write},
    os::unix::net::{UnixListener, UnixStream},
    sync::{
        atomic::{fence, AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, Weak,
    },
    thread,
    time::Duration,
};

use log::{debug, info, warn};
use ownership::{Access, EndpointId, GroupId, Remote, RemoteReaders, TranslatorSource};
use serde_json::{json, Map, Value};
use shm::Words;
use vhost_iommu_client::wire::{
    self, EndpointGrant, ErrorCode, FaultAccess, FaultReport, Reply, Request, Welcome, HEADER,
    MAX_PAYLOAD,
};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

pub use self::shared::{model, SharedTables};
use crate::{config::MastersConfig, device::Device, log_limited, translate::fault_record};

/// How long a master may take to say HELLO, and a reply may wait for the master to read it.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Endpoints one master may hold at once.
pub const MAX_HELD: usize = 64;

/// What every master connection shares.
struct Context {
    device: Arc<Device>,
    tables: Arc<SharedTables>,
    source: TranslatorSource,
    stall: Duration,
    max: usize,
    next_id: AtomicU64,
}

/// Serves the master socket on its own threads until the process ends.
pub fn spawn(
    listener: UnixListener,
    device: Arc<Device>,
    config: &MastersConfig,
) -> io::Result<thread::JoinHandle<()>> {
    let tables = device.shared_tables().cloned().ok_or_else(|| {
        io::Error::other("the model's tables are not shared (the device was built without masters)")
    })?;
    let source = device.iommu().translator_source();
    let ctx = Arc::new(Context {
        device,
        tables,
        source,
        stall: config.stall,
        max: config.max.max(1),
        next_id: AtomicU64::new(1),
    });
    thread::Builder::new()
        .name("masters".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let stream = match stream {
                    Ok(s) => s,
                    Err(e) => {
                        warn!("master socket accept: {e}");
                        continue;
                    }
                };
                let stats = &ctx.device.stats().masters;
                if stats.connected.fetch_add(1, Ordering::SeqCst) >= ctx.max as u64 {
                    stats.connected.fetch_sub(1, Ordering::SeqCst);
                    stats.refused.fetch_add(1, Ordering::Relaxed);
                    let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
                    let _ = (&stream).write_all(&Reply::Error(ErrorCode::TooMany).encode());
                    continue;
                }
                stats.served.fetch_add(1, Ordering::Relaxed);
                let ctx = ctx.clone();
                let id = ctx.next_id.fetch_add(1, Ordering::Relaxed);
                let spawned =
                    thread::Builder::new()
                        .name(format!("master-{id}"))
                        .spawn(move || {
                            serve(stream, &ctx, id);
                            ctx.device
                                .stats()
                                .masters
                                .connected
                                .fetch_sub(1, Ordering::SeqCst);
                        });
                if let Err(e) = spawned {
                    warn!("master thread: {e}");
                    stats.connected.fetch_sub(1, Ordering::SeqCst);
                }
            }
        })
}

/// Why a connection ends.
#[derive(Debug)]
enum End {
    /// The master hung up (or the socket failed).
    HangUp,
    /// A message that is not one (or not now): hostile or broken.
    Bad(String),
}

/// Reads one frame; `Ok(None)` when the master hung up between frames.
fn read_request(stream: &mut UnixStream) -> Result<Request, End> {
    let mut header = [0u8; HEADER];
    stream.read_exact(&mut header).map_err(|_| End::HangUp)?;
    let (kind, len) = wire::parse_header(&header).map_err(|e| End::Bad(e.to_string()))?;
    let mut payload = [0u8; MAX_PAYLOAD];
    let payload = &mut payload[..len.min(MAX_PAYLOAD)];
    stream.read_exact(payload).map_err(|_| End::HangUp)?;
    Request::decode(kind, payload).map_err(|e| End::Bad(e.to_string()))
}

fn send(stream: &mut UnixStream, reply: &Reply) -> Result<(), End> {
    stream.write_all(&reply.encode()).map_err(|_| End::HangUp)
}

/// A frame and a file with its first byte.
fn send_with_file(
    stream: &UnixStream,
    reply: &Reply,
    file: std::os::fd::BorrowedFd<'_>,
) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let frame = reply.encode();
    let sent = stream
        .send_with_fd(&frame[..], file.as_raw_fd())
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    if sent != frame.len() {
        return Err(io::Error::new(io::ErrorKind::WriteZero, "short frame"));
    }
    Ok(())
}

/// A master's reader slots: a page the daemon shares with it alone.
#[derive(Debug)]
struct MasterSlots {
    words: Words,
    count: usize,
    /// A clone of the connection, to shut down when the master is cut off.
    socket: UnixStream,
    id: u64,
    device: Arc<Device>,
    cut: AtomicBool,
}

impl MasterSlots {
    /// Counter `which` of the master's slots (see `wire::SLOT_TRANSLATIONS`), summed: what
    /// the master says it did, for `stats` only.
    fn counted(&self, which: usize) -> u64 {
        (0..self.count)
            .filter_map(|i| self.words.get(wire::slot_word(i) + which))
            .map(|w| w.load(Ordering::Relaxed))
            .fold(0, u64::wrapping_add)
    }

    /// Tells the master (in its page) that it may not start a section any more.
    fn revoke(&self) {
        self.words[wire::REVOKED].store(1, Ordering::SeqCst);
        // Pairs with the master's entry fence (see `ownership::RemoteTables::enter`).
        fence(Ordering::SeqCst);
    }
}

impl RemoteReaders for MasterSlots {
    fn slot_count(&self) -> usize {
        self.count
    }

    fn slot(&self, index: usize) -> Option<&AtomicU64> {
        if index < self.count {
            self.words.get(wire::slot_word(index))
        } else {
            None
        }
    }

    /// From a grace period (the model's lock may be held): nothing here blocks.
    fn cut_off(&self) {
        self.revoke();
        self.cut.store(true, Ordering::SeqCst);
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
        self.device
            .stats()
            .masters
            .cut_off
            .fetch_add(1, Ordering::Relaxed);
        warn!(
            "DMA master {} cut off: a section outlived the stall bound",
            self.id
        );
    }
}

/// A connected master as `stats` lists it: its slots (where it keeps its counters) and the
/// endpoints it holds.
#[derive(Debug)]
pub struct Listed {
    id: u64,
    slots: Arc<MasterSlots>,
    held: Mutex<Vec<Held>>,
}

const COUNTERS: [(&str, usize); 3] = [
    ("translations", wire::SLOT_TRANSLATIONS),
    ("iotlb_misses", wire::SLOT_IOTLB_MISSES),
    ("translations_refused", wire::SLOT_REFUSED),
];

/// What `stats` adds to its `masters` object when the daemon serves masters: the counters the
/// masters keep (`translations`, `iotlb_misses`, `translations_refused`; of every master, gone or
/// connected), and `list`, one entry per connected master with its own counters and the
/// endpoints it holds, each with the guest's MAP and UNMAP requests on the domain the
/// endpoint is attached to (counted since that domain was created).
pub fn stats_json(device: &Device) -> Option<Map<String, Value>> {
    let tables = device.shared_tables()?;
    let listed: Vec<Arc<Listed>> = {
        let mut listed = tables.listed.lock().unwrap_or_else(|e| e.into_inner());
        listed.retain(|l| l.strong_count() > 0);
        listed.iter().filter_map(Weak::upgrade).collect()
    };
    let stats = &device.stats().masters;
    let gone = [
        &stats.gone_translations,
        &stats.gone_iotlb_misses,
        &stats.gone_refused,
    ];
    let mut out = Map::new();
    for ((name, which), gone) in COUNTERS.iter().zip(gone) {
        let live = listed
            .iter()
            .map(|l| l.slots.counted(*which))
            .fold(0, u64::wrapping_add);
        out.insert(
            name.to_string(),
            gone.load(Ordering::Relaxed).wrapping_add(live).into(),
        );
    }
    let (domains, attachments) = {
        let iommu = device.iommu();
        let held: Vec<Held> = listed
            .iter()
            .flat_map(|l| l.held.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .collect();
        let attachments: Vec<(EndpointId, Option<u32>)> = held
            .iter()
            .map(|h| {
                let domain = iommu.group_attachment(h.group).and_then(|(d, _)| d);
                (h.endpoint, domain)
            })
            .collect();
        let domains = if held.is_empty() {
            Vec::new()
        } else {
            iommu.domains()
        };
        (domains, attachments)
    };
    let list: Vec<Value> = listed
        .iter()
        .map(|l| {
            let held = l.held.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let endpoints: Vec<Value> = held
                .iter()
                .map(|h| {
                    let domain = attachments
                        .iter()
                        .find(|(e, _)| *e == h.endpoint)
                        .and_then(|(_, d)| *d);
                    let info = domain.and_then(|d| domains.iter().find(|i| i.id == d));
                    json!({
                        "endpoint": h.endpoint,
                        "bdf": crate::config::endpoint_bdf(h.endpoint),
                        "group": h.group.0,
                        "hold": match h.hold { Hold::Owner(_) => "owner", Hold::DmaApi => "dma_api" },
                        "domain": domain,
                        "maps": info.map_or(0, |i| i.maps),
                        "unmaps": info.map_or(0, |i| i.unmaps),
                    })
                })
                .collect();
            let mut entry = json!({ "id": l.id, "slots": l.slots.count, "endpoints": endpoints });
            for (name, which) in COUNTERS {
                entry[name] = l.slots.counted(which).into();
            }
            entry
        })
        .collect();
    out.insert("list".into(), list.into());
    Some(out)
}

/// One master's connection, from HELLO to hang-up.
fn serve(mut stream: UnixStream, ctx: &Context, id: u64) {
    let stats = &ctx.device.stats().masters;
    let _ = stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
    let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
    let (slots, remote) = match handshake(&mut stream, ctx, id) {
        Ok(attached) => attached,
        Err(End::HangUp) => return,
        Err(End::Bad(why)) => {
            stats.bad_messages.fetch_add(1, Ordering::Relaxed);
            log_limited!(log::Level::Warn, "DMA master {id}: refused: {why}");
            let _ = send(&mut stream, &Reply::Error(ErrorCode::BadMessage));
            return;
        }
    };
    let _ = stream.set_read_timeout(None);
    info!("DMA master {id} connected ({} reader slots)", slots.count);
    let listed = Arc::new(Listed {
        id,
        slots: slots.clone(),
        held: Mutex::new(Vec::new()),
    });
    {
        let mut all = ctx.tables.listed.lock().unwrap_or_else(|e| e.into_inner());
        all.retain(|l| l.strong_count() > 0);
        all.push(Arc::downgrade(&listed));
    }
    let mut session = Session::new(ctx.device.clone());
    let end = loop {
        let request = match read_request(&mut stream) {
            Ok(r) => r,
            Err(end) => break end,
        };
        let holds = !matches!(request, Request::Fault(_));
        let handled = session.handle(request);
        if holds {
            *listed.held.lock().unwrap_or_else(|e| e.into_inner()) = session.held.clone();
        }
        match handled {
            Ok(Some(reply)) => {
                if let Err(end) = send(&mut stream, &reply) {
                    break end;
                }
            }
            Ok(None) => {}
            Err(why) => break End::Bad(why),
        }
    };
    if let End::Bad(why) = &end {
        stats.bad_messages.fetch_add(1, Ordering::Relaxed);
        log_limited!(log::Level::Warn, "DMA master {id}: disconnected: {why}");
        let _ = send(&mut stream, &Reply::Error(ErrorCode::BadMessage));
    }
    // Revoked first: a master that is still running (cut off, or dropped for a bad message)
    // refuses every section it starts from now on.
    slots.revoke();
    if slots.cut.load(Ordering::SeqCst) || matches!(end, End::Bad(_)) {
        // Alive, maybe: sections it entered before it saw the revocation end first (bounded;
        // the one it was cut off in is abandoned).
        remote.drain(ctx.stall);
    }
    ctx.source.detach_remote(&remote);
    let _ = stream.shutdown(std::net::Shutdown::Both);
    // Its counters move to the totals of the masters gone (a master cut off may still be
    // counting: what it counts from now on is not shown).
    drop(listed);
    let gone = [
        &stats.gone_translations,
        &stats.gone_iotlb_misses,
        &stats.gone_refused,
    ];
    for ((_, which), total) in COUNTERS.iter().zip(gone) {
        total.fetch_add(slots.counted(*which), Ordering::Relaxed);
    }
    let held = session.held();
    drop(session);
    info!("DMA master {id} gone ({held} endpoints released)");
}

/// HELLO, then the tables and a slots page of the master's own, attached to the model's
/// grace periods before the master can use them.
fn handshake(
    stream: &mut UnixStream,
    ctx: &Context,
    id: u64,
) -> Result<(Arc<MasterSlots>, Arc<Remote>), End> {
    let (version, asked) = match read_request(stream)? {
        Request::Hello { version, slots } => (version, slots),
        other => return Err(End::Bad(format!("{other:?} before HELLO"))),
    };
    if version != wire::VERSION {
        let _ = send(stream, &Reply::Error(ErrorCode::Version));
        return Err(End::HangUp);
    }
    let count = asked.clamp(1, wire::MAX_SLOTS) as usize;
    let internal = |what: &str, e: io::Error| {
        warn!("DMA master {id}: {what}: {e}");
        End::HangUp
    };
    let file = shm::memfd("vhost-device-iommu-slots", wire::SLOTS_BYTES)
        .map_err(|e| internal("slots memfd", e))?;
    let words = Words::map(
        std::os::fd::AsFd::as_fd(&file),
        0,
        wire::SLOTS_BYTES as usize / 8,
        shm::Access::ReadWrite,
    )
    .map_err(|e| internal("slots mapping", e))?;
    shm::add_seals(
        std::os::fd::AsFd::as_fd(&file),
        shm::SEAL_SHRINK | shm::SEAL_GROW | shm::SEAL_SEAL,
    )
    .map_err(|e| internal("slots seals", e))?;
    let slots = Arc::new(MasterSlots {
        words,
        count,
        socket: stream.try_clone().map_err(|e| internal("socket", e))?,
        id,
        device: ctx.device.clone(),
        cut: AtomicBool::new(false),
    });
    let remote = ctx.source.attach_remote(slots.clone(), ctx.stall);
    let topology = ctx.device.iommu().topology().input_range();
    let welcome = Reply::Welcome(Welcome {
        version: wire::VERSION,
        slots: count as u32,
        layout: *ctx.tables.layout(),
        input_range: topology,
        stall_bound_ms: u32::try_from(ctx.stall.as_millis()).unwrap_or(u32::MAX),
    });
    let sent = send_with_file(stream, &welcome, ctx.tables.fd())
        .and_then(|()| send_with_file(stream, &Reply::Slots, std::os::fd::AsFd::as_fd(&file)));
    if let Err(e) = sent {
        ctx.source.detach_remote(&remote);
        debug!("DMA master {id}: handshake: {e}");
        return Err(End::HangUp);
    }
    Ok((slots, remote))
}

/// How a master holds an endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hold {
    Owner(u64),
    DmaApi,
}

#[derive(Clone, Copy, Debug)]
struct Held {
    endpoint: EndpointId,
    group: GroupId,
    hold: Hold,
}

/// A master's requests after HELLO, against the device: what it holds, what it may report.
/// Ending the session (dropping it) releases everything it holds.
pub struct Session {
    device: Arc<Device>,
    held: Vec<Held>,
}

impl Session {
    pub fn new(device: Arc<Device>) -> Self {
        Session {
            device,
            held: Vec::new(),
        }
    }

    /// Endpoints held.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Answers one request: a reply, none (a fault report), or why the master must go.
    pub fn handle(&mut self, request: Request) -> Result<Option<Reply>, String> {
        Ok(Some(match request {
            Request::Hello { .. } => return Err("a second HELLO".into()),
            Request::Claim { endpoint, cookie } => self.take(endpoint, Hold::Owner(cookie)),
            Request::UseDmaApi { endpoint } => self.take(endpoint, Hold::DmaApi),
            Request::Release { endpoint } => self.release(endpoint),
            Request::Fault(report) => {
                self.fault(report);
                return Ok(None);
            }
        }))
    }

    fn take(&mut self, endpoint: EndpointId, hold: Hold) -> Reply {
        if self.held.iter().any(|h| h.endpoint == endpoint) {
            return Reply::Error(ErrorCode::AlreadyHeld);
        }
        if self.held.len() >= MAX_HELD {
            return Reply::Error(ErrorCode::TooMany);
        }
        let mut iommu = self.device.iommu();
        let Some(info) = iommu.topology().endpoint(endpoint) else {
            return Reply::Error(ErrorCode::UnknownEndpoint);
        };
        let (group, regions) = (info.group, info.regions.clone());
        if regions.len() > wire::MAX_REGIONS {
            // The master would bypass into regions it was not told of.
            return Reply::Error(ErrorCode::Internal);
        }
        let taken = match hold {
            Hold::Owner(cookie) => iommu.claim_dma_owner(group, cookie),
            Hold::DmaApi => iommu.use_dma_api(endpoint),
        };
        drop(iommu);
        if let Err(e) = taken {
            return Reply::Error(match e {
                ownership::Error::Busy(_) => ErrorCode::Busy,
                ownership::Error::InUse(_) => ErrorCode::InUse,
                ownership::Error::InvalidOwner => ErrorCode::InvalidOwner,
                ownership::Error::UnknownEndpoint(_) | ownership::Error::UnknownGroup(_) => {
                    ErrorCode::UnknownEndpoint
                }
                _ => ErrorCode::Internal,
            });
        }
        self.held.push(Held {
            endpoint,
            group,
            hold,
        });
        self.device
            .stats()
            .masters
            .endpoints
            .fetch_add(1, Ordering::Relaxed);
        Reply::Endpoint(EndpointGrant {
            endpoint,
            group: group.0,
            regions,
        })
    }

    fn give_back(&self, held: Held) {
        let mut iommu = self.device.iommu();
        let result = match held.hold {
            Hold::Owner(cookie) => iommu.release_dma_owner(held.group, cookie),
            Hold::DmaApi => iommu.unuse_dma_api(held.endpoint),
        };
        drop(iommu);
        if let Err(e) = result {
            // Only a host-face change behind the master's back (the control socket) gets here.
            log_limited!(
                log::Level::Warn,
                "releasing endpoint {:#x} of a DMA master: {e}",
                held.endpoint
            );
        }
        self.device
            .stats()
            .masters
            .endpoints
            .fetch_sub(1, Ordering::Relaxed);
    }

    fn release(&mut self, endpoint: EndpointId) -> Reply {
        let Some(at) = self.held.iter().position(|h| h.endpoint == endpoint) else {
            return Reply::Error(ErrorCode::NotHeld);
        };
        let held = self.held.swap_remove(at);
        self.give_back(held);
        Reply::Done
    }

    /// A refused translation: a fault record for the guest, as for the daemon's own
    /// translations (the backlog is bounded; log lines are rate-limited).
    fn fault(&mut self, report: FaultReport) {
        let stats = &self.device.stats().masters;
        if !self.held.iter().any(|h| h.endpoint == report.endpoint) {
            stats.faults_refused.fetch_add(1, Ordering::Relaxed);
            log_limited!(
                log::Level::Info,
                "DMA master reported a fault for endpoint {:#x}, which it does not hold",
                report.endpoint
            );
            return;
        }
        let access = match report.access {
            FaultAccess::Read => Access::Read,
            FaultAccess::Write => Access::Write,
        };
        if let Some(record) =
            fault_record(report.reason.fault(), report.endpoint, report.iova, access)
        {
            stats.faults.fetch_add(1, Ordering::Relaxed);
            self.device.faults().push(record);
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        for held in std::mem::take(&mut self.held) {
            self.give_back(held);
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use vhost_iommu_client::wire::{FaultReason, FaultReport};

    use super::*;

    fn device(extra: &[&str]) -> Arc<Device> {
        let argv = [
            "vhost-device-iommu",
            "--socket-path",
            "/nonexistent/x.sock",
            "--master-socket",
            "/nonexistent/m.sock",
        ]
        .into_iter()
        .chain(extra.iter().copied());
        let args = crate::config::Cli::try_parse_from(argv)
            .unwrap()
            .serve
            .unwrap();
        let config = crate::config::DaemonConfig::try_from(args).unwrap();
        let masters = config.masters.clone().unwrap();
        assert_eq!(masters.stall, Duration::from_millis(100));
        assert_eq!(masters.max, 16);
        Device::new(&config).unwrap()
    }

    #[test]
    fn the_tables_are_shared_and_sealed() {
        let device = device(&[]);
        let tables = device.shared_tables().unwrap();
        let seals = shm::seals(tables.fd()).unwrap();
        assert_ne!(seals & shm::SEAL_SHRINK, 0);
        assert_ne!(seals & shm::SEAL_GROW, 0);
        assert_eq!(
            shm::file_size(tables.fd()).unwrap(),
            tables.layout().file_bytes()
        );
        tables.layout().check().unwrap();
    }

    #[test]
    fn a_session_takes_releases_and_reports() {
        let device = device(&[]);
        let mut session = Session::new(device.clone());
        let claim = |endpoint, cookie| Request::Claim { endpoint, cookie };
        let reply = session.handle(claim(0x28, 5)).unwrap().unwrap();
        assert!(matches!(
            reply,
            Reply::Endpoint(EndpointGrant { endpoint: 0x28, .. })
        ));
        assert_eq!(
            session.handle(claim(0x28, 5)).unwrap(),
            Some(Reply::Error(ErrorCode::AlreadyHeld))
        );
        assert_eq!(
            session.handle(claim(0x1_0000, 5)).unwrap(),
            Some(Reply::Error(ErrorCode::UnknownEndpoint))
        );
        let mut other = Session::new(device.clone());
        assert_eq!(
            other.handle(claim(0x28, 6)).unwrap(),
            Some(Reply::Error(ErrorCode::Busy))
        );
        assert_eq!(
            other.handle(Request::UseDmaApi { endpoint: 0x28 }).unwrap(),
            Some(Reply::Error(ErrorCode::Busy))
        );
        assert_eq!(
            other.handle(Request::Release { endpoint: 0x28 }).unwrap(),
            Some(Reply::Error(ErrorCode::NotHeld))
        );
        // Reports for what it holds become fault records (a driver listens); others are
        // refused.
        device.faults().listen();
        let report = |endpoint| {
            Request::Fault(FaultReport {
                endpoint,
                reason: FaultReason::Unmapped,
                access: FaultAccess::Write,
                iova: 0x1000,
            })
        };
        assert_eq!(session.handle(report(0x28)).unwrap(), None);
        assert_eq!(other.handle(report(0x28)).unwrap(), None);
        let stats = &device.stats().masters;
        assert_eq!(stats.faults.load(Ordering::Relaxed), 1);
        assert_eq!(stats.faults_refused.load(Ordering::Relaxed), 1);
        assert_eq!(device.faults().len(), 1);
        assert!(session
            .handle(Request::Hello {
                version: 1,
                slots: 1
            })
            .is_err());
        // The end of the session gives everything back.
        assert_eq!(stats.endpoints.load(Ordering::Relaxed), 1);
        drop(session);
        assert_eq!(stats.endpoints.load(Ordering::Relaxed), 0);
        assert!(matches!(
            other.handle(claim(0x28, 6)).unwrap(),
            Some(Reply::Endpoint(_))
        ));
        assert_eq!(
            other.handle(Request::Release { endpoint: 0x28 }).unwrap(),
            Some(Reply::Done)
        );
        let group = device.iommu().group(0x28).unwrap();
        assert_eq!(device.iommu().dma_owner(group), None);
    }

    #[test]
    fn a_device_without_masters_keeps_private_tables() {
        let argv = ["vhost-device-iommu", "--socket-path", "/nonexistent/x.sock"];
        let args = crate::config::Cli::try_parse_from(argv)
            .unwrap()
            .serve
            .unwrap();
        let config = crate::config::DaemonConfig::try_from(args).unwrap();
        assert!(config.masters.is_none());
        assert!(Device::new(&config).unwrap().shared_tables().is_none());
    }
}
