//! `builder build` and `builder render`: plan, render and pack each layer
//! (or take it from the cache), then write the outputs.

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;

use anyhow::{anyhow, Context, Result};
use serde::Serialize;

use crate::bundle;
use crate::cache::{self, Cache};
use crate::digest::Digest;
use crate::disk;
use crate::images;
use crate::manifest::{Manifest, ManifestLayer, SCHEMA};
use crate::outdir::OutDir;
use crate::pack::Packed;
use crate::plan::{self, Plan, SiteInput};
use crate::progress::Progress;
use crate::project::Project;
use crate::render;
use crate::tree::{Content, Node, Tree};

pub struct BuildRequest {
    pub project: Project,
    pub profile: String,
    pub input: SiteInput,
    pub out: PathBuf,
    pub cache_dir: PathBuf,
    pub epoch: u64,
    /// The disk image's version (`build --version`); see [`disk::version`].
    pub version: Option<String>,
    /// `build --base-release`: the update/ directory of the version the
    /// machines run (see [`disk::base_release`]).
    pub base_release: Option<PathBuf>,
    /// The keys that sign the update and that the image trusts.
    pub keys: disk::signing::Keys,
}

/// What `build --json` prints (versioned).
#[derive(Debug, Serialize)]
pub struct BuildReport {
    pub version: u32,
    pub profile: String,
    pub bundle: PathBuf,
    pub bundle_digest: Digest,
    pub manifest: PathBuf,
    pub layers: Vec<LayerReport>,
    /// The raw and qcow2 images of the `disk` output.
    pub disk_images: Vec<DiskImageReport>,
}

#[derive(Debug, Serialize)]
pub struct DiskImageReport {
    pub path: PathBuf,
    pub digest: Digest,
}

#[derive(Debug, Serialize)]
pub struct LayerReport {
    pub name: String,
    pub diff_id: Digest,
    pub digest: Digest,
    pub cached: bool,
}

/// The keys of `--sign-key` and `--trust-key`, and for a disk image those of the
/// site value `update_trust_keys` (public key files the image trusts too, so that
/// a site file can carry them).
fn site_keys(
    cli: &disk::signing::Keys,
    plan: &plan::Plan,
    makes_disk: bool,
) -> disk::signing::Keys {
    let mut keys = cli.clone();
    if makes_disk {
        if let Some(serde_json::Value::Array(files)) = plan.values.get("update_trust_keys") {
            keys.trust
                .extend(files.iter().filter_map(|f| f.as_str()).map(PathBuf::from));
        }
    }
    keys
}

