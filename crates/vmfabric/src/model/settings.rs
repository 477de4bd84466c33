//! A network's gateway settings as operators write them (API, CLI, TOML): every field
//! optional, unset meaning the gateway's default, so a stored network keeps up with
//! better defaults. `apply` turns them into the gateway's configuration; the gateway's
//! own validation then speaks for every mistake.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Everything about a network's gateway an operator may choose.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GatewaySettings {
    #[serde(default, skip_serializing_if = "DnsSettings::is_default")]
    pub dns: DnsSettings,
    #[serde(default, skip_serializing_if = "DhcpSettings::is_default")]
    pub dhcp: DhcpSettings,
    #[serde(default, skip_serializing_if = "FlowSettings::is_default")]
    pub flows: FlowSettings,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DnsSettings {
    /// The VMs' names live under it (default `vm.internal`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = "dev.internal")]
    pub domain: Option<String>,
    /// The search list DHCP hands out (default: the domain).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub search: Option<Vec<String>>,
    /// Where other names are asked: `IP` or `IP:PORT` (default: the host's
    /// /etc/resolv.conf, re-read when it changes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(example = json!(["127.0.0.1:5353"]))]
    pub upstreams: Vec<String>,
    /// Names under a domain go to its own servers instead.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forwarders: Vec<ForwarderSpec>,
    /// Records answered beside the VMs' names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub records: Vec<RecordSpec>,
    /// The name of the host-access address under the domain (default `host`; empty
    /// for none). Only answered when the network has host access.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_alias: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ForwarderSpec {
    #[schema(example = "corp.example")]
    pub domain: String,
    /// `IP` or `IP:PORT`.
    #[schema(example = json!(["10.1.2.3"]))]
    pub servers: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema, clap::ValueEnum)]
#[serde(rename_all = "UPPERCASE")]
#[clap(rename_all = "UPPERCASE")]
pub enum RecordType {
    A,
    Aaaa,
    Cname,
    Txt,
    Srv,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RecordSpec {
    /// One label is a name under the network's domain (`db`); a dotted name is taken
    /// as written (`api.corp.example`, `_pg._tcp.vm.internal`).
    pub name: String,
    #[serde(rename = "type")]
    pub kind: RecordType,
    /// An address (A, AAAA), a name (CNAME), text (TXT), or
    /// `PRIORITY WEIGHT PORT TARGET` (SRV).
    #[schema(example = "10.77.0.40")]
    pub value: String,
    /// Seconds (default 60).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DhcpSettings {
    /// First and last address handed out (default: `.2` to the last host but one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<String>>, example = json!(["10.77.0.100", "10.77.0.199"]))]
    pub range: Option<(Ipv4Addr, Ipv4Addr)>,
    /// Seconds (default 3600; at least 60).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_secs: Option<u64>,
    /// Option 121 routes (the default route via the gateway is sent with them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<RouteSpec>,
    /// Option 42: NTP servers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(value_type = Vec<String>)]
    pub ntp: Vec<Ipv4Addr>,
    /// Other options by number, payload in hex.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<RawOptionSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    #[schema(value_type = String, example = "192.168.50.0/24")]
    pub dst: ipnet::Ipv4Net,
    #[schema(value_type = String, example = "10.77.0.5")]
    pub via: Ipv4Addr,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RawOptionSpec {
    pub code: u8,
    #[schema(example = "68656c6c6f")]
    pub hex: String,
}

/// Bounds and timeouts of the NAT's flows (defaults in parentheses).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FlowSettings {
    /// UDP flows one guest may hold (1024).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udp_per_guest: Option<usize>,
    /// UDP flows of the whole network (16384).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udp_total: Option<usize>,
    /// TCP connections one guest may open at once (512).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_per_guest: Option<usize>,
    /// TCP connections of the whole network (2048).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_total: Option<usize>,
    /// Seconds a quiet UDP flow lives (60).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udp_idle_secs: Option<u64>,
    /// Seconds a quiet ICMP echo flow lives (30).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub icmp_idle_secs: Option<u64>,
    /// Seconds a guest's connect may wait for the host's (15).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_connect_timeout_secs: Option<u64>,
    /// Seconds a forwarded DNS query may wait for its upstreams (3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_timeout_secs: Option<u64>,
    /// What carries guests' TCP (splice): `stack` terminates their connections in a
    /// userspace TCP stack (smoltcp); `splice` maps their segments onto host socket
    /// calls, with no buffer of its own. Fixed while the network runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_engine: Option<TcpEngine>,
}

/// The engines that carry guests' TCP connections (see [`FlowSettings::tcp_engine`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TcpEngine {
    Splice,
    Stack,
}

impl GatewaySettings {
    pub fn is_default(&self) -> bool {
        *self == GatewaySettings::default()
    }
}

impl DnsSettings {
    fn is_default(&self) -> bool {
        *self == DnsSettings::default()
    }
}

