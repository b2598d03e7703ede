// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The end-to-end rig: an unpatched QEMU (>= 10.2) + a stock Debian guest kernel + our
//! initramfs, driven over the serial console.
//!
//! Include it from a test file with `#[path = "e2e/rig.rs"] mod rig;`.
//!
//! * [`Rig::get`] finds the rig built by `scripts/e2e-setup.sh` (paths in `rig.env` under the
//!   cache, `${VHOST_IOMMU_CACHE:-$HOME/.cache/vhost-device-iommu}`) and decides whether e2e
//!   tests run at all (see its doc: `VHOST_IOMMU_E2E`).
//! * [`GuestConfig`] describes one guest: which IOMMU (QEMU's built-in `virtio-iommu-pci`, our
//!   daemon through `vhost-user-test-device-pci`, or none), which QEMU build (stock, or the one
//!   with the repository's QEMU patches), the accelerator, the guest steps and loop counts;
//!   [`qemu_args`] turns it into QEMU's command line.
//! * [`run_guest`] boots it, reads the console line by line with a deadline, hands every
//!   `E2E ...` marker to a callback (which may read guest RAM through [`RamFile`]), answers
//!   `wait=<n>` markers with `GO <n>` once the callback returned, and returns the whole run; any
//!   failure comes back as an [`E2eError`] whose message carries the full console log.
//!
//! The guest side is `tests/e2e/guest/` (init + e2e-guest.c): its header documents the marker
//! lines and the pattern the guest writes into buffers it shows the host.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use vhost_device_iommu::viot::{PciBdf, ViotPciRange};

/// Guest RAM size, and the size of the shared memory backend the host reads.
pub const GUEST_MEM_MIB: u64 = 512;
/// PCI address of the virtio-iommu (built-in or vhost-user): 00:04.0.
pub const IOMMU_ADDR: &str = "04.0";
/// The single-function endpoint: 00:05.0, endpoint ID 0x28.
pub const EP_BDF: &str = "0000:00:05.0";
/// The two functions of the multi-function endpoint: one IOMMU group.
pub const GROUP_BDFS: [&str; 2] = ["0000:00:06.0", "0000:00:06.1"];

/// The README's `viot` command (arguments after the binary): run from a directory, it writes
/// `viot.bin` there with the default endpoints.
pub const README_VIOT_ARGS: [&str; 5] = ["viot", "--iommu", "00:04.0", "--output", "viot.bin"];

/// libvirt's q35 layout in small: a `pcie-root-port` on the root bus (00:07.0) and a quiet
/// endpoint behind it, on the bus the firmware gives the port (bus 1).
pub const ROOT_PORT_ARGS: [&str; 4] = [
    "-device",
    "pcie-root-port,id=rp1,bus=pcie.0,chassis=1,addr=07.0",
    "-device",
    "pci-testdev,bus=rp1,addr=00.0",
];
/// The endpoint behind the root port.
pub const ROOT_PORT_EP_BDF: &str = "0000:01:00.0";

/// Endpoint ID (= requester ID) of a guest BDF `SSSS:BB:DD.F` on segment 0.
pub fn endpoint_id(bdf: &str) -> Result<u64, String> {
    let bad = || format!("not a segment 0 BDF: {bdf}");
    let rest = bdf.strip_prefix("0000:").ok_or_else(bad)?;
    let (bus, devfn) = rest.split_once(':').ok_or_else(bad)?;
    let (dev, func) = devfn.split_once('.').ok_or_else(bad)?;
    let bus = u64::from_str_radix(bus, 16).map_err(|_| bad())?;
    let dev = u64::from_str_radix(dev, 16).map_err(|_| bad())?;
    let func = u64::from_str_radix(func, 16).map_err(|_| bad())?;
    if bus > 0xff || dev > 0x1f || func > 7 {
        return Err(bad());
    }
    Ok(bus << 8 | dev << 3 | func)
}

/// The VIOT ranges for a VMM-external IOMMU: only our endpoints (00:05.0 and the functions of
/// 00:06), with endpoint ID = BDF. Devices whose DMA QEMU performs itself stay out of the range:
/// QEMU cannot see our page tables.
pub fn endpoint_viot_ranges() -> Vec<ViotPciRange> {
    let bdf = |d, f| PciBdf::new(0, d, f).expect("valid BDF");
    vec![
        ViotPciRange::identity(0, bdf(5, 0), bdf(5, 0)),
        ViotPciRange::identity(0, bdf(6, 0), bdf(6, 7)),
    ]
}

