//! Networks and ports coming and going, port locks, captures and the MAC table view.

use super::*;

impl Fabric {
    pub(super) fn set_peer(&mut self, slot: u32, peer: UnixPeer) {
        let Some(port) = self.port_mut(slot) else {
            return;
        };
        if !port.io.set_peer(peer) {
            return;
        }
        let was_up = port.up;
        port.up = false;
        if was_up {
            debug!(port = %port.id, "peer changed to {}", peer.display());
        }
        self.mark_up(slot, Some(peer.display()));
    }

    pub(super) fn mark_up(&mut self, slot: u32, peer: Option<String>) {
        let Some(port) = self.port_mut(slot) else {
            return;
        };
        if port.up {
            return;
        }
        port.up = true;
        port.shared.up.store(true, Ordering::Relaxed);
        let id = port.id;
        debug!(port = %id, peer = peer.as_deref().unwrap_or("-"), "port up");
        self.emit(SwitchEvent::PortUp { port: id, peer });
    }

    /// The port's peer is gone: stop sending to it, forget its MACs and what waited
    /// for it, and stop polling what can never come back.
    pub(super) fn port_down(&mut self, slot: u32, reason: String) {
        let epoll = &self.epoll;
        let Some(port) = self.ports[slot as usize].as_mut() else {
            return;
        };
        let queued = port.backlog.len() as u64;
        for (b, _) in port.backlog.drain(..) {
            if self.spare.len() < SPARE_BUFFERS {
                self.spare.push(b);
            }
        }
        let queued = queued + port.io.down(epoll, slot, port.out_armed);
        port.out_armed = false;
        let was_up = mem::replace(&mut port.up, false);
        port.shared.up.store(false, Ordering::Relaxed);
        let (id, net) = (port.id, port.net);
        self.count_drop(slot, DropReason::PeerGone, queued);
        if let Some(n) = self.nets[net].as_mut() {
            n.table.purge_slot(slot);
        }
        if was_up {
            debug!(port = %id, "port down: {reason}");
            self.emit(SwitchEvent::PortDown { port: id, reason });
        }
    }

    pub(super) fn add_network(&mut self, name: String, config: NetworkConfig, shared: Arc<NetShared>) -> Result<()> {
        if self.net_by_name.contains_key(&name) {
            return Err(FabricError::NetworkExists(name));
        }
        config.validate()?;
        let net = Net {
            name: name.clone(),
            table: MacTable::new(config.mac_table_max, config.aging),
            config,
            shared,
            ports: Vec::new(),
            locked: HashMap::new(),
            full_reported: false,
            seal_new_ports: false,
            captures: Vec::new(),
        };
        let idx = match self.nets.iter().position(Option::is_none) {
            Some(i) => {
                self.nets[i] = Some(net);
                i
            }
            None => {
                self.nets.push(Some(net));
                self.nets.len() - 1
            }
        };
        self.net_by_name.insert(name, idx);
        Ok(())
    }

    pub(super) fn remove_network(&mut self, name: &str) -> Result<()> {
        let idx = *self
            .net_by_name
            .get(name)
            .ok_or_else(|| FabricError::NoSuchNetwork(name.into()))?;
        let ports = self.net(idx).ports.len();
        if ports > 0 {
            return Err(FabricError::NetworkBusy(name.into(), ports));
        }
        self.net_by_name.remove(name);
        self.nets[idx] = None;
        Ok(())
    }

    pub(super) fn add_port(&mut self, network: &str, new: NewPort) -> Result<()> {
        let net = *self
            .net_by_name
            .get(network)
            .ok_or_else(|| FabricError::NoSuchNetwork(network.into()))?;
        let slot = match self.free_slots.pop() {
            Some(s) => s,
            None => {
                self.ports.push(None);
                self.pending.push(Vec::with_capacity(BATCH));
                (self.ports.len() - 1) as u32
            }
        };
        let limits = IoLimits {
            stream_queue_bytes: self.stream_queue_bytes,
            socket_buffer_bytes: self.socket_buffer_bytes,
        };
        let io = PortIo::open(new.io, &limits);
        let up = io.up_at_once();
        if let Err(e) = io.watch(&self.epoll, slot) {
            self.free_slots.push(slot);
            return Err(FabricError::io("watch the port's fd", e));
        }
        self.ports[slot as usize] = Some(Port {
            id: new.id,
            net,
            shared: new.shared,
            io,
            up: false,
            lock: None,
            lock_to_first_mac: false,
            trusted: false,
            sealed: self.net(net).seal_new_ports,
            backlog: VecDeque::new(),
            out_armed: false,
        });
        self.by_id.insert(new.id, slot);
        self.nets[net].as_mut().expect("looked up above").ports.push(slot);
        if up {
            self.mark_up(slot, None);
        }
        Ok(())
    }