impl DhcpSettings {
    fn is_default(&self) -> bool {
        *self == DhcpSettings::default()
    }
}

impl FlowSettings {
    fn is_default(&self) -> bool {
        *self == FlowSettings::default()
    }
}

/// `IP` (port 53) or `IP:PORT`, IPv6 in brackets with a port.
pub fn parse_dns_server(text: &str) -> Result<SocketAddr, String> {
    text.parse::<SocketAddr>()
        .or_else(|_| text.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
        .map_err(|_| format!("DNS server {text:?} is not IP or IP:PORT"))
}

fn parse_hex(text: &str) -> Result<Vec<u8>, String> {
    let clean: String = text.chars().filter(|c| *c != ':' && !c.is_whitespace()).collect();
    if !clean.len().is_multiple_of(2) {
        return Err(format!("{text:?} is not hex bytes"));
    }
    (0..clean.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&clean[i..i + 2], 16).map_err(|_| format!("{text:?} is not hex bytes")))
        .collect()
}

impl RecordSpec {
    fn to_gateway(&self) -> Result<gateway::config::StaticRecord, String> {
        use gateway::config::RecordData as D;
        let v = self.value.trim();
        let bad = |what: &str| format!("record {} {:?}: {v:?} is not {what}", self.name, self.kind);
        let data = match self.kind {
            RecordType::A => D::A(v.parse::<Ipv4Addr>().map_err(|_| bad("an IPv4 address"))?),
            RecordType::Aaaa => D::Aaaa(v.parse::<Ipv6Addr>().map_err(|_| bad("an IPv6 address"))?),
            RecordType::Cname => D::Cname(v.to_string()),
            RecordType::Txt => D::Txt(self.value.clone()),
            RecordType::Srv => {
                let parts: Vec<&str> = v.split_whitespace().collect();
                let [p, w, port, target] = parts[..] else {
                    return Err(bad("PRIORITY WEIGHT PORT TARGET"));
                };
                let num = |s: &str| s.parse::<u16>().map_err(|_| bad("PRIORITY WEIGHT PORT TARGET"));
                D::Srv {
                    priority: num(p)?,
                    weight: num(w)?,
                    port: num(port)?,
                    target: target.to_string(),
                }
            }
        };
        Ok(gateway::config::StaticRecord {
            name: self.name.clone(),
            data,
            ttl: self.ttl.unwrap_or(60),
        })
    }
}

