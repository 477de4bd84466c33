//! `vmfabric`: the host-side network for micro-VMs.
//!
//! This stage serves one network from the data plane: it opens the ports asked for,
//! prints the exact VMM arguments for each, logs what happens on them and, when
//! stopped, their counters. The daemon with an API grows from here.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use fabric::{Mac, NetworkConfig, PortId, Switch, SwitchConfig, SwitchEvent, TapSource, Transport};
use gateway::{Gateway, GatewayConfig, LeaseEvent, MemoryLeaseStore};
use std::sync::mpsc;
use tracing::info;
use vmfabric::control::locks::{self, ControlEvent, PortLocker};

#[derive(Parser)]
#[command(name = "vmfabric", version, about = "Host-side network for micro-VMs and sandboxes")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve a network that VMMs join through datagram, stream or TAP ports.
    Serve(ServeArgs),
    /// Boot the test guest (guest/build.sh) under QEMU on a port; its console goes to stdout.
    BootGuest(BootGuestArgs),
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

#[derive(clap::Args)]
struct ServeArgs {
    /// Directory for the ports' socket files.
    #[arg(long, default_value = "/run/vmfabric")]
    run_dir: PathBuf,
    /// Name of the network.
    #[arg(long, default_value = "default")]
    network: String,
    /// MTU of the network (68..=65520).
    #[arg(long, default_value_t = fabric::DEFAULT_MTU)]
    mtu: usize,
    /// Seconds a MAC table entry lives without traffic.
    #[arg(long, default_value_t = 300)]
    aging_secs: u64,
    /// MAC table bound.
    #[arg(long, default_value_t = 4096)]
    mac_table_max: usize,
    /// A unixgram port (QEMU -netdev dgram, vfkit unixgram://) with this name; repeat for more.
    #[arg(long = "dgram-port", value_name = "NAME")]
    dgram_ports: Vec<String>,
    /// A stream port (QEMU -netdev stream, passt/gvproxy framing) with this name.
    #[arg(long = "stream-port", value_name = "NAME")]
    stream_ports: Vec<String>,
    /// A TAP port: the device with this name is created (needs CAP_NET_ADMIN).
    #[arg(long = "tap-port", value_name = "IFNAME")]
    tap_ports: Vec<String>,
    /// The network's IPv4 subnet; the gateway takes its first address.
    #[arg(long, default_value = "10.77.0.0/24")]
    subnet: ipnet::Ipv4Net,
    /// DNS domain of the VMs' names.
    #[arg(long, default_value = "vm.internal")]
    domain: String,
    /// Run no gateway (no DHCP, DNS, ARP/ICMP for a gateway address) on the network.
    #[arg(long)]
    no_gateway: bool,
    /// Print the counters of every port this often (0: only at exit).
    #[arg(long, default_value_t = 0)]
    stats_every_secs: u64,
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
    }
}

/// The QEMU arguments that attach a guest NIC to this port.
fn qemu_args(transport: &Transport, mac: Mac, guest_sock: &Path) -> String {
    let netdev = match transport {
        Transport::Unixgram { path } => format!(
            "-netdev dgram,id=net0,local.type=unix,local.path={},remote.type=unix,remote.path={}",
            guest_sock.display(),
            path.display()
        ),
        Transport::Stream { path } => {
            format!(
                "-netdev stream,id=net0,server=off,addr.type=unix,addr.path={}",
                path.display()
            )
        }
        Transport::Tap { ifname } => {
            format!("-netdev tap,id=net0,ifname={ifname},script=no,downscript=no")
        }
        Transport::Socketpair => "-netdev dgram,id=net0,local.type=fd,local.str=FD".to_string(),
    };
    format!("{netdev} -device virtio-net-pci,netdev=net0,mac={mac}")
}

