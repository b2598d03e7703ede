// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Command line and topology: everything a user gives the daemon, validated in one place
//! (`TryFrom<ServeArgs> for DaemonConfig`) into the device's features, config space and
//! topology.

use std::{os::unix::io::RawFd, path::PathBuf, str::FromStr, time::Duration};

use clap::{ArgGroup, Args, Parser, Subcommand};
use ownership::{EndpointId, Limits, ResvKind, ResvRegion, Topology, TopologyError};
use thiserror::Error;
use virtio::{
    Config, F_BYPASS_CONFIG, F_DOMAIN_RANGE, F_INPUT_RANGE, F_MAP_UNMAP, F_MMIO, F_PROBE,
};

use crate::{
    control,
    request::MAX_PROBE_REGIONS,
    seccomp::SeccompMode,
    viot::{build_viot, PciBdf, ViotError, ViotPciRange},
};

/// Endpoints served by default: every BDF of PCI segment 0, so that devices behind root ports
/// (libvirt's q35 layout puts them on buses 1 and up) are translated without options.
const DEFAULT_ENDPOINTS: &str = "00:00.0-ff:1f.7";

/// The most page-table memory an arena holds, in MiB.
const MAX_TABLE_MIB: u64 = ownership::MAX_TABLE_BYTES >> 20;
/// Longest control-socket timeout accepted: a day.
const MAX_CONTROL_TIMEOUT_SECS: u64 = 24 * 60 * 60;

/// VIRTIO_F_VERSION_1.
pub const F_VERSION_1: u64 = 1 << 32;
/// VIRTIO_RING_F_INDIRECT_DESC.
pub const F_RING_INDIRECT_DESC: u64 = 1 << 28;
/// VIRTIO_RING_F_EVENT_IDX.
pub const F_RING_EVENT_IDX: u64 = 1 << 29;

const EXAMPLES: &str = "\
Examples:
  # Serve every endpoint of PCI segment 0 (the defaults), with a control socket:
  vhost-device-iommu --socket-path /tmp/viommu.sock --control-socket /tmp/viommu.ctl

  # Two functions of one device share isolation:
  vhost-device-iommu -s /tmp/viommu.sock --group 00:06.0,00:06.1

  # The ACPI VIOT table QEMU passes to the guest (IOMMU at 00:04.0, every other BDF of
  # segment 0 translated):
  vhost-device-iommu viot --iommu 00:04.0 --output viot.bin

  # QEMU >= 10.2, unpatched:
  qemu-system-x86_64 -machine q35 -m 512M \\
    -object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem \\
    -chardev socket,id=viommu,path=/tmp/viommu.sock \\
    -device vhost-user-test-device-pci,chardev=viommu,virtio-id=23,num_vqs=2,config_size=40,addr=04.0 \\
    -acpitable file=viot.bin ...
";

/// A virtio-iommu device (virtio ID 23) served over vhost-user.
///
/// The daemon follows QEMU's vhost-user backend program conventions: it serves frontend
/// after frontend on --socket-path or on a listening socket handed over with --fd, prints its
/// capabilities with --print-capabilities, and ends cleanly on SIGTERM, removing the sockets
/// it created (never an --fd socket's path). The ctl subcommand talks to a running daemon's
/// control socket.
///
/// Exit status: 0 on success (a daemon, after SIGINT or SIGTERM); 2 when clap rejects the
/// command line (an unknown option, a malformed value); 1 on any other error, options that
/// contradict each other included, with one line on stderr.
#[derive(Parser, Debug)]
#[command(
    name = "vhost-device-iommu",
    version,
    about,
    after_help = EXAMPLES,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub serve: Option<ServeArgs>,
    /// Print the backend's capabilities as JSON (the vhost-user backend program convention)
    /// and exit; every other argument is ignored.
    #[arg(long)]
    pub print_capabilities: bool,
}

// Parsed once at start-up: the size of the serve variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve the device (the default when no subcommand is given).
    Serve(ServeArgs),
    /// Write the ACPI VIOT table that tells the guest which endpoints the IOMMU translates.
    Viot(ViotArgs),
    /// Send one request to a running daemon's control socket and print the JSON reply.
    Ctl(crate::ctl::CtlArgs),
}

/// Options of `serve`.
#[derive(Args, Debug, Clone)]
#[command(group(ArgGroup::new("listen").required(true).args(["socket_path", "fd"])))]
pub struct ServeArgs {
    /// vhost-user socket to listen on (the VMM connects to it).
    #[arg(short = 's', long, value_name = "PATH")]
    pub socket_path: Option<PathBuf>,

    /// Serve on this inherited file descriptor, a listening Unix stream socket handed over by a
    /// management layer, instead of creating --socket-path. The daemon never unlinks its path.
    #[arg(long, value_name = "FD", value_parser = clap::value_parser!(RawFd).range(0..))]
    pub fd: Option<RawFd>,

    /// Control socket (line-oriented JSON: stats, domains, translate, claim, release; see the
    /// ctl subcommand).
    #[arg(long, value_name = "PATH")]
    pub control_socket: Option<PathBuf>,