impl GatewaySettings {
    /// Writes the settings into `cfg` (made with the network's defaults) and checks
    /// the result as the gateway would.
    pub fn apply(&self, cfg: &mut gateway::GatewayConfig) -> Result<(), String> {
        let dns = &self.dns;
        if let Some(d) = &dns.domain {
            cfg.domain = d.trim_end_matches('.').to_ascii_lowercase();
            cfg.search = vec![cfg.domain.clone()];
        }
        if let Some(s) = &dns.search {
            cfg.search = s.clone();
        }
        if !dns.upstreams.is_empty() {
            let servers = dns
                .upstreams
                .iter()
                .map(|s| parse_dns_server(s))
                .collect::<Result<_, _>>()?;
            cfg.upstreams = gateway::Upstreams::Static(servers);
        }
        cfg.forwarders = dns
            .forwarders
            .iter()
            .map(|f| {
                Ok(gateway::config::Forwarder {
                    domain: f.domain.trim_end_matches('.').to_string(),
                    servers: f
                        .servers
                        .iter()
                        .map(|s| parse_dns_server(s))
                        .collect::<Result<_, String>>()?,
                })
            })
            .collect::<Result<_, String>>()?;
        cfg.records = dns
            .records
            .iter()
            .map(RecordSpec::to_gateway)
            .collect::<Result<_, _>>()?;
        if let Some(a) = &dns.host_alias {
            cfg.host_alias = a.clone();
        }
        let dhcp = &self.dhcp;
        if let Some(r) = dhcp.range {
            cfg.dhcp_range = r;
        }
        if let Some(s) = dhcp.lease_secs {
            cfg.lease_time = Duration::from_secs(s);
        }
        cfg.dhcp_extras = gateway::config::DhcpExtras {
            routes: dhcp.routes.iter().map(|r| (r.dst, r.via)).collect(),
            ntp: dhcp.ntp.clone(),
            raw: dhcp
                .options
                .iter()
                .map(|o| {
                    Ok((
                        o.code,
                        parse_hex(&o.hex).map_err(|e| format!("DHCP option {}: {e}", o.code))?,
                    ))
                })
                .collect::<Result<_, String>>()?,
        };
        let f = &self.flows;
        let set = |slot: &mut usize, v: Option<usize>| *slot = v.unwrap_or(*slot);
        set(&mut cfg.udp_flows_per_guest, f.udp_per_guest);
        set(&mut cfg.udp_flows_total, f.udp_total);
        set(&mut cfg.tcp_flows_per_guest, f.tcp_per_guest);
        set(&mut cfg.tcp_flows_total, f.tcp_total);
        let secs = |slot: &mut Duration, v: Option<u64>| *slot = v.map(Duration::from_secs).unwrap_or(*slot);
        secs(&mut cfg.udp_idle, f.udp_idle_secs);
        secs(&mut cfg.icmp_idle, f.icmp_idle_secs);
        secs(&mut cfg.tcp_connect_timeout, f.tcp_connect_timeout_secs);
        secs(&mut cfg.dns_timeout, f.dns_timeout_secs);
        if let Some(engine) = f.tcp_engine {
            cfg.tcp_engine = match engine {
                TcpEngine::Splice => gateway::TcpEngine::Splice,
                TcpEngine::Stack => gateway::TcpEngine::Stack,
            };
        }
        if f.dns_timeout_secs == Some(0) || f.icmp_idle_secs == Some(0) {
            return Err("DNS timeout and ICMP idle time must be above zero".into());
        }
        cfg.validate().map_err(|e| e.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> gateway::GatewayConfig {
        gateway::GatewayConfig::new("n", "10.77.0.0/24".parse().unwrap())
    }

    #[test]
    fn settings_reach_the_gateway_config() {
        let s: GatewaySettings = serde_json::from_value(serde_json::json!({
            "dns": {
                "domain": "Dev.Internal.",
                "upstreams": ["127.0.0.1:5353", "::1"],
                "forwarders": [{"domain": "corp.example", "servers": ["10.1.2.3"]}],
                "records": [
                    {"name": "db", "type": "A", "value": "10.77.0.40"},
                    {"name": "_pg._tcp.dev.internal", "type": "SRV", "value": "1 2 5432 db.dev.internal", "ttl": 5}
                ]
            },
            "dhcp": {"range": ["10.77.0.100", "10.77.0.150"], "lease_secs": 120,
                     "routes": [{"dst": "192.168.50.0/24", "via": "10.77.0.5"}],
                     "ntp": ["10.77.0.1"], "options": [{"code": 224, "hex": "68:65:6c"}]},
            "flows": {"udp_per_guest": 8, "tcp_connect_timeout_secs": 2}
        }))
        .unwrap();
        let mut c = cfg();
        s.apply(&mut c).unwrap();
        assert_eq!(
            (c.domain.as_str(), c.search.clone()),
            ("dev.internal", vec!["dev.internal".to_string()])
        );
        assert_eq!(
            c.upstreams,
            gateway::Upstreams::Static(vec!["127.0.0.1:5353".parse().unwrap(), "[::1]:53".parse().unwrap()])
        );
        assert_eq!(
            c.forwarders[0].servers,
            vec!["10.1.2.3:53".parse::<SocketAddr>().unwrap()]
        );
        assert_eq!(c.records.len(), 2);
        assert_eq!(c.records[1].ttl, 5);
        assert_eq!(c.dhcp_range.0, Ipv4Addr::new(10, 77, 0, 100));
        assert_eq!(c.lease_time, Duration::from_secs(120));
        assert_eq!(c.dhcp_extras.raw, vec![(224, b"hel".to_vec())]);
        assert_eq!(
            (c.udp_flows_per_guest, c.tcp_connect_timeout),
            (8, Duration::from_secs(2))
        );
        // Round trip: what is shown is what was set, nothing more.
        let back = serde_json::to_value(&s).unwrap();
        assert!(back["flows"].get("udp_total").is_none());
    }

    #[test]
    fn mistakes_come_back_as_messages() {
        for (json, word) in [
            (serde_json::json!({"dns": {"upstreams": ["nope"]}}), "not IP or IP:PORT"),
            (
                serde_json::json!({"dns": {"records": [{"name": "x", "type": "A", "value": "fd00::1"}]}}),
                "IPv4",
            ),
            (
                serde_json::json!({"dns": {"records": [{"name": "x", "type": "SRV", "value": "1 2"}]}}),
                "PRIORITY",
            ),
            (
                serde_json::json!({"dhcp": {"range": ["10.77.0.9", "10.77.0.3"]}}),
                "range",
            ),
            (serde_json::json!({"dhcp": {"lease_secs": 5}}), "lease time"),
            (
                serde_json::json!({"dhcp": {"options": [{"code": 3, "hex": "0a"}]}}),
                "written by the server",
            ),
            (
                serde_json::json!({"dhcp": {"options": [{"code": 224, "hex": "xyz"}]}}),
                "hex",
            ),
            (serde_json::json!({"flows": {"udp_total": 0}}), "above zero"),
        ] {
            let s: GatewaySettings = serde_json::from_value(json.clone()).unwrap();
            let e = s.apply(&mut cfg()).unwrap_err();
            assert!(e.contains(word), "{json}: {e}");
        }
        assert!(serde_json::from_value::<GatewaySettings>(serde_json::json!({"dns": {"domian": "x"}})).is_err());
    }
}
