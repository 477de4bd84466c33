//! Userspace networks: ports are sockets and TAP devices the switch reads, locked from
//! birth to their MAC; forwards are the gateway's host listeners.

use std::path::{Path, PathBuf};

use fabric::{Mac, PortId};
use gateway::Gateway;

use super::env::{Env, ForwardUndo, NetParts, PortHandle};
use super::error::ControlError;
use super::locks::PortLocker;
use crate::model::{check_ifname, socket_path, ForwardProto, ForwardSpec, PortKind, PortSpec, SocketPlace, VmmLines};
use crate::store::PortRecord;

/// The MAC a new userspace port is locked to from birth: `mac` if given (unicast, not
/// another port's), else one derived from the names; with `learn_mac_once`, the lock
/// waits for the VMM's first frame (the derived MAC is still shown).
pub fn choose_mac(
    network: &str,
    name: &str,
    mac: Option<&str>,
    learn_mac_once: bool,
    taken: impl Fn(Mac) -> bool,
) -> Result<(Mac, bool), ControlError> {
    let mac = match mac {
        None => Mac::derived(&[network, name]),
        Some(_) if learn_mac_once => {
            return Err(ControlError::invalid(
                "mac and learn_mac_once exclude each other: give the MAC, or let the port learn it",
            ))
        }
        Some(text) => {
            let mac: Mac = text
                .parse()
                .map_err(|e| ControlError::invalid(format!("mac {text:?}: {e}")))?;
            if !mac.is_unicast() || mac == Mac([0; 6]) {
                return Err(ControlError::invalid(format!("mac {mac} is not a unicast address")));
            }
            if taken(mac) {
                return Err(ControlError::conflict(format!(
                    "mac {mac} belongs to another port on {network:?}"
                )));
            }
            mac
        }
    };
    Ok((mac, learn_mac_once))
}

pub fn check_port(spec: &PortSpec) -> Result<(), ControlError> {
    if !spec.tap_settings().is_default() {
        return Err(ControlError::invalid(
            "owner, multi_queue and vnet_hdr are for kernel-mode TAP ports (the switch opens userspace ones)",
        ));
    }
    if spec.kind == PortKind::Socketpair {
        return Err(ControlError::invalid(
            "a socketpair port hands its VM end over the API connection: POST /v1/networks/{name}/socketpairs \
             with `Upgrade: vmfabric-fd` (the CLI: vmfabric port add NET NAME --kind socketpair -- CMD {fd})",
        ));
    }
    Ok(())
}

/// Where a unixgram port's VMM binds its end (the path `qemu_args` prints).
pub fn guest_socket(run_dir: &Path, network: &str, port: &str) -> PathBuf {
    socket_path(run_dir, SocketPlace::Guest, &[network, port])
}

/// The socket path or interface name a new port gets (a socket path fits whatever
/// the names: see [`socket_path`]).
fn port_path(env: &Env, network: &str, spec: &PortSpec) -> Result<String, ControlError> {
    let socket = |place| socket_path(env.run_dir, place, &[network, &spec.name]);
    Ok(match spec.kind {
        PortKind::Unixgram => socket(SocketPlace::PortDatagram).display().to_string(),
        PortKind::Stream => socket(SocketPlace::PortStream).display().to_string(),
        PortKind::VhostUser => socket(SocketPlace::PortVhostUser).display().to_string(),
        PortKind::Tap => {
            let name = spec
                .ifname
                .clone()
                .unwrap_or_else(|| format!("vmf-{}", spec.name).chars().take(15).collect());
            check_ifname("interface", &name)?;
            // A device that exists belongs to someone else (the switch makes its TAPs
            // and they go with it): never attach to it.
            if Path::new("/sys/class/net").join(&name).exists() {
                return Err(ControlError::conflict(format!(
                    "interface {name:?} exists; a userspace TAP port makes its own device (pick another ifname)"
                )));
            }
            name
        }
        PortKind::Socketpair => "-".into(),
    })
}

pub fn add_port(
    env: &Env,
    net: &NetParts,
    locker: &mut PortLocker,
    spec: &PortSpec,
) -> Result<(PortRecord, PortHandle), ControlError> {
    let network = net.spec.name.as_str();
    let path = port_path(env, network, spec)?;
    let (mac, learn_mac_once) = choose_mac(network, &spec.name, spec.mac.as_deref(), spec.learn_mac_once, |m| {
        net.macs.contains(&m)
    })?;
    let rec = PortRecord {
        network: network.to_string(),
        name: spec.name.to_string(),
        kind: spec.kind,
        path,
        mac,
        learn_mac_once,
        tap: Default::default(),
    };
    let handle = restore_port(env, locker, &rec)?;
    Ok((rec, handle))
}

