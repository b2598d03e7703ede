// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Target `masters`: the daemon's side of the DMA-master socket on hostile bytes. Frames are
//! parsed as the daemon parses them (`wire::parse_header`, `wire::Request::decode`) and fed
//! to `masters::Session`s on a real device (tables in a shared memfd), two masters at once.
//!
//! Input: records of `[selector][8-byte header][payload]`; the selector's bit 0 picks the
//! master. A record the daemon would refuse (bad header, bad payload, a second HELLO) ends that
//! master's session, as it ends its connection; the next record for it starts a new one.
//! Properties: no panic; a header is never accepted with a payload above `MAX_PAYLOAD`; a
//! decoded request encodes back to its bytes; a session holds at most `MAX_HELD` endpoints
//! and never one twice; once both sessions end, no group has an owner and `masters.endpoints`
//! is back to 0; the fault backlog stays within its bound.

use std::sync::{atomic::Ordering, Arc, Mutex, OnceLock};

use ownership::GroupId;
use vhost_device_iommu::{
    device::Device,
    masters::{Session, MAX_HELD},
};
use vhost_iommu_client::wire::{self, Reply, Request, HEADER, MAX_PAYLOAD};

/// Endpoints of the fuzzed device (0x12 and 0x13 share a group).
pub const ENDPOINTS: std::ops::RangeInclusive<u32> = 0x10..=0x17;
const BACKLOG: usize = 8;

/// One device for every input (building one maps its tables); each input leaves it as it
/// found it, and the lock keeps inputs apart.
fn device() -> &'static Mutex<Arc<Device>> {
    static DEVICE: OnceLock<Mutex<Arc<Device>>> = OnceLock::new();
    DEVICE.get_or_init(|| {
        let config = crate::chain::daemon_config(&[
            "--endpoints",
            "0x10-0x17",
            "--group",
            "0x12,0x13",
            "--fault-backlog",
            "8",
            "--max-table-mib",
            "4",
            "--master-socket",
            "/nonexistent/fuzz-masters.sock",
        ]);
        Mutex::new(Device::new(&config).expect("fuzz device"))
    })
}

pub fn run(data: &[u8]) {
    let device = device().lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut sessions: [Option<Session>; 2] = [None, None];
    let mut rest = data;
    while let Some((&selector, tail)) = rest.split_first() {
        let Some(header) = tail.get(..HEADER) else {
            break;
        };
        let header: [u8; HEADER] = header.try_into().expect("8 bytes");
        let which = usize::from(selector & 1);
        let (kind, len) = match wire::parse_header(&header) {
            Ok(parsed) => parsed,
            Err(_) => {
                // The daemon drops the master: its session ends.
                sessions[which] = None;
                rest = &tail[HEADER..];
                continue;
            }
        };
        assert!(len <= MAX_PAYLOAD);
        let Some(payload) = tail.get(HEADER..HEADER + len) else {
            break;
        };
        rest = &tail[HEADER + len..];
        let request = match Request::decode(kind, payload) {
            Ok(request) => request,
            Err(_) => {
                sessions[which] = None;
                continue;
            }
        };
        let frame = [&header[..], payload].concat();
        assert_eq!(request.encode(), frame, "{request:?} encodes back");
        let session = sessions[which].get_or_insert_with(|| Session::new(device.clone()));
        let before = session.held();
        match session.handle(request.clone()) {
            Ok(reply) => check(&request, reply, before, session.held()),
            Err(_) => sessions[which] = None,
        }
        if let Some(session) = &sessions[which] {
            assert!(session.held() <= MAX_HELD);
        }
    }
    drop(sessions);
    let stats = &device.stats().masters;
    assert_eq!(
        stats.endpoints.load(Ordering::Relaxed),
        0,
        "everything released"
    );
    {
        let iommu = device.iommu();
        for g in 0..iommu.topology().group_count() as u32 {
            assert_eq!(iommu.dma_owner(GroupId(g)), None, "group {g} still owned");
        }
    }
    assert!(device.faults().len() <= BACKLOG);
    device.faults().clear();
}

/// What a reply to `request` may be, given the endpoints held before and after.
fn check(request: &Request, reply: Option<Reply>, before: usize, after: usize) {
    match (request, &reply) {
        (Request::Fault(_), None) => assert_eq!(before, after),
        (Request::Claim { endpoint, .. } | Request::UseDmaApi { endpoint }, Some(r)) => match r {
            Reply::Endpoint(grant) => {
                assert_eq!(grant.endpoint, *endpoint);
                assert!(ENDPOINTS.contains(endpoint));
                assert_eq!(after, before + 1);
            }
            Reply::Error(_) => assert_eq!(after, before),
            other => panic!("{other:?} to {request:?}"),
        },
        (Request::Release { .. }, Some(Reply::Done)) => assert_eq!(after + 1, before),
        (Request::Release { .. }, Some(Reply::Error(_))) => assert_eq!(after, before),
        (request, reply) => panic!("{reply:?} to {request:?}"),
    }
}

/// A record for master `which`.
pub fn record(which: u8, request: &Request) -> Vec<u8> {
    [&[which][..], &request.encode()].concat()
}
