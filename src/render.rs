//! Turns a planned layer into its file tree (templates rendered, `.tera`
//! dropped, declared modes and owners applied), and lays trees over each
//! other for `builder render`.

use std::collections::BTreeMap;

use anyhow::{anyhow, Context, Result};
use globset::{GlobBuilder, GlobMatcher};
use serde_json::Value as Json;

use crate::layer::{FileAttrs, Layer, SourceNode};
use crate::template;
use crate::tree::{Content, Entry, Node, Tree};

const TEMPLATE_SUFFIX: &[u8] = b".tera";

pub fn layer_tree(layer: &Layer, values: &BTreeMap<String, Json>) -> Result<Tree> {
    let mut tree = Tree::new();
    for (path, node) in &layer.sources {
        let shown = format!(
            "layers/{}/root/{}",
            layer.name,
            String::from_utf8_lossy(path)
        );
        let (out_path, entry) = match node {
            SourceNode::Dir => (path.clone(), Entry::dir()),
            SourceNode::Symlink(target) => (path.clone(), Entry::symlink(target.clone())),
            SourceNode::File(bytes) => match path.strip_suffix(TEMPLATE_SUFFIX) {
                Some(stem) if stem.is_empty() || stem.ends_with(b"/") => {
                    return Err(anyhow!("{shown}: a template needs a name before .tera"))
                }
                Some(stem) => {
                    let source = std::str::from_utf8(bytes)
                        .map_err(|_| anyhow!("{shown}: templates must be UTF-8 text"))?;
                    let rendered = template::render(&shown, source, values)?;
                    if layer.sources.contains_key(stem) {
                        return Err(anyhow!(
                            "{shown} renders to {}, which the layer also has as a plain file; keep one",
                            String::from_utf8_lossy(stem)
                        ));
                    }
                    (
                        stem.to_vec(),
                        Entry::file(Content::Bytes(rendered.into_bytes())),
                    )
                }
                None => (path.clone(), Entry::file(Content::Bytes(bytes.clone()))),
            },
        };
        tree.insert(&out_path, entry)
            .with_context(|| shown.clone())?;
    }
    for (path, table) in &layer.def.json {
        let shown = format!("layers/{}/layer.toml: [json.\"{path}\"]", layer.name);
        if tree.get(path.as_bytes()).is_some() {
            return Err(anyhow!("{shown}: root/ also has {path}; keep one"));
        }
        let doc = crate::jsondoc::build(table, values).map_err(|why| anyhow!("{shown} {why}"))?;
        let mut bytes = serde_json::to_vec_pretty(&doc)?;
        bytes.push(b'\n');
        tree.insert(path.as_bytes(), Entry::file(Content::Bytes(bytes)))
            .with_context(|| shown.clone())?;
    }
    let file = format!("layers/{}/layer.toml", layer.name);
    apply_attributes(&layer.def.files, &file, &mut tree)?;
    Ok(tree)
}

/// Applies `[files."<glob>"]` (of layer.toml or a recipe, named `file`).
/// A pattern that matches nothing is an error: it is almost always a typo.
pub fn apply_attributes(
    files: &BTreeMap<String, FileAttrs>,
    file: &str,
    tree: &mut Tree,
) -> Result<()> {
    for (pattern, attrs) in files {
        let matcher = glob(pattern).with_context(|| format!("{file}: [files.\"{pattern}\"]"))?;
        let mode = attrs.mode_bits().map_err(anyhow::Error::msg)?;
        let paths: Vec<Vec<u8>> = tree
            .iter()
            .filter(|(p, _)| matcher.is_match(std::str::from_utf8(p).unwrap_or("")))
            .map(|(p, _)| p.to_vec())
            .collect();
        if paths.is_empty() {
            return Err(anyhow!(
                "{file}: [files.\"{pattern}\"] matches no path under root/ \
                 (patterns name output paths under root/, without .tera)"
            ));
        }
        for path in paths {
            let entry = tree.get_mut(&path).expect("path came from the tree");
            if let Some(m) = mode {
                if matches!(entry.node, Node::Symlink(_)) {
                    return Err(anyhow!(
                        "{file}: [files.\"{pattern}\"] sets a mode on the symlink {}; \
                         symlinks have no mode of their own",
                        String::from_utf8_lossy(&path)
                    ));
                }
                entry.mode = m;
            }
            if let Some(uid) = attrs.uid {
                entry.uid = uid;
            }
            if let Some(gid) = attrs.gid {
                entry.gid = gid;
            }
        }
    }
    Ok(())
}

fn glob(pattern: &str) -> Result<GlobMatcher> {
    Ok(GlobBuilder::new(pattern)
        .literal_separator(true)
        .build()?
        .compile_matcher())
}

/// Lays `upper` over `lower`. Directories merge; a file, link or device at a
/// path another layer already has is an error naming both layers, since
/// which one wins would otherwise depend on order silently.
pub fn overlay(
    lower: &mut Tree,
    owners: &mut BTreeMap<Vec<u8>, String>,
    upper: &Tree,
    layer: &str,
) -> Result<()> {
    for (path, entry) in upper.iter() {
        match lower.get(path) {
            Some(existing) if existing.node == Node::Dir && entry.node == Node::Dir => {
                if existing != entry {
                    return Err(anyhow!(
                        "layers {} and {layer} give the directory {} different modes or owners; make them agree",
                        owners.get(path).map_or("(parent)", String::as_str),
                        String::from_utf8_lossy(path)
                    ));
                }
            }
            Some(_) => {
                return Err(anyhow!(
                    "layers {} and {layer} both write {}; one layer owns each file",
                    owners.get(path).map_or("(parent)", String::as_str),
                    String::from_utf8_lossy(path)
                ))
            }
            None => {
                lower.insert(path, entry.clone())?;
                owners.insert(path.to_vec(), layer.to_string());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_do_not_cross_directories() {
        let m = glob("usr/libexec/x/*").unwrap();
        assert!(m.is_match("usr/libexec/x/run"));
        assert!(!m.is_match("usr/libexec/x/sub/run"));
        assert!(glob("usr/**/run").unwrap().is_match("usr/a/b/run"));
    }
}
