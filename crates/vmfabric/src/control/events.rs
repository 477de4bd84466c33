//! The one thread that joins what the layers report: switch events (ports up and
//! down, MACs learned) and gateways' lease events go to the port locker, and a learned
//! MAC names its VM after its port in the gateway's DNS. It takes the control lock
//! per event; the switch and the gateways never wait for it (their event channels
//! drop when full). What operators want to follow goes out on the [`EventBus`] too,
//! with policy refusals sampled once a second.

use std::collections::HashMap;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use fabric::SwitchEvent;

use super::locks::ControlEvent;
use super::state::State;
use crate::model::{Event, EventView};

/// Events for `GET /v1/events`: a broadcast of JSON lines. Publishing never waits; a
/// reader that falls behind by more than the channel holds is told how many it missed.
#[derive(Clone)]
pub struct EventBus(tokio::sync::broadcast::Sender<Arc<str>>);

impl Default for EventBus {
    fn default() -> Self {
        EventBus(tokio::sync::broadcast::channel(1024).0)
    }
}

impl EventBus {
    pub fn publish(&self, event: Event) {
        if self.0.receiver_count() == 0 {
            return;
        }
        let view = EventView {
            time: jiff::Timestamp::now()
                .round(jiff::Unit::Millisecond)
                .unwrap_or_else(|_| jiff::Timestamp::now())
                .to_string(),
            event,
        };
        let line = serde_json::to_string(&view).expect("plain data") + "\n";
        let _ = self.0.send(line.into());
    }

    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Arc<str>> {
        self.0.subscribe()
    }

    pub fn readers(&self) -> usize {
        self.0.receiver_count()
    }
}

/// What a switch or lease event is for operators, with ports by name.
fn operator_event(st: &State, ev: &ControlEvent) -> Option<Event> {
    let port = |id: &fabric::PortId| st.index.get(id).cloned();
    Some(match ev {
        ControlEvent::Switch(SwitchEvent::PortUp { port: id, peer }) => {
            let (network, port) = port(id)?;
            Event::PortUp {
                network,
                port,
                peer: peer.clone(),
            }
        }
        ControlEvent::Switch(SwitchEvent::PortDown { port: id, reason }) => {
            let (network, port) = port(id)?;
            Event::PortDown {
                network,
                port,
                reason: reason.clone(),
            }
        }
        ControlEvent::Switch(SwitchEvent::MacMoved { network, mac, from, to }) => Event::MacMoved {
            network: network.clone(),
            mac: mac.to_string(),
            from: port(from).map_or_else(|| from.to_string(), |(_, p)| p),
            to: port(to).map_or_else(|| to.to_string(), |(_, p)| p),
        },
        ControlEvent::Switch(SwitchEvent::MacTableFull { network }) => Event::MacTableFull {
            network: network.clone(),
        },
        ControlEvent::Switch(SwitchEvent::MacLearned { .. }) => return None,
        ControlEvent::Lease { network, event } => match event {
            gateway::LeaseEvent::Bound(l) => Event::LeaseBound {
                network: network.clone(),
                ip: l.ip,
                mac: l.mac.to_string(),
                hostname: l.hostname.clone(),
            },
            gateway::LeaseEvent::Released { ip, mac } => Event::LeaseReleased {
                network: network.clone(),
                ip: *ip,
                mac: mac.to_string(),
            },
            gateway::LeaseEvent::Expired { ip, mac } => Event::LeaseExpired {
                network: network.clone(),
                ip: *ip,
                mac: mac.to_string(),
            },
            gateway::LeaseEvent::Bound6 { mac, ip } => Event::Lease6Bound {
                network: network.clone(),
                ip: *ip,
                mac: mac.to_string(),
            },
            gateway::LeaseEvent::Ended6 { mac, ip } => Event::Lease6Ended {
                network: network.clone(),
                ip: *ip,
                mac: mac.to_string(),
            },
        },
    })
}

