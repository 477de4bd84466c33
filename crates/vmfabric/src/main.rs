//! `vmfabric`: the host-side network for micro-VMs.
//!
//! `vmfabric serve` is the daemon (`serve.rs`); the other commands are clients of its
//! API (on a Unix socket) and print tables, or JSON with `--json` (`cli/`).
#![forbid(unsafe_code)]

mod cli;
mod serve;

use std::process::ExitCode;

use clap::Parser;
use vmfabric::client::{ApiError, Unreachable};

/// What a failed command exits with, for scripts (clap exits 2 for usage errors
/// itself; see `vmfabric --help`).
fn exit_code(e: &anyhow::Error) -> u8 {
    if e.chain().any(|c| c.is::<Unreachable>()) {
        return 5;
    }
    if e.chain().any(|c| c.is::<cli::BadInput>()) {
        return 2;
    }
    match e.downcast_ref::<ApiError>().map(|a| a.status) {
        Some(400 | 422) => 2,
        Some(404) => 3,
        Some(409) => 4,
        _ => 1,
    }
}

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let json = matches!(&cli.command, cli::Command::Serve(a) if a.log_format == serve::LogFormat::Json);
    let logs = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr);
    if json {
        logs.json().init();
    } else {
        logs.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
    let result = match cli.command {
        cli::Command::Serve(args) => serve::run(*args),
        cli::Command::BootGuest(args) => cli::boot_guest::run(args),
        other => cli::run(other),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:#}");
            ExitCode::from(exit_code(&e))
        }
    }
}
