//! The appliance extension: everything of the profile's layers that lives in
//! `/usr` (units, quadlets, scripts, rendered configs), as a systemd system
//! extension image (sysext: erofs holding `usr/` and its extension-release).
//!
//! The OS image under it (base, image store, `/etc`) does not change with
//! the site values, so a changed value rebuilds only this small image and the
//! state partition that carries it (`/var/lib/appliance/extensions/`). The
//! initramfs lays it over `/usr` before systemd starts (the `appliance-state`
//! script of os-debian), so PID 1, the generators and the boot transaction see
//! one `/usr` from their start. systemd-sysext.service merges extensions only
//! after that, and units it brings are loaded by a daemon-reload but not
//! started by the boot already under way (Flatcar's `ensure-sysext.service` and
//! Fedora's `Upholds=` drop-ins work around it); merging earlier needs neither.
//! The image is a plain sysext all the same: `systemd-dissect` reads it, and
//! on another systemd host it merges with systemd-sysext.

use std::fs;
use std::path::Path;

use anyhow::{Context, Result};

use super::tools::Tools;
use crate::images::LAYOUT_DIR;
use crate::tree::Tree;

/// The extension's name: its extension-release file's suffix, and the stem
/// of its image file.
pub const NAME: &str = "matrix-appliance";

/// Where the state partition keeps the extension images (relative to /var).
pub const VAR_DIR: &str = "lib/appliance/extensions";

/// The image file of one version: `matrix-appliance_<version>.raw`. The
/// initramfs mounts the one of the version it boots.
pub fn file_name(version: &str) -> String {
    format!("{NAME}_{version}.raw")
}

/// Directory the extension's units are enabled in (systemctl's view of a
/// vendor enablement): `usr/lib/systemd/system`.
const UNIT_DIR: &str = "usr/lib/systemd/system";

/// The layers' tree cut in two: what goes into the OS image and what into the
/// extension.
pub struct Split {
    pub os: Tree,
    pub extension: Tree,
}

/// Cuts `merged` in two: `usr/` goes into the extension, except the embedded
/// images' OCI layout (unpacked into the OS image's store); everything else
/// (`/etc`, the layout) into the OS image.
pub fn split(merged: &Tree) -> Result<Split> {
    let layout = LAYOUT_DIR.as_bytes();
    let under = |path: &[u8], dir: &[u8]| {
        path == dir || (path.starts_with(dir) && path.get(dir.len()) == Some(&b'/'))
    };
    let mut os = Tree::new();
    let mut extension = Tree::new();
    for (path, entry) in merged.iter() {
        let in_layout = under(path, layout);
        // The layout's parent directories belong to both.
        let above_layout = layout.starts_with(path) && layout.get(path.len()) == Some(&b'/');
        if under(path, b"usr") && !in_layout {
            extension.insert(path, entry.clone())?;
        }
        if !under(path, b"usr") || in_layout || above_layout {
            os.insert(path, entry.clone())?;
        }
    }
    Ok(Split { os, extension })
}

/// Units of `names` that the extension holds (the rest are the OS image's).
pub fn units_in<'a>(extension: &Tree, names: &'a [String]) -> Vec<&'a String> {
    names
        .iter()
        .filter(|unit| {
            extension
                .get(format!("{UNIT_DIR}/{unit}").as_bytes())
                .is_some()
        })
        .collect()
}

/// What the extension-release file says of the OS it extends, from the OS
/// image's os-release: its `ID` and `VERSION_ID` (systemd-sysext merges the
/// extension only on that OS).
pub struct Target {
    pub id: String,
    pub version_id: String,
}

impl Target {
    pub fn of_root(root: &Path) -> Result<Target> {
        let path = root.join("usr/lib/os-release");
        let text = fs::read_to_string(&path)
            .with_context(|| format!("reading {} (the base's os-release)", path.display()))?;
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{name}=")))
                .map(|v| v.trim_matches('"').to_string())
                .with_context(|| format!("the base's os-release has no {name}"))
        };
        Ok(Target {
            id: field("ID")?,
            version_id: field("VERSION_ID")?,
        })
    }
}

/// The extension-release file of version `version`.
pub fn release(target: &Target, version: &str) -> String {
    format!(
        "ID={}\nVERSION_ID={}\nARCHITECTURE=x86-64\nSYSEXT_SCOPE=system\nIMAGE_ID={}\nIMAGE_VERSION={version}\n",
        target.id,
        target.version_id,
        super::version::IMAGE_ID
    )
}

