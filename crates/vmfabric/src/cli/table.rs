//! Calling the daemon from the CLI and printing what it answers.

use anyhow::Result;
use serde::Serialize;
use vmfabric::client::Client;

use super::ClientArgs;

/// The daemon's client for these arguments.
pub(super) fn client(c: &ClientArgs) -> Result<Client> {
    Client::new(&c.socket)
}

pub(super) fn cell(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// A table of `columns` from a view or a list of them, or the JSON itself with --json.
pub(super) fn print_table(c: &ClientArgs, view: &impl Serialize, columns: &[&str]) {
    let v = &serde_json::to_value(view).unwrap_or_default();
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