pub fn build(req: &BuildRequest, progress: &mut Progress) -> Result<BuildReport> {
    let plan = plan::plan(&req.project, &req.profile, &req.input)?;
    let makes_disk = plan.profile.outputs.iter().any(|o| o == disk::KIND);
    let version = disk::version::resolve(
        req.version.as_deref(),
        plan.profile.version.as_deref(),
        req.epoch,
    )?;
    if !req.keys.is_empty() && !makes_disk {
        return Err(crate::error::usage(
            "--sign-key and --trust-key are for the disk image's updates; this build makes no \
             disk image (see the profile's outputs and --output)",
        ));
    }
    let keys = site_keys(&req.keys, &plan, makes_disk);
    keys.check()?;
    let base_release =
        match &req.base_release {
            Some(_) if !makes_disk => return Err(crate::error::usage(
                "--base-release is for the disk image's updates; this build makes no disk image \
                 (see the profile's outputs and --output)",
            )),
            Some(dir) => {
                let release = disk::base_release::read(dir)?;
                release.check_newer(&version)?;
                Some(release)
            }
            None => None,
        };
    if makes_disk {
        disk::preflight(&req.project)?;
    }
    let cache = Cache::open(req.cache_dir.clone())?;

    progress.start(
        (plan.layers.len() - plan.kind_layers.len()) as u64,
        &format!("building profile {}", plan.profile.name),
    );
    let mut layers = Vec::new();
    let mut reports = Vec::new();
    // Layers an output kind adds (the disk's OS settings) stay out of the bundle.
    for layer in plan
        .layers
        .iter()
        .filter(|l| !plan.kind_layers.contains_key(&l.name))
    {
        progress.working(&layer.name);
        let values = plan.values_for(layer);
        let key = cache::layer_key(layer, &serde_json::to_value(&values)?, req.epoch);
        let (packed, cached) =
            cache.get_or_pack(&key, req.epoch, || render::layer_tree(layer, &values))?;
        let line = add_layer(
            &mut layers,
            &mut reports,
            &layer.name,
            &layer.def.description,
            packed,
            cached,
        );
        progress.item_done(&line);
    }
    progress.finish();

    let embedded = images::obtain(&plan.images, &cache, req.epoch, progress)?;
    if !embedded.is_empty() {
        let key = images::embed::key(&embedded, req.epoch);
        let (packed, cached) =
            cache.get_or_pack(&key, req.epoch, || images::embed::tree(&embedded, &cache))?;
        let description = images::embed::description(&embedded);
        let line = add_layer(
            &mut layers,
            &mut reports,
            images::LAYER,
            &description,
            packed,
            cached,
        );
        progress.note(&line);
    }

    let manifest = Manifest {
        schema: SCHEMA,
        builder_version: env!("CARGO_PKG_VERSION").to_string(),
        profile: plan.profile.name.clone(),
        epoch: req.epoch,
        values: plan.used_public_values(),
        layers,
        images: images::manifest_entries(&plan.images, &embedded),
        disk: None,
    };
    let bundle_name = format!("{}.bundle.tar", plan.profile.name);
    let manifest_name = format!("{}.manifest.json", plan.profile.name);
    let exports = exported_files(&plan)?;
    let mut out = OutDir::open(&req.out)?;
    for (name, bytes) in &exports {
        out.stage_bytes(name, bytes)?;
    }
    // The bundle's bytes follow from its manifest and the builder that writes it.
    let bundle_key = {
        let mut key = cache::Key::new("builder bundle file", req.epoch);
        key.add(&manifest.to_canonical_json())
            .add(&cache::builder_digest()?);
        key.finish()
    };
    let bundle_memo = cache.out_stamp(&out.path_of(&bundle_name));
    // The disk image is made while the bundle is written: each mostly copies
    // and hashes, on a core of its own.
    let (bundle_digest, disk) = std::thread::scope(|scope| -> Result<_> {
        let disk = makes_disk.then(|| {
            scope.spawn(|| -> Result<disk::DiskImages> {
                let mut tree = merged_tree(&plan)?;
                if !embedded.is_empty() {
                    let images = images::embed::tree(&embedded, &cache)?;
                    render::overlay(&mut tree, &mut BTreeMap::new(), &images, images::LAYER)?;
                }
                disk::build(
                    &req.project,
                    &plan,
                    &tree,
                    &cache,
                    req.epoch,
                    &version,
                    base_release.as_ref(),
                    &keys,
                    progress,
                )
            })
        });
        let bundle_digest = out.stage_keyed(&bundle_name, &bundle_key, &bundle_memo, |w| {
            bundle::write(&manifest, |d| cache.blob_path(d), w)?;
            Ok(())
        });
        let disk = match disk {
            Some(thread) => Some(thread.join().expect("the disk image's thread panicked")?),
            None => None,
        };
        Ok((bundle_digest?, disk))
    })?;
    let mut manifest = manifest;
    let mut disk_files = Vec::new();
    if let Some(disk) = disk {
        for (file, ext) in [(&disk.raw, "raw"), (&disk.qcow2, "qcow2")] {
            let name = format!("{}.{ext}", plan.profile.name);
            out.stage_linked(&name, &file.path, file.digest)?;
            disk_files.push((out.path_of(&name), file.digest));
        }
        // The update directory holds this version's files only.
        out.replace_dir(disk::UPDATE_DIR);
        for file in &disk.update {
            out.stage_linked(&file.name, &file.path, file.digest)?;
        }
        manifest.disk = Some(disk.info.clone());
    }
    out.stage_bytes(&manifest_name, &manifest.to_canonical_json())?;
    let report = BuildReport {
        version: 1,
        profile: plan.profile.name.clone(),
        bundle: out.path_of(&bundle_name),
        bundle_digest,
        manifest: out.path_of(&manifest_name),
        layers: reports,
        disk_images: disk_files
            .into_iter()
            .map(|(path, digest)| DiskImageReport { path, digest })
            .collect(),
    };
    out.commit()?;
    progress.note(&format!(
        "wrote {} ({bundle_digest})",
        report.bundle.display()
    ));
    Ok(report)
}

