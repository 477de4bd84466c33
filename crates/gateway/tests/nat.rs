//! TCP and ICMP through the gateway with real sockets: a "guest" network namespace on a TAP port
//! reaches servers on host loopback (through the host-access address) and in an
//! "outside" namespace (through NAT), moves 200 MiB each way intact, half-closes in
//! each direction, holds 200 connections at once, is refused quickly by a closed port
//! and by the egress policy; a TCP forward brings host clients to a guest server until
//! it is removed; pings reach the host and the outside, and not link-local. Needs root
//! and /dev/net/tun.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use fabric::TapSource;
use gateway::forward::Protocol;
use gateway::TcpEngine;
use sha2::{Digest, Sha256};
use testkit::{run as sh, spawn_in_ns as in_ns};

struct Cleanup {
    namespaces: Vec<String>,
    links: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        for l in &self.links {
            let _ = Command::new("ip").args(["link", "del", l]).status();
        }
    }
}

/// A deterministic byte stream: `len` bytes from a simple generator seeded by `seed`.
fn pattern(seed: u64, len: usize) -> impl Iterator<Item = Vec<u8>> {
    let mut state = seed;
    let mut left = len;
    std::iter::from_fn(move || {
        if left == 0 {
            return None;
        }
        let n = left.min(64 * 1024);
        left -= n;
        let mut chunk = vec![0u8; n];
        for b in chunk.chunks_mut(8) {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let bytes = state.to_le_bytes();
            b.copy_from_slice(&bytes[..b.len()]);
        }
        Some(chunk)
    })
}

fn sha_of(seed: u64, len: usize) -> Vec<u8> {
    let mut h = Sha256::new();
    for c in pattern(seed, len) {
        h.update(&c);
    }
    h.finalize().to_vec()
}

/// Sends the pattern and reads the peer's bytes at once; returns the SHA-256 of what came.
fn exchange(s: TcpStream, seed: u64, len: usize) -> (Vec<u8>, usize) {
    let mut writer = s.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        for c in pattern(seed, len) {
            writer.write_all(&c).unwrap();
        }
        writer.shutdown(Shutdown::Write).unwrap();
    });
    let mut reader = s;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0;
    loop {
        let n = reader.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        total += n;
        h.update(&buf[..n]);
    }
    sender.join().unwrap();
    (h.finalize().to_vec(), total)
}

struct Lab {
    lab: common::Lab,
    id: u32,
    guest_ns: String,
    _cleanup: Cleanup,
}

fn lab(engine: TcpEngine) -> Option<Lab> {
    let ready = testkit::is_root() && std::path::Path::new("/dev/net/tun").exists();
    if !testkit::ready_or_skip(ready, "needs root and /dev/net/tun") {
        return None;
    }
    // Tests run side by side: each lab gets its own names.
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let id = std::process::id() % 100_000 * 10 + NEXT.fetch_add(1, Ordering::Relaxed) as u32;
    let guest_ns = format!("tg{id}");
    let lab = common::lab("tcp", "10.95.0.0/24", |cfg| {
        cfg.host_access = Some(cfg.default_host_access());
        cfg.tcp_engine = engine;
    });
    let cleanup = Cleanup {
        namespaces: vec![guest_ns.clone()],
        links: vec![],
    };
    sh(&["ip", "netns", "add", &guest_ns]);
    let (_, tap) = lab
        .sw
        .add_tap_port("tcp", "guest", TapSource::Name(format!("tt{id}")))
        .unwrap();
    sh(&["ip", "link", "set", &tap, "netns", &guest_ns]);
    sh(&["ip", "-n", &guest_ns, "addr", "add", "10.95.0.10/24", "dev", &tap]);
    sh(&["ip", "-n", &guest_ns, "link", "set", &tap, "up"]);
    sh(&["ip", "-n", &guest_ns, "link", "set", "lo", "up"]);
    sh(&["ip", "-n", &guest_ns, "route", "add", "default", "via", "10.95.0.1"]);
    Some(Lab {
        lab,
        id,
        guest_ns,
        _cleanup: cleanup,
    })
}

