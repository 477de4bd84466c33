//! The DNS server's local side: which queries the gateway answers itself and how.
//!
//! Theory of operation: names of VMs live in a `Zone` under the network's domain. A
//! query for `name.<domain>` (or a bare `name` that is known, for clients that do not
//! use the search list) is answered here: A and, on a network with IPv6, AAAA from the
//! zone, other types with NOERROR and no data, unknown names with NXDOMAIN — a name
//! inside our domain is never sent upstream. PTR queries for the network's subnet and
//! IPv6 prefix are answered here too. Everything else is forwarded (see
//! [`crate::upstream`]).

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, PTR, SRV, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use ipnet::Ipv4Net;

/// TTL of local answers: short, since leases come and go.
const LOCAL_TTL: u32 = 30;
/// EDNS payload size we advertise (the DNS flag day 2020 value).
const EDNS_PAYLOAD: u16 = 1232;

/// Names of VMs on one network.
#[derive(Debug)]
pub struct Zone {
    domain: Name,
    subnet: Ipv4Net,
    names: HashMap<String, Ipv4Addr>,
    reverse: HashMap<Ipv4Addr, String>,
    /// The network's IPv6 prefix, when it has one, and the names' IPv6 addresses.
    prefix6: Option<ipnet::Ipv6Net>,
    names6: HashMap<String, Ipv6Addr>,
    reverse6: HashMap<Ipv6Addr, String>,
    /// Records set by the operator, by lower-case fully qualified name.
    records: HashMap<Name, Vec<(u32, RData)>>,
}

impl Zone {
    pub fn new(domain: &str, subnet: Ipv4Net) -> Zone {
        let mut domain = Name::from_utf8(domain).unwrap_or_else(|_| Name::root()).to_lowercase();
        domain.set_fqdn(true);
        Zone {
            domain,
            subnet,
            names: HashMap::new(),
            reverse: HashMap::new(),
            prefix6: None,
            names6: HashMap::new(),
            reverse6: HashMap::new(),
            records: HashMap::new(),
        }
    }

    /// Takes the domain and records of `cfg` (the VMs' names stay: they are labels).
    /// The host alias is an A record for the host-access address when that is on, and
    /// an AAAA for its IPv6 one on a network with IPv6.
    pub fn configure(&mut self, cfg: &crate::GatewayConfig) {
        *self = Zone {
            names: std::mem::take(&mut self.names),
            reverse: std::mem::take(&mut self.reverse),
            prefix6: cfg.ipv6,
            names6: std::mem::take(&mut self.names6),
            reverse6: std::mem::take(&mut self.reverse6),
            ..Zone::new(&cfg.domain, cfg.subnet)
        };
        use crate::config::RecordData;
        let named = !cfg.host_alias.is_empty();
        let v4 = cfg.host_access.filter(|_| named).map(RecordData::A);
        let v6 = cfg.host_access6().filter(|_| named).map(RecordData::Aaaa);
        let alias: Vec<crate::config::StaticRecord> = v4
            .into_iter()
            .chain(v6)
            .map(|data| crate::config::StaticRecord {
                name: cfg.host_alias.clone(),
                data,
                ttl: LOCAL_TTL,
            })
            .collect();
        for r in cfg.records.iter().chain(&alias) {
            let (Some(name), Some(data)) = (self.record_name(&r.name), record_data(&r.data)) else {
                continue; // validated before; nothing to answer otherwise
            };
            self.records.entry(name).or_default().push((r.ttl, data));
        }
    }

    /// A single label lives under the domain; a dotted name is taken as written.
    fn record_name(&self, name: &str) -> Option<Name> {
        let n = Name::from_utf8(name.trim_end_matches('.')).ok()?.to_lowercase();
        let mut n = if n.num_labels() == 1 {
            n.append_domain(&self.domain).ok()?
        } else {
            n
        };
        n.set_fqdn(true);
        Some(n)
    }

