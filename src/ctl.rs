// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `vhost-device-iommu ctl`: one request to a running daemon's control socket (see
//! `control.rs` for the protocol), built from typed arguments or given as raw JSON.
//!
//! The reply is the daemon's JSON object; a reply without `"ok": true` (an error, a refused
//! translation) is a [`CtlError::Refused`], so that scripts can rely on the exit status.

use std::{
    io::{self, BufRead, BufReader, ErrorKind, Read, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use clap::{ArgGroup, Args, Subcommand, ValueEnum};
use ownership::EndpointId;
use serde_json::{json, Value};
use thiserror::Error;

use crate::config::{parse_endpoint, parse_u64};

/// Longest reply read, in bytes (a `mappings` reply lists at most 10,000 mappings).
pub const MAX_REPLY: u64 = 16 << 20;

const EXAMPLES: &str = "\
Examples:
  vhost-device-iommu ctl --control-socket /tmp/viommu.ctl stats
  vhost-device-iommu ctl -c /tmp/viommu.ctl use-dma-api 00:05.0
  vhost-device-iommu ctl -c /tmp/viommu.ctl translate 00:05.0 0x1000 --len 4096 --access write
  vhost-device-iommu ctl -c /tmp/viommu.ctl raw '{\"cmd\":\"groups\"}'

Exit status: 0 when the reply says \"ok\": true; 1 when it does not (the reply is still
printed) or when the daemon cannot be reached; 2 when the arguments are wrong.
";

/// Options of `ctl`.
#[derive(Args, Debug, Clone)]
#[command(after_help = EXAMPLES)]
pub struct CtlArgs {
    /// The daemon's control socket (what it was started with as --control-socket).
    #[arg(short = 'c', long, value_name = "PATH")]
    pub control_socket: PathBuf,

    /// Print the reply on one line (default: indented).
    #[arg(long)]
    pub compact: bool,

    /// Seconds to wait for the daemon's reply.
    #[arg(
        long,
        value_name = "SECONDS",
        default_value_t = 10,
        value_parser = clap::value_parser!(u64).range(1..=3600)
    )]
    pub timeout: u64,

    #[command(subcommand)]
    pub request: CtlRequest,
}

/// Access of a `translate`.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum CtlAccess {
    Read,
    Write,
}

/// One control request. Endpoints are PCI addresses (`00:05.0`, `0000:00:05.0`) or IDs
/// (`40`, `0x28`); numbers are decimal or 0x-prefixed hex.
#[derive(Subcommand, Debug, Clone)]
pub enum CtlRequest {
    /// Request counts by type and status, domains, mappings, faults, resets.
    Stats,
    /// Every live domain: kind, groups, attached endpoints, mapping count.
    Domains,
    /// The groups in use (a domain, attached endpoints or a DMA owner), or with `--all`
    /// every group: members, domain, attached endpoints, DMA owner.
    Groups {
        /// Every group of the topology (65,536 with the default endpoints).
        #[arg(long)]
        all: bool,
    },
    /// A paging domain's mappings.
    Mappings {
        /// The domain ID.
        #[arg(value_parser = parse_u32)]
        domain: u32,
        /// List at most this many (the daemon lists at most 10000).
        #[arg(long, value_name = "N", value_parser = parse_u64)]
        limit: Option<u64>,
    },
    /// Translate an IOVA as a DMA master would (a guest-visible fault is also reported to
    /// the guest).
    Translate {
        /// The endpoint doing the DMA.
        #[arg(value_parser = parse_endpoint)]
        endpoint: EndpointId,
        /// The I/O virtual address.
        #[arg(value_parser = parse_u64)]
        iova: u64,
        /// Bytes accessed from IOVA.
        #[arg(long, value_name = "BYTES", value_parser = parse_u64)]
        len: Option<u64>,
        /// Read or write access.
        #[arg(long, value_enum)]
        access: Option<CtlAccess>,
        /// Translate as the group's exclusive DMA owner with this cookie (default: as a
        /// DMA-API user, see use-dma-api).
        #[arg(long, value_name = "COOKIE", value_parser = parse_u64)]
        owner: Option<u64>,
    },
    /// Claim a group's exclusive DMA ownership (host face).
    Claim(OwnerArgs),
    /// Release a group's exclusive DMA ownership.
    Release(OwnerArgs),
    /// Become a shared DMA-API user of an endpoint's group.
    UseDmaApi {
        #[arg(value_parser = parse_endpoint)]
        endpoint: EndpointId,
    },
    /// Stop being a shared DMA-API user of an endpoint's group.
    UnuseDmaApi {
        #[arg(value_parser = parse_endpoint)]
        endpoint: EndpointId,
    },
    /// Send one JSON request object as given, e.g. '{"cmd":"stats"}'.
    Raw {
        #[arg(value_parser = parse_object)]
        json: Value,
    },
}

