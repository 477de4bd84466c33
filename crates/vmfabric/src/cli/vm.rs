//! `vmfabric vm`: run, ls, stop, restart, pause, resume, logs.

use anyhow::Result;

use super::table::{client, print_one, print_table};
use std::time::Duration;

use vmfabric::control::vms::VmRequest;

use super::port::rand_suffix;
use super::VmCmd;

pub(super) fn run(cmd: VmCmd) -> Result<()> {
    const COLUMNS: &[&str] = &["name", "network", "state", "ip", "pid", "mac"];
    match cmd {
        VmCmd::Run {
            network,
            name,
            http,
            memory_mib,
            wait,
            c,
            cmd,
        } => {
            let name = name.unwrap_or_else(|| format!("vm-{:06x}", rand_suffix()));
            let command = (!cmd.is_empty()).then(|| cmd.join(" "));
            let body = VmRequest {
                name: name.clone(),
                network: network.clone(),
                cmd: command,
                http,
                memory_mib,
                cpus: 1,
            };
            let api = client(&c)?;
            let mut v = api.run_vm(&body)?;
            let deadline = std::time::Instant::now() + Duration::from_secs(180);
            while wait && matches!(v.state.as_str(), "starting" | "running") && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(200));
                v = api.vm(&name)?;
            }
            print_table(&c, &v, COLUMNS);
            if let Some(reason) = &v.reason {
                eprintln!("{reason}");
            }
        }
        VmCmd::Ls { c } => print_table(&c, &client(&c)?.vms()?, COLUMNS),
        VmCmd::Stop { name, c } => print_table(&c, &client(&c)?.stop_vm(&name)?, COLUMNS),
        VmCmd::Pause { name, c } => print_table(&c, &client(&c)?.pause_vm(&name, true)?, COLUMNS),
        VmCmd::Resume { name, c } => print_table(&c, &client(&c)?.pause_vm(&name, false)?, COLUMNS),
        VmCmd::Logs { name, follow, c } => {
            let api = client(&c)?;
            let logs = api.vm_logs(&name)?;
            if c.json {
                println!("{}", serde_json::json!({"name": name, "logs": logs}));
            } else {
                print!("{logs}");
            }
            if follow {
                follow_logs(&api, &name, logs.len())?;
            }
        }
        VmCmd::Inspect { name, c } => print_one(&c, &client(&c)?.inspect_vm(&name)?, describe)?,
        VmCmd::Restart { name, c } => {
            let api = client(&c)?;
            let v = api.restart_vm(&name)?;
            print_table(&c, &v, COLUMNS);
        }
    }
    Ok(())
}

/// Prints what the console adds after `seen` bytes, until the VM has ended (and its
/// last lines are out) or is gone.
fn follow_logs(api: &vmfabric::client::Client, name: &str, mut seen: usize) -> Result<()> {
    use std::io::Write;
    loop {
        let ended = match api.vm(name) {
            Ok(v) => matches!(v.state.as_str(), "stopped" | "failed"),
            Err(_) => true,
        };
        if let Ok(logs) = api.vm_logs(name) {
            // (A character cut in two last time may read differently now: then skip.)
            if let Some(new) = logs.get(seen..).filter(|n| !n.is_empty()) {
                print!("{new}");
                std::io::stdout().flush()?;
            }
            seen = seen.max(logs.len());
        }
        if ended {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// A VM, one fact a line, for `vm inspect`.
fn describe(v: &vmfabric::control::vms::VmInspect) -> String {
    let vm = &v.vm;
    let r = &v.request;
    let or_dash = |o: Option<String>| o.unwrap_or_else(|| "-".into());
    let mut lines = vec![
        ("name", vm.name.clone()),
        ("network", vm.network.clone()),
        ("state", vm.state.clone()),
        ("qemu says", or_dash(v.qmp_status.clone())),
        ("address", or_dash(vm.ip.map(|i| i.to_string()))),
        ("mac", vm.mac.to_string()),
        ("pid", or_dash(vm.pid.map(|p| p.to_string()))),
        ("memory", format!("{} MiB, {} vCPU", r.memory_mib, r.cpus)),
        ("command", or_dash(r.cmd.clone())),
        ("http", r.http.to_string()),
    ];
    if let Some(p) = &v.port_view {
        let up = if p.up { "up" } else { "down" };
        lines.push((
            "port",
            format!("{} ({:?}, {up}) at {}", p.record.name, p.record.kind, p.record.path),
        ));
    }
    if let Some(l) = &v.lease {
        lines.push(("lease", format!("{} until {}", l.ip, l.expires_at)));
    }
    if let Some(reason) = &vm.reason {
        lines.push(("reason", reason.clone()));
    }
    lines.push(("console", v.console.clone()));
    lines.push(("qemu log", v.qemu_log.clone()));
    lines
        .iter()
        .map(|(k, val)| format!("{:<10} {val}\n", format!("{k}:")))
        .collect()
}
