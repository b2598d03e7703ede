// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The long randomized reader/writer stress test of the IOTLB-sync rule.
//!
//! Reader threads translate random (endpoint, IOVA) pairs, in sections of every shape (one
//! translation, a guard held across several, an endpoint handle, batches, nested guards,
//! sections that linger, translators cloned, made and dropped inside a section, a guard
//! leaked and its translator dropped), while the writer maps, unmaps, moves groups between
//! paging and identity domains, detaches, resets and toggles bypass, one operation at a time
//! or in `begin_batch`/`end_batch` batches. Trees grow to six levels (IOVAs up to 2^60).
//!
//! The writer numbers its operations 1, 2, ... and publishes two counters: `started` (set
//! before operation k touches the model) and `completed` (set once it returned: for a batch,
//! once `end_batch` returned). Before touching the model it writes down, from the reference
//! model, what operation k changes: every binding (a group to a domain incarnation, a mapping
//! of an incarnation with its GPA, the bypass state) carries the operation that made it live
//! (`from`) and the one that ended it (`until`). Every MAP uses a fresh GPA, so a GPA names
//! one mapping.
//!
//! A reader reads `completed` (c0) before entering a section, `completed` again (c1) inside
//! it just before leaving, and `started` (s) after leaving. Then every answer it got must be
//! explained:
//!
//! - a translation by bindings (group to incarnation, mapping or identity or bypass) made live
//!   no later than operation s and not ended by an operation that completed by c1 (c0 for a
//!   translation outside a guard): a grace period that ends while a reader still holds the
//!   translation, or a recycled node that sends a walk elsewhere, fails here;
//! - a fault by bindings live at some point between operations c0 and s (for `Unmapped`: the
//!   group's incarnation without a mapping at the IOVA at some point in that window).
//!
//! A reader stops everything at the first answer it cannot explain.
//!
//! Knobs (environment): `VHOST_IOMMU_STRESS_SECS` (run time, default 4 s; e.g. 300 for a long
//! run), `VHOST_IOMMU_STRESS_READERS` (reader threads, default 4) and
//! `VHOST_IOMMU_STRESS_SEED` (default: from the clock; printed). Figures are printed at the
//! end (`cargo test -p ownership stress -- --nocapture`).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{
        atomic::{
            fence, AtomicBool, AtomicU64,
            Ordering::{Relaxed, SeqCst},
        },
        Arc, Mutex, RwLock,
    },
    time::{Duration, Instant},
};

use super::super::*;
use crate::reference::{RefDomain, Reference};

const PAGE: u64 = 4096;
const REGION: u64 = 2 << 20;
/// Where the writer maps: a new domain's three-level tree, then trees of four, five and six
/// levels.
const BASES: [u64; 4] = [0, 1 << 39, 1 << 49, 1 << 60];
/// 2 MiB regions used above each base.
const REGIONS: u64 = 2;
/// Pages a MAP starts at in a region (a MAP spans up to 4).
const FIRST_PAGES: u64 = 10;
const INPUT_END: u64 = (1 << 61) - 1;
/// GPAs: a pool that runs blocks can hold and one only full nodes can (at or above 2^50). No
/// IOVA the test uses falls in either, so a GPA in a pool is a mapping's, any other an
/// identity translation's.
const POOLS: [(u64, u64); 2] = [(1 << 42, 1 << 48), (1 << 55, 1 << 59)];
/// Domain IDs the writer uses.
const DOMAINS: u32 = 4;
const ENDPOINTS: [EndpointId; 6] = [1, 2, 3, 4, 5, 6];
/// Endpoint 2's reserved region: pages 6 and 7 of the first region.
const RESERVED: ResvRegion = ResvRegion {
    kind: ResvKind::Reserved,
    start: 6 * PAGE,
    end: 8 * PAGE - 1,
};
/// Recent MAPs' IOVAs readers pick from.
const HINTS: u64 = 64;
/// A domain with this many mappings gets UNMAPs rather than MAPs.
const FULL: usize = 32;
/// Bindings ended this many operations before `completed` are forgotten.
const KEEP: u64 = 50_000;
/// A test thread that makes no progress for this long is stuck.
const STUCK: Duration = Duration::from_secs(20);
/// An op number no operation reaches: "not ended".
const NEVER: u64 = u64::MAX;

fn topology() -> Topology {
    Topology::builder()
        .endpoints(ENDPOINTS)
        .group([3, 4])
        .group([5, 6])
        .domain_range(0, 1000)
        .input_range(0, INPUT_END)
        .region_all(X86_MSI_REGION)
        .region(2, RESERVED)
        .build()
        .unwrap()
}

fn env<T: std::str::FromStr>(name: &str) -> Option<T> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value:?} is not a number")),
    )
}

/// splitmix64: a seeded generator, so that a run's choices can be repeated (not its thread
/// interleaving).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn percent(&mut self, p: u64) -> bool {
        self.below(100) < p
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

// ---- history -----------------------------------------------------------------------------

/// A binding and the operations that made it live and ended it (`NEVER`: still live).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Span<T> {
    what: T,
    from: u64,
    until: u64,
}

impl<T> Span<T> {
    /// Not ended by an operation that completed by `held`, and live by operation `s`: a reader
    /// may hold it through a section that saw `held` completed.
    fn held(&self, held: u64, s: u64) -> bool {
        self.from <= s && self.until > held
    }