    /// Disconnect a control client that sends no whole request line for this long after
    /// connecting or after its last reply (seconds): a client slot is one of 16.
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = control::Timeouts::default().idle.as_secs(),
        value_parser = clap::value_parser!(u64).range(1..=MAX_CONTROL_TIMEOUT_SECS)
    )]
    pub control_idle_timeout: u64,

    /// Disconnect a control client that does not take a reply within this long (seconds).
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = control::Timeouts::default().write.as_secs(),
        value_parser = clap::value_parser!(u64).range(1..=MAX_CONTROL_TIMEOUT_SECS)
    )]
    pub control_write_timeout: u64,

    /// Permission bits of the sockets the daemon creates (octal).
    #[arg(long, value_name = "MODE", default_value = "600", value_parser = parse_mode)]
    pub socket_mode: u32,

    /// Endpoints the IOMMU translates: PCI BDFs (00:05.0), raw IDs (0x28, 40) or ranges of
    /// either (00:00.0-00:1f.7). A PCI endpoint's ID is its requester ID. The default is every
    /// BDF of segment 0, whatever bus a device sits on (behind root ports too).
    #[arg(
        long,
        value_name = "LIST",
        value_delimiter = ',',
        default_value = DEFAULT_ENDPOINTS
    )]
    pub endpoints: Vec<EndpointRange>,

    /// Endpoints the platform cannot isolate from each other (one IOMMU group), e.g.
    /// 00:06.0,00:06.1 or 00:06.0-00:06.7. Repeat for several groups. Every other endpoint is
    /// a group of its own.
    #[arg(long, value_name = "LIST")]
    pub group: Vec<EndpointList>,

    /// A reserved IOVA region reported by PROBE: START-END[:msi|:reserved][@ENDPOINTS]
    /// (inclusive end; default kind reserved; default all endpoints). Repeatable.
    #[arg(long, value_name = "REGION")]
    pub reserved: Vec<ReservedRegion>,

    /// Do not report x86's MSI doorbell (0xfee00000-0xfeefffff) as an MSI region.
    #[arg(long)]
    pub no_msi_region: bool,

    /// Page sizes the device maps; the lowest set bit is the granule (at least 4 KiB).
    #[arg(long, value_name = "MASK", default_value = "0x1000", value_parser = parse_u64)]
    pub page_size_mask: u64,

    /// IOVAs the device translates, START-END inclusive.
    #[arg(long, value_name = "RANGE", default_value = "0-0xffffffffffff", value_parser = parse_range)]
    pub input_range: (u64, u64),

    /// Domain IDs the guest may use, START-END inclusive.
    #[arg(long, value_name = "RANGE", default_value = "0-0xffffffff", value_parser = parse_domain_range)]
    pub domain_range: (u32, u32),

    /// Start with config `bypass` = 1: unattached endpoints reach guest memory untranslated.
    #[arg(long)]
    pub bypass: bool,

    /// Offer VIRTIO_IOMMU_F_MMIO (MAP_F_MMIO mappings).
    #[arg(long)]
    pub mmio: bool,

    /// Size of the PROBE properties buffer, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 512)]
    pub probe_size: u32,

    /// Largest number of live domains (NOMEM beyond).
    #[arg(long, value_name = "N", default_value_t = Limits::default().max_domains)]
    pub max_domains: u32,

    /// Largest number of mappings over all domains (NOMEM beyond).
    #[arg(long, value_name = "N", default_value_t = Limits::default().max_mappings)]
    pub max_mappings: u64,

    /// Largest number of mappings in one domain (NOMEM beyond).
    #[arg(long, value_name = "N", default_value_t = Limits::default().max_mappings_per_domain)]
    pub max_mappings_per_domain: u64,

    /// Page-table memory over all domains, in MiB (NOMEM beyond); at most 524288 (512 GiB,
    /// the most page-table nodes a domain's published root can name).
    #[arg(
        long,
        value_name = "MIB",
        default_value_t = Limits::default().max_table_bytes >> 20,
        value_parser = clap::value_parser!(u64).range(1..=MAX_TABLE_MIB)
    )]
    pub max_table_mib: u64,

    /// Fault records kept while the guest posts no event buffers (oldest dropped beyond).
    #[arg(long, value_name = "N", default_value_t = 256)]
    pub fault_backlog: usize,

    /// The poll budget: after a burst of requests, poll the request queue at most this long
    /// (microseconds) with notifications off before sleeping, so that the guest's next
    /// request needs no kick and no wake-up. Costs up to this much CPU per burst while the
    /// guest is busy, none while it is quiet; 0 disables polling (every request then waits
    /// for a kick and a wake-up).
    #[arg(long, value_name = "US", default_value_t = 50)]
    pub poll_us: u64,

    /// How long each poll window is: `adaptive` follows the guest's gaps between requests
    /// (0 up to the budget) and stops polling for a while when the worker loses its CPU to
    /// another task (a vCPU on the same CPU); `fixed` polls the whole budget after every burst,
    /// whoever else wants the CPU, which can hold up a vCPU sharing it. Both yield the CPU
    /// every 1024 spins.
    #[arg(long, value_name = "MODE", value_enum, default_value_t = crate::pacing::PollMode::Adaptive)]
    pub poll_mode: crate::pacing::PollMode,

    /// Run each connection's request worker (the thread that serves the queues) only on these
    /// CPUs, e.g. `3` or `2-3,6`: a CPU no vCPU uses keeps its polling away from the guest.
    /// Costs the scheduler's freedom to move the worker off a busy CPU; on a vCPU's CPU it is
    /// the worst placement. Default: wherever the scheduler puts it.
    #[arg(long, value_name = "LIST", value_parser = parse_cpu_list)]
    pub worker_cpus: Option<CpuList>,

    /// Largest virtqueue size offered to the frontend (a power of two, 2 to 32768).
    #[arg(long, value_name = "N", default_value = "1024", value_parser = parse_queue_size)]
    pub queue_size: u16,

    /// Once the sockets exist, confine every thread to the system calls serving needs (a
    /// seccomp allowlist); MODE says what a call outside it does.
    #[arg(long, value_name = "MODE", value_enum, default_value_t = SeccompMode::Off)]
    pub seccomp: SeccompMode,

    /// The request queue's ring fast path (a troubleshooting switch): off sends every chain
    /// through virtio-queue, for comparison and as a fallback.
    #[arg(long, value_name = "on|off", value_enum, default_value_t = Switch::On)]
    pub ring_fast_path: Switch,

    /// Keep the guest-visible state in PATH (and PATH.journal, both mode 0600) while serving,
    /// and resume it when started again with the same PATH and options: a restarted daemon
    /// carries on where the last one stopped, without a guest reset.
    #[arg(long, value_name = "PATH")]
    pub state_file: Option<PathBuf>,

    /// Start from an empty state even if --state-file holds one (damaged, from other
    /// options, or simply unwanted), replacing it.
    #[arg(long, requires = "state_file")]
    pub fresh_state: bool,

    /// Records the state file's journal holds (64 bytes each) before the state is written
    /// whole again: more means rarer rewrites and a longer replay at start. At least twice
    /// the queue size.
    #[arg(
        long,
        value_name = "N",
        default_value_t = crate::statefile::DEFAULT_RECORDS as u64,
        value_parser = clap::value_parser!(u64).range(16..=1 << 26),
        requires = "state_file"
    )]
    pub state_journal_records: u64,

    /// Socket for DMA masters in other processes (device backends linking the
    /// vhost-iommu-client crate): they map the page tables read-only and translate IOVAs
    /// themselves. Without it, the tables stay in the daemon's private memory.
    #[arg(long, value_name = "PATH")]
    pub master_socket: Option<PathBuf>,

    /// How long a grace period (an UNMAP, DETACH, ATTACH elsewhere, reset) waits for one
    /// section of a DMA master before it cuts the master off, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 100,
          value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub master_stall_ms: u64,

    /// DMA masters served at once; more are refused.
    #[arg(long, value_name = "N", default_value_t = 16,
          value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub max_masters: u64,
}