    pub(super) fn slot_of(&self, id: PortId) -> Result<u32> {
        self.by_id.get(&id).copied().ok_or(FabricError::NoSuchPort(id.0))
    }

    pub(super) fn remove_port(&mut self, id: PortId) -> Result<()> {
        let slot = self.slot_of(id)?;
        let port = self.ports[slot as usize].take().expect("indexed port exists");
        port.io.unwatch(&self.epoll);
        port.shared.up.store(false, Ordering::Relaxed);
        if let Some(net) = self.nets[port.net].as_mut() {
            net.ports.retain(|s| *s != slot);
            net.table.purge_slot(slot);
            net.locked.retain(|_, s| *s != slot);
            net.captures.retain(|tap| tap.slot != Some(slot));
            net.shared.mac_entries.store(net.table.len() as u64, Ordering::Relaxed);
        }
        for (b, _) in port.backlog {
            if self.spare.len() < SPARE_BUFFERS {
                self.spare.push(b);
            }
        }
        self.pending[slot as usize].clear();
        self.by_id.remove(&id);
        self.free_slots.push(slot);
        Ok(())
    }

    pub(super) fn lock_port(&mut self, id: PortId, lock: Option<PortLock>) -> Result<()> {
        let slot = self.slot_of(id)?;
        let net_idx = self.port(slot).expect("indexed").net;
        let net = self.nets[net_idx].as_mut().expect("port's network exists");
        if let Some(l) = &lock {
            if let Some(owner) = net.locked.get(&l.mac).filter(|s| **s != slot) {
                let owner = self.ports[*owner as usize].as_ref().map(|p| p.id.0).unwrap_or(0);
                return Err(FabricError::InvalidConfig(format!(
                    "MAC {} is already locked to port {owner}",
                    l.mac
                )));
            }
            if l.mac.is_group() {
                return Err(FabricError::InvalidConfig(format!(
                    "cannot lock a port to group address {}",
                    l.mac
                )));
            }
        }
        net.locked.retain(|_, s| *s != slot);
        if let Some(l) = &lock {
            net.locked.insert(l.mac, slot);
            // A MAC learned elsewhere before the lock now belongs to this port only.
            if net.table.lookup(&l.mac, self.clock.now()).is_some_and(|s| s != slot) {
                net.table.learn(l.mac, slot, self.clock.now());
            }
        }
        let port = self.ports[slot as usize].as_mut().expect("indexed");
        port.lock = lock;
        port.sealed = false;
        Ok(())
    }

    pub(super) fn seal_new_ports(&mut self, network: &str) -> Result<()> {
        let idx = *self
            .net_by_name
            .get(network)
            .ok_or_else(|| FabricError::NoSuchNetwork(network.into()))?;
        self.nets[idx].as_mut().expect("indexed network exists").seal_new_ports = true;
        Ok(())
    }

    pub(super) fn add_capture(&mut self, network: &str, mut tap: CaptureTap) -> Result<()> {
        let idx = *self
            .net_by_name
            .get(network)
            .ok_or_else(|| FabricError::NoSuchNetwork(network.into()))?;
        if let Some(port) = tap.port {
            let slot = self.slot_of(port)?;
            if self.port(slot).map(|p| p.net) != Some(idx) {
                return Err(FabricError::InvalidConfig(format!(
                    "port {port} is not on network {network:?}"
                )));
            }
            tap.slot = Some(slot);
        }
        self.nets[idx]
            .as_mut()
            .expect("indexed network exists")
            .captures
            .push(tap);
        Ok(())
    }

    pub(super) fn mac_table(&self, network: &str) -> Result<Vec<MacEntry>> {
        let idx = *self
            .net_by_name
            .get(network)
            .ok_or_else(|| FabricError::NoSuchNetwork(network.into()))?;
        let now = self.clock.now();
        Ok(self
            .net(idx)
            .table
            .entries(now)
            .map(|(mac, slot, age)| MacEntry {
                mac,
                port: self.port_id(slot),
                age,
            })
            .collect())
    }
}
