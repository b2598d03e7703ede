//! Command line and topology: everything a user gives the daemon, validated in one place
//! (`TryFrom<ServeArgs> for DaemonConfig`) into the device's features, config space and
//! topology.

use std::{path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};
use ownership::{EndpointId, Limits, ResvKind, ResvRegion, Topology, TopologyError};
use thiserror::Error;
use virtio::{
    Config, F_BYPASS_CONFIG, F_DOMAIN_RANGE, F_INPUT_RANGE, F_MAP_UNMAP, F_MMIO, F_PROBE,
};

use crate::{device::MAX_PROBE_REGIONS, seccomp::SeccompMode};

/// The most page-table memory an arena holds, in MiB.
const MAX_TABLE_MIB: u64 =
    (ownership::pagetable::MAX_NODES * ownership::pagetable::NODE_BYTES) >> 20;

/// VIRTIO_F_VERSION_1.
pub const F_VERSION_1: u64 = 1 << 32;
/// VIRTIO_RING_F_INDIRECT_DESC.
pub const F_RING_INDIRECT_DESC: u64 = 1 << 28;
/// VIRTIO_RING_F_EVENT_IDX.
pub const F_RING_EVENT_IDX: u64 = 1 << 29;

const EXAMPLES: &str = "\
Examples:
  # Serve a q35 guest's bus 0 (the defaults), with a control socket:
  vhost-device-iommu --socket-path /tmp/viommu.sock --control-socket /tmp/viommu.ctl

  # Two functions of one device share isolation:
  vhost-device-iommu -s /tmp/viommu.sock --group 00:06.0,00:06.1

  # The ACPI VIOT table QEMU passes to the guest (IOMMU at 00:04.0):
  vhost-device-iommu viot --iommu 00:04.0 --endpoints 00:05.0-00:1f.7 --output viot.bin

  # QEMU 10 (vhost-user-device-pci made user-creatable, see README):
  qemu-system-x86_64 -machine q35 -m 512M \\
    -object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem \\
    -chardev socket,id=viommu,path=/tmp/viommu.sock \\
    -device vhost-user-device-pci,chardev=viommu,virtio-id=23,num_vqs=2,config_size=40,addr=04.0 \\
    -acpitable file=viot.bin ...
";

/// A virtio-iommu device (virtio ID 23) served over vhost-user.
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
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve the device (the default when no subcommand is given).
    Serve(ServeArgs),
    /// Write the ACPI VIOT table that tells the guest which endpoints the IOMMU translates.
    Viot(ViotArgs),
}

