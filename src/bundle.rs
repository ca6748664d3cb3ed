//! The bundle: one uncompressed tar in the OCI image layout (an
//! `oci-archive`, which skopeo, podman and umoci read), holding the layer
//! blobs, an OCI image config and manifest, the builder manifest
//! (`builder-manifest.json`) and `SHA256SUMS` over every other file.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::json;

use crate::digest::{Digest, HashingReader};
use crate::manifest::Manifest;
use crate::oci;
use crate::pack::write_tar;
use crate::tree::{Content, Entry, Tree};

pub const BUILDER_MANIFEST: &str = "builder-manifest.json";
pub const SUMS: &str = "SHA256SUMS";

/// Writes the bundle for `manifest` into `out`; `blob_of` says where each
/// layer's gzip blob lies. Returns the writer and the bundle's size.
pub fn write<W: Write>(
    manifest: &Manifest,
    blob_of: impl Fn(&Digest) -> PathBuf,
    out: W,
) -> Result<W> {
    let layers: Vec<oci::LayerBlob> = manifest
        .layers
        .iter()
        .map(|l| oci::LayerBlob {
            digest: l.digest,
            diff_id: l.diff_id,
            size: l.compressed_size,
            title: l.name.clone(),
            comment: l.description.clone(),
        })
        .collect();
    let run = json!({
        "Labels": {
            "org.opencontainers.image.title": manifest.profile,
            "org.opencontainers.image.version": manifest.builder_version,
        }
    });
    let config = oci::image_config(run, &layers, manifest.epoch);
    let oci_manifest = oci::image_manifest(&config, &layers, manifest.epoch);
    let index = oci::layout_index([(manifest.profile.as_str(), oci_manifest.as_slice())]);

    let mut files: BTreeMap<String, Content> = BTreeMap::new();
    for layer in &manifest.layers {
        let path = blob_of(&layer.digest);
        files.insert(
            blob_name(&layer.digest),
            Content::File {
                path,
                size: layer.compressed_size,
            },
        );
    }
    files.insert(blob_name(&Digest::of(&config)), Content::Bytes(config));
    files.insert(
        blob_name(&Digest::of(&oci_manifest)),
        Content::Bytes(oci_manifest),
    );
    files.insert("index.json".into(), Content::Bytes(index));
    files.insert("oci-layout".into(), Content::Bytes(oci::LAYOUT.to_vec()));
    files.insert(
        BUILDER_MANIFEST.into(),
        Content::Bytes(manifest.to_canonical_json()),
    );

    let mut sums = String::new();
    for (path, content) in &files {
        let digest = match content {
            Content::Bytes(b) => Digest::of(b),
            // Blob files are named by their digest; the cache checked it.
            Content::File { .. } => path
                .rsplit('/')
                .next()
                .unwrap_or_default()
                .parse()
                .map_err(anyhow::Error::msg)?,
        };
        sums.push_str(&format!("{}  {path}\n", digest.hex()));
    }
    files.insert(SUMS.into(), Content::Bytes(sums.into_bytes()));

    let mut tree = Tree::new();
    for (path, content) in files {
        tree.insert(path.as_bytes(), Entry::file(content))?;
    }
    let (out, _) = write_tar(&tree, manifest.epoch, out)?;
    Ok(out)
}

pub use oci::blob_name;

/// One regular file of a bundle as read back.
#[derive(Debug, Clone)]
pub struct BundleFile {
    pub digest: Digest,
    pub size: u64,
    /// Kept for small files (JSON documents, sums), not for layer blobs.
    pub bytes: Option<Vec<u8>>,
}

/// Everything in a bundle tar, by path.
#[derive(Debug, Clone)]
pub struct Bundle {
    pub path: PathBuf,
    pub files: BTreeMap<String, BundleFile>,
    /// Entries that are not regular files (a bundle has only directories).
    pub others: Vec<String>,
}

const KEEP_BYTES_BELOW: u64 = 1 << 20;

impl Bundle {
    pub fn read(path: &Path) -> Result<Bundle> {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let mut archive = tar::Archive::new(BufReader::new(file));
        let mut files = BTreeMap::new();
        let mut others = Vec::new();
        let entries = archive
            .entries()
            .with_context(|| format!("{} is not a tar archive", path.display()))?;
        for entry in entries {
            let entry = entry
                .with_context(|| format!("reading {}: the archive is damaged", path.display()))?;
            let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            match entry.header().entry_type() {
                tar::EntryType::Regular => {}
                tar::EntryType::Directory => continue,
                _ => {
                    others.push(name);
                    continue;
                }
            }
            let size = entry.size();
            let mut reader = HashingReader::new(entry);
            let bytes = if size < KEEP_BYTES_BELOW {
                let mut b = Vec::new();
                reader
                    .read_to_end(&mut b)
                    .with_context(|| format!("reading {name} in {}", path.display()))?;
                Some(b)
            } else {
                None
            };
            let (digest, read) = reader
                .finish()
                .with_context(|| format!("reading {name} in {}", path.display()))?;
            if read != size {
                bail!("{name} in {} is truncated", path.display());
            }
            files.insert(
                name,
                BundleFile {
                    digest,
                    size,
                    bytes,
                },
            );
        }
        Ok(Bundle {
            path: path.to_path_buf(),
            files,
            others,
        })
    }

