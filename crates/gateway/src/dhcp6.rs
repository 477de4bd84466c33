//! DHCPv6 server (RFC 8415, stateful addresses) for a network with an IPv6 prefix, for
//! guests that take their address from DHCPv6 rather than (or beside) SLAAC.
//!
//! Theory of operation: one binding per MAC (the frame's source: a port is locked to
//! one), holding one address of the prefix that is a function of the MAC alone
//! ([`GatewayConfig::dhcp6_address_of`]), so the port lock knows it before the guest
//! asks, and a guest gets the same address after any restart. SOLICIT is answered
//! with an ADVERTISE, or with a REPLY that binds at once when it carries Rapid Commit;
//! REQUEST and RENEW (to this server) and REBIND bind or extend; RELEASE ends the
//! binding; DECLINE ends it and refuses that MAC the address for a while;
//! CONFIRM says whether its addresses are on the link; INFORMATION-REQUEST gets the
//! DNS options only. Bindings are written to the store before the REPLY leaves.

use std::collections::HashMap;
use std::net::Ipv6Addr;

use dhcproto::v6::{self, DhcpOption, IAAddr, MessageType, OptionCode, Status, StatusCode, IANA};
use dhcproto::{Decodable, Decoder, Encodable};
use fabric::Mac;

use crate::config::GatewayConfig;
use crate::counters::GatewayCounters;
use crate::leases::{Lease6, LeaseStore};

/// Where clients send: All_DHCP_Relay_Agents_and_Servers (RFC 8415 section 7.1).
pub const ALL_SERVERS: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 1, 2);

/// How long a DECLINEd address is kept from the MAC that declined it.
const DECLINE_QUARANTINE_SECS: u64 = 600;

/// The DHCPv6 side of a network's DHCP server: its bindings.
#[derive(Debug, Default)]
pub struct Server6 {
    bindings: HashMap<Mac, Lease6>,
    /// MACs whose address was declined, until when.
    declined: HashMap<Mac, u64>,
    /// Bindings made and ended, for the port locks (a reserved address is not one the
    /// lock can know from the MAC).
    events: Vec<crate::LeaseEvent>,
}

/// Why a message got no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ignored {
    /// It did not decode, or broke the protocol's rules (no client identifier, a
    /// server identifier where none may be).
    Malformed,
    /// For another server, or a kind a server does not answer.
    NotOurs,
}

impl Server6 {
    /// Takes the bindings the store held, those on the current prefix.
    pub fn load(&mut self, cfg: &GatewayConfig, leases: Vec<Lease6>) {
        for l in leases {
            if cfg.ipv6.is_some_and(|p| p.contains(&l.ip)) {
                self.events.push(crate::LeaseEvent::Bound6 { mac: l.mac, ip: l.ip });
                self.bindings.insert(l.mac, l);
            }
        }
    }

    pub fn take_events(&mut self) -> Vec<crate::LeaseEvent> {
        std::mem::take(&mut self.events)
    }

    fn end(&mut self, mac: Mac, c: &GatewayCounters, store: &mut dyn LeaseStore) {
        if let Some(b) = self.bindings.remove(&mac) {
            self.events.push(crate::LeaseEvent::Ended6 { mac, ip: b.ip });
            if let Err(e) = store.remove6(mac) {
                tracing::warn!(%mac, "{e}");
                GatewayCounters::inc(&c.lease_store_errors);
            }
        }
    }

    pub fn bindings(&self) -> impl Iterator<Item = &Lease6> {
        self.bindings.values()
    }

    /// The server's DUID: DUID-LL (type 3) of the gateway's MAC, stable as the MAC is.
    pub fn server_duid(cfg: &GatewayConfig) -> Vec<u8> {
        let mut duid = vec![0, 3, 0, 1];
        duid.extend(cfg.gateway_mac.0);
        duid
    }

