//! The disk's root file tree, staged in a scratch directory: `root/` (the
//! base, the layers over it, the embedded images unpacked into the image
//! store, units enabled, the initramfs made, nothing machine-specific left)
//! and the kernel and initramfs beside it for the boot files (`boot.rs`).

use std::fs;
use std::path::Path;

use anyhow::{anyhow, Context, Result};

use super::base::Base;
use super::image_store;
use super::tools::Tools;
use crate::chroot;
use crate::images::PlannedImage;
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
    /// The kernel's version (`uname -r`).
    pub kernel: String,
    /// The kernel and initramfs, taken out of the root's /boot.
    pub vmlinuz: std::path::PathBuf,
    pub initrd: std::path::PathBuf,
}

/// Stages `scratch/root`: the base, the layers' files outside the extension
/// (`tree`), the image store, `units`
/// enabled, the initramfs made, os-release naming this image's version;
/// the kernel and initramfs moved to `scratch/kernel/`.
#[allow(clippy::too_many_arguments)]
pub fn stage(
    base: &Base,
    tools: &Tools,
    tree: &Tree,
    units: &[&String],
    embedded: &[&PlannedImage],
    scratch: &Path,
    epoch: u64,
    version: &str,
) -> Result<Staged> {
    let root = scratch.join("root");
    copy_tree(&base.root, &root)?;
    tree.write_to(&root)
        .context("laying the layers' OS files over the base")?;
    image_store::make(tools, &root, embedded, scratch, epoch)?;
    configure(&root, units, epoch)?;
    name_the_image(&root, version)?;
    let kernel = kernel_version(&root)?;
    let staged = take_kernel(&root, &scratch.join("kernel"), kernel)?;
    // The ESP's mount point (boot counting, updates); empty in the image.
    fs::create_dir_all(root.join("efi"))?;
    forget_machine(&root)?;
    clamp_mtimes(&root, epoch)?;
    Ok(staged)
}

/// os-release(5) gets `IMAGE_ID` and `IMAGE_VERSION`: systemd-sysupdate
/// compares them with the updates it finds, `matrixctl` shows them.
fn name_the_image(root: &Path, version: &str) -> Result<()> {
    let path = root.join("usr/lib/os-release");
    let text = fs::read_to_string(&path).context("the base has no /usr/lib/os-release")?;
    fs::write(&path, named_os_release(&text, version))?;
    Ok(())
}

/// os-release text naming the image and `version` (its last two lines).
pub fn named_os_release(text: &str, version: &str) -> String {
    let mut lines: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with("IMAGE_ID=") && !l.starts_with("IMAGE_VERSION="))
        .collect();
    let id = format!("IMAGE_ID={}", super::version::IMAGE_ID);
    let v = format!("IMAGE_VERSION={version}");
    lines.push(&id);
    lines.push(&v);
    lines.join("\n") + "\n"
}

fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    exec::run(
        exec::command("cp")
            .args(["-a", "--reflink=auto"])
            .arg(from)
            .arg(to),
        &format!("copying {} to {} (cp)", from.display(), to.display()),
    )
}

/// Enables `units` and makes the initramfs (with the layers'
/// initramfs-tools settings), inside the root.
fn configure(root: &Path, units: &[&String], epoch: u64) -> Result<()> {
    let mut script = String::from("set -e\n");
    if !units.is_empty() {
        let units: Vec<String> = units.iter().map(exec::shell_quote).collect();
        script += &format!("systemctl enable --quiet {}\n", units.join(" "));
    }
    script += "update-initramfs -u -k all\n";
    let mut cmd = chroot::sandbox(root)
        .env("SOURCE_DATE_EPOCH", &epoch.to_string())
        .command(&["sh", "-c", &script])?;
    exec::run(&mut cmd, "enabling units and making the initramfs")
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

/// Moves the kernel and initramfs out of /boot (left empty: the boot
/// loaders read them from the ESP).
fn take_kernel(root: &Path, to: &Path, kernel: String) -> Result<Staged> {
    fs::create_dir_all(to)?;
    let boot = root.join("boot");
    let (vmlinuz, initrd) = (to.join("vmlinuz"), to.join("initrd"));
    fs::rename(boot.join(format!("vmlinuz-{kernel}")), &vmlinuz)?;
    fs::rename(boot.join(format!("initrd.img-{kernel}")), &initrd)
        .context("the initramfs was not made (update-initramfs)")?;
    for entry in fs::read_dir(&boot)? {
        let path = entry?.path();
        if path.is_dir() {
            fs::remove_dir_all(&path)?;
        } else {
            fs::remove_file(&path)?;
        }
    }
    Ok(Staged {
        kernel,
        vmlinuz,
        initrd,
    })
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

/// Every mtime under `dir` at the epoch: file systems record them.
pub fn clamp_mtimes(dir: &Path, epoch: u64) -> Result<()> {
    exec::run(
        exec::command("find").arg(dir).args([
            "-exec",
            "touch",
            "-h",
            "-d",
            &format!("@{epoch}"),
            "{}",
            "+",
        ]),
        "setting every mtime to the epoch (find, touch)",
    )
}
