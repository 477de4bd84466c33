//! The translator at work: a guest's SYN becomes a host connection (or a refusal),
//! a host client of a forward becomes a connection to the guest, and each pair of
//! ends is relayed until both are done.

use super::*;

pub(super) fn lock(nat: &Mutex<TcpNat>) -> MutexGuard<'_, TcpNat> {
    nat.lock().unwrap_or_else(|p| p.into_inner())
}

/// Takes a guest's TCP segment routed through the gateway; returns frames to send now.
/// The caller runs the stack ([`TcpNat::poll_pending`]) after its batch of frames.
pub(crate) fn inbound(
    svc: &Arc<TcpService>,
    port: &Arc<crate::port::GatewayPort>,
    frame: &[u8],
    head: TcpHead,
) -> Vec<Vec<u8>> {
    let key = FlowKey {
        guest: head.src,
        peer: head.dst,
    };
    let mut nat = lock(&svc.nat);
    match nat.flows.get(&key).map(|f| &f.slot) {
        Some(Slot::Open(_)) => {}
        // The guest retransmits its SYN while the host side connects: the first one
        // is held, the copies are not needed.
        Some(Slot::Connecting) => return vec![],
        None if head.is_open() => {
            drop(nat);
            return open(svc, port, frame, head, key);
        }
        // Anything else for no connection: the stack answers with RST.
        None => {}
    }
    nat.input(frame);
    vec![]
}

/// A guest's new connection: checked, counted, then connected from the host.
pub(super) fn open(
    svc: &Arc<TcpService>,
    port: &Arc<crate::port::GatewayPort>,
    syn: &[u8],
    head: TcpHead,
    key: FlowKey,
) -> Vec<Vec<u8>> {
    let cfg = &svc.ctx.cfg();
    let c = &svc.ctx.counters;
    let dst = key.peer.ip();
    // The gateway's own address never leads to the host; and this engine's stack is
    // IPv4 only (the splice, the default, carries IPv6).
    let IpAddr::V4(dst_v4) = dst else {
        return wire::tcp_reset(cfg.gateway_mac, &head).into_iter().collect();
    };
    if cfg.is_gateway_ip(dst_v4) {
        return wire::tcp_reset(cfg.gateway_mac, &head).into_iter().collect();
    }
    if svc.ctx.egress.refused(dst, key.peer.port(), crate::policy::Proto::Tcp) {
        return wire::tcp_reset(cfg.gateway_mac, &head).into_iter().collect();
    }
    if !lock(&svc.nat).admit(key, Direction::Egress, &crate::flows::TcpBounds::of(cfg)) {
        GatewayCounters::inc(&c.nat_tcp_bounded);
        return wire::tcp_reset(cfg.gateway_mac, &head).into_iter().collect();
    }
    let target = cfg.egress_target(key.peer);
    // Started without blocking: a local destination (the host's loopback above all)
    // usually completes at once, and then the guest gets its SYN-ACK in this same turn.
    let socket = match start_connect(target) {
        Ok(s) if !crate::fd_budget::admits(&s) => {
            GatewayCounters::inc(&c.fd_budget_refused);
            lock(&svc.nat).forget(&key);
            return wire::tcp_reset(cfg.gateway_mac, &head).into_iter().collect();
        }
        Ok(s) => s,
        Err(e) => return refuse(svc, key, head, target, e),
    };
    match connect_outcome(&socket) {
        Some(Ok(())) => match host_stream(socket) {
            Ok(stream) => connected(svc, key, syn, head, stream),
            Err(e) => refuse(svc, key, head, target, e),
        },
        Some(Err(e)) => refuse(svc, key, head, target, e),
        None => {
            let (svc, port, syn) = (svc.clone(), port.clone(), syn.to_vec());
            tokio::spawn(async move {
                let answer = match finish_connect(socket, svc.ctx.cfg().tcp_connect_timeout).await {
                    Ok(stream) => connected(&svc, key, &syn, head, stream),
                    Err(e) => refuse(&svc, key, head, target, e),
                };
                for frame in answer {
                    let _ = port.send(&frame).await;
                }
            });
            vec![]
        }
    }
}

