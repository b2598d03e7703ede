// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The request-queue engine: from a kick to the used entries.
//!
//! A pass takes the available chains of the request queue, checks and parses each one,
//! applies it to the model ([`crate::request`]), journals the pass (`--state-file`), waits for
//! the grace period that makes UNMAPs and DETACHes safe, and only then publishes the used
//! entries and signals the driver. Chains go through the ring fast path (`ring.rs`) when
//! they have the shape Linux's driver uses, through virtio-queue otherwise. Between bursts the
//! worker polls the available ring for a while before it sleeps in epoll. The event queue's
//! side is here too: fault records from the backlog ([`crate::faults`]) written into the
//! buffers the driver posted.

use std::{
    io,
    sync::atomic::Ordering::{Acquire, Relaxed},
    time::Duration,
};

use vhost_user_backend::VringT;
use virtio::{FaultRecord, RequestType, Status, FAULT_SIZE, TAIL_SIZE};
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::device::{Device, Journal, RingStop, Vring};
use crate::dirty::GuestMemory;
use crate::ring::{ReplySink, MAX_READABLE};
use crate::{
    log_limited,
    pacing::{Pacer, PollEnd, Probe},
    request::{self, Reply},
    ring::{self, FastChain, RegionCache, RingKey, Rings, SliceWriter},
    statefile::QueuePosition,
    stats::Pacing,
};

/// Writable descriptors accepted in one chain (Linux uses one).
pub(crate) const MAX_WRITABLE_SEGMENTS: usize = 16;

/// Largest device-writable area the device fills (the tail sits at its end).
pub const MAX_WRITABLE: usize = 64 * 1024;

thread_local! {
    /// PROBE properties are encoded here (probe_size bytes; untouched by other requests).
    static PROBE_SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    /// Used elements of a pass, published after its grace period (grows to the queue size once).
    static USED_SCRATCH: std::cell::RefCell<Vec<(u16, u32)>> = const { std::cell::RefCell::new(Vec::new()) };
    /// The request worker's poll window and timing samples.
    static PACER: std::cell::RefCell<Option<Pacer>> = const { std::cell::RefCell::new(None) };
}

/// How a call of [`Device::process_requests`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LoopEnd {
    /// Nothing left to do: notifications are on (or the queue is off).
    Asleep,
    /// The memory table was replaced: call again with a snapshot of the new one.
    MemoryReplaced,
}

/// What the ring fast path keeps from one chain to the next: the memory region of the last
/// buffer, and the chain being parsed.
#[derive(Default)]
pub(crate) struct FastScratch<'m> {
    cache: RegionCache<'m>,
    chain: FastChain<'m>,
}

/// Why a queue cannot be used now, if it cannot: checked before touching it, so that a broken
/// ring costs one look per kick and never a loop (virtio-queue's own checks log errors without
/// a rate limit).
pub(crate) fn ring_problem(queue: &virtio_queue::Queue, mem: &GuestMemory) -> Option<String> {
    if !queue.ready() {
        return Some("not ready".into());
    }
    let size = u64::from(queue.size());
    let rings = [
        ("descriptor table", queue.desc_table(), 16 * size),
        ("available ring", queue.avail_ring(), 6 + 2 * size),
        ("used ring", queue.used_ring(), 6 + 8 * size),
    ];
    if queue.avail_ring() == 0 {
        return Some("no available ring address".into());
    }
    for (what, addr, len) in rings {
        if !mem.check_range(GuestAddress(addr), len as usize) {
            return Some(format!("{what} {addr:#x}+{len:#x} outside guest memory"));
        }
    }
    match queue.avail_idx(mem, std::sync::atomic::Ordering::Acquire) {
        Ok(idx) if (idx - std::num::Wrapping(queue.next_avail())).0 > queue.size() => {
            Some(format!(
                "available index {} is more than the queue size ahead of {}",
                idx.0,
                queue.next_avail()
            ))
        }
        Ok(_) => None,
        Err(e) => Some(format!("available index unreadable: {e}")),
    }
}

