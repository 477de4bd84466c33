//! The API's handlers: each reads its request, runs the control-plane call off the
//! async workers (they also run every gateway; a store write or a netlink call must
//! not stall DHCP and DNS), and answers.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;

use super::error::ErrorBody;
use super::ConnFd;
use crate::control::error::ControlError;
use crate::control::vms::{VmRequest, VmView};
use crate::control::Control;
use crate::model::{
    EventView, FlowsView, ForwardProto, ForwardSpec, ForwardView, GatewaySettings, LeaseView, NetworkSpec,
    NetworkStats, NetworkView, PolicySpec, PortSpec, PortView, ReservationSpec, SocketpairSpec,
};

/// Runs a control-plane call on the blocking pool.
pub(super) async fn blocking<T: Send + 'static>(
    call: impl FnOnce() -> Result<T, ControlError> + Send + 'static,
) -> Result<T, ControlError> {
    tokio::task::spawn_blocking(call).await.map_err(ControlError::host)?
}

/// A JSON body, or a 400 that says what is wrong with it.
fn body<T>(b: Result<Json<T>, JsonRejection>) -> Result<T, ControlError> {
    b.map(|Json(v)| v).map_err(|e| ControlError::invalid(e.body_text()))
}

type Shared = State<Arc<Control>>;

#[utoipa::path(get, path = "/v1/networks", tag = "networks", responses((status = 200, description = "Networks", body = [NetworkView])), operation_id = "list_networks")]
pub(super) async fn list_networks(State(d): Shared) -> Result<Response, ControlError> {
    Ok(Json(blocking(move || Ok(d.networks())).await?).into_response())
}

#[utoipa::path(post, path = "/v1/networks", tag = "networks", params(("force" = Option<bool>, Query, description = "Create even over a host route")), request_body = NetworkSpec, responses((status = 201, description = "Created", body = NetworkSpec), (status = 400, description = "Bad input", body = ErrorBody), (status = 409, description = "Conflicts with what exists", body = ErrorBody), (status = 500, description = "The host failed", body = ErrorBody)), operation_id = "create_network")]
pub(super) async fn create_network(
    State(d): Shared,
    Query(f): Query<Force>,
    b: Result<Json<NetworkSpec>, JsonRejection>,
) -> Result<Response, ControlError> {
    let spec = body(b)?;
    let rec = blocking(move || d.create_network(spec, f.force)).await?;
    Ok((StatusCode::CREATED, Json(rec)).into_response())
}

#[utoipa::path(get, path = "/v1/networks/{name}", tag = "networks", params(("name" = String, Path, description = "The network")), responses((status = 200, description = "The network", body = NetworkView), (status = 404, description = "No such network or object", body = ErrorBody)), operation_id = "show_network")]
pub(super) async fn show_network(State(d): Shared, UrlPath(name): UrlPath<String>) -> Result<Response, ControlError> {
    Ok(Json(blocking(move || d.network(&name)).await?).into_response())
}

#[derive(Deserialize)]
pub(super) struct Force {
    #[serde(default)]
    force: bool,
}

