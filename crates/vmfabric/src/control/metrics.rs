//! Counters in the Prometheus text format: the data plane's per network and port,
//! the gateways', and kernel mode's nftables refusals.

use super::kernel_rules;
use super::Control;

impl Control {
    pub fn metrics(&self) -> String {
        let mut out = String::new();
        let st = self.lock();
        out.push_str("# TYPE vmfabric_port_frames_total counter\n# TYPE vmfabric_port_drops_total counter\n");
        let kernel_counts = if st.nets.values().any(|n| n.backend.is_kernel()) {
            hostnet::nft::counters(&kernel_rules::table(&self.instance)).unwrap_or_default()
        } else {
            Vec::new()
        };
        for (name, net) in &st.nets {
            if let Some(k) = net.backend.kernel() {
                let (egress, input, flows) = kernel_rules::refusals(&st, k, &kernel_counts);
                out.push_str(&format!(
                    "vmfabric_kernel_egress_denied_total{{network=\"{name}\"}} {egress}\n"
                ));
                out.push_str(&format!(
                    "vmfabric_kernel_input_denied_total{{network=\"{name}\"}} {input}\n"
                ));
                out.push_str(&format!(
                    "vmfabric_kernel_flows_denied_total{{network=\"{name}\"}} {flows}\n"
                ));
            }
            if let Some(c) = self.switch.network_counters(name) {
                counter_lines(&mut out, "network", &format!("network=\"{name}\""), &c);
            }
            if let Some(n) = self.switch.mac_table_len(name) {
                out.push_str(&format!("vmfabric_mac_table_entries{{network=\"{name}\"}} {n}\n"));
            }
            for (pname, p) in &net.ports {
                let Some(id) = p.handle.switch_port() else { continue };
                if let Some(c) = self.switch.port_counters(id) {
                    counter_lines(&mut out, "port", &format!("network=\"{name}\",port=\"{pname}\""), &c);
                }
            }
            if let Some(gw) = &net.gateway {
                out.push_str(&format!(
                    "vmfabric_leases{{network=\"{name}\"}} {}\n",
                    gw.leases().len()
                ));
                for (k, v) in gw.counters().snapshot() {
                    out.push_str(&format!("vmfabric_gateway_{k}_total{{network=\"{name}\"}} {v}\n"));
                }
                for (service, v) in gw.handler_panics().snapshot() {
                    out.push_str(&format!(
                        "vmfabric_gateway_handler_panics_total{{network=\"{name}\",service=\"{service}\"}} {v}\n"
                    ));
                }
            }
        }
        out.push_str(&format!("vmfabric_captures_active {}\n", st.captures.live.len()));
        for (id, c) in &st.captures.live {
            let lost = c.lost.load(std::sync::atomic::Ordering::Relaxed);
            out.push_str(&format!(
                "vmfabric_capture_lost_frames_total{{network=\"{}\",capture=\"{id}\"}} {lost}\n",
                c.network
            ));
        }
        for (network, lost) in &st.captures.ended_lost {
            out.push_str(&format!(
                "vmfabric_capture_lost_frames_total{{network=\"{network}\",capture=\"ended\"}} {lost}\n"
            ));
        }
        let failed = st.failed.networks.len() + st.failed.ports.len();
        out.push_str(&format!("vmfabric_restore_failures {failed}\n"));
        out
    }
}

/// The Prometheus lines of one set of data-plane counters (`vmfabric_{kind}_*`).
fn counter_lines(out: &mut String, kind: &str, labels: &str, c: &fabric::CounterSnapshot) {
    for (dir, frames, bytes) in [("rx", c.rx_frames, c.rx_bytes), ("tx", c.tx_frames, c.tx_bytes)] {
        out.push_str(&format!(
            "vmfabric_{kind}_frames_total{{{labels},dir=\"{dir}\"}} {frames}\n"
        ));
        out.push_str(&format!(
            "vmfabric_{kind}_bytes_total{{{labels},dir=\"{dir}\"}} {bytes}\n"
        ));
    }
    out.push_str(&format!(
        "vmfabric_{kind}_mac_not_learned_total{{{labels}}} {}\n",
        c.not_learned
    ));
    for (reason, n) in c.drops_by_reason() {
        out.push_str(&format!(
            "vmfabric_{kind}_drops_total{{{labels},reason=\"{}\"}} {n}\n",
            reason.as_str()
        ));
    }
}
