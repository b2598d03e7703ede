//! The guest's view of performance: the same VFIO map/unmap loop against
//! QEMU's built-in virtio-iommu-pci and against our daemon, alternated in one run, same kernel,
//! same accelerator; plus the daemon's CPU use while the guest idles.
//!
//! Not part of `cargo test` (ignored): run `scripts/e2e-bench.sh`. Knobs:
//! VHOST_IOMMU_BENCH_ROUNDS (default 3 runs of each device), VHOST_IOMMU_BENCH_DAEMON_ARGS
//! (extra daemon arguments, e.g. "--poll-us 0"), and the rig's VHOST_IOMMU_E2E_N4K, _ROUNDS32,
//! _N2M, VHOST_IOMMU_ACCEL.

mod common;
#[path = "e2e/rig.rs"]
mod rig;

use std::time::{Duration, Instant};

use common::Daemon;
use rig::{GuestConfig, Iommu, Rig};
use vhost_device_iommu::viot::{build_viot, PciBdf};

const ROWS: [(&str, &str); 3] = [
    ("map4k_x1", "4 KiB, one at a time"),
    ("map4k_x32", "4 KiB, 32 maps then 32 unmaps"),
    ("map2m", "2 MiB buffer"),
];

/// CPU seconds (user + system) the process has used.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which is in parentheses): utime is 14th, stime 15th.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks / hz
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
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
        .unwrap_or(3);
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

    let mut builtin: Vec<Vec<f64>> = vec![Vec::new(); ROWS.len()];
    let mut ours: Vec<Vec<f64>> = vec![Vec::new(); ROWS.len()];
    let mut idle_cpu = Vec::new();
    for round in 0..rounds {
        for which in ["builtin", "daemon"] {
            let mut config = if which == "builtin" {
                GuestConfig::new(Iommu::Builtin)
            } else {
                let mut c = GuestConfig::new(Iommu::VhostUser {
                    socket: daemon.socket.clone(),
                });
                c.viot = Some(viot.clone());
                c
            };
            // The loop, then one host stop where the guest sits idle for a second.
            config.steps = vec!["iommu", "bench", "host"];
            config.vfio = vec![rig::EP_BDF];
            let pid = daemon.pid();
            let run = rig::run_guest(&rig, &config, |m, _| {
                if which == "daemon" && m.event == "MAPPED" {
                    // The guest waits for us: nothing should run in the daemon now.
                    std::thread::sleep(Duration::from_millis(200));
                    let (c0, t0) = (cpu_seconds(pid), Instant::now());
                    std::thread::sleep(Duration::from_secs(1));
                    idle_cpu.push((cpu_seconds(pid) - c0) / t0.elapsed().as_secs_f64());
                }
                Ok(())
            })
            .unwrap_or_else(|e| panic!("{which} round {round}: {e}"));
            for (i, (name, _)) in ROWS.iter().enumerate() {
                let rate = run.bench(name).unwrap_or_else(|| panic!("no BENCH {name}"));
                if which == "builtin" {
                    builtin[i].push(rate)
                } else {
                    ours[i].push(rate)
                }
                eprintln!("round {round} {which:7} {name:9} {rate:9.0} pairs/s");
            }
        }
    }

    let accel = std::env::var("VHOST_IOMMU_ACCEL").unwrap_or_else(|_| "tcg".into());
    println!(
        "\nGuest VFIO map+unmap loop, {accel}, 1 vCPU; median of {rounds} runs each, alternated \
         (daemon args: {:?})\n",
        args
    );
    println!("| loop | QEMU built-in (pairs/s) | vhost-device-iommu (pairs/s) | ratio |");
    println!("|---|---|---|---|");
    for (i, (_, label)) in ROWS.iter().enumerate() {
        let (b, o) = (median(&mut builtin[i]), median(&mut ours[i]));
        println!("| {label} | {b:.0} | {o:.0} | {:.2}x |", o / b);
    }
    let worst = idle_cpu.iter().cloned().fold(0.0, f64::max);
    println!(
        "\nDaemon CPU while the guest idles: {:.2}% at most (over {} one-second samples)",
        worst * 100.0,
        idle_cpu.len()
    );
}