    /// Answers one client message from `from`, whose address is `reserved` if the
    /// operator reserved one: the reply's bytes, if any.
    #[allow(clippy::too_many_arguments)]
    pub fn handle(
        &mut self,
        cfg: &GatewayConfig,
        c: &GatewayCounters,
        store: &mut dyn LeaseStore,
        payload: &[u8],
        from: Mac,
        now: u64,
        reserved: Option<Ipv6Addr>,
    ) -> Result<Vec<u8>, Ignored> {
        // Checked before dhcproto sees it (see `options_decodable`).
        let decodable = payload.get(4..).is_some_and(|opts| options_decodable(opts, 0));
        let decoded = decodable.then(|| v6::Message::decode(&mut Decoder::new(payload)));
        let Some(Ok(msg)) = decoded else {
            GatewayCounters::inc(&c.dhcp6_malformed);
            return Err(Ignored::Malformed);
        };
        let result = self.answer(cfg, c, store, &msg, from, now, reserved);
        if result == Err(Ignored::Malformed) {
            GatewayCounters::inc(&c.dhcp6_malformed);
        }
        let reply = result?;
        GatewayCounters::inc(if reply.msg_type() == MessageType::Advertise {
            &c.dhcp6_advertise
        } else {
            &c.dhcp6_reply
        });
        reply.to_vec().map_err(|_| Ignored::Malformed)
    }

    #[allow(clippy::too_many_arguments)]
    fn answer(
        &mut self,
        cfg: &GatewayConfig,
        c: &GatewayCounters,
        store: &mut dyn LeaseStore,
        msg: &v6::Message,
        from: Mac,
        now: u64,
        reserved: Option<Ipv6Addr>,
    ) -> Result<v6::Message, Ignored> {
        let kind = msg.msg_type();
        let client_id = match msg.opts().get(OptionCode::ClientId) {
            Some(DhcpOption::ClientId(id)) if !id.is_empty() => id.clone(),
            // INFORMATION-REQUEST may come without one; everything else needs it.
            _ if kind == MessageType::InformationRequest => vec![],
            _ => return Err(Ignored::Malformed),
        };
        let ours = Self::server_duid(cfg);
        let server_id = match msg.opts().get(OptionCode::ServerId) {
            Some(DhcpOption::ServerId(id)) => Some(id.clone()),
            _ => None,
        };
        // REQUEST, RENEW, RELEASE and DECLINE name their server; SOLICIT, REBIND and
        // CONFIRM must not (RFC 8415 section 16).
        match kind {
            MessageType::Request | MessageType::Renew | MessageType::Release | MessageType::Decline
                if server_id.as_deref() != Some(&ours[..]) =>
            {
                return Err(if server_id.is_none() {
                    Ignored::Malformed
                } else {
                    Ignored::NotOurs
                });
            }
            MessageType::Solicit | MessageType::Rebind | MessageType::Confirm if server_id.is_some() => {
                return Err(Ignored::Malformed)
            }
            MessageType::InformationRequest if server_id.as_deref().is_some_and(|id| id != &ours[..]) => {
                return Err(Ignored::NotOurs)
            }
            _ => {}
        }
        let ia = match msg.opts().get(OptionCode::IANA) {
            Some(DhcpOption::IANA(ia)) => Some(ia.clone()),
            _ => None,
        };
        let mut reply = v6::Message::new_with_id(MessageType::Reply, msg.xid());
        if !client_id.is_empty() {
            reply.opts_mut().insert(DhcpOption::ClientId(client_id.clone()));
        }
        reply.opts_mut().insert(DhcpOption::ServerId(ours));
        let status = |s: Status, text: &str| {
            DhcpOption::StatusCode(StatusCode {
                status: s,
                msg: text.into(),
            })
        };
        match kind {
            MessageType::Solicit => {
                GatewayCounters::inc(&c.dhcp6_solicit);
                let rapid = msg.opts().get(OptionCode::RapidCommit).is_some();
                if rapid {
                    reply.opts_mut().insert(DhcpOption::RapidCommit);
                } else {
                    reply.set_msg_type(MessageType::Advertise);
                }
                let ia = ia.ok_or(Ignored::NotOurs)?;
                let want = Want {
                    reserved,
                    bind: rapid,
                    now,
                };
                reply
                    .opts_mut()
                    .insert(self.assign(cfg, c, store, &ia, from, &client_id, want));
            }
            MessageType::Request | MessageType::Renew | MessageType::Rebind => {
                GatewayCounters::inc(match kind {
                    MessageType::Request => &c.dhcp6_request,
                    MessageType::Renew => &c.dhcp6_renew,
                    _ => &c.dhcp6_rebind,
                });
                let ia = ia.ok_or(Ignored::NotOurs)?;
                let want = Want {
                    reserved,
                    bind: true,
                    now,
                };
                reply
                    .opts_mut()
                    .insert(self.assign(cfg, c, store, &ia, from, &client_id, want));
            }
            MessageType::Release | MessageType::Decline => {
                GatewayCounters::inc(if kind == MessageType::Release {
                    &c.dhcp6_release
                } else {
                    &c.dhcp6_decline
                });
                if self.bindings.get(&from).is_some_and(|b| b.duid == client_id) {
                    self.end(from, c, store);
                }
                if kind == MessageType::Decline {
                    self.declined.insert(from, now + DECLINE_QUARANTINE_SECS);
                }
                reply.opts_mut().insert(status(Status::Success, "done"));
            }
            MessageType::Confirm => {
                GatewayCounters::inc(&c.dhcp6_confirm);
                let prefix = cfg.ipv6.ok_or(Ignored::NotOurs)?;
                let on_link = ia.iter().flat_map(addresses).all(|a| prefix.contains(&a));
                reply.opts_mut().insert(if on_link {
                    status(Status::Success, "on link")
                } else {
                    status(Status::NotOnLink, "not on this link")
                });
            }
            MessageType::InformationRequest => {
                GatewayCounters::inc(&c.dhcp6_information_request);
            }
            _ => return Err(Ignored::NotOurs),
        }
        if let Some(dns) = cfg.gateway_ip6() {
            reply.opts_mut().insert(DhcpOption::DomainNameServers(vec![dns]));
        }
        let search: Vec<_> = cfg
            .search
            .iter()
            .filter_map(|d| dhcproto::Name::from_utf8(d).ok())
            .collect();
        if !search.is_empty() {
            reply.opts_mut().insert(DhcpOption::DomainSearchList(search));
        }
        Ok(reply)
    }

