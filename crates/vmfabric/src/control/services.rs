//! What a network's gateway serves, as the API reaches it: reservations, the egress
//! policy, forwards, NAT flows, leases, and live captures of the network.

use std::sync::Arc;

use gateway::Gateway;

use super::error::ControlError;
use super::state::{LiveCapture, State};
use super::Control;
use super::{kernel_net, kernel_rules};
use crate::model::{
    Direction, FlowsView, ForwardProto, ForwardSpec, ForwardView, LeaseView, PolicySpec, ReservationSpec, TcpFlowView,
    UdpFlowView,
};

impl Control {
    pub fn reservations(&self, network: &str) -> Result<Vec<ReservationSpec>, ControlError> {
        let st = self.lock();
        st.gateway(network)?;
        kernel_net::stored_reservations(&self.store, network)
    }

    /// Adds or replaces a reservation; it applies to the next DHCP exchange.
    pub fn reserve(&self, network: &str, r: ReservationSpec) -> Result<ReservationSpec, ControlError> {
        let st = self.lock();
        let gw = st.gateway(network)?;
        let all = kernel_net::stored_reservations(&self.store, network)?;
        if let Some(other) = all.iter().find(|o| o.ip == r.ip && o.key != r.key) {
            return Err(ControlError::conflict(format!(
                "{} is already reserved for {}",
                r.ip, other.key
            )));
        }
        if let Some(other) = all
            .iter()
            .find(|o| r.ipv6.is_some() && o.ipv6 == r.ipv6 && o.key != r.key)
        {
            return Err(ControlError::conflict(format!(
                "{} is already reserved for {}",
                r.ipv6.unwrap_or(std::net::Ipv6Addr::UNSPECIFIED),
                other.key
            )));
        }
        let spec = &st.net(network)?.spec;
        let before = all.iter().find(|o| o.key == r.key).map(|o| o.ip);
        self.claim_reservation(spec, &r.key, r.ip, r.ipv6)?;
        if let Err(e) = kernel_net::reserve(&self.store, network, Some(&gw), r.clone()) {
            self.release_reservation(spec, &r.key, r.ip);
            return Err(e);
        }
        if let Some(old) = before.filter(|old| *old != r.ip) {
            self.release_reservation(spec, &r.key, old);
        }
        Ok(r)
    }

    pub fn unreserve(&self, network: &str, key: &str) -> Result<(), ControlError> {
        let st = self.lock();
        let gw = st.gateway(network)?;
        let held = kernel_net::stored_reservations(&self.store, network)?
            .into_iter()
            .find(|o| o.key == key);
        if !kernel_net::unreserve(&self.store, network, Some(&gw), key)? {
            return Err(ControlError::NotFound(format!(
                "no reservation for {key:?} on {network:?}"
            )));
        }
        if let Some(r) = held {
            self.release_reservation(&st.net(network)?.spec, key, r.ip);
        }
        Ok(())
    }

    pub fn policy(&self, network: &str) -> Result<PolicySpec, ControlError> {
        let st = self.lock();
        st.gateway(network)?;
        kernel_net::stored_policy(&self.store, network)
    }

    /// Sets a network's egress policy; a cluster network's goes to etcd first, and
    /// every node applies it.
    pub fn set_policy(&self, network: &str, p: PolicySpec) -> Result<PolicySpec, ControlError> {
        let mut st = self.lock();
        let json = serde_json::to_string(&p).map_err(ControlError::host)?;
        self.publish_cluster_policy(&st.net(network)?.spec, &json)?;
        self.apply_policy(&mut st, network, p, &json)
    }

    /// Applies the egress policy etcd holds for a cluster network, if it is not the
    /// one applied here already.
    pub fn follow_cluster_policy(&self, network: &str, json: &str) -> Result<(), ControlError> {
        let p: PolicySpec = serde_json::from_str(json)
            .map_err(|e| ControlError::host(format!("etcd holds a policy that does not parse: {e}")))?;
        let json = serde_json::to_string(&p).map_err(ControlError::host)?;
        let mut st = self.lock();
        if !st.nets.contains_key(network) || self.store.policy(network)?.as_deref() == Some(json.as_str()) {
            return Ok(());
        }
        self.apply_policy(&mut st, network, p, &json).map(|_| ())
    }

