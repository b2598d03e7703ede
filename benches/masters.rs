// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! DMA masters in other processes (the vhost-iommu-client crate) against the daemon, side by
//! side in one run.
//!
//! 1. `hit`: a translation in a master's section vs through an in-process endpoint handle,
//!    at 1K and 1M 4 KiB mappings, IOVAs in a random order, ns per translation with the
//!    section (or read guard) taken once per 64 translations (the "handle per 64" of
//!    `benches/translate.rs`). In-process: the model in this process's memory (huge pages
//!    advised, as the daemon without `--master-socket`) and in a memfd (as the daemon with
//!    it). Master: the real daemon's tables, filled by a guest over vhost-user with the same
//!    mappings. Also through vm-memory (`Iommu::translate`), hitting the slot's IOTLB.
//! 2. `miss`: what costs more than a hit, per call: a one-shot translation (a section of its
//!    own, against the in-process one-shot call), a vm-memory IOTLB miss (1M mappings,
//!    random IOVAs, far more than the IOTLB's 4096 entries: a walk and a fill), and a refused
//!    translation (an unmapped IOVA: the walk, and the fault report sent to the daemon).
//! 3. `unmap`: the guest's MAP/UNMAP pairs per second (K requests per kick, the guest of
//!    `examples/loadgen.rs`, anchored so that masters have a page to translate) on the daemon
//!    without masters, and with 0, 1 and 4 masters attached: idle (connected, an endpoint
//!    claimed), busy (one thread translating flat out in sections of 64) or paced (sections of
//!    64 with 100 us between).
//!
//! Samples alternate over the variants (each after a warm-up), rounds are repeated and each
//! variant keeps its median and IQR, so that every variant sees the same machine.
//! Environment: `BENCH_SCALE` multiplies every measurement time; `MASTERS_SECTIONS=hit,miss,
//! unmap` picks sections; `MASTERS_VARIANTS=busy` runs only the UNMAP variants whose name
//! contains a word given; `MASTERS_DAEMON=PATH` runs another daemon binary. Under
//! `cargo test --benches` (no `--bench`) everything runs once, small.

#[path = "../examples/loadgen.rs"]
mod loadgen;

use std::{
    hint::black_box,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use loadgen::{Guest, LoadOptions, SpawnedDaemon};
use ownership::{Access, DomainKind, EndpointId, Iommu, Limits, Requester, Topology};
use vhost_iommu_client::{Endpoint, Master};
use vhost_iommu_testkit::{Chain, Driver, Options};
use virtio::{MapFlags, Request};
use vm_memory::Iommu as VmIommu;
use vm_memory::{GuestAddress, Permissions};

const DAEMON_BIN: &str = env!("CARGO_BIN_EXE_vhost-device-iommu");

/// The daemon binary: this build's, or `MASTERS_DAEMON` (another build, to compare).
fn daemon_bin() -> PathBuf {
    std::env::var_os("MASTERS_DAEMON").map_or_else(|| PathBuf::from(DAEMON_BIN), PathBuf::from)
}
const EP: EndpointId = 0x28;
const COOKIE: u64 = 0xbe9c;
const PAGE: u64 = 4096;
const IOVA_BASE: u64 = 1 << 32;
const GPA_BASE: u64 = 0x10_0000;
const CHUNK: usize = 64;

fn scale() -> f64 {
    std::env::var("BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Median and interquartile range.
fn stats(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.25), at(0.75))
}

fn fmt((m, lo, hi): (f64, f64, f64)) -> String {
    if m >= 100.0 {
        format!("{m:.0} [{lo:.0}-{hi:.0}]")
    } else {
        format!("{m:.1} [{lo:.1}-{hi:.1}]")
    }
}

/// The i-th IOVA of a layout of `n` 4 KiB mappings, and its GPA.
fn iova(i: u64) -> u64 {
    IOVA_BASE + i * PAGE
}

fn gpa(i: u64) -> u64 {
    GPA_BASE + i * PAGE
}

/// The IOVAs of `n` mappings in a fixed random order (an LCG permutation walk).
fn random_order(n: u64, count: usize) -> Vec<u64> {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    (0..count)
        .map(|_| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            iova((x >> 17) % n) + 0x10
        })
        .collect()
}

