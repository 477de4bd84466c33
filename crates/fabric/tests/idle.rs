//! An idle switch sleeps: its thread is not woken while nothing happens. Its own test
//! binary, so no other test's switch thread is running beside it.

mod common;

use std::time::Duration;

use common::*;
use fabric::{Mac, NetworkConfig};

/// (voluntary context switches, sleeping?) of the thread named `fabric-switch`.
fn switch_thread() -> (u64, bool) {
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() != "fabric-switch" {
            continue;
        }
        let status = std::fs::read_to_string(task.path().join("status")).unwrap();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap()
                .trim()
                .to_string()
        };
        let switches = field("voluntary_ctxt_switches:").parse().unwrap();
        return (switches, field("State:").starts_with('S'));
    }
    panic!("no fabric-switch thread");
}

fn switch_thread_wakeups() -> u64 {
    switch_thread().0
}

#[test]
fn an_idle_switch_does_not_wake_up() {
    let sw = switch();
    sw.add_network("n", NetworkConfig::default()).unwrap();
    let a = Dgram::new(sw.add_port("n", "a").unwrap().1);
    let b = Dgram::new(sw.add_port("n", "b").unwrap().1);
    a.send(&frame(Mac::BROADCAST, mac(1), 64, 1));
    b.expect();
    wait_until("the switch thread to sleep", || switch_thread().1);
    let before = switch_thread_wakeups();
    assert!(
        before > 0,
        "the switch thread should be found and have slept at least once"
    );
    // Long enough that any periodic timer (aging, polling) would have fired.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(switch_thread_wakeups(), before, "the idle switch thread woke up");
    a.send(&frame(Mac::BROADCAST, mac(1), 64, 2));
    b.expect();
    wait_until("a frame to wake the switch thread", || switch_thread_wakeups() > before);
}