    /// Live at some point between operations `c0` and `s`.
    fn seen(&self, c0: u64, s: u64) -> bool {
        self.from <= s && self.until > c0
    }
}

/// What a group translates through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Binding {
    Unattached,
    /// A domain incarnation (a domain ID reused after its domain died is a new one).
    Domain(u64),
}

#[derive(Clone, Copy, Debug)]
struct Incarnation {
    id: DomainId,
    kind: DomainKind,
    died: u64,
}

#[derive(Clone, Copy, Debug)]
struct MapRecord {
    incarnation: u64,
    virt_start: u64,
    virt_end: u64,
    gpa: u64,
    perms: Perms,
    life: Span<()>,
}

/// Every binding live since operation `pruned_below`, written by the writer before the
/// operation that changes it touches the model.
#[derive(Debug, Default)]
struct History {
    /// Bindings that ended by this operation are gone: a window that starts earlier cannot be
    /// checked.
    pruned_below: u64,
    /// Mappings by GPA.
    mappings: BTreeMap<u64, MapRecord>,
    /// (incarnation, first IOVA, GPA) of every mapping.
    by_iova: BTreeSet<(u64, u64, u64)>,
    incarnations: HashMap<u64, Incarnation>,
    /// Per group, oldest first.
    groups: Vec<Vec<Span<Binding>>>,
    bypass: Vec<Span<bool>>,
}

impl History {
    fn mapping_at(&self, gpa: u64) -> Option<&MapRecord> {
        let (_, record) = self.mappings.range(..=gpa).next_back()?;
        (gpa - record.gpa <= record.virt_end - record.virt_start).then_some(record)
    }

    /// Mappings of `incarnation` that cover `iova` (a mapping spans at most a region).
    fn covering(&self, incarnation: u64, iova: u64) -> impl Iterator<Item = &MapRecord> + '_ {
        let first = iova.saturating_sub(REGION - 1);
        self.by_iova
            .range((incarnation, first, 0)..=(incarnation, iova, u64::MAX))
            .map(|&(_, _, gpa)| &self.mappings[&gpa])
            .filter(move |m| m.virt_end >= iova)
    }

    fn prune(&mut self, below: u64) {
        self.pruned_below = below;
        self.mappings.retain(|_, m| m.life.until > below);
        let mappings = &self.mappings;
        self.by_iova
            .retain(|(_, _, gpa)| mappings.contains_key(gpa));
        self.incarnations.retain(|_, i| i.died > below);
        for spans in &mut self.groups {
            let ended = spans.iter().take_while(|s| s.until <= below).count();
            spans.drain(..ended);
        }
        let ended = self.bypass.iter().take_while(|s| s.until <= below).count();
        self.bypass.drain(..ended);
    }
}

// ---- the writer ----------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum Op {
    Map {
        domain: DomainId,
        start: u64,
        end: u64,
        gpa: u64,
        perms: Perms,
    },
    Unmap {
        domain: DomainId,
        start: u64,
        end: u64,
    },
    Attach {
        domain: DomainId,
        endpoint: EndpointId,
        kind: DomainKind,
    },
    Detach {
        domain: DomainId,
        endpoint: EndpointId,
    },
    Reset,
    Bypass(bool),
}

impl Op {
    fn on_model(self, m: &mut Iommu) -> Result<u64, Error> {
        match self {
            Op::Map {
                domain,
                start,
                end,
                gpa,
                perms,
            } => m.map(domain, start, end, gpa, perms).map(|()| 0),
            Op::Unmap { domain, start, end } => m.unmap(domain, start, end),
            Op::Attach {
                domain,
                endpoint,
                kind,
            } => m.attach(domain, endpoint, kind).map(|()| 0),
            Op::Detach { domain, endpoint } => m.detach(domain, endpoint).map(|()| 0),
            Op::Reset => {
                m.reset();
                Ok(0)
            }
            Op::Bypass(on) => {
                m.set_bypass(on);
                Ok(0)
            }
        }
    }

    fn on_reference(self, r: &mut Reference) -> Result<u64, Error> {
        match self {
            Op::Map {
                domain,
                start,
                end,
                gpa,
                perms,
            } => r.map(domain, start, end, gpa, perms).map(|()| 0),
            Op::Unmap { domain, start, end } => r.unmap(domain, start, end),
            Op::Attach {
                domain,
                endpoint,
                kind,
            } => r.attach(domain, endpoint, kind).map(|()| 0),
            Op::Detach { domain, endpoint } => r.detach(domain, endpoint).map(|()| 0),
            Op::Reset => {
                r.reset();
                Ok(0)
            }
            Op::Bypass(on) => {
                r.bypass = on;
                Ok(0)
            }
        }
    }
}

/// What the readers and the writer share.
struct Shared {
    /// IOVAs of recent MAPs, where readers look most of the time.
    hints: Vec<AtomicU64>,
    started: AtomicU64,
    completed: AtomicU64,
    history: RwLock<History>,
    stop: AtomicBool,
    /// When the test started.
    start: Instant,
    /// The first answer a reader could not explain, with when it was found.
    failure: Mutex<Option<String>>,
}

