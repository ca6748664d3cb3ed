//! Container images the layers run. A layer declares each image it brings
//! in `[images.<name>]` (the public reference, pinned by digest) and may use
//! another layer's image with `use_images`. Every image comes from one
//! source, chosen per image by site values:
//!
//! - `upstream`: the pinned public reference; Podman pulls it at first boot.
//! - `local`: built here from Debian packages and PyPI wheels by the recipe
//!   in `images/local/<name>/`, then embedded.
//! - `archive:PATH`: an OCI archive or layout the user supplies, checked and
//!   embedded.
//! - `auto` (the default): `local` where a recipe exists, else `upstream`.
//!   Embedding is the default because it is the proven path: a first boot
//!   that pulls depends on the registry's uptime and its rate limits (shared
//!   VPS addresses hit Docker Hub's). `pull_images = true` makes `auto` pull
//!   everything; `offline = true` refuses every pull.
//!
//! Embedded images travel in the bundle's `images` layer (an OCI layout plus
//! a quadlet `.image` unit each) and are loaded without network; quadlets
//! then run them with `Pull=never`.

pub mod archive;
pub mod embed;
pub mod local;
pub mod recipe;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use anyhow::{anyhow, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value as Json};

pub use crate::image_decl::{ImageDecl, PINNED_PATTERN};

use crate::cache::Cache;
use crate::digest::Digest;
use crate::error::usage;
use crate::layer::Layer;
use crate::manifest::ManifestImage;
use crate::project::Project;
use crate::values::{Kind, ValueSpec, Values};

/// The site value that asks for every image to be embedded.
pub const OFFLINE: &str = "offline";
/// The site value that asks for every `auto` image to be pulled.
pub const PULL_IMAGES: &str = "pull_images";
/// The name of the generated layer that carries embedded images.
pub const LAYER: &str = "images";
/// Where the embedded images' OCI layout lies in the appliance.
pub const LAYOUT_DIR: &str = "usr/share/matrix-appliance/images";
/// Tag of every embedded image in Podman's store (one image per name).
const EMBEDDED_TAG: &str = "embedded";

const SOURCE_PATTERN: &str = r"auto|upstream|local|archive:\S.*";

pub fn reference_value(image: &str) -> String {
    format!("{image}_image")
}

pub fn source_value(image: &str) -> String {
    format!("{image}_image_source")
}

/// The site values every image brings: its reference, its source, and the
/// shared `offline` and `pull_images` switches.
pub fn implicit_specs(image: &str, decl: &ImageDecl) -> Vec<(String, ValueSpec)> {
    let spec = |kind, default: toml::Value, pattern: Option<&str>, description: String| ValueSpec {
        kind,
        default: Some(default),
        description,
        choices: vec![],
        items: None,
        min: None,
        max: None,
        pattern: pattern.map(str::to_string),
        sensitive: false,
        optional: false,
    };
    vec![
        (
            OFFLINE.to_string(),
            spec(
                Kind::Bool,
                toml::Value::Boolean(false),
                None,
                "Embed every container image in the artifact, so that nothing is pulled at boot \
                 (images built locally or taken from archives); an image with neither is an error"
                    .into(),
            ),
        ),
        (
            PULL_IMAGES.to_string(),
            spec(
                Kind::Bool,
                toml::Value::Boolean(false),
                None,
                "Pull every image whose source is auto from its public registry at first boot \
                 instead of building and embedding it (a smaller artifact, but the first boot \
                 needs the registries)"
                    .into(),
            ),
        ),
        (
            reference_value(image),
            spec(
                Kind::String,
                toml::Value::String(decl.upstream.clone()),
                Some(PINNED_PATTERN),
                format!(
                    "{}: public image reference, pinned by digest",
                    decl.description
                ),
            ),
        ),
        (
            source_value(image),
            spec(
                Kind::String,
                toml::Value::String("auto".into()),
                Some(SOURCE_PATTERN),
                format!(
                    "Where the {image} image comes from: upstream (pulled at first boot), local \
                     (built from Debian/PyPI), archive:PATH (an OCI archive or layout), or auto \
                     (local where there is a recipe, else upstream; pull_images = true pulls)"
                ),
            ),
        ),
    ]
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Upstream,
    /// The recipe directory.
    Local(PathBuf),
    /// An OCI archive file or layout directory.
    Archive(PathBuf),
}

