//! The system calls a gateway thread may make: an allowlist.
//!
//! The list was generated from what the gateways call: `scripts/seccomp-learn.sh` runs
//! the daemon's tests (every gateway service, forwards, the lease store, floods, real
//! guests) with this filter in its logging mode and prints each call a `vmf-gateway`
//! thread made that the list lacks. It started from the switch thread's frame I/O
//! (`read`, `write`, `recvfrom`, `sendto`, `recvmmsg`, `sendmmsg`, `epoll_wait`,
//! `futex`, `clock_gettime`, `mmap`, `munmap`); a few calls on paths those tests do not reach were added by hand
//! and say so.
//! The test command runs every test with [`SeccompMode::Kill`], so a path that makes an
//! unlisted call fails the tests instead of being refused quietly.
//!
//! Calls that act on any descriptor of the process (`ioctl`, `prctl`) or could open a
//! way out (`clone` into new namespaces, sockets of other families) are allowed only
//! with the arguments the gateways use.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule, TargetArch,
};

/// What becomes of a call that is not on the list; `VMFABRIC_SECCOMP` chooses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeccompMode {
    /// Fails with ENOSYS, as if the kernel lacked it: a path the tests missed costs
    /// that task, not the daemon (the default).
    Refuse,
    /// Kills the daemon: what the tests run with (`kill`), so a missing entry is found.
    Kill,
    /// Allowed and logged by the kernel (`log`): how the list is made.
    Log,
}

impl SeccompMode {
    pub fn from_env() -> Result<SeccompMode, String> {
        match std::env::var("VMFABRIC_SECCOMP").as_deref() {
            Err(_) | Ok("") | Ok("refuse") => Ok(SeccompMode::Refuse),
            Ok("kill") => Ok(SeccompMode::Kill),
            Ok("log") => Ok(SeccompMode::Log),
            Ok(other) => Err(format!("VMFABRIC_SECCOMP={other}: expected refuse, kill or log")),
        }
    }

    fn unlisted(self) -> SeccompAction {
        match self {
            SeccompMode::Refuse => SeccompAction::Errno(libc::ENOSYS as u32),
            SeccompMode::Kill => SeccompAction::KillProcess,
            SeccompMode::Log => SeccompAction::Log,
        }
    }
}

/// Allowed whatever their arguments. Each group says where the tests saw it; the
/// calls they did not see, added for paths the tests do not reach, say why.
const ALLOWED: &[libc::c_long] = &[
    // Sockets (their family is checked in `socket`): NAT's host sides, DNS upstreams,
    // forwards' connections to the guest side, the gateway's own port.
    libc::SYS_bind,
    libc::SYS_connect,
    libc::SYS_accept4,
    libc::SYS_setsockopt,
    libc::SYS_getsockopt,
    libc::SYS_shutdown,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmmsg,
    libc::SYS_sendmmsg,
    // The TCP splice peeks a host socket straight into several frames.
    libc::SYS_recvmsg,
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_close,
    libc::SYS_fcntl,
    // The runtime: epoll, parking, the clock; a non-blocking connect's completion
    // (`ppoll`, in TCP NAT) and whether a TCP splice socket has room.
    libc::SYS_epoll_ctl,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_epoll_wait,
    libc::SYS_ppoll,
    libc::SYS_futex,
    libc::SYS_clock_gettime,
    libc::SYS_sched_getaffinity,
    libc::SYS_getrandom,
    libc::SYS_gettid,
    // Locks that spin before they park (not seen).
    libc::SYS_sched_yield,
    // The lease store (SQLite in WAL mode; files only under the state directory, by
    // Landlock) and resolv.conf. Not seen, SQLite's other WAL paths: reading a page
    // its cache lacks (`pread64`), checkpoints (`fdatasync`, `ftruncate`), file sizes
    // (`fstat` is `newfstatat` in this C library).
    libc::SYS_openat,
    libc::SYS_statx,
    libc::SYS_pwrite64,
    libc::SYS_fsync,
    libc::SYS_pread64,
    libc::SYS_fdatasync,
    libc::SYS_ftruncate,
    libc::SYS_newfstatat,
    // Memory; `mremap` (not seen) when the allocator grows a large block.
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_mremap,
    // Threads of the blocking pool: their start and end. A signal's return (not seen:
    // the daemon's signals are taken by its main thread).
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_exit,
    libc::SYS_rt_sigreturn,
    libc::SYS_restart_syscall,
];

