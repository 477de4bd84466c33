//! Names guests choose, made fit for DNS. Its own room: the config checks static
//! names with it and DHCP cleans client hostnames with it.

/// A DNS label made from a client-chosen name: lower case, letters, digits and inner
/// dashes, at most 63 bytes; `None` when nothing usable is left.
pub fn sanitize_hostname(raw: &str) -> Option<String> {
    let first = raw.split('.').next().unwrap_or("");
    let s: String = first
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '-' })
        .take(63)
        .collect();
    let s = s.trim_matches('-').to_string();
    (!s.is_empty()).then_some(s)
}

#[cfg(test)]
mod tests {
    use super::sanitize_hostname;

    #[test]
    fn labels_are_lower_case_letters_digits_and_inner_dashes() {
        assert_eq!(sanitize_hostname("Web_Server.example"), Some("web-server".into()));
        assert_eq!(sanitize_hostname("---"), None);
        assert_eq!(sanitize_hostname(&"a".repeat(100)).unwrap().len(), 63);
    }
}
