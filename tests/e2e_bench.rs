// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The guest's view of performance: the same VFIO map/unmap loop against QEMU's built-in
//! virtio-iommu-pci and against our daemon, alternated round by round, same kernel, same
//! accelerator; the distribution of the ratio over the rounds (median, worst, spread); what
//! decided each daemon round's latency (how the worker found its requests, its sleeps and poll
//! windows, where the scheduler ran it next to QEMU's vCPU thread); and the daemon's CPU use
//! while the guest idles.
//!
//! Not part of `cargo test` (ignored): run `scripts/e2e-bench.sh`. Knobs:
//! - VHOST_IOMMU_BENCH_ROUNDS: rounds (default 5; each runs both devices, in turn first);
//! - VHOST_IOMMU_BENCH_DAEMON_ARGS: extra daemon arguments, e.g. "--poll-mode fixed";
//! - VHOST_IOMMU_BENCH_PIN: CPU placement forced on the threads once found, for experiments:
//!   "vcpu=0,worker=0" pins QEMU's vCPU thread and the daemon's request worker (both to CPU 0);
//! - the rig's VHOST_IOMMU_E2E_N4K, _ROUNDS32, _N2M, VHOST_IOMMU_ACCEL.
//!
//! Scheduler figures come from /proc: every 2 ms a sampler thread reads the state and
//! CPU (`stat` fields 3 and 39) of QEMU's vCPU thread ("CPU 0/TCG") and of the daemon's
//! request worker ("vring_worker"); `schedstat` (time run, time waiting for a CPU, time
//! slices) is read at the start and end of each loop, and so are the daemon's counters.

mod common;
#[path = "e2e/rig.rs"]
mod rig;

use std::{
    fmt::Write as _,
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use common::Daemon;
use rig::{GuestConfig, Iommu, Rig};
use serde_json::Value;
use vhost_device_iommu::viot::{build_viot, PciBdf};

const ROWS: [(&str, &str); 3] = [
    ("map4k_x1", "4 KiB, one at a time"),
    ("map4k_x32", "4 KiB, 32 maps then 32 unmaps"),
    ("map2m", "2 MiB buffer"),
];

/// CPU seconds (user + system) the process has used.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields = stat_fields(&stat);
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks / hz
}

/// The fields of a `stat` line after the command name (in parentheses): `[0]` is field 3.
fn stat_fields(stat: &str) -> Vec<&str> {
    stat[stat.rfind(')').map_or(0, |i| i + 2)..]
        .split_whitespace()
        .collect()
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// A thread of a process, found by the start of its name.
fn find_thread(pid: u32, name: &str) -> Option<u32> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut found = None;
    for entry in dir.flatten() {
        let tid: u32 = entry.file_name().to_str()?.parse().ok()?;
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if comm.trim_end().starts_with(name) {
            // The newest one (a worker per connection; older ones are gone or going).
            found = Some(found.map_or(tid, |t: u32| t.max(tid)));
        }
    }
    found
}

/// Our QEMU child (the rig runs one guest at a time).
fn find_qemu() -> Option<u32> {
    let me = std::process::id();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let comm = stat
            .split_once('(')
            .and_then(|(_, r)| r.rsplit_once(')'))
            .map_or("", |(c, _)| c);
        let fields = stat_fields(&stat);
        if comm.starts_with("qemu-system") && fields.get(1) == Some(&me.to_string().as_str()) {
            return Some(pid);
        }
    }
    None
}

/// (state, CPU) of a thread.
fn thread_place(pid: u32, tid: u32) -> Option<(char, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).ok()?;
    let f = stat_fields(&stat);
    Some((f.first()?.chars().next()?, f.get(36)?.parse().ok()?))
}

/// `schedstat`: nanoseconds run, nanoseconds waited for a CPU, time slices.
#[derive(Clone, Copy, Debug, Default)]
struct SchedStat {
    run_ns: u64,
    wait_ns: u64,
    slices: u64,
}

