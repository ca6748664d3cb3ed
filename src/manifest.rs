//! The builder manifest: what a bundle was built from and what it holds,
//! in one canonical JSON document (fixed field order, sorted maps).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use crate::digest::Digest;

/// 2: `images` added.
pub const SCHEMA: u32 = 2;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub schema: u32,
    pub builder_version: String,
    pub profile: String,
    pub epoch: u64,
    /// The site values the layers read, sensitive ones left out.
    pub values: BTreeMap<String, Json>,
    pub layers: Vec<ManifestLayer>,
    /// Every container image the layers run.
    pub images: Vec<ManifestImage>,
    /// The disk image's base and partitions (in the output directory's
    /// manifest of a profile with the `disk` output; not in bundles).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<DiskInfo>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestLayer {
    pub name: String,
    pub description: String,
    /// sha256 of the uncompressed tar: the layer's id.
    pub diff_id: Digest,
    /// sha256 of the gzip blob.
    pub digest: Digest,
    pub size: u64,
    pub compressed_size: u64,
    /// Tar entries: files, directories and links.
    pub files: u64,
}

/// A container image the appliance runs, and where it comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestImage {
    pub name: String,
    pub description: String,
    /// upstream, local or archive.
    pub source: String,
    /// In the `images` layer, loaded at boot without network; otherwise
    /// pulled from `upstream` at first boot.
    pub embedded: bool,
    /// What Podman runs: the upstream reference or the embedded name.
    pub reference: String,
    /// The public reference (pinned by digest) the image is or stands for.
    pub upstream: String,
    /// The manifest digest of the embedded image, or the pinned digest of
    /// the upstream reference.
    pub digest: Digest,
    /// Bytes of an embedded image (manifest, config, layers).
    pub size: Option<u64>,
    /// Layers whose units run it.
    pub used_by: Vec<String>,
}

impl Manifest {
    pub fn to_canonical_json(&self) -> Vec<u8> {
        let mut bytes = serde_json::to_vec_pretty(self).expect("manifest serialises");
        bytes.push(b'\n');
        bytes
    }
}

/// What the manifest records about the disk image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskInfo {
    /// os-release's IMAGE_ID, and the version this image boots (its boot
    /// entry and appliance extension).
    pub image_id: String,
    pub image_version: String,
    /// The version of its OS image (os-release's IMAGE_VERSION, the root
    /// slot's label): `image_version`, or an earlier release's whose OS image
    /// this build kept (`build --base-release`).
    pub os_version: String,
    /// Debian release of the base.
    pub suite: String,
    pub kernel: String,
    pub kernel_cmdline: String,
    /// Every installed Debian package with its version.
    pub packages: BTreeMap<String, String>,
    pub partitions: Vec<PartitionInfo>,
    /// Apparent size of the raw image in bytes.
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartitionInfo {
    /// GPT partition name (`esp`, `bios`, `appliance_<version>` for the
    /// root slot holding this version, `_empty` for the other, `var`).
    pub label: String,
    pub filesystem: Option<String>,
    /// Byte offset in the disk image (where a newer image's partition is
    /// written over an installed one).
    pub offset: u64,
    pub size: u64,
    /// GPT partition UUID (fixed by the profile's seed).
    pub uuid: String,
}