impl Shared {
    fn fail(&self, message: String) {
        let found = format!(
            "found after {:.3} s, writer at operation {}: {message}",
            self.start.elapsed().as_secs_f64(),
            self.started.load(SeqCst)
        );
        self.failure.lock().unwrap().get_or_insert(found);
        self.stop.store(true, SeqCst);
    }
}

/// Stops the readers when the writer returns or panics.
struct StopOnDrop(Arc<Shared>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.stop.store(true, SeqCst);
    }
}

#[derive(Debug, Default)]
struct WriterCounts {
    ops: u64,
    refused: u64,
    maps: u64,
    unmaps: u64,
    attaches: u64,
    detaches: u64,
    resets: u64,
    bypass: u64,
    batches: u64,
    max_height: u32,
}

struct Writer {
    m: Iommu,
    r: Reference,
    shared: Arc<Shared>,
    rng: Rng,
    /// The last operation number handed out.
    seq: u64,
    in_batch: bool,
    /// Live domains' incarnations.
    incarnations: BTreeMap<DomainId, u64>,
    next_incarnation: u64,
    /// Live mappings: (incarnation, first IOVA) to GPA.
    live: BTreeMap<(u64, u64), u64>,
    next_gpa: u64,
    counts: WriterCounts,
}

impl Writer {
    fn new(shared: Arc<Shared>, seed: u64) -> Self {
        let mut m = Iommu::new(topology());
        for e in ENDPOINTS {
            m.use_dma_api(e).unwrap();
        }
        let mut r = Reference::new(topology());
        for e in ENDPOINTS {
            r.use_api(e).unwrap();
        }
        {
            let mut h = shared.history.write().unwrap();
            let unattached = Span {
                what: Binding::Unattached,
                from: 0,
                until: NEVER,
            };
            h.groups = vec![vec![unattached]; r.groups.len()];
            h.bypass = vec![Span {
                what: false,
                from: 0,
                until: NEVER,
            }];
        }
        Writer {
            m,
            r,
            shared,
            rng: Rng(seed),
            seq: 0,
            in_batch: false,
            incarnations: BTreeMap::new(),
            next_incarnation: 0,
            live: BTreeMap::new(),
            next_gpa: 0,
            counts: WriterCounts::default(),
        }
    }

    /// A fresh GPA from one of the pools, 2 MiB aligned (so a 2 MiB MAP may get a big leaf).
    fn gpa(&mut self) -> u64 {
        let n = self.next_gpa;
        self.next_gpa += 1;
        let (start, end) = POOLS[(n % 2) as usize];
        let gpa = start + (n / 2) * REGION;
        assert!(gpa < end, "GPA pool exhausted");
        gpa
    }

    fn iova(&mut self) -> u64 {
        let base = self.rng.pick(&BASES);
        base + self.rng.below(REGIONS) * REGION
    }

    /// A random operation, mostly one the reference accepts.
    fn op(&mut self) -> Op {
        let paging: Vec<(DomainId, usize)> = self
            .r
            .domains
            .iter()
            .filter(|(_, d)| d.kind == DomainKind::Paging)
            .map(|(&id, d)| (id, d.maps.len()))
            .collect();
        let roll = self.rng.below(100);
        if !paging.is_empty() && roll < 80 {
            let (domain, count) = self.rng.pick(&paging);
            if roll < 50 && count < FULL {
                let region = self.iova();
                let (start, end) = if self.rng.percent(8) {
                    (region, region + REGION - 1)
                } else {
                    let first = region + self.rng.below(FIRST_PAGES) * PAGE;
                    (first, first + (1 + self.rng.below(4)) * PAGE - 1)
                };
                let perms = match self.rng.below(10) {
                    0 => Perms::READ,
                    1 => Perms::WRITE,
                    2 => Perms::all(),
                    3 => Perms::READ | Perms::MMIO,
                    4 if self.rng.percent(20) => Perms::empty(),
                    _ => Perms::READ | Perms::WRITE,
                };
                let gpa = self.gpa();
                self.shared.hints[(self.next_gpa % HINTS) as usize].store(start, Relaxed);
                return Op::Map {
                    domain,
                    start,
                    end,
                    gpa,
                    perms,
                };
            }
            let maps: Vec<Mapping> = self.r.domains[&domain].maps.values().copied().collect();
            let (start, end) = match self.rng.below(10) {
                0..=6 if !maps.is_empty() => {
                    let m = self.rng.pick(&maps);
                    (m.virt_start, m.virt_end)
                }
                7 | 8 => {
                    let first = self.iova() + self.rng.below(FIRST_PAGES) * PAGE;
                    (first, first + (1 + self.rng.below(6)) * PAGE - 1)
                }
                _ => (0, u64::MAX),
            };
            return Op::Unmap { domain, start, end };
        }
        match self.rng.below(100) {
            0..=64 => {
                let kind = if self.rng.percent(10) {
                    DomainKind::Identity
                } else {
                    DomainKind::Paging
                };
                // Mostly to two domains, so that groups share them.
                let domain = if self.rng.percent(70) {
                    1 + self.rng.below(2)
                } else {
                    1 + self.rng.below(u64::from(DOMAINS))
                };
                Op::Attach {
                    domain: domain as DomainId,
                    endpoint: self.rng.pick(&ENDPOINTS),
                    kind,
                }
            }
            65..=84 => {
                let attached: Vec<(DomainId, EndpointId)> = self
                    .r
                    .groups
                    .iter()
                    .filter_map(|g| g.domain.map(|d| (d, g)))
                    .flat_map(|(d, g)| g.attached.iter().map(move |&e| (d, e)))
                    .collect();
                if attached.is_empty() {
                    return Op::Bypass(!self.r.bypass);
                }
                let (domain, endpoint) = self.rng.pick(&attached);
                Op::Detach { domain, endpoint }
            }
            90 => Op::Reset,
            _ => Op::Bypass(!self.r.bypass),
        }
    }

