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
use crate::leases::{Claimed, Lease, Lease6, LeaseStore};

/// What binding or losing a lease means for the rest of vmfabric.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseEvent {
    Bound(Lease),
    Released {
        mac: Mac,
        ip: Ipv4Addr,
    },
    Expired {
        mac: Mac,
        ip: Ipv4Addr,
    },
    /// A DHCPv6 binding made or renewed.
    Bound6 {
        mac: Mac,
        ip: std::net::Ipv6Addr,
    },
    /// A DHCPv6 binding ended (released, declined, expired, its port gone).
    Ended6 {
        mac: Mac,
        ip: std::net::Ipv6Addr,
    },
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
    /// Addresses out of the pool until a time; `Some(mac)`: except to that MAC.
    quarantine: HashMap<Ipv4Addr, (u64, Option<Mac>)>,
    /// Names the control plane knows for MACs (their port's label).
    name_hints: HashMap<Mac, String>,
    reservations: Vec<crate::config::Reservation>,
    /// DHCPv6 bindings, on a network with an IPv6 prefix.
    v6: crate::dhcp6::Server6,
}

use crate::names::sanitize_hostname;

impl DhcpServer {
    /// Takes a new configuration (same subnet and addresses: see
    /// [`GatewayConfig::same_identity`]). Leases keep their terms until they renew;
    /// one outside a new range is refused then (NAK), and its guest asks for a new one.
    pub fn set_config(&mut self, cfg: Arc<GatewayConfig>) {
        self.cfg = cfg;
    }

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
            v6: Default::default(),
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
        match s.store.load6() {
            Ok(leases) => s.v6.load(&s.cfg, leases),
            Err(e) => {
                tracing::warn!("cannot load DHCPv6 leases, starting empty: {e}");
                GatewayCounters::inc(&s.counters.lease_store_errors);
            }
        }
        s
    }

    /// Answers a DHCPv6 client message from `from` (see `dhcp6`): the reply's bytes.
    /// What it bound or ended waits in [`DhcpServer::take_events6`].
    pub fn handle6(&mut self, payload: &[u8], from: Mac, now: u64) -> Option<Vec<u8>> {
        self.cfg.ipv6?;
        let reserved = self.reserved6_for(from);
        self.v6
            .handle(
                &self.cfg,
                &self.counters,
                &mut *self.store,
                payload,
                from,
                now,
                reserved,
            )
            .ok()
    }

    /// DHCPv6 bindings made and ended since the last call.
    pub fn take_events6(&mut self) -> Vec<LeaseEvent> {
        self.v6.take_events()
    }

    /// The IPv6 address reserved for `mac` (by MAC, or by the name its IPv4 lease or
    /// its port gives it), if any.
    fn reserved6_for(&self, mac: Mac) -> Option<std::net::Ipv6Addr> {
        let hostname = self.leases.get(&mac).and_then(|l| l.hostname.as_deref());
        let label = self.name_hints.get(&mac).map(String::as_str);
        self.reservations.iter().find_map(|r| match &r.key {
            ReservationKey::Mac(m) if *m == mac => r.ip6,
            ReservationKey::Name(n) if Some(n.as_str()) == hostname || Some(n.as_str()) == label => r.ip6,
            _ => None,
        })
    }

    pub fn leases6(&self) -> impl Iterator<Item = &Lease6> {
        self.v6.bindings()
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
            && self
                .quarantine
                .get(&ip)
                .is_none_or(|(until, owner)| *until <= now || *owner == Some(mac))
            && !self
                .offered
                .get(&ip)
                .is_some_and(|m| *m != mac && self.offers.get(m).is_some_and(|(_, exp)| *exp > now))
    }

    /// Whether `ip` is `mac`'s here already: its live lease, or an open offer.
    fn is_claimed_here(&self, mac: Mac, ip: Ipv4Addr, now: u64) -> bool {
        self.leases.get(&mac).is_some_and(|l| l.ip == ip && l.expires > now)
            || self.offers.get(&mac).is_some_and(|(o, exp)| *o == ip && *exp > now)
    }

    /// An address for `mac` that the lease store also granted (where other hosts hand
    /// out the same network's addresses, it asks them). One another host holds rests
    /// here for an offer's hold, and the next is tried; a few tries, then the guest's
    /// next DISCOVER tries again. Err: why none is offered.
    fn pick_claimed(
        &mut self,
        mac: Mac,
        requested: Option<Ipv4Addr>,
        hostname: Option<&str>,
        now: u64,
        hold_until: u64,
    ) -> Result<Ipv4Addr, Claimed> {
        const TRIES: usize = 8;
        for _ in 0..TRIES {
            let ip = self.pick_address(mac, requested, hostname, now).ok_or(Claimed::Taken)?;
            if self.is_claimed_here(mac, ip, now) {
                return Ok(ip);
            }
            match self.store.claim(ip, mac, hold_until) {
                Claimed::Granted => return Ok(ip),
                Claimed::Unavailable => return Err(Claimed::Unavailable),
                Claimed::Taken => {
                    GatewayCounters::inc(&self.counters.dhcp_claimed_elsewhere);
                    self.quarantine.insert(ip, (hold_until, None));
                }
            }
        }
        Err(Claimed::Taken)
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
                let hold_until = now + self.cfg.offer_hold.as_secs();
                let ip = match self.pick_claimed(mac, requested, hostname.as_deref(), now, hold_until) {
                    Ok(ip) => ip,
                    Err(Claimed::Unavailable) => {
                        GatewayCounters::inc(&self.counters.dhcp_store_unavailable);
                        return (None, None);
                    }
                    Err(_) => {
                        GatewayCounters::inc(&self.counters.dhcp_pool_exhausted);
                        return (None, None);
                    }
                };
                self.add_offer(mac, ip, hold_until);
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
                let expires = now + self.cfg.lease_time.as_secs();
                // An address offered to this MAC, or its live lease, was claimed
                // already: a renewal is answered from this host's cache.
                if !self.is_claimed_here(mac, ip, now) {
                    match self.store.claim(ip, mac, expires) {
                        Claimed::Granted => {}
                        Claimed::Taken => {
                            GatewayCounters::inc(&self.counters.dhcp_claimed_elsewhere);
                            return (self.nak(&req), None);
                        }
                        Claimed::Unavailable => {
                            GatewayCounters::inc(&self.counters.dhcp_store_unavailable);
                            return (None, None);
                        }
                    }
                }
                let name = hostname.or_else(|| self.name_hints.get(&mac).cloned());
                let lease = Lease {
                    mac,
                    ip,
                    hostname: name,
                    expires,
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
                self.quarantine
                    .insert(ip, (now + self.cfg.decline_quarantine.as_secs(), None));
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

    /// The control plane took `mac`'s port away: its lease, offer and name go now (not
    /// when the lease would have run out), and its address rests for
    /// `release_quarantine` before another MAC may have it.
    pub fn release_port(&mut self, mac: Mac, now: u64) -> Option<LeaseEvent> {
        self.remove_offer(mac);
        self.name_hints.remove(&mac);
        self.v6.release_port(mac, &self.counters, &mut *self.store);
        let ip = self.leases.get(&mac)?.ip;
        self.drop_lease(mac);
        self.quarantine
            .insert(ip, (now + self.cfg.release_quarantine.as_secs(), Some(mac)));
        GatewayCounters::inc(&self.counters.leases_released);
        Some(LeaseEvent::Released { mac, ip })
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
        self.quarantine.retain(|_, (until, _)| *until > now);
        self.v6.expire(now, &self.counters, &mut *self.store);
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
        leases.chain(offers).chain(self.v6.next_expiry()).min()
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
        let extras = &cfg.dhcp_extras;
        if !extras.routes.is_empty() {
            let default = (
                "0.0.0.0/0".parse().unwrap_or_default(),
                cfg.router.unwrap_or(cfg.gateway_ip),
            );
            let routes = extras.routes.iter().copied().chain(std::iter::once(default));
            o.insert(DhcpOption::ClasslessStaticRoute(routes.collect()));
        }
        if !extras.ntp.is_empty() {
            o.insert(DhcpOption::NtpServers(extras.ntp.clone()));
        }
        for (code, data) in &extras.raw {
            o.insert(DhcpOption::Unknown(dhcproto::v4::UnknownOption::new(
                (*code).into(),
                data.clone(),
            )));
        }
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
    // dhcproto joins the parts of an option that appears more than once (RFC 3396), so
    // a fixed-size option given twice decodes at twice its size and trips the same
    // assertions: each may appear once.
    let mut seen = [false; 256];
    while let Some((&code, tail)) = rest.split_first() {
        match code {
            0 => rest = tail,
            255 => return true,
            _ => {
                let Some((&len, tail)) = tail.split_first() else {
                    return true;
                };
                let len = usize::from(len);
                if let Some(range) = expected(C::from(code)) {
                    if !range.contains(&len) || std::mem::replace(&mut seen[usize::from(code)], true) {
                        return false;
                    }
                }
                // Options carried in the sname and file fields are not scanned here:
                // refuse the overload (clients have no use for it).
                if C::from(code) == C::OptionOverload {
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
#[path = "dhcp_tests.rs"]
mod tests;
