//! The optional TOML file that declares networks, their ports, reservations and
//! gateway settings (the reference, with a full example: docs/config.md).
//!
//! Applied at every start, after the store has been loaded: what the file declares and
//! the store lacks is created; what exists is left alone (the store and the API stay
//! the source of truth for changes made at run time), and nothing is deleted.
//!
//! ```toml
//! [[network]]
//! name = "ci"
//! subnet = "10.78.0.0/24"
//! mtu = 9000
//! ports = [{ name = "runner1", kind = "unixgram" }]
//! reservations = [{ key = "runner1", ip = "10.78.0.10" }]
//!
//! vm_paths = ["/srv/images"]
//! [[vm]]
//! name = "runner1"
//! network = "ci"
//! ```
//!
//! Declared VMs are started at every start unless they run already (adopted after a
//! restart); one that will not start is listed as failed with the reason.

use std::path::Path;

use anyhow::Context;
use serde::Deserialize;

use crate::control::error::ErrorClass;
use crate::control::Control;
use crate::model::{Mtu, Name, NetworkSpec, PortSpec, ReservationSpec};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default, rename = "network")]
    pub networks: Vec<NetworkDecl>,
    /// Host directories VMs may use files from (as `serve --vm-path`).
    #[serde(default)]
    pub vm_paths: Vec<std::path::PathBuf>,
    /// VMs to run at start (`[[vm]]`, the fields of `POST /v1/vms`).
    #[serde(default, rename = "vm")]
    pub vms: Vec<crate::control::vms::VmRequest>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkDecl {
    pub name: Name,
    /// Left out: the daemon picks a free private /24 when it creates the network.
    #[serde(default)]
    pub subnet: ipnet::Ipv4Net,
    #[serde(default)]
    pub mtu: Mtu,
    /// A /64 prefix, or "auto" for one derived from the name. Left out: IPv4 only.
    #[serde(default, with = "crate::model::ipv6_prefix")]
    pub ipv6: Option<ipnet::Ipv6Net>,
    #[serde(default = "yes")]
    pub gateway: bool,
    /// Guests reach the host's loopback at the subnet's last host address (and its `[::1]`
    /// at the IPv6 prefix's `::2`).
    #[serde(default)]
    pub host_access: bool,
    /// "userspace" (the default) or "kernel".
    #[serde(default)]
    pub mode: crate::store::NetworkMode,
    /// Kernel mode: bridge port isolation.
    #[serde(default)]
    pub isolated: bool,
    /// Kernel mode: the bridge's name.
    #[serde(default)]
    pub bridge: Option<String>,
    /// The gateway's DNS, DHCP and flow settings (`[network.settings.dns]` and so on).
    #[serde(default)]
    pub settings: crate::model::GatewaySettings,
    /// Create it even if the subnet overlaps a host route.
    #[serde(default)]
    pub force: bool,
    #[serde(default)]
    pub ports: Vec<PortSpec>,
    #[serde(default)]
    pub reservations: Vec<ReservationSpec>,
}

fn yes() -> bool {
    true
}

impl ConfigFile {
    /// The declaration of the network named `default`, if any.
    pub fn default_network(&self) -> Option<NetworkSpec> {
        self.networks
            .iter()
            .find(|n| n.name.as_str() == "default")
            .map(NetworkDecl::record)
    }
}

impl NetworkDecl {
    fn record(&self) -> NetworkSpec {
        NetworkSpec {
            name: self.name.clone(),
            subnet: self.subnet,
            mtu: self.mtu,
            ipv6: self.ipv6,
            gateway: self.gateway,
            host_access: self.host_access,
            mode: self.mode,
            isolated: self.isolated,
            bridge: self.bridge.clone(),
            settings: self.settings.clone(),
            scope: Default::default(),
            vni: None,
        }
    }
}

pub fn load(path: &Path) -> anyhow::Result<ConfigFile> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    parse(&text).with_context(|| format!("{} is not a valid vmfabric config", path.display()))
}