/// Waits until `path` exists (a daemon's socket), up to `timeout`.
pub fn wait_for_path(path: &Path, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    while !path.exists() {
        if Instant::now() >= deadline {
            return Err(format!(
                "{} did not appear within {timeout:?}",
                path.display()
            ));
        }
        thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Paths of a built rig.
#[derive(Clone, Debug)]
pub struct Rig {
    /// Stock QEMU: Debian's source, no functional patch.
    pub qemu: PathBuf,
    /// QEMU with scripts/qemu-patches/*.patch applied; `None` while there are no patches.
    pub qemu_patched: Option<PathBuf>,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub kernel_release: String,
    /// `-L` directories for firmware and option ROMs.
    pub firmware: Vec<PathBuf>,
}

pub fn cache_dir() -> PathBuf {
    match std::env::var_os("VHOST_IOMMU_CACHE") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
            .join(".cache/vhost-device-iommu"),
    }
}

fn repo_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

impl Rig {
    /// The rig described by `rig.env` in the cache, if every file it names exists.
    pub fn load() -> Option<Rig> {
        let text = fs::read_to_string(cache_dir().join("rig.env")).ok()?;
        let vars: BTreeMap<&str, &str> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split_once('='))
            .collect();
        let rig = Rig {
            qemu: vars.get("QEMU")?.into(),
            qemu_patched: vars.get("QEMU_PATCHED").map(PathBuf::from),
            kernel: vars.get("KERNEL")?.into(),
            initrd: vars.get("INITRD")?.into(),
            kernel_release: vars.get("KERNEL_RELEASE")?.to_string(),
            firmware: vars
                .get("FIRMWARE")?
                .split(':')
                .map(PathBuf::from)
                .collect(),
        };
        let complete = [&rig.qemu, &rig.kernel, &rig.initrd]
            .into_iter()
            .chain(rig.qemu_patched.as_ref())
            .all(|p| p.is_file());
        complete.then_some(rig)
    }

    /// The QEMU binary of `build`; the patched one exists only while scripts/qemu-patches has
    /// patches (the set-up builds it then).
    pub fn qemu_binary(&self, build: QemuBuild) -> Result<&Path, String> {
        match build {
            QemuBuild::Stock => Ok(&self.qemu),
            QemuBuild::Patched => self.qemu_patched.as_deref().ok_or_else(|| {
                "this run needs the patched QEMU (QEMU_PATCHED in rig.env), but \
                 scripts/qemu-patches has no patch"
                    .to_string()
            }),
        }
    }

    /// The rig for an e2e test, or `None` (with a SKIP line on stderr) when e2e tests are off.
    ///
    /// `VHOST_IOMMU_E2E`:
    /// * `0`: skip every e2e test;
    /// * `1`: e2e tests are required: run `scripts/e2e-setup.sh` (a cold set-up takes a few
    ///   minutes: Debian packages, QEMU build, guest kernel) and fail if it fails;
    /// * unset: run if the rig is already set up (then `scripts/e2e-setup.sh` refreshes it,
    ///   which takes seconds, e.g. to rebuild the initramfs after a change in
    ///   tests/e2e/guest/), skip otherwise.
    ///
    /// The set-up runs at most once per test binary.
    pub fn get(test: &str) -> Option<Rig> {
        static SETUP: OnceLock<Result<Rig, String>> = OnceLock::new();
        let mode = std::env::var("VHOST_IOMMU_E2E").unwrap_or_default();
        if mode == "0" {
            eprintln!("SKIP {test}: VHOST_IOMMU_E2E=0");
            return None;
        }
        if mode != "1" && Rig::load().is_none() {
            eprintln!(
                "SKIP {test}: the e2e rig is not set up in {} (run scripts/e2e-setup.sh, or set \
                 VHOST_IOMMU_E2E=1 to set it up from the test)",
                cache_dir().display()
            );
            return None;
        }
        let rig = SETUP.get_or_init(|| {
            let script = repo_dir().join("scripts/e2e-setup.sh");
            let status = Command::new("bash")
                .arg(&script)
                .stdin(Stdio::null())
                .status()
                .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
            if !status.success() {
                return Err(format!("{} failed: {status}", script.display()));
            }
            Rig::load().ok_or_else(|| "rig.env missing after set-up".to_string())
        });
        match rig {
            Ok(rig) => Some(rig.clone()),
            Err(e) => panic!("{test}: e2e rig set-up failed: {e}"),
        }
    }
}

/// Which QEMU binary runs the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QemuBuild {
    /// Unpatched: what a user's distribution QEMU (>= 10.2) can do. Every test uses it unless
    /// it needs a change listed in scripts/qemu-patches.
    Stock,
    /// With the repository's QEMU patches (tests/e2e/README.md says which and why).
    Patched,
}

/// The generic vhost-user device carrying our virtio-iommu (QEMU >= 10.2 names it so and lets
/// users create it), as `-device` takes it, without `addr=`.
pub fn vhost_user_device(chardev: &str) -> String {
    format!("vhost-user-test-device-pci,chardev={chardev},virtio-id=23,num_vqs=2,config_size=40")
}

/// Which IOMMU the guest gets at 00:04.0.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Iommu {
    /// QEMU's built-in `virtio-iommu-pci` (QEMU writes the VIOT itself).
    Builtin,
    /// Our daemon listening on `socket`, through `vhost-user-test-device-pci`. Needs a VIOT
    /// ([`GuestConfig::viot`]): QEMU writes none for it.
    VhostUser { socket: PathBuf },
    /// No IOMMU device at all (e.g. to look at what `-acpitable` does).
    None,
}

/// The accelerator: `VHOST_IOMMU_ACCEL=tcg|kvm`, default tcg. The KVM on these machines is a
/// nested software one that cannot boot a stock Debian kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    Tcg,
    Kvm,
}

impl Accel {
    pub fn from_env() -> Accel {
        match std::env::var("VHOST_IOMMU_ACCEL").as_deref() {
            Ok("kvm") => Accel::Kvm,
            Ok("tcg") | Ok("") | Err(_) => Accel::Tcg,
            Ok(other) => panic!("VHOST_IOMMU_ACCEL={other}: expected tcg or kvm"),
        }
    }
}

