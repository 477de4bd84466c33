//! `vmfabric vm`: run, ls, stop, logs.

use anyhow::Result;
use vmfabric::client::seg;

use super::table::{print_table, request};
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
            let mut v = request(&c, "POST", "/v1/vms", Some(serde_json::to_value(&body)?))?;
            let deadline = std::time::Instant::now() + Duration::from_secs(180);
            while wait
                && matches!(v["state"].as_str(), Some("starting" | "running"))
                && std::time::Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(200));
                v = request(&c, "GET", &format!("/v1/vms/{}", seg(&name)), None)?;
            }
            print_table(&c, &v, COLUMNS);
            if let Some(reason) = v["reason"].as_str() {
                eprintln!("{reason}");
            }
        }
        VmCmd::Ls { c } => print_table(&c, &request(&c, "GET", "/v1/vms", None)?, COLUMNS),
        VmCmd::Stop { name, c } => print_table(
            &c,
            &request(&c, "DELETE", &format!("/v1/vms/{}", seg(&name)), None)?,
            COLUMNS,
        ),
        VmCmd::Logs { name, c } => print!(
            "{}",
            request(&c, "GET", &format!("/v1/vms/{}/logs", seg(&name)), None)?
                .as_str()
                .unwrap_or_default()
        ),
    }
    Ok(())
}