    fn apply_policy(
        &self,
        st: &mut super::state::State,
        network: &str,
        p: PolicySpec,
        json: &str,
    ) -> Result<PolicySpec, ControlError> {
        let gw = st.gateway(network)?;
        self.store.put_policy(network, json)?;
        gw.set_egress_policy(p.to_gateway());
        if st.net(network)?.backend.is_kernel() {
            // The guests' traffic bypasses the gateway here: the kernel enforces it.
            kernel_rules::apply_rules(&self.env(), st)?;
        }
        Ok(p)
    }

    /// The network's forwards, each said dangling when no guest holds its address.
    pub fn forwards(&self, network: &str) -> Result<Vec<ForwardView>, ControlError> {
        let st = self.lock();
        let net = st.net(network)?;
        let env = self.env();
        let held = kernel_rules::held_addresses(&env, network, net);
        Ok(net
            .backend
            .forwards(&env, network, net.gateway.as_deref())?
            .into_iter()
            .map(|f| ForwardView {
                dangling: match (&held, &net.gateway) {
                    (Some(held), _) => match f.guest.ip() {
                        std::net::IpAddr::V4(ip) => !held.contains(&ip),
                        std::net::IpAddr::V6(_) => true,
                    },
                    (None, Some(gw)) => !gw.guest_at(f.guest.ip()),
                    (None, None) => false,
                },
                proto: f.proto,
                host: f.host,
                guest: f.guest,
            })
            .collect())
    }

    pub fn add_forward(&self, network: &str, f: ForwardSpec) -> Result<ForwardSpec, ControlError> {
        let mut st = self.lock();
        let env = self.env();
        let net = st.net(network)?;
        if net.backend.is_kernel() {
            let taken = st.nets.keys().any(|n| {
                kernel_net::stored_forwards(&env, n)
                    .unwrap_or_default()
                    .iter()
                    .any(|o| o.host == f.host && o.proto == f.proto)
            });
            if taken {
                return Err(ControlError::conflict(format!("{} is in use", f.host)));
            }
        }
        let (started, undo) = net.backend.add_forward(&net.spec, net.gateway.as_deref(), f)?;
        if let Err(e) = self.store.put_forward(network, &started) {
            if let (super::env::ForwardUndo::Gateway(id), Some(gw)) = (undo, &net.gateway) {
                gw.remove_forward(id);
            }
            return Err(e.into());
        }
        if net.backend.is_kernel() {
            if let Err(e) = kernel_rules::apply_rules(&env, &mut st) {
                let _ = self.store.delete_forward(&started.host.to_string(), started.proto);
                return Err(e);
            }
        }
        Ok(started)
    }

    /// Removes the forwards from `host`: both protocols unless `proto` names one. A
    /// stored forward that could not be restored (its host port was taken) goes too.
    pub fn remove_forward(&self, network: &str, host: &str, proto: Option<&str>) -> Result<(), ControlError> {
        let mut st = self.lock();
        let env = self.env();
        let only = proto.map(str::parse::<ForwardProto>).transpose()?;
        let wanted = |f: &ForwardSpec| f.host.to_string() == host && only.is_none_or(|p| p == f.proto);
        let net = st.net(network)?;
        let stored: Vec<ForwardSpec> = kernel_net::stored_forwards(&env, network)?
            .into_iter()
            .filter(wanted)
            .collect();
        let live = net
            .backend
            .forwards(&env, network, net.gateway.as_deref())?
            .into_iter()
            .any(|f| wanted(&f));
        if stored.is_empty() && !live {
            return Err(ControlError::NotFound(format!("no forward from {host} on {network:?}")));
        }
        for f in &stored {
            self.store.delete_forward(host, f.proto)?;
        }
        net.backend.remove_forwards(net.gateway.as_deref(), &wanted);
        if net.backend.is_kernel() {
            kernel_rules::apply_rules(&env, &mut st)?;
        }
        Ok(())
    }

    /// Puts a restored gateway's stored policy and forwards back in force. A forward
    /// whose host port is taken stays stored (DELETE removes it) and is logged.
    pub(super) fn restore_gateway_state(&self, st: &State, network: &str, gw: &Gateway) {
        match kernel_net::stored_policy(&self.store, network) {
            Ok(p) => gw.set_egress_policy(p.to_gateway()),
            Err(e) => tracing::warn!(%network, "stored policy unusable: {e}"),
        }
        if st.nets.get(network).is_some_and(|n| n.backend.is_kernel()) {
            return; // in nftables, written with the other kernel rules
        }
        for f in kernel_net::stored_forwards(&self.env(), network).unwrap_or_default() {
            if let Err(e) = gw.add_forward(f.proto.to_gateway(), f.host, f.guest) {
                tracing::error!(%network, host = %f.host, "cannot restore the forward (it stays stored; DELETE removes it): {e}");
            }
        }
    }

