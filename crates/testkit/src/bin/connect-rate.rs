//! connect-rate: sequential TCP connect+close pairs per second, the benchmarks' load for a
//! relay's connection setup (bench-nat.sh). Native, so that the figure measures the relay
//! and not an interpreter sharing its cores.
//!
//! `connect-rate serve ADDR` accepts and closes at once; `connect-rate ADDR COUNT` opens
//! and closes COUNT connections one after another and prints connections per second and
//! the p50/p99 of one connect in microseconds.
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [serve, addr] if serve == "serve" => serve_forever(parse(addr)),
        [addr, count] => measure(parse(addr), count.parse().expect("COUNT: a number")),
        _ => {
            eprintln!("usage: connect-rate serve ADDR | connect-rate ADDR COUNT");
            std::process::exit(2);
        }
    }
}

fn parse(addr: &str) -> SocketAddr {
    addr.parse().expect("ADDR: ip:port")
}

fn serve_forever(addr: SocketAddr) {
    let listener = TcpListener::bind(addr).expect("bind");
    for conn in listener.incoming().flatten() {
        drop(conn);
    }
}

fn measure(addr: SocketAddr, count: usize) {
    let mut connects = Vec::with_capacity(count);
    let start = Instant::now();
    for _ in 0..count {
        let t = Instant::now();
        let stream = TcpStream::connect(addr).expect("connect");
        connects.push(t.elapsed().as_micros());
        drop(stream);
    }
    let secs = start.elapsed().as_secs_f64();
    connects.sort_unstable();
    let at = |q: f64| connects[((connects.len() - 1) as f64 * q) as usize];
    println!("{:.0} {} {}", count as f64 / secs, at(0.5), at(0.99));
}
