//! The few system calls no safe wrapper offers in the form the hot path needs.
//!
//! Everything `unsafe` in the data plane lives here: batched datagram I/O
//! (`recvmmsg`/`sendmmsg`, which rustix and std do not wrap without allocating per call)
//! the TUN/TAP ioctls, one allocator setting, and the checksum loop's choice of vector
//! unit. Each block states why it is sound.

pub mod mmsg;
pub mod seccomp;
pub mod tun;
pub mod udp_gso;
pub mod wide_sum;

/// Makes every allocation of 128 KiB or more take pages of its own from the kernel,
/// already zero and touched only where used. glibc's default raises that threshold to
/// the size of the largest block freed so far, after which a gateway's TCP buffers (up
/// to 1 MiB per connection at MTU 65,520) come from the heap and are zeroed, page by
/// page, at every connect: connect+close at MTU 65,520 ran at half the rate of 1,500
/// (see BENCHMARKS.md). Call it before starting threads.
pub fn keep_large_allocations_mapped() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only sets an allocator parameter (M_MMAP_THRESHOLD, a byte
        // count); it takes no pointers.
        let ok = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024) };
        if ok != 1 {
            tracing::warn!("could not fix the allocator's mmap threshold");
        }
    }
}
