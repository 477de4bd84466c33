//! Control-plane logic that joins what the layers report.

pub mod error;
pub mod locks;
