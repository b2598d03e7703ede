// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! vhost-user-blk: a virtio-blk device over a file, served over vhost-user, whose every DMA
//! goes through vhost-device-iommu's page tables when the guest's driver negotiates
//! `VIRTIO_F_ACCESS_PLATFORM`.
//!
//! ```sh
//! vhost-device-iommu --socket-path viommu.sock --master-socket masters.sock \
//!     --endpoints 00:08.0 ...
//! cargo run --example vhost-user-blk -- --socket blk.sock --file disk.img \
//!     --master-socket masters.sock --endpoint 00:08.0
//! qemu-system-x86_64 ... -acpitable file=viot.bin \
//!     -chardev socket,id=blk0,path=blk.sock \
//!     -device vhost-user-blk-pci,chardev=blk0,addr=08.0,disable-legacy=on,iommu_platform=on,x-external-iommu=on
//! ```
//!
//! With `--master-socket` the device offers `VIRTIO_F_ACCESS_PLATFORM`, takes DMA ownership of
//! its endpoint (DMA-API use, or an exclusive claim with `--cookie`) through the
//! `vhost-iommu-client` crate, and from then on every ring and buffer address the driver gives
//! it is an IOVA: the descriptor table, the available and used rings, the request headers, the
//! data and the status bytes are all read and written through `vm_memory::IommuMemory` over the
//! client's `Endpoint`. A translation the guest's tables refuse fails the request
//! (`VIRTIO_BLK_S_IOERR`) and reaches the guest as a virtio-iommu fault record. Without
//! `--master-socket` the device does not offer the feature and addresses guest memory
//! directly, as any vhost-user device does.
//!
//! vhost-user-backend 0.24 cannot serve such a device: its request handler (private to the
//! crate) turns the ring addresses of `VHOST_USER_SET_VRING_ADDR` into guest-physical ones
//! through the memory table, as frontend virtual addresses, and fails on IOVAs (the vhost-user
//! specification's IOMMU section says they are IOVAs once `VIRTIO_F_IOMMU_PLATFORM` is
//! negotiated). So this example implements the vhost crate's request handler itself (`vhost`
//! module) and runs virtio-queue's `Queue` over whichever memory applies (`blk` module).
//!
//! QEMU passes the driver's IOVAs to a vhost-user back-end only when one of its own emulated
//! IOMMUs translates the device; `x-external-iommu=on` (scripts/qemu-patches/0100) lets it
//! pass them through for an IOMMU outside QEMU. See docs/dma-masters.md.
//!
//! `--test-misdirect SECTOR:IOVA` is a test hook (tests/e2e_blk.rs): a read or write request
//! that starts at SECTOR has its data DMA sent to IOVA instead of the driver's buffers, a
//! device bug the vIOMMU must stop.
#![forbid(unsafe_code)]

mod backend;
mod blk;

use std::{
    path::PathBuf,
    process::ExitCode,
    sync::{Arc, Mutex},
};

use backend::BlkBackend;
use clap::Parser;
use vhost_device_iommu::config::{parse_endpoint, parse_u64};
use vhost_iommu_client::Master;

/// A virtio-blk device over a file, behind vhost-device-iommu's virtio-iommu.
#[derive(Debug, Parser)]
#[command(name = "vhost-user-blk", version)]
struct Args {
    /// The vhost-user socket to listen on (the VMM connects to it).
    #[arg(long)]
    socket: PathBuf,
    /// The disk: a raw image; the device has its size, rounded down to 512-byte sectors.
    #[arg(long)]
    file: PathBuf,
    /// Refuse writes (VIRTIO_BLK_F_RO).
    #[arg(long)]
    read_only: bool,
    /// vhost-device-iommu's `--master-socket`: translate every DMA through the guest's
    /// virtio-iommu (offers VIRTIO_F_ACCESS_PLATFORM). Needs `--endpoint`.
    #[arg(long, requires = "endpoint")]
    master_socket: Option<PathBuf>,
    /// The device's endpoint as the virtio-iommu knows it: its PCI address in the guest
    /// (`00:08.0`) or the endpoint ID.
    #[arg(long, value_parser = parse_endpoint_arg)]
    endpoint: Option<u32>,
    /// Claim the endpoint's group exclusively under this cookie (default: DMA-API use, shared).
    #[arg(long, value_parser = parse_u64_arg)]
    cookie: Option<u64>,
    /// Serve one VMM connection, then exit (default: wait for the next one).
    #[arg(long)]
    once: bool,
    /// Test hook: a read or write request that starts at SECTOR sends its data DMA to IOVA
    /// (plus the offset in the request) instead of the driver's buffers. Needs
    /// `--master-socket`: without an IOMMU it would scribble over guest memory.
    #[arg(long, value_name = "SECTOR:IOVA", value_parser = parse_misdirect, requires = "master_socket")]
    test_misdirect: Option<blk::Misdirect>,
}