/// Turns the driver's notifications back on (`VRING_USED_F_NO_NOTIFY` cleared, or with
/// EVENT_IDX `avail_event` set to the next entry), then looks at the available index once
/// more: true when buffers arrived meanwhile, which the caller must process since their driver
/// may have seen notifications off and not kicked. A stopped queue is left alone: its ring
/// belongs to the frontend again, and a restart runs a pass.
pub(crate) fn rearm(queue: &mut virtio_queue::Queue, mem: &GuestMemory) -> bool {
    if !queue.ready() {
        return false;
    }
    match queue.enable_notification(mem) {
        Ok(arrived) => arrived,
        Err(e) => {
            log_limited!(log::Level::Warn, "enable_notification: {e}");
            false
        }
    }
}

/// Whether the driver wants an interrupt for what was just used. virtio-queue honours
/// `used_event` with EVENT_IDX but ignores `VRING_AVAIL_F_NO_INTERRUPT` without it; Linux sets
/// that flag on the request queue (it polls), so honour it here.
pub(crate) fn needs_signal(queue: &mut virtio_queue::Queue, mem: &GuestMemory) -> bool {
    if queue.event_idx_enabled() {
        return queue.needs_notification(mem).unwrap_or(true);
    }
    const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    match mem.read_obj::<u16>(GuestAddress(queue.avail_ring())) {
        Ok(flags) => u16::from_le(flags) & VRING_AVAIL_F_NO_INTERRUPT == 0,
        Err(_) => true,
    }
}

/// Writes a fast pass's used elements, then the used index once (Release), and keeps the
/// queue's `next_used` current. A head outside the queue is refused as `add_used` refuses it.
pub(crate) fn publish_used(
    queue: &mut virtio_queue::Queue,
    rings: &Rings<'_>,
    done: &mut Vec<(u16, u32)>,
) {
    let old = queue.next_used();
    let mut idx = old;
    for (head, used) in done.drain(..) {
        if head >= rings.size() || !rings.put_used(idx, head, used) {
            log_limited!(log::Level::Warn, "used ring write failed");
            continue;
        }
        idx = idx.wrapping_add(1);
    }
    if idx != old {
        if !rings.publish_used(idx) {
            log_limited!(log::Level::Warn, "used ring write failed");
        }
        queue.set_next_used(idx);
    }
}

/// [`needs_signal`] for a fast pass that moved the used index from `old` to the queue's
/// `next_used`: with EVENT_IDX, whether `used_event` lies in `[old, new)`; without it, whether
/// the driver left `VRING_AVAIL_F_NO_INTERRUPT` clear.
pub(crate) fn needs_signal_fast(queue: &virtio_queue::Queue, rings: &Rings<'_>, old: u16) -> bool {
    // The used index store must be visible before the driver's wish is read.
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    if queue.event_idx_enabled() {
        rings
            .used_event()
            .is_none_or(|event| ring::need_event(event, queue.next_used(), old))
    } else {
        rings
            .avail_flags()
            .is_none_or(|flags| flags & ring::VRING_AVAIL_F_NO_INTERRUPT == 0)
    }
}

/// Writes sequentially across the device-writable buffers of a chain.
pub(crate) struct SegmentWriter<'a> {
    mem: &'a GuestMemory,
    segments: &'a [(GuestAddress, usize)],
    index: usize,
    offset: usize,
}

impl<'a> SegmentWriter<'a> {
    pub(crate) fn new(mem: &'a GuestMemory, segments: &'a [(GuestAddress, usize)]) -> Self {
        SegmentWriter {
            mem,
            segments,
            index: 0,
            offset: 0,
        }
    }
}

