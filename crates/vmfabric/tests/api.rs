//! The API contract: every route, its errors, and state surviving a restart. The daemon
//! runs in-process on a temporary socket and state directory.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use harness::Running;
use serde_json::{json, Value};
use vmfabric::{client, control::Control};

mod harness;

fn start(dir: &Path) -> Running {
    harness::start(dir, None)
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vmf-api-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn every_route_and_its_errors() {
    let dir = tmp("routes");
    let d = start(&dir);
    // The embedded default.
    let (s, nets) = d.call("GET", "/v1/networks", None);
    assert_eq!(s, 200);
    assert_eq!(nets[0]["name"], "default");
    assert_eq!(nets[0]["subnet"], "10.77.0.0/24");

    let (s, v) = d.call(
        "POST",
        "/v1/networks",
        Some(json!({"name": "blue", "subnet": "10.88.0.0/24"})),
    );
    assert_eq!((s, v["name"].as_str()), (201, Some("blue")));
    let (s, v) = d.call(
        "POST",
        "/v1/networks",
        Some(json!({"name": "blue", "subnet": "10.89.0.0/24"})),
    );
    assert_eq!((s, v["error"].as_str()), (409, Some("conflict")));
    let (s, v) = d.call(
        "POST",
        "/v1/networks",
        Some(json!({"name": "green", "subnet": "10.88.0.128/25"})),
    );
    assert!(s == 409 && v["message"].as_str().unwrap().contains("overlaps"), "{v}");
    let (s, v) = d.call(
        "POST",
        "/v1/networks",
        Some(json!({"name": "x", "subnet": "10.90.0.0/24", "colour": 1})),
    );
    assert!(
        s == 400 && v["message"].as_str().unwrap().contains("colour"),
        "unknown fields are refused: {v}"
    );
    let (s, _) = d.call("POST", "/v1/networks", Some(json!("not an object")));
    assert_eq!(s, 400);
    let (s, v) = d.call(
        "POST",
        "/v1/networks",
        Some(json!({"name": "-bad", "subnet": "10.91.0.0/24"})),
    );
    assert_eq!((s, v["error"].as_str()), (400, Some("bad_request")));
    let (s, v) = d.call(
        "POST",
        "/v1/networks",
        Some(json!({"name": "tiny", "subnet": "10.92.0.0/31"})),
    );
    assert_eq!(s, 400, "{v}");
    // Subnets no network can live on are refused before anything is made (a multicast
    // one used to panic inside smoltcp and leave the name half-taken).
    for subnet in [
        "224.0.0.0/24",
        "127.0.0.0/24",
        "169.254.0.0/24",
        "10.93.0.5/24",
        "10.93.0.0/29",
        "240.0.0.0/24",
    ] {
        let (s, v) = d.call("POST", "/v1/networks", Some(json!({"name": "odd", "subnet": subnet})));
        assert_eq!((s, v["error"].as_str()), (400, Some("bad_request")), "{subnet}: {v}");
    }
    let (s, v) = d.call(
        "POST",
        "/v1/networks",
        Some(json!({"name": "odd", "subnet": "10.93.0.0/28"})),
    );
    assert_eq!(s, 201, "the name is free and a /28 is enough: {v}");
    let (s, _) = d.call("DELETE", "/v1/networks/odd", None);
    assert!((200..300).contains(&s));
    let (s, v) = d.call("GET", "/v1/networks/nope", None);
    assert_eq!((s, v["error"].as_str()), (404, Some("not_found")));

    let (s, port) = d.call(
        "POST",
        "/v1/networks/blue/ports",
        Some(json!({"name": "vm1", "kind": "unixgram"})),
    );
    assert_eq!(s, 201, "{port}");
    assert!(port["qemu_args"].as_str().unwrap().contains("-netdev dgram"));
    assert!(Path::new(port["path"].as_str().unwrap()).exists(), "the port listens");
    let (s, _) = d.call(
        "POST",
        "/v1/networks/blue/ports",
        Some(json!({"name": "vm1", "kind": "stream"})),
    );
    assert_eq!(s, 409);
    let (s, _) = d.call(
        "POST",
        "/v1/networks/blue/ports",
        Some(json!({"name": "vm2", "kind": "carrier-pigeon"})),
    );
    assert_eq!(s, 400);
    let (s, _) = d.call(
        "POST",
        "/v1/networks/nope/ports",
        Some(json!({"name": "vm2", "kind": "stream"})),
    );
    assert_eq!(s, 404);
    let (s, ports) = d.call("GET", "/v1/networks/blue/ports", None);
    assert_eq!((s, ports.as_array().unwrap().len()), (200, 1));
    let (s, leases) = d.call("GET", "/v1/networks/blue/leases", None);
    assert_eq!((s, leases), (200, json!([])));
    let (s, flows) = d.call("GET", "/v1/networks/blue/flows", None);
    assert_eq!((s, flows), (200, json!({"tcp": [], "udp": []})));
    let (s, _) = d.call("GET", "/v1/networks/nope/flows", None);
    assert_eq!(s, 404);
    let (s, m) = d.call("GET", "/metrics", None);
    assert!(
        s == 200
            && m.as_str()
                .unwrap()
                .contains("vmfabric_port_frames_total{network=\"blue\",port=\"vm1\",direction=\"rx\"} 0")
    );

    let (s, _) = d.call("DELETE", "/v1/networks/blue", None);
    assert_eq!(s, 409, "a network with ports is not deleted without force");
    let (s, _) = d.call("DELETE", "/v1/networks/blue/ports/nope", None);
    assert_eq!(s, 404);
    let (s, _) = d.call("DELETE", "/v1/networks/blue/ports/vm1", None);
    assert_eq!(s, 204);
    assert!(
        !Path::new(port["path"].as_str().unwrap()).exists(),
        "its socket is gone"
    );
    let (s, _) = d.call(
        "POST",
        "/v1/networks/blue/ports",
        Some(json!({"name": "vm3", "kind": "stream"})),
    );
    assert_eq!(s, 201);
    let (s, _) = d.call("DELETE", "/v1/networks/blue?force=true", None);
    assert_eq!(s, 204);
    let (s, _) = d.call("GET", "/v1/nothing/here", None);
    assert_eq!(s, 404);
    d.stop();
}

#[test]
fn networks_and_ports_survive_a_restart() {
    let dir = tmp("restart");
    let d = start(&dir);
    d.call(
        "POST",
        "/v1/networks",
        Some(json!({"name": "red", "subnet": "10.66.0.0/24", "mtu": 9000})),
    );
    let (_, port) = d.call(
        "POST",
        "/v1/networks/red/ports",
        Some(json!({"name": "db", "kind": "stream"})),
    );
    d.stop();
    // A second daemon on the same state comes back with the same network and port.
    let _ = std::fs::remove_file(dir.join("api.sock"));
    let d = start(&dir);
    let (_, red) = d.call("GET", "/v1/networks/red", None);
    assert_eq!((red["mtu"].as_u64(), red["ports"].as_u64()), (Some(9000), Some(1)));
    let (_, ports) = d.call("GET", "/v1/networks/red/ports", None);
    assert_eq!(ports[0]["mac"], port["mac"], "same MAC");
    assert_eq!(ports[0]["path"], port["path"], "same path");
    assert!(
        std::os::unix::net::UnixStream::connect(port["path"].as_str().unwrap()).is_ok(),
        "listening again"
    );
    d.stop();
}

/// One DHCP exchange from a client on a socketpair port of `network`: DISCOVER and
/// REQUEST, or with `reboot` an INIT-REBOOT REQUEST for that address. Returns the ACKed
/// address.
fn dhcp(
    daemon: &Control,
    network: &str,
    client: fabric::Mac,
    reboot: Option<std::net::Ipv4Addr>,
) -> std::net::Ipv4Addr {
    use dhcproto::v4::{self, DhcpOption, MessageType};
    use dhcproto::{Decodable, Decoder, Encodable};
    use gateway::wire::{self, Inbound};
    use std::net::Ipv4Addr;
    let (port, fd) = daemon.switch().add_port(network, "dhcp-client").unwrap();
    // A port made past the control plane is born sealed like every port of a locked
    // network: it is locked to its MAC here, as the control plane would.
    let lock = fabric::PortLock {
        mac: client,
        ips: vec![],
        ips6: vec![],
    };
    daemon.switch().lock_port(port, Some(lock)).unwrap();
    let sock = std::os::unix::net::UnixDatagram::from(fd);
    sock.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    let z = Ipv4Addr::UNSPECIFIED;
    let send = |kind: MessageType, opts: Vec<DhcpOption>| {
        let mut m = v4::Message::new_with_id(77, z, z, z, z, &client.0);
        m.opts_mut().insert(DhcpOption::MessageType(kind));
        for o in opts {
            m.opts_mut().insert(o);
        }
        let f = wire::udp_frame(
            client,
            fabric::Mac::BROADCAST,
            (z, 68),
            (Ipv4Addr::BROADCAST, 67),
            &m.to_vec().unwrap(),
        );
        sock.send(&f).unwrap();
    };
    let recv = || loop {
        let mut buf = [0u8; 2048];
        let n = sock.recv(&mut buf).expect("a DHCP answer");
        if let Ok(Inbound::Udp {
            src_port: 67, payload, ..
        }) = wire::classify(&buf[..n])
        {
            return v4::Message::decode(&mut Decoder::new(payload)).unwrap();
        }
    };
    let wanted = match reboot {
        Some(ip) => ip,
        None => {
            send(MessageType::Discover, vec![]);
            recv().yiaddr()
        }
    };
    let mut opts = vec![DhcpOption::RequestedIpAddress(wanted)];
    if reboot.is_none() {
        opts.push(DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 66, 0, 1)));
    }
    send(MessageType::Request, opts);
    let ack = recv();
    assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
    daemon.switch().remove_port(port).unwrap();
    ack.yiaddr()
}

