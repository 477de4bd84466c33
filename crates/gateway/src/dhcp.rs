//! DHCPv4 server (RFC 2131) for one network.
//!
//! Theory of operation: a DISCOVER gets an OFFER of the client's current lease, its
//! reservation, a still-pending offer, the address it asks for if free, or the lowest
//! free address, in that order. An offer holds its address for `offer_hold`, but only a
//! REQUEST binds a lease; when the pool is full of offers, the oldest offer gives way,
//! so a DISCOVER flood from random MACs cannot drain the pool or touch bound leases.
//! REQUEST covers SELECTING (server identifier present: ignored unless it is ours),
//! INIT-REBOOT (requested address, no ciaddr) and RENEWING/REBINDING (ciaddr): each is
//! ACKed if the address is this client's or free for it, NAKed otherwise. One lease per
//! MAC; RELEASE frees it; DECLINE quarantines the address; INFORM gets options only.
//! Leases are written to the store before the ACK leaves.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::Arc;

use dhcproto::v4::{self, DhcpOption, MessageType, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable};
use fabric::Mac;

use crate::config::{GatewayConfig, ReservationKey};
use crate::counters::GatewayCounters;
use crate::leases::{Lease, LeaseStore};

/// What binding or losing a lease means for the rest of vmfabric.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseEvent {
    Bound(Lease),
    Released { mac: Mac, ip: Ipv4Addr },
    Expired { mac: Mac, ip: Ipv4Addr },
}

/// A reply and where it goes.
#[derive(Debug)]
pub struct DhcpReply {
    pub bytes: Vec<u8>,
    pub dst_mac: Mac,
    pub dst_ip: Ipv4Addr,
}

/// Replies shorter than this are padded: some clients drop BOOTP messages under 300 bytes.
const MIN_BOOTP_LEN: usize = 300;

pub struct DhcpServer {
    cfg: Arc<GatewayConfig>,
    counters: Arc<GatewayCounters>,
    store: Box<dyn LeaseStore>,
    leases: HashMap<Mac, Lease>,
    by_ip: HashMap<Ipv4Addr, Mac>,
    /// Pending offers: MAC -> (address, expiry), and the same indexed by address so
    /// checking a candidate address costs one lookup, not a scan of every offer.
    offers: HashMap<Mac, (Ipv4Addr, u64)>,
    offered: HashMap<Ipv4Addr, Mac>,
    quarantine: HashMap<Ipv4Addr, u64>,
    /// Names the control plane knows for MACs (their port's label).
    name_hints: HashMap<Mac, String>,
    reservations: Vec<crate::config::Reservation>,
}

use crate::names::sanitize_hostname;

impl DhcpServer {
    pub fn new(cfg: Arc<GatewayConfig>, counters: Arc<GatewayCounters>, store: Box<dyn LeaseStore>) -> Self {
        let mut s = DhcpServer {
            cfg,
            counters,
            store,
            leases: HashMap::new(),
            by_ip: HashMap::new(),
            offers: HashMap::new(),
            offered: HashMap::new(),
            quarantine: HashMap::new(),
            name_hints: HashMap::new(),
            reservations: Vec::new(),
        };
        s.reservations = s.cfg.reservations.clone();
        match s.store.load() {
            Ok(leases) => {
                for l in leases.into_iter().filter(|l| s.cfg.subnet.contains(&l.ip)) {
                    s.by_ip.insert(l.ip, l.mac);
                    s.leases.insert(l.mac, l);
                }
            }
            Err(e) => {
                tracing::warn!("cannot load leases, starting empty: {e}");
                GatewayCounters::inc(&s.counters.lease_store_errors);
            }
        }
        s
    }

    pub fn leases(&self) -> impl Iterator<Item = &Lease> {
        self.leases.values()
    }

    /// Replaces the reservations (already validated). Existing leases stay; new offers
    /// follow the new reservations.
    pub fn set_reservations(&mut self, reservations: Vec<crate::config::Reservation>) {
        self.reservations = reservations;
    }

    /// The control plane tells the server a MAC's port label, used as its DNS name
    /// when the client sends no hostname.
    pub fn set_name_hint(&mut self, mac: Mac, name: String) {
        self.name_hints.insert(mac, name);
    }

    fn reserved_for(&self, mac: Mac, hostname: Option<&str>) -> Option<Ipv4Addr> {
        let label = self.name_hints.get(&mac).map(String::as_str);
        self.reservations.iter().find_map(|r| match &r.key {
            ReservationKey::Mac(m) if *m == mac => Some(r.ip),
            ReservationKey::Name(n) if Some(n.as_str()) == hostname || Some(n.as_str()) == label => Some(r.ip),
            _ => None,
        })
    }

