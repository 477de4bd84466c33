//! A client of the daemon's API, for the CLI and the tests.

use std::path::Path;

use anyhow::Context;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::Request;
use hyper_util::rt::TokioIo;

/// Sends one request; returns the status and the body (JSON, or text as a JSON string).
pub async fn call(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> anyhow::Result<(u16, serde_json::Value)> {
    let stream = tokio::net::UnixStream::connect(socket).await.with_context(|| {
        format!(
            "connect to the daemon at {} (is `vmfabric serve` running?)",
            socket.display()
        )
    })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let bytes = body.map(|b| b.to_string()).unwrap_or_default();
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "vmfabric")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(bytes)))?;
    let resp = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    let data = resp.into_body().collect().await?.to_bytes();
    let value = if data.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(&data)
            .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&data).into()))
    };
    Ok((status, value))
}
