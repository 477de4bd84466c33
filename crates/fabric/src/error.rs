//! Errors of the data plane's control API. Each variant's message is what a user sees.

use std::io;

#[derive(Debug, thiserror::Error)]
pub enum FabricError {
    #[error("network {0:?} already exists")]
    NetworkExists(String),
    #[error("no network named {0:?}")]
    NoSuchNetwork(String),
    #[error("network {0:?} still has {1} port(s); remove them first")]
    NetworkBusy(String, usize),
    #[error("no port with id {0}")]
    NoSuchPort(u64),
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    #[error("socket path {0:?} is in use by a live listener")]
    PathInUse(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("the switch has stopped")]
    Stopped,
}

impl FabricError {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        FabricError::Io {
            context: context.into(),
            source,
        }
    }
}

pub type Result<T, E = FabricError> = std::result::Result<T, E>;
