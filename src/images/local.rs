//! The `local` source: an image built here from a recipe. Two layers, each
//! cached by what decides it:
//!
//! - base: Debian trixie by mmdebstrap (Essential packages plus the
//!   recipe's), users with fixed IDs, nondeterministic and secret files
//!   removed; downloaded .debs are kept in the cache (`debs/`).
//! - application: a venv built with the image's own python3 from hashed
//!   wheels (kept in `wheels/`), plus the recipe's root/.
//!
//! Both are packed by the builder's own tar writer with every mtime at the
//! epoch, so the same .debs, wheels and epoch give the same image digest.

use std::fs;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use serde_json::{json, Map, Value as Json};

use super::recipe::Recipe;
use super::{BlobRef, StoredImage};
use crate::cache::Cache;
use crate::chroot;
use crate::debian::{self, mirror};
use crate::digest::Digest;
use crate::layer::SourceNode;
use crate::oci::{self, LayerBlob};
use crate::pack::{self, Packed};
use crate::progress::Progress;
use crate::tree::{Content, Entry, Node, Tree};

/// The build host's CA bundle (Debian's path), given to pip for downloads.
const HOST_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Host settings a download inside the image root keeps.
const PASSED_TO_PIP: &[&str] = &[
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "PIP_INDEX_URL",
    "PIP_EXTRA_INDEX_URL",
    "PIP_DEFAULT_TIMEOUT",
];

/// Paths no image keeps: kernel file systems and run-time directories
/// (their directories stay), caches, logs, and files that differ between
/// two installs of the same packages.
const ALWAYS_REMOVED: &[&str] = &[
    "dev/*",
    "proc/*",
    "sys/*",
    "run/*",
    "tmp/*",
    "var/tmp/*",
    "var/cache/apt/*",
    "var/lib/apt/lists/*",
    "var/log/*",
    "var/cache/ldconfig/aux-cache",
    "var/cache/debconf/*-old",
    // Debconf's answers, which also record maintainer scripts' temporary file
    // names; nothing in an image reconfigures packages.
    "var/cache/debconf/config.dat",
    "var/lib/dpkg/*-old",
    "etc/machine-id",
    "etc/hostname",
    "etc/resolv.conf",
];

/// Builds (or finds in the cache) the image of `recipe`.
pub fn build(
    recipe: &Recipe,
    cache: &Cache,
    epoch: u64,
    progress: &mut Progress,
) -> Result<StoredImage> {
    let mirror = mirror();
    let base_key = recipe.base_key(&mirror, ALWAYS_REMOVED, epoch);
    let mut root: Option<tempfile::TempDir> = None;
    let (base, _) = cache.get_or_pack(&base_key, epoch, || {
        chroot::require_root(
            &format!("building the local image {}", recipe.name),
            "choose another image source (upstream, or archive:PATH)",
        )?;
        progress.note(&format!(
            "image {}: installing Debian {} packages ({}) with mmdebstrap",
            recipe.name,
            recipe.suite(),
            recipe.def.base.packages.join(", ")
        ));
        let dir = cache.temp_dir("root-")?;
        debootstrap(recipe, epoch, cache, dir.path())?;
        let tree = base_tree(recipe, dir.path())?;
        // Kept for the application step; the tree's files are read from it.
        root = Some(dir);
        Ok(tree)
    })?;

    let app_key = recipe.app_key(&base.diff_id, epoch);
    if let Some(stored) = cache.record::<StoredImage>("local-images", &app_key) {
        if stored.intact(cache)? {
            return Ok(stored);
        }
    }
    chroot::require_root(
        &format!("building the local image {}", recipe.name),
        "choose another image source (upstream, or archive:PATH)",
    )?;
    let root = match root {
        Some(dir) => dir,
        None => unpack_base(cache, &base)?,
    };
    if recipe.def.python.is_some() {
        progress.note(&format!("image {}: installing Python wheels", recipe.name));
        install_venv(recipe, cache, epoch, root.path())?;
    }
    let tree = app_tree(recipe, root.path())?;
    // Filed under a key of its own: the image record (app_key) is what
    // later builds look up.
    let app_layer_key = Digest::of(format!("app layer {app_key}").as_bytes());
    let app = cache.put(&app_layer_key, |out| Ok(pack::pack(&tree, epoch, out)?.1))?;
    drop(root);

    let layers = [
        layer_blob(
            &base,
            "base",
            format!(
                "Debian {}: {}",
                recipe.suite(),
                recipe.def.base.packages.join(" ")
            ),
        ),
        layer_blob(
            &app,
            "application",
            format!("recipe images/local/{}", recipe.name),
        ),
    ];
    let config = oci::image_config(run_config(recipe), &layers, epoch);
    let manifest = oci::image_manifest(&config, &layers, epoch);
    cache.put_bytes(&config)?;
    let digest = cache.put_bytes(&manifest)?;
    let stored = StoredImage {
        digest,
        manifest_size: manifest.len() as u64,
        blobs: std::iter::once(BlobRef {
            digest: Digest::of(&config),
            size: config.len() as u64,
        })
        .chain(layers.iter().map(|l| BlobRef {
            digest: l.digest,
            size: l.size,
        }))
        .collect(),
    };
    cache.put_record("local-images", &app_key, &stored)?;
    Ok(stored)
}

