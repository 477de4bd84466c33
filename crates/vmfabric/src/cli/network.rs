//! `vmfabric network`: create, ls, show, rm.

use anyhow::{Context, Result};

use super::table::{client, is_conflict, print_one, print_table, report};
use vmfabric::model::{GatewaySettings, Mtu, Name, NetworkSpec};

use super::{bad_input, NetworkCmd};

pub(super) fn run(cmd: NetworkCmd) -> Result<()> {
    match cmd {
        NetworkCmd::Create {
            name,
            subnet,
            mtu,
            ipv6,
            no_gateway,
            host_access,
            mode,
            isolated,
            bridge,
            scope,
            vni,
            force,
            exist_ok,
            settings,
            c,
        } => {
            let mut gateway_settings = GatewaySettings::default();
            bad_input(settings.edit(&mut gateway_settings))?;
            let subnet = match subnet {
                Some(s) => bad_input(s.parse().with_context(|| format!("subnet {s:?}")))?,
                None => Default::default(),
            };
            let body = NetworkSpec {
                name: bad_input(Name::new("network", &name).map_err(Into::into))?,
                subnet,
                mtu: bad_input(Mtu::try_from(mtu).map_err(Into::into))?,
                ipv6: match ipv6 {
                    Some(p) => Some(bad_input(
                        vmfabric::model::ipv6_prefix::parse(&p).map_err(anyhow::Error::msg),
                    )?),
                    None => None,
                },
                gateway: !no_gateway,
                host_access,
                mode,
                isolated,
                bridge,
                settings: gateway_settings,
                scope,
                vni,
            };
            let client = client(&c)?;
            let columns = ["name", "subnet", "mtu", "gateway", "mode"];
            match client.create_network(&body, force) {
                Ok(v) => print_table(&c, &v, &columns),
                Err(e) if exist_ok && is_conflict(&e) && client.network(&name).is_ok() => {
                    print_table(&c, &client.network(&name)?, &columns)
                }
                Err(e) => return Err(e),
            }
        }
        NetworkCmd::Set { name, settings, c } => {
            bad_input(super::settings::require_some(&settings))?;
            let client = client(&c)?;
            let mut current = client.settings(&name)?;
            bad_input(settings.edit(&mut current))?;
            let now = client.set_settings(&name, &current)?;
            if c.json {
                println!("{}", serde_json::to_string_pretty(&now)?);
            } else {
                print!("{}", describe(&client.network(&name)?));
            }
        }
        NetworkCmd::Ls { c } => {
            let v = client(&c)?.networks()?;
            print_table(&c, &v, &["name", "subnet", "mtu", "gateway", "ports", "leases"]);
        }
        NetworkCmd::Show { name, c } => print_one(&c, &client(&c)?.network(&name)?, describe)?,
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

/// The chosen settings `network show` has no other line for.
fn settings_lines(s: &GatewaySettings, lines: &mut Vec<(&'static str, String)>) {
    for f in &s.dns.forwarders {
        lines.push(("forwarder", format!("{} to {}", f.domain, f.servers.join(", "))));
    }
    for r in &s.dns.records {
        let kind = serde_json::to_value(r.kind)
            .ok()
            .and_then(|k| k.as_str().map(String::from));
        lines.push(("record", format!("{} {} {}", r.name, kind.unwrap_or_default(), r.value)));
    }
    for r in &s.dhcp.routes {
        lines.push(("dhcp route", format!("{} via {}", r.dst, r.via)));
    }
    if !s.dhcp.ntp.is_empty() {
        let ntp: Vec<String> = s.dhcp.ntp.iter().map(ToString::to_string).collect();
        lines.push(("ntp", ntp.join(", ")));
    }
    for o in &s.dhcp.options {
        lines.push(("dhcp option", format!("{} = {}", o.code, o.hex)));
    }
    if let Ok(serde_json::Value::Object(flows)) = serde_json::to_value(&s.flows) {
        for (k, v) in flows {
            lines.push(("flows", format!("{k} = {v}")));
        }
    }
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
    if let Some(prefix) = v.ipv6 {
        lines.push(("ipv6", format!("{prefix} (SLAAC)")));
    }
    if let Some(bridge) = &v.bridge {
        lines.push(("bridge", bridge.clone()));
    }
    match &v.served {
        Some(g) => {
            lines.push(("gateway", g.address.to_string()));
            if let (Some(global), Some(link_local)) = (g.ipv6_address, g.ipv6_link_local) {
                lines.push(("gateway v6", format!("{global}, {link_local}")));
            }
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
            lines.push(("dns search", g.dns_search.join(" ")));
            lines.push(("upstreams", g.dns_upstreams.clone()));
            let host = g.host_access.map_or("off".to_string(), |a| {
                let name = g.host_name.as_ref().map(|n| format!(", {n}")).unwrap_or_default();
                format!("{a} (the host's loopback{name})")
            });
            lines.push(("host access", host));
            settings_lines(&v.settings, &mut lines);
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