impl ReplySink for SegmentWriter<'_> {
    fn write(&mut self, mut bytes: &[u8]) -> bool {
        while !bytes.is_empty() {
            let Some(&(addr, len)) = self.segments.get(self.index) else {
                return false;
            };
            let take = (len - self.offset).min(bytes.len());
            let at = GuestAddress(addr.0 + self.offset as u64);
            if self.mem.write_slice(&bytes[..take], at).is_err() {
                return false;
            }
            bytes = &bytes[take..];
            self.offset += take;
            if self.offset == len {
                self.index += 1;
                self.offset = 0;
            }
        }
        true
    }
}

/// Writes one fault record into an event buffer; 0 when the buffer cannot hold it whole.
pub(crate) fn write_fault<M>(
    mem: &GuestMemory,
    chain: DescriptorChain<M>,
    record: &FaultRecord,
) -> u32
where
    M: std::ops::Deref<Target = GuestMemory>,
{
    let mut segments = [(GuestAddress(0), 0usize); 8];
    let mut n = 0;
    let mut total = 0usize;
    for desc in chain.writable() {
        let (addr, len) = (desc.addr(), desc.len() as usize);
        if n == segments.len() || !mem.check_range(addr, len) {
            return 0;
        }
        segments[n] = (addr, len);
        n += 1;
        total += len;
    }
    if total < FAULT_SIZE {
        return 0;
    }
    if SegmentWriter::new(mem, &segments[..n]).write(&record.to_bytes()) {
        FAULT_SIZE as u32
    } else {
        0
    }
}

impl Device {
    /// The request queue stopped at `stop` (GET_VRING_BASE, or the position a restarted
    /// daemon found in its state file).
    pub(crate) fn queue_stopped(&self, stop: RingStop) {
        *self.stopped.lock().unwrap_or_else(|e| e.into_inner()) = Some(stop);
        self.stop_pending.store(true, Relaxed);
    }

    /// Handles one request chain; returns the used length. Never panics on guest input.
    pub fn process_chain<M>(&self, mem: &GuestMemory, chain: DescriptorChain<M>) -> u32
    where
        M: std::ops::Deref<Target = GuestMemory>,
    {
        self.process_chain_at(mem, chain, 0, None)
    }

    /// [`Device::process_chain`] for the chain at ring position `position`, journaled in
    /// `journal` (`--state-file`) when there is one.
    pub(crate) fn process_chain_at<M>(
        &self,
        mem: &GuestMemory,
        chain: DescriptorChain<M>,
        position: u16,
        journal: Option<&mut Journal>,
    ) -> u32
    where
        M: std::ops::Deref<Target = GuestMemory>,
    {
        let mut readable = [0u8; MAX_READABLE];
        let mut readable_len = 0usize;
        let mut segments = [(GuestAddress(0), 0usize); MAX_WRITABLE_SEGMENTS];
        let mut n_segments = 0;
        let mut writable_len = 0usize;
        for desc in chain {
            let (addr, len) = (desc.addr(), desc.len() as usize);
            // Writable buffers are checked before the request is applied, so a reply can
            // always be written; a readable one is checked by reading it (in full when short).
            let read_whole = !desc.is_write_only() && len <= MAX_READABLE - readable_len;
            if !read_whole && !mem.check_range(addr, len) {
                return self.malformed(format_args!(
                    "buffer {:#x}+{len:#x} outside guest memory",
                    addr.0
                ));
            }
            if desc.is_write_only() {
                if n_segments == MAX_WRITABLE_SEGMENTS {
                    return self.malformed(format_args!(
                        "more than {MAX_WRITABLE_SEGMENTS} writable buffers"
                    ));
                }
                if len > 0 {
                    segments[n_segments] = (addr, len);
                    n_segments += 1;
                }
                writable_len = writable_len.saturating_add(len);
            } else {
                if writable_len > 0 {
                    return self
                        .malformed(format_args!("device-readable buffer after a writable one"));
                }
                let take = len.min(MAX_READABLE - readable_len);
                if take > 0
                    && mem
                        .read_slice(&mut readable[readable_len..readable_len + take], addr)
                        .is_err()
                {
                    return self.malformed(format_args!("unreadable buffer at {:#x}", addr.0));
                }
                readable_len += take;
            }
        }
        if writable_len > MAX_WRITABLE {
            return self.malformed(format_args!("writable area of {writable_len} bytes"));
        }
        let mut sink = SegmentWriter::new(mem, &segments[..n_segments]);
        self.answer(
            &readable[..readable_len],
            writable_len,
            &mut sink,
            position,
            journal,
        )
    }