    /// Applies one operation: to the reference, to the history, then to the model.
    fn step(&mut self, op: Op) {
        self.seq += 1;
        let k = self.seq;
        let (domains, bypass) = (self.r.domains.clone(), self.r.bypass);
        let want = op.on_reference(&mut self.r);
        if want.is_ok() {
            self.record(k, &domains, bypass);
        }
        self.shared.started.store(k, SeqCst);
        let got = op.on_model(&mut self.m);
        assert_eq!(got, want, "operation {k}: {op:?}");
        if !self.in_batch {
            self.shared.completed.store(k, SeqCst);
        }
        let counts = &mut self.counts;
        counts.ops += 1;
        if got.is_err() {
            counts.refused += 1;
        }
        match op {
            Op::Map { .. } => counts.maps += 1,
            Op::Unmap { .. } => counts.unmaps += 1,
            Op::Attach { .. } => counts.attaches += 1,
            Op::Detach { .. } => counts.detaches += 1,
            Op::Reset => counts.resets += 1,
            Op::Bypass(_) => counts.bypass += 1,
        }
    }

    /// Writes down what operation `k` changes, from the reference before and after it.
    fn record(&mut self, k: u64, domains: &BTreeMap<DomainId, RefDomain>, bypass: bool) {
        let mut h = self.shared.history.write().unwrap();
        let h = &mut *h;
        for id in domains.keys() {
            if !self.r.domains.contains_key(id) {
                let incarnation = self.incarnations.remove(id).unwrap();
                h.incarnations.get_mut(&incarnation).unwrap().died = k;
                let dead: Vec<(u64, u64)> = self
                    .live
                    .range((incarnation, 0)..=(incarnation, u64::MAX))
                    .map(|(&key, _)| key)
                    .collect();
                for key in dead {
                    let gpa = self.live.remove(&key).unwrap();
                    h.mappings.get_mut(&gpa).unwrap().life.until = k;
                }
            }
        }
        for (&id, d) in &self.r.domains {
            let incarnation = match domains.get(&id) {
                Some(_) => self.incarnations[&id],
                None => {
                    let incarnation = self.next_incarnation;
                    self.next_incarnation += 1;
                    self.incarnations.insert(id, incarnation);
                    h.incarnations.insert(
                        incarnation,
                        Incarnation {
                            id,
                            kind: d.kind,
                            died: NEVER,
                        },
                    );
                    incarnation
                }
            };
            let old = domains.get(&id).map(|d| &d.maps);
            for (&start, m) in &d.maps {
                if old.is_some_and(|o| o.contains_key(&start)) {
                    continue;
                }
                h.mappings.insert(
                    m.phys_start,
                    MapRecord {
                        incarnation,
                        virt_start: m.virt_start,
                        virt_end: m.virt_end,
                        gpa: m.phys_start,
                        perms: m.perms,
                        life: Span {
                            what: (),
                            from: k,
                            until: NEVER,
                        },
                    },
                );
                h.by_iova.insert((incarnation, start, m.phys_start));
                self.live.insert((incarnation, start), m.phys_start);
            }
            for start in old.into_iter().flat_map(|o| o.keys()) {
                if !d.maps.contains_key(start) {
                    let gpa = self.live.remove(&(incarnation, *start)).unwrap();
                    h.mappings.get_mut(&gpa).unwrap().life.until = k;
                }
            }
        }
        for (g, new) in self.r.groups.iter().enumerate() {
            let binding = match new.domain {
                None => Binding::Unattached,
                Some(d) => Binding::Domain(self.incarnations[&d]),
            };
            let spans = &mut h.groups[g];
            let last = spans.last_mut().unwrap();
            if last.what != binding {
                last.until = k;
                spans.push(Span {
                    what: binding,
                    from: k,
                    until: NEVER,
                });
            }
        }
        if bypass != self.r.bypass {
            h.bypass.last_mut().unwrap().until = k;
            h.bypass.push(Span {
                what: self.r.bypass,
                from: k,
                until: NEVER,
            });
        }
    }

    fn batch(&mut self) {
        self.m.begin_batch();
        self.in_batch = true;
        for _ in 0..2 + self.rng.below(7) {
            let op = self.op();
            self.step(op);
        }
        self.m.end_batch();
        self.in_batch = false;
        self.shared.completed.store(self.seq, SeqCst);
        self.counts.batches += 1;
    }

