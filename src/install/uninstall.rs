//! `builder uninstall`: stops what an install started and removes what its
//! record lists, and nothing else: never `/var/lib/matrix`, never a file
//! changed since the install (kept, and said).

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::host;
use super::record::{Record, Recorded, RECORD};
use crate::digest::Digest;
use crate::error::usage;

/// What an uninstall did, for its summary.
pub struct Removed {
    pub profile: String,
    /// The root, made absolute.
    pub root: PathBuf,
    pub removed: usize,
    /// Installed files changed since (kept).
    pub kept_changed: Vec<String>,
    /// Directories left because something else is in them.
    pub kept_dirs: Vec<String>,
    pub stopped: Vec<String>,
    pub live: bool,
}

pub fn uninstall(root: &Path) -> Result<Removed> {
    let root = host::root(root)?;
    let live = host::is_live(&root);
    let Some(rec) = Record::read(&root)? else {
        return Err(usage(format!(
            "nothing to uninstall under {}: no record of a `builder install` ({RECORD})",
            root.display()
        )));
    };
    if live && !rustix::process::geteuid().is_root() {
        return Err(usage(
            "uninstalling from this host needs root (units are stopped, files in /usr removed): run it with sudo",
        ));
    }
    let mut stopped = Vec::new();
    if live {
        stopped = stop(&rec)?;
    }
    let mut removed = remove_files(&root, &rec)?;
    fs::remove_file(root.join(RECORD))
        .with_context(|| format!("removing {}", root.join(RECORD).display()))?;
    // Directories kept only for the record (deepest first, as kept).
    removed
        .kept_dirs
        .retain(|dir| fs::remove_dir(root.join(dir)).is_err());
    if live {
        host::systemctl(&["daemon-reload"])?;
    }
    Ok(Removed {
        profile: rec.profile,
        root,
        stopped,
        live,
        ..removed
    })
}

/// Stops every unit the install defined (one transaction: systemd orders
/// the stops), so no container runs from files that are about to go; a unit
/// that is not loaded is no error.
fn stop(rec: &Record) -> Result<Vec<String>> {
    let units = host::defined_units(rec);
    if units.is_empty() {
        return Ok(units);
    }
    let mut args = vec!["stop"];
    args.extend(units.iter().map(String::as_str));
    // Units that never loaded (a quadlet the host's Podman skipped) make
    // systemctl exit non-zero after stopping the rest.
    if let Err(e) = host::systemctl(&args) {
        eprintln!("builder uninstall: {e:#}");
    }
    let mut reset = vec!["reset-failed"];
    reset.extend(units.iter().map(String::as_str));
    let _ = host::systemctl(&reset);
    Ok(units)
}

/// Removes the record's files and links that still hold what was installed,
/// then its directories that are empty (deepest first). Used by uninstall,
/// and by an install for what an earlier one had and it no longer has.
pub fn remove_files(root: &Path, rec: &Record) -> Result<Removed> {
    let mut removed = 0;
    let mut kept_changed = Vec::new();
    for e in &rec.entries {
        let path = root.join(&e.path);
        if !unchanged(&path, e)? {
            if fs::symlink_metadata(&path).is_ok() {
                kept_changed.push(path.display().to_string());
            }
            continue;
        }
        fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        removed += 1;
    }
    let mut dirs: Vec<&String> = rec.dirs.iter().collect();
    dirs.sort_by_key(|d| std::cmp::Reverse(d.matches('/').count()));
    let mut kept_dirs = Vec::new();
    for dir in dirs {
        let path = root.join(dir);
        if path.is_dir() && fs::remove_dir(&path).is_err() {
            kept_dirs.push(dir.clone());
        }
    }
    Ok(Removed {
        profile: rec.profile.clone(),
        root: root.to_path_buf(),
        removed,
        kept_changed,
        kept_dirs,
        stopped: Vec::new(),
        live: false,
    })
}

/// Whether `path` still is the file or link the install put there.
fn unchanged(path: &Path, e: &Recorded) -> Result<bool> {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return Ok(false);
    };
    if let Some(target) = &e.target {
        return Ok(meta.file_type().is_symlink()
            && fs::read_link(path)?.to_string_lossy() == target.as_str());
    }
    if !meta.is_file() {
        return Ok(false);
    }
    let bytes = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(e.sha256.as_deref() == Some(Digest::of(&bytes).hex().as_str()))
}
