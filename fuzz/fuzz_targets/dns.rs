//! DNS: answers for a zone with VM names and every kind of static record (A, AAAA,
//! CNAME chased locally and not, TXT, SRV, the host alias), the upstream choice for a
//! forwarded name, and the check that an upstream's answer matches its question. The
//! first byte splits the input into a query and an answer.
#![no_main]

use std::sync::OnceLock;

use gateway::config::{Forwarder, RecordData, StaticRecord};
use gateway::dns::{Decision, Zone};
use gateway::GatewayConfig;
use libfuzzer_sys::fuzz_target;

fn config() -> &'static GatewayConfig {
    static CFG: OnceLock<GatewayConfig> = OnceLock::new();
    CFG.get_or_init(|| {
        let mut cfg = GatewayConfig::new("fuzz", "10.9.0.0/24".parse().unwrap());
        cfg.host_access = Some(cfg.default_host_access());
        let record = |name: &str, data| StaticRecord {
            name: name.into(),
            data,
            ttl: 60,
        };
        cfg.records = vec![
            record("db", RecordData::A("10.9.0.40".parse().unwrap())),
            record("db", RecordData::Aaaa("fd00::40".parse().unwrap())),
            record("www", RecordData::Cname("db.vm.internal".into())),
            record("out", RecordData::Cname("example.com".into())),
            record("note", RecordData::Txt("v=fuzz".into())),
            record(
                "_http._tcp",
                RecordData::Srv {
                    priority: 1,
                    weight: 2,
                    port: 80,
                    target: "www".into(),
                },
            ),
            record("api.corp.example", RecordData::A("10.1.2.5".parse().unwrap())),
        ];
        cfg.forwarders = vec![Forwarder {
            domain: "corp.example".into(),
            servers: vec!["10.1.2.3:53".parse().unwrap()],
        }];
        cfg
    })
}

fn zone() -> &'static Zone {
    static ZONE: OnceLock<Zone> = OnceLock::new();
    ZONE.get_or_init(|| {
        let cfg = config();
        let mut zone = Zone::new(&cfg.domain, cfg.subnet);
        zone.configure(cfg);
        zone.set("web", std::net::Ipv4Addr::new(10, 9, 0, 2));
        zone
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let split = usize::from(split).min(rest.len());
    let (query, answer) = rest.split_at(split);
    for q in [rest, query] {
        if let Ok(Decision::Forward { qname }) = gateway::dns::decide(zone(), q) {
            let _ = gateway::upstream::servers_for(&config().forwarders, &qname, vec![]);
        }
    }
    let id = [query.first().copied().unwrap_or(0), query.get(1).copied().unwrap_or(0)];
    let _ = gateway::upstream::is_answer_to(query, answer, id);
});
