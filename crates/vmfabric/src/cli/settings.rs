//! The gateway-setting flags `network create` and `network set` share, and how they
//! edit a [`GatewaySettings`].

use std::net::Ipv4Addr;

use anyhow::{bail, Context, Result};
use vmfabric::model::{ForwarderSpec, GatewaySettings, RawOptionSpec, RecordSpec, RecordType, RouteSpec};

/// A setting `--reset` puts back to its default.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Setting {
    DnsDomain,
    DnsSearch,
    Upstreams,
    Forwarders,
    Records,
    HostAlias,
    DhcpRange,
    LeaseTime,
    DhcpRoutes,
    Ntp,
    DhcpOptions,
    /// Every flow bound and timeout.
    Flows,
    /// Everything.
    All,
}

#[derive(clap::Args, Debug, Default)]
#[command(next_help_heading = "Gateway settings (a list flag given replaces its list)")]
pub(crate) struct SettingsArgs {
    /// DNS domain of the VMs' names (default vm.internal).
    #[arg(long, value_name = "DOMAIN")]
    dns_domain: Option<String>,
    /// A domain of the search list DHCP hands out (default: the DNS domain).
    #[arg(long, value_name = "DOMAIN")]
    dns_search: Vec<String>,
    /// An upstream DNS server, IP or IP:PORT (default: the host's /etc/resolv.conf).
    #[arg(long, value_name = "ADDR")]
    upstream: Vec<String>,
    /// Names under DOMAIN go to these servers instead: DOMAIN=ADDR[,ADDR...].
    #[arg(long, value_name = "DOMAIN=ADDR")]
    forwarder: Vec<String>,
    /// A DNS record: NAME=TYPE:VALUE, e.g. db=A:10.77.0.40, www=CNAME:web.vm.internal,
    /// _pg._tcp.vm.internal=SRV:"1 1 5432 db.vm.internal". One label is under the domain.
    #[arg(long, value_name = "NAME=TYPE:VALUE")]
    record: Vec<String>,
    /// The host-access address's name under the domain (default host; "" for none).
    #[arg(long, value_name = "LABEL")]
    host_alias: Option<String>,
    /// Addresses DHCP hands out: FIRST-LAST.
    #[arg(long, value_name = "FIRST-LAST")]
    dhcp_range: Option<String>,
    /// How long a lease lasts: 2h, 30m, 90s, "1h 30m" (at least 60s).
    #[arg(long, value_name = "DURATION")]
    lease_time: Option<String>,
    /// A classless static route (DHCP option 121): DST=VIA, e.g. 192.168.50.0/24=10.77.0.5.
    #[arg(long, value_name = "DST=VIA")]
    dhcp_route: Vec<String>,
    /// An NTP server (DHCP option 42).
    #[arg(long, value_name = "IP")]
    ntp: Vec<Ipv4Addr>,
    /// Another DHCP option by number: CODE=HEX, e.g. 224=68656c6c6f.
    #[arg(long, value_name = "CODE=HEX")]
    dhcp_option: Vec<String>,
    /// UDP flows one guest may hold.
    #[arg(long, value_name = "N")]
    udp_flows_per_guest: Option<usize>,
    /// UDP flows of the whole network.
    #[arg(long, value_name = "N")]
    udp_flows: Option<usize>,
    /// TCP connections one guest may hold.
    #[arg(long, value_name = "N")]
    tcp_flows_per_guest: Option<usize>,
    /// TCP connections of the whole network.
    #[arg(long, value_name = "N")]
    tcp_flows: Option<usize>,
    /// How long a quiet UDP flow lives.
    #[arg(long, value_name = "DURATION")]
    udp_idle: Option<String>,
    /// How long a quiet ICMP echo flow lives.
    #[arg(long, value_name = "DURATION")]
    icmp_idle: Option<String>,
    /// How long a guest's connect waits for the host's.
    #[arg(long, value_name = "DURATION")]
    tcp_connect_timeout: Option<String>,
    /// How long a forwarded DNS query waits for its upstreams.
    #[arg(long, value_name = "DURATION")]
    dns_timeout: Option<String>,
    /// What carries guests' TCP: splice (segments mapped onto host socket calls, the
    /// default) or stack (a userspace TCP stack); fixed while the network runs.
    #[arg(long, value_enum, value_name = "ENGINE")]
    tcp_engine: Option<vmfabric::model::TcpEngine>,
    /// Put a setting back to its default (before the flags above apply).
    #[arg(long, value_enum, value_name = "SETTING")]
    reset: Vec<Setting>,
}

/// Whole seconds of `text`: a bare number, or a friendly duration (`2h`, `1h 30m`).
pub(crate) fn parse_secs(text: &str) -> Result<u64> {
    if let Ok(n) = text.trim().parse::<u64>() {
        return Ok(n);
    }
    let d: jiff::SignedDuration = text
        .trim()
        .parse()
        .with_context(|| format!("{text:?} is not a duration (like 90s, 30m, 2h, \"1h 30m\")"))?;
    u64::try_from(d.as_secs()).with_context(|| format!("{text:?} is negative"))
}

