//! The control plane checks a request before it makes anything, answers a user's
//! mistake with a 4xx (never a 500), keeps one instance per state directory, and
//! starts with what it can when part of its store cannot come back. Each test here
//! is the regression test of a bug seen from outside; the daemon runs in-process.

use std::path::{Path, PathBuf};

use serde_json::json;

mod harness;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vmf-ctl-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Creates a network (asserting it worked).
fn create_network(d: &harness::Running, name: &str, subnet: &str) {
    let (s, v) = d.call("POST", "/v1/networks", Some(json!({"name": name, "subnet": subnet})));
    assert_eq!(s, 201, "{v}");
}

/// Adds a TCP forward from a free loopback port to `guest`; returns its host address.
fn add_forward(d: &harness::Running, network: &str, guest: &str) -> String {
    let (s, v) = d.call(
        "POST",
        &format!("/v1/networks/{network}/forwards"),
        Some(json!({"host": "127.0.0.1:0", "guest": guest})),
    );
    assert_eq!(s, 201, "{v}");
    v["host"].as_str().unwrap().to_string()
}

#[test]
fn the_longest_names_still_make_socket_paths_that_fit_and_work() {
    let dir = tmp("sunpath");
    let d = harness::start(&dir, None);
    let net = "n".repeat(64);
    let (s, v) = d.call(
        "POST",
        "/v1/networks",
        Some(json!({"name": net, "subnet": "10.61.0.0/24"})),
    );
    assert_eq!(s, 201, "{v}");
    for kind in ["unixgram", "stream"] {
        let port = format!("{kind}-{}", "p".repeat(64 - kind.len() - 1));
        let (s, v) = d.call(
            "POST",
            &format!("/v1/networks/{net}/ports"),
            Some(json!({"name": port, "kind": kind})),
        );
        assert_eq!(s, 201, "{kind}: {v}");
        let path = v["path"].as_str().unwrap().to_string();
        assert!(path.len() <= 107, "{path}");
        // The VMM's end: a stream port takes a connection, a unixgram port a frame
        // from the guest path `qemu_args` names.
        if kind == "stream" {
            let _vmm = std::os::unix::net::UnixStream::connect(&path).unwrap();
            wait_port_up(&d, &net, &port);
        } else {
            let args = v["qemu_args"].as_str().unwrap();
            let guest = args
                .split([',', ' '])
                .find_map(|a| a.strip_prefix("local.path="))
                .unwrap_or_else(|| panic!("no guest path in {args}"));
            assert!(guest.len() <= 107, "{guest}");
            let vmm = std::os::unix::net::UnixDatagram::bind(guest).unwrap();
            let mut frame = vec![0xff; 6];
            frame.extend(
                v["mac"]
                    .as_str()
                    .unwrap()
                    .split(':')
                    .map(|h| u8::from_str_radix(h, 16).unwrap()),
            );
            frame.extend([0x88, 0xb5]);
            frame.resize(60, 0);
            vmm.send_to(&frame, &path).unwrap();
            wait_port_up(&d, &net, &port);
        }
    }
    d.stop();
}

/// Waits until the API shows the port up.
fn wait_port_up(d: &harness::Running, net: &str, port: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (_, ports) = d.call("GET", &format!("/v1/networks/{net}/ports"), None);
        let up = ports
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == port && p["up"] == true);
        if up {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "port {port} never came up: {ports}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn a_run_dir_too_long_for_socket_paths_is_refused_at_start() {
    let dir = tmp("long-run-dir");
    let run_dir = dir.join("r".repeat(vmfabric::model::MAX_RUN_DIR));
    let err = vmfabric::control::Control::start_with_guests(dir.join("state"), run_dir, None)
        .err()
        .expect("refused");
    assert!(err.to_string().contains("shorter --run-dir"), "{err}");
    assert!(!dir.join("state").exists(), "refused before anything is made");
}

#[test]
fn a_multicast_subnet_is_refused_and_leaves_nothing_behind() {
    let dir = tmp("mcast");
    let d = harness::start(&dir, None);
    for subnet in ["224.0.0.0/24", "10.62.0.5/24", "127.0.0.0/24", "10.62.0.0/30"] {
        let (s, v) = d.call("POST", "/v1/networks", Some(json!({"name": "x", "subnet": subnet})));
        assert_eq!(s, 400, "{subnet}: {v}");
    }
    let (s, v) = d.call(
        "POST",
        "/v1/networks",
        Some(json!({"name": "x", "subnet": "10.62.0.0/24"})),
    );
    assert_eq!(s, 201, "the name is free: {v}");
    let (s, _) = d.call("DELETE", "/v1/networks/x", None);
    assert_eq!(s, 204);
}

