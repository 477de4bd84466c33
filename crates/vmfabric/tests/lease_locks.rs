//! A VM's port is locked to its lease: after udhcpc (in a namespace, on a TAP port)
//! gets an address, frames from another IP or another MAC on that port are dropped.
//! Needs root, /dev/net/tun and busybox.

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use fabric::{DropReason, NetworkConfig, Switch, SwitchConfig, TapSource};
use gateway::{Gateway, GatewayConfig, MemoryLeaseStore, Upstreams};
use vmfabric::control::locks::{self, ControlEvent, PortLocker};

fn run(args: &[&str]) -> (bool, String) {
    match Command::new(args[0]).args(&args[1..]).output() {
        Ok(o) => (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr),
        ),
        Err(e) => (false, e.to_string()),
    }
}

fn sh(args: &[&str]) {
    let (ok, out) = run(args);
    assert!(ok, "{} failed: {out}", args.join(" "));
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run(&["ip", "netns", "del", &self.0]);
    }
}

#[test]
fn a_leased_port_cannot_spoof_its_ip_or_mac() {
    let ready = rustix::process::geteuid().is_root()
        && std::path::Path::new("/dev/net/tun").exists()
        && run(&["sh", "-c", "command -v busybox"]).0;
    if !ready {
        let why = "needs root, /dev/net/tun and busybox";
        assert!(
            std::env::var("VMFABRIC_REQUIRE_ALL_TESTS").as_deref() != Ok("1"),
            "must run here but {why}"
        );
        eprintln!("SKIP a_leased_port_cannot_spoof_its_ip_or_mac: {why}");
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let sw = Arc::new(Switch::start(SwitchConfig::default()).unwrap());
    sw.add_network("sec", NetworkConfig::default()).unwrap();
    let mut cfg = GatewayConfig::new("sec", "10.233.0.0/24".parse().unwrap());
    cfg.upstreams = Upstreams::Static(vec![]);
    let gw = Gateway::attach(rt.handle(), &sw, "sec", cfg, Box::new(MemoryLeaseStore::default())).unwrap();

    // The control plane: both event streams into one locker.
    let (tx, rx) = mpsc::channel();
    let mut locker = PortLocker::new(sw.clone());
    locker.enable("sec", gw.port(), None);
    let _locker = locks::spawn(locker, rx);
    let (switch_events, lease_events) = (sw.take_events().unwrap(), gw.take_events().unwrap());
    let tx2 = tx.clone();
    std::thread::spawn(move || {
        switch_events
            .into_iter()
            .try_for_each(|e| tx.send(ControlEvent::Switch(e)))
    });
    std::thread::spawn(move || {
        lease_events.into_iter().try_for_each(|e| {
            tx2.send(ControlEvent::Lease {
                network: "sec".into(),
                event: e,
            })
        })
    });

    let id = std::process::id() % 100_000;
    let ns = Netns(format!("lk{id}"));
    let _ = run(&["ip", "netns", "del", &ns.0]);
    sh(&["ip", "netns", "add", &ns.0]);
    let (port, ifname) = sw
        .add_tap_port("sec", "vm", TapSource::Name(format!("lk{id}")))
        .unwrap();
    sh(&["ip", "link", "set", &ifname, "netns", &ns.0]);
    sh(&["ip", "-n", &ns.0, "link", "set", &ifname, "up"]);
    let exec = |args: &[&str]| {
        let mut full = vec!["ip", "netns", "exec", ns.0.as_str()];
        full.extend(args);
        run(&full)
    };
    let scratch = std::env::temp_dir().join(format!("lk-{id}"));
    std::fs::create_dir_all(&scratch).unwrap();
    testkit::udhcpc_once(&ns.0, &ifname, &scratch, &[]);
    let lease = gw.leases()[0].clone();
    let gw_ip = "10.233.0.1";
    let ping_from = |src: &str| exec(&["busybox", "ping", "-c", "1", "-W", "2", "-I", src, gw_ip]).0;
    assert!(ping_from(&lease.ip.to_string()), "the leased address works");
    let spoofed = || sw.port_counters(port).unwrap().drops(DropReason::Spoofed);
    wait_until("the port to be locked", || {
        // A frame from another address is dropped once the lock is in place.
        sh(&["ip", "-n", &ns.0, "addr", "replace", "10.233.0.200/24", "dev", &ifname]);
        !ping_from("10.233.0.200") && spoofed() > 0
    });
    assert!(ping_from(&lease.ip.to_string()), "the leased address still works");

    // Another MAC on the same port is not heard either.
    let before = spoofed();
    sh(&[
        "ip",
        "-n",
        &ns.0,
        "link",
        "set",
        &ifname,
        "address",
        "02:99:99:99:99:99",
    ]);
    assert!(!ping_from(&lease.ip.to_string()), "a spoofed MAC got through");
    assert!(spoofed() > before);
    assert_eq!(gw.resolve("gateway"), Some(Ipv4Addr::new(10, 233, 0, 1)));
}
