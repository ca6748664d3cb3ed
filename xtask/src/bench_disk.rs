//! `cargo xtask bench-disk`: the disk image's build times and sizes.
//!
//! Builds `vps` twice with a cache of its own: cold (no base, tools root,
//! layers or images cached; only downloaded .debs and wheels are shared
//! with the tests' cache, so the mirror's speed is not measured) and warm
//! (everything cached). Prints wall times and the image sizes: raw
//! apparent and allocated, qcow2. Boot times are printed by
//! `cargo xtask vm-test` (first boot and reboot to "ready").
//! A benchmark, not a test: nothing here fails on a slow result.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

const PROFILE: &str = "vps";

pub fn run(args: &[String]) -> Result<()> {
    if !args.is_empty() {
        bail!("usage: cargo xtask bench-disk");
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the repo")
        .to_path_buf();
    let dir = repo.join("target/bench/disk");
    let _ = fs::remove_dir_all(&dir);
    let cache = dir.join("cache");
    fs::create_dir_all(&cache)?;
    let shared = repo.join("target/test-image-cache");
    for sub in ["debs", "wheels"] {
        fs::create_dir_all(shared.join(sub))?;
        std::os::unix::fs::symlink(shared.join(sub), cache.join(sub))?;
    }
    let status = Command::new(env!("CARGO"))
        .current_dir(&repo)
        .args(["build", "--release", "--locked", "--quiet"])
        .status()?;
    ensure!(status.success(), "cargo build --release failed");

    let cold = build(&repo, &cache, &dir.join("out"))?;
    let warm = build(&repo, &cache, &dir.join("out"))?;
    let raw = fs::metadata(dir.join(format!("out/{PROFILE}.raw")))?;
    let qcow2 = fs::metadata(dir.join(format!("out/{PROFILE}.qcow2")))?;
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!("disk image of profile {PROFILE}");
    println!("  cold build           {:>8.1} s", cold.as_secs_f64());
    println!("  warm build           {:>8.1} s", warm.as_secs_f64());
    println!("  raw, apparent        {:>8.0} MiB", mib(raw.len()));
    println!(
        "  raw, allocated       {:>8.0} MiB",
        mib(raw.blocks() * 512)
    );
    println!("  qcow2                {:>8.0} MiB", mib(qcow2.len()));
    Ok(())
}

fn build(repo: &Path, cache: &Path, out: &Path) -> Result<Duration> {
    let started = Instant::now();
    let status = Command::new(repo.join("target/release/builder"))
        .current_dir(repo)
        .args(["--quiet", "build", "--profile", PROFILE, "--out"])
        .arg(out)
        .arg("--cache-dir")
        .arg(cache)
        .status()
        .context("running builder")?;
    ensure!(status.success(), "builder build --profile {PROFILE} failed");
    Ok(started.elapsed())
}