#[test]
fn reservations_apply_to_the_next_lease_and_survive_a_restart() {
    let dir = tmp("reservations");
    let d = start(&dir);
    d.call(
        "POST",
        "/v1/networks",
        Some(json!({"name": "red", "subnet": "10.66.0.0/24"})),
    );
    let mac = "02:aa:bb:cc:dd:01";
    let (s, _) = d.call(
        "POST",
        "/v1/networks/red/reservations",
        Some(json!({"key": mac, "ip": "10.66.0.77"})),
    );
    assert_eq!(s, 201);
    let (s, v) = d.call(
        "POST",
        "/v1/networks/red/reservations",
        Some(json!({"key": "db", "ip": "10.66.0.77"})),
    );
    assert_eq!(s, 409, "one address, one reservation: {v}");
    let (s, _) = d.call(
        "POST",
        "/v1/networks/red/reservations",
        Some(json!({"key": "db", "ip": "10.67.0.1"})),
    );
    assert_eq!(s, 400, "outside the subnet");
    let (s, _) = d.call(
        "POST",
        "/v1/networks/red/reservations",
        Some(json!({"key": "db", "ip": "10.66.0.1"})),
    );
    assert_eq!(s, 400, "the gateway's own address");
    let client: fabric::Mac = mac.parse().unwrap();
    assert_eq!(
        dhcp(&d.daemon, "red", client, None),
        "10.66.0.77".parse::<std::net::Ipv4Addr>().unwrap()
    );
    d.stop();
    let _ = std::fs::remove_file(dir.join("api.sock"));
    let d = start(&dir);
    let (_, v) = d.call("GET", "/v1/networks/red/reservations", None);
    assert_eq!(v, json!([{"key": mac, "ip": "10.66.0.77"}]));
    let (s, _) = d.call("DELETE", &format!("/v1/networks/red/reservations/{mac}"), None);
    assert_eq!(s, 204);
    let (s, _) = d.call("DELETE", "/v1/networks/red/reservations/nobody", None);
    assert_eq!(s, 404);
    d.stop();
}

