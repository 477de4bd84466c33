//! `vmfabric vm`: run, ls, stop, restart, pause, resume, logs.

use std::path::PathBuf;

use anyhow::{Context, Result};

use super::table::{client, print_one, print_table};
use std::time::Duration;

use vmfabric::control::vms::{CloudInitData, VmRequest};

use super::port::rand_suffix;
use super::{bad_input, VmCmd};

/// What `vm run` makes a VM of.
#[derive(clap::Args, Debug)]
pub(crate) struct VmRunArgs {
    /// A network to attach it to; repeat for a NIC on each (the first is its own).
    #[arg(long = "net", required = true)]
    networks: Vec<String>,
    /// The network whose lease makes it Ready (default: the first).
    #[arg(long = "ready-net")]
    ready_network: Option<String>,
    /// Its name (and its port's and DNS name); default: vm-<random>.
    #[arg(long)]
    name: Option<String>,
    /// Serve /www over HTTP on port 80 in the guest (the test guest).
    #[arg(long)]
    http: bool,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 96)]
    memory_mib: u32,
    /// vCPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    /// The kernel to boot (default: the daemon's guest image's).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Its initramfs (default: the guest image's, unless --kernel or --root-disk).
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// A kernel command-line word (repeatable).
    #[arg(long = "append", value_name = "WORD")]
    append: Vec<String>,
    /// The root filesystem's disk, /dev/vda: PATH[:rw|:ro|:overlay], default overlay
    /// (the image is never written, so many VMs can share it).
    #[arg(long, value_name = "PATH[:MODE]", value_parser = |s: &str| ::vm::Disk::parse(s, ::vm::DiskMode::Overlay))]
    root_disk: Option<::vm::Disk>,
    /// A data disk, /dev/vdb on: PATH[:rw|:ro|:overlay], default rw (repeatable).
    #[arg(long = "disk", value_name = "PATH[:MODE]", value_parser = |s: &str| ::vm::Disk::parse(s, ::vm::DiskMode::Rw))]
    disks: Vec<::vm::Disk>,
    /// Share a host directory, mounted in the guest by TAG (virtio-fs where the host
    /// has virtiofsd, else virtio-9p): HOST:TAG[:ro] (repeatable).
    #[arg(long = "share", value_name = "HOST:TAG[:ro]", value_parser = ::vm::Share::parse)]
    shares: Vec<::vm::Share>,
    /// Give it a vsock device with a CID the daemon picks.
    #[arg(long)]
    vsock: bool,
    /// ... or with this CID.
    #[arg(long, value_name = "CID")]
    vsock_cid: Option<u32>,
    /// cloud-init user-data (a #cloud-config file); the VM gets a NoCloud seed.
    #[arg(long = "cloud-init", value_name = "USER_DATA")]
    cloud_init: Option<PathBuf>,
    /// cloud-init network config (a YAML file) for the seed.
    #[arg(long, value_name = "FILE")]
    network_config: Option<PathBuf>,
    /// systemd's machine id (32 hex digits; default: derived from the name).
    #[arg(long)]
    machine_id: Option<String>,
    /// Attach its NICs as vhost-user ports (frames through the guest's shared memory).
    #[arg(long)]
    vhost_user: bool,
}

impl VmRunArgs {
    /// The API request; paths are made absolute here, where they were meant, and the
    /// cloud-init files are read here, where they are.
    fn request(self: Box<Self>, cmd: Option<String>) -> Result<VmRequest> {
        let abs = |p: PathBuf| std::path::absolute(&p).with_context(|| format!("{}", p.display()));
        let read = |p: Option<PathBuf>| {
            p.map(|p| std::fs::read_to_string(&p).with_context(|| format!("read {}", p.display())))
                .transpose()
        };
        let mut networks = self.networks.into_iter();
        let network = networks.next().expect("clap requires one --net");
        let user_data = read(self.cloud_init)?;
        let network_config = read(self.network_config)?;
        let cloud_init = (user_data.is_some() || network_config.is_some()).then_some(CloudInitData {
            user_data,
            network_config,
        });
        let disk = |d: ::vm::Disk| -> Result<::vm::Disk> {
            Ok(::vm::Disk {
                path: abs(d.path)?,
                ..d
            })
        };
        Ok(VmRequest {
            extra_networks: networks.collect(),
            ready_network: self.ready_network,
            cmd,
            http: self.http,
            memory_mib: self.memory_mib,
            cpus: self.cpus,
            kernel: self.kernel.map(abs).transpose()?,
            initrd: self.initrd.map(abs).transpose()?,
            append: self.append,
            root_disk: self.root_disk.map(disk).transpose()?,
            disks: self.disks.into_iter().map(disk).collect::<Result<_>>()?,
            shares: self
                .shares
                .into_iter()
                .map(|s| {
                    Ok(::vm::Share {
                        host: abs(s.host)?,
                        ..s
                    })
                })
                .collect::<Result<_>>()?,
            vsock: self.vsock,
            vsock_cid: self.vsock_cid,
            cloud_init,
            machine_id: self.machine_id,
            vhost_user: self.vhost_user,
            ..VmRequest::new(
                &self.name.unwrap_or_else(|| format!("vm-{:06x}", rand_suffix())),
                &network,
            )
        })
    }
}

