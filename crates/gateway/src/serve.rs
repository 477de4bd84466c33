//! The gateway's frame loop, its supervisor, and the timers of the TCP stack.

use std::net::Ipv4Addr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::*;

/// Runs the gateway's frame loop, and runs it again if it ever dies of a panic that
/// escaped the handlers' containment: the leases, flows and names live in `Shared`
/// and outlive the loop, so a restart loses at most the frames in hand.
pub(crate) async fn supervise(shared: Arc<Shared>, sock: Arc<crate::port::GatewayPort>) {
    /// Aborts the loop when the supervisor itself is aborted (the gateway dropped).
    struct AbortOnDrop(tokio::task::JoinHandle<()>);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    loop {
        let mut run = AbortOnDrop(tokio::spawn(serve(shared.clone(), sock.clone())));
        match (&mut run.0).await {
            // The loop returns only when the port is gone: the gateway was removed.
            Ok(()) => return,
            Err(e) if e.is_panic() => {
                shared.panics.record(contain::Service::Task);
                tracing::error!(subnet = %shared.ctx.cfg().subnet, "gateway task panicked; restarting it with its leases");
                // A pause, so an input that kills the loop every time cannot spin a core.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(_) => return,
        }
    }
}

pub(crate) async fn serve(shared: Arc<Shared>, sock: Arc<crate::port::GatewayPort>) {
    // Answers of forwarded TCP queries come back here, to be written by this task.
    let (tcp_tx, mut tcp_rx) = tokio::sync::mpsc::unbounded_channel::<(smoltcp::iface::SocketHandle, Vec<u8>)>();
    // Its first tick is at once: a network's gateway announces itself when it starts.
    let mut advertise = tokio::time::interval(shared.ctx.cfg().router_advert_interval);
    advertise.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let (next, tcp_delay) = {
            let mut st = shared.state();
            (st.dhcp.next_expiry(), st.tcp.poll_delay())
        };
        let nat_delay = shared.tcp.nat.lock().unwrap_or_else(|p| p.into_inner()).poll_delay();
        let sleep = match next {
            Some(at) => Duration::from_secs(at.saturating_sub(unix_now())),
            None => Duration::from_secs(24 * 3600),
        };
        let tcp_sleep = tcp_delay.unwrap_or(Duration::from_secs(24 * 3600));
        let nat_sleep = nat_delay.unwrap_or(Duration::from_secs(24 * 3600));
        tokio::select! {
            r = sock.recv() => match r {
                Ok(first) => {
                    // Take what else is waiting too, up to a batch, and run the TCP
                    // stacks once for all of it.
                    let mut tcp_touched = false;
                    let mut next = Some(first);
                    let mut taken = 0;
                    while let Some((frame, offload)) = next {
                        #[cfg(test)]
                        tests::panic_if_marked(&frame, tests::TASK_MARK);
                        let (replies, touched) = handle_frame(&shared, &sock, &frame, &offload);
                        sock.recycle(frame);
                        tcp_touched |= touched;
                        for reply in replies {
                            let _ = sock.send(&reply).await;
                        }
                        taken += 1;
                        next = if taken < BATCH { sock.try_recv() } else { None };
                    }
                    shared.tcp.nat.lock().unwrap_or_else(|p| p.into_inner()).poll_pending();
                    if let Some(splice) = &shared.splice {
                        splice.after_batch();
                    }
                    if tcp_touched {
                        run_tcp(&shared, &sock, &tcp_tx).await;
                    }
                }
                Err(e) => {
                    tracing::warn!("gateway port closed: {e}");
                    return;
                }
            },
            Some((handle, answer)) = tcp_rx.recv() => {
                shared.state().tcp.deliver(handle, &answer);
                run_tcp(&shared, &sock, &tcp_tx).await;
            }
            _ = tokio::time::sleep(tcp_sleep) => run_tcp(&shared, &sock, &tcp_tx).await,
            _ = tokio::time::sleep(nat_sleep) => shared.tcp.nat.lock().unwrap_or_else(|p| p.into_inner()).poll(),
            _ = advertise.tick() => {
                let ra = crate::ndp::unsolicited_advert(&shared.ctx.cfg(), &shared.ctx.counters);
                if let Some(frame) = ra {
                    let _ = sock.send(&frame).await;
                }
            }
            _ = tokio::time::sleep(sleep) => {
                let gone = shared.state().dhcp.expire(unix_now());
                for ev in gone {
                    shared.emit(ev);
                }
                shared.emit_dhcp6();
            }
        }
    }
}

/// Runs the TCP DNS stack, sends what it produced and forwards what it must.
pub(crate) async fn run_tcp(
    shared: &Arc<Shared>,
    sock: &Arc<crate::port::GatewayPort>,
    answers: &tokio::sync::mpsc::UnboundedSender<(smoltcp::iface::SocketHandle, Vec<u8>)>,
) {
    let out = {
        let mut st = shared.state();
        let State { tcp, zone, .. } = &mut *st;
        match contain::contained(&shared.panics, contain::Service::DnsTcp, &[], || tcp.poll(zone)) {
            Some(out) => out,
            None => {
                // The stack's state is unknown after a panic inside it: start it anew
                // (its connections are lost; the clients retry).
                *tcp = new_tcp_dns(&shared.ctx.cfg(), &shared.ctx.counters);
                return;
            }
        }
    };
    let c = &shared.ctx.counters;
    c.dns_local.fetch_add(out.local, Ordering::Relaxed);
    c.dns_nxdomain.fetch_add(out.nxdomain, Ordering::Relaxed);
    c.dns_malformed.fetch_add(out.malformed, Ordering::Relaxed);
    c.dns_tcp_refused.fetch_add(out.refused, Ordering::Relaxed);
    for frame in out.frames {
        let _ = sock.send(&frame).await;
    }
    for (handle, query, qname) in out.forward {
        let client = Ipv4Addr::UNSPECIFIED.into(); // TCP connections share one in-flight budget
        spawn_forward(
            shared,
            sock,
            query,
            qname,
            client,
            ReplyTo::Tcp(handle),
            Some(answers.clone()),
        );
    }
}
