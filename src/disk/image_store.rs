//! The disk image's read-only container image store. Every embedded image is
//! unpacked at build time (skopeo in the tools root, from the merged tree's OCI
//! layout) into a containers-storage overlay store in the read-only root, which
//! Podman reads as an additional image store: the images are part of the
//! immutable OS (bootc's "physically bound images"), nothing is copied or
//! unpacked into /var at boot, and an upgraded OS brings its own. The OCI
//! layout then leaves the disk, and each image's load unit only checks that
//! its name gives the store's image (Podman's own store in /var would win).
//!
//! containers-storage records a few things that differ between two runs:
//! layers' creation times, the random short names overlay gives the layers'
//! directories, and lock files' last-writer tokens. `normalize` fixes them.

use std::fs;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::Value;

use super::tools::Tools;
use crate::images::{PlannedImage, LAYOUT_DIR};

/// The store in the root (Podman's `additionalimagestores`).
pub const STORE_DIR: &str = "usr/lib/containers/storage";

const STORAGE_CONF: &str = "\
# Written by builder for the disk image. Podman's own store is in /var; the embedded
# container images are in the read-only image store of the OS, /usr/lib/containers/storage,
# made when the image was built.
[storage]
driver = \"overlay\"
runroot = \"/run/containers/storage\"
graphroot = \"/var/lib/containers/storage\"

[storage.options]
additionalimagestores = [\"/usr/lib/containers/storage\"]

[storage.options.overlay]
mountopt = \"nodev\"
";

/// Unpacks `images` (embedded, so in the staged root's OCI layout) into the
/// store, makes it reproducible, drops the layout and points Podman and the
/// images' load units at the store. Nothing to do without embedded images.
pub fn make(
    tools: &Tools,
    root: &Path,
    images: &[&PlannedImage],
    scratch: &Path,
    epoch: u64,
) -> Result<()> {
    if images.is_empty() {
        return Ok(());
    }
    let run = scratch.join("image-store-run");
    fs::create_dir_all(run.join("tmp"))?;
    for image in images {
        let reference = image.embedded_ref();
        let mut cmd = tools
            .sandbox(scratch)
            .bind(root, "/stage")
            .bind(&run, "/builder-run")
            // Where containers/image stages blobs (not the cached tools root).
            .env("TMPDIR", "/builder-run/tmp")
            .command(&[
                "skopeo",
                "copy",
                "--quiet",
                &format!("oci:/stage/{LAYOUT_DIR}:{reference}"),
                &format!("containers-storage:[overlay@/stage/{STORE_DIR}+/builder-run/storage]{reference}"),
            ])?;
        exec::run(
            &mut cmd,
            &format!(
                "unpacking image {} into the disk's image store (skopeo)",
                image.name
            ),
        )?;
    }
    let store = root.join(STORE_DIR);
    normalize(&store, epoch)?;
    fs::remove_dir_all(root.join(LAYOUT_DIR)).context("removing the OCI layout from the disk")?;
    let conf = root.join("etc/containers/storage.conf");
    fs::create_dir_all(conf.parent().expect("a parent"))?;
    fs::write(&conf, STORAGE_CONF)?;
    let listed = StoreImages::read(&store)?;
    for image in images {
        let reference = image.embedded_ref();
        let id = listed.id(&reference)?;
        let dir = root.join(format!("usr/lib/systemd/system/{}.d", image.load_service()));
        fs::create_dir_all(&dir)?;
        fs::write(
            dir.join("50-image-store.conf"),
            load_unit_dropin(&image.name, &reference, &id),
        )?;
    }
    Ok(())
}

/// The load unit (quadlet's `podman image pull` from the layout) becomes a
/// check that the name gives the store's image (`embedded-image-check` of
/// the os-debian layer, which also removes an older copy from /var).
fn load_unit_dropin(name: &str, reference: &str, id: &str) -> String {
    format!(
        "# Written by builder for the disk image: {name} is in the read-only image store of\n\
         # the OS (/{STORE_DIR}), so there is nothing to load, only to check that its name\n\
         # gives that image ({id}).\n\
         [Service]\n\
         ExecStart=\n\
         ExecStart={CHECK_PROGRAM} {reference} {id}\n",
    )
}

/// The program the load units run (a file of the os-debian layer).
const CHECK_PROGRAM: &str = "/usr/libexec/matrix-appliance/embedded-image-check";

/// The images a store lists (`overlay-images/images.json`).
struct StoreImages {
    path: std::path::PathBuf,
    images: Value,
}

impl StoreImages {
    fn read(store: &Path) -> Result<StoreImages> {
        let path = store.join("overlay-images/images.json");
        let images = serde_json::from_slice(&fs::read(&path)?)
            .with_context(|| format!("reading {}", path.display()))?;
        Ok(StoreImages { path, images })
    }

    /// The ID containers-storage gave the image named `reference`.
    fn id(&self, reference: &str) -> Result<String> {
        self.images
            .as_array()
            .into_iter()
            .flatten()
            .find(|image| {
                image["names"]
                    .as_array()
                    .is_some_and(|names| names.iter().any(|n| n == reference))
            })
            .and_then(|image| image["id"].as_str())
            .filter(|id| id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()))
            .map(str::to_string)
            .with_context(|| format!("{} lists no image named {reference}", self.path.display()))
    }
}