    fn reserved_for_other(&self, ip: Ipv4Addr, mac: Mac, hostname: Option<&str>) -> bool {
        self.reservations.iter().any(|r| r.ip == ip) && self.reserved_for(mac, hostname) != Some(ip)
    }

    fn in_range(&self, ip: Ipv4Addr) -> bool {
        let (a, b) = self.cfg.dhcp_range;
        (u32::from(a)..=u32::from(b)).contains(&u32::from(ip))
    }

    /// Whether `ip` may be given to `mac` now.
    fn available(&self, ip: Ipv4Addr, mac: Mac, hostname: Option<&str>, now: u64) -> bool {
        let net = &self.cfg.subnet;
        let usable = net.contains(&ip) && ip != net.network() && ip != net.broadcast() && !self.cfg.is_gateway_ip(ip);
        let reserved_here = self.reserved_for(mac, hostname) == Some(ip);
        usable
            && (self.in_range(ip) || reserved_here)
            && !self.reserved_for_other(ip, mac, hostname)
            && self
                .by_ip
                .get(&ip)
                .is_none_or(|m| *m == mac || self.leases.get(m).is_some_and(|l| l.expires <= now))
            && self.quarantine.get(&ip).is_none_or(|until| *until <= now)
            && !self
                .offered
                .get(&ip)
                .is_some_and(|m| *m != mac && self.offers.get(m).is_some_and(|(_, exp)| *exp > now))
    }

    fn pick_address(
        &mut self,
        mac: Mac,
        requested: Option<Ipv4Addr>,
        hostname: Option<&str>,
        now: u64,
    ) -> Option<Ipv4Addr> {
        if let Some(l) = self.leases.get(&mac) {
            if self.available(l.ip, mac, hostname, now) {
                return Some(l.ip);
            }
        }
        if let Some(ip) = self
            .reserved_for(mac, hostname)
            .filter(|ip| self.available(*ip, mac, hostname, now))
        {
            return Some(ip);
        }
        if let Some((ip, exp)) = self.offers.get(&mac) {
            if *exp > now {
                return Some(*ip);
            }
        }
        if let Some(ip) = requested.filter(|ip| self.available(*ip, mac, hostname, now)) {
            return Some(ip);
        }
        let (a, b) = self.cfg.dhcp_range;
        let free = (u32::from(a)..=u32::from(b))
            .map(Ipv4Addr::from)
            .find(|ip| self.available(*ip, mac, hostname, now));
        if free.is_some() {
            return free;
        }
        // Every address is leased or offered: the oldest offer gives way.
        let oldest = self
            .offers
            .iter()
            .filter(|(m, _)| **m != mac)
            .min_by_key(|(_, (_, exp))| *exp)
            .map(|(m, _)| *m)?;
        let (ip, _) = self.remove_offer(oldest)?;
        Some(ip)
    }

    /// Handles one DHCP message (the UDP payload) that came in a frame from source MAC
    /// `from`. The message is taken only when its client hardware address is that MAC:
    /// the switch holds each port to its own MAC, so a guest can ask for, renew,
    /// release or decline only its own lease (others' are counted as
    /// `dhcp_foreign_client`).
    pub fn handle(&mut self, payload: &[u8], from: Mac, now: u64) -> (Option<DhcpReply>, Option<LeaseEvent>) {
        self.handle_inner(payload, Some(from), now)
    }

    /// The same, for tests that build messages without frames.
    #[cfg(test)]
    fn handle_unbound(&mut self, payload: &[u8], now: u64) -> (Option<DhcpReply>, Option<LeaseEvent>) {
        self.handle_inner(payload, None, now)
    }

