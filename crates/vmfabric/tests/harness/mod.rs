//! Daemons for the tests: in process on a temporary socket and state (API tests), or
//! as a real process that can be killed with -9 (end-to-end and kernel-mode tests).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use vmfabric::{api, client, control::Control};

pub struct Running {
    /// First, so it drops first: a test that panics still stops its VMs before the
    /// runtime goes (their QEMU processes would outlive the test).
    stop_on_panic: StopOnDrop,
    pub rt: tokio::runtime::Runtime,
    pub socket: PathBuf,
    pub daemon: Arc<Control>,
    server: tokio::task::JoinHandle<()>,
}

/// Starts a daemon with its state, ports and API socket under `dir`, able to run VMs
/// from `guest_dir` when given.
pub fn start(dir: &Path, guest_dir: Option<PathBuf>) -> Running {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let daemon = Control::start_with_guests(dir.join("state"), dir.join("run"), guest_dir).unwrap();
    let socket = dir.join("api.sock");
    let listener = {
        let _g = rt.enter();
        api::bind(&socket).unwrap()
    };
    let for_api = daemon.clone();
    let server = rt.spawn(async move {
        api::serve(listener, for_api).await.unwrap();
    });
    Running {
        stop_on_panic: StopOnDrop(Some(daemon.clone())),
        rt,
        socket,
        daemon,
        server,
    }
}

/// Shuts the daemon down (its VMs stopped) when dropped, unless `Running::stop` did.
struct StopOnDrop(Option<Arc<Control>>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        if let Some(daemon) = self.0.take() {
            daemon.shutdown();
        }
    }
}

/// A file's SHA-256, as `sha256sum` prints it (the guests print theirs the same way).
pub fn sha256_file(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string()
}

