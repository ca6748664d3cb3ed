//! The record `builder install` leaves on the host: every file and link it
//! put there (with its content's hash) and every directory it made, so that
//! `builder uninstall` removes exactly those, and a second install knows
//! which existing files are its own.

use std::fs;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// Where the record lies, under the install's root.
pub const RECORD: &str = "usr/lib/matrix-appliance/install-record.json";

const SCHEMA: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    pub schema: u32,
    pub builder_version: String,
    pub profile: String,
    /// The values the bundle was built with (`server_name` above all), for
    /// the admin who finds an install and wonders which one it is.
    pub server_name: Option<String>,
    /// Files and symbolic links, by path under the root.
    pub entries: Vec<Recorded>,
    /// Directories this install made (none that existed before it).
    pub dirs: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recorded {
    pub path: String,
    /// sha256 of a file's content.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// A symbolic link's target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

impl Record {
    pub fn new(profile: &str, server_name: Option<String>) -> Record {
        Record {
            schema: SCHEMA,
            builder_version: env!("CARGO_PKG_VERSION").to_string(),
            profile: profile.to_string(),
            server_name,
            entries: Vec::new(),
            dirs: Vec::new(),
        }
    }

    /// The record under `root`, if an install left one.
    pub fn read(root: &Path) -> Result<Option<Record>> {
        let path = root.join(RECORD);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let record: Record = serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "{} is not a record builder can read (damaged, or from another version): \
                 remove the installed files by hand, using it as the list",
                path.display()
            )
        })?;
        if record.schema != SCHEMA {
            bail!(
                "{} is from builder {} (record schema {}), this builder reads schema {SCHEMA}: \
                 use that builder's uninstall",
                path.display(),
                record.builder_version,
                record.schema
            );
        }
        Ok(Some(record))
    }

    pub fn write(&self, root: &Path) -> Result<()> {
        let path = root.join(RECORD);
        let mut bytes = serde_json::to_vec_pretty(self)?;
        bytes.push(b'\n');
        let tmp = path.with_extension("json.tmp");
        fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
        fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))
    }

    pub fn owns(&self, path: &str) -> bool {
        self.entries.iter().any(|e| e.path == path)
    }
}