    /// The NAT flows the network's gateway carries now.
    pub fn flows(&self, network: &str) -> Result<FlowsView, ControlError> {
        let gw: Arc<Gateway> = self.lock().gateway(network)?;
        let mut tcp: Vec<TcpFlowView> = gw
            .tcp_flows()
            .into_iter()
            .map(|f| TcpFlowView {
                guest: f.guest,
                peer: f.peer,
                direction: match f.direction {
                    gateway::tcp_nat::Direction::Egress => Direction::Egress,
                    gateway::tcp_nat::Direction::Forward => Direction::Forward,
                },
                state: f.state,
            })
            .collect();
        tcp.sort_by_key(|f| (f.guest, f.peer));
        let mut udp: Vec<UdpFlowView> = gw
            .udp_flows()
            .into_iter()
            .map(|f| UdpFlowView {
                guest: f.guest,
                dst: f.dst,
            })
            .collect();
        udp.sort_by_key(|f| (f.guest, f.dst));
        Ok(FlowsView { tcp, udp })
    }

    pub fn leases(&self, network: &str) -> Result<Vec<LeaseView>, ControlError> {
        let st = self.lock();
        Ok(st
            .net(network)?
            .gateway
            .as_ref()
            .map(|g| LeaseView::of(g.leases(), &g.leases6()))
            .unwrap_or_default())
    }

    /// Starts a live capture of a network, or of one of its ports. At most
    /// [`MAX_CAPTURES`] run at once; each one's losses show in `/metrics`.
    pub fn capture(&self, network: &str, port: Option<&str>) -> Result<CaptureHandle, ControlError> {
        let mut st = self.lock();
        if st.captures.live.len() >= MAX_CAPTURES {
            return Err(ControlError::Busy(format!(
                "{MAX_CAPTURES} captures are running, the limit: end one first"
            )));
        }
        let net = st.net(network)?;
        let port_id = match port {
            Some(p) => Some(net.port(network, p)?.handle.switch_port().ok_or_else(|| {
                ControlError::invalid(format!(
                    "{p:?} is a kernel-mode port: capture it on its TAP device (tcpdump -i {})",
                    net.ports[p].rec.path
                ))
            })?),
            None => None,
        };
        // A few thousand frames of slack; a reader slower than that loses copies.
        let capture = self.switch.capture(network, port_id, 4096)?;
        let id = st.captures.next_id;
        st.captures.next_id += 1;
        st.captures.live.insert(
            id,
            LiveCapture {
                network: network.to_string(),
                lost: capture.loss_counter(),
            },
        );
        Ok(CaptureHandle {
            capture,
            id,
            state: Arc::downgrade(&self.state),
        })
    }
}

impl Control {
    /// What a capture calls the port `id` of `network`: its name, `gateway` for the
    /// gateway's, or its number for one gone since.
    pub fn port_label(&self, network: &str, id: fabric::PortId) -> String {
        let st = self.lock();
        if let Some((_, name)) = st.index.get(&id) {
            return name.clone();
        }
        let gateway = st.nets.get(network).and_then(|n| n.gateway.as_ref()).map(|g| g.port());
        if gateway == Some(id) {
            return "gateway".into();
        }
        id.to_string()
    }
}

/// How many live captures may run at once: each copies every frame of its network
/// through a channel, so an unbounded number would cut forwarding for everyone
/// (measured: 100 unread captures took forwarding from 120k to 24k frames/s).
pub const MAX_CAPTURES: usize = 16;

/// A running capture; it stops counting against the limit when dropped.
pub struct CaptureHandle {
    pub capture: fabric::Capture,
    id: u64,
    state: std::sync::Weak<std::sync::Mutex<State>>,
}

impl Drop for CaptureHandle {
    fn drop(&mut self) {
        let Some(state) = self.state.upgrade() else { return };
        let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = st.captures.live.remove(&self.id) {
            let lost = c.lost.load(std::sync::atomic::Ordering::Relaxed);
            *st.captures.ended_lost.entry(c.network).or_default() += lost;
        }
    }
}