#[test]
fn leases_survive_a_restart_and_a_renewing_client_keeps_its_address() {
    let dir = tmp("leases");
    let d = start(&dir);
    d.call(
        "POST",
        "/v1/networks",
        Some(json!({"name": "red", "subnet": "10.66.0.0/24"})),
    );
    let client = fabric::Mac([0x02, 0x11, 0x22, 0x33, 0x44, 0x55]);
    let ip = dhcp(&d.daemon, "red", client, None);
    // Someone else takes the next address, so a forgetful server would hand out another.
    let other = dhcp(&d.daemon, "red", fabric::Mac([0x02, 0, 0, 0, 0, 9]), None);
    assert_ne!(ip, other);
    d.stop();
    let _ = std::fs::remove_file(dir.join("api.sock"));
    let d = start(&dir);
    let (_, leases) = d.call("GET", "/v1/networks/red/leases", None);
    assert_eq!(leases.as_array().unwrap().len(), 2, "{leases}");
    assert_eq!(
        dhcp(&d.daemon, "red", client, Some(ip)),
        ip,
        "the renewing client keeps its address"
    );
    assert_eq!(
        dhcp(&d.daemon, "red", client, None),
        ip,
        "and a fresh DISCOVER finds it too"
    );
    d.stop();
}

#[test]
fn a_subnet_over_a_host_route_needs_force() {
    // A route a network could sit on (another test's point-to-point /30 could not).
    let usable = vmfabric::hostroutes::routes()
        .into_iter()
        .find(|(r, _)| r.prefix_len() <= 28);
    let Some((route, iface)) = usable else {
        eprintln!("SKIP a_subnet_over_a_host_route_needs_force: this host has no route but the default one");
        return;
    };
    let dir = tmp("routes-overlap");
    let d = start(&dir);
    let body = json!({"name": "shadow", "subnet": route.to_string(), "gateway": false});
    let (s, v) = d.call("POST", "/v1/networks", Some(body.clone()));
    assert!(s == 409 && v["message"].as_str().unwrap().contains(&iface), "{v}");
    let (s, _) = d.call("POST", "/v1/networks?force=true", Some(body));
    assert_eq!(s, 201);
    d.stop();
}

