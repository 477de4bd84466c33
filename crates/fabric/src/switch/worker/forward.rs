//! The forwarding decision: for each frame of a batch, the port guard, learning, and
//! the destinations (its owner's port, or a flood of the network), then one send per
//! destination.

use super::*;
use crate::offload::MAX_GSO_PACKET;

impl Fabric {
    /// Decides where each frame of a batch from `src` goes, then sends. `offloads[i]`
    /// is what frame i's virtio-net header said (plain for ports without one).
    pub(super) fn forward(&mut self, src: u32, frames: &[&[u8]], offloads: &[Offload]) {
        if frames.is_empty() {
            return;
        }
        if self.ports[src as usize].as_ref().is_some_and(|p| p.lock_to_first_mac) {
            self.lock_to_first_mac(src, frames);
        }
        let now = self.clock.now();
        let Some(port) = self.ports[src as usize].as_ref() else {
            return;
        };
        let net = self.nets[port.net].as_mut().expect("port's network exists");
        let bytes: u64 = frames.iter().map(|f| f.len() as u64).sum();
        port.shared.counters.add_rx(frames.len() as u64, bytes);
        net.shared.counters.add_rx(frames.len() as u64, bytes);
        if port.sealed {
            let n = frames.len() as u64;
            port.shared.counters.add_drop(DropReason::Spoofed, n);
            net.shared.counters.add_drop(DropReason::Spoofed, n);
            return;
        }
        let mut drops = [0u64; DropReason::ALL.len()];
        let mut not_learned = 0u64;
        let (pending, dirty, ports) = (&mut self.pending, &mut self.dirty, &self.ports);
        let mut push = |dest: u32, i: usize| {
            let list = &mut pending[dest as usize];
            if list.is_empty() {
                dirty.push(dest);
            }
            list.push(i as u16);
        };
        let mut last_src: Option<Mac> = None;
        let mut last_dst: Option<(Mac, Option<u32>)> = None;
        for (i, (f, off)) in frames.iter().zip(offloads).enumerate() {
            // A segment offload may exceed the MTU; the segments it stands for may not.
            let mtu = if off.gso.is_some() {
                MAX_GSO_PACKET
            } else {
                net.config.mtu
            };
            let view = match EthernetView::parse(f, mtu) {
                Ok(v) => v,
                Err(FrameError::Runt) => {
                    drops[DropReason::Runt as usize] += 1;
                    continue;
                }
                Err(FrameError::Oversize) => {
                    drops[DropReason::Oversize as usize] += 1;
                    continue;
                }
            };
            if let Err(reason) = off.check(f, net.config.mtu) {
                drops[reason as usize] += 1;
                continue;
            }
            let smac = view.src();
            // A burst from one VM repeats its source and destination. Within a batch
            // the clock stands still and a repeated source changes nothing, so both
            // answers are reused instead of hashed again.
            let repeated_src = last_src == Some(smac);
            let stolen = !repeated_src && net.locked.get(&smac).is_some_and(|owner| *owner != src);
            if stolen {
                drops[DropReason::Spoofed as usize] += 1;
                continue;
            }
            if let Some(reason) = crate::guard::verdict(&net.config, port.lock.as_ref(), port.trusted, &view) {
                drops[reason as usize] += 1;
                continue;
            }
            let learned = if repeated_src {
                Learned::Refreshed
            } else {
                net.table.learn(smac, src, now)
            };
            last_src = Some(smac);
            match learned {
                Learned::Refreshed => {}
                Learned::New => {
                    last_dst = None;
                    net.full_reported = false;
                    emit(
                        &self.events,
                        &self.events_dropped,
                        SwitchEvent::MacLearned {
                            network: net.name.clone(),
                            mac: smac,
                            port: port.id,
                        },
                    );
                }
                Learned::Moved { from } => {
                    last_dst = None;
                    let from = ports[from as usize].as_ref().map(|p| p.id).unwrap_or(PortId(u64::MAX));
                    emit(
                        &self.events,
                        &self.events_dropped,
                        SwitchEvent::MacMoved {
                            network: net.name.clone(),
                            mac: smac,
                            from,
                            to: port.id,
                        },
                    );
                }
                Learned::Full => {
                    not_learned += 1;
                    if !net.full_reported {
                        net.full_reported = true;
                        let ev = SwitchEvent::MacTableFull {
                            network: net.name.clone(),
                        };
                        emit(&self.events, &self.events_dropped, ev);
                    }
                }
            }
            let dmac = view.dst();
            let known = match last_dst {
                _ if dmac.is_group() => None,
                Some((m, known)) if m == dmac => known,
                _ => {
                    // A locked MAC's port is known whatever the table holds: a MAC
                    // flood that fills the table cannot make a guest's unicast flood.
                    let known = net.table.lookup(&dmac, now).or_else(|| net.locked.get(&dmac).copied());
                    last_dst = Some((dmac, known));
                    known
                }
            };
            match known {
                Some(d) if d == src => drops[DropReason::NoRoute as usize] += 1,
                Some(d) => push(d, i),
                None => {
                    // A DHCP client's broadcast (or DHCPv6 multicast) is for the DHCP
                    // server only: under the guard it goes to the trusted ports, so VMs
                    // neither see each other's DHCP nor pay for flooding it, and it
                    // never crosses a tunnel to another node's gateway.
                    let only_trusted = net.config.dhcp_guard && is_dhcp_client_message(&view);
                    let mut sent = false;
                    for &d in &net.ports {
                        let eligible = ports[d as usize]
                            .as_ref()
                            .is_some_and(|p| p.up && (!only_trusted || p.trusted));
                        if d != src && eligible {
                            push(d, i);
                            sent = true;
                        }
                    }
                    if only_trusted && !sent {
                        // No trusted server on this network: behave as a plain switch.
                        for &d in &net.ports {
                            if d != src && ports[d as usize].as_ref().is_some_and(|p| p.up) {
                                push(d, i);
                            }
                        }
                    }
                }
            }
        }
        net.shared.mac_entries.store(net.table.len() as u64, Ordering::Relaxed);
        for (reason, n) in DropReason::ALL.iter().zip(drops) {
            if n > 0 {
                port.shared.counters.add_drop(*reason, n);
                net.shared.counters.add_drop(*reason, n);
            }
        }
        if not_learned > 0 {
            port.shared.counters.add_not_learned(not_learned);
            net.shared.counters.add_not_learned(not_learned);
        }
        if !net.captures.is_empty() {
            let at = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            let (pending, dirty) = (&self.pending, &self.dirty);
            let from = port.id;
            net.captures.retain(|tap| match tap.slot {
                // A whole network: each frame once, as it came in.
                None => frames.iter().all(|f| tap.offer(at, from, f)),
                // One port: what it sent, then what it is about to be sent.
                Some(p) if p == src => frames.iter().all(|f| tap.offer(at, from, f)),
                Some(p) => {
                    !dirty.contains(&p)
                        || pending[p as usize]
                            .iter()
                            .all(|i| tap.offer(at, from, frames[*i as usize]))
                }
            });
        }
        let mut dirty = mem::take(&mut self.dirty);
        for &d in &dirty {
            let list = mem::take(&mut self.pending[d as usize]);
            self.transmit(d, &list, frames, offloads);
            self.pending[d as usize] = list;
            self.pending[d as usize].clear();
        }
        dirty.clear();
        self.dirty = dirty;
    }

