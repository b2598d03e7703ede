// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The request path over a real vhost-user socket, side by side in one run:
//!
//! - the daemon (release build, `CARGO_BIN_EXE_vhost-device-iommu`) with its default polling
//!   (adaptive windows up to the `--poll-us` budget), with polling off (`--poll-us 0`), and
//!   with default polling while every 2 MiB region of the IOVA window keeps one live mapping
//!   ("anchored": page-table nodes are never freed and re-allocated);
//! - a minimal backend on the same rust-vmm crates that answers OK without a model and
//!   allocates per request (`benches/common/minimal.rs`), sleeping between kicks or spinning
//!   50 us on the avail ring after work: the "minimal backend", rebuilt here so
//!   it runs on the same machine at the same time;
//! - the daemon with `--state-file` (every request journaled, every pass committed before its
//!   answers are published), and the daemon logging every page it writes into a dirty-page
//!   log, as while QEMU migrates the VM (SET_LOG_BASE, `VHOST_F_LOG_ALL`).
//!
//! The guest side is `examples/loadgen.rs` (compiled in here): MAP/UNMAP pairs, K requests
//! per kick, busy-polling the used ring. Every backend is a separate process; rounds rotate
//! over the backends so that all of them see the same machine load; each backend's rounds are
//! reported as their median, worst and best (the distribution, not one good run). At the end:
//! daemon CPU use while idle (connected, nothing sent, 2 s).
//!
//! Environment: `BENCH_SCALE` multiplies the time per run (default 1: 0.4 s per round);
//! `REQUEST_PATH_ROUNDS` sets the rounds per K (default 5).
//! `REQUEST_PATH_BASELINE=PATH` adds one more backend, another daemon binary (e.g. a build
//! of an earlier commit) with default polling, so a change is compared in the same run.
//! Under `cargo test --benches` (no `--bench`) it runs once, briefly.

#[path = "../examples/loadgen.rs"]
mod loadgen;

#[path = "common/minimal.rs"]
mod minimal;

use std::{path::Path, time::Duration};

use loadgen::{BatchResult, Guest, LoadOptions, SpawnedDaemon};

const DAEMON: &str = env!("CARGO_BIN_EXE_vhost-device-iommu");

struct Backend {
    label: &'static str,
    daemon: SpawnedDaemon,
    guest: Guest,
    /// Per K: the runs.
    results: Vec<(usize, Vec<BatchResult>)>,
    /// Where a `--state-file` daemon keeps its file.
    _state: Option<tempfile::TempDir>,
}

fn scale() -> f64 {
    std::env::var("BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0)
}

fn spawn(
    label: &'static str,
    minimal_poll_us: Option<u64>,
    args: &[&str],
    opts: LoadOptions,
    cpu: Option<usize>,
) -> Backend {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let daemon = match minimal_poll_us {
        None => SpawnedDaemon::spawn(Path::new(DAEMON), &args, cpu),
        Some(us) => {
            let exe = std::env::current_exe().expect("current_exe");
            let us = us.to_string();
            SpawnedDaemon::spawn_with(
                &exe,
                "--minimal-socket",
                &[],
                &[("MINIMAL_POLL_US", &us)],
                cpu,
            )
        }
    }
    .unwrap_or_else(|e| panic!("{label}: {e}"));
    let guest = Guest::connect(&daemon.socket, opts).unwrap_or_else(|e| panic!("{label}: {e}"));
    Backend {
        label,
        daemon,
        guest,
        results: Vec::new(),
        _state: None,
    }
}

fn baseline_daemon() -> Option<String> {
    std::env::var("REQUEST_PATH_BASELINE")
        .ok()
        .filter(|s| !s.is_empty())
}

/// Indices of the backends in [`spawn_all`]'s order.
const DEFAULT: usize = 0;
const NO_POLL: usize = 1;
const ANCHORED: usize = 2;
const MINIMAL_SLEEPS: usize = 3;
const MINIMAL_SPINS: usize = 4;
const STATE_FILE: usize = 5;
const DIRTY_LOG: usize = 6;
const BASELINE: usize = 7;

fn spawn_all(cpu: Option<usize>) -> Vec<Backend> {
    let plain = LoadOptions::default;
    let state = tempfile::tempdir().expect("tempdir");
    let state_file = state.path().join("viommu.state");
    let mut with_state = spawn(
        "daemon, poll 50 us, --state-file",
        None,
        &["--state-file", state_file.to_str().expect("utf-8 path")],
        plain(),
        cpu,
    );
    with_state._state = Some(state);
    let mut backends = vec![
        spawn("daemon, poll 50 us (default)", None, &[], plain(), cpu),
        spawn(
            "daemon, --poll-us 0",
            None,
            &["--poll-us", "0"],
            plain(),
            cpu,
        ),
        spawn(
            "daemon, poll 50 us, anchored",
            None,
            &[],
            LoadOptions {
                anchored: true,
                ..plain()
            },
            cpu,
        ),
        spawn("minimal, sleeps between kicks", Some(0), &[], plain(), cpu),
        spawn("minimal, spins 50 us", Some(50), &[], plain(), cpu),
        with_state,
        spawn(
            "daemon, poll 50 us, dirty-page log on",
            None,
            &[],
            LoadOptions {
                dirty_log: true,
                ..plain()
            },
            cpu,
        ),
    ];
    if let Some(path) = baseline_daemon() {
        let daemon = SpawnedDaemon::spawn(Path::new(&path), &[], cpu)
            .unwrap_or_else(|e| panic!("baseline {path}: {e}"));
        let guest = Guest::connect(&daemon.socket, LoadOptions::default())
            .unwrap_or_else(|e| panic!("baseline {path}: {e}"));
        backends.push(Backend {
            label: "baseline daemon (REQUEST_PATH_BASELINE), poll 50 us",
            daemon,
            guest,
            results: Vec::new(),
            _state: None,
        });
    }
    backends
}

/// A placement's name, its backends, and per backend and K its runs, sorted by rate.
type Placement<'a> = (&'a str, Vec<Backend>, Vec<Vec<Runs>>);