#[utoipa::path(delete, path = "/v1/networks/{name}", tag = "networks", params(("name" = String, Path, description = "The network"), ("force" = Option<bool>, Query, description = "Remove its ports too")), responses((status = 204, description = "Deleted"), (status = 400, description = "Bad input", body = ErrorBody), (status = 404, description = "No such network or object", body = ErrorBody), (status = 409, description = "Conflicts with what exists", body = ErrorBody), (status = 500, description = "The host failed", body = ErrorBody)), operation_id = "delete_network")]
pub(super) async fn delete_network(
    State(d): Shared,
    UrlPath(name): UrlPath<String>,
    Query(f): Query<Force>,
) -> Result<StatusCode, ControlError> {
    blocking(move || d.delete_network(&name, f.force)).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/v1/networks/{name}/ports", tag = "ports", params(("name" = String, Path, description = "The network")), responses((status = 200, description = "Ports", body = [PortView]), (status = 404, description = "No such network or object", body = ErrorBody)), operation_id = "list_ports")]
pub(super) async fn list_ports(State(d): Shared, UrlPath(net): UrlPath<String>) -> Result<Response, ControlError> {
    Ok(Json(blocking(move || d.ports(&net)).await?).into_response())
}

#[utoipa::path(post, path = "/v1/networks/{name}/ports", tag = "ports", params(("name" = String, Path, description = "The network")), request_body = PortSpec, responses((status = 201, description = "Created, with the arguments to give the VMM", body = PortView), (status = 400, description = "Bad input", body = ErrorBody), (status = 404, description = "No such network or object", body = ErrorBody), (status = 409, description = "Conflicts with what exists", body = ErrorBody), (status = 500, description = "The host failed", body = ErrorBody)), operation_id = "add_port")]
pub(super) async fn add_port(
    State(d): Shared,
    UrlPath(net): UrlPath<String>,
    b: Result<Json<PortSpec>, JsonRejection>,
) -> Result<Response, ControlError> {
    let spec = body(b)?;
    let view = blocking(move || d.add_port(&net, spec)).await?;
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

#[utoipa::path(delete, path = "/v1/networks/{name}/ports/{port}", tag = "ports", params(("name" = String, Path, description = "The network"), ("port" = String, Path, description = "The port")), responses((status = 204, description = "Removed"), (status = 404, description = "No such network or object", body = ErrorBody), (status = 500, description = "The host failed", body = ErrorBody)), operation_id = "remove_port")]
pub(super) async fn remove_port(
    State(d): Shared,
    UrlPath((net, port)): UrlPath<(String, String)>,
) -> Result<StatusCode, ControlError> {
    blocking(move || d.remove_port(&net, &port)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Creates a socketpair port and hands its VM end to the client over this very
/// connection (see [`crate::fdpass`]).
#[utoipa::path(post, path = "/v1/networks/{name}/socketpairs", tag = "ports", params(("name" = String, Path, description = "The network")), request_body = SocketpairSpec, responses((status = 101, description = "Upgraded: after the client writes one byte, the port (JSON) comes with its VM end as an SCM_RIGHTS fd"), (status = 400, description = "Bad input", body = ErrorBody), (status = 404, description = "No such network or object", body = ErrorBody), (status = 409, description = "Conflicts with what exists", body = ErrorBody)), operation_id = "socketpair")]
pub(super) async fn socketpair(
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
    let ask: SocketpairSpec = serde_json::from_slice(&bytes).map_err(|e| ControlError::invalid(e.to_string()))?;
    let (view, vm_end) = {
        let (d, net, ask) = (d.clone(), net.clone(), ask.clone());
        blocking(move || d.add_socketpair_port(&net, &ask.name, ask.mac.as_deref(), ask.learn_mac_once)).await?
    };
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
            let _ = tokio::task::spawn_blocking(move || daemon.remove_port(&net, &name)).await;
        }
    });
    let headers = [(CONNECTION, "upgrade"), (UPGRADE, crate::fdpass::PROTOCOL)];
    Ok((StatusCode::SWITCHING_PROTOCOLS, headers).into_response())
}

#[utoipa::path(get, path = "/v1/vms", tag = "vms", responses((status = 200, description = "VMs", body = [VmView])), operation_id = "list_vms")]
pub(super) async fn list_vms(State(d): Shared) -> Result<Response, ControlError> {
    Ok(Json(blocking(move || Ok(d.vms().list())).await?).into_response())
}

#[utoipa::path(post, path = "/v1/vms", tag = "vms", request_body = VmRequest, responses((status = 201, description = "Starting", body = VmView), (status = 400, description = "Bad input", body = ErrorBody), (status = 404, description = "No such network or object", body = ErrorBody), (status = 409, description = "Conflicts with what exists", body = ErrorBody), (status = 500, description = "The host failed", body = ErrorBody)), operation_id = "run_vm")]
pub(super) async fn run_vm(
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

#[utoipa::path(get, path = "/v1/vms/{name}", tag = "vms", params(("name" = String, Path, description = "The VM")), responses((status = 200, description = "The VM", body = VmView), (status = 404, description = "No such network or object", body = ErrorBody)), operation_id = "show_vm")]
pub(super) async fn show_vm(State(d): Shared, UrlPath(name): UrlPath<String>) -> Result<Response, ControlError> {
    Ok(Json(blocking(move || d.vms().get(&name)).await?).into_response())
}

#[utoipa::path(delete, path = "/v1/vms/{name}", tag = "vms", params(("name" = String, Path, description = "The VM")), responses((status = 200, description = "Stopped", body = VmView), (status = 404, description = "No such network or object", body = ErrorBody)), operation_id = "stop_vm")]
pub(super) async fn stop_vm(State(d): Shared, UrlPath(name): UrlPath<String>) -> Result<Response, ControlError> {
    // Stopping waits for the guest (grace periods): off the async workers.
    let v = tokio::task::spawn_blocking(move || d.vms().stop(&*d, &name))
        .await
        .map_err(|e| ControlError::Host(e.to_string()))??;
    Ok(Json(v).into_response())
}

#[utoipa::path(get, path = "/v1/vms/{name}/inspect", tag = "vms", params(("name" = String, Path, description = "The VM")), responses((status = 200, description = "The VM with what it was run with, its files, QEMU's run state, its port and lease", body = crate::control::vms::VmInspect), (status = 404, description = "No such network or object", body = ErrorBody)), operation_id = "inspect_vm")]
pub(super) async fn inspect_vm(State(d): Shared, UrlPath(name): UrlPath<String>) -> Result<Response, ControlError> {
    Ok(Json(blocking(move || d.vms().inspect(&*d, &name)).await?).into_response())
}

#[utoipa::path(post, path = "/v1/vms/{name}/restart", tag = "vms", params(("name" = String, Path, description = "The VM")), responses((status = 200, description = "Stopped and started again with its settings", body = VmView), (status = 400, description = "Bad input", body = ErrorBody), (status = 404, description = "No such network or object", body = ErrorBody), (status = 409, description = "Conflicts with what exists", body = ErrorBody), (status = 500, description = "The host failed", body = ErrorBody)), operation_id = "restart_vm")]
pub(super) async fn restart_vm(State(d): Shared, UrlPath(name): UrlPath<String>) -> Result<Response, ControlError> {
    // Stopping waits for the guest (grace periods): off the async workers.
    let v = tokio::task::spawn_blocking(move || d.vms().restart(&*d, &name))
        .await
        .map_err(|e| ControlError::Host(e.to_string()))??;
    Ok(Json(v).into_response())
}

#[utoipa::path(post, path = "/v1/vms/{name}/pause", tag = "vms", params(("name" = String, Path, description = "The VM")), responses((status = 200, description = "Paused: its vCPUs stopped, its port and lease kept", body = VmView), (status = 404, description = "No such network or object", body = ErrorBody), (status = 409, description = "Conflicts with what exists", body = ErrorBody)), operation_id = "pause_vm")]
pub(super) async fn pause_vm(State(d): Shared, UrlPath(name): UrlPath<String>) -> Result<Response, ControlError> {
    Ok(Json(blocking(move || d.vms().set_paused(&name, true)).await?).into_response())
}

#[utoipa::path(post, path = "/v1/vms/{name}/resume", tag = "vms", params(("name" = String, Path, description = "The VM")), responses((status = 200, description = "Running again, in the state it was paused in", body = VmView), (status = 404, description = "No such network or object", body = ErrorBody), (status = 409, description = "Conflicts with what exists", body = ErrorBody)), operation_id = "resume_vm")]
pub(super) async fn resume_vm(State(d): Shared, UrlPath(name): UrlPath<String>) -> Result<Response, ControlError> {
    Ok(Json(blocking(move || d.vms().set_paused(&name, false)).await?).into_response())
}

#[utoipa::path(get, path = "/v1/vms/{name}/logs", tag = "vms", params(("name" = String, Path, description = "The VM")), responses((status = 200, description = "Its serial console", content_type = "text/plain", body = String), (status = 404, description = "No such network or object", body = ErrorBody)), operation_id = "vm_logs")]
pub(super) async fn vm_logs(State(d): Shared, UrlPath(name): UrlPath<String>) -> Result<Response, ControlError> {
    let text = blocking(move || d.vms().logs(&name)).await?;
    Ok(([("content-type", "text/plain; charset=utf-8")], text).into_response())
}

#[utoipa::path(get, path = "/v1/networks/{name}/policy", tag = "gateway", params(("name" = String, Path, description = "The network")), responses((status = 200, description = "The egress policy", body = PolicySpec), (status = 400, description = "Bad input", body = ErrorBody), (status = 404, description = "No such network or object", body = ErrorBody)), operation_id = "show_policy")]
pub(super) async fn show_policy(State(d): Shared, UrlPath(net): UrlPath<String>) -> Result<Response, ControlError> {
    Ok(Json(blocking(move || d.policy(&net)).await?).into_response())
}

#[utoipa::path(put, path = "/v1/networks/{name}/policy", tag = "gateway", params(("name" = String, Path, description = "The network")), request_body = PolicySpec, responses((status = 200, description = "In force", body = PolicySpec), (status = 400, description = "Bad input", body = ErrorBody), (status = 404, description = "No such network or object", body = ErrorBody), (status = 500, description = "The host failed", body = ErrorBody)), operation_id = "set_policy")]
pub(super) async fn set_policy(
    State(d): Shared,
    UrlPath(net): UrlPath<String>,
    b: Result<Json<PolicySpec>, JsonRejection>,
) -> Result<Response, ControlError> {
    let p = body(b)?;
    Ok(Json(blocking(move || d.set_policy(&net, p)).await?).into_response())
}

#[utoipa::path(get, path = "/v1/events", tag = "daemon", responses((status = 200, description = "Events from now on, one JSON object a line, until the client leaves", content_type = "application/x-ndjson", body = EventView)), operation_id = "events")]
pub(super) async fn events(State(d): Shared) -> Result<Response, ControlError> {
    let mut events = d.subscribe_events();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<axum::body::Bytes, std::io::Error>>(64);
    tokio::spawn(async move {
        loop {
            let line: std::sync::Arc<str> = tokio::select! {
                _ = tx.closed() => return,
                ev = events.recv() => match ev {
                    Ok(line) => line,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                        let lag = crate::model::EventView {
                            time: jiff::Timestamp::now().to_string(),
                            event: crate::model::Event::Lagged { missed },
                        };
                        (serde_json::to_string(&lag).expect("plain data") + "\n").into()
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                },
            };
            if tx
                .send(Ok(axum::body::Bytes::from(line.as_bytes().to_vec())))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let body = axum::body::Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    Ok(([("content-type", "application/x-ndjson")], body).into_response())
}

#[utoipa::path(get, path = "/v1/stats", tag = "daemon", responses((status = 200, description = "Every network's counters: traffic and drops, its ports', its gateway's", body = [NetworkStats])), operation_id = "stats")]
pub(super) async fn stats(State(d): Shared) -> Result<Response, ControlError> {
    Ok(Json(blocking(move || Ok(d.stats())).await?).into_response())
}

#[utoipa::path(get, path = "/v1/networks/{name}/settings", tag = "gateway", params(("name" = String, Path, description = "The network")), responses((status = 200, description = "The gateway settings chosen (unset ones have their defaults)", body = GatewaySettings), (status = 404, description = "No such network or object", body = ErrorBody)), operation_id = "show_settings")]
pub(super) async fn show_settings(State(d): Shared, UrlPath(net): UrlPath<String>) -> Result<Response, ControlError> {
    Ok(Json(blocking(move || d.network(&net).map(|n| n.settings)).await?).into_response())
}

#[utoipa::path(put, path = "/v1/networks/{name}/settings", tag = "gateway", params(("name" = String, Path, description = "The network")), request_body = GatewaySettings, responses((status = 200, description = "In force at once and stored", body = GatewaySettings), (status = 400, description = "Bad input", body = ErrorBody), (status = 404, description = "No such network or object", body = ErrorBody), (status = 500, description = "The host failed", body = ErrorBody)), operation_id = "set_settings")]
pub(super) async fn set_settings(
    State(d): Shared,
    UrlPath(net): UrlPath<String>,
    b: Result<Json<GatewaySettings>, JsonRejection>,
) -> Result<Response, ControlError> {
    let s = body(b)?;
    Ok(Json(blocking(move || d.set_settings(&net, s).map(|spec| spec.settings)).await?).into_response())
}

#[utoipa::path(get, path = "/v1/networks/{name}/forwards", tag = "gateway", params(("name" = String, Path, description = "The network")), responses((status = 200, description = "Forwards", body = [ForwardView]), (status = 400, description = "Bad input", body = ErrorBody), (status = 404, description = "No such network or object", body = ErrorBody)), operation_id = "list_forwards")]
pub(super) async fn list_forwards(State(d): Shared, UrlPath(net): UrlPath<String>) -> Result<Response, ControlError> {
    Ok(Json(blocking(move || d.forwards(&net)).await?).into_response())
}

#[utoipa::path(post, path = "/v1/networks/{name}/forwards", tag = "gateway", params(("name" = String, Path, description = "The network")), request_body = ForwardSpec, responses((status = 201, description = "Listening", body = ForwardSpec), (status = 400, description = "Bad input", body = ErrorBody), (status = 404, description = "No such network or object", body = ErrorBody), (status = 409, description = "Conflicts with what exists", body = ErrorBody), (status = 500, description = "The host failed", body = ErrorBody)), operation_id = "add_forward")]
pub(super) async fn add_forward(
    State(d): Shared,
    UrlPath(net): UrlPath<String>,
    b: Result<Json<ForwardSpec>, JsonRejection>,
) -> Result<Response, ControlError> {
    let f = body(b)?;
    Ok((
        StatusCode::CREATED,
        Json(blocking(move || d.add_forward(&net, f)).await?),
    )
        .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ForwardQuery {
    proto: Option<String>,
}

#[utoipa::path(delete, path = "/v1/networks/{name}/forwards/{host}", tag = "gateway", params(("name" = String, Path, description = "The network"), ("host" = String, Path, description = "The host address and port"), ("proto" = Option<ForwardProto>, Query, description = "Only this protocol; absent: both")), responses((status = 204, description = "Removed"), (status = 400, description = "Bad input", body = ErrorBody), (status = 404, description = "No such network or object", body = ErrorBody), (status = 500, description = "The host failed", body = ErrorBody)), operation_id = "remove_forward")]
pub(super) async fn remove_forward(
    State(d): Shared,
    UrlPath((net, host)): UrlPath<(String, String)>,
    Query(q): Query<ForwardQuery>,
) -> Result<StatusCode, ControlError> {
    blocking(move || d.remove_forward(&net, &host, q.proto.as_deref())).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/v1/networks/{name}/reservations", tag = "gateway", params(("name" = String, Path, description = "The network")), responses((status = 200, description = "Reservations", body = [ReservationSpec]), (status = 400, description = "Bad input", body = ErrorBody), (status = 404, description = "No such network or object", body = ErrorBody)), operation_id = "list_reservations")]
pub(super) async fn list_reservations(
    State(d): Shared,
    UrlPath(net): UrlPath<String>,
) -> Result<Response, ControlError> {
    Ok(Json(blocking(move || d.reservations(&net)).await?).into_response())
}

#[utoipa::path(post, path = "/v1/networks/{name}/reservations", tag = "gateway", params(("name" = String, Path, description = "The network")), request_body = ReservationSpec, responses((status = 201, description = "Reserved", body = ReservationSpec), (status = 400, description = "Bad input", body = ErrorBody), (status = 404, description = "No such network or object", body = ErrorBody), (status = 409, description = "Conflicts with what exists", body = ErrorBody), (status = 500, description = "The host failed", body = ErrorBody)), operation_id = "add_reservation")]
pub(super) async fn add_reservation(
    State(d): Shared,
    UrlPath(net): UrlPath<String>,
    b: Result<Json<ReservationSpec>, JsonRejection>,
) -> Result<Response, ControlError> {
    let r = body(b)?;
    let r = blocking(move || d.reserve(&net, r)).await?;
    Ok((StatusCode::CREATED, Json(r)).into_response())
}

#[utoipa::path(delete, path = "/v1/networks/{name}/reservations/{key}", tag = "gateway", params(("name" = String, Path, description = "The network"), ("key" = String, Path, description = "A MAC or a VM name")), responses((status = 204, description = "Removed"), (status = 400, description = "Bad input", body = ErrorBody), (status = 404, description = "No such network or object", body = ErrorBody), (status = 500, description = "The host failed", body = ErrorBody)), operation_id = "remove_reservation")]
pub(super) async fn remove_reservation(
    State(d): Shared,
    UrlPath((net, key)): UrlPath<(String, String)>,
) -> Result<StatusCode, ControlError> {
    blocking(move || d.unreserve(&net, &key)).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/v1/networks/{name}/flows", tag = "gateway", params(("name" = String, Path, description = "The network")), responses((status = 200, description = "NAT flows", body = FlowsView), (status = 400, description = "Bad input", body = ErrorBody), (status = 404, description = "No such network or object", body = ErrorBody)), operation_id = "list_flows")]
pub(super) async fn list_flows(State(d): Shared, UrlPath(net): UrlPath<String>) -> Result<Response, ControlError> {
    Ok(Json(blocking(move || d.flows(&net)).await?).into_response())
}

#[utoipa::path(get, path = "/v1/networks/{name}/leases", tag = "gateway", params(("name" = String, Path, description = "The network")), responses((status = 200, description = "Leases", body = [LeaseView]), (status = 404, description = "No such network or object", body = ErrorBody)), operation_id = "list_leases")]
pub(super) async fn list_leases(State(d): Shared, UrlPath(net): UrlPath<String>) -> Result<Response, ControlError> {
    Ok(Json(blocking(move || d.leases(&net)).await?).into_response())
}

#[derive(Deserialize)]
pub(super) struct CaptureQuery {
    port: Option<String>,
    /// `pcap` (the default) or `pcapng` (one interface per port).
    format: Option<String>,
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
#[utoipa::path(get, path = "/v1/networks/{name}/capture", tag = "networks", params(("name" = String, Path, description = "The network"), ("port" = Option<String>, Query, description = "Only this port"), ("format" = Option<String>, Query, description = "pcap (the default) or pcapng: one interface per port, named NETWORK/PORT")), responses((status = 200, description = "A live pcap (or pcapng) stream until the client leaves", content_type = "application/vnd.tcpdump.pcap", body = Vec<u8>), (status = 400, description = "Bad input", body = ErrorBody), (status = 404, description = "No such network or object", body = ErrorBody), (status = 503, description = "A bound is reached", body = ErrorBody)), operation_id = "capture")]
pub(super) async fn capture(
    State(d): Shared,
    UrlPath(net): UrlPath<String>,
    Query(q): Query<CaptureQuery>,
) -> Result<Response, ControlError> {
    let cap = {
        let (d, net) = (d.clone(), net.clone());
        blocking(move || d.capture(&net, q.port.as_deref())).await?
    };
    let net_name = net.clone();
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    let pcapng = q.format.as_deref() == Some("pcapng");
    if !matches!(q.format.as_deref(), None | Some("pcap" | "pcapng")) {
        return Err(ControlError::invalid("format is pcap (the default) or pcapng"));
    }
    let labels = d.clone();
    std::thread::Builder::new()
        .name("capture".into())
        .spawn(move || {
            let closed = tx.clone();
            let mut out = match CaptureWriter::new(BodyWriter(tx), pcapng) {
                Ok(w) => w,
                Err(_) => return,
            };
            // Wakes now and then to notice a client that left while nothing flowed.
            loop {
                match cap.capture.frames.recv_timeout(std::time::Duration::from_millis(500)) {
                    Ok(f) => {
                        let label = || format!("{net_name}/{}", labels.port_label(&net_name, f.from));
                        if out.write(&f, label).is_err() {
                            tracing::info!(network = %net_name, lost = cap.capture.dropped(), "capture ended");
                            return;
                        }
                    }
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) if !closed.is_closed() => {}
                    Err(_) => {
                        tracing::info!(network = %net_name, lost = cap.capture.dropped(), "capture ended");
                        return;
                    }
                }
            }
        })
        .map_err(|e| ControlError::Host(e.to_string()))?;
    let kind = if pcapng {
        "application/x-pcapng"
    } else {
        "application/vnd.tcpdump.pcap"
    };
    let body = axum::body::Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    Ok(([("content-type", kind)], body).into_response())
}

/// Writes captured frames as pcap, or as pcapng with one interface per port (named
/// NETWORK/PORT, described as it is first seen), so a whole network's capture tells
/// which port each frame came in through.
enum CaptureWriter {
    Pcap(pcap_file::pcap::PcapWriter<BodyWriter>),
    PcapNg {
        writer: pcap_file::pcapng::PcapNgWriter<BodyWriter>,
        interfaces: std::collections::HashMap<fabric::PortId, u32>,
    },
}

impl CaptureWriter {
    fn new(out: BodyWriter, pcapng: bool) -> pcap_file::PcapResult<CaptureWriter> {
        Ok(if pcapng {
            CaptureWriter::PcapNg {
                writer: pcap_file::pcapng::PcapNgWriter::new(out)?,
                interfaces: Default::default(),
            }
        } else {
            CaptureWriter::Pcap(pcap_file::pcap::PcapWriter::new(out)?)
        })
    }

    fn write(&mut self, f: &fabric::CapturedFrame, label: impl FnOnce() -> String) -> pcap_file::PcapResult<()> {
        use pcap_file::pcapng::blocks::enhanced_packet::EnhancedPacketBlock;
        use pcap_file::pcapng::blocks::interface_description::{InterfaceDescriptionBlock, InterfaceDescriptionOption};
        match self {
            CaptureWriter::Pcap(w) => {
                w.write_packet(&pcap_file::pcap::PcapPacket::new(f.at, f.data.len() as u32, &f.data))?;
            }
            CaptureWriter::PcapNg { writer, interfaces } => {
                let next = interfaces.len() as u32;
                let id = match interfaces.get(&f.from) {
                    Some(id) => *id,
                    None => {
                        writer.write_pcapng_block(InterfaceDescriptionBlock {
                            linktype: pcap_file::DataLink::ETHERNET,
                            snaplen: 0,
                            options: vec![
                                InterfaceDescriptionOption::IfName(label().into()),
                                // The blocks' timestamps are in nanoseconds.
                                InterfaceDescriptionOption::IfTsResol(9),
                            ],
                        })?;
                        interfaces.insert(f.from, next);
                        next
                    }
                };
                writer.write_pcapng_block(EnhancedPacketBlock {
                    interface_id: id,
                    timestamp: f.at,
                    original_len: f.data.len() as u32,
                    data: std::borrow::Cow::Borrowed(&f.data),
                    options: vec![],
                })?;
            }
        }
        Ok(())
    }
}

#[utoipa::path(get, path = "/metrics", tag = "daemon", responses((status = 200, description = "Every metric family with help and type: the Prometheus text format (0.0.4), or OpenMetrics when the Accept header asks for application/openmetrics-text", content((String = "text/plain"), (String = "application/openmetrics-text")))), operation_id = "metrics")]
pub(super) async fn metrics(State(d): Shared, headers: axum::http::HeaderMap) -> Result<Response, ControlError> {
    let openmetrics = headers
        .get_all(axum::http::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    let families = blocking(move || Ok(d.metric_families())).await?;
    Ok(if openmetrics {
        (
            [(
                "content-type",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            families.openmetrics_text(),
        )
            .into_response()
    } else {
        (
            [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
            families.prometheus_text(),
        )
            .into_response()
    })
}
