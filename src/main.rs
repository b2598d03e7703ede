//! `vhost-device-iommu`: serve a virtio-iommu over vhost-user, or write its ACPI VIOT table.

use std::process::ExitCode;

use clap::Parser;
use log::error;
use vhost_device_iommu::{
    config::{Cli, Command, DaemonConfig, ServeArgs, ViotArgs},
    server,
};

fn serve(args: ServeArgs) -> Result<(), String> {
    let config = DaemonConfig::try_from(args).map_err(|e| e.to_string())?;
    server::run(config).map_err(|e| e.to_string())
}

fn write_viot(args: ViotArgs) -> Result<(), String> {
    let table = args.table()?;
    std::fs::write(&args.output, &table).map_err(|e| format!("{}: {e}", args.output.display()))?;
    log::info!("wrote {} bytes to {}", table.len(), args.output.display());
    Ok(())
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Viot(args)) => write_viot(args),
        Some(Command::Serve(args)) => serve(args),
        None => match cli.serve {
            Some(args) => serve(args),
            None => {
                use clap::CommandFactory;
                let _ = Cli::command().print_help();
                Err("--socket-path is required".into())
            }
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            eprintln!("vhost-device-iommu: {e}");
            ExitCode::FAILURE
        }
    }
}
