//! A client of the daemon's API, for the CLI and the tests: [`Client`] has one typed
//! method per route, taking the model's request bodies and returning its views; `call`
//! is the raw form the tests use to send what a typed client would refuse to.

use std::path::{Path, PathBuf};

use anyhow::Context;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::control::vms::{VmRequest, VmView};
use crate::model::{
    FlowsView, ForwardProto, ForwardSpec, ForwardView, GatewaySettings, LeaseView, NetworkSpec, NetworkStats,
    NetworkView, PolicySpec, PortSpec, PortView, ReservationSpec, SocketpairSpec,
};

/// A refusal from the daemon: its HTTP status and message.
#[derive(Debug, thiserror::Error)]
#[error("{message} (HTTP {status})")]
pub struct ApiError {
    pub status: u16,
    pub message: String,
}

impl ApiError {
    fn from_body(status: u16, body: &[u8]) -> ApiError {
        let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
        let message = v["message"]
            .as_str()
            .map(String::from)
            .unwrap_or_else(|| String::from_utf8_lossy(body).into());
        ApiError { status, message }
    }
}

/// The daemon's socket could not be reached (no daemon, a wrong path, no permission).
#[derive(Debug, thiserror::Error)]
#[error("cannot reach the daemon at {socket} (is `vmfabric serve` running?): {source}")]
pub struct Unreachable {
    pub socket: PathBuf,
    pub source: std::io::Error,
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;
type Connection = hyper::client::conn::http1::Connection<TokioIo<tokio::net::UnixStream>, Full<Bytes>>;

async fn handshake(socket: &Path) -> anyhow::Result<(Sender, Connection)> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|source| Unreachable {
            socket: socket.to_path_buf(),
            source,
        })?;
    Ok(hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?)
}

/// An HTTP/1 connection to the daemon's socket.
async fn connect(socket: &Path) -> anyhow::Result<Sender> {
    let (sender, conn) = handshake(socket).await?;
    tokio::spawn(conn);
    Ok(sender)
}

/// Sends one request; returns the status and the raw body.
async fn send(socket: &Path, method: &str, path: &str, body: Vec<u8>) -> anyhow::Result<(u16, Bytes)> {
    let mut sender = connect(socket).await?;
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "vmfabric")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))?;
    let resp = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    Ok((status, resp.into_body().collect().await?.to_bytes()))
}

/// Sends one request as given; returns the status and the body (JSON, or text as a
/// JSON string).
pub async fn call(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> anyhow::Result<(u16, serde_json::Value)> {
    let bytes = body.map(|b| b.to_string()).unwrap_or_default();
    let (status, data) = send(socket, method, path, bytes.into_bytes()).await?;
    let value = if data.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(&data)
            .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&data).into()))
    };
    Ok((status, value))
}

/// GETs `path` and copies the body to `out` as it arrives, until the daemon ends it
/// (or the caller is interrupted). A non-2xx answer is an [`ApiError`].
pub async fn stream_to(socket: &Path, path: &str, out: &mut dyn std::io::Write) -> anyhow::Result<()> {
    let mut sender = connect(socket).await?;
    let req = Request::builder()
        .method("GET")
        .uri(path)
        .header("host", "vmfabric")
        .body(Full::new(Bytes::new()))?;
    let resp = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    if !(200..300).contains(&status) {
        let data = body.collect().await?.to_bytes();
        return Err(ApiError::from_body(status, &data).into());
    }
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            out.write_all(&data)?;
            // Flushed per chunk so `| tcpdump -r -` sees frames as they pass.
            out.flush()?;
        }
    }
    Ok(())
}

/// The daemon's API as typed calls, each blocking until it is answered.
pub struct Client {
    socket: PathBuf,
    rt: tokio::runtime::Runtime,
    /// How long one call may wait for its answer (streams are not calls).
    timeout: Option<std::time::Duration>,
}

/// No body (`Option::<&NoBody>::None`).
type NoBody = ();

