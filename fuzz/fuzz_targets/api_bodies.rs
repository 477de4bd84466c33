//! Every JSON body the API takes, and the validation that follows deserialisation.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmfabric::control::choose_mac;
use vmfabric::model::{ForwardSpec, NetworkSpec, PolicySpec, PortSpec, ReservationSpec};

fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<NetworkSpec>(data);
    let _ = serde_json::from_slice::<ForwardSpec>(data);
    let _ = serde_json::from_slice::<ReservationSpec>(data);
    let _ = serde_json::from_slice::<vmfabric::control::vms::VmRequest>(data);
    if let Ok(p) = serde_json::from_slice::<PolicySpec>(data) {
        let _ = p.to_gateway();
    }
    if let Ok(p) = serde_json::from_slice::<PortSpec>(data) {
        let _ = choose_mac("n", &p.name, p.mac.as_deref(), p.learn_mac_once, |_| false);
    }
});
