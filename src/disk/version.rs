//! The image version: `IMAGE_ID` and `IMAGE_VERSION` of os-release(5), the
//! names of the update artifacts, the root partition's label and the boot
//! entries. By default made from the build epoch, so a newer build is a
//! newer version; `build --version` or a profile's `version` overrides it.

use anyhow::Result;

use crate::error::usage;

/// os-release's `IMAGE_ID` of every appliance image.
pub const IMAGE_ID: &str = "matrix-appliance";

/// Prefix of every versioned name: `appliance_<version>` is the root
/// partition's GPT label and the stem of each update file. Short, since a
/// GPT label holds 36 characters and systemd-sysupdate prefixes a partly
/// written partition's label with 4 more.
pub const PREFIX: &str = "appliance";

/// The longest version that keeps `PRT#appliance_<version>` within a GPT
/// label.
pub const MAX_LEN: usize = 36 - 4 - PREFIX.len() - 1;

/// The version of an image: `--version`, else the profile's `version`, else
/// the epoch's UTC time as `YYYYMMDD.HHMMSS`.
pub fn resolve(cli: Option<&str>, profile: Option<&str>, epoch: u64) -> Result<String> {
    match (cli, profile) {
        (Some(v), _) => check(v, "--version"),
        (None, Some(v)) => check(v, "the profile's `version`"),
        (None, None) => Ok(from_epoch(epoch)),
    }
}

/// `YYYYMMDD.HHMMSS` (UTC) of a Unix time: monotonic, and ordered by
/// systemd's version comparison as by time.
pub fn from_epoch(epoch: u64) -> String {
    let (days, secs) = (epoch / 86_400, epoch % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}{m:02}{d:02}.{:02}{:02}{:02}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Year, month, day of a day count since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`, proleptic Gregorian).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// A version must start with a digit and hold only digits, letters and dots
/// (no `_`, `+` or `-`: they separate fields in update file names and boot
/// counters), and fit a GPT label.
fn check(version: &str, what: &str) -> Result<String> {
    if is_valid(version) {
        Ok(version.to_string())
    } else {
        Err(usage(format!(
            "{what} {version:?} is not a valid image version: start with a digit, use only \
             letters, digits and dots, at most {MAX_LEN} characters (e.g. \"2.1\" or \
             \"20261205.1\")"
        )))
    }
}

/// Whether `version` may name an image (see [`resolve`]'s rules).
pub fn is_valid(version: &str) -> bool {
    version.len() <= MAX_LEN
        && version.starts_with(|c: char| c.is_ascii_digit())
        && version
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.')
}

/// Orders two valid versions as systemd-sysupdate does (its
/// `strverscmp_improved`, for the characters a version may hold): runs of
/// digits compare as numbers, runs of letters as text, a digit run is newer
/// than a letter run, a `.` newer than anything else there, and a version
/// that goes on past a shared prefix is newer.
pub fn compare(a: &str, b: &str) -> std::cmp::Ordering {
    use std::cmp::Ordering;
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    let run = |s: &[u8], digits: bool| {
        (s.iter())
            .take_while(|c| {
                if digits {
                    c.is_ascii_digit()
                } else {
                    c.is_ascii_alphabetic()
                }
            })
            .count()
    };
    loop {
        match (a.first(), b.first()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(b'.'), Some(b'.')) => (a, b) = (&a[1..], &b[1..]),
            (Some(b'.'), _) => return Ordering::Greater,
            (_, Some(b'.')) => return Ordering::Less,
            (Some(x), Some(y)) if x.is_ascii_digit() || y.is_ascii_digit() => {
                let zeros = |s: &[u8]| s.iter().take_while(|c| **c == b'0').count();
                (a, b) = (&a[zeros(a)..], &b[zeros(b)..]);
                let (la, lb) = (run(a, true), run(b, true));
                let order = la.cmp(&lb).then_with(|| a[..la].cmp(&b[..lb]));
                if order != Ordering::Equal {
                    return order;
                }
                (a, b) = (&a[la..], &b[lb..]);
            }
            _ => {
                let (la, lb) = (run(a, false), run(b, false));
                let order = a[..la].cmp(&b[..lb]);
                if order != Ordering::Equal {
                    return order;
                }
                (a, b) = (&a[la..], &b[lb..]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_epoch_gives_its_utc_date_and_time() {
        for (epoch, version) in [
            (0, "19700101.000000"),
            (1_700_000_000, "20231114.221320"),
            (951_782_400, "20000229.000000"),
            (4_102_444_799, "20991231.235959"),
        ] {
            assert_eq!(from_epoch(epoch), version, "epoch {epoch}");
        }
    }

    #[test]
    fn a_later_epoch_is_a_later_version() {
        let mut last = from_epoch(0);
        for epoch in (1..4_000_000_000u64).step_by(7_777_777) {
            let v = from_epoch(epoch);
            assert!(v > last, "{v} after {last}");
            last = v;
        }
    }

    #[test]
    fn versions_order_as_systemd_orders_them() {
        use std::cmp::Ordering::*;
        for (a, b, order) in [
            ("2", "10", Less),
            ("20231115.1", "20231114.221320", Greater),
            ("20231116.1", "20231115.1", Greater),
            ("1.2", "1.2.1", Less),
            ("1.02", "1.2", Equal),
            ("2a", "2", Greater),
            ("2a", "2b", Less),
            ("1.2", "1a", Greater),
            ("2", "a", Greater),
            ("3", "3", Equal),
        ] {
            assert_eq!(compare(a, b), order, "{a} vs {b}");
            assert_eq!(compare(b, a), order.reverse(), "{b} vs {a}");
        }
    }

    #[test]
    fn the_command_line_wins_over_the_profile() {
        assert_eq!(resolve(Some("3.1"), Some("2"), 0).unwrap(), "3.1");
        assert_eq!(resolve(None, Some("2"), 0).unwrap(), "2");
        assert_eq!(resolve(None, None, 0).unwrap(), "19700101.000000");
    }

    #[test]
    fn a_version_that_would_break_names_is_a_usage_error() {
        let longest = format!("1{}", "0".repeat(MAX_LEN - 1));
        assert!(resolve(Some(&longest), None, 0).is_ok());
        for bad in [
            "",
            "v1",
            "1_2",
            "1-2",
            "1+2",
            "1 2",
            "1/2",
            &format!("{longest}0"),
        ] {
            let err = resolve(Some(bad), None, 0).unwrap_err();
            assert!(crate::error::is_usage(&err), "{bad:?}");
            assert!(err.to_string().contains("--version"), "{err}");
        }
        let err = resolve(None, Some("x"), 0).unwrap_err();
        assert!(err.to_string().contains("profile"), "{err}");
    }
}
