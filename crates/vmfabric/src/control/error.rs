//! What a control-plane operation can fail with. Which HTTP status each case gets is
//! decided in one place, `api/error.rs`; here the cases only say what happened.

use crate::model::Invalid;
use crate::store::DbError;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The request itself is wrong (a bad name, an option the mode does not take).
    #[error(transparent)]
    Invalid(#[from] Invalid),
    #[error("no network named {0:?}")]
    NoNetwork(String),
    #[error("no port {port:?} on {network:?}")]
    NoPort { network: String, port: String },
    /// Another lookup found nothing (a reservation, a forward, a VM).
    #[error("{0}")]
    NotFound(String),
    /// The request clashes with what exists (a duplicate, an address in use).
    #[error("{0}")]
    Conflict(String),
    #[error("kernel mode: {0}")]
    Kernel(#[from] hostnet::HostnetError),
    #[error(transparent)]
    Fabric(#[from] fabric::FabricError),
    #[error(transparent)]
    Store(#[from] DbError),
    /// A bound is reached (too many captures, say): retry later.
    #[error("{0}")]
    Busy(String),
    /// The host failed us (a thread, a directory, a system call).
    #[error("{0}")]
    Host(String),
}

impl ControlError {
    pub fn invalid(msg: impl Into<String>) -> ControlError {
        ControlError::Invalid(Invalid::new(msg))
    }

    pub fn conflict(msg: impl Into<String>) -> ControlError {
        ControlError::Conflict(msg.into())
    }

    pub fn host(e: impl std::fmt::Display) -> ControlError {
        ControlError::Host(e.to_string())
    }

    pub fn no_port(network: &str, port: &str) -> ControlError {
        ControlError::NoPort {
            network: network.into(),
            port: port.into(),
        }
    }

    /// The class of failure, for the API (and for callers that tolerate one class,
    /// such as a config file that finds its network already there).
    pub fn class(&self) -> ErrorClass {
        use fabric::FabricError as F;
        use hostnet::HostnetError as H;
        match self {
            ControlError::Invalid(_) | ControlError::Fabric(F::InvalidConfig(_)) => ErrorClass::Invalid,
            ControlError::NoNetwork(_) | ControlError::NoPort { .. } | ControlError::NotFound(_) => {
                ErrorClass::NotFound
            }
            ControlError::Conflict(_)
            | ControlError::Fabric(F::PathInUse(_) | F::NetworkExists(_) | F::NetworkBusy(..))
            | ControlError::Kernel(H::Foreign { .. } | H::Invalid(_)) => ErrorClass::Conflict,
            ControlError::Busy(_) => ErrorClass::Busy,
            ControlError::Kernel(_) | ControlError::Fabric(_) | ControlError::Store(_) | ControlError::Host(_) => {
                ErrorClass::Host
            }
        }
    }
}

/// The four answers a client can get for a failed request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The request is wrong: fix it (400).
    Invalid,
    /// It names something that does not exist (404).
    NotFound,
    /// It clashes with what exists (409).
    Conflict,
    /// A bound is reached; the request may succeed later (503).
    Busy,
    /// The host failed; the request may succeed later (500).
    Host,
}
