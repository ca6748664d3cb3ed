//! `builder inspect`: what a bundle holds, for people (a table) or for
//! programs (versioned JSON).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use anyhow::Result;
use serde::Serialize;

use crate::bundle::{self, Bundle, LayerEntry};
use crate::digest::Digest;
use crate::manifest::Manifest;

#[derive(Debug, Serialize)]
pub struct InspectReport {
    pub version: u32,
    pub bundle: String,
    pub bundle_size: u64,
    pub manifest: Manifest,
    /// Per layer, its entries; only with `--files`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub files: Option<BTreeMap<String, Vec<LayerEntry>>>,
}

pub fn inspect(path: &std::path::Path, with_files: bool) -> Result<InspectReport> {
    let bundle = Bundle::read(path)?;
    let manifest = bundle.manifest()?;
    let files = if with_files {
        let mut all = BTreeMap::new();
        for l in &manifest.layers {
            let contents = bundle.with_file(&bundle::blob_name(&l.digest), bundle::read_layer)?;
            all.insert(l.name.clone(), contents.entries);
        }
        Some(all)
    } else {
        None
    };
    Ok(InspectReport {
        version: 1,
        bundle: path.display().to_string(),
        bundle_size: std::fs::metadata(path)?.len(),
        manifest,
        files,
    })
}

impl InspectReport {
    pub fn to_text(&self) -> String {
        let m = &self.manifest;
        let mut s = String::new();
        let created = humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(m.epoch),
        );
        let _ = writeln!(s, "bundle   {} ({} bytes)", self.bundle, self.bundle_size);
        let _ = writeln!(s, "profile  {}", m.profile);
        let _ = writeln!(s, "builder  {}", m.builder_version);
        let _ = writeln!(s, "epoch    {} ({created})", m.epoch);
        let _ = writeln!(s, "values");
        for (k, v) in &m.values {
            let _ = writeln!(s, "  {k} = {v}");
        }
        let _ = writeln!(s, "layers");
        let _ = writeln!(
            s,
            "  {:<16} {:<19} {:<19} {:>10} {:>10} {:>6}",
            "NAME", "ID (diff_id)", "BLOB", "SIZE", "GZIP", "FILES"
        );
        let short = |d: &Digest| format!("sha256:{}", d.short());
        for l in &m.layers {
            let _ = writeln!(
                s,
                "  {:<16} {:<19} {:<19} {:>10} {:>10} {:>6}",
                l.name,
                short(&l.diff_id),
                short(&l.digest),
                l.size,
                l.compressed_size,
                l.files
            );
        }
        if !m.images.is_empty() {
            let _ = writeln!(s, "images");
            let _ = writeln!(
                s,
                "  {:<16} {:<8} {:<8} {:<19} {:>10}  REFERENCE",
                "NAME", "SOURCE", "AT BOOT", "DIGEST", "SIZE"
            );
            for i in &m.images {
                let _ = writeln!(
                    s,
                    "  {:<16} {:<8} {:<8} {:<19} {:>10}  {}",
                    i.name,
                    i.source,
                    if i.embedded { "loaded" } else { "pulled" },
                    short(&i.digest),
                    i.size.map_or("-".to_string(), |n| n.to_string()),
                    i.reference
                );
            }
        }
        if let Some(files) = &self.files {
            for l in &m.layers {
                let _ = writeln!(s, "files of {}", l.name);
                for e in &files[&l.name] {
                    let extra = match (&e.sha256, &e.target) {
                        (Some(h), _) => format!(" sha256:{}", &h[..12]),
                        (_, Some(t)) => format!(" -> {t}"),
                        _ => String::new(),
                    };
                    let _ = writeln!(
                        s,
                        "  {:<7} {} {}:{} {:>9} {}{extra}",
                        e.kind, e.mode, e.uid, e.gid, e.size, e.path
                    );
                }
            }
        }
        s
    }
}