/// Reads a config file's text.
pub fn parse(text: &str) -> anyhow::Result<ConfigFile> {
    Ok(toml::from_str(text)?)
}

/// Creates what the file declares and the daemon lacks.
pub fn apply(daemon: &Control, cfg: &ConfigFile) -> anyhow::Result<()> {
    for n in &cfg.networks {
        let exists = daemon.network(&n.name).is_ok();
        if !exists {
            daemon
                .create_network(n.record(), n.force)
                .map_err(|e| anyhow::anyhow!("network {}: {e}", n.name))?;
        }
        for p in &n.ports {
            match daemon.add_port(&n.name, p.clone()) {
                Ok(_) => {}
                Err(e) if e.class() == ErrorClass::Conflict => {}
                Err(e) => anyhow::bail!("port {}/{}: {e}", n.name, p.name),
            }
        }
        for r in &n.reservations {
            let current = daemon.reservations(&n.name).map_err(|e| anyhow::anyhow!("{e}"))?;
            if !current.iter().any(|c| c.key == r.key) {
                daemon
                    .reserve(&n.name, r.clone())
                    .map_err(|e| anyhow::anyhow!("reservation {}: {e}", r.key))?;
            }
        }
    }
    for vm in &cfg.vms {
        daemon.vms().run_declared(daemon, vm.clone());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    /// The reference's example is a file the daemon takes, with settings it accepts.
    #[test]
    fn the_documented_example_is_valid() {
        let doc = include_str!("../../../docs/config.md");
        let toml = testkit::fenced_block(doc, "toml", 0).expect("docs/config.md has a TOML example");
        let c = super::parse(toml).unwrap();
        let n = &c.networks[0];
        assert_eq!(
            (n.ports.len(), n.reservations.len(), n.settings.dns.records.len()),
            (3, 3, 6)
        );
        let mut gw = gateway::GatewayConfig::new(&n.name, n.subnet);
        gw.mtu = n.mtu.get();
        gw.ipv6 = n.ipv6;
        gw.validate().unwrap();
        gw.host_access = Some(gw.default_host_access());
        n.settings.apply(&mut gw).unwrap();
        for r in &n.reservations {
            gw.validate_reservation(&r.to_gateway()).unwrap();
        }
    }

    /// The reference's VM example declares what it says.
    #[test]
    fn the_documented_vms_are_valid() {
        let doc = include_str!("../../../docs/config.md");
        let toml = testkit::fenced_block(doc, "toml", 1).expect("docs/config.md has a VM example");
        let c = super::parse(toml).unwrap();
        assert_eq!((c.vm_paths.len(), c.vms.len()), (2, 2));
        let r = &c.vms[0];
        assert_eq!(r.root_disk.as_ref().map(|d| d.mode), Some(vm::DiskMode::Overlay));
        assert!(r.shares[0].read_only && r.vsock);
        assert!(r
            .cloud_init
            .as_ref()
            .unwrap()
            .user_data
            .as_ref()
            .unwrap()
            .starts_with("#cloud-config"));
        assert_eq!(c.vms[1].memory_mib, 96, "the API's defaults");
    }

    #[test]
    fn reads_a_declaration_and_refuses_typos() {
        let ok = r#"
            [[network]]
            name = "ci"
            subnet = "10.78.0.0/24"
            ports = [{ name = "r1", kind = "stream" }]
            reservations = [{ key = "r1", ip = "10.78.0.10" }]
        "#;
        let c: super::ConfigFile = toml::from_str(ok).unwrap();
        assert_eq!((c.networks[0].mtu.get(), c.networks[0].ports.len()), (1500, 1));
        let typo = "[[network]]\nname = \"x\"\nsubnet = \"10.0.0.0/24\"\nmtuu = 9000\n";
        assert!(toml::from_str::<super::ConfigFile>(typo)
            .unwrap_err()
            .to_string()
            .contains("mtuu"));
    }
}
