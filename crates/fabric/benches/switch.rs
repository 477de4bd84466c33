//! Switch benchmark: vmfabric against the raw socketpair ceiling and vm-rs 0.2.4's
//! switch, side by side in one run, on the same endpoints.
//!
//! Endpoints behave like VMMs: one `send` per frame (blocking, so a full switch
//! pushes back) and one `recv` per frame (non-blocking, drained when epoll says so).
//! Half the ports send unicast to the other half, to MACs learned before timing.
//! One sender thread and one receiver thread serve all endpoints, for every
//! implementation, so only the thing in the middle differs.
//!
//! Run: `cargo bench -p fabric --bench switch` (BENCH_SECS sets seconds per cell).

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fabric::{Mac, NetworkConfig, Switch, SwitchConfig};
use rustix::buffer::spare_capacity;
use rustix::event::epoll;

const NET: &str = "bench";
const ENDPOINT_BUFFER: usize = 4 << 20;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Impl {
    Raw,
    Vmfabric,
    VmRs,
}

impl Impl {
    fn name(&self) -> &'static str {
        match self {
            Impl::Raw => "raw socketpair",
            Impl::Vmfabric => "vmfabric",
            Impl::VmRs => "vm-rs 0.2.4",
        }
    }
}

/// A running setup: the endpoints a VMM would hold, and whatever keeps the switch alive.
struct Setup {
    senders: Vec<UnixDatagram>,
    receivers: Vec<UnixDatagram>,
    _keep: Box<dyn std::any::Any>,
}

fn sender_mac(i: usize) -> Mac {
    Mac([0x02, 0xaa, 0, 0, (i >> 8) as u8, i as u8])
}

fn receiver_mac(i: usize) -> Mac {
    Mac([0x02, 0xbb, 0, 0, (i >> 8) as u8, i as u8])
}

fn frame(dst: Mac, src: Mac, len: usize) -> Vec<u8> {
    let mut f = Vec::with_capacity(len);
    f.extend(dst.0);
    f.extend(src.0);
    f.extend([0x88, 0xb5]);
    f.resize(len, 0x5a);
    f
}

fn endpoint(fd: OwnedFd) -> UnixDatagram {
    let _ = rustix::net::sockopt::set_socket_send_buffer_size(&fd, ENDPOINT_BUFFER);
    let _ = rustix::net::sockopt::set_socket_recv_buffer_size(&fd, ENDPOINT_BUFFER);
    UnixDatagram::from(fd)
}

/// `pairs` sender/receiver pairs plus `idle` attached ports that never send.
fn setup(which: Impl, pairs: usize, idle: usize) -> Setup {
    match which {
        Impl::Raw => {
            let mut senders = Vec::new();
            let mut receivers = Vec::new();
            for _ in 0..pairs {
                let (a, b) = UnixDatagram::pair().unwrap();
                senders.push(endpoint(a.into()));
                receivers.push(endpoint(b.into()));
            }
            let idle: Vec<_> = (0..idle).map(|_| UnixDatagram::pair().unwrap()).collect();
            Setup {
                senders,
                receivers,
                _keep: Box::new(idle),
            }
        }
        Impl::Vmfabric => {
            let sw = Switch::start(SwitchConfig::default()).unwrap();
            sw.add_network(NET, NetworkConfig::default()).unwrap();
            let add = |l: &str| endpoint(sw.add_port(NET, l).unwrap().1);
            let senders = (0..pairs).map(|i| add(&format!("s{i}"))).collect();
            let receivers = (0..pairs).map(|i| add(&format!("r{i}"))).collect();
            let idle: Vec<_> = (0..idle).map(|i| add(&format!("idle{i}"))).collect();
            Setup {
                senders,
                receivers,
                _keep: Box::new((sw, idle)),
            }
        }
        Impl::VmRs => {
            let sw = vm_rs::network::switch::NetworkSwitch::new();
            let add = |l: &str| endpoint(sw.add_port(NET, l).unwrap().try_clone_owned().unwrap());
            let senders = (0..pairs).map(|i| add(&format!("s{i}"))).collect();
            let receivers = (0..pairs).map(|i| add(&format!("r{i}"))).collect();
            let idle: Vec<_> = (0..idle).map(|i| add(&format!("idle{i}"))).collect();
            sw.start().unwrap();
            Setup {
                senders,
                receivers,
                _keep: Box::new((sw, idle)),
            }
        }
    }
}