    /// The IA_NA to answer `ia` with: the MAC's address (reserved, or its own) with its
    /// lifetimes (bound and stored when `want.bind`), addresses the client holds that are
    /// not it with lifetimes of zero, or no address at all when this MAC may not have
    /// one now.
    #[allow(clippy::too_many_arguments)]
    fn assign(
        &mut self,
        cfg: &GatewayConfig,
        c: &GatewayCounters,
        store: &mut dyn LeaseStore,
        ia: &IANA,
        from: Mac,
        client_id: &[u8],
        want: Want,
    ) -> DhcpOption {
        let Want { reserved, bind, now } = want;
        let lease_secs = u32::try_from(cfg.lease_time.as_secs()).unwrap_or(u32::MAX);
        let mut answer = IANA {
            id: ia.id,
            t1: lease_secs / 2,
            t2: lease_secs / 5 * 4,
            opts: Default::default(),
        };
        let addr = reserved.or_else(|| cfg.dhcp6_address_of(from));
        let taken = addr.is_some_and(|a| self.bindings.iter().any(|(m, b)| *m != from && b.ip == a));
        let declined = self.declined.get(&from).is_some_and(|until| *until > now);
        let Some(addr) = addr.filter(|_| !taken && !declined) else {
            GatewayCounters::inc(&c.dhcp6_no_addrs);
            answer.opts.insert(DhcpOption::StatusCode(StatusCode {
                status: Status::NoAddrsAvail,
                msg: "no address for this client now".into(),
            }));
            return DhcpOption::IANA(answer);
        };
        if bind {
            let lease = Lease6 {
                mac: from,
                ip: addr,
                duid: client_id.to_vec(),
                iaid: ia.id,
                expires: now + u64::from(lease_secs),
            };
            match store.save6(&lease) {
                Ok(()) => {
                    if let Some(old) = self.bindings.insert(from, lease).filter(|old| old.ip != addr) {
                        self.events.push(crate::LeaseEvent::Ended6 { mac: from, ip: old.ip });
                    }
                    self.events.push(crate::LeaseEvent::Bound6 { mac: from, ip: addr });
                }
                Err(e) => {
                    // Not stored, not promised: the client asks again.
                    tracing::warn!(mac = %from, "{e}");
                    GatewayCounters::inc(&c.lease_store_errors);
                    answer.opts.insert(DhcpOption::StatusCode(StatusCode {
                        status: Status::UnspecFail,
                        msg: "lease store unavailable".into(),
                    }));
                    return DhcpOption::IANA(answer);
                }
            }
        }
        answer.opts.insert(DhcpOption::IAAddr(IAAddr {
            addr,
            preferred_life: lease_secs,
            valid_life: lease_secs,
            opts: Default::default(),
        }));
        // A few are all a real client holds; the reply stays small whatever it sends.
        for stale in addresses(ia).filter(|a| *a != addr).take(8) {
            answer.opts.insert(DhcpOption::IAAddr(IAAddr {
                addr: stale,
                preferred_life: 0,
                valid_life: 0,
                opts: Default::default(),
            }));
        }
        DhcpOption::IANA(answer)
    }

