// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Saving and loading the device state of 1M 4 KiB mappings: what a migration (the source's
//! SET_DEVICE_STATE_FD(SAVE), the destination's LOAD) and a `--state-file` snapshot cost.
//!
//! One daemon `Device` gets 1M MAPs of 4 KiB through the request engine's own `execute`, in
//! one domain attached to one endpoint, in three layouts:
//! - "dense": IOVAs and GPAs both contiguous (the smallest state: every mapping is 4 bytes);
//! - "linux": IOVAs top-down from 1 TiB as Linux's IOVA allocator hands them out, each page at
//!   a random GPA below 4 GiB (a guest's scattered pages);
//! - "random": IOVAs at random 4 KiB slots of 64 GiB (outside x86's MSI window) and random
//!   GPAs, mapped in a random order (the worst case the encoding meets: a long gap and a long
//!   GPA jump for every mapping).
//!
//! Save: `Device::save_state` (the model's walk into a `GuestState`, then the encoding, with
//! its checksum). Load: `Device::load_state` into a fresh device (decode, checks, and the
//! model's `restore`, which rebuilds the page tables). Samples alternate save and load; each
//! figure is the median of the samples, with the fastest and slowest beside it.
//!
//! Goals: save and load each within 1 s, at most 16 bytes of state per mapping.
//! Environment: `STATE_BENCH_SAMPLES` (default 7). Under `cargo test --benches` it runs once on
//! 10K mappings.

use std::{
    hint::black_box,
    time::{Duration, Instant},
};

use clap::Parser;
use vhost_device_iommu::{
    config::{Cli, DaemonConfig},
    device::Device,
    request,
};
use virtio::{MapFlags, Request};

const PAGE: u64 = 4096;
const ENDPOINT: u32 = 0x28;

fn config() -> DaemonConfig {
    let cli = Cli::try_parse_from([
        "vhost-device-iommu",
        "--socket-path",
        "unused",
        "--endpoints",
        "00:05.0",
    ])
    .expect("options");
    DaemonConfig::try_from(cli.serve.expect("serve")).expect("config")
}

/// splitmix64: the same layout on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49eb_133b_111f);
        z ^ (z >> 31)
    }
}

/// `(iova, gpa)` of each mapping.
fn layout(name: &str, n: u64) -> Vec<(u64, u64)> {
    let mut rng = Rng(0x5eed);
    match name {
        "dense" => (0..n)
            .map(|i| (0x1_0000_0000 + i * PAGE, i * PAGE))
            .collect(),
        "linux" => (0..n)
            .map(|i| {
                let iova = (1 << 40) - (i + 1) * PAGE;
                (iova, (rng.next() % (1 << 20)) * PAGE)
            })
            .collect(),
        "random" => {
            // Distinct slots among the 16M of 64 GiB, none in the MSI window.
            let slots = 16u64 << 20;
            let msi = (0xfee0_0000 / PAGE)..(0xfef0_0000 / PAGE);
            let mut chosen = std::collections::BTreeSet::new();
            while (chosen.len() as u64) < n {
                let slot = rng.next() % slots;
                if !msi.contains(&slot) {
                    chosen.insert(slot);
                }
            }
            let mut v: Vec<(u64, u64)> = chosen
                .into_iter()
                .map(|s| (s * PAGE, (rng.next() % (1 << 20)) * PAGE))
                .collect();
            // Mapped in a random order, as the slots were drawn.
            for i in (1..v.len()).rev() {
                v.swap(i, (rng.next() % (i as u64 + 1)) as usize);
            }
            v
        }
        other => panic!("unknown layout {other}"),
    }
}

/// A device holding `mappings` in domain 1, attached to the endpoint.
fn device_with(mappings: &[(u64, u64)]) -> std::sync::Arc<Device> {
    let device = Device::new(&config()).expect("device");
    let mut iommu = device.iommu();
    let attach = Request::Attach {
        domain: 1,
        endpoint: ENDPOINT,
        bypass: false,
    };
    request::execute(&mut iommu, &attach).expect("ATTACH");
    let flags = MapFlags {
        read: true,
        write: true,
        mmio: false,
    };
    for &(iova, gpa) in mappings {
        let map = Request::Map {
            domain: 1,
            virt_start: iova,
            virt_end: iova + PAGE - 1,
            phys_start: gpa,
            flags,
        };
        request::execute(&mut iommu, &map).expect("MAP");
    }
    drop(iommu);
    device
}

struct Spread {
    median: Duration,
    min: Duration,
    max: Duration,
}

fn spread(mut v: Vec<Duration>) -> Spread {
    v.sort();
    Spread {
        median: v[v.len() / 2],
        min: v[0],
        max: v[v.len() - 1],
    }
}

fn ms(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1e3)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let bench = args.iter().any(|a| a == "--bench");
    let test = !bench || args.iter().any(|a| a == "--test");
    let (n, samples) = if test {
        (10_000, 1)
    } else {
        let samples = std::env::var("STATE_BENCH_SAMPLES")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(7);
        (1 << 20, samples)
    };
    let started = Instant::now();
    println!("state: load average before: {}", load_average());
    let mut rows = Vec::new();
    for name in ["dense", "linux", "random"] {
        let mappings = layout(name, n);
        let t = Instant::now();
        let source = device_with(&mappings);
        let built = t.elapsed();
        let mut saves = Vec::new();
        let mut loads = Vec::new();
        let mut bytes = Vec::new();
        for _ in 0..samples {
            let t = Instant::now();
            bytes = black_box(source.save_state());
            saves.push(t.elapsed());
            let target = Device::new(&config()).expect("device");
            let t = Instant::now();
            target.load_state(&bytes).expect("the state loads");
            loads.push(t.elapsed());
            assert_eq!(target.iommu().stats().mappings, n, "{name}: all loaded");
            drop(target);
        }
        let per_mapping = bytes.len() as f64 / n as f64;
        let (save, load) = (spread(saves), spread(loads));
        println!(
            "state {name}: {n} mappings (built in {} ms), {} bytes ({per_mapping:.2} per mapping); \
             save {} ms [{}-{}], load {} ms [{}-{}] over {samples} samples",
            ms(built),
            bytes.len(),
            ms(save.median),
            ms(save.min),
            ms(save.max),
            ms(load.median),
            ms(load.min),
            ms(load.max),
        );
        rows.push((name, bytes.len(), per_mapping, save, load));
    }
    println!("state: load average after: {}", load_average());
    println!();
    println!("== device state of {n} 4 KiB mappings: median of {samples} (fastest-slowest) ==");
    println!();
    println!("| layout | bytes | bytes per mapping | save ms | load ms |");
    println!("|---|---:|---:|---:|---:|");
    for (name, bytes, per, save, load) in &rows {
        println!(
            "| {name} | {bytes} | {per:.2} | {} ({}-{}) | {} ({}-{}) |",
            ms(save.median),
            ms(save.min),
            ms(save.max),
            ms(load.median),
            ms(load.min),
            ms(load.max)
        );
    }
    println!();
    println!("== targets ==");
    for (name, _, per, save, load) in &rows {
        let met = |ok: bool| if ok { "MET" } else { "NOT MET" };
        println!(
            "- {name}: save <= 1 s: {} ms {}; load <= 1 s: {} ms {}; <= 16 bytes per mapping: \
             {per:.2} {}",
            ms(save.median),
            met(save.median <= Duration::from_secs(1)),
            ms(load.median),
            met(load.median <= Duration::from_secs(1)),
            met(*per <= 16.0),
        );
    }
    println!("\n(state bench: {:.0} s)", started.elapsed().as_secs_f64());
}
