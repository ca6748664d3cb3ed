//! `builder install` and `builder uninstall`: a bundle's layers put onto an
//! existing host with systemd and Podman ≥ 4.4 (Debian, Fedora, ...; the
//! disk image carries them already), started, and taken off again.
//!
//! Every file and link the bundle brings is recorded with its hash
//! ([`record`]); a file already on the host that no earlier install put
//! there is never overwritten (the install refuses before it writes
//! anything), and uninstall removes only what the record lists and still
//! holds what was installed. The homeserver's data, `/var/lib/matrix`, is
//! made by the units at their first start and is never in a record: it stays
//! through uninstall and a later install uses it again.

mod host;
mod record;
mod uninstall;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::bundle::{self, Bundle};
use crate::error::usage;
use crate::manifest::Manifest;
pub use record::RECORD;
use record::{Record, Recorded};
pub use uninstall::{uninstall, Removed};

/// What `builder install` was asked.
pub struct InstallRequest {
    pub bundle: PathBuf,
    /// Where the files go: `/` (the running host: units reloaded and
    /// started) or a directory (files only).
    pub root: PathBuf,
    /// Start the stack (on `/` only).
    pub start: bool,
}

/// One path of the merged layers, as the last layer that has it leaves it.
#[derive(Debug, Clone, PartialEq)]
enum Wanted {
    Dir {
        mode: u32,
        owner: Owner,
    },
    File {
        mode: u32,
        owner: Owner,
        sha256: String,
    },
    Link {
        target: String,
    },
}

/// A layer entry's numeric owner and group (applied when installing as root).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Owner {
    uid: u32,
    gid: u32,
}

impl Owner {
    /// Gives `path` this owner (as root only: anyone else cannot, and an
    /// install into a directory of one's own keeps one's own). Before the
    /// mode is set: a change of owner clears set-user-ID bits.
    fn apply(self, path: &Path) -> std::io::Result<()> {
        if rustix::process::geteuid().is_root() {
            std::os::unix::fs::chown(path, Some(self.uid), Some(self.gid))?;
        }
        Ok(())
    }
}

/// What an install did, for its summary.
pub struct Installed {
    pub profile: String,
    /// The root, made absolute.
    pub root: PathBuf,
    pub files: usize,
    pub replaced_earlier: bool,
    pub removed_stale: usize,
    pub started: Vec<String>,
    pub live: bool,
}

pub fn install(req: &InstallRequest) -> Result<Installed> {
    let root = host::root(&req.root)?;
    let live = host::is_live(&root);
    let bundle = read_verified(&req.bundle)?;
    let manifest = bundle.manifest()?;
    if live {
        host::preflight()?;
    }
    let wanted = merged_layers(&bundle, &manifest)?;
    let earlier = record::Record::read(&root)?;
    check_conflicts(&root, &wanted, earlier.as_ref())?;

    let server_name = manifest
        .values
        .get("server_name")
        .and_then(|v| v.as_str())
        .map(str::to_string);
    let mut rec = Record::new(&manifest.profile, server_name);
    // Directories an earlier install made stay this install's to remove.
    let earlier_dirs: BTreeSet<String> = earlier
        .as_ref()
        .map(|r| r.dirs.iter().cloned().collect())
        .unwrap_or_default();
    for (path, want) in &wanted {
        if let Wanted::Dir { mode, owner } = want {
            let dest = root.join(path);
            if !dest.is_dir() {
                fs::create_dir_all(&dest)
                    .with_context(|| format!("creating {}", dest.display()))?;
                owner.apply(&dest)?;
                fs::set_permissions(&dest, fs::Permissions::from_mode(*mode))?;
                rec.dirs.push(path.clone());
            } else if earlier_dirs.contains(path) {
                rec.dirs.push(path.clone());
            }
        }
    }
    // Links and files, streamed out of the bundle again in one pass; where
    // layers share a path, only the merged view's version is written.
    let names = layer_blobs(&manifest).into_keys().collect();
    bundle.with_files(&names, |_, r| put_layer(r, &root, &wanted))?;
    for (path, want) in &wanted {
        match want {
            Wanted::File { sha256, .. } => rec.entries.push(Recorded {
                path: path.clone(),
                sha256: Some(sha256.clone()),
                target: None,
            }),
            Wanted::Link { target } => rec.entries.push(Recorded {
                path: path.clone(),
                sha256: None,
                target: Some(target.clone()),
            }),
            Wanted::Dir { .. } => {}
        }
    }
    // What an earlier install put there and this bundle no longer has.
    let mut removed_stale = 0;
    if let Some(old) = &earlier {
        let stale = Record {
            entries: old
                .entries
                .iter()
                .filter(|e| !wanted.contains_key(&e.path))
                .cloned()
                .collect(),
            dirs: old
                .dirs
                .iter()
                .filter(|d| !wanted.contains_key(*d))
                .cloned()
                .collect(),
            ..old.clone()
        };
        removed_stale = uninstall::remove_files(&root, &stale)?.removed;
    }
    rec.write(&root)?;

    let mut started = Vec::new();
    if live {
        host::reload(&rec)?;
        if req.start {
            started = host::start(&root, &rec)?;
        }
    }
    Ok(Installed {
        profile: manifest.profile,
        root: root.clone(),
        files: rec.entries.len(),
        replaced_earlier: earlier.is_some(),
        removed_stale,
        started,
        live,
    })
}

