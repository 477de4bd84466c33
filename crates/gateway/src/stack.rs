//! The plumbing between the gateway's frame loop and its smoltcp interfaces (TCP DNS
//! and TCP NAT): a device that is two frame queues.

use std::collections::VecDeque;

use smoltcp::phy::{Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetFrame, EthernetProtocol};

/// Frames in and out of a smoltcp interface.
#[derive(Default)]
pub(crate) struct Queue {
    pub rx: VecDeque<Vec<u8>>,
    pub tx: Vec<Vec<u8>>,
    mtu: usize,
}

impl Queue {
    pub fn new(mtu: usize) -> Queue {
        Queue {
            mtu,
            ..Default::default()
        }
    }

    /// What the stack sent, less ARP replies: the gateway's own responder has answered.
    pub fn take_sent(&mut self) -> Vec<Vec<u8>> {
        self.tx.drain(..).filter(|f| !is_arp_reply(f)).collect()
    }
}

pub(crate) struct Rx(Vec<u8>);
pub(crate) struct Tx<'a>(&'a mut Vec<Vec<u8>>);

impl RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = vec![0u8; len];
        let r = f(&mut buf);
        self.0.push(buf);
        r
    }
}

impl Device for Queue {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;

    fn receive(&mut self, _: Instant) -> Option<(Rx, Tx<'_>)> {
        let frame = self.rx.pop_front()?;
        Some((Rx(frame), Tx(&mut self.tx)))
    }

    fn transmit(&mut self, _: Instant) -> Option<Tx<'_>> {
        Some(Tx(&mut self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = self.mtu + 14;
        caps
    }
}

pub(crate) fn is_arp_reply(frame: &[u8]) -> bool {
    EthernetFrame::new_checked(frame)
        .is_ok_and(|f| f.ethertype() == EthernetProtocol::Arp && f.payload().get(7) == Some(&2))
}
