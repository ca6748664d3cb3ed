//! `cargo xtask lock-wheels <recipe-dir>`: regenerates `<recipe-dir>/requirements.txt`
//! (pip's hash-checking format) from `<recipe-dir>/requirements.in`.
//!
//! pip resolves the full dependency closure for the images' Python (Debian trixie's
//! CPython 3.13) on manylinux x86_64, wheels only, and downloads it; the names and versions
//! come from the downloaded files' names. Each pin then lists the sha256 of every wheel PyPI
//! publishes for that version (PyPI's JSON simple index, PEP 691), so the same lock installs
//! on other architectures where wheels exist. The downloaded wheel's own hash must be one of
//! them.
//!
//! A line `# from-base: NAME==VERSION` in requirements.in names a distribution the image's
//! Debian base provides instead (e.g. a pure-Python dependency PyPI has no wheel of, installed
//! as a Debian package and seen through the venv's system site-packages). pip resolves it to
//! an empty stand-in wheel made here, and the lock leaves it out.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};

const PLATFORMS: &[&str] = &[
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux_2_28_x86_64",
    "manylinux_2_34_x86_64",
    "any",
];

/// Writes an empty wheel (metadata only) for each `from-base` distribution.
const STUB_WHEEL_PY: &str = r#"
import sys, zipfile
out, name, version = sys.argv[1:]
info = f"{name.replace('-', '_')}-{version}.dist-info"
stem = name.replace("-", "_")
with zipfile.ZipFile(f"{out}/{stem}-{version}-py3-none-any.whl", "w") as z:
    z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: xtask\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
    z.writestr(f"{info}/RECORD", "")
"#;

