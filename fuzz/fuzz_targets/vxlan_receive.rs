//! What a VTEP does with datagrams from the underlay (remote bytes): VXLAN headers
//! read, and a turn's frames merged back into TCP segments, never panic; every merged
//! segment cuts back into frames of the size its run came in.
#![no_main]

use fabric::offload::{SoftFrames, TcpCoalescer};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Datagrams: a two-byte length, then that many bytes.
    let mut coalescer = TcpCoalescer::default();
    let mut rest = data;
    while let Some((len, tail)) = rest.split_first_chunk::<2>() {
        let len = usize::from(u16::from_be_bytes(*len)).min(tail.len());
        let (datagram, tail) = tail.split_at(len);
        rest = tail;
        if let Ok((_, frame)) = fabric::vxlan::decapsulate(datagram) {
            coalescer.push(frame);
        }
    }
    let mut soft = SoftFrames::default();
    for (frame, offload) in coalescer.finish().drain(..) {
        if let Some(gso) = offload.gso {
            soft.clear();
            assert!(soft.push(&frame, &offload).is_ok(), "a merged segment does not cut");
            for seg in soft.frames() {
                assert!(seg.len() <= frame.len(), "a cut segment is longer than the whole");
            }
            assert!(gso.size > 0);
        }
    }
});