    /// Points `label` at `ip` (replacing what either had).
    pub fn set(&mut self, label: &str, ip: Ipv4Addr) {
        let label = label.to_ascii_lowercase();
        if let Some(old) = self.names.insert(label.clone(), ip) {
            self.reverse.remove(&old);
        }
        if let Some(old_label) = self.reverse.insert(ip, label.clone()) {
            if old_label != label {
                self.names.remove(&old_label);
            }
        }
    }

    /// Points `label`'s AAAA at `ip` (replacing what either had).
    pub fn set6(&mut self, label: &str, ip: Ipv6Addr) {
        let label = label.to_ascii_lowercase();
        if let Some(old) = self.names6.insert(label.clone(), ip) {
            self.reverse6.remove(&old);
        }
        if let Some(old_label) = self.reverse6.insert(ip, label.clone()) {
            if old_label != label {
                self.names6.remove(&old_label);
            }
        }
    }

    /// Removes the name that holds `ip`, with its IPv6 address.
    pub fn remove_ip(&mut self, ip: Ipv4Addr) {
        if let Some(label) = self.reverse.remove(&ip) {
            self.names.remove(&label);
            if let Some(ip6) = self.names6.remove(&label) {
                self.reverse6.remove(&ip6);
            }
        }
    }

    pub fn lookup(&self, label: &str) -> Option<Ipv4Addr> {
        self.names.get(&label.to_ascii_lowercase()).copied()
    }

    pub fn lookup6(&self, label: &str) -> Option<Ipv6Addr> {
        self.names6.get(&label.to_ascii_lowercase()).copied()
    }

    fn known(&self, label: &str) -> bool {
        self.lookup(label).is_some() || self.lookup6(label).is_some()
    }

    fn fqdn(&self, label: &str) -> Option<Name> {
        Name::from_utf8(label).ok()?.append_domain(&self.domain).ok()
    }
}

/// What to do with a query.
#[derive(Debug)]
pub enum Decision {
    /// Send this response.
    Answer { bytes: Vec<u8>, nxdomain: bool },
    /// Not ours: forward it upstream. The question's name (lowercase) picks the
    /// upstream, so it is not parsed again.
    Forward { qname: Name },
}

/// A query that did not decode (or was not a query): it gets no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed DNS query")]
pub struct Malformed;

/// Decides a query.
pub fn decide(zone: &Zone, query: &[u8]) -> Result<Decision, Malformed> {
    let req = Message::from_vec(query).map_err(|_| Malformed)?;
    if req.metadata.message_type != MessageType::Query {
        return Err(Malformed);
    }
    if req.metadata.op_code != OpCode::Query {
        return Ok(respond(&req, ResponseCode::NotImp, vec![]));
    }
    let [q] = req.queries.as_slice() else {
        return Ok(respond(&req, ResponseCode::FormErr, vec![]));
    };
    let qname = q.name().to_lowercase();
    let qtype = q.query_type();

    // PTR for our own subnet and prefix.
    let reverse = match qname.parse_arpa_name() {
        Ok(ipnet::IpNet::V4(net)) if net.prefix_len() == 32 && zone.subnet.contains(&net.addr()) => {
            Some(zone.reverse.get(&net.addr()))
        }
        Ok(ipnet::IpNet::V6(net))
            if net.prefix_len() == 128 && zone.prefix6.is_some_and(|p| p.contains(&net.addr())) =>
        {
            Some(zone.reverse6.get(&net.addr()))
        }
        _ => None,
    };
    if let Some(label) = reverse {
        let answer = label.and_then(|l| zone.fqdn(l));
        return Ok(match (qtype, answer) {
            (RecordType::PTR, Some(target)) => {
                let rec = Record::from_rdata(q.name().clone(), LOCAL_TTL, RData::PTR(PTR(target)));
                respond(&req, ResponseCode::NoError, vec![rec])
            }
            (_, Some(_)) => respond(&req, ResponseCode::NoError, vec![]),
            (_, None) => respond(&req, ResponseCode::NXDomain, vec![]),
        });
    }

    if let Some(records) = zone.records.get(&{
        let mut n = qname.clone();
        n.set_fqdn(true);
        n
    }) {
        return Ok(respond(
            &req,
            ResponseCode::NoError,
            static_answers(zone, q.name(), qtype, records),
        ));
    }

    let label = if zone.domain.zone_of(&qname) && qname != zone.domain {
        let labels = qname.num_labels() - zone.domain.num_labels();
        if labels != 1 {
            return Ok(respond(&req, ResponseCode::NXDomain, vec![]));
        }
        qname.iter().next().map(|l| String::from_utf8_lossy(l).into_owned())
    } else if qname.num_labels() == 1 && zone.known(&String::from_utf8_lossy(qname.iter().next().unwrap_or_default())) {
        qname.iter().next().map(|l| String::from_utf8_lossy(l).into_owned())
    } else if qname == zone.domain {
        return Ok(respond(&req, ResponseCode::NoError, vec![]));
    } else {
        return Ok(Decision::Forward { qname });
    };
    let label = label.unwrap_or_default();
    if !zone.known(&label) {
        return Ok(respond(&req, ResponseCode::NXDomain, vec![]));
    }
    // A name without the asked type still exists: NOERROR with no data.
    let any = qtype == RecordType::ANY;
    let a = zone.lookup(&label).filter(|_| any || qtype == RecordType::A);
    let aaaa = zone.lookup6(&label).filter(|_| any || qtype == RecordType::AAAA);
    let answers = a
        .map(|ip| RData::A(A(ip)))
        .into_iter()
        .chain(aaaa.map(|ip| RData::AAAA(AAAA(ip))))
        .map(|d| Record::from_rdata(q.name().clone(), LOCAL_TTL, d))
        .collect();
    Ok(respond(&req, ResponseCode::NoError, answers))
}

