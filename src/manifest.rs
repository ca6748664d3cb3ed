//! The builder manifest: what a bundle was built from and what it holds,
//! in one canonical JSON document (fixed field order, sorted maps).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use crate::digest::Digest;

pub const SCHEMA: u32 = 1;

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

impl Manifest {
    pub fn to_canonical_json(&self) -> Vec<u8> {
        let mut bytes = serde_json::to_vec_pretty(self).expect("manifest serialises");
        bytes.push(b'\n');
        bytes
    }
}
