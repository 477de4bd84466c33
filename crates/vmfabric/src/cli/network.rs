//! `vmfabric network`: create, ls, show, rm.

use anyhow::{Context, Result};

use super::table::{client, print_table, report};
use vmfabric::model::{Mtu, Name, NetworkSpec};

use super::NetworkCmd;

pub(super) fn run(cmd: NetworkCmd) -> Result<()> {
    match cmd {
        NetworkCmd::Create {
            name,
            subnet,
            mtu,
            no_gateway,
            host_access,
            mode,
            isolated,
            bridge,
            force,
            c,
        } => {
            let body = NetworkSpec {
                name: Name::new("network", &name)?,
                subnet: subnet.parse().with_context(|| format!("subnet {subnet:?}"))?,
                mtu: Mtu::try_from(mtu)?,
                gateway: !no_gateway,
                host_access,
                mode: serde_json::from_value(serde_json::Value::String(mode.clone()))
                    .with_context(|| format!("mode {mode:?} is neither userspace nor kernel"))?,
                isolated,
                bridge,
            };
            let v = client(&c)?.create_network(&body, force)?;
            print_table(&c, &v, &["name", "subnet", "mtu", "gateway", "mode"]);
        }
        NetworkCmd::Ls { c } => {
            let v = client(&c)?.networks()?;
            print_table(&c, &v, &["name", "subnet", "mtu", "gateway", "ports", "leases"]);
        }
        NetworkCmd::Show { name, c } => {
            let v = client(&c)?.network(&name)?;
            print_table(&c, &v, &["name", "subnet", "mtu", "gateway", "ports", "leases"]);
        }
        NetworkCmd::Rm { name, force, c } => {
            client(&c)?.remove_network(&name, force)?;
            report(
                &c,
                format!("removed network {name}"),
                serde_json::json!({"removed": "network", "name": name}),
            );
        }
    }
    Ok(())
}
