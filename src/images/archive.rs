//! The `archive` source: an OCI image archive (`skopeo copy ...
//! oci-archive:FILE`) or an OCI layout directory the user supplies. Every
//! blob is checked against its digest on the way into the cache; a layout
//! with several images must name the one to take by platform.

use std::fs::{self, File};
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};

use super::{BlobRef, StoredImage};
use crate::cache::Cache;
use crate::digest::Digest;
use crate::oci::{self, Descriptor, ImageManifest, Index};

const HOW_TO_MAKE: &str =
    "make one with `skopeo copy docker://NAME@sha256:DIGEST oci-archive:FILE` (or oci:DIR)";

/// Checks the archive or layout at `path` and copies its image into the
/// cache.
pub fn import(path: &Path, cache: &Cache) -> Result<StoredImage> {
    let shown = path.display().to_string();
    let meta = fs::metadata(path).with_context(|| format!("reading {shown}"))?;
    // An archive is unpacked next to the cache first: index.json may come
    // after the blobs in the tar, and blobs are large.
    let unpacked;
    let layout: PathBuf = if meta.is_dir() {
        path.to_path_buf()
    } else {
        unpacked = cache.temp_dir("archive-")?;
        let file = File::open(path).with_context(|| format!("opening {shown}"))?;
        tar::Archive::new(BufReader::new(file))
            .unpack(unpacked.path())
            .with_context(|| format!("{shown} is not a readable tar archive; {HOW_TO_MAKE}"))?;
        unpacked.path().to_path_buf()
    };
    let index_bytes = fs::read(layout.join("index.json")).map_err(|_| {
        anyhow!("{shown} is not an OCI archive or layout (no index.json; a docker-archive from `podman save` is not one); {HOW_TO_MAKE}")
    })?;
    if !layout.join("oci-layout").is_file() {
        bail!("{shown} has no oci-layout file: it is not an OCI layout; {HOW_TO_MAKE}");
    }
    let index: Index = serde_json::from_slice(&index_bytes)
        .with_context(|| format!("{shown}: index.json is malformed"))?;
    let blob = |d: &Descriptor| -> Result<Vec<u8>> {
        let bytes = fs::read(layout.join(oci::blob_name(&d.digest)))
            .map_err(|_| anyhow!("{shown} lacks blob {} that it lists", d.digest))?;
        if Digest::of(&bytes) != d.digest || bytes.len() as u64 != d.size {
            bail!(
                "{shown}: blob {} is damaged (its content does not match its digest)",
                d.digest
            );
        }
        Ok(bytes)
    };
    let chosen = choose_manifest(&index.manifests, &blob, &shown)?;
    let manifest_bytes = blob(&chosen)?;
    let manifest: ImageManifest = serde_json::from_slice(&manifest_bytes)
        .with_context(|| format!("{shown}: manifest {} is malformed", chosen.digest))?;
    if chosen.media_type != oci::MEDIA_MANIFEST || manifest.config.media_type != oci::MEDIA_CONFIG {
        bail!(
            "{shown}: the image is not in OCI format (manifest {}, config {}); copy it with \
             skopeo into oci-archive: or oci:, which converts it",
            chosen.media_type,
            manifest.config.media_type
        );
    }
    let mut blobs = Vec::new();
    for d in std::iter::once(&manifest.config).chain(&manifest.layers) {
        if !cache.has_blob(&d.digest, d.size)? {
            let mut file = File::open(layout.join(oci::blob_name(&d.digest)))
                .map_err(|_| anyhow!("{shown} lacks blob {} that its manifest lists", d.digest))?;
            cache.put_reader(
                &mut file as &mut dyn Read,
                &d.digest,
                d.size,
                &format!("blob {} of {shown}", d.digest),
            )?;
        }
        blobs.push(BlobRef {
            digest: d.digest,
            size: d.size,
        });
    }
    cache.put_bytes(&manifest_bytes)?;
    Ok(StoredImage {
        digest: chosen.digest,
        manifest_size: chosen.size,
        blobs,
    })
}

/// The one image manifest of the layout: the only entry, or the entry (or
/// entry of a multi-platform index) for this machine's platform.
fn choose_manifest(
    entries: &[Descriptor],
    blob: &dyn Fn(&Descriptor) -> Result<Vec<u8>>,
    shown: &str,
) -> Result<Descriptor> {
    let ours = |d: &Descriptor| {
        d.platform
            .as_ref()
            .is_none_or(|p| p.os == "linux" && p.architecture == oci::arch())
    };
    let candidates: Vec<&Descriptor> = if entries.len() == 1 {
        entries.iter().collect()
    } else {
        entries
            .iter()
            .filter(|d| ours(d) && d.platform.is_some())
            .collect()
    };
    match candidates.as_slice() {
        [one] if one.media_type == oci::MEDIA_INDEX => {
            let nested: Index = serde_json::from_slice(&blob(one)?)
                .with_context(|| format!("{shown}: image index {} is malformed", one.digest))?;
            let found: Vec<&Descriptor> = nested.manifests.iter().filter(|d| ours(d)).collect();
            match found.as_slice() {
                [m] => Ok((*m).clone()),
                [] => bail!(
                    "{shown} holds no image for linux/{}; copy the right platform with skopeo \
                     --override-arch",
                    oci::arch()
                ),
                _ => bail!("{shown} holds several images for linux/{}", oci::arch()),
            }
        }
        [one] => Ok((*one).clone()),
        [] => bail!(
            "{shown} holds no image (its index.json is empty or has no linux/{} entry)",
            oci::arch()
        ),
        _ => {
            let names: Vec<String> = entries
                .iter()
                .map(|d| {
                    d.annotations
                        .get(oci::REF_NAME)
                        .cloned()
                        .unwrap_or_else(|| d.digest.to_string())
                })
                .collect();
            bail!(
                "{shown} holds several images ({}); give an archive with just the one to embed",
                names.join(", ")
            )
        }
    }
}
