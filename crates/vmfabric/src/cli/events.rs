//! `vmfabric events`: follows the daemon's event stream, one line an event.

use std::io::Write;

use anyhow::Result;
use vmfabric::model::{Event, EventView};

use super::table::client;
use super::ClientArgs;

pub(super) fn run(c: ClientArgs) -> Result<()> {
    let client = client(&c)?;
    let mut stdout = std::io::stdout().lock();
    if c.json {
        return client.events(&mut stdout);
    }
    let mut out = Lines {
        pending: Vec::new(),
        out: stdout,
    };
    client.events(&mut out)
}

/// Turns the stream's JSON lines into sentences as whole lines arrive.
struct Lines<W: Write> {
    pending: Vec<u8>,
    out: W,
}

impl<W: Write> Write for Lines<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.pending.extend_from_slice(buf);
        while let Some(end) = self.pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=end).collect();
            let text = match serde_json::from_slice::<EventView>(&line) {
                Ok(v) => format!("{}  {}", v.time, sentence(&v.event)),
                // An event this CLI does not know yet: shown as it came.
                Err(_) => String::from_utf8_lossy(&line).trim_end().to_string(),
            };
            writeln!(self.out, "{text}")?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

fn sentence(e: &Event) -> String {
    match e {
        Event::PortUp { network, port, peer } => match peer {
            Some(p) => format!("port {network}/{port} up ({p})"),
            None => format!("port {network}/{port} up"),
        },
        Event::PortDown { network, port, reason } => format!("port {network}/{port} down: {reason}"),
        Event::LeaseBound {
            network,
            ip,
            mac,
            hostname,
        } => match hostname {
            Some(h) => format!("lease {network} {ip} to {mac} ({h})"),
            None => format!("lease {network} {ip} to {mac}"),
        },
        Event::LeaseReleased { network, ip, mac } => format!("lease {network} {ip} released by {mac}"),
        Event::LeaseExpired { network, ip, mac } => format!("lease {network} {ip} of {mac} expired"),
        Event::Lease6Bound { network, ip, mac } => format!("DHCPv6 lease {network} {ip} to {mac}"),
        Event::Lease6Ended { network, ip, mac } => format!("DHCPv6 lease {network} {ip} of {mac} ended"),
        Event::MacMoved { network, mac, from, to } => format!("MAC {mac} moved on {network} from {from} to {to}"),
        Event::MacTableFull { network } => format!("MAC table of {network} is full"),
        Event::VmState {
            vm,
            network,
            state,
            ip,
            reason,
        } => {
            let mut s = format!("VM {vm} on {network} {state}");
            if let Some(ip) = ip {
                s.push_str(&format!(" at {ip}"));
            }
            if let Some(r) = reason {
                s.push_str(&format!(": {r}"));
            }
            s
        }
        Event::PolicyRefused { network, refused } => format!("egress policy of {network} refused {refused} packet(s)"),
        Event::Lagged { missed } => format!("({missed} events missed: this reader fell behind)"),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    #[test]
    fn lines_become_sentences_whole() {
        let mut l = super::Lines {
            pending: Vec::new(),
            out: Vec::new(),
        };
        let a = br#"{"time":"2026-12-02T15:00:00Z","type":"port_up","network":"n","port":"p"}"#;
        l.write_all(&a[..20]).unwrap();
        assert!(l.out.is_empty(), "half a line waits");
        l.write_all(&a[20..]).unwrap();
        l.write_all(b"\n{\"time\":\"t\",\"type\":\"future_thing\"}\n").unwrap();
        assert_eq!(
            String::from_utf8(l.out).unwrap(),
            "2026-12-02T15:00:00Z  port n/p up\n{\"time\":\"t\",\"type\":\"future_thing\"}\n"
        );
    }
}
