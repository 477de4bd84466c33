//! Checksum benchmark: the data plane's one's-complement sum (every byte a tunnel
//! carries is summed once when cut and once when verified) against etherparse 0.21's
//! `Sum16BitWords`, side by side in one run, on the same buffers (in cache: the sum
//! follows a copy that brought them there). Both give the checksum field's value.
//!
//! Run: `cargo bench -p fabric --bench checksum` (BENCH_SECS sets seconds per cell).

use std::hint::black_box;
use std::time::{Duration, Instant};

/// Bytes summed per second by `sum` over `data`, for `secs` seconds.
fn rate(data: &[u8], secs: f64, sum: fn(&[u8]) -> u16) -> f64 {
    let deadline = Duration::from_secs_f64(secs);
    let start = Instant::now();
    let mut bytes = 0usize;
    while start.elapsed() < deadline {
        for _ in 0..64 {
            black_box(sum(black_box(data)));
        }
        bytes += 64 * data.len();
    }
    bytes as f64 / start.elapsed().as_secs_f64()
}

fn theirs(bytes: &[u8]) -> u16 {
    // It sums in the machine's byte order and leaves the swap to the caller, as
    // etherparse's own headers do.
    etherparse::checksum::Sum16BitWords::new()
        .add_slice(bytes)
        .ones_complement()
        .to_be()
}

fn ours(bytes: &[u8]) -> u16 {
    !fabric::offload::ones_complement_sum(bytes)
}

fn main() {
    // `cargo test --benches` runs this with no time to spare; only `cargo bench` measures.
    if !std::env::args().any(|a| a == "--bench") {
        println!("checksum bench: run it with `cargo bench -p fabric --bench checksum`");
        return;
    }
    let secs: f64 = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    let data: Vec<u8> = (0..65536u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
        .collect();
    println!("## One's-complement sum: GB/s, {secs} s per cell\n");
    println!("| bytes | etherparse 0.21 | vmfabric | vmfabric/etherparse |");
    println!("|---:|---:|---:|---:|");
    for len in [64usize, 1400, 9000, 65536] {
        let buf = &data[..len];
        assert_eq!(ours(buf), theirs(buf), "the two checksums differ at {len} bytes");
        let theirs = rate(buf, secs, theirs);
        let ours = rate(buf, secs, ours);
        println!(
            "| {len} | {:.1} | {:.1} | {:.2}x |",
            theirs / 1e9,
            ours / 1e9,
            ours / theirs
        );
    }
}
