//! The boot side of one image version, staged beside the root tree:
//!
//! - `root.erofs`: the read-only root file system (written into root slot A,
//!   and the update's root image);
//! - `esp/`: systemd-boot with this version's unified kernel image in
//!   `EFI/Linux/` (UEFI), and GRUB's config, environment block, the OS
//!   image's kernel and initramfs and this version's entry in `appliance/`
//!   (legacy BIOS).
//!
//! A version is a boot entry: its unified kernel image and GRUB entry carry
//! its name (`appliance_<version>`) and boot the root of its OS image (by
//! PARTUUID) with its appliance extension (`appliance.version=` on the
//! kernel command line, read by the initramfs). The OS image has a version
//! of its own, which names the root slot, the kernel and the initramfs: the
//! same as the entry's, unless the build kept an earlier release's OS
//! (`base_release.rs`). So an update adds a version's entry beside the
//! running one's, with a new OS or over the one running. Which one boots:
//! systemd-boot takes the newest entry that has not used up its tries
//! (Automatic Boot Assessment, `+N` in the file name); GRUB reads its
//! environment block, where `appliance_try` and `appliance_tries` name a
//! version on trial and `appliance_good` the last one that passed.

use std::fs;
use std::path::Path;

use anyhow::{Context, Result};

use super::assemble::Staged;
use super::spec::DiskSpec;
use super::tools::Tools;
use super::version::PREFIX;

/// Boots a new version gets before it counts as failed.
pub const TRIES: u32 = 3;

/// `appliance_<version>`: the stem of each of a version's files, and its root
/// partition's label.
pub fn stem(version: &str) -> String {
    format!("{PREFIX}_{version}")
}

/// What the other steps need to know of the staged boot files.
pub struct BootFiles {
    pub cmdline: String,
}

/// The kernel command line's parameter naming the version booted (its
/// appliance extension), read by the initramfs and `matrixctl update`.
pub const VERSION_PARAM: &str = "appliance.version";

/// Makes `scratch/root.erofs` (OS version `os_version`), the unified kernel
/// image of version `version` and `scratch/esp/`.
#[allow(clippy::too_many_arguments)]
pub fn make(
    spec: &DiskSpec,
    tools: &Tools,
    scratch: &Path,
    staged: &Staged,
    version: &str,
    os_version: &str,
    uuids: &RootUuids,
    epoch: u64,
) -> Result<BootFiles> {
    let os_stem = stem(os_version);
    let stem = stem(version);
    let cmdline = format!(
        "root=PARTUUID={} rootfstype=erofs {VERSION_PARAM}={version} {}",
        uuids.partition, spec.base.kernel_cmdline
    );
    // The entry's os-release (systemd-boot shows and orders entries by its
    // IMAGE_VERSION): the root's, naming the entry's version.
    let os_release = fs::read_to_string(scratch.join("root/usr/lib/os-release"))
        .context("reading the root's os-release")?;
    let os_release = super::assemble::named_os_release(&os_release, version);
    fs::write(scratch.join("kernel/os-release"), os_release)?;
    tools.mkfs_erofs(
        scratch,
        epoch,
        &uuids.filesystem,
        "root.erofs",
        "root",
        "making the root file system (mkfs.erofs)",
    )?;
    let kernel = |name: &str| format!("/work/kernel/{name}");
    tools.run_in(
        scratch,
        epoch,
        &[
            "/usr/lib/systemd/ukify",
            "build",
            &format!("--linux={}", kernel("vmlinuz")),
            &format!("--initrd={}", kernel("initrd")),
            &format!("--cmdline={cmdline}"),
            "--os-release=@/work/kernel/os-release",
            &format!("--uname={}", staged.kernel),
            &format!("--output={}", kernel("uki.efi")),
        ],
        "making the unified kernel image (ukify)",
    )?;

    let esp = scratch.join("esp");
    for dir in ["EFI/BOOT", "EFI/Linux", "loader", "grub", "appliance"] {
        fs::create_dir_all(esp.join(dir))?;
    }
    fs::copy(tools.systemd_boot(), esp.join("EFI/BOOT/BOOTX64.EFI"))
        .context("copying systemd-boot from the tools root")?;
    // No `default`: systemd-boot starts the newest version with tries left.
    fs::write(esp.join("loader/loader.conf"), "timeout 0\n")?;
    // The image's own version needs no trial: it boots as the good one.
    fs::rename(
        scratch.join("kernel/uki.efi"),
        esp.join(format!("EFI/Linux/{stem}.efi")),
    )?;
    fs::copy(
        &staged.vmlinuz,
        esp.join(format!("appliance/{os_stem}.vmlinuz")),
    )?;
    fs::copy(
        &staged.initrd,
        esp.join(format!("appliance/{os_stem}.initrd")),
    )?;
    fs::write(
        esp.join(format!("appliance/{stem}.grub.cfg")),
        grub_entry(&os_stem, &cmdline),
    )?;
    fs::write(esp.join("grub/grub.cfg"), grub_config())?;
    fs::write(
        esp.join("grub/grubenv"),
        grub_env(&[("appliance_good", version)])?,
    )?;
    super::assemble::clamp_mtimes(&esp, epoch)?;
    Ok(BootFiles { cmdline })
}