/// Stages `scratch/extension/` (the tree, the units of `enable` enabled in
/// it, the extension-release) and makes `scratch/extension.raw` of it.
/// `finish` runs on the staged tree before the image is made (the keyring).
#[allow(clippy::too_many_arguments)]
pub fn make(
    tools: &Tools,
    scratch: &Path,
    tree: &Tree,
    enable: &[&String],
    target: &Target,
    version: &str,
    uuid: &str,
    epoch: u64,
    finish: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    let root = scratch.join("extension");
    tree.write_to(&root)
        .context("writing the appliance extension's tree")?;
    if !enable.is_empty() {
        enable_units(tools, scratch, enable)?;
    }
    let release_dir = root.join("usr/lib/extension-release.d");
    fs::create_dir_all(&release_dir)?;
    fs::write(
        release_dir.join(format!("extension-release.{NAME}")),
        release(target, version),
    )?;
    finish(&root)?;
    super::assemble::clamp_mtimes(&root, epoch)?;
    tools.mkfs_erofs(
        scratch,
        epoch,
        uuid,
        "extension.raw",
        "extension",
        "making the appliance extension (mkfs.erofs)",
    )?;
    Ok(())
}

/// `systemctl --root enable` in the staged extension, then its links moved
/// from `etc/systemd/system` to `usr/lib/systemd/system`: the extension
/// carries its own enablement, as a vendor's units do, and leaves `/etc` to
/// the OS image.
fn enable_units(tools: &Tools, scratch: &Path, units: &[&String]) -> Result<()> {
    let mut argv = vec!["systemctl", "--root=/work/extension", "enable", "--quiet"];
    argv.extend(units.iter().map(|u| u.as_str()));
    let mut cmd = tools.sandbox(scratch).command(&argv)?;
    exec::run(
        &mut cmd,
        "enabling the extension's units (systemctl --root)",
    )?;
    let root = scratch.join("extension");
    let from = root.join("etc/systemd/system");
    move_links(&from, &root.join(UNIT_DIR))?;
    fs::remove_dir_all(root.join("etc")).context("removing the extension's etc/")?;
    Ok(())
}

/// Moves every entry of `from` (links and `*.wants/` directories of links)
/// into `to`, merging directories.
fn move_links(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to)?;
    for entry in fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        let dest = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            move_links(&entry.path(), &dest)?;
        } else {
            fs::rename(entry.path(), &dest)
                .with_context(|| format!("moving {}", entry.path().display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::{Content, Entry};

    fn file(tree: &mut Tree, path: &str) {
        tree.insert(path.as_bytes(), Entry::file(Content::Bytes(b"x".to_vec())))
            .unwrap();
    }

    fn paths(tree: &Tree) -> Vec<String> {
        tree.iter()
            .map(|(p, _)| String::from_utf8_lossy(p).into_owned())
            .collect()
    }

    #[test]
    fn usr_goes_to_the_extension_the_rest_and_the_image_layout_to_the_os() {
        let mut merged = Tree::new();
        file(&mut merged, "etc/fstab");
        file(&mut merged, "usr/lib/systemd/system/a.service");
        file(&mut merged, "usr/share/matrix-appliance/ssh/keys");
        file(&mut merged, &format!("{LAYOUT_DIR}/index.json"));
        file(&mut merged, "usrlocal/x");
        let split = split(&merged).unwrap();
        assert_eq!(
            paths(&split.os),
            [
                "etc",
                "etc/fstab",
                "usr",
                "usr/share",
                "usr/share/matrix-appliance",
                "usr/share/matrix-appliance/images",
                "usr/share/matrix-appliance/images/index.json",
                "usrlocal",
                "usrlocal/x",
            ]
        );
        assert_eq!(
            paths(&split.extension),
            [
                "usr",
                "usr/lib",
                "usr/lib/systemd",
                "usr/lib/systemd/system",
                "usr/lib/systemd/system/a.service",
                "usr/share",
                "usr/share/matrix-appliance",
                "usr/share/matrix-appliance/ssh",
                "usr/share/matrix-appliance/ssh/keys",
            ]
        );
    }

    #[test]
    fn units_in_the_extension_are_found_by_their_file() {
        let mut ext = Tree::new();
        file(&mut ext, "usr/lib/systemd/system/a.timer");
        let names = ["a.timer".to_string(), "ssh.service".to_string()];
        assert_eq!(units_in(&ext, &names), [&names[0]]);
    }

    #[test]
    fn the_release_names_the_os_and_the_version() {
        let target = Target {
            id: "debian".into(),
            version_id: "13".into(),
        };
        let text = release(&target, "20250101.000000");
        assert!(text.contains("ID=debian\nVERSION_ID=13\n"));
        assert!(text.contains("IMAGE_VERSION=20250101.000000\n"));
        assert!(text.contains("SYSEXT_SCOPE=system\n"));
    }
}