/// Each network's egress refusals since the last sample, as events.
fn sample_refusals(st: &State, seen: &mut HashMap<String, u64>, bus: &EventBus) {
    seen.retain(|name, _| st.nets.contains_key(name));
    for (name, net) in &st.nets {
        let Some(now) = net.gateway.as_ref().and_then(|g| g.counters().get("egress_denied")) else {
            continue;
        };
        // A gateway's counters start at zero: a network seen first counts from there.
        let before = seen.insert(name.clone(), now).unwrap_or(0);
        if now > before {
            bus.publish(Event::PolicyRefused {
                network: name.clone(),
                refused: now - before,
            });
        }
    }
}

/// Starts the thread over `events` and a forwarder of the switch's events into it.
pub(super) fn spawn(
    state: Arc<Mutex<State>>,
    switch_events: mpsc::Receiver<SwitchEvent>,
    tx: mpsc::Sender<ControlEvent>,
    rx: mpsc::Receiver<ControlEvent>,
    bus: EventBus,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("switch-events".into())
        .spawn(move || {
            for ev in switch_events {
                if tx.send(ControlEvent::Switch(ev)).is_err() {
                    break;
                }
            }
        })?;
    std::thread::Builder::new()
        .name("control-events".into())
        .spawn(move || {
            let mut refusals = HashMap::new();
            let mut sampled = Instant::now();
            loop {
                let ev = match rx.recv_timeout(Duration::from_secs(1)) {
                    Ok(ev) => Some(ev),
                    Err(mpsc::RecvTimeoutError::Timeout) => None,
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                };
                let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
                if sampled.elapsed() >= Duration::from_secs(1) {
                    sampled = Instant::now();
                    sample_refusals(&st, &mut refusals, &bus);
                }
                let Some(ev) = ev else { continue };
                log(&ev);
                if let Some(e) = operator_event(&st, &ev) {
                    bus.publish(e);
                }
                if let ControlEvent::Switch(SwitchEvent::MacLearned { network, mac, port }) = &ev {
                    let label = st.index.get(port).map(|(_, name)| name.clone());
                    let gw = st.nets.get(network).and_then(|n| n.gateway.clone());
                    if let (Some(label), Some(gw)) = (label, gw) {
                        gw.set_name_hint(*mac, &label);
                    }
                }
                st.locker.handle(&ev);
            }
        })?;
    Ok(())
}

fn log(ev: &ControlEvent) {
    match ev {
        ControlEvent::Switch(SwitchEvent::PortUp { port, peer }) => {
            tracing::info!(%port, peer = peer.as_deref().unwrap_or("-"), "port up")
        }
        ControlEvent::Switch(SwitchEvent::PortDown { port, reason }) => tracing::info!(%port, %reason, "port down"),
        ControlEvent::Switch(SwitchEvent::MacTableFull { network }) => tracing::warn!(%network, "MAC table full"),
        ControlEvent::Switch(other) => tracing::debug!(?other, "switch event"),
        ControlEvent::Lease { network, event } => match event {
            gateway::LeaseEvent::Bound(l) => {
                let name = l.hostname.as_deref().unwrap_or("-");
                tracing::info!(%network, ip = %l.ip, mac = %l.mac, name, "lease bound")
            }
            other => tracing::info!(%network, ?other, "lease ended"),
        },
    }
}

/// Feeds a gateway's lease events into the events thread until the gateway goes.
pub(super) fn forward_leases(
    network: String,
    leases: mpsc::Receiver<gateway::LeaseEvent>,
    tx: mpsc::Sender<ControlEvent>,
) {
    let spawned = std::thread::Builder::new()
        .name(format!("leases-{network}"))
        .spawn(move || {
            for event in leases {
                let ev = ControlEvent::Lease {
                    network: network.clone(),
                    event,
                };
                if tx.send(ev).is_err() {
                    break;
                }
            }
        });
    if let Err(e) = spawned {
        tracing::error!("cannot start a lease-event thread: {e}");
    }
}
