//! Kernel-mode networks with a real daemon process and real QEMU guests (TCG) on TAP
//! devices: both guests get the addresses the pool reserved for their ports from
//! vmfabric's DHCP (served through the bridge's uplink), resolve and reach each other
//! through the Linux bridge, and reach a server in an "outside" namespace through
//! nftables masquerade; clients in that namespace and on the host's loopback reach a
//! guest through forwards (DNAT). After `kill -9` of the daemon and a restart the devices are
//! adopted (same interface indexes, nothing duplicated), a stale device of this daemon
//! is removed, a device that is not vmfabric's stays, and the guests stay reachable.
//! A second network with isolated ports: its guests reach the router but not each
//! other nor the first network, and a spoofed source IP or MAC is not heard.
//! Deleting a network removes its devices and rules. Needs root, nft and QEMU.

#[path = "../../vm/tests/common/mod.rs"]
mod common;
mod harness;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use harness::Process;
use serde_json::{json, Value};
use testkit::run;
use testkit::Guest;
use vm::{Nic, NicBackend};

fn ifindex(name: &str) -> u32 {
    std::fs::read_to_string(format!("/sys/class/net/{name}/ifindex"))
        .unwrap_or_default()
        .trim()
        .parse()
        .unwrap_or(0)
}

/// Devices whose alias marks them as this daemon instance's.
fn ours(instance: &str) -> HashSet<String> {
    harness::kernel_devices(instance)
}

/// A guest on a kernel port (its TAP device and MAC from the API), serving HTTP.
fn boot(image: &Path, work: &Path, name: &str, port: &Value, cmd: &str) -> Guest {
    let nic = Nic {
        backend: NicBackend::Tap {
            ifname: port["path"].as_str().unwrap().to_string(),
        },
        mac: port["mac"].as_str().unwrap().parse().unwrap(),
    };
    let log = work.join(format!("{name}.log"));
    Guest::boot(image, log, nic, name, Some(cmd), &["VMF_HTTP=1", "VMF_END=hang"])
}

struct Cleanup(Vec<Vec<&'static str>>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for c in &self.0 {
            let _ = Command::new(c[0]).args(&c[1..]).stderr(Stdio::null()).status();
        }
    }
}