/// Makes what containers-storage records run-dependent fixed: every layer's
/// `created` is the epoch, every layer's short name (`overlay/<id>/link`,
/// the `overlay/l/` links, the `lower` lists) is derived from its ID, and
/// every lock file is empty.
pub fn normalize(store: &Path, epoch: u64) -> Result<()> {
    let layers_json = store.join("overlay-layers/layers.json");
    let mut layers: Value = serde_json::from_slice(&fs::read(&layers_json)?)
        .with_context(|| format!("reading {}", layers_json.display()))?;
    let created = Value::String(crate::oci::created(epoch));
    for layer in layers.as_array_mut().context("layers.json is not a list")? {
        if let Some(obj) = layer.as_object_mut() {
            obj.insert("created".into(), created.clone());
        }
    }
    fs::write(&layers_json, serde_json::to_vec(&layers)?)?;

    let overlay = store.join("overlay");
    let mut renames = Vec::new();
    for entry in fs::read_dir(&overlay)? {
        let entry = entry?;
        let id = entry.file_name().to_string_lossy().into_owned();
        let link = entry.path().join("link");
        if !entry.file_type()?.is_dir() || !link.is_file() {
            continue;
        }
        let old = fs::read_to_string(&link)?;
        let new = short_name(&id);
        fs::write(&link, &new)?;
        renames.push((old.trim().to_string(), new, id));
    }
    let links = overlay.join("l");
    fs::remove_dir_all(&links)?;
    fs::create_dir(&links)?;
    for (_, new, id) in &renames {
        std::os::unix::fs::symlink(format!("../{id}/diff"), links.join(new))?;
    }
    for (_, _, id) in &renames {
        let lower = overlay.join(id).join("lower");
        if lower.is_file() {
            let text = fs::read_to_string(&lower)?;
            let rewritten: Vec<String> = text
                .split(':')
                .map(|part| {
                    let name = part.strip_prefix("l/").unwrap_or(part);
                    match renames.iter().find(|(old, _, _)| old == name) {
                        Some((_, new, _)) => format!("l/{new}"),
                        None => part.to_string(),
                    }
                })
                .collect();
            fs::write(&lower, rewritten.join(":"))?;
        }
    }
    empty_lock_files(store)
}

/// The 26-letter name overlay links a layer by, from the layer's ID (hex
/// digits mapped onto A–P: still of the alphabet containers-storage uses).
fn short_name(id: &str) -> String {
    id.bytes()
        .filter_map(|b| (b as char).to_digit(16))
        .take(26)
        .map(|d| (b'A' + d as u8) as char)
        .collect()
}

