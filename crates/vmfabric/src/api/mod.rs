//! The HTTP/JSON API on a Unix socket, versioned under `/v1`.
//!
//! Errors are `{"error": code, "message": text}` with 400 for bad input (bad JSON and
//! unknown fields included), 404 for unknown names, 409 for duplicates and conflicts,
//! 503 when a bound is reached, 500 for failures of the host (`error.rs` is the one
//! place that decides). Connections are bounded in number, and one that sends no
//! request head within [`Limits::header_timeout`] (a new or an idle keep-alive one) is
//! closed.

mod error;
mod handlers;

use std::path::Path;

use anyhow::Context;
use std::sync::Arc;
use std::time::Duration;

use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};

use crate::control::error::ControlError;
use crate::control::Control;
use handlers::*;

/// The API's OpenAPI document, made from the handlers' and types' own annotations
/// (a contract test checks live answers against it).
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "vmfabric API",
        version = "1",
        description = "The vmfabric daemon's HTTP/JSON API, served on a Unix socket (default /run/vmfabric/vmfabric.sock, mode 0600). Errors are {\"error\": code, \"message\": text}."
    ),
    paths(
        list_networks,
        create_network,
        show_network,
        delete_network,
        list_ports,
        add_port,
        remove_port,
        socketpair,
        list_vms,
        run_vm,
        show_vm,
        stop_vm,
        inspect_vm,
        restart_vm,
        pause_vm,
        resume_vm,
        vm_logs,
        show_policy,
        set_policy,
        show_settings,
        set_settings,
        list_forwards,
        add_forward,
        remove_forward,
        list_reservations,
        add_reservation,
        remove_reservation,
        list_flows,
        list_leases,
        capture,
        events,
        stats,
        metrics,
        openapi
    )
)]
pub struct ApiDoc;

/// The document as JSON.
pub fn openapi_json() -> String {
    use utoipa::OpenApi;
    static DOC: std::sync::LazyLock<String> =
        std::sync::LazyLock::new(|| ApiDoc::openapi().to_pretty_json().expect("a document of plain data"));
    DOC.clone()
}

#[utoipa::path(get, path = "/v1/openapi.json", tag = "daemon", operation_id = "openapi",
    responses((status = 200, description = "This document", content_type = "application/json", body = Object)))]
async fn openapi() -> Response {
    ([("content-type", "application/json")], openapi_json()).into_response()
}

async fn not_found() -> ControlError {
    ControlError::NotFound("no such route; see /v1/networks".into())
}

/// A duplicate of a connection's socket, for handing an fd over it (SCM_RIGHTS needs
/// the socket itself, which the HTTP layer does not expose once it has it).
#[derive(Clone)]
pub struct ConnFd(pub Option<Arc<std::os::fd::OwnedFd>>);

/// What one client may hold of the daemon.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Open connections at once; the next one is answered 503 and closed.
    pub max_connections: usize,
    /// Time to send a request head, on a new connection or between requests on a
    /// kept-alive one.
    pub header_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        // Far below the daemon's fd limit (it raises its soft limit at start), far
        // above what a CLI or an orchestrator keeps open.
        Limits {
            max_connections: 256,
            header_timeout: Duration::from_secs(30),
        }
    }
}

/// Serves the API on `listener` until the future is dropped.
pub async fn serve(listener: tokio::net::UnixListener, control: Arc<Control>) -> std::io::Result<()> {
    serve_with(listener, control, Limits::default()).await
}

/// Like [`serve`], with the given bounds.
pub async fn serve_with(
    listener: tokio::net::UnixListener,
    control: Arc<Control>,
    limits: Limits,
) -> std::io::Result<()> {
    let app = router(control);
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            // Out of fds, say: the listener stays; try again shortly.
            Err(e) => {
                tracing::warn!("cannot accept an API connection: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tokio::spawn(refuse_busy(stream, limits.max_connections));
            continue;
        };
        let conn_fd = {
            use std::os::fd::AsFd;
            ConnFd(stream.as_fd().try_clone_to_owned().ok().map(Arc::new))
        };
        let app = app.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let mut req = req.map(axum::body::Body::new);
                req.extensions_mut().insert(axum::extract::ConnectInfo(conn_fd.clone()));
                tower::ServiceExt::oneshot(app.clone(), req)
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            if let Err(e) = conn.await {
                tracing::debug!("API connection ended: {e}");
            }
        });
    }
}

/// Answers a connection over the limit with a 503 that says so, and closes it.
async fn refuse_busy(mut stream: tokio::net::UnixStream, max: usize) {
    use tokio::io::AsyncWriteExt;
    let body = serde_json::json!({
        "error": "busy",
        "message": format!("the daemon has {max} API connections open, its limit; close idle ones and retry"),
    })
    .to_string();
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body.as_bytes()).await?;
        stream.shutdown().await
    })
    .await;
}

