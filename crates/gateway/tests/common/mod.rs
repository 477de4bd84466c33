//! Set-up shared by the gateway's tests and benches.
#![allow(dead_code)]

use fabric::{NetworkConfig, Switch, SwitchConfig};
use gateway::{Gateway, GatewayConfig, MemoryLeaseStore, Upstreams};

/// A switch with one network and its gateway, served by a one-thread runtime.
/// Fields drop in order: the gateway first, the runtime last.
pub struct Lab {
    pub gw: Gateway,
    pub sw: Switch,
    pub rt: tokio::runtime::Runtime,
}

/// `tune` adjusts the gateway's configuration; upstreams default to none, so nothing
/// is ever forwarded outside the test.
pub fn lab(network: &str, subnet: &str, tune: impl FnOnce(&mut GatewayConfig)) -> Lab {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let sw = Switch::start(SwitchConfig::default()).unwrap();
    sw.add_network(network, NetworkConfig::default()).unwrap();
    let mut cfg = GatewayConfig::new(network, subnet.parse().unwrap());
    cfg.upstreams = Upstreams::Static(vec![]);
    tune(&mut cfg);
    let gw = Gateway::attach(rt.handle(), &sw, network, cfg, Box::new(MemoryLeaseStore::default())).unwrap();
    Lab { gw, sw, rt }
}
