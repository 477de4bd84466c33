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
            if c.json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", describe(&v));
            }
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

/// A network, one fact a line, for `network show`.
fn describe(v: &vmfabric::model::NetworkView) -> String {
    let mode = serde_json::to_value(v.mode)
        .ok()
        .and_then(|m| m.as_str().map(String::from));
    let mut lines = vec![
        ("name", v.name.to_string()),
        ("mode", mode.unwrap_or_default()),
        ("subnet", format!("{} (MTU {})", v.subnet, v.mtu)),
    ];
    if let Some(bridge) = &v.bridge {
        lines.push(("bridge", bridge.clone()));
    }
    match &v.served {
        Some(g) => {
            lines.push(("gateway", g.address.to_string()));
            lines.push((
                "dhcp",
                format!(
                    "{} to {}, leases of {}",
                    g.dhcp_range.0,
                    g.dhcp_range.1,
                    super::table::duration(g.lease_secs)
                ),
            ));
            lines.push(("dns domain", g.dns_domain.clone()));
            let host = g
                .host_access
                .map_or("off".to_string(), |a| format!("{a} (the host's loopback)"));
            lines.push(("host access", host));
        }
        None => lines.push(("gateway", "none".into())),
    }
    lines.push(("isolated", v.isolated.to_string()));
    lines.push(("ports", v.ports.to_string()));
    lines.push(("leases", v.leases.to_string()));
    if let Some(t) = &v.traffic {
        lines.push((
            "traffic",
            format!(
                "rx {} frames ({} B), tx {} frames ({} B), {} dropped",
                t.rx_frames, t.rx_bytes, t.tx_frames, t.tx_bytes, t.dropped
            ),
        ));
    }
    if let Some(why) = &v.failed {
        lines.push(("failed", why.clone()));
    }
    lines
        .iter()
        .map(|(k, val)| format!("{:<12} {val}\n", format!("{k}:")))
        .collect()
}