impl Client {
    pub fn new(socket: impl Into<PathBuf>) -> anyhow::Result<Client> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        Ok(Client {
            socket: socket.into(),
            rt,
            timeout: None,
        })
    }

    /// Gives up on a call the daemon has not answered within `timeout`.
    pub fn with_timeout(mut self, timeout: std::time::Duration) -> Client {
        self.timeout = Some(timeout);
        self
    }

    fn raw(&self, method: &str, path: &str, body: Option<&impl Serialize>) -> anyhow::Result<Bytes> {
        let bytes = body.map(serde_json::to_vec).transpose()?.unwrap_or_default();
        let call = send(&self.socket, method, path, bytes);
        let (status, data) = match self.timeout {
            None => self.rt.block_on(call)?,
            Some(t) => self
                .rt
                .block_on(async { tokio::time::timeout(t, call).await })
                .map_err(|_| {
                    anyhow::anyhow!("the daemon did not answer {method} {path} within {t:?} (see --timeout)")
                })??,
        };
        if !(200..300).contains(&status) {
            return Err(ApiError::from_body(status, &data).into());
        }
        Ok(data)
    }

    fn json<R: DeserializeOwned>(&self, method: &str, path: &str, body: Option<&impl Serialize>) -> anyhow::Result<R> {
        let data = self.raw(method, path, body)?;
        serde_json::from_slice(&data).with_context(|| format!("the daemon's answer to {method} {path}"))
    }

    fn get<R: DeserializeOwned>(&self, path: &str) -> anyhow::Result<R> {
        self.json("GET", path, None::<&NoBody>)
    }

    fn delete(&self, path: &str) -> anyhow::Result<()> {
        self.raw("DELETE", path, None::<&NoBody>).map(drop)
    }

    fn text(&self, path: &str) -> anyhow::Result<String> {
        Ok(String::from_utf8_lossy(&self.raw("GET", path, None::<&NoBody>)?).into_owned())
    }

    /// Creates a network; the answer is the network as stored.
    pub fn create_network(&self, spec: &NetworkSpec, force: bool) -> anyhow::Result<NetworkSpec> {
        self.json("POST", &format!("/v1/networks?force={force}"), Some(spec))
    }

    pub fn networks(&self) -> anyhow::Result<Vec<NetworkView>> {
        self.get("/v1/networks")
    }

    pub fn network(&self, name: &str) -> anyhow::Result<NetworkView> {
        self.get(&format!("/v1/networks/{}", seg(name)))
    }

    pub fn remove_network(&self, name: &str, force: bool) -> anyhow::Result<()> {
        self.delete(&format!("/v1/networks/{}?force={force}", seg(name)))
    }

    pub fn add_port(&self, network: &str, spec: &PortSpec) -> anyhow::Result<PortView> {
        self.json("POST", &format!("/v1/networks/{}/ports", seg(network)), Some(spec))
    }

    pub fn ports(&self, network: &str) -> anyhow::Result<Vec<PortView>> {
        self.get(&format!("/v1/networks/{}/ports", seg(network)))
    }

    pub fn remove_port(&self, network: &str, name: &str) -> anyhow::Result<()> {
        self.delete(&format!("/v1/networks/{}/ports/{}", seg(network), seg(name)))
    }

    /// A socketpair port and its VM end (an fd, for the VMM to inherit).
    pub fn socketpair_port(
        &self,
        network: &str,
        spec: &SocketpairSpec,
    ) -> anyhow::Result<(PortView, std::os::fd::OwnedFd)> {
        self.rt.block_on(socketpair_port(&self.socket, network, spec))
    }

    pub fn add_forward(&self, network: &str, spec: &ForwardSpec) -> anyhow::Result<ForwardSpec> {
        self.json("POST", &format!("/v1/networks/{}/forwards", seg(network)), Some(spec))
    }

    pub fn forwards(&self, network: &str) -> anyhow::Result<Vec<ForwardView>> {
        self.get(&format!("/v1/networks/{}/forwards", seg(network)))
    }

    /// Removes the forward from `host`; `proto` picks one when TCP and UDP share it.
    pub fn remove_forward(&self, network: &str, host: &str, proto: Option<ForwardProto>) -> anyhow::Result<()> {
        let query = proto.map(|p| format!("?proto={}", p.as_str())).unwrap_or_default();
        self.delete(&format!("/v1/networks/{}/forwards/{}{query}", seg(network), seg(host)))
    }

    pub fn policy(&self, network: &str) -> anyhow::Result<PolicySpec> {
        self.get(&format!("/v1/networks/{}/policy", seg(network)))
    }

    pub fn set_policy(&self, network: &str, policy: &PolicySpec) -> anyhow::Result<PolicySpec> {
        self.json("PUT", &format!("/v1/networks/{}/policy", seg(network)), Some(policy))
    }

    pub fn stats(&self) -> anyhow::Result<Vec<NetworkStats>> {
        self.get("/v1/stats")
    }

    pub fn settings(&self, network: &str) -> anyhow::Result<GatewaySettings> {
        self.get(&format!("/v1/networks/{}/settings", seg(network)))
    }

    pub fn set_settings(&self, network: &str, settings: &GatewaySettings) -> anyhow::Result<GatewaySettings> {
        self.json(
            "PUT",
            &format!("/v1/networks/{}/settings", seg(network)),
            Some(settings),
        )
    }

    pub fn add_reservation(&self, network: &str, spec: &ReservationSpec) -> anyhow::Result<ReservationSpec> {
        self.json(
            "POST",
            &format!("/v1/networks/{}/reservations", seg(network)),
            Some(spec),
        )
    }

    pub fn reservations(&self, network: &str) -> anyhow::Result<Vec<ReservationSpec>> {
        self.get(&format!("/v1/networks/{}/reservations", seg(network)))
    }

    pub fn remove_reservation(&self, network: &str, key: &str) -> anyhow::Result<()> {
        self.delete(&format!("/v1/networks/{}/reservations/{}", seg(network), seg(key)))
    }

    pub fn leases(&self, network: &str) -> anyhow::Result<Vec<LeaseView>> {
        self.get(&format!("/v1/networks/{}/leases", seg(network)))
    }

    pub fn flows(&self, network: &str) -> anyhow::Result<FlowsView> {
        self.get(&format!("/v1/networks/{}/flows", seg(network)))
    }

    pub fn run_vm(&self, req: &VmRequest) -> anyhow::Result<VmView> {
        self.json("POST", "/v1/vms", Some(req))
    }

    pub fn vms(&self) -> anyhow::Result<Vec<VmView>> {
        self.get("/v1/vms")
    }

    pub fn vm(&self, name: &str) -> anyhow::Result<VmView> {
        self.get(&format!("/v1/vms/{}", seg(name)))
    }

    pub fn inspect_vm(&self, name: &str) -> anyhow::Result<crate::control::vms::VmInspect> {
        self.get(&format!("/v1/vms/{}/inspect", seg(name)))
    }

    pub fn restart_vm(&self, name: &str) -> anyhow::Result<VmView> {
        self.json("POST", &format!("/v1/vms/{}/restart", seg(name)), None::<&NoBody>)
    }

    /// Pauses a VM (`paused`) or lets it run on.
    pub fn pause_vm(&self, name: &str, paused: bool) -> anyhow::Result<VmView> {
        let verb = if paused { "pause" } else { "resume" };
        self.json("POST", &format!("/v1/vms/{}/{verb}", seg(name)), None::<&NoBody>)
    }

    pub fn stop_vm(&self, name: &str) -> anyhow::Result<VmView> {
        self.json("DELETE", &format!("/v1/vms/{}", seg(name)), None::<&NoBody>)
    }

    /// The VM's serial console so far.
    pub fn vm_logs(&self, name: &str) -> anyhow::Result<String> {
        self.text(&format!("/v1/vms/{}/logs", seg(name)))
    }

    /// The Prometheus text.
    pub fn metrics(&self) -> anyhow::Result<String> {
        self.text("/metrics")
    }

    /// Copies the event stream (JSON lines) to `out` until the daemon ends it or
    /// writing fails.
    pub fn events(&self, out: &mut dyn std::io::Write) -> anyhow::Result<()> {
        self.rt.block_on(stream_to(&self.socket, "/v1/events", out))
    }

    /// Copies a capture (pcap) of a network, or of one port of it, to `out` until the
    /// daemon ends it.
    pub fn capture(
        &self,
        network: &str,
        port: Option<&str>,
        pcapng: bool,
        out: &mut dyn std::io::Write,
    ) -> anyhow::Result<()> {
        let format = if pcapng { "pcapng" } else { "pcap" };
        let path = match port {
            Some(p) => format!("/v1/networks/{}/capture?format={format}&port={}", seg(network), seg(p)),
            None => format!("/v1/networks/{}/capture?format={format}", seg(network)),
        };
        self.rt.block_on(stream_to(&self.socket, &path, out))
    }
}