/// The records of one name that answer `qtype`; a CNAME answers every type, followed
/// by its target's records when the target is local too (one step: no loops).
fn static_answers(zone: &Zone, qname: &Name, qtype: RecordType, records: &[(u32, RData)]) -> Vec<Record> {
    let matching = |recs: &[(u32, RData)], name: &Name| -> Vec<Record> {
        recs.iter()
            .filter(|(_, d)| qtype == RecordType::ANY || d.record_type() == qtype)
            .map(|(ttl, d)| Record::from_rdata(name.clone(), *ttl, d.clone()))
            .collect()
    };
    let direct = matching(records, qname);
    if !direct.is_empty() {
        return direct;
    }
    let Some((ttl, RData::CNAME(CNAME(target)))) = records.iter().find(|(_, d)| d.record_type() == RecordType::CNAME)
    else {
        return vec![];
    };
    let mut answers = vec![Record::from_rdata(
        qname.clone(),
        *ttl,
        RData::CNAME(CNAME(target.clone())),
    )];
    let target = target.to_lowercase();
    if let Some(recs) = zone.records.get(&target) {
        answers.extend(matching(recs, &target));
    } else if zone.domain.zone_of(&target) && target.num_labels() == zone.domain.num_labels() + 1 {
        let label = target
            .iter()
            .next()
            .map(|l| String::from_utf8_lossy(l).into_owned())
            .unwrap_or_default();
        if let (Some(ip), RecordType::A | RecordType::ANY) = (zone.lookup(&label), qtype) {
            answers.push(Record::from_rdata(target, LOCAL_TTL, RData::A(A(ip))));
        }
    }
    answers
}

fn record_data(d: &crate::config::RecordData) -> Option<RData> {
    use crate::config::RecordData as D;
    let fqdn = |t: &str| {
        let mut n = Name::from_utf8(t.trim_end_matches('.')).ok()?;
        n.set_fqdn(true);
        Some(n)
    };
    Some(match d {
        D::A(ip) => RData::A(A(*ip)),
        D::Aaaa(ip) => RData::AAAA(AAAA(*ip)),
        D::Cname(t) => RData::CNAME(CNAME(fqdn(t)?)),
        D::Txt(t) => RData::TXT(TXT::new(vec![t.clone()])),
        D::Srv {
            priority,
            weight,
            port,
            target,
        } => RData::SRV(SRV::new(*priority, *weight, *port, fqdn(target)?)),
    })
}

