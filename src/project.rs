//! Where the shipped data lives: a project directory holding `layers/`,
//! `profiles/` and `images/`.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::error::usage;

#[derive(Debug, Clone)]
pub struct Project {
    pub root: PathBuf,
}

impl Project {
    /// `explicit` if given, else the nearest of the current directory and
    /// its parents that holds both `layers/` and `profiles/`.
    pub fn locate(explicit: Option<&Path>) -> Result<Project> {
        if let Some(dir) = explicit {
            if dir.join("layers").is_dir() && dir.join("profiles").is_dir() {
                return Ok(Project {
                    root: dir.to_path_buf(),
                });
            }
            return Err(usage(format!(
                "{} has no layers/ and profiles/ directories; pass the project checkout to --project",
                dir.display()
            )));
        }
        let cwd = std::env::current_dir().context("reading the current directory")?;
        for dir in cwd.ancestors() {
            if dir.join("layers").is_dir() && dir.join("profiles").is_dir() {
                return Ok(Project {
                    root: dir.to_path_buf(),
                });
            }
        }
        Err(usage(format!(
            "no layers/ and profiles/ found in {} or its parents; run builder from the project \
             checkout or pass --project DIR",
            cwd.display()
        )))
    }

    pub fn layers_dir(&self) -> PathBuf {
        self.root.join("layers")
    }

    pub fn profiles_dir(&self) -> PathBuf {
        self.root.join("profiles")
    }

    pub fn images_dir(&self) -> PathBuf {
        self.root.join("images")
    }

    /// Recipes of container images the builder can build itself:
    /// `images/local/<image>/recipe.toml`.
    pub fn local_images_dir(&self) -> PathBuf {
        self.images_dir().join("local")
    }

    /// Names of the layer directories, sorted.
    pub fn layer_names(&self) -> Result<Vec<String>> {
        names_in(&self.layers_dir(), |p| p.join("layer.toml").is_file(), None)
    }

    /// Names of `profiles/*.toml`, sorted.
    pub fn profile_names(&self) -> Result<Vec<String>> {
        names_in(&self.profiles_dir(), Path::is_file, Some("toml"))
    }

    /// Names of `images/*.toml`, sorted.
    pub fn image_kinds(&self) -> Result<Vec<String>> {
        names_in(&self.images_dir(), Path::is_file, Some("toml"))
    }
}

fn names_in(dir: &Path, keep: impl Fn(&Path) -> bool, ext: Option<&str>) -> Result<Vec<String>> {
    let mut names = Vec::new();
    let listing = match fs::read_dir(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(names),
        other => other.with_context(|| format!("listing {}", dir.display()))?,
    };
    for item in listing {
        let path = item
            .with_context(|| format!("listing {}", dir.display()))?
            .path();
        if !keep(&path) {
            continue;
        }
        let name = match ext {
            Some(ext) if path.extension().is_some_and(|e| e == ext) => path.file_stem(),
            Some(_) => None,
            None => path.file_name(),
        };
        if let Some(name) = name.and_then(|n| n.to_str()) {
            names.push(name.to_string());
        }
    }
    names.sort();
    Ok(names)
}
