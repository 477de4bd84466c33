//! Helpers shared by vmfabric's integration tests (a dev-dependency only): running
//! commands, network namespaces the tests make and remove, and the skip rule (a test
//! that needs root or a tool skips with a reason, except where every test must run).
#![forbid(unsafe_code)]

use std::os::fd::AsFd;
use std::process::Command;

/// Runs a command; panics with its stderr when it fails. Returns its stdout.
pub fn run(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into()
}

/// Whether a test may go on: `ready`, or else a printed skip with `why`. Where
/// VMFABRIC_REQUIRE_ALL_TESTS=1 (CI, as root) a skip is a failure instead.
pub fn ready_or_skip(ready: bool, why: &str) -> bool {
    if !ready {
        assert!(
            std::env::var("VMFABRIC_REQUIRE_ALL_TESTS").as_deref() != Ok("1"),
            "must run here, but: {why}"
        );
        eprintln!("SKIP: {why}");
    }
    ready
}

pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// A network namespace the test made; deleted when dropped. It has a resolv.conf of
/// its own (`ip netns exec` mounts /etc/netns/NAME/resolv.conf over /etc/resolv.conf),
/// so a DHCP client's script run inside writes that one, never the host's.
pub struct Netns(pub String);

impl Netns {
    /// Makes `name` (removing a leftover of an earlier run first).
    pub fn new(name: &str) -> Netns {
        let _ = Command::new("ip")
            .args(["netns", "del", name])
            .stderr(std::process::Stdio::null())
            .status();
        run(&["ip", "netns", "add", name]);
        let etc = std::path::Path::new("/etc/netns").join(name);
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(etc.join("resolv.conf"), format!("# namespace {name}'s own\n")).unwrap();
        Netns(name.to_string())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        let _ = std::fs::remove_dir_all(std::path::Path::new("/etc/netns").join(&self.0));
    }
}

/// Moves the calling thread into network namespace `ns`.
pub fn enter(ns: &str) {
    let f = std::fs::File::open(format!("/var/run/netns/{ns}")).unwrap();
    rustix::thread::move_into_link_name_space(f.as_fd(), Some(rustix::thread::LinkNameSpaceType::Network)).unwrap();
}

/// Runs `f` on a new thread inside `ns`.
pub fn spawn_in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> std::thread::JoinHandle<T> {
    let ns = ns.to_string();
    std::thread::spawn(move || {
        enter(&ns);
        f()
    })
}

/// Runs `f` inside `ns` and waits for it.
pub fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    spawn_in_ns(ns, f).join().unwrap()
}

/// A QEMU guest of the test image (guest/build.sh), killed when dropped.
pub struct Guest {
    child: std::process::Child,
    log: std::path::PathBuf,
}

impl Guest {
    /// Boots the image in `image` with `nic`, its console in `log`, named `name`, with
    /// an address from DHCP. `cmd` runs once the network is up (the guest then stays
    /// up when `extra` says `VMF_END=hang`, else powers off); without it the guest stays
    /// up. `extra` are more `VMF_*` settings.
    pub fn boot(
        image: &std::path::Path,
        log: std::path::PathBuf,
        nic: vm::Nic,
        name: &str,
        cmd: Option<&str>,
        extra: &[&str],
    ) -> Guest {
        let mut q = vm::QemuConfig::new(
            image.join("vmlinuz"),
            Some(image.join("initramfs.cpio.gz")),
            vm::Serial::File(log.clone()),
        );
        q.memory_mib = 96;
        q.nics.push(nic);
        q.cmdline.extend(
            vm::GuestCmdline {
                cmd: cmd.map(String::from),
                ..vm::GuestCmdline::dhcp(name)
            }
            .args(),
        );
        // More settings (`VMF_HTTP=1`, `VMF_END=hang`); the guest reads the last of each.
        q.cmdline.extend(extra.iter().map(|s| s.to_string()));
        let child = q
            .command()
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        Guest { child, log }
    }

