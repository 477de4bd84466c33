//! `vmfabric network`: create, ls, show, rm.

use anyhow::{Context, Result};
use vmfabric::client::seg;

use super::table::{print_table, request};
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
            let v = request(
                &c,
                "POST",
                &format!("/v1/networks?force={force}"),
                Some(serde_json::to_value(&body)?),
            )?;
            print_table(&c, &v, &["name", "subnet", "mtu", "gateway", "mode"]);
        }
        NetworkCmd::Ls { c } => {
            let v = request(&c, "GET", "/v1/networks", None)?;
            print_table(&c, &v, &["name", "subnet", "mtu", "gateway", "ports", "leases"]);
        }
        NetworkCmd::Show { name, c } => {
            let v = request(&c, "GET", &format!("/v1/networks/{}", seg(&name)), None)?;
            print_table(&c, &v, &["name", "subnet", "mtu", "gateway", "ports", "leases"]);
        }
        NetworkCmd::Rm { name, force, c } => {
            request(
                &c,
                "DELETE",
                &format!("/v1/networks/{}?force={force}", seg(&name)),
                None,
            )?;
            println!("removed network {name}");
        }
    }
    Ok(())
}
