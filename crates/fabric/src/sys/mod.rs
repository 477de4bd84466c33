//! The few system calls no safe wrapper offers in the form the hot path needs.
//!
//! Everything `unsafe` in the data plane lives here: batched datagram I/O
//! (`recvmmsg`/`sendmmsg`, which rustix and std do not wrap without allocating per call)
//! and the TUN/TAP ioctl. Each block states why it is sound.

pub mod mmsg;
pub mod seccomp;
pub mod tun;