/// Reads everything waiting on `socks` until nothing has come for `quiet`.
fn drain(socks: &[UnixDatagram], quiet: Duration) -> u64 {
    let mut buf = vec![0u8; 70000];
    let mut n = 0;
    let mut last = Instant::now();
    for s in socks {
        s.set_nonblocking(true).unwrap();
    }
    while last.elapsed() < quiet {
        let mut got = false;
        for s in socks {
            while s.recv(&mut buf).is_ok() {
                n += 1;
                got = true;
            }
        }
        if got {
            last = Instant::now();
        } else {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    n
}

/// Teaches the switch every MAC: each endpoint broadcasts once.
fn learn(s: &Setup) {
    for (i, r) in s.receivers.iter().enumerate() {
        r.send(&frame(Mac::BROADCAST, receiver_mac(i), 64)).unwrap();
    }
    for (i, t) in s.senders.iter().enumerate() {
        t.send(&frame(Mac::BROADCAST, sender_mac(i), 64)).unwrap();
    }
    let all: Vec<UnixDatagram> = s
        .senders
        .iter()
        .chain(&s.receivers)
        .map(|u| u.try_clone().unwrap())
        .collect();
    drain(&all, Duration::from_millis(300));
    for u in s.senders.iter() {
        u.set_nonblocking(false).unwrap();
    }
}

struct Throughput {
    rate: f64,
    drop_pct: f64,
    /// On-CPU nanoseconds per delivered frame: sender, receiver, switch thread.
    cpu_ns: [f64; 3],
}

/// Nanoseconds the calling thread has run on a CPU.
fn thread_cpu_ns() -> u64 {
    cpu_ns_of(std::path::Path::new("/proc/thread-self"))
}

fn cpu_ns_of(task: &std::path::Path) -> u64 {
    let s = std::fs::read_to_string(task.join("schedstat")).unwrap_or_default();
    s.split_whitespace().next().and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// On-CPU time of the switch's forwarding thread (vmfabric's or vm-rs's), if any.
fn switch_thread_cpu_ns() -> u64 {
    let mut total = 0;
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if matches!(comm.trim(), "fabric-switch" | "network-switch") {
            total += cpu_ns_of(&task.path());
        }
    }
    total
}

fn throughput(which: Impl, ports: usize, idle: usize, size: usize, secs: f64) -> Throughput {
    let pairs = ports / 2;
    let s = setup(which, pairs, idle);
    if which != Impl::Raw {
        learn(&s);
    }
    let frames: Vec<Vec<u8>> = (0..pairs)
        .map(|i| frame(receiver_mac(i), sender_mac(i), size))
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let delivered = Arc::new(AtomicU64::new(0));
    let last_rx = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let switch_cpu_before = switch_thread_cpu_ns();

    let receivers: Vec<UnixDatagram> = s.receivers.iter().map(|r| r.try_clone().unwrap()).collect();
    let (stop_r, delivered_r, last_rx_r) = (stop.clone(), delivered.clone(), last_rx.clone());
    let rx = std::thread::spawn(move || {
        let ep = epoll::create(epoll::CreateFlags::CLOEXEC).unwrap();
        for (i, r) in receivers.iter().enumerate() {
            r.set_nonblocking(true).unwrap();
            epoll::add(
                &ep,
                r.as_fd(),
                epoll::EventData::new_u64(i as u64),
                epoll::EventFlags::IN,
            )
            .unwrap();
        }
        let cpu0 = thread_cpu_ns();
        let mut buf = vec![0u8; 70000];
        let mut events = Vec::with_capacity(64);
        let mut n = 0u64;
        let mut quiet_since: Option<Instant> = None;
        loop {
            events.clear();
            let timeout = rustix::time::Timespec {
                tv_sec: 0,
                tv_nsec: 20_000_000,
            };
            epoll::wait(&ep, spare_capacity(&mut events), Some(&timeout)).unwrap();
            if events.is_empty() {
                if stop_r.load(Ordering::Relaxed) {
                    // Senders are done: wait for the last frames in flight.
                    let q = *quiet_since.get_or_insert_with(Instant::now);
                    if q.elapsed() > Duration::from_millis(200) {
                        break;
                    }
                }
                continue;
            }
            quiet_since = None;
            for ev in &events {
                let r = &receivers[ev.data.u64() as usize];
                while r.recv(&mut buf).is_ok() {
                    n += 1;
                }
            }
            delivered_r.store(n, Ordering::Relaxed);
            last_rx_r.store(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        }
        delivered_r.store(n, Ordering::Relaxed);
        thread_cpu_ns() - cpu0
    });

    let senders: Vec<UnixDatagram> = s.senders.iter().map(|t| t.try_clone().unwrap()).collect();
    let stop_s = stop.clone();
    let tx = std::thread::spawn(move || {
        let cpu0 = thread_cpu_ns();
        let mut sent = 0u64;
        let deadline = start + Duration::from_secs_f64(secs);
        'outer: loop {
            for _ in 0..64 {
                for (t, f) in senders.iter().zip(&frames) {
                    if t.send(f).is_ok() {
                        sent += 1;
                    }
                }
            }
            if Instant::now() >= deadline {
                break 'outer;
            }
        }
        stop_s.store(true, Ordering::Relaxed);
        (sent, thread_cpu_ns() - cpu0)
    });
    let (sent, tx_cpu) = tx.join().unwrap();
    let rx_cpu = rx.join().unwrap();
    let switch_cpu = switch_thread_cpu_ns().saturating_sub(switch_cpu_before);
    let got = delivered.load(Ordering::Relaxed);
    let elapsed = Duration::from_nanos(last_rx.load(Ordering::Relaxed))
        .as_secs_f64()
        .max(secs);
    drop(s);
    let per = |ns: u64| ns as f64 / got.max(1) as f64;
    Throughput {
        rate: got as f64 / elapsed,
        drop_pct: 100.0 * (sent.saturating_sub(got)) as f64 / sent.max(1) as f64,
        cpu_ns: [per(tx_cpu), per(rx_cpu), per(switch_cpu)],
    }
}

/// Round-trip times of 64-byte frames bounced between two endpoints.
fn ping_pong(which: Impl, iters: usize) -> (Duration, Duration) {
    let s = setup(which, 1, 0);
    if which != Impl::Raw {
        learn(&s);
    }
    let (a, b) = (s.senders[0].try_clone().unwrap(), s.receivers[0].try_clone().unwrap());
    a.set_nonblocking(false).unwrap();
    b.set_nonblocking(false).unwrap();
    a.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    b.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let ping = frame(receiver_mac(0), sender_mac(0), 64);
    let pong = frame(sender_mac(0), receiver_mac(0), 64);
    let echo = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while b.recv(&mut buf).is_ok() {
            if b.send(&pong).is_err() {
                break;
            }
        }
    });
    let mut buf = [0u8; 2048];
    let mut rtts = Vec::with_capacity(iters);
    let mut lost = 0;
    for i in 0..iters + 500 {
        let t = Instant::now();
        a.send(&ping).unwrap();
        if a.recv(&mut buf).is_err() {
            lost += 1;
            continue;
        }
        if i >= 500 {
            rtts.push(t.elapsed());
        }
    }
    drop(s);
    drop(a);
    echo.join().unwrap();
    if lost > 0 {
        eprintln!("  {}: {lost} ping-pong frames lost", which.name());
    }
    rtts.sort();
    (rtts[rtts.len() / 2], rtts[rtts.len() * 99 / 100])
}