/// One backend's rounds at one K, slowest first.
struct Runs(Vec<BatchResult>);

impl Runs {
    fn new(mut v: Vec<BatchResult>) -> Runs {
        v.sort_by(|a, b| a.requests_per_sec().total_cmp(&b.requests_per_sec()));
        Runs(v)
    }

    /// The middle round; of an even number, the slower of the two in the middle (never the
    /// best of two).
    fn median(&self) -> &BatchResult {
        &self.0[(self.0.len() - 1) / 2]
    }

    fn worst(&self) -> &BatchResult {
        &self.0[0]
    }

    fn best(&self) -> &BatchResult {
        &self.0[self.0.len() - 1]
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--minimal-socket") {
        let poll = std::env::var("MINIMAL_POLL_US")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        minimal::serve(Path::new(&args[i + 1]), Duration::from_micros(poll));
    }
    let bench = args.iter().any(|a| a == "--bench");
    let test = !bench || args.iter().any(|a| a == "--test");
    let rounds_env = std::env::var("REQUEST_PATH_ROUNDS")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .filter(|&n| n > 0);
    let (duration, warmup, rounds, ks, idle): (f64, f64, usize, &[usize], f64) = if test {
        (0.05, 0.01, 1, &[1, 16], 0.2)
    } else {
        (
            0.4 * scale(),
            0.1,
            rounds_env.unwrap_or(5),
            &[1, 2, 16, 64],
            2.0,
        )
    };
    let started = std::time::Instant::now();
    println!("request path: load average before: {}", load_average());
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    // Placements: client and backend on CPUs of their own, then wherever the scheduler puts
    // them (two spinners on one CPU starve each other: see BENCHMARKS.md).
    let mut placements: Vec<(&str, Option<(usize, usize)>)> = Vec::new();
    if cpus >= 2 {
        placements.push(("pinned: client CPU 0, backend CPU 1", Some((0, 1))));
    }
    placements.push(("unpinned", None));
    let mut all: Vec<Placement> = Vec::new();
    for (name, pin) in placements {
        let mut backends = spawn_all(pin.map(|p| p.1));
        loadgen::pin_current_thread(pin.map(|p| p.0));
        for &k in ks {
            for b in backends.iter_mut() {
                b.results.push((k, Vec::new()));
            }
            for _ in 0..rounds {
                for b in backends.iter_mut() {
                    let pid = b.daemon.pid();
                    let r = b
                        .guest
                        .run(
                            k,
                            Duration::from_secs_f64(duration),
                            Duration::from_secs_f64(warmup),
                            Some(pid),
                        )
                        .unwrap_or_else(|e| panic!("{} K={k}: {e}", b.label));
                    assert_eq!(r.errors, 0, "{} K={k}: requests failed", b.label);
                    b.results.last_mut().unwrap().1.push(r);
                }
            }
        }
        loadgen::pin_current_thread(None);
        let medians: Vec<Vec<Runs>> = backends
            .iter_mut()
            .map(|b| {
                std::mem::take(&mut b.results)
                    .into_iter()
                    .map(|(_, runs)| Runs::new(runs))
                    .collect()
            })
            .collect();
        all.push((name, backends, medians));
    }
    // Idle: everyone connected, nothing sent, measured over the same window.
    let pids: Vec<u32> = all
        .iter()
        .flat_map(|(_, bs, _)| bs.iter().map(|b| b.daemon.pid()))
        .collect();
    let before: Vec<_> = pids.iter().map(|&p| loadgen::process_cpu(p)).collect();
    let t0 = std::time::Instant::now();
    std::thread::sleep(Duration::from_secs_f64(idle));
    let window = t0.elapsed().as_secs_f64();
    let idle_pct: Vec<Option<f64>> = pids
        .iter()
        .zip(&before)
        .map(|(&p, b)| {
            let a = loadgen::process_cpu(p)?;
            Some((a.saturating_sub((*b)?)).as_secs_f64() / window * 100.0)
        })
        .collect();
    println!("request path: load average after: {}", load_average());

