//! The daemon's TOML config file.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(cfg) = vmfabric::config::parse(text) {
            let _ = cfg.default_network();
        }
    }
});
