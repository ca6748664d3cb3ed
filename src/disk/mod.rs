//! The `disk` output: a bootable disk image (raw and qcow2) of the
//! appliance. A Debian trixie base (cached by its package set and epoch),
//! the profile's layers and the disk-only layers laid over it, then
//! partitioned by systemd-repart from a trixie tools root:
//!
//! | # | partition | content |
//! |---|---|---|
//! | 1 | ESP (vfat) | systemd-boot and each version's unified kernel image; GRUB's config, each version's entry and each OS image's kernel and initramfs |
//! | 2 | BIOS boot | GRUB's core image (legacy BIOS) |
//! | 3 | root slot A (erofs) | this version's read-only OS image (`appliance_<os version>`) |
//! | 4 | root slot B | empty (`_empty`): the next OS image's, written by an update |
//! | 5 | var (ext4) | all state; grown to fill the disk on first boot; as built, only the appliance extension |
//!
//! UEFI firmware starts systemd-boot, BIOS starts GRUB from the MBR; both
//! boot a version's kernel with its root found by PARTUUID (see `boot.rs`).
//! The OS image's version is the version's, or with `--base-release` an
//! earlier release's whose OS image comes out the same (`base_release.rs`).
//! The layers' `/usr` is not in the root but in the appliance extension on
//! the state partition, laid over `/usr` by the initramfs (`extension.rs`).
//! Beside the images, `update/` holds this version as an update (see
//! `update.rs`). Every step runs with SOURCE_DATE_EPOCH and a seed derived
//! from the profile, so the same inputs give byte-identical images.

mod assemble;
mod base;
pub mod base_release;
mod boot;
mod cached;
pub mod extension;
mod image_store;
mod partition;
mod resume_hash;
pub mod signing;
pub mod spec;
mod tools;
mod update;
mod var;
pub mod version;

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::cache::{Cache, Key};
use crate::chroot;
pub use crate::manifest::{DiskInfo, PartitionInfo};
use crate::plan::Plan;
use crate::progress::Progress;
use crate::project::Project;
use crate::stamp::read_record;
use crate::tree::Tree;
pub use cached::CachedFile;
use cached::{hash_file, intact_files, record_files, remove_entry, update_digests, FILES};

pub const KIND: &str = "disk";

