//! `[images.<name>]` in a layer's layer.toml: the declaration of an image a
//! layer runs, checked on its own. Apart from image building (`images`), so
//! that reading layers needs nothing of it.

use std::collections::BTreeMap;

use serde::Deserialize;

/// A pinned reference: `name[:tag]@sha256:<64 hex>`.
pub const PINNED_PATTERN: &str = r"[a-z0-9][a-z0-9._/:-]*@sha256:[0-9a-f]{64}";

/// `[images.<name>]` in layer.toml.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ImageDecl {
    pub description: String,
    /// The public reference, pinned by digest.
    pub upstream: String,
    /// Needed only when every named value equals the given one (as a
    /// layer's `when`).
    #[serde(default)]
    pub when: BTreeMap<String, toml::Value>,
}

/// Image names become value names (`<name>_image`), unit names and
/// repository paths.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = name.len() <= 40
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "image name {name:?} is not valid: use lower-case letters, digits and '_', starting with a letter"
        ))
    }
}

pub fn check_decl(name: &str, decl: &ImageDecl) -> Result<(), String> {
    check_name(name)?;
    let pinned = regex::Regex::new(&format!("^(?:{PINNED_PATTERN})$")).expect("pattern compiles");
    if !pinned.is_match(&decl.upstream) {
        return Err(format!(
            "upstream = {:?} is not pinned: write it as name[:tag]@sha256:<64 hex digits>",
            decl.upstream
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declarations_must_be_pinned() {
        let decl = |upstream: &str| ImageDecl {
            description: "x".into(),
            upstream: upstream.into(),
            when: BTreeMap::new(),
        };
        let digest = "0".repeat(64);
        assert!(check_decl(
            "synapse",
            &decl(&format!("docker.io/a/b:v1@sha256:{digest}"))
        )
        .is_ok());
        assert!(check_decl("synapse", &decl("docker.io/a/b:v1")).is_err());
        assert!(check_decl("Synapse", &decl(&format!("a@sha256:{digest}"))).is_err());
        assert!(check_decl("bridge-x", &decl(&format!("a@sha256:{digest}"))).is_err());
    }
}