#[test]
fn a_kernel_network_serves_real_guests_and_survives_kill_9() {
    let Some(image) = common::guest_dir() else { return };
    let ready = testkit::is_root() && Command::new("nft").arg("--version").output().is_ok();
    if !testkit::ready_or_skip(ready, "needs root and nft (apt-get install nftables)") {
        return;
    }
    let dir = common::workdir("kernel");
    let id = std::process::id() % 100_000;
    let outside = format!("ko{id}");
    let (host_end, far_end, foreign) = (format!("kh{id}"), format!("kf{id}"), format!("vmfx{id}"));
    let _cleanup = Cleanup(vec![
        vec!["ip", "netns", "del", Box::leak(outside.clone().into_boxed_str())],
        vec!["ip", "link", "del", Box::leak(host_end.clone().into_boxed_str())],
        vec!["ip", "link", "del", Box::leak(foreign.clone().into_boxed_str())],
    ]);
    // The outside: a namespace behind a veth pair with a web server.
    run(&["ip", "netns", "add", &outside]);
    run(&["ip", "link", "add", &host_end, "type", "veth", "peer", "name", &far_end]);
    run(&["ip", "link", "set", &far_end, "netns", &outside]);
    run(&["ip", "addr", "add", "10.207.0.1/30", "dev", &host_end]);
    run(&["ip", "link", "set", &host_end, "up"]);
    run(&["ip", "-n", &outside, "addr", "add", "10.207.0.2/30", "dev", &far_end]);
    run(&["ip", "-n", &outside, "link", "set", &far_end, "up"]);
    let web = {
        let ns = outside.clone();
        std::thread::spawn(move || {
            use std::os::fd::AsFd;
            let f = std::fs::File::open(format!("/var/run/netns/{ns}")).unwrap();
            rustix::thread::move_into_link_name_space(f.as_fd(), Some(rustix::thread::LinkNameSpaceType::Network))
                .unwrap();
            std::net::TcpListener::bind("10.207.0.2:8080").unwrap()
        })
        .join()
        .unwrap()
    };
    std::thread::spawn(move || {
        for s in web.incoming() {
            let Ok(mut s) = s else { continue };
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            let body = format!("outside sees {}", s.peer_addr().unwrap().ip());
            let _ = write!(s, "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len());
        }
    });
    // Somebody else's device with a name like ours: never touched.
    run(&[
        "ip",
        "link",
        "add",
        &foreign,
        "type",
        "veth",
        "peer",
        "name",
        &format!("vmfy{id}"),
    ]);

    let instance = vmfabric::kernel::instance_of(&dir.join("state"));
    let _devices = harness::KernelInstanceGone(instance.clone());
    let table = hostnet::nft::table_name(&instance);
    let d = Process::start(&dir, &image);
    let net = d.ok(
        "POST",
        "/v1/networks",
        Some(json!({"name": "kred", "subnet": "10.84.0.0/24", "mode": "kernel"})),
    );
    assert_eq!(net["mode"], "kernel", "{net}");
    let port_a = d.ok(
        "POST",
        "/v1/networks/kred/ports",
        Some(json!({"name": "a", "kind": "tap"})),
    );
    let port_b = d.ok(
        "POST",
        "/v1/networks/kred/ports",
        Some(json!({"name": "b", "kind": "tap", "owner_uid": 1000, "owner_gid": 1000})),
    );
    let sys = |what: &str| {
        let path = format!("/sys/class/net/{}/{what}", port_b["path"].as_str().unwrap());
        std::fs::read_to_string(path).unwrap_or_default().trim().to_string()
    };
    assert_eq!(
        (sys("owner"), sys("group")),
        ("1000".into(), "1000".into()),
        "an unprivileged VMM may open it"
    );
    let (s, _) = d.call(
        "POST",
        "/v1/networks/kred/ports",
        Some(json!({"name": "c", "kind": "unixgram"})),
    );
    assert_eq!(s, 400, "kernel networks take TAP ports");
    let reserved = |mac: &Value| -> String {
        d.ok("GET", "/v1/networks/kred/reservations", None)
            .as_array()
            .unwrap()
            .iter()
            .find(|r| &r["key"] == mac)
            .map(|r| r["ip"].as_str().unwrap().to_string())
            .expect("a reservation for the port")
    };
    let (ip_a, ip_b) = (reserved(&port_a["mac"]), reserved(&port_b["mac"]));
    assert_eq!(
        (ip_a.as_str(), ip_b.as_str()),
        ("10.84.0.3", "10.84.0.4"),
        "lowest free after .1 and .2"
    );
    let tap_a = port_a["path"].as_str().unwrap().to_string();
    let bridge = run(&["ip", "-o", "link", "show", &tap_a])
        .split_whitespace()
        .skip_while(|w| *w != "master")
        .nth(1)
        .unwrap()
        .to_string();
    assert!(run(&["ip", "addr", "show", &bridge]).contains("10.84.0.1/24"));

    let work = dir.join("guests");
    std::fs::create_dir_all(&work).unwrap();
    let mut a = boot(&image, &work, "a", &port_a, "true");
    // b looks a up by name: a must hold its lease first.
    let out_a = a.wait_for("VMFABRIC_READY");
    let mut b = boot(
        &image,
        &work,
        "b",
        &port_b,
        "nslookup a && ping -c 2 -W 3 a && wget -qO- http://a/ && echo && wget -qO- http://10.207.0.2:8080/ && echo",
    );
    assert!(
        out_a.contains(&format!(" {ip_a} ")),
        "a got its reserved address:\n{out_a}"
    );
    let out_b = b.wait_for("VMFABRIC_CMD_EXIT");
    assert!(out_b.contains(&format!(" {ip_b} ")), "{out_b}");
    assert!(
        out_b.contains("hello from vmfabric guest"),
        "b fetched a's page:\n{out_b}"
    );
    assert!(
        out_b.contains("outside sees 10.207.0.1"),
        "masqueraded to the outside:\n{out_b}"
    );
    assert!(out_b.contains("VMFABRIC_CMD_EXIT 0"), "{out_b}");

    // A second kernel network with isolated ports: c and d get leases and reach the
    // router, not each other, not the other network; d is not heard with a spoofed
    // source IP or MAC.
    d.ok(
        "POST",
        "/v1/networks",
        Some(json!({"name": "kblue", "subnet": "10.85.0.0/24", "mode": "kernel", "isolated": true, "bridge": format!("vmfkb{id}")})),
    );
    assert!(
        ifindex(&format!("vmfkb{id}")) > 0,
        "the bridge has the name it was given"
    );
    let port_c = d.ok(
        "POST",
        "/v1/networks/kblue/ports",
        Some(json!({"name": "c", "kind": "tap"})),
    );
    let port_d = d.ok(
        "POST",
        "/v1/networks/kblue/ports",
        Some(json!({"name": "d", "kind": "tap"})),
    );
    // kblue's egress policy: only the outside's web server, by TCP; the kernel enforces
    // it, and the host's own services stay out of the guests' reach.
    d.ok(
        "PUT",
        "/v1/networks/kblue/policy",
        Some(json!({"default": "deny", "rules": [{"action": "allow", "dst": "10.207.0.2/32", "proto": "tcp", "ports": "8080"}]})),
    );
    let host_service = std::net::TcpListener::bind("10.85.0.1:18090").unwrap();
    std::thread::spawn(move || {
        for s in host_service.incoming() {
            let _ = s.and_then(|mut s| s.write_all(b"HTTP/1.0 200 OK\r\n\r\nhost service\n"));
        }
    });
    let mut c = boot(&image, &work, "c", &port_c, "true");
    let out_c = c.wait_for("VMFABRIC_READY");
    let ip_c = testkit::ready_ip(&out_c).unwrap();
    let d_cmd = format!(
        "ping -c 1 -W 3 10.85.0.1 && echo ROUTER-OK; \
         if ping -c 2 -W 2 {ip_c}; then echo PEER-REACHED; else echo PEER-ISOLATED; fi; \
         if timeout 5 wget -qO- http://{ip_a}/; then echo CROSS-REACHED; else echo CROSS-BLOCKED; fi; \
         if timeout 5 wget -qO- http://10.207.0.2:8080/; then echo; echo OUT-ALLOWED; fi; \
         if ping -c 1 -W 2 10.207.0.2; then echo OUT-PING-PASSED; else echo OUT-PING-DENIED; fi; \
         if timeout 5 wget -qO- http://10.85.0.1:18090/; then echo HOST-REACHED; else echo HOST-REFUSED; fi; \
         ip addr add 10.85.0.200/24 dev eth0; \
         if ping -c 2 -W 2 -I 10.85.0.200 10.85.0.1; then echo SPOOF-IP-HEARD; else echo SPOOF-IP-UNHEARD; fi; \
         ip link set eth0 down; ip link set eth0 address 02:de:ad:be:ef:02; ip link set eth0 up; \
         if ping -c 2 -W 2 10.85.0.1; then echo SPOOF-MAC-HEARD; else echo SPOOF-MAC-UNHEARD; fi"
    );
    let mut dg = boot(&image, &work, "d", &port_d, &d_cmd);
    let out_d = dg.wait_for("VMFABRIC_CMD_EXIT");
    for want in [
        "ROUTER-OK",
        "PEER-ISOLATED",
        "CROSS-BLOCKED",
        "OUT-ALLOWED",
        "OUT-PING-DENIED",
        "HOST-REFUSED",
        "SPOOF-IP-UNHEARD",
        "SPOOF-MAC-UNHEARD",
    ] {
        assert!(out_d.contains(want), "{want} missing:\n{out_d}");
    }
    assert!(d.metric("vmfabric_kernel_egress_denied_total{network=\"kblue\"}") >= 1);
    assert!(d.metric("vmfabric_kernel_input_denied_total{network=\"kblue\"}") >= 1);
    // Every kernel network bounds each guest's connections (hostnet's nat_rules test
    // drives the bound); nobody here came near it.
    let metrics = d.ok("GET", "/metrics", None);
    assert!(
        metrics
            .as_str()
            .unwrap_or_default()
            .contains("vmfabric_kernel_flows_denied_total{network=\"kblue\"} 0\n"),
        "{metrics}"
    );
    // With kernel networks' families too, the page is well formed.
    harness::check_metrics_pages(&d.socket);
    drop((c, dg));
    let (s, v) = d.call("DELETE", "/v1/networks/kblue?force=true", None);
    assert!((200..300).contains(&s), "{s} {v}");

    // A forward from the host's outside address reaches a's web server, from outside.
    d.ok(
        "POST",
        "/v1/networks/kred/forwards",
        Some(json!({"host": "10.207.0.1:8082", "guest": format!("{ip_a}:80")})),
    );
    let through_forward = run(&[
        "ip",
        "netns",
        "exec",
        &outside,
        "busybox",
        "wget",
        "-qO-",
        "http://10.207.0.1:8082/",
    ]);
    assert!(
        through_forward.contains("hello from vmfabric guest"),
        "{through_forward}"
    );
    // And from the host itself, at its loopback.
    d.ok(
        "POST",
        "/v1/networks/kred/forwards",
        Some(json!({"host": "127.0.0.1:18083", "guest": format!("{ip_a}:80")})),
    );
    let local = run(&["busybox", "wget", "-qO-", "http://127.0.0.1:18083/"]);
    assert!(local.contains("hello from vmfabric guest"), "{local}");
    let rules = run(&["nft", "list", "table", "inet", &table]);
    assert_eq!(
        rules.matches("dnat").count(),
        4,
        "two forwards, prerouting and output: {rules}"
    );

    // kill -9, a stale device of this daemon, and a restart.
    let before: Vec<(String, u32)> = {
        let mut v: Vec<_> = ours(&instance).into_iter().map(|n| (n.clone(), ifindex(&n))).collect();
        v.sort();
        v
    };
    assert_eq!(before.len(), 4, "bridge, uplink and two TAPs: {before:?}");
    d.kill_9();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let stale = format!("vmft{id}");
    rt.block_on(async {
        let links = hostnet::Links::connect().unwrap();
        let br = links.index(&bridge).await.unwrap().unwrap();
        let tag = format!("{instance} port kred/gone");
        links
            .ensure_tap(&stale, &tag, br, &hostnet::TapOptions::default())
            .await
            .unwrap();
    });
    let d = Process::start(&dir, &image);
    let after: Vec<(String, u32)> = {
        let mut v: Vec<_> = ours(&instance).into_iter().map(|n| (n.clone(), ifindex(&n))).collect();
        v.sort();
        v
    };
    assert_eq!(after, before, "adopted, nothing duplicated, the stale one removed");
    assert!(ifindex(&foreign) > 0, "a device that is not vmfabric's stays");
    let ping = Command::new("busybox")
        .args(["ping", "-c", "2", "-W", "3", &ip_a])
        .output()
        .unwrap();
    assert!(ping.status.success(), "the host still reaches a through the bridge");
    assert!(
        run(&["nft", "list", "table", "inet", &table]).contains("10.84.0.0/24"),
        "the NAT rules are there again"
    );
    let (_, forwards) = d.call("GET", "/v1/networks/kred/forwards", None);
    assert_eq!(forwards.as_array().map(Vec::len), Some(2), "{forwards}");
    let local = run(&["busybox", "wget", "-qO-", "http://127.0.0.1:18083/"]);
    assert!(
        local.contains("hello from vmfabric guest"),
        "the forward works after the restart"
    );
    let (s, _) = d.call("DELETE", "/v1/networks/kred/forwards/127.0.0.1:18083", None);
    assert_eq!(s, 204);
    assert_eq!(
        run(&["nft", "list", "table", "inet", &table]).matches("dnat").count(),
        2,
        "removing a forward removes its rules"
    );

    // a's port goes: the forward to it is listed as dangling and loses its DNAT, so a
    // client from outside is refused at once by the host instead of waiting on a
    // guest that is gone.
    drop(a);
    let (s, _) = d.call("DELETE", "/v1/networks/kred/ports/a", None);
    assert_eq!(s, 204);
    let (_, forwards) = d.call("GET", "/v1/networks/kred/forwards", None);
    assert_eq!(forwards[0]["dangling"], json!(true), "{forwards}");
    assert_eq!(
        run(&["nft", "list", "table", "inet", &table]).matches("dnat").count(),
        0,
        "no DNAT to a gone guest"
    );
    let refused = Command::new("ip")
        // (busybox 1.35's wget crashes on a refusal when given -T: `timeout` instead.)
        .args(["netns", "exec", &outside, "timeout", "10", "busybox", "wget", "-O-"])
        .arg("http://10.207.0.1:8082/")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && said.contains("refused"),
        "{:?}: {said}",
        refused.status
    );

    // Deleting the network removes its devices and rules.
    drop(b);
    let (s, v) = d.call("DELETE", "/v1/networks/kred?force=true", None);
    assert!((200..300).contains(&s), "{s} {v}");
    assert!(ours(&instance).is_empty(), "{:?}", ours(&instance));
    assert!(Command::new("nft")
        .args(["list", "table", "inet", &table])
        .output()
        .map(|o| !o.status.success())
        .unwrap_or(true));
}
