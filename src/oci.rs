//! The pieces of the OCI image format the builder writes and reads: media
//! types, descriptors, image configs, manifests and layout indexes, as
//! canonical JSON (serde_json's compact form, keys in a fixed order), so
//! the same inputs always give the same digests.

use serde::Deserialize;
use serde_json::{json, Value as Json};

use crate::digest::Digest;

pub const MEDIA_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MEDIA_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
pub const TITLE: &str = "org.opencontainers.image.title";
pub const LAYOUT: &[u8] = b"{\"imageLayoutVersion\":\"1.0.0\"}";

/// A blob reference as manifests and indexes hold it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Descriptor {
    #[serde(rename = "mediaType")]
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default)]
    pub annotations: std::collections::BTreeMap<String, String>,
    pub platform: Option<Platform>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
}

/// An image manifest, as far as the builder reads one.
#[derive(Debug, Clone, Deserialize)]
pub struct ImageManifest {
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

/// An image index (a layout's index.json or a multi-platform image).
#[derive(Debug, Clone, Deserialize)]
pub struct Index {
    pub manifests: Vec<Descriptor>,
}

/// One layer of an image being written.
#[derive(Debug, Clone)]
pub struct LayerBlob {
    pub digest: Digest,
    pub diff_id: Digest,
    pub size: u64,
    /// Shown in the config's history and the manifest's title annotation.
    pub title: String,
    pub comment: String,
}

pub fn canonical(v: &Json) -> Vec<u8> {
    serde_json::to_vec(v).expect("JSON serialises")
}

pub fn descriptor(media_type: &str, bytes: &[u8]) -> Json {
    json!({ "mediaType": media_type, "digest": Digest::of(bytes).to_string(), "size": bytes.len() })
}

pub fn blob_name(d: &Digest) -> String {
    format!("blobs/sha256/{}", d.hex())
}

/// The architecture name OCI uses for the machine the builder runs on.
pub fn arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// RFC 3339 time of the epoch, for `created` fields.
pub fn created(epoch: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(epoch))
        .to_string()
}

/// An image config: `run` is the OCI `config` object (User, Env,
/// Entrypoint...), the rest follows from the layers and the epoch.
pub fn image_config(run: Json, layers: &[LayerBlob], epoch: u64) -> Vec<u8> {
    let created = created(epoch);
    canonical(&json!({
        "architecture": arch(),
        "os": "linux",
        "created": created,
        "config": run,
        "rootfs": {
            "type": "layers",
            "diff_ids": layers.iter().map(|l| l.diff_id.to_string()).collect::<Vec<_>>(),
        },
        "history": layers.iter().map(|l| json!({
            "created": created,
            "created_by": format!("builder layer {}", l.title),
            "comment": l.comment,
        })).collect::<Vec<_>>(),
    }))
}

/// The manifest of an image made of `config` and gzip `layers`.
pub fn image_manifest(config: &[u8], layers: &[LayerBlob], epoch: u64) -> Vec<u8> {
    canonical(&json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": descriptor(MEDIA_CONFIG, config),
        "layers": layers.iter().map(|l| json!({
            "mediaType": MEDIA_LAYER,
            "digest": l.digest.to_string(),
            "size": l.size,
            "annotations": { TITLE: l.title },
        })).collect::<Vec<_>>(),
        "annotations": { "org.opencontainers.image.created": created(epoch) },
    }))
}

/// A layout's index.json naming each manifest (`(ref name, manifest bytes)`,
/// written in the given order).
pub fn layout_index<'a>(manifests: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> Vec<u8> {
    let manifests: Vec<Json> = manifests
        .into_iter()
        .map(|(name, bytes)| {
            let mut d = descriptor(MEDIA_MANIFEST, bytes);
            d["annotations"] = json!({ REF_NAME: name });
            d
        })
        .collect();
    canonical(&json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_INDEX,
        "manifests": manifests,
    }))
}