/// The group of a `claim` or `release`: an endpoint's, or given by ID.
#[derive(Args, Debug, Clone)]
#[command(group(ArgGroup::new("target").required(true).args(["endpoint", "group"])))]
pub struct OwnerArgs {
    /// An endpoint of the group.
    #[arg(value_parser = parse_endpoint)]
    pub endpoint: Option<EndpointId>,
    /// The group ID (see `groups`).
    #[arg(long, value_name = "ID", value_parser = parse_u32)]
    pub group: Option<u32>,
    /// The owner's cookie.
    #[arg(long, value_name = "COOKIE", value_parser = parse_u64)]
    pub cookie: u64,
}

fn parse_u32(s: &str) -> Result<u32, String> {
    let n = parse_u64(s).map_err(|e| e.to_string())?;
    u32::try_from(n).map_err(|_| format!("{s:?} is above 0xffffffff"))
}

fn parse_object(s: &str) -> Result<Value, String> {
    match serde_json::from_str(s) {
        Ok(v @ Value::Object(_)) => Ok(v),
        Ok(_) => Err("not a JSON object".into()),
        Err(e) => Err(format!("not JSON: {e}")),
    }
}

impl CtlRequest {
    /// The request line's JSON.
    pub fn to_json(&self) -> Value {
        let mut request = match self {
            CtlRequest::Stats => json!({"cmd": "stats"}),
            CtlRequest::Domains => json!({"cmd": "domains"}),
            CtlRequest::Groups { all: false } => json!({"cmd": "groups"}),
            CtlRequest::Groups { all: true } => json!({"cmd": "groups", "all": true}),
            CtlRequest::Mappings { domain, limit } => {
                json!({"cmd": "mappings", "domain": domain, "limit": limit})
            }
            CtlRequest::Translate {
                endpoint,
                iova,
                len,
                access,
                owner,
            } => json!({
                "cmd": "translate",
                "endpoint": endpoint,
                "iova": iova,
                "len": len,
                "access": access.map(|a| match a {
                    CtlAccess::Read => "read",
                    CtlAccess::Write => "write",
                }),
                "owner": owner,
            }),
            CtlRequest::Claim(o) | CtlRequest::Release(o) => json!({
                "cmd": if matches!(self, CtlRequest::Claim(_)) { "claim" } else { "release" },
                "endpoint": o.endpoint,
                "group": o.group,
                "cookie": o.cookie,
            }),
            CtlRequest::UseDmaApi { endpoint } => {
                json!({"cmd": "use_dma_api", "endpoint": endpoint})
            }
            CtlRequest::UnuseDmaApi { endpoint } => {
                json!({"cmd": "unuse_dma_api", "endpoint": endpoint})
            }
            CtlRequest::Raw { json } => return json.clone(),
        };
        // Options not given are left out rather than sent as null.
        if let Some(fields) = request.as_object_mut() {
            fields.retain(|_, v| !v.is_null());
        }
        request
    }
}

/// Why a control request failed.
#[derive(Debug, Error)]
pub enum CtlError {
    #[error("control socket {}: {source}", path.display())]
    Connect { path: PathBuf, source: io::Error },
    #[error("control socket {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("control socket {}: no reply within {seconds} s", path.display())]
    Timeout { path: PathBuf, seconds: u64 },
    #[error("control socket {}: the daemon closed the connection without a reply", path.display())]
    NoReply { path: PathBuf },
    #[error("control socket {}: the reply is not a JSON line: {reason}", path.display())]
    BadReply { path: PathBuf, reason: String },
    #[error("{cmd}: {reason}")]
    Refused { cmd: String, reason: String },
}

