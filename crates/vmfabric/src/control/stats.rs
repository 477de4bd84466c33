//! The counters of every network, port and gateway, typed for `GET /v1/stats`: the
//! same sources `/metrics` reads, without the text format in between.

use std::collections::BTreeMap;

use super::Control;
use crate::model::{GatewayStats, NetworkStats, OpenFlowsView, PortStats, TrafficView};

fn drops(c: &fabric::CounterSnapshot) -> BTreeMap<String, u64> {
    c.drops_by_reason()
        .filter(|(_, n)| *n > 0)
        .map(|(r, n)| (r.as_str().to_string(), n))
        .collect()
}

impl Control {
    pub fn stats(&self) -> Vec<NetworkStats> {
        let st = self.lock();
        st.nets
            .iter()
            .filter_map(|(name, net)| {
                let c = self.switch.network_counters(name)?;
                let ports = net
                    .ports
                    .values()
                    .filter_map(|p| {
                        let pc = self.switch.port_counters(p.handle.switch_port()?)?;
                        Some(PortStats {
                            port: p.rec.name.clone(),
                            traffic: TrafficView::from(&pc),
                            drops: drops(&pc),
                        })
                    })
                    .collect();
                let gateway = net.gateway.as_ref().map(|gw| {
                    let open = gw.open_flows();
                    GatewayStats {
                        leases: gw.leases().len() as u64,
                        open_flows: OpenFlowsView {
                            tcp: open.tcp as u64,
                            udp: open.udp as u64,
                            icmp: open.icmp as u64,
                        },
                        counters: gw
                            .counters()
                            .snapshot()
                            .into_iter()
                            .map(|(k, v)| (k.to_string(), v))
                            .collect(),
                    }
                });
                Some(NetworkStats {
                    network: net.spec.name.clone(),
                    traffic: TrafficView::from(&c),
                    drops: drops(&c),
                    mac_table_entries: self.switch.mac_table_len(name).unwrap_or(0),
                    ports,
                    gateway,
                })
            })
            .collect()
    }
}