    fn run(&mut self, until: Instant) {
        while Instant::now() < until && !self.shared.stop.load(SeqCst) {
            if self.rng.percent(6) {
                self.batch();
            } else {
                let op = self.op();
                self.step(op);
            }
            if self.seq % 1024 < 8 {
                self.note_heights();
            }
            if self.seq % 4096 < 8 {
                let below = self.shared.completed.load(SeqCst).saturating_sub(KEEP);
                let mut h = self.shared.history.write().unwrap();
                if below > h.pruned_below + KEEP / 4 {
                    h.prune(below);
                }
            }
        }
    }

    fn note_heights(&mut self) {
        for d in self.m.domains.values() {
            if let Some(root) = d.root {
                self.counts.max_height = self.counts.max_height.max(self.m.table.height(root));
            }
        }
    }
}

// ---- the readers -----------------------------------------------------------------------------

/// One answer a reader got, and the last operation it knew complete while it held the answer.
#[derive(Clone, Copy, Debug)]
struct Seen {
    endpoint: EndpointId,
    iova: u64,
    len: u64,
    access: Access,
    got: Result<Translation, Fault>,
    /// c1 for an answer held in a guard's section, c0 for one outside.
    held: u64,
}

#[derive(Debug, Default, Clone, Copy)]
struct ReaderCounts {
    sections: u64,
    /// Translations through a mapping, an identity domain, bypass.
    translations: [u64; 3],
    /// Faults: NoDomain, Unmapped, OutOfRange, Permission, Reserved.
    faults: [u64; 5],
    skipped: u64,
    lingered: u64,
    translators_made: u64,
}

impl ReaderCounts {
    fn add(&mut self, o: &ReaderCounts) {
        self.sections += o.sections;
        for (a, b) in self.translations.iter_mut().zip(o.translations) {
            *a += b;
        }
        for (a, b) in self.faults.iter_mut().zip(o.faults) {
            *a += b;
        }
        self.skipped += o.skipped;
        self.lingered += o.lingered;
        self.translators_made += o.translators_made;
    }
}

struct Reader {
    t: Translator,
    /// Everything but the translator, so that a guard on it can be open while this changes.
    st: ReaderState,
}

struct ReaderState {
    source: TranslatorSource,
    shared: Arc<Shared>,
    rng: Rng,
    seen: Vec<Seen>,
    counts: ReaderCounts,
    regions: HashMap<EndpointId, Vec<ResvRegion>>,
    groups: HashMap<EndpointId, usize>,
}

impl ReaderState {
    fn probe(&mut self) -> (EndpointId, u64, u64, Access) {
        let endpoint = self.rng.pick(&ENDPOINTS);
        let iova = match self.rng.below(100) {
            0..=59 => {
                let hint = &self.shared.hints[self.rng.below(HINTS) as usize];
                hint.load(Relaxed) + self.rng.below(4 * PAGE)
            }
            60..=89 => {
                let base = self.rng.pick(&BASES) + self.rng.below(REGIONS) * REGION;
                let page = if self.rng.percent(5) {
                    REGION / PAGE - 1
                } else {
                    self.rng.below(FIRST_PAGES + 4)
                };
                base + page * PAGE + self.rng.below(PAGE)
            }
            90..=95 => X86_MSI_REGION.start + self.rng.below(PAGE),
            _ => INPUT_END + 1 + self.rng.below(1 << 40),
        };
        let len = self.rng.pick(&[1, 8, 0x800, PAGE, 3 * PAGE, REGION]);
        let access = if self.rng.percent(50) {
            Access::Read
        } else {
            Access::Write
        };
        (endpoint, iova, len, access)
    }

    /// Spins for a few microseconds, or (now and then) sleeps, inside a section: grace periods
    /// then take the heavy-barrier path and wait.
    fn linger(&mut self) {
        self.counts.lingered += 1;
        if self.rng.percent(10) {
            std::thread::sleep(Duration::from_micros(50 + self.rng.below(500)));
        } else {
            let until = Instant::now() + Duration::from_micros(1 + self.rng.below(40));
            while Instant::now() < until {
                std::hint::spin_loop();
            }
        }
    }

    fn completed(&self) -> u64 {
        self.shared.completed.load(SeqCst)
    }

    /// Notes answers held until operation `held` was known complete.
    fn saw(&mut self, held: u64, answers: impl IntoIterator<Item = Answer>) {
        self.seen.extend(
            answers
                .into_iter()
                .map(|(endpoint, iova, len, access, got)| Seen {
                    endpoint,
                    iova,
                    len,
                    access,
                    got,
                    held,
                }),
        );
    }
}

/// Endpoint, IOVA, length, access and the answer.
type Answer = (EndpointId, u64, u64, Access, Result<Translation, Fault>);

