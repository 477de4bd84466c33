//! The command line: the clap tree, and the client commands, each of which calls the
//! daemon's API and prints a table (or JSON with `--json`).

pub(crate) mod boot_guest;
mod events;
mod network;
mod port;
mod settings;
pub(crate) mod stats;
mod table;
mod vm;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use vmfabric::client::Client;
use vmfabric::model::{ForwardSpec, PolicySpec, ReservationSpec};

use table::{client, print_table, report};

#[derive(Parser)]
#[command(
    name = "vmfabric",
    version,
    about = "Host-side network for micro-VMs and sandboxes",
    after_help = "Exit codes: 0 done; 1 failed; 2 bad usage or input; 3 not found; 4 conflicts with what exists; 5 the daemon cannot be reached."
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand)]
pub(crate) enum Command {
    /// Run the daemon: networks, gateways and ports from the state store, the API on a
    /// Unix socket. With an empty store it creates network `default` (10.77.0.0/24).
    Serve(Box<crate::serve::ServeArgs>),
    /// Networks: create, set, ls, show, rm.
    Network {
        #[command(subcommand)]
        cmd: NetworkCmd,
    },
    /// Ports of a network: add, ls, rm.
    Port {
        #[command(subcommand)]
        cmd: PortCmd,
    },
    /// VMs the daemon runs (the test guest image): run, ls, inspect, stop, restart, pause,
    /// resume, logs.
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
        /// The network.
        network: String,
        #[command(flatten)]
        c: ClientArgs,
    },
    /// Live capture of a network (NETWORK) or one port (NETWORK/PORT) as pcap, to stdout
    /// (pipe it into `tcpdump -r -` or `tshark -r -`) or to a file, until interrupted.
    Capture {
        /// NETWORK, or NETWORK/PORT.
        target: String,
        /// Write to this file instead of stdout.
        #[arg(short = 'w', long)]
        write: Option<PathBuf>,
        /// pcapng with one interface per port (NETWORK/PORT), so a whole network's
        /// capture shows which port each frame came in through.
        #[arg(long)]
        pcapng: bool,
        /// The daemon's API socket.
        #[arg(long, env = "VMFABRIC_SOCKET", default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Follow what happens, one line an event, until interrupted: ports up and down,
    /// leases bound, released and expired (DHCPv6 bindings made and ended), MAC moves,
    /// VM states, egress refusals
    /// (sampled). --json prints the stream's JSON lines.
    Events {
        #[command(flatten)]
        c: ClientArgs,
    },
    /// Counters of every network (or one), its ports and its gateway, as tables.
    Stats {
        /// Only this network.
        network: Option<String>,
        /// The Prometheus text of /metrics instead.
        #[arg(long, conflicts_with = "json")]
        prometheus: bool,
        #[command(flatten)]
        c: ClientArgs,
    },
    /// Boot the test guest (guest/build.sh) under QEMU on a port; its console goes to stdout.
    BootGuest(boot_guest::BootGuestArgs),
    /// Print shell completions (source them, or install them where the shell looks:
    /// the Debian package does).
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the man pages (vmfabric.1 and one per subcommand) into DIR.
    Man {
        /// Where the pages go (made if missing).
        dir: PathBuf,
    },
}

/// Input the CLI itself refuses (a flag's value it cannot read): exits 2, as a usage
/// error does.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct BadInput(pub(crate) String);

/// Marks `r`'s error as bad input.
pub(crate) fn bad_input<T>(r: Result<T>) -> Result<T> {
    r.map_err(|e| BadInput(format!("{e:#}")).into())
}

pub(crate) const DEFAULT_SOCKET: &str = "/run/vmfabric/vmfabric.sock";

#[derive(clap::Args)]
pub(crate) struct ClientArgs {
    /// The daemon's API socket.
    #[arg(long, env = "VMFABRIC_SOCKET", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Give up on a daemon that has not answered after this long (streams such as
    /// `events` and `capture` run until stopped).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = settings::parse_duration)]
    timeout: std::time::Duration,
}

