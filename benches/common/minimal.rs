// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The "minimal backend" baseline of the request-path benchmark: a vhost-user virtio-iommu
//! backend on the same rust-vmm crates that answers OK to every request without a model. It
//! copies each request's readable bytes into a fresh `Vec` (allocates per request, as the
//! throwaway probe of the e2e notes did), writes the OK tail, and signals only when the driver
//! wants it. With `poll` > 0 it spins on the avail ring for that long after work, with
//! notifications off (the probe's "spin 50 us" variant); with 0 it sleeps between kicks.
//!
//! The difference between this and the daemon is what the daemon's own request handling
//! (parsing, the model, replies, stats) costs on top of the vhost-user plumbing.

use std::{
    io,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use vhost::vhost_user::{
    message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures},
    Listener,
};
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

type Mem = GuestMemoryMmap<()>;
type Vring = VringRwLock<GuestMemoryAtomic<Mem>>;

const F_VERSION_1: u64 = 1 << 32;
const F_RING_INDIRECT_DESC: u64 = 1 << 28;
const F_RING_EVENT_IDX: u64 = 1 << 29;
/// INPUT_RANGE, DOMAIN_RANGE, MAP_UNMAP, PROBE.
const DEVICE_FEATURES: u64 = 0b1_0111;

#[derive(Clone)]
struct Minimal {
    mem: Arc<Mutex<Option<GuestMemoryAtomic<Mem>>>>,
    poll: Duration,
}

impl Minimal {
    fn process(&self, vring: &Vring, mem: &Mem) -> io::Result<()> {
        let mut handled = 0usize;
        loop {
            let mut state = vring.get_mut();
            let queue = state.get_queue_mut();
            let _ = queue.disable_notification(mem);
            let mut batch = 0usize;
            while let Some(chain) = queue.pop_descriptor_chain(mem) {
                let head = chain.head_index();
                // Allocates per request, on purpose.
                let mut request = Vec::new();
                let mut writable: Option<(GuestAddress, u32)> = None;
                for desc in chain {
                    if desc.is_write_only() {
                        writable = Some((desc.addr(), desc.len()));
                    } else {
                        let mut buf = vec![0u8; desc.len() as usize];
                        let _ = mem.read_slice(&mut buf, desc.addr());
                        request.extend_from_slice(&buf);
                    }
                }
                std::hint::black_box(&request);
                let used = match writable {
                    Some((addr, len)) if len >= 4 => {
                        let _ =
                            mem.write_slice(&[0u8; 4], GuestAddress(addr.0 + u64::from(len) - 4));
                        len
                    }
                    _ => 0,
                };
                let _ = queue.add_used(mem, head, used);
                batch += 1;
            }
            let signal = batch > 0 && needs_signal(queue, mem);
            drop(state);
            if signal {
                vring.signal_used_queue()?;
            }
            handled += batch;
            if handled > 0 && self.poll > Duration::ZERO && poll_avail(vring, mem, self.poll) {
                continue;
            }
            let mut state = vring.get_mut();
            match state.get_queue_mut().enable_notification(mem) {
                Ok(true) => continue,
                _ => break,
            }
        }
        Ok(())
    }
}

fn needs_signal(queue: &mut virtio_queue::Queue, mem: &Mem) -> bool {
    if queue.event_idx_enabled() {
        return queue.needs_notification(mem).unwrap_or(true);
    }
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    match mem.read_obj::<u16>(GuestAddress(queue.avail_ring())) {
        Ok(flags) => u16::from_le(flags) & 1 == 0,
        Err(_) => true,
    }
}

fn poll_avail(vring: &Vring, mem: &Mem, window: Duration) -> bool {
    let deadline = Instant::now() + window;
    let mut spins = 0u32;
    loop {
        {
            let state = vring.get_ref();
            let queue = state.get_queue();
            match queue.avail_idx(mem, std::sync::atomic::Ordering::Acquire) {
                Ok(idx) if idx.0 != queue.next_avail() => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
        spins += 1;
        if spins % 64 == 0 && Instant::now() >= deadline {
            return false;
        }
        std::hint::spin_loop();
    }
}

impl VhostUserBackend for Minimal {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        2
    }

    fn max_queue_size(&self) -> usize {
        1024
    }

    fn features(&self) -> u64 {
        F_VERSION_1
            | F_RING_INDIRECT_DESC
            | F_RING_EVENT_IDX
            | DEVICE_FEATURES
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn set_event_idx(&self, _enabled: bool) {}

    fn get_config(&self, _offset: u32, size: u32) -> Vec<u8> {
        vec![0; size as usize]
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<Mem>) -> io::Result<()> {
        *self.mem.lock().unwrap() = Some(mem);
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        _thread_id: usize,
    ) -> io::Result<()> {
        let Some(atomic) = self.mem.lock().unwrap().clone() else {
            return Ok(());
        };
        let mem = atomic.memory();
        if device_event == 0 && vrings[0].get_ref().get_queue().ready() {
            self.process(&vrings[0], &mem)?;
        }
        Ok(())
    }
}

/// Serves one frontend after another on `socket` until killed.
pub fn serve(socket: &Path, poll: Duration) -> ! {
    let mut listener = Listener::new(socket, true).expect("minimal backend: bind");
    loop {
        let backend = Minimal {
            mem: Arc::default(),
            poll,
        };
        let mut daemon = VhostUserDaemon::new(
            "minimal-backend".into(),
            backend,
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .expect("minimal backend: daemon");
        daemon.start(&mut listener).expect("minimal backend: start");
        let _ = daemon.wait();
    }
}
