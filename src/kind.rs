//! Image kinds: `images/<kind>.toml` says how a bundle becomes an artifact.
//! Every kind has a description and may add layers that only its artifact
//! gets (the disk image's operating-system settings); the disk kind's own
//! settings are read by `disk::spec`.

use std::fs;

use anyhow::{anyhow, Context, Result};
use serde::Deserialize;

use crate::project::Project;

#[derive(Debug, Clone, Deserialize)]
pub struct KindToml {
    /// Required in the file, for its reader; the builder does not use it.
    #[allow(dead_code)]
    pub description: String,
    /// Layers composed into this kind's artifact only, after the profile's.
    #[serde(default)]
    pub layers: Vec<String>,
}

pub fn load(project: &Project, kind: &str) -> Result<KindToml> {
    let path = project.images_dir().join(format!("{kind}.toml"));
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    // Other kinds' settings are checked where they are used; here only the
    // common fields matter.
    let table: toml::Table = toml::from_str(&text)
        .map_err(|e| anyhow!("{}: {}", path.display(), e.to_string().trim_end()))?;
    let common: toml::Table = table
        .into_iter()
        .filter(|(k, _)| k == "description" || k == "layers")
        .collect();
    common
        .try_into()
        .map_err(|e: toml::de::Error| anyhow!("{}: {}", path.display(), e.to_string().trim_end()))
}
