//! End to end with real QEMU guests (TCG) run by a real daemon process: four guests on
//! two networks. Each gets a lease, resolves and pings its neighbour by name and
//! fetches its page; cannot reach the other network; reaches a host loopback server
//! through the host-access address only where the network allows it; a guest serves a
//! page the host fetches through a TCP forward; a guest sending with a spoofed source
//! IP or MAC is not heard; a guest killed from outside is Failed and its port freed;
//! the daemon killed with -9 and started again keeps every lease and forward, adopts
//! the guest that outlived it, and that guest keeps its address across a renew.
//! Needs root (nothing here creates devices, but QEMU under TCG is slow enough that
//! the suite is run only where every test must run) and QEMU with the guest image.

#[path = "../../vm/tests/common/mod.rs"]
mod common;
mod harness;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::time::{Duration, Instant};

use harness::Process as Daemon;
use serde_json::{json, Value};

fn get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(s, "GET {path} HTTP/1.0\r\n\r\n")?;
    let mut page = String::new();
    s.read_to_string(&mut page)?;
    Ok(page)
}

fn ip_of(v: &Value) -> Ipv4Addr {
    v["ip"].as_str().unwrap().parse().unwrap()
}

fn leases(d: &Daemon, net: &str) -> Vec<Value> {
    let mut v = d
        .ok("GET", &format!("/v1/networks/{net}/leases"), None)
        .as_array()
        .unwrap()
        .clone();
    v.sort_by_key(|l| l["ip"].as_str().unwrap().to_string());
    v
}

