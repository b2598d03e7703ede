// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The vhost-user side: the vhost crate's request handler, written out for a device whose ring
//! addresses may be IOVAs.
//!
//! A ring's addresses arrive with `SET_VRING_ADDR` and are only interpreted when the ring
//! starts (`SET_VRING_KICK`), after `SET_FEATURES`: with `VIRTIO_F_ACCESS_PLATFORM` they are
//! IOVAs and stay so (every access goes through `IommuMemory`), without it they are the
//! frontend's virtual addresses, turned into guest-physical ones through the memory table.
//! Each started ring has a worker thread that owns its `Queue`; `GET_VRING_BASE` stops the
//! worker and takes the queue back.

use std::{
    fs::File,
    io::{Read, Write},
    os::fd::AsRawFd,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
};

use ::vhost::{
    vhost_user::{
        message::{
            VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags,
            VhostUserInflight, VhostUserLog, VhostUserMemoryRegion, VhostUserShMemConfig,
            VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVringAddrFlags,
            VhostUserVringState,
        },
        Error, GpuBackend, Result, VhostUserBackendReqHandlerMut, VhostUserProtocolFeatures,
        VhostUserVirtioFeatures,
    },
    VhostUserMemoryRegionBase,
};
use vhost_iommu_client::{Endpoint, IotlbGuard};
use virtio_bindings::{
    virtio_blk::{
        VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    },
    virtio_config::{VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1},
    virtio_ring::VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{
    iommu::{Error as IommuError, IotlbIterator},
    GuestAddress, GuestMemory, GuestMemoryMmap, GuestRegionMmap, Iommu, IommuMemory, MmapRegion,
    Permissions,
};
use vmm_sys_util::{
    epoll::{ControlOperation, Epoll, EpollEvent, EventSet},
    eventfd::{EventFd, EFD_NONBLOCK},
};

use crate::blk::{self, Disk, Misdirect};

/// One request queue (Linux's virtio_blk uses one per vCPU when offered more; one is enough).
const QUEUES: usize = 1;
const MAX_QUEUE_SIZE: u16 = 1024;

/// The client's endpoint, shared between the memory objects of successive memory tables.
#[derive(Debug, Clone)]
pub struct SharedEndpoint(Arc<Endpoint>);

impl Iommu for SharedEndpoint {
    type IotlbGuard<'a> = IotlbGuard<'a>;

    fn translate(
        &self,
        iova: GuestAddress,
        length: usize,
        access: Permissions,
    ) -> std::result::Result<IotlbIterator<IotlbGuard<'_>>, IommuError> {
        Iommu::translate(&*self.0, iova, length, access)
    }
}

/// Guest memory as the device addresses it.
#[derive(Clone)]
enum Memory {
    /// Guest-physical addresses (no ACCESS_PLATFORM).
    Direct(GuestMemoryMmap),
    /// IOVAs, translated through the virtio-iommu.
    Iova(IommuMemory<GuestMemoryMmap, SharedEndpoint>),
}

/// Requests served, over all connections' rings.
#[derive(Debug, Default)]
pub struct Served {
    pub requests: u64,
    pub failed: u64,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    failed: AtomicU64,
}

/// A ring as the frontend set it up.
struct Ring {
    size: u16,
    /// desc, avail, used as the frontend gave them.
    addrs: Option<(u64, u64, u64)>,
    base: u16,
    /// The call eventfd; the frontend may replace it while the ring runs.
    call: Arc<Mutex<Option<File>>>,
    enabled: Arc<AtomicBool>,
    worker: Option<Worker>,
}

impl Ring {
    fn new() -> Ring {
        Ring {
            size: 0,
            addrs: None,
            base: 0,
            call: Arc::new(Mutex::new(None)),
            enabled: Arc::new(AtomicBool::new(false)),
            worker: None,
        }
    }
}

struct Worker {
    /// Wakes the thread: to stop, or to look at the ring after an enable.
    wake: EventFd,
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Queue>,
}

impl Worker {
    /// Stops the thread and returns its queue (None if the thread panicked).
    fn stop(self) -> Option<Queue> {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.wake.write(1);
        self.thread.join().ok()
    }
}

/// The vhost-user device.
pub struct BlkBackend {
    disk: Arc<Disk>,
    endpoint: Option<SharedEndpoint>,
    hook: Option<Misdirect>,
    acked_features: u64,
    acked_protocol: u64,
    /// The memory table: the mapped regions and (user_addr, size, gpa) to translate the
    /// frontend's virtual addresses.
    memory: Option<GuestMemoryMmap>,
    user_regions: Vec<(u64, u64, u64)>,
    rings: Vec<Ring>,
    counters: Arc<Counters>,
}

