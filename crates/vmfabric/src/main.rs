//! `vmfabric`: the host-side network for micro-VMs.
//!
//! `vmfabric serve` is the daemon (`serve.rs`); the other commands are clients of its
//! API (on a Unix socket) and print tables, or JSON with `--json` (`cli/`).
#![forbid(unsafe_code)]

mod cli;
mod serve;

use anyhow::Result;
use clap::Parser;

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli::Cli::parse().command {
        cli::Command::Serve(args) => serve::run(args),
        cli::Command::BootGuest(args) => cli::boot_guest::run(args),
        other => cli::run(other),
    }
}