/// A friendly duration as clap parses it (`--timeout 10s`).
pub(crate) fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    parse_secs(text)
        .map(std::time::Duration::from_secs)
        .map_err(|e| format!("{e:#}"))
}

fn split_pair<'a>(text: &'a str, what: &str) -> Result<(&'a str, &'a str)> {
    text.split_once('=')
        .filter(|(a, b)| !a.is_empty() && !b.is_empty())
        .with_context(|| format!("{what} {text:?} is not of the form {}", what_form(what)))
}

fn what_form(what: &str) -> &'static str {
    match what {
        "forwarder" => "DOMAIN=ADDR[,ADDR...]",
        "record" => "NAME=TYPE:VALUE",
        "route" => "DST=VIA",
        _ => "CODE=HEX",
    }
}

fn parse_record(text: &str) -> Result<RecordSpec> {
    let (name, rest) = split_pair(text, "record")?;
    let (kind, value) = rest
        .split_once(':')
        .with_context(|| format!("record {text:?} is not NAME=TYPE:VALUE"))?;
    let kind = <RecordType as clap::ValueEnum>::from_str(kind, true)
        .map_err(|_| anyhow::anyhow!("record {text:?}: type {kind:?} is not one of A, AAAA, CNAME, TXT, SRV"))?;
    Ok(RecordSpec {
        name: name.to_string(),
        kind,
        value: value.to_string(),
        ttl: None,
    })
}

impl SettingsArgs {
    /// Whether any flag was given.
    pub(crate) fn any(&self) -> bool {
        let s = self;
        s.dns_domain.is_some()
            || !s.dns_search.is_empty()
            || !s.upstream.is_empty()
            || !s.forwarder.is_empty()
            || !s.record.is_empty()
            || s.host_alias.is_some()
            || s.dhcp_range.is_some()
            || s.lease_time.is_some()
            || !s.dhcp_route.is_empty()
            || !s.ntp.is_empty()
            || !s.dhcp_option.is_empty()
            || s.udp_flows_per_guest.is_some()
            || s.udp_flows.is_some()
            || s.tcp_flows_per_guest.is_some()
            || s.tcp_flows.is_some()
            || s.udp_idle.is_some()
            || s.icmp_idle.is_some()
            || s.tcp_connect_timeout.is_some()
            || s.dns_timeout.is_some()
            || s.tcp_engine.is_some()
            || !s.reset.is_empty()
    }

    /// Edits `s`: resets first, then every flag given.
    pub(crate) fn edit(&self, s: &mut GatewaySettings) -> Result<()> {
        for r in &self.reset {
            reset(s, *r);
        }
        let (dns, dhcp, flows) = (&mut s.dns, &mut s.dhcp, &mut s.flows);
        if let Some(d) = &self.dns_domain {
            dns.domain = Some(d.clone());
        }
        if !self.dns_search.is_empty() {
            dns.search = Some(self.dns_search.clone());
        }
        if !self.upstream.is_empty() {
            dns.upstreams = self.upstream.clone();
        }
        if !self.forwarder.is_empty() {
            dns.forwarders = self
                .forwarder
                .iter()
                .map(|f| {
                    let (domain, servers) = split_pair(f, "forwarder")?;
                    Ok(ForwarderSpec {
                        domain: domain.to_string(),
                        servers: servers.split(',').map(|s| s.trim().to_string()).collect(),
                    })
                })
                .collect::<Result<_>>()?;
        }
        if !self.record.is_empty() {
            dns.records = self.record.iter().map(|r| parse_record(r)).collect::<Result<_>>()?;
        }
        if let Some(a) = &self.host_alias {
            dns.host_alias = Some(a.clone());
        }
        if let Some(r) = &self.dhcp_range {
            let (a, b) = r
                .split_once('-')
                .with_context(|| format!("DHCP range {r:?} is not FIRST-LAST"))?;
            let ip = |t: &str| {
                t.trim()
                    .parse::<Ipv4Addr>()
                    .with_context(|| format!("DHCP range {r:?}: {t:?} is not an IPv4 address"))
            };
            dhcp.range = Some((ip(a)?, ip(b)?));
        }
        if let Some(t) = &self.lease_time {
            dhcp.lease_secs = Some(parse_secs(t)?);
        }
        if !self.dhcp_route.is_empty() {
            dhcp.routes = self
                .dhcp_route
                .iter()
                .map(|r| {
                    let (dst, via) = split_pair(r, "route")?;
                    Ok(RouteSpec {
                        dst: dst
                            .parse()
                            .with_context(|| format!("route {r:?}: {dst:?} is not a CIDR"))?,
                        via: via
                            .parse()
                            .with_context(|| format!("route {r:?}: {via:?} is not an IPv4 address"))?,
                    })
                })
                .collect::<Result<_>>()?;
        }
        if !self.ntp.is_empty() {
            dhcp.ntp = self.ntp.clone();
        }
        if !self.dhcp_option.is_empty() {
            dhcp.options = self
                .dhcp_option
                .iter()
                .map(|o| {
                    let (code, hex) = split_pair(o, "option")?;
                    Ok(RawOptionSpec {
                        code: code
                            .parse()
                            .with_context(|| format!("DHCP option {o:?}: {code:?} is not 1..=254"))?,
                        hex: hex.to_string(),
                    })
                })
                .collect::<Result<_>>()?;
        }
        let counts = [
            (&mut flows.udp_per_guest, self.udp_flows_per_guest),
            (&mut flows.udp_total, self.udp_flows),
            (&mut flows.tcp_per_guest, self.tcp_flows_per_guest),
            (&mut flows.tcp_total, self.tcp_flows),
        ];
        for (slot, v) in counts {
            if v.is_some() {
                *slot = v;
            }
        }
        let times = [
            (&mut flows.udp_idle_secs, &self.udp_idle),
            (&mut flows.icmp_idle_secs, &self.icmp_idle),
            (&mut flows.tcp_connect_timeout_secs, &self.tcp_connect_timeout),
            (&mut flows.dns_timeout_secs, &self.dns_timeout),
        ];
        for (slot, v) in times {
            if let Some(t) = v {
                *slot = Some(parse_secs(t)?);
            }
        }
        if self.tcp_engine.is_some() {
            flows.tcp_engine = self.tcp_engine;
        }
        Ok(())
    }
}

