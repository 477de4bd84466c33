//! A QEMU process supervised through its lifecycle.
//!
//! Theory of operation: `start` validates the config, makes a fresh nonce, and spawns
//! QEMU with the serial console in a file and a QMP socket. The VM is `Starting`
//! until the process exists (then `Running`) and `Ready{ip}` once the console shows
//! the readiness marker with this boot's nonce (and, when known, the leased address).
//! `poll` notices a VMM that died: `Failed` with its exit status and the console's last
//! lines (a guest that powered itself off, exit status 0, is `Stopped`). `stop` asks the guest to power off over QMP, then sends SIGTERM, then
//! SIGKILL, each after a grace period; a stop we asked for ends in `Stopped`. Signals
//! go to the PID only while it still has the start time we recorded.

use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::config::{VmConfig, VmConfigError};
use crate::process::ProcessId;
use crate::qemu::{QemuConfig, Serial};
use crate::readiness::{new_nonce, Readiness, ReadinessScanner};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmState {
    Starting,
    Running,
    Ready {
        ip: Ipv4Addr,
    },
    /// Its vCPUs stopped (QMP `stop`); `resume` puts it back where it was.
    Paused,
    Stopped,
    Failed {
        reason: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error(transparent)]
    Config(#[from] VmConfigError),
    #[error("start {binary}: {source}")]
    Spawn { binary: String, source: std::io::Error },
    #[error(transparent)]
    Storage(#[from] crate::storage::StorageError),
    #[error("write the cloud-init seed {path}: {source}")]
    Seed { path: PathBuf, source: std::io::Error },
    #[error("create the VM's scratch directory {path}: {source}")]
    Scratch { path: PathBuf, source: std::io::Error },
}

pub struct QemuVm {
    /// The VMM when this process started it; `None` for one adopted after a restart.
    child: Option<Child>,
    id: Option<ProcessId>,
    nonce: String,
    qmp: PathBuf,
    serial_log: PathBuf,
    scanner: ReadinessScanner,
    state: VmState,
    /// The state a pause interrupted, to go back to on resume.
    paused_from: Option<VmState>,
    stop_requested: bool,
    /// virtiofsd processes serving its shares.
    helpers: Helpers,
}

/// Helper processes of one boot, ended with it (or when the boot fails to start).
#[derive(Default)]
struct Helpers(Vec<Child>);

impl Drop for Helpers {
    fn drop(&mut self) {
        for h in &mut self.0 {
            let _ = h.kill();
            let _ = h.wait();
        }
    }
}

/// The last `n` lines of a console log, for a failure's reason.
/// Where a VM's QEMU writes its own messages: beside its console, `NAME.qemu.log`.
pub fn stderr_log(serial_log: &std::path::Path) -> PathBuf {
    serial_log.with_extension("qemu.log")
}

/// Starts a virtiofsd for `share` and waits (a few seconds at most) for its socket,
/// which QEMU connects to as it starts. Its messages go beside the socket (`.log`).
fn start_virtiofsd(
    binary: &std::path::Path,
    share: &crate::storage::Share,
    socket: &std::path::Path,
) -> Result<Child, DriverError> {
    let spawn_error = |source| DriverError::Spawn {
        binary: binary.display().to_string(),
        source,
    };
    let log = std::fs::File::create(socket.with_extension("log")).map_err(spawn_error)?;
    let mut child = crate::storage::virtiofsd_command(binary, share, socket)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(spawn_error)?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !socket.exists() {
        if Instant::now() > deadline || matches!(child.try_wait(), Ok(Some(_))) {
            let _ = child.kill();
            let _ = child.wait();
            let said = std::fs::read_to_string(socket.with_extension("log")).unwrap_or_default();
            return Err(spawn_error(std::io::Error::other(format!(
                "virtiofsd did not serve {}: {}",
                share.host.display(),
                said.trim()
            ))));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(child)
}

/// Where a boot keeps the files it made for its VM (overlays, the cloud-init seed):
/// beside its QMP socket, removed with the VM.
fn scratch_dir(qmp: &std::path::Path) -> PathBuf {
    qmp.with_extension("files")
}

pub fn log_tail(path: &std::path::Path, n: usize) -> String {
    let text = std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl QemuVm {
    /// Boots `config` (validated first). `work_dir` holds the QMP socket.
    pub fn start(config: &VmConfig, work_dir: &std::path::Path) -> Result<QemuVm, DriverError> {
        config.validate()?;
        let nonce = new_nonce();
        let mut q = QemuConfig::new(
            config.kernel.clone(),
            config.initramfs.clone(),
            Serial::File(config.serial_log.clone()),
        );
        q.memory_mib = config.memory_mib;
        q.cpus = config.cpus;
        q.nics = config.attachments.clone();
        q.cmdline = config.cmdline.clone();
        q.cmdline.push(format!("VMF_NONCE={nonce}"));
        if let Some(id) = &config.machine_id {
            q.cmdline.push(format!("systemd.machine_id={id}"));
        }
        let qmp = work_dir.join(format!("{}.{}.qmp", config.namespace, config.name));
        let _ = std::fs::remove_file(&qmp);
        let _ = std::fs::remove_file(&config.serial_log);
        let scratch = scratch_dir(&qmp);
        let _ = std::fs::remove_dir_all(&scratch);
        // Overlays, the seed and virtiofsd sockets live here; a start that fails takes
        // them with it.
        let needs_scratch = config.cloud_init.is_some()
            || !config.shares.is_empty()
            || config
                .root_disk
                .iter()
                .chain(&config.data_disks)
                .any(|d| d.mode == crate::storage::DiskMode::Overlay);
        if needs_scratch {
            std::fs::create_dir_all(&scratch).map_err(|source| DriverError::Scratch {
                path: scratch.clone(),
                source,
            })?;
        }
        let started = Self::spawn(config, q, &qmp, &scratch, nonce);
        if started.is_err() {
            let _ = std::fs::remove_dir_all(&scratch);
        }
        started
    }

    /// Prepares the disks, seed and shares in `scratch` and starts QEMU.
    fn spawn(
        config: &VmConfig,
        mut q: QemuConfig,
        qmp: &std::path::Path,
        scratch: &std::path::Path,
        nonce: String,
    ) -> Result<QemuVm, DriverError> {
        for (i, disk) in config.root_disk.iter().chain(&config.data_disks).enumerate() {
            let overlay = scratch.join(format!("disk{i}.overlay.qcow2"));
            let attached = crate::storage::attach(disk, &overlay)?;
            match (i, config.root_disk.is_some()) {
                (0, true) => q.root_disk = Some(attached),
                _ => q.disks.push(attached),
            }
        }
        if let Some(ci) = &config.cloud_init {
            let path = scratch.join("cloud-init-seed.img");
            ci.write_seed(&path).map_err(|source| DriverError::Seed {
                path: path.clone(),
                source,
            })?;
            q.disks.push(crate::storage::AttachedDisk {
                file: path,
                format: crate::storage::DiskFormat::Raw,
                read_only: true,
            });
        }
        let mut helpers = Helpers::default();
        match crate::storage::find_virtiofsd().filter(|_| !config.shares.is_empty()) {
            Some(binary) => {
                for (i, share) in config.shares.iter().enumerate() {
                    let socket = scratch.join(format!("fs{i}.sock"));
                    helpers.0.push(start_virtiofsd(&binary, share, &socket)?);
                    q.virtio_fs.push(crate::storage::VirtioFs {
                        socket,
                        tag: share.tag.clone(),
                    });
                }
            }
            None => q.shares = config.shares.clone(),
        }
        q.vsock_cid = config.vsock_cid;
        let mut args = q.args();
        args.extend(["-qmp".into(), format!("unix:{},server=on,wait=off", qmp.display())]);
        let mut cmd = match &config.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&q.binary);
                c
            }
            None => Command::new(&q.binary),
        };
        // What QEMU says goes beside the console: why it would not start, above all.
        let stderr = std::fs::File::create(stderr_log(&config.serial_log)).map_err(|source| DriverError::Spawn {
            binary: q.binary.display().to_string(),
            source,
        })?;
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        let binary = q.binary.display().to_string();
        let child = cmd.spawn().map_err(|source| DriverError::Spawn { binary, source })?;
        let id = ProcessId::of(child.id()).ok();
        let state = if id.is_some() {
            VmState::Running
        } else {
            VmState::Starting
        };
        Ok(QemuVm {
            child: Some(child),
            id,
            nonce: nonce.clone(),
            qmp: qmp.to_path_buf(),
            serial_log: config.serial_log.clone(),
            scanner: ReadinessScanner::new(config.serial_log.clone(), nonce),
            state,
            paused_from: None,
            stop_requested: false,
            helpers,
        })
    }

    /// Takes charge of a VMM started by an earlier run of this process (which was
    /// killed), if that very process still runs. Its console is scanned again from the
    /// start for this boot's readiness marker; its exit status cannot be known.
    pub fn adopt(id: ProcessId, qmp: PathBuf, serial_log: PathBuf, nonce: String) -> Option<QemuVm> {
        if !id.is_alive() {
            return None;
        }
        Some(QemuVm {
            child: None,
            id: Some(id),
            scanner: ReadinessScanner::new(serial_log.clone(), nonce.clone()),
            nonce,
            qmp,
            serial_log,
            state: VmState::Running,
            paused_from: None,
            stop_requested: false,
            helpers: Helpers::default(),
        })
    }

    /// This boot's readiness nonce (kept to adopt the VMM later).
    pub fn nonce(&self) -> &str {
        &self.nonce
    }

    pub fn qmp_path(&self) -> &std::path::Path {
        &self.qmp
    }

    pub fn process(&self) -> Option<ProcessId> {
        self.id
    }

    pub fn state(&self) -> &VmState {
        &self.state
    }

    /// Brings the state up to date: exit of the VMM, readiness on the console.
    pub fn poll(&mut self, leased: Option<Ipv4Addr>) -> &VmState {
        if matches!(self.state, VmState::Stopped | VmState::Failed { .. }) {
            return &self.state;
        }
        // Some(exit status, when known) once the VMM is gone.
        let exited = match &mut self.child {
            Some(child) => child.try_wait().ok().flatten().map(Some),
            None => (!self.id.is_some_and(|id| id.is_alive())).then_some(None),
        };
        if let Some(status) = exited {
            // A guest that powered itself off ends the VMM with success: a clean stop.
            self.state = if self.stop_requested || status.is_some_and(|s| s.success()) {
                VmState::Stopped
            } else {
                let how = match status {
                    Some(s) => format!("the VMM {s}"),
                    None => "the VMM exited (adopted after a restart, so its status is unknown)".into(),
                };
                let said = log_tail(&stderr_log(&self.serial_log), 5);
                let said = if said.trim().is_empty() {
                    String::new()
                } else {
                    format!("; QEMU said:\n{said}\n")
                };
                VmState::Failed {
                    reason: format!("{how}{said}; last console lines:\n{}", log_tail(&self.serial_log, 10)),
                }
            };
            let _ = std::fs::remove_file(&self.qmp);
            return &self.state;
        }
        if let (None, Some(child)) = (self.id, &self.child) {
            self.id = ProcessId::of(child.id()).ok();
            if self.id.is_some() {
                self.state = VmState::Running;
            }
        }
        if self.state == VmState::Running {
            match self.scanner.scan(leased) {
                Ok(Readiness::Ready(ip)) => self.state = VmState::Ready { ip },
                Ok(Readiness::WrongAddress { claimed, leased }) => {
                    tracing::warn!(%claimed, %leased, "the guest claims an address it was not leased");
                }
                Ok(Readiness::NotYet) | Err(_) => {}
            }
        }
        &self.state
    }

    /// Polls until `ready` says yes or `timeout` passes.
    pub fn wait_for(
        &mut self,
        leased: Option<Ipv4Addr>,
        timeout: Duration,
        ready: impl Fn(&VmState) -> bool,
    ) -> VmState {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.poll(leased).clone();
            if ready(&s) || Instant::now() >= deadline {
                return s;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs one QMP command and waits for its answer (events QEMU sends meanwhile are
    /// skipped); an `error` answer is an error.
    fn qmp(&self, command: &str) -> std::io::Result<()> {
        let stream = UnixStream::connect(&self.qmp)?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut reader = BufReader::new(stream.try_clone()?);
        let mut line = String::new();
        reader.read_line(&mut line)?; // greeting
        let mut w = &stream;
        for execute in ["qmp_capabilities", command] {
            w.write_all(format!("{{\"execute\":\"{execute}\"}}\n").as_bytes())?;
            loop {
                line.clear();
                if reader.read_line(&mut line)? == 0 {
                    return Err(std::io::Error::other("QMP closed before it answered"));
                }
                if line.contains("\"return\"") {
                    break;
                }
                if line.contains("\"error\"") {
                    return Err(std::io::Error::other(format!("QMP {execute}: {}", line.trim())));
                }
            }
        }
        Ok(())
    }

    /// What QEMU says of the guest's run state (QMP `query-status`: `running`,
    /// `paused`, `shutdown`, ...); `None` when QMP does not answer.
    pub fn qmp_status(&self) -> Option<String> {
        let stream = UnixStream::connect(&self.qmp).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        let mut reader = BufReader::new(stream.try_clone().ok()?);
        let mut line = String::new();
        reader.read_line(&mut line).ok()?; // greeting
        let mut w = &stream;
        w.write_all(b"{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"query-status\"}\n")
            .ok()?;
        for _ in 0..16 {
            line.clear();
            if reader.read_line(&mut line).ok()? == 0 {
                return None;
            }
            // {"return": {"status": "running", "singlestep": false, "running": true}}
            if let Some(rest) = line.split("\"status\":").nth(1) {
                return rest.split('"').nth(1).map(String::from);
            }
        }
        None
    }

    fn qmp_powerdown(&self) -> std::io::Result<()> {
        self.qmp("system_powerdown")
    }

    /// Stops the guest's vCPUs (QMP `stop`): it answers nothing until resumed. Only a
    /// running or ready VM pauses.
    pub fn pause(&mut self) -> Result<(), String> {
        match self.poll(None).clone() {
            s @ (VmState::Running | VmState::Ready { .. }) => {
                self.qmp("stop").map_err(|e| format!("pause: {e}"))?;
                self.paused_from = Some(s);
                self.state = VmState::Paused;
                Ok(())
            }
            other => Err(format!("a {other:?} VM cannot be paused")),
        }
    }

    /// Lets a paused guest run on (QMP `cont`), in the state it was paused in.
    pub fn resume(&mut self) -> Result<(), String> {
        if self.poll(None) != &VmState::Paused {
            return Err(format!("the VM is {:?}, not paused", self.state));
        }
        self.qmp("cont").map_err(|e| format!("resume: {e}"))?;
        self.state = self.paused_from.take().unwrap_or(VmState::Running);
        Ok(())
    }

    /// Stops the VM: ACPI powerdown over QMP, then SIGTERM, then SIGKILL, waiting
    /// `grace` after each. Returns the final state.
    pub fn stop(&mut self, grace: Duration) -> VmState {
        self.stop_requested = true;
        if matches!(self.poll(None), VmState::Stopped | VmState::Failed { .. }) {
            return self.state.clone();
        }
        let _ = self.qmp_powerdown();
        let gone =
            |vm: &mut QemuVm| vm.wait_for(None, grace, |s| matches!(s, VmState::Stopped | VmState::Failed { .. }));
        if matches!(gone(self), VmState::Stopped) {
            return self.state.clone();
        }
        for signal in [rustix::process::Signal::TERM, rustix::process::Signal::KILL] {
            if let Some(id) = self.id {
                let _ = id.signal(signal);
            }
            if matches!(gone(self), VmState::Stopped) {
                return self.state.clone();
            }
        }
        self.state.clone()
    }
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        let running = match &mut self.child {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => self.id.is_some_and(|id| id.is_alive()),
        };
        if running {
            if let Some(id) = self.id {
                let _ = id.signal(rustix::process::Signal::KILL);
            }
            if let Some(child) = &mut self.child {
                let _ = child.wait();
            }
        }
        self.helpers = Helpers::default();
        let _ = std::fs::remove_file(&self.qmp);
        let _ = std::fs::remove_dir_all(scratch_dir(&self.qmp));
    }
}
