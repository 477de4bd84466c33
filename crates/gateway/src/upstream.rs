//! Forwarding DNS queries to upstream resolvers.
//!
//! The query goes out byte for byte (EDNS and all) under a fresh random ID from a
//! fresh connected UDP socket, so the kernel only passes answers from the upstream's
//! address, and an answer counts only if its ID and question match. A truncated answer
//! is asked again over TCP. No answer in time from any upstream: SERVFAIL.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use hickory_proto::op::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use crate::config::Upstreams;

/// The upstream list, re-read from resolv.conf when the file changes.
pub struct UpstreamSet {
    source: Upstreams,
    cache: Mutex<(Option<SystemTime>, Instant, Vec<SocketAddr>)>,
}

/// `nameserver` lines of a resolv.conf.
pub fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.split_whitespace().next()?.parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

fn read_resolv(path: &Path) -> (Option<SystemTime>, Vec<SocketAddr>) {
    let mtime = std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let list = std::fs::read_to_string(path)
        .map(|t| parse_resolv_conf(&t))
        .unwrap_or_default();
    (mtime, list)
}

impl UpstreamSet {
    pub fn new(source: Upstreams) -> UpstreamSet {
        let initial = match &source {
            Upstreams::Static(v) => (None, v.clone()),
            Upstreams::ResolvConf(p) => read_resolv(p),
        };
        UpstreamSet {
            source,
            cache: Mutex::new((initial.0, Instant::now(), initial.1)),
        }
    }

    /// The current list; a resolv.conf is checked for changes at most once a second.
    pub fn current(&self) -> Vec<SocketAddr> {
        let mut c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Upstreams::ResolvConf(path) = &self.source {
            if c.1.elapsed() >= Duration::from_secs(1) {
                c.1 = Instant::now();
                let mtime = std::fs::metadata(path).and_then(|m| m.modified()).ok();
                if mtime != c.0 {
                    let (m, list) = read_resolv(&PathBuf::from(path));
                    c.0 = m;
                    c.2 = list;
                }
            }
        }
        c.2.clone()
    }
}

fn same_question(query: &[u8], answer: &[u8]) -> bool {
    match (Message::from_vec(query), Message::from_vec(answer)) {
        (Ok(q), Ok(a)) => q.queries == a.queries,
        _ => false,
    }
}

async fn over_udp(query: &[u8], upstream: SocketAddr, id: [u8; 2], deadline: tokio::time::Instant) -> Option<Vec<u8>> {
    let bind: SocketAddr = if upstream.is_ipv4() {
        "0.0.0.0:0".parse().ok()?
    } else {
        "[::]:0".parse().ok()?
    };
    let sock = UdpSocket::bind(bind).await.ok()?;
    sock.connect(upstream).await.ok()?;
    sock.send(query).await.ok()?;
    let mut buf = vec![0u8; 65535];
    loop {
        let n = tokio::time::timeout_at(deadline, sock.recv(&mut buf))
            .await
            .ok()?
            .ok()?;
        let answer = &buf[..n];
        // Anything else arriving on this port is not the answer: keep waiting.
        if n >= 12 && answer[..2] == id && answer[2] & 0x80 != 0 && same_question(query, answer) {
            return Some(answer.to_vec());
        }
    }
}

async fn over_tcp(query: &[u8], upstream: SocketAddr, id: [u8; 2], deadline: tokio::time::Instant) -> Option<Vec<u8>> {
    let work = async {
        let mut s = TcpStream::connect(upstream).await.ok()?;
        let mut out = (query.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(query);
        s.write_all(&out).await.ok()?;
        let mut len = [0u8; 2];
        s.read_exact(&mut len).await.ok()?;
        let mut answer = vec![0u8; u16::from_be_bytes(len) as usize];
        s.read_exact(&mut answer).await.ok()?;
        (answer.len() >= 12 && answer[..2] == id && same_question(query, &answer)).then_some(answer)
    };
    tokio::time::timeout_at(deadline, work).await.ok()?
}

/// Asks the upstreams in turn, sharing `timeout` between them. Returns the answer with
/// the client's own ID, or `None` when nobody answered.
pub async fn forward(query: &[u8], upstreams: &[SocketAddr], timeout: Duration) -> Option<Vec<u8>> {
    if query.len() < 12 || upstreams.is_empty() {
        return None;
    }
    let client_id = [query[0], query[1]];
    let id: [u8; 2] = rand::random::<u16>().to_be_bytes();
    let mut ours = query.to_vec();
    ours[..2].copy_from_slice(&id);
    let share = timeout / upstreams.len() as u32;
    for upstream in upstreams {
        let deadline = tokio::time::Instant::now() + share;
        let Some(mut answer) = over_udp(&ours, *upstream, id, deadline).await else {
            continue;
        };
        if answer[2] & 0x02 != 0 {
            // Truncated: the whole answer needs TCP.
            let tcp_deadline = tokio::time::Instant::now() + share;
            match over_tcp(&ours, *upstream, id, tcp_deadline).await {
                Some(full) => answer = full,
                None => continue,
            }
        }
        answer[..2].copy_from_slice(&client_id);
        return Some(answer);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_nameserver_lines() {
        let text = "# comment\nnameserver 10.0.0.2\nnameserver ::1\nsearch x\nnameserver bogus\n";
        let v = parse_resolv_conf(text);
        assert_eq!(v, vec!["10.0.0.2:53".parse().unwrap(), "[::1]:53".parse().unwrap()]);
    }
}
