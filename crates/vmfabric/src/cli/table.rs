//! Calling the daemon from the CLI and printing what it answers.

use anyhow::Result;

use super::ClientArgs;

/// Calls the daemon; a non-2xx answer becomes an error with the daemon's message.
pub(super) fn request(
    c: &ClientArgs,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<serde_json::Value> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (status, v) = rt.block_on(vmfabric::client::call(&c.socket, method, path, body))?;
    if !(200..300).contains(&status) {
        let msg = v
            .get("message")
            .and_then(|m| m.as_str())
            .map(String::from)
            .unwrap_or_else(|| v.to_string());
        anyhow::bail!("{msg} (HTTP {status})");
    }
    Ok(v)
}

pub(super) fn cell(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// A table of `columns` from a JSON array (or object), or the JSON itself with --json.
pub(super) fn print_table(c: &ClientArgs, v: &serde_json::Value, columns: &[&str]) {
    if c.json {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
        return;
    }
    let rows: Vec<&serde_json::Value> = match v {
        serde_json::Value::Array(a) => a.iter().collect(),
        other => vec![other],
    };
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| columns.iter().map(|k| cell(&r[*k])).collect())
        .collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, h)| cells.iter().map(|r| r[i].len()).chain([h.len()]).max().unwrap_or(0))
        .collect();
    let line = |vals: Vec<String>| {
        vals.iter()
            .zip(&widths)
            .map(|(v, w)| format!("{v:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
    };
    println!("{}", line(columns.iter().map(|h| h.to_uppercase()).collect()));
    for r in cells {
        println!("{}", line(r));
    }
}