fn serve(args: ServeArgs) -> Result<()> {
    let mut dgram = args.dgram_ports.clone();
    if dgram.is_empty() && args.stream_ports.is_empty() && args.tap_ports.is_empty() {
        dgram.push("vm0".into());
    }
    let ports_dir = args.run_dir.join("ports");
    std::fs::create_dir_all(&ports_dir).with_context(|| format!("create {}", ports_dir.display()))?;
    std::fs::create_dir_all(args.run_dir.join("guests")).ok();

    let switch = Arc::new(Switch::start(SwitchConfig::default()).context("start the switch")?);
    let switch_events = switch.take_events().context("event stream")?;
    let net = NetworkConfig {
        mtu: args.mtu,
        mac_table_max: args.mac_table_max,
        aging: Duration::from_secs(args.aging_secs),
        ..NetworkConfig::default()
    };
    switch.add_network(&args.network, net).context("create the network")?;

    // The gateway runs on a small runtime of its own; the data plane has its thread.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("gateway")
        .enable_all()
        .build()
        .context("start the gateway runtime")?;
    let (control_tx, control_rx) = mpsc::channel();
    let mut locker = PortLocker::new(switch.clone());
    let gateway = if args.no_gateway {
        None
    } else {
        let mut cfg = GatewayConfig::new(&args.network, args.subnet);
        cfg.mtu = u16::try_from(args.mtu).unwrap_or(u16::MAX);
        cfg.domain = args.domain.clone();
        cfg.search = vec![args.domain.clone()];
        let gw = Gateway::attach(
            rt.handle(),
            &switch,
            &args.network,
            cfg,
            Box::new(MemoryLeaseStore::default()),
        )
        .context("start the gateway")?;
        if gw.config().lock_ports {
            locker.enable(&args.network, gw.port());
        }
        let leases = gw.take_events().context("lease events")?;
        let (tx, network) = (control_tx.clone(), args.network.clone());
        std::thread::spawn(move || {
            for event in leases {
                log_lease(&event);
                if tx
                    .send(ControlEvent::Lease {
                        network: network.clone(),
                        event,
                    })
                    .is_err()
                {
                    break;
                }
            }
        });
        Some(Arc::new(gw))
    };
    let _locker = locks::spawn(locker, control_rx);

    let mut ports: Vec<(PortId, String)> = Vec::new();
    for name in &dgram {
        let path = ports_dir.join(format!("{name}.sock"));
        let id = switch
            .add_unixgram_port(&args.network, name, &path)
            .with_context(|| format!("port {name}"))?;
        ports.push((id, name.clone()));
    }
    for name in &args.stream_ports {
        let path = ports_dir.join(format!("{name}.stream"));
        let id = switch
            .add_stream_port(&args.network, name, &path)
            .with_context(|| format!("port {name}"))?;
        ports.push((id, name.clone()));
    }
    for ifname in &args.tap_ports {
        let (id, _) = switch
            .add_tap_port(&args.network, ifname, TapSource::Name(ifname.clone()))
            .with_context(|| format!("TAP port {ifname}"))?;
        ports.push((id, ifname.clone()));
    }
    let ports = Arc::new(ports);
    {
        // Switch events: logged, used to name VMs after their port, and passed on.
        let (ports, gateway) = (ports.clone(), gateway.clone());
        std::thread::spawn(move || {
            for ev in switch_events {
                log_event(&ev, &ports);
                if let (SwitchEvent::MacLearned { mac, port, .. }, Some(gw)) = (&ev, &gateway) {
                    if let Some((_, label)) = ports.iter().find(|(p, _)| p == port) {
                        gw.set_name_hint(*mac, label);
                    }
                }
                if control_tx.send(ControlEvent::Switch(ev)).is_err() {
                    break;
                }
            }
        });
    }

    println!(
        "vmfabric: network {:?} (MTU {}) is up with {} port(s).",
        args.network,
        args.mtu,
        ports.len()
    );
    if let Some(gw) = &gateway {
        let c = gw.config();
        println!(
            "gateway {} ({}): DHCP {}-{}, DNS for *.{}, ports locked to their leases: {}",
            c.gateway_ip, c.subnet, c.dhcp_range.0, c.dhcp_range.1, c.domain, c.lock_ports
        );
    }
    for info in switch.ports().iter().filter(|p| p.label != "gateway") {
        let mac = Mac::derived(&[&args.network, &info.label]);
        let guest_sock = args.run_dir.join("guests").join(format!("{}.sock", info.label));
        println!("\nport {} ({}):", info.label, info.transport.kind());
        println!(
            "  qemu-system-x86_64 ... {}",
            qemu_args(&info.transport, mac, &guest_sock)
        );
        if let Transport::Unixgram { path } = &info.transport {
            println!(
                "  vfkit ... --device virtio-net,unixSocketPath={},mac={mac}",
                path.display()
            );
        }
    }
    println!("\nStop with Ctrl-C or SIGTERM.");
    println!("Print the counters with: kill -USR1 {}", std::process::id());

    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone()).context("install signal handler")?;
    }
    let stats_asked = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGUSR1, stats_asked.clone()).context("install signal handler")?;
    let mut last_stats = std::time::Instant::now();
    while !stop.load(Ordering::Relaxed) {
        // Everything runs on its own threads; this one only waits for signals.
        std::thread::sleep(Duration::from_millis(100));
        let periodic = args.stats_every_secs > 0 && last_stats.elapsed() >= Duration::from_secs(args.stats_every_secs);
        if periodic || stats_asked.swap(false, Ordering::Relaxed) {
            print_stats(&switch, &args.network, &ports, gateway.as_deref());
            last_stats = std::time::Instant::now();
        }
    }
    print_stats(&switch, &args.network, &ports, gateway.as_deref());
    info!("stopping");
    Ok(())
}

