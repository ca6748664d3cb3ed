//! The update directory of one image version (`out/update/`), as
//! systemd-sysupdate reads it from any static HTTP(S) server or, for
//! `matrixctl update apply --from`, a local directory:
//!
//! | file | installed as |
//! |---|---|
//! | `appliance_<o>_<uuid>.root.gz` | the empty root slot (label `appliance_<o>`, PARTUUID `<uuid>`) |
//! | `appliance_<o>.vmlinuz`, `.initrd` | `appliance/` on the ESP (BIOS; the UKI holds its own) |
//! | `appliance_<v>.efi` | `EFI/Linux/appliance_<v>+3-0.efi` on the ESP (UEFI) |
//! | `appliance_<v>.grub.cfg` | `appliance/` on the ESP (BIOS) |
//! | `appliance_<v>.sysext.raw` | `/var/lib/appliance/extensions/matrix-appliance_<v>.raw`, the appliance extension (`extension.rs`) |
//! | `SHA256SUMS` | the list systemd-sysupdate checks every file against |
//!
//! `<o>` is the OS image's version, `<v>` the version's (see `boot.rs`): the
//! first three files are the OS image's, which a machine already running
//! that OS does not download again.
//!
//! The root is gzip-compressed (systemd-sysupdate 257 reads xz, gzip and
//! bzip2, not zstd). Not xz: the erofs root is lz4-compressed already, so xz
//! saves only ~8% of the bytes, while a small VPS inflates gzip several times
//! faster than it decodes xz (the download streams through the decoder) and
//! the build compresses on all cores with the bundle's deterministic writer.
//! The kernel, initramfs and unified image are compressed already and stay
//! as they are.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use sha2::{Digest as _, Sha256};

use super::boot::stem;
use crate::pgzip::ParallelGzWriter;

/// A file of the update directory.
pub struct UpdateFile {
    pub name: String,
    pub path: PathBuf,
}

/// Writes the OS image's update files into `scratch/update/` from the staged
/// root image and ESP, and their lines of `SHA256SUMS` into
/// `scratch/update.sums` (hashed once, with the OS image cached).
pub fn make_os(
    scratch: &Path,
    os_version: &str,
    version: &str,
    root_uuid: &str,
    epoch: u64,
) -> Result<()> {
    let os = stem(os_version);
    let stem = stem(version);
    let dir = scratch.join("update");
    fs::create_dir_all(&dir)?;
    compress_root(
        &scratch.join("root.erofs"),
        &dir.join(format!("{os}_{root_uuid}.root.gz")),
    )?;
    let esp = scratch.join("esp");
    for (from, name) in [
        (format!("EFI/Linux/{stem}.efi"), format!("{stem}.efi")),
        (format!("appliance/{os}.vmlinuz"), format!("{os}.vmlinuz")),
        (format!("appliance/{os}.initrd"), format!("{os}.initrd")),
        (
            format!("appliance/{stem}.grub.cfg"),
            format!("{stem}.grub.cfg"),
        ),
    ] {
        fs::copy(esp.join(&from), dir.join(&name)).with_context(|| format!("copying {from}"))?;
    }
    super::assemble::clamp_mtimes(&dir, epoch)?;
    fs::write(scratch.join(OS_SUMS), sums(&list(&dir)?)?)?;
    Ok(())
}

/// The OS image's lines of `SHA256SUMS`, beside its `update/`.
pub const OS_SUMS: &str = "update.sums";

/// Makes `dir/update/`: the OS image's files of `os` (hard links into the
/// cache), the extension image of this version, and `SHA256SUMS` of them all.
pub fn make(dir: &Path, os: &Path, extension: &Path, version: &str, epoch: u64) -> Result<()> {
    let update = dir.join("update");
    fs::create_dir_all(&update)?;
    for file in list(&os.join("update"))? {
        let to = update.join(&file.name);
        fs::hard_link(&file.path, &to)
            .or_else(|_| fs::copy(&file.path, &to).map(drop))
            .with_context(|| format!("taking {} from the OS image", file.name))?;
    }
    let name = extension_file(version);
    let to = update.join(&name);
    fs::copy(extension, &to).context("copying the extension into update/")?;
    super::assemble::clamp_mtimes(&to, epoch)?;
    let os_sums = fs::read_to_string(os.join(OS_SUMS)).context("reading the OS image's sums")?;
    let ours = sums(&[UpdateFile { name, path: to }])?;
    let mut lines: Vec<&str> = os_sums.lines().chain(ours.lines()).collect();
    lines.sort_by_key(|l| l.split_once("  ").map(|(_, n)| n.to_string()));
    fs::write(update.join(SUMS), lines.join("\n") + "\n")?;
    Ok(())
}

/// The update file of a version's appliance extension.
pub fn extension_file(version: &str) -> String {
    format!("{}.sysext.raw", stem(version))
}

pub const SUMS: &str = "SHA256SUMS";

/// gzip of the root image, the same bytes on any number of cores.
fn compress_root(image: &Path, to: &Path) -> Result<()> {
    let mut input =
        fs::File::open(image).with_context(|| format!("reading {}", image.display()))?;
    let out = fs::File::create(to).with_context(|| format!("writing {}", to.display()))?;
    let mut gz = ParallelGzWriter::new(std::io::BufWriter::new(out))
        .context("compressing the root image for the update")?;
    std::io::copy(&mut input, &mut gz).context("compressing the root image for the update")?;
    gz.finish()
        .and_then(|w| w.into_inner().map_err(|e| e.into_error()))
        .and_then(|f| f.sync_all())
        .context("compressing the root image for the update")?;
    Ok(())
}

/// The files of an update directory, `SHA256SUMS` last.
pub fn list(dir: &Path) -> Result<Vec<UpdateFile>> {
    let mut files: Vec<UpdateFile> = fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .map(|e| {
            let e = e?;
            Ok(UpdateFile {
                name: e.file_name().to_string_lossy().into_owned(),
                path: e.path(),
            })
        })
        .collect::<Result<_>>()?;
    files.sort_by(|a, b| (a.name == SUMS, &a.name).cmp(&(b.name == SUMS, &b.name)));
    Ok(files)
}

/// `SHA256SUMS` in sha256sum(1)'s format, sorted by name.
fn sums(files: &[UpdateFile]) -> Result<String> {
    let mut text = String::new();
    for file in files.iter().filter(|f| f.name != SUMS) {
        let mut hasher = Sha256::new();
        let mut reader =
            fs::File::open(&file.path).with_context(|| format!("reading {}", file.name))?;
        std::io::copy(&mut reader, &mut hasher)?;
        text += &format!("{}  {}\n", hex::encode(hasher.finalize()), file.name);
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_list_every_file_but_themselves_in_order() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("b.efi"), b"b").unwrap();
        fs::write(dir.path().join("a.root.gz"), b"").unwrap();
        fs::write(dir.path().join(SUMS), b"old").unwrap();
        let files = list(dir.path()).unwrap();
        let names: Vec<&str> = files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["a.root.gz", "b.efi", SUMS]);
        assert_eq!(
            sums(&files).unwrap(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855  a.root.gz\n\
             3e23e8160039594a33894f6564e1b1348bbd7a0088d42c4acb73eeaed59c009d  b.efi\n"
        );
    }
}