pub fn run(args: &[String]) -> Result<()> {
    let [dir] = args else {
        bail!("usage: cargo xtask lock-wheels <recipe-dir>   (reads requirements.in, writes requirements.txt)");
    };
    let dir = Path::new(dir);
    let input = fs::read_to_string(dir.join("requirements.in"))
        .with_context(|| format!("reading {}/requirements.in", dir.display()))?;
    let from_base = from_base(&input)?;

    let tmp = std::env::temp_dir().join(format!("xtask-lock-wheels-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    let result = lock(dir, &from_base, &tmp);
    let _ = fs::remove_dir_all(&tmp);
    let text = result?;
    fs::write(dir.join("requirements.txt"), text)?;
    eprintln!("xtask: wrote {}/requirements.txt", dir.display());
    Ok(())
}

/// The `# from-base: NAME==VERSION` lines, by normalized name.
fn from_base(input: &str) -> Result<BTreeMap<String, (String, String)>> {
    let mut found = BTreeMap::new();
    for line in input.lines() {
        let Some(spec) = line.trim().strip_prefix('#') else {
            continue;
        };
        let Some(spec) = spec.trim().strip_prefix("from-base:") else {
            continue;
        };
        let spec = spec.split_whitespace().next().unwrap_or("");
        let (name, version) = spec
            .split_once("==")
            .ok_or_else(|| anyhow!("`# from-base: {spec}` is not NAME==VERSION"))?;
        found.insert(normalize(name), (name.to_string(), version.to_string()));
    }
    Ok(found)
}

/// PEP 503: lowercase, runs of `-`, `_`, `.` become one `-`.
fn normalize(name: &str) -> String {
    let mut out = String::new();
    for c in name.chars() {
        if matches!(c, '-' | '_' | '.') {
            if !out.ends_with('-') {
                out.push('-');
            }
        } else {
            out.push(c.to_ascii_lowercase());
        }
    }
    out
}

fn lock(dir: &Path, from_base: &BTreeMap<String, (String, String)>, tmp: &Path) -> Result<String> {
    let wheels = tmp.join("wheels");
    let stubs = tmp.join("stubs");
    fs::create_dir_all(&wheels)?;
    fs::create_dir_all(&stubs)?;
    for (name, version) in from_base.values() {
        exec::status(
            exec::command("python3")
                .args(["-c", STUB_WHEEL_PY])
                .arg(&stubs)
                .args([name, version]),
            &format!("writing a stand-in wheel for {name}=={version}"),
        )?;
    }

    let mut pip = exec::command("python3");
    pip.args(["-m", "pip", "download", "--disable-pip-version-check"])
        .args(["--only-binary=:all:", "--python-version", "3.13"])
        .args(["--implementation", "cp", "--abi", "cp313"]);
    for platform in PLATFORMS {
        pip.args(["--platform", platform]);
    }
    // Only PyPI and the stand-ins: no local wheel directory from the environment.
    pip.env_remove("PIP_FIND_LINKS")
        .arg("--find-links")
        .arg(&stubs);
    let status = pip
        .arg("-d")
        .arg(&wheels)
        .arg("-r")
        .arg(dir.join("requirements.in"))
        .status()
        .context("running pip")?;
    if !status.success() {
        bail!("pip download failed for {}/requirements.in", dir.display());
    }

    // normalized name -> (version, downloaded file)
    let mut pins: BTreeMap<String, (String, PathBuf)> = BTreeMap::new();
    let mut names: Vec<String> = fs::read_dir(&wheels)?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_>>()?;
    names.sort();
    for file in names {
        let stem = file
            .strip_suffix(".whl")
            .ok_or_else(|| anyhow!("pip downloaded {file}, which is not a wheel"))?;
        let mut parts = stem.split('-');
        let (Some(name), Some(version)) = (parts.next(), parts.next()) else {
            bail!("cannot read a name and version from {file}");
        };
        let name = normalize(name);
        if from_base.contains_key(&name) {
            continue;
        }
        pins.insert(name, (version.to_string(), wheels.join(&file)));
    }

    let mut out = String::from(
        "# Generated by `cargo xtask lock-wheels <recipe-dir>` from requirements.in: do not edit.\n\
         # The whole dependency closure for CPython 3.13 (Debian trixie's python3) on manylinux\n\
         # x86_64, wheels only. Each pin lists every wheel PyPI has for that version, so the lock\n\
         # also installs where those wheels exist for another architecture (same closure assumed).\n",
    );
    for (name, version) in from_base.values() {
        out.push_str(&format!(
            "# From the image's Debian base, not locked here: {name}=={version}\n"
        ));
    }
    for (name, (version, file)) in &pins {
        eprintln!("xtask: hashes of {name} {version}");
        let hashes = pypi_wheel_hashes(name, version)?;
        let own = sha256(file)?;
        if !hashes.contains(&own) {
            bail!(
                "{} (sha256 {own}) is not among the wheels PyPI lists for {name} {version}",
                file.display()
            );
        }
        out.push_str(&format!("{name}=={version}"));
        for hash in &hashes {
            out.push_str(&format!(" \\\n    --hash=sha256:{hash}"));
        }
        out.push('\n');
    }
    Ok(out)
}

/// The sha256 of every wheel file PyPI publishes for NAME VERSION.
fn pypi_wheel_hashes(name: &str, version: &str) -> Result<BTreeSet<String>> {
    let url = format!("https://pypi.org/simple/{name}/");
    let output = exec::command("curl")
        .args(["-fsSL", "--retry", "3"])
        .args(["-H", "Accept: application/vnd.pypi.simple.v1+json"])
        .arg(&url)
        .output()
        .context("running curl")?;
    if !output.status.success() {
        bail!(
            "curl {url}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let index: serde_json::Value =
        serde_json::from_slice(&output.stdout).with_context(|| format!("parsing {url}"))?;
    let files = index["files"]
        .as_array()
        .ok_or_else(|| anyhow!("{url}: no `files` list"))?;
    let mut hashes = BTreeSet::new();
    for file in files {
        let Some(filename) = file["filename"].as_str() else {
            continue;
        };
        let Some(stem) = filename.strip_suffix(".whl") else {
            continue;
        };
        if stem.split('-').nth(1).map(str::to_ascii_lowercase) != Some(version.to_ascii_lowercase())
        {
            continue;
        }
        let hash = file["hashes"]["sha256"]
            .as_str()
            .ok_or_else(|| anyhow!("{url}: {filename} has no sha256"))?;
        hashes.insert(hash.to_string());
    }
    if hashes.is_empty() {
        bail!("{url} lists no wheel of version {version}");
    }
    Ok(hashes)
}

fn sha256(file: &Path) -> Result<String> {
    let output = exec::command("sha256sum")
        .arg(file)
        .output()
        .context("running sha256sum")?;
    if !output.status.success() {
        bail!("sha256sum {} failed", file.display());
    }
    let text = String::from_utf8_lossy(&output.stdout);
    Ok(text.split_whitespace().next().unwrap_or("").to_string())
}
