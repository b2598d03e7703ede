//! Counters of the daemon, reported by the control socket's `stats` command.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde_json::{json, Map, Value};
use virtio::{RequestType, Status};

const TYPES: usize = 6;
const STATUSES: usize = 9;

/// Request and fault counters. Lock-free; written on the request path.
#[derive(Debug, Default)]
pub struct Stats {
    /// `[request type][status]`, type 0 unused.
    requests: [[AtomicU64; STATUSES]; TYPES],
    /// Chains returned without a reply (used length 0): `[request type or 0 when unknown]`.
    no_reply: [AtomicU64; TYPES],
    /// Chains whose descriptors were unusable (direction, address, size).
    pub malformed_chains: AtomicU64,
    /// Passes over a request queue the device could not use (ring outside memory, ...).
    pub broken_rings: AtomicU64,
    /// Kicks that found nothing to do.
    pub spurious_wakeups: AtomicU64,
    /// Requests found by polling the avail ring after work (no kick needed).
    pub polled_requests: AtomicU64,
    /// Fault records: produced by the fast path, written to the eventq, dropped (backlog full or
    /// reset), refused for lack of a big enough buffer.
    pub faults_reported: AtomicU64,
    pub faults_delivered: AtomicU64,
    pub faults_dropped: AtomicU64,
    /// Control-socket clients refused (too many) and lines refused (too long, bad JSON).
    pub control_refused: AtomicU64,
    pub control_errors: AtomicU64,
    /// Control-socket clients connected now, and those disconnected for sending no request
    /// line in time or not taking a reply in time.
    pub control_clients: AtomicU64,
    pub control_idle_timeouts: AtomicU64,
    pub control_write_timeouts: AtomicU64,
    /// Frontends served, and device resets.
    pub connections: AtomicU64,
    pub resets: AtomicU64,
    /// Device states saved, loaded, and refused (damaged, other topology, over the limits).
    pub state_saves: AtomicU64,
    pub state_loads: AtomicU64,
    pub state_refused: AtomicU64,
    /// `--state-file`: snapshots written (the journal started over), requests answered from
    /// the journal after a restart instead of being applied again.
    pub state_compactions: AtomicU64,
    pub state_replayed: AtomicU64,
    /// Size of the last device state saved (SET_DEVICE_STATE_FD or the state file), in bytes.
    pub state_last_bytes: AtomicU64,
    /// Times the frontend asked for a dirty-page log (`VHOST_F_LOG_ALL`: a migration began).
    pub dirty_log_starts: AtomicU64,
    /// DMA masters in other processes (the master socket).
    pub masters: MasterStats,
}

/// Counters of the DMA masters (see `crate::masters`).
#[derive(Debug, Default)]
pub struct MasterStats {
    /// Connected now, and ever.
    pub connected: AtomicU64,
    pub served: AtomicU64,
    /// Refused at the door (too many masters).
    pub refused: AtomicU64,
    /// Cut off by a grace period (a section outlived the bound).
    pub cut_off: AtomicU64,
    /// Disconnected for a malformed or out-of-place message.
    pub bad_messages: AtomicU64,
    /// Endpoints held now (exclusive claims and DMA-API uses).
    pub endpoints: AtomicU64,
    /// Fault reports taken from masters (each one a fault record, as for the daemon's own
    /// translations), and reports refused (an endpoint the master does not hold).
    pub faults: AtomicU64,
    pub faults_refused: AtomicU64,
    /// The counters masters keep in their slots pages (translations, IOTLB misses, refusals),
    /// of the masters gone; `crate::masters::stats_json` adds those of the connected ones.
    pub gone_translations: AtomicU64,
    pub gone_iotlb_misses: AtomicU64,
    pub gone_refused: AtomicU64,
}

impl MasterStats {
    fn to_json(&self) -> Value {
        json!({
            "connected": self.connected.load(Relaxed),
            "served": self.served.load(Relaxed),
            "refused": self.refused.load(Relaxed),
            "cut_off": self.cut_off.load(Relaxed),
            "bad_messages": self.bad_messages.load(Relaxed),
            "endpoints": self.endpoints.load(Relaxed),
            "faults": self.faults.load(Relaxed),
            "faults_refused": self.faults_refused.load(Relaxed),
        })
    }
}

impl Stats {
    /// Counts a reply. Only the request-queue worker counts replies, so a plain load and store
    /// (no locked instruction on the request path) never loses an update.
    pub fn count_reply(&self, request: RequestType, status: Status) {
        let counter = &self.requests[request as usize][status as usize];
        counter.store(counter.load(Relaxed) + 1, Relaxed);
    }

    pub fn count_no_reply(&self, request: Option<RequestType>) {
        self.no_reply[request.map_or(0, |t| t as usize)].fetch_add(1, Relaxed);
    }

    /// Replies of one type with one status.
    pub fn replies(&self, request: RequestType, status: Status) -> u64 {
        self.requests[request as usize][status as usize].load(Relaxed)
    }

    /// The counters as JSON (only non-zero request/status pairs).
    pub fn to_json(&self) -> Value {
        let mut value = self.counters_json();
        value["masters"] = self.masters.to_json();
        value
    }

    fn counters_json(&self) -> Value {
        let mut requests = Map::new();
        for t in RequestType::ALL {
            let mut by_status = Map::new();
            for s in Status::ALL {
                let n = self.replies(t, s);
                if n > 0 {
                    by_status.insert(s.name().to_ascii_lowercase(), n.into());
                }
            }
            let none = self.no_reply[t as usize].load(Relaxed);
            if none > 0 {
                by_status.insert("no_reply".into(), none.into());
            }
            requests.insert(type_name(t).into(), Value::Object(by_status));
        }
        json!({
            "requests": requests,
            "unknown_type": self.no_reply[0].load(Relaxed),
            "malformed_chains": self.malformed_chains.load(Relaxed),
            "broken_rings": self.broken_rings.load(Relaxed),
            "spurious_wakeups": self.spurious_wakeups.load(Relaxed),
            "polled_requests": self.polled_requests.load(Relaxed),
            "faults": {
                "reported": self.faults_reported.load(Relaxed),
                "delivered": self.faults_delivered.load(Relaxed),
                "dropped": self.faults_dropped.load(Relaxed),
            },
            "control": {
                "refused_clients": self.control_refused.load(Relaxed),
                "errors": self.control_errors.load(Relaxed),
                "clients": self.control_clients.load(Relaxed),
                "idle_timeouts": self.control_idle_timeouts.load(Relaxed),
                "write_timeouts": self.control_write_timeouts.load(Relaxed),
            },
            "connections": self.connections.load(Relaxed),
            "resets": self.resets.load(Relaxed),
            "state": {
                "saved": self.state_saves.load(Relaxed),
                "loaded": self.state_loads.load(Relaxed),
                "refused": self.state_refused.load(Relaxed),
                "compactions": self.state_compactions.load(Relaxed),
                "replayed": self.state_replayed.load(Relaxed),
                "last_bytes": self.state_last_bytes.load(Relaxed),
            },
            "dirty_log": {
                "starts": self.dirty_log_starts.load(Relaxed),
            },
        })
    }
}

/// The lower-case name of a request type, as the control socket prints it.
pub fn type_name(t: RequestType) -> &'static str {
    match t {
        RequestType::Attach => "attach",
        RequestType::Detach => "detach",
        RequestType::Map => "map",
        RequestType::Unmap => "unmap",
        RequestType::Probe => "probe",
    }
}