pub(super) fn run(cmd: VmCmd) -> Result<()> {
    const COLUMNS: &[&str] = &["name", "network", "state", "ip", "pid", "mac"];
    match cmd {
        VmCmd::Run { spec, wait, c, cmd } => {
            let command = (!cmd.is_empty()).then(|| cmd.join(" "));
            let body = bad_input(spec.request(command))?;
            let name = body.name.clone();
            let api = client(&c)?;
            let mut v = api.run_vm(&body)?;
            let deadline = std::time::Instant::now() + Duration::from_secs(180);
            while wait && matches!(v.state.as_str(), "starting" | "running") && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(200));
                v = api.vm(&name)?;
            }
            print_table(&c, &v, COLUMNS);
            if let Some(reason) = &v.reason {
                eprintln!("{reason}");
            }
        }
        VmCmd::Ls { c } => print_table(&c, &client(&c)?.vms()?, COLUMNS),
        VmCmd::Stop { name, c } => print_table(&c, &client(&c)?.stop_vm(&name)?, COLUMNS),
        VmCmd::Pause { name, c } => print_table(&c, &client(&c)?.pause_vm(&name, true)?, COLUMNS),
        VmCmd::Resume { name, c } => print_table(&c, &client(&c)?.pause_vm(&name, false)?, COLUMNS),
        VmCmd::Logs { name, follow, c } => {
            let api = client(&c)?;
            let logs = api.vm_logs(&name)?;
            if c.json {
                println!("{}", serde_json::json!({"name": name, "logs": logs}));
            } else {
                print!("{logs}");
            }
            if follow {
                follow_logs(&api, &name, logs.len())?;
            }
        }
        VmCmd::Inspect { name, c } => print_one(&c, &client(&c)?.inspect_vm(&name)?, describe)?,
        VmCmd::Restart { name, c } => {
            let api = client(&c)?;
            let v = api.restart_vm(&name)?;
            print_table(&c, &v, COLUMNS);
        }
    }
    Ok(())
}

/// Prints what the console adds after `seen` bytes, until the VM has ended (and its
/// last lines are out) or is gone.
fn follow_logs(api: &vmfabric::client::Client, name: &str, mut seen: usize) -> Result<()> {
    use std::io::Write;
    loop {
        let ended = match api.vm(name) {
            Ok(v) => matches!(v.state.as_str(), "stopped" | "failed"),
            Err(_) => true,
        };
        if let Ok(logs) = api.vm_logs(name) {
            // (A character cut in two last time may read differently now: then skip.)
            if let Some(new) = logs.get(seen..).filter(|n| !n.is_empty()) {
                print!("{new}");
                std::io::stdout().flush()?;
            }
            seen = seen.max(logs.len());
        }
        if ended {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// A VM, one fact a line, for `vm inspect`.
fn describe(v: &vmfabric::control::vms::VmInspect) -> String {
    let vm = &v.vm;
    let r = &v.request;
    let or_dash = |o: Option<String>| o.unwrap_or_else(|| "-".into());
    let mut lines = vec![
        ("name", vm.name.clone()),
        ("network", vm.network.clone()),
        ("state", vm.state.clone()),
        ("qemu says", or_dash(v.qmp_status.clone())),
        ("address", or_dash(vm.ip.map(|i| i.to_string()))),
        ("mac", vm.mac.to_string()),
        ("pid", or_dash(vm.pid.map(|p| p.to_string()))),
        ("memory", format!("{} MiB, {} vCPU", r.memory_mib, r.cpus)),
        ("command", or_dash(r.cmd.clone())),
        ("http", r.http.to_string()),
    ];
    if let Some(p) = &v.port_view {
        let up = if p.up { "up" } else { "down" };
        lines.push((
            "port",
            format!("{} ({:?}, {up}) at {}", p.record.name, p.record.kind, p.record.path),
        ));
    }
    if let Some(l) = &v.lease {
        lines.push(("lease", format!("{} until {}", l.ip, l.expires_at)));
    }
    if let Some(reason) = &vm.reason {
        lines.push(("reason", reason.clone()));
    }
    lines.push(("console", v.console.clone()));
    lines.push(("qemu log", v.qemu_log.clone()));
    lines
        .iter()
        .map(|(k, val)| format!("{:<10} {val}\n", format!("{k}:")))
        .collect()
}
