//! The gateways' runtime, and what its threads may do.
//!
//! Gateway tasks parse every frame a guest sends to its gateway (DHCP, DNS, the NAT
//! stacks), so they run on threads of their own that hold the least the daemon can
//! give them: of root's capabilities only `CAP_NET_RAW` (ICMP NAT opens raw sockets
//! where the host's `ping_group_range` allows no ping sockets), `no_new_privs`, and
//! where the kernel has Landlock, files only under the state directory (the lease
//! store) and, to read, `/etc` (resolv.conf, which the host may replace at any time),
//! `/proc` and `/sys` (the allocator and the runtime read a few of their files), and a
//! system-call allowlist (`calls.rs`). Capabilities are per thread in Linux, so the
//! control plane and the API, which make TAP devices, bridges and nftables rules, keep theirs; forward listeners are bound
//! by the control plane and handed to the gateway. The switch thread confines itself
//! further (`fabric::sys::seccomp`: no capabilities and a system-call allowlist).

use std::path::Path;

mod calls;

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
        let mode = calls::SeccompMode::from_env().map_err(std::io::Error::other)?;
        if sandbox && mode != calls::SeccompMode::Refuse {
            tracing::info!("gateway threads' calls outside their allowlist: {mode:?}");
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("vmf-gateway")
            .enable_all()
            .on_thread_start(move || {
                // A thread started by a confined one is confined already.
                if sandbox && !calls::already_confined() {
                    if let Err(e) = confine_gateway_thread(&state_dir, mode) {
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

/// Gives the calling thread `no_new_privs`, only [`GATEWAY_CAPABILITIES`], (with
/// Landlock) files only where [`confine_files`] says, and the calls of
/// [`calls::confine_calls`].
fn confine_gateway_thread(state_dir: &Path, mode: calls::SeccompMode) -> Result<(), String> {
    rustix::thread::set_no_new_privs(true).map_err(|e| format!("no_new_privs: {e}"))?;
    // What the thread has of them: an unprivileged daemon has none to keep, and
    // asking for more than it has would fail (and leave the thread unconfined).
    let held = rustix::thread::capabilities(None)
        .map(|c| c.permitted)
        .map_err(|e| format!("capabilities: {e}"))?;
    let keep = GATEWAY_CAPABILITIES & held;
    rustix::thread::set_capabilities(
        None,
        CapabilitySets {
            effective: keep,
            permitted: keep,
            inheritable: CapabilitySet::empty(),
        },
    )
    .map_err(|e| format!("capabilities: {e}"))?;
    match confine_files(state_dir) {
        Ok(RulesetStatus::NotEnforced) => {
            tracing::debug!("no Landlock in this kernel: gateway threads' file access is not confined")
        }
        Ok(_) => {}
        Err(e) => return Err(format!("Landlock: {e}")),
    }
    // Last: the allowlist has no room for the calls that set up the rest.
    calls::confine_calls(mode).map_err(|e| format!("seccomp: {e}"))
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

    /// A thread a gateway task starts (the C library's `clone3` is refused, so it
    /// falls back to `clone`) runs, and inherits the confinement.
    #[test]
    fn threads_started_by_a_gateway_thread_start_and_are_confined() {
        if !rustix::process::geteuid().is_root() {
            println!("SKIP: needs root (capabilities to drop)");
            return;
        }
        let state = std::env::temp_dir().join(format!("vmf-sandbox-threads-{}", std::process::id()));
        std::fs::create_dir_all(&state).unwrap();
        let gateways = GatewayRuntime::start(true, &state).unwrap();
        let status = gateways
            .handle()
            .block_on(gateways.handle().spawn(async {
                std::thread::spawn(|| std::fs::read_to_string("/proc/thread-self/status").unwrap())
                    .join()
                    .unwrap()
            }))
            .unwrap();
        assert!(
            status.lines().any(|l| l.split_whitespace().eq(["Seccomp:", "2"])),
            "{status}"
        );
        let caps = status.lines().find_map(|l| l.strip_prefix("CapEff:")).unwrap().trim();
        assert_eq!(caps, format!("{:016x}", GATEWAY_CAPABILITIES.bits()));
        drop(gateways);
        let _ = std::fs::remove_dir_all(&state);
    }

    /// A call off the allowlist (`chroot`): refused with ENOSYS by default, and the
    /// end of the process in the mode the tests run with. In child processes (this
    /// test binary run again), one per mode.
    #[test]
    fn an_unlisted_call_is_refused_or_kills_as_the_mode_says() {
        use std::os::unix::process::ExitStatusExt;
        if !rustix::process::geteuid().is_root() {
            println!("SKIP: needs root (capabilities to drop)");
            return;
        }
        const NAME: &str = "control::sandbox::tests::an_unlisted_call_is_refused_or_kills_as_the_mode_says";
        if let Some(state) = std::env::var_os("VMFABRIC_SANDBOX_CHILD") {
            let gateways = GatewayRuntime::start(true, Path::new(&state)).unwrap();
            let chroot = gateways
                .handle()
                .block_on(
                    gateways
                        .handle()
                        .spawn(async { std::os::unix::fs::chroot("/").map_err(|e| e.raw_os_error()) }),
                )
                .unwrap();
            println!("chroot: {chroot:?}");
            return;
        }
        let state = std::env::temp_dir().join(format!("vmf-sandbox-modes-{}", std::process::id()));
        std::fs::create_dir_all(&state).unwrap();
        let child = |mode: &str| {
            std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", NAME, "--nocapture", "--test-threads=1"])
                .env("VMFABRIC_SANDBOX_CHILD", &state)
                .env("VMFABRIC_SECCOMP", mode)
                .output()
                .unwrap()
        };
        let refused = child("refuse");
        let stdout = String::from_utf8_lossy(&refused.stdout);
        assert!(
            stdout.contains(&format!("chroot: Err(Some({}))", libc::ENOSYS)),
            "{stdout}"
        );
        let killed = child("kill");
        let stdout = String::from_utf8_lossy(&killed.stdout);
        assert!(!stdout.contains("chroot:"), "{stdout}");
        assert_eq!(killed.status.signal(), Some(libc::SIGSYS), "{:?}", killed.status);
        let _ = std::fs::remove_dir_all(&state);
    }
}