fn invalid(why: &'static str) -> Error {
    log::warn!("vhost-user: {why}");
    Error::InvalidOperation(why)
}

impl BlkBackend {
    pub fn new(disk: Arc<Disk>, endpoint: Option<Arc<Endpoint>>, hook: Option<Misdirect>) -> Self {
        BlkBackend {
            disk,
            endpoint: endpoint.map(SharedEndpoint),
            hook,
            acked_features: 0,
            acked_protocol: 0,
            memory: None,
            user_regions: Vec::new(),
            rings: (0..QUEUES).map(|_| Ring::new()).collect(),
            counters: Arc::default(),
        }
    }

    fn features(&self) -> u64 {
        let mut f = 1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_FLUSH
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.disk.read_only() {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        if self.endpoint.is_some() {
            f |= 1 << VIRTIO_F_ACCESS_PLATFORM;
        }
        f
    }

    fn access_platform(&self) -> bool {
        self.acked_features & (1 << VIRTIO_F_ACCESS_PLATFORM) != 0
    }

    fn ring(&mut self, index: u32) -> Result<&mut Ring> {
        self.rings
            .get_mut(index as usize)
            .ok_or_else(|| invalid("no such ring"))
    }

    /// A frontend virtual address as a guest-physical one, through the memory table.
    fn va_to_gpa(&self, va: u64) -> Result<u64> {
        self.user_regions
            .iter()
            .find(|&&(user, size, _)| va >= user && va - user < size)
            .map(|&(user, _, gpa)| gpa + (va - user))
            .ok_or_else(|| invalid("a ring address outside the memory table"))
    }

    /// Stops every ring; returns what was served.
    pub fn shut_down(&mut self) -> Served {
        for ring in &mut self.rings {
            if let Some(worker) = ring.worker.take() {
                worker.stop();
            }
        }
        Served {
            requests: self.counters.requests.load(Ordering::Relaxed),
            failed: self.counters.failed.load(Ordering::Relaxed),
        }
    }

    fn start_ring(&mut self, index: usize, kick: File) -> Result<()> {
        let memory = self
            .memory
            .clone()
            .ok_or_else(|| invalid("a ring started before the memory table"))?;
        let ring = self
            .rings
            .get(index)
            .ok_or_else(|| invalid("no such ring"))?;
        let (desc, avail, used) = ring
            .addrs
            .ok_or_else(|| invalid("a ring with no address"))?;
        let (size, base) = (ring.size, ring.base);
        let (memory, desc, avail, used) = if self.access_platform() {
            let endpoint = self
                .endpoint
                .clone()
                .ok_or_else(|| invalid("ACCESS_PLATFORM without an IOMMU"))?;
            let mem = IommuMemory::new(memory, endpoint, true, ());
            (Memory::Iova(mem), desc, avail, used)
        } else {
            let (d, a, u) = (
                self.va_to_gpa(desc)?,
                self.va_to_gpa(avail)?,
                self.va_to_gpa(used)?,
            );
            (Memory::Direct(memory), d, a, u)
        };
        let mut queue = Queue::new(MAX_QUEUE_SIZE).map_err(|_| invalid("queue"))?;
        queue
            .try_set_size(size)
            .map_err(|_| invalid("a bad ring size"))?;
        queue
            .try_set_desc_table_address(GuestAddress(desc))
            .and_then(|()| queue.try_set_avail_ring_address(GuestAddress(avail)))
            .and_then(|()| queue.try_set_used_ring_address(GuestAddress(used)))
            .map_err(|_| invalid("a misaligned ring"))?;
        queue.set_next_avail(base);
        queue.set_next_used(base);
        queue.set_ready(true);
        let ring = &mut self.rings[index];
        let wake = EventFd::new(EFD_NONBLOCK).map_err(Error::ReqHandlerError)?;
        let stop = Arc::new(AtomicBool::new(false));
        let context = WorkerContext {
            index,
            queue,
            memory,
            kick,
            wake: wake.try_clone().map_err(Error::ReqHandlerError)?,
            stop: stop.clone(),
            enabled: ring.enabled.clone(),
            call: ring.call.clone(),
            disk: self.disk.clone(),
            hook: self.hook,
            counters: self.counters.clone(),
        };
        let thread = std::thread::Builder::new()
            .name(format!("blk-ring{index}"))
            .spawn(move || context.run())
            .map_err(Error::ReqHandlerError)?;
        ring.worker = Some(Worker { wake, stop, thread });
        log::info!(
            "ring {index} started: {size} entries, {} addresses desc {desc:#x} avail {avail:#x} \
             used {used:#x}",
            if self.access_platform() {
                "IOVA"
            } else {
                "guest-physical"
            }
        );
        Ok(())
    }
}

struct WorkerContext {
    index: usize,
    queue: Queue,
    memory: Memory,
    kick: File,
    wake: EventFd,
    stop: Arc<AtomicBool>,
    enabled: Arc<AtomicBool>,
    call: Arc<Mutex<Option<File>>>,
    disk: Arc<Disk>,
    hook: Option<Misdirect>,
    counters: Arc<Counters>,
}

impl WorkerContext {
    fn run(mut self) -> Queue {
        if let Err(e) = self.watch() {
            log::error!("ring {}: {e}", self.index);
        }
        self.queue
    }