/// Polls a VM through `get` until its state is one of `done` (TCG boots are slow on a
/// busy machine: four minutes).
fn poll_vm(get: impl Fn(&str) -> Value, name: &str, done: &[&str]) -> Value {
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let v = get(&format!("/v1/vms/{name}"));
        if done.contains(&v["state"].as_str().unwrap_or("")) {
            return v;
        }
        assert!(Instant::now() < deadline, "{name} never reached {done:?}: {v}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

impl Running {
    /// Polls a VM until its state is one of `done`.
    pub fn wait_vm(&self, name: &str, done: &[&str]) -> Value {
        poll_vm(|path| self.call("GET", path, None).1, name, done)
    }

    /// Waits for a console line of the VM starting with `marker`; returns it, trimmed.
    /// Fails at once if the guest ends without printing it.
    pub fn wait_line(&self, name: &str, marker: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let (_, logs) = self.call("GET", &format!("/v1/vms/{name}/logs"), None);
            let logs = logs.as_str().unwrap_or("");
            if let Some(line) = logs.lines().find(|l| l.starts_with(marker)) {
                return line.trim().to_string();
            }
            assert!(!logs.contains("VMFABRIC_END"), "{name} ended without {marker}:\n{logs}");
            assert!(Instant::now() < deadline, "{name} never printed {marker}:\n{logs}");
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    pub fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        self.rt
            .block_on(client::call(&self.socket, method, path, body))
            .unwrap()
    }

    /// The status line and headers of a GET whose body never ends (a stream): read up
    /// to the blank line, then the connection is dropped.
    pub fn stream_head(&self, path: &str) -> String {
        use std::io::{Read, Write};
        let mut c = std::os::unix::net::UnixStream::connect(&self.socket).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(c, "GET {path} HTTP/1.1\r\nHost: vmfabric\r\n\r\n").unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            c.read_exact(&mut byte).unwrap();
            head.push(byte[0]);
        }
        String::from_utf8_lossy(&head).into_owned()
    }

    /// Follows `GET /v1/events` (through the typed client) from now on.
    pub fn follow_events(&self) -> EventLog {
        let log = EventLog(Arc::new(std::sync::Mutex::new(Vec::new())));
        let (socket, sink) = (self.socket.clone(), log.clone());
        let before = self.daemon.event_readers();
        std::thread::spawn(move || {
            let mut out = sink;
            let _ = client::Client::new(&socket).and_then(|c| c.events(&mut out));
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.daemon.event_readers() == before {
            assert!(Instant::now() < deadline, "the event stream did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        log
    }

    /// Stops the daemon as SIGTERM would; the state stays for the next start.
    pub fn stop(mut self) {
        self.stop_on_panic.0 = None;
        self.server.abort();
        self.daemon.shutdown();
        drop(self.daemon);
        self.rt.shutdown_background();
    }
}

/// What an event stream brought so far.
#[derive(Clone)]
pub struct EventLog(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for EventLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl EventLog {
    /// Every whole line, parsed.
    pub fn events(&self) -> Vec<Value> {
        let bytes = self.0.lock().unwrap().clone();
        String::from_utf8_lossy(&bytes)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("event {l:?} is not JSON: {e}")))
            .collect()
    }

    /// Waits until an event has every field of `want` (a JSON object); returns it.
    pub fn wait_for(&self, want: Value) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let events = self.events();
            let found = events
                .iter()
                .find(|e| want.as_object().unwrap().iter().all(|(k, v)| &e[k] == v));
            if let Some(e) = found {
                return e.clone();
            }
            assert!(Instant::now() < deadline, "no event like {want} in {events:#?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Checks the daemon's `/metrics` in both encodings with the tools Prometheus users
/// run: `promtool check metrics` on the Prometheus text format (the default), and the
/// Python client's OpenMetrics parser (which refuses clashing names) on the page
/// served for `Accept: application/openmetrics-text`. Needs curl, promtool and
/// python3-prometheus-client (scripts/setup.sh installs them).
pub fn check_metrics_pages(socket: &Path) {
    let fetch = |accept: &str| {
        let out = Command::new("curl")
            .args(["-sSf", "--unix-socket"])
            .arg(socket)
            .args([
                "-H",
                &format!("Accept: {accept}"),
                "-w",
                "\n%{content_type}",
                "http://vmfabric/metrics",
            ])
            .output()
            .expect("curl runs");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8(out.stdout).unwrap();
        let (page, content_type) = text.rsplit_once('\n').unwrap();
        (format!("{page}\n").replace("\n\n", "\n"), content_type.to_string())
    };
    let check = |program: &str, args: &[&str], page: &str| {
        use std::io::Write;
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{program}: {e} (scripts/setup.sh installs it)"));
        child.stdin.take().unwrap().write_all(page.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{program} refuses the page:\n{}{}\n{page}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let (text, content_type) = fetch("text/plain");
    assert!(content_type.starts_with("text/plain; version=0.0.4"), "{content_type}");
    check("promtool", &["check", "metrics"], &text);
    let (openmetrics, content_type) = fetch("application/openmetrics-text; version=1.0.0");
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    assert!(openmetrics.ends_with("# EOF\n"), "{openmetrics}");
    // Debian's python, where python3-prometheus-client is installed (not another on PATH).
    check(
        "/usr/bin/python3",
        &[
            "-c",
            "import sys; from prometheus_client.openmetrics.parser import text_string_to_metric_families as p; \
             print(len(list(p(sys.stdin.read()))), 'families')",
        ],
        &openmetrics,
    );
}

/// A real daemon process (so it can be killed with -9), with its API.
pub struct Process {
    child: Child,
    pub socket: PathBuf,
    rt: tokio::runtime::Runtime,
}

impl Process {
    pub fn start(dir: &Path, guests: &Path) -> Process {
        Process::start_with(dir, guests, &[])
    }

    /// Like [`Process::start`], with more `serve` arguments.
    pub fn start_with(dir: &Path, guests: &Path, more: &[&std::ffi::OsStr]) -> Process {
        Process::start_in(None, dir, guests, more)
    }

    /// Like [`Process::start_with`], in network namespace `ns` if given (`ip netns
    /// exec` execs the daemon: the child is the daemon).
    pub fn start_in(ns: Option<&str>, dir: &Path, guests: &Path, more: &[&std::ffi::OsStr]) -> Process {
        let socket = dir.join("api.sock");
        let _ = std::fs::remove_file(&socket);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("daemon.log"))
            .unwrap();
        let mut command = match ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_vmfabric")]);
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_vmfabric")),
        };
        let child = command
            .args(["serve", "--socket"])
            .arg(&socket)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--run-dir")
            .arg(dir.join("run"))
            .arg("--guest-dir")
            .arg(guests)
            .args(more)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(Instant::now() < deadline, "the daemon did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        Process { child, socket, rt }
    }

    pub fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        self.rt
            .block_on(vmfabric::client::call(&self.socket, method, path, body))
            .unwrap()
    }

    pub fn ok(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (s, v) = self.call(method, path, body);
        assert!((200..300).contains(&s), "{method} {path}: {s} {v}");
        v
    }

    /// Polls a VM until its state is one of `done`.
    pub fn wait_vm(&self, name: &str, done: &[&str]) -> Value {
        poll_vm(|path| self.call("GET", path, None).1, name, done)
    }

    pub fn logs(&self, name: &str) -> String {
        self.ok("GET", &format!("/v1/vms/{name}/logs"), None)
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    pub fn wait_log(&self, name: &str, marker: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(240);
        loop {
            let logs = self.logs(name);
            if logs.contains(marker) {
                return logs;
            }
            assert!(Instant::now() < deadline, "no {marker:?} from {name}:\n{logs}");
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    pub fn metric(&self, line_start: &str) -> u64 {
        let text = self.ok("GET", "/metrics", None);
        let text = text.as_str().unwrap_or_default().to_string();
        text.lines()
            .find(|l| l.starts_with(line_start))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn kill_9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // SIGTERM: the daemon stops its VMs.
        if let Some(pid) = rustix::process::Pid::from_raw(self.child.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The kernel devices whose alias marks them as the daemon instance's (of the daemon
/// whose state lives in `state_dir`).
pub fn kernel_devices(instance: &str) -> std::collections::HashSet<String> {
    testkit::run(&["ip", "-d", "-o", "link", "show"])
        .lines()
        .filter(|l| l.contains(&format!("alias vmfabric:{instance} ")))
        .filter_map(|l| {
            l.split(": ")
                .nth(1)
                .map(|n| n.split('@').next().unwrap_or(n).to_string())
        })
        .collect()
}

/// Whatever happens, a daemon instance's kernel devices and nftables tables go at the
/// end (a test that fails half-way would leave a bridge whose route the next run's
/// network overlaps).
pub struct KernelInstanceGone(pub String);

impl KernelInstanceGone {
    /// For the daemon whose state directory is `state_dir`.
    pub fn of(state_dir: &Path) -> KernelInstanceGone {
        KernelInstanceGone(vmfabric::kernel::instance_of(state_dir))
    }
}

impl Drop for KernelInstanceGone {
    fn drop(&mut self) {
        for d in kernel_devices(&self.0) {
            let _ = Command::new("ip").args(["link", "del", &d]).status();
        }
        let table = hostnet::nft::table_name(&self.0);
        for family in ["inet", "bridge"] {
            let _ = Command::new("nft")
                .args(["delete", "table", family, &table])
                .stderr(Stdio::null())
                .status();
        }
    }
}