    /// Locks a port waiting for its first MAC to the first usable source MAC among
    /// `frames` (unicast, not locked to another port); the lock then judges them all.
    pub(super) fn lock_to_first_mac(&mut self, src: u32, frames: &[&[u8]]) {
        let Some(port) = self.ports[src as usize].as_ref() else {
            return;
        };
        let (id, net) = (port.id, self.net(port.net));
        let first = frames.iter().find_map(|f| {
            let mac = EthernetView::parse(f, net.config.mtu).ok()?.src();
            let free = net.locked.get(&mac).is_none_or(|owner| *owner == src);
            (mac.is_unicast() && free).then_some(mac)
        });
        if let Some(mac) = first {
            if self
                .lock_port(
                    id,
                    Some(PortLock {
                        mac,
                        ips: vec![],
                        ips6: vec![],
                    }),
                )
                .is_ok()
            {
                self.ports[src as usize]
                    .as_mut()
                    .expect("checked above")
                    .lock_to_first_mac = false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The decision alone: a worker whose ports are socketpairs (the far ends stand
    //! for the VMs), driven by calling `forward` directly on a hand-moved clock.
    use std::os::unix::net::UnixDatagram;

    use super::*;
    use crate::clock::ManualClock;

    struct Rig {
        fab: Fabric,
        far: Vec<UnixDatagram>,
        clock: ManualClock,
        _wake: UnixDatagram,
    }

    const A: Mac = Mac([0x02, 0, 0, 0, 0, 0x0a]);
    const B: Mac = Mac([0x02, 0, 0, 0, 0, 0x0b]);
    const C: Mac = Mac([0x02, 0, 0, 0, 0, 0x0c]);

    /// A network `n` with three ports (far ends 0, 1, 2) and `other` with one (3).
    fn rig() -> Rig {
        let (_commands_tx, commands) = std::sync::mpsc::sync_channel(1);
        let (events, _events_rx) = std::sync::mpsc::sync_channel(64);
        let clock = ManualClock::default();
        let (wake, wake_far) = UnixDatagram::pair().unwrap();
        let worker = Worker::new(WorkerSetup {
            wake: Arc::new(wake.into()),
            commands,
            events,
            events_dropped: Arc::default(),
            clock: Arc::new(clock.clone()),
            egress_queue_frames: 64,
            stream_queue_bytes: 1 << 20,
            socket_buffer_bytes: 1 << 20,
        })
        .unwrap();
        let mut fab = worker.fab;
        for net in ["n", "other"] {
            fab.add_network(net.into(), NetworkConfig::default(), Arc::default())
                .unwrap();
        }
        let mut far = Vec::new();
        for (i, net) in ["n", "n", "n", "other"].iter().enumerate() {
            let (near, vm) = UnixDatagram::pair().unwrap();
            vm.set_nonblocking(true).unwrap();
            let port = NewPort {
                id: PortId(i as u64 + 1),
                io: PortFd::Connected(near.into()),
                shared: Arc::default(),
            };
            fab.add_port(net, port).unwrap();
            far.push(vm);
        }
        Rig {
            fab,
            far,
            clock,
            _wake: wake_far,
        }
    }

    fn frame(dst: Mac, src: Mac) -> Vec<u8> {
        let mut f = vec![0u8; 60];
        f[..6].copy_from_slice(&dst.0);
        f[6..12].copy_from_slice(&src.0);
        // A local experimental EtherType: no guard has an opinion on it.
        f[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
        f
    }

    impl Rig {
        fn send(&mut self, from: usize, f: &[u8]) {
            let slot = self.fab.by_id[&PortId(from as u64 + 1)];
            self.fab.forward(slot, &[f], &[Offload::default()]);
        }

        /// Which far ends received a frame (each drained).
        fn heard(&self) -> Vec<usize> {
            let mut v = Vec::new();
            for (i, s) in self.far.iter().enumerate() {
                let mut buf = [0u8; 2048];
                let mut got = false;
                while s.recv(&mut buf).is_ok() {
                    got = true;
                }
                if got {
                    v.push(i);
                }
            }
            v
        }
    }

    #[test]
    fn unknown_destinations_flood_and_learned_ones_go_to_one_port() {
        let mut r = rig();
        r.send(0, &frame(B, A));
        assert_eq!(
            r.heard(),
            [1, 2],
            "flooded, never back to the sender nor to another network"
        );
        r.send(1, &frame(A, B));
        assert_eq!(r.heard(), [0], "A was learned on port 0");
        r.send(0, &frame(B, A));
        assert_eq!(r.heard(), [1], "B was learned on port 1");
        r.send(2, &frame(Mac::BROADCAST, C));
        assert_eq!(r.heard(), [0, 1]);
    }

    #[test]
    fn learned_entries_age_out_on_the_clock() {
        let mut r = rig();
        r.send(1, &frame(A, B));
        r.heard();
        r.send(0, &frame(B, A));
        assert_eq!(r.heard(), [1]);
        r.clock.advance(NetworkConfig::default().aging + Duration::from_secs(1));
        r.send(2, &frame(B, C));
        assert_eq!(r.heard(), [0, 1], "B aged out: flooded again");
    }

    #[test]
    fn a_frame_to_its_own_port_or_a_malformed_one_goes_nowhere_and_is_counted() {
        let mut r = rig();
        r.send(0, &frame(B, A));
        r.heard();
        r.send(0, &frame(A, A));
        assert!(r.heard().is_empty(), "A lives on port 0: nothing to send");
        r.send(0, &[0u8; 10]);
        assert!(r.heard().is_empty());
        let slot = r.fab.by_id[&PortId(1)];
        let counters = r.fab.port(slot).unwrap().shared.counters.snapshot();
        assert_eq!(
            counters
                .drops_by_reason()
                .into_iter()
                .find(|(d, _)| *d == DropReason::Runt)
                .map(|(_, n)| n),
            Some(1)
        );
    }
}
