// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The control socket: one JSON object per line in, one per line out.
//!
//! For operators and tests. Commands (`"cmd"`):
//! - `stats`: request counts by type and status, domains, mappings, faults, resets;
//! - `domains`: every live domain; `mappings` `{domain, limit?}`: a paging domain's mappings;
//! - `groups` `{all?}`: the groups in use (with a domain, attached endpoints or a DMA owner),
//!   or every group with `"all": true`, each with its members, domain, attached endpoints and
//!   DMA owner, and `total`, the number of groups;
//! - `translate` `{endpoint, iova, len?, access?: "read"|"write", owner?}`: the fast path, as
//!   a DMA master would call it (a guest-visible fault is also reported on the event queue);
//! - `claim` / `release` `{group | endpoint, cookie}`: the exclusive DMA owner (host face);
//! - `use_dma_api` / `unuse_dma_api` `{endpoint}`: shared DMA-API users.
//!
//! Numbers are JSON numbers or strings (`"0x1000"`). An `endpoint` is also a PCI address
//! (`"00:05.0"`, `"0000:00:05.0"`), read by the command line's parser
//! ([`crate::config::parse_endpoint`]). Replies that name endpoints give their IDs and, beside
//! them, the same IDs as PCI addresses ([`crate::config::endpoint_bdf`]): `bdfs` beside a
//! domain's or group's `endpoints`, `attached_bdfs` beside a group's `attached`, and `bdf`
//! beside the `endpoint` a reply echoes. Replies carry `"ok": true|false`; an error reply has
//! `"error"`, a refused translation `"fault"`. Clients and line lengths are bounded, and so is
//! the time a client may hold its slot without talking or without reading ([`Timeouts`]).

use std::{
    io::{self, BufRead, BufReader, Read, Write},
    os::unix::net::{UnixListener, UnixStream},
    sync::{atomic::Ordering::Relaxed, Arc},
    thread,
    time::{Duration, Instant},
};

use log::{debug, warn};
use ownership::{Access, DomainKind, EndpointId, Fault, GroupId, Perms, Requester};
use serde_json::{json, Value};

use crate::{
    config::{endpoint_bdf, parse_endpoint},
    device::Device,
    log_limited,
    stats::Stats,
    translate::TranslationService,
};

/// Clients served at once; more are refused with an error line.
pub const MAX_CLIENTS: usize = 16;
/// Longest request line, in bytes.
pub const MAX_LINE: usize = 4096;
/// Most mappings one `mappings` reply lists.
pub const MAX_LISTED: usize = 10_000;

/// How long a client may keep the daemon waiting before it is disconnected (and counted in
/// `stats`: `control.idle_timeouts`, `control.write_timeouts`). A slot is one of
/// [`MAX_CLIENTS`]: a client that stops talking or stops reading must not keep it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// A request line must arrive whole within this long of the connection or of the previous
    /// reply: a silent client, or one trickling bytes without a newline, is told so and
    /// disconnected. Scripts and monitors polling more often than this keep their connection.
    pub idle: Duration,
    /// A reply must be taken by the client within this long of being ready: one that sends
    /// requests and does not read the replies is disconnected once the socket buffer is full.
    /// The largest reply (a `mappings` list of 10,000) is at most about 1.4 MB.
    pub write: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            idle: Duration::from_secs(60),
            write: Duration::from_secs(10),
        }
    }
}

/// Serves the control socket on its own threads until the process ends.
pub fn spawn(
    listener: UnixListener,
    device: Arc<Device>,
    timeouts: Timeouts,
) -> io::Result<thread::JoinHandle<()>> {
    thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let stream = match stream {
                    Ok(s) => s,
                    Err(e) => {
                        warn!("control socket accept: {e}");
                        continue;
                    }
                };
                let Some(slot) = Slot::take(&device) else {
                    device.stats().control_refused.fetch_add(1, Relaxed);
                    // A new socket's buffer is empty: this line cannot block the accept loop.
                    let _ = (&stream).write_all(&line_of(&error("too many control clients")));
                    continue;
                };
                let device = device.clone();
                let spawned =
                    thread::Builder::new()
                        .name("control-client".into())
                        .spawn(move || {
                            serve_client(&stream, &device, timeouts);
                            // Before the stream closes: the slot is free by the time the
                            // client sees the connection end.
                            drop(slot);
                        });
                if let Err(e) = spawned {
                    warn!("control client thread: {e}");
                }
            }
        })
}

