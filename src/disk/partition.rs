//! Partitioning: systemd-repart (offline, from the tools root) writes the
//! GPT image from the staged trees, GRUB's BIOS installer puts its boot
//! code in the MBR and its core image in the BIOS boot partition, and
//! qemu-img converts the raw image to qcow2.

use std::fs;
use std::path::Path;

use anyhow::{Context, Result};
use sha2::{Digest as _, Sha256};

use super::boot::{stem, RootUuids};
use super::spec::DiskSpec;
use super::tools::Tools;
use super::PartitionInfo;

/// GPT type of a BIOS boot partition (GRUB's core image lives there).
const BIOS_BOOT: &str = "21686148-6449-6e6f-744e-656564454649";

/// GRUB modules in the core image: enough to find the ESP (partition 1) on
/// a GPT disk and boot Linux from it.
const GRUB_MODULES: &[&str] = &[
    "biosdisk",
    "part_gpt",
    "fat",
    "normal",
    "linux",
    "configfile",
    "loadenv",
    "search",
    "echo",
    "test",
];

/// repart's seed: partition and file system UUIDs derive from it. Fixed
/// per profile, so rebuilding gives the same bytes and a newer image's
/// partitions have the same identities as the one it replaces.
pub fn seed(profile: &str) -> String {
    uuid_from(&format!("matrix-appliance disk image {profile}"))
}

/// The root partition's and file system's UUIDs of one version: unique to
/// it (the kernel finds the root by the partition's), and the same on
/// every build of it.
pub fn root_uuids(seed: &str, version: &str) -> RootUuids {
    RootUuids {
        partition: uuid_from(&format!("{seed} root partition {version}")),
        filesystem: uuid_from(&format!("{seed} root file system {version}")),
    }
}