    /// Drops bindings and quarantines whose time is up.
    pub fn expire(&mut self, now: u64, c: &GatewayCounters, store: &mut dyn LeaseStore) {
        self.declined.retain(|_, until| *until > now);
        let gone: Vec<Mac> = self
            .bindings
            .values()
            .filter(|b| b.expires <= now)
            .map(|b| b.mac)
            .collect();
        for mac in gone {
            self.end(mac, c, store);
        }
    }

    /// The control plane took `mac`'s port away: its binding goes now.
    pub fn release_port(&mut self, mac: Mac, c: &GatewayCounters, store: &mut dyn LeaseStore) {
        self.end(mac, c, store);
    }

    pub fn next_expiry(&self) -> Option<u64> {
        let bindings = self.bindings.values().map(|b| b.expires);
        bindings.chain(self.declined.values().copied()).min()
    }
}

/// What an identity association is to get.
struct Want {
    /// The operator's reservation for the MAC, over its own address.
    reserved: Option<Ipv6Addr>,
    /// Bind (REQUEST, RENEW, REBIND, Rapid Commit) or only offer (ADVERTISE).
    bind: bool,
    now: u64,
}

/// Whether dhcproto 0.15 can decode these options without going wrong. It subtracts a
/// fixed part from some options' declared lengths without a check (Status Code 2,
/// Vendor Class and Vendor Options 4), reading from the whole message: a shorter one
/// underflows (a panic with debug assertions, a wrapped length without), also inside
/// the containers (IA_NA, IA_TA, IA Address, IA_PD, IA Prefix, Vendor Options). And it
/// reads some options by their type's size whatever length they declare (Preference,
/// Elapsed Time, Server Unicast, Rapid Commit, Reconfigure Message and Accept), so
/// another length would put its reading out of step with the declared lengths this
/// walk follows: those must declare exactly their size. Such messages are refused
/// before decoding, and so is a relayed message (not served). Where the options run
/// out mid-way dhcproto stops as this does. (Both found by the `dhcp_server` fuzz
/// target.)
fn options_decodable(mut opts: &[u8], depth: u8) -> bool {
    // Containers hold few levels in any real message.
    if depth > 4 {
        return false;
    }
    while let Some(h) = opts.get(..4) {
        let code = u16::from_be_bytes([h[0], h[1]]);
        let len = usize::from(u16::from_be_bytes([h[2], h[3]]));
        let exact = match code {
            7 | 19 => Some(1),
            8 => Some(2),
            12 => Some(16),
            14 | 20 => Some(0),
            _ => None,
        };
        if exact.is_some_and(|size| size != len) {
            return false;
        }
        // The fixed part before a container's own options, or the least length.
        let (least, inner) = match code {
            9 => return false,
            13 => (2, None),
            16 => (4, None),
            17 => (4, Some(4)),
            3 | 25 => (12, Some(12)),
            4 => (4, Some(4)),
            5 => (24, Some(24)),
            26 => (25, Some(25)),
            _ => (0, None),
        };
        if len < least {
            return false;
        }
        let Some(body) = opts.get(4..4 + len) else {
            return true;
        };
        if inner.is_some_and(|skip| !options_decodable(&body[skip..], depth + 1)) {
            return false;
        }
        opts = &opts[4 + len..];
    }
    true
}

