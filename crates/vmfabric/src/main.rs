//! `vmfabric`: the host-side network for micro-VMs.
//!
//! `vmfabric serve` is the daemon; the other commands are clients of its API (on a
//! Unix socket) and print tables, or JSON with `--json`.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use fabric::Mac;
use tracing::info;
use vmfabric::api;
use vmfabric::client::seg;
use vmfabric::control::Control;
use vmfabric::model::PortSpec;
use vmfabric::store::PortKind;

#[derive(Parser)]
#[command(name = "vmfabric", version, about = "Host-side network for micro-VMs and sandboxes")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: networks, gateways and ports from the state store, the API on a
    /// Unix socket. With an empty store it creates network `default` (10.77.0.0/24).
    Serve(ServeArgs),
    /// Networks: create, ls, show, rm.
    Network {
        #[command(subcommand)]
        cmd: NetworkCmd,
    },
    /// Ports of a network: add, ls, rm.
    Port {
        #[command(subcommand)]
        cmd: PortCmd,
    },
    /// VMs the daemon runs (the test guest image): run, ls, stop, logs.
    Vm {
        #[command(subcommand)]
        cmd: VmCmd,
    },
    /// Port forwards of a network (host address to guest port): add, ls, rm.
    Forward {
        #[command(subcommand)]
        cmd: ForwardCmd,
    },
    /// A network's egress policy: show, set.
    Policy {
        #[command(subcommand)]
        cmd: PolicyCmd,
    },
    /// Reserved addresses of a network: add, ls, rm.
    Reservation {
        #[command(subcommand)]
        cmd: ReservationCmd,
    },
    /// Leases of a network.
    Lease {
        #[command(subcommand)]
        cmd: LeaseCmd,
    },
    /// The NAT flows a network's gateway carries now (TCP egress and forwards, UDP).
    Flows {
        network: String,
        #[command(flatten)]
        c: ClientArgs,
    },
    /// Live capture of a network (NETWORK) or one port (NETWORK/PORT) as pcap, to stdout
    /// (pipe it into `tcpdump -r -` or `tshark -r -`) or to a file, until interrupted.
    Capture {
        target: String,
        /// Write to this file instead of stdout.
        #[arg(short = 'w', long)]
        write: Option<PathBuf>,
        #[arg(long, env = "VMFABRIC_SOCKET", default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Counters of every network, port and gateway (Prometheus text).
    Stats {
        #[arg(long, env = "VMFABRIC_SOCKET", default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Boot the test guest (guest/build.sh) under QEMU on a port; its console goes to stdout.
    BootGuest(BootGuestArgs),
}

const DEFAULT_SOCKET: &str = "/run/vmfabric/vmfabric.sock";

#[derive(clap::Args)]
struct ClientArgs {
    /// The daemon's API socket.
    #[arg(long, env = "VMFABRIC_SOCKET", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum NetworkCmd {
    Create {
        name: String,
        #[arg(long)]
        subnet: String,
        #[arg(long, default_value_t = 1500)]
        mtu: u32,
        /// No gateway (DHCP, DNS) on this network.
        #[arg(long)]
        no_gateway: bool,
        /// Let guests reach the host's loopback at the subnet's last host address.
        #[arg(long)]
        host_access: bool,
        /// userspace (vmfabric's switch) or kernel (a Linux bridge with TAP ports and
        /// nftables NAT; needs root).
        #[arg(long, default_value = "userspace")]
        mode: String,
        /// Kernel mode: ports reach the gateway and the router but not each other.
        #[arg(long)]
        isolated: bool,
        /// Kernel mode: the bridge's name (default: derived from the network's name).
        #[arg(long)]
        bridge: Option<String>,
        /// Create it even if the subnet overlaps a host route.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        c: ClientArgs,
    },
    Ls {
        #[command(flatten)]
        c: ClientArgs,
    },
    Show {
        name: String,
        #[command(flatten)]
        c: ClientArgs,
    },
    Rm {
        name: String,
        /// Also remove its ports.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        c: ClientArgs,
    },
}

#[derive(Subcommand)]
enum PortCmd {
    /// Add a port and print the VMM arguments for it.
    Add {
        network: String,
        name: String,
        /// unixgram (QEMU -netdev dgram, vfkit), stream (QEMU -netdev stream, passt
        /// framing) or tap (Firecracker, Cloud Hypervisor; needs CAP_NET_ADMIN).
        #[arg(long, default_value = "unixgram")]
        kind: String,
        /// TAP ports: the interface name.
        #[arg(long)]
        ifname: Option<String>,
        /// Kernel-mode TAP ports: UID:GID that may open the device (an unprivileged VMM).
        #[arg(long)]
        owner: Option<String>,
        /// Kernel-mode TAP ports: a multi-queue device.
        #[arg(long)]
        multi_queue: bool,
        /// Kernel-mode TAP ports: made with IFF_VNET_HDR.
        #[arg(long)]
        vnet_hdr: bool,
        /// Userspace ports: the MAC the VM uses (the port is locked to it); default:
        /// one derived from the network and port names.
        #[arg(long, conflicts_with = "learn_mac_once")]
        mac: Option<String>,
        /// Userspace ports: lock to the first MAC the VMM sends from, for VMMs that
        /// choose their own MAC.
        #[arg(long)]
        learn_mac_once: bool,
        /// Socketpair ports: the VMM to run with the VM end inherited; `{fd}` in its
        /// arguments becomes the fd number (QEMU: -netdev dgram,id=n0,local.type=fd,local.str={fd}).
        #[arg(last = true)]
        exec: Vec<String>,
        #[command(flatten)]
        c: ClientArgs,
    },
    Ls {
        network: String,
        #[command(flatten)]
        c: ClientArgs,
    },
    Rm {
        network: String,
        name: String,
        #[command(flatten)]
        c: ClientArgs,
    },
}

#[derive(Subcommand)]
enum VmCmd {
    /// Boot a VM on a new port of a network; it gets its address from the gateway.
    Run {
        #[arg(long = "net")]
        network: String,
        #[arg(long)]
        name: Option<String>,
        /// Serve /www over HTTP on port 80 in the guest.
        #[arg(long)]
        http: bool,
        #[arg(long, default_value_t = 96)]
        memory_mib: u32,
        /// Wait until the VM is ready (or has ended) before returning.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        c: ClientArgs,
        /// Shell command the guest runs once its network is up; it powers off after.
        #[arg(last = true)]
        cmd: Vec<String>,
    },
    Ls {
        #[command(flatten)]
        c: ClientArgs,
    },
    Stop {
        name: String,
        #[command(flatten)]
        c: ClientArgs,
    },
    Logs {
        name: String,
        #[command(flatten)]
        c: ClientArgs,
    },
}

#[derive(Subcommand)]
enum ForwardCmd {
    /// Forward HOST (address:port; port 0 picks one) to GUEST (address:port), TCP or UDP.
    Add {
        network: String,
        host: std::net::SocketAddr,
        guest: std::net::SocketAddrV4,
        #[arg(long, default_value = "tcp")]
        proto: String,
        #[command(flatten)]
        c: ClientArgs,
    },
    Ls {
        network: String,
        #[command(flatten)]
        c: ClientArgs,
    },
    /// Remove the forwards from HOST (both protocols unless --proto names one).
    Rm {
        network: String,
        host: String,
        #[arg(long)]
        proto: Option<String>,
        #[command(flatten)]
        c: ClientArgs,
    },
}

#[derive(Subcommand)]
enum PolicyCmd {
    Show {
        network: String,
        #[command(flatten)]
        c: ClientArgs,
    },
    /// Replace the policy with the JSON in FILE (`-` for stdin), e.g.
    /// {"default": "deny", "rules": [{"action": "allow", "dst": "10.0.0.0/8", "ports": "53", "proto": "udp"}]}
    Set {
        network: String,
        file: PathBuf,
        #[command(flatten)]
        c: ClientArgs,
    },
}

#[derive(Subcommand)]
enum ReservationCmd {
    /// Reserve IP for KEY: a MAC address, or a VM's name (DHCP hostname or port name).
    Add {
        network: String,
        key: String,
        ip: std::net::Ipv4Addr,
        #[command(flatten)]
        c: ClientArgs,
    },
    Ls {
        network: String,
        #[command(flatten)]
        c: ClientArgs,
    },
    Rm {
        network: String,
        key: String,
        #[command(flatten)]
        c: ClientArgs,
    },
}

#[derive(Subcommand)]
enum LeaseCmd {
    Ls {
        network: String,
        #[command(flatten)]
        c: ClientArgs,
    },
}

#[derive(clap::Args)]
struct ServeArgs {
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
    /// Run the switch thread without its seccomp filter. For debugging only: the thread
    /// that reads every guest's frames then may make any system call.
    #[arg(long)]
    no_sandbox: bool,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match Cli::parse().command {
        Command::Serve(args) => serve(args),
        Command::BootGuest(args) => boot_guest(args),
        Command::Network { cmd } => network_cmd(cmd),
        Command::Port { cmd } => port_cmd(cmd),
        Command::Vm { cmd } => vm_cmd(cmd),
        Command::Forward { cmd } => {
            match cmd {
                ForwardCmd::Add {
                    network,
                    host,
                    guest,
                    proto,
                    c,
                } => {
                    let body = serde_json::json!({ "proto": proto, "host": host, "guest": guest });
                    let v = request(
                        &c,
                        "POST",
                        &format!("/v1/networks/{}/forwards", seg(&network)),
                        Some(body),
                    )?;
                    print_table(&c, &v, &["proto", "host", "guest"]);
                }
                ForwardCmd::Ls { network, c } => {
                    let v = request(&c, "GET", &format!("/v1/networks/{}/forwards", seg(&network)), None)?;
                    print_table(&c, &v, &["proto", "host", "guest"]);
                }
                ForwardCmd::Rm {
                    network,
                    host,
                    proto,
                    c,
                } => {
                    let query = proto.map(|p| format!("?proto={p}")).unwrap_or_default();
                    request(
                        &c,
                        "DELETE",
                        &format!("/v1/networks/{}/forwards/{}{query}", seg(&network), seg(&host)),
                        None,
                    )?;
                    println!("removed the forward from {host} on {network}");
                }
            }
            Ok(())
        }
        Command::Policy { cmd } => {
            let (network, c, body) = match cmd {
                PolicyCmd::Show { network, c } => (network, c, None),
                PolicyCmd::Set { network, file, c } => {
                    let text = if file.as_os_str() == "-" {
                        std::io::read_to_string(std::io::stdin())?
                    } else {
                        std::fs::read_to_string(&file).with_context(|| format!("read {}", file.display()))?
                    };
                    let json: serde_json::Value = serde_json::from_str(&text).context("the policy file is not JSON")?;
                    (network, c, Some(json))
                }
            };
            let method = if body.is_some() { "PUT" } else { "GET" };
            let v = request(&c, method, &format!("/v1/networks/{}/policy", seg(&network)), body)?;
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(())
        }
        Command::Reservation { cmd } => {
            match cmd {
                ReservationCmd::Add { network, key, ip, c } => {
                    let body = serde_json::json!({ "key": key, "ip": ip });
                    let v = request(
                        &c,
                        "POST",
                        &format!("/v1/networks/{}/reservations", seg(&network)),
                        Some(body),
                    )?;
                    print_table(&c, &v, &["key", "ip"]);
                }
                ReservationCmd::Ls { network, c } => {
                    let v = request(&c, "GET", &format!("/v1/networks/{}/reservations", seg(&network)), None)?;
                    print_table(&c, &v, &["key", "ip"]);
                }
                ReservationCmd::Rm { network, key, c } => {
                    request(
                        &c,
                        "DELETE",
                        &format!("/v1/networks/{}/reservations/{}", seg(&network), seg(&key)),
                        None,
                    )?;
                    println!("removed the reservation of {key} on {network}");
                }
            }
            Ok(())
        }
        Command::Lease {
            cmd: LeaseCmd::Ls { network, c },
        } => {
            let v = request(&c, "GET", &format!("/v1/networks/{}/leases", seg(&network)), None)?;
            print_table(&c, &v, &["ip", "mac", "hostname", "expires"]);
            Ok(())
        }
        Command::Flows { network, c } => {
            let v = request(&c, "GET", &format!("/v1/networks/{}/flows", seg(&network)), None)?;
            if c.json {
                print_table(&c, &v, &[]);
            } else {
                print_table(&c, &v["tcp"], &["guest", "peer", "direction", "state"]);
                println!();
                print_table(&c, &v["udp"], &["guest", "dst"]);
            }
            Ok(())
        }
        Command::Capture { target, write, socket } => {
            let path = match target.split_once('/') {
                Some((net, port)) => format!("/v1/networks/{}/capture?port={}", seg(net), seg(port)),
                None => format!("/v1/networks/{}/capture", seg(&target)),
            };
            let mut out: Box<dyn std::io::Write> = match &write {
                Some(f) => Box::new(std::fs::File::create(f).with_context(|| format!("create {}", f.display()))?),
                None => Box::new(std::io::stdout()),
            };
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(vmfabric::client::stream_to(&socket, &path, &mut *out))
        }
        Command::Stats { socket } => {
            let c = ClientArgs { socket, json: false };
            let v = request(&c, "GET", "/metrics", None)?;
            print!("{}", v.as_str().unwrap_or_default());
            Ok(())
        }
    }
}

/// Descriptors kept from guests' flows for the daemon's own API, ports and store (a
/// quarter of the limit where the limit is small).
const FD_RESERVE: u64 = 1024;

fn serve(args: ServeArgs) -> Result<()> {
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
            "--no-sandbox: the switch thread runs WITHOUT its seccomp filter; a bug in frame handling would have the daemon's full privileges"
        );
    }
    let daemon = Control::start_configured(
        args.state_dir.clone(),
        args.run_dir.clone(),
        args.guest_dir.clone(),
        rt.handle().clone(),
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
    let metrics = daemon.metrics();
    for net in daemon.networks() {
        let name = &net.name;
        println!("network {name}");
        println!(
            "  {:<12} {:>10} {:>12} {:>10} {:>12}  drops",
            "port", "rx_frames", "rx_bytes", "tx_frames", "tx_bytes"
        );
        for p in daemon.ports(name).unwrap_or_default() {
            let labels = format!("network=\"{name}\",port=\"{}\"", p.record.name);
            let get = |metric: &str, dir: &str| -> String {
                let key = format!("{metric}{{{labels},dir=\"{dir}\"}} ");
                metrics
                    .lines()
                    .find_map(|l| l.strip_prefix(&key))
                    .unwrap_or("0")
                    .to_string()
            };
            let prefix = format!("vmfabric_port_drops_total{{{labels},reason=\"");
            let drops: Vec<String> = metrics
                .lines()
                .filter_map(|l| l.strip_prefix(&prefix)?.split_once("\"} "))
                .filter(|(_, n)| *n != "0")
                .map(|(r, n)| format!("{r}={n}"))
                .collect();
            println!(
                "  {:<12} {:>10} {:>12} {:>10} {:>12}  {}",
                p.record.name,
                get("vmfabric_port_frames_total", "rx"),
                get("vmfabric_port_bytes_total", "rx"),
                get("vmfabric_port_frames_total", "tx"),
                get("vmfabric_port_bytes_total", "tx"),
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

/// Calls the daemon; a non-2xx answer becomes an error with the daemon's message.
fn request(c: &ClientArgs, method: &str, path: &str, body: Option<serde_json::Value>) -> Result<serde_json::Value> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (status, v) = rt.block_on(vmfabric::client::call(&c.socket, method, path, body))?;
    if !(200..300).contains(&status) {
        let msg = v
            .get("message")
            .and_then(|m| m.as_str())
            .map(String::from)
            .unwrap_or_else(|| v.to_string());
        anyhow::bail!("{msg} (HTTP {status})");
    }
    Ok(v)
}

fn cell(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// A table of `columns` from a JSON array (or object), or the JSON itself with --json.
fn print_table(c: &ClientArgs, v: &serde_json::Value, columns: &[&str]) {
    if c.json {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
        return;
    }
    let rows: Vec<&serde_json::Value> = match v {
        serde_json::Value::Array(a) => a.iter().collect(),
        other => vec![other],
    };
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| columns.iter().map(|k| cell(&r[*k])).collect())
        .collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, h)| cells.iter().map(|r| r[i].len()).chain([h.len()]).max().unwrap_or(0))
        .collect();
    let line = |vals: Vec<String>| {
        vals.iter()
            .zip(&widths)
            .map(|(v, w)| format!("{v:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
    };
    println!("{}", line(columns.iter().map(|h| h.to_uppercase()).collect()));
    for r in cells {
        println!("{}", line(r));
    }
}

fn network_cmd(cmd: NetworkCmd) -> Result<()> {
    match cmd {
        NetworkCmd::Create {
            name,
            subnet,
            mtu,
            no_gateway,
            host_access,
            mode,
            isolated,
            bridge,
            force,
            c,
        } => {
            let body = serde_json::json!({
                "name": name, "subnet": subnet, "mtu": mtu, "gateway": !no_gateway, "host_access": host_access,
                "mode": mode, "isolated": isolated, "bridge": bridge
            });
            let v = request(&c, "POST", &format!("/v1/networks?force={force}"), Some(body))?;
            print_table(&c, &v, &["name", "subnet", "mtu", "gateway", "mode"]);
        }
        NetworkCmd::Ls { c } => {
            let v = request(&c, "GET", "/v1/networks", None)?;
            print_table(&c, &v, &["name", "subnet", "mtu", "gateway", "ports", "leases"]);
        }
        NetworkCmd::Show { name, c } => {
            let v = request(&c, "GET", &format!("/v1/networks/{}", seg(&name)), None)?;
            print_table(&c, &v, &["name", "subnet", "mtu", "gateway", "ports", "leases"]);
        }
        NetworkCmd::Rm { name, force, c } => {
            request(
                &c,
                "DELETE",
                &format!("/v1/networks/{}?force={force}", seg(&name)),
                None,
            )?;
            println!("removed network {name}");
        }
    }
    Ok(())
}

fn vm_cmd(cmd: VmCmd) -> Result<()> {
    const COLUMNS: &[&str] = &["name", "network", "state", "ip", "pid", "mac"];
    match cmd {
        VmCmd::Run {
            network,
            name,
            http,
            memory_mib,
            wait,
            c,
            cmd,
        } => {
            let name = name.unwrap_or_else(|| format!("vm-{:06x}", rand_suffix()));
            let command = (!cmd.is_empty()).then(|| cmd.join(" "));
            let body = serde_json::json!({ "name": name, "network": network, "http": http, "memory_mib": memory_mib, "cmd": command });
            let mut v = request(&c, "POST", "/v1/vms", Some(body))?;
            let deadline = std::time::Instant::now() + Duration::from_secs(180);
            while wait
                && matches!(v["state"].as_str(), Some("starting" | "running"))
                && std::time::Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(200));
                v = request(&c, "GET", &format!("/v1/vms/{}", seg(&name)), None)?;
            }
            print_table(&c, &v, COLUMNS);
            if let Some(reason) = v["reason"].as_str() {
                eprintln!("{reason}");
            }
        }
        VmCmd::Ls { c } => print_table(&c, &request(&c, "GET", "/v1/vms", None)?, COLUMNS),
        VmCmd::Stop { name, c } => print_table(
            &c,
            &request(&c, "DELETE", &format!("/v1/vms/{}", seg(&name)), None)?,
            COLUMNS,
        ),
        VmCmd::Logs { name, c } => print!(
            "{}",
            request(&c, "GET", &format!("/v1/vms/{}/logs", seg(&name)), None)?
                .as_str()
                .unwrap_or_default()
        ),
    }
    Ok(())
}

/// A short random suffix for unnamed VMs.
fn rand_suffix() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() & 0xffffff)
        .unwrap_or(0)
        ^ std::process::id()
}

