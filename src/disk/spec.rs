//! `images/disk.toml`: the base's packages and users, the units it enables, the
//! kernel command line and the partition sizes.

use std::fs;

use anyhow::{anyhow, Context, Result};
use serde::Deserialize;

use crate::debian::User;
use crate::project::Project;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    /// For the file's reader; required so that every kind file says what it is.
    #[allow(dead_code)]
    pub description: String,
    /// Read by `kind` (layers only this artifact gets); declared here for
    /// `deny_unknown_fields`.
    #[allow(dead_code)]
    #[serde(default)]
    pub layers: Vec<String>,
    pub base: BaseSpec,
    pub partitions: Sizes,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaseSpec {
    /// Debian packages on top of the Essential set.
    pub packages: Vec<String>,
    /// Users made before the packages install, so that their IDs are fixed
    /// (the containers' IDs, which no host user or group may then take).
    #[serde(default)]
    pub users: Vec<User>,
    /// Units `systemctl enable`d in the image.
    #[serde(default)]
    pub enable: Vec<String>,
    pub kernel_cmdline: String,
}

/// Partition sizes as written (`512M`, `3G`), checked by `bytes`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sizes {
    pub esp: String,
    pub root: String,
    pub var: String,
}

impl Sizes {
    pub fn esp_bytes(&self) -> Result<u64> {
        bytes("esp", &self.esp)
    }
    pub fn root_bytes(&self) -> Result<u64> {
        bytes("root", &self.root)
    }
    pub fn var_bytes(&self) -> Result<u64> {
        bytes("var", &self.var)
    }
}

pub fn load(project: &Project) -> Result<DiskSpec> {
    let path = project.images_dir().join("disk.toml");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let spec: DiskSpec = toml::from_str(&text)
        .map_err(|e| anyhow!("{}: {}", path.display(), e.to_string().trim_end()))?;
    for (name, size) in [
        ("esp", &spec.partitions.esp),
        ("root", &spec.partitions.root),
        ("var", &spec.partitions.var),
    ] {
        bytes(name, size).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    }
    for u in &spec.base.users {
        u.check()
            .map_err(|why| anyhow!("{}: [base] users: {why}", path.display()))?;
    }
    // The firmware's FAT driver needs a real FAT32 (65525 clusters or more
    // at mkfs.fat's 4 KiB clusters).
    if spec.partitions.esp_bytes()? < 300 << 20 {
        return Err(anyhow!(
            "{}: [partitions] esp = {:?} is too small; UEFI firmware reads FAT32 only from 300M up \
             (use \"512M\")",
            path.display(),
            spec.partitions.esp
        ));
    }
    Ok(spec)
}

/// `512M`, `3G`: a whole number of MiB or GiB.
pub fn bytes(name: &str, text: &str) -> Result<u64> {
    let (digits, unit) = text.split_at(text.len().saturating_sub(1));
    let shift = match unit {
        "M" => 20,
        "G" => 30,
        _ => {
            return Err(anyhow!(
                "[partitions] {name} = {text:?}: give a size in M or G, e.g. \"512M\""
            ))
        }
    };
    let n: u64 = digits.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
        anyhow!("[partitions] {name} = {text:?}: give a size in M or G, e.g. \"512M\"")
    })?;
    Ok(n << shift)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_projects_disk_kind_loads() {
        let project =
            Project::locate(Some(std::path::Path::new(env!("CARGO_MANIFEST_DIR")))).unwrap();
        let spec = load(&project).unwrap();
        assert!(spec.base.packages.iter().any(|p| p == "linux-image-amd64"));
        assert!(spec.base.packages.iter().any(|p| p == "podman"));
        assert_eq!(spec.layers, ["os-debian"]);
        assert!(spec.partitions.root_bytes().unwrap() >= 1 << 30);
    }

    #[test]
    fn sizes_in_mib_and_gib() {
        assert_eq!(bytes("x", "512M").unwrap(), 512 << 20);
        assert_eq!(bytes("x", "3G").unwrap(), 3 << 30);
        for bad in ["", "M", "0M", "12", "1.5G", "-1G", "1T"] {
            assert!(bytes("x", bad).is_err(), "{bad:?} accepted");
        }
    }
}