fn respond(req: &Message, code: ResponseCode, answers: Vec<Record>) -> Decision {
    let mut resp = Message::response(req.metadata.id, req.metadata.op_code);
    resp.metadata.authoritative = true;
    resp.metadata.recursion_desired = req.metadata.recursion_desired;
    resp.metadata.recursion_available = true;
    resp.metadata.response_code = code;
    resp.add_queries(req.queries.iter().cloned());
    resp.add_answers(answers);
    if req.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_PAYLOAD);
        resp.edns = Some(edns);
    }
    let nxdomain = code == ResponseCode::NXDomain;
    match resp.to_vec() {
        Ok(bytes) => Decision::Answer { bytes, nxdomain },
        Err(_) => Decision::Answer {
            bytes: servfail(&req.to_vec().unwrap_or_default()).unwrap_or_default(),
            nxdomain,
        },
    }
}

/// A SERVFAIL answer to `query`, when it decodes.
pub fn servfail(query: &[u8]) -> Option<Vec<u8>> {
    let req = Message::from_vec(query).ok()?;
    let mut resp = Message::error_msg(req.metadata.id, req.metadata.op_code, ResponseCode::ServFail);
    resp.metadata.recursion_desired = req.metadata.recursion_desired;
    resp.metadata.recursion_available = true;
    resp.add_queries(req.queries.iter().cloned());
    resp.to_vec().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;

    fn zone() -> Zone {
        let mut z = Zone::new("vm.internal", "10.77.0.0/24".parse().unwrap());
        z.set("gateway", Ipv4Addr::new(10, 77, 0, 1));
        z.set("web", Ipv4Addr::new(10, 77, 0, 5));
        z
    }

    fn query(name: &str, t: RecordType, edns: bool) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = 4242;
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_utf8(name).unwrap(), t));
        if edns {
            m.edns = Some(Edns::new());
        }
        m.to_vec().unwrap()
    }

    fn answer(z: &Zone, name: &str, t: RecordType) -> Message {
        match decide(z, &query(name, t, true)).unwrap() {
            Decision::Answer { bytes, .. } => Message::from_vec(&bytes).unwrap(),
            Decision::Forward { .. } => panic!("{name} was forwarded"),
        }
    }

    #[test]
    fn local_names_answer_with_their_address() {
        let z = zone();
        for name in ["web.vm.internal.", "WEB.vm.internal", "web"] {
            let m = answer(&z, name, RecordType::A);
            assert_eq!(m.metadata.response_code, ResponseCode::NoError);
            assert_eq!(m.metadata.id, 4242);
            assert!(m.edns.is_some(), "EDNS in, EDNS out");
            assert!(
                matches!(m.answers[0].data, RData::A(A(ip)) if ip == Ipv4Addr::new(10, 77, 0, 5)),
                "{name}"
            );
        }
        let aaaa = answer(&z, "web.vm.internal", RecordType::AAAA);
        assert_eq!(
            (aaaa.metadata.response_code, aaaa.answers.len()),
            (ResponseCode::NoError, 0)
        );
    }

    #[test]
    fn unknown_names_in_the_domain_are_nxdomain_never_forwarded() {
        let z = zone();
        for name in ["nope.vm.internal", "a.b.vm.internal"] {
            assert_eq!(
                answer(&z, name, RecordType::A).metadata.response_code,
                ResponseCode::NXDomain
            );
        }
        assert!(matches!(
            decide(&z, &query("example.com", RecordType::A, false)).unwrap(),
            Decision::Forward { .. }
        ));
        assert!(matches!(
            decide(&z, &query("unknownbare", RecordType::A, false)).unwrap(),
            Decision::Forward { .. }
        ));
    }

    #[test]
    fn reverse_lookups_for_the_subnet() {
        let z = zone();
        let m = answer(&z, "5.0.77.10.in-addr.arpa", RecordType::PTR);
        assert!(matches!(&m.answers[0].data, RData::PTR(PTR(n)) if n.to_utf8() == "web.vm.internal."));
        assert_eq!(
            answer(&z, "9.0.77.10.in-addr.arpa", RecordType::PTR)
                .metadata
                .response_code,
            ResponseCode::NXDomain
        );
        assert!(matches!(
            decide(&z, &query("1.1.168.192.in-addr.arpa", RecordType::PTR, false)).unwrap(),
            Decision::Forward { .. }
        ));
    }

    #[test]
    fn on_a_network_with_ipv6_names_have_aaaa_and_their_addresses_reverse_in_ip6_arpa() {
        let mut cfg = crate::GatewayConfig::new("n", "10.77.0.0/24".parse().unwrap());
        cfg.ipv6 = Some("fd00:77::/64".parse().unwrap());
        let mut z = zone();
        z.configure(&cfg);
        let web6: Ipv6Addr = "fd00:77::5054:ff:fe00:5".parse().unwrap();
        z.set6("web", web6);
        let m = answer(&z, "web.vm.internal", RecordType::AAAA);
        assert!(matches!(m.answers[..], [Record { data: RData::AAAA(AAAA(ip)), .. }] if ip == web6));
        let any = answer(&z, "web", RecordType::ANY);
        assert_eq!(any.answers.len(), 2, "A and AAAA: {any:?}");
        let arpa = |ip: Ipv6Addr| {
            let nibbles: Vec<String> = ip
                .octets()
                .iter()
                .rev()
                .flat_map(|b| [b & 0xf, b >> 4])
                .map(|n| format!("{n:x}"))
                .collect();
            format!("{}.ip6.arpa", nibbles.join("."))
        };
        let m = answer(&z, &arpa(web6), RecordType::PTR);
        assert!(matches!(&m.answers[0].data, RData::PTR(PTR(n)) if n.to_utf8() == "web.vm.internal."));
        let nobody = answer(&z, &arpa("fd00:77::9".parse().unwrap()), RecordType::PTR);
        assert_eq!(nobody.metadata.response_code, ResponseCode::NXDomain);
        assert!(matches!(
            decide(
                &z,
                &query(&arpa("2001:db8::1".parse().unwrap()), RecordType::PTR, false)
            )
            .unwrap(),
            Decision::Forward { .. }
        ));
        // A lease's end takes both addresses with the name.
        z.remove_ip(Ipv4Addr::new(10, 77, 0, 5));
        let gone = answer(&z, "web.vm.internal", RecordType::AAAA);
        assert_eq!(gone.metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(
            answer(&z, &arpa(web6), RecordType::PTR).metadata.response_code,
            ResponseCode::NXDomain
        );
    }

    #[test]
    fn garbage_does_not_decode() {
        let z = zone();
        assert!(decide(&z, b"").is_err());
        assert!(decide(&z, &[0xff; 5]).is_err());
        let mut q = query("web.vm.internal", RecordType::A, false);
        q.truncate(q.len() - 3);
        assert!(decide(&z, &q).is_err());
        // A header claiming 65535 questions with none present.
        let mut many = query("web.vm.internal", RecordType::A, false);
        many[4] = 0xff;
        many[5] = 0xff;
        assert!(decide(&z, &many).is_err());
    }

    #[test]
    fn renaming_moves_both_directions() {
        let mut z = zone();
        z.set("web2", Ipv4Addr::new(10, 77, 0, 5));
        assert_eq!(z.lookup("web"), None);
        z.remove_ip(Ipv4Addr::new(10, 77, 0, 5));
        assert_eq!(z.lookup("web2"), None);
    }

    #[test]
    fn static_records_and_the_host_alias_answer_locally() {
        use crate::config::{RecordData as D, StaticRecord};
        let mut cfg = crate::GatewayConfig::new("n", "10.77.0.0/24".parse().unwrap());
        cfg.host_access = Some(Ipv4Addr::new(10, 77, 0, 254));
        cfg.ipv6 = Some("fd00:77::/64".parse().unwrap());
        let rec = |name: &str, data| StaticRecord {
            name: name.into(),
            data,
            ttl: 120,
        };
        cfg.records = vec![
            rec("db", D::A(Ipv4Addr::new(10, 77, 0, 40))),
            rec("db", D::Aaaa("fd00::40".parse().unwrap())),
            rec("api.corp.example", D::A(Ipv4Addr::new(192, 0, 2, 7))),
            rec("www", D::Cname("web.vm.internal".into())),
            rec("db", D::Txt("primary".into())),
            rec(
                "_pg._tcp.vm.internal",
                D::Srv {
                    priority: 1,
                    weight: 2,
                    port: 5432,
                    target: "db.vm.internal".into(),
                },
            ),
        ];
        cfg.validate().unwrap();
        let mut z = zone();
        z.configure(&cfg);
        let a = answer(&z, "db.vm.internal", RecordType::A);
        assert!(
            matches!(a.answers[..], [ref r] if r.data == RData::A(A(Ipv4Addr::new(10, 77, 0, 40))) && r.ttl == 120)
        );
        assert!(matches!(
            answer(&z, "db.vm.internal", RecordType::AAAA).answers[0].data,
            RData::AAAA(_)
        ));
        assert!(matches!(
            answer(&z, "db.vm.internal", RecordType::TXT).answers[0].data,
            RData::TXT(_)
        ));
        assert!(matches!(
            answer(&z, "api.corp.example", RecordType::A).answers[0].data,
            RData::A(_)
        ));
        let srv = answer(&z, "_pg._tcp.vm.internal", RecordType::SRV);
        assert!(matches!(&srv.answers[0].data, RData::SRV(s) if s.port == 5432));
        // A CNAME to a VM's name answers with both records.
        let www = answer(&z, "www.vm.internal", RecordType::A);
        assert!(matches!(www.answers[0].data, RData::CNAME(_)));
        assert!(matches!(www.answers[1].data, RData::A(A(ip)) if ip == Ipv4Addr::new(10, 77, 0, 5)));
        let host = answer(&z, "host.vm.internal", RecordType::A);
        assert!(matches!(host.answers[0].data, RData::A(A(ip)) if ip == Ipv4Addr::new(10, 77, 0, 254)));
        let host6 = answer(&z, "host.vm.internal", RecordType::AAAA);
        let want6: std::net::Ipv6Addr = "fd00:77::2".parse().unwrap();
        assert!(
            matches!(host6.answers[..], [ref r] if r.data == RData::AAAA(want6.into())),
            "{host6:?}"
        );
        // VMs' names survive a new configuration; a removed record is gone.
        cfg.records.clear();
        cfg.host_alias.clear();
        z.configure(&cfg);
        assert_eq!(
            answer(&z, "db.vm.internal", RecordType::A).metadata.response_code,
            ResponseCode::NXDomain
        );
        assert_eq!(
            answer(&z, "host.vm.internal", RecordType::A).metadata.response_code,
            ResponseCode::NXDomain
        );
        assert_eq!(answer(&z, "web.vm.internal", RecordType::A).answers.len(), 1);
    }

    #[test]
    fn forwarders_take_their_domains_longest_first() {
        use crate::config::Forwarder;
        let srv = |s: &str| vec![s.parse::<std::net::SocketAddr>().unwrap()];
        let fw = vec![
            Forwarder {
                domain: "corp.example".into(),
                servers: srv("10.1.2.3:53"),
            },
            Forwarder {
                domain: "lab.corp.example".into(),
                servers: srv("10.1.2.4:53"),
            },
        ];
        let default = srv("127.0.0.1:53");
        let pick = |name: &str| {
            crate::upstream::servers_for(&fw, &Name::from_utf8(name).unwrap().to_lowercase(), default.clone())
        };
        assert_eq!(pick("a.corp.example"), srv("10.1.2.3:53"));
        assert_eq!(pick("X.Lab.corp.example."), srv("10.1.2.4:53"));
        assert_eq!(pick("example.com"), default);
        assert_eq!(pick("notcorp.example"), default);
    }
}