/// One guest run.
#[derive(Clone, Debug)]
pub struct GuestConfig {
    pub iommu: Iommu,
    pub qemu: QemuBuild,
    /// A full ACPI table for `-acpitable file=`.
    pub viot: Option<PathBuf>,
    pub accel: Accel,
    /// Guest steps (`e2e.steps`): viot, iommu, groups, bench, host, group.
    pub steps: Vec<&'static str>,
    /// PCI devices init binds to vfio-pci (`e2e.vfio`).
    pub vfio: Vec<&'static str>,
    /// The endpoint of the bench and host steps (`e2e.ep`; bound to vfio-pci through `vfio`).
    pub ep: &'static str,
    /// VFIO loop counts: 4 KiB one at a time, rounds of 32 x 4 KiB, 2 MiB.
    pub n4k: u64,
    pub rounds32: u64,
    pub n2m: u64,
    /// Seconds the guest waits for each `GO`.
    pub guest_wait_secs: u64,
    /// Kernel console log level (`loglevel=`): 4 keeps the console to errors and worse so
    /// that kernel lines do not cut marker lines; 8 shows the whole boot.
    pub loglevel: u32,
    /// Deadline for the whole run.
    pub timeout: Duration,
    pub extra_append: Vec<String>,
    pub extra_args: Vec<String>,
    /// `-no-reboot` (default): a guest reboot ends QEMU. Off, a reboot (or QMP
    /// `system_reset`) boots the guest again in the same QEMU.
    pub no_reboot: bool,
    /// `reconnect-ms=` on the vhost-user chardev: QEMU reconnects to a restarted daemon (the
    /// patched QEMU only; stock QEMU 10.2's generic device fails at start with it).
    pub reconnect_ms: Option<u32>,
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

impl GuestConfig {
    /// Every guest step with the default loop counts (the baseline: 20000 x 4 KiB, 1000 rounds
    /// of 32 x 4 KiB, 2000 x 2 MiB), overridable with VHOST_IOMMU_E2E_N4K, _ROUNDS32, _N2M;
    /// VHOST_IOMMU_E2E_TIMEOUT (seconds, default 600) and VHOST_IOMMU_E2E_LOGLEVEL.
    pub fn new(iommu: Iommu) -> GuestConfig {
        GuestConfig {
            iommu,
            qemu: QemuBuild::Stock,
            viot: None,
            accel: Accel::from_env(),
            steps: vec!["viot", "iommu", "groups", "bench", "host", "group"],
            vfio: [EP_BDF].into_iter().chain(GROUP_BDFS).collect(),
            ep: EP_BDF,
            n4k: env_u64("VHOST_IOMMU_E2E_N4K", 20000),
            rounds32: env_u64("VHOST_IOMMU_E2E_ROUNDS32", 1000),
            n2m: env_u64("VHOST_IOMMU_E2E_N2M", 2000),
            guest_wait_secs: 120,
            loglevel: env_u64("VHOST_IOMMU_E2E_LOGLEVEL", 4) as u32,
            timeout: Duration::from_secs(env_u64("VHOST_IOMMU_E2E_TIMEOUT", 600)),
            extra_append: Vec::new(),
            extra_args: Vec::new(),
            no_reboot: true,
            reconnect_ms: None,
        }
    }

    pub fn kernel_cmdline(&self) -> String {
        let mut words = vec![
            "console=ttyS0".to_string(),
            "panic=-1".to_string(),
            format!("loglevel={}", self.loglevel),
            "rdinit=/init".to_string(),
            format!("e2e.steps={}", self.steps.join(",")),
            format!("e2e.vfio={}", self.vfio.join(",")),
            format!("e2e.ep={}", self.ep),
            format!("e2e.group_ep={}", GROUP_BDFS[0]),
            format!("e2e.n4k={}", self.n4k),
            format!("e2e.rounds32={}", self.rounds32),
            format!("e2e.n2m={}", self.n2m),
            format!("e2e.wait={}", self.guest_wait_secs),
        ];
        words.extend(self.extra_append.iter().cloned());
        words.join(" ")
    }
}

/// QEMU's arguments (without the binary) for `config`, guest RAM in the file `mem_path`.
pub fn qemu_args(rig: &Rig, config: &GuestConfig, mem_path: &Path) -> Vec<String> {
    let accel = match config.accel {
        Accel::Tcg => ["q35,accel=tcg,memory-backend=mem", "max"],
        Accel::Kvm => ["q35,accel=kvm,memory-backend=mem", "host"],
    };
    let mut args: Vec<String> = vec![
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-display".into(),
        "none".into(),
        "-machine".into(),
        accel[0].into(),
        "-cpu".into(),
        accel[1].into(),
        "-smp".into(),
        "1".into(),
        "-m".into(),
        format!("{GUEST_MEM_MIB}M"),
        // Shared, file-backed RAM: a vhost-user backend maps it, and the host test reads it.
        "-object".into(),
        format!(
            "memory-backend-file,id=mem,size={GUEST_MEM_MIB}M,mem-path={},share=on",
            mem_path.display()
        ),
    ];
    if config.no_reboot {
        args.push("-no-reboot".into());
    }
    for dir in &rig.firmware {
        args.push("-L".into());
        args.push(dir.display().to_string());
    }
    args.extend([
        "-kernel".into(),
        rig.kernel.display().to_string(),
        "-initrd".into(),
        rig.initrd.display().to_string(),
        "-append".into(),
        config.kernel_cmdline(),
        // The console is the control channel: markers out, GO lines in.
        "-chardev".into(),
        "stdio,id=con,signal=off".into(),
        "-serial".into(),
        "chardev:con".into(),
    ]);
    match &config.iommu {
        Iommu::Builtin => {
            args.push("-device".into());
            args.push(format!("virtio-iommu-pci,addr={IOMMU_ADDR}"));
        }
        Iommu::VhostUser { socket } => {
            args.push("-chardev".into());
            let reconnect = config
                .reconnect_ms
                .map(|ms| format!(",reconnect-ms={ms}"))
                .unwrap_or_default();
            args.push(format!(
                "socket,id=viommu,path={}{reconnect}",
                socket.display()
            ));
            args.push("-device".into());
            args.push(format!("{},addr={IOMMU_ADDR}", vhost_user_device("viommu")));
        }
        Iommu::None => {}
    }
    if let Some(viot) = &config.viot {
        args.push("-acpitable".into());
        args.push(format!("file={}", viot.display()));
    }
    args.extend(
        [
            "pci-testdev,addr=05.0",
            "pci-testdev,addr=06.0,multifunction=on",
            "pci-testdev,addr=06.1",
        ]
        .iter()
        .flat_map(|d| ["-device".to_string(), d.to_string()]),
    );
    args.extend(config.extra_args.iter().cloned());
    args
}

/// One `E2E <EVENT> key=value ...` line from the guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Marker {
    pub event: String,
    pub fields: BTreeMap<String, String>,
    pub line: String,
}