/// Creates a socketpair port and runs `exec` with its VM end inherited.
fn exec_with_socketpair(
    c: &ClientArgs,
    network: &str,
    name: &str,
    choice: &vmfabric::client::MacChoice,
    exec: &[String],
) -> Result<()> {
    anyhow::ensure!(
        !exec.is_empty(),
        "a socketpair port needs the VMM to hand its end to: vmfabric port add {network} {name} --kind socketpair -- CMD ... {{fd}} ..."
    );
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (port, fd) = rt.block_on(vmfabric::client::socketpair_port(&c.socket, network, name, choice))?;
    drop(rt);
    // The VMM inherits the fd: clear close-on-exec and keep it open across exec.
    rustix::io::fcntl_setfd(&fd, rustix::io::FdFlags::empty())?;
    let raw = std::os::fd::IntoRawFd::into_raw_fd(fd);
    let args: Vec<String> = exec.iter().map(|a| a.replace("{fd}", &raw.to_string())).collect();
    eprintln!(
        "port {network}/{name}: socketpair, MAC {}, VM end is fd {raw}",
        cell(&port["mac"])
    );
    let mut vmm = std::process::Command::new(&args[0]);
    vmm.args(&args[1..]);
    let err = std::os::unix::process::CommandExt::exec(&mut vmm);
    Err(anyhow::Error::new(err).context(format!("run {}", args[0])))
}