/// One of the [`MAX_CLIENTS`] client slots (`control.clients` in `stats`), given back on drop.
struct Slot(Arc<Device>);

impl Slot {
    fn take(device: &Arc<Device>) -> Option<Slot> {
        let clients = &device.stats().control_clients;
        if clients.fetch_add(1, Relaxed) >= MAX_CLIENTS as u64 {
            clients.fetch_sub(1, Relaxed);
            return None;
        }
        Some(Slot(device.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.stats().control_clients.fetch_sub(1, Relaxed);
    }
}

/// One side of a client connection, whose reads or writes fail with `TimedOut` once
/// `deadline` has passed: the socket timeout is set to the time left before each call, so a
/// client trickling bytes cannot stretch the deadline.
struct Deadline<'a> {
    stream: &'a UnixStream,
    deadline: Instant,
}

impl Deadline<'_> {
    fn time_left(&self) -> io::Result<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        Ok(left)
    }
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream.set_read_timeout(Some(self.time_left()?))?;
        self.stream.read(buf)
    }
}

impl Write for Deadline<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.stream.set_write_timeout(Some(self.time_left()?))?;
        self.stream.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Whether an I/O error is a socket timeout (SO_RCVTIMEO/SO_SNDTIMEO report EAGAIN).
fn timed_out(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
    )
}

/// A reply as the bytes of one line, written with a single `write_all`.
fn line_of(reply: &Value) -> Vec<u8> {
    let mut line = serde_json::to_vec(reply).unwrap_or_default();
    line.push(b'\n');
    line
}

/// Writes one reply line within the write timeout. False when the client is gone or did not
/// take the reply in time (counted): the connection is then closed.
fn send(stream: &UnixStream, reply: &Value, timeouts: Timeouts, stats: &Stats) -> bool {
    // The line is made before the clock starts: the timeout is the client's to keep, and a
    // big reply (every group of a large topology) takes a while to serialize.
    let line = line_of(reply);
    let mut writer = Deadline {
        stream,
        deadline: Instant::now() + timeouts.write,
    };
    match writer.write_all(&line) {
        Ok(()) => true,
        Err(e) => {
            if timed_out(&e) {
                stats.control_write_timeouts.fetch_add(1, Relaxed);
                log_limited!(
                    log::Level::Info,
                    "control client took no reply for {:?}: disconnected",
                    timeouts.write
                );
            }
            false
        }
    }
}

fn serve_client(stream: &UnixStream, device: &Device, timeouts: Timeouts) {
    let stats = device.stats();
    let mut reader = BufReader::new(Deadline {
        stream,
        deadline: Instant::now(),
    });
    let mut session = Session {
        device,
        service: None,
    };
    let mut line = Vec::with_capacity(256);
    loop {
        line.clear();
        reader.get_mut().deadline = Instant::now() + timeouts.idle;
        match reader
            .by_ref()
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)
        {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if timed_out(&e) => {
                stats.control_idle_timeouts.fetch_add(1, Relaxed);
                log_limited!(
                    log::Level::Info,
                    "control client sent no whole request line in {:?}: disconnected",
                    timeouts.idle
                );
                let idle = format!(
                    "idle: no whole request line in {} s, disconnected",
                    timeouts.idle.as_secs()
                );
                send(stream, &error(&idle), timeouts, stats);
                return;
            }
            Err(_) => return,
        }
        if line.last() != Some(&b'\n') {
            stats.control_errors.fetch_add(1, Relaxed);
            let long = error(&format!("line longer than {MAX_LINE} bytes"));
            send(stream, &long, timeouts, stats);
            return;
        }
        let reply = match serde_json::from_slice::<Value>(&line) {
            Ok(request) => session.dispatch(&request),
            Err(e) => error(&format!("bad JSON: {e}")),
        };
        if reply.get("error").is_some() {
            stats.control_errors.fetch_add(1, Relaxed);
        }
        if !send(stream, &reply, timeouts, stats) {
            return;
        }
    }
}

fn error(message: &str) -> Value {
    json!({ "ok": false, "error": message })
}

/// A u64 from a JSON number or a decimal/hex string.
fn number(request: &Value, key: &str) -> Result<Option<u64>, String> {
    match request.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_u64()
            .map(Some)
            .ok_or_else(|| format!("{key}: not an unsigned 64-bit number")),
        Some(Value::String(s)) => crate::config::parse_u64(s)
            .map(Some)
            .map_err(|e| format!("{key}: {e}")),
        Some(_) => Err(format!("{key}: expected a number")),
    }
}