/// A version 4 UUID made from the hash of `text`.
pub(super) fn uuid_from(text: &str) -> String {
    let h = Sha256::digest(text.as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&h[..16]);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// The repart definitions, in partition order: root slot A holds this
/// version's root image, slot B is empty (`_empty`, as systemd-sysupdate
/// marks a free slot) until an update writes the next version there.
fn definitions(
    spec: &DiskSpec,
    version: &str,
    root: &RootUuids,
) -> Result<Vec<(String, String, PartitionInfo)>> {
    let label = stem(version);
    let sizes = &spec.partitions;
    let fixed = |bytes: u64| format!("SizeMinBytes={bytes}\nSizeMaxBytes={bytes}\n");
    // Offsets and UUIDs are read back from the written table (`layout`).
    let part = |label: &str, fs: Option<&str>, size: u64| PartitionInfo {
        label: label.to_string(),
        filesystem: fs.map(str::to_string),
        offset: 0,
        size,
        uuid: String::new(),
    };
    Ok(vec![
        (
            "10-esp.conf".into(),
            format!(
                "[Partition]\nType=esp\nLabel=esp\nFormat=vfat\nCopyFiles=/esp:/\n{}",
                fixed(sizes.esp_bytes()?)
            ),
            part("esp", Some("vfat"), sizes.esp_bytes()?),
        ),
        (
            "20-bios.conf".into(),
            format!(
                "[Partition]\nType={BIOS_BOOT}\nLabel=bios\n{}",
                fixed(1 << 20)
            ),
            part("bios", None, 1 << 20),
        ),
        (
            "30-root-a.conf".into(),
            format!(
                "[Partition]\nType=root\nLabel={label}\nUUID={}\nCopyBlocks=/work/root.erofs\n{}",
                root.partition,
                fixed(sizes.root_bytes()?)
            ),
            part(&label, Some("erofs"), sizes.root_bytes()?),
        ),
        (
            "31-root-b.conf".into(),
            format!(
                "[Partition]\nType=root\nLabel=_empty\n{}",
                fixed(sizes.root_bytes()?)
            ),
            part("_empty", None, sizes.root_bytes()?),
        ),
        // Left empty here: the state partition holds the appliance extension,
        // written in place by `var::write_into` for each set of site values.
        (
            "40-var.conf".into(),
            format!(
                "[Partition]\nType=linux-generic\nLabel=var\n{}",
                fixed(sizes.var_bytes()?)
            ),
            part("var", Some("ext4"), sizes.var_bytes()?),
        ),
    ])
}

/// Writes `scratch/disk.raw` from `scratch/root.erofs` and `scratch/esp`.
pub fn make(
    spec: &DiskSpec,
    tools: &Tools,
    scratch: &Path,
    seed: &str,
    epoch: u64,
    version: &str,
    root: &RootUuids,
) -> Result<Vec<PartitionInfo>> {
    let defs = scratch.join("repart.d");
    fs::create_dir_all(&defs)?;
    let mut infos = Vec::new();
    for (name, text, info) in definitions(spec, version, root)? {
        fs::write(defs.join(name), text)?;
        infos.push(info);
    }
    let seed_arg = format!("--seed={seed}");
    let mut repart = tools
        .sandbox(scratch)
        .env("SOURCE_DATE_EPOCH", &epoch.to_string())
        .env("SYSTEMD_LOG_LEVEL", "notice")
        .command(&[
            "systemd-repart",
            "--empty=create",
            "--size=auto",
            "--dry-run=no",
            "--offline=yes",
            &seed_arg,
            "--definitions=/work/repart.d",
            "--copy-source=/work",
            "/work/disk.raw",
        ])?;
    exec::run(&mut repart, "systemd-repart (writing the disk image)")?;
    install_grub(tools, scratch)?;
    layout(tools, scratch, &mut infos)?;
    Ok(infos)
}

/// Fills in each partition's offset, size and UUID from the image's GPT
/// (`sfdisk --json`).
fn layout(tools: &Tools, scratch: &Path, infos: &mut [PartitionInfo]) -> Result<()> {
    let mut cmd = tools
        .sandbox(scratch)
        .command(&["sfdisk", "--json", "/work/disk.raw"])?;
    let out = exec::output(&mut cmd, "reading the partition table (sfdisk)")?;
    let table: serde_json::Value =
        serde_json::from_slice(&out).context("sfdisk --json printed no JSON")?;
    let table = &table["partitiontable"];
    let sector = table["sectorsize"].as_u64().unwrap_or(512);
    let parts = table["partitions"].as_array().cloned().unwrap_or_default();
    for info in infos.iter_mut() {
        let part = parts
            .iter()
            .find(|p| p["name"] == serde_json::json!(info.label))
            .with_context(|| format!("partition {} is not in the written table", info.label))?;
        info.offset = part["start"].as_u64().unwrap_or(0) * sector;
        info.size = part["size"].as_u64().unwrap_or(0) * sector;
        info.uuid = part["uuid"].as_str().unwrap_or_default().to_lowercase();
    }
    Ok(())
}

/// GRUB for legacy BIOS: a core image that reads grub/grub.cfg from the
/// ESP, embedded in the BIOS boot partition, and boot code in the MBR.
fn install_grub(tools: &Tools, scratch: &Path) -> Result<()> {
    let grub = scratch.join("grub-pc");
    fs::create_dir_all(&grub)?;
    fs::copy(
        tools.root.join("usr/lib/grub/i386-pc/boot.img"),
        grub.join("boot.img"),
    )
    .context("GRUB's boot.img is missing from the tools root")?;
    fs::write(grub.join("device.map"), "(hd0) /work/disk.raw\n")?;
    // grub-bios-setup insists on finding the device its directory is on in
    // /proc/self/mountinfo: a /proc of its own says it is the image file.
    let sandbox = tools
        .sandbox(scratch)
        .no_proc()
        .tmpfs("/proc")
        .file("/proc/self/mountinfo", "1 0 1:1 / / - fat /work/disk.raw\n");
    let mut mkimage = vec![
        "grub-mkimage",
        "-O",
        "i386-pc",
        "-d",
        "/usr/lib/grub/i386-pc",
        "-o",
        "/work/grub-pc/core.img",
        "-p",
        "(hd0,gpt1)/grub",
    ];
    mkimage.extend(GRUB_MODULES);
    exec::run(
        &mut sandbox.command(&mkimage)?,
        "making GRUB's core image for BIOS boot",
    )?;
    exec::run(
        &mut sandbox.command(&[
            "/usr/lib/grub/i386-pc/grub-bios-setup",
            "-d",
            "/work/grub-pc",
            "-m",
            "/work/grub-pc/device.map",
            "/work/disk.raw",
        ])?,
        "installing GRUB for BIOS boot",
    )
}

/// `dir/disk.qcow2` from `dir/disk.raw`. Not compressed: the root is
/// lz4-compressed erofs already, so qcow2's zlib saved 18% of the bytes at
/// 42 s of a 2-core build; plain, it takes under a second.
pub fn to_qcow2(tools: &Tools, dir: &Path) -> Result<()> {
    let mut cmd = tools.sandbox(dir).command(&[
        "qemu-img",
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "/work/disk.raw",
        "/work/disk.qcow2",
    ])?;
    exec::run(&mut cmd, "qemu-img convert (qcow2)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_is_a_v4_uuid_fixed_per_profile() {
        let a = seed("vps");
        assert_eq!(a, seed("vps"));
        assert_ne!(a, seed("vps-offline"));
        let parts: Vec<&str> = a.split('-').collect();
        assert_eq!(
            parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [8, 4, 4, 4, 12]
        );
        assert!(parts[2].starts_with('4'));
    }
}