/// Runs every implementation `reps` times, interleaved so that a noisy moment hits all
/// of them alike, and keeps each one's median run by rate.
fn median_runs(impls: &[Impl], reps: usize, mut run: impl FnMut(Impl) -> Throughput) -> Vec<Throughput> {
    let mut all: Vec<Vec<Throughput>> = impls.iter().map(|_| Vec::new()).collect();
    for _ in 0..reps {
        for (k, w) in impls.iter().enumerate() {
            all[k].push(run(*w));
        }
    }
    all.into_iter()
        .map(|mut v| {
            v.sort_by(|a, b| a.rate.total_cmp(&b.rate));
            v.swap_remove(v.len() / 2)
        })
        .collect()
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "MISSED"
    }
}

fn main() {
    // `cargo test --benches` runs this with no time to spare; only `cargo bench` measures.
    if !std::env::args().any(|a| a == "--bench") {
        println!("switch bench: run it with `cargo bench -p fabric --bench switch`");
        return;
    }
    let secs: f64 = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    let reps: usize = std::env::var("BENCH_REPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let impls = [Impl::Raw, Impl::Vmfabric, Impl::VmRs];
    println!("## Throughput: median of {reps} runs of {secs} s per cell\n");
    println!("Delivered frames/s, Gbit/s of frame bytes, and the share of sent frames not delivered.\n");
    println!("| size | ports | raw socketpair | vmfabric | vm-rs 0.2.4 | vmfabric/raw | vmfabric/vm-rs |");
    println!("|---:|---:|---|---|---|---:|---:|");
    let (mut worst_raw, mut worst_vmrs_2port, mut max_drop) = (f64::MAX, f64::MAX, 0.0f64);
    let mut two_port_64 = 0.0;
    let mut cpu_split: Vec<[f64; 3]> = Vec::new();
    for size in [64usize, 512, 1500] {
        for ports in [2usize, 8, 32] {
            let r = median_runs(&impls, reps, |w| throughput(w, ports, 0, size, secs));
            let cell = |t: &Throughput| {
                format!(
                    "{:.3} M/s, {:.2} Gb/s, {:.1} %",
                    t.rate / 1e6,
                    t.rate * size as f64 * 8.0 / 1e9,
                    t.drop_pct
                )
            };
            if size == 64 && ports == 2 {
                two_port_64 = r[1].rate;
                cpu_split = r.iter().map(|t| t.cpu_ns).collect();
            }
            worst_raw = worst_raw.min(r[1].rate / r[0].rate);
            if ports == 2 {
                worst_vmrs_2port = worst_vmrs_2port.min(r[1].rate / r[2].rate);
            }
            max_drop = max_drop.max(r[1].drop_pct);
            println!(
                "| {size} | {ports} | {} | {} | {} | {:.2}× | {:.2}× |",
                cell(&r[0]),
                cell(&r[1]),
                cell(&r[2]),
                r[1].rate / r[0].rate,
                r[1].rate / r[2].rate
            );
        }
    }
    println!("\n## Scale: 1,024 idle ports attached, 2 active (64-byte frames)\n");
    println!("| | raw socketpair | vmfabric | vm-rs 0.2.4 |");
    println!("|---|---|---|---|");
    let r = median_runs(&impls, reps, |w| throughput(w, 2, 1024, 64, secs));
    println!(
        "| frames/s (drop %) | {:.3} M ({:.1} %) | {:.3} M ({:.1} %) | {:.3} M ({:.1} %) |",
        r[0].rate / 1e6,
        r[0].drop_pct,
        r[1].rate / 1e6,
        r[1].drop_pct,
        r[2].rate / 1e6,
        r[2].drop_pct
    );
    let scale = r[1].rate / two_port_64;
    println!("\n## Where the CPU goes (64-byte frames, 2 ports; on-CPU ns per delivered frame)\n");
    println!("| | sender | receiver | switch thread | total |");
    println!("|---|---:|---:|---:|---:|");
    for (w, c) in impls.iter().zip(&cpu_split) {
        println!(
            "| {} | {:.0} | {:.0} | {:.0} | {:.0} |",
            w.name(),
            c[0],
            c[1],
            c[2],
            c[0] + c[1] + c[2]
        );
    }
    println!("\n## Ping-pong latency (64-byte frames, 20,000 round trips after 500 warm-up)\n");
    println!("| | p50 | p99 |");
    println!("|---|---:|---:|");
    let mut p50s = Vec::new();
    for w in impls {
        let (p50, p99) = ping_pong(w, 20_000);
        p50s.push(p50.as_secs_f64());
        println!(
            "| {} | {:.1} µs | {:.1} µs |",
            w.name(),
            p50.as_secs_f64() * 1e6,
            p99.as_secs_f64() * 1e6
        );
    }
    let rtt_ratio = p50s[1] / p50s[0];
    println!("\n## Targets\n");
    println!("| target | this run | |");
    println!("|---|---|---|");
    println!(
        "| ≥ 0.5× raw in every cell | worst {worst_raw:.2}× | {} |",
        verdict(worst_raw >= 0.5)
    );
    println!(
        "| ≥ 1.5× vm-rs at 2 ports | worst {worst_vmrs_2port:.2}× | {} |",
        verdict(worst_vmrs_2port >= 1.5)
    );
    println!(
        "| 0 drops when receivers keep up | worst {max_drop:.2} % | {} |",
        verdict(max_drop == 0.0)
    );
    println!(
        "| RTT p50 ≤ 1.5× raw | {rtt_ratio:.2}× | {} |",
        verdict(rtt_ratio <= 1.5)
    );
    println!(
        "| 1,024 idle ports ≥ 0.9× the 2-port rate | {scale:.2}× | {} |",
        verdict(scale >= 0.9)
    );
}