#[derive(Subcommand)]
pub(crate) enum NetworkCmd {
    /// Create a network (with a gateway serving DHCP and DNS unless --no-gateway).
    Create {
        /// The network's name: up to 64 letters, digits, '.', '_' or '-'.
        name: String,
        /// Its IPv4 subnet, e.g. 10.80.0.0/24 (default: the first free private /24).
        #[arg(long)]
        subnet: Option<String>,
        /// The largest frame payload on it, 68 to 65520 (jumbo frames: 9000).
        #[arg(long, default_value_t = 1500)]
        mtu: u32,
        /// IPv6 beside IPv4: this /64 prefix, or without a value a unique local /64
        /// derived from the network's name. The gateway advertises it (SLAAC).
        #[arg(long, value_name = "PREFIX", num_args = 0..=1, default_missing_value = "auto")]
        ipv6: Option<String>,
        /// No gateway (DHCP, DNS) on this network.
        #[arg(long)]
        no_gateway: bool,
        /// Let guests reach the host's loopback at the subnet's last host address (and its
        /// [::1] at the IPv6 prefix's ::2).
        #[arg(long)]
        host_access: bool,
        /// Who carries the frames: vmfabric's switch, or a Linux bridge with TAP ports
        /// and nftables NAT (needs root).
        #[arg(long, value_enum, default_value = "userspace")]
        mode: vmfabric::model::NetworkMode,
        /// Kernel mode: ports reach the gateway and the router but not each other.
        #[arg(long)]
        isolated: bool,
        /// Kernel mode: the bridge's name (default: derived from the network's name).
        #[arg(long)]
        bridge: Option<String>,
        /// This host's network, or one every node of the cluster serves (the daemon
        /// must run with --cluster-endpoints).
        #[arg(long, value_enum, default_value = "host")]
        scope: vmfabric::model::Scope,
        /// A cluster network's VXLAN network identifier (default: derived from the name).
        #[arg(long, requires = "scope")]
        vni: Option<u32>,
        /// Create it even if the subnet overlaps a host route.
        #[arg(long)]
        force: bool,
        /// A network of that name already there is fine (exit 0, print it).
        #[arg(long)]
        exist_ok: bool,
        #[command(flatten)]
        settings: Box<settings::SettingsArgs>,
        #[command(flatten)]
        c: ClientArgs,
    },
    /// Change a network's gateway settings while it runs (leases, flows and forwards
    /// stay). A list flag given replaces that list; --reset puts a setting back to its
    /// default first.
    Set {
        /// The network.
        name: String,
        #[command(flatten)]
        settings: Box<settings::SettingsArgs>,
        #[command(flatten)]
        c: ClientArgs,
    },
    /// List the networks.
    Ls {
        #[command(flatten)]
        c: ClientArgs,
    },
    /// Show a network: what its gateway serves, its settings, ports, leases, traffic.
    Show {
        /// The network.
        name: String,
        #[command(flatten)]
        c: ClientArgs,
    },
    /// Remove a network (its leases, forwards and reservations go with it).
    Rm {
        /// The network.
        name: String,
        /// Also remove its ports.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        c: ClientArgs,
    },
}