    pub fn bytes(&self, name: &str) -> Result<&[u8]> {
        self.files
            .get(name)
            .and_then(|f| f.bytes.as_deref())
            .ok_or_else(|| {
                anyhow!(
                    "{} has no {name}: it is not a bundle made by builder",
                    self.path.display()
                )
            })
    }

    pub fn manifest(&self) -> Result<Manifest> {
        serde_json::from_slice(self.bytes(BUILDER_MANIFEST)?)
            .with_context(|| format!("{BUILDER_MANIFEST} in {} is malformed", self.path.display()))
    }

    /// Streams each file named in `names` to `visit`, in the tar's order, in
    /// one pass over the tar (where `with_file` per name would read it again
    /// up to each).
    pub fn with_files(
        &self,
        names: &std::collections::BTreeSet<String>,
        mut visit: impl FnMut(&str, &mut dyn Read) -> Result<()>,
    ) -> Result<()> {
        let file =
            File::open(&self.path).with_context(|| format!("opening {}", self.path.display()))?;
        let mut archive = tar::Archive::new(BufReader::new(file));
        let mut seen = 0;
        for entry in archive.entries()? {
            let mut entry = entry?;
            let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            if names.contains(&name) {
                visit(&name, &mut entry)?;
                seen += 1;
            }
        }
        if seen != names.len() {
            bail!("{} lacks some of {names:?}", self.path.display());
        }
        Ok(())
    }

    /// Streams one file's bytes to `visit` (a second pass over the tar).
    pub fn with_file<T>(
        &self,
        name: &str,
        visit: impl FnOnce(&mut dyn Read) -> Result<T>,
    ) -> Result<T> {
        let file =
            File::open(&self.path).with_context(|| format!("opening {}", self.path.display()))?;
        let mut archive = tar::Archive::new(BufReader::new(file));
        for entry in archive.entries()? {
            let mut entry = entry?;
            if entry.path_bytes().as_ref() == name.as_bytes() {
                return visit(&mut entry);
            }
        }
        Err(anyhow!("{} has no {name}", self.path.display()))
    }
}

/// What a layer blob holds, decompressed.
#[derive(Debug, Clone)]
pub struct LayerContents {
    pub diff_id: Digest,
    pub size: u64,
    pub entries: Vec<LayerEntry>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct LayerEntry {
    pub path: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub mode: String,
    pub uid: u64,
    pub gid: u64,
    pub size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// Decompresses a gzip layer blob, hashing the tar and listing its entries.
pub fn read_layer(blob: &mut dyn Read) -> Result<LayerContents> {
    let gz = flate2::read::MultiGzDecoder::new(blob);
    let mut hashing = HashingReader::new(gz);
    let mut entries = Vec::new();
    {
        let mut archive = tar::Archive::new(&mut hashing);
        for entry in archive.entries().context("the layer is not a tar")? {
            let mut entry = entry.context("the layer tar is damaged")?;
            let h = entry.header().clone();
            let kind = match h.entry_type() {
                tar::EntryType::Regular => "file",
                tar::EntryType::Directory => "dir",
                tar::EntryType::Symlink => "symlink",
                tar::EntryType::Link => "hardlink",
                tar::EntryType::Char => "char",
                tar::EntryType::Block => "block",
                tar::EntryType::Fifo => "fifo",
                _ => "other",
            };
            let path = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            let target = entry
                .link_name_bytes()
                .map(|t| String::from_utf8_lossy(&t).into_owned());
            let sha256 = if kind == "file" {
                let mut r = HashingReader::new(&mut entry);
                io::copy(&mut r, &mut io::sink())?;
                Some(r.finish()?.0.hex())
            } else {
                None
            };
            entries.push(LayerEntry {
                path,
                kind,
                mode: format!("{:04o}", h.mode().unwrap_or(0)),
                uid: h.uid().unwrap_or(0),
                gid: h.gid().unwrap_or(0),
                size: h.size().unwrap_or(0),
                sha256,
                target,
            });
        }
    }
    let (diff_id, size) = hashing.finish().context("the layer blob is damaged")?;
    Ok(LayerContents {
        diff_id,
        size,
        entries,
    })
}