/// An option that is `on` or `off`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Switch {
    On,
    Off,
}

impl Switch {
    pub fn is_on(self) -> bool {
        self == Switch::On
    }
}

/// Options of `viot`.
#[derive(Args, Debug, Clone)]
pub struct ViotArgs {
    /// PCI address of the virtio-iommu device (the -device ... addr= given to QEMU), on
    /// segment 0.
    #[arg(long, value_name = "BDF", default_value = "00:04.0")]
    pub iommu: PciBdf,

    /// PCI endpoint ranges the IOMMU translates (BDF or BDF-BDF), comma-separated. Keep
    /// devices whose DMA the VMM emulates itself out of them. Default: every BDF of segment 0
    /// but the IOMMU's own (two ranges around it).
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    pub endpoints: Vec<ViotPciRange>,

    /// Where to write the table.
    #[arg(short, long, value_name = "FILE")]
    pub output: PathBuf,
}

/// What is wrong with the command line. Value errors (one option's value) reach the user
/// through clap, which names the option; the rest name the options involved themselves.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("invalid number {0:?} (expected decimal, or hex with 0x)")]
    Number(String),
    #[error("invalid PCI address {0:?} (expected [SEGMENT:]BUS:DEV.FN, e.g. 00:05.0)")]
    Bdf(String),
    #[error("invalid endpoint {0:?} (expected a PCI address such as 00:05.0, or a 32-bit ID)")]
    Endpoint(String),
    #[error("invalid range {0:?} (expected START-END, inclusive)")]
    Range(String),
    #[error("invalid domain range {0:?} (expected START-END within 0-0xffffffff)")]
    DomainRange(String),
    #[error("invalid reserved region {0:?} (expected START-END[:msi|:reserved][@ENDPOINTS])")]
    Region(String),
    #[error("invalid socket mode {0:?} (expected octal, at most 777, e.g. 600)")]
    Mode(String),
    #[error("endpoint range {0:?} names more than 65536 endpoints")]
    TooManyEndpoints(String),
    #[error("queue size {0:?} is not a power of two between 2 and 32768")]
    QueueSize(String),
    #[error("invalid CPU list {0:?} (expected e.g. 3 or 2-3,6; CPUs 0 to 1023)")]
    CpuList(String),
    #[error("{0:?} is on PCI segment {1}; the VIOT's virtio-pci IOMMU node is on segment 0")]
    IommuSegment(String, u16),
    #[error("invalid PCI range {0:?} (expected BDF or BDF-BDF on one segment, first <= last)")]
    PciRange(String),
    #[error("exactly one of --socket-path and --fd is required")]
    Listen,
    #[error(
        "endpoint {} has more than {MAX_PROBE_REGIONS} reserved regions \
         (--reserved, and x86's MSI region unless --no-msi-region)",
        endpoint_bdf(*.0)
    )]
    TooManyRegions(EndpointId),
    #[error(
        "--probe-size {probe_size} cannot hold the {needed} bytes of PROBE properties of the \
         reserved regions (--reserved, and x86's MSI region unless --no-msi-region)"
    )]
    ProbeSize { probe_size: u32, needed: usize },
    #[error("{flags}: {source}")]
    Topology {
        flags: &'static str,
        source: TopologyError,
    },
    #[error("config space ({flags}): {source}")]
    ConfigSpace {
        flags: &'static str,
        source: virtio::ConfigError,
    },
}

impl From<TopologyError> for ConfigError {
    fn from(source: TopologyError) -> Self {
        use TopologyError as T;
        let flags = match &source {
            T::EmptyPageSizeMask | T::GranuleTooSmall(_) => "--page-size-mask",
            T::EmptyInputRange { .. } => "--input-range",
            T::EmptyDomainRange { .. } => "--domain-range",
            T::NoEndpoints | T::DuplicateEndpoint(_) => "--endpoints",
            T::EmptyGroup(_) | T::EndpointInTwoGroups(_) => "--group",
            T::GroupMemberUnknown(_) => "--group, --endpoints",
            T::EmptyRegion { .. } | T::RegionEndpointUnknown(_) => "--reserved",
            T::OverlappingRegions(_) | T::TwoMsiRegions(_) => "--reserved, --no-msi-region",
            T::ZeroLimit("max_domains") => "--max-domains",
            T::ZeroLimit("max_mappings_per_domain") => "--max-mappings-per-domain",
            T::ZeroLimit("max_mappings") => "--max-mappings",
            T::ZeroLimit(_) | T::TableMemory(_) => "--max-table-mib",
        };
        ConfigError::Topology { flags, source }
    }
}

impl From<virtio::ConfigError> for ConfigError {
    fn from(source: virtio::ConfigError) -> Self {
        use virtio::ConfigError as C;
        let flags = match source {
            C::PageSizeMaskZero => "--page-size-mask",
            C::InputRange { .. } => "--input-range",
            C::DomainRange { .. } => "--domain-range",
            C::Bypass(_) => "--bypass",
        };
        ConfigError::ConfigSpace { flags, source }
    }
}

/// Where the vhost-user frontends come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A socket the daemon creates at this path (and removes at exit).
    Path(PathBuf),
    /// A listening socket inherited as this file descriptor (`--fd`); its path, if any,
    /// belongs to whoever created it.
    Fd(RawFd),
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Path(path) => write!(f, "{}", path.display()),
            Listen::Fd(fd) => write!(f, "fd {fd}"),
        }
    }
}

/// The validated daemon configuration.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub listen: Listen,
    pub control_socket: Option<PathBuf>,
    pub control_timeouts: control::Timeouts,
    pub socket_mode: u32,
    pub topology: Topology,
    /// Device features offered (virtio-iommu bits plus VERSION_1 and ring features).
    pub features: u64,
    /// The config space at device start; `bypass` is the only field the driver may change.
    pub config: Config,
    pub fault_backlog: usize,
    pub poll: crate::pacing::PollPolicy,
    /// `--worker-cpus`: the request worker's CPUs.
    pub worker_cpus: Option<CpuList>,
    pub queue_size: u16,
    /// The seccomp filter installed before serving.
    pub seccomp: SeccompMode,
    /// Whether the request queue may use the ring fast path (`ring.rs`); false sends every
    /// chain through virtio-queue.
    pub ring_fast_path: bool,
    /// `--state-file`, whether to start fresh (`--fresh-state`), the journal's records.
    pub state_file: Option<PathBuf>,
    pub fresh_state: bool,
    pub state_journal_records: usize,
    /// DMA masters: their socket (None: no masters, tables in private memory), the bound on
    /// one of their sections, how many at once.
    pub masters: Option<MastersConfig>,
}