#[test]
fn tap_ports_over_the_api() {
    if !rustix::process::geteuid().is_root() || !Path::new("/dev/net/tun").exists() {
        assert!(
            std::env::var("VMFABRIC_REQUIRE_ALL_TESTS").as_deref() != Ok("1"),
            "must run here: needs root"
        );
        eprintln!("SKIP tap_ports_over_the_api: needs root and /dev/net/tun");
        return;
    }
    let dir = tmp("tap");
    let d = start(&dir);
    let ifname = format!("vt{}", std::process::id() % 100_000);
    let (s, v) = d.call(
        "POST",
        "/v1/networks/default/ports",
        Some(json!({"name": "fc1", "kind": "tap", "ifname": ifname})),
    );
    assert_eq!(s, 201, "{v}");
    // The daemon holds a userspace network's TAP: no VMM line, a note saying what the
    // port is for instead.
    assert_eq!(v["qemu_args"], "", "{v}");
    assert!(v["vmm"]["qemu"].is_null() && v["vmm"]["firecracker"].is_null(), "{v}");
    assert!(v["vmm"]["note"].as_str().unwrap().contains(&ifname), "{v}");
    let exists = || {
        std::process::Command::new("ip")
            .args(["link", "show", &ifname])
            .output()
            .unwrap()
            .status
            .success()
    };
    assert!(exists(), "the device exists");
    let (s, _) = d.call(
        "POST",
        "/v1/networks/default/ports",
        Some(json!({"name": "x", "kind": "stream", "ifname": "y"})),
    );
    assert_eq!(s, 400, "ifname is for TAP ports only");
    let (s, _) = d.call("DELETE", "/v1/networks/default/ports/fc1", None);
    assert_eq!(s, 204);
    assert!(!exists(), "removing the port removes its device");
    d.stop();
}

#[test]
fn fifty_clients_at_once_lose_and_duplicate_nothing() {
    let dir = tmp("concurrent");
    let d = Arc::new(start(&dir));
    let run = |f: &(dyn Fn(usize) -> u16 + Sync)| -> Vec<u16> {
        std::thread::scope(|s| {
            let hs: Vec<_> = (0..50).map(|i| s.spawn(move || f(i))).collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    };
    let socket = d.socket.clone();
    let call = |method: &str, path: String, body: Option<Value>| -> u16 {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(client::call(&socket, method, &path, body)).unwrap().0
    };
    let created = run(&|i| {
        call(
            "POST",
            "/v1/networks/default/ports".into(),
            Some(json!({"name": format!("p{i}"), "kind": "stream"})),
        )
    });
    assert!(created.iter().all(|s| *s == 201), "{created:?}");
    let (_, ports) = d.call("GET", "/v1/networks/default/ports", None);
    assert_eq!(ports.as_array().unwrap().len(), 50);
    // The same name fifty times: exactly one wins.
    let same = run(&|_| {
        call(
            "POST",
            "/v1/networks/default/ports".into(),
            Some(json!({"name": "same", "kind": "unixgram"})),
        )
    });
    assert_eq!(same.iter().filter(|s| **s == 201).count(), 1, "{same:?}");
    assert!(same.iter().all(|s| *s == 201 || *s == 409), "{same:?}");
    let deleted = run(&|i| call("DELETE", format!("/v1/networks/default/ports/p{i}"), None));
    assert!(deleted.iter().all(|s| *s == 204), "{deleted:?}");
    let (_, ports) = d.call("GET", "/v1/networks/default/ports", None);
    assert_eq!(ports.as_array().unwrap().len(), 1, "{ports}");
    match Arc::try_unwrap(d) {
        Ok(d) => d.stop(),
        Err(_) => panic!("still shared"),
    }
}

#[test]
fn the_openapi_document_matches_the_routes() {
    let dir = tmp("openapi");
    let d = start(&dir);
    let (s, doc) = d.call("GET", "/v1/openapi.json", None);
    assert_eq!(s, 200);
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() >= 7);
    let methods = ["get", "post", "delete", "put", "patch"];
    for (path, item) in paths {
        let mut concrete = path
            .replace("{name}", "default")
            .replace("{port}", "nope")
            .replace("{key}", "nope")
            .replace("{host}", "127.0.0.1:1");
        if path.ends_with("/capture") {
            concrete.push_str("?port=nope"); // a real capture would stream until closed
        }
        if path == "/v1/events" {
            // A stream that never ends: its head says it is served.
            let head = d.stream_head(path);
            assert!(
                head.starts_with("HTTP/1.1 200") && head.contains("application/x-ndjson"),
                "{head}"
            );
            continue;
        }
        for m in methods {
            let documented = item.get(m).is_some();
            let body = (m == "post").then(|| json!({}));
            let (status, v) = d.call(&m.to_uppercase(), &concrete, body);
            if documented {
                assert!(
                    status != 405 && !v["message"].as_str().unwrap_or("").contains("no such route"),
                    "{m} {path} is documented but not served ({status} {v})"
                );
            } else {
                assert_eq!(status, 405, "{m} {path} is served but not documented ({v})");
            }
        }
    }
    d.stop();
}

#[test]
fn a_socketpair_port_hands_its_vm_end_over_the_api_socket() {
    let dir = tmp("socketpair");
    let d = start(&dir);
    let spec = vmfabric::model::SocketpairSpec {
        name: vmfabric::model::Name::new("port", "vz1").unwrap(),
        mac: None,
        learn_mac_once: false,
    };
    let (port, fd) =
        d.rt.block_on(client::socketpair_port(&d.socket, "default", &spec))
            .unwrap();
    assert_eq!(port.record.kind, vmfabric::model::PortKind::Socketpair);
    assert!(port.qemu_args.contains("local.type=fd"));
    let vm = std::os::unix::net::UnixDatagram::from(fd);
    let (_, other) = d.daemon.switch().add_port("default", "observer").unwrap();
    let other = std::os::unix::net::UnixDatagram::from(other);
    other
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    // The VM sends from the MAC its port was given (and locked to).
    let mac = port.record.mac;
    let mut frame = vec![0xff; 6];
    frame.extend(mac.0);
    frame.extend([0x88, 0xb5]);
    frame.resize(60, 7);
    vm.send(&frame).unwrap();
    let mut buf = [0u8; 128];
    let n = other.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], &frame[..], "the handed-over end is on the network");
    let (_, ports) = d.call("GET", "/v1/networks/default/ports", None);
    assert!(ports
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["name"] == "vz1" && p["kind"] == "socketpair"));
    let err =
        d.rt.block_on(client::socketpair_port(&d.socket, "default", &spec))
            .unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
    let (s, _) = d.call("POST", "/v1/networks/default/socketpairs", Some(json!({"name": "x"})));
    assert_eq!(s, 400, "without the upgrade there is no fd to hand over");
    let (s, _) = d.call(
        "POST",
        "/v1/networks/default/ports",
        Some(json!({"name": "x", "kind": "socketpair"})),
    );
    assert_eq!(s, 400);
    d.stop();
}

