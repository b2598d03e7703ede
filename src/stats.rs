// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
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
    /// How the request worker waits for work (see [`Pacing`]).
    pub pacing: Pacing,
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
            "pacing": self.pacing.to_json(),
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

/// Adds one to a counter that only one thread writes (the request worker): a plain load and
/// store, no locked instruction on the request path.
fn bump(counter: &AtomicU64, n: u64) {
    counter.store(counter.load(Relaxed).wrapping_add(n), Relaxed);
}

/// What decides a request's latency: how the worker found each request (the first pass after
/// a kick woke it, a poll of the avail ring, or the look after notifications went back on),
/// how often it slept, what its poll windows caught, and sampled timings. Written by the
/// request worker only; cheap enough to stay on (a few plain stores per pass, two clock reads
/// per sampled pass).
#[derive(Debug, Default)]
pub struct Pacing {
    /// Requests found by the first pass after an epoll wake-up (a kick, usually).
    pub woken_requests: AtomicU64,
    /// Requests found by the pass after notifications went back on (published meanwhile).
    pub rechecked_requests: AtomicU64,
    /// Wake-ups of the worker for the request queue, and the times it went back to sleep
    /// with notifications on.
    pub wakeups: AtomicU64,
    pub sleeps: AtomicU64,
    /// Poll windows: started, ended with nothing found, that lost the CPU meanwhile (another
    /// task ran on it; an adaptive window ends there), whose CPU stopped meanwhile with no
    /// other task on it (the hypervisor's doing; the window goes on), and skipped during a
    /// back-off.
    pub windows: AtomicU64,
    pub windows_empty: AtomicU64,
    pub windows_preempted: AtomicU64,
    pub windows_stolen: AtomicU64,
    pub windows_skipped: AtomicU64,
    /// The length of the last back-off (nanoseconds without polling after a window lost its
    /// CPU: `windows_preempted`).
    pub backoff_ns: AtomicU64,
    /// Nanoseconds spent polling (CPU time while the worker kept its CPU).
    pub poll_ns: AtomicU64,
    /// `sched_yield` calls in poll windows, and those that came back late (another task ran).
    pub yields: AtomicU64,
    pub yields_late: AtomicU64,
    /// The poll window in force (nanoseconds): the adaptive window, or the budget when fixed.
    pub window_ns: AtomicU64,
    /// Sampled passes: from finding a pass's first request to publishing its used entries.
    pub service_ns: Histogram,
    /// From publishing a pass's used entries to finding the next request by polling (the
    /// driver's gap between requests, as the device sees it).
    pub polled_gap_ns: Histogram,
    /// Every sleep: from going to sleep (notifications on) to the wake-up (the driver's gap,
    /// plus its kick and the wake-up's latency).
    pub sleep_ns: Histogram,
}

impl Pacing {
    pub fn add(counter: &AtomicU64, n: u64) {
        bump(counter, n)
    }

    pub fn set(gauge: &AtomicU64, value: u64) {
        gauge.store(value, Relaxed);
    }

    fn to_json(&self) -> Value {
        json!({
            "requests": {
                "woken": self.woken_requests.load(Relaxed),
                "rechecked": self.rechecked_requests.load(Relaxed),
            },
            "wakeups": self.wakeups.load(Relaxed),
            "sleeps": self.sleeps.load(Relaxed),
            "windows": {
                "started": self.windows.load(Relaxed),
                "empty": self.windows_empty.load(Relaxed),
                "preempted": self.windows_preempted.load(Relaxed),
                "stolen": self.windows_stolen.load(Relaxed),
                "skipped": self.windows_skipped.load(Relaxed),
            },
            "backoff_ns": self.backoff_ns.load(Relaxed),
            "poll_ns": self.poll_ns.load(Relaxed),
            "yields": self.yields.load(Relaxed),
            "yields_late": self.yields_late.load(Relaxed),
            "window_ns": self.window_ns.load(Relaxed),
            "service_ns": self.service_ns.to_json(),
            "polled_gap_ns": self.polled_gap_ns.to_json(),
            "sleep_ns": self.sleep_ns.to_json(),
        })
    }
}

/// Buckets of a [`Histogram`]: 4 per power of two (about 19% wide), up to 2^41 ns (36 min).
const BUCKETS: usize = 164;

/// A log-linear histogram of nanoseconds with one writer (the request worker).
#[derive(Debug)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS],
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl Histogram {
    fn index(ns: u64) -> usize {
        if ns < 4 {
            return ns as usize;
        }
        let e = 63 - ns.leading_zeros() as usize;
        let sub = ((ns >> (e - 2)) & 3) as usize;
        ((e - 1) * 4 + sub).min(BUCKETS - 1)
    }

    /// The lowest value of bucket `i`, and its width.
    fn bounds(i: usize) -> (u64, u64) {
        if i < 4 {
            return (i as u64, 1);
        }
        let e = i / 4 + 1;
        ((4 + (i % 4) as u64) << (e - 2), 1 << (e - 2))
    }

    pub fn record(&self, ns: u64) {
        bump(&self.buckets[Self::index(ns)], 1);
    }

    /// The value below which a fraction `q` of the samples lie (a bucket's middle).
    pub fn quantile(&self, q: f64) -> Option<u64> {
        let counts: Vec<u64> = self.buckets.iter().map(|b| b.load(Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((total as f64 * q).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for (i, &n) in counts.iter().enumerate() {
            seen += n;
            if seen >= rank {
                let (lo, width) = Self::bounds(i);
                return Some(lo + width / 2);
            }
        }
        None
    }

    /// Count, quantiles, and the non-empty buckets as `[lowest ns, count]` pairs.
    pub fn to_json(&self) -> Value {
        let buckets: Vec<Value> = self
            .buckets
            .iter()
            .enumerate()
            .filter_map(|(i, b)| {
                let n = b.load(Relaxed);
                (n > 0).then(|| json!([Self::bounds(i).0, n]))
            })
            .collect();
        let count: u64 = self.buckets.iter().map(|b| b.load(Relaxed)).sum();
        json!({
            "count": count,
            "p50": self.quantile(0.5),
            "p90": self.quantile(0.9),
            "p99": self.quantile(0.99),
            "max": self.quantile(1.0),
            "buckets": buckets,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_cover_every_value_in_order() {
        let mut last = 0;
        for ns in (0..100_000u64).chain([u64::MAX / 2, u64::MAX]) {
            let i = Histogram::index(ns);
            assert!(i >= last, "{ns}: bucket {i} after {last}");
            last = i;
            let (lo, width) = Histogram::bounds(i);
            if i < BUCKETS - 1 {
                assert!(
                    lo <= ns && ns < lo + width,
                    "{ns} outside bucket {i} ({lo}+{width})"
                );
            }
        }
    }

    #[test]
    fn histogram_quantiles() {
        let h = Histogram::default();
        assert_eq!(h.quantile(0.5), None);
        for ns in 1..=1000u64 {
            h.record(ns * 1000);
        }
        let p50 = h.quantile(0.5).unwrap() as f64;
        let p99 = h.quantile(0.99).unwrap() as f64;
        assert!((p50 / 500e3 - 1.0).abs() < 0.2, "p50 {p50}");
        assert!((p99 / 990e3 - 1.0).abs() < 0.2, "p99 {p99}");
        assert_eq!(h.to_json()["count"], 1000);
    }
}
