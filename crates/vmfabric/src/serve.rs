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

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum LogFormat {
    Text,
    Json,
}

/// Where a packaged daemon finds its configuration.
const DEFAULT_CONFIG: &str = "/etc/vmfabric/vmfabric.toml";

#[derive(clap::Args)]
pub(crate) struct ServeArgs {
    /// The API socket (mode 0600, or 0660 with --socket-group). Under systemd socket
    /// activation (LISTEN_FDS) the socket systemd passes is served instead.
    #[arg(long, env = "VMFABRIC_SOCKET", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Members of this group (name or number) may use the API socket, and so the CLI,
    /// without root.
    #[arg(long, value_name = "GROUP")]
    socket_group: Option<String>,
    /// Logs as text for people, or as JSON lines for collectors.
    #[arg(long, value_enum, default_value = "text", env = "VMFABRIC_LOG_FORMAT")]
    pub(crate) log_format: LogFormat,
    /// Where the state store lives.
    #[arg(long, env = "VMFABRIC_STATE_DIR", default_value = "/var/lib/vmfabric")]
    state_dir: PathBuf,
    /// Directory for the ports' socket files.
    #[arg(long, env = "VMFABRIC_RUN_DIR", default_value = "/run/vmfabric")]
    run_dir: PathBuf,
    /// The guest image (guest/build.sh DIR) that `vm run` boots; without it the daemon
    /// runs no VMs.
    #[arg(long)]
    guest_dir: Option<PathBuf>,
    /// A host directory whose files and subdirectories VMs may use as kernels, disks
    /// and shares (repeatable). VMs may name nothing else on the host but the guest
    /// image.
    #[arg(long = "vm-path", value_name = "DIR")]
    vm_paths: Vec<PathBuf>,
    /// A TOML file declaring networks, ports, reservations and gateway settings to
    /// create at start (docs/config.md). Default: /etc/vmfabric/vmfabric.toml when it
    /// exists.
    #[arg(long, env = "VMFABRIC_CONFIG")]
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
    #[command(flatten)]
    cluster: ClusterArgs,
}

/// Joining a cluster: networks of scope `cluster` live in etcd and span its nodes.
#[derive(clap::Args)]
struct ClusterArgs {
    /// etcd's client URLs (http://host:2379,...): join the cluster whose state lives
    /// there. Without it the daemon is a single host.
    #[arg(long, value_delimiter = ',', value_name = "URL", requires_all = ["node", "underlay"])]
    cluster_endpoints: Vec<String>,
    /// This node's name, unique in the cluster.
    #[arg(long, value_name = "NAME")]
    node: Option<String>,
    /// The address other nodes reach this one's VXLAN tunnels at.
    #[arg(long, value_name = "ADDR")]
    underlay: Option<std::net::IpAddr>,
    /// The UDP port of every node's VXLAN tunnels (4789 is IANA's).
    #[arg(long, default_value_t = 4789)]
    vxlan_port: u16,
    /// The underlay's MTU; cluster networks may be at most 50 bytes less.
    #[arg(long, default_value_t = 1500)]
    underlay_mtu: u16,
    /// Where the cluster's keys live in etcd (clusters may share one etcd).
    #[arg(long, default_value = "/vmfabric")]
    cluster_prefix: String,
    /// Seconds this node's keys (its MACs, its membership) outlive it.
    #[arg(long, default_value_t = 10)]
    node_ttl: u64,
    /// What carries this node's cluster networks: vmfabric's switch and VXLAN tunnels
    /// (userspace), or a Linux bridge with a vxlan device (kernel). Nodes of either
    /// mode share networks.
    #[arg(long, value_enum, default_value = "userspace")]
    cluster_mode: vmfabric::model::NetworkMode,
    /// The CA (PEM) that signed etcd's certificate: talk to etcd over TLS (the
    /// endpoints are https:// URLs).
    #[arg(long, value_name = "FILE")]
    cluster_ca: Option<std::path::PathBuf>,
    /// This node's client certificate (PEM), where etcd asks for one
    /// (--client-cert-auth).
    #[arg(long, value_name = "FILE", requires_all = ["cluster_ca", "cluster_key"])]
    cluster_cert: Option<std::path::PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, value_name = "FILE", requires = "cluster_cert")]
    cluster_key: Option<std::path::PathBuf>,
}