/// Options of `serve`.
#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// vhost-user socket to listen on (the VMM connects to it).
    #[arg(short = 's', long, value_name = "PATH")]
    pub socket_path: PathBuf,

    /// Control socket (line-oriented JSON: stats, domains, translate, claim, release).
    #[arg(long, value_name = "PATH")]
    pub control_socket: Option<PathBuf>,

    /// Permission bits of the sockets the daemon creates (octal).
    #[arg(long, value_name = "MODE", default_value = "600")]
    pub socket_mode: String,

    /// Endpoints the IOMMU translates: PCI BDFs (00:05.0), raw IDs (0x28, 40) or ranges of
    /// either (00:00.0-00:1f.7). A PCI endpoint's ID is its requester ID.
    #[arg(
        long,
        value_name = "LIST",
        value_delimiter = ',',
        default_value = "00:00.0-00:1f.7"
    )]
    pub endpoints: Vec<String>,

    /// Endpoints the platform cannot isolate from each other (one IOMMU group), e.g.
    /// 00:06.0,00:06.1 or 00:06.0-00:06.7. Repeat for several groups. Every other endpoint is
    /// a group of its own.
    #[arg(long, value_name = "LIST")]
    pub group: Vec<String>,

    /// A reserved IOVA region reported by PROBE: START-END[:msi|:reserved][@ENDPOINTS]
    /// (inclusive end; default kind reserved; default all endpoints). Repeatable.
    #[arg(long, value_name = "REGION")]
    pub reserved: Vec<String>,

    /// Do not report x86's MSI doorbell (0xfee00000-0xfeefffff) as an MSI region.
    #[arg(long)]
    pub no_msi_region: bool,

    /// Page sizes the device maps; the lowest set bit is the granule (at least 4 KiB).
    #[arg(long, value_name = "MASK", default_value = "0x1000")]
    pub page_size_mask: String,

    /// IOVAs the device translates, START-END inclusive.
    #[arg(long, value_name = "RANGE", default_value = "0-0xffffffffffff")]
    pub input_range: String,

    /// Domain IDs the guest may use, START-END inclusive.
    #[arg(long, value_name = "RANGE", default_value = "0-0xffffffff")]
    pub domain_range: String,

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

    /// After a burst of requests, poll the request queue this long (microseconds) with
    /// notifications off before sleeping; 0 disables polling.
    #[arg(long, value_name = "US", default_value_t = 50)]
    pub poll_us: u64,

    /// Largest virtqueue size offered to the frontend.
    #[arg(long, value_name = "N", default_value_t = 1024)]
    pub queue_size: u16,

    /// Once the sockets exist, confine every thread to the system calls serving needs (a
    /// seccomp allowlist); MODE says what a call outside it does.
    #[arg(long, value_name = "MODE", value_enum, default_value_t = SeccompMode::Off)]
    pub seccomp: SeccompMode,

    /// The request queue's ring fast path (a troubleshooting switch): off sends every chain
    /// through virtio-queue, for comparison and as a fallback.
    #[arg(long, value_name = "on|off", value_enum, default_value_t = Switch::On)]
    pub ring_fast_path: Switch,
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
    /// PCI address of the virtio-iommu device (the -device ... addr= given to QEMU).
    #[arg(long, value_name = "BDF", default_value = "00:04.0")]
    pub iommu: String,

    /// PCI endpoint ranges the IOMMU translates (BDF or BDF-BDF), comma-separated. Keep
    /// devices whose DMA the VMM emulates itself out of them.
    #[arg(
        long,
        value_name = "LIST",
        value_delimiter = ',',
        default_value = "00:00.0-00:1f.7"
    )]
    pub endpoints: Vec<String>,

    /// Where to write the table.
    #[arg(short, long, value_name = "FILE")]
    pub output: PathBuf,
}

/// What is wrong with the command line.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("invalid number {0:?}")]
    Number(String),
    #[error("invalid PCI address {0:?} (expected [SEGMENT:]BUS:DEV.FN, e.g. 00:05.0)")]
    Bdf(String),
    #[error("invalid range {0:?} (expected START-END, inclusive)")]
    Range(String),
    #[error("invalid reserved region {0:?} (expected START-END[:msi|:reserved][@ENDPOINTS])")]
    Region(String),
    #[error("invalid socket mode {0:?} (expected octal, e.g. 600)")]
    Mode(String),
    #[error("endpoint range {0:?} names more than 65536 endpoints")]
    TooManyEndpoints(String),
    #[error("endpoint {0:#x} has more than {MAX_PROBE_REGIONS} reserved regions")]
    TooManyRegions(EndpointId),
    #[error("probe_size {probe_size} cannot hold {needed} bytes of properties")]
    ProbeSize { probe_size: u32, needed: usize },
    #[error("queue size {0} is not a power of two between 2 and 32768")]
    QueueSize(u16),
    #[error("topology: {0}")]
    Topology(#[from] TopologyError),
    #[error("config space: {0}")]
    ConfigSpace(String),
}

/// The validated daemon configuration.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub socket_path: PathBuf,
    pub control_socket: Option<PathBuf>,
    pub socket_mode: u32,
    pub topology: Topology,
    /// Device features offered (virtio-iommu bits plus VERSION_1 and ring features).
    pub features: u64,
    /// The config space at device start; `bypass` is the only field the driver may change.
    pub config: Config,
    pub fault_backlog: usize,
    pub poll: Duration,
    pub queue_size: u16,
    /// The seccomp filter installed before serving.
    pub seccomp: SeccompMode,
    /// Whether the request queue may use the ring fast path (`ring.rs`); false sends every
    /// chain through virtio-queue.
    pub ring_fast_path: bool,
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

