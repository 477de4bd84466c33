//! Identifying a VMM process so that a reused PID is never signalled.
//!
//! A PID alone can be recycled once the process is gone; PID plus the process's start
//! time (field 22 of /proc/<pid>/stat, in clock ticks since boot) names one process
//! for the life of the host.

use std::io;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessId {
    pub pid: u32,
    pub start_time: u64,
}

/// The start time of `pid`, or `None` when there is no such process.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces and ')':
    // count fields from the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

impl ProcessId {
    pub fn of(pid: u32) -> io::Result<ProcessId> {
        let start_time =
            start_time(pid).ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no process {pid}")))?;
        Ok(ProcessId { pid, start_time })
    }

    /// Whether this very process still exists (a zombie counts until it is reaped).
    pub fn is_alive(&self) -> bool {
        start_time(self.pid) == Some(self.start_time)
    }

    /// Sends `signal` only if the PID still belongs to this process.
    pub fn signal(&self, signal: rustix::process::Signal) -> io::Result<bool> {
        if !self.is_alive() {
            return Ok(false);
        }
        let pid = rustix::process::Pid::from_raw(self.pid as i32)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "pid 0"))?;
        rustix::process::kill_process(pid, signal)?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_different_start_time_is_another_process() {
        let me = ProcessId::of(std::process::id()).unwrap();
        assert!(me.is_alive());
        let impostor = ProcessId {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(!impostor.is_alive());
        assert!(
            !impostor.signal(rustix::process::Signal::TERM).unwrap(),
            "never signalled"
        );
        assert!(ProcessId::of(u32::MAX - 1).is_err());
    }
}