impl Reader {
    /// One section of a random shape; notes its answers in `st.seen`.
    fn section(&mut self, c0: u64) {
        if self.st.rng.percent(2) {
            // A fresh translator for the thread: grace periods must watch it from now on.
            self.t = if self.st.rng.percent(50) {
                self.t.clone()
            } else {
                self.st.source.translator()
            };
            self.st.counts.translators_made += 1;
        }
        let (t, st) = (&self.t, &mut self.st);
        match st.rng.below(100) {
            // Translations each in a section of their own.
            0..=29 => {
                for _ in 0..1 + st.rng.below(8) {
                    let (endpoint, iova, len, access) = st.probe();
                    let got = t.translate(Requester::DmaApi, endpoint, iova, len, access);
                    st.saw(c0, [(endpoint, iova, len, access, got)]);
                }
            }
            // A guard across several translations, endpoint handles and batches.
            30..=89 => {
                let guard = t.read();
                let mut held = Vec::new();
                for _ in 0..1 + st.rng.below(6) {
                    let (endpoint, iova, len, access) = st.probe();
                    match st.rng.below(10) {
                        0..=3 => {
                            let got =
                                guard.translate(Requester::DmaApi, endpoint, iova, len, access);
                            held.push((endpoint, iova, len, access, got));
                        }
                        4..=6 => match guard.endpoint(Requester::DmaApi, endpoint) {
                            Ok(view) => {
                                for _ in 0..1 + st.rng.below(4) {
                                    let (_, iova, len, access) = st.probe();
                                    let got = view.translate(iova, len, access);
                                    held.push((endpoint, iova, len, access, got));
                                }
                            }
                            Err(fault) => held.push((endpoint, iova, len, access, Err(fault))),
                        },
                        7 => {
                            if let Ok(view) = guard.endpoint(Requester::DmaApi, endpoint) {
                                let dmas: Vec<Dma> = (0..1 + st.rng.below(20))
                                    .map(|_| {
                                        let (_, iova, len, access) = st.probe();
                                        Dma { iova, len, access }
                                    })
                                    .collect();
                                let mut out = vec![Err(Fault::Unmapped); dmas.len()];
                                assert_eq!(view.translate_batch(&dmas, &mut out), dmas.len());
                                for (dma, got) in dmas.iter().zip(out) {
                                    held.push((endpoint, dma.iova, dma.len, dma.access, got));
                                }
                            }
                        }
                        8 => {
                            // Nested: the inner guard is part of the same section.
                            let inner = t.read();
                            let got =
                                inner.translate(Requester::DmaApi, endpoint, iova, len, access);
                            drop(inner);
                            held.push((endpoint, iova, len, access, got));
                        }
                        _ => {
                            // Translators come and go inside the section.
                            let other = if st.rng.percent(50) {
                                t.clone()
                            } else {
                                st.source.translator()
                            };
                            st.counts.translators_made += 1;
                            let got =
                                other.translate(Requester::DmaApi, endpoint, iova, len, access);
                            drop(other);
                            // In a section of its own: held no longer than the call.
                            st.saw(c0, [(endpoint, iova, len, access, got)]);
                        }
                    }
                    if st.rng.percent(8) {
                        st.linger();
                    }
                }
                let c1 = st.completed();
                drop(guard);
                st.saw(c1, held);
            }
            // A guard leaked, then its translator dropped: the section ends with it.
            90..=94 => {
                let leaker = t.clone();
                st.counts.translators_made += 1;
                let guard = leaker.read();
                let (endpoint, iova, len, access) = st.probe();
                let got = guard.translate(Requester::DmaApi, endpoint, iova, len, access);
                if st.rng.percent(30) {
                    st.linger();
                }
                std::mem::forget(guard);
                let c1 = st.completed();
                drop(leaker);
                st.saw(c1, [(endpoint, iova, len, access, got)]);
            }
            // A long section holding one translation.
            _ => {
                let guard = t.read();
                let (endpoint, iova, len, access) = st.probe();
                let got = guard.translate(Requester::DmaApi, endpoint, iova, len, access);
                st.linger();
                let c1 = st.completed();
                drop(guard);
                st.saw(c1, [(endpoint, iova, len, access, got)]);
            }
        }
    }

    fn run(mut self) -> ReaderCounts {
        let shared = self.st.shared.clone();
        while !shared.stop.load(SeqCst) {
            self.st.seen.clear();
            let c0 = shared.completed.load(SeqCst);
            self.section(c0);
            // Whatever the section read comes before this load.
            fence(SeqCst);
            let s = shared.started.load(SeqCst);
            let st = &mut self.st;
            st.counts.sections += 1;
            let h = shared.history.read().unwrap();
            if c0 < h.pruned_below {
                st.counts.skipped += 1;
                continue;
            }
            for seen in &st.seen {
                if let Err(why) = st.explain(&h, seen, c0, s) {
                    shared.fail(format!(
                        "{why}\n  answer {seen:?}\n  window: c0 {c0}, held {}, s {s}",
                        seen.held
                    ));
                    return st.counts;
                }
                match seen.got {
                    Ok(t) if t.gpa != seen.iova => st.counts.translations[0] += 1,
                    Ok(t) if t.domain.is_some() => st.counts.translations[1] += 1,
                    Ok(_) => st.counts.translations[2] += 1,
                    Err(fault) => {
                        let kind = match fault {
                            Fault::NoDomain => 0,
                            Fault::Unmapped => 1,
                            Fault::OutOfRange => 2,
                            Fault::Permission => 3,
                            _ => 4,
                        };
                        st.counts.faults[kind] += 1;
                    }
                }
            }
        }
        self.st.counts
    }
}