fn layer_blob(p: &Packed, title: &str, comment: String) -> LayerBlob {
    LayerBlob {
        digest: p.digest,
        diff_id: p.diff_id,
        size: p.compressed_size,
        title: title.into(),
        comment,
    }
}

/// The OCI config's run settings, with the recipe's labels.
fn run_config(recipe: &Recipe) -> Json {
    let c = &recipe.def.config;
    let mut run = Map::new();
    if let Some(user) = &c.user {
        run.insert("User".into(), json!(user));
    }
    if !c.env.is_empty() {
        let env: Vec<String> = c.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        run.insert("Env".into(), json!(env));
    }
    if !c.entrypoint.is_empty() {
        run.insert("Entrypoint".into(), json!(c.entrypoint));
    }
    if !c.cmd.is_empty() {
        run.insert("Cmd".into(), json!(c.cmd));
    }
    if let Some(dir) = &c.working_dir {
        run.insert("WorkingDir".into(), json!(dir));
    }
    if !c.ports.is_empty() {
        let ports: Map<String, Json> = c.ports.iter().map(|p| (p.clone(), json!({}))).collect();
        run.insert("ExposedPorts".into(), Json::Object(ports));
    }
    if let Some(sig) = &c.stop_signal {
        run.insert("StopSignal".into(), json!(sig));
    }
    run.insert(
        "Labels".into(),
        json!({
            "org.opencontainers.image.title": recipe.name,
            "org.opencontainers.image.version": recipe.def.version,
            "org.opencontainers.image.description": recipe.def.description,
        }),
    );
    Json::Object(run)
}

/// mmdebstrap into `dir/root`, with the recipe's users and preseeded files.
fn debootstrap(recipe: &Recipe, epoch: u64, cache: &Cache, dir: &Path) -> Result<()> {
    let hook = dir.join("essential-hook.sh");
    fs::write(
        &hook,
        debian::essential_hook(&recipe.def.base.users, &recipe.def.base.preseed),
    )?;
    let what = format!("the base of the local image {}", recipe.name);
    debian::mmdebstrap(
        &debian::Bootstrap {
            what: &what,
            suite: recipe.suite(),
            variant: "essential",
            packages: &recipe.def.base.packages,
            hooks: vec![format!(
                "--essential-hook=sh {} \"$1\"",
                exec::shell_quote(&hook)
            )],
            target: &dir.join("root"),
            work: dir,
            epoch,
        },
        cache,
    )
}

