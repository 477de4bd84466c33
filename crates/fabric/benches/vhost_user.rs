//! vhost-user switch benchmark: one DPDK testpmd process, one forwarding core, loops
//! frames between pairs of its ports (MAC forwarding: what port 2k receives goes out of
//! port 2k+1 to port 2k's MAC, and back), through either
//! - vmfabric's vhost-user ports (testpmd's `net_virtio_user` devices, a real
//!   vhost-user frontend), or
//! - the Linux bridge, over TAP devices (testpmd's `net_tap` devices),
//! - Open vSwitch with DPDK (Debian's `openvswitch-switch-dpdk`, when installed), its
//!   `dpdkvhostuserclient` ports on a `netdev` bridge with the NORMAL (learning) flow,
//!   its one poll-mode thread on core 0 (2 MiB huge pages are reserved for it),
//!
//! side by side in one run. Delivered frames are counted where each switch hands them
//! to an endpoint: the switch's port counters, the TAP devices' tx counters.
//!
//! Needs root (TAP devices, the bridge) and `dpdk-testpmd` (Debian's dpdk-dev); says
//! why and does nothing without them.
//! Run: `cargo bench -p fabric --bench vhost_user` (BENCH_SECS, BENCH_REPS).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fabric::{Mac, NetworkConfig, PortId, Switch, SwitchConfig};

const TESTPMD: &str = "dpdk-testpmd";
const BRIDGE: &str = "vfbbr0";

const OVS_VSWITCHD_DPDK: &str = "/usr/lib/openvswitch-switch-dpdk/ovs-vswitchd-dpdk";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Impl {
    Vmfabric,
    Bridge,
    OvsDpdk,
}

impl Impl {
    fn name(self) -> &'static str {
        match self {
            Impl::Vmfabric => "vmfabric vhost-user",
            Impl::Bridge => "Linux bridge + TAP",
            Impl::OvsDpdk => "OVS-DPDK vhost-user",
        }
    }
}

fn mac(i: usize) -> Mac {
    Mac([0x02, 0xdd, 0, 0, (i >> 8) as u8, i as u8])
}