fn parse_endpoint_arg(s: &str) -> Result<u32, String> {
    parse_endpoint(s).map_err(|e| e.to_string())
}

fn parse_u64_arg(s: &str) -> Result<u64, String> {
    parse_u64(s).map_err(|e| e.to_string())
}

fn parse_misdirect(s: &str) -> Result<blk::Misdirect, String> {
    let (sector, iova) = s
        .split_once(':')
        .ok_or_else(|| format!("{s}: expected SECTOR:IOVA"))?;
    Ok(blk::Misdirect {
        sector: parse_u64(sector).map_err(|e| e.to_string())?,
        iova: parse_u64(iova).map_err(|e| e.to_string())?,
    })
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), String> {
    let disk = blk::Disk::open(&args.file, args.read_only)
        .map_err(|e| format!("{}: {e}", args.file.display()))?;
    log::info!(
        "{}: {} sectors{}",
        args.file.display(),
        disk.sectors(),
        if args.read_only { ", read-only" } else { "" }
    );
    let master = match (&args.master_socket, args.endpoint) {
        (Some(path), Some(endpoint)) => {
            let master = Master::connect(path).map_err(|e| e.to_string())?;
            let handle = match args.cookie {
                Some(cookie) => master.claim(endpoint, cookie),
                None => master.use_dma_api(endpoint),
            }
            .map_err(|e| format!("endpoint {endpoint:#x}: {e}"))?;
            log::info!(
                "DMA through the virtio-iommu: endpoint {endpoint:#x} (group {}), {}",
                handle.group(),
                match args.cookie {
                    Some(cookie) => format!("claimed under cookie {cookie:#x}"),
                    None => "DMA-API use".to_string(),
                }
            );
            Some((master, Arc::new(handle)))
        }
        _ => None,
    };
    let disk = Arc::new(disk);
    let mut listener = ::vhost::vhost_user::Listener::new(&args.socket, true)
        .map_err(|e| format!("{}: {e}", args.socket.display()))?;
    log::info!("listening on {}", args.socket.display());
    loop {
        let backend = Arc::new(Mutex::new(BlkBackend::new(
            disk.clone(),
            master.as_ref().map(|(_, endpoint)| endpoint.clone()),
            args.test_misdirect,
        )));
        let mut backend_listener =
            ::vhost::vhost_user::BackendListener::new(&mut listener, backend.clone())
                .map_err(|e| format!("listening: {e}"))?;
        let mut handler = loop {
            match backend_listener.accept() {
                Ok(Some(handler)) => break handler,
                Ok(None) => continue,
                Err(e) => return Err(format!("accepting: {e}")),
            }
        };
        log::info!("the VMM connected");
        let end = loop {
            if let Err(e) = handler.handle_request() {
                break e;
            }
        };
        match end {
            ::vhost::vhost_user::Error::Disconnected
            | ::vhost::vhost_user::Error::PartialMessage => {
                log::info!("the VMM disconnected")
            }
            e => log::warn!("vhost-user connection ended: {e}"),
        }
        let served = backend
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .shut_down();
        log::info!(
            "served {} requests ({} failed)",
            served.requests,
            served.failed
        );
        if let Some((master, _)) = &master {
            let s = master.stats();
            log::info!(
                "translations {} (IOTLB misses {}, refused {}), faults reported {} (dropped {})",
                s.translations,
                s.iotlb_misses,
                s.refused,
                s.faults_reported,
                s.faults_dropped
            );
            if master.is_revoked() {
                return Err("the daemon cut this master off, or went away".into());
            }
        }
        if args.once {
            return Ok(());
        }
    }
}