#[test]
fn names_mtus_and_interface_names_are_checked_when_the_body_is_read() {
    let dir = tmp("typed");
    let d = harness::start(&dir, None);
    for body in [
        json!({"name": "m", "subnet": "10.63.0.0/24", "mtu": 70000}),
        json!({"name": "m", "subnet": "10.63.0.0/24", "mtu": 67}),
        json!({"name": "a/b", "subnet": "10.63.0.0/24"}),
        json!({"name": "m", "subnet": "10.63.0.0/24", "mode": "kernel", "bridge": "cp%d"}),
    ] {
        let (s, v) = d.call("POST", "/v1/networks", Some(body.clone()));
        assert_eq!(s, 400, "{body}: {v}");
    }
    // `cp%d` would be named by the kernel (cp0) while the store kept `cp%d`.
    let (s, v) = d.call(
        "POST",
        "/v1/networks/default/ports",
        Some(json!({"name": "t", "kind": "tap", "ifname": "cp%d"})),
    );
    assert_eq!(s, 400, "{v}");
    let (s, v) = d.call(
        "POST",
        "/v1/networks/default/forwards",
        Some(json!({"proto": "sctp", "host": "127.0.0.1:0", "guest": "10.77.0.9:80"})),
    );
    assert_eq!(s, 400, "{v}");
}

#[test]
fn a_kernel_network_with_a_bad_mtu_is_refused_before_its_bridge_is_made() {
    if !testkit::ready_or_skip(testkit::is_root(), "needs root for kernel mode") {
        return;
    }
    let dir = tmp("kmtu");
    let d = harness::start(&dir, None);
    let bridge = format!("vmfm{}", std::process::id() % 100000);
    let (s, v) = d.call(
        "POST",
        "/v1/networks",
        Some(json!({"name": "k1", "subnet": "10.67.0.0/24", "mode": "kernel", "mtu": 70000, "bridge": bridge})),
    );
    assert_eq!(s, 400, "{v}");
    assert!(
        !Path::new("/sys/class/net").join(&bridge).exists(),
        "no bridge was left behind"
    );
}

#[test]
fn a_userspace_tap_port_never_attaches_to_an_existing_device() {
    if !testkit::ready_or_skip(testkit::is_root(), "needs root to make a TAP device") {
        return;
    }
    let dir = tmp("tapown");
    let d = harness::start(&dir, None);
    let name = format!("vmfx{}", std::process::id() % 100000);
    testkit::run(&["ip", "tuntap", "add", "dev", &name, "mode", "tap"]);
    let (s, v) = d.call(
        "POST",
        "/v1/networks/default/ports",
        Some(json!({"name": "t", "kind": "tap", "ifname": name})),
    );
    testkit::run(&["ip", "link", "del", &name]);
    assert_eq!(s, 409, "{v}");
}

#[test]
fn two_daemons_cannot_share_a_state_directory() {
    let dir = tmp("twice");
    let d = harness::start(&dir, None);
    let second = vmfabric::control::Control::start(dir.join("state"), dir.join("run2"));
    let err = second.err().expect("the second daemon must not start").to_string();
    assert!(
        err.contains("in use by another vmfabric daemon") && err.contains(&std::process::id().to_string()),
        "{err}"
    );
    d.stop();
    // Once the first is gone the directory is free again.
    let third = harness::start(&dir, None);
    third.stop();
}

