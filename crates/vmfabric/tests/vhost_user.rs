//! vhost-user ports with a real QEMU guest (TCG) whose frames move through its shared
//! memory: it leases from the gateway, is found by name and reached from a guest on a
//! unixgram port and from a host namespace on a TAP port, and comes back after its VMM
//! restarts. Needs root (the TAP port) and QEMU with the test guest.

#[path = "../../vm/tests/common/mod.rs"]
mod common;

mod harness;

use harness::Running;

use serde_json::{json, Value};

fn port(d: &Running, name: &str) -> Value {
    let (_, ports) = d.call("GET", "/v1/networks/default/ports", None);
    ports
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .cloned()
        .unwrap_or(Value::Null)
}

/// The port's entry in /v1/stats (its counters).
fn port_stats(d: &Running, name: &str) -> Value {
    let (_, stats) = d.call("GET", "/v1/stats", None);
    stats[0]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["port"] == name)
        .cloned()
        .unwrap_or(Value::Null)
}

/// Bytes both ways between a vhost-user guest that negotiated offloads and a host
/// namespace on a TAP port with them (64 KiB segments whole on both sides), and from
/// it to a guest on a unixgram port (cut in software): equal SHA-256 at every receiver.
fn offloaded_transfers(d: &Running, dir: &std::path::Path, ns: &str, ns_ip: &str) {
    let served = dir.join("served");
    std::fs::create_dir_all(&served).unwrap();
    let blob_in = served.join("blob_in");
    sh(&[
        "dd",
        "if=/dev/urandom",
        &format!("of={}", blob_in.display()),
        "bs=1M",
        "count=16",
    ]);
    let want_in = harness::sha256_file(&blob_in);
    let _server = testkit::Killed(
        std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                ns,
                "python3",
                "-m",
                "http.server",
                "8000",
                "--bind",
                ns_ip,
            ])
            .arg("--directory")
            .arg(&served)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let cmd = format!(
        "echo \"QUEUES $(ls /sys/class/net/eth0/queues | tr '\\n' ' ')\"; \
         for i in $(seq 30); do wget -q -O /tmp/in http://{ns_ip}:8000/blob_in && break; sleep 1; done; \
         echo \"IN $(sha256sum < /tmp/in)\"; rm /tmp/in; \
         dd if=/dev/urandom of=/www/blob_out bs=1M count=16 2>/dev/null; \
         echo \"OUT $(sha256sum < /www/blob_out)\"; sleep 600"
    );
    let (s, v) = d.call(
        "POST",
        "/v1/vms",
        Some(json!({"name": "bulk", "network": "default", "http": true, "vhost_user": true, "cpus": 2, "cmd": cmd})),
    );
    assert_eq!(s, 201, "{v}");
    // Two vCPUs: a queue pair each.
    let queues = d.wait_line("bulk", "QUEUES ");
    assert!(queues.contains("tx-1") && queues.contains("rx-1"), "{queues}");
    let got_in = d.wait_line("bulk", "IN ");
    assert!(
        got_in.contains(&want_in),
        "namespace -> guest: sent {want_in}, got {got_in}"
    );
    let out = d.wait_line("bulk", "OUT ");
    let want_out = out.split_whitespace().nth(1).unwrap().to_string();
    let bulk_ip = d.wait_vm("bulk", &["ready", "failed"])["ip"]
        .as_str()
        .unwrap()
        .to_string();

    // Guest -> namespace.
    let fetched = dir.join("blob_out");
    let get = sh(&[
        "ip",
        "netns",
        "exec",
        ns,
        "busybox",
        "wget",
        "-q",
        "-O",
        fetched.to_str().unwrap(),
        &format!("http://{bulk_ip}/blob_out"),
    ]);
    assert!(get.status.success(), "{}", String::from_utf8_lossy(&get.stderr));
    assert_eq!(harness::sha256_file(&fetched), want_out, "guest -> namespace");

    // Guest -> a guest on a unixgram port, which takes no offloads.
    let cmd = "wget -q -O /tmp/b http://bulk/blob_out && echo \"GOT $(sha256sum < /tmp/b)\"";
    let (s, _) = d.call(
        "POST",
        "/v1/vms",
        Some(json!({"name": "plain", "network": "default", "cmd": cmd})),
    );
    assert_eq!(s, 201);
    let got = d.wait_line("plain", "GOT ");
    assert!(
        got.contains(&want_out),
        "guest -> unixgram guest: sent {want_out}, got {got}"
    );

    // Both directions went in segments larger than the MTU on the vhost-user side.
    let bulk = port(d, "bulk");
    let traffic = port_stats(d, "bulk")["traffic"].clone();
    let avg = |dir: &str| {
        traffic[format!("{dir}_bytes")].as_u64().unwrap_or(0)
            / traffic[format!("{dir}_frames")].as_u64().unwrap_or(1).max(1)
    };
    assert!(
        avg("rx") > 1514 && avg("tx") > 1514,
        "offloads in use on {bulk}: {traffic}"
    );
    for vm in ["bulk", "plain"] {
        d.call("DELETE", &format!("/v1/vms/{vm}"), None);
    }
}

