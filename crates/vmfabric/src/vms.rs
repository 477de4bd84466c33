//! VMs the daemon runs: each on a unixgram port of its network, named after the VM,
//! with the test guest image, supervised by a thread that keeps their state current.
//!
//! A VM is Ready when its console shows this boot's readiness marker with the address
//! the network's gateway leased to its MAC. When a VM ends (stopped, powered off, or its
//! VMM died) its port is removed. VMs live as long as the daemon: they are its child
//! processes and are stopped with it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use base64::Engine;
use fabric::Mac;
use serde::{Deserialize, Serialize};
use vm::{Nic, NicBackend, QemuVm, VmConfig, VmState};

use crate::daemon::{ApiError, Daemon, PortRequest};
use crate::store::PortKind;

/// A VM to run.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VmRequest {
    pub name: String,
    pub network: String,
    /// Shell command the guest runs once its network is up; it powers off after.
    /// Without one it stays up.
    #[serde(default)]
    pub cmd: Option<String>,
    /// Serve /www over HTTP on port 80 in the guest.
    #[serde(default)]
    pub http: bool,
    #[serde(default = "default_memory")]
    pub memory_mib: u32,
    #[serde(default = "one")]
    pub cpus: u32,
}

fn default_memory() -> u32 {
    96
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmView {
    pub name: String,
    pub network: String,
    /// starting, running, ready, stopped or failed.
    pub state: String,
    pub ip: Option<std::net::Ipv4Addr>,
    pub reason: Option<String>,
    pub pid: Option<u32>,
    pub port: String,
    #[serde(with = "crate::store::mac_text")]
    pub mac: Mac,
}

struct Entry {
    vm: QemuVm,
    req: VmRequest,
    mac: Mac,
    console: PathBuf,
    port_removed: bool,
}

pub struct Vms {
    guest_dir: Option<PathBuf>,
    dir: PathBuf,
    entries: Mutex<HashMap<String, Entry>>,
}

fn view(e: &Entry) -> VmView {
    let (state, ip, reason) = match e.vm.state() {
        VmState::Starting => ("starting", None, None),
        VmState::Running => ("running", None, None),
        VmState::Ready { ip } => ("ready", Some(*ip), None),
        VmState::Stopped => ("stopped", None, None),
        VmState::Failed { reason } => ("failed", None, Some(reason.clone())),
    };
    VmView {
        name: e.req.name.clone(),
        network: e.req.network.clone(),
        state: state.into(),
        ip,
        reason,
        pid: e.vm.process().map(|p| p.pid),
        port: e.req.name.clone(),
        mac: e.mac,
    }
}

impl Vms {
    pub fn new(guest_dir: Option<PathBuf>, dir: PathBuf) -> Arc<Vms> {
        Arc::new(Vms {
            guest_dir,
            dir,
            entries: Mutex::new(HashMap::new()),
        })
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts the supervisor: every quarter second, brings each VM's state up to date
    /// and frees the port of a VM that ended.
    pub fn supervise(self: &Arc<Self>, daemon: Weak<Daemon>) {
        let vms = Arc::downgrade(self);
        let _ = std::thread::Builder::new()
            .name("vm-supervisor".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_millis(250));
                let (Some(vms), Some(daemon)) = (vms.upgrade(), daemon.upgrade()) else {
                    return;
                };
                vms.refresh(&daemon);
            });
    }

    fn refresh(&self, daemon: &Daemon) {
        let mut ended = Vec::new();
        for e in self.entries().values_mut() {
            let leased = daemon
                .leases(&e.req.network)
                .ok()
                .and_then(|ls| ls.into_iter().find(|l| l.mac == e.mac))
                .map(|l| l.ip);
            let state = e.vm.poll(leased);
            if matches!(state, VmState::Stopped | VmState::Failed { .. }) && !e.port_removed {
                e.port_removed = true;
                ended.push((e.req.network.clone(), e.req.name.clone()));
            }
        }
        for (network, port) in ended {
            let _ = daemon.remove_port(&network, &port);
        }
    }

    pub fn run(&self, daemon: &Daemon, req: VmRequest) -> Result<VmView, ApiError> {
        let guest = self.guest_dir.clone().ok_or_else(|| {
            ApiError::BadRequest(
                "this daemon has no guest image: start it with --guest-dir (guest/build.sh DIR)".into(),
            )
        })?;
        if self
            .entries()
            .get(&req.name)
            .is_some_and(|e| !matches!(e.vm.state(), VmState::Stopped | VmState::Failed { .. }))
        {
            return Err(ApiError::Conflict(format!("VM {:?} is running", req.name)));
        }
        let port = daemon.add_port(
            &req.network,
            PortRequest {
                name: req.name.clone(),
                kind: PortKind::Unixgram,
                ifname: None,
            },
        )?;
        std::fs::create_dir_all(&self.dir).map_err(|e| ApiError::Internal(e.to_string()))?;
        let console = self.dir.join(format!("{}.console", req.name));
        let mut cmdline = vec![format!("VMF_HOSTNAME={}", req.name), "VMF_IP=dhcp".to_string()];
        if req.http {
            cmdline.push("VMF_HTTP=1".into());
        }
        match &req.cmd {
            Some(cmd) => cmdline.push(format!(
                "VMF_CMD={}",
                base64::engine::general_purpose::STANDARD.encode(cmd)
            )),
            None => cmdline.push("VMF_END=hang".into()),
        }
        let config = VmConfig {
            name: req.name.clone(),
            namespace: req.network.clone(),
            kernel: guest.join("vmlinuz"),
            initramfs: guest.join("initramfs.cpio.gz"),
            root_disk: None,
            cpus: req.cpus,
            memory_mib: req.memory_mib,
            attachments: vec![Nic {
                backend: NicBackend::Unixgram {
                    switch_path: port.record.path.clone().into(),
                    guest_path: self.dir.join(format!("{}.nic.sock", req.name)),
                },
                mac: port.record.mac,
            }],
            serial_log: console.clone(),
            cmdline,
            netns: None,
        };
        let vm = match QemuVm::start(&config, &self.dir) {
            Ok(vm) => vm,
            Err(e) => {
                let _ = daemon.remove_port(&req.network, &req.name);
                return Err(match e {
                    vm::driver::DriverError::Config(c) => ApiError::BadRequest(c.to_string()),
                    other => ApiError::Internal(other.to_string()),
                });
            }
        };
        let entry = Entry {
            vm,
            mac: port.record.mac,
            req: req.clone(),
            console,
            port_removed: false,
        };
        let v = view(&entry);
        self.entries().insert(req.name.clone(), entry);
        Ok(v)
    }

    pub fn list(&self) -> Vec<VmView> {
        let mut v: Vec<VmView> = self.entries().values().map(view).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    pub fn get(&self, name: &str) -> Result<VmView, ApiError> {
        self.entries()
            .get(name)
            .map(view)
            .ok_or_else(|| ApiError::NotFound(format!("no VM named {name:?}")))
    }

    /// Stops a VM (powerdown, then SIGTERM, then SIGKILL) and forgets it.
    pub fn stop(&self, daemon: &Daemon, name: &str) -> Result<VmView, ApiError> {
        let mut e = self
            .entries()
            .remove(name)
            .ok_or_else(|| ApiError::NotFound(format!("no VM named {name:?}")))?;
        e.vm.stop(Duration::from_secs(3));
        if !e.port_removed {
            let _ = daemon.remove_port(&e.req.network, &e.req.name);
        }
        Ok(view(&e))
    }

    pub fn logs(&self, name: &str) -> Result<String, ApiError> {
        let path = self
            .entries()
            .get(name)
            .map(|e| e.console.clone())
            .ok_or_else(|| ApiError::NotFound(format!("no VM named {name:?}")))?;
        Ok(std::fs::read(&path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default())
    }

    /// Stops every VM (daemon shutdown).
    pub fn stop_all(&self, daemon: &Daemon) {
        let names: Vec<String> = self.entries().keys().cloned().collect();
        for n in names {
            let _ = self.stop(daemon, &n);
        }
    }
}
