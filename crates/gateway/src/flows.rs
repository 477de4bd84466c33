//! What the NAT flow tables (TCP, UDP, ICMP) share: how many flows each guest holds, to
//! bound them per guest, and the TCP engines' budgets by direction.

use std::collections::HashMap;
use std::net::IpAddr;

use crate::tcp_nat::Direction;

#[derive(Default)]
pub(crate) struct PerGuest(HashMap<IpAddr, usize>);

impl PerGuest {
    pub fn count(&self, guest: IpAddr) -> usize {
        self.0.get(&guest).copied().unwrap_or(0)
    }

    pub fn add(&mut self, guest: IpAddr) {
        *self.0.entry(guest).or_insert(0) += 1;
    }

    /// One of the guest's flows ended; a guest with none left is forgotten.
    pub fn release(&mut self, guest: IpAddr) {
        if let Some(n) = self.0.get_mut(&guest) {
            *n -= 1;
            if *n == 0 {
                self.0.remove(&guest);
            }
        }
    }
}

/// The TCP flows a gateway holds, counted against their bounds: a guest's own
/// connections per guest and per network, forwards' against their own total. Both TCP
/// engines keep one.
#[derive(Default)]
pub(crate) struct TcpBudget {
    per_guest: PerGuest,
    egress: usize,
    forward: usize,
}

/// The bounds a [`TcpBudget`] admits within.
pub(crate) struct TcpBounds {
    pub per_guest: usize,
    pub egress: usize,
    pub forward: usize,
}

impl TcpBounds {
    pub fn of(cfg: &crate::GatewayConfig) -> TcpBounds {
        TcpBounds {
            per_guest: cfg.tcp_flows_per_guest,
            egress: cfg.tcp_flows_total,
            forward: cfg.tcp_forward_flows_total,
        }
    }
}

impl TcpBudget {
    /// Counts a new flow of `guest`'s; false (nothing counted) when it is over a bound.
    pub fn admit(&mut self, guest: IpAddr, direction: Direction, bounds: &TcpBounds) -> bool {
        match direction {
            Direction::Egress => {
                if self.per_guest.count(guest) >= bounds.per_guest || self.egress >= bounds.egress {
                    return false;
                }
                self.per_guest.add(guest);
                self.egress += 1;
            }
            Direction::Forward => {
                if self.forward >= bounds.forward {
                    return false;
                }
                self.forward += 1;
            }
        }
        true
    }

    /// A flow [`TcpBudget::admit`] counted has ended.
    pub fn release(&mut self, guest: IpAddr, direction: Direction) {
        match direction {
            Direction::Egress => {
                self.per_guest.release(guest);
                self.egress -= 1;
            }
            Direction::Forward => self.forward -= 1,
        }
    }
}