fn sh(args: &[&str]) -> std::process::Output {
    std::process::Command::new(args[0]).args(&args[1..]).output().unwrap()
}

#[test]
fn a_vhost_user_guest_leases_and_reaches_guests_on_other_ports() {
    let Some(image) = common::guest_dir() else { return };
    if !testkit::ready_or_skip(testkit::is_root(), "needs root for the TAP port") {
        return;
    }
    let dir = common::workdir("vhost-user");
    let d = harness::start(&dir, Some(image));

    let (s, v) = d.call(
        "POST",
        "/v1/vms",
        Some(json!({"name": "web", "network": "default", "http": true, "vhost_user": true})),
    );
    assert_eq!(s, 201, "{v}");
    let web = d.wait_vm("web", &["ready", "failed"]);
    assert_eq!(web["state"], "ready", "leased through its virtqueues: {web}");
    let web_ip = web["ip"].as_str().unwrap().to_string();
    let p = port(&d, "web");
    assert_eq!(
        (p["kind"].as_str(), &p["up"]),
        (Some("vhost-user"), &json!(true)),
        "{p}"
    );

    // A guest on a unixgram port finds it by name, fetches its page and pings it.
    let cmd = format!("nslookup web && wget -qO- http://web/ && ping -c 2 -W 3 {web_ip}");
    let (s, _) = d.call(
        "POST",
        "/v1/vms",
        Some(json!({"name": "client", "network": "default", "cmd": cmd})),
    );
    assert_eq!(s, 201);
    let client = d.wait_vm("client", &["stopped", "failed"]);
    let (_, logs) = d.call("GET", "/v1/vms/client/logs", None);
    let logs = logs.as_str().unwrap_or("");
    assert!(
        logs.contains("hello from vmfabric guest") && logs.contains("VMFABRIC_CMD_EXIT 0"),
        "{client}\n{logs}"
    );

    // A host namespace on a TAP port leases and pings it.
    let ifname = format!("vmfvu{}", std::process::id() % 10000);
    let (s, v) = d.call(
        "POST",
        "/v1/networks/default/ports",
        Some(json!({"name": "tapguest", "kind": "tap", "ifname": ifname})),
    );
    assert_eq!(s, 201, "{v}");
    let mac = v["mac"].as_str().unwrap().to_string();
    let ns = testkit::Netns::new(&format!("vmfvu{}", std::process::id() % 10000));
    testkit::run(&["ip", "link", "set", &ifname, "netns", &ns.0]);
    testkit::run(&["ip", "-n", &ns.0, "link", "set", &ifname, "address", &mac]);
    testkit::run(&["ip", "-n", &ns.0, "link", "set", &ifname, "up"]);
    let lease = testkit::udhcpc_once(&ns.0, &ifname, &dir, &[]);
    assert!(lease.contains_key("ip"), "{lease:?}");
    let ping = sh(&[
        "ip", "netns", "exec", &ns.0, "busybox", "ping", "-c", "3", "-W", "3", &web_ip,
    ]);
    assert!(
        ping.status.success(),
        "{}{}",
        String::from_utf8_lossy(&ping.stdout),
        String::from_utf8_lossy(&ping.stderr)
    );

    offloaded_transfers(&d, &dir, &ns.0, &lease["ip"]);

    // Its VMM restarts: the new one connects to the same port and leases again.
    let (s, v) = d.call("POST", "/v1/vms/web/restart", None);
    assert_eq!(s, 200, "{v}");
    let again = d.wait_vm("web", &["ready", "failed"]);
    assert_eq!(
        (again["state"].as_str(), again["ip"].as_str()),
        (Some("ready"), Some(web_ip.as_str())),
        "{again}"
    );
    let ping = sh(&[
        "ip", "netns", "exec", &ns.0, "busybox", "ping", "-c", "3", "-W", "3", &web_ip,
    ]);
    assert!(
        ping.status.success(),
        "after the restart: {}",
        String::from_utf8_lossy(&ping.stdout)
    );
    let web_port = port_stats(&d, "web");
    assert!(
        web_port["traffic"]["rx_frames"].as_u64() > Some(0) && web_port["traffic"]["tx_frames"].as_u64() > Some(0),
        "its frames are counted as any port's: {web_port}"
    );
    d.stop();
}
