//! A layer as it lies on disk: `layers/<name>/layer.toml` and the file tree
//! under `layers/<name>/root/`, read into memory (layers are small) with
//! every check that needs only the layer itself.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use crate::tree::check_relative_path;
use crate::values::ValueSpec;

/// `layer.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerToml {
    pub description: String,
    /// Layer names or capabilities that other layers of the profile provide.
    #[serde(default)]
    pub requires: Vec<String>,
    /// Capabilities this layer provides (besides its own name).
    #[serde(default)]
    pub provides: Vec<String>,
    /// Layers or capabilities that must not be in the same profile.
    #[serde(default)]
    pub conflicts: Vec<String>,
    /// Include the layer only when every named value equals the given one
    /// (or, for a list value, contains it).
    #[serde(default)]
    pub when: BTreeMap<String, toml::Value>,
    /// The site values the layer reads, with their declarations.
    #[serde(default)]
    pub values: BTreeMap<String, ValueSpec>,
    /// Attributes that differ from 0644/0755 root, by glob over output paths.
    #[serde(default)]
    pub files: BTreeMap<String, FileAttrs>,
    /// JSON documents built from a TOML table by serde, by output path.
    #[serde(default)]
    pub json: BTreeMap<String, toml::Table>,
    /// A document of `json` is written only when every named value equals
    /// the given one (as the layer's `when`), by output path.
    #[serde(default)]
    pub json_when: BTreeMap<String, BTreeMap<String, toml::Value>>,
    /// Container images the layer brings, by image name.
    #[serde(default)]
    pub images: BTreeMap<String, crate::image_decl::ImageDecl>,
    /// Images other layers declare that this layer's templates use.
    #[serde(default)]
    pub use_images: Vec<String>,
    /// Files or directories of the layer's output that `build` also copies
    /// into the output directory: output path → path under `--out`.
    #[serde(default)]
    pub exports: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FileAttrs {
    /// Octal, as a string: "0755", "0600", "4755".
    pub mode: Option<String>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

impl FileAttrs {
    pub fn mode_bits(&self) -> Result<Option<u32>, String> {
        self.mode
            .as_deref()
            .map(|m| match u32::from_str_radix(m, 8) {
                Ok(bits) if bits <= 0o7777 && !m.is_empty() => Ok(bits),
                _ => Err(format!("mode {m:?} is not an octal mode such as \"0755\"")),
            })
            .transpose()
    }
}

/// One thing under `root/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceNode {
    Dir,
    File(Vec<u8>),
    Symlink(Vec<u8>),
}

#[derive(Debug, Clone)]
pub struct Layer {
    pub name: String,
    pub toml_text: String,
    pub def: LayerToml,
    /// Paths relative to `root/`, as bytes, in byte order.
    pub sources: BTreeMap<Vec<u8>, SourceNode>,
}

/// Layer names are used in paths, tar annotations and messages.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a valid name: use lower-case letters, digits and '-'"
        ))
    }
}

impl Layer {
    pub fn load(layers_dir: &Path, name: &str) -> Result<Layer> {
        check_name(name).map_err(anyhow::Error::msg)?;
        let dir = layers_dir.join(name);
        let toml_path = dir.join("layer.toml");
        let toml_text = fs::read_to_string(&toml_path)
            .with_context(|| format!("reading {}", toml_path.display()))?;
        let def: LayerToml = toml::from_str(&toml_text).map_err(|e| {
            anyhow::anyhow!("{}: {}", toml_path.display(), e.to_string().trim_end())
        })?;
        for (name, decl) in &def.images {
            crate::image_decl::check_decl(name, decl).map_err(|why| {
                anyhow::anyhow!("{}: [images.{name}]: {why}", toml_path.display())
            })?;
        }
        if def.values.contains_key("images") {
            bail!(
                "{}: [values.images]: the name `images` is reserved for the images templates use;                  rename the value",
                toml_path.display()
            );
        }
        for (value, spec) in &def.values {
            spec.check().map_err(|why| {
                anyhow::anyhow!("{}: [values.{value}]: {why}", toml_path.display())
            })?;
        }
        for pattern in def.files.keys() {
            check_relative_path(pattern.as_bytes()).map_err(|why| {
                anyhow::anyhow!(
                    "{}: [files.\"{pattern}\"]: {why}; paths are relative to root/, e.g. \"usr/libexec/x\"",
                    toml_path.display()
                )
            })?;
        }
        for (path, doc) in &def.json {
            check_relative_path(path.as_bytes()).map_err(|why| {
                anyhow::anyhow!("{}: [json.\"{path}\"]: {why}", toml_path.display())
            })?;
            for name in crate::jsondoc::references(doc) {
                if !def.values.contains_key(&name) {
                    bail!(
                        "{}: [json.\"{path}\"] uses ${{{name}}}, which the layer does not declare; \
                         add [values.{name}]",
                        toml_path.display()
                    );
                }
            }
        }
        for (path, when) in &def.json_when {
            if !def.json.contains_key(path) {
                bail!(
                    "{}: [json_when.\"{path}\"] names no [json.\"{path}\"] document",
                    toml_path.display()
                );
            }
            for name in when.keys() {
                if !def.values.contains_key(name) {
                    bail!(
                        "{}: [json_when.\"{path}\"] uses {name}, which the layer does not declare; \
                         add [values.{name}]",
                        toml_path.display()
                    );
                }
            }
        }
        for (from, to) in &def.exports {
            for p in [from, to] {
                check_relative_path(p.as_bytes()).map_err(|why| {
                    anyhow::anyhow!("{}: [exports] {p:?}: {why}", toml_path.display())
                })?;
            }
        }
        for (pattern, attrs) in &def.files {
            attrs.mode_bits().map_err(|why| {
                anyhow::anyhow!("{}: [files.\"{pattern}\"]: {why}", toml_path.display())
            })?;
        }
        let root = dir.join("root");
        let sources = match fs::symlink_metadata(&root) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", root.display())),
            Ok(m) if !m.is_dir() => bail!("{} must be a directory", root.display()),
            Ok(_) => read_sources(&root)?,
        };
        Ok(Layer {
            name: name.to_string(),
            toml_text,
            def,
            sources,
        })
    }

    /// Capabilities: its own name and what it declares.
    pub fn provides(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.name.as_str()).chain(self.def.provides.iter().map(String::as_str))
    }

    /// A hash of everything in the layer's own files that can change its
    /// output: layer.toml and every source path, kind and content. File
    /// system metadata (mtimes, modes, owners) is deliberately not part of it.
    pub fn source_hash(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        field(&mut h, self.toml_text.as_bytes());
        hash_sources(&mut h, &self.sources);
        h.finalize().into()
    }
}

