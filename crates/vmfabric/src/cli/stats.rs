//! `vmfabric stats`: every network's counters as tables, from the typed stats route.

use anyhow::Result;
use vmfabric::model::{NetworkStats, TrafficView};

use super::table::{client, text_table};
use super::ClientArgs;

pub(super) fn run(network: Option<String>, prometheus: bool, c: ClientArgs) -> Result<()> {
    let client = client(&c)?;
    if prometheus {
        print!("{}", client.metrics()?);
        return Ok(());
    }
    let mut stats = client.stats()?;
    if let Some(n) = &network {
        stats.retain(|s| s.network.as_str() == n);
        if stats.is_empty() {
            // The same not-found answer `network show` gives.
            client.network(n)?;
        }
    }
    if c.json {
        println!("{}", serde_json::to_string_pretty(&stats)?);
    } else {
        let text: Vec<String> = stats.iter().map(describe).collect();
        print!("{}", text.join("\n"));
    }
    Ok(())
}

fn traffic(t: &TrafficView) -> String {
    format!(
        "rx {} frames ({}), tx {} frames ({}), {} dropped",
        t.rx_frames,
        bytes(t.rx_bytes),
        t.tx_frames,
        bytes(t.tx_bytes),
        t.dropped
    )
}

/// Bytes in binary units, one decimal.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

fn counts<'a>(pairs: impl Iterator<Item = (&'a String, &'a u64)>) -> String {
    let v: Vec<String> = pairs
        .filter(|(_, n)| **n > 0)
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    if v.is_empty() {
        "-".into()
    } else {
        v.join(", ")
    }
}

/// One network: a line of totals, its ports as a table, its gateway by service.
pub(crate) fn describe(s: &NetworkStats) -> String {
    let mut out = format!(
        "network {}: {}; {} MACs learned\n",
        s.network.as_str(),
        traffic(&s.traffic),
        s.mac_table_entries
    );
    if !s.drops.is_empty() {
        out.push_str(&format!("  drops: {}\n", counts(s.drops.iter())));
    }
    let rows = s
        .ports
        .iter()
        .map(|p| {
            let t = &p.traffic;
            vec![
                p.port.clone(),
                t.rx_frames.to_string(),
                bytes(t.rx_bytes),
                t.tx_frames.to_string(),
                bytes(t.tx_bytes),
                counts(p.drops.iter()),
            ]
        })
        .collect();
    out.push_str(&text_table(
        &["port", "rx frames", "rx bytes", "tx frames", "tx bytes", "drops"],
        rows,
    ));
    if let Some(g) = &s.gateway {
        let f = &g.open_flows;
        out.push_str(&format!(
            "gateway: {} leases; open flows: tcp {}, udp {}, icmp {}\n",
            g.leases, f.tcp, f.udp, f.icmp
        ));
        // By service: the counter names' first word (dhcp_ack is DHCP's).
        let mut services: Vec<(&str, Vec<(String, u64)>)> = Vec::new();
        for (name, v) in &g.counters {
            let (service, rest) = name.split_once('_').unwrap_or((name, ""));
            let service = match service {
                "leases" | "lease" => "dhcp",
                "arp" | "icmp" | "malformed" => "host",
                "fd" | "tcp" => "nat",
                other => other,
            };
            let label = if rest.is_empty() {
                name.clone()
            } else {
                rest.to_string()
            };
            match services.iter_mut().find(|(s, _)| *s == service) {
                Some((_, list)) => list.push((label, *v)),
                None => services.push((service, vec![(label, *v)])),
            }
        }
        let rows: Vec<Vec<String>> = services
            .iter()
            .map(|(service, list)| vec![service.to_string(), counts(list.iter().map(|(k, v)| (k, v)))])
            .filter(|row| row[1] != "-")
            .collect();
        if rows.is_empty() {
            out.push_str("(no gateway counter above zero yet)\n");
        } else {
            out.push_str(&text_table(&["service", "counters (non-zero)"], rows));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_read_in_binary_units() {
        assert_eq!(super::bytes(512), "512 B");
        assert_eq!(super::bytes(1536), "1.5 KiB");
        assert_eq!(super::bytes(3 * 1024 * 1024 * 1024), "3.0 GiB");
    }
}
