use super::*;

#[test]
fn names_and_mtus_are_checked_when_read() {
    assert!(serde_json::from_str::<Name>("\"net-1.a_b\"").is_ok());
    for bad in ["\"\"", "\"-x\"", "\".x\"", "\"a/b\"", "\"a?b\""] {
        assert!(serde_json::from_str::<Name>(bad).is_err(), "{bad}");
    }
    assert!(serde_json::from_str::<Name>(&format!("\"{}\"", "n".repeat(Name::MAX + 1))).is_err());
    assert_eq!(serde_json::from_str::<Mtu>("9000").unwrap().get(), 9000);
    for bad in ["67", "65521", "70000"] {
        let e = serde_json::from_str::<Mtu>(bad).unwrap_err().to_string();
        assert!(e.contains("outside 68..=65520"), "{e}");
    }
}

#[test]
fn policy_text_is_what_the_api_always_took() {
    let json = r#"{"default":"deny","rules":[{"action":"allow","dst":"10.0.0.0/8","ports":"53","proto":"udp"},{"action":"deny","dst":"0.0.0.0/0","ports":"1000-2000"}]}"#;
    let p: PolicySpec = serde_json::from_str(json).unwrap();
    assert_eq!(serde_json::to_string(&p).unwrap(), json);
    assert_eq!(p.rules[1].ports, Some(PortRange { lo: 1000, hi: 2000 }));
    assert!(serde_json::from_str::<PolicySpec>(r#"{"default":"maybe"}"#).is_err());
    assert!(serde_json::from_str::<RuleSpec>(r#"{"action":"allow","dst":"1.0.0.0/8","ports":"9-3"}"#).is_err());
    assert_eq!(serde_json::from_str::<PolicySpec>("{}").unwrap().default, Action::Allow);
}

#[test]
fn forwards_default_to_tcp() {
    let f: ForwardSpec = serde_json::from_str(r#"{"host":"127.0.0.1:0","guest":"10.0.0.5:80"}"#).unwrap();
    assert_eq!(f.proto, ForwardProto::Tcp);
    assert!(
        serde_json::from_str::<ForwardSpec>(r#"{"proto":"sctp","host":"127.0.0.1:0","guest":"10.0.0.5:80"}"#).is_err()
    );
}
