//! Configuration of the switch and of each network, with the defaults users expect.

use std::sync::Arc;
use std::time::Duration;

use crate::clock::{Clock, MonotonicClock};
use crate::error::FabricError;
use crate::frame::{ETH_HEADER_LEN, VLAN_TAG_LEN};

pub const DEFAULT_MTU: usize = 1500;
/// The largest MTU the userspace path carries (what QEMU and passt accept).
pub const MAX_MTU: usize = 65520;
/// The smallest IPv4 MTU (RFC 791).
pub const MIN_MTU: usize = 68;
/// The longest frame any network can carry: MAX_MTU plus header and one VLAN tag.
pub const MAX_FRAME_LEN: usize = MAX_MTU + ETH_HEADER_LEN + VLAN_TAG_LEN;
/// The longest frame a port may hand the switch: a 64 KiB TCP segment offload behind an
/// Ethernet header and two VLAN tags.
pub const MAX_RX_FRAME_LEN: usize = crate::offload::MAX_GSO_PACKET + ETH_HEADER_LEN + 2 * VLAN_TAG_LEN;

/// One network: an isolated broadcast domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkConfig {
    /// Largest layer-3 payload; frames may be this plus 14 bytes (18 with a VLAN tag).
    pub mtu: usize,
    /// MAC table bound; when full, new sources are not learned (counted as not learned, and still delivered).
    pub mac_table_max: usize,
    /// How long an entry lives without a frame from that MAC.
    pub aging: Duration,
    /// Drop DHCP server messages (UDP source port 67) from ports not trusted to serve
    /// DHCP (see [`crate::Switch::set_port_trusted`]): no rogue DHCP server on the network.
    pub dhcp_guard: bool,
    /// Carry IPv6 between guests. Off (the default), untrusted ports' IPv6 is dropped
    /// (counted as ipv6_off); on, it passes the first-hop guard: no Router
    /// Advertisements, redirects or DHCPv6 server messages from untrusted ports, and
    /// no Neighbour Advertisement announcing another MAC than the sender's.
    pub ipv6: bool,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            mtu: DEFAULT_MTU,
            mac_table_max: 4096,
            aging: Duration::from_secs(300),
            dhcp_guard: true,
            ipv6: false,
        }
    }
}

impl NetworkConfig {
    pub fn validate(&self) -> Result<(), FabricError> {
        if !(MIN_MTU..=MAX_MTU).contains(&self.mtu) {
            return Err(FabricError::InvalidConfig(format!(
                "mtu {} is outside {MIN_MTU}..={MAX_MTU}",
                self.mtu
            )));
        }
        if self.mac_table_max == 0 {
            return Err(FabricError::InvalidConfig("mac_table_max must be at least 1".into()));
        }
        if self.aging.is_zero() {
            return Err(FabricError::InvalidConfig("aging must be longer than zero".into()));
        }
        Ok(())
    }

    /// The longest frame this network accepts (tagged).
    pub fn max_frame_len(&self) -> usize {
        self.mtu + ETH_HEADER_LEN + VLAN_TAG_LEN
    }
}

/// The switch as a whole.
#[derive(Clone)]
pub struct SwitchConfig {
    /// Frames one port may have waiting when its receiver is slow; beyond it that port
    /// loses frames (queue_full) and no other port waits.
    pub egress_queue_frames: usize,
    /// Bytes a stream port may have waiting to be written.
    pub stream_queue_bytes: usize,
    /// SO_SNDBUF/SO_RCVBUF asked for on every socket (Linux caps it at wmem_max/rmem_max).
    pub socket_buffer_bytes: usize,
    /// Events kept for a slow reader of [`crate::Switch::take_events`]; beyond it they
    /// are counted and dropped.
    pub event_capacity: usize,
    /// Mode of the socket files of path ports.
    pub socket_mode: u32,
    pub clock: Arc<dyn Clock>,
    /// Confine the switch thread to its system-call allowlist (see `sys::seccomp`).
    /// Off only for debugging.
    pub sandbox: bool,
}

impl Default for SwitchConfig {
    fn default() -> Self {
        SwitchConfig {
            egress_queue_frames: 512,
            stream_queue_bytes: 2 << 20,
            socket_buffer_bytes: 4 << 20,
            event_capacity: 4096,
            socket_mode: 0o600,
            clock: Arc::new(MonotonicClock::default()),
            sandbox: true,
        }
    }
}

impl std::fmt::Debug for SwitchConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SwitchConfig")
            .field("egress_queue_frames", &self.egress_queue_frames)
            .field("stream_queue_bytes", &self.stream_queue_bytes)
            .field("socket_buffer_bytes", &self.socket_buffer_bytes)
            .field("event_capacity", &self.event_capacity)
            .field("socket_mode", &format_args!("{:o}", self.socket_mode))
            .field("sandbox", &self.sandbox)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates_mtu_and_bounds() {
        assert!(NetworkConfig::default().validate().is_ok());
        for mtu in [0, 67, 65521] {
            let c = NetworkConfig {
                mtu,
                ..Default::default()
            };
            assert!(c.validate().is_err(), "mtu {mtu}");
        }
        assert!(NetworkConfig {
            mtu: MAX_MTU,
            ..Default::default()
        }
        .validate()
        .is_ok());
        assert!(NetworkConfig {
            mac_table_max: 0,
            ..Default::default()
        }
        .validate()
        .is_err());
        assert!(NetworkConfig {
            aging: Duration::ZERO,
            ..Default::default()
        }
        .validate()
        .is_err());
    }
}