/// `--master-socket` and its options.
#[derive(Debug, Clone)]
pub struct MastersConfig {
    pub socket: PathBuf,
    pub stall: Duration,
    pub max: usize,
}

/// Parses `0x1f`, `31` or `1_000`.
pub fn parse_u64(s: &str) -> Result<u64, ConfigError> {
    let clean: String = s.trim().chars().filter(|&c| c != '_').collect();
    let parsed = match clean
        .strip_prefix("0x")
        .or_else(|| clean.strip_prefix("0X"))
    {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => clean.parse(),
    };
    parsed.map_err(|_| ConfigError::Number(s.to_string()))
}

/// Parses a PCI address `[SEGMENT:]BUS:DEV.FN` (hex) into `(segment, requester ID)`.
pub fn parse_bdf(s: &str) -> Result<(u16, u16), ConfigError> {
    let err = || ConfigError::Bdf(s.to_string());
    let (rest, function) = s.trim().rsplit_once('.').ok_or_else(err)?;
    let parts: Vec<&str> = rest.split(':').collect();
    let (segment, bus, device) = match parts.as_slice() {
        [bus, dev] => ("0", *bus, *dev),
        [seg, bus, dev] => (*seg, *bus, *dev),
        _ => return Err(err()),
    };
    let hex = |v: &str, max: u32| {
        u32::from_str_radix(v, 16)
            .ok()
            .filter(|&n| n <= max && !v.is_empty())
            .ok_or_else(err)
    };
    let (segment, bus, device, function) = (
        hex(segment, 0xffff)?,
        hex(bus, 0xff)?,
        hex(device, 0x1f)?,
        hex(function, 7)?,
    );
    Ok((
        segment as u16,
        ((bus << 8) | (device << 3) | function) as u16,
    ))
}

/// An endpoint ID, wherever a user names one (the command line, the control socket): a PCI
/// address `[SEGMENT:]BUS:DEV.FN` (the ID is `segment << 16 | requester ID`, as the VIOT this
/// program writes maps them) or a raw 32-bit number (`40`, `0x28`).
pub fn parse_endpoint(s: &str) -> Result<EndpointId, ConfigError> {
    if s.contains(':') {
        let (segment, rid) = parse_bdf(s)?;
        Ok((u32::from(segment) << 16) | u32::from(rid))
    } else {
        parse_u64(s)
            .ok()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| ConfigError::Endpoint(s.to_string()))
    }
}

/// An endpoint ID as the PCI address it names under [`parse_endpoint`]'s mapping:
/// `BUS:DEV.FN` on segment 0 (`00:05.0` for 0x28), `SEGMENT:BUS:DEV.FN` above.
pub fn endpoint_bdf(id: EndpointId) -> String {
    let (segment, rid) = ((id >> 16) as u16, PciBdf::from_u16(id as u16));
    if segment == 0 {
        rid.to_string()
    } else {
        format!("{segment:04x}:{rid}")
    }
}

/// `START-END` (inclusive) of numbers.
pub fn parse_range(s: &str) -> Result<(u64, u64), ConfigError> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| ConfigError::Range(s.to_string()))?;
    let (a, b) = (parse_u64(a)?, parse_u64(b)?);
    if a > b {
        return Err(ConfigError::Range(s.to_string()));
    }
    Ok((a, b))
}

/// `START-END` (inclusive) of 32-bit domain IDs.
fn parse_domain_range(s: &str) -> Result<(u32, u32), ConfigError> {
    let (a, b) = parse_range(s)?;
    match (u32::try_from(a), u32::try_from(b)) {
        (Ok(a), Ok(b)) => Ok((a, b)),
        _ => Err(ConfigError::DomainRange(s.to_string())),
    }
}

/// Octal permission bits, at most 0o777.
fn parse_mode(s: &str) -> Result<u32, ConfigError> {
    u32::from_str_radix(s, 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| ConfigError::Mode(s.to_string()))
}

/// The largest CPU number `--worker-cpus` takes (the size of the kernel's `cpu_set_t`).
pub const MAX_CPU: usize = 1023;

/// CPUs, sorted, each once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuList(pub Vec<usize>);

/// A CPU list as `taskset -c` takes it: `N`, `N-M` and commas, CPUs 0 to [`MAX_CPU`].
pub fn parse_cpu_list(s: &str) -> Result<CpuList, ConfigError> {
    let bad = || ConfigError::CpuList(s.to_string());
    let mut cpus = Vec::new();
    for part in s.split(',') {
        let (first, last) = part.split_once('-').unwrap_or((part, part));
        let first: usize = first.trim().parse().map_err(|_| bad())?;
        let last: usize = last.trim().parse().map_err(|_| bad())?;
        if first > last || last > MAX_CPU {
            return Err(bad());
        }
        cpus.extend(first..=last);
    }
    cpus.sort_unstable();
    cpus.dedup();
    Ok(CpuList(cpus))
}

/// A virtqueue size: a power of two from 2 to 32768 (virtio 1.2, 2.7).
fn parse_queue_size(s: &str) -> Result<u16, ConfigError> {
    parse_u64(s)
        .ok()
        .and_then(|n| u16::try_from(n).ok())
        .filter(|n| n.is_power_of_two() && (2..=32768).contains(n))
        .ok_or_else(|| ConfigError::QueueSize(s.to_string()))
}

/// An inclusive range of endpoint IDs: one endpoint (`00:05.0`, `40`) or `FIRST-LAST` of
/// either form, at most 65536 endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndpointRange {
    pub first: EndpointId,
    pub last: EndpointId,
}

impl EndpointRange {
    pub fn ids(self) -> std::ops::RangeInclusive<EndpointId> {
        self.first..=self.last
    }
}

impl FromStr for EndpointRange {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let s = s.trim();
        let (first, last) = match s.split_once('-') {
            Some((a, b)) => (parse_endpoint(a.trim())?, parse_endpoint(b.trim())?),
            None => {
                let e = parse_endpoint(s)?;
                (e, e)
            }
        };
        if first > last {
            return Err(ConfigError::Range(s.to_string()));
        }
        if last - first >= 1 << 16 {
            return Err(ConfigError::TooManyEndpoints(s.to_string()));
        }
        Ok(EndpointRange { first, last })
    }
}