    /// Applies one checked request (its device-readable bytes, the size of its writable area,
    /// its ring position) and writes the reply through `sink`; returns the used length. The
    /// model's lock is held for the request only, not while the reply is written. With a
    /// journal, a request that reached the model is recorded with its status, and one the
    /// journal says was answered before a restart gets that status again.
    pub(crate) fn answer<S: ReplySink>(
        &self,
        readable: &[u8],
        writable_len: usize,
        sink: &mut S,
        position: u16,
        mut journal: Option<&mut Journal>,
    ) -> u32 {
        let features = self.acked.load(Relaxed);
        let probe_size = self.probe_size;
        let mut handle = |properties: &mut [u8]| {
            let earlier = journal.as_deref();
            let mut repeated = None;
            let reply = request::handle_once(
                &mut self.iommu(),
                readable,
                writable_len,
                features,
                probe_size,
                properties,
                |request| {
                    let status = earlier.and_then(|j| j.answered(position, request));
                    repeated = status.map(|_| *request);
                    status
                },
            );
            if let (
                Some(j),
                Reply::Status {
                    status, applied, ..
                },
            ) = (journal.as_deref_mut(), &reply)
            {
                match applied {
                    Some(request) if !j.file.request(position, request, *status) => {
                        log_limited!(
                            log::Level::Error,
                            "state file journal full: {request:?} not recorded"
                        );
                    }
                    None => {
                        if let Some(request) = repeated {
                            self.stats.state_replayed.fetch_add(1, Relaxed);
                            j.file.repeat(position, &request, *status);
                        }
                    }
                    _ => {}
                }
            }
            self.reply(sink, writable_len, reply, properties, readable)
        };
        if readable.first() == Some(&(RequestType::Probe as u8)) {
            PROBE_SCRATCH.with_borrow_mut(|scratch| {
                scratch.resize(probe_size as usize, 0);
                handle(scratch)
            })
        } else {
            handle(&mut [])
        }
    }

    /// Writes a reply: PROBE properties (P8: zero-filled to probe_size), zeros, and the tail in
    /// the last 4 bytes. The whole writable area is written and reported as used, since Linux
    /// copies a request's status back only when the used length covers it.
    pub(crate) fn reply<S: ReplySink>(
        &self,
        w: &mut S,
        writable_len: usize,
        reply: Reply,
        properties: &[u8],
        readable: &[u8],
    ) -> u32 {
        match reply {
            Reply::Nothing(err) => {
                let kind = readable
                    .first()
                    .and_then(|&t| RequestType::try_from(t).ok());
                self.stats.count_no_reply(kind);
                log_limited!(log::Level::Warn, "request returned unanswered: {err}");
                0
            }
            Reply::Status {
                request,
                status,
                properties: used,
                error,
                ..
            } => {
                self.stats.count_reply(request, status);
                if let Some(error) = error {
                    log_limited!(log::Level::Warn, "{request:?} -> {status}: {error}");
                }
                let body = writable_len - TAIL_SIZE;
                let props = if used > 0 {
                    properties.len().min(body)
                } else {
                    0
                };
                if w.write(&properties[..props])
                    && w.zeros(body - props)
                    && w.write(&Status::tail(status))
                {
                    writable_len as u32
                } else {
                    self.malformed(format_args!("writable buffer vanished"))
                }
            }
        }
    }