fn topology(n: u64) -> Topology {
    Topology::builder()
        .endpoints([EP])
        .limits(Limits {
            max_mappings: n + 1024,
            max_mappings_per_domain: n + 1024,
            ..Limits::default()
        })
        .build()
        .unwrap()
}

fn fill(iommu: &mut Iommu, n: u64) {
    iommu.use_dma_api(EP).unwrap();
    iommu.attach(1, EP, DomainKind::Paging).unwrap();
    for i in 0..n {
        iommu
            .map(1, iova(i), iova(i) + PAGE - 1, gpa(i), ownership::Perms::RW)
            .unwrap();
    }
}

/// The daemon with a master socket, a guest that mapped `n` pages, and a master.
struct Remote {
    _daemon: SpawnedDaemon,
    _dir: tempfile::TempDir,
    _guest: Driver,
    master: Master,
    endpoint: Endpoint,
}

fn spawn_with_masters(
    extra: &[&str],
    cpu: Option<usize>,
) -> (SpawnedDaemon, tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let masters = dir.path().join("masters.sock");
    let mut args = vec!["--master-socket".to_string(), masters.display().to_string()];
    args.extend(extra.iter().map(|s| s.to_string()));
    let daemon = SpawnedDaemon::spawn(&daemon_bin(), &args, cpu).expect("daemon");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !masters.exists() {
        assert!(Instant::now() < deadline, "no master socket");
        thread::sleep(Duration::from_millis(5));
    }
    (daemon, dir, masters)
}

fn remote(n: u64) -> Remote {
    let limit = (n + 1024).to_string();
    let (daemon, dir, masters) = spawn_with_masters(
        &[
            "--max-mappings",
            &limit,
            "--max-mappings-per-domain",
            &limit,
        ],
        None,
    );
    let mut guest = Driver::connect(&daemon.socket, Options::default()).expect("guest");
    let send = |dev: &mut Driver, requests: &[Vec<u8>]| {
        let chains: Vec<Chain<'_>> = requests.iter().map(|r| Chain::request(r, 4)).collect();
        for c in dev.batch(&chains).expect("batch") {
            assert_eq!(c.data[c.data.len() - 4], 0, "a request failed");
        }
    };
    send(
        &mut guest,
        &[Request::Attach {
            domain: 1,
            endpoint: EP,
            bypass: false,
        }
        .encode()],
    );
    let rw = MapFlags {
        read: true,
        write: true,
        mmio: false,
    };
    let mut i = 0;
    while i < n {
        let batch: Vec<Vec<u8>> = (i..(i + 100).min(n))
            .map(|i| {
                Request::Map {
                    domain: 1,
                    virt_start: iova(i),
                    virt_end: iova(i) + PAGE - 1,
                    phys_start: gpa(i),
                    flags: rw,
                }
                .encode()
            })
            .collect();
        send(&mut guest, &batch);
        i += 100;
    }
    let master = Master::connect(&masters).expect("master");
    let endpoint = master.claim(EP, COOKIE).expect("claim");
    Remote {
        _daemon: daemon,
        _dir: dir,
        _guest: guest,
        master,
        endpoint,
    }
}

/// Runs `f` (which does `per` operations) for about `time` after a warm-up; ns per operation.
fn sample(time: Duration, per: usize, mut f: impl FnMut()) -> f64 {
    f();
    let start = Instant::now();
    let mut runs = 0u64;
    while start.elapsed() < time {
        f();
        runs += 1;
    }
    start.elapsed().as_nanos() as f64 / (runs * per as u64) as f64
}

type Variant<'a> = (&'a str, Box<dyn FnMut() + 'a>, usize);

