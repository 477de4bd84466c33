//! A client of the daemon's API, for the CLI and the tests.

use std::path::Path;

use anyhow::Context;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::Request;
use hyper_util::rt::TokioIo;

/// An HTTP/1 connection to the daemon's socket.
async fn connect(socket: &Path) -> anyhow::Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>> {
    let stream = tokio::net::UnixStream::connect(socket).await.with_context(|| {
        format!(
            "connect to the daemon at {} (is `vmfabric serve` running?)",
            socket.display()
        )
    })?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

/// Sends one request; returns the status and the body (JSON, or text as a JSON string).
pub async fn call(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> anyhow::Result<(u16, serde_json::Value)> {
    let mut sender = connect(socket).await?;
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

/// GETs `path` and copies the body to `out` as it arrives, until the daemon ends it
/// (or the caller is interrupted). A non-2xx answer is an error with its message.
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
        let v: serde_json::Value = serde_json::from_slice(&data).unwrap_or_default();
        let msg = v["message"]
            .as_str()
            .map(String::from)
            .unwrap_or_else(|| String::from_utf8_lossy(&data).into());
        anyhow::bail!("{msg} (HTTP {status})");
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

/// Which MAC a new port is locked to: the assigned one (default), `mac`, or the first
/// one the VMM sends from.
#[derive(Debug, Clone, Default)]
pub struct MacChoice {
    pub mac: Option<String>,
    pub learn_mac_once: bool,
}

/// Creates a socketpair port on `network` and receives its VM end (see
/// [`crate::fdpass`]). Returns the port as JSON and the fd.
pub async fn socketpair_port(
    socket: &Path,
    network: &str,
    name: &str,
    choice: &MacChoice,
) -> anyhow::Result<(serde_json::Value, std::os::fd::OwnedFd)> {
    use hyper::header::{CONNECTION, UPGRADE};
    let stream = tokio::net::UnixStream::connect(socket).await.with_context(|| {
        format!(
            "connect to the daemon at {} (is `vmfabric serve` running?)",
            socket.display()
        )
    })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn.with_upgrades());
    let body =
        serde_json::json!({ "name": name, "mac": choice.mac, "learn_mac_once": choice.learn_mac_once }).to_string();
    let req = Request::builder()
        .method("POST")
        .uri(format!("/v1/networks/{}/socketpairs", seg(network)))
        .header("host", "vmfabric")
        .header("content-type", "application/json")
        .header(CONNECTION, "upgrade")
        .header(UPGRADE, crate::fdpass::PROTOCOL)
        .body(Full::new(Bytes::from(body)))?;
    let resp = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    if status != 101 {
        let data = resp.into_body().collect().await?.to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&data).unwrap_or_default();
        let msg = v["message"]
            .as_str()
            .map(String::from)
            .unwrap_or_else(|| String::from_utf8_lossy(&data).into());
        anyhow::bail!("{msg} (HTTP {status})");
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
