//! `builder verify`: recompute every digest in a bundle and check that the
//! OCI documents, the builder manifest and SHA256SUMS agree with the bytes.

use std::collections::BTreeMap;

use anyhow::Result;
use serde::Serialize;
use serde_json::Value as Json;

use crate::bundle::{self, Bundle, BUILDER_MANIFEST, SUMS};
use crate::digest::Digest;
use crate::images;
use crate::manifest::{Manifest, ManifestImage};

#[derive(Debug, Serialize)]
pub struct VerifyReport {
    pub version: u32,
    pub bundle: String,
    pub ok: bool,
    pub layers: Vec<LayerCheck>,
    pub problems: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct LayerCheck {
    pub name: String,
    pub diff_id: Digest,
    pub ok: bool,
}

pub fn verify(path: &std::path::Path) -> Result<VerifyReport> {
    verify_bundle(&Bundle::read(path)?)
}

/// [`verify`] of a bundle already read (its file list and small files).
pub fn verify_bundle(bundle: &Bundle) -> Result<VerifyReport> {
    let mut problems = Vec::new();
    let manifest = match bundle.manifest() {
        Ok(m) => Some(m),
        Err(e) => {
            problems.push(format!("{e:#}"));
            None
        }
    };
    let layer_of: BTreeMap<String, String> = manifest
        .iter()
        .flat_map(|m| {
            m.layers
                .iter()
                .map(|l| (bundle::blob_name(&l.digest), l.name.clone()))
        })
        .collect();
    let label = |name: &str| match layer_of.get(name) {
        Some(layer) => format!("layer {layer}: {name}"),
        None => name.to_string(),
    };

    // Every blob is named by its digest.
    for (name, file) in &bundle.files {
        if let Some(hex) = name.strip_prefix("blobs/sha256/") {
            if file.digest.hex() != hex {
                problems.push(format!(
                    "{} is damaged: its content hashes to {}",
                    label(name),
                    file.digest
                ));
            }
        }
    }
    for other in &bundle.others {
        problems.push(format!(
            "{other} is not a regular file; a bundle holds only files"
        ));
    }

    check_sums(bundle, &label, &mut problems);
    let oci_layers = check_oci(bundle, &mut problems);

    let mut layers = Vec::new();
    if let Some(manifest) = &manifest {
        if let Some((descs, diff_ids)) = &oci_layers {
            if descs.len() != manifest.layers.len() || diff_ids.len() != manifest.layers.len() {
                problems.push(format!(
                    "the OCI manifest lists {} layers and the config {} diff_ids, but {BUILDER_MANIFEST} lists {}",
                    descs.len(),
                    diff_ids.len(),
                    manifest.layers.len()
                ));
            }
            for (i, l) in manifest.layers.iter().enumerate() {
                if descs.get(i).map(|d| (d.0, d.1)) != Some((l.digest, l.compressed_size)) {
                    problems.push(format!(
                        "layer {}: the OCI manifest does not list it at position {}",
                        l.name,
                        i + 1
                    ));
                }
                if diff_ids.get(i) != Some(&l.diff_id) {
                    problems.push(format!(
                        "layer {}: the OCI config has a different diff_id",
                        l.name
                    ));
                }
            }
        }
        for l in &manifest.layers {
            let before = problems.len();
            let blob = bundle::blob_name(&l.digest);
            match bundle.files.get(&blob) {
                None => problems.push(format!("layer {}: its blob {blob} is missing", l.name)),
                Some(f) if f.size != l.compressed_size => problems.push(format!(
                    "layer {}: its blob has {} bytes, the manifest says {}",
                    l.name, f.size, l.compressed_size
                )),
                Some(_) => match bundle.with_file(&blob, bundle::read_layer) {
                    Err(e) => problems.push(format!("layer {}: cannot be read: {e:#}", l.name)),
                    Ok(contents) => {
                        if contents.diff_id != l.diff_id {
                            problems.push(format!(
                                "layer {}: its tar hashes to {}, but its id is {}",
                                l.name, contents.diff_id, l.diff_id
                            ));
                        }
                        if contents.size != l.size || contents.entries.len() as u64 != l.files {
                            problems.push(format!(
                                "layer {}: holds {} bytes in {} entries, the manifest says {} in {}",
                                l.name,
                                contents.size,
                                contents.entries.len(),
                                l.size,
                                l.files
                            ));
                        }
                    }
                },
            }
            layers.push(LayerCheck {
                name: l.name.clone(),
                diff_id: l.diff_id,
                ok: problems.len() == before,
            });
        }
        check_images(bundle, manifest, &mut problems);
        // A damaged blob is also reported by the blob and sums checks; mark
        // its layer failed in any case.
        for check in &mut layers {
            if problems
                .iter()
                .any(|p| p.starts_with(&format!("layer {}:", check.name)))
            {
                check.ok = false;
            }
        }
    }

    Ok(VerifyReport {
        version: 1,
        bundle: bundle.path.display().to_string(),
        ok: problems.is_empty(),
        layers,
        problems,
    })
}

/// Embedded images: in the `images` layer, whole and intact. Upstream
/// ones must be pinned.
fn check_images(bundle: &Bundle, manifest: &Manifest, problems: &mut Vec<String>) {
    for image in manifest.images.iter().filter(|i| !i.embedded) {
        if !image.reference.contains("@sha256:") {
            problems.push(format!(
                "image {}: {} is not pinned by digest",
                image.name, image.reference
            ));
        }
    }
    let embedded: Vec<&ManifestImage> = manifest.images.iter().filter(|i| i.embedded).collect();
    let layer = manifest.layers.iter().find(|l| l.name == images::LAYER);
    match (layer, embedded.is_empty()) {
        (None, true) => {}
        (None, false) => problems.push(format!(
            "{BUILDER_MANIFEST} lists embedded images but there is no {} layer",
            images::LAYER
        )),
        (Some(layer), _) => {
            let blob = bundle::blob_name(&layer.digest);
            match bundle.with_file(&blob, |r| images::embed::check_layer(r, &embedded)) {
                Ok(found) => problems.extend(
                    found
                        .into_iter()
                        .map(|p| format!("layer {}: {p}", images::LAYER)),
                ),
                Err(e) => problems.push(format!("layer {}: cannot be read: {e:#}", images::LAYER)),
            }
        }
    }
}

fn check_sums(bundle: &Bundle, label: &dyn Fn(&str) -> String, problems: &mut Vec<String>) {
    let Ok(text) = bundle.bytes(SUMS) else {
        problems.push(format!("{SUMS} is missing"));
        return;
    };
    let mut listed = BTreeMap::new();
    for line in String::from_utf8_lossy(text).lines() {
        match line.split_once("  ") {
            Some((hex, name)) => {
                listed.insert(name.to_string(), hex.to_string());
            }
            None => problems.push(format!("{SUMS} has a malformed line: {line:?}")),
        }
    }
    for (name, file) in &bundle.files {
        if name == SUMS {
            continue;
        }
        match listed.get(name) {
            None => problems.push(format!("{name} is not listed in {SUMS}")),
            Some(hex) if *hex != file.digest.hex() => {
                problems.push(format!("{} does not match its {SUMS} line", label(name)))
            }
            Some(_) => {}
        }
    }
    for name in listed.keys() {
        if !bundle.files.contains_key(name) {
            problems.push(format!("{SUMS} lists {name}, which is missing"));
        }
    }
}

/// Layer descriptors (digest, size) from the OCI manifest, and the
/// config's diff_ids.
type OciLayers = (Vec<(Digest, u64)>, Vec<Digest>);

/// Follows index.json → manifest → config; returns the layer descriptors
/// (digest, size) and the config's diff_ids.
fn check_oci(bundle: &Bundle, problems: &mut Vec<String>) -> Option<OciLayers> {
    let json = |name: &str, problems: &mut Vec<String>| -> Option<Json> {
        match bundle.bytes(name).map(serde_json::from_slice::<Json>) {
            Ok(Ok(v)) => Some(v),
            Ok(Err(e)) => {
                problems.push(format!("{name} is not valid JSON: {e}"));
                None
            }
            Err(e) => {
                problems.push(format!("{e:#}"));
                None
            }
        }
    };
    let layout = json("oci-layout", problems)?;
    if layout["imageLayoutVersion"] != "1.0.0" {
        problems.push("oci-layout does not declare imageLayoutVersion 1.0.0".into());
    }
    let index = json("index.json", problems)?;
    let desc = |v: &Json| -> Option<(Digest, u64)> {
        Some((v["digest"].as_str()?.parse().ok()?, v["size"].as_u64()?))
    };
    let checked_blob = |v: &Json, what: &str, problems: &mut Vec<String>| -> Option<String> {
        let Some((digest, size)) = desc(v) else {
            problems.push(format!("{what}: malformed descriptor"));
            return None;
        };
        let name = bundle::blob_name(&digest);
        match bundle.files.get(&name) {
            None => problems.push(format!("{what}: {name} is missing")),
            Some(f) if f.size != size => {
                problems.push(format!("{what}: {name} has {} bytes, not {size}", f.size))
            }
            Some(_) => return Some(name),
        }
        None
    };
    let manifest_name = checked_blob(&index["manifests"][0], "index.json manifest", problems)?;
    let manifest = json(&manifest_name, problems)?;
    let config_name = checked_blob(&manifest["config"], "OCI manifest config", problems)?;
    let config = json(&config_name, problems)?;
    let descs: Vec<(Digest, u64)> = manifest["layers"]
        .as_array()?
        .iter()
        .filter_map(desc)
        .collect();
    let diff_ids: Vec<Digest> = config["rootfs"]["diff_ids"]
        .as_array()?
        .iter()
        .filter_map(|d| d.as_str()?.parse().ok())
        .collect();
    Some((descs, diff_ids))
}