/// The finished images, in the cache (the caller links or copies them into
/// `--out`), each with its SHA-256.
pub struct DiskImages {
    pub raw: CachedFile,
    pub qcow2: CachedFile,
    pub info: DiskInfo,
    /// The files of `update/`, `SHA256SUMS` last.
    pub update: Vec<CachedFile>,
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
/// signed and trusted with `keys`; over the OS image of `base` when this
/// build's comes out the same (`base_release.rs`).
///
/// Two cached steps: the OS image (base, image store, `/etc`, boot files:
/// the disk with an empty state partition, and its update files), which site
/// values do not change, and over it this build's appliance extension (the
/// layers' `/usr`), written onto the state partition of a copy of that disk.
#[allow(clippy::too_many_arguments)]
pub fn build(
    project: &Project,
    plan: &Plan,
    merged: &Tree,
    cache: &Cache,
    epoch: u64,
    version: &str,
    base_release: Option<&base_release::BaseRelease>,
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
    let builder = crate::cache::builder_digest()?;
    let split = extension::split(merged)?;
    let ext_units = extension::units_in(&split.extension, &spec.base.enable);
    let os_units: Vec<&String> = (spec.base.enable.iter())
        .filter(|u| !ext_units.contains(u))
        .collect();
    let inputs = OsInputs {
        project,
        plan,
        spec: &spec,
        tree: &split.os,
        units: &os_units,
        base: &base,
        tools: &tools,
        seed: &seed,
        builder: &builder,
    };
    let os = os_over_release(&inputs, cache, epoch, version, base_release, progress)?;

    // The finished images are cached by everything that decides their bytes, so a
    // warm build with nothing changed only copies them out.
    let mut key = Key::new("builder disk image", epoch);
    key.add(IMAGE_VERSION.as_bytes())
        .add(&builder)
        .add(os.as_os_str().as_encoded_bytes())
        .add(tools.root.as_os_str().as_encoded_bytes())
        .add(seed.as_bytes())
        .add(version.as_bytes())
        .add(&keys.digest()?)
        .add(unit_list(&ext_units).as_bytes())
        .add_tree(&split.extension);
    let key = key.finish();
    // A cached entry whose files changed since (written through a hard link
    // in an output directory) is made again; its update files are the OS
    // image's too, so that goes with it.
    if let Some(dir) = cache.dir_if_cached("disk-image", &key) {
        if let Err(changed) = intact_files(&dir) {
            progress.note(&format!(
                "disk: {} changed since the cached image was made (booted from --out?): making \
                 it again",
                changed.join(", ")
            ));
            remove_entry(&dir)?;
            if changed
                .iter()
                .any(|n| n.starts_with(UPDATE_DIR) || n == FILES)
            {
                remove_entry(&os)?;
            }
            return build(
                project,
                plan,
                merged,
                cache,
                epoch,
                version,
                base_release,
                keys,
                progress,
            );
        }
    }
    let mut built = false;
    let dir = cache.dir_or_build_keeping("disk-image", &key, KEPT_IMAGES, |dir: &Path| {
        built = true;
        let scratch = cache.temp_dir("disk-")?;
        progress.note(&format!(
            "disk: version {version}: the appliance extension and the state partition"
        ));
        let mut info: DiskInfo = serde_json::from_slice(&fs::read(os.join(INFO))?)
            .with_context(|| format!("reading {}", os.join(INFO).display()))?;
        let keyring = signing::keyring(&tools, scratch.path(), keys, epoch)?;
        extension::make(
            &tools,
            scratch.path(),
            &split.extension,
            &ext_units,
            &extension::Target::of_root(&base.root)?,
            version,
            &partition::uuid_from(&format!("{seed} extension {version}")),
            epoch,
            |root| signing::install_keyring(root, keyring.as_deref(), epoch),
        )?;
        let extension_image = scratch.path().join("extension.raw");
        let var = (info.partitions.iter())
            .find(|p| p.label == "var")
            .context("the OS image's disk has no state partition")?
            .clone();
        var::make_image(
            &tools,
            scratch.path(),
            &extension_image,
            version,
            var.size,
            &seed,
            epoch,
        )?;
        let raw = dir.join(RAW);
        copy_sparse(&os.join(OS_RAW), &raw)?;
        var::write_into(&raw, var.offset, var.size, &scratch.path().join("var.img"))?;
        partition::to_qcow2(&tools, dir)?;
        update::make(scratch.path(), &os, &extension_image, version, epoch)?;
        if keys.sign.is_some() {
            signing::sign(&tools, scratch.path(), epoch)?;
        }
        signing::forget(&tools, scratch.path(), keyring.is_some(), epoch)?;
        fs::rename(scratch.path().join("update"), dir.join(UPDATE_DIR))?;
        info.size = fs::metadata(&raw)?.len();
        fs::write(dir.join(INFO), serde_json::to_vec_pretty(&info)?)?;
        let midstate: resume_hash::Midstate =
            read_record(&os.join(RAW_MIDSTATE)).context("the OS image's hash state is missing")?;
        // The two hashes on two cores.
        let (raw_digest, qcow2_digest) = std::thread::scope(|scope| {
            let qcow2 = scope.spawn(|| hash_file(&dir.join(QCOW2)));
            let raw_digest = resume_hash::finish(&midstate, &raw);
            (
                raw_digest,
                qcow2.join().expect("hashing the qcow2 panicked"),
            )
        });
        let mut files = vec![
            (RAW.to_string(), raw_digest?),
            (QCOW2.to_string(), qcow2_digest?),
        ];
        let sums = fs::read_to_string(dir.join(UPDATE_DIR).join(update::SUMS))?;
        files.extend(update_digests(dir, &sums)?);
        record_files(dir, files)?;
        Ok(())
    })?;
    if !built {
        progress.note("disk: cached (the same inputs as before)");
    }
    let info: DiskInfo = serde_json::from_slice(&fs::read(dir.join(INFO))?)
        .with_context(|| format!("reading {}", dir.join(INFO).display()))?;
    let files = intact_files(&dir)
        .map_err(|changed| anyhow::anyhow!("{} changed as it was made", changed.join(", ")))?;
    let take = |name: &str| {
        (files.iter().find(|f| f.name == name).cloned())
            .with_context(|| format!("{name} is not in the cached image's files"))
    };
    let mut update: Vec<CachedFile> = (files.iter())
        .filter(|f| f.name.starts_with(&format!("{UPDATE_DIR}/")))
        .cloned()
        .collect();
    // SHA256SUMS last (then its signature), as update::list orders them.
    update.sort_by_key(|f| {
        let name = &f.name[UPDATE_DIR.len() + 1..];
        (name.starts_with(update::SUMS), name.to_string())
    });
    Ok(DiskImages {
        raw: take(RAW)?,
        qcow2: take(QCOW2)?,
        info,
        update,
    })
}

/// What decides the OS image's bytes (besides the cache, epoch and version).
struct OsInputs<'a> {
    project: &'a Project,
    plan: &'a Plan,
    spec: &'a spec::DiskSpec,
    /// The layers' files outside the extension (`/etc`, the images' layout).
    tree: &'a Tree,
    /// Units enabled in the OS image (the extension enables its own).
    units: &'a [&'a String],
    base: &'a base::Base,
    tools: &'a tools::Tools,
    seed: &'a str,
    builder: &'a [u8; 32],
}

