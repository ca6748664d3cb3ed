//! The disk's two file trees, staged in a scratch directory: `root/` (the
//! base, the layers over it, the embedded images unpacked into the image
//! store, units enabled, the initramfs made, nothing machine-specific left)
//! and `esp/` (boot loaders' files and the kernel).

use std::fs;
use std::path::Path;
use std::process::Command;

use anyhow::{anyhow, bail, Context, Result};

use super::base::Base;
use super::image_store;
use super::spec::DiskSpec;
use super::tools::Tools;
use crate::build::write_tree;
use crate::images::{chroot, PlannedImage};
use crate::tree::Tree;

/// Files made by package scripts that identify one machine, or are secret:
/// each machine makes its own on first boot (in /var).
const MACHINE_FILES: &[&str] = &[
    "etc/ssh/ssh_host_ecdsa_key",
    "etc/ssh/ssh_host_ecdsa_key.pub",
    "etc/ssh/ssh_host_ed25519_key",
    "etc/ssh/ssh_host_ed25519_key.pub",
    "etc/ssh/ssh_host_rsa_key",
    "etc/ssh/ssh_host_rsa_key.pub",
    "var/lib/dbus/machine-id",
];

pub struct Staged {
    pub kernel: String,
    pub cmdline: String,
}

pub fn stage(
    spec: &DiskSpec,
    base: &Base,
    tools: &Tools,
    merged: &Tree,
    embedded: &[&PlannedImage],
    scratch: &Path,
    epoch: u64,
) -> Result<Staged> {
    let root = scratch.join("root");
    let esp = scratch.join("esp");
    copy_tree(&base.root, &root)?;
    write_tree(merged, &root).context("laying the layers over the base")?;
    image_store::make(tools, &root, embedded, scratch, epoch)?;
    configure(spec, &root, epoch)?;
    let kernel = kernel_version(&root)?;
    let cmdline = format!(
        "root=PARTLABEL=root rootfstype=erofs {}",
        spec.base.kernel_cmdline
    );
    boot_files(tools, &root, &esp, &kernel, &cmdline)?;
    forget_machine(&root)?;
    clamp_mtimes(scratch, epoch)?;
    Ok(Staged { kernel, cmdline })
}

fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    let status = Command::new("cp")
        .args(["-a", "--reflink=auto"])
        .arg(from)
        .arg(to)
        .status()
        .context("copying the base (cp)")?;
    if !status.success() {
        bail!("copying {} to {} failed", from.display(), to.display());
    }
    Ok(())
}

/// Enables the image's units and makes the initramfs (with the layers'
/// initramfs-tools settings), inside the root.
fn configure(spec: &DiskSpec, root: &Path, epoch: u64) -> Result<()> {
    let mut script = String::from("set -e\n");
    if !spec.base.enable.is_empty() {
        let units: Vec<String> = spec.base.enable.iter().map(|u| chroot::quote(u)).collect();
        script += &format!("systemctl enable --quiet {}\n", units.join(" "));
    }
    script += "update-initramfs -u -k all\n";
    let epoch = epoch.to_string();
    let cmd = chroot::command(
        root,
        &[],
        &[
            ("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            ("SOURCE_DATE_EPOCH", &epoch),
        ],
        &["sh", "-c", &script],
    )?;
    chroot::run(cmd, "enabling units and making the initramfs")
}

fn kernel_version(root: &Path) -> Result<String> {
    let mut versions: Vec<String> = fs::read_dir(root.join("boot"))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("vmlinuz-"))
                .map(str::to_string)
        })
        .collect();
    versions.sort();
    match versions.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(anyhow!(
            "the base has no kernel in /boot: images/disk.toml's [base] packages must include \
             linux-image-amd64"
        )),
        many => Err(anyhow!(
            "the base has several kernels ({}): keep one linux-image package",
            many.join(", ")
        )),
    }
}

/// systemd-boot (UEFI) and GRUB (BIOS) both boot the kernel and initramfs
/// on the ESP with one command line; /boot in the root is left empty.
fn boot_files(tools: &Tools, root: &Path, esp: &Path, kernel: &str, cmdline: &str) -> Result<()> {
    for dir in ["EFI/BOOT", "loader/entries", "grub"] {
        fs::create_dir_all(esp.join(dir))?;
    }
    fs::copy(tools.systemd_boot(), esp.join("EFI/BOOT/BOOTX64.EFI"))
        .context("copying systemd-boot from the tools root")?;
    let boot = root.join("boot");
    fs::rename(boot.join(format!("vmlinuz-{kernel}")), esp.join("vmlinuz"))?;
    fs::rename(
        boot.join(format!("initrd.img-{kernel}")),
        esp.join("initrd.img"),
    )
    .context("the initramfs was not made (update-initramfs)")?;
    for entry in fs::read_dir(&boot)? {
        let path = entry?.path();
        if path.is_dir() {
            fs::remove_dir_all(&path)?;
        } else {
            fs::remove_file(&path)?;
        }
    }
    fs::write(
        esp.join("loader/loader.conf"),
        "timeout 0\ndefault appliance.conf\n",
    )?;
    fs::write(
        esp.join("loader/entries/appliance.conf"),
        format!(
            "title Matrix appliance\nversion {kernel}\nlinux /vmlinuz\ninitrd /initrd.img\noptions {cmdline}\n"
        ),
    )?;
    fs::write(
        esp.join("grub/grub.cfg"),
        format!("set timeout=0\nlinux /vmlinuz {cmdline}\ninitrd /initrd.img\nboot\n"),
    )?;
    Ok(())
}

/// Removes what would make two machines from this image the same one, and
/// /var's content (the state partition starts empty).
fn forget_machine(root: &Path) -> Result<()> {
    for file in MACHINE_FILES {
        match fs::remove_file(root.join(file)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("removing {file}"))
            }
            _ => {}
        }
    }
    // Empty: the initramfs bind-mounts the machine's own ID over it.
    fs::write(root.join("etc/machine-id"), "")?;
    let resolv = root.join("etc/resolv.conf");
    let _ = fs::remove_file(&resolv);
    std::os::unix::fs::symlink("../run/systemd/resolve/stub-resolv.conf", &resolv)?;
    let var = root.join("var");
    for entry in fs::read_dir(&var)? {
        let path = entry?.path();
        if path.is_dir() && !path.is_symlink() {
            fs::remove_dir_all(&path)?;
        } else {
            fs::remove_file(&path)?;
        }
    }
    Ok(())
}

/// Every mtime at the epoch: file systems record them.
fn clamp_mtimes(scratch: &Path, epoch: u64) -> Result<()> {
    let status = Command::new("find")
        .arg(scratch.join("root"))
        .arg(scratch.join("esp"))
        .args([
            "-exec",
            "touch",
            "-h",
            "-d",
            &format!("@{epoch}"),
            "{}",
            "+",
        ])
        .status()
        .context("setting mtimes (find, touch)")?;
    if !status.success() {
        bail!("setting every mtime to the epoch failed");
    }
    Ok(())
}