impl Source {
    pub fn kind_name(&self) -> &'static str {
        match self {
            Source::Upstream => "upstream",
            Source::Local(_) => "local",
            Source::Archive(_) => "archive",
        }
    }

    pub fn embedded(&self) -> bool {
        !matches!(self, Source::Upstream)
    }
}

/// An image the planned layers need, with its chosen source.
#[derive(Debug, Clone)]
pub struct PlannedImage {
    pub name: String,
    pub description: String,
    /// The pinned public reference (as the `<name>_image` value says).
    pub upstream: String,
    pub source: Source,
    /// Layers that declare or use it.
    pub users: Vec<String>,
}

impl PlannedImage {
    /// What Podman calls the image once loaded (embedded images only).
    pub fn embedded_ref(&self) -> String {
        format!("localhost/matrix-appliance/{}:{EMBEDDED_TAG}", self.name)
    }

    /// The quadlet `.image` unit that loads an embedded image.
    pub fn image_unit(&self) -> String {
        format!("matrix-image-{}.image", self.name)
    }

    /// The service quadlet makes of `image_unit`.
    pub fn load_service(&self) -> String {
        format!("matrix-image-{}-image.service", self.name)
    }

    /// What templates see as `images.<name>`.
    pub fn template_info(&self) -> Json {
        if self.source.embedded() {
            json!({
                "embedded": true,
                // For a quadlet's Image=: the .image unit, which quadlet turns
                // into a dependency on its service and the name it loads.
                "quadlet": self.image_unit(),
                // For `podman run` in scripts, after `service` has run.
                "ref": self.embedded_ref(),
                "pull": "never",
                "service": self.load_service(),
            })
        } else {
            json!({
                "embedded": false,
                "quadlet": self.upstream,
                "ref": self.upstream,
                "pull": "missing",
                "service": "",
            })
        }
    }
}

/// An image whose manifest and blobs all lie in the cache's blob store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredImage {
    /// The manifest's digest: the image's identity.
    pub digest: Digest,
    pub manifest_size: u64,
    /// The config, then the layers.
    pub blobs: Vec<BlobRef>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobRef {
    pub digest: Digest,
    pub size: u64,
}

impl StoredImage {
    /// Bytes of the manifest, config and layers.
    pub fn size(&self) -> u64 {
        self.manifest_size + self.blobs.iter().map(|b| b.size).sum::<u64>()
    }

