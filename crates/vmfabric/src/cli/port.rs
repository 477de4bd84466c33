//! `vmfabric port`: add (a socket, TAP or socketpair port; with a command, the VMM is
//! run on a socketpair end), ls, rm.

use anyhow::{Context, Result};

use super::table::{cell, client, is_conflict, print_table, report};
use vmfabric::model::{Name, PortKind, PortSpec, SocketpairSpec};

use super::{bad_input, ClientArgs, PortCmd};

/// A short random suffix for unnamed VMs.
pub(super) fn rand_suffix() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() & 0xffffff)
        .unwrap_or(0)
        ^ std::process::id()
}

/// Creates a socketpair port and runs `exec` with its VM end inherited.
fn exec_with_socketpair(c: &ClientArgs, network: &str, spec: &SocketpairSpec, exec: &[String]) -> Result<()> {
    let name = &spec.name;
    anyhow::ensure!(
        !exec.is_empty(),
        "a socketpair port needs the VMM to hand its end to: vmfabric port add {network} {name} --kind socketpair -- CMD ... {{fd}} ..."
    );
    let (port, fd) = client(c)?.socketpair_port(network, spec)?;
    // The VMM inherits the fd: clear close-on-exec and keep it open across exec.
    rustix::io::fcntl_setfd(&fd, rustix::io::FdFlags::empty())?;
    let raw = std::os::fd::IntoRawFd::into_raw_fd(fd);
    let args: Vec<String> = exec.iter().map(|a| a.replace("{fd}", &raw.to_string())).collect();
    eprintln!(
        "port {network}/{name}: socketpair, MAC {}, VM end is fd {raw}",
        port.record.mac
    );
    let mut vmm = std::process::Command::new(&args[0]);
    vmm.args(&args[1..]);
    let err = std::os::unix::process::CommandExt::exec(&mut vmm);
    Err(anyhow::Error::new(err).context(format!("run {}", args[0])))
}

pub(super) fn run(cmd: PortCmd) -> Result<()> {
    match cmd {
        PortCmd::Add {
            network,
            name,
            kind: PortKind::Socketpair,
            exec,
            mac,
            learn_mac_once,
            c,
            ..
        } => {
            let spec = SocketpairSpec {
                name: Name::new("port", &name)?,
                mac,
                learn_mac_once,
            };
            exec_with_socketpair(&c, &network, &spec, &exec)?
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
            exist_ok,
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
            let body = PortSpec {
                ifname,
                owner_uid,
                owner_gid,
                multi_queue,
                vnet_hdr,
                mac,
                learn_mac_once,
                ..PortSpec::new(bad_input(Name::new("port", &name).map_err(Into::into))?, kind)
            };
            let client = client(&c)?;
            let port = match client.add_port(&network, &body) {
                Err(e) if exist_ok && is_conflict(&e) => {
                    match client.ports(&network)?.into_iter().find(|p| p.record.name == name) {
                        Some(p) => p,
                        None => return Err(e),
                    }
                }
                other => other?,
            };
            let v = serde_json::to_value(&port)?;
            if c.json {
                print_table(&c, &v, &[]);
            } else {
                println!(
                    "port {network}/{name}: {} at {} (MAC {})",
                    cell(&v["kind"]),
                    cell(&v["path"]),
                    cell(&v["mac"])
                );
                let vmm = &port.vmm;
                if let Some(q) = &vmm.qemu {
                    println!("  qemu-system-x86_64 ... {q}");
                }
                if let Some(d) = &vmm.vfkit {
                    println!("  vfkit ... --device {d}");
                }
                if let Some(n) = &vmm.cloud_hypervisor {
                    println!("  cloud-hypervisor ... --net {n}");
                }
                if let Some(f) = &vmm.firecracker {
                    println!("  firecracker: \"network-interfaces\": [{f}]");
                }
                if let Some(note) = &vmm.note {
                    println!("  {note}");
                }
            }
        }
        PortCmd::Ls { network, c } => {
            let v = client(&c)?.ports(&network)?;
            print_table(&c, &v, &["name", "kind", "up", "mac", "path"]);
        }
        PortCmd::Rm { network, name, c } => {
            client(&c)?.remove_port(&network, &name)?;
            report(
                &c,
                format!("removed port {network}/{name}"),
                serde_json::json!({"removed": "port", "network": network, "name": name}),
            );
        }
    }
    Ok(())
}