    fn handle_inner(&mut self, payload: &[u8], from: Option<Mac>, now: u64) -> (Option<DhcpReply>, Option<LeaseEvent>) {
        if !options_fit_decoder(payload) {
            GatewayCounters::inc(&self.counters.dhcp_malformed);
            return (None, None);
        }
        let Ok(req) = v4::Message::decode(&mut Decoder::new(payload)) else {
            GatewayCounters::inc(&self.counters.dhcp_malformed);
            return (None, None);
        };
        // hlen first: dhcproto's chaddr() slices by hlen and panics past 16.
        let mac = match (req.opcode(), req.hlen()) {
            (v4::Opcode::BootRequest, 6) => Mac::from_slice(req.chaddr()).filter(Mac::is_unicast),
            _ => None,
        };
        let Some(mac) = mac else {
            GatewayCounters::inc(&self.counters.dhcp_malformed);
            return (None, None);
        };
        if from.is_some_and(|from| from != mac) {
            GatewayCounters::inc(&self.counters.dhcp_foreign_client);
            return (None, None);
        }
        let Some(kind) = req.opts().msg_type() else {
            GatewayCounters::inc(&self.counters.dhcp_malformed);
            return (None, None);
        };
        if !req.giaddr().is_unspecified() {
            // Relayed: vmfabric networks have no relays, so this is not from a VM here.
            GatewayCounters::inc(&self.counters.dhcp_malformed);
            return (None, None);
        }
        let requested = match req.opts().get(OptionCode::RequestedIpAddress) {
            Some(DhcpOption::RequestedIpAddress(ip)) => Some(*ip),
            _ => None,
        };
        let server_id = match req.opts().get(OptionCode::ServerIdentifier) {
            Some(DhcpOption::ServerIdentifier(ip)) => Some(*ip),
            _ => None,
        };
        let hostname = match req.opts().get(OptionCode::Hostname) {
            Some(DhcpOption::Hostname(h)) => sanitize_hostname(h),
            _ => None,
        };
        let c = &self.counters;
        match kind {
            MessageType::Discover => {
                GatewayCounters::inc(&c.dhcp_discover);
                let Some(ip) = self.pick_address(mac, requested, hostname.as_deref(), now) else {
                    GatewayCounters::inc(&self.counters.dhcp_pool_exhausted);
                    return (None, None);
                };
                self.add_offer(mac, ip, now + self.cfg.offer_hold.as_secs());
                GatewayCounters::inc(&self.counters.dhcp_offer);
                (self.reply(&req, MessageType::Offer, ip, true), None)
            }
            MessageType::Request => {
                GatewayCounters::inc(&c.dhcp_request);
                if server_id.is_some_and(|s| s != self.cfg.gateway_ip) {
                    GatewayCounters::inc(&self.counters.dhcp_other_server);
                    self.remove_offer(mac);
                    return (None, None);
                }
                let ciaddr = req.ciaddr();
                let wanted = if server_id.is_some() || ciaddr.is_unspecified() {
                    requested
                } else {
                    Some(ciaddr)
                };
                let Some(ip) = wanted else {
                    GatewayCounters::inc(&self.counters.dhcp_malformed);
                    return (None, None);
                };
                if !self.available(ip, mac, hostname.as_deref(), now) {
                    return (self.nak(&req), None);
                }
                let name = hostname.or_else(|| self.name_hints.get(&mac).cloned());
                let lease = Lease {
                    mac,
                    ip,
                    hostname: name,
                    expires: now + self.cfg.lease_time.as_secs(),
                };
                if let Err(e) = self.store.save(&lease) {
                    tracing::warn!(%mac, %ip, "{e}");
                    GatewayCounters::inc(&self.counters.lease_store_errors);
                }
                if let Some(old) = self.leases.insert(mac, lease.clone()) {
                    if old.ip != ip {
                        self.by_ip.remove(&old.ip);
                    }
                }
                if let Some(prev) = self.by_ip.insert(ip, mac).filter(|m| *m != mac) {
                    // An expired lease of another client loses its address.
                    self.leases.remove(&prev);
                    let _ = self.store.remove(prev);
                }
                self.remove_offer(mac);
                GatewayCounters::inc(&self.counters.dhcp_ack);
                GatewayCounters::inc(&self.counters.leases_bound);
                (
                    self.reply(&req, MessageType::Ack, ip, true),
                    Some(LeaseEvent::Bound(lease)),
                )
            }
            MessageType::Release => {
                GatewayCounters::inc(&c.dhcp_release);
                let ip = req.ciaddr();
                if self.leases.get(&mac).is_some_and(|l| l.ip == ip) {
                    self.drop_lease(mac);
                    GatewayCounters::inc(&self.counters.leases_released);
                    return (None, Some(LeaseEvent::Released { mac, ip }));
                }
                (None, None)
            }
            MessageType::Decline => {
                GatewayCounters::inc(&c.dhcp_decline);
                let Some(ip) = requested else {
                    return (None, None);
                };
                let ours = self.leases.get(&mac).is_some_and(|l| l.ip == ip)
                    || self.offers.get(&mac).is_some_and(|(o, _)| *o == ip);
                if !ours {
                    return (None, None);
                }
                self.remove_offer(mac);
                self.quarantine.insert(ip, now + self.cfg.decline_quarantine.as_secs());
                if self.leases.get(&mac).is_some_and(|l| l.ip == ip) {
                    self.drop_lease(mac);
                    return (None, Some(LeaseEvent::Released { mac, ip }));
                }
                (None, None)
            }
            MessageType::Inform => {
                GatewayCounters::inc(&c.dhcp_inform);
                GatewayCounters::inc(&self.counters.dhcp_ack);
                (self.reply(&req, MessageType::Ack, Ipv4Addr::UNSPECIFIED, false), None)
            }
            _ => {
                GatewayCounters::inc(&c.dhcp_malformed);
                (None, None)
            }
        }
    }