    pub(crate) fn malformed(&self, what: std::fmt::Arguments<'_>) -> u32 {
        self.stats.malformed_chains.fetch_add(1, Relaxed);
        log_limited!(
            log::Level::Warn,
            "malformed request chain returned unanswered: {what}"
        );
        0
    }

    /// Processes the request queue until it is empty and, with polling on, stays empty for
    /// the poll window; `mem` is the snapshot of guest memory taken at memory epoch `epoch`.
    ///
    /// A disabled queue (`SET_VRING_ENABLE` 0) is not touched, and a loop that finds its
    /// queue disabled ends (enabling it again runs a pass). A loop that finds the memory
    /// table replaced returns [`LoopEnd::MemoryReplaced`] for the caller to start over on the
    /// new snapshot: under a steady load the loop would otherwise poll on, and answer, with a
    /// table the frontend has replaced.
    ///
    /// Every pass runs with notifications off, and the loop ends only once they are back on
    /// and the ring was looked at after that ([`rearm`]): a driver that made a buffer
    /// available while they were off saw no need to kick, so that buffer is this loop's to
    /// find.
    ///
    /// A ring the device cannot use (not ready, outside guest memory, an avail index running
    /// more than the queue size ahead) is left alone until the next kick: the loop goes round
    /// again only after a pass that made progress or after a re-check that saw the driver
    /// publish buffers, and a pass that finds nothing after such a re-check ends it (a driver
    /// that really published is always served by that pass), so no guest can make it spin.
    ///
    /// Passes run on the ring fast path (`ring.rs`: rings resolved to host memory once per
    /// layout, simple chains parsed straight from the descriptor table, used elements and the
    /// used index written once per pass) whenever the rings lie inside single memory regions
    /// and `--ring-fast-path` is on; any chain that is not the simple case goes through
    /// virtio-queue and [`Device::process_chain`], exactly as on the slow path.
    pub(crate) fn process_requests(
        &self,
        vring: &Vring,
        mem: &GuestMemory,
        epoch: u64,
    ) -> io::Result<LoopEnd> {
        PACER.with_borrow_mut(|pacer| {
            let pacer = match pacer {
                Some(p) if p.policy() == self.poll => p,
                _ => pacer.insert(Pacer::new(self.poll)),
            };
            pacer.woke(&self.stats.pacing);
            self.request_loop(vring, mem, epoch, pacer)
        })
    }