/// A comma-separated list of endpoints and endpoint ranges (`--group`, a region's
/// `@ENDPOINTS`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointList(pub Vec<EndpointRange>);

impl EndpointList {
    pub fn ids(&self) -> Vec<EndpointId> {
        self.0.iter().flat_map(|r| r.ids()).collect()
    }
}

impl FromStr for EndpointList {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        s.split(',')
            .filter(|item| !item.trim().is_empty())
            .map(str::parse)
            .collect::<Result<_, _>>()
            .map(EndpointList)
    }
}

/// `--reserved START-END[:msi|:reserved][@ENDPOINTS]`: a reserved region for the endpoints
/// listed, or for all of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReservedRegion {
    pub region: ResvRegion,
    pub endpoints: Option<EndpointList>,
}

impl FromStr for ReservedRegion {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let err = || ConfigError::Region(s.to_string());
        let (spec, endpoints) = match s.split_once('@') {
            Some((spec, eps)) => (spec, Some(eps.parse()?)),
            None => (s, None),
        };
        let (range, kind) = match spec.split_once(':') {
            Some((range, "msi")) => (range, ResvKind::Msi),
            Some((range, "reserved")) => (range, ResvKind::Reserved),
            Some(_) => return Err(err()),
            None => (spec, ResvKind::Reserved),
        };
        let (start, end) = parse_range(range).map_err(|_| err())?;
        Ok(ReservedRegion {
            region: ResvRegion { kind, start, end },
            endpoints,
        })
    }
}

/// A PCI address on segment 0 (`viot --iommu`: the VIOT's virtio-pci IOMMU node).
impl FromStr for PciBdf {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        match parse_bdf(s)? {
            (0, rid) => Ok(PciBdf::from_u16(rid)),
            (segment, _) => Err(ConfigError::IommuSegment(s.to_string(), segment)),
        }
    }
}

/// `BDF` or `BDF-BDF` on one segment, endpoint ID = BDF (`viot --endpoints`).
impl FromStr for ViotPciRange {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let item = s.trim();
        let (a, b) = item.split_once('-').unwrap_or((item, item));
        let ((sa, a), (sb, b)) = (parse_bdf(a)?, parse_bdf(b)?);
        if sa != sb || a > b {
            return Err(ConfigError::PciRange(item.to_string()));
        }
        Ok(ViotPciRange::identity(
            sa,
            PciBdf::from_u16(a),
            PciBdf::from_u16(b),
        ))
    }
}

impl TryFrom<ServeArgs> for DaemonConfig {
    type Error = ConfigError;

    /// The checks that involve more than one option (clap has checked each value).
    fn try_from(args: ServeArgs) -> Result<Self, ConfigError> {
        let listen = match (args.socket_path, args.fd) {
            (Some(path), None) => Listen::Path(path),
            (None, Some(fd)) => Listen::Fd(fd),
            // clap allows exactly one of the two; a ServeArgs built otherwise may not.
            _ => return Err(ConfigError::Listen),
        };
        let (input_start, input_end) = args.input_range;
        let domain_range = args.domain_range;

        let mut builder = Topology::builder()
            .page_size_mask(args.page_size_mask)
            .input_range(input_start, input_end)
            .domain_range(domain_range.0, domain_range.1)
            .endpoints(args.endpoints.iter().flat_map(|r| r.ids()))
            .limits(Limits {
                max_domains: args.max_domains,
                max_mappings_per_domain: args.max_mappings_per_domain,
                max_mappings: args.max_mappings,
                max_table_bytes: args.max_table_mib.saturating_mul(1 << 20),
            });
        for group in &args.group {
            builder = builder.group(group.ids());
        }
        if !args.no_msi_region {
            builder = builder.region_all(ownership::X86_MSI_REGION);
        }
        for reserved in &args.reserved {
            match &reserved.endpoints {
                None => builder = builder.region_all(reserved.region),
                Some(list) => {
                    for e in list.ids() {
                        builder = builder.region(e, reserved.region);
                    }
                }
            }
        }
        let topology = builder.build()?;

        let most = topology.max_regions_per_endpoint();
        if let Some((id, _)) = topology
            .endpoints()
            .find(|(_, info)| info.regions.len() > MAX_PROBE_REGIONS)
        {
            return Err(ConfigError::TooManyRegions(id));
        }
        let needed = virtio::probe_properties_size(most);
        if (args.probe_size as usize) < needed {
            return Err(ConfigError::ProbeSize {
                probe_size: args.probe_size,
                needed,
            });
        }

        let mut features = F_VERSION_1
            | F_RING_INDIRECT_DESC
            | F_RING_EVENT_IDX
            | F_INPUT_RANGE
            | F_DOMAIN_RANGE
            | F_MAP_UNMAP
            | F_PROBE
            | F_BYPASS_CONFIG;
        if args.mmio {
            features |= F_MMIO;
        }
        let config = Config {
            page_size_mask: args.page_size_mask,
            input_range_start: input_start,
            input_range_end: input_end,
            domain_range_start: domain_range.0,
            domain_range_end: domain_range.1,
            probe_size: args.probe_size,
            bypass: u8::from(args.bypass),
        };
        config.validate()?;

        Ok(DaemonConfig {
            listen,
            control_socket: args.control_socket,
            control_timeouts: control::Timeouts {
                idle: Duration::from_secs(args.control_idle_timeout),
                write: Duration::from_secs(args.control_write_timeout),
            },
            socket_mode: args.socket_mode,
            topology,
            features,
            config,
            fault_backlog: args.fault_backlog.max(1),
            poll: crate::pacing::PollPolicy {
                budget: Duration::from_micros(args.poll_us),
                mode: args.poll_mode,
            },
            worker_cpus: args.worker_cpus,
            queue_size: args.queue_size,
            seccomp: args.seccomp,
            ring_fast_path: args.ring_fast_path.is_on(),
            state_file: args.state_file,
            fresh_state: args.fresh_state,
            state_journal_records: args.state_journal_records as usize,
            masters: args.master_socket.map(|socket| MastersConfig {
                socket,
                stall: Duration::from_millis(args.master_stall_ms),
                max: args.max_masters as usize,
            }),
        })
    }
}

