//! `vmfabric boot-guest`: the test guest under QEMU on a port, its console on stdout.

use std::path::PathBuf;

use anyhow::Result;
use fabric::Mac;

#[derive(clap::Args)]
pub(crate) struct BootGuestArgs {
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
    /// The guest's DHCP hostname (its DNS name).
    #[arg(long, default_value = "guest")]
    hostname: String,
    /// Serve /www over HTTP on port 80 inside the guest.
    #[arg(long)]
    http: bool,
    /// Shell command the guest runs once its network is up; it powers off after.
    #[arg(long)]
    cmd: Option<String>,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 96)]
    memory_mib: u32,
}

pub(crate) fn run(args: BootGuestArgs) -> Result<()> {
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
    let mut q = vm::QemuConfig::new(kernel, Some(initrd), vm::Serial::Stdio);
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