/// A non-blocking TCP socket with its connect to `target` under way.
pub(crate) fn start_connect(target: SocketAddr) -> std::io::Result<OwnedFd> {
    use rustix::net::{AddressFamily, SocketFlags, SocketType};
    let family = if target.is_ipv6() {
        AddressFamily::INET6
    } else {
        AddressFamily::INET
    };
    let fd = rustix::net::socket_with(
        family,
        SocketType::STREAM,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        None,
    )?;
    match rustix::net::connect(&fd, &target) {
        Ok(()) | Err(rustix::io::Errno::INPROGRESS) => Ok(fd),
        Err(e) => Err(e.into()),
    }
}

/// Whether the connect has ended (and how) without waiting.
pub(crate) fn connect_outcome(fd: &OwnedFd) -> Option<std::io::Result<()>> {
    use rustix::event::{PollFd, PollFlags};
    let mut fds = [PollFd::new(fd, PollFlags::OUT)];
    match rustix::event::poll(&mut fds, Some(&rustix::event::Timespec::default())) {
        Ok(1) => Some(match rustix::net::sockopt::socket_error(fd) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) | Err(e) => Err(e.into()),
        }),
        _ => None,
    }
}

pub(super) async fn finish_connect(fd: OwnedFd, timeout: Duration) -> std::io::Result<TcpStream> {
    let stream = host_stream(fd)?;
    match tokio::time::timeout(timeout, stream.writable()).await {
        Ok(Ok(())) => match stream.take_error()? {
            None => Ok(stream),
            Some(e) => Err(e),
        },
        Ok(Err(e)) => Err(e),
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

pub(super) fn host_stream(fd: OwnedFd) -> std::io::Result<TcpStream> {
    let stream = TcpStream::from_std(std::net::TcpStream::from(fd))?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// The host side refused or failed: the guest's connect fails the same way (RST for a
/// refusal, ICMP host unreachable otherwise).
pub(super) fn refuse(
    svc: &TcpService,
    key: FlowKey,
    head: TcpHead,
    target: SocketAddr,
    e: std::io::Error,
) -> Vec<Vec<u8>> {
    lock(&svc.nat).forget(&key);
    refusal(&svc.ctx, head, target, e)
}

/// How a guest hears that its connect failed on the host side (counted): RST for a
/// refusal, ICMP host unreachable otherwise. Both engines answer so.
pub(crate) fn refusal(ctx: &Ctx, head: TcpHead, target: SocketAddr, e: std::io::Error) -> Vec<Vec<u8>> {
    let cfg = ctx.cfg();
    GatewayCounters::inc(&ctx.counters.nat_tcp_refused);
    tracing::debug!(%target, "guest connect failed on the host side: {e}");
    let answer = if e.kind() == std::io::ErrorKind::ConnectionRefused {
        wire::tcp_reset(cfg.gateway_mac, &head)
    } else {
        Some(ctx.unreachable(&head.origin, wire::Unreachable::Host))
    };
    answer.into_iter().collect()
}

/// The host side is up: a socket takes the held SYN (its SYN-ACK leaves through the
/// outbox) and a task starts relaying. Returns frames to send (a RST if it failed).
pub(super) fn connected(
    svc: &Arc<TcpService>,
    key: FlowKey,
    syn: &[u8],
    head: TcpHead,
    stream: TcpStream,
) -> Vec<Vec<u8>> {
    let opened = {
        let mut nat = lock(&svc.nat);
        let opened = nat.accept(key, syn, DEAD_PEER);
        nat.poll();
        // A SYN the socket did not take (it cannot happen for a SYN we classified,
        // but a stuck listener would hold the slot forever).
        let taken = opened
            .as_ref()
            .is_some_and(|(h, _)| nat.sockets.get::<tcp::Socket>(*h).state() != tcp::State::Listen);
        if !taken {
            nat.forget(&key);
        }
        opened.filter(|_| taken)
    };
    let Some((handle, notify)) = opened else {
        return wire::tcp_reset(svc.ctx.cfg().gateway_mac, &head).into_iter().collect();
    };
    GatewayCounters::inc(&svc.ctx.counters.nat_tcp_flows);
    tokio::spawn(relay(svc.clone(), key, handle, notify, stream));
    vec![]
}

/// Connects a forward's host client to `guest` through the stack.
pub(crate) async fn forward_client(svc: Arc<TcpService>, guest: SocketAddrV4, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let opened = {
        let mut nat = lock(&svc.nat);
        nat.connect(guest, svc.ctx.cfg().gateway_ip, &svc.ctx.cfg())
    };
    let Some(opened) = opened else {
        GatewayCounters::inc(&svc.ctx.counters.nat_tcp_bounded);
        reset(&stream);
        return;
    };
    lock(&svc.nat).poll();
    GatewayCounters::inc(&svc.ctx.counters.nat_tcp_flows);
    relay(svc, opened.key, opened.handle, opened.notify, stream).await;
}

/// Closes the host socket with a reset rather than a FIN.
pub(super) fn reset(stream: &TcpStream) {
    let _ = rustix::net::sockopt::set_socket_linger(stream, Some(Duration::ZERO));
}

/// States in which the guest has sent its FIN.
pub(super) fn guest_finished(state: tcp::State) -> bool {
    use tcp::State::*;
    matches!(state, CloseWait | LastAck | Closing | TimeWait)
}

/// Moves bytes between a connection's smoltcp socket and its host socket until both
/// sides are done.
pub(super) async fn relay(
    svc: Arc<TcpService>,
    key: FlowKey,
    handle: SocketHandle,
    notify: Arc<Notify>,
    stream: TcpStream,
) {
    let c = &svc.ctx.counters;
    let (mut host_eof, mut host_shut, mut host_failed, mut established) = (false, false, false, false);
    loop {
        let (mut want_read, mut want_write) = (false, false);
        let finished = {
            let mut nat = lock(&svc.nat);
            let s = nat.sockets.get_mut::<tcp::Socket>(handle);
            if !established && s.state() == tcp::State::Established {
                established = true;
                s.set_timeout(Some(DEAD_PEER.into()));
                s.set_keep_alive(Some(KEEP_ALIVE.into()));
            }
            // Guest to host, as far as the host socket takes it.
            while s.can_recv() && !host_failed {
                let wrote = s.recv(|buf| match stream.try_write(buf) {
                    Ok(n) => (n, Ok(n)),
                    Err(e) => (0, Err(e)),
                });
                match wrote {
                    Ok(Ok(n)) => {
                        c.nat_tcp_tx_bytes.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Ok(Err(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        want_write = true;
                        break;
                    }
                    Ok(Err(_)) => host_failed = true,
                    Err(_) => break,
                }
            }
            if !host_shut && !host_failed && guest_finished(s.state()) && s.recv_queue() == 0 {
                host_shut = true;
                let _ = rustix::net::shutdown(&stream, rustix::net::Shutdown::Write);
            }
            // Host to guest, as far as the guest's side has room.
            while !host_eof && !host_failed && s.can_send() {
                let read = s.send(|buf| match stream.try_read(buf) {
                    Ok(n) => (n, Ok(n)),
                    Err(e) => (0, Err(e)),
                });
                match read {
                    Ok(Ok(0)) => {
                        host_eof = true;
                        s.close();
                    }
                    Ok(Ok(n)) => {
                        c.nat_tcp_rx_bytes.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Ok(Err(e)) if e.kind() == std::io::ErrorKind::WouldBlock => want_read = true,
                    Ok(Err(_)) => host_failed = true,
                    Err(_) => break,
                }
                if want_read {
                    break;
                }
            }
            if host_failed {
                s.abort();
            }
            let state = s.state();
            let finished = matches!(state, tcp::State::Closed | tcp::State::TimeWait);
            // Run the stack before forgetting the socket, so its last RST or ACK leaves.
            nat.poll();
            if finished {
                nat.forget(&key);
            }
            finished
        };
        if finished {
            // Both FINs passed on: an orderly end. Anything else: the guest reset it.
            if !(host_eof && host_shut) {
                reset(&stream);
            }
            return;
        }
        tokio::select! {
            _ = notify.notified() => {}
            _ = stream.readable(), if want_read => {}
            _ = stream.writable(), if want_write => {}
        }
    }
}

/// Writes the outbox whenever the port had no room for the stack's frames.
pub(crate) async fn write_outbox(svc: Arc<TcpService>) {
    let (writer, port) = {
        let nat = lock(&svc.nat);
        (nat.writer.clone(), nat.port.clone())
    };
    loop {
        writer.notified().await;
        while !lock(&svc.nat).flush() {
            if port.writable().await.is_err() {
                return;
            }
        }
    }
}

/// The connections now carried, for the control plane.
pub(crate) fn list(svc: &TcpService) -> Vec<TcpFlowInfo> {
    lock(&svc.nat).list()
}