/// Makes the switch port for a record (new or stored) and locks it from birth.
pub fn restore_port(env: &Env, locker: &mut PortLocker, rec: &PortRecord) -> Result<PortHandle, ControlError> {
    let path = PathBuf::from(&rec.path);
    let id = match rec.kind {
        PortKind::Unixgram => env.switch.add_unixgram_port(&rec.network, &rec.name, &path)?,
        PortKind::Stream => env.switch.add_stream_port(&rec.network, &rec.name, &path)?,
        PortKind::VhostUser => env.switch.add_vhost_user_port(&rec.network, &rec.name, &path)?,
        PortKind::Tap => {
            let source = fabric::TapSource::Name(rec.path.clone());
            env.switch
                .add_tap_port(&rec.network, &rec.name, source)
                .map(|(id, _)| id)?
        }
        PortKind::Socketpair => return Err(ControlError::host("socketpair ports are not restored")),
    };
    if let Err(e) = lock_from_birth(locker, rec, id) {
        let _ = env.switch.remove_port(id);
        return Err(e);
    }
    Ok(PortHandle::Switch(id))
}

/// Locks a new userspace port to its MAC (or its first MAC) before any frame of its
/// passes, where the network's gateway locks ports.
pub fn lock_from_birth(locker: &mut PortLocker, rec: &PortRecord, id: PortId) -> Result<(), ControlError> {
    let mac = (!rec.learn_mac_once).then_some(rec.mac);
    locker.register_port(&rec.network, id, mac).map_err(|e| match e {
        fabric::FabricError::InvalidConfig(msg) => ControlError::Conflict(msg),
        e => e.into(),
    })
}

pub fn remove_port(env: &Env, locker: &mut PortLocker, rec: &PortRecord, id: PortId) -> Result<(), ControlError> {
    locker.forget_port(&rec.network, id);
    env.switch.remove_port(id)?;
    Ok(())
}

pub fn forwards(gw: &Gateway) -> Vec<ForwardSpec> {
    gw.forwards()
        .into_iter()
        .map(|f| ForwardSpec {
            proto: ForwardProto::from_gateway(f.protocol),
            host: f.host,
            guest: f.guest,
        })
        .collect()
}

pub fn add_forward(gw: &Gateway, f: ForwardSpec) -> Result<(ForwardSpec, ForwardUndo), ControlError> {
    let info = gw
        .add_forward(f.proto.to_gateway(), f.host, f.guest)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AddrInUse => ControlError::conflict(format!("{} is in use", f.host)),
            std::io::ErrorKind::InvalidInput => ControlError::invalid(e.to_string()),
            _ => ControlError::invalid(format!("cannot listen on {}: {e}", f.host)),
        })?;
    let started = ForwardSpec {
        proto: f.proto,
        host: info.host,
        guest: info.guest,
    };
    Ok((started, ForwardUndo::Gateway(info.id)))
}

/// Stops the gateway's forwards that `wanted` picks; returns how many.
pub fn remove_forwards(gw: &Gateway, wanted: &dyn Fn(&ForwardSpec) -> bool) -> usize {
    let found: Vec<u64> = gw
        .forwards()
        .into_iter()
        .filter(|f| {
            wanted(&ForwardSpec {
                proto: ForwardProto::from_gateway(f.protocol),
                host: f.host,
                guest: f.guest,
            })
        })
        .map(|f| f.id)
        .collect();
    for id in &found {
        gw.remove_forward(*id);
    }
    found.len()
}

