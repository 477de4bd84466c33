//! The gateways' runtime, and what its threads may do.
//!
//! Gateway tasks parse every frame a guest sends to its gateway (DHCP, DNS, the NAT
//! stacks), so they run on threads of their own that hold the least the daemon can
//! give them: of root's capabilities only `CAP_NET_RAW` (ICMP NAT opens raw sockets
//! where the host's `ping_group_range` allows no ping sockets), `no_new_privs`, and
//! where the kernel has Landlock, files only under the state directory (the lease
//! store) and, to read, `/etc` (resolv.conf, which the host may replace at any time),
//! `/proc` and `/sys` (the allocator and the runtime read a few of their files). A
//! seccomp filter refuses them what no gateway does: sockets other than IPv4/IPv6
//! (Landlock does not stop a connect to a path-named Unix socket, and the API's is
//! one), exec, tracing other processes, mounts, namespaces, modules, BPF and keys.
//! Capabilities are per thread in Linux, so the control plane and the API, which make
//! TAP devices, bridges and nftables rules, keep theirs; forward listeners are bound
//! by the control plane and handed to the gateway. The switch thread confines itself
//! further (`fabric::sys::seccomp`: no capabilities and a system-call allowlist).

use std::path::Path;

use landlock::{path_beneath_rules, Access, AccessFs, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus, ABI};
use rustix::thread::{CapabilitySet, CapabilitySets};

/// The capabilities a gateway thread keeps.
pub const GATEWAY_CAPABILITIES: CapabilitySet = CapabilitySet::NET_RAW;

/// The gateways' runtime; its threads are confined when the daemon is sandboxed.
pub struct GatewayRuntime {
    rt: Option<tokio::runtime::Runtime>,
}

impl GatewayRuntime {
    /// `state_dir` is the one directory the gateways may write (their lease store).
    pub fn start(sandbox: bool, state_dir: &Path) -> std::io::Result<GatewayRuntime> {
        let state_dir = state_dir.to_path_buf();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("vmf-gateway")
            .enable_all()
            .on_thread_start(move || {
                if sandbox {
                    if let Err(e) = confine_gateway_thread(&state_dir) {
                        tracing::warn!("a gateway thread keeps the daemon's privileges: {e}");
                    }
                }
            })
            .build()?;
        Ok(GatewayRuntime { rt: Some(rt) })
    }

    pub fn handle(&self) -> &tokio::runtime::Handle {
        self.rt.as_ref().expect("the runtime lives until drop").handle()
    }
}

impl Drop for GatewayRuntime {
    fn drop(&mut self) {
        // Without waiting: the last owner may be an async task, where a runtime must
        // not block to shut down.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// Gives the calling thread `no_new_privs`, only [`GATEWAY_CAPABILITIES`], and (with
/// Landlock) files only where [`confine_files`] says.
fn confine_gateway_thread(state_dir: &Path) -> Result<(), String> {
    rustix::thread::set_no_new_privs(true).map_err(|e| format!("no_new_privs: {e}"))?;
    let keep = GATEWAY_CAPABILITIES;
    rustix::thread::set_capabilities(
        None,
        CapabilitySets {
            effective: keep,
            permitted: keep,
            inheritable: CapabilitySet::empty(),
        },
    )
    .map_err(|e| format!("capabilities: {e}"))?;
    refuse_calls().map_err(|e| format!("seccomp: {e}"))?;
    match confine_files(state_dir) {
        Ok(RulesetStatus::NotEnforced) => {
            tracing::debug!("no Landlock in this kernel: gateway threads' file access is not confined");
            Ok(())
        }
        Ok(_) => Ok(()),
        Err(e) => Err(format!("Landlock: {e}")),
    }
}

/// The directories a gateway thread may use: all of `state_dir`, and to read, the
/// [`READABLE`] ones. Everything else (the host's other files, the run directory and
/// its sockets' directory entries) is refused with EACCES.
fn confine_files(state_dir: &Path) -> Result<RulesetStatus, landlock::RulesetError> {
    // The newest ABI this code was tested with; older kernels enforce what they know.
    let abi = ABI::V5;
    let status = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))?
        .create()?
        .add_rules(path_beneath_rules([state_dir], AccessFs::from_all(abi)))?
        .add_rules(path_beneath_rules(READABLE, AccessFs::from_read(abi)))?
        .restrict_self()?;
    Ok(status.ruleset)
}

