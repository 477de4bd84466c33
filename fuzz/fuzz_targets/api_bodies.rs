//! Every JSON body the API takes, and the validation that follows deserialisation.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmfabric::daemon::{choose_mac, ForwardView, PolicyView, PortRequest, ReservationView};
use vmfabric::store::NetworkRecord;

fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<NetworkRecord>(data);
    let _ = serde_json::from_slice::<ForwardView>(data);
    let _ = serde_json::from_slice::<ReservationView>(data);
    let _ = serde_json::from_slice::<vmfabric::vms::VmRequest>(data);
    if let Ok(p) = serde_json::from_slice::<PolicyView>(data) {
        let _ = p.to_gateway();
    }
    if let Ok(p) = serde_json::from_slice::<PortRequest>(data) {
        let _ = choose_mac("n", &p.name, p.mac.as_deref(), p.learn_mac_once, |_| false);
    }
});