#[test]
fn the_state_is_private_and_the_api_socket_replaces_only_a_stale_socket() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tmp("perms");
    let d = harness::start(&dir, None);
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir.join("state")), 0o700);
    assert_eq!(mode(&dir.join("state/vmfabric.db")), 0o600);
    d.stop();
    let file = dir.join("notes.txt");
    std::fs::write(&file, "keep me").unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _g = rt.enter();
    let err = vmfabric::api::bind(&file).unwrap_err().to_string();
    assert!(err.contains("not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
}

#[test]
fn deleting_a_network_closes_its_forwards() {
    let dir = tmp("fwdleak");
    let d = harness::start(&dir, None);
    create_network(&d, "f", "10.64.0.0/24");
    let host = add_forward(&d, "f", "10.64.0.10:80");
    let (s, _) = d.call("DELETE", "/v1/networks/f?force=true", None);
    assert_eq!(s, 204);
    // The listener went with the network: nothing accepts, and the port is free.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while std::net::TcpStream::connect(&host).is_ok() {
        assert!(std::time::Instant::now() < deadline, "{host} still accepts");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    create_network(&d, "f", "10.64.0.0/24");
    let (s, v) = d.call(
        "POST",
        "/v1/networks/f/forwards",
        Some(json!({"host": host, "guest": "10.64.0.10:80"})),
    );
    assert_eq!(s, 201, "the host port is free again: {v}");
}

#[test]
fn what_cannot_be_restored_is_listed_and_removable_and_the_rest_starts() {
    let dir = tmp("degrade");
    let d = harness::start(&dir, None);
    create_network(&d, "good", "10.65.0.0/24");
    create_network(&d, "hand", "10.66.0.0/24");
    let (s, port) = d.call(
        "POST",
        "/v1/networks/good/ports",
        Some(json!({"name": "busy", "kind": "stream"})),
    );
    assert_eq!(s, 201);
    let host = add_forward(&d, "good", "10.65.0.10:80");
    d.stop();

    // While it is down: someone serves on the port's socket path and on the forward's
    // host port, and a hand edit breaks a row.
    let path = port["path"].as_str().unwrap().to_string();
    let _ = std::fs::remove_file(&path);
    let _squatter = std::os::unix::net::UnixListener::bind(&path).unwrap();
    // (The old listener's task is dropped by its runtime a moment after the stop.)
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let _taken = loop {
        match std::net::TcpListener::bind(&host) {
            Ok(l) => break l,
            Err(e) if std::time::Instant::now() < deadline => {
                assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse);
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => panic!("{host} stays bound after the daemon stopped: {e}"),
        }
    };
    let db = rusqlite::Connection::open(dir.join("state/vmfabric.db")).unwrap();
    db.execute("UPDATE networks SET subnet = 'ten' WHERE name = 'hand'", [])
        .unwrap();
    drop(db);

    let d = harness::start(&dir, None);
    let (s, nets) = d.call("GET", "/v1/networks", None);
    assert_eq!(s, 200);
    let names: Vec<&str> = nets
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"good") && names.contains(&"default"), "{nets}");
    let (_, ports) = d.call("GET", "/v1/networks/good/ports", None);
    assert!(
        ports[0]["name"] == "busy" && ports[0]["failed"].as_str().is_some_and(|f| f.contains("in use")),
        "{ports}"
    );
    // Removable through the API: the stored rows go.
    let (s, v) = d.call("DELETE", "/v1/networks/good/ports/busy", None);
    assert_eq!(s, 204, "{v}");
    let (s, v) = d.call("DELETE", &format!("/v1/networks/good/forwards/{host}"), None);
    assert_eq!(s, 204, "a forward that could not listen is no ghost: {v}");
    let (s, v) = d.call("DELETE", "/v1/networks/hand", None);
    assert_eq!(s, 204, "{v}");
    d.stop();
    let d = harness::start(&dir, None);
    let (_, ports) = d.call("GET", "/v1/networks/good/ports", None);
    assert_eq!(ports, json!([]));
    let (_, fwds) = d.call("GET", "/v1/networks/good/forwards", None);
    assert_eq!(fwds, json!([]));
    let (s, _) = d.call("GET", "/v1/networks/hand", None);
    assert_eq!(s, 404);
}

