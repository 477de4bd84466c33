//! An in-process daemon on a temporary socket and state, for the API tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;
use vmfabric::{api, client, daemon::Daemon};

pub struct Running {
    pub rt: tokio::runtime::Runtime,
    pub socket: PathBuf,
    pub daemon: Arc<Daemon>,
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
    let daemon = Daemon::start_with_guests(dir.join("state"), dir.join("run"), guest_dir, rt.handle().clone()).unwrap();
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
        rt,
        socket,
        daemon,
        server,
    }
}

impl Running {
    pub fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        self.rt
            .block_on(client::call(&self.socket, method, path, body))
            .unwrap()
    }

    /// Stops the daemon as SIGTERM would; the state stays for the next start.
    pub fn stop(self) {
        self.server.abort();
        self.daemon.shutdown();
        drop(self.daemon);
        self.rt.shutdown_background();
    }
}