fn globs(patterns: impl IntoIterator<Item = impl AsRef<str>>) -> Result<GlobSet> {
    let mut set = GlobSetBuilder::new();
    for p in patterns {
        set.add(
            GlobBuilder::new(p.as_ref())
                .literal_separator(true)
                .build()?,
        );
    }
    Ok(set.build()?)
}

/// The installed root minus what no image keeps and the recipe's removals.
fn base_tree(recipe: &Recipe, dir: &Path) -> Result<Tree> {
    let removed = globs(
        ALWAYS_REMOVED
            .iter()
            .copied()
            .chain(recipe.def.base.remove.iter().map(String::as_str)),
    )?;
    let full = Tree::from_dir(&dir.join("root"))?;
    let mut tree = Tree::new();
    let mut dropped: Vec<Vec<u8>> = Vec::new();
    for (path, entry) in full.iter() {
        let under_dropped = dropped
            .iter()
            .any(|d| path.starts_with(d) && path.get(d.len()) == Some(&b'/'));
        let text = String::from_utf8_lossy(path);
        if under_dropped || removed.is_match(text.as_ref()) {
            if matches!(entry.node, Node::Dir) {
                dropped.push(path.to_vec());
            }
            continue;
        }
        tree.insert(path, entry.clone())?;
    }
    // An empty machine-id: systemd-style tools expect the file.
    tree.insert(b"etc/machine-id", Entry::file(Content::Bytes(Vec::new())))?;
    Ok(tree)
}

/// A cached base layer, unpacked for the application step.
fn unpack_base(cache: &Cache, base: &Packed) -> Result<tempfile::TempDir> {
    let dir = cache.temp_dir("root-")?;
    let root = dir.path().join("root");
    fs::create_dir(&root)?;
    let blob = fs::File::open(cache.blob_path(&base.digest))?;
    let mut archive = tar::Archive::new(flate2::read::MultiGzDecoder::new(BufReader::new(blob)));
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_unpack_xattrs(false);
    archive
        .unpack(&root)
        .context("unpacking a cached base layer")?;
    Ok(dir)
}