#[test]
fn two_kernel_mode_daemons_keep_their_rules_and_devices_apart() {
    let ready = testkit::is_root() && std::process::Command::new("nft").arg("--version").output().is_ok();
    if !testkit::ready_or_skip(ready, "needs root and nft for kernel mode") {
        return;
    }
    let (dir_a, dir_b) = (tmp("kern-a"), tmp("kern-b"));
    let (a, b) = (harness::start(&dir_a, None), harness::start(&dir_b, None));
    let table = |dir: &Path| hostnet::nft::table_name(&vmfabric::kernel::instance_of(&dir.join("state")));
    let (table_a, table_b) = (table(&dir_a), table(&dir_b));
    assert_ne!(table_a, table_b);
    let list = |t: &str| testkit::run(&["nft", "list", "table", "inet", t]);
    let pid = std::process::id() % 10000;
    let (bridge_a, bridge_b) = (format!("vmfka{pid}"), format!("vmfkb{pid}"));
    for (d, name, subnet, bridge) in [
        (&a, "ka", "10.68.0.0/24", &bridge_a),
        (&b, "kb", "10.69.0.0/24", &bridge_b),
    ] {
        let (s, v) = d.call(
            "POST",
            "/v1/networks",
            Some(json!({"name": name, "subnet": subnet, "mode": "kernel", "bridge": bridge})),
        );
        assert_eq!(s, 201, "{v}");
    }
    let both_there = || {
        list(&table_a).contains("10.68.0.0/24")
            && list(&table_b).contains("10.69.0.0/24")
            && Path::new("/sys/class/net").join(&bridge_a).exists()
            && Path::new("/sys/class/net").join(&bridge_b).exists()
    };
    assert!(both_there(), "{}\n{}", list(&table_a), list(&table_b));
    assert!(
        !list(&table_a).contains("10.69.0.0/24"),
        "each table holds its own networks"
    );
    // Every change rewrites a table whole: a change in one must not touch the other.
    let (s, v) = a.call(
        "POST",
        "/v1/networks/ka/ports",
        Some(json!({"name": "p1", "kind": "tap"})),
    );
    assert_eq!(s, 201, "{v}");
    assert!(both_there(), "{}", list(&table_b));
    let (s, _) = a.call("DELETE", "/v1/networks/ka?force=true", None);
    assert_eq!(s, 204);
    assert!(!Path::new("/sys/class/net").join(&bridge_a).exists());
    assert!(
        list(&table_b).contains("10.69.0.0/24") && Path::new("/sys/class/net").join(&bridge_b).exists(),
        "b's rules and bridge outlive a's network: {}",
        list(&table_b)
    );
    let (s, _) = b.call("DELETE", "/v1/networks/kb?force=true", None);
    assert_eq!(s, 204);
    for t in [&table_a, &table_b] {
        for family in ["inet", "bridge"] {
            let _ = std::process::Command::new("nft")
                .args(["delete", "table", family, t])
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

#[test]
fn api_connections_are_bounded_and_idle_ones_are_closed() {
    use std::io::{Read, Write};
    let dir = tmp("bounds");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ctl = vmfabric::control::Control::start(dir.join("state"), dir.join("run")).unwrap();
    let socket = dir.join("api.sock");
    let listener = {
        let _g = rt.enter();
        vmfabric::api::bind(&socket).unwrap()
    };
    let limits = vmfabric::api::Limits {
        max_connections: 4,
        header_timeout: std::time::Duration::from_secs(1),
    };
    rt.spawn(vmfabric::api::serve_with(listener, ctl.clone(), limits));
    let idle: Vec<_> = (0..4)
        .map(|_| std::os::unix::net::UnixStream::connect(&socket).unwrap())
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(200));
    // Over the limit: a clear refusal, not a silent hang.
    let mut over = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    over.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
    let mut answer = String::new();
    over.read_to_string(&mut answer).unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 503") && answer.contains("\"busy\""),
        "{answer}"
    );
    // Connections that send nothing are closed after the header timeout...
    for mut c in idle {
        c.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(c.read(&mut buf).unwrap_or(0), 0, "closed by the daemon");
    }
    // ... and so are kept-alive ones that go quiet after a request.
    let mut kept = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    kept.write_all(b"GET /v1/networks HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
    kept.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match kept.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => panic!("the idle keep-alive connection stayed open: {e}"),
        }
    }
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"));
    // The slots are free again.
    let (s, _) = rt
        .block_on(vmfabric::client::call(&socket, "GET", "/v1/networks", None))
        .unwrap();
    assert_eq!(s, 200);
}

#[test]
fn captures_are_bounded_and_their_losses_counted() {
    let dir = tmp("captures");
    let d = harness::start(&dir, None);
    let max = vmfabric::control::MAX_CAPTURES;
    let mut held: Vec<_> = (0..max).map(|_| d.daemon.capture("default", None).unwrap()).collect();
    let err = d.daemon.capture("default", None).err().expect("over the limit");
    assert_eq!(err.class(), vmfabric::control::error::ErrorClass::Busy, "{err}");
    let (s, v) = d.call("GET", "/v1/networks/default/capture", None);
    assert_eq!(s, 503, "{v}");
    let (_, metrics) = d.call("GET", "/metrics", None);
    let metrics = metrics.as_str().unwrap().to_string();
    assert!(
        metrics.contains(&format!("vmfabric_captures_active {max}")),
        "{metrics}"
    );
    assert!(
        metrics.contains("vmfabric_capture_lost_frames_total{network=\"default\",capture=\"0\"} 0"),
        "{metrics}"
    );
    held.pop();
    assert!(
        d.daemon.capture("default", None).is_ok(),
        "an ended capture frees its slot"
    );
}