fn schedstat(pid: u32, tid: u32) -> Option<SchedStat> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/schedstat")).ok()?;
    let v: Vec<u64> = s
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    Some(SchedStat {
        run_ns: *v.first()?,
        wait_ns: *v.get(1)?,
        slices: *v.get(2)?,
    })
}

fn pin_thread(tid: u32, cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes inside it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(tid as i32, std::mem::size_of_val(&set), &set) != 0 {
            eprintln!(
                "pin {tid} to CPU {cpu}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// `VHOST_IOMMU_BENCH_PIN`: (vCPU's CPU, worker's CPU).
fn pin_plan() -> (Option<usize>, Option<usize>) {
    let spec = std::env::var("VHOST_IOMMU_BENCH_PIN").unwrap_or_default();
    let mut plan = (None, None);
    for part in spec.split(',').filter(|s| !s.is_empty()) {
        match part.split_once('=') {
            Some(("vcpu", c)) => plan.0 = c.parse().ok(),
            Some(("worker", c)) => plan.1 = c.parse().ok(),
            _ => panic!("VHOST_IOMMU_BENCH_PIN: {part:?} (expected vcpu=N,worker=N)"),
        }
    }
    plan
}

/// One sample of where the two threads were.
#[derive(Clone, Copy, Debug)]
struct Sample {
    at: Instant,
    vcpu: Option<(char, i32)>,
    worker: Option<(char, i32)>,
}

/// The threads a run is about, found by the sampler.
#[derive(Clone, Copy, Debug, Default)]
struct Threads {
    qemu: Option<u32>,
    vcpu: Option<u32>,
    daemon: Option<u32>,
    worker: Option<u32>,
}

#[derive(Default)]
struct Shared {
    threads: Threads,
    samples: Vec<Sample>,
    stop: bool,
}

/// Samples thread placement every 2 ms until told to stop.
fn sampler(shared: Arc<Mutex<Shared>>, daemon: Option<u32>) -> thread::JoinHandle<()> {
    let (pin_vcpu, pin_worker) = pin_plan();
    thread::spawn(move || {
        let mut t = Threads {
            daemon,
            ..Threads::default()
        };
        let mut pinned = (false, false);
        loop {
            if shared.lock().unwrap().stop {
                return;
            }
            if t.qemu.is_none() {
                t.qemu = find_qemu();
            }
            if let (Some(q), None) = (t.qemu, t.vcpu) {
                t.vcpu = find_thread(q, "CPU 0/");
            }
            if let Some(d) = t.daemon {
                // A new connection has a new worker: look again until one is found.
                if t.worker.is_none_or(|w| thread_place(d, w).is_none()) {
                    t.worker = find_thread(d, "vring_worker");
                }
            }
            if let (Some(cpu), Some(tid), false) = (pin_vcpu, t.vcpu, pinned.0) {
                pin_thread(tid, cpu);
                pinned.0 = true;
            }
            if let (Some(cpu), Some(tid), false) = (pin_worker, t.worker, pinned.1) {
                pin_thread(tid, cpu);
                pinned.1 = true;
            }
            let sample = Sample {
                at: Instant::now(),
                vcpu: t.qemu.zip(t.vcpu).and_then(|(p, v)| thread_place(p, v)),
                worker: t.daemon.zip(t.worker).and_then(|(p, w)| thread_place(p, w)),
            };
            {
                let mut s = shared.lock().unwrap();
                s.threads = t;
                s.samples.push(sample);
            }
            thread::sleep(Duration::from_millis(2));
        }
    })
}

/// What was measured at one edge of a loop.
#[derive(Clone, Debug)]
struct Edge {
    at: Instant,
    vcpu: Option<SchedStat>,
    worker: Option<SchedStat>,
    stats: Option<Value>,
}

fn edge(shared: &Mutex<Shared>, daemon: Option<&Daemon>) -> Edge {
    let t = shared.lock().unwrap().threads;
    Edge {
        at: Instant::now(),
        vcpu: t.qemu.zip(t.vcpu).and_then(|(p, v)| schedstat(p, v)),
        worker: t.daemon.zip(t.worker).and_then(|(p, w)| schedstat(p, w)),
        stats: daemon.map(|d| d.stats()),
    }
}

/// One loop of one run.
#[derive(Clone, Debug)]
struct Loop {
    rate: f64,
    /// The guest's own ioctl latencies, sampled: map p50/p99, unmap p50/p99 (microseconds).
    guest_us: [f64; 4],
    figures: Option<Figures>,
}

/// What decided a loop's latency, from the edges and the samples between them.
#[derive(Clone, Debug, Default)]
struct Figures {
    /// Share of the samples where the vCPU thread and the worker were both runnable on one CPU,
    /// where they were on one CPU at all (the worker perhaps asleep), and CPU changes of the
    /// worker between samples.
    shared_runnable: f64,
    same_cpu: f64,
    worker_moves: u64,
    vcpu_cpu: String,
    worker_cpu: String,
    /// Share of the wall time the vCPU thread and the worker waited for a CPU while runnable,
    /// and the worker's CPU use.
    vcpu_wait: f64,
    worker_wait: f64,
    worker_cpu_use: f64,
    /// Worker wait per time slice (microseconds).
    worker_wait_per_slice_us: f64,
    /// Daemon counters over the loop.
    requests: f64,
    woken: f64,
    polled: f64,
    rechecked: f64,
    sleeps_per_s: f64,
    windows: f64,
    windows_empty: f64,
    windows_lost: f64,
    windows_skipped: f64,
    windows_stolen: f64,
    yields_late: f64,
    window_us_end: f64,
}

fn delta(a: &Value, b: &Value, path: &[&str]) -> f64 {
    let get = |v: &Value| {
        path.iter()
            .fold(v, |v, k| &v[*k])
            .as_f64()
            .unwrap_or_default()
    };
    get(b) - get(a)
}

fn requests_total(stats: &Value) -> f64 {
    let mut n = 0.0;
    if let Some(by_type) = stats["requests"].as_object() {
        for statuses in by_type.values() {
            if let Some(m) = statuses.as_object() {
                n += m.values().filter_map(Value::as_f64).sum::<f64>();
            }
        }
    }
    n
}

fn mode_cpu(v: impl Iterator<Item = i32>) -> String {
    let mut counts = std::collections::BTreeMap::new();
    let mut n = 0;
    for c in v {
        *counts.entry(c).or_insert(0u64) += 1;
        n += 1;
    }
    if n == 0 {
        return "-".into();
    }
    counts
        .iter()
        .map(|(c, k)| format!("{c}:{:.0}%", *k as f64 * 100.0 / n as f64))
        .collect::<Vec<_>>()
        .join(" ")
}

fn figures(start: &Edge, end: &Edge, samples: &[Sample]) -> Figures {
    let secs = end.at.duration_since(start.at).as_secs_f64();
    let inside: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.at >= start.at && s.at <= end.at)
        .collect();
    let both: Vec<((char, i32), (char, i32))> =
        inside.iter().filter_map(|s| s.vcpu.zip(s.worker)).collect();
    let n = both.len().max(1) as f64;
    let shared_runnable = both
        .iter()
        .filter(|(v, w)| v.0 == 'R' && w.0 == 'R' && v.1 == w.1)
        .count() as f64
        / n;
    let same_cpu = both.iter().filter(|(v, w)| v.1 == w.1).count() as f64 / n;
    let worker_cpus: Vec<i32> = inside
        .iter()
        .filter_map(|s| s.worker.map(|w| w.1))
        .collect();
    let worker_moves = worker_cpus.windows(2).filter(|w| w[0] != w[1]).count() as u64;
    let mut f = Figures {
        shared_runnable,
        same_cpu,
        worker_moves,
        vcpu_cpu: mode_cpu(inside.iter().filter_map(|s| s.vcpu.map(|v| v.1))),
        worker_cpu: mode_cpu(worker_cpus.iter().copied()),
        ..Figures::default()
    };
    let ns = secs * 1e9;
    if let (Some(a), Some(b)) = (start.vcpu, end.vcpu) {
        f.vcpu_wait = b.wait_ns.saturating_sub(a.wait_ns) as f64 / ns;
    }
    if let (Some(a), Some(b)) = (start.worker, end.worker) {
        f.worker_wait = b.wait_ns.saturating_sub(a.wait_ns) as f64 / ns;
        f.worker_cpu_use = b.run_ns.saturating_sub(a.run_ns) as f64 / ns;
        f.worker_wait_per_slice_us = b.wait_ns.saturating_sub(a.wait_ns) as f64
            / 1e3
            / (b.slices.saturating_sub(a.slices)).max(1) as f64;
    }
    if let (Some(a), Some(b)) = (&start.stats, &end.stats) {
        f.requests = requests_total(b) - requests_total(a);
        f.polled = delta(a, b, &["polled_requests"]);
        f.woken = delta(a, b, &["pacing", "requests", "woken"]);
        f.rechecked = delta(a, b, &["pacing", "requests", "rechecked"]);
        f.sleeps_per_s = delta(a, b, &["pacing", "sleeps"]) / secs;
        f.windows = delta(a, b, &["pacing", "windows", "started"]);
        f.windows_empty = delta(a, b, &["pacing", "windows", "empty"]);
        f.windows_lost = delta(a, b, &["pacing", "windows", "preempted"]);
        f.windows_skipped = delta(a, b, &["pacing", "windows", "skipped"]);
        f.windows_stolen = delta(a, b, &["pacing", "windows", "stolen"]);
        f.yields_late = delta(a, b, &["pacing", "yields_late"]);
        f.window_us_end = b["pacing"]["window_ns"].as_f64().unwrap_or_default() / 1e3;
    }
    f
}

fn pct(x: f64) -> String {
    format!("{:.0}%", x * 100.0)
}

/// One line of figures for a round of one device.
fn describe(which: &str, name: &str, l: &Loop) -> String {
    let g = l.guest_us;
    let mut s = format!(
        "{which:7} {name:9} {:9.0} pairs/s | guest us map p50 {:.1} p99 {:.1} unmap p50 {:.1} p99 {:.1}",
        l.rate, g[0], g[1], g[2], g[3]
    );
    if let Some(f) = &l.figures {
        let _ = write!(s, " | vCPU on {} waited {}", f.vcpu_cpu, pct(f.vcpu_wait));
        if f.requests > 0.0 {
            let r = f.requests;
            let _ = write!(
                s,
                " | worker on {} (moves {}), cpu {}, waited {} ({:.0} us/slice), both runnable on one CPU {} (same CPU {}) | requests woken {} polled {} rechecked {}, sleeps {:.0}/s, windows {:.0}: empty {} lost CPU {:.0}, CPU stopped {:.0}, skipped {:.0}, late yields {:.0}, window at end {:.0} us",
                f.worker_cpu,
                f.worker_moves,
                pct(f.worker_cpu_use),
                pct(f.worker_wait),
                f.worker_wait_per_slice_us,
                pct(f.shared_runnable),
                pct(f.same_cpu),
                pct(f.woken / r),
                pct(f.polled / r),
                pct(f.rechecked / r),
                f.sleeps_per_s,
                f.windows,
                pct(f.windows_empty / f.windows.max(1.0)),
                f.windows_lost,
                f.windows_stolen,
                f.windows_skipped,
                f.yields_late,
                f.window_us_end,
            );
        }
    }
    s
}

#[test]
#[ignore = "a benchmark: run scripts/e2e-bench.sh"]
fn guest_view_benchmark() {
    let Some(rig) = Rig::get("guest_view_benchmark") else {
        return;
    };
    let rounds: usize = std::env::var("VHOST_IOMMU_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(5);
    let extra = std::env::var("VHOST_IOMMU_BENCH_DAEMON_ARGS").unwrap_or_default();
    let mut args = vec![
        "--endpoints",
        "00:05.0,00:06.0-00:06.7",
        "--group",
        "00:06.0-00:06.7",
    ];
    args.extend(extra.split_whitespace());
    let daemon = Daemon::start(&args);
    let viot = daemon.dir.path().join("viot.bin");
    let table = build_viot(PciBdf::new(0, 4, 0).unwrap(), &rig::endpoint_viot_ranges()).unwrap();
    std::fs::write(&viot, table).unwrap();
    let load_before = load_average();
    let started = Instant::now();

    // [row][round]
    let mut builtin: Vec<Vec<Loop>> = vec![Vec::new(); ROWS.len()];
    let mut ours: Vec<Vec<Loop>> = vec![Vec::new(); ROWS.len()];
    let mut idle_cpu = Vec::new();
    let mut loads = Vec::new();
    for round in 0..rounds {
        // Each device goes first in every other round.
        let order = if round % 2 == 0 {
            ["builtin", "daemon"]
        } else {
            ["daemon", "builtin"]
        };
        loads.push(load_average());
        for which in order {
            let is_daemon = which == "daemon";
            let mut config = if is_daemon {
                let mut c = GuestConfig::new(Iommu::VhostUser {
                    socket: daemon.socket.clone(),
                });
                c.viot = Some(viot.clone());
                c
            } else {
                GuestConfig::new(Iommu::Builtin)
            };
            // The loop, then one host stop where the guest sits idle for a second.
            config.steps = vec!["iommu", "bench", "host"];
            config.vfio = vec![rig::EP_BDF];
            // Thread names ("CPU 0/TCG") for the sampler.
            config.extra_args = vec!["-name".into(), "e2e,debug-threads=on".into()];
            let pid = daemon.pid();
            let shared = Arc::new(Mutex::new(Shared::default()));
            let sampling = sampler(shared.clone(), is_daemon.then_some(pid));
            let mut starts: Vec<(String, Edge)> = Vec::new();
            let mut loops: Vec<(String, Loop)> = Vec::new();
            let run = rig::run_guest(&rig, &config, |m, _| {
                let name = m.fields.get("name").cloned().unwrap_or_default();
                match m.event.as_str() {
                    "BENCH_START" => {
                        starts.push((name, edge(&shared, is_daemon.then_some(&daemon))));
                    }
                    "BENCH" => {
                        let end = edge(&shared, is_daemon.then_some(&daemon));
                        let figures = starts.iter().find(|(n, _)| *n == name).map(|(_, start)| {
                            figures(start, &end, &shared.lock().unwrap().samples)
                        });
                        let us = |k: &str| m.f64(k).unwrap_or(f64::NAN) / 1e3;
                        loops.push((
                            name,
                            Loop {
                                rate: m.f64("pairs_per_sec").unwrap_or(f64::NAN),
                                guest_us: [
                                    us("map_p50_ns"),
                                    us("map_p99_ns"),
                                    us("unmap_p50_ns"),
                                    us("unmap_p99_ns"),
                                ],
                                figures,
                            },
                        ));
                    }
                    "MAPPED" if is_daemon => {
                        // The guest waits for us: nothing should run in the daemon now.
                        thread::sleep(Duration::from_millis(200));
                        let (c0, t0) = (cpu_seconds(pid), Instant::now());
                        thread::sleep(Duration::from_secs(1));
                        idle_cpu.push((cpu_seconds(pid) - c0) / t0.elapsed().as_secs_f64());
                    }
                    _ => {}
                }
                Ok(())
            });
            shared.lock().unwrap().stop = true;
            sampling.join().unwrap();
            let run = run.unwrap_or_else(|e| panic!("{which} round {round}: {e}"));
            for (i, (name, _)) in ROWS.iter().enumerate() {
                run.bench(name)
                    .unwrap_or_else(|| panic!("{which} round {round}: no BENCH {name}"));
                let l = loops
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, l)| l.clone())
                    .unwrap();
                eprintln!("round {round} {}", describe(which, name, &l));
                if is_daemon {
                    ours[i].push(l)
                } else {
                    builtin[i].push(l)
                }
            }
        }
    }
    let load_after = load_average();
    let pacing = &daemon.stats()["pacing"];
    let hist = |k: &str| {
        let h = &pacing[k];
        format!(
            "{k}: {} samples, p50 {} p90 {} p99 {} max {}",
            h["count"], h["p50"], h["p90"], h["p99"], h["max"]
        )
    };
    eprintln!(
        "daemon timings (ns), all rounds: {}; {}; {}",
        hist("service_ns"),
        hist("polled_gap_ns"),
        hist("sleep_ns")
    );
    eprintln!(
        "daemon sleep_ns buckets [lowest ns, count]: {}",
        pacing["sleep_ns"]["buckets"]
    );
    eprintln!(
        "daemon polled_gap_ns buckets [lowest ns, count]: {}",
        pacing["polled_gap_ns"]["buckets"]
    );

    let accel = std::env::var("VHOST_IOMMU_ACCEL").unwrap_or_else(|_| "tcg".into());
    println!(
        "\nGuest VFIO map+unmap loop, {accel}, 1 vCPU; {rounds} rounds, each device first in \
         every other round (daemon args: {:?}); load average {load_before} before, \
         {load_after} after; {:.0} s\n",
        args,
        started.elapsed().as_secs_f64()
    );
    println!(
        "| loop | QEMU built-in, median pairs/s | vhost-device-iommu, median pairs/s | ratio per round | median ratio | worst | spread (best - worst) |"
    );
    println!("|---|---:|---:|---|---:|---:|---:|");
    let mut targets = Vec::new();
    for (i, (_, label)) in ROWS.iter().enumerate() {
        let b: Vec<f64> = builtin[i].iter().map(|l| l.rate).collect();
        let o: Vec<f64> = ours[i].iter().map(|l| l.rate).collect();
        let ratios: Vec<f64> = b.iter().zip(&o).map(|(b, o)| o / b).collect();
        let worst = ratios.iter().cloned().fold(f64::INFINITY, f64::min);
        let best = ratios.iter().cloned().fold(0.0, f64::max);
        println!(
            "| {label} | {:.0} | {:.0} | {} | {:.2}x | {:.2}x | {:.2} |",
            median(&b),
            median(&o),
            ratios
                .iter()
                .map(|r| format!("{r:.2}"))
                .collect::<Vec<_>>()
                .join(" "),
            median(&ratios),
            worst,
            best - worst
        );
        let met = |ok: bool| if ok { "MET" } else { "NOT MET" };
        targets.push(format!(
            "- {label}: worst >= 1.0x: {worst:.2}x {}; median >= 1.2x (goal 1.5x): {:.2}x {}",
            met(worst >= 1.0),
            median(&ratios),
            met(median(&ratios) >= 1.2)
        ));
    }
    println!("\nTargets, over {rounds} rounds:\n{}", targets.join("\n"));
    println!(
        "\nLoad average (1, 5, 15 min) at the start of each round: {}",
        loads.join("; ")
    );
    let worst = idle_cpu.iter().cloned().fold(0.0, f64::max);
    println!(
        "Daemon CPU while the guest idles: {:.2}% at most (over {} one-second samples)",
        worst * 100.0,
        idle_cpu.len()
    );
}
