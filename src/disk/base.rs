//! The disk image's base: Debian trixie (Essential set plus the packages and
//! users of images/disk.toml) made by mmdebstrap, cached by package set, mirror and
//! epoch, with the list of installed package versions beside it.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::spec::DiskSpec;
use crate::cache::{Cache, Key};
use crate::debian::{self, SUITE};
use crate::progress::Progress;

/// Bump when something not listed in the key changes what the base holds.
const VERSION: &str = "1";
const PACKAGES_FILE: &str = "packages.json";

pub struct Base {
    pub root: PathBuf,
    /// Installed packages and their versions (for the manifest).
    pub packages: BTreeMap<String, String>,
}

pub fn ensure(spec: &DiskSpec, cache: &Cache, epoch: u64, progress: &mut Progress) -> Result<Base> {
    let mirror = debian::mirror();
    let mut key = Key::new("builder disk base", epoch);
    key.add(VERSION.as_bytes())
        .add(SUITE.as_bytes())
        .add(mirror.as_bytes())
        .add(spec.base.packages.join(" ").as_bytes());
    for u in &spec.base.users {
        key.add(format!("user {} {} {} {} {}", u.name, u.uid, u.gid, u.home, u.shell).as_bytes());
    }
    let dir = cache.dir_or_build("disk-base", &key.finish(), |dir: &Path| {
        progress.note(&format!(
            "disk: installing the Debian {SUITE} base ({} packages and the Essential set) with \
             mmdebstrap",
            spec.base.packages.len()
        ));
        let root = dir.join("root");
        let hook = dir.join("essential-hook.sh");
        fs::write(
            &hook,
            debian::essential_hook(&spec.base.users, &Default::default()),
        )?;
        debian::mmdebstrap(
            &debian::Bootstrap {
                what: "the disk image's base",
                suite: SUITE,
                variant: "essential",
                packages: &spec.base.packages,
                hooks: vec![format!(
                    "--essential-hook=sh {} \"$1\"",
                    exec::shell_quote(&hook)
                )],
                target: &root,
                work: dir,
                epoch,
            },
            cache,
        )?;
        let packages: BTreeMap<String, String> =
            debian::installed_packages(&root)?.into_iter().collect();
        fs::write(
            dir.join(PACKAGES_FILE),
            serde_json::to_vec_pretty(&packages)?,
        )?;
        Ok(())
    })?;
    let listed = dir.join(PACKAGES_FILE);
    let packages = serde_json::from_slice(
        &fs::read(&listed).with_context(|| format!("reading {}", listed.display()))?,
    )
    .with_context(|| format!("reading {}", listed.display()))?;
    Ok(Base {
        root: dir.join("root"),
        packages,
    })
}
