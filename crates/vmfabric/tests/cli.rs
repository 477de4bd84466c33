//! The CLI against a real daemon process on a temporary socket, including a `kill -9`
//! of the daemon: what the API acknowledged is there after the restart.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use testkit::{run as sh, udhcpc_once, Netns};

const BIN: &str = env!("CARGO_BIN_EXE_vmfabric");

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `serve` with its socket at `socket` and its state and ports under `dir`.
fn serve_args(dir: &Path, socket: &Path) -> Vec<std::ffi::OsString> {
    let mut a: Vec<std::ffi::OsString> = vec!["serve".into(), "--socket".into(), socket.into()];
    a.extend(["--state-dir".into(), dir.join("state").into()]);
    a.extend(["--run-dir".into(), dir.join("run").into()]);
    a
}

/// Waits until something answers on `socket`.
fn wait_for_socket(socket: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        assert!(Instant::now() < deadline, "the daemon did not come up");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn start(dir: &Path) -> Daemon {
    let child = Command::new(BIN)
        .args(serve_args(dir, &dir.join("api.sock")))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_socket(&dir.join("api.sock"));
    Daemon(child)
}

fn cli(dir: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .arg("--socket")
        .arg(dir.join("api.sock"))
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// Runs a command that must succeed; its stdout.
fn must(dir: &Path, args: &[&str]) -> String {
    let (ok, out, err) = cli(dir, args);
    assert!(ok, "{args:?} failed: {err}");
    out
}

fn json(dir: &Path, args: &[&str]) -> serde_json::Value {
    let mut a = args.to_vec();
    a.push("--json");
    let (ok, out, err) = cli(dir, &a);
    assert!(ok, "{args:?} failed: {err}");
    serde_json::from_str(&out).unwrap()
}

/// An empty directory of this test process, `vmf-NAME-PID` under the temp dir.
fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vmf-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn cli_drives_the_daemon_and_state_survives_kill_9() {
    let dir = tmp("cli");
    let mut daemon = start(&dir);
    let (ok, out, _) = cli(&dir, &["network", "create", "blue", "--subnet", "10.91.0.0/24"]);
    assert!(ok && out.contains("blue"), "{out}");
    let (ok, out, _) = cli(&dir, &["port", "add", "blue", "vm1", "--kind", "stream"]);
    assert!(
        ok && out.contains("-netdev stream"),
        "port add prints the QEMU arguments: {out}"
    );
    let (ok, out, _) = cli(&dir, &["network", "ls"]);
    assert!(
        ok && out.starts_with("NAME") && out.contains("default") && out.contains("blue"),
        "{out}"
    );
    // Errors say what is wrong and exit non-zero.
    let (ok, _, err) = cli(&dir, &["network", "create", "blue", "--subnet", "10.92.0.0/24"]);
    assert!(!ok && err.contains("already exists") && err.contains("409"), "{err}");
    let (ok, _, err) = cli(&dir, &["port", "ls", "nope"]);
    assert!(!ok && err.contains("no network named"), "{err}");
    // A name is one path segment: it cannot reach another route or add a query.
    let (ok, _, err) = cli(&dir, &["network", "rm", "blue/ports/vm1"]);
    assert!(!ok && err.contains("404"), "{err}");
    let (ok, _, err) = cli(&dir, &["network", "rm", "blue?force=true&"]);
    assert!(!ok && err.contains("404"), "{err}");
    let ports = json(&dir, &["port", "ls", "blue"]);
    let mac = ports[0]["mac"].clone();

    // kill -9: nothing acknowledged may be lost.
    daemon.0.kill().unwrap();
    daemon.0.wait().unwrap();
    let _daemon = start(&dir);
    let nets = json(&dir, &["network", "ls"]);
    assert!(nets.as_array().unwrap().iter().any(|n| n["name"] == "blue"), "{nets}");
    let ports = json(&dir, &["port", "ls", "blue"]);
    assert_eq!((ports[0]["name"].as_str(), &ports[0]["mac"]), (Some("vm1"), &mac));
    assert!(
        std::os::unix::net::UnixStream::connect(ports[0]["path"].as_str().unwrap()).is_ok(),
        "listening again"
    );
    let out = must(&dir, &["stats", "--prometheus"]);
    assert!(
        out.contains("vmfabric_port_frames_total{network=\"blue\",port=\"vm1\""),
        "{out}"
    );
    let out = must(&dir, &["stats"]);
    assert!(
        out.contains("network blue: rx 0 frames") && out.contains("\nvm1 "),
        "{out}"
    );
    assert_eq!(json(&dir, &["stats", "blue"])[0]["ports"][0]["port"], "vm1");
    let (ok, _, err) = cli(&dir, &["stats", "nope"]);
    assert!(!ok && err.contains("no network named"), "{err}");
    let (ok, _, _) = cli(&dir, &["network", "rm", "blue", "--force"]);
    assert!(ok);
}

#[test]
fn a_real_client_keeps_its_address_across_a_kill_9() {
    let ready = rustix::process::geteuid().is_root()
        && Path::new("/dev/net/tun").exists()
        && Command::new("busybox").arg("true").status().is_ok_and(|s| s.success());
    if !ready {
        assert!(
            std::env::var("VMFABRIC_REQUIRE_ALL_TESTS").as_deref() != Ok("1"),
            "must run here: needs root and busybox"
        );
        eprintln!("SKIP a_real_client_keeps_its_address_across_a_kill_9: needs root, /dev/net/tun and busybox");
        return;
    }
    let dir = tmp("kill9");
    let id = std::process::id() % 100_000;
    let (ns, ifname) = (Netns(format!("k9{id}")), format!("k9t{id}"));
    let _ = Command::new("ip")
        .args(["netns", "del", &ns.0])
        .stderr(Stdio::null())
        .status();
    sh(&["ip", "netns", "add", &ns.0]);
    let guest_mac = "02:0d:0e:0a:0d:01";
    // The daemon's TAP goes away with the daemon; each time, it is moved into the
    // namespace and given the guest's MAC again, as a restarted VMM would.
    let attach = || attach_tap(&ns, &ifname, guest_mac);
    let dhcp = |extra: &[&str]| -> String { udhcpc_once(&ns.0, &ifname, &dir, extra)["ip"].clone() };

    let mut daemon = start(&dir);
    must(&dir, &["network", "create", "lab", "--subnet", "10.94.0.0/24"]);
    must(
        &dir,
        &[
            "port", "add", "lab", "vm", "--kind", "tap", "--ifname", &ifname, "--mac", guest_mac,
        ],
    );
    attach();
    let first = dhcp(&[]);
    assert!(first.starts_with("10.94.0."), "{first}");
    let leases = json(&dir, &["lease", "ls", "lab"]);
    assert_eq!(leases[0]["ip"].as_str(), Some(first.as_str()));
    // A service in the guest, published on host loopback through a forward.
    let guest_ns = ns.0.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::os::fd::AsFd;
        let f = std::fs::File::open(format!("/var/run/netns/{guest_ns}")).unwrap();
        rustix::thread::move_into_link_name_space(f.as_fd(), Some(rustix::thread::LinkNameSpaceType::Network)).unwrap();
        let s = std::net::UdpSocket::bind("0.0.0.0:7000").unwrap();
        tx.send(()).unwrap();
        let mut buf = [0u8; 256];
        while let Ok((n, from)) = s.recv_from(&mut buf) {
            let _ = s.send_to(&buf[..n], from);
        }
    });
    rx.recv().unwrap();
    let fw = json(
        &dir,
        &[
            "forward",
            "add",
            "lab",
            "127.0.0.1:0",
            &format!("{first}:7000"),
            "--proto",
            "udp",
        ],
    );
    let published = fw["host"].as_str().unwrap().to_string();
    let ask = |msg: &str| -> Option<String> {
        let c = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        c.set_read_timeout(Some(Duration::from_millis(700))).unwrap();
        let mut buf = [0u8; 256];
        for _ in 0..8 {
            c.send_to(msg.as_bytes(), &published).unwrap();
            if let Ok(n) = c.recv(&mut buf) {
                return Some(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
        None
    };
    assert_eq!(ask("before").as_deref(), Some("before"), "the forward works");

    daemon.0.kill().unwrap(); // SIGKILL: no chance to flush anything
    daemon.0.wait().unwrap();
    let _daemon = start(&dir);
    wait_until_exists(&ifname);
    attach();
    assert_eq!(
        dhcp(&["-r", &first]),
        first,
        "renewing after the restart keeps the address"
    );
    assert_eq!(dhcp(&[]), first, "and so does a fresh DISCOVER");
    assert_eq!(
        ask("after").as_deref(),
        Some("after"),
        "the forward works again after the restart"
    );
}

/// Moves the daemon's TAP `ifname` into `ns` and gives it the guest's MAC, as a VMM
/// taking the device would.
fn attach_tap(ns: &Netns, ifname: &str, mac: &str) {
    sh(&["ip", "link", "set", ifname, "netns", &ns.0]);
    sh(&["ip", "-n", &ns.0, "link", "set", ifname, "address", mac]);
    sh(&["ip", "-n", &ns.0, "link", "set", ifname, "up"]);
}

fn wait_until_exists(ifname: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !Command::new("ip")
        .args(["link", "show", ifname])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success()
    {
        assert!(Instant::now() < deadline, "{ifname} did not come back");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_config_file_declares_networks_and_metrics_go_out_over_tcp() {
    let dir = tmp("config");
    let cfg = dir.join("vmfabric.toml");
    std::fs::write(
        &cfg,
        "[[network]]\nname = \"ci\"\nsubnet = \"10.95.0.0/24\"\nmtu = 9000\n\
         ports = [{ name = \"runner1\", kind = \"stream\" }]\n\
         reservations = [{ key = \"runner1\", ip = \"10.95.0.10\" }]\n\
         [network.settings.dns]\ndomain = \"ci.internal\"\nupstreams = [\"127.0.0.1:5399\"]\n\
         records = [{ name = \"cache\", type = \"A\", value = \"10.95.0.5\" }]\n\
         [network.settings.dhcp]\nlease_secs = 600\n",
    )
    .unwrap();
    // A free loopback port for the metrics listener.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let spawn = || {
        let child = Command::new(BIN)
            .args(serve_args(&dir, &dir.join("api.sock")))
            .arg("--config")
            .arg(&cfg)
            .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err()
            || std::os::unix::net::UnixStream::connect(dir.join("api.sock")).is_err()
        {
            assert!(Instant::now() < deadline, "the daemon did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
        Daemon(child)
    };
    let daemon = spawn();
    let nets = json(&dir, &["network", "ls"]);
    assert!(
        nets.as_array()
            .unwrap()
            .iter()
            .any(|n| n["name"] == "ci" && n["mtu"] == 9000),
        "{nets}"
    );
    let ci = json(&dir, &["network", "show", "ci"]);
    assert_eq!(
        (&ci["served"]["dns_domain"], &ci["served"]["lease_secs"]),
        (&serde_json::json!("ci.internal"), &serde_json::json!(600)),
        "{ci}"
    );
    assert_eq!(ci["settings"]["dns"]["records"][0]["name"], "cache", "{ci}");
    let ports = json(&dir, &["port", "ls", "ci"]);
    assert_eq!(ports[0]["name"], "runner1");
    let res = json(&dir, &["reservation", "ls", "ci"]);
    assert_eq!(res[0]["ip"], "10.95.0.10");
    use std::io::{Read, Write};
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    tcp.read_to_string(&mut text).unwrap();
    assert!(
        text.contains("vmfabric_port_frames_total{network=\"ci\",port=\"runner1\""),
        "{text}"
    );
    // Applying the file again on restart changes nothing and fails nothing.
    drop(daemon);
    let _ = std::fs::remove_file(dir.join("api.sock"));
    let _daemon = spawn();
    assert_eq!(json(&dir, &["port", "ls", "ci"]).as_array().unwrap().len(), 1);
}

#[test]
fn port_add_socketpair_runs_the_vmm_with_the_fd() {
    if Command::new("python3").arg("--version").output().is_err() {
        eprintln!("SKIP port_add_socketpair_runs_the_vmm_with_the_fd: needs python3 as the stand-in VMM");
        return;
    }
    let dir = tmp("sp");
    let _daemon = start(&dir);
    must(&dir, &["port", "add", "default", "watch", "--kind", "unixgram"]);
    let watch_path = json(&dir, &["port", "ls", "default"])[0]["path"]
        .as_str()
        .unwrap()
        .to_string();
    let watcher = std::os::unix::net::UnixDatagram::bind(dir.join("watcher.sock")).unwrap();
    watcher.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // Make the unixgram port learn the watcher as its peer.
    watcher
        .send_to(
            &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 2, 0, 0, 0, 0, 9, 0x88, 0xb5, 0],
            &watch_path,
        )
        .unwrap();
    // The stand-in VMM sends one broadcast frame on the fd it inherited.
    let vmm = "import socket,sys; s=socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM, fileno=int(sys.argv[1])); \
               s.send(bytes([255]*6 + [2,0,0,0,0,0x77, 0x88,0xb5]) + b'hello from the vmm' + bytes(28))";
    let out = Command::new(BIN)
        .args([
            "port",
            "add",
            "default",
            "vm",
            "--kind",
            "socketpair",
            "--mac",
            "02:00:00:00:00:77",
            "--socket",
        ])
        .arg(dir.join("api.sock"))
        .args(["--", "python3", "-c", vmm, "{fd}"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut buf = [0u8; 256];
    let n = watcher.recv(&mut buf).unwrap();
    assert!(
        buf[..n].windows(18).any(|w| w == b"hello from the vmm"),
        "{:?}",
        &buf[..n]
    );
}

#[test]
fn forwards_and_policy_from_the_cli() {
    let dir = tmp("fwcli");
    let _daemon = start(&dir);
    let fw = json(&dir, &["forward", "add", "default", "127.0.0.1:0", "10.77.0.9:53"]);
    let host = fw["host"].as_str().unwrap().to_string();
    assert_eq!(json(&dir, &["forward", "ls", "default"])[0]["guest"], "10.77.0.9:53");
    must(&dir, &["forward", "rm", "default", &host]);
    let policy = dir.join("policy.json");
    std::fs::write(
        &policy,
        r#"{"default": "deny", "rules": [{"action": "allow", "dst": "10.0.0.0/8", "proto": "udp"}]}"#,
    )
    .unwrap();
    let (ok, out, err) = cli(&dir, &["policy", "set", "default", policy.to_str().unwrap()]);
    assert!(ok && out.contains("\"deny\""), "{out}{err}");
    let (ok, out, _) = cli(&dir, &["policy", "show", "default"]);
    assert!(ok && out.contains("10.0.0.0/8"), "{out}");
    std::fs::write(&policy, "not json").unwrap();
    let (ok, _, err) = cli(&dir, &["policy", "set", "default", policy.to_str().unwrap()]);
    assert!(!ok && err.contains("not JSON"), "{err}");
}

/// Each kind of failure has its own exit code, so scripts can tell them apart.
#[test]
fn exit_codes_tell_usage_not_found_conflict_and_no_daemon_apart() {
    let dir = tmp("cli-codes");
    let code = |args: &[&str]| {
        Command::new(BIN)
            .args(args)
            .arg("--socket")
            .arg(dir.join("api.sock"))
            .output()
            .unwrap()
            .status
            .code()
    };
    assert_eq!(code(&["network", "ls"]), Some(5), "no daemon");
    let _d = start(&dir);
    assert_eq!(code(&["network", "ls"]), Some(0));
    assert_eq!(code(&["network", "show", "nope"]), Some(3), "not found");
    assert_eq!(code(&["network", "create", "a", "--subnet", "10.91.0.0/24"]), Some(0));
    assert_eq!(
        code(&["network", "create", "a", "--subnet", "10.91.0.0/24"]),
        Some(4),
        "exists"
    );
    assert_eq!(
        code(&["network", "create", "b", "--subnet", "224.0.0.0/24"]),
        Some(2),
        "bad input"
    );
    assert_eq!(code(&["network", "frobnicate"]), Some(2), "bad usage (clap)");
    assert_eq!(
        code(&["port", "add", "a", "p", "--kind", "bogus"]),
        Some(2),
        "kinds are a fixed set"
    );
    // Idempotent creation where asked for.
    assert_eq!(
        code(&["network", "create", "a", "--subnet", "10.91.0.0/24", "--exist-ok"]),
        Some(0)
    );
    assert_eq!(code(&["port", "add", "a", "p", "--kind", "stream"]), Some(0));
    assert_eq!(code(&["port", "add", "a", "p", "--kind", "stream"]), Some(4));
    assert_eq!(
        code(&["port", "add", "a", "p", "--kind", "stream", "--exist-ok"]),
        Some(0)
    );
    // Commands that return nothing still answer --json.
    assert_eq!(
        json(&dir, &["network", "rm", "a", "--force"]),
        serde_json::json!({"removed": "network", "name": "a"})
    );
    // A daemon that takes the connection and never answers: the request times out.
    let mute = std::os::unix::net::UnixListener::bind(dir.join("mute.sock")).unwrap();
    let out = Command::new(BIN)
        .args(["network", "ls", "--timeout", "1s", "--socket"])
        .arg(dir.join("mute.sock"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("did not answer"),
        "{out:?}"
    );
    drop(mute);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `network show` tells what `ls` has no room for: what the gateway serves and the
/// network's traffic.
#[test]
fn network_show_says_what_the_gateway_serves() {
    let dir = tmp("cli-show");
    let _d = start(&dir);
    must(&dir, &["network", "create", "s", "--subnet", "10.92.0.0/24"]);
    let (ok, out, err) = cli(&dir, &["network", "show", "s"]);
    assert!(ok, "{err}");
    for want in [
        "subnet:      10.92.0.0/24 (MTU 1500)",
        "gateway:     10.92.0.1",
        "dhcp:        10.92.0.2 to 10.92.0.253, leases of 1h",
        "dns domain:  vm.internal",
        "host access: off",
        "traffic:     rx 0 frames",
    ] {
        assert!(out.contains(want), "{want:?} missing:\n{out}");
    }
    let v = json(&dir, &["network", "show", "s"]);
    assert_eq!(v["served"]["address"], "10.92.0.1", "{v}");
    assert!(v.get("ipv6").is_none(), "IPv4 only unless asked: {v}");
    // `--ipv6` alone derives a prefix; with a value it takes that one.
    must(&dir, &["network", "create", "d", "--subnet", "10.93.0.0/24", "--ipv6"]);
    let v = json(&dir, &["network", "show", "d"]);
    assert!(
        v["ipv6"]
            .as_str()
            .is_some_and(|p| p.starts_with("fd") && p.ends_with("::/64")),
        "{v}"
    );
    must(
        &dir,
        &[
            "network",
            "create",
            "g",
            "--subnet",
            "10.94.0.0/24",
            "--ipv6",
            "fd00:94::/64",
        ],
    );
    let (ok, out, err) = cli(&dir, &["network", "show", "g"]);
    assert!(ok, "{err}");
    for want in ["ipv6:        fd00:94::/64 (SLAAC)", "gateway v6:  fd00:94::1, fe80::"] {
        assert!(out.contains(want), "{want:?} missing:\n{out}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every gateway setting set from the CLI reaches real clients (udhcpc, dig), changes
/// at run time with `network set`, and survives a kill -9 of the daemon.
#[test]
fn gateway_settings_from_the_cli_reach_real_clients() {
    let tools = ["busybox", "dig", "dnsmasq"];
    let ready = testkit::is_root()
        && Path::new("/dev/net/tun").exists()
        && tools
            .iter()
            .all(|t| Command::new("which").arg(t).output().is_ok_and(|o| o.status.success()));
    if !testkit::ready_or_skip(
        ready,
        "gateway settings: needs root, /dev/net/tun, busybox, dig and dnsmasq",
    ) {
        return;
    }
    let dir = tmp("settings");
    let id = std::process::id() % 100_000;
    let upstream = testkit::loopback_resolver(&dir, "outside.test", "192.0.2.7");
    let corp = testkit::loopback_resolver(&dir, "corp.example", "198.51.100.9");
    let (upstream_port, corp_port) = (upstream.port, corp.port);
    let (ns, ifname) = (Netns(format!("gs{id}")), format!("gst{id}"));
    let _ = Command::new("ip")
        .args(["netns", "del", &ns.0])
        .stderr(Stdio::null())
        .status();
    sh(&["ip", "netns", "add", &ns.0]);
    let guest_mac = "02:0d:0e:0a:0d:07";
    let attach = || attach_tap(&ns, &ifname, guest_mac);
    let dhcp = || {
        udhcpc_once(
            &ns.0,
            &ifname,
            &dir,
            &["-O", "staticroutes", "-O", "ntpsrv", "-O", "224"],
        )
    };
    let dig = |args: &[&str]| -> String {
        let mut a = vec![
            "ip",
            "netns",
            "exec",
            &ns.0,
            "dig",
            "@10.97.0.1",
            "+time=2",
            "+tries=2",
            "+short",
        ];
        a.extend(args);
        sh(&a).trim().to_string()
    };

    let mut daemon = start(&dir);
    must(
        &dir,
        &[
            "network",
            "create",
            "lab",
            "--subnet",
            "10.97.0.0/24",
            "--host-access",
            "--dns-domain",
            "dev.internal",
            "--upstream",
            &format!("127.0.0.1:{upstream_port}"),
            "--forwarder",
            &format!("corp.example=127.0.0.1:{corp_port}"),
            "--record",
            "db=A:10.97.0.40",
            "--record",
            "www=CNAME:db.dev.internal",
            "--record",
            "note=TXT:hello there",
            "--dhcp-range",
            "10.97.0.100-10.97.0.110",
            "--lease-time",
            "2m",
            "--ntp",
            "10.97.0.1",
            "--dhcp-route",
            "192.168.50.0/24=10.97.0.1",
            "--dhcp-option",
            "224=6869",
        ],
    );
    must(
        &dir,
        &[
            "port", "add", "lab", "vm", "--kind", "tap", "--ifname", &ifname, "--mac", guest_mac,
        ],
    );
    attach();
    let env = dhcp();
    let ip: std::net::Ipv4Addr = env["ip"].parse().unwrap();
    assert!((100..=110).contains(&ip.octets()[3]), "{ip} is outside the range set");
    assert_eq!(env["lease"], "120");
    assert_eq!(env["domain"], "dev.internal");
    assert_eq!(env["ntpsrv"], "10.97.0.1");
    assert!(env["staticroutes"].contains("192.168.50.0/24 10.97.0.1"), "{env:?}");
    assert!(
        env["staticroutes"].contains("0.0.0.0/0 10.97.0.1"),
        "the default route rides along: {env:?}"
    );
    assert_eq!(env.get("opt224").map(String::as_str), Some("6869"), "{env:?}");

    assert_eq!(dig(&["db.dev.internal"]), "10.97.0.40");
    assert_eq!(dig(&["www.dev.internal"]), "db.dev.internal.\n10.97.0.40");
    assert_eq!(dig(&["note.dev.internal", "TXT"]), "\"hello there\"");
    assert_eq!(dig(&["host.dev.internal"]), "10.97.0.254", "the host alias");
    assert_eq!(dig(&["outside.test"]), "192.0.2.7", "the upstream set");
    assert_eq!(dig(&["db.corp.example"]), "198.51.100.9", "the forwarder");

    // The typed stats saw it all: DHCP acks, local and forwarded DNS, the guest's frames.
    let stats = json(&dir, &["stats", "lab"]);
    let counters = &stats[0]["gateway"]["counters"];
    assert!(
        counters["dhcp_ack"].as_u64() >= Some(1) && counters["dns_forwarded"].as_u64() >= Some(2),
        "{stats}"
    );
    assert!(counters["dns_local"].as_u64() >= Some(4), "{stats}");
    assert!(
        stats[0]["ports"][0]["traffic"]["rx_frames"].as_u64() >= Some(10),
        "{stats}"
    );
    let table = must(&dir, &["stats", "lab"]);
    assert!(
        table.contains("gateway: 1 leases") && table.contains("\ndhcp "),
        "{table}"
    );

    // Changed while running: the next query and the next lease see it.
    let (ok, out, err) = cli(
        &dir,
        &[
            "network",
            "set",
            "lab",
            "--record",
            "db=A:10.97.0.41",
            "--lease-time",
            "3m",
            "--host-alias",
            "hostbox",
        ],
    );
    assert!(ok, "{err}");
    assert!(out.contains("leases of 3m"), "{out}");
    assert_eq!(dig(&["db.dev.internal"]), "10.97.0.41");
    assert_eq!(dig(&["www.dev.internal"]), "", "records not named again are gone");
    assert_eq!(dig(&["hostbox.dev.internal"]), "10.97.0.254");
    let env = dhcp();
    assert_eq!(
        (env["ip"].as_str(), env["lease"].as_str()),
        (ip.to_string().as_str(), "180")
    );

    // Mistakes: refused with the reason and the usage exit code; nothing changes.
    let code = |args: &[&str]| {
        Command::new(BIN)
            .args(args)
            .arg("--socket")
            .arg(dir.join("api.sock"))
            .output()
            .unwrap()
    };
    let bad = code(&["network", "set", "lab", "--dhcp-range", "10.97.0.9-10.97.0.3"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("range"), "{bad:?}");
    assert_eq!(
        code(&["network", "set", "nope", "--lease-time", "1h"]).status.code(),
        Some(3)
    );
    assert_eq!(
        code(&["network", "set", "lab"]).status.code(),
        Some(2),
        "no setting named"
    );

    // A kill -9 keeps them.
    daemon.0.kill().unwrap();
    daemon.0.wait().unwrap();
    let _daemon = start(&dir);
    wait_until_exists(&ifname);
    attach();
    assert_eq!(dhcp()["lease"], "180");
    let v = json(&dir, &["network", "show", "lab"]);
    assert_eq!(v["settings"]["dhcp"]["lease_secs"], 180, "{v}");
    assert_eq!(v["served"]["host_name"], "hostbox.dev.internal", "{v}");
    assert_eq!(dig(&["db.dev.internal"]), "10.97.0.41");

    // A network made without a subnet gets a free one.
    let auto = json(&dir, &["network", "create", "auto"]);
    let subnet: ipnet::Ipv4Net = auto["subnet"].as_str().unwrap().parse().unwrap();
    assert!(!subnet.contains(&ip) && subnet.prefix_len() == 24, "{auto}");
    drop((upstream, corp));
    let _ = std::fs::remove_dir_all(&dir);
}

/// `vmfabric events` follows the daemon: a VMM connecting to a stream port and leaving
/// again shows as two lines; `--json` gives the stream's JSON lines.
#[test]
fn events_follow_ports_coming_and_going() {
    let dir = tmp("events");
    let _d = start(&dir);
    let follow = |json: bool| {
        let mut cmd = Command::new(BIN);
        cmd.arg("events").arg("--socket").arg(dir.join("api.sock"));
        if json {
            cmd.arg("--json");
        }
        cmd.stdout(Stdio::piped()).spawn().unwrap()
    };
    let (human, machine) = (follow(false), follow(true));
    let port = json(&dir, &["port", "add", "default", "vmm", "--kind", "stream"]);
    let path = port["path"].as_str().unwrap().to_string();
    // Nothing says when both followers are subscribed; connect until they saw it.
    let read_until = |child: Child, want: &[&str]| -> String {
        let mut child = child;
        let out = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(out).lines() {
                if tx.send(line.unwrap()).is_err() {
                    return;
                }
            }
        });
        let mut seen = String::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !want.iter().all(|w| seen.contains(w)) {
            assert!(Instant::now() < deadline, "{want:?} not in:\n{seen}");
            // A VMM comes and goes; each visit is one up and one down.
            drop(std::os::unix::net::UnixStream::connect(&path).unwrap());
            while let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
                seen.push_str(&line);
                seen.push('\n');
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        seen
    };
    let text = read_until(human, &["port default/vmm up", "port default/vmm down"]);
    let first = text.lines().next().unwrap();
    let time = first.split_whitespace().next().unwrap();
    assert!(
        time.parse::<jiff::Timestamp>().is_ok(),
        "each line starts with its time: {first}"
    );
    let lines = read_until(machine, &["\"type\":\"port_up\"", "\"type\":\"port_down\""]);
    for l in lines.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        assert!(v["time"].is_string() && v["type"].is_string(), "{l}");
    }
    // The metrics count the ports with their VMM attached now.
    let ports_up = |want: &str| {
        let line = format!("vmfabric_ports_up{{network=\"default\"}} {want}");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !must(&dir, &["stats", "--prometheus"]).contains(&line) {
            assert!(Instant::now() < deadline, "no {line:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let vmm = std::os::unix::net::UnixStream::connect(&path).unwrap();
    ports_up("1");
    drop(vmm);
    ports_up("0");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The daemon as systemd runs it (packaging/systemd): the API socket passed by socket
/// activation, readiness told over NOTIFY_SOCKET, logs as JSON lines; on SIGTERM it
/// says it is stopping and leaves systemd's socket alone.
#[test]
fn the_daemon_runs_under_socket_activation_and_tells_systemd_it_is_ready() {
    let tool = "systemd-socket-activate";
    let ready = Command::new("which")
        .arg(tool)
        .output()
        .is_ok_and(|o| o.status.success());
    if !testkit::ready_or_skip(
        ready,
        "socket activation: needs systemd-socket-activate (Debian's systemd package)",
    ) {
        return;
    }
    let dir = tmp("activation");
    let notify = std::os::unix::net::UnixDatagram::bind(dir.join("notify.sock")).unwrap();
    notify.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let sock = dir.join("api.sock");
    let child = Command::new(tool)
        .arg("-l")
        .arg(&sock)
        .arg("-E")
        .arg(format!("NOTIFY_SOCKET={}", dir.join("notify.sock").display()))
        .arg(BIN)
        .args(serve_args(&dir, &dir.join("unused.sock")))
        .args(["--log-format", "json"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "systemd-socket-activate did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The first connection starts the daemon, which answers it.
    let nets = json(&dir, &["network", "ls"]);
    assert_eq!(nets[0]["name"], "default", "{nets}");
    let mut buf = [0u8; 256];
    let n = notify.recv(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).contains("READY=1"));
    assert!(
        !dir.join("unused.sock").exists(),
        "the passed socket is served, no other"
    );
    sh(&["kill", "-TERM", &child.id().to_string()]);
    let n = notify.recv(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1"));
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(sock.exists(), "systemd's socket is systemd's to remove");
    let logs = String::from_utf8_lossy(&out.stderr);
    // After systemd-socket-activate's own lines ("Listening on ...", "Execing ..."),
    // every line is the daemon's, and JSON.
    let daemon_lines: Vec<&str> = logs.lines().skip_while(|l| !l.starts_with('{')).collect();
    assert!(daemon_lines.len() >= 2, "{logs}");
    for l in daemon_lines {
        let line: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}"));
        assert!(
            line["level"].is_string() && line["fields"]["message"].is_string(),
            "{line}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--socket-group`: members of the group use the CLI without root; others cannot.
#[test]
fn a_socket_group_lets_its_members_in() {
    let ready = testkit::is_root() && Command::new("setpriv").arg("--version").output().is_ok();
    if !testkit::ready_or_skip(
        ready,
        "socket group: needs root (to chown the socket and switch users) and setpriv",
    ) {
        return;
    }
    let dir = tmp("group");
    sh(&["chmod", "755", dir.to_str().unwrap()]);
    let gid = 4242u32; // no group needs to exist by that number
    let child = Command::new(BIN)
        .args(serve_args(&dir, &dir.join("api.sock")))
        .args(["--socket-group", &gid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _d = Daemon(child);
    wait_for_socket(&dir.join("api.sock"));
    let meta = std::fs::metadata(dir.join("api.sock")).unwrap();
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    assert_eq!((meta.gid(), meta.permissions().mode() & 0o777), (gid, 0o660));
    let as_user = |groups: &str| {
        Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                groups,
                "--",
                BIN,
                "network",
                "ls",
                "--socket",
            ])
            .arg(dir.join("api.sock"))
            .output()
            .unwrap()
    };
    let member = as_user(&format!("--groups={gid}"));
    assert!(member.status.success(), "{member:?}");
    assert!(String::from_utf8_lossy(&member.stdout).contains("default"));
    let stranger = as_user("--clear-groups");
    assert_eq!(stranger.status.code(), Some(5), "{stranger:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The README's walk through a network with its own DNS and DHCP settings runs as
/// written (bash -e, `vmfabric` on PATH, a test daemon behind VMFABRIC_SOCKET).
#[test]
fn the_readmes_settings_walkthrough_runs_as_written() {
    let readme = include_str!("../../../README.md");
    let section = readme
        .split("### A network with its own DNS and DHCP settings")
        .nth(1)
        .expect("the README has the section");
    let block = testkit::fenced_block(section, "sh", 0).expect("the section has a sh block");
    let dir = tmp("readme");
    let _d = start(&dir);
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::os::unix::fs::symlink(BIN, bin.join("vmfabric")).unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    let out = Command::new("bash")
        .args(["-e", "-c", block])
        .env("PATH", path)
        .env("VMFABRIC_SOCKET", dir.join("api.sock"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{block}\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("dns domain:  dev.internal") && text.contains("leases of 30m"),
        "{text}"
    );
    let v = json(&dir, &["network", "show", "lab"]);
    assert!(
        v["settings"]["dns"].get("records").is_none(),
        "the last line reset them: {v}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