impl ViotArgs {
    /// The VIOT these options describe.
    pub fn table(&self) -> Result<Vec<u8>, ViotError> {
        let mut ranges = self.endpoints.clone();
        if ranges.is_empty() {
            // Every BDF of segment 0 except the IOMMU: the ranges below and above it.
            let iommu = self.iommu.to_u16();
            if iommu > 0 {
                ranges.push(ViotPciRange::identity(
                    0,
                    PciBdf::from_u16(0),
                    PciBdf::from_u16(iommu - 1),
                ));
            }
            if iommu < u16::MAX {
                ranges.push(ViotPciRange::identity(
                    0,
                    PciBdf::from_u16(iommu + 1),
                    PciBdf::from_u16(u16::MAX),
                ));
            }
        }
        build_viot(self.iommu, &ranges)
    }
}

/// Whether `args` (the program's arguments, without its name) ask for
/// `--print-capabilities`. The convention says every other argument is then ignored, so this
/// looks before clap checks anything; an argument after `--` is an operand, not the option.
pub fn wants_capabilities<I, S>(args: I) -> bool
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    args.into_iter()
        .map_while(|a| (a.as_ref() != "--").then_some(a))
        .any(|a| a.as_ref() == "--print-capabilities")
}

/// The vhost-user backend capabilities (QEMU's docs/interop/vhost-user.rst, "Backend program
/// conventions"; the schema is vhost-user.json's `VHostUserBackendCapabilities`).
///
/// `type`: the schema's `VHostUserBackendType` lists no IOMMU, so no management layer can
/// select this backend by a listed type; rather than claim one it is not, the daemon names
/// what it is, `iommu` (virtio's name for device ID 23). `features`: as for the listed types,
/// the command-line options the backend supports beyond the convention's own (`--socket-path`,
/// `--fd`, `--print-capabilities`), read from the CLI definition so that the list cannot
/// drift from it.
pub fn capabilities() -> Capabilities {
    use clap::CommandFactory;
    const CONVENTION: [&str; 3] = ["socket-path", "fd", "print-capabilities"];
    let command = Cli::command();
    let features = command
        .get_arguments()
        .filter(|a| !a.is_hide_set())
        .filter_map(|a| a.get_long())
        .filter(|long| !CONVENTION.contains(long) && !["help", "version"].contains(long))
        .map(str::to_string)
        .collect();
    Capabilities {
        kind: "iommu",
        features,
    }
}