#[test]
fn policy_and_forwards_are_set_listed_and_survive_a_restart() {
    let dir = tmp("policy-forwards");
    let d = start(&dir);
    let (_, p) = d.call("GET", "/v1/networks/default/policy", None);
    assert_eq!(p, json!({"default": "allow", "rules": []}));
    let policy = json!({"default": "deny", "rules": [
        {"action": "allow", "dst": "192.0.2.0/24", "ports": "53", "proto": "udp"},
        {"action": "allow", "dst": "198.51.100.0/24"}
    ]});
    let (s, _) = d.call("PUT", "/v1/networks/default/policy", Some(policy.clone()));
    assert_eq!(s, 200);
    let (s, v) = d.call(
        "PUT",
        "/v1/networks/default/policy",
        Some(json!({"rules": [{"action": "maybe", "dst": "10.0.0.0/8"}]})),
    );
    assert!(s == 400 && v["message"].as_str().unwrap().contains("maybe"), "{v}");
    let (s, _) = d.call(
        "PUT",
        "/v1/networks/default/policy",
        Some(json!({"rules": [{"action": "allow", "dst": "10.0.0.0/8", "ports": "9-1"}]})),
    );
    assert_eq!(s, 400, "a backwards port range");

    let (s, fw) = d.call(
        "POST",
        "/v1/networks/default/forwards",
        Some(json!({"proto": "udp", "host": "127.0.0.1:0", "guest": "10.77.0.5:53"})),
    );
    assert_eq!(s, 201, "{fw}");
    let host = fw["host"].as_str().unwrap().to_string();
    assert!(!host.ends_with(":0"), "the chosen port is reported: {host}");
    let (s, _) = d.call(
        "POST",
        "/v1/networks/default/forwards",
        Some(json!({"proto": "udp", "host": host, "guest": "10.77.0.6:53"})),
    );
    assert_eq!(s, 409, "the address is taken");
    let (s, tcp_fw) = d.call(
        "POST",
        "/v1/networks/default/forwards",
        Some(json!({"host": "127.0.0.1:0", "guest": "10.77.0.5:80"})),
    );
    assert_eq!(
        (s, &tcp_fw["proto"]),
        (201, &json!("tcp")),
        "tcp is the default: {tcp_fw}"
    );
    let tcp_host = tcp_fw["host"].as_str().unwrap().to_string();
    let (s, _) = d.call(
        "POST",
        "/v1/networks/default/forwards",
        Some(json!({"proto": "sctp", "host": "127.0.0.1:0", "guest": "10.77.0.5:80"})),
    );
    assert_eq!(s, 400, "an unknown protocol");
    let (s, _) = d.call(
        "POST",
        "/v1/networks/default/forwards",
        Some(json!({"host": "127.0.0.1:0", "guest": "192.0.2.1:53"})),
    );
    assert_eq!(s, 400, "the guest must be on the network");
    d.stop();

    let _ = std::fs::remove_file(dir.join("api.sock"));
    let d = start(&dir);
    let (_, p) = d.call("GET", "/v1/networks/default/policy", None);
    assert_eq!(p, policy);
    let (_, fws) = d.call("GET", "/v1/networks/default/forwards", None);
    let fws = fws.as_array().unwrap();
    assert_eq!(fws.len(), 2, "{fws:?}");
    assert!(
        fws.contains(&json!({"proto": "udp", "host": host, "guest": "10.77.0.5:53", "dangling": true}))
            && fws.contains(&json!({"proto": "tcp", "host": tcp_host, "guest": "10.77.0.5:80", "dangling": true})),
        "listening again, and dangling: no guest holds 10.77.0.5: {fws:?}"
    );
    assert!(
        std::net::TcpListener::bind(&tcp_host).is_err(),
        "the restored TCP forward holds its address"
    );
    let (s, _) = d.call(
        "DELETE",
        &format!("/v1/networks/default/forwards/{tcp_host}?proto=tcp"),
        None,
    );
    assert_eq!(s, 204);
    assert!(
        std::net::UdpSocket::bind(&host).is_err(),
        "the restored forward holds its address"
    );
    let (s, _) = d.call("DELETE", &format!("/v1/networks/default/forwards/{host}"), None);
    assert_eq!(s, 204);
    // The listener closes as its task ends, a moment after the answer.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while std::net::UdpSocket::bind(&host).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "removing a forward closes its listener"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let (s, _) = d.call("DELETE", &format!("/v1/networks/default/forwards/{host}"), None);
    assert_eq!(s, 404);
    d.stop();
}

