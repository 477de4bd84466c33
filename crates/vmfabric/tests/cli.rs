//! The CLI against a real daemon process on a temporary socket, including a `kill -9`
//! of the daemon: what the API acknowledged is there after the restart.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_vmfabric");

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(dir: &Path) -> Daemon {
    let child = Command::new(BIN)
        .args(["serve", "--socket"])
        .arg(dir.join("api.sock"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--run-dir")
        .arg(dir.join("run"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(dir.join("api.sock")).is_err() {
        assert!(Instant::now() < deadline, "the daemon did not come up");
        std::thread::sleep(Duration::from_millis(20));
    }
    Daemon(child)
}

fn cli(dir: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .arg("--socket")
        .arg(dir.join("api.sock"))
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn json(dir: &Path, args: &[&str]) -> serde_json::Value {
    let mut a = args.to_vec();
    a.push("--json");
    let (ok, out, err) = cli(dir, &a);
    assert!(ok, "{args:?} failed: {err}");
    serde_json::from_str(&out).unwrap()
}

fn tmp() -> PathBuf {
    let d = std::env::temp_dir().join(format!("vmf-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn cli_drives_the_daemon_and_state_survives_kill_9() {
    let dir = tmp();
    let mut daemon = start(&dir);
    let (ok, out, _) = cli(&dir, &["network", "create", "blue", "--subnet", "10.91.0.0/24"]);
    assert!(ok && out.contains("blue"), "{out}");
    let (ok, out, _) = cli(&dir, &["port", "add", "blue", "vm1", "--kind", "stream"]);
    assert!(
        ok && out.contains("-netdev stream"),
        "port add prints the QEMU arguments: {out}"
    );
    let (ok, out, _) = cli(&dir, &["network", "ls"]);
    assert!(
        ok && out.starts_with("NAME") && out.contains("default") && out.contains("blue"),
        "{out}"
    );
    // Errors say what is wrong and exit non-zero.
    let (ok, _, err) = cli(&dir, &["network", "create", "blue", "--subnet", "10.92.0.0/24"]);
    assert!(!ok && err.contains("already exists") && err.contains("409"), "{err}");
    let (ok, _, err) = cli(&dir, &["port", "ls", "nope"]);
    assert!(!ok && err.contains("no network named"), "{err}");
    let ports = json(&dir, &["port", "ls", "blue"]);
    let mac = ports[0]["mac"].clone();

    // kill -9: nothing acknowledged may be lost.
    daemon.0.kill().unwrap();
    daemon.0.wait().unwrap();
    let _daemon = start(&dir);
    let nets = json(&dir, &["network", "ls"]);
    assert!(nets.as_array().unwrap().iter().any(|n| n["name"] == "blue"), "{nets}");
    let ports = json(&dir, &["port", "ls", "blue"]);
    assert_eq!((ports[0]["name"].as_str(), &ports[0]["mac"]), (Some("vm1"), &mac));
    assert!(
        std::os::unix::net::UnixStream::connect(ports[0]["path"].as_str().unwrap()).is_ok(),
        "listening again"
    );
    let (ok, out, _) = cli(&dir, &["stats"]);
    assert!(
        ok && out.contains("vmfabric_port_frames_total{network=\"blue\",port=\"vm1\""),
        "{out}"
    );
    let (ok, _, _) = cli(&dir, &["network", "rm", "blue", "--force"]);
    assert!(ok);
}
