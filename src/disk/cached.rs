//! The files of a cached disk image entry (`files.json`): their digests,
//! hashed once, and their stamps. Outputs leave the cache as hard links, so a
//! file written through one (an image booted in place) changes the entry: it
//! is then made again rather than handed out.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::{update, UPDATE_DIR};
use crate::digest::Digest;
use crate::stamp::{read_record, Stamp};

/// The record of an entry's files.
pub const FILES: &str = "files.json";

/// A file of a finished image's cache entry: `name` relative to the entry.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CachedFile {
    pub name: String,
    #[serde(skip)]
    pub path: PathBuf,
    pub digest: Digest,
    stamp: Stamp,
}

/// The entry's files as they were made (`files.json`): handed out again only
/// while each is that very file, unchanged (outputs are hard links to them).
pub fn record_files(dir: &Path, files: Vec<(String, Digest)>) -> Result<()> {
    let records = (files.into_iter())
        .map(|(name, digest)| {
            Ok(CachedFile {
                stamp: Stamp::of(&dir.join(&name))?,
                path: dir.join(&name),
                name,
                digest,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    fs::write(dir.join(FILES), serde_json::to_vec_pretty(&records)?)?;
    Ok(())
}

/// The files of `dir/update/` and their digests (from its SHA256SUMS, or
/// `sums` given apart; the files it does not list hashed).
pub fn update_digests(dir: &Path, sums: &str) -> Result<Vec<(String, Digest)>> {
    let listed: std::collections::BTreeMap<&str, &str> = sums
        .lines()
        .filter_map(|l| l.split_once("  "))
        .map(|(d, n)| (n, d))
        .collect();
    let mut files = Vec::new();
    for file in update::list(&dir.join(UPDATE_DIR))? {
        let digest = match listed.get(file.name.as_str()) {
            Some(hex) => hex.parse().map_err(|e: String| anyhow::anyhow!(e))?,
            None => hash_file(&file.path)?,
        };
        files.push((format!("{UPDATE_DIR}/{}", file.name), digest));
    }
    Ok(files)
}

/// The entry's files if every one is still as it was made, else the names
/// of those that are not (all of them when the record is missing).
pub fn intact_files(dir: &Path) -> Result<Vec<CachedFile>, Vec<String>> {
    let Some(mut files) = read_record::<Vec<CachedFile>>(&dir.join(FILES)) else {
        return Err(vec![FILES.to_string()]);
    };
    let mut changed = Vec::new();
    for file in &mut files {
        file.path = dir.join(&file.name);
        if !file.stamp.matches(&file.path) {
            changed.push(file.name.clone());
        }
    }
    if changed.is_empty() {
        Ok(files)
    } else {
        Err(changed)
    }
}

pub fn hash_file(path: &Path) -> Result<Digest> {
    let file = fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(crate::digest::HashingReader::new(file)
        .finish()
        .with_context(|| format!("reading {}", path.display()))?
        .0)
}

/// Removes a cache entry (a directory).
pub fn remove_entry(dir: &Path) -> Result<()> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", dir.display()))
        }
        _ => Ok(()),
    }
}
