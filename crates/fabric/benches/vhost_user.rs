//! vhost-user switch benchmark: one DPDK testpmd process, one forwarding core, loops
//! frames between pairs of its ports (MAC forwarding: what port 2k receives goes out of
//! port 2k+1 to port 2k's MAC, and back), through either
//! - vmfabric's vhost-user ports (testpmd's `net_virtio_user` devices, a real
//!   vhost-user frontend), or
//! - the Linux bridge, over TAP devices (testpmd's `net_tap` devices),
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

#[derive(Clone, Copy, PartialEq, Eq)]
enum Impl {
    Vmfabric,
    Bridge,
}

impl Impl {
    fn name(self) -> &'static str {
        match self {
            Impl::Vmfabric => "vmfabric vhost-user",
            Impl::Bridge => "Linux bridge + TAP",
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
    /// CPU of everything that moves frames, per delivered frame (ns): this process
    /// (switch and queue threads) and testpmd.
    cpu_ns_per_frame: f64,
    /// This process alone (the switch), per delivered frame (ns).
    switch_ns_per_frame: f64,
}

fn measure(pmd: &mut Testpmd, secs: f64, size: usize, delivered: &dyn Fn() -> u64) -> Cell {
    // Warm up: learning, rings filled, the loop at speed.
    std::thread::sleep(Duration::from_millis(1500));
    let pid = pmd.0.id();
    let me = std::process::id();
    let (d0, c0, m0, t0) = (delivered(), cpu_seconds(pid), cpu_seconds(me), Instant::now());
    std::thread::sleep(Duration::from_secs_f64(secs));
    let (d1, c1, m1) = (delivered(), cpu_seconds(pid), cpu_seconds(me));
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
        vdevs.push(format!(
            "net_virtio_user{p},path={},mac={},queue_size=1024",
            path.display(),
            mac(p)
        ));
    }
    let mut pmd = testpmd(
        &vdevs,
        ports,
        size,
        &dir.join(format!("testpmd-vhost-{ports}-{size}.log")),
    );
    // Every VMM connected and its rings set up.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ids.iter().all(|id| sw.is_port_up(*id) == Some(true)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    pmd.start(BURSTS);
    let delivered = || {
        ids.iter()
            .filter_map(|id| sw.port_counters(*id))
            .map(|c| c.tx_frames)
            .sum()
    };
    measure(&mut pmd, secs, size, &delivered)
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
        measure(&mut pmd, secs, size, &delivered)
    };
    for n in &names {
        let _ = sh(&["ip", "link", "del", n]);
    }
    let _ = sh(&["ip", "link", "del", BRIDGE]);
    cell
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
            // Interleaved: each repetition runs both, so drift hits both alike.
            for _ in 0..reps {
                for (imp, cells) in rows.iter_mut() {
                    cells.push(match imp {
                        Impl::Vmfabric => run_vmfabric(&dir, ports, size, secs),
                        Impl::Bridge => run_bridge(&dir, ports, size, secs),
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
                        Impl::Vmfabric =>
                            format!("{:.0}", median(cells.iter().map(|c| c.switch_ns_per_frame).collect())),
                        Impl::Bridge => "- (in the kernel)".into(),
                    },
                );
            }
            println!(
                "| {size} | {ports} | ratio | {:.2}× | | | |",
                rates[0] / rates[1].max(1.0)
            );
        }
    }
    println!("\ntestpmd's logs: {}", dir.display());
}
