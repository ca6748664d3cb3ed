//! `images/local/<name>/recipe.toml`: how the builder makes an image from
//! Debian packages (the base layer, by mmdebstrap) and PyPI wheels plus the
//! recipe's own files (the application layer).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use crate::cache::Key;
use crate::digest::Digest;
use crate::layer::{FileAttrs, SourceNode};
use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

pub use crate::debian::{User, SUITE};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RecipeToml {
    pub description: String,
    /// Version of the packaged software (the image's version label).
    pub version: String,
    /// Take the files of the application layer from a sibling recipe's
    /// `root/` (by its directory name) instead of this one's: images of two
    /// versions of a program that share them (an entrypoint).
    #[serde(default)]
    pub files_of: Option<String>,
    pub base: Base,
    pub python: Option<Python>,
    /// Modes and owners of files under root/, by glob.
    #[serde(default)]
    pub files: BTreeMap<String, FileAttrs>,
    pub config: RunConfig,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Base {
    /// The Debian suite, when not the builder's own (e.g. "forky" for a
    /// PostgreSQL major trixie lacks). Left out of the key when unset, so
    /// that existing recipes keep their digests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suite: Option<String>,
    /// Debian packages (with their dependencies) on top of Essential ones.
    pub packages: Vec<String>,
    /// Users made before the packages install, so IDs are fixed.
    #[serde(default)]
    pub users: Vec<User>,
    /// Files written before the packages install (to steer postinsts).
    #[serde(default)]
    pub preseed: BTreeMap<String, String>,
    /// Globs removed after installation (generated keys, caches).
    #[serde(default)]
    pub remove: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Python {
    /// Absolute path of the venv in the image.
    pub venv: String,
    /// pip requirements with hashes, relative to the recipe directory: the
    /// whole dependency closure (pip installs with --no-deps).
    pub requirements: String,
    /// Let the venv see the base's Debian Python packages, for a dependency
    /// PyPI has no wheel of (installed from Debian in `[base] packages`).
    #[serde(default)]
    pub system_site_packages: bool,
}

/// The OCI image config's run settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    pub user: Option<String>,
    #[serde(default)]
    pub entrypoint: Vec<String>,
    #[serde(default)]
    pub cmd: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub working_dir: Option<String>,
    #[serde(default)]
    pub ports: Vec<String>,
    pub stop_signal: Option<String>,
}

/// A recipe as read from disk.
#[derive(Debug, Clone)]
pub struct Recipe {
    pub name: String,
    pub dir: PathBuf,
    pub def: RecipeToml,
    pub toml_text: String,
    /// The pip requirements text, if the recipe has a venv.
    pub requirements: Option<String>,
    /// root/, read as a layer's root is.
    pub files: BTreeMap<Vec<u8>, SourceNode>,
}

impl Recipe {
    pub fn load(name: &str, dir: &Path) -> Result<Recipe> {
        let path = dir.join("recipe.toml");
        let toml_text =
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let def: RecipeToml = toml::from_str(&toml_text)
            .map_err(|e| anyhow!("{}: {}", path.display(), e.to_string().trim_end()))?;
        let shown = path.display();
        if def.base.packages.is_empty() {
            bail!("{shown}: [base] packages is empty; list the Debian packages the image needs");
        }
        for p in &def.base.packages {
            let ok = !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+-.".contains(&b));
            if !ok {
                bail!("{shown}: [base] packages: {p:?} is not a Debian package name");
            }
        }
        for u in &def.base.users {
            u.check()
                .map_err(|why| anyhow!("{shown}: [base] users: {why}"))?;
        }
        for p in def.base.preseed.keys().chain(&def.base.remove) {
            crate::tree::check_relative_path(p.as_bytes())
                .map_err(|why| anyhow!("{shown}: [base] {p:?}: {why}"))?;
        }
        let requirements = match &def.python {
            Some(py) => {
                if !py.venv.starts_with('/') || py.venv.len() < 2 || py.venv.contains("..") {
                    bail!("{shown}: [python] venv must be an absolute path such as /opt/app");
                }
                let req = dir.join(&py.requirements);
                let text = fs::read_to_string(&req).with_context(|| {
                    format!("{shown}: reading [python] requirements {}", req.display())
                })?;
                if !text.contains("--hash=sha256:") {
                    bail!("{}: pin every requirement with --hash=sha256:... (pip's hash-checking mode)", req.display());
                }
                Some(text)
            }
            None => None,
        };
        let root = match &def.files_of {
            Some(sibling) => {
                let ok = !sibling.is_empty()
                    && sibling.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-'
                    });
                let root = dir.with_file_name(sibling).join("root");
                if !ok || !root.is_dir() {
                    bail!("{shown}: files_of = {sibling:?} names no recipe beside this one with a root/ directory");
                }
                root
            }
            None => dir.join("root"),
        };
        let files = if root.is_dir() {
            crate::layer::read_sources(&root)?
        } else {
            BTreeMap::new()
        };
        for (pattern, attrs) in &def.files {
            attrs
                .mode_bits()
                .map_err(|why| anyhow!("{shown}: [files.\"{pattern}\"]: {why}"))?;
        }
        Ok(Recipe {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            def,
            toml_text,
            requirements,
            files,
        })
    }

    /// The Debian suite the base comes from.
    pub fn suite(&self) -> &str {
        self.def.base.suite.as_deref().unwrap_or(SUITE)
    }

    /// What decides the base layer: packages, users, preseeds, removals
    /// (the recipe's and the builder's own `always_removed`).
    pub fn base_key(&self, mirror: &str, always_removed: &[&str], epoch: u64) -> Digest {
        let mut key = Key::new("builder local base v2", epoch);
        key.add(SUITE.as_bytes())
            .add(mirror.as_bytes())
            .add(&serde_json::to_vec(&self.def.base).expect("serialises"))
            .add(always_removed.join("\n").as_bytes());
        key.finish()
    }

    /// What decides the application layer and the config, given the base.
    /// (v3: venvs made before chroot commands ran with umask 022 could carry
    /// the builder's umask; such cached layers are not reused.)
    pub fn app_key(&self, base: &Digest, epoch: u64) -> Digest {
        let mut key = Key::new("builder local app v3", epoch);
        key.add(base.to_string().as_bytes())
            .add(self.toml_text.as_bytes())
            .add(self.requirements.as_deref().unwrap_or("").as_bytes())
            .add_sources(&self.files);
        key.finish()
    }
}
