use super::*;

#[test]
fn the_table_holds_masquerade_dnat_and_isolation() {
    let nets = vec![
        NetworkRules {
            bridge: "vmfbr0".into(),
            subnet: "10.70.0.0/24".parse().unwrap(),
            router: "10.70.0.1".parse().unwrap(),
            egress: Egress::default(),
            ipv6: None,
            flows_per_guest: Some(1536),
            tunnel: None,
            forwards: vec![Forward {
                proto: "tcp".into(),
                host: "0.0.0.0:8080".parse().unwrap(),
                guest: "10.70.0.2:80".parse().unwrap(),
            }],
            locked_ports: vec![PortLock {
                ifname: "vmft0".into(),
                mac: fabric::Mac::derived(&["t", "p"]),
                ips: vec!["10.70.0.2".parse().unwrap()],
                ips6: vec![],
            }],
        },
        NetworkRules {
            bridge: "vmfbr1".into(),
            subnet: "10.71.0.0/24".parse().unwrap(),
            router: "10.71.0.1".parse().unwrap(),
            egress: Egress::default(),
            ipv6: None,
            flows_per_guest: None,
            tunnel: None,
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

#[test]
fn a_network_with_ipv6_gets_its_rules_for_both_versions() {
    let target: Ipv6Addr = "fd00:70::5054:ff:fe00:1".parse().unwrap();
    let net = NetworkRules {
        bridge: "vmfbr6".into(),
        subnet: "10.70.0.0/24".parse().unwrap(),
        router: "10.70.0.1".parse().unwrap(),
        egress: Egress {
            rules: vec![EgressRule {
                allow: false,
                dst: "fd99::/64".parse().unwrap(),
                proto: Some(L4::Tcp),
                ports: Some((8080, 8080)),
            }],
            default_allow: true,
        },
        ipv6: Some("fd00:70::/64".parse().unwrap()),
        flows_per_guest: Some(100),
        tunnel: None,
        forwards: vec![],
        locked_ports: vec![PortLock {
            ifname: "vmft6".into(),
            mac: fabric::Mac::derived(&["t", "p6"]),
            ips: vec![],
            ips6: vec![target],
        }],
    };
    let json = ruleset_json("vmfabric_t", &[net]).unwrap().to_string();
    assert!(
        json.contains("{\"match\":{\"left\":{\"payload\":{\"field\":\"saddr\",\"protocol\":\"ip6\"}},\"op\":\"==\",\"right\":{\"prefix\":{\"addr\":\"fd00:70::\",\"len\":64}}}}"),
        "NAT66 of the prefix: {json}"
    );
    assert_eq!(json.matches("\"masquerade\"").count(), 3, "v4, loopback and v6: {json}");
    // Each version's flows in a set of its own, each bounded.
    assert!(
        json.contains("\"name\":\"flows6_vmfbr6\"") && json.contains("\"type\":\"ipv6_addr\""),
        "{json}"
    );
    assert_eq!(
        json.matches("{\"ct count\":{\"inv\":true,\"val\":100}}").count(),
        4,
        "{json}"
    );
    assert!(json.contains("\"set\":\"@flows6_vmfbr6\""), "{json}");
    // The IPv6 policy rule, the router's ping and its Neighbour Discovery.
    assert!(json.contains("\"addr\":\"fd99::\""), "{json}");
    assert!(json.contains("\"right\":\"fd00:70::1\""), "{json}");
    // The port: its sources, the RA guard, no DHCPv6 server, its own targets only
    // (the raw target as the integer nft compares).
    assert!(
        json.contains("\"nd-router-advert\"") && json.contains("\"nd-redirect\""),
        "{json}"
    );
    assert!(json.contains("\"right\":547"), "{json}");
    assert!(json.contains(&format!("\"{:#034x}\"", u128::from(target))), "{json}");
    assert!(json.contains("\"0xfd00007000000000505400fffe000001\""), "{json}");
    assert!(
        !json.contains("\"right\":34525"),
        "IPv6 is not dropped wholesale at the port: {json}"
    );
}
