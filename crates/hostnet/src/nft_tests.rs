use super::*;

#[test]
fn the_table_holds_masquerade_dnat_and_isolation() {
    let nets = vec![
        NetworkRules {
            bridge: "vmfbr0".into(),
            subnet: "10.70.0.0/24".parse().unwrap(),
            router: "10.70.0.1".parse().unwrap(),
            egress: Egress::default(),
            ipv6: false,
            flows_per_guest: Some(1536),
            forwards: vec![Forward {
                proto: "tcp".into(),
                host: "0.0.0.0:8080".parse().unwrap(),
                guest: "10.70.0.2:80".parse().unwrap(),
            }],
            locked_ports: vec![PortLock {
                ifname: "vmft0".into(),
                mac: fabric::Mac::derived(&["t", "p"]),
                ips: vec!["10.70.0.2".parse().unwrap()],
            }],
        },
        NetworkRules {
            bridge: "vmfbr1".into(),
            subnet: "10.71.0.0/24".parse().unwrap(),
            router: "10.71.0.1".parse().unwrap(),
            egress: Egress::default(),
            ipv6: false,
            flows_per_guest: None,
            forwards: vec![],
            locked_ports: vec![],
        },
    ];
    let json = ruleset_json("vmfabric_t", &nets).unwrap().to_string();
    assert_eq!(
        json.matches("\"masquerade\"").count(),
        4,
        "subnet and loopback, each network: {json}"
    );
    assert!(json.contains("\"dnat\""), "{json}");
    assert!(
        !json.contains("\"vmfabric\"") && json.contains("\"table\":\"vmfabric_t\""),
        "every object is in the instance's table: {json}"
    );
    assert_eq!(
        json.matches("\"drop\"").count(),
        5 + 2 + 2,
        "the lock's MAC, VLAN, IP, ARP and IPv6 rules, each bridge's loopback guard and quiet broadcasts"
    );
    assert_eq!(
        json.matches("\"reject\"").count(),
        2 * (2 + 4 + 2) + 2,
        "each network, TCP and the rest: link-local, the other bridge and subnet, the host; \
         and the first network's flow bound"
    );
    // The bound: a dynamic set of guest addresses in the instance's table, and each of
    // the two rules adding to it carries its `ct count`.
    assert_eq!(
        json.matches("{\"ct count\":{\"inv\":true,\"val\":1536}}").count(),
        2,
        "{json}"
    );
    assert!(json.contains("\"set\":\"@flows_vmfbr0\""), "{json}");
    assert!(json.contains("\"name\":\"flows_vmfbr0\""), "{json}");
    assert!(
        !json.contains("flows_vmfbr1"),
        "an unbounded network has no set: {json}"
    );
    let bad = vec![NetworkRules {
        forwards: vec![Forward {
            proto: "sctp".into(),
            ..nets[0].forwards[0].clone()
        }],
        ..nets[0].clone()
    }];
    assert!(ruleset("vmfabric_t", &bad).is_err());
}
