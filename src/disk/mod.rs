//! The `disk` output: a bootable disk image (raw and qcow2) of the
//! appliance. A Debian trixie base (cached by its package set and epoch),
//! the profile's layers and the disk-only layers laid over it, then
//! partitioned by systemd-repart from a trixie tools root:
//!
//! | # | partition | content |
//! |---|---|---|
//! | 1 | ESP (vfat) | systemd-boot and each version's unified kernel image; GRUB's config and each version's kernel and initramfs |
//! | 2 | BIOS boot | GRUB's core image (legacy BIOS) |
//! | 3 | root slot A (erofs) | this version's read-only OS and appliance (`appliance_<version>`) |
//! | 4 | root slot B | empty (`_empty`): the next version's, written by an update |
//! | 5 | var (ext4) | all state; grown to fill the disk on first boot |
//!
//! UEFI firmware starts systemd-boot, BIOS starts GRUB from the MBR; both
//! boot a version's kernel with its root found by PARTUUID (see `boot.rs`).
//! Beside the images, `update/` holds this version as an update (see
//! `update.rs`). Every step runs with SOURCE_DATE_EPOCH and a seed derived
//! from the profile, so the same inputs give byte-identical images.

mod assemble;
mod base;
mod boot;
mod image_store;
mod partition;
pub mod signing;
pub mod spec;
mod tools;
mod update;
pub mod version;

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use sha2::{Digest as _, Sha256};

use crate::cache::{Cache, Key};
use crate::chroot;
pub use crate::manifest::{DiskInfo, PartitionInfo};
use crate::plan::Plan;
use crate::progress::Progress;
use crate::project::Project;
use crate::tree::Tree;

pub const KIND: &str = "disk";

/// The finished images, in the cache (the caller copies them into `--out`).
pub struct DiskImages {
    pub raw: PathBuf,
    pub qcow2: PathBuf,
    pub info: DiskInfo,
    /// The files of `update/`, `SHA256SUMS` last.
    pub update: Vec<update::UpdateFile>,
}

/// The output directory's subdirectory for the update files.
pub const UPDATE_DIR: &str = "update";

/// What a disk build needs before anything else is done: a valid
/// images/disk.toml, root, mmdebstrap and, if one is named, a complete
/// tools root. Fails fast with the fix.
pub fn preflight(project: &Project) -> Result<()> {
    spec::load(project)?;
    chroot::require_root(
        "building a disk image",
        "build only the bundle (--output bundle)",
    )?;
    crate::debian::require_mmdebstrap("building a disk image")?;
    tools::given_root().map(drop)
}

/// Builds the disk image of `plan` from the merged tree of its layers
/// (embedded images included), as image version `version`, its update
/// signed and trusted with `keys`.
#[allow(clippy::too_many_arguments)]
pub fn build(
    project: &Project,
    plan: &Plan,
    merged: &Tree,
    cache: &Cache,
    epoch: u64,
    version: &str,
    keys: &signing::Keys,
    progress: &mut Progress,
) -> Result<DiskImages> {
    let spec = spec::load(project)?;
    chroot::require_root(
        "building a disk image",
        "build only the bundle (--output bundle)",
    )?;
    let tools = tools::ensure(cache, epoch, progress)?;
    let base = base::ensure(&spec, cache, epoch, progress)?;
    let seed = partition::seed(&plan.profile.name);

    // The finished images are cached by everything that decides their bytes, so a
    // warm build with nothing changed only copies them out.
    let mut key = Key::new("builder disk image", epoch);
    key.add(IMAGE_VERSION.as_bytes())
        .add(&builder_digest()?)
        .add(&fs::read(project.images_dir().join("disk.toml"))?)
        .add(base.root.as_os_str().as_encoded_bytes())
        .add(tools.root.as_os_str().as_encoded_bytes())
        .add(seed.as_bytes())
        .add(version.as_bytes())
        .add(&keys.digest()?)
        .add_tree(merged);
    let mut built = false;
    let dir =
        cache.dir_or_build_keeping("disk-image", &key.finish(), KEPT_IMAGES, |dir: &Path| {
            built = true;
            let scratch = cache.temp_dir("disk-")?;
            progress.note("disk: assembling the root file system");
            let embedded: Vec<&crate::images::PlannedImage> =
                plan.images.iter().filter(|i| i.source.embedded()).collect();
            let staged = assemble::stage(
                &spec,
                &base,
                &tools,
                merged,
                &embedded,
                scratch.path(),
                epoch,
                version,
            )?;
            let keyring = signing::keyring(&tools, scratch.path(), keys, epoch)?;
            signing::install_keyring(&scratch.path().join("root"), keyring.as_deref(), epoch)?;
            let uuids = partition::root_uuids(&seed, version);
            progress.note(&format!(
                "disk: version {version}: root file system, unified kernel image, boot files"
            ));
            let boot = boot::make(
                &spec,
                &tools,
                scratch.path(),
                &staged,
                version,
                &uuids,
                epoch,
            )?;
            progress.note("disk: partitioning (systemd-repart) and installing boot loaders");
            let partitions =
                partition::make(&spec, &tools, scratch.path(), &seed, epoch, version, &uuids)?;
            partition::to_qcow2(&tools, scratch.path())?;
            progress.note("disk: the update files (update/)");
            update::make(scratch.path(), version, &uuids.partition, epoch)?;
            if keys.sign.is_some() {
                signing::sign(&tools, scratch.path(), epoch)?;
            }
            signing::forget(&tools, scratch.path(), keyring.is_some(), epoch)?;
            let raw = scratch.path().join("disk.raw");
            let info = DiskInfo {
                image_id: version::IMAGE_ID.to_string(),
                image_version: version.to_string(),
                suite: crate::debian::SUITE.to_string(),
                kernel: staged.kernel,
                kernel_cmdline: boot.cmdline,
                packages: base.packages.clone(),
                partitions,
                size: fs::metadata(&raw)?.len(),
            };
            fs::rename(&raw, dir.join(RAW))?;
            fs::rename(scratch.path().join("disk.qcow2"), dir.join(QCOW2))?;
            fs::rename(scratch.path().join("update"), dir.join(UPDATE_DIR))?;
            fs::write(dir.join(INFO), serde_json::to_vec_pretty(&info)?)?;
            Ok(())
        })?;
    if !built {
        progress.note("disk: cached (the same inputs as before)");
    }
    let info: DiskInfo = serde_json::from_slice(&fs::read(dir.join(INFO))?)
        .with_context(|| format!("reading {}", dir.join(INFO).display()))?;
    Ok(DiskImages {
        raw: dir.join(RAW),
        qcow2: dir.join(QCOW2),
        info,
        update: update::list(&dir.join(UPDATE_DIR))?,
    })
}

/// Finished images kept in the cache (the most recently used): enough for a
/// few profiles or sites built in turn, while a cache that gains a GB with
/// every changed value stays bounded.
const KEPT_IMAGES: usize = 3;
/// Bump when the disk image changes in a way nothing in its key shows.
const IMAGE_VERSION: &str = "3";
const RAW: &str = "disk.raw";
const QCOW2: &str = "disk.qcow2";
const INFO: &str = "info.json";

/// The running builder's own bytes: assembly and partitioning are code, so
/// another builder never reuses a cached image.
fn builder_digest() -> Result<[u8; 32]> {
    let exe = std::env::current_exe().context("finding the builder's own executable")?;
    let mut file = fs::File::open(&exe).with_context(|| format!("reading {}", exe.display()))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).with_context(|| format!("reading {}", exe.display()))?;
    Ok(hasher.finalize().into())
}