impl Marker {
    /// Parses a console line; the marker may follow other text (a kernel line that lost its
    /// newline).
    pub fn parse(line: &str) -> Option<Marker> {
        let start = line.find("E2E ")?;
        let text = &line[start..];
        let mut words = text.split_whitespace().skip(1);
        let event = words.next()?;
        if event.is_empty() || !event.bytes().all(|b| b.is_ascii_uppercase() || b == b'_') {
            return None;
        }
        let fields = words
            .filter_map(|w| w.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Some(Marker {
            event: event.to_string(),
            fields,
            line: text.to_string(),
        })
    }

    pub fn get(&self, key: &str) -> Result<&str, String> {
        self.fields
            .get(key)
            .map(String::as_str)
            .ok_or_else(|| format!("marker without {key}=: {}", self.line))
    }

    /// A numeric field, decimal or 0x-hex.
    pub fn u64(&self, key: &str) -> Result<u64, String> {
        let v = self.get(key)?;
        let parsed = match v.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16),
            None => v.parse(),
        };
        parsed.map_err(|e| format!("{key}={v}: {e}"))
    }

    pub fn f64(&self, key: &str) -> Result<f64, String> {
        let v = self.get(key)?;
        v.parse().map_err(|e| format!("{key}={v}: {e}"))
    }

    /// A comma-separated list field.
    pub fn list(&self, key: &str) -> Result<Vec<String>, String> {
        Ok(self
            .get(key)?
            .split(',')
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect())
    }

    /// The sequence number the guest waits on, if any.
    pub fn wait(&self) -> Option<u64> {
        self.fields.get("wait").and_then(|w| w.parse().ok())
    }
}

/// Guest RAM as the host sees it: the memory-backend-file. Below 4 GiB (all of our 512 MiB)
/// a guest-physical address is the offset in the file.
pub struct RamFile {
    file: File,
    size: u64,
}

impl RamFile {
    /// The RAM file of a running QEMU.
    pub fn open(path: &Path) -> Result<RamFile, String> {
        let file = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(RamFile {
            file,
            size: GUEST_MEM_MIB << 20,
        })
    }

    pub fn read(&self, gpa: u64, len: usize) -> Result<Vec<u8>, String> {
        if gpa
            .checked_add(len as u64)
            .is_none_or(|end| end > self.size)
        {
            return Err(format!(
                "GPA {gpa:#x}+{len:#x} outside guest RAM ({:#x})",
                self.size
            ));
        }
        let mut buf = vec![0; len];
        self.file
            .read_exact_at(&mut buf, gpa)
            .map_err(|e| format!("reading guest RAM at {gpa:#x}: {e}"))?;
        Ok(buf)
    }
}

/// The bytes the guest writes into a buffer it shows the host: the little-endian u64 at byte
/// offset `o` (from the start of the buffer) is `seed << 32 | o`.
pub fn pattern(seed: u32, offset: u64, len: usize) -> Vec<u8> {
    assert!(offset % 8 == 0 && len % 8 == 0);
    (0..len as u64)
        .step_by(8)
        .flat_map(|o| ((u64::from(seed) << 32) | (offset + o)).to_le_bytes())
        .collect()
}

/// Checks every page of a marker's buffer (`gpas`, `pattern`, `len`) in guest RAM.
pub fn check_pattern(marker: &Marker, memory: &RamFile) -> Result<(), String> {
    const PAGE: u64 = 4096;
    let seed = u32::try_from(marker.u64("pattern")?).map_err(|e| e.to_string())?;
    let len = marker.u64("len")?;
    let gpas = marker.list("gpas")?;
    if gpas.len() as u64 != len.div_ceil(PAGE) {
        return Err(format!(
            "{} GPAs for {len} bytes: {}",
            gpas.len(),
            marker.line
        ));
    }
    for (i, gpa) in gpas.iter().enumerate() {
        let gpa = u64::from_str_radix(gpa.trim_start_matches("0x"), 16)
            .map_err(|e| format!("gpa {gpa}: {e}"))?;
        if gpa == 0 {
            return Err(format!("page {i} has no GPA: {}", marker.line));
        }
        let offset = i as u64 * PAGE;
        let n = (len - offset).min(PAGE) as usize;
        let got = memory.read(gpa, n)?;
        if got != pattern(seed, offset, n) {
            return Err(format!(
                "page {i} at GPA {gpa:#x}: pattern {seed:#x} not found (first bytes {:02x?})",
                &got[..16.min(n)]
            ));
        }
    }
    Ok(())
}

/// Everything a finished run printed.
#[derive(Debug, Default)]
pub struct GuestRun {
    /// Every console line (kernel and ours), in order.
    pub console: Vec<String>,
    pub markers: Vec<Marker>,
    /// Lines between DMESG_BEGIN and DMESG_END.
    pub dmesg: Vec<String>,
    pub qemu_stderr: String,
    pub elapsed: Duration,
}

impl GuestRun {
    pub fn find(&self, event: &str) -> Option<&Marker> {
        self.markers.iter().find(|m| m.event == event)
    }

    pub fn all<'a>(&'a self, event: &'a str) -> impl Iterator<Item = &'a Marker> + 'a {
        self.markers.iter().filter(move |m| m.event == event)
    }

    /// pairs/s of the BENCH marker `name`.
    pub fn bench(&self, name: &str) -> Option<f64> {
        self.all("BENCH")
            .find(|m| m.fields.get("name").map(String::as_str) == Some(name))
            .and_then(|m| m.f64("pairs_per_sec").ok())
    }
}

/// Scenario 1's groups, as the guest reported them: every endpoint bound to vfio-pci, 00:05.0
/// alone in its IOMMU group, both functions of 00:06 together in another.
pub fn assert_rig_groups(run: &GuestRun) {
    let group_of = |bdf: &str| {
        let m = run
            .all("DEVICE")
            .find(|m| m.get("bdf").unwrap() == bdf)
            .unwrap_or_else(|| panic!("no DEVICE marker for {bdf}"));
        assert_eq!(m.get("driver").unwrap(), "vfio-pci", "{}", m.line);
        m.u64("group").unwrap()
    };
    let (g5, g6, g61) = (
        group_of(EP_BDF),
        group_of(GROUP_BDFS[0]),
        group_of(GROUP_BDFS[1]),
    );
    assert_eq!(g6, g61, "both functions of 00:06 in one group");
    assert_ne!(g5, g6);
    let members = |g: u64| {
        let mut devices = run
            .all("GROUP")
            .find(|m| m.u64("group").unwrap() == g)
            .unwrap_or_else(|| panic!("no GROUP marker for {g}"))
            .list("devices")
            .unwrap();
        devices.sort();
        devices
    };
    assert_eq!(members(g5), [EP_BDF]);
    assert_eq!(members(g6), GROUP_BDFS);
}