/// The root partition's GPT UUID (the kernel finds the root by it:
/// `root=PARTUUID=`) and its file system's UUID, both derived from the
/// image's seed and version.
pub struct RootUuids {
    pub partition: String,
    pub filesystem: String,
}

/// One version's GRUB entry (`appliance/<stem>.grub.cfg`): the kernel and
/// initramfs of its OS image (`os_stem`).
pub fn grub_entry(os_stem: &str, cmdline: &str) -> String {
    format!(
        "linux /appliance/{os_stem}.vmlinuz {cmdline}\ninitrd /appliance/{os_stem}.initrd\nboot\n"
    )
}

/// GRUB's config: boots `appliance_good`, or the version on trial while it
/// has tries left (counting them down in the environment block); a version
/// out of tries becomes `appliance_bad` and the good one boots. GRUB's
/// script has no arithmetic, hence one branch per count.
pub fn grub_config() -> String {
    let mut text = String::from(
        "# Legacy BIOS boot (the counterpart of systemd-boot's boot counting):\n\
         # matrixctl update puts a new version on trial (appliance_try, appliance_tries);\n\
         # the appliance's health gate makes it appliance_good once it passes.\n\
         set timeout=0\n\
         load_env\n\
         set version=\"${appliance_good}\"\n\
         if [ -n \"${appliance_try}\" ]; then\n",
    );
    for n in (1..=TRIES).rev() {
        let word = if n == TRIES { "if" } else { "elif" };
        text += &format!(
            "  {word} [ \"${{appliance_tries}}\" = {n} ]; then\n    set appliance_tries={}\n    set version=\"${{appliance_try}}\"\n",
            n - 1
        );
    }
    text += "  else\n    set appliance_bad=\"${appliance_try}\"\n    set appliance_try=\n  fi\n  \
             save_env appliance_try appliance_tries appliance_bad\nfi\n\
             if [ ! -f \"/appliance/appliance_${version}.grub.cfg\" ]; then\n  \
             set version=\"${appliance_good}\"\nfi\n\
             source \"/appliance/appliance_${version}.grub.cfg\"\n";
    text
}

/// A GRUB environment block: exactly 1024 bytes, `#`-padded, which GRUB
/// rewrites in place (`save_env`).
pub fn grub_env(vars: &[(&str, &str)]) -> Result<Vec<u8>> {
    let mut text = String::from("# GRUB Environment Block\n");
    for (k, v) in vars {
        text += &format!("{k}={v}\n");
    }
    anyhow::ensure!(text.len() <= 1024, "the GRUB environment block is full");
    let mut bytes = text.into_bytes();
    bytes.resize(1024, b'#');
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grub_counts_a_trial_down_then_falls_back() {
        let cfg = grub_config();
        // Every count from TRIES down to 1 boots the trial and lowers the count.
        for n in 1..=TRIES {
            let branch = format!(
                "[ \"${{appliance_tries}}\" = {n} ]; then\n    set appliance_tries={}\n    set version=\"${{appliance_try}}\"",
                n - 1
            );
            assert!(cfg.contains(&branch), "no branch for {n}:\n{cfg}");
        }
        assert!(cfg.contains("set appliance_bad=\"${appliance_try}\""));
        assert!(cfg.contains("save_env appliance_try appliance_tries appliance_bad"));
        assert!(cfg.ends_with("source \"/appliance/appliance_${version}.grub.cfg\"\n"));
    }

    #[test]
    fn the_environment_block_is_1024_bytes() {
        let env = grub_env(&[("appliance_good", "20231114.221320")]).unwrap();
        assert_eq!(env.len(), 1024);
        assert!(env.starts_with(b"# GRUB Environment Block\nappliance_good=20231114.221320\n#"));
        assert!(grub_env(&[("k", &"v".repeat(1100))]).is_err());
    }

    #[test]
    fn an_entry_boots_its_own_kernel_and_root() {
        let e = grub_entry("appliance_2", "root=PARTUUID=abc ro");
        assert_eq!(
            e,
            "linux /appliance/appliance_2.vmlinuz root=PARTUUID=abc ro\n\
             initrd /appliance/appliance_2.initrd\nboot\n"
        );
    }
}
