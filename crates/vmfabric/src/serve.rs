//! `vmfabric serve`: the daemon process. Its runtime, signals, the API listener (and
//! an optional metrics one), the config file, and a clean shutdown.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tracing::info;
use vmfabric::api;
use vmfabric::control::Control;
use vmfabric::model::PortSpec;
use vmfabric::store::PortKind;

use crate::cli::DEFAULT_SOCKET;

#[derive(clap::Args)]
pub(crate) struct ServeArgs {
    /// The API socket (mode 0600).
    #[arg(long, env = "VMFABRIC_SOCKET", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Where the state store lives.
    #[arg(long, default_value = "/var/lib/vmfabric")]
    state_dir: PathBuf,
    /// Directory for the ports' socket files.
    #[arg(long, default_value = "/run/vmfabric")]
    run_dir: PathBuf,
    /// The guest image (guest/build.sh DIR) that `vm run` boots; without it the daemon
    /// runs no VMs.
    #[arg(long)]
    guest_dir: Option<PathBuf>,
    /// A TOML file declaring networks, ports and reservations to create at start.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Also serve `/metrics` over TCP on this address (for example 127.0.0.1:9100).
    #[arg(long)]
    metrics_addr: Option<std::net::SocketAddr>,
    /// Make sure network `default` has a unixgram port with this name (repeatable).
    #[arg(long = "dgram-port", value_name = "NAME")]
    dgram_ports: Vec<String>,
    /// Make sure network `default` has a stream port with this name (repeatable).
    #[arg(long = "stream-port", value_name = "NAME")]
    stream_ports: Vec<String>,
    /// Run the switch and gateway threads unconfined (no seccomp filter, capabilities,
    /// Landlock). For debugging only: the threads that read every guest's frames then
    /// hold root's privileges. (VMFABRIC_SECCOMP=refuse|kill|log says what becomes of
    /// a gateway thread's call off its allowlist: ENOSYS, the end of the daemon, or a
    /// kernel log line.)
    #[arg(long)]
    no_sandbox: bool,
}

/// Descriptors kept from guests' flows for the daemon's own API, ports and store (a
/// quarter of the limit where the limit is small).
const FD_RESERVE: u64 = 1024;

