//! The build epoch: every timestamp in every artifact. Taken from
//! SOURCE_DATE_EPOCH (<https://reproducible-builds.org/specs/source-date-epoch/>)
//! or, when unset, a fixed documented default, so builds are reproducible
//! by default.

use crate::error::UsageError;

/// 2025-01-01T00:00:00Z: the epoch when SOURCE_DATE_EPOCH is not set.
pub const DEFAULT_EPOCH: u64 = 1_735_689_600;

/// The largest mtime a tar header holds in its 11 octal digits.
const MAX_EPOCH: u64 = 0o77_777_777_777;

/// Parses the value of SOURCE_DATE_EPOCH (None when unset).
pub fn from_env_value(value: Option<&str>) -> Result<u64, UsageError> {
    let Some(text) = value else {
        return Ok(DEFAULT_EPOCH);
    };
    match text.parse::<u64>() {
        Ok(n) if n <= MAX_EPOCH && text.bytes().all(|b| b.is_ascii_digit()) => Ok(n),
        _ => Err(UsageError(format!(
            "SOURCE_DATE_EPOCH={text:?} is malformed: it must be a whole number of seconds since \
             1970-01-01 UTC (e.g. from `git log -1 --format=%ct`), or unset for the default {DEFAULT_EPOCH}"
        ))),
    }
}

pub fn from_env() -> Result<u64, UsageError> {
    let value = std::env::var_os("SOURCE_DATE_EPOCH").map(|v| v.to_string_lossy().into_owned());
    from_env_value(value.as_deref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsing() {
        assert_eq!(from_env_value(None).unwrap(), DEFAULT_EPOCH);
        assert_eq!(from_env_value(Some("1700000000")).unwrap(), 1_700_000_000);
        for bad in ["", " 1", "1.5", "-1", "+1", "1e9", "abc", "99999999999999"] {
            assert!(from_env_value(Some(bad)).is_err(), "{bad:?}");
        }
    }
}
