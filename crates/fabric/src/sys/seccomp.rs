//! The switch thread's system-call allowlist.
//!
//! The switch thread reads every frame a guest sends, so a bug in it is the first thing
//! a hostile guest would aim at. Everything it needs besides moving frames (sockets,
//! bound paths, TAP devices) is made by the control plane and handed over as fds, so
//! the thread itself needs only I/O on fds it was given, epoll, memory and futexes. A
//! seccomp filter (through rust-vmm's `seccompiler`, which also sets no_new_privs)
//! holds it to that: it cannot open files, make sockets, exec, signal or trace another
//! process, and any other call kills the process (seccomp is per thread, so the rest of
//! the daemon is not affected). The list was read from `strace -f` of every data-plane
//! test (the threads calling `recvmmsg`), plus the calls of a thread's exit and of the
//! allocator and locks on other paths (`brk`, `mremap`, `sched_yield`, `nanosleep`).

use std::collections::BTreeMap;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, SeccompRule, TargetArch};

/// The calls the switch thread may make, whatever their arguments.
const ALLOWED: &[libc::c_long] = &[
    // Frames and the wake-up eventfd; the VTEP's underlay socket (`recvmsg` with
    // UDP_GRO, `sendmsg` with UDP_SEGMENT), whose work this thread does.
    libc::SYS_recvmmsg,
    libc::SYS_sendmmsg,
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    // Stream ports: a VMM connecting, its socket's options, its end.
    libc::SYS_accept4,
    libc::SYS_setsockopt,
    libc::SYS_getsockopt,
    libc::SYS_shutdown,
    libc::SYS_fcntl,
    libc::SYS_close,
    // The loop.
    libc::SYS_epoll_pwait,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_epoll_wait,
    libc::SYS_epoll_ctl,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_sched_yield,
    libc::SYS_futex,
    libc::SYS_getrandom,
    libc::SYS_gettid,
    // Memory.
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    // Signals and the thread's end.
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_restart_syscall,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// Calls that fail with EACCES instead: glibc's allocator opens
/// /proc/sys/vm/overcommit_memory when it first trims a thread's arena, and does
/// without it when the open fails.
const REFUSED: &[libc::c_long] = &[
    libc::SYS_openat,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_open,
];

fn filter(
    calls: &[libc::c_long],
    others: SeccompAction,
    these: SeccompAction,
) -> Result<BpfProgram, seccompiler::Error> {
    let arch = TargetArch::try_from(std::env::consts::ARCH)?;
    let rules: BTreeMap<i64, Vec<SeccompRule>> = calls.iter().map(|nr| (*nr, Vec::new())).collect();
    Ok(SeccompFilter::new(rules, others, these, arch)?.try_into()?)
}

/// Gives up every capability the calling thread holds. The daemon runs as root to make
/// TAP devices and talk netlink; the switch thread needs none of that, and
/// capabilities are per thread, so the rest of the daemon keeps its own.
pub fn drop_capabilities() -> std::io::Result<()> {
    use rustix::thread::{set_capabilities, CapabilitySet, CapabilitySets};
    let none = CapabilitySet::empty();
    set_capabilities(
        None,
        CapabilitySets {
            effective: none,
            permitted: none,
            inheritable: none,
        },
    )?;
    Ok(())
}

/// Confines the calling thread to [`ALLOWED`]; for the switch thread, before its loop.
/// Two filters, as the kernel takes the stricter answer of all: one lets
/// [`ALLOWED`] and [`REFUSED`] through and kills on anything else, the other makes
/// [`REFUSED`] fail.
pub fn confine_switch_thread() -> Result<(), seccompiler::Error> {
    let listed: Vec<libc::c_long> = ALLOWED.iter().chain(REFUSED).copied().collect();
    let allowlist = filter(&listed, SeccompAction::KillProcess, SeccompAction::Allow)?;
    let refusals = filter(REFUSED, SeccompAction::Allow, SeccompAction::Errno(libc::EACCES as u32))?;
    // Installing a filter takes prctl and seccomp, which the allowlist does not allow:
    // it goes last.
    seccompiler::apply_filter(&refusals)?;
    seccompiler::apply_filter(&allowlist)
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;
    use std::process::Command;

    /// In a child process (this test binary run again): confined, an open fails with
    /// EACCES and making a socket kills the process.
    #[test]
    fn a_confined_thread_cannot_open_files_and_dies_making_a_socket() {
        if std::env::var_os("VMFABRIC_SECCOMP_CHILD").is_some() {
            super::confine_switch_thread().unwrap();
            let open = std::fs::File::open("/etc/hostname");
            println!("open: {:?}", open.err().and_then(|e| e.raw_os_error()));
            let _ = std::net::UdpSocket::bind("127.0.0.1:0");
            println!("still alive");
            return;
        }
        let out = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "sys::seccomp::tests::a_confined_thread_cannot_open_files_and_dies_making_a_socket",
            ])
            .args(["--nocapture", "--test-threads=1"])
            .env("VMFABRIC_SECCOMP_CHILD", "1")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains(&format!("open: Some({})", libc::EACCES)), "{stdout}");
        assert!(!stdout.contains("still alive"), "{stdout}");
        assert_eq!(out.status.signal(), Some(libc::SIGSYS), "{:?}", out.status);
    }
}