/// `f` on the next `CHUNK` IOVAs of `order` at each call, round and round.
fn chunked<'a>(order: &'a [u64], mut f: impl FnMut(&[u64]) + 'a) -> Box<dyn FnMut() + 'a> {
    let mut at = 0usize;
    Box::new(move || {
        let chunk = &order[at..at + CHUNK];
        at = (at + CHUNK) % (order.len() - CHUNK);
        f(chunk)
    })
}

/// An in-process endpoint handle: a read guard and the endpoint resolved once per chunk.
fn handle<'a>(order: &'a [u64], t: &ownership::Translator) -> Box<dyn FnMut() + 'a> {
    let t = t.clone();
    chunked(order, move |chunk| {
        let g = t.read();
        let view = g.endpoint(Requester::DmaApi, EP).unwrap();
        let mut sum = 0u64;
        for &v in chunk {
            sum = sum.wrapping_add(
                view.translate(v, 8, Access::Read)
                    .map_or(u64::MAX, |t| t.gpa),
            );
        }
        black_box(sum);
    })
}

/// Alternates the variants `rounds` times; per variant, the samples' median and IQR.
fn alternate(time: Duration, rounds: usize, variants: &mut [Variant<'_>]) -> Vec<(f64, f64, f64)> {
    let mut samples = vec![Vec::new(); variants.len()];
    for _ in 0..rounds {
        for (v, (_, f, per)) in variants.iter_mut().enumerate() {
            samples[v].push(sample(time, *per, f));
        }
    }
    samples.into_iter().map(stats).collect()
}

fn hit_and_miss(sizes: &[(u64, &str)], time: Duration, rounds: usize, sections: &[&str]) {
    for &(n, label) in sizes {
        let order = random_order(n, 1 << 16);
        let mut private = Iommu::new(topology(n));
        if let Err(e) = vhost_device_iommu::hugepages::advise_table_memory(&private) {
            eprintln!("(no huge pages for the in-process tables: {e})");
        }
        fill(&mut private, n);
        let (mut shared, _tables) = vhost_device_iommu::masters::model(&topology(n)).unwrap();
        fill(&mut shared, n);
        let remote = remote(n);
        let (tp, ts) = (private.translator(), shared.translator());
        let ep = &remote.endpoint;
        // Sanity: every side translates the same.
        for &v in order.iter().take(1000) {
            let a = tp
                .translate(Requester::DmaApi, EP, v, 8, Access::Read)
                .unwrap();
            let b = ts
                .translate(Requester::DmaApi, EP, v, 8, Access::Read)
                .unwrap();
            let c = ep.translate(v, 8, Access::Read).unwrap();
            assert_eq!((a.gpa, b.gpa), (c.gpa, c.gpa));
        }
        if sections.contains(&"hit") {
            let hot: Vec<u64> = order[..CHUNK].to_vec();
            let mut variants: Vec<Variant<'_>> = vec![
                (
                    "in-process handle, private memory",
                    handle(&order, &tp),
                    CHUNK,
                ),
                (
                    "in-process handle, tables in a memfd",
                    handle(&order, &ts),
                    CHUNK,
                ),
                (
                    "master, section per 64",
                    chunked(&order, |chunk| {
                        let s = ep.section().unwrap();
                        let mut sum = 0u64;
                        for &v in chunk {
                            sum = sum.wrapping_add(
                                s.translate(v, 8, Access::Read).map_or(u64::MAX, |t| t.gpa),
                            );
                        }
                        black_box(sum);
                    }),
                    CHUNK,
                ),
                (
                    "master, section and handle per 64",
                    chunked(&order, |chunk| {
                        let s = ep.section().unwrap();
                        let h = s.handle().unwrap();
                        let mut sum = 0u64;
                        for &v in chunk {
                            sum = sum.wrapping_add(
                                h.translate(v, 8, Access::Read).map_or(u64::MAX, |t| t.gpa),
                            );
                        }
                        black_box(sum);
                    }),
                    CHUNK,
                ),
                (
                    "master, vm-memory translate (IOTLB hit)",
                    Box::new(|| {
                        for &v in &hot {
                            let mut it =
                                VmIommu::translate(ep, GuestAddress(v), 8, Permissions::Read)
                                    .unwrap();
                            black_box(it.next());
                        }
                    }),
                    CHUNK,
                ),
            ];
            let r = alternate(time, rounds, &mut variants);
            println!("\n### Translation hit, {label} 4 KiB mappings, random IOVAs, ns per translation (load {})\n", load_average());
            println!("| variant | median [IQR] | / in-process handle, private | / in-process handle, memfd |");
            println!("|---|---:|---:|---:|");
            for (i, (name, _, _)) in variants.iter().enumerate() {
                println!(
                    "| {name} | {} | {:.2}x | {:.2}x |",
                    fmt(r[i]),
                    r[i].0 / r[0].0,
                    r[i].0 / r[1].0
                );
            }
        }
        if sections.contains(&"miss") {
            let unmapped: Vec<u64> = (0..CHUNK as u64).map(|i| iova(n + 16 + i)).collect();
            let mut variants: Vec<Variant<'_>> = vec![
                (
                    "in-process one-shot Translator::translate",
                    chunked(&order, |chunk| {
                        let mut sum = 0u64;
                        for &v in chunk {
                            sum = sum.wrapping_add(
                                tp.translate(Requester::DmaApi, EP, v, 8, Access::Read)
                                    .map_or(u64::MAX, |t| t.gpa),
                            );
                        }
                        black_box(sum);
                    }),
                    CHUNK,
                ),
                (
                    "master one-shot Endpoint::translate (a section each)",
                    chunked(&order, |chunk| {
                        let mut sum = 0u64;
                        for &v in chunk {
                            sum = sum.wrapping_add(
                                ep.translate(v, 8, Access::Read).map_or(u64::MAX, |t| t.gpa),
                            );
                        }
                        black_box(sum);
                    }),
                    CHUNK,
                ),
                (
                    "master, vm-memory translate, random IOVAs over every mapping (a miss at 1M)",
                    chunked(&order, |chunk| {
                        for &v in chunk {
                            let mut it =
                                VmIommu::translate(ep, GuestAddress(v), 8, Permissions::Read)
                                    .unwrap();
                            black_box(it.next());
                        }
                    }),
                    CHUNK,
                ),
                (
                    "master, unmapped IOVA in a section (fault reported)",
                    Box::new(|| {
                        let s = ep.section().unwrap();
                        let mut sum = 0u64;
                        for &v in &unmapped {
                            sum = sum.wrapping_add(
                                s.translate(v, 8, Access::Read)
                                    .map_or_else(|f| f as u64, |t| t.gpa),
                            );
                        }
                        black_box(sum);
                    }),
                    CHUNK,
                ),
                (
                    "in-process, unmapped IOVA in a handle (not reported)",
                    Box::new(|| {
                        let g = tp.read();
                        let view = g.endpoint(Requester::DmaApi, EP).unwrap();
                        let mut sum = 0u64;
                        for &v in &unmapped {
                            sum = sum.wrapping_add(
                                view.translate(v, 8, Access::Read)
                                    .map_or_else(|f| f as u64, |t| t.gpa),
                            );
                        }
                        black_box(sum);
                    }),
                    CHUNK,
                ),
            ];
            let r = alternate(time, rounds, &mut variants);
            println!(
                "\n### Beyond a hit, {label} 4 KiB mappings, ns per call (load {})\n",
                load_average()
            );
            println!("| variant | median [IQR] |");
            println!("|---|---:|");
            for (i, (name, _, _)) in variants.iter().enumerate() {
                println!("| {name} | {} |", fmt(r[i]));
            }
            let s = remote.master.stats();
            println!(
                "\n(fault reports: {} sent, {} dropped with the socket full)",
                s.faults_reported, s.faults_dropped
            );
        }
    }
}

