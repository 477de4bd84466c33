//! The one thread that joins what the layers report: switch events (ports up and
//! down, MACs learned) and gateways' lease events go to the port locker, and a learned
//! MAC names its VM after its port in the gateway's DNS. It takes the control lock
//! per event; the switch and the gateways never wait for it (their event channels
//! drop when full).

use std::sync::{mpsc, Arc, Mutex};

use fabric::SwitchEvent;

use super::locks::ControlEvent;
use super::state::State;

/// Starts the thread over `events` and a forwarder of the switch's events into it.
pub(super) fn spawn(
    state: Arc<Mutex<State>>,
    switch_events: mpsc::Receiver<SwitchEvent>,
    tx: mpsc::Sender<ControlEvent>,
    rx: mpsc::Receiver<ControlEvent>,
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
            for ev in rx {
                log(&ev);
                let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
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