impl ClusterArgs {
    fn config(&self, runtime: tokio::runtime::Handle) -> Result<Option<vmfabric::cluster::node::NodeConfig>> {
        let (Some(node), Some(underlay)) = (self.node.clone(), self.underlay) else {
            return Ok(None);
        };
        let tls = match &self.cluster_ca {
            Some(ca) => Some(
                vmfabric::cluster::ClusterTls::load(ca, self.cluster_cert.as_deref(), self.cluster_key.as_deref())
                    .context("TLS to etcd")?,
            ),
            None => None,
        };
        Ok(
            (!self.cluster_endpoints.is_empty()).then(|| vmfabric::cluster::node::NodeConfig {
                endpoints: self.cluster_endpoints.clone(),
                prefix: self.cluster_prefix.clone(),
                node,
                underlay,
                vxlan_port: self.vxlan_port,
                underlay_mtu: self.underlay_mtu,
                lease_ttl: Duration::from_secs(self.node_ttl.max(3)),
                mode: self.cluster_mode,
                tls,
                runtime,
            }),
        )
    }
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
    if let Some(note) = vmfabric::control::privileges::unprivileged_note() {
        tracing::warn!("{note}");
    }
    fabric::keep_large_allocations_mapped();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("vmfabric")
        .enable_all()
        .build()
        .context("start the runtime")?;
    let config = args
        .config
        .clone()
        .or_else(|| Some(PathBuf::from(DEFAULT_CONFIG)).filter(|p| p.exists()));
    if let Some(c) = &config {
        info!(config = %c.display(), "configuration");
    }
    let declared = config.as_deref().map(vmfabric::config::load).transpose()?;
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
        args.cluster.config(rt.handle().clone())?,
    )?;
    let file_paths = declared.iter().flat_map(|c| c.vm_paths.iter().cloned());
    daemon
        .vms()
        .allow_paths(args.vm_paths.iter().cloned().chain(file_paths).collect());
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
    let (listener, activated) = {
        let _guard = rt.enter();
        match activated_listener()? {
            Some(l) => (l, true),
            None => {
                let gid = args.socket_group.as_deref().map(group_gid).transpose()?;
                let listener = api::bind_shared(&args.socket, gid)?;
                if let (Some(group), Some(gid)) = (&args.socket_group, gid) {
                    info!(group, gid, "API socket shared with a group");
                }
                (listener, false)
            }
        }
    };
    // Only a socket this daemon made is its to remove; systemd keeps its own.
    let socket_inode = std::fs::metadata(&args.socket)
        .ok()
        .filter(|_| !activated)
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
    let api_at = if activated {
        "the socket systemd passed".to_string()
    } else {
        args.socket.display().to_string()
    };
    println!("vmfabric: API on {api_at}, state in {}", args.state_dir.display());
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
    // Under systemd (Type=notify): ready once the API answers. Elsewhere a no-op.
    if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
        tracing::warn!("cannot tell the service manager the daemon is ready: {e}");
    }
    while !stop.load(Ordering::Relaxed) && !server.is_finished() {
        std::thread::sleep(Duration::from_millis(100));
        if stats_asked.swap(false, Ordering::Relaxed) {
            print_stats(&daemon);
        }
    }
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    server.abort();
    daemon.shutdown();
    // Only our own socket: a newer daemon may have bound the path since.
    if std::fs::metadata(&args.socket).is_ok_and(|m| Some(std::os::unix::fs::MetadataExt::ino(&m)) == socket_inode) {
        let _ = std::fs::remove_file(&args.socket);
    }
    info!("stopped");
    Ok(())
}

/// The API socket systemd passed (socket activation: LISTEN_PID is this process and
/// LISTEN_FDS counts from fd 3), if any.
fn activated_listener() -> Result<Option<tokio::net::UnixListener>> {
    let mut fds = listenfd::ListenFd::from_env();
    if fds.len() == 0 {
        return Ok(None);
    }
    let Some(std_listener) = fds
        .take_unix_listener(0)
        .context("the socket systemd passed is not a Unix stream socket")?
    else {
        return Ok(None);
    };
    std_listener.set_nonblocking(true)?;
    info!("API on the socket systemd passed");
    Ok(Some(tokio::net::UnixListener::from_std(std_listener)?))
}

/// Gives `group` read and write on the socket (0660).
/// A `--socket-group` as a group id: a number, or a name from /etc/group.
fn group_gid(group: &str) -> Result<u32> {
    match group.parse::<u32>() {
        Ok(n) => Ok(n),
        Err(_) => {
            let text = std::fs::read_to_string("/etc/group").context("read /etc/group")?;
            group_id(&text, group).with_context(|| format!("no group named {group:?} in /etc/group"))
        }
    }
}

/// A group's id from /etc/group text. Read by hand: the C library's getgrnam is not
/// reachable without `unsafe`, and groups from NSS modules (LDAP) can be given by number.
fn group_id(etc_group: &str, name: &str) -> Option<u32> {
    etc_group.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next()? == name).then_some(())?;
        f.nth(1)?.parse().ok()
    })
}

/// Counters of every port and the leases, from the same numbers `/metrics` serves.
/// SIGUSR1: the `vmfabric stats` tables (from the same typed stats) and each
/// network's leases, on stdout.
fn print_stats(daemon: &Control) {
    for s in daemon.stats() {
        print!("{}", crate::cli::stats::describe(&s));
        println!("  leases:");
        for l in daemon.leases(s.network.as_str()).unwrap_or_default() {
            println!("    {:<15} {}  {}", l.ip, l.mac, l.hostname.as_deref().unwrap_or("-"));
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn group_ids_come_from_etc_group() {
        let text = "root:x:0:\nvmfabric:x:998:alice,bob\n";
        assert_eq!(super::group_id(text, "vmfabric"), Some(998));
        assert_eq!(super::group_id(text, "nobody"), None);
    }
}