    /// [`Device::process_requests`] with the worker's pacer.
    fn request_loop(
        &self,
        vring: &Vring,
        mem: &GuestMemory,
        epoch: u64,
        pacer: &mut Pacer,
    ) -> io::Result<LoopEnd> {
        let pacing = &self.stats.pacing;
        let mut handled = 0usize;
        // How the next pass's requests were found.
        let mut found = Found::Woken;
        // The last poll window found nothing.
        let mut empty_window = false;
        // Resolved for this memory snapshot; re-resolved when the ring layout changes.
        let mut rings: Option<Rings<'_>> = None;
        let mut scratch = FastScratch::default();
        // This pass follows a re-check that saw buffers arrive: it must find them.
        let mut after_recheck = false;
        loop {
            pacer.pass_starts();
            let mut state = vring.get_mut();
            if self.memory_epoch.load(Acquire) != epoch {
                return Ok(LoopEnd::MemoryReplaced);
            }
            if !state.is_enabled() {
                break;
            }
            let queue = state.get_queue_mut();
            if self.ring_fast_path
                && queue.ready()
                && rings.is_none_or(|r| r.key != RingKey::of(queue))
            {
                rings = Rings::new(queue, mem);
            }
            let fast = rings.filter(|_| queue.ready());
            // With a resolved view only the avail index can have gone wrong since.
            let usable = match fast {
                Some(r) => r
                    .avail_idx(std::sync::atomic::Ordering::Acquire)
                    .is_some_and(|idx| idx.wrapping_sub(queue.next_avail()) <= r.size()),
                None => false,
            };
            if !usable {
                if let Some(problem) = ring_problem(queue, mem) {
                    if queue.ready() {
                        self.stats.broken_rings.fetch_add(1, Relaxed);
                        log_limited!(log::Level::Warn, "request queue unusable: {problem}");
                        // Left alone until the next kick, which notifications must allow.
                        let _ = queue.enable_notification(mem);
                    }
                    break;
                }
            }
            // Notifications off while there is work; the driver need not kick.
            let _ = queue.disable_notification(mem);
            let old_used = queue.next_used();
            // With a state file, the pass's records are committed before any of its used
            // entries is published; there is room for a whole pass before it starts.
            let mut journal = self.journal();
            if let Some(j) = journal.as_deref_mut() {
                if j.file.free_records() <= usize::from(queue.size()) + 1 {
                    let at = j.file.position();
                    self.compact(j, at);
                }
            }
            // The pass's requests share one grace period (the IOTLB-sync rule): none is
            // reported complete before every translation they took away is gone.
            let batch = USED_SCRATCH.with_borrow_mut(|done| {
                self.iommu().begin_batch();
                match fast {
                    Some(r) => {
                        self.fast_pass(queue, mem, &r, &mut scratch, done, journal.as_deref_mut())
                    }
                    None => loop {
                        let position = queue.next_avail();
                        let Some(chain) = queue.pop_descriptor_chain(mem) else {
                            break;
                        };
                        let head = chain.head_index();
                        let used =
                            self.process_chain_at(mem, chain, position, journal.as_deref_mut());
                        done.push((head, used));
                    },
                }
                self.iommu().end_batch();
                let n = done.len();
                if let Some(j) = journal.as_deref_mut().filter(|_| n > 0) {
                    let at = QueuePosition::new(queue.next_avail(), RingKey::of(queue));
                    if !j.file.commit(at) {
                        log_limited!(log::Level::Error, "state file journal full: pass lost");
                    }
                    if let Some(n) = j.crash_after.as_mut() {
                        *n = n.saturating_sub(1);
                        if *n == 0 {
                            std::process::abort();
                        }
                    }
                    // The requests that could come again after a restart came in this pass.
                    j.replay.clear();
                }
                drop(journal.take());
                match fast {
                    Some(r) => publish_used(queue, &r, done),
                    None => {
                        for (head, used) in done.drain(..) {
                            if queue.add_used(mem, head, used).is_err() {
                                log_limited!(log::Level::Warn, "used ring write failed");
                            }
                        }
                    }
                }
                n
            });
            let signal = batch > 0
                && match fast {
                    Some(r) => needs_signal_fast(queue, &r, old_used),
                    None => needs_signal(queue, mem),
                };
            if batch == 0 {
                // Nothing could be popped: sleep until the next kick, unless buffers arrived
                // while notifications were off (their driver did not kick).
                if rearm(queue, mem) && !after_recheck {
                    after_recheck = true;
                    found = Found::Rechecked;
                    continue;
                }
                break;
            }
            pacer.pass_published(pacing);
            after_recheck = false;
            let next_avail = queue.next_avail();
            drop(state);
            if signal {
                vring.signal_used_queue()?;
            }
            handled += batch;
            match found {
                Found::Woken => Pacing::add(&pacing.woken_requests, batch as u64),
                Found::Polled => Pacing::add(&self.stats.polled_requests, batch as u64),
                Found::Rechecked => Pacing::add(&pacing.rechecked_requests, batch as u64),
            }
            if self.poll.budget > Duration::ZERO {
                let end = match fast {
                    Some(r) => pacer.poll(pacing, |spins| {
                        self.probe_avail_fast(vring, &r, next_avail, epoch, spins)
                    }),
                    None => pacer.poll(pacing, |_| self.probe_avail(vring, mem, epoch)),
                };
                empty_window = matches!(end, PollEnd::Empty | PollEnd::LostCpu);
                if end == PollEnd::Moved {
                    found = Found::Polled;
                    continue;
                }
            }
            let mut state = vring.get_mut();
            if !state.is_enabled() || !rearm(state.get_queue_mut(), mem) {
                break;
            }
            // Buffers arrived while notifications were off: go again.
            after_recheck = true;
            found = Found::Rechecked;
        }
        if handled == 0 {
            self.stats.spurious_wakeups.fetch_add(1, Relaxed);
        }
        pacer.sleeping(pacing, empty_window);
        Ok(LoopEnd::Asleep)
    }

