//! Validators for the names site values carry: DNS names (RFC 1123), Matrix
//! server names (hostname[:port], per the Matrix spec's grammar), e-mail
//! addresses, URLs and sizes. Each returns the normalised value or a reason
//! a person can act on.

/// Characters that must never reach a config file through a name: they end
/// or open a statement, block, string or comment in nginx, YAML, TOML, shell
/// or systemd syntax.
const FORBIDDEN: &[char] = &[
    ';', '{', '}', '$', '"', '\'', '#', '`', '\\', '<', '>', '|', '&',
];

/// Refuses control characters and whitespace, naming the first one found.
pub fn check_plain_text(s: &str) -> Result<(), String> {
    for c in s.chars() {
        if c.is_control() {
            return Err(format!(
                "contains the control character {}",
                c.escape_default()
            ));
        }
    }
    Ok(())
}

fn check_no_space_or_forbidden(s: &str) -> Result<(), String> {
    check_plain_text(s)?;
    if let Some(c) = s.chars().find(|c| c.is_whitespace()) {
        return Err(format!("contains whitespace ({})", c.escape_default()));
    }
    if let Some(c) = s.chars().find(|c| FORBIDDEN.contains(c)) {
        return Err(format!(
            "contains the character {c:?}, which is not allowed here"
        ));
    }
    Ok(())
}

/// A DNS host name per RFC 1123: dot-separated labels of letters, digits and
/// hyphens, 1..=63 bytes each, not starting or ending with a hyphen, 253
/// bytes at most. Returned lower-cased (DNS names are case-insensitive).
pub fn dns_name(s: &str) -> Result<String, String> {
    check_no_space_or_forbidden(s)?;
    if s.is_empty() {
        return Err("is empty".into());
    }
    if s.contains('_') {
        return Err("contains '_', which host names may not (RFC 1123)".into());
    }
    if s.ends_with('.') {
        return Err("ends with '.'; write the name without the trailing dot".into());
    }
    let lower = s.to_ascii_lowercase();
    if lower.len() > 253 {
        return Err(format!(
            "is {} characters long; a host name has at most 253",
            lower.len()
        ));
    }
    for label in lower.split('.') {
        if label.is_empty() {
            return Err("has an empty label (two dots in a row, or a leading dot)".into());
        }
        if label.len() > 63 {
            return Err(format!(
                "has the label {label:?} of {} characters; at most 63",
                label.len()
            ));
        }
        if let Some(c) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-'))
        {
            return Err(format!(
                "contains {c:?}; host names use only letters, digits, '-' and '.'"
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!(
                "has the label {label:?}, which starts or ends with '-'"
            ));
        }
    }
    Ok(lower)
}

fn ipv4(s: &str) -> bool {
    let parts: Vec<_> = s.split('.').collect();
    parts.len() == 4
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.len() <= 3
                && p.bytes().all(|b| b.is_ascii_digit())
                && p.parse::<u8>().is_ok()
        })
}

/// A port number, 1..=65535.
pub fn port(s: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(0) | Err(_) => Err(format!("{s:?} is not a port number (1 to 65535)")),
        Ok(p) if s.starts_with('0') => Err(format!("{s:?} has a leading zero; write {p}")),
        Ok(p) => Ok(p),
    }
}

/// A Matrix server name: `hostname[:port]` where hostname is an IPv4
/// address, a bracketed IPv6 address or a DNS name
/// (<https://spec.matrix.org/latest/appendices/#server-name>). DNS names are
/// additionally held to RFC 1123 and lower-cased.
pub fn server_name(s: &str) -> Result<String, String> {
    check_no_space_or_forbidden(s)?;
    let (host, port_part) = if let Some(rest) = s.strip_prefix('[') {
        let end = rest
            .find(']')
            .ok_or("opens '[' for an IPv6 address but never closes it")?;
        let addr = &rest[..end];
        if addr.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("[{addr}] is not an IPv6 address"));
        }
        let after = &rest[end + 1..];
        let port_part = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or("has text after the IPv6 address that is not :port")?,
            ),
        };
        (format!("[{}]", addr.to_ascii_lowercase()), port_part)
    } else {
        let (host, port_part) = match s.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        };
        let host = if ipv4(host) {
            host.to_string()
        } else {
            dns_name(host)?
        };
        (host, port_part)
    };
    match port_part {
        None => Ok(host),
        Some(p) => Ok(format!("{host}:{}", port(p)?)),
    }
}

/// An e-mail address as ACME and Synapse use it: `local@domain`, where the
/// local part is letters, digits and `.!%+_=~^-` and the domain is a DNS
/// name with at least one dot.
pub fn email(s: &str) -> Result<String, String> {
    check_no_space_or_forbidden(s)?;
    let (local, domain) = s
        .rsplit_once('@')
        .ok_or("has no '@'; write it as name@example.org")?;
    if local.is_empty() || local.len() > 64 {
        return Err("needs 1 to 64 characters before the '@'".into());
    }
    if let Some(c) = local
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || ".!%+_=~^-".contains(*c)))
    {
        return Err(format!("contains {c:?} before the '@'"));
    }
    if local.starts_with('.') || local.ends_with('.') || local.contains("..") {
        return Err("has a misplaced '.' before the '@'".into());
    }
    let domain = dns_name(domain).map_err(|why| format!("has a domain that {why}"))?;
    if !domain.contains('.') {
        return Err("has a domain without a dot".into());
    }
    Ok(format!("{local}@{domain}"))
}

