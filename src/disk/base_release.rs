//! `build --base-release DIR`: the `update/` directory of a version the
//! machines already run. A version is a boot entry (its own unified kernel
//! image and GRUB entry, and its appliance extension) over an OS image (the
//! root file system, kernel and initramfs), which has a version of its own.
//! When this build's OS image comes out the same as the base release's, it
//! keeps that OS version, and its update carries only the boot entry and the
//! appliance extension: a machine that runs that OS downloads megabytes, not
//! the root. Otherwise the OS is new and gets this build's version.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::Result;

use super::update::SUMS;
use super::version;
use crate::error::usage;

/// What a build needs of its base release.
#[derive(Debug, Clone, PartialEq)]
pub struct BaseRelease {
    pub dir: PathBuf,
    /// The version of its OS image (its root file's name).
    pub os_version: String,
    /// Its root file's name and SHA-256, as its `SHA256SUMS` lists them.
    pub root: (String, String),
    /// The versions it boots (its unified kernel images' names).
    pub entries: Vec<String>,
}

/// Reads `dir/SHA256SUMS`: its root image's file and its boot entries'
/// versions. A usage error names what is missing.
pub fn read(dir: &Path) -> Result<BaseRelease> {
    let what = format!("--base-release {}", dir.display());
    if !dir.is_dir() {
        return Err(usage(format!(
            "{what}: no such directory; give the update/ directory of an earlier build"
        )));
    }
    let sums = fs::read_to_string(dir.join(SUMS)).map_err(|_| {
        usage(format!(
            "{what}: no {SUMS} there; give the update/ directory of an earlier build"
        ))
    })?;
    let prefix = version::PREFIX;
    let mut roots = Vec::new();
    let mut entries = Vec::new();
    for line in sums.lines() {
        let Some((sum, name)) = line.split_once("  ") else {
            return Err(usage(format!(
                "{what}: {SUMS} has a line that is not `<sha256>  <file>`: {line:?}"
            )));
        };
        let Some(rest) = name.strip_prefix(prefix).and_then(|r| r.strip_prefix('_')) else {
            continue;
        };
        if let Some(v) = rest.strip_suffix(".efi") {
            entries.push(v.to_string());
        } else if let Some((v, _)) = (rest.strip_suffix(".root.gz"))
            .or_else(|| rest.strip_suffix(".root.xz"))
            .and_then(|r| r.split_once('_'))
        {
            roots.push((v.to_string(), name.to_string(), sum.to_string()));
        }
    }
    let (os_version, root, sum) = match roots.as_slice() {
        [one] => one.clone(),
        [] => {
            return Err(usage(format!(
                "{what}: its {SUMS} lists no root image ({prefix}_<version>_<uuid>.root.gz); give \
                 the update/ directory of an earlier build"
            )))
        }
        _ => {
            return Err(usage(format!(
                "{what}: its {SUMS} lists {} root images; give one build's update/ directory",
                roots.len()
            )))
        }
    };
    if !version::is_valid(&os_version) || entries.iter().any(|v| !version::is_valid(v)) {
        return Err(usage(format!(
            "{what}: its {SUMS} names files of no valid version; give the update/ directory of an \
             earlier build"
        )));
    }
    if entries.is_empty() {
        return Err(usage(format!(
            "{what}: its {SUMS} lists no unified kernel image ({prefix}_<version>.efi); give the \
             update/ directory of an earlier build"
        )));
    }
    Ok(BaseRelease {
        dir: dir.to_path_buf(),
        os_version,
        root: (root, sum),
        entries,
    })
}

impl BaseRelease {
    /// A build of `version` over this release must be newer than every
    /// version it boots, or no machine would take it as an update.
    pub fn check_newer(&self, version: &str) -> Result<()> {
        match (self.entries.iter()).find(|v| version::compare(version, v).is_le()) {
            Some(v) => Err(usage(format!(
                "--version {version} is not newer than {v}, the version of --base-release {}: give \
                 a newer --version",
                self.dir.display()
            ))),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOT: &str = "appliance_3_0b1c.root.gz";

    fn release(lines: &str) -> (tempfile::TempDir, Result<BaseRelease>) {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(SUMS), lines).unwrap();
        let read = read(dir.path());
        (dir, read)
    }

    #[test]
    fn the_root_names_the_os_version_and_the_images_the_entries() {
        let (dir, base) = release(&format!(
            "aa  appliance_3.vmlinuz\nbb  {ROOT}\ncc  appliance_4.efi\ndd  appliance_4.grub.cfg\n\
             ee  appliance_4.sysext.raw\n"
        ));
        let base = base.unwrap();
        assert_eq!(base.os_version, "3");
        assert_eq!(base.root, (ROOT.to_string(), "bb".to_string()));
        assert_eq!(base.entries, ["4"]);
        assert_eq!(base.dir, dir.path());
        assert!(base.check_newer("4.1").is_ok());
        for older in ["4", "3.9", "1"] {
            let err = base.check_newer(older).unwrap_err();
            assert!(crate::error::is_usage(&err), "{older}");
            assert!(err.to_string().contains("not newer than 4"), "{err}");
        }
    }

    #[test]
    fn a_directory_that_is_no_release_is_a_usage_error_saying_so() {
        for (sums, why) in [
            ("aa  appliance_4.efi\n", "lists no root image"),
            (
                &format!("bb  {ROOT}\n") as &str,
                "lists no unified kernel image",
            ),
            (
                &format!("bb  {ROOT}\nbb  appliance_5_1.root.gz\ncc  appliance_5.efi\n"),
                "lists 2 root images",
            ),
            ("not a sums file\n", "is not `<sha256>  <file>`"),
            (
                "bb  appliance_x_1.root.gz\ncc  appliance_5.efi\n",
                "no valid version",
            ),
        ] {
            let (_dir, base) = release(sums);
            let err = base.unwrap_err();
            assert!(crate::error::is_usage(&err), "{sums}");
            assert!(err.to_string().contains(why), "{sums}: {err}");
        }
        let dir = tempfile::tempdir().unwrap();
        let err = read(dir.path()).unwrap_err();
        assert!(err.to_string().contains("no SHA256SUMS there"), "{err}");
        let err = read(&dir.path().join("missing")).unwrap_err();
        assert!(err.to_string().contains("no such directory"), "{err}");
    }
}