/// What `--print-capabilities` prints (fields in the convention's order).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Capabilities {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub features: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn try_args(extra: &[&str]) -> Result<ServeArgs, clap::Error> {
        let mut argv = vec!["vhost-device-iommu", "--socket-path", "/tmp/x.sock"];
        argv.extend_from_slice(extra);
        Ok(Cli::try_parse_from(argv)?.serve.unwrap())
    }

    fn args(extra: &[&str]) -> ServeArgs {
        try_args(extra).unwrap()
    }

    #[test]
    fn defaults_serve_every_bdf_of_segment_0() {
        let c = DaemonConfig::try_from(args(&[])).unwrap();
        assert_eq!(c.topology.endpoints().count(), 1 << 16);
        // 01:00.0, behind a root port in libvirt's q35 layout, is an endpoint of its own group.
        let g = c.topology.endpoint(0x100).unwrap().group;
        assert_eq!(c.topology.group_members(g), &[0x100]);
        assert_eq!(c.topology.granule(), 4096);
        assert_eq!(c.config.input_range_end, (1 << 48) - 1);
        assert_eq!(c.config.domain_range_end, u32::MAX);
        assert_eq!(c.config.bypass, 0);
        assert_eq!(c.socket_mode, 0o600);
        assert_eq!(
            c.topology.endpoint(0x28).unwrap().regions,
            vec![ownership::X86_MSI_REGION]
        );
        assert_eq!(c.features & F_MMIO, 0);
        assert_ne!(c.features & F_BYPASS_CONFIG, 0);
        assert!(c.ring_fast_path);
    }

    #[test]
    fn fd_or_socket_path_exactly_one() {
        let c = DaemonConfig::try_from(args(&[])).unwrap();
        assert_eq!(c.listen, Listen::Path("/tmp/x.sock".into()));
        let parse = |argv: &[&str]| Cli::try_parse_from(argv);
        let cli = parse(&["vhost-device-iommu", "--fd", "3"]).unwrap();
        let c = DaemonConfig::try_from(cli.serve.unwrap()).unwrap();
        assert_eq!(c.listen, Listen::Fd(3));
        assert_eq!(c.listen.to_string(), "fd 3");
        let both = parse(&["vhost-device-iommu", "--fd", "3", "-s", "/tmp/x"]).unwrap_err();
        assert_eq!(both.kind(), clap::error::ErrorKind::ArgumentConflict);
        let neither = parse(&["vhost-device-iommu", "--bypass"]).unwrap_err();
        assert_eq!(
            neither.kind(),
            clap::error::ErrorKind::MissingRequiredArgument
        );
        assert!(parse(&["vhost-device-iommu", "--fd", "-1"]).is_err());
        let cli = parse(&["vhost-device-iommu", "serve", "--fd", "4"]).unwrap();
        assert!(matches!(
            cli.command,
            Some(Command::Serve(ServeArgs { fd: Some(4), .. }))
        ));
        // A ServeArgs not from clap gets a typed error, not a daemon with nothing to serve.
        let mut hand = args(&[]);
        hand.fd = Some(3);
        assert_eq!(
            DaemonConfig::try_from(hand).unwrap_err(),
            ConfigError::Listen
        );
    }

    #[test]
    fn worker_cpus_take_a_cpu_list() {
        let c = |extra: &[&str]| DaemonConfig::try_from(args(extra)).unwrap().worker_cpus;
        assert_eq!(c(&[]), None);
        assert_eq!(c(&["--worker-cpus", "3"]), Some(CpuList(vec![3])));
        assert_eq!(
            c(&["--worker-cpus", "6,2-3,3"]),
            Some(CpuList(vec![2, 3, 6]))
        );
        for bad in ["", "x", "3-2", "1,", "-1", "1024", "0-1024"] {
            assert_eq!(
                parse_cpu_list(bad),
                Err(ConfigError::CpuList(bad.to_string())),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn poll_mode_and_budget() {
        let c = |extra: &[&str]| DaemonConfig::try_from(args(extra)).unwrap().poll;
        let default = c(&[]);
        assert_eq!(default.mode, crate::pacing::PollMode::Adaptive);
        assert_eq!(default.budget, Duration::from_micros(50));
        let fixed = c(&["--poll-mode", "fixed", "--poll-us", "7"]);
        assert_eq!(fixed.mode, crate::pacing::PollMode::Fixed);
        assert_eq!(fixed.budget, Duration::from_micros(7));
    }

    #[test]
    fn ring_fast_path_is_a_switch() {
        let c = |extra: &[&str]| DaemonConfig::try_from(args(extra)).unwrap().ring_fast_path;
        assert!(c(&["--ring-fast-path", "on"]));
        assert!(!c(&["--ring-fast-path", "off"]));
        let argv = [
            "vhost-device-iommu",
            "-s",
            "/tmp/x.sock",
            "--ring-fast-path",
        ];
        assert!(Cli::try_parse_from(argv).is_err(), "a value is required");
        let argv = [
            "vhost-device-iommu",
            "-s",
            "/tmp/x.sock",
            "--ring-fast-path",
            "maybe",
        ];
        assert!(Cli::try_parse_from(argv).is_err());
    }

    #[test]
    fn table_memory_is_bounded_by_what_a_root_can_name() {
        let parse = |mib: &str| {
            let argv = [
                "vhost-device-iommu",
                "-s",
                "/tmp/x.sock",
                "--max-table-mib",
                mib,
            ];
            Cli::try_parse_from(argv)
        };
        assert!(parse("0").is_err());
        assert!(parse("524289").is_err());
        let c = DaemonConfig::try_from(args(&["--max-table-mib", "524288"])).unwrap();
        assert_eq!(c.topology.limits().max_table_bytes, 512 << 30);
    }

    #[test]
    fn control_timeouts_default_to_a_minute_idle_and_ten_seconds_to_take_a_reply() {
        let timeouts = |extra: &[&str]| {
            DaemonConfig::try_from(args(extra))
                .unwrap()
                .control_timeouts
        };
        let default = timeouts(&[]);
        assert_eq!(default, control::Timeouts::default());
        assert_eq!(
            (default.idle, default.write),
            (Duration::from_secs(60), Duration::from_secs(10))
        );
        let set = timeouts(&[
            "--control-idle-timeout",
            "86400",
            "--control-write-timeout",
            "1",
        ]);
        assert_eq!(
            (set.idle, set.write),
            (Duration::from_secs(86400), Duration::from_secs(1))
        );
        for (option, value) in [
            ("--control-idle-timeout", "0"),
            ("--control-write-timeout", "0"),
            ("--control-idle-timeout", "86401"),
            ("--control-write-timeout", "-1"),
        ] {
            let argv = ["vhost-device-iommu", "-s", "/tmp/x.sock", option, value];
            assert!(Cli::try_parse_from(argv).is_err(), "{option} {value}");
        }
    }

    #[test]
    fn bdfs_ranges_groups_and_regions() {
        assert_eq!(parse_bdf("00:05.0"), Ok((0, 0x28)));
        assert_eq!(parse_bdf("0001:ff:1f.7"), Ok((1, 0xffff)));
        assert!(parse_bdf("00:20.0").is_err());
        assert!(parse_bdf("00:05.8").is_err());
        assert!(parse_bdf("05.0").is_err());
        let c = DaemonConfig::try_from(args(&[
            "--endpoints",
            "00:05.0,00:06.0-00:06.7,0x1000",
            "--group",
            "00:06.0,00:06.1",
            "--reserved",
            "0x1000-0x1fff:reserved@00:05.0",
            "--bypass",
            "--mmio",
        ]))
        .unwrap();
        assert_eq!(c.topology.endpoints().count(), 10);
        let g = c.topology.endpoint(0x30).unwrap().group;
        assert_eq!(c.topology.group_members(g), &[0x30, 0x31]);
        assert_eq!(c.topology.endpoint(0x28).unwrap().regions.len(), 2);
        assert_eq!(c.config.bypass, 1);
        assert_ne!(c.features & F_MMIO, 0);
    }

    #[test]
    fn endpoints_read_as_bdfs_or_ids_and_print_as_bdfs() {
        assert_eq!(parse_endpoint("00:05.0"), Ok(0x28));
        assert_eq!(parse_endpoint("0000:00:05.0"), Ok(0x28));
        assert_eq!(parse_endpoint("0001:02:03.4"), Ok(0x1_021c));
        assert_eq!(parse_endpoint("40"), Ok(40));
        assert_eq!(parse_endpoint("0x28"), Ok(0x28));
        assert_eq!(parse_endpoint("0xffffffff"), Ok(u32::MAX));
        assert_eq!(
            parse_endpoint("0x100000000"),
            Err(ConfigError::Endpoint("0x100000000".into()))
        );
        assert_eq!(
            parse_endpoint("00:20.0"),
            Err(ConfigError::Bdf("00:20.0".into()))
        );
        assert_eq!(endpoint_bdf(0x28), "00:05.0");
        assert_eq!(endpoint_bdf(0x100), "01:00.0");
        assert_eq!(endpoint_bdf(0x1_021c), "0001:02:03.4");
        for id in [
            0,
            7,
            0x28,
            0xff,
            0x100,
            0xffff,
            0x1_0000,
            0x1_021c,
            u32::MAX,
        ] {
            assert_eq!(parse_endpoint(&endpoint_bdf(id)), Ok(id), "{id:#x}");
        }
        assert_eq!(
            "00:06.0-00:06.7"
                .parse::<EndpointRange>()
                .unwrap()
                .ids()
                .count(),
            8
        );
        assert_eq!(
            " 00:06.0, ,00:07.0 ".parse::<EndpointList>().unwrap().ids(),
            vec![0x30, 0x38]
        );
    }

    #[test]
    fn value_errors_are_clap_errors_naming_the_option() {
        for (extra, flag) in [
            (&["--page-size-mask", "zz"][..], "--page-size-mask <MASK>"),
            (&["--input-range", "5-4"], "--input-range <RANGE>"),
            (&["--input-range", "0-zz"], "--input-range <RANGE>"),
            (
                &["--domain-range", "0-0x100000000"],
                "--domain-range <RANGE>",
            ),
            (&["--socket-mode", "999"], "--socket-mode <MODE>"),
            (&["--reserved", "1-2:weird"], "--reserved <REGION>"),
            (&["--reserved", "1-2@00:20.0"], "--reserved <REGION>"),
            (&["--queue-size", "100"], "--queue-size <N>"),
            (&["--queue-size", "65536"], "--queue-size <N>"),
            (&["--endpoints", "0-0x20000"], "--endpoints <LIST>"),
            (&["--endpoints", "00:05.0,zz"], "--endpoints <LIST>"),
            (&["--group", "00:06.0-00:05.0"], "--group <LIST>"),
        ] {
            let e = try_args(extra).unwrap_err();
            assert_eq!(
                e.kind(),
                clap::error::ErrorKind::ValueValidation,
                "{extra:?}"
            );
            let text = e.to_string();
            assert!(text.contains(&format!("for '{flag}'")), "{extra:?}: {text}");
        }
        let e = try_args(&["--page-size-mask", "zz"])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(
                "error: invalid value 'zz' for '--page-size-mask <MASK>': invalid number"
            ),
            "{e}"
        );
    }

    #[test]
    fn cross_option_errors_name_the_options() {
        let bad = |extra: &[&str]| DaemonConfig::try_from(args(extra)).unwrap_err();
        let e = bad(&["--page-size-mask", "0x800"]);
        assert_eq!(
            e,
            ConfigError::Topology {
                flags: "--page-size-mask",
                source: TopologyError::GranuleTooSmall(0x800)
            }
        );
        assert!(e.to_string().starts_with("--page-size-mask: granule 0x800"));
        assert!(matches!(
            bad(&["--probe-size", "8"]),
            ConfigError::ProbeSize { .. }
        ));
        assert!(bad(&["--probe-size", "8"])
            .to_string()
            .contains("--probe-size 8"));
        for (extra, flags) in [
            (&["--group", "0001:00:00.0"][..], "--group, --endpoints"),
            (
                &["--group", "00:06.0", "--group", "00:06.0,00:06.1"],
                "--group",
            ),
            (&["--group", ""], "--group"),
            (&["--endpoints", "00:05.0,0x28"], "--endpoints"),
            (
                &["--reserved", "0xfee00000-0xfee00fff:msi"],
                "--reserved, --no-msi-region",
            ),
            (&["--reserved", "1-2@0001:00:00.0"], "--reserved"),
            (&["--max-domains", "0"], "--max-domains"),
            (&["--max-mappings", "0"], "--max-mappings"),
            (
                &["--max-mappings-per-domain", "0"],
                "--max-mappings-per-domain",
            ),
        ] {
            match bad(extra) {
                ConfigError::Topology { flags: f, .. } => assert_eq!(f, flags, "{extra:?}"),
                other => panic!("{extra:?}: {other:?}"),
            }
        }
        let many: Vec<String> = (0..=MAX_PROBE_REGIONS as u64)
            .map(|i| format!("{:#x}-{:#x}@00:05.0", i << 12, (i << 12) + 0xfff))
            .collect();
        let mut extra = vec!["--probe-size", "4096"];
        for r in &many {
            extra.extend(["--reserved", r.as_str()]);
        }
        let e = bad(&extra);
        assert_eq!(e, ConfigError::TooManyRegions(0x28));
        assert!(e.to_string().contains("endpoint 00:05.0"), "{e}");
    }

    #[test]
    fn viot_defaults_cover_segment_0_but_the_iommu() {
        use crate::viot::{build_viot, PciBdf, ViotPciRange};
        let table = |argv: &[&str]| {
            let mut all = vec!["vhost-device-iommu", "viot", "-o", "/tmp/v.bin"];
            all.extend_from_slice(argv);
            match Cli::try_parse_from(all).unwrap().command {
                Some(Command::Viot(args)) => args.table().unwrap(),
                other => panic!("{other:?}"),
            }
        };
        let range = |a, b| ViotPciRange::identity(0, PciBdf::from_u16(a), PciBdf::from_u16(b));
        let iommu = PciBdf::from_u16(0x20);
        assert_eq!(
            table(&["--iommu", "00:04.0"]),
            build_viot(iommu, &[range(0, 0x1f), range(0x21, 0xffff)]).unwrap()
        );
        assert_eq!(
            table(&[]),
            table(&["--iommu", "00:04.0"]),
            "00:04.0 is the default"
        );
        assert_eq!(
            table(&["--iommu", "00:00.0"]),
            build_viot(PciBdf::from_u16(0), &[range(1, 0xffff)]).unwrap()
        );
        assert_eq!(
            table(&["--endpoints", "00:05.0-00:1f.7"]),
            build_viot(iommu, &[range(0x28, 0xff)]).unwrap()
        );
    }

    #[test]
    fn viot_subcommand_needs_no_socket() {
        let cli = Cli::try_parse_from(["vhost-device-iommu", "viot", "-o", "/tmp/v.bin"]).unwrap();
        let Some(Command::Viot(viot)) = cli.command else {
            panic!("not viot");
        };
        assert_eq!(viot.iommu, PciBdf::new(0, 4, 0).unwrap());
        assert!(viot.table().is_ok());
        assert!(Cli::try_parse_from(["vhost-device-iommu", "--bypass"]).is_err());
        for (extra, flag) in [
            (&["--iommu", "00:20.0"][..], "--iommu <BDF>"),
            (&["--iommu", "0001:00:04.0"], "--iommu <BDF>"),
            (
                &["--endpoints", "00:05.0-0001:00:06.0"],
                "--endpoints <LIST>",
            ),
            (&["--endpoints", "00:06.0-00:05.0"], "--endpoints <LIST>"),
        ] {
            let argv = ["vhost-device-iommu", "viot", "-o", "/tmp/v.bin"]
                .iter()
                .chain(extra)
                .copied();
            let e = Cli::try_parse_from(argv).unwrap_err().to_string();
            assert!(e.contains(&format!("for '{flag}'")), "{extra:?}: {e}");
        }
    }

    #[test]
    fn print_capabilities_is_found_before_any_other_check() {
        assert!(wants_capabilities(["--print-capabilities"]));
        assert!(wants_capabilities([
            "--page-size-mask",
            "zz",
            "--print-capabilities"
        ]));
        assert!(wants_capabilities(["viot", "--print-capabilities"]));
        assert!(!wants_capabilities([
            "-s",
            "x",
            "--",
            "--print-capabilities"
        ]));
        assert!(!wants_capabilities(["--print-capabilities=1"]));
        assert!(!wants_capabilities(Vec::<String>::new()));
        let caps = serde_json::to_value(capabilities()).unwrap();
        assert_eq!(caps["type"], "iommu");
        let features: Vec<&str> = caps["features"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f.as_str().unwrap())
            .collect();
        for f in [
            "control-socket",
            "endpoints",
            "group",
            "reserved",
            "seccomp",
        ] {
            assert!(features.contains(&f), "{f} in {features:?}");
        }
        for f in ["socket-path", "fd", "print-capabilities", "help", "version"] {
            assert!(!features.contains(&f), "{f} in {features:?}");
        }
    }
}