impl ReaderState {
    /// Whether `seen` is explained by bindings of the window (c0, held, s).
    fn explain(&self, h: &History, seen: &Seen, c0: u64, s: u64) -> Result<(), String> {
        let Seen {
            endpoint,
            iova,
            len,
            access,
            got,
            held,
        } = *seen;
        let group = &h.groups[self.groups[&endpoint]];
        let regions = &self.regions[&endpoint];
        let reserved = regions.iter().any(|r| r.start <= iova && iova <= r.end);
        let bypass = |on: bool, live: &dyn Fn(&Span<bool>) -> bool| {
            h.bypass.iter().any(|b| b.what == on && live(b))
        };
        let incarnation = |i: u64| h.incarnations.get(&i);
        let domain_kind = |b: &Span<Binding>| match b.what {
            Binding::Domain(i) => incarnation(i).map(|i| i.kind),
            Binding::Unattached => None,
        };
        let need = match access {
            Access::Read => Perms::READ,
            Access::Write => Perms::WRITE,
        };
        match got {
            Ok(t) => {
                if t.len == 0 || t.len > len {
                    return Err(format!("length {:#x} for {len:#x} asked", t.len));
                }
                if let Some(m) = h.mapping_at(t.gpa) {
                    if !(m.virt_start <= iova && iova <= m.virt_end)
                        || t.gpa - m.gpa != iova - m.virt_start
                    {
                        return Err(format!("GPA of another IOVA: {m:?}"));
                    }
                    let i = incarnation(m.incarnation).ok_or("mapping of a pruned domain")?;
                    if t.domain != Some(i.id) {
                        return Err(format!("domain {:?} for a mapping of {i:?}", t.domain));
                    }
                    if !m.life.held(held, s) {
                        return Err(format!(
                            "mapping not live while held (UNMAP completed under the reader?): {m:?}"
                        ));
                    }
                    if !group
                        .iter()
                        .any(|b| b.what == Binding::Domain(m.incarnation) && b.held(held, s))
                    {
                        return Err(format!(
                            "group not on {i:?} while held: {group:?} (mapping {m:?})"
                        ));
                    }
                    if !m.perms.intersects(need) {
                        return Err(format!("access not allowed by {m:?}"));
                    }
                    if t.mmio != m.perms.contains(Perms::MMIO) {
                        return Err(format!("wrong MMIO flag for {m:?}"));
                    }
                    let max = len.min(m.virt_end - iova + 1);
                    let min = max.min(PAGE - iova % PAGE);
                    if t.len < min || t.len > max {
                        return Err(format!("length {:#x} outside {min:#x}..={max:#x}", t.len));
                    }
                    return Ok(());
                }
                if POOLS.iter().any(|&(a, b)| a <= t.gpa && t.gpa < b) {
                    return Err("GPA of no mapping (pruned, or never mapped)".into());
                }
                // Identity: bypass, or an identity domain.
                if t.gpa != iova || reserved || t.mmio {
                    return Err("not the identity of an unreserved IOVA".into());
                }
                let max = regions
                    .iter()
                    .filter(|r| r.start > iova)
                    .fold(len, |l, r| l.min(r.start - iova));
                let min = max.min(u64::MAX - iova).max(1);
                if t.len < min || t.len > max {
                    return Err(format!("length {:#x} outside {min:#x}..={max:#x}", t.len));
                }
                let explained = match t.domain {
                    None => {
                        group
                            .iter()
                            .any(|b| b.what == Binding::Unattached && b.held(held, s))
                            && bypass(true, &|b| b.held(held, s))
                    }
                    Some(id) => group.iter().any(|b| {
                        b.held(held, s)
                            && matches!(b.what, Binding::Domain(i)
                            if incarnation(i).is_some_and(|i| {
                                i.id == id && i.kind == DomainKind::Identity
                            }))
                    }),
                };
                if explained {
                    Ok(())
                } else {
                    Err(format!("identity not live while held: {group:?}"))
                }
            }
            Err(fault) => {
                let seen_b = |b: &Span<Binding>| b.seen(c0, s);
                let explained = match fault {
                    Fault::NoDomain => {
                        group
                            .iter()
                            .any(|b| b.what == Binding::Unattached && seen_b(b))
                            && bypass(false, &|b| b.seen(c0, s))
                    }
                    Fault::Reserved => {
                        reserved
                            && group.iter().any(|b| {
                                seen_b(b)
                                    && match b.what {
                                        Binding::Unattached => bypass(true, &|b| b.seen(c0, s)),
                                        Binding::Domain(_) => {
                                            domain_kind(b) == Some(DomainKind::Identity)
                                        }
                                    }
                            })
                    }
                    Fault::OutOfRange => {
                        iova > INPUT_END
                            && group
                                .iter()
                                .any(|b| seen_b(b) && domain_kind(b) == Some(DomainKind::Paging))
                    }
                    Fault::Unmapped => {
                        iova <= INPUT_END
                            && group.iter().any(|b| match b.what {
                                Binding::Domain(i) if seen_b(b) => {
                                    domain_kind(b) == Some(DomainKind::Paging)
                                        && absent_at_some_point(h.covering(i, iova), c0, s)
                                }
                                _ => false,
                            })
                    }
                    Fault::Permission => group.iter().any(|b| match b.what {
                        Binding::Domain(i) if seen_b(b) => h
                            .covering(i, iova)
                            .any(|m| m.life.seen(c0, s) && !m.perms.intersects(need)),
                        _ => false,
                    }),
                    Fault::NotOwner | Fault::UnknownEndpoint => false,
                };
                if explained {
                    Ok(())
                } else {
                    Err(format!("fault not explained by {group:?}"))
                }
            }
        }
    }
}