#[test]
fn four_guests_on_two_networks_end_to_end_across_a_daemon_kill() {
    let Some(image) = common::guest_dir() else { return };
    if !rustix::process::geteuid().is_root() {
        assert!(
            std::env::var("VMFABRIC_REQUIRE_ALL_TESTS").as_deref() != Ok("1"),
            "must run here: needs root"
        );
        eprintln!("SKIP: the end-to-end suite runs as root");
        return;
    }
    let dir = common::workdir("e2e");
    let d = Daemon::start(&dir, &image);

    // A web server on host loopback only.
    let web_port = testkit::loopback_web_server("host loopback page");

    d.ok(
        "POST",
        "/v1/networks",
        Some(json!({"name": "red", "subnet": "10.81.0.0/24", "host_access": true})),
    );
    d.ok(
        "POST",
        "/v1/networks",
        Some(json!({"name": "blue", "subnet": "10.82.0.0/24"})),
    );

    // The servers: r1 renews its lease every few seconds for the rest of its life
    // (printing what it got), b1 just serves.
    let renew = "while :; do sleep 4; ip=$(cat /run/ip); \
                 udhcpc -i eth0 -s /etc/dhcp-hook -n -q -t 3 -T 1 -r \"$ip\" >/dev/null 2>&1 \
                 && echo \"RENEWED $(cat /run/ip)\"; done";
    d.ok(
        "POST",
        "/v1/vms",
        Some(json!({"name": "r1", "network": "red", "http": true, "cmd": renew})),
    );
    d.ok(
        "POST",
        "/v1/vms",
        Some(json!({"name": "b1", "network": "blue", "http": true})),
    );
    let r1 = d.wait_vm("r1", &["ready", "failed"]);
    let b1 = d.wait_vm("b1", &["ready", "failed"]);
    assert_eq!(
        (r1["state"].as_str(), b1["state"].as_str()),
        (Some("ready"), Some("ready"))
    );
    let (r1_ip, b1_ip) = (ip_of(&r1), ip_of(&b1));

    // The clients check everything from inside, then power off. r2 also tries to be
    // heard with a spoofed source IP, then with a spoofed MAC (its own port is locked
    // to its lease).
    let r2_cmd = format!(
        "nslookup r1 && ping -c 2 -W 3 r1 && wget -qO- http://r1/ && echo NEIGHBOUR-OK; \
         timeout 10 wget -qO- http://10.81.0.254:{web_port}/ && echo && echo HOST-OK; \
         if ping -c 2 -W 2 {b1_ip}; then echo CROSS-REACHED; else echo CROSS-BLOCKED; fi; \
         ip addr add 10.81.0.200/24 dev eth0; \
         if ping -c 2 -W 2 -I 10.81.0.200 10.81.0.1; then echo SPOOF-IP-HEARD; else echo SPOOF-IP-UNHEARD; fi; \
         ip link set eth0 down; ip link set eth0 address 02:de:ad:be:ef:01; ip link set eth0 up; \
         if ping -c 2 -W 2 10.81.0.1; then echo SPOOF-MAC-HEARD; else echo SPOOF-MAC-UNHEARD; fi"
    );
    let b2_cmd = format!(
        "nslookup b1 && ping -c 2 -W 3 b1 && wget -qO- http://b1/ && echo NEIGHBOUR-OK; \
         if timeout 8 wget -qO- http://10.82.0.254:{web_port}/; then echo HOST-REACHED; else echo HOST-DENIED; fi; \
         if ping -c 2 -W 2 {r1_ip}; then echo CROSS-REACHED; else echo CROSS-BLOCKED; fi; \
         if nslookup r1.vm.internal.; then echo NAME-LEAKED; else echo NAME-UNKNOWN; fi"
    );
    d.ok(
        "POST",
        "/v1/vms",
        Some(json!({"name": "r2", "network": "red", "cmd": r2_cmd})),
    );
    d.ok(
        "POST",
        "/v1/vms",
        Some(json!({"name": "b2", "network": "blue", "cmd": b2_cmd})),
    );
    let r2_out = d.wait_log("r2", "VMFABRIC_END");
    let b2_out = d.wait_log("b2", "VMFABRIC_END");
    for (out, want) in [
        (&r2_out, "NEIGHBOUR-OK"),
        (&r2_out, "hello from vmfabric guest"),
        (&r2_out, "host loopback page"),
        (&r2_out, "HOST-OK"),
        (&r2_out, "CROSS-BLOCKED"),
        (&r2_out, "SPOOF-IP-UNHEARD"),
        (&r2_out, "SPOOF-MAC-UNHEARD"),
        (&b2_out, "NEIGHBOUR-OK"),
        (&b2_out, "HOST-DENIED"),
        (&b2_out, "CROSS-BLOCKED"),
        (&b2_out, "NAME-UNKNOWN"),
    ] {
        assert!(out.contains(want), "{want} missing:\n{out}");
    }
    assert!(
        d.metric("vmfabric_network_drops_total{network=\"red\",reason=\"spoofed\"}") > 0,
        "the spoofed frames were dropped by the switch"
    );
    // r2 and b2 ran their commands and powered off: their ports went, and their
    // leases with them; r1 and b1 keep theirs.
    let held = |net: &str| -> Vec<String> {
        leases(&d, net)
            .iter()
            .map(|l| l["ip"].as_str().unwrap().to_string())
            .collect()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while (held("red").len(), held("blue").len()) != (1, 1) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert_eq!(held("red"), vec![r1_ip.to_string()], "only r1 holds a lease on red");
    assert_eq!(held("blue"), vec![b1_ip.to_string()], "only b1 holds a lease on blue");

    // The host reaches r1's page through a TCP forward.
    let fw = d.ok(
        "POST",
        "/v1/networks/red/forwards",
        Some(json!({"host": "127.0.0.1:0", "guest": format!("{r1_ip}:80")})),
    );
    let published: std::net::SocketAddr = fw["host"].as_str().unwrap().parse().unwrap();
    assert!(get(published, "/").unwrap().contains("hello from vmfabric guest"));

    // b1 killed from outside: Failed, and its port is freed.
    let pid = vm::process::ProcessId::of(b1["pid"].as_u64().unwrap() as u32).unwrap();
    assert!(pid.signal(rustix::process::Signal::KILL).unwrap());
    let b1 = d.wait_vm("b1", &["failed"]);
    assert!(b1["reason"].as_str().unwrap().contains("signal: 9"), "{b1}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while d
        .ok("GET", "/v1/networks/blue/ports", None)
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["name"] == "b1")
    {
        assert!(Instant::now() < deadline, "b1's port was not freed");
        std::thread::sleep(Duration::from_millis(100));
    }

    // kill -9 of the daemon: r1 outlives it; the new daemon adopts it and keeps every
    // lease and forward, and r1 renews to the same address.
    let red_before = leases(&d, "red");
    let blue_before = leases(&d, "blue");
    let forwards_before = d.ok("GET", "/v1/networks/red/forwards", None);
    d.kill_9();
    let renewals_before = std::fs::read_to_string(dir.join("run/vms/r1.console"))
        .map(|t| t.matches("RENEWED").count())
        .unwrap_or(0);
    let d = Daemon::start(&dir, &image);
    assert_eq!(leases(&d, "red"), red_before);
    assert_eq!(leases(&d, "blue"), blue_before);
    assert_eq!(d.ok("GET", "/v1/networks/red/forwards", None), forwards_before);
    let r1_again = d.wait_vm("r1", &["ready", "failed"]);
    assert_eq!(r1_again["state"], "ready", "{r1_again}");
    assert_eq!(ip_of(&r1_again), r1_ip);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let logs = d.logs("r1");
        if logs.matches("RENEWED").count() > renewals_before {
            let last = logs.lines().rfind(|l| l.starts_with("RENEWED")).unwrap().to_string();
            assert_eq!(last, format!("RENEWED {r1_ip}"), "r1 keeps its address");
            break;
        }
        assert!(Instant::now() < deadline, "r1 did not renew after the restart:\n{logs}");
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(
        get(published, "/").unwrap().contains("hello from vmfabric guest"),
        "the forward serves again after the restart"
    );
    drop(d);
}

/// VMs declared in the config file start with the daemon; one that cannot start (its
/// disk is missing) is listed as failed with the reason and the daemon runs on. After
/// a `kill -9` and a restart with the same file, the running VM is adopted, not
/// started twice.
#[test]
fn declared_vms_start_with_the_daemon_and_are_adopted_after_its_kill() {
    let Some(image) = common::guest_dir() else { return };
    let dir = common::workdir("e2e-declared-vms");
    let files = dir.join("files");
    std::fs::create_dir_all(&files).unwrap();
    let cfg = dir.join("vmfabric.toml");
    std::fs::write(
        &cfg,
        format!(
            "vm_paths = [{files:?}]\n\
             [[vm]]\nname = \"decl\"\nnetwork = \"default\"\nhttp = true\n\
             [[vm]]\nname = \"broken\"\nnetwork = \"default\"\n\
             disks = [{{ path = {missing:?} }}]\n",
            files = files.display().to_string(),
            missing = files.join("missing.raw").display().to_string(),
        ),
    )
    .unwrap();
    let more = [std::ffi::OsStr::new("--config"), cfg.as_os_str()];
    let d = Daemon::start_with(&dir, &image, &more);
    let decl = d.wait_vm("decl", &["ready", "failed"]);
    assert_eq!(decl["state"], "ready", "{decl}");
    let broken = d.ok("GET", "/v1/vms/broken", None);
    assert_eq!(broken["state"], "failed", "{broken}");
    assert!(
        broken["reason"]
            .as_str()
            .unwrap()
            .contains("missing.raw does not exist"),
        "{broken}"
    );
    let names = |d: &Daemon| -> Vec<String> {
        let vms = d.ok("GET", "/v1/vms", None);
        vms.as_array()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(names(&d), ["broken", "decl"]);

    d.kill_9();
    let d = Daemon::start_with(&dir, &image, &more);
    let again = d.wait_vm("decl", &["ready", "failed"]);
    assert_eq!(
        (&again["state"], &again["pid"], &again["ip"]),
        (&decl["state"], &decl["pid"], &decl["ip"]),
        "the same VMM, adopted: {again}"
    );
    assert_eq!(names(&d), ["broken", "decl"], "nothing started twice");
    // Stopping the failed one forgets it.
    d.ok("DELETE", "/v1/vms/broken", None);
    assert_eq!(names(&d), ["decl"]);
}