#[derive(Subcommand)]
pub(crate) enum PortCmd {
    /// Add a port and print the VMM arguments for it.
    Add {
        /// The network.
        network: String,
        /// The port's name (a VM on it gets this DNS name unless its DHCP hostname says otherwise).
        name: String,
        /// How the VMM connects. On a kernel-mode network a TAP port is for QEMU, Cloud
        /// Hypervisor and Firecracker, which open it; on a userspace one the daemon holds
        /// it, so it attaches a host interface or namespace instead (needs CAP_NET_ADMIN).
        #[arg(long, value_enum, default_value = "unixgram")]
        kind: vmfabric::model::PortKind,
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
        /// A port of that name already there is fine (exit 0, print it).
        #[arg(long)]
        exist_ok: bool,
        /// Socketpair ports: the VMM to run with the VM end inherited; `{fd}` in its
        /// arguments becomes the fd number (QEMU: -netdev dgram,id=n0,local.type=fd,local.str={fd}).
        #[arg(last = true)]
        exec: Vec<String>,
        #[command(flatten)]
        c: ClientArgs,
    },
    /// List a network's ports (up: a VMM is attached).
    Ls {
        /// The network.
        network: String,
        #[command(flatten)]
        c: ClientArgs,
    },
    /// Remove a port: its lease and DNS name go at once.
    Rm {
        /// The network.
        network: String,
        /// The port.
        name: String,
        #[command(flatten)]
        c: ClientArgs,
    },
}

#[derive(Subcommand)]
pub(crate) enum VmCmd {
    /// Boot a VM on a new port of a network; it gets its address from the gateway.
    Run {
        #[command(flatten)]
        spec: Box<vm::VmRunArgs>,
        /// Wait until the VM is ready (or has ended) before returning.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        c: ClientArgs,
        /// Shell command the guest runs once its network is up; it powers off after.
        #[arg(last = true)]
        cmd: Vec<String>,
    },
    /// List the VMs and their states.
    Ls {
        #[command(flatten)]
        c: ClientArgs,
    },
    /// Stop a VM (ACPI powerdown, then SIGTERM, then SIGKILL) and free its port.
    Stop {
        /// The VM.
        name: String,
        #[command(flatten)]
        c: ClientArgs,
    },
    /// Pause a VM: its vCPUs stop (it answers nothing); its port and lease stay.
    Pause {
        /// The VM.
        name: String,
        #[command(flatten)]
        c: ClientArgs,
    },
    /// Let a paused VM run on, in the state it was paused in.
    Resume {
        /// The VM.
        name: String,
        #[command(flatten)]
        c: ClientArgs,
    },
    /// Print a VM's serial console so far.
    Logs {
        /// The VM.
        name: String,
        /// Keep printing what the console says until the VM ends.
        #[arg(short, long, conflicts_with = "json")]
        follow: bool,
        #[command(flatten)]
        c: ClientArgs,
    },
    /// Everything about a VM: settings, state, QEMU's run state, files, port, lease.
    Inspect {
        /// The VM.
        name: String,
        #[command(flatten)]
        c: ClientArgs,
    },
    /// Stop a VM and start it again with the same settings, on a fresh port.
    Restart {
        /// The VM.
        name: String,
        #[command(flatten)]
        c: ClientArgs,
    },
}

#[derive(Subcommand)]
pub(crate) enum ForwardCmd {
    /// Forward HOST (address:port; port 0 picks one) to GUEST (address:port), TCP or UDP.
    Add {
        /// The network.
        network: String,
        /// Where the host listens, ADDRESS:PORT.
        host: std::net::SocketAddr,
        /// The guest's ADDRESS:PORT (IPv4, or `[IPv6]:PORT` on the network's prefix).
        guest: std::net::SocketAddr,
        /// The protocol forwarded.
        #[arg(long, value_enum, default_value = "tcp")]
        proto: vmfabric::model::ForwardProto,
        #[command(flatten)]
        c: ClientArgs,
    },
    /// List a network's forwards (dangling: no guest at the address now).
    Ls {
        /// The network.
        network: String,
        #[command(flatten)]
        c: ClientArgs,
    },
    /// Remove the forwards from HOST (both protocols unless --proto names one).
    Rm {
        /// The network.
        network: String,
        /// The host ADDRESS:PORT the forward listens on.
        host: String,
        /// Only this protocol's forward.
        #[arg(long, value_enum)]
        proto: Option<vmfabric::model::ForwardProto>,
        #[command(flatten)]
        c: ClientArgs,
    },
}

