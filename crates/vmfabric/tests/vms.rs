//! VMs through the daemon's API with real QEMU guests (TCG): leases from the gateway,
//! names, a page fetched guest to guest, a guest powering itself off, and a VMM killed
//! from outside reported Failed with its port freed.

#[path = "../../vm/tests/common/mod.rs"]
mod common;

mod harness;

use std::time::{Duration, Instant};

use serde_json::{json, Value};

#[test]
fn vms_run_find_each_other_and_end_cleanly_or_failed() {
    let Some(image) = common::guest_dir() else { return };
    let dir = common::workdir("daemon-vms");
    let d = harness::start(&dir, Some(image));
    let events = d.follow_events();

    let (s, v) = d.call(
        "POST",
        "/v1/vms",
        Some(json!({"name": "web", "network": "default", "http": true})),
    );
    assert_eq!(s, 201, "{v}");
    let (s, _) = d.call("POST", "/v1/vms", Some(json!({"name": "web", "network": "default"})));
    assert_eq!(s, 409, "one VM per name");
    let (s, _) = d.call(
        "POST",
        "/v1/vms",
        Some(json!({"name": "big", "network": "default", "memory_mib": 32})),
    );
    assert_eq!(s, 400, "too little memory is refused before anything starts");
    let web = d.wait_vm("web", &["ready", "failed"]);
    let web_ip = web["ip"].clone();
    assert_eq!(web["state"], "ready", "{web}");
    let (_, leases) = d.call("GET", "/v1/networks/default/leases", None);
    let lease = leases
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["mac"] == web["mac"])
        .expect("web's lease")
        .clone();
    assert_eq!(web["ip"], lease["ip"], "ready with the leased address");

    let cmd = "nslookup web && wget -qO- http://web/";
    let (s, _) = d.call(
        "POST",
        "/v1/vms",
        Some(json!({"name": "client", "network": "default", "cmd": cmd})),
    );
    assert_eq!(s, 201);
    let client_vm = d.wait_vm("client", &["stopped", "failed"]);
    assert_eq!(
        client_vm["state"], "stopped",
        "a guest that powers itself off has stopped: {client_vm}"
    );
    let (_, logs) = d.call("GET", "/v1/vms/client/logs", None);
    let logs = logs.as_str().unwrap();
    assert!(
        logs.contains("hello from vmfabric guest") && logs.contains("VMFABRIC_CMD_EXIT 0"),
        "{logs}"
    );

    // Paused: the guest answers nothing, keeping its port and lease; resumed: it
    // answers again, Ready as before.
    let (s, fw) = d.call(
        "POST",
        "/v1/networks/default/forwards",
        Some(json!({"host": "127.0.0.1:0", "guest": format!("{}:80", web_ip.as_str().unwrap())})),
    );
    assert_eq!(s, 201, "{fw}");
    let published = fw["host"].as_str().unwrap().to_string();
    let fetch = || -> Option<String> {
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect(&published).ok()?;
        c.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
        c.write_all(b"GET / HTTP/1.0\r\nHost: web\r\n\r\n").ok()?;
        let mut page = String::new();
        c.read_to_string(&mut page).ok()?;
        (!page.is_empty()).then_some(page)
    };
    assert!(fetch().is_some(), "web answers through the forward");
    let (s, v) = d.call("POST", "/v1/vms/web/pause", None);
    assert_eq!((s, v["state"].as_str()), (200, Some("paused")), "{v}");
    assert_eq!(fetch(), None, "a paused guest answers nothing");
    let (s, v) = d.call("GET", "/v1/vms/web/inspect", None);
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        (v["qmp_status"].as_str(), &v["lease"]["ip"], &v["port_view"]["up"]),
        (Some("paused"), &web_ip, &json!(true)),
        "{v}"
    );
    let text = std::process::Command::new(env!("CARGO_BIN_EXE_vmfabric"))
        .args(["vm", "inspect", "web", "--socket"])
        .arg(&d.socket)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("qemu says: paused") && text.contains("http:      true"),
        "{text}"
    );
    let (s, v) = d.call("POST", "/v1/vms/web/pause", None);
    assert_eq!(s, 409, "paused already: {v}");
    let (s, v) = d.call("POST", "/v1/vms/web/resume", None);
    assert_eq!((s, v["state"].as_str()), (200, Some("ready")), "{v}");
    assert!(fetch().is_some(), "resumed, it answers again");
    events.wait_for(json!({"type": "vm_state", "vm": "web", "state": "paused"}));

    // Restarted: a new VMM with the same settings, the same name, MAC and address.
    let (s, v) = d.call("POST", "/v1/vms/web/restart", None);
    assert_eq!(s, 200, "{v}");
    assert_ne!(v["pid"], web["pid"], "a new VMM");
    // `vm logs --follow` prints the console as it grows, until the VM ends.
    let follower = std::process::Command::new(env!("CARGO_BIN_EXE_vmfabric"))
        .args(["vm", "logs", "web", "--follow", "--socket"])
        .arg(&d.socket)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let web = d.wait_vm("web", &["ready", "failed"]);
    assert_eq!((web["state"].as_str(), &web["ip"]), (Some("ready"), &web_ip), "{web}");
    assert!(fetch().is_some(), "the restarted guest serves its page");

    // Killed from outside: Failed, with a reason, and its port is freed.
    let pid = vm::process::ProcessId::of(web["pid"].as_u64().unwrap() as u32).unwrap();
    assert!(pid.signal(rustix::process::Signal::KILL).unwrap());
    let followed = follower.wait_with_output().unwrap();
    let followed = String::from_utf8_lossy(&followed.stdout);
    assert!(
        followed.contains("VMFABRIC_READY"),
        "the follower saw the boot: {followed}"
    );
    let web = d.wait_vm("web", &["failed"]);
    assert!(web["reason"].as_str().unwrap().contains("signal: 9"), "{web}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, ports) = d.call("GET", "/v1/networks/default/ports", None);
        if ports.as_array().unwrap().iter().all(|p| p["name"] != "web") {
            break;
        }
        assert!(Instant::now() < deadline, "web's port was not freed: {ports}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The event stream told the same story as it happened.
    for want in [
        json!({"type": "vm_state", "vm": "web", "state": "running"}),
        json!({"type": "vm_state", "vm": "web", "state": "ready", "ip": web_ip}),
        json!({"type": "port_up", "network": "default", "port": "web"}),
        json!({"type": "lease_bound", "network": "default", "ip": web_ip}),
        json!({"type": "vm_state", "vm": "client", "state": "stopped"}),
        json!({"type": "lease_released", "network": "default", "mac": client_vm["mac"]}),
        json!({"type": "vm_state", "vm": "web", "state": "failed"}),
    ] {
        let e = events.wait_for(want);
        assert!(
            e["time"].as_str().is_some_and(|t| t.parse::<jiff::Timestamp>().is_ok()),
            "{e}"
        );
    }
    let (s, _) = d.call("DELETE", "/v1/vms/client", None);
    assert_eq!(s, 200);
    let (s, _) = d.call("GET", "/v1/vms/client", None);
    assert_eq!(s, 404);
    d.stop();
}

/// A VM on two networks with three data disks (an overlay of a base image, one it
/// writes, one it may not), a cloud-init seed and a shared directory, run from the CLI
/// with paths relative to where the CLI runs: the guest leases on both networks and
/// pings both gateways, writes what it may and is refused what it may not, reads its
/// seed; the base image is unchanged and the overlay holds the write. Paths outside
/// the daemon's VM directories, missing disks and (on a host without vhost-vsock)
/// vsock are refused with the reason.
#[test]
fn a_vm_gets_its_nics_disks_seed_and_share() {
    let Some(image) = common::guest_dir() else { return };
    let dir = common::workdir("daemon-vm-devices");
    let d = harness::start(&dir, Some(image));
    let files = dir.join("files");
    std::fs::create_dir_all(files.join("work")).unwrap();
    d.daemon.vms().allow_paths(vec![files.clone()]);
    let base = vec![0x5au8; 1 << 20];
    std::fs::write(files.join("base.raw"), &base).unwrap();
    std::fs::write(files.join("rw.raw"), vec![0u8; 1 << 20]).unwrap();
    std::fs::write(files.join("ro.raw"), vec![0u8; 1 << 20]).unwrap();
    std::fs::write(files.join("user-data.yaml"), "#cloud-config\nhostname: multi\n").unwrap();
    let (s, v) = d.call(
        "POST",
        "/v1/networks",
        Some(json!({"name": "second", "subnet": "10.78.5.0/24"})),
    );
    assert_eq!(s, 201, "{v}");

    let cli = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_vmfabric"))
            .args(args)
            .env("VMFABRIC_SOCKET", &d.socket)
            .current_dir(&files)
            .output()
            .unwrap()
    };
    let script = [
        "ping -c1 -W5 10.77.0.1 >/dev/null && echo PING_DEFAULT_OK",
        "ping -c1 -W5 10.78.5.1 >/dev/null && echo PING_SECOND_OK",
        "printf guest-wrote-overlay | dd of=/dev/vda conv=notrunc 2>/dev/null && sync && echo WROTE_VDA",
        "printf guest-wrote-rw | dd of=/dev/vdb conv=notrunc 2>/dev/null && sync && echo WROTE_VDB",
        "printf x | dd of=/dev/vdc conv=notrunc 2>/dev/null || echo RO_REFUSED",
        "mkdir /seed && mount -t vfat -o ro /dev/vdd /seed && cat /seed/meta-data /seed/user-data",
    ]
    .join("\n");
    let out = cli(&[
        "vm",
        "run",
        "--name",
        "multi",
        "--net",
        "default",
        "--net",
        "second",
        "--disk",
        "base.raw:overlay",
        "--disk",
        "rw.raw",
        "--disk",
        "ro.raw:ro",
        "--share",
        "work:work:ro",
        "--cloud-init",
        "user-data.yaml",
        "--wait",
        "--",
        &script,
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let vm = d.wait_vm("multi", &["stopped", "failed"]);
    let (_, logs) = d.call("GET", "/v1/vms/multi/logs", None);
    let logs = logs.as_str().unwrap();
    assert_eq!(vm["state"], "stopped", "{vm}\n{logs}");
    for said in [
        "PING_DEFAULT_OK",
        "PING_SECOND_OK",
        "WROTE_VDA",
        "WROTE_VDB",
        "RO_REFUSED",
        "instance-id: \"iid-multi\"",
        "local-hostname: \"multi\"",
        "hostname: multi",
        "VMFABRIC_CMD_EXIT 0",
    ] {
        assert!(logs.contains(said), "{said} missing from the console:\n{logs}");
    }
    let (_, v) = d.call("GET", "/v1/vms/multi/inspect", None);
    let nics = v["nics"].as_array().unwrap();
    assert_eq!(
        (
            nics[0]["network"].as_str(),
            nics[1]["network"].as_str(),
            nics[1]["port"].as_str()
        ),
        (Some("default"), Some("second"), Some("multi-nic1")),
        "{v}"
    );
    assert_eq!(
        v["request"]["disks"][0]["path"],
        files.join("base.raw").display().to_string()
    );
    assert_eq!(v["request"]["machine_id"].as_str().map(str::len), Some(32), "{v}");
    // Both NICs leased (the leases went with the ports when the guest powered off).
    for gateway in ["10.77.0.1", "10.78.5.1"] {
        assert!(
            logs.contains(&format!("obtained from {gateway}")),
            "no lease from {gateway}:\n{logs}"
        );
    }
    assert_eq!(
        std::fs::read(files.join("base.raw")).unwrap(),
        base,
        "the base image is untouched"
    );
    let rw = std::fs::read(files.join("rw.raw")).unwrap();
    assert!(rw.starts_with(b"guest-wrote-rw"), "the rw disk holds the guest's write");
    assert!(std::fs::read(files.join("ro.raw")).unwrap().iter().all(|b| *b == 0));
    let overlay = dir.join("run/vms/default.multi.files/disk0.overlay.qcow2");
    let bytes = std::fs::read(&overlay).unwrap();
    assert!(
        bytes.windows(19).any(|w| w == b"guest-wrote-overlay"),
        "the overlay holds the guest's write"
    );
    // Run again under the same name while the ended one is still listed: the new
    // boot's files (overlay, QMP socket) are where the old one's were, and stay. The
    // disk is named through a symlink: QEMU gets the path that was checked.
    std::os::unix::fs::symlink(files.join("base.raw"), files.join("link.raw")).unwrap();
    let (s, v) = d.call(
        "POST",
        "/v1/vms",
        Some(json!({"name": "multi", "network": "default", "disks": [{"path": files.join("link.raw"), "mode": "overlay"}]})),
    );
    assert_eq!(s, 201, "{v}");
    let again = d.wait_vm("multi", &["ready", "failed"]);
    assert_eq!(again["state"], "ready", "{again}");
    let (_, inspect) = d.call("GET", "/v1/vms/multi/inspect", None);
    assert_eq!(
        inspect["request"]["disks"][0]["path"].as_str(),
        files.join("base.raw").canonicalize().unwrap().to_str(),
        "{inspect}"
    );
    assert!(overlay.exists(), "the new boot's overlay is there");
    let (s, v) = d.call("POST", "/v1/vms/multi/pause", None);
    assert_eq!((s, v["state"].as_str()), (200, Some("paused")), "QMP answers: {v}");
    let (s, _) = d.call("DELETE", "/v1/vms/multi", None);
    assert_eq!(s, 200);
    assert!(!overlay.exists(), "a VM's overlay goes with it");

    // Refused with the reason, nothing started.
    let refused = |body: Value, why: &str| {
        let (s, v) = d.call("POST", "/v1/vms", Some(body));
        assert_eq!(s, 400, "{v}");
        assert!(v["message"].as_str().unwrap_or("").contains(why), "{why}: {v}");
    };
    refused(
        json!({"name": "x", "network": "default", "disks": [{"path": "/etc/hostname"}]}),
        "outside the directories this daemon lets VMs use",
    );
    refused(
        json!({"name": "x", "network": "default", "disks": [{"path": files.join("nope.raw")}]}),
        "does not exist",
    );
    refused(
        json!({"name": "x", "network": "default", "shares": [{"host": files.join("work"), "tag": "a b"}]}),
        "share tag",
    );
    refused(
        json!({"name": "x", "network": "default", "ready_network": "third"}),
        "ready network",
    );
    let (_, ports) = d.call("GET", "/v1/networks/default/ports", None);
    assert!(
        !ports.to_string().contains("\"x\""),
        "a refused VM leaves no port: {ports}"
    );
    if std::path::Path::new(vm::config::VHOST_VSOCK).exists() {
        let (s, v) = d.call(
            "POST",
            "/v1/vms",
            Some(json!({"name": "vs", "network": "default", "vsock": true})),
        );
        assert_eq!((s, v["vsock_cid"].as_u64()), (201, Some(3)), "{v}");
        let v = d.wait_vm("vs", &["ready", "failed"]);
        assert_eq!(v["state"], "ready", "{v}");
    } else {
        eprintln!("SKIP the vsock guest: this host's kernel has no vhost-vsock; checked: refused with the reason");
        refused(
            json!({"name": "x", "network": "default", "vsock": true}),
            "no vhost-vsock",
        );
    }
}

/// Real guests on a dual-stack network: each forms its IPv6 address from the gateway's
/// advertisements (the Debian kernel's SLAAC), and one reaches the other by its name's
/// AAAA (busybox's ping6 asks the gateway's DNS).
#[test]
fn guests_on_a_dual_stack_network_reach_each_other_by_aaaa() {
    let Some(image) = common::guest_dir() else { return };
    let dir = common::workdir("daemon-vms-ipv6");
    let d = harness::start(&dir, Some(image));
    let (s, v) = d.call(
        "POST",
        "/v1/networks",
        Some(json!({"name": "dual", "subnet": "10.79.6.0/24", "ipv6": "fd00:79:6::/64", "host_access": true})),
    );
    assert_eq!(s, 201, "{v}");
    // A server on the host's IPv6 loopback with a body of some megabytes: the client
    // fetches it through the gateway (the prefix's ::2 is the host's [::1]), its
    // virtio-net segments (offloaded as it negotiated) spliced onto a host socket.
    const BODY: usize = 4 << 20;
    let host_web = std::net::TcpListener::bind("[::1]:0").unwrap();
    let host_port = host_web.local_addr().unwrap().port();
    let serving = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let (mut s, _) = host_web.accept().unwrap();
        let mut request = Vec::new();
        let mut buf = [0u8; 1024];
        while !request.ends_with(b"\r\n\r\n") {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "the request ended early");
            request.extend_from_slice(&buf[..n]);
        }
        let body: Vec<u8> = (0..BODY).map(|i| (i % 251) as u8).collect();
        write!(s, "HTTP/1.0 200 OK\r\nContent-Length: {BODY}\r\n\r\n").unwrap();
        s.write_all(&body).unwrap();
    });
    let (s, v) = d.call("POST", "/v1/vms", Some(json!({"name": "web6", "network": "dual"})));
    assert_eq!(s, 201, "{v}");
    let web = d.wait_vm("web6", &["ready", "failed"]);
    assert_eq!(web["state"], "ready", "{web}");
    let web_mac: fabric::Mac = web["mac"].as_str().unwrap().parse().unwrap();
    let web6 = gateway::config::slaac_address("fd00:79:6::".parse().unwrap(), web_mac);
    // The client waits for its own global address (past duplicate address detection:
    // until then its connections would leave from its link-local address, which no
    // router forwards), then pings web6 by name and fetches from the host.
    let cmd = format!(
        "for i in $(seq 100); do ip -6 addr show scope global | grep inet6 | grep -qv tentative && break; sleep 0.1; done; \
         ip -6 addr show scope global; nslookup -type=AAAA web6; ping6 -c 2 -W 5 web6 && \
         wget -qO /tmp/big 'http://[fd00:79:6::2]:{host_port}/' && sha256sum /tmp/big"
    );
    let (s, v) = d.call(
        "POST",
        "/v1/vms",
        Some(json!({"name": "client6", "network": "dual", "cmd": cmd})),
    );
    assert_eq!(s, 201, "{v}");
    let client = d.wait_vm("client6", &["stopped", "failed"]);
    let (_, logs) = d.call("GET", "/v1/vms/client6/logs", None);
    let logs = logs.as_str().unwrap_or("");
    assert!(
        logs.contains("VMFABRIC_CMD_EXIT 0") && logs.contains(&web6.to_string()),
        "{client}\n{logs}"
    );
    let body: Vec<u8> = (0..BODY).map(|i| (i % 251) as u8).collect();
    let digest: String = {
        use sha2::Digest;
        sha2::Sha256::digest(&body).iter().map(|b| format!("{b:02x}")).collect()
    };
    assert!(
        logs.contains(&format!("{digest}  /tmp/big")),
        "the host's [::1] over IPv6 host access, intact:\n{logs}"
    );
    serving.join().unwrap();
    assert!(
        logs.contains("fd00:79:6:"),
        "the client formed an address on the prefix:\n{logs}"
    );
}