    fn add_offer(&mut self, mac: Mac, ip: Ipv4Addr, expires: u64) {
        self.remove_offer(mac);
        self.offers.insert(mac, (ip, expires));
        self.offered.insert(ip, mac);
    }

    fn remove_offer(&mut self, mac: Mac) -> Option<(Ipv4Addr, u64)> {
        let removed = self.offers.remove(&mac)?;
        if self.offered.get(&removed.0) == Some(&mac) {
            self.offered.remove(&removed.0);
        }
        Some(removed)
    }

    fn drop_lease(&mut self, mac: Mac) {
        if let Some(l) = self.leases.remove(&mac) {
            self.by_ip.remove(&l.ip);
        }
        if let Err(e) = self.store.remove(mac) {
            tracing::warn!(%mac, "{e}");
            GatewayCounters::inc(&self.counters.lease_store_errors);
        }
    }

    /// Drops leases and offers whose time is up.
    pub fn expire(&mut self, now: u64) -> Vec<LeaseEvent> {
        self.offers.retain(|_, (_, exp)| *exp > now);
        let live = &self.offers;
        self.offered.retain(|_, mac| live.contains_key(mac));
        self.quarantine.retain(|_, until| *until > now);
        let gone: Vec<(Mac, Ipv4Addr)> = self
            .leases
            .values()
            .filter(|l| l.expires <= now)
            .map(|l| (l.mac, l.ip))
            .collect();
        gone.into_iter()
            .map(|(mac, ip)| {
                self.drop_lease(mac);
                GatewayCounters::inc(&self.counters.leases_expired);
                LeaseEvent::Expired { mac, ip }
            })
            .collect()
    }

    /// When the next lease or offer runs out.
    pub fn next_expiry(&self) -> Option<u64> {
        let leases = self.leases.values().map(|l| l.expires);
        let offers = self.offers.values().map(|(_, exp)| *exp);
        leases.chain(offers).min()
    }

    fn nak(&self, req: &v4::Message) -> Option<DhcpReply> {
        GatewayCounters::inc(&self.counters.dhcp_nak);
        let mut m = self.base_reply(req);
        m.opts_mut().insert(DhcpOption::MessageType(MessageType::Nak));
        m.opts_mut().insert(DhcpOption::ServerIdentifier(self.cfg.gateway_ip));
        // A NAK is always broadcast: the client may have no usable address.
        self.encode(&m, Mac::BROADCAST, Ipv4Addr::BROADCAST)
    }

    fn base_reply(&self, req: &v4::Message) -> v4::Message {
        let mut m = v4::Message::default();
        m.set_opcode(v4::Opcode::BootReply)
            .set_htype(v4::HType::Eth)
            .set_xid(req.xid())
            .set_flags(req.flags())
            .set_chaddr(req.chaddr());
        m
    }

