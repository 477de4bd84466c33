//! Gateway counters, readable at any time without asking the gateway task.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        /// Everything the gateway counts. Relaxed atomics: each is independent.
        #[derive(Debug, Default)]
        pub struct GatewayCounters {
            $($(#[$doc])* pub $name: AtomicU64,)*
        }

        impl GatewayCounters {
            /// Every counter by name, for metrics.
            pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($name), self.$name.load(Ordering::Relaxed)),)*]
            }
        }
    };
}

counters! {
    /// ARP requests for a gateway address answered.
    arp_replies,
    /// ARP announcements (gratuitous) seen.
    arp_gratuitous,
    /// Gratuitous ARP claiming a gateway address that reached the gateway. A guest's
    /// claim never does (its port lock drops it as `spoofed` before anyone hears it),
    /// so a non-zero count means a trusted port (or the host, in kernel mode) claims it.
    arp_conflicts,
    /// Pings to the gateway answered (IPv4 and IPv6).
    icmp_echo_replies,
    /// IPv6 Router Advertisements sent (asked for and periodic).
    router_adverts,
    /// IPv6 Neighbour Advertisements sent for the gateway's addresses.
    neighbour_adverts,
    /// Frames that claimed ARP/IPv4/UDP/ICMP but were malformed or had bad checksums.
    malformed_frames,
    dhcp_discover,
    dhcp_request,
    dhcp_decline,
    dhcp_release,
    dhcp_inform,
    dhcp_offer,
    dhcp_ack,
    dhcp_nak,
    /// DHCP messages that did not decode, or made no sense (no type, bad hardware address).
    dhcp_malformed,
    dhcp6_solicit,
    dhcp6_request,
    dhcp6_renew,
    dhcp6_rebind,
    dhcp6_release,
    dhcp6_decline,
    dhcp6_confirm,
    dhcp6_information_request,
    dhcp6_advertise,
    dhcp6_reply,
    /// DHCPv6 messages that did not decode or broke the protocol's rules.
    dhcp6_malformed,
    /// Identity associations answered without an address (the MAC declined its own
    /// address lately, or a hash collision gave it to another MAC).
    dhcp6_no_addrs,
    /// Messages whose client hardware address is not the frame's source MAC: a guest
    /// speaking in another's name; dropped.
    dhcp_foreign_client,
    /// REQUESTs naming another server: the client chose it; ignored.
    dhcp_other_server,
    /// DISCOVERs left unanswered: no free address.
    dhcp_pool_exhausted,
    leases_bound,
    leases_expired,
    leases_released,
    /// Lease store writes that failed (the lease still works until a restart).
    lease_store_errors,
    /// New leases and offers refused because the cluster's store could not be asked
    /// (fail closed; the guest asks again). Renewals are answered from the cache.
    dhcp_store_unavailable,
    /// Addresses another host held when this one was about to offer them.
    dhcp_claimed_elsewhere,
    dns_local,
    dns_forwarded,
    dns_nxdomain,
    dns_servfail,
    /// Queries dropped: in-flight bound reached.
    dns_dropped,
    /// Queries that did not decode.
    dns_malformed,
    /// DNS-over-TCP connections reset: their client already held its share of slots.
    dns_tcp_refused,
    /// UDP flows opened for guests.
    nat_udp_flows,
    /// TCP segments from guests dropped for ending past the window the gateway
    /// advertised (DNS over TCP and TCP NAT); an honest TCP never sends them.
    tcp_beyond_window,
    /// Guest-driven sockets closed again because the daemon's descriptors ran low
    /// (see `fd_budget`).
    fd_budget_refused,
    /// Guest datagrams dropped: flow bounds reached, queue full, or no host socket.
    nat_udp_dropped,
    nat_udp_tx_bytes,
    nat_udp_rx_bytes,
    /// TCP connections opened for guests (egress) and for forward clients.
    nat_tcp_flows,
    /// Guest connects refused: the host-side connect was refused, timed out or failed.
    nat_tcp_refused,
    /// Guest connects dropped at the flow bounds (answered with RST).
    nat_tcp_bounded,
    nat_tcp_tx_bytes,
    nat_tcp_rx_bytes,
    /// Guest TCP data the host socket had no room for, though its window was offered
    /// (TCP splice; not acknowledged, the guest sends it again).
    nat_tcp_host_refusals,
    /// ICMP echo requests sent on behalf of guests, and replies delivered back.
    nat_icmp_requests,
    nat_icmp_replies,
    /// Echo requests not sent: bounds reached or no ICMP socket available.
    nat_icmp_dropped,
    /// Guest traffic refused by the egress policy (answered with ICMP prohibited).
    egress_denied,
    /// Datagrams to a forward that could not be delivered (guest not seen yet, no flow port).
    forward_dropped,
    /// Connections to a TCP forward reset at once: no guest at its address (no lease,
    /// no frames seen from it).
    forward_refused,
}

impl GatewayCounters {
    pub(crate) fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self, name: &str) -> Option<u64> {
        self.snapshot().into_iter().find(|(n, _)| *n == name).map(|(_, v)| v)
    }
}