/// The OS image of version `version`: with the base release's OS version
/// when it comes out byte for byte as that release's root (then the update
/// carries only the boot entry and the appliance extension), else its own.
fn os_over_release(
    inputs: &OsInputs,
    cache: &Cache,
    epoch: u64,
    version: &str,
    base_release: Option<&base_release::BaseRelease>,
    progress: &mut Progress,
) -> Result<PathBuf> {
    let Some(release) = base_release.filter(|r| r.os_version != version) else {
        return os_image(inputs, cache, epoch, version, version, progress);
    };
    let os = os_image(inputs, cache, epoch, &release.os_version, version, progress)?;
    let sums = fs::read_to_string(os.join(update::OS_SUMS))?;
    let same = (sums.lines()).any(|l| {
        l.split_once("  ")
            .is_some_and(|(sum, name)| (name, sum) == (&release.root.0[..], &release.root.1[..]))
    });
    if same {
        progress.note(&format!(
            "disk: the OS image is {}'s (OS version {}): the update carries the boot entry and \
             the appliance extension only",
            release.dir.display(),
            release.os_version
        ));
        return Ok(os);
    }
    progress.note(&format!(
        "disk: the OS image differs from {}'s (OS version {}): version {version} brings its own",
        release.dir.display(),
        release.os_version
    ));
    remove_entry(&os)?;
    os_image(inputs, cache, epoch, version, version, progress)
}