/// The bundle, read and checked: every digest must hold before anything of
/// it is put onto a host.
fn read_verified(path: &Path) -> Result<Bundle> {
    if !path.is_file() {
        return Err(usage(format!(
            "{} does not exist: give the bundle a build wrote (out/<profile>.bundle.tar)",
            path.display()
        )));
    }
    let damaged = |why: String| {
        anyhow::anyhow!(
            "{} is damaged, nothing was installed: {why} (copy it again, or build it again)",
            path.display()
        )
    };
    let bundle = Bundle::read(path).map_err(|e| damaged(format!("{e:#}")))?;
    let report = crate::verify::verify_bundle(&bundle).map_err(|e| damaged(format!("{e:#}")))?;
    if !report.ok {
        return Err(damaged(report.problems.join("; ")));
    }
    Ok(bundle)
}

/// The layer blobs' names in the bundle, each with its layer's name.
fn layer_blobs(manifest: &Manifest) -> BTreeMap<String, String> {
    manifest
        .layers
        .iter()
        .map(|l| (bundle::blob_name(&l.digest), l.name.clone()))
        .collect()
}

/// Every path of the bundle's layers merged in order (the tar is read once;
/// its blobs are in digest order, the merge in the manifest's).
fn merged_layers(bundle: &Bundle, manifest: &Manifest) -> Result<BTreeMap<String, Wanted>> {
    let blobs = layer_blobs(manifest);
    let names = blobs.keys().cloned().collect();
    let mut contents = BTreeMap::new();
    bundle.with_files(&names, |blob, r| {
        contents.insert(blob.to_string(), bundle::read_layer(r)?);
        Ok(())
    })?;
    let mut wanted = BTreeMap::new();
    for layer in &manifest.layers {
        let entries = &contents[&bundle::blob_name(&layer.digest)].entries;
        for e in entries {
            let path = checked_path(&e.path, &layer.name)?;
            let mode = u32::from_str_radix(&e.mode, 8).unwrap_or(0o644);
            let (Ok(uid), Ok(gid)) = (u32::try_from(e.uid), u32::try_from(e.gid)) else {
                bail!(
                    "layer {} has {path} owned by {}:{}, beyond 32-bit IDs",
                    layer.name,
                    e.uid,
                    e.gid
                );
            };
            let owner = Owner { uid, gid };
            let want = match e.kind {
                "dir" => Wanted::Dir { mode, owner },
                "file" => Wanted::File {
                    mode,
                    owner,
                    sha256: e.sha256.clone().unwrap_or_default(),
                },
                "symlink" => Wanted::Link {
                    target: e.target.clone().unwrap_or_default(),
                },
                other => bail!(
                    "layer {} has {path} as a {other}: a bundle to install holds only \
                     directories, files and symbolic links",
                    layer.name
                ),
            };
            wanted.insert(path, want);
        }
    }
    // The record goes into the bundle's own directory (shell-lib's).
    let record_dir = Path::new(RECORD)
        .parent()
        .unwrap_or(Path::new(""))
        .to_string_lossy();
    if !matches!(wanted.get(&*record_dir), Some(Wanted::Dir { .. })) {
        bail!(
            "the bundle has no {record_dir}/: it is not an appliance bundle, nothing was installed"
        );
    }
    Ok(wanted)
}