/// Checks an answer against what the document says of that route and status: the
/// status must be documented, and a JSON body must match the documented schema.
fn conforms(doc: &Value, path: &str, method: &str, status: u16, body: &Value) -> Result<(), String> {
    let op = &doc["paths"][path][method];
    let resp = &op["responses"][status.to_string()];
    if !resp.is_object() {
        return Err(format!(
            "{method} {path} answered {status}, which it does not document ({body})"
        ));
    }
    // JSON, or JSON lines (a stream's body is checked a line at a time).
    let content = &resp["content"];
    let schema = content["application/json"]["schema"]
        .as_object()
        .or(content["application/x-ndjson"]["schema"].as_object());
    let Some(schema) = schema else {
        return Ok(()); // not JSON (text, pcap) or no body
    };
    // Refs point into the document's components: give the schema the document's.
    let mut schema = Value::Object(schema.clone());
    schema["components"] = doc["components"].clone();
    let validator = jsonschema::draft202012::new(&schema).map_err(|e| format!("schema of {method} {path}: {e}"))?;
    let errors: Vec<String> = validator
        .iter_errors(body)
        .map(|e| format!("{e} at {}", e.instance_path()))
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(format!("{method} {path} {status}: {errors:?}\n{body}"))
    }
}

#[test]
fn every_route_answers_what_the_generated_openapi_document_says() {
    let dir = tmp("contract");
    let d = start(&dir);
    let (s, doc) = d.call("GET", "/v1/openapi.json", None);
    assert_eq!(s, 200);
    // Objects for every route to find: a network with a port, a forward, a
    // reservation and a policy.
    let setup = [
        (
            "POST",
            "/v1/networks",
            json!({"name": "c", "subnet": "10.58.0.0/24", "mtu": 1400}),
        ),
        ("POST", "/v1/networks/c/ports", json!({"name": "p", "kind": "stream"})),
        (
            "POST",
            "/v1/networks/c/forwards",
            json!({"host": "127.0.0.1:0", "guest": "10.58.0.9:80"}),
        ),
        (
            "POST",
            "/v1/networks/c/reservations",
            json!({"key": "p", "ip": "10.58.0.9"}),
        ),
        (
            "PUT",
            "/v1/networks/c/policy",
            json!({"default": "deny", "rules": [{"action": "allow", "dst": "10.0.0.0/8", "ports": "53", "proto": "udp"}]}),
        ),
        (
            "PUT",
            "/v1/networks/c/settings",
            json!({"dns": {"domain": "c.internal", "records": [{"name": "db", "type": "A", "value": "10.58.0.40"}]}, "dhcp": {"lease_secs": 600}}),
        ),
    ];
    let events = d.follow_events();
    let mut failures = Vec::new();
    let mut check = |path: &str, method: &str, concrete: &str, body: Option<Value>| {
        let (status, v) = d.call(&method.to_uppercase(), concrete, body);
        if let Err(e) = conforms(&doc, path, method, status, &v) {
            failures.push(e);
        }
        v
    };
    let templated = |p: &str| match p {
        "/v1/networks" | "/v1/networks/c/ports" => p.replace("/c/", "/{name}/"),
        _ => p.replace("/c/", "/{name}/"),
    };
    let mut host = String::new();
    for (method, path, body) in &setup {
        let v = check(&templated(path), &method.to_lowercase(), path, Some(body.clone()));
        if path.ends_with("/forwards") {
            host = v["host"].as_str().unwrap_or_default().to_string();
        }
    }
    // Each documented operation, on real objects and on missing ones.
    let paths: Vec<(String, Vec<String>)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(p, item)| (p.clone(), item.as_object().unwrap().keys().cloned().collect()))
        .collect();
    for (path, methods) in &paths {
        for method in methods {
            if ["post", "put"].contains(&method.as_str()) || method == "delete" {
                continue; // changes are checked by the setup and the removals below
            }
            for (net, port, key) in [("c", "p", "p"), ("nope", "nope", "nope")] {
                let mut concrete = path
                    .replace("{name}", if path.starts_with("/v1/vms") { "nope" } else { net })
                    .replace("{port}", port)
                    .replace("{key}", key)
                    .replace("{host}", &host);
                if path.ends_with("/capture") {
                    concrete.push_str("?port=nope"); // a real capture streams until closed
                }
                if path == "/v1/events" {
                    continue; // a stream that never ends: its lines are checked below
                }
                check(path, method, &concrete, None);
            }
        }
    }
    // The event stream's lines are what the document says: a VMM comes and goes.
    let (_, ports) = d.call("GET", "/v1/networks/c/ports", None);
    drop(std::os::unix::net::UnixStream::connect(ports[0]["path"].as_str().unwrap()).unwrap());
    events.wait_for(json!({"type": "port_down", "network": "c", "port": "p"}));
    assert!(
        conforms(&doc, "/v1/events", "get", 200, &json!({"time": "t", "type": "nope"})).is_err(),
        "the check of event lines bites"
    );
    let event_failures: Vec<String> = events
        .events()
        .iter()
        .filter_map(|e| conforms(&doc, "/v1/events", "get", 200, e).err())
        .collect();
    check(
        "/v1/networks/{name}/settings",
        "put",
        "/v1/networks/c/settings",
        Some(json!({"dhcp": {"range": ["10.58.0.9", "10.58.0.3"]}})),
    );
    check(
        "/v1/networks/{name}/settings",
        "put",
        "/v1/networks/nope/settings",
        Some(json!({})),
    );
    // Refusals are documented too: bad input, duplicates, missing objects.
    check(
        "/v1/networks",
        "post",
        "/v1/networks",
        Some(json!({"name": "c", "subnet": "10.59.0.0/24"})),
    );
    check(
        "/v1/networks",
        "post",
        "/v1/networks",
        Some(json!({"name": "x", "subnet": "224.0.0.0/24"})),
    );
    check(
        "/v1/networks/{name}/ports",
        "post",
        "/v1/networks/c/ports",
        Some(json!({"name": "p", "kind": "stream"})),
    );
    check("/v1/vms", "post", "/v1/vms", Some(json!({"name": "v", "network": "c"})));
    check(
        "/v1/networks/{name}/socketpairs",
        "post",
        "/v1/networks/c/socketpairs",
        Some(json!({"name": "s"})),
    );
    // Removals.
    check(
        "/v1/networks/{name}/forwards/{host}",
        "delete",
        &format!("/v1/networks/c/forwards/{host}"),
        None,
    );
    check(
        "/v1/networks/{name}/reservations/{key}",
        "delete",
        "/v1/networks/c/reservations/p",
        None,
    );
    check(
        "/v1/networks/{name}/ports/{port}",
        "delete",
        "/v1/networks/c/ports/p",
        None,
    );
    check(
        "/v1/networks/{name}/ports/{port}",
        "delete",
        "/v1/networks/c/ports/p",
        None,
    );
    check("/v1/vms/{name}", "delete", "/v1/vms/nope", None);
    check("/v1/networks/{name}", "delete", "/v1/networks/c", None);
    check("/v1/networks/{name}", "delete", "/v1/networks/c", None);
    failures.extend(event_failures);
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    d.stop();
}