pub fn router(control: Arc<Control>) -> Router {
    Router::new()
        .route("/v1/networks", get(list_networks).post(create_network))
        .route("/v1/networks/{name}", get(show_network).delete(delete_network))
        .route("/v1/networks/{name}/ports", get(list_ports).post(add_port))
        .route("/v1/networks/{name}/ports/{port}", delete(remove_port))
        .route("/v1/networks/{name}/leases", get(list_leases))
        .route("/v1/networks/{name}/flows", get(list_flows))
        .route("/v1/networks/{name}/capture", get(capture))
        .route("/v1/networks/{name}/policy", get(show_policy).put(set_policy))
        .route("/v1/networks/{name}/settings", get(show_settings).put(set_settings))
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
        .route("/v1/vms/{name}/inspect", get(inspect_vm))
        .route("/v1/vms/{name}/restart", axum::routing::post(restart_vm))
        .route("/v1/vms/{name}/pause", axum::routing::post(pause_vm))
        .route("/v1/vms/{name}/resume", axum::routing::post(resume_vm))
        .route("/v1/stats", get(stats))
        .route("/v1/events", get(events))
        .route("/metrics", get(metrics))
        .route("/v1/openapi.json", get(openapi))
        .fallback(not_found)
        .layer(axum::middleware::map_response(json_errors))
        .with_state(control)
}

/// Refusals axum makes itself (a query or path that does not parse, a method a route
/// does not have) come as plain text; every refusal the API documents is an
/// `ErrorBody`, so they are rewritten here, in one place.
async fn json_errors(resp: axum::response::Response) -> axum::response::Response {
    use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE};
    use axum::response::IntoResponse;
    let status = resp.status();
    let json = resp
        .headers()
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || json {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 64 * 1024).await.unwrap_or_default();
    let mut message = String::from_utf8_lossy(&text).trim().to_string();
    if message.is_empty() {
        message = status.canonical_reason().unwrap_or("refused").to_string();
    }
    let error = match status.as_u16() {
        404 => error::ErrorCode::NotFound,
        409 => error::ErrorCode::Conflict,
        503 => error::ErrorCode::Busy,
        500.. => error::ErrorCode::Internal,
        _ => error::ErrorCode::BadRequest,
    };
    parts.headers.remove(CONTENT_TYPE);
    parts.headers.remove(CONTENT_LENGTH);
    let mut answer = axum::Json(error::ErrorBody { error, message }).into_response();
    answer.headers_mut().extend(parts.headers);
    *answer.status_mut() = status;
    answer
}

/// Only `/metrics`, for serving on a TCP address to a Prometheus scraper.
pub fn metrics_router(control: Arc<Control>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .with_state(control)
}

/// Binds the API socket (mode 0600). Refuses when another daemon answers on it or
/// when something other than a socket is at the path; removes a stale socket left by
/// a crash.
pub fn bind(path: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    bind_shared(path, None)
}

/// The same, the socket shared with group `gid` (mode 0660) when given. The socket is
/// bound under a temporary name, given its mode and group, and only then renamed into
/// place: nobody ever finds it at `path` with a wider mode or the wrong group.
pub fn bind_shared(path: &Path, gid: Option<u32>) -> anyhow::Result<tokio::net::UnixListener> {
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
    let name = path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
    let staging = path.with_file_name(format!(".{name}.{}.binding", std::process::id()));
    let _ = std::fs::remove_file(&staging);
    let listener = tokio::net::UnixListener::bind(&staging)?;
    let placed = (|| {
        let mode = match gid {
            Some(gid) => {
                rustix::fs::chown(&staging, None, Some(rustix::fs::Gid::from_raw(gid)))
                    .with_context(|| format!("give {} to group {gid}", path.display()))?;
                0o660
            }
            None => 0o600,
        };
        std::fs::set_permissions(&staging, std::os::unix::fs::PermissionsExt::from_mode(mode))?;
        std::fs::rename(&staging, path)?;
        anyhow::Ok(())
    })();
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&staging);
        return Err(e);
    }
    Ok(listener)
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_operation_has_an_id_and_every_schema_it_names_exists() {
        let doc: serde_json::Value = serde_json::from_str(&super::openapi_json()).unwrap();
        if std::env::var_os("VMFABRIC_PRINT_OPENAPI").is_some() {
            println!("{}", super::openapi_json());
        }
        let mut ids = std::collections::HashSet::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                let id = op["operationId"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{method} {path} has no id"));
                assert!(ids.insert(id.to_string()), "{id} twice");
            }
        }
        let text = super::openapi_json();
        for r in text.split("\"#/components/schemas/").skip(1) {
            let name = &r[..r.find('"').unwrap()];
            assert!(
                doc["components"]["schemas"][name].is_object(),
                "{name} is named but not defined"
            );
        }
    }
}
