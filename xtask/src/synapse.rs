//! Python programs for the live-stack tests, from PyPI wheels for the tools
//! root's Python, each in `target/tools/<name>-cp<xy>-<tag>/`, which the
//! tests bind inside the root and put on PYTHONPATH: Synapse (the version
//! the `synapse` layer pins, the tag of its image) at /opt/synapse, and
//! mautrix-telegram (the local image's lock) at /opt/mautrix-telegram.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};

/// The Synapse version from the layer's `synapse_image` default tag.
fn pinned_version(repo: &Path) -> Result<String> {
    let layer = fs::read_to_string(repo.join("layers/synapse/layer.toml"))?;
    let tag = layer
        .split("matrixdotorg/synapse:v")
        .nth(1)
        .ok_or_else(|| {
            anyhow!("layers/synapse/layer.toml has no matrixdotorg/synapse:v<version> image")
        })?;
    let version: String = tag
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    if version.split('.').count() != 3 {
        bail!("cannot read the Synapse version from {tag:?}");
    }
    Ok(version)
}

/// The tools root's python3.X as "3X" (e.g. "313").
fn root_python(root: &Path) -> Result<String> {
    let mut found = None;
    for entry in fs::read_dir(root.join("usr/bin"))? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if let Some(minor) = name.strip_prefix("python3.") {
            if minor.chars().all(|c| c.is_ascii_digit()) {
                found = Some(format!("3{minor}"));
            }
        }
    }
    found.ok_or_else(|| anyhow!("no python3.X in {}/usr/bin", root.display()))
}

/// Installs the wheels if missing; returns the directory.
pub fn ensure(repo: &Path, tools_root: &Path) -> Result<PathBuf> {
    let version = pinned_version(repo)?;
    let py = root_python(tools_root)?;
    // The extras the official image ships and the layers can turn on
    // (url_previews needs lxml).
    let requirements = vec![
        format!("matrix-synapse[url-preview]=={version}"),
        "psycopg2-binary".to_string(),
    ];
    install_wheels(
        repo,
        &format!("synapse-{version}"),
        &py,
        &requirements,
        "synapse",
    )
}

/// mautrix-telegram for the bridge tests: the local image's hash-locked
/// closure (images/local/telegram/requirements.txt), installed the same way.
/// Its one sdist-only dependency, pyaes, is the tools root's Debian package,
/// as in the image.
pub fn ensure_telegram(repo: &Path, tools_root: &Path) -> Result<PathBuf> {
    let py = root_python(tools_root)?;
    let lock = repo.join("images/local/telegram/requirements.txt");
    let text = fs::read_to_string(&lock).with_context(|| format!("reading {}", lock.display()))?;
    let version = text
        .lines()
        .find_map(|l| l.strip_prefix("mautrix-telegram=="))
        .map(|v| v.trim_end_matches(" \\").trim().to_string())
        .ok_or_else(|| anyhow!("{} pins no mautrix-telegram", lock.display()))?;
    let requirements = vec![
        "--no-deps".to_string(),
        "--require-hashes".to_string(),
        "-r".to_string(),
        lock.to_string_lossy().into_owned(),
    ];
    let name = format!("mautrix-telegram-{version}");
    install_wheels(repo, &name, &py, &requirements, &text)
}

/// `pip install --target target/tools/<name>-cp<xy>-<tag>` of `requirements`
/// (pip arguments) as wheels for the tools root's CPython, unless already
/// there. `key` (with the arguments) names the directory's content.
fn install_wheels(
    repo: &Path,
    name: &str,
    py: &str,
    requirements: &[String],
    key: &str,
) -> Result<PathBuf> {
    let tag: u32 = format!("{}\n{key}", requirements.join(" "))
        .bytes()
        .fold(7u32, |h, b| h.wrapping_mul(31).wrapping_add(b.into()));
    let dir = repo.join(format!("target/tools/{name}-cp{py}-{tag:08x}"));
    if dir.join(".complete").exists() {
        return Ok(dir);
    }
    eprintln!(
        "xtask: installing {name} wheels for CPython {py} into {}",
        dir.display()
    );
    let partial = dir.with_extension("partial");
    let _ = fs::remove_dir_all(&partial);
    exec::status(
        exec::command("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--only-binary=:all:",
            ])
            .args(["--python-version", &format!("{}.{}", &py[..1], &py[1..])])
            .args([
                "--implementation",
                "cp",
                "--abi",
                &format!("cp{py}"),
                "--abi",
                "abi3",
                "--abi",
                "none",
            ])
            .args([
                "--platform",
                "manylinux_2_28_x86_64",
                "--platform",
                "manylinux_2_17_x86_64",
            ])
            .args(["--platform", "manylinux2014_x86_64", "--platform", "any"])
            .arg("--target")
            .arg(&partial)
            .args(requirements),
        &format!("pip installing {} for CPython {py}", requirements.join(" ")),
    )?;
    fs::write(partial.join(".complete"), "")?;
    fs::rename(&partial, &dir)?;
    Ok(dir)
}
