//! vmfabric's control plane: what ties the data plane, the gateways and (later) the
//! API and the store together. The binary in `main.rs` is its command line.
#![forbid(unsafe_code)]

pub mod api;
pub mod client;
pub mod cluster;
pub mod config;
pub mod control;
pub mod fdpass;
pub mod hostroutes;
pub mod kernel;
pub mod model;
pub mod store;