/// A tiny HTTP server on `listener`: answers every request with `body`.
fn http_server(listener: TcpListener, body: &'static str) {
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = write!(
                    s,
                    "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nContent-Type: text/plain\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
}

#[test]
fn guest_tcp_reaches_the_host_and_the_outside_with_flow_control_and_half_close() {
    guest_tcp_reaches_the_host_and_the_outside_with_flow_control_and_half_close_on(TcpEngine::Stack);
}

#[test]
fn guest_tcp_reaches_the_host_and_the_outside_with_flow_control_and_half_close_spliced() {
    guest_tcp_reaches_the_host_and_the_outside_with_flow_control_and_half_close_on(TcpEngine::Splice);
}

fn guest_tcp_reaches_the_host_and_the_outside_with_flow_control_and_half_close_on(engine: TcpEngine) {
    let Some(l) = lab(engine) else { return };
    let gw = &l.lab.gw;

    eprintln!("step 1");
    // 1. wget from the guest to a web server on host loopback, via the host-access address.
    let web = TcpListener::bind("127.0.0.1:0").unwrap();
    let web_port = web.local_addr().unwrap().port();
    http_server(web, "hello from the host\n");
    let url = format!("http://10.95.0.254:{web_port}/");
    let page = sh(&[
        "ip",
        "netns",
        "exec",
        &l.guest_ns,
        "busybox",
        "wget",
        "-q",
        "-O",
        "-",
        &url,
    ]);
    assert_eq!(page, "hello from the host\n");
    // The gateway's own address never leads to the host's loopback.
    let gw_url = format!("http://10.95.0.1:{web_port}/");
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &l.guest_ns,
            "busybox",
            "wget",
            "-q",
            "-T",
            "3",
            "-O",
            "-",
            &gw_url,
        ])
        .output()
        .unwrap();
    assert!(!out.status.success(), "the gateway address reached the host");

    eprintln!("step 2");
    // 2. 200 MiB each way at once, checked by SHA-256 on both ends.
    const BIG: usize = 200 << 20;
    let bulk = TcpListener::bind("127.0.0.1:0").unwrap();
    let bulk_port = bulk.local_addr().unwrap().port();
    let host_side = std::thread::spawn(move || {
        let (s, _) = bulk.accept().unwrap();
        exchange(s, 2, BIG)
    });
    let guest_side = in_ns(&l.guest_ns, move || {
        let s = TcpStream::connect(("10.95.0.254", bulk_port)).unwrap();
        exchange(s, 1, BIG)
    });
    let (host_got, host_n) = host_side.join().unwrap();
    let (guest_got, guest_n) = guest_side.join().unwrap();
    assert_eq!((host_n, guest_n), (BIG, BIG));
    assert_eq!(host_got, sha_of(1, BIG), "guest -> host bytes differ");
    assert_eq!(guest_got, sha_of(2, BIG), "host -> guest bytes differ");
    assert!(gw.counters().get("nat_tcp_tx_bytes").unwrap() >= BIG as u64);
    assert!(gw.counters().get("nat_tcp_rx_bytes").unwrap() >= BIG as u64);

    eprintln!("step 3");
    // 3. Half-close, guest first: the guest sends and shuts its side; the host reads to
    // the end, then answers on the still-open other half.
    let hc = TcpListener::bind("127.0.0.1:0").unwrap();
    let hc_port = hc.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for _ in 0..2 {
            let (mut s, _) = hc.accept().unwrap();
            let mut first = [0u8; 1];
            s.read_exact(&mut first).unwrap();
            if first[0] == b'G' {
                let mut rest = Vec::new();
                s.read_to_end(&mut rest).unwrap();
                write!(s, "got {} bytes after your FIN", rest.len() + 1).unwrap();
            } else {
                // Host first: it shuts its side, then still reads what the guest sends.
                s.write_all(b"host done").unwrap();
                s.shutdown(Shutdown::Write).unwrap();
                let mut rest = Vec::new();
                s.read_to_end(&mut rest).unwrap();
                assert_eq!(rest, b"guest still talking");
            }
        }
    });
    let guest_first = in_ns(&l.guest_ns, move || {
        let mut s = TcpStream::connect(("10.95.0.254", hc_port)).unwrap();
        s.write_all(b"Gxxxxxxxxx").unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        answer
    });
    assert_eq!(guest_first.join().unwrap(), "got 10 bytes after your FIN");
    let host_first = in_ns(&l.guest_ns, move || {
        let mut s = TcpStream::connect(("10.95.0.254", hc_port)).unwrap();
        s.write_all(b"H").unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        // The host's FIN arrived; this side can still send.
        s.write_all(b"guest still talking").unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        answer
    });
    assert_eq!(host_first.join().unwrap(), "host done");

    eprintln!("step 4");
    // 4. 200 connections open at once.
    const MANY: usize = 200;
    let echo = TcpListener::bind("127.0.0.1:0").unwrap();
    let echo_port = echo.local_addr().unwrap().port();
    let open_now = Arc::new(AtomicUsize::new(0));
    let most_open = Arc::new(AtomicUsize::new(0));
    {
        let (open_now, most_open) = (open_now.clone(), most_open.clone());
        std::thread::spawn(move || {
            for s in echo.incoming() {
                let Ok(mut s) = s else { continue };
                let (open_now, most_open) = (open_now.clone(), most_open.clone());
                std::thread::spawn(move || {
                    let n = open_now.fetch_add(1, Ordering::SeqCst) + 1;
                    most_open.fetch_max(n, Ordering::SeqCst);
                    let mut buf = [0u8; 64];
                    while let Ok(k) = s.read(&mut buf) {
                        if k == 0 || s.write_all(&buf[..k]).is_err() {
                            break;
                        }
                    }
                    open_now.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
    }
    let all_open = Arc::new(Barrier::new(MANY));
    let clients: Vec<_> = (0..MANY)
        .map(|i| {
            let all_open = all_open.clone();
            in_ns(&l.guest_ns, move || {
                let mut s = TcpStream::connect(("10.95.0.254", echo_port)).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                let msg = format!("client {i}");
                s.write_all(msg.as_bytes()).unwrap();
                let mut back = vec![0u8; msg.len()];
                s.read_exact(&mut back).unwrap();
                assert_eq!(back, msg.as_bytes());
                all_open.wait();
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    assert_eq!(
        most_open.load(Ordering::SeqCst),
        MANY,
        "all connections were open at once"
    );
    // Every state is cleaned up once the connections end.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !gw.tcp_flows().is_empty() {
        assert!(Instant::now() < deadline, "flows left: {:?}", gw.tcp_flows());
        std::thread::sleep(Duration::from_millis(100));
    }

    eprintln!("step 5");
    // 5. A closed port refuses, and the refusal reaches the guest as a reset.
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_port = closed.local_addr().unwrap().port();
    drop(closed);
    let refused = in_ns(&l.guest_ns, move || {
        TcpStream::connect_timeout(
            &SocketAddr::from(([10, 95, 0, 254], closed_port)),
            Duration::from_secs(20),
        )
        .map(|_| ())
        .map_err(|e| e.kind())
    });
    assert_eq!(refused.join().unwrap(), Err(std::io::ErrorKind::ConnectionRefused));
    assert!(gw.counters().get("nat_tcp_refused").unwrap() >= 1);

    eprintln!("step 6");
    // 6. The policy refuses cloud metadata with a reset, counted.
    let denied_before = gw.counters().get("egress_denied").unwrap();
    let metadata = in_ns(&l.guest_ns, || {
        TcpStream::connect_timeout(&SocketAddr::from(([169, 254, 169, 254], 80)), Duration::from_secs(20))
            .map(|_| ())
            .map_err(|e| e.kind())
    });
    assert_eq!(metadata.join().unwrap(), Err(std::io::ErrorKind::ConnectionRefused));
    assert_eq!(gw.counters().get("egress_denied").unwrap(), denied_before + 1);

    eprintln!("step 7");
    // 7. A guest's reset reaches the host as a reset.
    let rst = TcpListener::bind("127.0.0.1:0").unwrap();
    let rst_port = rst.local_addr().unwrap().port();
    let host_sees = std::thread::spawn(move || {
        let (mut s, _) = rst.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut buf = [0u8; 16];
        let _ = s.read(&mut buf);
        s.read(&mut buf).map_err(|e| e.kind())
    });
    in_ns(&l.guest_ns, move || {
        let mut s = TcpStream::connect(("10.95.0.254", rst_port)).unwrap();
        s.write_all(b"x").unwrap();
        rustix::net::sockopt::set_socket_linger(&s, Some(Duration::ZERO)).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        drop(s);
    })
    .join()
    .unwrap();
    assert_eq!(host_sees.join().unwrap(), Err(std::io::ErrorKind::ConnectionReset));
}

#[test]
fn guest_tcp_and_pings_reach_an_outside_namespace_through_nat() {
    guest_tcp_and_pings_reach_an_outside_namespace_through_nat_on(TcpEngine::Stack);
}

#[test]
fn guest_tcp_and_pings_reach_an_outside_namespace_through_nat_spliced() {
    guest_tcp_and_pings_reach_an_outside_namespace_through_nat_on(TcpEngine::Splice);
}

fn guest_tcp_and_pings_reach_an_outside_namespace_through_nat_on(engine: TcpEngine) {
    let Some(l) = lab(engine) else { return };
    let id = l.id;
    let outside = format!("to{id}");
    let (host_end, far_end) = (format!("th{id}"), format!("tf{id}"));
    let _more = Cleanup {
        namespaces: vec![outside.clone()],
        links: vec![host_end.clone()],
    };
    sh(&["ip", "netns", "add", &outside]);
    sh(&["ip", "link", "add", &host_end, "type", "veth", "peer", "name", &far_end]);
    sh(&["ip", "link", "set", &far_end, "netns", &outside]);
    sh(&["ip", "addr", "add", "10.204.0.1/30", "dev", &host_end]);
    sh(&["ip", "link", "set", &host_end, "up"]);
    sh(&["ip", "-n", &outside, "addr", "add", "10.204.0.2/30", "dev", &far_end]);
    sh(&["ip", "-n", &outside, "link", "set", &far_end, "up"]);
    let web = in_ns(&outside, || TcpListener::bind("10.204.0.2:8080").unwrap())
        .join()
        .unwrap();
    http_server(web, "hello from outside\n");
    let page = sh(&[
        "ip",
        "netns",
        "exec",
        &l.guest_ns,
        "busybox",
        "wget",
        "-q",
        "-O",
        "-",
        "http://10.204.0.2:8080/",
    ]);
    assert_eq!(page, "hello from outside\n");
    // The host's own address on that link is refused by the built-in policy.
    let host_addr = in_ns(&l.guest_ns, || {
        TcpStream::connect_timeout(&SocketAddr::from(([10, 204, 0, 1], 22)), Duration::from_secs(20))
            .map(|_| ())
            .map_err(|e| e.kind())
    });
    assert_eq!(host_addr.join().unwrap(), Err(std::io::ErrorKind::ConnectionRefused));

    // Pings: to the outside through NAT, to the host through the host-access address,
    // and not to link-local (refused, counted).
    let ping = |dst: &str| {
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &l.guest_ns,
                "busybox",
                "ping",
                "-c",
                "2",
                "-W",
                "3",
                dst,
            ])
            .output()
            .unwrap()
    };
    let out = ping("10.204.0.2");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(String::from_utf8_lossy(&out.stdout).contains("2 packets received"));
    let out = ping("10.95.0.254");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let c = l.lab.gw.counters();
    assert!(c.get("nat_icmp_replies").unwrap() >= 4, "{:?}", c.snapshot());
    let denied = c.get("egress_denied").unwrap();
    assert!(!ping("169.254.169.254").status.success());
    assert!(c.get("egress_denied").unwrap() > denied);
}

#[test]
fn a_tcp_forward_brings_host_clients_to_a_guest_server_until_removed() {
    a_tcp_forward_brings_host_clients_to_a_guest_server_until_removed_on(TcpEngine::Stack);
}

#[test]
fn a_tcp_forward_brings_host_clients_to_a_guest_server_until_removed_spliced() {
    a_tcp_forward_brings_host_clients_to_a_guest_server_until_removed_on(TcpEngine::Splice);
}

fn a_tcp_forward_brings_host_clients_to_a_guest_server_until_removed_on(engine: TcpEngine) {
    let Some(l) = lab(engine) else { return };
    let web = in_ns(&l.guest_ns, || TcpListener::bind("10.95.0.10:8080").unwrap())
        .join()
        .unwrap();
    // The guest server reports the address it sees its client at.
    std::thread::spawn(move || {
        for s in web.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let peer = s.peer_addr().unwrap();
                let mut req = [0u8; 5];
                if s.read_exact(&mut req).is_ok() {
                    let _ = write!(s, "{} from {}", String::from_utf8_lossy(&req), peer.ip());
                }
            });
        }
    });
    let fw = l
        .lab
        .gw
        .add_forward(
            Protocol::Tcp,
            "127.0.0.1:0".parse().unwrap(),
            "10.95.0.10:8080".parse().unwrap(),
        )
        .unwrap();
    let ask = |msg: &str| -> std::io::Result<String> {
        let mut s = TcpStream::connect_timeout(&fw.host, Duration::from_secs(10))?;
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        s.write_all(msg.as_bytes())?;
        let mut answer = String::new();
        s.read_to_string(&mut answer)?;
        Ok(answer)
    };
    // Several clients at once, each with its own connection to the guest.
    let answers: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|i| scope.spawn(move || ask(&format!("hi-{i:02}"))))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap().unwrap()).collect()
    });
    for (i, a) in answers.iter().enumerate() {
        assert_eq!(a, &format!("hi-{i:02} from 10.95.0.1"), "the guest sees the gateway");
    }
    assert!(l.lab.gw.remove_forward(fw.id));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match TcpStream::connect(fw.host) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break,
            // Accepted by the kernel a moment before the listener closed: reset with
            // it. Not gone yet; ask again.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("unexpected {e}"),
            Ok(_) => {}
        }
        assert!(Instant::now() < deadline, "the listener stays open after removal");
        std::thread::sleep(Duration::from_millis(50));
    }
}