/// Records a packed layer for the manifest and the report; returns the
/// progress line.
fn add_layer(
    layers: &mut Vec<ManifestLayer>,
    reports: &mut Vec<LayerReport>,
    name: &str,
    description: &str,
    packed: Packed,
    cached: bool,
) -> String {
    reports.push(LayerReport {
        name: name.to_string(),
        diff_id: packed.diff_id,
        digest: packed.digest,
        cached,
    });
    layers.push(ManifestLayer {
        name: name.to_string(),
        description: description.to_string(),
        diff_id: packed.diff_id,
        digest: packed.digest,
        size: packed.size,
        compressed_size: packed.compressed_size,
        files: packed.entries,
    });
    format!(
        "layer {:<16} {} {}",
        name,
        if cached { "cached" } else { "packed" },
        packed.diff_id
    )
}

/// The files layers export into the output directory (`[exports]`), by
/// path under `--out`. Rendered afresh: cheap, and identical to what was
/// packed, since rendering is deterministic.
fn exported_files(plan: &Plan) -> Result<BTreeMap<String, Vec<u8>>> {
    let mut files = BTreeMap::new();
    for layer in plan.layers.iter().filter(|l| !l.def.exports.is_empty()) {
        let tree = render::layer_tree(layer, &plan.values_for(layer))?;
        for (from, to) in &layer.def.exports {
            let prefix = format!("{from}/");
            let mut found = false;
            for (path, entry) in tree.iter() {
                let path = String::from_utf8_lossy(path);
                let dest = if path == *from {
                    to.clone()
                } else if let Some(rest) = path.strip_prefix(&prefix) {
                    format!("{to}/{rest}")
                } else {
                    continue;
                };
                found = true;
                match &entry.node {
                    Node::File(Content::Bytes(bytes)) => {
                        files.insert(dest, bytes.clone());
                    }
                    Node::Dir => {}
                    _ => {
                        return Err(anyhow!(
                        "layers/{}: [exports] {path}: only files and directories can be exported",
                        layer.name
                    ))
                    }
                }
            }
            if !found {
                return Err(anyhow!(
                    "layers/{}/layer.toml: [exports] {from:?} is not in the layer's output",
                    layer.name
                ));
            }
        }
    }
    Ok(files)
}

/// The merged tree of all layers of a plan, as the image would hold it.
pub fn merged_tree(plan: &Plan) -> Result<Tree> {
    let mut merged = Tree::new();
    let mut owners = BTreeMap::new();
    for layer in &plan.layers {
        let tree = render::layer_tree(layer, &plan.values_for(layer))?;
        render::overlay(&mut merged, &mut owners, &tree, &layer.name)?;
    }
    Ok(merged)
}

/// Writes the merged rendered tree of `req` into `req.out`, which must not
/// exist yet (or be empty), embedded images included. Staged in a sibling
/// directory and renamed into place.
pub fn render_to_dir(req: &BuildRequest, progress: &mut Progress) -> Result<usize> {
    let out = req.out.as_path();
    let plan = plan::plan(&req.project, &req.profile, &req.input)?;
    let mut tree = merged_tree(&plan)?;
    let cache = Cache::open(req.cache_dir.clone())?;
    let embedded = images::obtain(&plan.images, &cache, req.epoch, progress)?;
    if !embedded.is_empty() {
        let mut owners = BTreeMap::new();
        let images = images::embed::tree(&embedded, &cache)?;
        render::overlay(&mut tree, &mut owners, &images, images::LAYER)?;
    }
    if out.exists() {
        let empty = out.is_dir() && fs::read_dir(out)?.next().is_none();
        if !empty {
            return Err(anyhow!(
                "--out {} already exists and is not empty; remove it or choose another directory",
                out.display()
            ));
        }
        fs::remove_dir(out).with_context(|| format!("replacing {}", out.display()))?;
    }
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
    let staging = tempfile::Builder::new()
        .prefix(".render-")
        .tempdir_in(&parent)?;
    tree.write_to(staging.path())?;
    let staged = staging.keep();
    fs::rename(&staged, out)
        .with_context(|| format!("moving the rendered tree to {}", out.display()))?;
    Ok(tree.len())
}
