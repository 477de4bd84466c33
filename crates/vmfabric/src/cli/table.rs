//! Calling the daemon from the CLI and printing what it answers.

use anyhow::Result;
use serde::Serialize;
use vmfabric::client::Client;

use super::ClientArgs;

/// The daemon's client for these arguments.
pub(super) fn client(c: &ClientArgs) -> Result<Client> {
    Ok(Client::new(&c.socket)?.with_timeout(c.timeout))
}

/// Whether `e` is the daemon saying the object exists already (409).
pub(super) fn is_conflict(e: &anyhow::Error) -> bool {
    e.downcast_ref::<vmfabric::client::ApiError>()
        .is_some_and(|a| a.status == 409)
}

pub(super) fn cell(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// A time (seconds since the Unix epoch) from now, for people: "in 59m 58s", "3s ago".
pub(super) fn relative(unix: u64) -> String {
    use jiff::{SpanRound, Unit};
    let now = jiff::Timestamp::now().as_second();
    let diff = i64::try_from(unix).unwrap_or(i64::MAX).saturating_sub(now);
    let span = jiff::Span::new()
        .try_seconds(diff.abs())
        .and_then(|s| s.round(SpanRound::new().largest(Unit::Hour)));
    match span {
        Ok(span) if diff >= 0 => format!("in {span:#}"),
        Ok(span) => format!("{span:#} ago"),
        Err(_) => "-".into(),
    }
}

/// A length of time in seconds, for people: "1h", "10m 30s".
pub(super) fn duration(secs: u64) -> String {
    use jiff::{SpanRound, Unit};
    jiff::Span::new()
        .try_seconds(i64::try_from(secs).unwrap_or(i64::MAX))
        .and_then(|s| s.round(SpanRound::new().largest(Unit::Hour)))
        .map(|s| format!("{s:#}"))
        .unwrap_or_else(|_| format!("{secs}s"))
}

/// What a command that returns nothing did: `text` for people, `json` with --json.
pub(super) fn report(c: &ClientArgs, text: String, json: serde_json::Value) {
    if c.json {
        println!("{}", serde_json::to_string_pretty(&json).unwrap_or_default());
    } else {
        println!("{text}");
    }
}

/// One object: as JSON with --json, else as `describe` words it (a fact a line).
pub(super) fn print_one<T: Serialize>(c: &ClientArgs, v: &T, describe: impl Fn(&T) -> String) -> Result<()> {
    if c.json {
        println!("{}", serde_json::to_string_pretty(v)?);
    } else {
        print!("{}", describe(v));
    }
    Ok(())
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
    print!("{}", text_table(columns, cells));
}

/// Columns under upper-case headers, two spaces apart, no borders: easy to read and to
/// cut with awk.
pub(super) fn text_table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::NOTHING)
        .set_header(headers.iter().map(|h| h.to_uppercase().replace('_', " ")));
    for r in rows {
        t.add_row(r);
    }
    for c in t.column_iter_mut() {
        c.set_padding((0, 2));
    }
    let mut out: String = t.lines().map(|l| l.trim_end().to_string() + "\n").collect();
    if out.is_empty() {
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn times_from_now_read_as_people_say_them() {
        let now = jiff::Timestamp::now().as_second() as u64;
        let soon = super::relative(now + 2 * 3600 + 30);
        assert!(soon.starts_with("in 2h") || soon.starts_with("in 1h 59m"), "{soon}");
        assert!(
            super::relative(now - 90).ends_with(" ago"),
            "{}",
            super::relative(now - 90)
        );
    }
}
