//! The gateways' runtime, and what its threads may do.
//!
//! Gateway tasks parse every frame a guest sends to its gateway (DHCP, DNS, the NAT
//! stacks), so they run on threads of their own that hold the least the daemon can
//! give them: of root's capabilities only `CAP_NET_RAW` (ICMP NAT opens raw sockets
//! where the host's `ping_group_range` allows no ping sockets), and `no_new_privs`.
//! Capabilities are per thread in Linux, so the control plane and the API, which make
//! TAP devices, bridges and nftables rules, keep theirs; forward listeners are bound
//! by the control plane and handed to the gateway. The switch thread confines itself
//! further (`fabric::sys::seccomp`: no capabilities and a system-call allowlist).

use rustix::thread::{CapabilitySet, CapabilitySets};

/// The capabilities a gateway thread keeps.
pub const GATEWAY_CAPABILITIES: CapabilitySet = CapabilitySet::NET_RAW;

/// The gateways' runtime; its threads are confined when the daemon is sandboxed.
pub struct GatewayRuntime {
    rt: Option<tokio::runtime::Runtime>,
}

impl GatewayRuntime {
    pub fn start(sandbox: bool) -> std::io::Result<GatewayRuntime> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("vmf-gateway")
            .enable_all()
            .on_thread_start(move || {
                if sandbox {
                    if let Err(e) = confine_gateway_thread() {
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

/// Gives the calling thread `no_new_privs` and only [`GATEWAY_CAPABILITIES`].
fn confine_gateway_thread() -> rustix::io::Result<()> {
    rustix::thread::set_no_new_privs(true)?;
    let keep = GATEWAY_CAPABILITIES;
    rustix::thread::set_capabilities(
        None,
        CapabilitySets {
            effective: keep,
            permitted: keep,
            inheritable: CapabilitySet::empty(),
        },
    )
}