/// The OS image's cached directory: `os.raw` (the whole disk, its state
/// partition empty; root and kernel of OS version `os_version`, the boot
/// entry of `version`), `update/` with the OS's update files and their sums,
/// and `info.json`.
fn os_image(
    inputs: &OsInputs,
    cache: &Cache,
    epoch: u64,
    os_version: &str,
    version: &str,
    progress: &mut Progress,
) -> Result<PathBuf> {
    let OsInputs {
        project,
        plan,
        spec,
        tree,
        units,
        base,
        tools,
        seed,
        builder,
    } = inputs;
    let mut key = Key::new("builder disk OS image", epoch);
    key.add(IMAGE_VERSION.as_bytes())
        .add(*builder)
        .add(&fs::read(project.images_dir().join("disk.toml"))?)
        .add(base.root.as_os_str().as_encoded_bytes())
        .add(tools.root.as_os_str().as_encoded_bytes())
        .add(seed.as_bytes())
        .add(os_version.as_bytes())
        .add(version.as_bytes())
        .add(unit_list(units).as_bytes())
        .add_tree(tree);
    let mut built = false;
    let dir = cache.dir_or_build_keeping("disk-os", &key.finish(), KEPT_OS, |dir: &Path| {
        built = true;
        let scratch = cache.temp_dir("disk-os-")?;
        progress.note("disk: assembling the OS image's root file system");
        let embedded: Vec<&crate::images::PlannedImage> =
            plan.images.iter().filter(|i| i.source.embedded()).collect();
        let staged = assemble::stage(
            base,
            tools,
            tree,
            units,
            &embedded,
            scratch.path(),
            epoch,
            os_version,
        )?;
        let uuids = partition::root_uuids(seed, os_version);
        progress.note(&format!(
            "disk: OS version {os_version}: root file system; version {version}: unified kernel \
             image, boot files"
        ));
        let boot = boot::make(
            spec,
            tools,
            scratch.path(),
            &staged,
            version,
            os_version,
            &uuids,
            epoch,
        )?;
        progress.note("disk: partitioning (systemd-repart) and installing boot loaders");
        let partitions =
            partition::make(spec, tools, scratch.path(), seed, epoch, os_version, &uuids)?;
        progress.note("disk: the OS image's update files (update/)");
        update::make_os(scratch.path(), os_version, version, &uuids.partition, epoch)?;
        let raw = scratch.path().join("disk.raw");
        // The state of SHA-256 up to the state partition: each set of site
        // values hashes only that partition and the rest of the disk.
        let var = (partitions.iter())
            .find(|p| p.label == "var")
            .context("the disk has no state partition")?;
        let midstate = resume_hash::midstate(&raw, var.offset)?;
        fs::write(dir.join(RAW_MIDSTATE), serde_json::to_vec(&midstate)?)?;
        let info = DiskInfo {
            image_id: version::IMAGE_ID.to_string(),
            image_version: version.to_string(),
            os_version: os_version.to_string(),
            suite: crate::debian::SUITE.to_string(),
            kernel: staged.kernel,
            kernel_cmdline: boot.cmdline,
            packages: base.packages.clone(),
            partitions,
            size: fs::metadata(&raw)?.len(),
        };
        fs::rename(&raw, dir.join(OS_RAW))?;
        fs::rename(scratch.path().join("update"), dir.join(UPDATE_DIR))?;
        fs::rename(
            scratch.path().join(update::OS_SUMS),
            dir.join(update::OS_SUMS),
        )?;
        fs::write(dir.join(INFO), serde_json::to_vec_pretty(&info)?)?;
        let sums = fs::read_to_string(dir.join(update::OS_SUMS))?;
        record_files(dir, update_digests(dir, &sums)?)?;
        Ok(())
    })?;
    if !built {
        // Its update files reach the output directory as hard links.
        if let Err(changed) = intact_files(&dir) {
            progress.note(&format!(
                "disk: {} changed since the cached OS image was made: making it again",
                changed.join(", ")
            ));
            remove_entry(&dir)?;
            return os_image(inputs, cache, epoch, os_version, version, progress);
        }
        progress.note("disk: the OS image is cached (only the appliance extension is new)");
    }
    Ok(dir)
}

/// Unit names as one key field.
fn unit_list(units: &[&String]) -> String {
    units
        .iter()
        .map(|u| u.as_str())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Copies a (sparse) disk image; the kernel copies the data extents.
fn copy_sparse(from: &Path, to: &Path) -> Result<()> {
    exec::run(
        exec::command("cp")
            .args(["--sparse=always"])
            .arg(from)
            .arg(to),
        &format!("copying {} (cp)", from.display()),
    )
}

/// Finished images kept in the cache (the most recently used): enough for a
/// few profiles or sites built in turn, while a cache that gains a GB with
/// every changed value stays bounded.
const KEPT_IMAGES: usize = 3;
/// OS images kept (each a disk and its update files, ~2 GB): the site values
/// change only the extension, so few are needed.
const KEPT_OS: usize = 2;
const OS_RAW: &str = "os.raw";
const RAW_MIDSTATE: &str = "raw-midstate.json";

/// Bump when the disk image changes in a way nothing in its key shows.
const IMAGE_VERSION: &str = "5";
const RAW: &str = "disk.raw";
const QCOW2: &str = "disk.qcow2";
const INFO: &str = "info.json";