    /// Whether every blob is still in the cache, intact.
    pub fn intact(&self, cache: &Cache) -> Result<bool> {
        if !cache.has_blob(&self.digest, self.manifest_size)? {
            return Ok(false);
        }
        for b in &self.blobs {
            if !cache.has_blob(&b.digest, b.size)? {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// Gets every embedded image of the plan into the cache: built from its
/// recipe or checked and copied from its archive.
pub fn obtain<'a>(
    planned: &'a [PlannedImage],
    cache: &Cache,
    epoch: u64,
    progress: &mut crate::progress::Progress,
) -> Result<Vec<embed::Embedded<'a>>> {
    let mut out = Vec::new();
    for image in planned {
        let stored = match &image.source {
            Source::Upstream => {
                progress.note(&format!(
                    "image {:<10} upstream, pulled at first boot (the machine needs {} then): {}",
                    image.name,
                    registry(&image.upstream),
                    image.upstream
                ));
                continue;
            }
            Source::Local(dir) => {
                let recipe = recipe::Recipe::load(&image.name, dir)?;
                local::build(&recipe, cache, epoch, progress)
                    .with_context(|| format!("building the local image {}", image.name))?
            }
            Source::Archive(path) => archive::import(path, cache).with_context(|| {
                format!("image {}: taking it from {}", image.name, path.display())
            })?,
        };
        progress.note(&format!(
            "image {:<10} {} {} ({} bytes)",
            image.name,
            image.source.kind_name(),
            stored.digest,
            stored.size()
        ));
        out.push(embed::Embedded { image, stored });
    }
    Ok(out)
}

/// The manifest's record of every image.
pub fn manifest_entries(
    planned: &[PlannedImage],
    embedded: &[embed::Embedded],
) -> Vec<ManifestImage> {
    planned
        .iter()
        .map(|image| {
            let stored = embedded.iter().find(|e| e.image.name == image.name);
            let pinned = image
                .upstream
                .rsplit_once('@')
                .and_then(|(_, d)| d.parse().ok())
                .expect("references are checked to be pinned");
            ManifestImage {
                name: image.name.clone(),
                description: image.description.clone(),
                source: image.source.kind_name().into(),
                embedded: stored.is_some(),
                reference: match stored {
                    Some(_) => image.embedded_ref(),
                    None => image.upstream.clone(),
                },
                upstream: image.upstream.clone(),
                digest: stored.map_or(pinned, |e| e.stored.digest),
                size: stored.map(|e| e.stored.size()),
                used_by: image.users.clone(),
            }
        })
        .collect()
}

/// Chooses each needed image's source from the values. `needed` holds, per
/// image, its declaration and the layers using it. All problems at once.
pub fn plan_images(
    project: &Project,
    needed: &BTreeMap<String, (ImageDecl, Vec<String>)>,
    values: &Values,
) -> Result<Vec<PlannedImage>> {
    let offline = values.get(OFFLINE) == Some(&Json::Bool(true));
    let pull = values.get(PULL_IMAGES) == Some(&Json::Bool(true));
    if offline && pull && !needed.is_empty() {
        return Err(usage(format!(
            "{OFFLINE} = true refuses every pull and {PULL_IMAGES} = true asks to pull every \
             image: set one of them, not both"
        )));
    }
    let mut planned = Vec::new();
    let mut problems = Vec::new();
    for (name, (decl, users)) in needed {
        let text = |k: String| values.get(&k).and_then(Json::as_str).map(str::to_string);
        let upstream = text(reference_value(name)).unwrap_or_else(|| decl.upstream.clone());
        let chosen = text(source_value(name)).unwrap_or_else(|| "auto".into());
        let recipe = project.local_images_dir().join(name);
        let has_recipe = recipe.join("recipe.toml").is_file();
        let used_by = format!("used by layer {}", users.join(", "));
        let source = match chosen.as_str() {
            "upstream" if offline => Err(format!(
                "image {name} ({used_by}): {} = upstream, but offline = true forbids pulling; \
                 choose local or archive:PATH, or drop offline",
                source_value(name)
            )),
            "upstream" => Ok(Source::Upstream),
            "local" if has_recipe => Ok(Source::Local(recipe)),
            "local" => Err(format!(
                "image {name} ({used_by}): {} = local, but there is no recipe {}; \
                 supply an archive instead: --set {}=archive:/path/to/{name}.oci.tar",
                source_value(name),
                recipe.join("recipe.toml").display(),
                source_value(name)
            )),
            "auto" if pull => Ok(Source::Upstream),
            "auto" if has_recipe => Ok(Source::Local(recipe)),
            "auto" if !offline => Ok(Source::Upstream),
            "auto" => Err(format!(
                "image {name} ({used_by}) must be embedded because offline = true, and it has no \
                 local recipe. Provide it one of two ways: (1) an OCI archive made where the \
                 registry is reachable — `skopeo copy docker://{} oci-archive:{name}.oci.tar` — \
                 then --set {}=archive:{name}.oci.tar; (2) a recipe that builds it from Debian \
                 packages or PyPI wheels, in {}",
                strip_tag(&upstream),
                source_value(name),
                recipe.join("recipe.toml").display()
            )),
            other => {
                let path = other
                    .strip_prefix("archive:")
                    .expect("the pattern allows only these");
                let path = std::path::absolute(path).unwrap_or_else(|_| PathBuf::from(path));
                if path.exists() {
                    Ok(Source::Archive(path))
                } else {
                    Err(format!(
                        "image {name}: {} = {other}, but {} does not exist; give the path of an \
                         OCI archive (skopeo copy ... oci-archive:FILE) or an OCI layout directory",
                        source_value(name),
                        path.display()
                    ))
                }
            }
        };
        match source {
            Ok(source) => planned.push(PlannedImage {
                name: name.clone(),
                description: decl.description.clone(),
                upstream,
                source,
                users: users.clone(),
            }),
            Err(problem) => problems.push(problem),
        }
    }
    if problems.is_empty() {
        Ok(planned)
    } else {
        Err(usage(problems.join("\n")))
    }
}

/// The registry host of a reference (`docker.io` when it names none, as
/// Podman's short names would resolve to it with the appliance's settings).
pub fn registry(reference: &str) -> &str {
    match reference.split_once('/') {
        Some((first, _)) if first.contains(['.', ':']) || first == "localhost" => first,
        _ => "docker.io",
    }
}

/// skopeo refuses `name:tag@digest`: keep the digest.
pub fn strip_tag(reference: &str) -> String {
    match reference.split_once('@') {
        Some((name, digest)) => {
            let last = name.rfind('/').map_or(0, |i| i + 1);
            let name = match name[last..].find(':') {
                Some(colon) => &name[..last + colon],
                None => name,
            };
            format!("{name}@{digest}")
        }
        None => reference.to_string(),
    }
}

/// Images a layer declares (their `when` holding) or uses.
pub fn layer_images<'a>(
    layer: &'a Layer,
    declared_needed: &dyn Fn(&ImageDecl) -> bool,
) -> BTreeSet<&'a str> {
    layer
        .def
        .images
        .iter()
        .filter(|(_, d)| declared_needed(d))
        .map(|(n, _)| n.as_str())
        .chain(layer.def.use_images.iter().map(String::as_str))
        .collect()
}