fn log_lease(ev: &LeaseEvent) {
    match ev {
        LeaseEvent::Bound(l) => {
            info!(mac = %l.mac, ip = %l.ip, name = l.hostname.as_deref().unwrap_or("-"), "lease bound")
        }
        LeaseEvent::Released { mac, ip } => info!(%mac, %ip, "lease released"),
        LeaseEvent::Expired { mac, ip } => info!(%mac, %ip, "lease expired"),
    }
}

fn label(ports: &[(PortId, String)], id: PortId) -> String {
    ports
        .iter()
        .find(|(p, _)| *p == id)
        .map(|(_, n)| n.clone())
        .unwrap_or_else(|| id.to_string())
}

fn log_event(ev: &SwitchEvent, ports: &[(PortId, String)]) {
    match ev {
        SwitchEvent::PortUp { port, peer } => {
            info!(port = %label(ports, *port), peer = peer.as_deref().unwrap_or("-"), "port up")
        }
        SwitchEvent::PortDown { port, reason } => {
            info!(port = %label(ports, *port), %reason, "port down")
        }
        SwitchEvent::MacLearned { mac, port, .. } => {
            info!(port = %label(ports, *port), %mac, "MAC learned")
        }
        SwitchEvent::MacMoved { mac, from, to, .. } => {
            info!(%mac, from = %label(ports, *from), to = %label(ports, *to), "MAC moved")
        }
        SwitchEvent::MacTableFull { network } => info!(%network, "MAC table full"),
    }
}

fn print_stats(switch: &Switch, network: &str, ports: &[(PortId, String)], gateway: Option<&Gateway>) {
    println!(
        "{:<12} {:>10} {:>12} {:>10} {:>12}  drops",
        "port", "rx_frames", "rx_bytes", "tx_frames", "tx_bytes"
    );
    for (id, name) in ports {
        if let Some(c) = switch.port_counters(*id) {
            let drops: Vec<String> = c
                .drops_by_reason()
                .filter(|(_, n)| *n > 0)
                .map(|(r, n)| format!("{}={n}", r.as_str()))
                .collect();
            println!(
                "{name:<12} {:>10} {:>12} {:>10} {:>12}  {}",
                c.rx_frames,
                c.rx_bytes,
                c.tx_frames,
                c.tx_bytes,
                if drops.is_empty() {
                    "-".to_string()
                } else {
                    drops.join(",")
                }
            );
        }
    }
    if let Some(n) = switch.mac_table_len(network) {
        println!("MAC table of {network}: {n} entries");
    }
    if let Some(gw) = gateway {
        println!("leases of {network}:");
        for l in gw.leases() {
            println!("  {:<15} {}  {}", l.ip, l.mac, l.hostname.as_deref().unwrap_or("-"));
        }
        let busy: Vec<String> = gw
            .counters()
            .snapshot()
            .into_iter()
            .filter(|(_, v)| *v > 0)
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        println!("gateway: {}", busy.join(" "));
    }
}

fn boot_guest(args: BootGuestArgs) -> Result<()> {
    use base64::Engine;
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
    q.cmdline.push(format!("VMF_IP={}", args.ip));
    q.cmdline.push(format!("VMF_HOSTNAME={}", args.hostname));
    if args.http {
        q.cmdline.push("VMF_HTTP=1".into());
    }
    match &args.cmd {
        // Base64: the kernel command line cannot carry quotes, pipes or semicolons.
        Some(cmd) => {
            let b64 = base64::engine::general_purpose::STANDARD.encode(cmd.as_bytes());
            q.cmdline.push(format!("VMF_CMD={b64}"))
        }
        None => q.cmdline.push("VMF_END=hang".into()),
    }
    // exec: the guest is this process from here on, so signalling it reaches QEMU.
    let err = std::os::unix::process::CommandExt::exec(&mut q.command());
    Err(anyhow::Error::new(err).context("run qemu-system-x86_64 (apt-get install qemu-system-x86)"))
}