fn reset(s: &mut GatewaySettings, what: Setting) {
    match what {
        Setting::DnsDomain => s.dns.domain = None,
        Setting::DnsSearch => s.dns.search = None,
        Setting::Upstreams => s.dns.upstreams.clear(),
        Setting::Forwarders => s.dns.forwarders.clear(),
        Setting::Records => s.dns.records.clear(),
        Setting::HostAlias => s.dns.host_alias = None,
        Setting::DhcpRange => s.dhcp.range = None,
        Setting::LeaseTime => s.dhcp.lease_secs = None,
        Setting::DhcpRoutes => s.dhcp.routes.clear(),
        Setting::Ntp => s.dhcp.ntp.clear(),
        Setting::DhcpOptions => s.dhcp.options.clear(),
        Setting::Flows => s.flows = Default::default(),
        Setting::All => *s = GatewaySettings::default(),
    }
}

/// Refuses flags that cannot apply: none given to `set`.
pub(crate) fn require_some(args: &SettingsArgs) -> Result<()> {
    if !args.any() {
        bail!("name at least one setting to change (see `vmfabric network set --help`)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        s: SettingsArgs,
    }

    #[test]
    fn flags_edit_settings_and_reset_first() {
        let t = T::parse_from([
            "t",
            "--dns-domain",
            "dev.internal",
            "--record",
            "db=A:10.77.0.40",
            "--record",
            "v6=aaaa:fd00::40",
            "--forwarder",
            "corp.example=10.1.2.3,10.1.2.4:5353",
            "--lease-time",
            "1h 30m",
            "--dhcp-range",
            "10.77.0.100-10.77.0.150",
            "--dhcp-route",
            "192.168.50.0/24=10.77.0.5",
            "--dhcp-option",
            "224=6869",
            "--udp-idle",
            "2m",
            "--reset",
            "records",
        ]);
        let mut s = GatewaySettings::default();
        s.dns.upstreams = vec!["127.0.0.1".into()];
        t.s.edit(&mut s).unwrap();
        assert_eq!(s.dns.domain.as_deref(), Some("dev.internal"));
        assert_eq!(s.dns.records.len(), 2, "flags apply after the reset");
        assert_eq!(s.dns.records[1].kind, RecordType::Aaaa);
        assert_eq!(s.dns.records[1].value, "fd00::40");
        assert_eq!(s.dns.forwarders[0].servers, vec!["10.1.2.3", "10.1.2.4:5353"]);
        assert_eq!(s.dns.upstreams, vec!["127.0.0.1"], "untouched lists stay");
        assert_eq!(s.dhcp.lease_secs, Some(5400));
        assert_eq!(s.flows.udp_idle_secs, Some(120));
        let all = T::parse_from(["t", "--reset", "all"]);
        all.s.edit(&mut s).unwrap();
        assert!(s.is_default());
    }

    #[test]
    fn malformed_flags_say_what_form_they_take() {
        for (flag, value, word) in [
            ("--record", "db", "NAME=TYPE:VALUE"),
            ("--record", "db=MX:x", "not one of"),
            ("--forwarder", "corp.example", "DOMAIN=ADDR"),
            ("--dhcp-range", "10.0.0.1", "FIRST-LAST"),
            ("--lease-time", "soon", "not a duration"),
            ("--dhcp-route", "10.0.0.0/8=x", "not an IPv4"),
            ("--dhcp-option", "300=00", "1..=254"),
        ] {
            let t = T::parse_from(["t", flag, value]);
            let e = t.s.edit(&mut GatewaySettings::default()).unwrap_err();
            assert!(format!("{e:#}").contains(word), "{flag} {value}: {e:#}");
        }
    }
}