    fn watch(&mut self) -> std::io::Result<()> {
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            self.kick.as_raw_fd(),
            EpollEvent::new(EventSet::IN, 0),
        )?;
        epoll.ctl(
            ControlOperation::Add,
            self.wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, 1),
        )?;
        let mut events = [EpollEvent::default(); 2];
        loop {
            if self.stop.load(Ordering::SeqCst) {
                return Ok(());
            }
            if self.enabled.load(Ordering::SeqCst) {
                self.process();
            }
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            for event in &events[..n] {
                let mut counter = [0u8; 8];
                if event.data() == 0 {
                    let _ = self.kick.read(&mut counter);
                } else {
                    let _ = self.wake.read();
                }
            }
        }
    }

    /// Serves every available request, then signals the driver if it wants it.
    fn process(&mut self) {
        let used = match &self.memory {
            Memory::Direct(mem) => drain(&mut self.queue, mem, &self.disk, None, &self.counters),
            Memory::Iova(mem) => drain(&mut self.queue, mem, &self.disk, self.hook, &self.counters),
        };
        if used {
            let call = self.call.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(mut call) = call.as_ref() {
                if let Err(e) = call.write_all(&1u64.to_ne_bytes()) {
                    vhost_device_iommu::log_limited!(log::Level::Warn, "call eventfd: {e}");
                }
            }
        }
    }
}

/// Serves the ring until it is empty; says whether the driver should be signalled.
fn drain<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
    disk: &Disk,
    hook: Option<Misdirect>,
    counters: &Counters,
) -> bool {
    let mut used = false;
    loop {
        let chains: Vec<_> = match queue.iter(mem) {
            Ok(iter) => iter.collect(),
            Err(e) => {
                // The available ring cannot be read (refused by the IOMMU, or garbage).
                vhost_device_iommu::log_limited!(log::Level::Warn, "available ring: {e}");
                break;
            }
        };
        if chains.is_empty() {
            break;
        }
        for chain in chains {
            let head = chain.head_index();
            let outcome = blk::serve(chain, disk, hook);
            counters.requests.fetch_add(1, Ordering::Relaxed);
            if outcome.failed {
                counters.failed.fetch_add(1, Ordering::Relaxed);
            }
            if let Err(e) = queue.add_used(mem, head, outcome.written) {
                vhost_device_iommu::log_limited!(log::Level::Warn, "used ring: {e}");
                return used;
            }
            used = true;
        }
    }
    used && queue.needs_notification(mem).unwrap_or(true)
}

impl VhostUserBackendReqHandlerMut for BlkBackend {
    fn set_owner(&mut self) -> Result<()> {
        Ok(())
    }

    fn reset_owner(&mut self) -> Result<()> {
        self.shut_down();
        self.acked_features = 0;
        self.rings = (0..QUEUES).map(|_| Ring::new()).collect();
        Ok(())
    }

    fn reset_device(&mut self) -> Result<()> {
        self.reset_owner()
    }

    fn get_features(&mut self) -> Result<u64> {
        Ok(self.features())
    }