fn port_cmd(cmd: PortCmd) -> Result<()> {
    match cmd {
        PortCmd::Add {
            network,
            name,
            kind,
            exec,
            mac,
            learn_mac_once,
            c,
            ..
        } if kind == "socketpair" => {
            let choice = vmfabric::client::MacChoice { mac, learn_mac_once };
            exec_with_socketpair(&c, &network, &name, &choice, &exec)?
        }
        PortCmd::Add {
            network,
            name,
            kind,
            ifname,
            owner,
            multi_queue,
            vnet_hdr,
            mac,
            learn_mac_once,
            c,
            ..
        } => {
            let (owner_uid, owner_gid) = match owner.as_deref().map(|o| o.split_once(':').unwrap_or((o, o))) {
                Some((u, g)) => (
                    Some(u.parse::<u32>().context("--owner takes UID:GID")?),
                    Some(g.parse::<u32>().context("--owner takes UID:GID")?),
                ),
                None => (None, None),
            };
            let body = serde_json::json!({
                "name": name, "kind": kind, "ifname": ifname, "owner_uid": owner_uid, "owner_gid": owner_gid,
                "multi_queue": multi_queue, "vnet_hdr": vnet_hdr, "mac": mac, "learn_mac_once": learn_mac_once
            });
            let v = request(&c, "POST", &format!("/v1/networks/{}/ports", seg(&network)), Some(body))?;
            if c.json {
                print_table(&c, &v, &[]);
            } else {
                println!(
                    "port {network}/{name}: {} at {} (MAC {})",
                    cell(&v["kind"]),
                    cell(&v["path"]),
                    cell(&v["mac"])
                );
                println!("  qemu-system-x86_64 ... {}", cell(&v["qemu_args"]));
                let (path, mac) = (cell(&v["path"]), cell(&v["mac"]));
                if v["kind"] == "unixgram" {
                    println!("  vfkit ... --device virtio-net,unixSocketPath={path},mac={mac}");
                }
                if v["kind"] == "tap" {
                    println!("  cloud-hypervisor ... --net tap={path},mac={mac}");
                    println!(
                        "  firecracker: \"network-interfaces\": [{{\"iface_id\": \"eth0\", \"host_dev_name\": \"{path}\", \"guest_mac\": \"{mac}\"}}]"
                    );
                }
            }
        }
        PortCmd::Ls { network, c } => {
            let v = request(&c, "GET", &format!("/v1/networks/{}/ports", seg(&network)), None)?;
            print_table(&c, &v, &["name", "kind", "up", "mac", "path"]);
        }
        PortCmd::Rm { network, name, c } => {
            request(
                &c,
                "DELETE",
                &format!("/v1/networks/{}/ports/{}", seg(&network), seg(&name)),
                None,
            )?;
            println!("removed port {network}/{name}");
        }
    }
    Ok(())
}