    fn reply(&self, req: &v4::Message, kind: MessageType, ip: Ipv4Addr, with_lease: bool) -> Option<DhcpReply> {
        let cfg = &self.cfg;
        let mut m = self.base_reply(req);
        m.set_ciaddr(req.ciaddr()).set_yiaddr(ip).set_siaddr(cfg.gateway_ip);
        let o = m.opts_mut();
        o.insert(DhcpOption::MessageType(kind));
        o.insert(DhcpOption::ServerIdentifier(cfg.gateway_ip));
        o.insert(DhcpOption::SubnetMask(cfg.subnet.netmask()));
        o.insert(DhcpOption::BroadcastAddr(cfg.subnet.broadcast()));
        o.insert(DhcpOption::Router(vec![cfg.router.unwrap_or(cfg.gateway_ip)]));
        o.insert(DhcpOption::DomainNameServer(vec![cfg.gateway_ip]));
        o.insert(DhcpOption::DomainName(cfg.domain.clone()));
        let search: Vec<dhcproto::Name> = cfg
            .search
            .iter()
            .filter_map(|s| dhcproto::Name::from_utf8(s).ok())
            .collect();
        if !search.is_empty() {
            o.insert(DhcpOption::DomainSearch(search));
        }
        o.insert(DhcpOption::InterfaceMtu(cfg.mtu));
        if with_lease {
            let t = cfg.lease_time.as_secs().min(u64::from(u32::MAX)) as u32;
            o.insert(DhcpOption::AddressLeaseTime(t));
            o.insert(DhcpOption::Renewal(t / 2));
            o.insert(DhcpOption::Rebinding(t / 8 * 7));
        }
        // RFC 2131 4.1: to ciaddr when the client has one, else broadcast if it asks,
        // else straight to the new address at its MAC (no ARP needed: we build frames).
        let client = Mac::from_slice(req.chaddr()).unwrap_or(Mac::BROADCAST);
        let (dst_mac, dst_ip) = if !req.ciaddr().is_unspecified() {
            (client, req.ciaddr())
        } else if req.flags().broadcast() || ip.is_unspecified() {
            (Mac::BROADCAST, Ipv4Addr::BROADCAST)
        } else {
            (client, ip)
        };
        self.encode(&m, dst_mac, dst_ip)
    }

    fn encode(&self, m: &v4::Message, dst_mac: Mac, dst_ip: Ipv4Addr) -> Option<DhcpReply> {
        match m.to_vec() {
            Ok(mut bytes) => {
                if bytes.len() < MIN_BOOTP_LEN {
                    bytes.resize(MIN_BOOTP_LEN, 0);
                }
                Some(DhcpReply { bytes, dst_mac, dst_ip })
            }
            Err(e) => {
                tracing::warn!("cannot encode DHCP reply: {e}");
                None
            }
        }
    }
}