/// The CLI's typed client against a live daemon: each call's body is the model's
/// request type and each answer parses into the model's view, so a view that drifts
/// from what the server sends fails here.
#[test]
fn the_typed_client_reads_every_answer_into_the_model() {
    use vmfabric::client::{ApiError, Client};
    use vmfabric::model::{ForwardProto, ForwardSpec, Name, NetworkSpec, PolicySpec, PortKind, PortSpec};
    let dir = tmp("typed-client");
    let d = start(&dir);
    let api = Client::new(&d.socket).unwrap();
    let spec = NetworkSpec::new(Name::new("network", "typed").unwrap(), "10.231.0.0/24".parse().unwrap());
    let net = api.create_network(&spec, false).unwrap();
    assert_eq!(net.name.as_str(), "typed");
    assert!(api.networks().unwrap().iter().any(|n| n.name.as_str() == "typed"));
    assert_eq!(api.network("typed").unwrap().subnet, spec.subnet);
    let port = api
        .add_port(
            "typed",
            &PortSpec::new(Name::new("port", "p0").unwrap(), PortKind::Unixgram),
        )
        .unwrap();
    assert_eq!(port.record.kind, PortKind::Unixgram);
    assert_eq!(api.ports("typed").unwrap().len(), 1);
    let fwd = ForwardSpec {
        proto: ForwardProto::Tcp,
        host: "127.0.0.1:0".parse().unwrap(),
        guest: "10.231.0.9:80".parse().unwrap(),
    };
    let added = api.add_forward("typed", &fwd).unwrap();
    assert_eq!(api.forwards("typed").unwrap().len(), 1);
    let deny: PolicySpec = serde_json::from_value(json!({"default": "deny"})).unwrap();
    assert_eq!(api.set_policy("typed", &deny).unwrap(), deny);
    assert_eq!(api.policy("typed").unwrap(), deny);
    let r = vmfabric::model::ReservationSpec {
        key: "vm-a".into(),
        ip: "10.231.0.50".parse().unwrap(),
        ipv6: None,
    };
    assert_eq!(api.add_reservation("typed", &r).unwrap(), r);
    assert_eq!(api.reservations("typed").unwrap(), vec![r]);
    assert!(api.leases("typed").unwrap().is_empty());
    let flows = api.flows("typed").unwrap();
    assert!(flows.tcp.is_empty() && flows.udp.is_empty());
    assert!(api.vms().unwrap().is_empty());
    assert!(api.metrics().unwrap().contains("vmfabric_"));
    api.remove_reservation("typed", "vm-a").unwrap();
    assert_ne!(added.host.port(), 0, "the daemon picked a port");
    api.remove_forward("typed", &added.host.to_string(), Some(ForwardProto::Tcp))
        .unwrap();
    api.remove_port("typed", "p0").unwrap();
    api.remove_network("typed", false).unwrap();
    // A refusal keeps the daemon's status and message.
    let err = api.network("typed").unwrap_err();
    let refusal = err.downcast_ref::<ApiError>().expect("an API error");
    assert_eq!(refusal.status, 404, "{refusal}");
    d.stop();
}