/// How the masters of an UNMAP-rate variant behave.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Masters {
    /// The daemon has no master socket.
    NoSocket,
    Idle(usize),
    Busy(usize),
    /// One busy master bound to a CPU (the guest's: 0, the daemon's: 1).
    BusyOn(usize),
    /// Busy, but yielding its CPU between sections.
    Yielding(usize),
    Paced(usize),
}

/// Masters attached to a daemon for one sample; they stop when dropped.
struct Attached {
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Drop for Attached {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The anchored loadgen keeps the first page of each 2 MiB region below 4 GiB mapped: an IOVA
/// masters translate while the guest maps and unmaps next to it.
const ANCHOR: u64 = (1 << 32) - (2 << 20);

fn attach_masters(socket: &Path, how: Masters) -> Attached {
    let stop = Arc::new(AtomicBool::new(false));
    let (n, busy, pace, cpu) = match how {
        Masters::NoSocket => (0, false, None, None),
        Masters::Idle(n) => (n, false, None, None),
        Masters::Busy(n) => (n, true, None, None),
        Masters::BusyOn(cpu) => (1, true, None, Some(cpu)),
        Masters::Yielding(n) => (n, true, Some(Duration::ZERO), None),
        Masters::Paced(n) => (n, true, Some(Duration::from_micros(100)), None),
    };
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let threads = (0..n)
        .map(|_| {
            let (stop, socket, ready) = (stop.clone(), socket.to_owned(), ready_tx.clone());
            thread::spawn(move || {
                // Anywhere (the guest's thread is pinned, a master is another program), or
                // where the variant says.
                loadgen::pin_current_thread(cpu);
                let master = Master::connect(&socket).expect("master");
                // One owner cookie for all of them: an owner may claim again.
                let ep = master.claim(EP, COOKIE).expect("claim");
                ready.send(()).unwrap();
                while !stop.load(Ordering::Relaxed) {
                    if !busy {
                        thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                    if let Ok(s) = ep.section() {
                        for _ in 0..CHUNK {
                            black_box(s.translate(ANCHOR, 8, Access::Read).ok());
                        }
                    }
                    match pace {
                        Some(Duration::ZERO) => thread::yield_now(),
                        Some(pace) => thread::sleep(pace),
                        None => {}
                    }
                }
            })
        })
        .collect();
    for _ in 0..n {
        ready_rx.recv().unwrap();
    }
    Attached { stop, threads }
}

fn unmap_rate(time: Duration, rounds: usize, ks: &[usize]) {
    let variants = [
        Masters::NoSocket,
        Masters::Idle(0),
        Masters::Idle(1),
        Masters::Busy(1),
        Masters::BusyOn(1),
        Masters::BusyOn(0),
        Masters::Yielding(1),
        Masters::Paced(1),
        Masters::Idle(4),
        Masters::Paced(4),
        Masters::Yielding(4),
        Masters::Busy(4),
    ];
    // Pinned, as in benches/request_path.rs: the guest on CPU 0, the daemons on CPU 1, so that
    // the two ends of the ring do not take turns on one CPU (which makes each request cost a
    // scheduler time slice). MASTERS_PIN=0 leaves everything unpinned.
    let pin = std::env::var("MASTERS_PIN").map_or(true, |v| v != "0");
    let cpu = pin.then_some(1);
    if pin && !loadgen::pin_current_thread(Some(0)) {
        eprintln!("(could not pin the guest's thread)");
    }
    let plain = SpawnedDaemon::spawn(&daemon_bin(), &[], cpu).expect("daemon");
    let (with, _dir, socket) = spawn_with_masters(&[], cpu);
    let opts = LoadOptions {
        anchored: true,
        ..LoadOptions::default()
    };
    let mut guests = [
        Guest::connect(&plain.socket, opts.clone()).unwrap(),
        Guest::connect(&with.socket, opts).unwrap(),
    ];
    let wanted = std::env::var("MASTERS_VARIANTS").ok();
    let picked = |how: &Masters| {
        wanted.as_deref().is_none_or(|w| {
            let name = format!("{how:?}").to_lowercase();
            matches!(how, Masters::Idle(0)) || w.split(',').any(|w| name.contains(w))
        })
    };
    let variants: Vec<Masters> = variants.into_iter().filter(picked).collect();
    for &k in ks {
        let mut samples = vec![Vec::new(); variants.len()];
        for _ in 0..rounds {
            for (v, &how) in variants.iter().enumerate() {
                let guest = &mut guests[usize::from(how != Masters::NoSocket)];
                let attached = attach_masters(&socket, how);
                let r = guest
                    .run(k, time, time / 4, None)
                    .unwrap_or_else(|e| panic!("{how:?}: {e}"));
                drop(attached);
                assert_eq!(r.errors, 0, "{how:?}");
                // Pairs: half the requests are UNMAPs.
                samples[v].push(r.requests_per_sec() / 2.0);
            }
        }
        let r: Vec<_> = samples.into_iter().map(stats).collect();
        let none = variants
            .iter()
            .position(|v| *v == Masters::Idle(0))
            .map_or(f64::NAN, |i| r[i].0);
        println!(
            "\n### Guest UNMAPs per second (MAP/UNMAP pairs, K={k} per kick{}), median [IQR] of {rounds} rounds (load {})\n",
            if pin { ", guest on CPU 0, daemon on CPU 1" } else { ", unpinned" },
            load_average()
        );
        println!("| daemon | masters | UNMAPs/s | no masters / this |");
        println!("|---|---|---:|---:|");
        for (i, how) in variants.iter().enumerate() {
            let (daemon, masters) = match how {
                Masters::NoSocket => ("no --master-socket", "-".to_string()),
                Masters::Idle(0) => ("--master-socket", "0".into()),
                Masters::Idle(n) => ("--master-socket", format!("{n} idle")),
                Masters::Busy(n) => ("--master-socket", format!("{n} busy (flat out)")),
                Masters::BusyOn(cpu) => (
                    "--master-socket",
                    format!(
                        "1 busy on CPU {cpu} ({})",
                        ["the guest's", "the daemon's"][*cpu]
                    ),
                ),
                Masters::Paced(n) => ("--master-socket", format!("{n} paced (64 per 100 us)")),
                Masters::Yielding(n) => (
                    "--master-socket",
                    format!("{n} busy, yielding the CPU between sections"),
                ),
            };
            println!(
                "| {daemon} | {masters} | {} | {:.2}x |",
                fmt(r[i]),
                none / r[i].0
            );
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let bench = args.iter().any(|a| a == "--bench");
    let sections: Vec<String> = std::env::var("MASTERS_SECTIONS")
        .unwrap_or_else(|_| "hit,miss,unmap".into())
        .split(',')
        .map(String::from)
        .collect();
    let sections: Vec<&str> = sections.iter().map(String::as_str).collect();
    let s = scale();
    let (time, rounds, sizes, ks, unmap_time): (_, _, &[(u64, &str)], &[usize], _) = if bench {
        (
            Duration::from_secs_f64(0.05 * s),
            9,
            &[(1 << 10, "1K"), (1 << 20, "1M")],
            &[1, 16],
            Duration::from_secs_f64(0.4 * s),
        )
    } else {
        (
            Duration::from_millis(2),
            1,
            &[(1 << 10, "1K")],
            &[1],
            Duration::from_millis(50),
        )
    };
    println!(
        "# DMA masters (load average {} at the start)",
        load_average()
    );
    if sections.contains(&"hit") || sections.contains(&"miss") {
        hit_and_miss(sizes, time, rounds, &sections);
    }
    if sections.contains(&"unmap") {
        unmap_rate(unmap_time, if bench { 5 } else { 1 }, ks);
    }
}