#[derive(clap::Args)]
struct BootGuestArgs {
    /// Directory with vmlinuz and initramfs.cpio.gz from guest/build.sh.
    #[arg(long)]
    guest_dir: PathBuf,
    /// A unixgram port's socket path to attach to.
    #[arg(long, conflicts_with = "stream")]
    dgram: Option<PathBuf>,
    /// A stream port's socket path to attach to.
    #[arg(long)]
    stream: Option<PathBuf>,
    /// The NIC's MAC (default: derived from network and hostname, as `serve` prints
    /// for the port of that name).
    #[arg(long)]
    mac: Option<Mac>,
    /// Network name used to derive the default MAC.
    #[arg(long, default_value = "default")]
    network: String,
    /// `dhcp` or a static address with prefix, e.g. 10.77.0.11/24.
    #[arg(long, default_value = "dhcp")]
    ip: String,
    #[arg(long, default_value = "guest")]
    hostname: String,
    /// Serve /www over HTTP on port 80 inside the guest.
    #[arg(long)]
    http: bool,
    /// Shell command the guest runs once its network is up; it powers off after.
    #[arg(long)]
    cmd: Option<String>,
    #[arg(long, default_value_t = 96)]
    memory_mib: u32,
}

fn boot_guest(args: BootGuestArgs) -> Result<()> {
    let mac = args
        .mac
        .unwrap_or_else(|| Mac::derived(&[&args.network, &args.hostname]));
    let backend = match (&args.dgram, &args.stream) {
        (Some(switch_path), None) => {
            let guest_path = switch_path.with_extension(format!("{}.guest", args.hostname));
            let _ = std::fs::remove_file(&guest_path);
            vm::NicBackend::Unixgram {
                switch_path: switch_path.clone(),
                guest_path,
            }
        }
        (None, Some(path)) => vm::NicBackend::Stream { path: path.clone() },
        _ => anyhow::bail!("give exactly one of --dgram PATH or --stream PATH"),
    };
    let kernel = args.guest_dir.join("vmlinuz");
    let initrd = args.guest_dir.join("initramfs.cpio.gz");
    anyhow::ensure!(
        kernel.exists() && initrd.exists(),
        "no guest image in {} (run guest/build.sh DIR)",
        args.guest_dir.display()
    );
    let mut q = vm::QemuConfig::new(kernel, initrd, vm::Serial::Stdio);
    q.memory_mib = args.memory_mib;
    q.nics.push(vm::Nic { backend, mac });
    q.cmdline.extend(
        vm::GuestCmdline {
            hostname: args.hostname.clone(),
            ip: args.ip.clone(),
            http: args.http,
            cmd: args.cmd.clone(),
            stay_up: false,
        }
        .args(),
    );
    // exec: the guest is this process from here on, so signalling it reaches QEMU.
    let err = std::os::unix::process::CommandExt::exec(&mut q.command());
    Err(anyhow::Error::new(err).context("run qemu-system-x86_64 (apt-get install qemu-system-x86)"))
}