    fn set_features(&mut self, features: u64) -> Result<()> {
        if features & !self.features() != 0 {
            return Err(invalid("features the device did not offer"));
        }
        self.acked_features = features;
        // Without PROTOCOL_FEATURES a ring is enabled as soon as it starts.
        let enabled = features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0;
        for ring in &self.rings {
            if enabled {
                ring.enabled.store(true, Ordering::SeqCst);
            }
        }
        log::info!(
            "features {features:#x}: ACCESS_PLATFORM {}",
            if self.access_platform() { "on" } else { "off" }
        );
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy_listening: Option<bool>,
    ) -> Result<Option<Vec<VhostUserMemoryRegionBase>>> {
        let mut regions = Vec::new();
        let mut user = Vec::new();
        for (region, file) in ctx.iter().zip(files) {
            let mapped: MmapRegion<()> = region.mmap_region(file)?;
            let guest = GuestRegionMmap::new(mapped, GuestAddress(region.guest_phys_addr))
                .ok_or_else(|| invalid("a memory region that wraps around"))?;
            regions.push(guest);
            user.push((region.user_addr, region.memory_size, region.guest_phys_addr));
        }
        let memory = GuestMemoryMmap::from_regions(regions)
            .map_err(|_| invalid("overlapping memory regions"))?;
        self.memory = Some(memory);
        self.user_regions = user;
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> Result<()> {
        let size = u16::try_from(num)
            .ok()
            .filter(|n| n.is_power_of_two() && *n <= MAX_QUEUE_SIZE)
            .ok_or_else(|| invalid("a bad ring size"))?;
        self.ring(index)?.size = size;
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> Result<()> {
        // Kept as given: IOVAs or the frontend's virtual addresses, decided at start.
        self.ring(index)?.addrs = Some((descriptor, available, used));
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> Result<()> {
        self.ring(index)?.base = u16::try_from(base).map_err(|_| invalid("a bad ring base"))?;
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> Result<VhostUserVringState> {
        let ring = self.ring(index)?;
        let base = match ring.worker.take() {
            Some(worker) => match worker.stop() {
                Some(queue) => queue.next_avail(),
                None => ring.base,
            },
            None => ring.base,
        };
        ring.base = base;
        ring.enabled.store(false, Ordering::SeqCst);
        Ok(VhostUserVringState::new(index, u32::from(base)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        let index = usize::from(index);
        let ring = self.ring(index as u32)?;
        if let Some(worker) = ring.worker.take() {
            if let Some(queue) = worker.stop() {
                ring.base = queue.next_avail();
            }
        }
        let kick = fd.ok_or_else(|| invalid("a ring without a kick eventfd (polling)"))?;
        if self.acked_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            self.rings[index].enabled.store(true, Ordering::SeqCst);
        }
        self.start_ring(index, kick)
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        let ring = self.ring(u32::from(index))?;
        *ring.call.lock().unwrap_or_else(|e| e.into_inner()) = fd;
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, _fd: Option<File>) -> Result<()> {
        self.ring(u32::from(index))?;
        Ok(())
    }

    fn get_protocol_features(&mut self) -> Result<VhostUserProtocolFeatures> {
        // BACKEND_REQ (with REPLY_ACK, which the vhost crate adds): QEMU asks for both from a
        // device that offers ACCESS_PLATFORM.
        Ok(VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::BACKEND_REQ)
    }

    fn set_protocol_features(&mut self, features: u64) -> Result<()> {
        self.acked_protocol = features;
        Ok(())
    }

    fn get_queue_num(&mut self) -> Result<u64> {
        Ok(QUEUES as u64)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> Result<()> {
        let ring = self.ring(index)?;
        ring.enabled.store(enable, Ordering::SeqCst);
        if let Some(worker) = &ring.worker {
            // Requests made available while the ring was disabled.
            let _ = worker.wake.write(1);
        }
        Ok(())
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> Result<Vec<u8>> {
        let config = self.disk.config(QUEUES as u16);
        let (offset, size) = (offset as usize, size as usize);
        let mut out = vec![0u8; size];
        if let Some(have) = config.get(offset..) {
            let n = have.len().min(size);
            out[..n].copy_from_slice(&have[..n]);
        }
        Ok(out)
    }

    fn set_config(
        &mut self,
        _offset: u32,
        _buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> Result<()> {
        // Only the writeback field is writable in virtio-blk, and it is not offered.
        Ok(())
    }

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> Result<()> {
        Err(invalid("not a GPU"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> Result<File> {
        Err(invalid("no shared objects"))
    }

    fn get_inflight_fd(
        &mut self,
        _inflight: &VhostUserInflight,
    ) -> Result<(VhostUserInflight, File)> {
        Err(invalid("no inflight tracking"))
    }

    fn set_inflight_fd(&mut self, _inflight: &VhostUserInflight, _file: File) -> Result<()> {
        Err(invalid("no inflight tracking"))
    }

    fn get_max_mem_slots(&mut self) -> Result<u64> {
        Err(invalid("no memory slots"))
    }

    fn add_mem_region(
        &mut self,
        _region: &VhostUserSingleMemoryRegion,
        _fd: File,
        _postcopy_listening: Option<bool>,
    ) -> Result<Option<VhostUserMemoryRegionBase>> {
        Err(invalid("no memory slots"))
    }

    fn remove_mem_region(&mut self, _region: &VhostUserSingleMemoryRegion) -> Result<()> {
        Err(invalid("no memory slots"))
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> Result<Option<File>> {
        Err(invalid("no migration"))
    }

    fn check_device_state(&mut self) -> Result<()> {
        Err(invalid("no migration"))
    }

    fn get_shmem_config(&mut self) -> Result<VhostUserShMemConfig> {
        Err(invalid("no shared memory regions"))
    }

    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> Result<()> {
        Err(invalid("no dirty logging"))
    }
}

impl Drop for BlkBackend {
    fn drop(&mut self) {
        self.shut_down();
    }
}