/// What axum refuses by itself (a query that does not parse, a method a route does not
/// have) answers the same JSON error body as every other refusal.
#[test]
fn refusals_made_by_the_http_layer_are_json_error_bodies_too() {
    let dir = tmp("json-refusals");
    let d = start(&dir);
    let (s, v) = d.call("DELETE", "/v1/networks/default?force=maybe", None);
    assert_eq!(s, 400, "{v}");
    assert_eq!(v["error"], "bad_request", "{v}");
    assert!(v["message"].as_str().unwrap().contains("force"), "{v}");
    let (s, v) = d.call("PATCH", "/v1/networks/default", None);
    assert_eq!(s, 405, "{v}");
    assert_eq!(v["error"], "bad_request", "{v}");
    d.stop();
}

/// Egress refusals reach the event stream, sampled: a guest's datagrams to the host's
/// loopback (a built-in deny) show as one `policy_refused` with their count.
#[test]
fn egress_refusals_are_sampled_into_the_event_stream() {
    use std::net::Ipv4Addr;
    let dir = tmp("refusals");
    let d = start(&dir);
    d.call(
        "POST",
        "/v1/networks",
        Some(json!({"name": "red", "subnet": "10.66.0.0/24"})),
    );
    let events = d.follow_events();
    let guest = fabric::Mac([0x02, 0x11, 0x22, 0x33, 0x44, 0x66]);
    let ip = dhcp(&d.daemon, "red", guest, None);
    events.wait_for(json!({"type": "lease_bound", "network": "red", "ip": ip.to_string()}));
    let (port, fd) = d.daemon.switch().add_port("red", "sender").unwrap();
    let lock = fabric::PortLock {
        mac: guest,
        ips: vec![ip],
        ips6: vec![],
    };
    d.daemon.switch().lock_port(port, Some(lock)).unwrap();
    let sock = std::os::unix::net::UnixDatagram::from(fd);
    let gw_mac = gateway::GatewayConfig::new("red", "10.66.0.0/24".parse().unwrap()).gateway_mac;
    for src_port in 40000..40005 {
        let f = gateway::wire::udp_frame(guest, gw_mac, (ip, src_port), (Ipv4Addr::LOCALHOST, 9), b"x");
        sock.send(&f).unwrap();
    }
    events.wait_for(json!({"type": "policy_refused", "network": "red"}));
    // The five may straddle two samples; together they are five.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let total: u64 = events
            .events()
            .iter()
            .filter(|e| e["type"] == "policy_refused" && e["network"] == "red")
            .map(|e| e["refused"].as_u64().unwrap())
            .sum();
        if total == 5 {
            break;
        }
        assert!(
            total < 5 && std::time::Instant::now() < deadline,
            "{total} refusals reported"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    d.stop();
}