fn sh(args: &[&str]) -> bool {
    Command::new(args[0])
        .args(&args[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// CPU seconds a process (all its threads) has used: utime + stime.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 (1-based); `rest` starts at field 3.
    (ticks(11) + ticks(12)) / rustix::param::clock_ticks_per_second() as f64
}

fn tap_tx_packets(ifname: &str) -> u64 {
    std::fs::read_to_string(format!("/sys/class/net/{ifname}/statistics/tx_packets"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// testpmd at its interactive prompt, commands through its stdin.
struct Testpmd(Child);

impl Testpmd {
    fn say(&mut self, cmd: &str) {
        use std::io::Write;
        if let Some(stdin) = self.0.stdin.as_mut() {
            let _ = writeln!(stdin, "{cmd}");
            let _ = stdin.flush();
        }
    }

    /// Starts the loop: every port sends `bursts` bursts of 32 frames first, then
    /// forwards what it receives.
    fn start(&mut self, bursts: u32) {
        self.say(&format!("start tx_first {bursts}"));
    }
}

impl Drop for Testpmd {
    fn drop(&mut self) {
        self.say("stop");
        self.say("quit");
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.0.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// testpmd on core 0 (its main thread, idle) and core 1 (forwarding), MAC forwarding
/// between port pairs, frames of `size` bytes; waits at its prompt.
fn testpmd(vdevs: &[String], ports: usize, size: usize, log: &Path) -> Testpmd {
    let mut args: Vec<String> = vec![
        "-l".into(),
        "0,1".into(),
        "--no-pci".into(),
        "--no-huge".into(),
        "-m".into(),
        "1024".into(),
        "--file-prefix".into(),
        "vmfbench".into(),
        "--log-level".into(),
        "*:error".into(),
    ];
    for v in vdevs {
        args.extend(["--vdev".into(), v.clone()]);
    }
    args.extend([
        "--".into(),
        "-i".into(),
        "--nb-cores=1".into(),
        "--forward-mode=mac".into(),
        format!("--txpkts={size}"),
        "--burst=32".into(),
        "--txd=1024".into(),
        "--rxd=1024".into(),
    ]);
    for p in 0..ports {
        args.push(format!("--eth-peer={p},{}", mac(p ^ 1)));
    }
    let child = Command::new(TESTPMD)
        .args(&args)
        .stdin(Stdio::piped())
        .stdout(std::fs::File::create(log).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .expect("start dpdk-testpmd");
    Testpmd(child)
}

/// Frames in flight per port: enough to keep the loop busy without filling queues.
const BURSTS: u32 = 8;

struct Cell {
    frames_per_s: f64,
    gbps: f64,
    /// CPU of everything that moves frames, per delivered frame (ns): testpmd and the
    /// switch's process (a bridge's work is in testpmd's system time).
    cpu_ns_per_frame: f64,
    /// The switch's process alone, per delivered frame (ns).
    switch_ns_per_frame: f64,
}

/// `switch`: the process that switches (this one for vmfabric, ovs-vswitchd), if any.
fn measure(pmd: &mut Testpmd, secs: f64, size: usize, switch: Option<u32>, delivered: &dyn Fn() -> u64) -> Cell {
    // Warm up: learning, rings filled, the loop at speed.
    std::thread::sleep(Duration::from_millis(1500));
    let pid = pmd.0.id();
    let switch_cpu = || switch.map_or(0.0, cpu_seconds);
    let (d0, c0, m0, t0) = (delivered(), cpu_seconds(pid), switch_cpu(), Instant::now());
    std::thread::sleep(Duration::from_secs_f64(secs));
    let (d1, c1, m1) = (delivered(), cpu_seconds(pid), switch_cpu());
    let dt = t0.elapsed().as_secs_f64();
    let frames = (d1 - d0) as f64;
    let per = |cpu: f64| if frames > 0.0 { cpu * 1e9 / frames } else { 0.0 };
    Cell {
        frames_per_s: frames / dt,
        gbps: frames * size as f64 * 8.0 / dt / 1e9,
        cpu_ns_per_frame: per((c1 - c0) + (m1 - m0)),
        switch_ns_per_frame: per(m1 - m0),
    }
}

fn run_vmfabric(dir: &Path, ports: usize, size: usize, secs: f64) -> Cell {
    let sw = Switch::start(SwitchConfig::default()).unwrap();
    sw.add_network("bench", NetworkConfig::default()).unwrap();
    let mut ids: Vec<PortId> = Vec::new();
    let mut vdevs = Vec::new();
    for p in 0..ports {
        let path = dir.join(format!("p{p}.vhost"));
        ids.push(sw.add_vhost_user_port("bench", &format!("p{p}"), &path).unwrap());
        vdevs.push(virtio_user(p, &path, false));
    }
    let mut pmd = testpmd(
        &vdevs,
        ports,
        size,
        &dir.join(format!("testpmd-vhost-{ports}-{size}.log")),
    );
    // Every VMM connected and its rings set up.
    wait_until(20, || ids.iter().all(|id| sw.is_port_up(*id) == Some(true)));
    std::thread::sleep(Duration::from_millis(500));
    pmd.start(BURSTS);
    let delivered = || {
        ids.iter()
            .filter_map(|id| sw.port_counters(*id))
            .map(|c| c.tx_frames)
            .sum()
    };
    measure(&mut pmd, secs, size, Some(std::process::id()), &delivered)
}

fn run_bridge(dir: &Path, ports: usize, size: usize, secs: f64) -> Cell {
    let _ = sh(&["ip", "link", "del", BRIDGE]);
    assert!(sh(&["ip", "link", "add", BRIDGE, "type", "bridge"]));
    // Learning and forwarding at once, no STP delay.
    let _ = sh(&["ip", "link", "set", BRIDGE, "type", "bridge", "forward_delay", "0"]);
    assert!(sh(&["ip", "link", "set", BRIDGE, "up"]));
    let names: Vec<String> = (0..ports).map(|p| format!("vfbt{p}")).collect();
    for n in &names {
        let _ = sh(&["ip", "link", "del", n]);
        assert!(sh(&["ip", "tuntap", "add", "mode", "tap", "multi_queue", "name", n]));
        assert!(sh(&["ip", "link", "set", n, "master", BRIDGE]));
    }
    let vdevs: Vec<String> = names
        .iter()
        .enumerate()
        .map(|(p, n)| format!("net_tap{p},iface={n},mac={}", mac(p)))
        .collect();
    let cell = {
        let mut pmd = testpmd(
            &vdevs,
            ports,
            size,
            &dir.join(format!("testpmd-bridge-{ports}-{size}.log")),
        );
        // net_tap gives the kernel side of each TAP the port's own MAC, which the bridge
        // would then keep as its local address (frames to it would never leave): the
        // kernel side gets another, and the links go up, once testpmd holds them.
        std::thread::sleep(Duration::from_secs(2));
        for (p, n) in names.iter().enumerate() {
            let other = Mac([0x02, 0xee, 0, 0, (p >> 8) as u8, p as u8]).to_string();
            assert!(sh(&["ip", "link", "set", n, "address", &other]));
            assert!(sh(&["ip", "link", "set", n, "up"]));
        }
        std::thread::sleep(Duration::from_millis(500));
        pmd.start(BURSTS);
        let delivered = || names.iter().map(|n| tap_tx_packets(n)).sum();
        measure(&mut pmd, secs, size, None, &delivered)
    };
    for n in &names {
        let _ = sh(&["ip", "link", "del", n]);
    }
    let _ = sh(&["ip", "link", "del", BRIDGE]);
    cell
}

/// An OVS-DPDK switch of its own (database and daemon under `dir`), stopped on drop.
struct Ovs {
    dir: PathBuf,
    /// The huge pages reserved before this OVS asked for its own: given back after.
    huge_pages_before: u32,
}

impl Ovs {
    fn db(&self) -> String {
        format!("--db=unix:{}", self.dir.join("db.sock").display())
    }

    fn vsctl(&self, args: &[&str]) -> String {
        let out = Command::new("ovs-vsctl")
            .arg(self.db())
            .args(args)
            .output()
            .expect("ovs-vsctl");
        String::from_utf8_lossy(&out.stdout).into()
    }

    fn start(dir: &Path) -> Ovs {
        let dir = dir.join("ovs");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let huge_pages_before = reserve_huge_pages(512);
        let conf = dir.join("conf.db");
        assert!(sh(&[
            "ovsdb-tool",
            "create",
            conf.to_str().unwrap(),
            "/usr/share/openvswitch/vswitch.ovsschema"
        ]));
        let at = |f: &str| dir.join(f).display().to_string();
        assert!(sh(&[
            "ovsdb-server",
            &format!("--remote=punix:{}", at("db.sock")),
            &format!("--pidfile={}", at("ovsdb.pid")),
            &format!("--unixctl={}", at("ovsdb.ctl")),
            &format!("--log-file={}", at("ovsdb.log")),
            "--detach",
            conf.to_str().unwrap(),
        ]));
        let vswitchd_args = [
            format!("unix:{}", at("db.sock")),
            format!("--pidfile={}", at("vswitchd.pid")),
            format!("--unixctl={}", at("vswitchd.ctl")),
            format!("--log-file={}", at("vswitchd.log")),
        ];
        let ovs = Ovs { dir, huge_pages_before };
        ovs.vsctl(&["--no-wait", "init"]);
        // One poll-mode thread on core 0; testpmd forwards on core 1.
        ovs.vsctl(&[
            "--no-wait",
            "set",
            "Open_vSwitch",
            ".",
            "other_config:dpdk-init=true",
            "other_config:dpdk-extra=--no-pci",
            "other_config:dpdk-socket-mem=512",
            "other_config:dpdk-lcore-mask=0x1",
            "other_config:pmd-cpu-mask=0x1",
        ]);
        let mut launch = vec![OVS_VSWITCHD_DPDK];
        launch.extend(vswitchd_args.iter().map(String::as_str));
        launch.push("--detach");
        assert!(sh(&launch), "{OVS_VSWITCHD_DPDK} did not start");
        ovs.vsctl(&["add-br", "br0", "--", "set", "bridge", "br0", "datapath_type=netdev"]);
        ovs
    }

    fn pid(&self, name: &str) -> u32 {
        std::fs::read_to_string(self.dir.join(name))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Frames the switch handed to its ports (their tx), all read by one call.
    fn delivered(&self, ports: usize) -> u64 {
        let mut args: Vec<String> = Vec::new();
        for p in 0..ports {
            if p > 0 {
                args.push("--".into());
            }
            args.extend([
                "get".into(),
                "interface".into(),
                format!("vhu{p}"),
                "statistics:tx_packets".into(),
            ]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.vsctl(&args)
            .lines()
            .filter_map(|l| l.trim().parse::<u64>().ok())
            .sum()
    }
}

impl Drop for Ovs {
    fn drop(&mut self) {
        for pidfile in ["vswitchd.pid", "ovsdb.pid"] {
            let pid = self.pid(pidfile);
            if pid > 0 {
                let _ = sh(&["kill", &pid.to_string()]);
            }
        }
        std::thread::sleep(Duration::from_millis(500));
        // 1 GiB of huge pages is memory no one else may use: the machine gets it back.
        let _ = std::fs::write(HUGE_PAGES, self.huge_pages_before.to_string());
    }
}

const HUGE_PAGES: &str = "/proc/sys/vm/nr_hugepages";

/// DPDK in OVS wants huge pages: at least `pages` of 2 MiB, and hugetlbfs mounted.
/// Returns how many were reserved before.
fn reserve_huge_pages(pages: u32) -> u32 {
    let now: u32 = std::fs::read_to_string(HUGE_PAGES)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    if now < pages {
        let _ = std::fs::write(HUGE_PAGES, pages.to_string());
    }
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    if !mounts.contains("hugetlbfs") {
        let _ = std::fs::create_dir_all("/dev/hugepages");
        let _ = sh(&["mount", "-t", "hugetlbfs", "nodev", "/dev/hugepages"]);
    }
    now
}

fn run_ovs(dir: &Path, ports: usize, size: usize, secs: f64) -> Cell {
    let ovs = Ovs::start(dir);
    let mut vdevs = Vec::new();
    for p in 0..ports {
        let path = ovs.dir.join(format!("vhu{p}.sock"));
        ovs.vsctl(&[
            "add-port",
            "br0",
            &format!("vhu{p}"),
            "--",
            "set",
            "Interface",
            &format!("vhu{p}"),
            "type=dpdkvhostuserclient",
            &format!("options:vhost-server-path={}", path.display()),
        ]);
        // OVS connects as the vhost-user client: testpmd's devices listen.
        vdevs.push(virtio_user(p, &path, true));
    }
    let mut pmd = testpmd(
        &vdevs,
        ports,
        size,
        &dir.join(format!("testpmd-ovs-{ports}-{size}.log")),
    );
    wait_until(30, || {
        (0..ports).all(|p| {
            ovs.vsctl(&["get", "interface", &format!("vhu{p}"), "link_state"])
                .trim()
                == "up"
        })
    });
    std::thread::sleep(Duration::from_millis(500));
    pmd.start(BURSTS);
    let delivered = || ovs.delivered(ports);
    let cell = measure(&mut pmd, secs, size, Some(ovs.pid("vswitchd.pid")), &delivered);
    drop(pmd);
    cell
}

/// testpmd's vhost-user frontend device for port `p` on `path` (listening if `server`).
fn virtio_user(p: usize, path: &Path, server: bool) -> String {
    let listen = if server { ",server=1" } else { "" };
    format!(
        "net_virtio_user{p},path={}{listen},mac={},queue_size=1024",
        path.display(),
        mac(p)
    )
}

fn wait_until(secs: u64, ready: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !ready() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    if !rustix::process::geteuid().is_root() {
        println!("vhost_user bench: skipped, needs root (TAP devices, a bridge)");
        return;
    }
    if !sh(&["sh", "-c", &format!("command -v {TESTPMD}")]) {
        println!("vhost_user bench: skipped, no {TESTPMD} (apt install dpdk-dev)");
        return;
    }
    let secs: f64 = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2.0);
    let reps: usize = std::env::var("BENCH_REPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let with_ovs = Path::new(OVS_VSWITCHD_DPDK).exists() && std::env::var("BENCH_OVS").as_deref() != Ok("0");
    if !with_ovs {
        println!("(OVS-DPDK: not measured, {OVS_VSWITCHD_DPDK} missing: apt install openvswitch-switch-dpdk)\n");
    }
    let dir: PathBuf = std::env::temp_dir().join(format!("vmfabric-vhost-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    println!("| size | ports | implementation | delivered frames/s | Gbit/s | CPU ns/frame (all) | CPU ns/frame (switch process) |");
    println!("|---:|---:|---|---:|---:|---:|---:|");
    let only = |var: &str, all: &[usize]| -> Vec<usize> {
        match std::env::var(var).ok().and_then(|v| v.parse().ok()) {
            Some(n) => vec![n],
            None => all.to_vec(),
        }
    };
    for size in only("BENCH_SIZE", &[64, 1500]) {
        for ports in only("BENCH_PORTS", &[2, 32]) {
            let mut rows: Vec<(Impl, Vec<Cell>)> = vec![(Impl::Vmfabric, vec![]), (Impl::Bridge, vec![])];
            if with_ovs {
                rows.push((Impl::OvsDpdk, vec![]));
            }
            // Interleaved: each repetition runs both, so drift hits both alike.
            for _ in 0..reps {
                for (imp, cells) in rows.iter_mut() {
                    cells.push(match imp {
                        Impl::Vmfabric => run_vmfabric(&dir, ports, size, secs),
                        Impl::Bridge => run_bridge(&dir, ports, size, secs),
                        Impl::OvsDpdk => run_ovs(&dir, ports, size, secs),
                    });
                }
            }
            let mut rates = Vec::new();
            for (imp, cells) in &rows {
                let fps = median(cells.iter().map(|c| c.frames_per_s).collect());
                rates.push(fps);
                println!(
                    "| {size} | {ports} | {} | {:.3} M | {:.2} | {:.0} | {} |",
                    imp.name(),
                    fps / 1e6,
                    median(cells.iter().map(|c| c.gbps).collect()),
                    median(cells.iter().map(|c| c.cpu_ns_per_frame).collect()),
                    match imp {
                        Impl::Bridge => "- (in the kernel)".into(),
                        _ => format!("{:.0}", median(cells.iter().map(|c| c.switch_ns_per_frame).collect())),
                    },
                );
            }
            println!(
                "| {size} | {ports} | ratio vmfabric/bridge | {:.2}× | | | |",
                rates[0] / rates[1].max(1.0)
            );
            if with_ovs && rates[2] == 0.0 {
                println!("| {size} | {ports} | ratio vmfabric/OVS-DPDK | none: no frames counted at OVS's ports (its log: ovs/vswitchd.log) | | | |");
            } else if with_ovs {
                println!(
                    "| {size} | {ports} | ratio vmfabric/OVS-DPDK | {:.2}× | | | |",
                    rates[0] / rates[2]
                );
            }
        }
    }
    println!("\ntestpmd's logs: {}", dir.display());
}