/// Whether some operation in `c0..=s` leaves no mapping of `mappings` live.
fn absent_at_some_point<'a>(
    mappings: impl Iterator<Item = &'a MapRecord>,
    c0: u64,
    s: u64,
) -> bool {
    let mut lives: Vec<(u64, u64)> = mappings.map(|m| (m.life.from, m.life.until)).collect();
    lives.sort_unstable();
    // The first operation of the window not yet known covered.
    let mut at = c0;
    for (from, until) in lives {
        if from > at {
            break;
        }
        at = at.max(until);
    }
    at <= s
}

/// See the module documentation.
#[test]
fn readers_check_every_answer_against_the_live_bindings() {
    let secs: f64 = env("VHOST_IOMMU_STRESS_SECS").unwrap_or(4.0);
    let readers: u64 = env("VHOST_IOMMU_STRESS_READERS").unwrap_or(4);
    let seed: u64 = env("VHOST_IOMMU_STRESS_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    });
    let shared = Arc::new(Shared {
        hints: (0..HINTS).map(|_| AtomicU64::new(0)).collect(),
        started: AtomicU64::new(0),
        completed: AtomicU64::new(0),
        history: RwLock::new(History::default()),
        stop: AtomicBool::new(false),
        start: Instant::now(),
        failure: Mutex::new(None),
    });
    let mut writer = Writer::new(shared.clone(), seed);
    let topo = topology();
    let regions: HashMap<EndpointId, Vec<ResvRegion>> = ENDPOINTS
        .iter()
        .map(|&e| (e, topo.endpoint(e).unwrap().regions.clone()))
        .collect();
    let groups: HashMap<EndpointId, usize> = ENDPOINTS
        .iter()
        .map(|&e| (e, topo.endpoint(e).unwrap().group.0 as usize))
        .collect();
    let threads: Vec<_> = (0..readers)
        .map(|k| {
            let reader = Reader {
                t: writer.m.translator(),
                st: ReaderState {
                    source: writer.m.translator_source(),
                    shared: shared.clone(),
                    rng: Rng(seed ^ (k + 1).wrapping_mul(0x2545_f491_4f6c_dd1d)),
                    seen: Vec::new(),
                    counts: ReaderCounts::default(),
                    regions: regions.clone(),
                    groups: groups.clone(),
                },
            };
            std::thread::spawn(move || reader.run())
        })
        .collect();
    let started = Instant::now();
    let writer = {
        let stop = StopOnDrop(shared.clone());
        let until = started + Duration::from_secs_f64(secs);
        std::thread::spawn(move || {
            let _stop = stop;
            writer.run(until);
            writer
        })
    };
    // A writer (or reader) that stops making progress is stuck for good: fail rather than
    // hang the test runner (the stuck threads are left behind).
    let mut progress = (0, Instant::now());
    while !writer.is_finished() {
        std::thread::sleep(Duration::from_millis(50));
        let at = shared.started.load(SeqCst) + shared.completed.load(SeqCst);
        if at != progress.0 {
            progress = (at, Instant::now());
        }
        assert!(
            progress.1.elapsed() < STUCK,
            "seed {seed}: the writer is stuck at operation {} (completed: {}) for {STUCK:?}",
            shared.started.load(SeqCst),
            shared.completed.load(SeqCst),
        );
    }
    let elapsed = started.elapsed();
    let writer = writer
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
    let mut total = ReaderCounts::default();
    for thread in threads {
        let deadline = Instant::now() + STUCK;
        while !thread.is_finished() {
            assert!(Instant::now() < deadline, "seed {seed}: a reader is stuck");
            std::thread::sleep(Duration::from_millis(10));
        }
        total.add(&thread.join().unwrap());
    }
    let stats = writer.m.stats();
    let w = &writer.counts;
    println!(
        "stress: seed {seed}, {readers} readers, {:.1} s: {} writer operations ({} refused; \
         {} MAP, {} UNMAP, {} ATTACH, {} DETACH, {} reset, {} bypass; {} batches), \
         {} grace periods, trees up to {} levels; {} sections ({} lingering, {} skipped), \
         translations checked: {:?} (mapping, identity domain, bypass), faults checked: {:?} \
         (NoDomain, Unmapped, OutOfRange, Permission, Reserved), {} translators made and \
         dropped",
        elapsed.as_secs_f64(),
        w.ops,
        w.refused,
        w.maps,
        w.unmaps,
        w.attaches,
        w.detaches,
        w.resets,
        w.bypass,
        w.batches,
        stats.grace_periods,
        w.max_height,
        total.sections,
        total.lingered,
        total.skipped,
        total.translations,
        total.faults,
        total.translators_made,
    );
    if let Some(failure) = shared.failure.lock().unwrap().take() {
        panic!("seed {seed}: {failure}");
    }
    assert!(w.ops > 1000, "the writer made progress: {w:?}");
    assert!(
        total.translations.iter().all(|&n| n > 100) && total.faults.iter().all(|&n| n > 100),
        "the readers saw every kind of answer: {total:?}"
    );
    assert!(
        total.skipped * 100 <= total.sections,
        "few windows too old to check: {total:?}"
    );
}