/// A failed run: why, and everything the console and QEMU printed.
pub struct E2eError {
    pub reason: String,
    pub run: Box<GuestRun>,
    pub args: Vec<String>,
}

impl fmt::Debug for E2eError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for E2eError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "e2e guest run failed: {}", self.reason)?;
        let quoted: Vec<String> = self
            .args
            .iter()
            .map(|a| match a.contains(char::is_whitespace) {
                true => format!("'{a}'"),
                false => a.clone(),
            })
            .collect();
        writeln!(f, "--- qemu {}", quoted.join(" "))?;
        writeln!(
            f,
            "--- console ({} lines, {:.1?}):",
            self.run.console.len(),
            self.run.elapsed
        )?;
        for line in &self.run.console {
            writeln!(f, "  | {line}")?;
        }
        writeln!(f, "--- qemu stderr:\n{}", self.run.qemu_stderr)?;
        write!(
            f,
            "--- end of e2e log; reason: {} (VHOST_IOMMU_E2E_LOGLEVEL=8 shows the kernel's own \
             console output)",
            self.reason
        )
    }
}

/// One guest at a time per test binary: TCG guests on 2 cores disturb each other's timings.
fn guest_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Kills QEMU if the run ends early (error, panic in a callback).
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Boots a guest and runs it to its end.
///
/// `on_marker` sees every marker as it arrives, with guest RAM; for a marker with `wait=<n>`
/// the guest is stopped until the callback returns, then gets `GO <n>`. An `Err` from the
/// callback ends the run (QEMU is killed). The run succeeds when the guest printed
/// `E2E DONE status=ok`, reported no `FAIL`, and QEMU exited cleanly before `config.timeout`.
pub fn run_guest<F>(rig: &Rig, config: &GuestConfig, on_marker: F) -> Result<GuestRun, E2eError>
where
    F: FnMut(&Marker, &RamFile) -> Result<(), String>,
{
    let _one_at_a_time = guest_lock();
    let start = Instant::now();
    let mut run = GuestRun::default();
    let mut args = Vec::new();
    let result = tempfile::Builder::new()
        .prefix("vhost-iommu-e2e-")
        .suffix(".mem")
        .tempfile_in("/dev/shm")
        .map_err(|e| format!("cannot create guest RAM file in /dev/shm: {e}"))
        .and_then(|mem| {
            args = qemu_args(rig, config, mem.path());
            boot_and_follow(rig, config, &args, &mem, &mut run, on_marker)
        });
    run.elapsed = start.elapsed();
    match result {
        Ok(()) => Ok(run),
        Err(reason) => Err(E2eError {
            reason,
            run: Box::new(run),
            args,
        }),
    }
}

fn boot_and_follow<F>(
    rig: &Rig,
    config: &GuestConfig,
    args: &[String],
    mem: &tempfile::NamedTempFile,
    run: &mut GuestRun,
    mut on_marker: F,
) -> Result<(), String>
where
    F: FnMut(&Marker, &RamFile) -> Result<(), String>,
{
    let deadline = Instant::now() + config.timeout;
    let qemu = rig.qemu_binary(config.qemu)?;
    let mut child = Command::new(qemu)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map(KillOnDrop)
        .map_err(|e| format!("cannot start {}: {e}", qemu.display()))?;
    let mut stdin = child.0.stdin.take().expect("piped stdin");
    let stdout = child.0.stdout.take().expect("piped stdout");
    let mut stderr = child.0.stderr.take().expect("piped stderr");
    let stderr_reader = thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => {
                    let _ = tx.send(None);
                    return;
                }
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf);
                    let line = line.trim_end_matches(['\n', '\r']).replace('\r', "");
                    if tx.send(Some(line)).is_err() {
                        return;
                    }
                }
            }
        }
    });

    // The RAM file is ours; QEMU sizes it at start-up and keeps it open.
    let outcome = mem
        .reopen()
        .map_err(|e| format!("cannot open guest RAM file: {e}"))
        .and_then(|file| {
            let memory = RamFile {
                file,
                size: GUEST_MEM_MIB << 20,
            };
            follow_console(
                &rx,
                &mut stdin,
                &memory,
                run,
                deadline,
                config,
                &mut on_marker,
            )
        });

    // Once the console closed, QEMU exits by itself; otherwise (or past the deadline) kill it,
    // so that its stderr closes too.
    if outcome.is_err() {
        let _ = child.0.kill();
    }
    let status = loop {
        match child.0.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.0.kill();
                let _ = child.0.wait();
                break None;
            }
        }
    };
    run.qemu_stderr = stderr_reader.join().unwrap_or_default();
    let done = outcome?;

    let status = status.ok_or("QEMU did not exit after closing the console")?;
    if !status.success() {
        return Err(format!("QEMU exited with {status}"));
    }
    let done = done.ok_or("the guest ended without E2E DONE")?;
    if done.fields.get("status").map(String::as_str) != Some("ok") {
        return Err(format!("the guest reported failure: {}", done.line));
    }
    if let Some(failure) = run.find("FAIL") {
        return Err(format!("the guest reported: {}", failure.line));
    }
    Ok(())
}