    for (name, backends, medians) in &all {
        println!();
        println!(
            "== request path, {name}: MAP/UNMAP pairs over vhost-user, K per kick, median of {rounds} rounds of {duration:.1} s =="
        );
        println!("{}", loadgen::TABLE_HEADER);
        for ki in 0..ks.len() {
            for (b, m) in backends.iter().zip(medians) {
                println!("{}", loadgen::format_row(b.label, m[ki].median()));
            }
        }
        println!();
        println!("every round, {name}: requests/s, median / worst / best of {rounds}:");
        println!();
        println!("| backend | K per kick | median | worst | best | all rounds (M/s) |");
        println!("|---|---:|---:|---:|---:|---|");
        for (ki, &k) in ks.iter().enumerate() {
            for (b, m) in backends.iter().zip(medians) {
                let runs = &m[ki];
                println!(
                    "| {} | {k} | {:.2}M | {:.2}M | {:.2}M | {} |",
                    b.label,
                    runs.median().requests_per_sec() / 1e6,
                    runs.worst().requests_per_sec() / 1e6,
                    runs.best().requests_per_sec() / 1e6,
                    runs.0
                        .iter()
                        .map(|r| format!("{:.2}", r.requests_per_sec() / 1e6))
                        .collect::<Vec<_>>()
                        .join(" ")
                );
            }
        }
        println!();
        println!("ratios of the medians (requests/s), {name}:");
        println!();
        let baseline = medians.len() > BASELINE;
        println!(
            "| K | daemon poll / minimal spin | daemon no-poll / minimal sleep | daemon poll / daemon no-poll | anchored / not | --state-file / not | dirty log / not |{}",
            if baseline { " daemon poll / baseline daemon |" } else { "" }
        );
        println!(
            "|---:|---:|---:|---:|---:|---:|---:|{}",
            if baseline { "---:|" } else { "" }
        );
        for (ki, &k) in ks.iter().enumerate() {
            let r = |i: usize| medians[i][ki].median().requests_per_sec();
            let extra = if baseline {
                format!(" {:.2} |", r(DEFAULT) / r(BASELINE))
            } else {
                String::new()
            };
            println!(
                "| {k} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |{extra}",
                r(DEFAULT) / r(MINIMAL_SPINS),
                r(NO_POLL) / r(MINIMAL_SLEEPS),
                r(DEFAULT) / r(NO_POLL),
                r(ANCHORED) / r(DEFAULT),
                r(STATE_FILE) / r(DEFAULT),
                r(DIRTY_LOG) / r(DEFAULT),
            );
        }
    }
    println!();
    println!("== CPU while idle (connected, nothing sent, {window:.1} s) ==");
    let mut i = 0;
    for (name, backends, _) in &all {
        for b in backends {
            println!(
                "- {} ({name}): {}",
                b.label,
                idle_pct[i].map_or("unreadable".to_string(), |p| format!("{p:.3}% of one CPU"))
            );
            i += 1;
        }
    }
    println!();
    println!("== targets (one daemon thread, polling on) ==");
    let find = |k: usize| ks.iter().position(|&x| x == k);
    for (name, _, medians) in &all {
        for (k, target) in [(64, 6e6), (2, 3e6)] {
            if let Some(i) = find(k) {
                let runs = &medians[DEFAULT][i];
                let r = runs.median().requests_per_sec();
                println!(
                    "- >= {:.0}M requests/s at {k} per kick ({name}), median of {rounds}: {:.2}M (worst {:.2}M): {}",
                    target / 1e6,
                    r / 1e6,
                    runs.worst().requests_per_sec() / 1e6,
                    if r >= target { "MET" } else { "NOT MET" }
                );
            }
        }
    }
    println!();
    println!("== targets (state file) ==");
    for (name, backends, medians) in &all {
        if let Some(i) = find(64) {
            let ratio = medians[STATE_FILE][i].median().requests_per_sec()
                / medians[DEFAULT][i].median().requests_per_sec();
            println!(
                "- --state-file >= 0.9x at 64 per kick ({name}): {ratio:.2}x: {}",
                if ratio >= 0.9 { "MET" } else { "NOT MET" }
            );
        }
        // The log was really written (a daemon that ignored it would look free).
        println!(
            "- dirty-page log ({name}): {} pages marked",
            backends[DIRTY_LOG].guest.dirty_pages()
        );
    }
    let per_placement = all.first().map_or(5, |(_, bs, _)| bs.len());
    let worst_idle = idle_pct
        .iter()
        .step_by(per_placement)
        .flatten()
        .fold(0.0f64, |a, &b| a.max(b));
    println!(
        "- 0% CPU when idle (daemon, polling on): {worst_idle:.3}%: {}",
        if worst_idle < 0.05 { "MET" } else { "NOT MET" }
    );
    println!();
    println!(
        "(request_path bench: {:.0} s, BENCH_SCALE={})",
        started.elapsed().as_secs_f64(),
        scale()
    );
}