/// Feeds a source tree (paths, kinds, contents) into a hash.
pub fn hash_sources(h: &mut Sha256, sources: &BTreeMap<Vec<u8>, SourceNode>) {
    for (path, node) in sources {
        field(h, path);
        match node {
            SourceNode::Dir => field(h, b"dir"),
            SourceNode::File(bytes) => {
                field(h, b"file");
                field(h, bytes);
            }
            SourceNode::Symlink(target) => {
                field(h, b"symlink");
                field(h, target);
            }
        }
    }
}

/// Length-prefixed, so no two different field lists hash alike.
pub fn field(h: &mut Sha256, bytes: &[u8]) {
    h.update((bytes.len() as u64).to_le_bytes());
    h.update(bytes);
}

pub fn read_sources(root: &Path) -> Result<BTreeMap<Vec<u8>, SourceNode>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![(root.to_path_buf(), Vec::<u8>::new())];
    while let Some((dir, rel)) = stack.pop() {
        for item in fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
            let item = item.with_context(|| format!("listing {}", dir.display()))?;
            let path = item.path();
            let mut item_rel = rel.clone();
            if !item_rel.is_empty() {
                item_rel.push(b'/');
            }
            item_rel.extend_from_slice(item.file_name().as_bytes());
            let ft = fs::symlink_metadata(&path)
                .with_context(|| format!("reading {}", path.display()))?
                .file_type();
            let node = if ft.is_dir() {
                stack.push((path.clone(), item_rel.clone()));
                SourceNode::Dir
            } else if ft.is_file() {
                SourceNode::File(
                    fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
                )
            } else if ft.is_symlink() {
                let target =
                    fs::read_link(&path).with_context(|| format!("reading {}", path.display()))?;
                let target = target.as_os_str().as_bytes().to_vec();
                check_link_stays_inside(&item_rel, &target).map_err(|why| {
                    anyhow::anyhow!(
                        "{} is a symlink to {}, which {why}; point it at a path inside the image \
                         (relative within the layer, or absolute like /usr/lib/...)",
                        path.display(),
                        String::from_utf8_lossy(&target)
                    )
                })?;
                SourceNode::Symlink(target)
            } else {
                bail!(
                    "{} is not a regular file, directory or symlink; layers hold only those \
                     (device nodes and fifos belong in the base image)",
                    path.display()
                );
            };
            out.insert(item_rel, node);
        }
    }
    Ok(out)
}

/// A relative link target, resolved from the link's directory, must not
/// climb above the layer root. Absolute targets name paths in the image and
/// are resolved there at run time, never on the build host.
pub fn check_link_stays_inside(link_path: &[u8], target: &[u8]) -> Result<(), String> {
    if target.is_empty() {
        return Err("is empty".into());
    }
    if target.starts_with(b"/") {
        return Ok(());
    }
    let mut depth: i64 = link_path.split(|b| *b == b'/').count() as i64 - 1;
    for component in target.split(|b| *b == b'/') {
        match component {
            b"" | b"." => {}
            b".." => {
                depth -= 1;
                if depth < 0 {
                    return Err("points outside the layer".into());
                }
            }
            _ => depth += 1,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_targets() {
        assert!(check_link_stays_inside(b"etc/a", b"../usr/b").is_ok());
        assert!(check_link_stays_inside(b"etc/a", b"/usr/lib/x").is_ok());
        assert!(check_link_stays_inside(b"etc/a", b"../../etc/passwd").is_err());
        assert!(check_link_stays_inside(b"a", b"x/../../y").is_err());
        assert!(check_link_stays_inside(b"a/b/c", b"d/../../../e").is_ok());
        assert!(check_link_stays_inside(b"a", b"").is_err());
    }

    #[test]
    fn names_and_modes() {
        assert!(check_name("proxy-nginx").is_ok());
        for bad in ["", "../x", "Synapse", "a/b", "-x"] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        let attrs = |m: &str| FileAttrs {
            mode: Some(m.into()),
            uid: None,
            gid: None,
        };
        assert_eq!(attrs("4755").mode_bits(), Ok(Some(0o4755)));
        assert!(attrs("0799").mode_bits().is_err());
        assert!(attrs("17777").mode_bits().is_err());
    }
}