/// Reads the console until it closes; returns the DONE marker if there was one.
fn follow_console<F>(
    rx: &mpsc::Receiver<Option<String>>,
    stdin: &mut impl Write,
    memory: &RamFile,
    run: &mut GuestRun,
    deadline: Instant,
    config: &GuestConfig,
    on_marker: &mut F,
) -> Result<Option<Marker>, String>
where
    F: FnMut(&Marker, &RamFile) -> Result<(), String>,
{
    let mut in_dmesg = false;
    let mut done = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = match rx.recv_timeout(left) {
            Ok(Some(line)) => line,
            Ok(None) => return Ok(done),
            Err(_) => {
                return Err(format!(
                    "timeout after {:?} waiting for the guest",
                    config.timeout
                ))
            }
        };
        eprintln!("[guest] {line}");
        run.console.push(line.clone());
        let Some(marker) = Marker::parse(&line) else {
            if in_dmesg {
                run.dmesg.push(line);
            }
            continue;
        };
        match marker.event.as_str() {
            "DMESG_BEGIN" => in_dmesg = true,
            "DMESG_END" => in_dmesg = false,
            "DONE" => done = Some(marker.clone()),
            _ => {}
        }
        run.markers.push(marker.clone());
        on_marker(&marker, memory).map_err(|e| format!("check at {}: {e}", marker.line))?;
        if let Some(seq) = marker.wait() {
            writeln!(stdin, "GO {seq}")
                .and_then(|_| stdin.flush())
                .map_err(|e| format!("cannot answer GO {seq}: {e}"))?;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// QMP, and sessions of one guest over several QEMUs (pause, reset, migration, reconnect)
// ---------------------------------------------------------------------------------------------

/// A QMP client on a QEMU's `-qmp unix:PATH,server=on,wait=off` socket. Events that arrive
/// while waiting for a command's answer are kept in `events`.
pub struct Qmp {
    reader: BufReader<std::os::unix::net::UnixStream>,
    writer: std::os::unix::net::UnixStream,
    pub events: Vec<serde_json::Value>,
}

impl Qmp {
    /// Connects (retrying while QEMU starts, up to `timeout`), reads the greeting and leaves
    /// capabilities negotiation mode.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp, String> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(format!("QMP socket {}: {e}", path.display())),
            }
        };
        stream
            .set_read_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        let writer = stream.try_clone().map_err(|e| e.to_string())?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
            events: Vec::new(),
        };
        let greeting = qmp.read()?;
        if greeting.get("QMP").is_none() {
            return Err(format!("not a QMP greeting: {greeting}"));
        }
        qmp.execute("qmp_capabilities", serde_json::json!({}))?;
        Ok(qmp)
    }

    fn read(&mut self) -> Result<serde_json::Value, String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err("QMP: QEMU closed the socket".into()),
            Ok(_) => serde_json::from_str(&line).map_err(|e| format!("QMP: {e}: {line:?}")),
            Err(e) => Err(format!("QMP: {e}")),
        }
    }

    /// Runs a command; its `return` value, or its `error` as an `Err`.
    pub fn execute(
        &mut self,
        command: &str,
        arguments: serde_json::Value,
    ) -> Result<serde_json::Value, String> {
        let request = serde_json::json!({"execute": command, "arguments": arguments});
        writeln!(self.writer, "{request}").map_err(|e| format!("QMP {command}: {e}"))?;
        loop {
            let reply = self.read()?;
            if let Some(r) = reply.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = reply.get("error") {
                return Err(format!("QMP {command}: {e}"));
            }
            self.events.push(reply);
        }
    }

    /// The run state (`query-status`'s `status`: running, paused, postmigrate, inmigrate...).
    pub fn status(&mut self) -> Result<String, String> {
        let r = self.execute("query-status", serde_json::json!({}))?;
        Ok(r["status"].as_str().unwrap_or_default().to_string())
    }

    /// Polls `query-status` until the run state is no longer `from` (e.g. `inmigrate` on a
    /// destination); the new state.
    pub fn wait_status_change(&mut self, from: &str, timeout: Duration) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.status()?;
            if status != from {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                return Err(format!("still {from} after {timeout:?}"));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Polls `query-migrate` until the migration is over; its last answer (`downtime`,
    /// `total-time`, `ram`, ...), or an error if it did not complete.
    pub fn wait_migration(&mut self, timeout: Duration) -> Result<serde_json::Value, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let r = self.execute("query-migrate", serde_json::json!({}))?;
            match r["status"].as_str() {
                Some("completed") => return Ok(r),
                Some("failed") | Some("cancelled") => {
                    return Err(format!("migration ended: {r}"));
                }
                _ if Instant::now() >= deadline => {
                    return Err(format!("migration not done within {timeout:?}: {r}"));
                }
                _ => thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

/// One QEMU of a [`Session`].
pub struct Vm {
    pub label: String,
    pub args: Vec<String>,
    child: Child,
    stdin: Option<std::process::ChildStdin>,
    stderr: Option<thread::JoinHandle<String>>,
    /// Guest RAM (`memory-backend-file`, ours; QEMU sizes it).
    mem: tempfile::NamedTempFile,
    qmp: Option<Qmp>,
    /// For the QMP socket and migration sockets or files.
    pub dir: tempfile::TempDir,
    exited: Option<std::process::ExitStatus>,
}

impl Vm {
    /// Guest RAM of this QEMU as the host sees it.
    pub fn memory(&self) -> Result<RamFile, String> {
        RamFile::open(self.mem.path())
    }

    /// Its QMP client.
    pub fn qmp(&mut self) -> Result<&mut Qmp, String> {
        self.qmp
            .as_mut()
            .ok_or_else(|| format!("QEMU {} has no QMP connection", self.label))
    }

    /// A QMP command (see [`Qmp::execute`]).
    pub fn execute(
        &mut self,
        command: &str,
        arguments: serde_json::Value,
    ) -> Result<serde_json::Value, String> {
        let label = self.label.clone();
        self.qmp()?
            .execute(command, arguments)
            .map_err(|e| format!("QEMU {label}: {e}"))
    }

    /// Asks QEMU to quit and waits for it.
    pub fn quit(&mut self) -> Result<(), String> {
        if self.exited.is_some() {
            return Ok(());
        }
        if let Some(qmp) = self.qmp.as_mut() {
            let _ = qmp.execute("quit", serde_json::json!({}));
        }
        let status = wait_child(&mut self.child, Duration::from_secs(30))
            .ok_or_else(|| format!("QEMU {} did not quit", self.label))?;
        self.exited = Some(status);
        Ok(())
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_child(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
            _ => return None,
        }
    }
}

/// One guest over one or more QEMUs, driven step by step: markers come from any QEMU's
/// console (a migrated guest prints on the destination's), `GO` goes to the QEMU that runs the
/// guest now ([`Session::active`]). Used where a test acts between markers (QMP commands, a
/// second QEMU, a daemon restart), where [`run_guest`]'s callback is not enough.
pub struct Session<'r> {
    rig: &'r Rig,
    pub config: GuestConfig,
    tx: mpsc::Sender<(usize, Option<String>)>,
    rx: mpsc::Receiver<(usize, Option<String>)>,
    pub vms: Vec<Vm>,
    /// The QEMU the guest runs on: `GO` lines go there.
    pub active: usize,
    /// The QEMU whose console printed the last marker.
    pub last_from: usize,
    pub run: GuestRun,
    in_dmesg: bool,
    open_consoles: usize,
    start: Instant,
    deadline: Instant,
    _one_at_a_time: MutexGuard<'static, ()>,
}

impl<'r> Session<'r> {
    /// Boots the guest of `config` on a first QEMU (labelled `label`).
    pub fn start(rig: &'r Rig, config: GuestConfig, label: &str) -> Result<Session<'r>, String> {
        let lock = guest_lock();
        let (tx, rx) = mpsc::channel();
        let start = Instant::now();
        let mut session = Session {
            rig,
            deadline: start + config.timeout,
            config,
            tx,
            rx,
            vms: Vec::new(),
            active: 0,
            last_from: 0,
            run: GuestRun::default(),
            in_dmesg: false,
            open_consoles: 0,
            start,
            _one_at_a_time: lock,
        };
        session.spawn(label, &[])?;
        Ok(session)
    }

    /// Starts another QEMU with the same configuration and `extra` arguments (for example
    /// `-incoming defer`), with RAM of its own; returns its index.
    pub fn spawn(&mut self, label: &str, extra: &[&str]) -> Result<usize, String> {
        let config = self.config.clone();
        self.spawn_with(label, &config, extra)
    }

    /// [`Session::spawn`] with another configuration (another daemon's socket, say).
    pub fn spawn_with(
        &mut self,
        label: &str,
        config: &GuestConfig,
        extra: &[&str],
    ) -> Result<usize, String> {
        let index = self.vms.len();
        let mem = tempfile::Builder::new()
            .prefix("vhost-iommu-e2e-")
            .suffix(".mem")
            .tempfile_in("/dev/shm")
            .map_err(|e| format!("cannot create guest RAM file in /dev/shm: {e}"))?;
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let qmp_path = dir.path().join("qmp.sock");
        let mut args = qemu_args(self.rig, config, mem.path());
        args.push("-qmp".into());
        args.push(format!("unix:{},server=on,wait=off", qmp_path.display()));
        args.extend(extra.iter().map(|a| a.to_string()));
        let qemu = self.rig.qemu_binary(config.qemu)?;
        let mut child = Command::new(qemu)
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", qemu.display()))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("piped stdout");
        let mut stderr = child.stderr.take().expect("piped stderr");
        let stderr = thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        let tx = self.tx.clone();
        thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => {
                        let _ = tx.send((index, None));
                        return;
                    }
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf);
                        let line = line.trim_end_matches(['\n', '\r']).replace('\r', "");
                        if tx.send((index, Some(line))).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        self.open_consoles += 1;
        let mut vm = Vm {
            label: label.to_string(),
            args,
            child,
            stdin,
            stderr: Some(stderr),
            mem,
            qmp: None,
            dir,
            exited: None,
        };
        // Kept even when QMP fails, so that the report shows this QEMU's stderr.
        let qmp = Qmp::connect(&qmp_path, Duration::from_secs(60));
        let result = qmp.map(|q| vm.qmp = Some(q));
        self.vms.push(vm);
        result
            .map(|()| index)
            .map_err(|e| format!("QEMU {label}: {e}"))
    }

    pub fn vm(&mut self, index: usize) -> &mut Vm {
        &mut self.vms[index]
    }

    /// The next marker from any QEMU's console (every line is kept in `run.console`, prefixed
    /// with its QEMU's label); `None` once every console closed.
    pub fn next_marker(&mut self) -> Result<Option<(usize, Marker)>, String> {
        loop {
            if self.open_consoles == 0 {
                return Ok(None);
            }
            let left = self.deadline.saturating_duration_since(Instant::now());
            let (index, line) = match self.rx.recv_timeout(left) {
                Ok(x) => x,
                Err(_) => {
                    return Err(format!(
                        "timeout after {:?} waiting for the guest",
                        self.config.timeout
                    ))
                }
            };
            let Some(line) = line else {
                self.open_consoles -= 1;
                continue;
            };
            let label = &self.vms[index].label;
            eprintln!("[guest {label}] {line}");
            self.run.console.push(format!("{label}| {line}"));
            let Some(marker) = Marker::parse(&line) else {
                if self.in_dmesg {
                    self.run.dmesg.push(line);
                }
                continue;
            };
            match marker.event.as_str() {
                "DMESG_BEGIN" => self.in_dmesg = true,
                "DMESG_END" => self.in_dmesg = false,
                _ => {}
            }
            self.run.markers.push(marker.clone());
            self.last_from = index;
            return Ok(Some((index, marker)));
        }
    }

    /// The next marker, which must be `event` (other markers without `wait=` are skipped;
    /// a `FAIL` or another waiting marker is an error).
    pub fn expect(&mut self, event: &str) -> Result<Marker, String> {
        loop {
            let Some((_, m)) = self.next_marker()? else {
                return Err(format!("the guest ended before {event}"));
            };
            if m.event == event {
                return Ok(m);
            }
            if m.event == "FAIL" {
                return Err(format!("the guest reported: {}", m.line));
            }
            if m.wait().is_some() {
                return Err(format!("expected {event}, got {}", m.line));
            }
        }
    }

    /// Answers a `wait=<n>` marker: `GO <n>` to the active QEMU.
    pub fn go(&mut self, marker: &Marker) -> Result<(), String> {
        let Some(seq) = marker.wait() else {
            return Ok(());
        };
        let vm = &mut self.vms[self.active];
        let stdin = vm
            .stdin
            .as_mut()
            .ok_or_else(|| format!("QEMU {} has no console", vm.label))?;
        writeln!(stdin, "GO {seq}")
            .and_then(|_| stdin.flush())
            .map_err(|e| format!("cannot answer GO {seq} to {}: {e}", vm.label))
    }

    /// Reads the guest to its end (`DONE`), answering every `wait=` marker, then waits for the
    /// active QEMU to exit (the guest powers off) and quits the others. The run succeeds when
    /// the guest said `DONE status=ok`, reported no `FAIL`, and its QEMU exited cleanly.
    pub fn finish(&mut self) -> Result<(), String> {
        let mut done = None;
        while let Some((_, m)) = self.next_marker()? {
            if m.event == "DONE" {
                done = Some(m.clone());
            }
            self.go(&m)?;
            if done.is_some() {
                break;
            }
        }
        let done = done.ok_or("the guest ended without E2E DONE")?;
        let active = self.active;
        let left = self.deadline.saturating_duration_since(Instant::now());
        let status = wait_child(
            &mut self.vms[active].child,
            left.max(Duration::from_secs(5)),
        )
        .ok_or("QEMU did not exit after the guest powered off")?;
        self.vms[active].exited = Some(status);
        for (i, vm) in self.vms.iter_mut().enumerate() {
            if i != active {
                vm.quit()?;
            }
        }
        self.run.elapsed = self.start.elapsed();
        if !status.success() {
            return Err(format!("QEMU exited with {status}"));
        }
        if done.fields.get("status").map(String::as_str) != Some("ok") {
            return Err(format!("the guest reported failure: {}", done.line));
        }
        if let Some(failure) = self.run.find("FAIL") {
            return Err(format!("the guest reported: {}", failure.line));
        }
        Ok(())
    }

    /// A failed session: every QEMU killed, the reason with everything the consoles and the
    /// QEMUs printed (for a panic message).
    pub fn report(&mut self, reason: &str) -> String {
        let mut out = format!("e2e session failed: {reason}\n");
        for vm in &mut self.vms {
            let _ = vm.child.kill();
            let _ = vm.child.wait();
            let stderr = vm
                .stderr
                .take()
                .and_then(|h| h.join().ok())
                .unwrap_or_default();
            out += &format!(
                "--- qemu {}: {}\n--- its stderr:\n{stderr}\n",
                vm.label,
                vm.args.join(" ")
            );
        }
        out += &format!(
            "--- console ({} lines, {:.1?}):\n",
            self.run.console.len(),
            self.start.elapsed()
        );
        for line in &self.run.console {
            out += &format!("  | {line}\n");
        }
        out += &format!(
            "--- end of e2e log; reason: {reason} (VHOST_IOMMU_E2E_LOGLEVEL=8 shows the kernel's \
             own console output)"
        );
        out
    }
}

/// A device's section in a migration stream: its name, its bytes, and its top-level fields'
/// bytes (`virtio` is the virtio device's own state, queues and config space included).
#[derive(Clone, Debug)]
pub struct Section {
    pub name: String,
    pub bytes: u64,
    pub fields: Vec<(String, u64)>,
}

/// Sizes of the device sections in a migration stream (`migrate` to `file:`), from the
/// description QEMU appends to it (the vmdesc JSON: per device, its fields and the bytes each
/// took), for every section whose name contains `name`.
pub fn migration_section_sizes(stream: &Path, name: &str) -> Result<Vec<Section>, String> {
    let bytes = fs::read(stream).map_err(|e| format!("{}: {e}", stream.display()))?;
    // QEMU_VM_VMDESCRIPTION (6), a big-endian u32 length, then the JSON, ending the stream.
    let at = (0..bytes.len().saturating_sub(5))
        .rev()
        .take(16 << 20)
        .find(|&p| {
            let len = u32::from_be_bytes(bytes[p + 1..p + 5].try_into().unwrap()) as usize;
            bytes[p] == 6 && bytes[p + 5] == b'{' && p + 5 + len == bytes.len()
        })
        .ok_or("no device description at the end of the migration stream")?;
    let json: serde_json::Value =
        serde_json::from_slice(&bytes[at + 5..]).map_err(|e| format!("device description: {e}"))?;
    fn size_of(v: &serde_json::Value) -> u64 {
        let fields: u64 = v["fields"]
            .as_array()
            .map(|f| f.iter().map(|f| f["size"].as_u64().unwrap_or(0)).sum())
            .unwrap_or(0);
        let subs: u64 = v["subsections"]
            .as_array()
            .map(|s| s.iter().map(size_of).sum())
            .unwrap_or(0);
        fields + subs
    }
    Ok(json["devices"]
        .as_array()
        .ok_or("no devices in the description")?
        .iter()
        .filter_map(|d| {
            let n = d["name"].as_str()?;
            let fields = d["fields"]
                .as_array()
                .map(|f| {
                    f.iter()
                        .map(|f| {
                            let name = f["name"].as_str().unwrap_or("?").to_string();
                            (name, f["size"].as_u64().unwrap_or(0))
                        })
                        .collect()
                })
                .unwrap_or_default();
            n.contains(name).then(|| Section {
                name: n.to_string(),
                bytes: size_of(d),
                fields,
            })
        })
        .collect())
}