/// `prctl` operations: a thread's name.
const PRCTL_ALLOWED: &[libc::c_int] = &[libc::PR_SET_NAME, libc::PR_GET_NAME];

/// `ioctl` requests: non-blocking mode and close-on-exec on the gateways' own sockets,
/// and the bytes waiting in one.
const IOCTL_ALLOWED: &[libc::c_ulong] = &[libc::FIONBIO, libc::FIONREAD, libc::FIOCLEX, libc::FIONCLEX];

/// Namespaces a new thread may not enter: `clone` with any of these is not a thread.
const CLONE_NAMESPACES: u64 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWCGROUP) as u64;

fn equals(arg: u8, len: SeccompCmpArgLen, value: u64) -> Result<SeccompRule, seccompiler::Error> {
    Ok(SeccompRule::new(vec![SeccompCondition::new(
        arg,
        len,
        SeccompCmpOp::Eq,
        value,
    )?])?)
}

/// The allowlist's rules: [`ALLOWED`], and the calls allowed with some arguments only.
fn allowlist() -> Result<BTreeMap<i64, Vec<SeccompRule>>, seccompiler::Error> {
    use SeccompCmpArgLen::{Dword, Qword};
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = ALLOWED.iter().map(|nr| (*nr, Vec::new())).collect();
    // Their refusals (`refusals`) are errors the caller sees, not unlisted calls.
    for nr in [libc::SYS_socket, libc::SYS_socketpair, libc::SYS_clone3] {
        rules.insert(nr, Vec::new());
    }
    rules.insert(
        libc::SYS_prctl,
        PRCTL_ALLOWED
            .iter()
            .map(|op| equals(0, Dword, *op as u64))
            .collect::<Result<_, _>>()?,
    );
    rules.insert(
        libc::SYS_ioctl,
        IOCTL_ALLOWED
            .iter()
            .map(|request| equals(1, Dword, *request))
            .collect::<Result<_, _>>()?,
    );
    rules.insert(
        libc::SYS_clone,
        vec![SeccompRule::new(vec![SeccompCondition::new(
            0,
            Qword,
            SeccompCmpOp::MaskedEq(CLONE_NAMESPACES),
            0,
        )?])?],
    );
    Ok(rules)
}

/// Calls refused with an error the caller handles: sockets of families no gateway uses
/// (EACCES: Landlock does not stop a connect to a path-named Unix socket, and the API's
/// is one), and `clone3` (ENOSYS, so the C library falls back to `clone`, whose flags a
/// filter can read).
fn refusals() -> Result<BTreeMap<i64, Vec<SeccompRule>>, seccompiler::Error> {
    use SeccompCmpArgLen::Dword;
    let not_domain = |domain: i32| SeccompCondition::new(0, Dword, SeccompCmpOp::Ne, domain as u64);
    Ok(BTreeMap::from([
        (
            libc::SYS_socket,
            vec![SeccompRule::new(vec![
                not_domain(libc::AF_INET)?,
                not_domain(libc::AF_INET6)?,
            ])?],
        ),
        (libc::SYS_socketpair, Vec::new()),
    ]))
}

fn program(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    others: SeccompAction,
    these: SeccompAction,
) -> Result<BpfProgram, seccompiler::Error> {
    let arch = TargetArch::try_from(std::env::consts::ARCH)?;
    Ok(SeccompFilter::new(rules, others, these, arch)?.try_into()?)
}

/// Installs the filters on the calling thread. The kernel takes the strictest answer of
/// all filters: the refusals' errors win over the allowlist's "allow".
pub fn confine_calls(mode: SeccompMode) -> Result<(), seccompiler::Error> {
    let refused = program(
        refusals()?,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EACCES as u32),
    )?;
    let clone3 = program(
        BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
    )?;
    let allowed = program(allowlist()?, mode.unlisted(), SeccompAction::Allow)?;
    seccompiler::apply_filter(&refused)?;
    seccompiler::apply_filter(&clone3)?;
    // Installing a filter takes calls the allowlist does not allow: it goes last.
    seccompiler::apply_filter(&allowed)
}

/// Whether the calling thread already runs under a seccomp filter: a thread started by
/// a confined one inherits its filters, Landlock domain and capabilities.
pub fn already_confined() -> bool {
    std::fs::read_to_string("/proc/thread-self/status")
        .map(|status| status.lines().any(|l| l.split_whitespace().eq(["Seccomp:", "2"])))
        .unwrap_or(false)
}