/// Creates a socketpair port on `network` and receives its VM end (see
/// [`crate::fdpass`]). Returns the port and the fd.
pub async fn socketpair_port(
    socket: &Path,
    network: &str,
    spec: &SocketpairSpec,
) -> anyhow::Result<(PortView, std::os::fd::OwnedFd)> {
    use hyper::header::{CONNECTION, UPGRADE};
    let (mut sender, conn) = handshake(socket).await?;
    tokio::spawn(conn.with_upgrades());
    let req = Request::builder()
        .method("POST")
        .uri(format!("/v1/networks/{}/socketpairs", seg(network)))
        .header("host", "vmfabric")
        .header("content-type", "application/json")
        .header(CONNECTION, "upgrade")
        .header(UPGRADE, crate::fdpass::PROTOCOL)
        .body(Full::new(Bytes::from(serde_json::to_vec(spec)?)))?;
    let resp = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    if status != 101 {
        let data = resp.into_body().collect().await?.to_bytes();
        return Err(ApiError::from_body(status, &data).into());
    }
    let upgraded = hyper::upgrade::on(resp).await?;
    let parts = upgraded
        .downcast::<TokioIo<tokio::net::UnixStream>>()
        .map_err(|_| anyhow::anyhow!("the upgraded connection is not a Unix socket"))?;
    anyhow::ensure!(parts.read_buf.is_empty(), "the daemon spoke before it was asked");
    let stream = parts.io.into_inner().into_std()?;
    stream.set_nonblocking(false)?;
    let (data, fd) = tokio::task::spawn_blocking(move || {
        std::io::Write::write_all(&mut &stream, &[crate::fdpass::READY])?;
        crate::fdpass::recv_with_fd(&stream)
    })
    .await??;
    Ok((serde_json::from_slice(&data)?, fd))
}

/// Everything but RFC 3986's unreserved characters is escaped, so a name becomes one
/// path segment whatever it holds (`net/ports/p0` or `net?force=true` stay names).
const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// A name or address as one URL path segment (or query value).
pub fn seg(text: &str) -> String {
    percent_encoding::utf8_percent_encode(text, SEGMENT).to_string()
}
