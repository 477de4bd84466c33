//! The HTTP/JSON API on a Unix socket, versioned under `/v1`.
//!
//! Errors are `{"error": code, "message": text}` with 400 for bad input (bad JSON and
//! unknown fields included), 404 for unknown names, 409 for duplicates and conflicts,
//! 500 for failures of the host.

use std::path::Path;
use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::control::error::{ControlError, ErrorClass};
use crate::control::Control;
use crate::model::{ForwardSpec, NetworkSpec, PolicySpec, PortSpec, ReservationSpec};

impl IntoResponse for ControlError {
    fn into_response(self) -> Response {
        let (status, code) = match self.class() {
            ErrorClass::Invalid => (StatusCode::BAD_REQUEST, "bad_request"),
            ErrorClass::NotFound => (StatusCode::NOT_FOUND, "not_found"),
            ErrorClass::Conflict => (StatusCode::CONFLICT, "conflict"),
            ErrorClass::Host => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        (status, Json(json!({ "error": code, "message": self.to_string() }))).into_response()
    }
}

/// A JSON body, or a 400 that says what is wrong with it.
fn body<T>(b: Result<Json<T>, JsonRejection>) -> Result<T, ControlError> {
    b.map(|Json(v)| v).map_err(|e| ControlError::invalid(e.body_text()))
}

type Shared = State<Arc<Control>>;

async fn list_networks(State(d): Shared) -> Response {
    Json(d.networks()).into_response()
}

async fn create_network(
    State(d): Shared,
    Query(f): Query<Force>,
    b: Result<Json<NetworkSpec>, JsonRejection>,
) -> Result<Response, ControlError> {
    let rec = d.create_network(body(b)?, f.force)?;
    Ok((StatusCode::CREATED, Json(rec)).into_response())
}

async fn show_network(State(d): Shared, UrlPath(name): UrlPath<String>) -> Result<Response, ControlError> {
    Ok(Json(d.network(&name)?).into_response())
}

#[derive(Deserialize)]
struct Force {
    #[serde(default)]
    force: bool,
}

async fn delete_network(
    State(d): Shared,
    UrlPath(name): UrlPath<String>,
    Query(f): Query<Force>,
) -> Result<StatusCode, ControlError> {
    d.delete_network(&name, f.force)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_ports(State(d): Shared, UrlPath(net): UrlPath<String>) -> Result<Response, ControlError> {
    Ok(Json(d.ports(&net)?).into_response())
}

async fn add_port(
    State(d): Shared,
    UrlPath(net): UrlPath<String>,
    b: Result<Json<PortSpec>, JsonRejection>,
) -> Result<Response, ControlError> {
    let view = d.add_port(&net, body(b)?)?;
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

async fn remove_port(
    State(d): Shared,
    UrlPath((net, port)): UrlPath<(String, String)>,
) -> Result<StatusCode, ControlError> {
    d.remove_port(&net, &port)?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SocketpairRequest {
    name: crate::model::Name,
    #[serde(default)]
    mac: Option<String>,
    #[serde(default)]
    learn_mac_once: bool,
}

/// Creates a socketpair port and hands its VM end to the client over this very
/// connection (see [`crate::fdpass`]).
async fn socketpair(
    State(d): Shared,
    UrlPath(net): UrlPath<String>,
    axum::extract::ConnectInfo(conn): axum::extract::ConnectInfo<ConnFd>,
    mut req: axum::extract::Request,
) -> Result<Response, ControlError> {
    use axum::http::header::{CONNECTION, UPGRADE};
    if req.headers().get(UPGRADE).and_then(|v| v.to_str().ok()) != Some(crate::fdpass::PROTOCOL) {
        return Err(ControlError::invalid(format!(
            "this route hands over an fd: send it with `Connection: upgrade` and `Upgrade: {}`",
            crate::fdpass::PROTOCOL
        )));
    }
    let Some(conn) = conn.0 else {
        return Err(ControlError::Host(
            "this connection's socket could not be duplicated".into(),
        ));
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    let bytes = axum::body::to_bytes(req.into_body(), 64 * 1024)
        .await
        .map_err(|e| ControlError::invalid(e.to_string()))?;
    let ask: SocketpairRequest = serde_json::from_slice(&bytes).map_err(|e| ControlError::invalid(e.to_string()))?;
    let (view, vm_end) = d.add_socketpair_port(&net, &ask.name, ask.mac.as_deref(), ask.learn_mac_once)?;
    let payload = serde_json::to_vec(&view).map_err(|e| ControlError::Host(e.to_string()))?;
    let (daemon, name) = (d.clone(), ask.name.clone());
    tokio::spawn(async move {
        let handed = async {
            // Past the upgrade the HTTP layer reads nothing more from the connection;
            // the upgraded handle is only kept so the connection stays open.
            let mut upgraded = hyper_util::rt::TokioIo::new(on_upgrade.await.map_err(std::io::Error::other)?);
            let mut ready = [0u8; 1];
            tokio::io::AsyncReadExt::read_exact(&mut upgraded, &mut ready).await?;
            if ready[0] != crate::fdpass::READY {
                return Err(std::io::Error::other("unexpected byte before the fd"));
            }
            // The socket is non-blocking (tokio's); the message is small, so one send
            // fits in its buffer.
            crate::fdpass::send_with_fd(&*conn, &payload, &vm_end)?;
            tokio::io::AsyncWriteExt::shutdown(&mut upgraded).await
        };
        if let Err(e) = handed.await {
            tracing::warn!(%net, port = %name, "could not hand over the socketpair end: {e}");
            let _ = daemon.remove_port(&net, &name);
        }
    });
    let headers = [(CONNECTION, "upgrade"), (UPGRADE, crate::fdpass::PROTOCOL)];
    Ok((StatusCode::SWITCHING_PROTOCOLS, headers).into_response())
}

async fn list_vms(State(d): Shared) -> Response {
    Json(d.vms().list()).into_response()
}

async fn run_vm(
    State(d): Shared,
    b: Result<Json<crate::control::vms::VmRequest>, JsonRejection>,
) -> Result<Response, ControlError> {
    let req = body(b)?;
    // Booting blocks a little (spawning QEMU); keep it off the async workers.
    let v = tokio::task::spawn_blocking(move || d.vms().run(&*d, req))
        .await
        .map_err(|e| ControlError::Host(e.to_string()))??;
    Ok((StatusCode::CREATED, Json(v)).into_response())
}

async fn show_vm(State(d): Shared, UrlPath(name): UrlPath<String>) -> Result<Response, ControlError> {
    Ok(Json(d.vms().get(&name)?).into_response())
}

async fn stop_vm(State(d): Shared, UrlPath(name): UrlPath<String>) -> Result<Response, ControlError> {
    // Stopping waits for the guest (grace periods): off the async workers.
    let v = tokio::task::spawn_blocking(move || d.vms().stop(&*d, &name))
        .await
        .map_err(|e| ControlError::Host(e.to_string()))??;
    Ok(Json(v).into_response())
}

async fn vm_logs(State(d): Shared, UrlPath(name): UrlPath<String>) -> Result<Response, ControlError> {
    Ok(([("content-type", "text/plain; charset=utf-8")], d.vms().logs(&name)?).into_response())
}

async fn show_policy(State(d): Shared, UrlPath(net): UrlPath<String>) -> Result<Response, ControlError> {
    Ok(Json(d.policy(&net)?).into_response())
}

async fn set_policy(
    State(d): Shared,
    UrlPath(net): UrlPath<String>,
    b: Result<Json<PolicySpec>, JsonRejection>,
) -> Result<Response, ControlError> {
    Ok(Json(d.set_policy(&net, body(b)?)?).into_response())
}

async fn list_forwards(State(d): Shared, UrlPath(net): UrlPath<String>) -> Result<Response, ControlError> {
    Ok(Json(d.forwards(&net)?).into_response())
}

async fn add_forward(
    State(d): Shared,
    UrlPath(net): UrlPath<String>,
    b: Result<Json<ForwardSpec>, JsonRejection>,
) -> Result<Response, ControlError> {
    Ok((StatusCode::CREATED, Json(d.add_forward(&net, body(b)?)?)).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ForwardQuery {
    proto: Option<String>,
}

async fn remove_forward(
    State(d): Shared,
    UrlPath((net, host)): UrlPath<(String, String)>,
    Query(q): Query<ForwardQuery>,
) -> Result<StatusCode, ControlError> {
    d.remove_forward(&net, &host, q.proto.as_deref())?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_reservations(State(d): Shared, UrlPath(net): UrlPath<String>) -> Result<Response, ControlError> {
    Ok(Json(d.reservations(&net)?).into_response())
}

async fn add_reservation(
    State(d): Shared,
    UrlPath(net): UrlPath<String>,
    b: Result<Json<ReservationSpec>, JsonRejection>,
) -> Result<Response, ControlError> {
    let r = d.reserve(&net, body(b)?)?;
    Ok((StatusCode::CREATED, Json(r)).into_response())
}

async fn remove_reservation(
    State(d): Shared,
    UrlPath((net, key)): UrlPath<(String, String)>,
) -> Result<StatusCode, ControlError> {
    d.unreserve(&net, &key)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_flows(State(d): Shared, UrlPath(net): UrlPath<String>) -> Result<Response, ControlError> {
    Ok(Json(d.flows(&net)?).into_response())
}

async fn list_leases(State(d): Shared, UrlPath(net): UrlPath<String>) -> Result<Response, ControlError> {
    Ok(Json(d.leases(&net)?).into_response())
}

#[derive(Deserialize)]
struct CaptureQuery {
    port: Option<String>,
}

/// Feeds what the pcap writer produces into the response body.
struct BodyWriter(tokio::sync::mpsc::Sender<Result<axum::body::Bytes, std::io::Error>>);

impl std::io::Write for BodyWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .blocking_send(Ok(axum::body::Bytes::copy_from_slice(buf)))
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Streams a live capture as pcap until the client goes away.
async fn capture(
    State(d): Shared,
    UrlPath(net): UrlPath<String>,
    Query(q): Query<CaptureQuery>,
) -> Result<Response, ControlError> {
    let cap = d.capture(&net, q.port.as_deref())?;
    let net_name = net.clone();
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    std::thread::Builder::new()
        .name("capture".into())
        .spawn(move || {
            let closed = tx.clone();
            let Ok(mut w) = pcap_file::pcap::PcapWriter::new(BodyWriter(tx)) else {
                return;
            };
            // Wakes now and then to notice a client that left while nothing flowed.
            loop {
                match cap.frames.recv_timeout(std::time::Duration::from_millis(500)) {
                    Ok(f) => {
                        let pkt = pcap_file::pcap::PcapPacket::new(f.at, f.data.len() as u32, &f.data);
                        if w.write_packet(&pkt).is_err() {
                            tracing::info!(network = %net_name, lost = cap.dropped(), "capture ended");
                            return;
                        }
                    }
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) if !closed.is_closed() => {}
                    Err(_) => {
                        tracing::info!(network = %net_name, lost = cap.dropped(), "capture ended");
                        return;
                    }
                }
            }
        })
        .map_err(|e| ControlError::Host(e.to_string()))?;
    let body = axum::body::Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    Ok(([("content-type", "application/vnd.tcpdump.pcap")], body).into_response())
}

async fn metrics(State(d): Shared) -> Response {
    ([("content-type", "text/plain; version=0.0.4")], d.metrics()).into_response()
}

/// The OpenAPI 3 document of this API (a test keeps it in step with the routes).
pub const OPENAPI: &str = include_str!("openapi.json");

async fn openapi() -> Response {
    ([("content-type", "application/json")], OPENAPI).into_response()
}

async fn not_found() -> ControlError {
    ControlError::NotFound("no such route; see /v1/networks".into())
}

/// A duplicate of a connection's socket, for handing an fd over it (SCM_RIGHTS needs
/// the socket itself, which the HTTP layer does not expose once it has it).
#[derive(Clone)]
pub struct ConnFd(pub Option<Arc<std::os::fd::OwnedFd>>);

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, tokio::net::UnixListener>> for ConnFd {
    fn connect_info(stream: axum::serve::IncomingStream<'_, tokio::net::UnixListener>) -> Self {
        use std::os::fd::AsFd;
        ConnFd(stream.io().as_fd().try_clone_to_owned().ok().map(Arc::new))
    }
}

/// Serves the API on `listener` until the future is dropped.
pub async fn serve(listener: tokio::net::UnixListener, daemon: Arc<Control>) -> std::io::Result<()> {
    let app = router(daemon).into_make_service_with_connect_info::<ConnFd>();
    axum::serve(listener, app).await
}

pub fn router(daemon: Arc<Control>) -> Router {
    Router::new()
        .route("/v1/networks", get(list_networks).post(create_network))
        .route("/v1/networks/{name}", get(show_network).delete(delete_network))
        .route("/v1/networks/{name}/ports", get(list_ports).post(add_port))
        .route("/v1/networks/{name}/ports/{port}", delete(remove_port))
        .route("/v1/networks/{name}/leases", get(list_leases))
        .route("/v1/networks/{name}/flows", get(list_flows))
        .route("/v1/networks/{name}/capture", get(capture))
        .route("/v1/networks/{name}/policy", get(show_policy).put(set_policy))
        .route("/v1/networks/{name}/forwards", get(list_forwards).post(add_forward))
        .route("/v1/networks/{name}/forwards/{host}", delete(remove_forward))
        .route("/v1/networks/{name}/socketpairs", axum::routing::post(socketpair))
        .route(
            "/v1/networks/{name}/reservations",
            get(list_reservations).post(add_reservation),
        )
        .route("/v1/networks/{name}/reservations/{key}", delete(remove_reservation))
        .route("/v1/vms", get(list_vms).post(run_vm))
        .route("/v1/vms/{name}", get(show_vm).delete(stop_vm))
        .route("/v1/vms/{name}/logs", get(vm_logs))
        .route("/metrics", get(metrics))
        .route("/v1/openapi.json", get(openapi))
        .fallback(not_found)
        .with_state(daemon)
}

/// Only `/metrics`, for serving on a TCP address to a Prometheus scraper.
pub fn metrics_router(daemon: Arc<Control>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .with_state(daemon)
}

/// Binds the API socket (mode 0600). Refuses when another daemon answers on it or
/// when something other than a socket is at the path; removes a stale socket left by
/// a crash.
pub fn bind(path: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        // Only a socket nobody answers on is ours to replace: never a file, a link or
        // a directory that happens to sit at the path given.
        if !std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) {
            anyhow::bail!(
                "{} exists and is not a socket; refusing to replace it (give --socket another path)",
                path.display()
            );
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!("another vmfabric daemon is serving {}; stop it first", path.display());
        }
        std::fs::remove_file(path)?;
    }
    let listener = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    Ok(listener)
}
