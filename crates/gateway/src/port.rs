//! The gateway's end of its switch port: an in-process port (shared queues, an eventfd
//! to wait on), so a frame between a guest and the gateway crosses no socket and costs
//! the switch no system call of its own.

use std::io;

use fabric::offload::Offload;
use fabric::InProcessEnd;
use tokio::net::unix::pipe;

pub(crate) struct GatewayPort {
    end: InProcessEnd,
    /// The switch writes a byte here after queueing frames for us.
    wake: pipe::Receiver,
}

/// How long a sender waits before looking again when the switch's queue is full (it
/// is behind; its wake-ups are for its own receives, not for us).
const FULL_RETRY: std::time::Duration = std::time::Duration::from_micros(200);

impl GatewayPort {
    /// Needs a Tokio runtime entered (the eventfd joins its reactor).
    /// With `takes_offloads`, a guest's segment offload reaches the TCP splice whole, and
    /// the frame loop completes any other offloaded frame itself.
    pub(crate) fn new(end: InProcessEnd, takes_offloads: bool) -> io::Result<GatewayPort> {
        if takes_offloads {
            end.take_offloads();
        }
        let wake = pipe::Receiver::from_owned_fd(end.wake_receiver()?)?;
        Ok(GatewayPort { end, wake })
    }

    /// The next frame without waiting, as the switch sent it (offloads and all: see
    /// `dispatch::handle_frame`); give it back with [`GatewayPort::recycle`].
    pub(crate) fn try_recv(&self) -> Option<(Vec<u8>, Offload)> {
        self.end.try_recv_offloaded()
    }

    pub(crate) fn recycle(&self, frame: Vec<u8>) {
        self.end.recycle(frame);
    }

    /// Waits for the next frame. Only the frame loop receives; other tasks only send.
    pub(crate) async fn recv(&self) -> io::Result<(Vec<u8>, Offload)> {
        loop {
            if let Some(frame) = self.try_recv() {
                return Ok(frame);
            }
            self.wake.readable().await?;
            // Drained before the next look, so a frame queued after it wakes us again.
            let mut bytes = [0u8; 256];
            while matches!(self.wake.try_read(&mut bytes), Ok(n) if n > 0) {}
        }
    }

    /// Queues a frame for the switch, waiting while its queue is full.
    pub(crate) async fn send(&self, frame: &[u8]) -> io::Result<usize> {
        loop {
            match self.end.try_send(frame) {
                Ok(()) => return Ok(frame.len()),
                Err(fabric::Full) => tokio::time::sleep(FULL_RETRY).await,
            }
        }
    }

    /// Queues frames for the switch with one wake-up, without waiting: how many went,
    /// or WouldBlock when none could.
    pub(crate) fn try_send_frames(&self, frames: &[&[u8]]) -> io::Result<usize> {
        self.end
            .send_batch(frames.iter().copied())
            .map_err(|fabric::Full| io::ErrorKind::WouldBlock.into())
    }

    /// Moves frames from the front of `frames` to the switch, each with its offload,
    /// without a copy; how many went, or WouldBlock when none could.
    pub(crate) fn try_send_owned(
        &self,
        frames: &mut std::collections::VecDeque<(Vec<u8>, Offload)>,
    ) -> io::Result<usize> {
        self.end
            .send_owned(frames)
            .map_err(|fabric::Full| io::ErrorKind::WouldBlock.into())
    }

    /// Waits until the switch may have made room (it does not say when).
    pub(crate) async fn writable(&self) -> io::Result<()> {
        tokio::time::sleep(FULL_RETRY).await;
        Ok(())
    }
}
