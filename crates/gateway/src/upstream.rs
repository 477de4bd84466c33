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
    cache: Mutex<Cache>,
}

struct Cache {
    source: Upstreams,
    mtime: Option<SystemTime>,
    checked: Instant,
    list: Vec<SocketAddr>,
}

impl Cache {
    fn of(source: Upstreams) -> Cache {
        let (mtime, list) = match &source {
            Upstreams::Static(v) => (None, v.clone()),
            Upstreams::ResolvConf(p) => read_resolv(p),
        };
        Cache {
            source,
            mtime,
            checked: Instant::now(),
            list,
        }
    }
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
        UpstreamSet {
            cache: Mutex::new(Cache::of(source)),
        }
    }

    /// Takes a new source (the network's settings changed); the same source keeps its
    /// cache.
    pub fn set_source(&self, source: Upstreams) {
        let mut c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if c.source != source {
            *c = Cache::of(source);
        }
    }

    /// The current list; a resolv.conf is checked for changes at most once a second.
    pub fn current(&self) -> Vec<SocketAddr> {
        let mut c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Upstreams::ResolvConf(path) = &c.source {
            if c.checked.elapsed() >= Duration::from_secs(1) {
                let path = PathBuf::from(path);
                c.checked = Instant::now();
                let mtime = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
                if mtime != c.mtime {
                    (c.mtime, c.list) = read_resolv(&path);
                }
            }
        }
        c.list.clone()
    }
}

/// The servers for a query of `qname` (lowercase): those of the forwarder with the
/// longest domain that holds it, else `default`.
pub fn servers_for(
    forwarders: &[crate::config::Forwarder],
    qname: &hickory_proto::rr::Name,
    default: Vec<SocketAddr>,
) -> Vec<SocketAddr> {
    forwarders
        .iter()
        .filter_map(|f| {
            let d = hickory_proto::rr::Name::from_utf8(&f.domain).ok()?.to_lowercase();
            d.zone_of(qname).then_some((d.num_labels(), &f.servers))
        })
        .max_by_key(|(labels, _)| *labels)
        .map(|(_, servers)| servers.clone())
        .unwrap_or(default)
}

/// Whether `answer`, from an upstream, answers `query` sent under `id`: the ID, the
/// response bit, and the very question (an off-path forgery must guess all three).
pub fn is_answer_to(query: &[u8], answer: &[u8], id: [u8; 2]) -> bool {
    answer.len() >= 12 && answer[..2] == id && answer[2] & 0x80 != 0 && same_question(query, answer)
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
    if !crate::fd_budget::admits(&sock) {
        return None;
    }
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
        if is_answer_to(query, answer, id) {
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
        is_answer_to(query, &answer, id).then_some(answer)
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
    use hickory_proto::op::{Message, Query};
    use hickory_proto::rr::{Name, RecordType};
    use tokio::net::TcpListener;

    #[test]
    fn reads_nameserver_lines() {
        let text = "# comment\nnameserver 10.0.0.2\nnameserver ::1\nsearch x\nnameserver bogus\n";
        let v = parse_resolv_conf(text);
        assert_eq!(v, vec!["10.0.0.2:53".parse().unwrap(), "[::1]:53".parse().unwrap()]);
    }

    #[test]
    fn resolv_conf_changes_are_picked_up() {
        let path = std::env::temp_dir().join(format!("resolv-{}.conf", std::process::id()));
        std::fs::write(&path, "nameserver 10.0.0.2\n").unwrap();
        let set = UpstreamSet::new(Upstreams::ResolvConf(path.clone()));
        assert_eq!(set.current(), vec!["10.0.0.2:53".parse().unwrap()]);
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut n = 0u32;
        loop {
            // Rewritten until the mtime visibly moves and the once-a-second check runs.
            n += 1;
            std::fs::write(&path, format!("nameserver 10.0.0.{}\n", 2 + n % 200)).unwrap();
            let now = set.current();
            if now != vec!["10.0.0.2:53".parse().unwrap()] {
                assert_eq!(now.len(), 1);
                break;
            }
            assert!(Instant::now() < deadline, "the change was never seen");
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = std::fs::remove_file(path);
    }

    fn query(id: u16) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = id;
        m.add_query(Query::query(Name::from_utf8("example.test.").unwrap(), RecordType::A));
        m.to_vec().unwrap()
    }

    /// An answer to `q` with `id`, optionally truncated.
    fn answer_to(q: &[u8], id: [u8; 2], truncated: bool) -> Vec<u8> {
        let mut a = q.to_vec();
        a[..2].copy_from_slice(&id);
        a[2] |= 0x80;
        if truncated {
            a[2] |= 0x02;
        }
        a
    }

    #[tokio::test]
    async fn answers_come_back_under_the_client_id_and_forgeries_are_ignored() {
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = server.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            let (n, from) = server.recv_from(&mut buf).await.unwrap();
            let q = &buf[..n];
            // A forgery with the wrong ID first, then the real answer.
            server
                .send_to(&answer_to(q, [q[0] ^ 1, q[1]], false), from)
                .await
                .unwrap();
            server.send_to(&answer_to(q, [q[0], q[1]], false), from).await.unwrap();
        });
        let q = query(0x1234);
        let a = forward(&q, &[addr], Duration::from_secs(5)).await.expect("an answer");
        assert_eq!(&a[..2], &[0x12, 0x34], "the client's own ID");
        assert!(a[2] & 0x80 != 0);
    }

    #[tokio::test]
    async fn an_ipv6_upstream_is_asked_over_ipv6() {
        let Ok(server) = UdpSocket::bind("[::1]:0").await else {
            eprintln!("SKIP: no IPv6 loopback here");
            return;
        };
        let addr = server.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            let (n, from) = server.recv_from(&mut buf).await.unwrap();
            let q = &buf[..n];
            server.send_to(&answer_to(q, [q[0], q[1]], false), from).await.unwrap();
        });
        let a = forward(&query(0x4321), &[addr], Duration::from_secs(5))
            .await
            .expect("an answer over IPv6");
        assert_eq!(&a[..2], &[0x43, 0x21]);
    }

    #[tokio::test]
    async fn a_truncated_answer_is_asked_again_over_tcp() {
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = udp.local_addr().unwrap();
        let tcp = TcpListener::bind(addr).await.unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            let (n, from) = udp.recv_from(&mut buf).await.unwrap();
            udp.send_to(&answer_to(&buf[..n], [buf[0], buf[1]], true), from)
                .await
                .unwrap();
        });
        tokio::spawn(async move {
            let (mut s, _) = tcp.accept().await.unwrap();
            let mut len = [0u8; 2];
            s.read_exact(&mut len).await.unwrap();
            let mut q = vec![0u8; u16::from_be_bytes(len) as usize];
            s.read_exact(&mut q).await.unwrap();
            let full = answer_to(&q, [q[0], q[1]], false);
            let mut out = (full.len() as u16).to_be_bytes().to_vec();
            out.extend(full);
            s.write_all(&out).await.unwrap();
        });
        let a = forward(&query(7), &[addr], Duration::from_secs(5))
            .await
            .expect("an answer over TCP");
        assert_eq!(a[2] & 0x02, 0, "the TCP answer is whole");
    }

    #[tokio::test]
    async fn silence_ends_in_none_within_the_timeout() {
        let mute = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = mute.local_addr().unwrap();
        assert!(forward(&query(1), &[addr], Duration::from_millis(300)).await.is_none());
        drop(mute);
    }
}