/// Every image declaration of the candidate layers; two declarations of one
/// name must agree (as values do).
pub fn collect_decls(layers: &[Layer]) -> Result<BTreeMap<String, (String, ImageDecl)>> {
    let mut decls: BTreeMap<String, (String, ImageDecl)> = BTreeMap::new();
    for layer in layers {
        for (name, decl) in &layer.def.images {
            match decls.get(name) {
                Some((first, existing)) if existing != decl => {
                    return Err(anyhow!(
                        "image {name} is declared differently in layers/{first}/layer.toml and \
                         layers/{}/layer.toml; declare it in one layer and list it in the other's \
                         use_images",
                        layer.name
                    ))
                }
                Some(_) => {}
                None => {
                    decls.insert(name.clone(), (layer.name.clone(), decl.clone()));
                }
            }
        }
    }
    for layer in layers {
        for name in &layer.def.use_images {
            if !decls.contains_key(name) {
                return Err(anyhow!(
                    "layers/{}/layer.toml: use_images names {name:?}, which no layer of the \
                     profile declares in [images]{}",
                    layer.name,
                    crate::error::did_you_mean(name, decls.keys().map(String::as_str))
                ));
            }
        }
    }
    Ok(decls)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registries_are_named_as_podman_resolves_them() {
        assert_eq!(
            registry("dock.mau.dev/mautrix/signal:v1@sha256:00"),
            "dock.mau.dev"
        );
        assert_eq!(registry("docker.io/library/nginx:1"), "docker.io");
        assert_eq!(registry("localhost:5000/a@sha256:00"), "localhost:5000");
        assert_eq!(registry("library/nginx"), "docker.io");
    }

    #[test]
    fn tags_are_stripped_before_digests_only() {
        assert_eq!(
            strip_tag("docker.io/a/b:v1@sha256:00"),
            "docker.io/a/b@sha256:00"
        );
        assert_eq!(
            strip_tag("localhost:5000/a@sha256:00"),
            "localhost:5000/a@sha256:00"
        );
        assert_eq!(strip_tag("a/b:v1"), "a/b:v1");
    }
}