/// The addresses inside a client's IA_NA.
fn addresses(ia: &IANA) -> impl Iterator<Item = Ipv6Addr> + '_ {
    ia.opts.iter().filter_map(|o| match o {
        DhcpOption::IAAddr(a) => Some(a.addr),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::leases::MemoryLeaseStore;

    const GUEST: Mac = Mac([0x02, 0, 0, 0, 0, 0x10]);

    fn cfg() -> GatewayConfig {
        GatewayConfig::dual_stack_for_tests()
    }

    fn message(kind: MessageType, server: Option<Vec<u8>>, ia_addr: Option<Ipv6Addr>, rapid: bool) -> Vec<u8> {
        let mut m = v6::Message::new_with_id(kind, [1, 2, 3]);
        m.opts_mut()
            .insert(DhcpOption::ClientId(vec![0, 3, 0, 1, 2, 0, 0, 0, 0, 0x10]));
        if let Some(id) = server {
            m.opts_mut().insert(DhcpOption::ServerId(id));
        }
        let mut ia = IANA {
            id: 7,
            t1: 0,
            t2: 0,
            opts: Default::default(),
        };
        if let Some(addr) = ia_addr {
            ia.opts.insert(DhcpOption::IAAddr(IAAddr {
                addr,
                preferred_life: 0,
                valid_life: 0,
                opts: Default::default(),
            }));
        }
        m.opts_mut().insert(DhcpOption::IANA(ia));
        if rapid {
            m.opts_mut().insert(DhcpOption::RapidCommit);
        }
        m.to_vec().unwrap()
    }

    /// The reply's type and its IA_NA's addresses with their valid lifetimes (or the
    /// status inside the IA_NA).
    fn read(bytes: &[u8]) -> (MessageType, Vec<(Ipv6Addr, u32)>, Option<Status>) {
        let m = v6::Message::decode(&mut Decoder::new(bytes)).unwrap();
        let Some(DhcpOption::IANA(ia)) = m.opts().get(OptionCode::IANA) else {
            return (m.msg_type(), vec![], None);
        };
        let addrs = ia
            .opts
            .iter()
            .filter_map(|o| match o {
                DhcpOption::IAAddr(a) => Some((a.addr, a.valid_life)),
                _ => None,
            })
            .collect();
        let status = match ia.opts.get(OptionCode::StatusCode) {
            Some(DhcpOption::StatusCode(s)) => Some(s.status),
            _ => None,
        };
        (m.msg_type(), addrs, status)
    }

    #[test]
    fn solicit_advertises_and_request_binds_the_macs_own_address_renewals_keep_it() {
        let (cfg, c) = (cfg(), GatewayCounters::default());
        let mut store = MemoryLeaseStore::default();
        let mut s = Server6::default();
        let want = cfg.dhcp6_address_of(GUEST).unwrap();
        let ours = Server6::server_duid(&cfg);
        let adv = s
            .handle(
                &cfg,
                &c,
                &mut store,
                &message(MessageType::Solicit, None, None, false),
                GUEST,
                100,
                None,
            )
            .unwrap();
        assert_eq!(read(&adv).0, MessageType::Advertise);
        assert_eq!(read(&adv).1, vec![(want, 3600)]);
        assert!(s.bindings().next().is_none(), "an advertisement binds nothing");
        let req = message(MessageType::Request, Some(ours.clone()), Some(want), false);
        let reply = s.handle(&cfg, &c, &mut store, &req, GUEST, 100, None).unwrap();
        assert_eq!(read(&reply), (MessageType::Reply, vec![(want, 3600)], None));
        assert_eq!(store.load6().unwrap()[0].ip, want, "stored before the reply");
        // A renewal holding another address is told to drop that one.
        let stale: Ipv6Addr = "fd00:9::99".parse().unwrap();
        let renew = message(MessageType::Renew, Some(ours.clone()), Some(stale), false);
        let reply = s.handle(&cfg, &c, &mut store, &renew, GUEST, 2000, None).unwrap();
        let mut got = read(&reply).1;
        got.sort_by_key(|(_, life)| std::cmp::Reverse(*life));
        assert_eq!(got, vec![(want, 3600), (stale, 0)]);
        assert_eq!(s.bindings().next().unwrap().expires, 2000 + 3600);
        // A restarted server loads the binding back.
        let mut again = Server6::default();
        again.load(&cfg, store.load6().unwrap());
        assert_eq!(again.bindings().next().unwrap().ip, want);
        // RELEASE ends it; expiry would have too.
        let release = message(MessageType::Release, Some(ours), Some(want), false);
        s.handle(&cfg, &c, &mut store, &release, GUEST, 2001, None).unwrap();
        assert!(s.bindings().next().is_none() && store.load6().unwrap().is_empty());
    }

    #[test]
    fn rapid_commit_binds_at_once_and_a_decline_keeps_the_address_from_that_mac() {
        let (cfg, c) = (cfg(), GatewayCounters::default());
        let mut store = MemoryLeaseStore::default();
        let mut s = Server6::default();
        let want = cfg.dhcp6_address_of(GUEST).unwrap();
        let rapid = message(MessageType::Solicit, None, None, true);
        let reply = s.handle(&cfg, &c, &mut store, &rapid, GUEST, 100, None).unwrap();
        assert_eq!(read(&reply), (MessageType::Reply, vec![(want, 3600)], None));
        assert_eq!(s.bindings().count(), 1);
        let ours = Server6::server_duid(&cfg);
        let decline = message(MessageType::Decline, Some(ours), Some(want), false);
        s.handle(&cfg, &c, &mut store, &decline, GUEST, 101, None).unwrap();
        let again = s.handle(&cfg, &c, &mut store, &rapid, GUEST, 102, None).unwrap();
        assert_eq!(read(&again).2, Some(Status::NoAddrsAvail));
        let later = s.handle(&cfg, &c, &mut store, &rapid, GUEST, 102 + 600, None).unwrap();
        assert_eq!(read(&later).1, vec![(want, 3600)]);
    }

    #[test]
    fn messages_for_other_servers_or_without_a_client_id_are_not_answered() {
        let (cfg, c) = (cfg(), GatewayCounters::default());
        let mut store = MemoryLeaseStore::default();
        let mut s = Server6::default();
        let other = message(
            MessageType::Request,
            Some(vec![0, 3, 0, 1, 9, 9, 9, 9, 9, 9]),
            None,
            false,
        );
        assert_eq!(
            s.handle(&cfg, &c, &mut store, &other, GUEST, 1, None),
            Err(Ignored::NotOurs)
        );
        let unnamed = message(MessageType::Request, None, None, false);
        assert_eq!(
            s.handle(&cfg, &c, &mut store, &unnamed, GUEST, 1, None),
            Err(Ignored::Malformed)
        );
        let mut anonymous = v6::Message::new_with_id(MessageType::Solicit, [1, 2, 3]);
        anonymous.opts_mut().insert(DhcpOption::RapidCommit);
        let anonymous = anonymous.to_vec().unwrap();
        assert_eq!(
            s.handle(&cfg, &c, &mut store, &anonymous, GUEST, 1, None),
            Err(Ignored::Malformed)
        );
        assert_eq!(
            s.handle(&cfg, &c, &mut store, b"\x01", GUEST, 1, None),
            Err(Ignored::Malformed)
        );
        // Options shorter than dhcproto's fixed parts (found by the fuzzer: a Vendor
        // Class of length 0 made dhcproto subtract past zero), bare and inside an IA_NA.
        let mut short = message(MessageType::Solicit, None, None, true);
        short.extend([0, 16, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(
            s.handle(&cfg, &c, &mut store, &short, GUEST, 1, None),
            Err(Ignored::Malformed)
        );
        let mut nested = vec![1, 1, 2, 3, 0, 3, 0, 16];
        nested.extend([0; 12]);
        nested.extend([0, 13, 0, 0]);
        nested.extend([0, 1, 0, 2, 9, 9]);
        assert_eq!(
            s.handle(&cfg, &c, &mut store, &nested, GUEST, 1, None),
            Err(Ignored::Malformed)
        );
        // An Elapsed Time declaring 3 bytes: dhcproto would read 2 and go on out of step.
        let mut odd = message(MessageType::Solicit, None, None, true);
        odd.extend([0, 8, 0, 3, 0, 0, 0]);
        assert_eq!(
            s.handle(&cfg, &c, &mut store, &odd, GUEST, 1, None),
            Err(Ignored::Malformed)
        );
        assert!(s.bindings().next().is_none());
        // CONFIRM of an address off the prefix: not on link.
        let confirm = message(MessageType::Confirm, None, Some("2001:db8::1".parse().unwrap()), false);
        let reply = s.handle(&cfg, &c, &mut store, &confirm, GUEST, 1, None).unwrap();
        let m = v6::Message::decode(&mut Decoder::new(&reply)).unwrap();
        assert!(matches!(
            m.opts().get(OptionCode::StatusCode),
            Some(DhcpOption::StatusCode(StatusCode {
                status: Status::NotOnLink,
                ..
            }))
        ));
    }
}