/// Sends `request` as one line to the control socket at `path` and returns the reply.
pub fn request(path: &Path, request: &Value, timeout: Duration) -> Result<Value, CtlError> {
    let io_error = |source: io::Error| match source.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => CtlError::Timeout {
            path: path.to_owned(),
            seconds: timeout.as_secs(),
        },
        _ => CtlError::Io {
            path: path.to_owned(),
            source,
        },
    };
    let stream = UnixStream::connect(path).map_err(|source| CtlError::Connect {
        path: path.to_owned(),
        source,
    })?;
    stream.set_read_timeout(Some(timeout)).map_err(io_error)?;
    stream.set_write_timeout(Some(timeout)).map_err(io_error)?;
    let mut writer = &stream;
    writer
        .write_all(format!("{request}\n").as_bytes())
        .map_err(io_error)?;
    let mut line = Vec::new();
    BufReader::new(&stream)
        .take(MAX_REPLY)
        .read_until(b'\n', &mut line)
        .map_err(io_error)?;
    if line.is_empty() {
        return Err(CtlError::NoReply {
            path: path.to_owned(),
        });
    }
    if line.last() != Some(&b'\n') {
        return Err(CtlError::BadReply {
            path: path.to_owned(),
            reason: format!("no end of line within {} bytes", line.len()),
        });
    }
    serde_json::from_slice(&line).map_err(|e| CtlError::BadReply {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

/// `Ok` when `reply` says `"ok": true`; otherwise why not, from its `error` or `fault`.
pub fn check(request: &Value, reply: &Value) -> Result<(), CtlError> {
    if reply["ok"] == true {
        return Ok(());
    }
    let reason = match (reply.get("error"), reply.get("fault")) {
        (Some(Value::String(e)), _) => e.clone(),
        (_, Some(Value::String(f))) => format!("fault {f}"),
        _ => format!("the reply does not say \"ok\": true: {reply}"),
    };
    Err(CtlError::Refused {
        cmd: request["cmd"].as_str().unwrap_or("request").to_string(),
        reason,
    })
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::config::{Cli, Command};

    fn ctl(argv: &[&str]) -> Result<CtlArgs, clap::Error> {
        let argv = ["vhost-device-iommu", "ctl", "-c", "/x"]
            .iter()
            .chain(argv)
            .copied();
        match Cli::try_parse_from(argv)?.command {
            Some(Command::Ctl(args)) => Ok(args),
            other => panic!("not ctl: {other:?}"),
        }
    }

    #[test]
    fn requests_are_built_from_typed_arguments() {
        let json = |argv: &[&str]| ctl(argv).unwrap().request.to_json();
        assert_eq!(json(&["stats"]), json!({"cmd": "stats"}));
        assert_eq!(
            json(&[
                "translate",
                "0000:00:05.0",
                "0x1000",
                "--len",
                "4096",
                "--access",
                "write"
            ]),
            json!({"cmd": "translate", "endpoint": 0x28, "iova": 0x1000, "len": 4096,
                   "access": "write"})
        );
        assert_eq!(
            json(&["translate", "40", "16"]),
            json!({"cmd": "translate", "endpoint": 40, "iova": 16})
        );
        assert_eq!(
            json(&["claim", "00:06.1", "--cookie", "7"]),
            json!({"cmd": "claim", "endpoint": 0x31, "cookie": 7})
        );
        assert_eq!(
            json(&["release", "--group", "3", "--cookie", "0x10"]),
            json!({"cmd": "release", "group": 3, "cookie": 16})
        );
        assert_eq!(
            json(&["use-dma-api", "01:00.0"]),
            json!({"cmd": "use_dma_api", "endpoint": 0x100})
        );
        assert_eq!(
            json(&["mappings", "1", "--limit", "5"]),
            json!({"cmd": "mappings", "domain": 1, "limit": 5})
        );
        assert_eq!(
            json(&["raw", r#"{"cmd":"groups","x":[1]}"#]),
            json!({"cmd": "groups", "x": [1]})
        );
    }

    #[test]
    fn bad_arguments_are_refused_before_connecting() {
        for argv in [
            &["translate", "00:20.0", "0"][..],
            &["translate", "00:05.0", "zz"],
            &["claim", "--cookie", "1"],
            &["claim", "00:05.0", "--group", "1", "--cookie", "1"],
            &["mappings", "0x100000000"],
            &["raw", "[1]"],
            &["raw", "{"],
        ] {
            assert!(ctl(argv).is_err(), "{argv:?}");
        }
    }

    #[test]
    fn a_reply_without_ok_true_is_refused() {
        let request = json!({"cmd": "translate"});
        check(&request, &json!({"ok": true})).unwrap();
        let refused = |reply| check(&request, &reply).unwrap_err().to_string();
        assert_eq!(
            refused(json!({"ok": false, "fault": "unmapped"})),
            "translate: fault unmapped"
        );
        assert_eq!(
            refused(json!({"ok": false, "error": "missing \"iova\""})),
            "translate: missing \"iova\""
        );
        assert!(refused(json!({"x": 1})).contains("does not say"));
    }
}