/// A layer's path as a relative path under the root, never reaching outside
/// it or into the homeserver's data.
fn checked_path(raw: &str, layer: &str) -> Result<String> {
    let path = raw.trim_start_matches("./").trim_end_matches('/');
    let p = Path::new(path);
    let plain = p.components().all(|c| matches!(c, Component::Normal(_)));
    if path.is_empty() || !plain {
        bail!("layer {layer} has the path {raw:?}, which is not a plain path under the root");
    }
    if path == "var" || path.starts_with("var/") {
        bail!("layer {layer} puts {path} into /var: an install never writes the host's state");
    }
    Ok(path.to_string())
}

/// Refuses, before anything is written, to replace what the host has and no
/// earlier install of ours put there.
fn check_conflicts(
    root: &Path,
    wanted: &BTreeMap<String, Wanted>,
    earlier: Option<&Record>,
) -> Result<()> {
    let mut clashes = Vec::new();
    for (path, want) in wanted {
        let dest = root.join(path);
        let Ok(meta) = fs::symlink_metadata(&dest) else {
            continue;
        };
        let ours = earlier.is_some_and(|r| r.owns(path));
        let clash = match want {
            Wanted::Dir { .. } => !meta.is_dir(),
            Wanted::File { .. } | Wanted::Link { .. } => !ours || meta.is_dir(),
        };
        if clash {
            clashes.push(dest.display().to_string());
        }
    }
    if clashes.is_empty() {
        return Ok(());
    }
    let shown: Vec<&str> = clashes.iter().take(5).map(String::as_str).collect();
    let more = if clashes.len() > 5 {
        format!(" and {} more", clashes.len() - 5)
    } else {
        String::new()
    };
    Err(usage(format!(
        "the host already has {}{more}, which no `builder install` put there: nothing was \
         installed (move those away, or uninstall what put them there, then install again)",
        shown.join(", ")
    )))
}

/// Writes one layer's files and links under `root`; only what the merged
/// view wants at each path (a later layer's version wins).
fn put_layer(blob: &mut dyn Read, root: &Path, wanted: &BTreeMap<String, Wanted>) -> Result<()> {
    let gz = flate2::read::MultiGzDecoder::new(blob);
    let mut archive = tar::Archive::new(gz);
    for entry in archive.entries().context("the layer is not a tar")? {
        let mut entry = entry.context("the layer tar is damaged")?;
        let raw = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let path = raw.trim_start_matches("./").trim_end_matches('/');
        let dest = root.join(path);
        match (entry.header().entry_type(), wanted.get(path)) {
            (
                tar::EntryType::Regular,
                Some(Wanted::File {
                    mode,
                    owner,
                    sha256,
                }),
            ) => {
                let mut bytes = Vec::new();
                entry.read_to_end(&mut bytes)?;
                // An earlier layer's file of the same path is not the one kept.
                if crate::digest::Digest::of(&bytes).hex() != *sha256 {
                    continue;
                }
                replace(&dest, |tmp| {
                    fs::write(tmp, &bytes)?;
                    owner.apply(tmp)?;
                    fs::set_permissions(tmp, fs::Permissions::from_mode(*mode))
                })?;
            }
            (tar::EntryType::Symlink, Some(Wanted::Link { target })) => {
                replace(&dest, |tmp| std::os::unix::fs::symlink(target, tmp))?;
            }
            _ => {}
        }
    }
    Ok(())
}

/// Puts a new file or link at `dest` by writing it beside and renaming it
/// over: a reader sees the old or the new one, never half of one.
fn replace(dest: &Path, make: impl FnOnce(&Path) -> std::io::Result<()>) -> Result<()> {
    let name = dest.file_name().context("a path without a name")?;
    let tmp = dest.with_file_name(format!(".{}.builder-install", name.to_string_lossy()));
    let _ = fs::remove_file(&tmp);
    make(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, dest).with_context(|| format!("writing {}", dest.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_paths_stay_under_the_root_and_out_of_var() {
        assert_eq!(checked_path("./usr/bin/x", "l").unwrap(), "usr/bin/x");
        assert_eq!(checked_path("usr/lib/", "l").unwrap(), "usr/lib");
        for bad in [
            "../etc/passwd",
            "/etc/passwd",
            "usr/../../x",
            "var/lib/matrix/x",
            "var",
            "",
        ] {
            assert!(checked_path(bad, "l").is_err(), "{bad} accepted");
        }
    }
}
