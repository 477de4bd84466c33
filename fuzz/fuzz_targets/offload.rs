//! What a port's virtio-net header may claim about its frame (a TAP, later a guest's
//! vhost-user queue): the check and the software segmentation after it never panic,
//! and what comes out of a frame that passed the check fits the MTU.
#![no_main]

use fabric::offload::{Offload, SoftFrames, VNET_HDR_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((hdr, frame)) = data.split_at_checked(VNET_HDR_LEN) else {
        return;
    };
    let Ok(off) = Offload::from_vnet_hdr(hdr) else {
        return;
    };
    let mut soft = SoftFrames::default();
    let checked = off.check(frame, 1500).is_ok();
    let made = soft.push(frame, &off).is_ok();
    if checked && made && off.gso.is_some() {
        for seg in soft.frames() {
            assert!(seg.len() <= 1500 + 14 + 8, "a segment of {} bytes", seg.len());
        }
    }
});
