//! Control-plane logic that joins what the layers report.

pub mod locks;
