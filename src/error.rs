//! Errors a caller branches on. Everything else is an `anyhow` chain.

/// The input was wrong (a value, a name, a flag): the command exits with 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Whether an error chain says the user gave bad input.
pub fn is_usage(err: &anyhow::Error) -> bool {
    err.chain().any(|e| e.is::<UsageError>())
}

/// Builds a usage error as an `anyhow::Error`.
pub fn usage(msg: impl Into<String>) -> anyhow::Error {
    UsageError(msg.into()).into()
}

/// "did you mean" for a misspelt name, when one candidate is close enough.
pub fn closest<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (strsim::osa_distance(name, c), c))
        .filter(|(d, c)| *d <= (c.len().max(name.len()) / 3).max(1))
        .min()
        .map(|(_, c)| c)
}

/// ", did you mean `x`?" or "" — for the tail of an error message.
pub fn did_you_mean<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> String {
    closest(name, candidates).map_or_else(String::new, |c| format!("; did you mean `{c}`?"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions() {
        let known = ["server_name", "matrix_host", "proxy"];
        assert_eq!(closest("sever_name", known), Some("server_name"));
        assert_eq!(closest("prxy", known), Some("proxy"));
        assert_eq!(closest("colour", known), None);
    }
}