/// The QEMU arguments that attach a VM to a port.
/// What each VMM is given for port `p` (`kernel`: on a kernel-mode network).
pub fn vmm_lines(p: &PortRecord, run_dir: &Path, kernel: bool) -> VmmLines {
    let qemu = |backend| vm::qemu::nic_args(&vm::Nic { backend, mac: p.mac });
    let (path, mac) = (&p.path, p.mac);
    match p.kind {
        PortKind::Unixgram => VmmLines {
            qemu: Some(qemu(vm::NicBackend::Unixgram {
                switch_path: PathBuf::from(path),
                guest_path: guest_socket(run_dir, &p.network, &p.name),
            })),
            vfkit: Some(format!("virtio-net,unixSocketPath={path},mac={mac}")),
            ..VmmLines::default()
        },
        PortKind::Stream => VmmLines {
            qemu: Some(qemu(vm::NicBackend::Stream {
                path: PathBuf::from(path),
            })),
            ..VmmLines::default()
        },
        PortKind::Socketpair => VmmLines {
            qemu: Some(qemu(vm::NicBackend::FdToBeGiven)),
            ..VmmLines::default()
        },
        // QEMU's guest memory must be shared (MEM in the line: the -m size, as 512M).
        PortKind::VhostUser => VmmLines {
            qemu: Some(qemu(vm::NicBackend::VhostUser {
                path: PathBuf::from(path),
                queues: 1,
            })),
            cloud_hypervisor: Some(format!("vhost_user=true,socket={path},mac={mac}")),
            note: Some(
                "the VMM shares the guest's memory with the switch: QEMU with a shared memory backend \
                 (as in its line), Cloud Hypervisor with --memory shared=on"
                    .into(),
            ),
            ..VmmLines::default()
        },
        // The bridge has the device; the VMM opens it by name.
        PortKind::Tap if kernel => VmmLines {
            qemu: Some(qemu(vm::NicBackend::Tap { ifname: path.clone() })),
            cloud_hypervisor: Some(format!("tap={path},mac={mac}")),
            firecracker: Some(
                serde_json::json!({"iface_id": "eth0", "host_dev_name": path, "guest_mac": mac.to_string()})
                    .to_string(),
            ),
            ..VmmLines::default()
        },
        // The daemon holds the device to read its frames: a VMM opening it would fail
        // (busy) or take frames from under it.
        PortKind::Tap => VmmLines {
            note: Some(format!(
                "the daemon holds TAP device {path}, so no VMM can open it: it attaches a host \
                 interface to the network (configure {path} on the host, or move it into a \
                 namespace: ip link set {path} netns NS). Firecracker and Cloud Hypervisor open \
                 TAP devices themselves: give them a port on a kernel-mode network \
                 (network create NAME --mode kernel), whose TAP devices the bridge holds."
            )),
            ..VmmLines::default()
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(kind: PortKind, path: &str) -> PortRecord {
        PortRecord {
            network: "n".into(),
            name: "p".into(),
            kind,
            path: path.into(),
            mac: "02:00:00:00:00:07".parse().unwrap(),
            learn_mac_once: false,
            tap: Default::default(),
        }
    }

    /// Each kind of port, on each kind of network, gets the lines that work and no
    /// others; the Cloud Hypervisor and Firecracker lines follow their documented
    /// syntax (`--net tap=<if>,mac=<mac>`; `network-interfaces` entries with
    /// `iface_id`, `host_dev_name`, `guest_mac`).
    #[test]
    fn each_port_gets_only_the_vmm_lines_that_work_for_it() {
        let run = Path::new("/run/vmfabric");
        let dgram = vmm_lines(&port(PortKind::Unixgram, "/run/vmfabric/ports/n/p.sock"), run, false);
        assert!(dgram.qemu.as_deref().unwrap().contains("-netdev dgram"), "{dgram:?}");
        assert_eq!(
            dgram.vfkit.as_deref(),
            Some("virtio-net,unixSocketPath=/run/vmfabric/ports/n/p.sock,mac=02:00:00:00:00:07")
        );
        assert!(dgram.cloud_hypervisor.is_none() && dgram.firecracker.is_none() && dgram.note.is_none());

        let stream = vmm_lines(&port(PortKind::Stream, "/run/vmfabric/ports/n/p.stream"), run, false);
        assert!(stream.qemu.as_deref().unwrap().contains("-netdev stream"), "{stream:?}");
        assert!(stream.vfkit.is_none() && stream.cloud_hypervisor.is_none());

        let held = vmm_lines(&port(PortKind::Tap, "vmft7"), run, false);
        assert_eq!(
            (&held.qemu, &held.cloud_hypervisor, &held.firecracker),
            (&None, &None, &None),
            "the daemon holds a userspace TAP: no VMM line can work"
        );
        let note = held.note.unwrap();
        assert!(
            note.contains("ip link set vmft7 netns") && note.contains("--mode kernel"),
            "{note}"
        );

        let bridged = vmm_lines(&port(PortKind::Tap, "vmft7"), run, true);
        assert!(bridged
            .qemu
            .as_deref()
            .unwrap()
            .contains("tap,id=net0,ifname=vmft7,script=no"));
        let ch = bridged.cloud_hypervisor.unwrap();
        let pairs: Vec<(&str, &str)> = ch.split(',').map(|kv| kv.split_once('=').unwrap()).collect();
        assert_eq!(pairs, [("tap", "vmft7"), ("mac", "02:00:00:00:00:07")]);
        let fc: serde_json::Value = serde_json::from_str(&bridged.firecracker.unwrap()).unwrap();
        assert_eq!(
            fc,
            serde_json::json!({"iface_id": "eth0", "host_dev_name": "vmft7", "guest_mac": "02:00:00:00:00:07"})
        );
        assert!(bridged.note.is_none());
    }
}