#[derive(Subcommand)]
pub(crate) enum PolicyCmd {
    /// Print a network's egress policy (JSON).
    Show {
        /// The network.
        network: String,
        #[command(flatten)]
        c: ClientArgs,
    },
    /// Replace the policy with the JSON in FILE (`-` for stdin), e.g.
    /// {"default": "deny", "rules": [{"action": "allow", "dst": "10.0.0.0/8", "ports": "53", "proto": "udp"}]}
    Set {
        /// The network.
        network: String,
        /// The policy's JSON (`-`: stdin).
        file: PathBuf,
        #[command(flatten)]
        c: ClientArgs,
    },
}

#[derive(Subcommand)]
pub(crate) enum ReservationCmd {
    /// Reserve IP for KEY: a MAC address, or a VM's name (DHCP hostname or port name).
    Add {
        /// The network.
        network: String,
        /// A MAC address, or a VM's name.
        key: String,
        /// The address it always gets.
        ip: std::net::Ipv4Addr,
        /// On a network with IPv6: the address DHCPv6 gives it.
        #[arg(long)]
        ipv6: Option<std::net::Ipv6Addr>,
        #[command(flatten)]
        c: ClientArgs,
    },
    /// List a network's reservations.
    Ls {
        /// The network.
        network: String,
        #[command(flatten)]
        c: ClientArgs,
    },
    /// Remove a reservation (a lease it gave stays until it ends).
    Rm {
        /// The network.
        network: String,
        /// The MAC address or name it was made for.
        key: String,
        #[command(flatten)]
        c: ClientArgs,
    },
}

#[derive(Subcommand)]
pub(crate) enum LeaseCmd {
    /// List a network's leases: address, MAC, name, when each ends.
    Ls {
        /// The network.
        network: String,
        #[command(flatten)]
        c: ClientArgs,
    },
}