    pub fn console(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The console once it shows `marker`; panics if the guest ends or 180 s pass first.
    pub fn wait_for(&mut self, marker: &str) -> String {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(180);
        loop {
            let text = self.console();
            if text.contains(marker) {
                return text;
            }
            if std::time::Instant::now() > deadline || matches!(self.child.try_wait(), Ok(Some(_))) {
                panic!("no {marker:?} on the console:\n{text}");
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

/// The address a guest's console says it leased: `VMFABRIC_READY <nonce> <ip> <mac>`.
pub fn ready_ip(console: &str) -> Option<String> {
    console
        .lines()
        .find(|l| l.starts_with("VMFABRIC_READY"))
        .and_then(|l| l.split_whitespace().nth(2))
        .map(str::to_string)
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A web server on the host's loopback only (127.0.0.1, a free port) that answers
/// every request with `body`, for guests to reach through the gateway's NAT. Returns
/// its port; it serves until the test process ends.
pub fn loopback_web_server(body: &'static str) -> u16 {
    use std::io::{Read, Write};
    let web = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = web.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in web.incoming() {
            let Ok(mut s) = s else { continue };
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            let _ = write!(s, "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len());
        }
    });
    port
}

/// A child process killed (and reaped) when dropped.
pub struct Killed(pub std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// dnsmasq on 127.0.0.1 that answers `domain` and the names under it with `ip` and
/// knows nothing else: an upstream resolver the test owns (tests never ask the
/// machine's own). Killed when dropped.
pub struct Resolver {
    _child: Killed,
    /// The port it answers on (UDP and TCP).
    pub port: u16,
}

/// Starts a [`Resolver`] on a free port (tried anew if another process takes the port
/// first: tests in other processes start resolvers too). Its pid file goes in `dir`.
/// Returns once it listens (it writes its pid file after binding).
pub fn loopback_resolver(dir: &std::path::Path, domain: &str, ip: &str) -> Resolver {
    let mut last = String::new();
    for _ in 0..5 {
        let port = free_loopback_port();
        match start_dnsmasq(dir, port, domain, ip) {
            Ok(child) => return Resolver { _child: child, port },
            Err(why) => last = why,
        }
    }
    panic!("dnsmasq did not start on a free port: {last}");
}

/// A port free on 127.0.0.1 for both UDP and TCP now.
fn free_loopback_port() -> u16 {
    loop {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

fn start_dnsmasq(dir: &std::path::Path, port: u16, domain: &str, ip: &str) -> Result<Killed, String> {
    let pid_file = dir.join(format!("dnsmasq-{port}.pid"));
    let _ = std::fs::remove_file(&pid_file);
    let mut child = Command::new("dnsmasq")
        .args([
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--listen-address=127.0.0.1",
            "--user=root",
        ])
        .arg(format!("--pid-file={}", pid_file.display()))
        .arg(format!("--port={port}"))
        .arg(format!("--address=/{domain}/{ip}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !std::fs::read_to_string(&pid_file).is_ok_and(|p| p.trim() == child.id().to_string()) {
        if let Ok(Some(status)) = child.try_wait() {
            let mut why = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut why);
            }
            return Err(format!("dnsmasq on 127.0.0.1:{port} exited ({status}): {why}"));
        }
        assert!(
            std::time::Instant::now() < deadline,
            "dnsmasq on 127.0.0.1:{port} did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Ok(Killed(child))
}

/// The udhcpc script: takes the address and writes what it was told, one `VAR=value`
/// a line, to `env` beside itself. It flushes IPv4 only: IPv6 addresses (link-local,
/// SLAAC) are the kernel's.
const UDHCPC_SCRIPT: &str = "#!/bin/sh\ncase \"$1\" in bound|renew) ip -4 addr flush dev \"$interface\"; ip addr add \"$ip/$mask\" dev \"$interface\"; env > \"$(dirname \"$0\")/env\" ;; esac\n";

/// One busybox udhcpc exchange in namespace `ns` on `ifname` (up to 10 tries a second
/// apart; `extra` adds flags such as `-r IP` or `-O staticroutes`): the variables its
/// script was given (`ip`, `lease`, `domain`, ...). Scratch files go in `dir`.
pub fn udhcpc_once(
    ns: &str,
    ifname: &str,
    dir: &std::path::Path,
    extra: &[&str],
) -> std::collections::HashMap<String, String> {
    udhcpc(ns, ifname, dir, 10, extra).unwrap_or_else(|| panic!("udhcpc on {ifname} in {ns} got no lease"))
}

/// [`udhcpc_once`] with `tries` DISCOVERs a second apart: `None` when no lease came.
pub fn udhcpc(
    ns: &str,
    ifname: &str,
    dir: &std::path::Path,
    tries: u32,
    extra: &[&str],
) -> Option<std::collections::HashMap<String, String>> {
    std::fs::create_dir_all(dir).unwrap();
    let script = dir.join("udhcpc.sh");
    std::fs::write(&script, UDHCPC_SCRIPT).unwrap();
    run(&["chmod", "755", script.to_str().unwrap()]);
    let _ = std::fs::remove_file(dir.join("env"));
    let tries = tries.to_string();
    let status = std::process::Command::new("ip")
        .args([
            "netns", "exec", ns, "busybox", "udhcpc", "-i", ifname, "-q", "-f", "-n", "-t",
        ])
        .arg(&tries)
        .args(["-T", "1", "-s"])
        .arg(&script)
        .args(extra)
        .output()
        .unwrap()
        .status;
    if !status.success() {
        return None;
    }
    let env = std::fs::read_to_string(dir.join("env")).ok()?;
    Some(
        env.lines()
            .filter_map(|l| l.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
            .collect(),
    )
}

/// The `n`th (from 0) fenced code block of language `lang` in a Markdown document, for
/// tests that run or parse what the docs show.
pub fn fenced_block<'a>(doc: &'a str, lang: &str, n: usize) -> Option<&'a str> {
    doc.split(&format!("```{lang}\n"))
        .nth(n + 1)
        .and_then(|rest| rest.split("```").next())
}

/// An etcd cluster (Debian's etcd-server) for cluster tests: `n` members listening
/// for clients on `ip` (loopback, or an address of a test's own underlay) and for
/// each other on loopback; stopped when dropped. Members can be stopped and started
/// again on their data, as outages.
pub struct Etcd {
    members: Vec<EtcdMember>,
    dir: std::path::PathBuf,
    /// Every member's client URL.
    pub endpoints: Vec<String>,
    /// curl's TLS options for the health check (none without TLS).
    curl_tls: Vec<String>,
}

/// Certificates for an etcd that speaks TLS to clients and asks them for theirs: a CA,
/// etcd's certificate for one address, and a client's, PEM files made by openssl.
pub struct EtcdPki {
    pub ca: std::path::PathBuf,
    pub server_cert: std::path::PathBuf,
    pub server_key: std::path::PathBuf,
    pub client_cert: std::path::PathBuf,
    pub client_key: std::path::PathBuf,
}

impl EtcdPki {
    /// Makes them in `dir`, etcd's certificate for `ip`.
    pub fn make(dir: &std::path::Path, ip: &str) -> EtcdPki {
        std::fs::create_dir_all(dir).unwrap();
        let path = |name: &str| dir.join(name).to_str().unwrap().to_string();
        let new_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        let mut ca = vec!["openssl", "req", "-x509"];
        ca.extend(new_key);
        let (ca_key, ca_pem) = (path("ca.key"), path("ca.pem"));
        ca.extend([
            "-keyout",
            &ca_key,
            "-out",
            &ca_pem,
            "-days",
            "2",
            "-subj",
            "/CN=vmfabric test CA",
        ]);
        run(&ca);
        let sign = |name: &str, ext: &str| {
            let (key, csr, pem, extfile) = (
                path(&format!("{name}.key")),
                path(&format!("{name}.csr")),
                path(&format!("{name}.pem")),
                path(&format!("{name}.ext")),
            );
            std::fs::write(&extfile, ext).unwrap();
            let mut req = vec!["openssl", "req"];
            req.extend(new_key);
            let subject = format!("/CN={name}");
            req.extend(["-keyout", &key, "-out", &csr, "-subj", &subject]);
            run(&req);
            run(&[
                "openssl",
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &ca_pem,
                "-CAkey",
                &ca_key,
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "2",
                "-extfile",
                &extfile,
            ]);
        };
        sign(
            "etcd",
            &format!("subjectAltName=IP:{ip}\nextendedKeyUsage=serverAuth\n"),
        );
        sign("node", "extendedKeyUsage=clientAuth\n");
        EtcdPki {
            ca: dir.join("ca.pem"),
            server_cert: dir.join("etcd.pem"),
            server_key: dir.join("etcd.key"),
            client_cert: dir.join("node.pem"),
            client_key: dir.join("node.key"),
        }
    }
}

struct EtcdMember {
    args: Vec<String>,
    child: Option<std::process::Child>,
}

impl Etcd {
    /// One member; None when there is no `etcd` binary.
    pub fn start(ip: &str, dir: std::path::PathBuf) -> Option<Etcd> {
        Etcd::start_members(ip, dir, 1)
    }

    /// `n` members, serving once they have a leader; None without an `etcd` binary.
    pub fn start_members(ip: &str, dir: std::path::PathBuf, n: usize) -> Option<Etcd> {
        Etcd::start_with(ip, dir, n, None)
    }

    /// One member serving clients over TLS only, and only those with a certificate
    /// `pki` signed; None without an `etcd` binary.
    pub fn start_tls(ip: &str, dir: std::path::PathBuf, pki: &EtcdPki) -> Option<Etcd> {
        Etcd::start_with(ip, dir, 1, Some(pki))
    }

    fn start_with(ip: &str, dir: std::path::PathBuf, n: usize, pki: Option<&EtcdPki>) -> Option<Etcd> {
        Command::new("etcd").arg("--version").output().ok()?;
        let _ = std::fs::remove_dir_all(&dir);
        let free = |ip: &str| {
            std::net::TcpListener::bind((ip, 0))
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        };
        let scheme = if pki.is_some() { "https" } else { "http" };
        let clients: Vec<String> = (0..n).map(|_| format!("{scheme}://{ip}:{}", free(ip))).collect();
        let file = |p: &std::path::PathBuf| p.to_str().unwrap().to_string();
        let (server_tls, curl_tls) = match pki {
            Some(p) => (
                vec![
                    "--cert-file".to_string(),
                    file(&p.server_cert),
                    "--key-file".to_string(),
                    file(&p.server_key),
                    "--client-cert-auth".to_string(),
                    "--trusted-ca-file".to_string(),
                    file(&p.ca),
                ],
                vec![
                    "--cacert".to_string(),
                    file(&p.ca),
                    "--cert".to_string(),
                    file(&p.client_cert),
                    "--key".to_string(),
                    file(&p.client_key),
                ],
            ),
            None => (Vec::new(), Vec::new()),
        };
        let peers: Vec<String> = (0..n)
            .map(|_| format!("http://127.0.0.1:{}", free("127.0.0.1")))
            .collect();
        let cluster = (0..n)
            .map(|i| format!("m{i}={}", peers[i]))
            .collect::<Vec<_>>()
            .join(",");
        let members = (0..n)
            .map(|i| EtcdMember {
                args: [
                    "--name",
                    &format!("m{i}"),
                    "--data-dir",
                    dir.join(format!("m{i}")).to_str().unwrap(),
                    "--listen-client-urls",
                    &clients[i],
                    "--advertise-client-urls",
                    &clients[i],
                    "--listen-peer-urls",
                    &peers[i],
                    "--initial-advertise-peer-urls",
                    &peers[i],
                    "--initial-cluster",
                    &cluster,
                    "--initial-cluster-token",
                    dir.to_str().unwrap(),
                ]
                .map(String::from)
                .into_iter()
                .chain(server_tls.iter().cloned())
                .collect(),
                child: None,
            })
            .collect();
        let mut etcd = Etcd {
            members,
            dir,
            endpoints: clients,
            curl_tls,
        };
        etcd.start_again();
        Some(etcd)
    }

    /// The client URLs, comma-separated (as `--cluster-endpoints` takes them).
    pub fn endpoint_list(&self) -> String {
        self.endpoints.join(",")
    }

    /// Starts the stopped members again on their data, and waits until they serve.
    pub fn start_again(&mut self) {
        for m in self.members.iter_mut().filter(|m| m.child.is_none()) {
            let child = Command::new("etcd")
                .args(&m.args)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            m.child = Some(child);
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        for (i, endpoint) in self.endpoints.iter().enumerate() {
            if self.members[i].child.is_none() {
                continue;
            }
            // Serving (with a leader) once its health says so.
            let health = format!("{endpoint}/health");
            while !Command::new("curl")
                .args(["-sf", "-m", "1", &health])
                .args(&self.curl_tls)
                .output()
                .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("true"))
            {
                assert!(std::time::Instant::now() < deadline, "etcd member {i} never served");
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
        }
    }

    /// Kills member `i` (an outage of one); its data stays.
    pub fn stop_member(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills every member (a full outage); their data stays.
    pub fn stop(&mut self) {
        for i in 0..self.members.len() {
            self.stop_member(i);
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