/// Installs the gateway threads' seccomp filter: everything passes but the calls no
/// gateway makes, which fail with EACCES (not a kill: a refused call costs one task,
/// not every network's gateway).
fn refuse_calls() -> Result<(), seccompiler::Error> {
    use seccompiler::{
        SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule, TargetArch,
    };
    let not_domain = |domain: i32| SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Ne, domain as u64);
    let socket = SeccompRule::new(vec![not_domain(libc::AF_INET)?, not_domain(libc::AF_INET6)?])?;
    let mut rules: std::collections::BTreeMap<i64, Vec<SeccompRule>> =
        REFUSED.iter().map(|nr| (*nr, Vec::new())).collect();
    rules.insert(libc::SYS_socket, vec![socket]);
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EACCES as u32),
        TargetArch::try_from(std::env::consts::ARCH)?,
    )?;
    let program: seccompiler::BpfProgram = filter.try_into()?;
    seccompiler::apply_filter(&program)
}

/// Calls a gateway never makes, refused whatever their arguments.
const REFUSED: &[libc::c_long] = &[
    libc::SYS_socketpair,
    libc::SYS_execve,
    libc::SYS_execveat,
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_kexec_load,
    libc::SYS_bpf,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
];

/// What a gateway thread may read besides its state directory.
const READABLE: [&str; 3] = ["/etc", "/proc", "/sys"];

#[cfg(test)]
mod tests {
    use super::*;

    /// What a task on a confined gateway thread sees: its capabilities, a file outside
    /// what it may read, and a file it writes in the state directory.
    #[test]
    fn a_gateway_thread_keeps_net_raw_its_state_directory_and_inet_sockets_only() {
        if !rustix::process::geteuid().is_root() {
            println!("SKIP: needs root (capabilities to drop)");
            return;
        }
        let dir = std::env::temp_dir().join(format!("vmf-sandbox-{}", std::process::id()));
        let state = dir.join("state");
        std::fs::create_dir_all(&state).unwrap();
        let secret = dir.join("outside");
        std::fs::write(&secret, "not for guests").unwrap();
        let gateways = GatewayRuntime::start(true, &state).unwrap();
        // The API's socket stands for any path-named Unix socket of the host.
        let api = dir.join("api.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&api).unwrap();
        let (status, outside, inside, etc, unix, udp) = gateways
            .handle()
            .block_on(gateways.handle().spawn({
                let (secret, state, api) = (secret.clone(), state.clone(), api.clone());
                async move {
                    let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
                    let outside = std::fs::read(&secret).map_err(|e| e.kind());
                    let inside = std::fs::write(state.join("probe"), "lease").map_err(|e| e.kind());
                    let etc = std::fs::metadata("/etc/hostname").map(|_| ());
                    let unix = std::os::unix::net::UnixStream::connect(&api)
                        .map(drop)
                        .map_err(|e| e.kind());
                    let udp = std::net::UdpSocket::bind("127.0.0.1:0").map(|_| ());
                    (
                        status,
                        outside,
                        inside,
                        etc.map_err(|e| e.kind()),
                        unix,
                        udp.map_err(|e| e.kind()),
                    )
                }
            }))
            .unwrap();
        let caps = status.lines().find_map(|l| l.strip_prefix("CapEff:")).unwrap().trim();
        assert_eq!(caps, format!("{:016x}", GATEWAY_CAPABILITIES.bits()));
        assert_eq!(outside, Err(std::io::ErrorKind::PermissionDenied), "read outside");
        assert_eq!(inside, Ok(()), "write in the state directory");
        assert_eq!(etc, Ok(()), "/etc is readable");
        assert_eq!(unix, Err(std::io::ErrorKind::PermissionDenied), "no Unix socket");
        assert_eq!(udp, Ok(()), "IPv4 sockets as NAT makes them");
        // A thread of the test, unconfined, still reads the file.
        assert!(std::fs::read(&secret).is_ok());
        drop(gateways);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
