//! What vmfabric's guest image does at boot, told on its kernel command line: the
//! `VMF_*` settings its init reads (guest/init). Written here only.

use base64::Engine;

/// A guest's boot settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestCmdline {
    pub hostname: String,
    /// `dhcp`, or an address with its prefix (`10.0.0.5/24`).
    pub ip: String,
    /// Serve HTTP on port 80 (a page naming the guest).
    pub http: bool,
    /// A shell command to run once the network is up; without one the guest stays up.
    pub cmd: Option<String>,
    /// Stay up after `cmd` (the guest powers off after it otherwise).
    pub stay_up: bool,
}

impl GuestCmdline {
    /// A guest named `hostname` that takes its address from DHCP.
    pub fn dhcp(hostname: &str) -> GuestCmdline {
        GuestCmdline {
            hostname: hostname.to_string(),
            ip: "dhcp".into(),
            http: false,
            cmd: None,
            stay_up: false,
        }
    }

    /// The kernel command-line words.
    pub fn args(&self) -> Vec<String> {
        let mut v = vec![format!("VMF_HOSTNAME={}", self.hostname), format!("VMF_IP={}", self.ip)];
        if self.http {
            v.push("VMF_HTTP=1".into());
        }
        if let Some(cmd) = &self.cmd {
            // Base64: the kernel command line cannot carry quotes, pipes or semicolons.
            v.push(format!(
                "VMF_CMD={}",
                base64::engine::general_purpose::STANDARD.encode(cmd)
            ));
        }
        if self.cmd.is_none() || self.stay_up {
            v.push("VMF_END=hang".into());
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_is_base64_and_the_guest_stays_up_without_one() {
        let mut g = GuestCmdline::dhcp("vm0");
        assert_eq!(g.args(), ["VMF_HOSTNAME=vm0", "VMF_IP=dhcp", "VMF_END=hang"]);
        g.cmd = Some("echo 'a|b'; true".into());
        g.http = true;
        assert_eq!(
            g.args(),
            [
                "VMF_HOSTNAME=vm0",
                "VMF_IP=dhcp",
                "VMF_HTTP=1",
                "VMF_CMD=ZWNobyAnYXxiJzsgdHJ1ZQ=="
            ]
        );
        g.stay_up = true;
        assert_eq!(g.args().last().unwrap(), "VMF_END=hang");
    }
}
