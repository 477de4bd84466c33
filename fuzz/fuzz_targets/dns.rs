//! DNS: local answers for a zone, and the check that an upstream's answer matches
//! its question. The first byte splits the input into a query and an answer.
#![no_main]

use gateway::dns::Zone;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let split = usize::from(split).min(rest.len());
    let (query, answer) = rest.split_at(split);
    let mut zone = Zone::new("vm.internal", "10.9.0.0/24".parse().unwrap());
    zone.set("web", std::net::Ipv4Addr::new(10, 9, 0, 2));
    let _ = gateway::dns::decide(&zone, rest);
    let _ = gateway::dns::decide(&zone, query);
    let id = [query.first().copied().unwrap_or(0), query.get(1).copied().unwrap_or(0)];
    let _ = gateway::upstream::is_answer_to(query, answer, id);
});