    /// One pass on the fast path: every chain the driver made available (at most a queue's
    /// worth), simple chains straight from the rings, the others through virtio-queue. Used
    /// elements go to `done`; the queue's `next_avail` is kept current.
    pub(crate) fn fast_pass<'m>(
        &self,
        queue: &mut virtio_queue::Queue,
        mem: &'m GuestMemory,
        rings: &Rings<'m>,
        scratch: &mut FastScratch<'m>,
        done: &mut Vec<(u16, u32)>,
        mut journal: Option<&mut Journal>,
    ) {
        let size = rings.size();
        let FastScratch { cache, chain } = scratch;
        let mut next = queue.next_avail();
        'pass: while done.len() < usize::from(size) {
            let Some(avail) = rings.avail_idx(std::sync::atomic::Ordering::Acquire) else {
                break;
            };
            let pending = avail.wrapping_sub(next);
            // More than a queue ahead: the next pass's check reports it.
            if pending == 0 || pending > size {
                break;
            }
            for _ in 0..pending {
                if done.len() == usize::from(size) {
                    break 'pass;
                }
                let simple = rings
                    .avail_entry(next)
                    .filter(|&head| head < size)
                    .filter(|&head| rings.parse(mem, cache, head, chain).is_some())
                    .filter(|_| chain.writable_len <= MAX_WRITABLE);
                match simple {
                    Some(head) => {
                        let readable = &chain.readable[..chain.readable_len];
                        let mut sink = SliceWriter::new(&chain.writable[..chain.n_writable]);
                        let used = self.answer(
                            readable,
                            chain.writable_len,
                            &mut sink,
                            next,
                            journal.as_deref_mut(),
                        );
                        next = next.wrapping_add(1);
                        done.push((head, used));
                    }
                    None => {
                        // Not the simple case: virtio-queue's chain and the slow path's
                        // checks decide (the same entry, read again).
                        queue.set_next_avail(next);
                        let Some(slow) = queue.pop_descriptor_chain(mem) else {
                            break 'pass;
                        };
                        let head = slow.head_index();
                        let used = self.process_chain_at(mem, slow, next, journal.as_deref_mut());
                        done.push((head, used));
                        next = queue.next_avail();
                    }
                }
            }
        }
        queue.set_next_avail(next);
    }

    /// One look at the avail ring during a poll window: [`Probe::Moved`] when the avail index
    /// moved or the memory table was replaced (the next pass checks both before using the
    /// ring), [`Probe::Stop`] when the queue is off or its ring unreadable.
    pub(crate) fn probe_avail(&self, vring: &Vring, mem: &GuestMemory, epoch: u64) -> Probe {
        let state = vring.get_ref();
        let queue = state.get_queue();
        if !queue.ready() || !state.is_enabled() {
            return Probe::Stop;
        }
        if self.memory_epoch.load(Acquire) != epoch {
            return Probe::Moved;
        }
        match queue.avail_idx(mem, std::sync::atomic::Ordering::Acquire) {
            Ok(idx) if idx.0 != queue.next_avail() => Probe::Moved,
            Ok(_) => Probe::Nothing,
            Err(_) => Probe::Stop,
        }
    }

    /// [`Device::probe_avail`] on a resolved ring: reads the avail index in host memory and
    /// looks at the queue (under its lock) only every 64 spins, to notice a stop, a disable,
    /// a reset, moved rings or a new memory table (all reported as [`Probe::Moved`] for the
    /// next pass to check, or [`Probe::Stop`]).
    pub(crate) fn probe_avail_fast(
        &self,
        vring: &Vring,
        rings: &Rings<'_>,
        next_avail: u16,
        epoch: u64,
        spins: u32,
    ) -> Probe {
        match rings.avail_idx(std::sync::atomic::Ordering::Acquire) {
            Some(idx) if idx != next_avail => return Probe::Moved,
            Some(_) => {}
            None => return Probe::Stop,
        }
        if spins % 64 == 63 {
            let state = vring.get_ref();
            let queue = state.get_queue();
            if !queue.ready() || !state.is_enabled() {
                return Probe::Stop;
            }
            if RingKey::of(queue) != rings.key
                || queue.next_avail() != next_avail
                || self.memory_epoch.load(Acquire) != epoch
            {
                return Probe::Moved;
            }
        }
        Probe::Nothing
    }

    /// Writes waiting fault records into the buffers the driver posted on the event queue.
    /// A buffer is taken before a record, so a record leaves the backlog only to be written.
    ///
    /// Records that wait with no buffer posted must not wait for a kick the driver does not
    /// send: notifications go back on (with EVENT_IDX, `avail_event` names the next buffer;
    /// without it `VRING_USED_F_NO_NOTIFY` is never set here) and the ring is looked at again
    /// ([`rearm`]). A re-check that saw buffers arrive is followed by a round that takes one,
    /// or the call ends: a broken ring cannot make it spin.
    pub(crate) fn deliver_faults(&self, vring: &Vring, mem: &GuestMemory) -> io::Result<()> {
        let mut returned = 0u64;
        let mut state = vring.get_mut();
        if !state.is_enabled() {
            // Re-enabling the queue runs this again.
            return Ok(());
        }
        let queue = state.get_queue_mut();
        let mut after_recheck = false;
        loop {
            if self.faults.is_empty() || ring_problem(queue, mem).is_some() {
                break;
            }
            let taken = self.fill_event_buffers(queue, mem);
            returned += taken;
            if self.faults.is_empty() || (taken == 0 && after_recheck) || !rearm(queue, mem) {
                break;
            }
            after_recheck = true;
        }
        let notify = returned > 0 && queue.needs_notification(mem).unwrap_or(true);
        drop(state);
        if notify {
            vring.signal_used_queue()?;
        }
        Ok(())
    }

    /// Writes records into event buffers until one or the other runs out; returns how many
    /// buffers went back to the driver.
    pub(crate) fn fill_event_buffers(
        &self,
        queue: &mut virtio_queue::Queue,
        mem: &GuestMemory,
    ) -> u64 {
        let mut returned = 0;
        while !self.faults.is_empty() {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let Some(taken) = self.faults.pop() else {
                // Cleared meanwhile (reset): give the buffer back untouched.
                queue.go_to_previous_position();
                break;
            };
            let used = write_fault(mem, chain, &taken);
            if used == 0 {
                // Spec E5: never split a record; keep it for a big enough buffer.
                self.faults.unpop(taken);
                log_limited!(
                    log::Level::Warn,
                    "event buffer too small for a fault record"
                );
            } else {
                self.faults.delivered(taken);
            }
            let _ = queue.add_used(mem, head, used);
            returned += 1;
        }
        returned
    }
}
/// How the requests of a pass were found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Found {
    /// By the first pass after the worker woke up (a kick).
    Woken,
    /// By polling the avail ring after a pass.
    Polled,
    /// By the look at the ring after notifications went back on.
    Rechecked,
}