/// python3 -m venv in the image, then pip from hashed wheels only; wheels
/// missing from the cache are downloaded first.
fn install_venv(recipe: &Recipe, cache: &Cache, epoch: u64, dir: &Path) -> Result<()> {
    let py = recipe.def.python.as_ref().expect("checked by the caller");
    let root = dir.join("root");
    let pip = fs::read_dir(root.join("usr/share/python-wheels"))
        .ok()
        .and_then(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .find(|n| n.starts_with("pip-") && n.ends_with(".whl"))
        })
        .ok_or_else(|| {
            anyhow!(
                "images/local/{}: the base has no pip wheel in /usr/share/python-wheels; add \
                 python3-venv to [base] packages",
                recipe.name
            )
        })?;
    let wheels = cache.root().join("wheels");
    fs::create_dir_all(&wheels)?;
    let epoch = epoch.to_string();
    let env = [
        ("HOME", "/root"),
        ("LC_ALL", "C.UTF-8"),
        ("SOURCE_DATE_EPOCH", epoch.as_str()),
        ("PYTHONHASHSEED", "0"),
        ("PIP_DISABLE_PIP_VERSION_CHECK", "1"),
        ("PIP_NO_CACHE_DIR", "1"),
    ];
    let mut sandbox = chroot::sandbox(&root)
        .bind(&wheels, "/tmp/builder-wheels")
        .bind(&recipe.dir, "/tmp/builder-recipe");
    for (key, value) in env {
        sandbox = sandbox.env(key, value);
    }
    // Downloads trust what the build host trusts (a site's TLS-inspecting
    // proxy CA, say) and go through its proxy and index settings.
    let host_ca = Path::new(HOST_CA_BUNDLE);
    let mut download_env: Vec<(String, String)> = Vec::new();
    if host_ca.is_file() {
        sandbox = sandbox.bind(host_ca, "/tmp/builder-host-ca.crt");
        download_env.push(("PIP_CERT".into(), "/tmp/builder-host-ca.crt".into()));
    }
    for key in PASSED_TO_PIP {
        if let Ok(v) = std::env::var(key) {
            download_env.push((key.to_string(), v));
        }
    }
    let venv = py.venv.as_str();
    let run = |argv: &[&str], what: &str, extra: &[(String, String)]| -> Result<()> {
        let mut sandbox = sandbox.clone();
        for (key, value) in extra {
            sandbox = sandbox.env(key, value);
        }
        exec::run(&mut sandbox.command(argv)?, what)
    };
    let mut create = vec!["python3", "-m", "venv", "--without-pip"];
    if py.system_site_packages {
        create.push("--system-site-packages");
    }
    create.push(venv);
    run(&create, "creating the venv", &[])?;
    let pip_path = format!("/usr/share/python-wheels/{pip}/pip");
    let python = format!("{venv}/bin/python");
    let requirements = format!("/tmp/builder-recipe/{}", py.requirements);
    // The lock is the whole closure: no resolving beyond it (a dependency
    // taken from Debian has no wheel to find).
    let common = [
        "--require-hashes",
        "--only-binary=:all:",
        "--no-deps",
        "-r",
        requirements.as_str(),
    ];
    let mut install = vec![
        python.as_str(),
        pip_path.as_str(),
        "install",
        "--no-index",
        "--find-links",
        "/tmp/builder-wheels",
        "--no-warn-script-location",
    ];
    install.extend(common);
    if run(&install, "pip install from cached wheels", &[]).is_err() {
        let mut download = vec![
            python.as_str(),
            pip_path.as_str(),
            "download",
            "--dest",
            "/tmp/builder-wheels",
        ];
        download.extend(common);
        run(
            &download,
            &format!(
                "downloading the wheels of images/local/{} from PyPI",
                recipe.name
            ),
            &download_env,
        )?;
        run(
            &install,
            &format!("installing the wheels of images/local/{}", recipe.name),
            &[],
        )?;
    }
    Ok(())
}

/// The venv (if any) and the recipe's root/, owned by root unless
/// `[files]` says otherwise.
fn app_tree(recipe: &Recipe, dir: &Path) -> Result<Tree> {
    let mut tree = Tree::new();
    if let Some(py) = &recipe.def.python {
        let rel = py.venv.trim_start_matches('/');
        let venv = Tree::from_dir(&dir.join("root").join(rel))?;
        tree.insert(rel.as_bytes(), Entry::dir())?;
        for (path, entry) in venv.iter() {
            let mut full = PathBuf::from(rel).into_os_string().into_encoded_bytes();
            full.push(b'/');
            full.extend_from_slice(path);
            let mut entry = entry.clone();
            entry.uid = 0;
            entry.gid = 0;
            tree.insert(&full, entry)?;
        }
    }
    let mut files = Tree::new();
    for (path, node) in &recipe.files {
        let entry = match node {
            SourceNode::Dir => Entry::dir(),
            SourceNode::File(bytes) => Entry::file(Content::Bytes(bytes.clone())),
            SourceNode::Symlink(t) => Entry::symlink(t.clone()),
        };
        files.insert(path, entry)?;
    }
    let file = format!("images/local/{}/recipe.toml", recipe.name);
    crate::render::apply_attributes(&recipe.def.files, &file, &mut files)?;
    for (path, entry) in files.iter() {
        match (tree.get(path), &entry.node) {
            (Some(_), Node::Dir) => {}
            (Some(_), _) => bail!(
                "images/local/{}/root/{} is also in the venv; keep one",
                recipe.name,
                String::from_utf8_lossy(path)
            ),
            (None, _) => tree.insert(path, entry.clone())?,
        }
    }
    Ok(tree)
}
