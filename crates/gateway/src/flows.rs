//! What the NAT flow tables (TCP, UDP, ICMP) share: how many flows each guest holds, to
//! bound them per guest.

use std::collections::HashMap;
use std::net::Ipv4Addr;

#[derive(Default)]
pub(crate) struct PerGuest(HashMap<Ipv4Addr, usize>);

impl PerGuest {
    pub fn count(&self, guest: Ipv4Addr) -> usize {
        self.0.get(&guest).copied().unwrap_or(0)
    }

    pub fn add(&mut self, guest: Ipv4Addr) {
        *self.0.entry(guest).or_insert(0) += 1;
    }

    /// One of the guest's flows ended; a guest with none left is forgotten.
    pub fn release(&mut self, guest: Ipv4Addr) {
        if let Some(n) = self.0.get_mut(&guest) {
            *n -= 1;
            if *n == 0 {
                self.0.remove(&guest);
            }
        }
    }
}
