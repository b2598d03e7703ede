// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `vhost-device-iommu`: serve a virtio-iommu over vhost-user, write its ACPI VIOT table, or
//! talk to a running daemon's control socket.

use std::{io, path::PathBuf, process::ExitCode, time::Duration};

use clap::{CommandFactory, Parser};
use thiserror::Error;
use vhost_device_iommu::{
    config::{self, Cli, Command, ConfigError, DaemonConfig, ServeArgs, ViotArgs},
    ctl::{self, CtlArgs, CtlError},
    server::{self, ServerError},
    viot::ViotError,
};

/// Everything that can stop the program, one layer each.
#[derive(Debug, Error)]
enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error("viot: {0}")]
    Viot(#[from] ViotError),
    #[error("{}: {source}", path.display())]
    Output { path: PathBuf, source: io::Error },
    #[error("ctl: {0}")]
    Ctl(#[from] CtlError),
}

fn serve(args: ServeArgs) -> Result<(), Error> {
    let config = DaemonConfig::try_from(args)?;
    Ok(server::run(config)?)
}

fn write_viot(args: ViotArgs) -> Result<(), Error> {
    let table = args.table()?;
    std::fs::write(&args.output, &table).map_err(|source| Error::Output {
        path: args.output.clone(),
        source,
    })?;
    log::info!("wrote {} bytes to {}", table.len(), args.output.display());
    Ok(())
}

fn control(args: CtlArgs) -> Result<(), Error> {
    let request = args.request.to_json();
    let timeout = Duration::from_secs(args.timeout);
    let reply = ctl::request(&args.control_socket, &request, timeout)?;
    // The reply is the command's output, refusals included: a script reads the fault there.
    let text = if args.compact {
        reply.to_string()
    } else {
        serde_json::to_string_pretty(&reply).unwrap_or_else(|_| reply.to_string())
    };
    println!("{text}");
    Ok(ctl::check(&request, &reply)?)
}

fn main() -> ExitCode {
    if config::wants_capabilities(std::env::args_os().skip(1)) {
        return match serde_json::to_string_pretty(&config::capabilities()) {
            Ok(json) => {
                println!("{json}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("vhost-device-iommu: --print-capabilities: {e}");
                ExitCode::FAILURE
            }
        };
    }
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let result = match (cli.command, cli.serve) {
        (Some(Command::Viot(args)), _) => write_viot(args),
        (Some(Command::Ctl(args)), _) => control(args),
        (Some(Command::Serve(args)), _) | (None, Some(args)) => serve(args),
        (None, None) => {
            // Unreachable through clap (one of --socket-path and --fd is required), kept so
            // that a change to the definition cannot start a daemon with nothing to serve.
            Cli::command()
                .error(
                    clap::error::ErrorKind::MissingRequiredArgument,
                    "one of --socket-path and --fd is required",
                )
                .exit()
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line, on stderr, whatever RUST_LOG says.
            eprintln!("vhost-device-iommu: {e}");
            ExitCode::FAILURE
        }
    }
}