pub(crate) fn run(args: ServeArgs) -> Result<()> {
    // Debian's default soft limit (1,024) is the per-guest UDP bound alone: raise it to
    // the hard limit and keep guests' flows below a reserve.
    match rustix::process::getrlimit(rustix::process::Resource::Nofile).maximum {
        Some(hard) => {
            let reserve = FD_RESERVE.min(hard / 4);
            match gateway::fd_budget::raise_limit(reserve) {
                Ok(limit) => tracing::info!(limit, reserve, "descriptor limit"),
                Err(e) => tracing::warn!("cannot raise the descriptor limit: {e}"),
            }
        }
        None => tracing::info!("no descriptor limit"),
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("vmfabric")
        .enable_all()
        .build()
        .context("start the runtime")?;
    let declared = args.config.as_deref().map(vmfabric::config::load).transpose()?;
    // A declared "default" network is the one a new store starts with.
    let first = declared.as_ref().and_then(|c| c.default_network());
    if args.no_sandbox {
        tracing::warn!(
            "--no-sandbox: the switch thread runs WITHOUT its seccomp filter and capabilities dropped, and the gateways WITH all of root's capabilities, no seccomp filter and no Landlock; a bug in frame handling would have the daemon's full privileges"
        );
    }
    let daemon = Control::start_configured(
        args.state_dir.clone(),
        args.run_dir.clone(),
        args.guest_dir.clone(),
        first,
        !args.no_sandbox,
    )?;
    if let Some(cfg) = &declared {
        vmfabric::config::apply(&daemon, cfg)?;
    }
    if let Some(addr) = args.metrics_addr {
        let listener = rt
            .block_on(tokio::net::TcpListener::bind(addr))
            .with_context(|| format!("bind {addr}"))?;
        let app = api::metrics_router(daemon.clone());
        rt.spawn(async move { axum::serve(listener, app).await });
        info!(%addr, "metrics over TCP");
    }
    let listener = {
        let _guard = rt.enter();
        api::bind(&args.socket)?
    };
    let socket_inode = std::fs::metadata(&args.socket)
        .ok()
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m));
    let wanted = args
        .dgram_ports
        .iter()
        .map(|n| (n, PortKind::Unixgram))
        .chain(args.stream_ports.iter().map(|n| (n, PortKind::Stream)));
    for (name, kind) in wanted {
        let exists = daemon
            .ports("default")
            .map(|ps| ps.iter().any(|p| &p.record.name == name))
            .unwrap_or(false);
        if !exists {
            let req = PortSpec::new(vmfabric::model::Name::new("port", name)?, kind);
            daemon
                .add_port("default", req)
                .map_err(|e| anyhow::anyhow!("port {name}: {e}"))?;
        }
    }
    println!(
        "vmfabric: API on {}, state in {}",
        args.socket.display(),
        args.state_dir.display()
    );
    for net in daemon.networks() {
        let r = &net;
        println!(
            "network {} {} (MTU {}, gateway: {})",
            r.name, r.subnet, r.mtu, r.gateway
        );
        for p in daemon.ports(&r.name).unwrap_or_default() {
            println!(
                "  port {} ({:?}): qemu-system-x86_64 ... {}",
                p.record.name, p.record.kind, p.qemu_args
            );
        }
    }
    println!(
        "Stop with Ctrl-C or SIGTERM. Print counters and leases with: kill -USR1 {}",
        std::process::id()
    );

    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone()).context("install signal handler")?;
    }
    let stats_asked = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGUSR1, stats_asked.clone()).context("install signal handler")?;
    let server = rt.spawn(api::serve(listener, daemon.clone()));
    while !stop.load(Ordering::Relaxed) && !server.is_finished() {
        std::thread::sleep(Duration::from_millis(100));
        if stats_asked.swap(false, Ordering::Relaxed) {
            print_stats(&daemon);
        }
    }
    server.abort();
    daemon.shutdown();
    // Only our own socket: a newer daemon may have bound the path since.
    if std::fs::metadata(&args.socket).is_ok_and(|m| Some(std::os::unix::fs::MetadataExt::ino(&m)) == socket_inode) {
        let _ = std::fs::remove_file(&args.socket);
    }
    info!("stopped");
    Ok(())
}

/// Counters of every port and the leases, from the same numbers `/metrics` serves.
fn print_stats(daemon: &Control) {
    let families = daemon.metric_families();
    for net in daemon.networks() {
        let name = &net.name;
        println!("network {name}");
        println!(
            "  {:<12} {:>10} {:>12} {:>10} {:>12}  drops",
            "port", "rx_frames", "rx_bytes", "tx_frames", "tx_bytes"
        );
        for p in daemon.ports(name).unwrap_or_default() {
            let port = p.record.name.as_str();
            let get = |family: &str, direction: &str| {
                families
                    .value(family, &[("network", name), ("port", port), ("direction", direction)])
                    .unwrap_or(0)
            };
            let drops: Vec<String> = families
                .iter()
                .filter(|f| f.name == "vmfabric_port_drops")
                .flat_map(|f| &f.samples)
                .filter(|(labels, n)| {
                    *n > 0 && labels[..2] == [("network", name.to_string()), ("port", port.to_string())]
                })
                .map(|(labels, n)| format!("{}={n}", labels[2].1))
                .collect();
            println!(
                "  {:<12} {:>10} {:>12} {:>10} {:>12}  {}",
                port,
                get("vmfabric_port_frames", "rx"),
                get("vmfabric_port_bytes", "rx"),
                get("vmfabric_port_frames", "tx"),
                get("vmfabric_port_bytes", "tx"),
                if drops.is_empty() {
                    "-".to_string()
                } else {
                    drops.join(",")
                }
            );
        }
        println!("  leases:");
        for l in daemon.leases(name).unwrap_or_default() {
            println!("    {:<15} {}  {}", l.ip, l.mac, l.hostname.as_deref().unwrap_or("-"));
        }
    }
}