/// An endpoint ID: a BDF (its segment in bits 16-31) or a raw number.
fn parse_endpoint(s: &str) -> Result<EndpointId, ConfigError> {
    if s.contains(':') {
        let (segment, rid) = parse_bdf(s)?;
        Ok((u32::from(segment) << 16) | u32::from(rid))
    } else {
        let n = parse_u64(s)?;
        u32::try_from(n).map_err(|_| ConfigError::Number(s.to_string()))
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

/// Endpoints of one list item: a single endpoint or an inclusive range.
fn parse_endpoint_item(s: &str) -> Result<Vec<EndpointId>, ConfigError> {
    let s = s.trim();
    let (a, b) = match s.split_once('-') {
        Some((a, b)) => (parse_endpoint(a)?, parse_endpoint(b)?),
        None => {
            let e = parse_endpoint(s)?;
            (e, e)
        }
    };
    if a > b {
        return Err(ConfigError::Range(s.to_string()));
    }
    if b - a >= 1 << 16 {
        return Err(ConfigError::TooManyEndpoints(s.to_string()));
    }
    Ok((a..=b).collect())
}

/// Endpoints of a comma-separated list.
pub fn parse_endpoint_list(items: &[String]) -> Result<Vec<EndpointId>, ConfigError> {
    let mut out = Vec::new();
    for item in items.iter().flat_map(|i| i.split(',')) {
        if !item.trim().is_empty() {
            out.extend(parse_endpoint_item(item)?);
        }
    }
    Ok(out)
}

/// `START-END[:msi|:reserved][@ENDPOINTS]`.
fn parse_region(s: &str) -> Result<(ResvRegion, Option<Vec<EndpointId>>), ConfigError> {
    let err = || ConfigError::Region(s.to_string());
    let (spec, endpoints) = match s.split_once('@') {
        Some((spec, eps)) => (spec, Some(parse_endpoint_list(&[eps.to_string()])?)),
        None => (s, None),
    };
    let (range, kind) = match spec.split_once(':') {
        Some((range, "msi")) => (range, ResvKind::Msi),
        Some((range, "reserved")) => (range, ResvKind::Reserved),
        Some(_) => return Err(err()),
        None => (spec, ResvKind::Reserved),
    };
    let (start, end) = parse_range(range).map_err(|_| err())?;
    Ok((ResvRegion { kind, start, end }, endpoints))
}

impl TryFrom<ServeArgs> for DaemonConfig {
    type Error = ConfigError;

    fn try_from(args: ServeArgs) -> Result<Self, ConfigError> {
        let socket_mode = u32::from_str_radix(&args.socket_mode, 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .ok_or_else(|| ConfigError::Mode(args.socket_mode.clone()))?;
        let page_size_mask = parse_u64(&args.page_size_mask)?;
        let (input_start, input_end) = parse_range(&args.input_range)?;
        let (domain_start, domain_end) = parse_range(&args.domain_range)?;
        let domain_range = (
            u32::try_from(domain_start)
                .map_err(|_| ConfigError::Range(args.domain_range.clone()))?,
            u32::try_from(domain_end).map_err(|_| ConfigError::Range(args.domain_range.clone()))?,
        );
        if !args.queue_size.is_power_of_two() || args.queue_size < 2 || args.queue_size > 32768 {
            return Err(ConfigError::QueueSize(args.queue_size));
        }

        let mut builder = Topology::builder()
            .page_size_mask(page_size_mask)
            .input_range(input_start, input_end)
            .domain_range(domain_range.0, domain_range.1)
            .endpoints(parse_endpoint_list(&args.endpoints)?)
            .limits(Limits {
                max_domains: args.max_domains,
                max_mappings_per_domain: args.max_mappings_per_domain,
                max_mappings: args.max_mappings,
                max_table_bytes: args.max_table_mib.saturating_mul(1 << 20),
            });
        for group in &args.group {
            builder = builder.group(parse_endpoint_list(std::slice::from_ref(group))?);
        }
        if !args.no_msi_region {
            builder = builder.region_all(ownership::X86_MSI_REGION);
        }
        for region in &args.reserved {
            let (region, endpoints) = parse_region(region)?;
            match endpoints {
                None => builder = builder.region_all(region),
                Some(eps) => {
                    for e in eps {
                        builder = builder.region(e, region);
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
            page_size_mask,
            input_range_start: input_start,
            input_range_end: input_end,
            domain_range_start: domain_range.0,
            domain_range_end: domain_range.1,
            probe_size: args.probe_size,
            bypass: u8::from(args.bypass),
        };
        config
            .validate()
            .map_err(|e| ConfigError::ConfigSpace(e.to_string()))?;

        Ok(DaemonConfig {
            socket_path: args.socket_path,
            control_socket: args.control_socket,
            socket_mode,
            topology,
            features,
            config,
            fault_backlog: args.fault_backlog.max(1),
            poll: Duration::from_micros(args.poll_us),
            queue_size: args.queue_size,
            seccomp: args.seccomp,
            ring_fast_path: args.ring_fast_path.is_on(),
        })
    }
}

impl ViotArgs {
    /// The VIOT these options describe.
    pub fn table(&self) -> Result<Vec<u8>, String> {
        use crate::viot::{build_viot, PciBdf, ViotPciRange};
        let (segment, iommu) = parse_bdf(&self.iommu).map_err(|e| e.to_string())?;
        if segment != 0 {
            return Err(format!(
                "--iommu {}: only segment 0 is supported",
                self.iommu
            ));
        }
        let mut ranges = Vec::new();
        for item in self.endpoints.iter().flat_map(|e| e.split(',')) {
            let item = item.trim();
            let (a, b) = item.split_once('-').unwrap_or((item, item));
            let ((sa, a), (sb, b)) = (
                parse_bdf(a).map_err(|e| e.to_string())?,
                parse_bdf(b).map_err(|e| e.to_string())?,
            );
            if sa != sb || a > b {
                return Err(format!("--endpoints {item}: not a range on one segment"));
            }
            ranges.push(ViotPciRange::identity(
                sa,
                PciBdf::from_u16(a),
                PciBdf::from_u16(b),
            ));
        }
        build_viot(PciBdf::from_u16(iommu), &ranges).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> ServeArgs {
        let mut argv = vec!["vhost-device-iommu", "--socket-path", "/tmp/x.sock"];
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv).unwrap().serve.unwrap()
    }

    #[test]
    fn defaults_serve_a_q35_bus_0() {
        let c = DaemonConfig::try_from(args(&[])).unwrap();
        assert_eq!(c.topology.endpoints().count(), 256);
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
    fn bad_input_is_a_clear_error() {
        let bad = |extra: &[&str]| DaemonConfig::try_from(args(extra)).unwrap_err();
        assert_eq!(
            bad(&["--page-size-mask", "zz"]),
            ConfigError::Number("zz".into())
        );
        assert_eq!(
            bad(&["--page-size-mask", "0x800"]),
            ConfigError::Topology(TopologyError::GranuleTooSmall(0x800))
        );
        assert_eq!(
            bad(&["--input-range", "5-4"]),
            ConfigError::Range("5-4".into())
        );
        assert_eq!(
            bad(&["--socket-mode", "999"]),
            ConfigError::Mode("999".into())
        );
        assert_eq!(
            bad(&["--reserved", "1-2:weird"]),
            ConfigError::Region("1-2:weird".into())
        );
        assert!(matches!(
            bad(&["--probe-size", "8"]),
            ConfigError::ProbeSize { .. }
        ));
        assert_eq!(bad(&["--queue-size", "100"]), ConfigError::QueueSize(100));
        assert_eq!(
            bad(&["--endpoints", "0-0x20000"]),
            ConfigError::TooManyEndpoints("0-0x20000".into())
        );
    }

    #[test]
    fn viot_subcommand_needs_no_socket() {
        let cli = Cli::try_parse_from(["vhost-device-iommu", "viot", "-o", "/tmp/v.bin"]).unwrap();
        assert!(matches!(cli.command, Some(Command::Viot(_))));
        assert!(Cli::try_parse_from(["vhost-device-iommu", "--bypass"]).is_err());
    }
}
