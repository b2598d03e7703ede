// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The model's readers' words in a shared file: the writer on read-write mappings, a "DMA
//! master" on read-only mappings of the same file, translating with [`RemoteTables`]: the same
//! answers as an in-process translator, and the writer's grace periods wait for its sections.

use std::{
    os::fd::{AsFd, OwnedFd},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use shm::{Access as Prot, Words};

use super::super::*;
use crate::{
    epoch::RemoteReaders,
    remote::{RemoteEndpoint, RemoteTables},
};

const RW: Perms = Perms::RW;
const COOKIE: u64 = 0x5eed;

fn topology() -> Topology {
    Topology::builder()
        .endpoints([1, 2, 3])
        .group([2, 3])
        .region(1, X86_MSI_REGION)
        .limits(Limits {
            max_table_bytes: 4 << 20,
            ..Limits::default()
        })
        .build()
        .unwrap()
}

fn map(fd: &OwnedFd, layout: &SharedLayout, prot: Prot) -> SharedWords {
    let words = |offset, len: u64| Words::map(fd.as_fd(), offset, len as usize, prot).unwrap();
    SharedWords {
        epoch: words(layout.epoch_offset, layout.epoch_words),
        control: words(layout.control_offset, layout.control_words),
        nodes: words(layout.nodes_offset, layout.nodes_words),
    }
}

/// A model in a memfd, and the tables a master maps from it.
fn shared() -> (Iommu, RemoteTables) {
    let topo = topology();
    let layout = SharedLayout::for_topology(&topo);
    let fd = shm::memfd("ownership-test", layout.file_bytes()).unwrap();
    let iommu = Iommu::try_new_in(topo.clone(), map(&fd, &layout, Prot::ReadWrite)).unwrap();
    let remote = RemoteTables::new(
        &layout,
        map(&fd, &layout, Prot::ReadOnly),
        topo.input_range(),
    )
    .unwrap();
    (iommu, remote)
}

fn endpoint(iommu: &Iommu, id: EndpointId) -> RemoteEndpoint {
    let info = iommu.topology().endpoint(id).unwrap();
    RemoteEndpoint::new(id, info.group.0, info.regions.clone())
}

#[derive(Debug)]
struct Slots {
    words: Words,
    cut: AtomicBool,
}

impl RemoteReaders for Slots {
    fn slot_count(&self) -> usize {
        4
    }
    fn slot(&self, index: usize) -> Option<&AtomicU64> {
        (index < 4).then(|| &self.words[16 * (index + 1)])
    }
    fn cut_off(&self) {
        self.cut.store(true, Ordering::SeqCst);
    }
}

#[test]
fn a_master_translates_what_in_process_readers_translate() {
    let (mut m, remote) = shared();
    let slots = Slots {
        words: Words::anonymous(16 * 5).unwrap(),
        cut: AtomicBool::new(false),
    };
    let slot = slots.slot(0).unwrap();
    m.claim_dma_owner(m.group(1).unwrap(), COOKIE).unwrap();
    m.use_dma_api(2).unwrap();
    let t = m.translator();
    let ep1 = endpoint(&m, 1);
    let ep2 = endpoint(&m, 2);
    let owner = Requester::Owner(COOKIE);
    let check = |m: &Iommu, iovas: &[u64]| {
        let _ = m;
        let e = remote.enter(slot);
        for &iova in iovas {
            for (ep, who) in [
                (&ep1, owner),
                (&ep2, Requester::DmaApi),
                (&ep1, Requester::DmaApi),
            ] {
                for access in [Access::Read, Access::Write] {
                    let theirs = remote
                        .endpoint(ep, who)
                        .and_then(|v| v.translate(iova, 0x3000, access));
                    let ours = t.translate(who, ep.id(), iova, 0x3000, access);
                    assert_eq!(theirs, ours, "{iova:#x} {who:?} {access:?}");
                }
            }
        }
        remote.leave(slot, e);
    };
    let iovas = [
        0,
        0x1000,
        0x1fff,
        0x2000,
        0x20_0000,
        0xfee0_0000,
        0x7f_ffff_f000,
    ];
    check(&m, &iovas);
    m.attach(1, 1, DomainKind::Paging).unwrap();
    m.map(1, 0x1000, 0x2fff, 0x8000, RW).unwrap();
    m.map(1, 0x20_0000, 0x3f_ffff, 0x40_0000, Perms::READ)
        .unwrap();
    m.attach(2, 2, DomainKind::Identity).unwrap();
    check(&m, &iovas);
    m.set_bypass(true);
    m.detach(2, 2).unwrap();
    check(&m, &iovas);
    m.unmap(1, 0x1000, 0x2fff).unwrap();
    check(&m, &iovas);
    m.reset();
    check(&m, &iovas);
    // The master's view of a released group: not its owner any more.
    m.release_dma_owner(m.group(1).unwrap(), COOKIE).unwrap();
    let e = remote.enter(slot);
    assert_eq!(remote.endpoint(&ep1, owner).err(), Some(Fault::NotOwner));
    remote.leave(slot, e);
}

/// An UNMAP returns only after a master's section that could hold the mapping ended; after it,
/// the master's next section finds nothing.
#[test]
fn unmap_waits_for_a_master_section_and_then_it_faults() {
    let (mut m, remote) = shared();
    m.use_dma_api(1).unwrap();
    m.attach(1, 1, DomainKind::Paging).unwrap();
    m.map(1, 0x1000, 0x1fff, 0x8000, RW).unwrap();
    let slots = Arc::new(Slots {
        words: Words::anonymous(16 * 5).unwrap(),
        cut: AtomicBool::new(false),
    });
    let handle = m
        .translator_source()
        .attach_remote(slots.clone(), Duration::from_secs(60));
    let ep = endpoint(&m, 1);
    let remote = Arc::new(remote);
    let (entered_tx, entered_rx) = std::sync::mpsc::channel();
    let (leave_tx, leave_rx) = std::sync::mpsc::channel::<()>();
    let master = {
        let (remote, slots) = (remote.clone(), slots.clone());
        std::thread::spawn(move || {
            let slot = slots.slot(1).unwrap();
            let e = remote.enter(slot);
            let view = remote.endpoint(&ep, Requester::DmaApi).unwrap();
            let t = view.translate(0x1800, 8, Access::Write).unwrap();
            entered_tx.send(t.gpa).unwrap();
            leave_rx.recv().unwrap();
            // Still inside: a new walk may already miss the unlinked mapping, but never finds
            // anything else (nodes are not recycled while the section lasts).
            let again = view.translate(0x1800, 8, Access::Write).map(|t| t.gpa);
            remote.leave(slot, e);
            let e = remote.enter(slot);
            let after = remote
                .endpoint(&ep, Requester::DmaApi)
                .and_then(|v| v.translate(0x1800, 8, Access::Write));
            remote.leave(slot, e);
            (again, after)
        })
    };
    assert_eq!(entered_rx.recv().unwrap(), 0x8800);
    // The clock starts before the thread does: the main thread's 100 ms below count from here.
    let started = Instant::now();
    let unmapper = std::thread::spawn(move || {
        m.unmap(1, 0x1000, 0x1fff).unwrap();
        (started.elapsed(), m)
    });
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        !unmapper.is_finished(),
        "UNMAP answered with a master inside"
    );
    leave_tx.send(()).unwrap();
    let (waited, m) = unmapper.join().unwrap();
    assert!(waited >= Duration::from_millis(100));
    let (again, after) = master.join().unwrap();
    assert!(
        matches!(again, Ok(0x8800) | Err(Fault::Unmapped)),
        "{again:?}"
    );
    assert_eq!(after, Err(Fault::Unmapped));
    assert!(!slots.cut.load(Ordering::SeqCst));
    m.translator_source().detach_remote(&handle);
}

#[test]
fn layouts_that_do_not_match_the_mappings_are_refused() {
    let topo = topology();
    let layout = SharedLayout::for_topology(&topo);
    let fd = shm::memfd("ownership-test", layout.file_bytes()).unwrap();
    let mut short = layout;
    short.nodes_words += pagetable::FANOUT as u64;
    let words = map(&fd, &layout, Prot::ReadOnly);
    assert!(RemoteTables::new(&short, words, topo.input_range()).is_err());
    let words = map(&fd, &layout, Prot::ReadOnly);
    assert!(RemoteTables::new(&layout, words, (2, 1)).is_err());
    // A model refuses words smaller than its topology needs.
    let mut small = map(&fd, &layout, Prot::ReadWrite);
    small.control = Words::anonymous(2).unwrap();
    assert!(Iommu::try_new_in(topo, small).is_err());
}