fn required(request: &Value, key: &str) -> Result<u64, String> {
    number(request, key)?.ok_or_else(|| format!("missing \"{key}\""))
}

fn u32_field(request: &Value, key: &str) -> Result<u32, String> {
    u32::try_from(required(request, key)?).map_err(|_| format!("{key}: out of range"))
}

/// An endpoint ID from a JSON number, or a string as the command line takes it: a PCI address
/// (`"00:05.0"`) or a number (`"40"`, `"0x28"`).
fn endpoint(request: &Value, key: &str) -> Result<Option<EndpointId>, String> {
    match request.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| format!("{key}: not a 32-bit endpoint ID")),
        Some(Value::String(s)) => parse_endpoint(s)
            .map(Some)
            .map_err(|e| format!("{key}: {e}")),
        Some(_) => Err(format!("{key}: expected an endpoint ID or a PCI address")),
    }
}

fn required_endpoint(request: &Value) -> Result<EndpointId, String> {
    endpoint(request, "endpoint")?.ok_or_else(|| "missing \"endpoint\"".to_string())
}

/// Endpoint IDs as PCI addresses, for the `bdfs` beside an `endpoints` list.
fn bdfs(ids: &[EndpointId]) -> Vec<String> {
    ids.iter().map(|&id| endpoint_bdf(id)).collect()
}

/// A fault's name on the control socket.
pub fn fault_name(fault: Fault) -> &'static str {
    match fault {
        Fault::UnknownEndpoint => "unknown_endpoint",
        Fault::NotOwner => "not_owner",
        Fault::NoDomain => "no_domain",
        Fault::Unmapped => "unmapped",
        Fault::OutOfRange => "out_of_range",
        Fault::Permission => "permission",
        Fault::Reserved => "reserved",
    }
}

struct Session<'a> {
    device: &'a Device,
    /// Created on the first translate: a reader slot for this client's thread.
    service: Option<TranslationService>,
}