fn empty_lock_files(dir: &Path) -> Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let kind = entry.file_type()?;
        if kind.is_dir() {
            empty_lock_files(&path)?;
        } else if kind.is_file() && path.extension().is_some_and(|e| e == "lock") {
            fs::write(&path, b"")?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store as containers-storage leaves it: two layers, random short
    /// names, a creation time, lock files with tokens.
    fn store(dir: &Path, shorts: [&str; 2]) {
        let ids = ["a1".repeat(32), "b2".repeat(32)];
        fs::create_dir_all(dir.join("overlay/l")).unwrap();
        fs::create_dir_all(dir.join("overlay-layers")).unwrap();
        for (id, short) in ids.iter().zip(shorts) {
            fs::create_dir_all(dir.join(format!("overlay/{id}/diff"))).unwrap();
            fs::write(dir.join(format!("overlay/{id}/link")), short).unwrap();
            std::os::unix::fs::symlink(
                format!("../{id}/diff"),
                dir.join(format!("overlay/l/{short}")),
            )
            .unwrap();
        }
        fs::write(
            dir.join(format!("overlay/{}/lower", ids[1])),
            format!("l/{}", shorts[0]),
        )
        .unwrap();
        fs::write(
            dir.join("overlay-layers/layers.json"),
            format!(
                r#"[{{"id":"{}","created":"2026-12-01T21:15:40.714079032Z"}},{{"id":"{}","parent":"{}","created":"2026-12-01T21:15:41Z"}}]"#,
                ids[0], ids[1], ids[0]
            ),
        )
        .unwrap();
        fs::write(dir.join("storage.lock"), shorts[0]).unwrap();
        fs::write(dir.join("overlay-layers/layers.lock"), shorts[1]).unwrap();
    }

    fn listing(dir: &Path) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for entry in walk(dir) {
            let rel = entry
                .strip_prefix(dir)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            let what = if entry.is_symlink() {
                format!("-> {}", fs::read_link(&entry).unwrap().display())
            } else if entry.is_file() {
                fs::read_to_string(&entry).unwrap()
            } else {
                "dir".into()
            };
            out.push((rel, what));
        }
        out.sort();
        out
    }

    fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
        let mut out = Vec::new();
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            out.push(path.clone());
            if path.is_dir() && !path.is_symlink() {
                out.extend(walk(&path));
            }
        }
        out
    }

    #[test]
    fn two_runs_become_the_same_consistent_store() {
        let tmp = tempfile::tempdir().unwrap();
        let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
        store(
            &one,
            ["JJE6UVEFCOC4RIWBD23ZRR2BDA", "K4QMJ3UH47T43G2CVPSPHTCPB6"],
        );
        store(
            &two,
            ["55Y65ZMDSUDHT4QMF4KIJDEZT7", "7QWJQKHKAHAMEVFS46OQNFVV6A"],
        );
        normalize(&one, 1_700_000_000).unwrap();
        normalize(&two, 1_700_000_000).unwrap();
        assert_eq!(listing(&one), listing(&two));

        let upper = "b2".repeat(32);
        let lower = fs::read_to_string(one.join(format!("overlay/{upper}/lower"))).unwrap();
        let target = fs::read_link(one.join("overlay").join(&lower)).unwrap();
        assert_eq!(
            target,
            Path::new(&format!("../{}/diff", "a1".repeat(32))),
            "lower names the lower layer"
        );
        let link = fs::read_to_string(one.join(format!("overlay/{upper}/link"))).unwrap();
        assert_eq!(link.len(), 26);
        assert!(one.join("overlay/l").join(&link).is_symlink());
        let layers = fs::read_to_string(one.join("overlay-layers/layers.json")).unwrap();
        assert_eq!(
            layers
                .matches("\"created\":\"2023-11-14T22:13:20Z\"")
                .count(),
            2,
            "{layers}"
        );
        assert_eq!(fs::read(one.join("storage.lock")).unwrap(), b"");
        assert_eq!(
            fs::read(one.join("overlay-layers/layers.lock")).unwrap(),
            b""
        );
    }

    #[test]
    fn the_load_unit_checks_the_image_id_the_store_gave_the_name() {
        let tmp = tempfile::tempdir().unwrap();
        let store = tmp.path();
        fs::create_dir_all(store.join("overlay-images")).unwrap();
        let (synapse, postgres) = ("5e".repeat(32), "db".repeat(32));
        fs::write(
            store.join("overlay-images/images.json"),
            format!(
                r#"[{{"id":"{postgres}","names":["localhost/matrix-appliance/postgres:embedded"]}},
                   {{"id":"{synapse}","names":["localhost/matrix-appliance/synapse:embedded"]}}]"#
            ),
        )
        .unwrap();
        let reference = "localhost/matrix-appliance/synapse:embedded";
        let listed = StoreImages::read(store).unwrap();
        let id = listed.id(reference).unwrap();
        assert_eq!(id, synapse);
        let dropin = load_unit_dropin("synapse", reference, &id);
        assert!(
            dropin.contains(&format!(
                "\nExecStart=\nExecStart={CHECK_PROGRAM} {reference} {synapse}\n"
            )),
            "{dropin}"
        );
        let missing = listed
            .id("localhost/matrix-appliance/nginx:embedded")
            .unwrap_err();
        assert!(
            missing
                .to_string()
                .contains("lists no image named localhost/matrix-appliance/nginx:embedded"),
            "{missing}"
        );
    }

    #[test]
    fn short_names_are_26_letters_of_the_id() {
        assert_eq!(short_name(&"0f".repeat(32)), "APAPAPAPAPAPAPAPAPAPAPAPAP");
        assert_ne!(short_name(&"a1".repeat(32)), short_name(&"b2".repeat(32)));
    }
}
