//! Metrics: the data plane's counters per network and port, the gateways', kernel
//! mode's nftables refusals, captures and restore failures, as metric families with
//! help text, and dimensions as labels.
//!
//! Two encodings of the same families: the Prometheus text format (0.0.4, what
//! Prometheus and `promtool` read by default; written here, as `prometheus-client`
//! encodes only OpenMetrics) and OpenMetrics (`prometheus-client`), for scrapers
//! that ask for it.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

use super::kernel_rules;
use super::Control;

/// Counters only go up (a restart starts them again); gauges say how things are now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

/// One metric family: its name (without `_total`), help, kind and samples.
#[derive(Debug, Clone)]
pub struct Family {
    pub name: &'static str,
    pub help: &'static str,
    pub kind: Kind,
    pub samples: Vec<(Labels, u64)>,
}

pub type Labels = Vec<(&'static str, String)>;

impl Family {
    fn new(name: &'static str, kind: Kind, help: &'static str) -> Family {
        Family {
            name,
            help,
            kind,
            samples: Vec::new(),
        }
    }

    /// The sample name: counters end in `_total`.
    pub fn sample_name(&self) -> String {
        match self.kind {
            Kind::Counter => format!("{}_total", self.name),
            Kind::Gauge => self.name.to_string(),
        }
    }
}

/// Every family, found by name as samples are added.
#[derive(Debug, Default)]
pub struct Families(Vec<Family>);

impl Families {
    fn add(&mut self, name: &'static str, kind: Kind, help: &'static str, labels: Labels, value: u64) {
        let family = match self.0.iter().position(|f| f.name == name) {
            Some(i) => &mut self.0[i],
            None => {
                self.0.push(Family::new(name, kind, help));
                self.0.last_mut().expect("just pushed")
            }
        };
        family.samples.push((labels, value));
    }

    fn counter(&mut self, name: &'static str, help: &'static str, labels: Labels, value: u64) {
        self.add(name, Kind::Counter, help, labels, value);
    }

    fn gauge(&mut self, name: &'static str, help: &'static str, labels: Labels, value: u64) {
        self.add(name, Kind::Gauge, help, labels, value);
    }

    pub fn iter(&self) -> impl Iterator<Item = &Family> {
        self.0.iter()
    }

    /// The value of `family`'s sample whose labels are exactly `labels`.
    pub fn value(&self, family: &str, labels: &[(&str, &str)]) -> Option<u64> {
        let f = self.0.iter().find(|f| f.name == family)?;
        f.samples
            .iter()
            .find(|(l, _)| l.len() == labels.len() && l.iter().zip(labels).all(|((k, v), (k2, v2))| k == k2 && v == v2))
            .map(|(_, v)| *v)
    }

    /// The Prometheus text format, version 0.0.4.
    pub fn prometheus_text(&self) -> String {
        let mut out = String::new();
        for f in &self.0 {
            let name = f.sample_name();
            let kind = match f.kind {
                Kind::Counter => "counter",
                Kind::Gauge => "gauge",
            };
            out.push_str(&format!(
                "# HELP {name} {}\n# TYPE {name} {kind}\n",
                escape_help(f.help)
            ));
            for (labels, value) in &f.samples {
                out.push_str(&name);
                if !labels.is_empty() {
                    let pairs: Vec<String> = labels
                        .iter()
                        .map(|(k, v)| format!("{k}=\"{}\"", escape_label(v)))
                        .collect();
                    out.push_str(&format!("{{{}}}", pairs.join(",")));
                }
                out.push_str(&format!(" {value}\n"));
            }
        }
        out
    }

    /// OpenMetrics text (ends with `# EOF`). prometheus-client 0.24 writes label
    /// values as given: ours are checked names and fixed words, never quotes or
    /// backslashes.
    pub fn openmetrics_text(self) -> String {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(self));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).expect("writing to a String cannot fail");
        out
    }
}

impl Collector for Families {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for f in &self.0 {
            let kind = match f.kind {
                Kind::Counter => MetricType::Counter,
                Kind::Gauge => MetricType::Gauge,
            };
            let mut metric = encoder.encode_descriptor(f.name, f.help, None, kind)?;
            for (labels, value) in &f.samples {
                let labels: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
                let sample = metric.encode_family(&labels)?;
                match f.kind {
                    Kind::Counter => ConstCounter::new(*value).encode(sample)?,
                    Kind::Gauge => ConstGauge::new(i64::try_from(*value).unwrap_or(i64::MAX)).encode(sample)?,
                }
            }
        }
        Ok(())
    }
}