/// Whether every option of a message has the length dhcproto's decoder will read.
///
/// Why by hand: dhcproto 0.15 trusts the length byte of some options. It asserts on it
/// (`debug_assert!(len == 0)` for Rapid Commit: an abort in debug builds), subtracts
/// from it (`len - 3` for Client FQDN, `len - 1` for the bulk-leasequery status:
/// overflow panics in debug builds), or reads a fixed size whatever it says (the rest of
/// the options are then parsed from the wrong offset in release builds). Messages whose
/// options disagree with their sizes are refused before they reach it.
fn options_fit_decoder(msg: &[u8]) -> bool {
    use v4::OptionCode as C;
    /// The fixed-size options dhcproto reads without looking at the length byte.
    fn expected(code: C) -> Option<std::ops::RangeInclusive<usize>> {
        Some(match code {
            C::RapidCommit => 0..=0,
            C::DefaultIpTtl
            | C::DefaultTcpTtl
            | C::NetBiosNodeType
            | C::OptionOverload
            | C::MessageType
            | C::DisableSLAAC
            | C::BulkLeaseQueryDhcpState
            | C::BulkLeaseQueryDataSource
            | C::IpForwarding
            | C::NonLocalSrcRouting => 1..=1,
            C::BootFileSize
            | C::MaxDatagramSize
            | C::InterfaceMtu
            | C::MaxMessageSize
            | C::ClientSystemArchitecture => 2..=2,
            C::ClientNetworkInterface => 3..=3,
            C::TimeOffset
            | C::PathMtuAgingTimeout
            | C::ArpCacheTimeout
            | C::TcpKeepaliveInterval
            | C::AddressLeaseTime
            | C::Renewal
            | C::Rebinding
            | C::ClientLastTransactionTime
            | C::Ipv6OnlyPreferred
            | C::BulkLeaseQueryBaseTime
            | C::BulkLeasQueryStartTimeOfState
            | C::BulkLeaseQueryQueryStartTime
            | C::BulkLeaseQueryQueryEndTime => 4..=4,
            C::BulkLeaseQueryStatusCode => 1..=255,
            C::ClientFQDN => 3..=255,
            _ => return None,
        })
    }
    // Fixed header (236 bytes), then the magic cookie; options follow.
    let Some(mut rest) = msg.get(240..) else { return true };
    while let Some((&code, tail)) = rest.split_first() {
        match code {
            0 => rest = tail,
            255 => return true,
            _ => {
                let Some((&len, tail)) = tail.split_first() else {
                    return true;
                };
                let len = usize::from(len);
                if expected(C::from(code)).is_some_and(|range| !range.contains(&len)) {
                    return false;
                }
                // A length past the end is the decoder's to refuse.
                let Some(tail) = tail.get(len..) else { return true };
                rest = tail;
            }
        }
    }
    true
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::leases::MemoryLeaseStore;
    use std::time::Duration;

    fn server() -> (DhcpServer, MemoryLeaseStore) {
        let mut cfg = GatewayConfig::new("t", "10.9.0.0/29".parse().unwrap()); // hosts .1-.6
        cfg.lease_time = Duration::from_secs(600);
        let store = MemoryLeaseStore::default();
        let c = Arc::new(GatewayCounters::default());
        (DhcpServer::new(Arc::new(cfg), c, Box::new(store.clone())), store)
    }

    fn msg(mac: u8, kind: MessageType, opts: Vec<DhcpOption>, ciaddr: Ipv4Addr) -> Vec<u8> {
        let chaddr = [0x02, 0, 0, 0, 0, mac];
        let mut m = v4::Message::new_with_id(
            7,
            ciaddr,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            &chaddr,
        );
        m.opts_mut().insert(DhcpOption::MessageType(kind));
        for o in opts {
            m.opts_mut().insert(o);
        }
        m.to_vec().unwrap()
    }

    /// A DISCOVER with one raw option added before the end marker.
    fn with_raw_option(mac: u8, option: &[u8]) -> Vec<u8> {
        let mut bytes = msg(mac, MessageType::Discover, vec![], Ipv4Addr::UNSPECIFIED);
        let end = bytes.iter().rposition(|b| *b == 255).unwrap();
        bytes.splice(end..end, option.iter().copied());
        bytes
    }

    /// dhcproto asserts (debug builds) or underflows on these lengths; the server counts
    /// them as malformed and goes on.
    #[test]
    fn options_with_lengths_the_decoder_trusts_are_refused_not_decoded() {
        let (mut s, _) = server();
        for bad in [
            &[80u8, 1, 0][..],
            &[81, 1, 0],
            &[81, 0],
            &[151, 0],
            &[51, 2, 0, 0],
            &[53, 0],
        ] {
            let (reply, _) = s.handle_unbound(&with_raw_option(1, bad), 100);
            assert!(reply.is_none(), "{bad:?} answered");
        }
        assert_eq!(s.counters.dhcp_malformed.load(std::sync::atomic::Ordering::Relaxed), 6);
        // Well-formed: Rapid Commit with length 0 still gets an answer.
        let (reply, _) = s.handle_unbound(&with_raw_option(1, &[80, 0]), 100);
        assert!(reply.is_some());
    }

    #[test]
    fn a_client_speaks_only_for_its_own_hardware_address() {
        let (mut s, _) = server();
        let victim = Mac([0x02, 0, 0, 0, 0, 1]);
        let attacker = Mac([0x02, 0, 0, 0, 0, 2]);
        let offer = s
            .handle(
                &msg(1, MessageType::Discover, vec![], Ipv4Addr::UNSPECIFIED),
                victim,
                100,
            )
            .0
            .unwrap();
        let ip = decode(&offer).yiaddr();
        let req = vec![
            DhcpOption::RequestedIpAddress(ip),
            DhcpOption::ServerIdentifier(s.cfg.gateway_ip),
        ];
        let (ack, _) = s.handle(
            &msg(1, MessageType::Request, req.clone(), Ipv4Addr::UNSPECIFIED),
            victim,
            100,
        );
        assert!(ack.is_some());
        // The attacker's frames carry its own MAC; messages in the victim's name are dropped.
        let release = msg(1, MessageType::Release, vec![], ip);
        let decline = msg(
            1,
            MessageType::Decline,
            vec![DhcpOption::RequestedIpAddress(ip)],
            Ipv4Addr::UNSPECIFIED,
        );
        let takeover = msg(1, MessageType::Request, req, Ipv4Addr::UNSPECIFIED);
        for m in [release, decline, takeover] {
            let (reply, event) = s.handle(&m, attacker, 101);
            assert!(reply.is_none() && event.is_none());
        }
        assert_eq!(
            s.counters
                .dhcp_foreign_client
                .load(std::sync::atomic::Ordering::Relaxed),
            3
        );
        let lease = s.leases().next().unwrap();
        assert_eq!((lease.mac, lease.ip), (victim, ip), "the victim keeps its lease");
    }

    fn decode(r: &DhcpReply) -> v4::Message {
        v4::Message::decode(&mut Decoder::new(&r.bytes)).unwrap()
    }

    const Z: Ipv4Addr = Ipv4Addr::UNSPECIFIED;
    const GW: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 1);

    fn bind(s: &mut DhcpServer, mac: u8, now: u64) -> Ipv4Addr {
        let offer = s
            .handle_unbound(&msg(mac, MessageType::Discover, vec![], Z), now)
            .0
            .unwrap();
        let ip = decode(&offer).yiaddr();
        let req = vec![DhcpOption::ServerIdentifier(GW), DhcpOption::RequestedIpAddress(ip)];
        let (ack, ev) = s.handle_unbound(&msg(mac, MessageType::Request, req, Z), now);
        assert_eq!(decode(&ack.unwrap()).opts().msg_type(), Some(MessageType::Ack));
        assert!(matches!(ev, Some(LeaseEvent::Bound(l)) if l.ip == ip));
        ip
    }

    #[test]
    fn discover_offer_request_ack_with_all_options() {
        let (mut s, store) = server();
        let (offer, ev) = s.handle_unbound(&msg(1, MessageType::Discover, vec![], Z), 100);
        assert!(ev.is_none(), "an offer binds nothing");
        let offer = offer.unwrap();
        assert_eq!(offer.bytes.len(), MIN_BOOTP_LEN.max(offer.bytes.len()));
        let m = decode(&offer);
        assert_eq!(m.yiaddr(), Ipv4Addr::new(10, 9, 0, 2));
        assert_eq!(m.opts().msg_type(), Some(MessageType::Offer));
        for code in [
            OptionCode::SubnetMask,
            OptionCode::Router,
            OptionCode::DomainNameServer,
            OptionCode::DomainName,
            OptionCode::DomainSearch,
            OptionCode::InterfaceMtu,
            OptionCode::AddressLeaseTime,
            OptionCode::Renewal,
            OptionCode::Rebinding,
            OptionCode::ServerIdentifier,
        ] {
            assert!(m.opts().get(code).is_some(), "{code:?} missing");
        }
        assert!(store.load().unwrap().is_empty());
        assert_eq!(bind(&mut s, 1, 100), Ipv4Addr::new(10, 9, 0, 2));
        assert_eq!(store.load().unwrap().len(), 1, "written before the ACK");
        // The same client asking again gets the same address.
        assert_eq!(bind(&mut s, 1, 200), Ipv4Addr::new(10, 9, 0, 2));
        assert_eq!(s.leases().count(), 1, "one lease per MAC");
    }

    #[test]
    fn request_for_another_server_is_ignored() {
        let (mut s, _) = server();
        s.handle_unbound(&msg(1, MessageType::Discover, vec![], Z), 0);
        let req = vec![
            DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 9, 0, 99)),
            DhcpOption::RequestedIpAddress(Ipv4Addr::new(10, 9, 0, 2)),
        ];
        assert!(matches!(
            s.handle_unbound(&msg(1, MessageType::Request, req, Z), 0),
            (None, None)
        ));
    }

    #[test]
    fn renew_reboot_and_conflicts() {
        let (mut s, _) = server();
        let a = bind(&mut s, 1, 0);
        // RENEWING: ciaddr set, unicast answer.
        let (ack, _) = s.handle_unbound(&msg(1, MessageType::Request, vec![], a), 300);
        let ack = ack.unwrap();
        assert_eq!(
            (ack.dst_ip, decode(&ack).opts().msg_type()),
            (a, Some(MessageType::Ack))
        );
        // INIT-REBOOT of another client for A's address: NAK, broadcast.
        let (nak, _) = s.handle_unbound(
            &msg(2, MessageType::Request, vec![DhcpOption::RequestedIpAddress(a)], Z),
            300,
        );
        let nak = nak.unwrap();
        assert_eq!(
            (nak.dst_ip, decode(&nak).opts().msg_type()),
            (Ipv4Addr::BROADCAST, Some(MessageType::Nak))
        );
        // INIT-REBOOT for an address outside the subnet: NAK.
        let out = vec![DhcpOption::RequestedIpAddress(Ipv4Addr::new(192, 168, 1, 5))];
        assert_eq!(
            decode(&s.handle_unbound(&msg(3, MessageType::Request, out, Z), 300).0.unwrap())
                .opts()
                .msg_type(),
            Some(MessageType::Nak)
        );
    }

    #[test]
    fn a_discover_flood_cannot_take_bound_leases_or_drain_the_pool() {
        let (mut s, _) = server();
        let a = bind(&mut s, 1, 0);
        for mac in 10..200 {
            s.handle_unbound(&msg(mac, MessageType::Discover, vec![], Z), 1);
        }
        assert_eq!(s.leases().count(), 1);
        // A real client arriving during the flood still gets an address, never A's.
        let b = bind(&mut s, 2, 2);
        assert_ne!(a, b);
        assert_eq!(bind(&mut s, 1, 3), a);
    }

    #[test]
    fn release_decline_and_expiry() {
        let (mut s, store) = server();
        let a = bind(&mut s, 1, 0);
        assert!(matches!(
            s.handle_unbound(&msg(1, MessageType::Release, vec![], a), 10).1,
            Some(LeaseEvent::Released { .. })
        ));
        assert!(store.load().unwrap().is_empty());
        let b = bind(&mut s, 2, 20);
        s.handle_unbound(
            &msg(2, MessageType::Decline, vec![DhcpOption::RequestedIpAddress(b)], Z),
            21,
        );
        let c = bind(&mut s, 3, 22);
        assert_ne!(c, b, "a declined address is quarantined");
        assert_eq!(s.next_expiry(), Some(622));
        let gone = s.expire(622);
        assert_eq!(
            gone,
            vec![LeaseEvent::Expired {
                mac: Mac([2, 0, 0, 0, 0, 3]),
                ip: c
            }]
        );
        assert_eq!(s.leases().count(), 0);
    }

    #[test]
    fn garbage_is_counted_not_answered() {
        let (mut s, _) = server();
        for bad in [&b""[..], &[1u8; 10], &[0xffu8; 300]] {
            assert!(matches!(s.handle_unbound(bad, 0), (None, None)));
        }
        // Cut right after the magic cookie: no message type left.
        let mut cut = msg(1, MessageType::Discover, vec![], Z);
        cut.truncate(240);
        assert!(matches!(s.handle_unbound(&cut, 0), (None, None)));
        assert_eq!(s.counters.dhcp_malformed.load(std::sync::atomic::Ordering::Relaxed), 4);
        // The server keeps serving.
        assert!(s
            .handle_unbound(&msg(1, MessageType::Discover, vec![], Z), 0)
            .0
            .is_some());
    }

    #[test]
    fn reservations_by_mac_and_by_name() {
        let mut cfg = GatewayConfig::new("t", "10.9.0.0/24".parse().unwrap());
        let (r_mac, r_name) = (Ipv4Addr::new(10, 9, 0, 50), Ipv4Addr::new(10, 9, 0, 51));
        cfg.reservations = vec![
            crate::config::Reservation {
                key: ReservationKey::Mac(Mac([2, 0, 0, 0, 0, 1])),
                ip: r_mac,
            },
            crate::config::Reservation {
                key: ReservationKey::Name("db".into()),
                ip: r_name,
            },
            crate::config::Reservation {
                key: ReservationKey::Name("cache".into()),
                ip: Ipv4Addr::new(10, 9, 0, 52),
            },
        ];
        let c = Arc::new(GatewayCounters::default());
        let mut s = DhcpServer::new(Arc::new(cfg), c, Box::new(MemoryLeaseStore::default()));
        assert_eq!(bind(&mut s, 1, 0), r_mac);
        let offer = s
            .handle_unbound(
                &msg(2, MessageType::Discover, vec![DhcpOption::Hostname("db".into())], Z),
                0,
            )
            .0
            .unwrap();
        assert_eq!(decode(&offer).yiaddr(), r_name, "reserved by its DHCP hostname");
        s.set_name_hint(Mac([2, 0, 0, 0, 0, 3]), "cache".into());
        let offer = s
            .handle_unbound(&msg(3, MessageType::Discover, vec![], Z), 0)
            .0
            .unwrap();
        assert_eq!(
            decode(&offer).yiaddr(),
            Ipv4Addr::new(10, 9, 0, 52),
            "or by its port's label"
        );
        // Nobody else gets a reserved address, even by asking for it.
        let ask = vec![DhcpOption::RequestedIpAddress(r_mac)];
        let offer = s.handle_unbound(&msg(4, MessageType::Discover, ask, Z), 0).0.unwrap();
        assert!(![r_mac, r_name].contains(&decode(&offer).yiaddr()));
    }
}