/// Runs a client command (anything but `serve` and `boot-guest`).
pub(crate) fn run(command: Command) -> Result<()> {
    match command {
        Command::Network { cmd } => network::run(cmd),
        Command::Port { cmd } => port::run(cmd),
        Command::Vm { cmd } => vm::run(cmd),
        Command::Forward { cmd } => {
            match cmd {
                ForwardCmd::Add {
                    network,
                    host,
                    guest,
                    proto,
                    c,
                } => {
                    let body = ForwardSpec { proto, host, guest };
                    let v = client(&c)?.add_forward(&network, &body)?;
                    print_table(&c, &v, &["proto", "host", "guest"]);
                }
                ForwardCmd::Ls { network, c } => {
                    let v = client(&c)?.forwards(&network)?;
                    print_table(&c, &v, &["proto", "host", "guest", "dangling"]);
                }
                ForwardCmd::Rm {
                    network,
                    host,
                    proto,
                    c,
                } => {
                    client(&c)?.remove_forward(&network, &host, proto)?;
                    report(
                        &c,
                        format!("removed the forward from {host} on {network}"),
                        serde_json::json!({"removed": "forward", "network": network, "host": host}),
                    );
                }
            }
            Ok(())
        }
        Command::Policy { cmd } => {
            let policy = match cmd {
                PolicyCmd::Show { network, c } => client(&c)?.policy(&network)?,
                PolicyCmd::Set { network, file, c } => {
                    let text = if file.as_os_str() == "-" {
                        std::io::read_to_string(std::io::stdin())?
                    } else {
                        std::fs::read_to_string(&file).with_context(|| format!("read {}", file.display()))?
                    };
                    let json: serde_json::Value = serde_json::from_str(&text).context("the policy file is not JSON")?;
                    let policy: PolicySpec = serde_json::from_value(json).context("the policy file is not a policy")?;
                    client(&c)?.set_policy(&network, &policy)?
                }
            };
            println!("{}", serde_json::to_string_pretty(&policy)?);
            Ok(())
        }
        Command::Reservation { cmd } => {
            match cmd {
                ReservationCmd::Add {
                    network,
                    key,
                    ip,
                    ipv6,
                    c,
                } => {
                    let body = ReservationSpec { key, ip, ipv6 };
                    let v = client(&c)?.add_reservation(&network, &body)?;
                    print_table(&c, &v, &["key", "ip", "ipv6"]);
                }
                ReservationCmd::Ls { network, c } => {
                    let v = client(&c)?.reservations(&network)?;
                    print_table(&c, &v, &["key", "ip", "ipv6"]);
                }
                ReservationCmd::Rm { network, key, c } => {
                    client(&c)?.remove_reservation(&network, &key)?;
                    report(
                        &c,
                        format!("removed the reservation of {key} on {network}"),
                        serde_json::json!({"removed": "reservation", "network": network, "key": key}),
                    );
                }
            }
            Ok(())
        }
        Command::Lease {
            cmd: LeaseCmd::Ls { network, c },
        } => {
            let v = client(&c)?.leases(&network)?;
            if c.json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let rows: Vec<serde_json::Value> = v
                    .iter()
                    .map(|l| {
                        serde_json::json!({
                            "ip": l.ip,
                            "ipv6": l.ipv6.map(|a| a.to_string()).unwrap_or_default(),
                            "mac": l.mac.to_string(),
                            "hostname": l.hostname,
                            "expires": format!("{} ({})", l.expires_at, table::relative(l.expires)),
                        })
                    })
                    .collect();
                let columns: &[&str] = if v.iter().any(|l| l.ipv6.is_some()) {
                    &["ip", "ipv6", "mac", "hostname", "expires"]
                } else {
                    &["ip", "mac", "hostname", "expires"]
                };
                print_table(&c, &rows, columns);
            }
            Ok(())
        }
        Command::Flows { network, c } => {
            let v = client(&c)?.flows(&network)?;
            if c.json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_table(&c, &v.tcp, &["guest", "peer", "direction", "state"]);
                println!();
                print_table(&c, &v.udp, &["guest", "dst"]);
            }
            Ok(())
        }
        Command::Capture {
            target,
            write,
            pcapng,
            socket,
        } => {
            let (network, port) = match target.split_once('/') {
                Some((net, port)) => (net, Some(port)),
                None => (target.as_str(), None),
            };
            let mut out: Box<dyn std::io::Write> = match &write {
                Some(f) => Box::new(std::fs::File::create(f).with_context(|| format!("create {}", f.display()))?),
                None => Box::new(std::io::stdout()),
            };
            Client::new(&socket)?.capture(network, port, pcapng, &mut *out)
        }
        Command::Stats { network, prometheus, c } => stats::run(network, prometheus, c),
        Command::Events { c } => events::run(c),
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "vmfabric", &mut std::io::stdout());
            Ok(())
        }
        Command::Man { dir } => {
            std::fs::create_dir_all(&dir)?;
            clap_mangen::generate_to(<Cli as clap::CommandFactory>::command(), &dir)
                .with_context(|| format!("write man pages into {}", dir.display()))?;
            Ok(())
        }
        Command::Serve(_) | Command::BootGuest(_) => unreachable!("run by main"),
    }
}

#[cfg(test)]
mod help_tests {
    /// Every command says what it does and every argument what it takes.
    #[test]
    fn every_command_and_argument_is_described() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            let path = format!("{path} {}", cmd.get_name());
            if cmd.get_about().is_none() {
                missing.push(format!("{path}: no description"));
            }
            for a in cmd.get_arguments().filter(|a| !a.is_hide_set()) {
                if a.get_help().is_none() {
                    missing.push(format!("{path} {}: no description", a.get_id()));
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &path, missing);
            }
        }
        let mut missing = Vec::new();
        walk(&<super::Cli as clap::CommandFactory>::command(), "", &mut missing);
        assert!(missing.is_empty(), "{}", missing.join("\n"));
    }
}