fn escape_help(s: &str) -> String {
    s.replace('\\', "\\\\").replace('\n', "\\n")
}

fn escape_label(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn labels(pairs: &[(&'static str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| (*k, v.to_string())).collect()
}

/// (gateway counter, family, help or "" after a family's first entry, labels).
type GatewayEntry = (
    &'static str,
    &'static str,
    &'static str,
    &'static [(&'static str, &'static str)],
);

/// Where each gateway counter goes: its family, help, and the labels that tell it from
/// the family's other members (besides `network`).
const GATEWAY: &[GatewayEntry] = &[
    ("arp_replies", "vmfabric_arp_replies", "ARP requests for a gateway address answered.", &[]),
    ("arp_gratuitous", "vmfabric_arp_gratuitous", "Gratuitous ARP announcements the gateway saw.", &[]),
    ("arp_conflicts", "vmfabric_arp_conflicts", "Gratuitous ARP claiming a gateway address that reached the gateway (from a trusted port or the host: a guest's is dropped at its port).", &[]),
    ("icmp_echo_replies", "vmfabric_icmp_echo_replies", "Pings to the gateway answered (IPv4 and IPv6).", &[]),
    ("router_adverts", "vmfabric_ndp_adverts", "IPv6 Neighbor Discovery advertisements the gateway sent, by kind: router (asked for and periodic), neighbour (for its own addresses).", &[("kind", "router")]),
    ("neighbour_adverts", "vmfabric_ndp_adverts", "", &[("kind", "neighbour")]),
    ("malformed_frames", "vmfabric_gateway_malformed_frames", "Frames to the gateway that claimed ARP, IPv4, UDP or ICMP but were malformed or had bad checksums.", &[]),
    ("dhcp_discover", "vmfabric_dhcp_messages", "DHCP messages received and sent, by message type.", &[("type", "discover")]),
    ("dhcp_request", "vmfabric_dhcp_messages", "", &[("type", "request")]),
    ("dhcp_decline", "vmfabric_dhcp_messages", "", &[("type", "decline")]),
    ("dhcp_release", "vmfabric_dhcp_messages", "", &[("type", "release")]),
    ("dhcp_inform", "vmfabric_dhcp_messages", "", &[("type", "inform")]),
    ("dhcp_offer", "vmfabric_dhcp_messages", "", &[("type", "offer")]),
    ("dhcp_ack", "vmfabric_dhcp_messages", "", &[("type", "ack")]),
    ("dhcp_nak", "vmfabric_dhcp_messages", "", &[("type", "nak")]),
    ("dhcp_malformed", "vmfabric_dhcp_refused", "DHCP messages not served, by reason: malformed, foreign_client (a client hardware address not the frame's source), other_server (a REQUEST for another server), pool_exhausted (no free address).", &[("reason", "malformed")]),
    ("dhcp_foreign_client", "vmfabric_dhcp_refused", "", &[("reason", "foreign_client")]),
    ("dhcp_other_server", "vmfabric_dhcp_refused", "", &[("reason", "other_server")]),
    ("dhcp_pool_exhausted", "vmfabric_dhcp_refused", "", &[("reason", "pool_exhausted")]),
    ("dhcp6_solicit", "vmfabric_dhcp6_messages", "DHCPv6 messages received and sent, by message type.", &[("type", "solicit")]),
    ("dhcp6_request", "vmfabric_dhcp6_messages", "", &[("type", "request")]),
    ("dhcp6_renew", "vmfabric_dhcp6_messages", "", &[("type", "renew")]),
    ("dhcp6_rebind", "vmfabric_dhcp6_messages", "", &[("type", "rebind")]),
    ("dhcp6_release", "vmfabric_dhcp6_messages", "", &[("type", "release")]),
    ("dhcp6_decline", "vmfabric_dhcp6_messages", "", &[("type", "decline")]),
    ("dhcp6_confirm", "vmfabric_dhcp6_messages", "", &[("type", "confirm")]),
    ("dhcp6_information_request", "vmfabric_dhcp6_messages", "", &[("type", "information_request")]),
    ("dhcp6_advertise", "vmfabric_dhcp6_messages", "", &[("type", "advertise")]),
    ("dhcp6_reply", "vmfabric_dhcp6_messages", "", &[("type", "reply")]),
    ("dhcp6_malformed", "vmfabric_dhcp6_refused", "DHCPv6 messages or identity associations not served, by reason: malformed (did not decode, or broke the protocol's rules), no_addrs (no address for that client now).", &[("reason", "malformed")]),
    ("dhcp6_no_addrs", "vmfabric_dhcp6_refused", "", &[("reason", "no_addrs")]),
    ("leases_bound", "vmfabric_lease_events", "Leases bound, expired and released.", &[("event", "bound")]),
    ("leases_expired", "vmfabric_lease_events", "", &[("event", "expired")]),
    ("leases_released", "vmfabric_lease_events", "", &[("event", "released")]),
    ("lease_store_errors", "vmfabric_lease_store_errors", "Lease store writes that failed (the lease works until a restart).", &[]),
    ("dhcp_store_unavailable", "vmfabric_dhcp_store_unavailable", "New leases and offers refused because the cluster's store could not be asked (renewals are answered from the cache).", &[]),
    ("dhcp_claimed_elsewhere", "vmfabric_dhcp_claimed_elsewhere", "Addresses another host of the cluster held when this one was about to offer or bind them.", &[]),
    ("dns_local", "vmfabric_dns_queries", "DNS queries by what became of them: answered locally, forwarded upstream, dropped (in-flight bound), malformed.", &[("outcome", "local")]),
    ("dns_forwarded", "vmfabric_dns_queries", "", &[("outcome", "forwarded")]),
    ("dns_dropped", "vmfabric_dns_queries", "", &[("outcome", "dropped")]),
    ("dns_malformed", "vmfabric_dns_queries", "", &[("outcome", "malformed")]),
    ("dns_nxdomain", "vmfabric_dns_errors", "DNS answers with an error code.", &[("rcode", "nxdomain")]),
    ("dns_servfail", "vmfabric_dns_errors", "", &[("rcode", "servfail")]),
    ("dns_tcp_refused", "vmfabric_dns_tcp_refused", "DNS-over-TCP connections reset: their client held its share of connections.", &[]),
    ("nat_udp_flows", "vmfabric_nat_flows", "Flows opened through NAT (TCP: for guests and for forwards' clients).", &[("proto", "udp")]),
    ("nat_tcp_flows", "vmfabric_nat_flows", "", &[("proto", "tcp")]),
    ("nat_udp_tx_bytes", "vmfabric_nat_bytes", "Payload bytes through NAT: tx from guests, rx to them.", &[("proto", "udp"), ("direction", "tx")]),
    ("nat_udp_rx_bytes", "vmfabric_nat_bytes", "", &[("proto", "udp"), ("direction", "rx")]),
    ("nat_tcp_tx_bytes", "vmfabric_nat_bytes", "", &[("proto", "tcp"), ("direction", "tx")]),
    ("nat_tcp_rx_bytes", "vmfabric_nat_bytes", "", &[("proto", "tcp"), ("direction", "rx")]),
    ("nat_tcp_host_refusals", "vmfabric_nat_tcp_host_refusals", "Guest TCP data the host socket refused within the offered window (TCP splice); the guest sends it again.", &[]),
    ("nat_udp_dropped", "vmfabric_nat_refused", "Guest traffic NAT did not carry: bound (a flow bound reached, answered with a reset for TCP), connect_failed (the host-side connect failed), dropped (a bound, a full queue or no host socket).", &[("proto", "udp"), ("reason", "dropped")]),
    ("nat_tcp_refused", "vmfabric_nat_refused", "", &[("proto", "tcp"), ("reason", "connect_failed")]),
    ("nat_tcp_bounded", "vmfabric_nat_refused", "", &[("proto", "tcp"), ("reason", "bound")]),
    ("nat_icmp_dropped", "vmfabric_nat_refused", "", &[("proto", "icmp"), ("reason", "dropped")]),
    ("nat_icmp_requests", "vmfabric_nat_icmp_echo", "ICMP echo requests sent for guests, and replies delivered back.", &[("direction", "request")]),
    ("nat_icmp_replies", "vmfabric_nat_icmp_echo", "", &[("direction", "reply")]),
    ("tcp_beyond_window", "vmfabric_tcp_beyond_window", "TCP segments from guests dropped for ending past the window the gateway advertised (an honest TCP never sends them).", &[]),
    ("fd_budget_refused", "vmfabric_fd_budget_refused", "Guest-driven sockets closed again because the daemon's descriptors ran low.", &[]),
    ("egress_denied", "vmfabric_egress_denied", "Guest traffic refused by the network's egress policy.", &[]),
    ("forward_dropped", "vmfabric_forward_dropped", "Datagrams to a UDP forward that could not be delivered.", &[]),
    ("forward_refused", "vmfabric_forward_refused", "Connections to a TCP forward reset at once: no guest at its address.", &[]),
];

/// The first entry of a family carries its help.
fn gateway_help(family: &str) -> &'static str {
    GATEWAY
        .iter()
        .find(|(_, f, help, _)| *f == family && !help.is_empty())
        .map_or("", |(_, _, help, _)| help)
}

/// The data plane's families, for ports or for whole networks.
struct DataPlaneFamilies {
    frames: (&'static str, &'static str),
    bytes: (&'static str, &'static str),
    drops: (&'static str, &'static str),
    not_learned: (&'static str, &'static str),
}

const PORT: DataPlaneFamilies = DataPlaneFamilies {
    frames: (
        "vmfabric_port_frames",
        "Frames a port received from its guest (rx) and sent to it (tx).",
    ),
    bytes: (
        "vmfabric_port_bytes",
        "Bytes a port received from its guest (rx) and sent to it (tx).",
    ),
    drops: ("vmfabric_port_drops", "Frames from a port dropped, by reason."),
    not_learned: (
        "vmfabric_port_mac_not_learned",
        "Frames from a port delivered although the full MAC table could not learn their source.",
    ),
};

const NETWORK: DataPlaneFamilies = DataPlaneFamilies {
    frames: (
        "vmfabric_network_frames",
        "Frames the network's ports received (rx) and sent (tx).",
    ),
    bytes: (
        "vmfabric_network_bytes",
        "Bytes the network's ports received (rx) and sent (tx).",
    ),
    drops: ("vmfabric_network_drops", "Frames dropped in the network, by reason."),
    not_learned: (
        "vmfabric_network_mac_not_learned",
        "Frames delivered although the full MAC table could not learn their source.",
    ),
};

fn data_plane(
    out: &mut Families,
    names: &DataPlaneFamilies,
    base: &[(&'static str, &str)],
    c: &fabric::CounterSnapshot,
) {
    let ((frames, help_frames), (bytes, help_bytes)) = (names.frames, names.bytes);
    let ((drops, help_drops), (not_learned, help_not_learned)) = (names.drops, names.not_learned);
    for (direction, f, b) in [("rx", c.rx_frames, c.rx_bytes), ("tx", c.tx_frames, c.tx_bytes)] {
        let mut l = labels(base);
        l.push(("direction", direction.to_string()));
        out.counter(frames, help_frames, l.clone(), f);
        out.counter(bytes, help_bytes, l, b);
    }
    for (reason, n) in c.drops_by_reason() {
        let mut l = labels(base);
        l.push(("reason", reason.as_str().to_string()));
        out.counter(drops, help_drops, l, n);
    }
    out.counter(not_learned, help_not_learned, labels(base), c.not_learned);
}

/// Kernel mode's nftables counters: (counter, family, help).
const KERNEL_COUNTERS: [(&str, &str, &str); 6] = [
    (
        "egress",
        "vmfabric_kernel_egress_denied",
        "Kernel mode: guest traffic the egress policy refused.",
    ),
    (
        "input",
        "vmfabric_kernel_input_denied",
        "Kernel mode: guest traffic to the host the input filter refused.",
    ),
    (
        "flows",
        "vmfabric_kernel_flows_denied",
        "Kernel mode: guest connections refused past the guest's share.",
    ),
    (
        "rogue_ra",
        "vmfabric_kernel_rogue_ra",
        "Kernel mode: Router Advertisements and redirects from guest ports, dropped.",
    ),
    (
        "rogue_dhcp6",
        "vmfabric_kernel_rogue_dhcp6",
        "Kernel mode: DHCPv6 server messages from guest ports, dropped.",
    ),
    (
        "spoofed6",
        "vmfabric_kernel_spoofed6",
        "Kernel mode: IPv6 from an address the port does not hold, or Neighbour Discovery claiming one, dropped.",
    ),
];

impl Control {
    /// Every metric family, now.
    pub fn metric_families(&self) -> Families {
        let mut out = Families::default();
        let st = self.lock();
        let kernel_counts = if st.nets.values().any(|n| n.backend.is_kernel()) {
            hostnet::nft::counters(&kernel_rules::table(&self.instance)).unwrap_or_default()
        } else {
            Vec::new()
        };
        // A kernel-mode node's vxlan devices: what their rules refused, all networks.
        let mut kernel_vxlan: Vec<(&'static str, u64)> = Vec::new();
        for (name, net) in &st.nets {
            let network = [("network", name.as_str())];
            if let Some(k) = net.backend.kernel() {
                for (counter, family, help) in KERNEL_COUNTERS {
                    let n = kernel_rules::refused(&st, k, &kernel_counts, counter);
                    out.counter(family, help, labels(&network), n);
                }
                if k.tunnel.is_some() {
                    kernel_vxlan.push(("from_stranger", kernel_rules::refused(&st, k, &kernel_counts, "vxlan")));
                    kernel_vxlan.push((
                        "refused_frames",
                        kernel_rules::refused(&st, k, &kernel_counts, "tunnel"),
                    ));
                    kernel_vxlan.push(("foreign_mac", kernel_rules::refused(&st, k, &kernel_counts, "foreign")));
                }
            }
            if let Some(c) = self.switch.network_counters(name) {
                data_plane(&mut out, &NETWORK, &network, &c);
            }
            if let Some(n) = self.switch.mac_table_len(name) {
                out.gauge(
                    "vmfabric_mac_table_entries",
                    "MAC addresses the network's table holds.",
                    labels(&network),
                    n,
                );
            }
            out.gauge(
                "vmfabric_ports",
                "Ports on the network.",
                labels(&network),
                net.ports.len() as u64,
            );
            let env = self.env();
            let up = net
                .ports
                .values()
                .filter(|p| net.backend.port_up(&env, &p.handle))
                .count();
            out.gauge(
                "vmfabric_ports_up",
                "Ports on the network with their VMM attached now.",
                labels(&network),
                up as u64,
            );
            for (pname, p) in &net.ports {
                let Some(id) = p.handle.switch_port() else { continue };
                if let Some(c) = self.switch.port_counters(id) {
                    data_plane(
                        &mut out,
                        &PORT,
                        &[("network", name.as_str()), ("port", pname.as_str())],
                        &c,
                    );
                }
            }
            if let Some(gw) = &net.gateway {
                out.gauge(
                    "vmfabric_leases",
                    "DHCP leases the gateway holds.",
                    labels(&network),
                    gw.leases().len() as u64,
                );
                let open = gw.open_flows();
                for (proto, n) in [("udp", open.udp), ("tcp", open.tcp), ("icmp", open.icmp)] {
                    out.gauge(
                        "vmfabric_nat_open_flows",
                        "Flows NAT carries now (TCP: guests' and forwards' connections).",
                        labels(&[("network", name.as_str()), ("proto", proto)]),
                        n as u64,
                    );
                }
                for (counter, value) in gw.counters().snapshot() {
                    // Every counter is mapped (a unit test holds to that).
                    let Some((_, family, _, extra)) = GATEWAY.iter().find(|(c, ..)| *c == counter) else {
                        continue;
                    };
                    let mut l = labels(&network);
                    l.extend(labels(extra));
                    out.counter(family, gateway_help(family), l, value);
                }
                for (service, v) in gw.handler_panics().snapshot() {
                    out.counter(
                        "vmfabric_handler_panics",
                        "Inputs a gateway service dropped because handling them panicked, by service.",
                        labels(&[("network", name.as_str()), ("service", service)]),
                        v,
                    );
                }
            }
        }
        out.gauge(
            "vmfabric_captures_active",
            "Packet captures running.",
            Vec::new(),
            st.captures.live.len() as u64,
        );
        const LOST: &str = "Frames a capture lost because its reader was slow.";
        for (id, c) in &st.captures.live {
            let lost = c.lost.load(std::sync::atomic::Ordering::Relaxed);
            out.counter(
                "vmfabric_capture_lost_frames",
                LOST,
                labels(&[("network", c.network.as_str()), ("capture", &id.to_string())]),
                lost,
            );
        }
        for (network, lost) in &st.captures.ended_lost {
            out.counter(
                "vmfabric_capture_lost_frames",
                LOST,
                labels(&[("network", network.as_str()), ("capture", "ended")]),
                *lost,
            );
        }
        if let Some(link) = self.cluster.get() {
            let mut vxlan = link.vtep_counters().map(|c| c.snapshot()).unwrap_or_default();
            for (what, n) in kernel_vxlan {
                match vxlan.iter_mut().find(|(w, _)| *w == what) {
                    Some((_, sum)) => *sum += n,
                    None => vxlan.push((what, n)),
                }
            }
            for (what, n) in vxlan {
                out.counter(
                    "vmfabric_vxlan",
                    "The node's VXLAN tunnel endpoint: frames taken in, datagrams sent, and what it refused (from_stranger: not a registered node's address; unknown_vni; foreign_mac: an inner source MAC that does not live on the sending node; spoofed: a remote guest's frame from an address it does not hold; malformed; on a kernel-mode node refused_frames: its vxlan devices' rules) or kept on this node (kept_local: the distributed gateway's frames).",
                    labels(&[("what", what)]),
                    n,
                );
            }
            out.gauge(
                "vmfabric_cluster_store_up",
                "Whether etcd answered this node lately (1) or not (0).",
                Vec::new(),
                u64::from(link.is_healthy()),
            );
        }
        out.gauge(
            "vmfabric_restore_failures",
            "Networks and ports the last start could not restore.",
            Vec::new(),
            (st.failed.networks.len() + st.failed.ports.len()) as u64,
        );
        out
    }

    /// Every metric in the Prometheus text format.
    pub fn metrics(&self) -> String {
        self.metric_families().prometheus_text()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_gateway_counter_has_a_family_with_help() {
        let counters = gateway::GatewayCounters::default();
        for (name, _) in counters.snapshot() {
            let entry = GATEWAY.iter().find(|(c, ..)| *c == name);
            let (_, family, ..) = entry.unwrap_or_else(|| panic!("gateway counter {name} has no metric family"));
            assert!(!gateway_help(family).is_empty(), "{family} has no help");
            assert!(
                !family.ends_with("_total"),
                "{family}: counters get _total when encoded"
            );
        }
    }

    #[test]
    fn both_encodings_carry_help_type_and_labels() {
        let mut f = Families::default();
        f.counter(
            "vmfabric_port_frames",
            "Frames through a port.",
            labels(&[("network", "n"), ("port", "p")]),
            3,
        );
        f.gauge("vmfabric_leases", "Leases.", labels(&[("network", "n")]), 2);
        assert_eq!(f.value("vmfabric_leases", &[("network", "n")]), Some(2));
        assert_eq!(
            f.prometheus_text(),
            "# HELP vmfabric_port_frames_total Frames through a port.\n\
             # TYPE vmfabric_port_frames_total counter\n\
             vmfabric_port_frames_total{network=\"n\",port=\"p\"} 3\n\
             # HELP vmfabric_leases Leases.\n\
             # TYPE vmfabric_leases gauge\n\
             vmfabric_leases{network=\"n\"} 2\n"
        );
        let om = f.openmetrics_text();
        assert!(om.contains("# TYPE vmfabric_port_frames counter\n"), "{om}");
        assert!(
            om.contains("vmfabric_port_frames_total{network=\"n\",port=\"p\"} 3\n"),
            "{om}"
        );
        assert!(om.ends_with("# EOF\n"), "{om}");
    }

    #[test]
    fn the_text_format_escapes_help_and_label_values() {
        let mut f = Families::default();
        f.counter("x", "a \\ b\nc", labels(&[("l", "q\"\\")]), 1);
        assert_eq!(
            f.prometheus_text(),
            "# HELP x_total a \\\\ b\\nc\n# TYPE x_total counter\nx_total{l=\"q\\\"\\\\\"} 1\n"
        );
    }
}