/// A store written by the daemon before the restructure (commit 1a7f555: `sqlite3
/// .dump` of its database after `network create`, `port add`, `reservation add`,
/// `forward add` and `policy set` through its CLI) opens unchanged.
#[test]
fn a_store_written_before_the_restructure_opens_unchanged() {
    let dir = tmp("oldstore");
    std::fs::create_dir_all(dir.join("state")).unwrap();
    // The dump names the run directory it was made with; this test's stands in.
    let sql = include_str!("fixtures/store-1a7f555.sql")
        .replace("/tmp/vmf-fixture/run", &dir.join("run").display().to_string());
    let db = rusqlite::Connection::open(dir.join("state/vmfabric.db")).unwrap();
    db.execute_batch(&sql).unwrap();
    drop(db);
    let d = harness::start(&dir, None);
    let (_, nets) = d.call("GET", "/v1/networks", None);
    let blue = nets
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "blue")
        .cloned()
        .unwrap();
    assert_eq!(
        (blue["subnet"].as_str(), blue["mtu"].as_u64(), blue["ports"].as_u64()),
        (Some("10.71.0.0/24"), Some(9000), Some(2))
    );
    let quiet = nets
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "quiet")
        .cloned()
        .unwrap();
    assert_eq!(quiet["gateway"], false);
    let (_, ports) = d.call("GET", "/v1/networks/blue/ports", None);
    assert_eq!(ports[1]["mac"], "02:aa:bb:cc:dd:ee", "{ports}");
    assert!(
        ports.as_array().unwrap().iter().all(|p| p["failed"].is_null()),
        "{ports}"
    );
    assert!(
        std::os::unix::net::UnixStream::connect(ports[0]["path"].as_str().unwrap()).is_ok(),
        "listening again"
    );
    let (_, fwds) = d.call("GET", "/v1/networks/blue/forwards", None);
    assert_eq!(fwds.as_array().unwrap().len(), 2, "{fwds}");
    let (_, policy) = d.call("GET", "/v1/networks/blue/policy", None);
    assert_eq!(policy["default"], "deny");
    assert_eq!(policy["rules"][0]["ports"], "53");
    let (_, res) = d.call("GET", "/v1/networks/blue/reservations", None);
    assert_eq!(res, json!([{"key": "vm1", "ip": "10.71.0.20"}]));
    d.stop();
}

/// The threads that parse guests' frames hold almost nothing of root's power: the
/// switch thread no capability, the gateways' threads only CAP_NET_RAW (raw ICMP
/// sockets for ICMP NAT), both with no_new_privs; the control plane keeps what it needs
/// to make devices (capabilities are per thread).
#[test]
fn the_threads_that_read_guests_frames_run_without_roots_capabilities() {
    if !testkit::ready_or_skip(testkit::is_root(), "needs root (capabilities to drop)") {
        return;
    }
    let dir = tmp("caps");
    let d = harness::start(&dir, None);
    let field = |status: &str, key: &str| -> String {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    let threads: Vec<(String, String, String)> = std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| {
            let t = t.ok()?.path();
            let comm = std::fs::read_to_string(t.join("comm")).ok()?.trim().to_string();
            let status = std::fs::read_to_string(t.join("status")).ok()?;
            Some((comm, field(&status, "CapEff:"), field(&status, "NoNewPrivs:")))
        })
        .collect();
    let named = |name: &str| threads.iter().filter(move |t| t.0 == name).collect::<Vec<_>>();
    let switch = named("fabric-switch");
    let gateway = named("vmf-gateway");
    assert!(!switch.is_empty() && !gateway.is_empty(), "{threads:?}");
    for (_, caps, nnp) in switch {
        assert_eq!((caps.as_str(), nnp.as_str()), ("0000000000000000", "1"), "switch");
    }
    let net_raw = format!("{:016x}", 1u64 << 13);
    for (_, caps, nnp) in gateway {
        assert_eq!((caps, nnp.as_str()), (&net_raw, "1"), "gateway");
    }
    let own = std::fs::read_to_string("/proc/thread-self/status").unwrap();
    assert_ne!(field(&own, "CapEff:"), "0000000000000000", "this thread is root's");
    d.stop();
}