/// An http(s) URL with a host; returned as written.
pub fn url(s: &str) -> Result<String, String> {
    check_no_space_or_forbidden(s)?;
    let parsed = url::Url::parse(s).map_err(|e| format!("is not a URL ({e})"))?;
    if !matches!(parsed.scheme(), "https" | "http") {
        return Err(format!(
            "uses the scheme {:?}; use https:// (or http://)",
            parsed.scheme()
        ));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err("has no host".into());
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err("carries user credentials; leave them out of the URL".into());
    }
    Ok(s.to_string())
}

/// A size as nginx's `client_max_body_size` and Synapse's `max_upload_size`
/// both read it: digits with an optional K, M or G suffix.
pub fn size(s: &str) -> Result<String, String> {
    let upper = s.to_ascii_uppercase();
    let digits = upper.trim_end_matches(['K', 'M', 'G']);
    let suffix = &upper[digits.len()..];
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) || suffix.len() > 1 {
        return Err(format!(
            "{s:?} is not a size; write digits with an optional K, M or G, e.g. 50M"
        ));
    }
    match digits.parse::<u64>() {
        Ok(0) => Err("must be more than zero".into()),
        Ok(n) => Ok(format!("{n}{suffix}")),
        Err(_) => Err(format!("{s:?} is too large")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_names() {
        let table: &[(&str, Result<&str, &str>)] = &[
            ("Example.ORG", Ok("example.org")),
            ("a-b.c0", Ok("a-b.c0")),
            ("localhost", Ok("localhost")),
            ("exa_mple.org", Err("'_'")),
            ("example.org.", Err("trailing dot")),
            ("-a.org", Err("starts or ends")),
            ("a..org", Err("empty label")),
            ("a b.org", Err("whitespace")),
            ("a\tb", Err("control character")),
            ("a;b.org", Err("';'")),
            ("a{b}", Err("'{'")),
            ("a$b", Err("'$'")),
            ("a\"b", Err("'\"'")),
            ("a'b", Err("'\\''")),
            ("a#b", Err("'#'")),
            ("ä.org", Err("'ä'")),
            ("", Err("empty")),
        ];
        for (input, want) in table {
            match (dns_name(input), want) {
                (Ok(got), Ok(w)) => assert_eq!(got, *w, "{input:?}"),
                (Err(got), Err(w)) => assert!(got.contains(w), "{input:?}: {got}"),
                (got, want) => panic!("{input:?}: got {got:?}, want {want:?}"),
            }
        }
        assert!(dns_name(&"a".repeat(64))
            .unwrap_err()
            .contains("at most 63"));
        assert!(dns_name(&["a"; 130].join(".")).unwrap_err().contains("253"));
    }

    #[test]
    fn server_names() {
        let ok = [
            ("example.org", "example.org"),
            ("Example.org:8448", "example.org:8448"),
            ("1.2.3.4", "1.2.3.4"),
            ("1.2.3.4:1", "1.2.3.4:1"),
            ("[::1]", "[::1]"),
            ("[2001:DB8::1]:8448", "[2001:db8::1]:8448"),
        ];
        for (input, want) in ok {
            assert_eq!(server_name(input).as_deref(), Ok(want), "{input}");
        }
        let bad = [
            "example.org\nlocation / { return 200; }",
            "example.org\nevil_key: 1",
            "example.org:0",
            "example.org:65536",
            "example.org:",
            "[::1",
            "[zz]",
            "a:b:c",
            "exa mple.org",
        ];
        for input in bad {
            assert!(server_name(input).is_err(), "{input:?} was accepted");
        }
    }

    #[test]
    fn emails_urls_sizes() {
        assert_eq!(email("Admin+x@Example.org").unwrap(), "Admin+x@example.org");
        for bad in [
            "a",
            "@x.org",
            "a@localhost",
            "a b@x.org",
            "a\"@x.org",
            "a@x.org\n",
            ".a@x.org",
        ] {
            assert!(email(bad).is_err(), "{bad:?}");
        }
        assert!(url("https://app.element.io").is_ok());
        assert!(url("http://127.0.0.1:14000/dir").is_ok());
        for bad in [
            "ftp://x.org",
            "https://",
            "app.element.io",
            "https://u:p@x.org",
            "https://x.org/\"",
            "https://x.org/ a",
        ] {
            assert!(url(bad).is_err(), "{bad:?}");
        }
        assert_eq!(size("50m").unwrap(), "50M");
        assert_eq!(size("1024").unwrap(), "1024");
        for bad in ["", "M", "0", "5MB", "-1", "1.5G"] {
            assert!(size(bad).is_err(), "{bad:?}");
        }
        assert_eq!(port("8448"), Ok(8448));
        assert!(port("0").is_err() && port("65536").is_err() && port("080").is_err());
    }
}