impl Session<'_> {
    fn dispatch(&mut self, request: &Value) -> Value {
        let cmd = request.get("cmd").and_then(Value::as_str).unwrap_or("");
        debug!("control: {request}");
        let result = match cmd {
            "stats" => Ok(self.stats()),
            "domains" => Ok(self.domains()),
            "groups" => self.groups(request),
            "mappings" => self.mappings(request),
            "translate" => self.translate(request),
            "claim" | "release" => self.owner(cmd, request),
            "use_dma_api" | "unuse_dma_api" => self.dma_api(cmd, request),
            other => Err(format!("unknown command {other:?}")),
        };
        result.unwrap_or_else(|e| {
            log_limited!(log::Level::Info, "control {cmd}: {e}");
            error(&e)
        })
    }

    fn stats(&self) -> Value {
        let model = self.device.iommu().stats();
        let mut stats = self.device.stats().to_json();
        stats["domains"] = model.domains.into();
        stats["mappings"] = model.mappings.into();
        stats["table_bytes"] = model.table_bytes.into();
        stats["grace_periods"] = model.grace_periods.into();
        stats["grace_wait_max_ns"] = model.grace_wait_max_ns.into();
        stats["faults"]["backlog"] = self.device.faults().len().into();
        stats["dirty_log"]["on"] = self.device.dirty_logging().into();
        for (name, value) in crate::masters::stats_json(self.device).unwrap_or_default() {
            stats["masters"][name] = value;
        }
        json!({ "ok": true, "stats": stats })
    }

    fn domains(&self) -> Value {
        let domains: Vec<Value> = self
            .device
            .iommu()
            .domains()
            .into_iter()
            .map(|d| {
                json!({
                    "id": d.id,
                    "kind": match d.kind { DomainKind::Paging => "paging", DomainKind::Identity => "identity" },
                    "groups": d.groups.iter().map(|g| g.0).collect::<Vec<_>>(),
                    "endpoints": d.endpoints,
                    "bdfs": bdfs(&d.endpoints),
                    "mappings": d.mappings,
                    "maps": d.maps,
                    "unmaps": d.unmaps,
                })
            })
            .collect();
        json!({ "ok": true, "domains": domains })
    }

    /// Only the groups in use unless `all`: the default topology has one group per BDF of
    /// segment 0, and listing all 65,536 is a 5 MB reply.
    fn groups(&self, request: &Value) -> Result<Value, String> {
        let all = match request.get("all") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(all)) => *all,
            Some(_) => return Err("all: expected true or false".into()),
        };
        let iommu = self.device.iommu();
        let topo = iommu.topology();
        let groups: Vec<Value> = (0..topo.group_count() as u32)
            .map(GroupId)
            .filter_map(|g| {
                let (domain, attached) = iommu.group_attachment(g).unwrap_or((None, vec![]));
                let owner = iommu.dma_owner(g);
                let in_use = domain.is_some() || !attached.is_empty() || owner.is_some();
                (all || in_use).then(|| {
                    let members = topo.group_members(g);
                    json!({
                        "group": g.0,
                        "endpoints": members,
                        "bdfs": bdfs(members),
                        "domain": domain,
                        "attached": attached,
                        "attached_bdfs": bdfs(&attached),
                        "owner": owner,
                    })
                })
            })
            .collect();
        Ok(json!({ "ok": true, "total": topo.group_count(), "groups": groups }))
    }

    fn mappings(&self, request: &Value) -> Result<Value, String> {
        let domain = u32_field(request, "domain")?;
        let limit = number(request, "limit")?.map_or(MAX_LISTED, |l| (l as usize).min(MAX_LISTED));
        let mappings = self
            .device
            .iommu()
            .mappings(domain)
            .map_err(|e| e.to_string())?;
        let listed: Vec<Value> = mappings
            .iter()
            .take(limit)
            .map(|m| {
                json!({
                    "virt_start": m.virt_start,
                    "virt_end": m.virt_end,
                    "phys_start": m.phys_start,
                    "read": m.perms.contains(Perms::READ),
                    "write": m.perms.contains(Perms::WRITE),
                    "mmio": m.perms.contains(Perms::MMIO),
                })
            })
            .collect();
        Ok(json!({ "ok": true, "total": mappings.len(), "mappings": listed }))
    }

    fn translate(&mut self, request: &Value) -> Result<Value, String> {
        let endpoint = required_endpoint(request)?;
        let iova = required(request, "iova")?;
        let len = number(request, "len")?.unwrap_or(1);
        let access = match request.get("access").and_then(Value::as_str) {
            None | Some("read") => Access::Read,
            Some("write") => Access::Write,
            Some(other) => return Err(format!("access: {other:?} is not read or write")),
        };
        let requester = match number(request, "owner")? {
            Some(cookie) => Requester::Owner(cookie),
            None => Requester::DmaApi,
        };
        let device = self.device;
        let service = self
            .service
            .get_or_insert_with(|| device.translation_service());
        let bdf = endpoint_bdf(endpoint);
        Ok(
            match service.translate(requester, endpoint, iova, len, access) {
                Ok(t) => json!({
                    "ok": true, "gpa": t.gpa, "len": t.len, "domain": t.domain, "mmio": t.mmio,
                    "endpoint": endpoint, "bdf": bdf,
                }),
                Err(fault) => json!({
                    "ok": false, "fault": fault_name(fault), "endpoint": endpoint, "bdf": bdf,
                }),
            },
        )
    }

    fn group_of(&self, request: &Value) -> Result<GroupId, String> {
        if let Some(g) = number(request, "group")? {
            return u32::try_from(g)
                .map(GroupId)
                .map_err(|_| "group: out of range".to_string());
        }
        let endpoint = required_endpoint(request)?;
        self.device
            .iommu()
            .group(endpoint)
            .map_err(|e| e.to_string())
    }

    fn owner(&self, cmd: &str, request: &Value) -> Result<Value, String> {
        let group = self.group_of(request)?;
        let cookie = required(request, "cookie")?;
        let mut iommu = self.device.iommu();
        let result = if cmd == "claim" {
            iommu.claim_dma_owner(group, cookie)
        } else {
            iommu.release_dma_owner(group, cookie)
        };
        result.map_err(|e| e.to_string())?;
        Ok(json!({ "ok": true, "group": group.0 }))
    }

    fn dma_api(&self, cmd: &str, request: &Value) -> Result<Value, String> {
        let endpoint = required_endpoint(request)?;
        let mut iommu = self.device.iommu();
        let result = if cmd == "use_dma_api" {
            iommu.use_dma_api(endpoint)
        } else {
            iommu.unuse_dma_api(endpoint)
        };
        result.map_err(|e| e.to_string())?;
        Ok(json!({ "ok": true, "endpoint": endpoint, "bdf": endpoint_bdf(endpoint) }))
    }
}
