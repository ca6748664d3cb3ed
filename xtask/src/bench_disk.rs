//! `cargo xtask bench-disk`: the disk image's build times and sizes.
//!
//! Builds `vps` twice with a cache of its own: cold (no base, tools root,
//! layers or images cached; only downloaded .debs and wheels are shared
//! with the tests' cache, so the mirror's speed is not measured) and warm
//! (everything cached). Prints wall times and the image sizes: raw
//! apparent and allocated, qcow2.
//!
//! With `--boot`, also boots `vps-offline` (images embedded) under qemu,
//! three times on one disk: the first boot to "ready", a reboot to "ready"
//! (images loaded, data present), and the same base with the stack's units
//! masked (qemu's direct kernel boot of the image's own kernel, initramfs
//! and command line) to multi-user.target: the bare system's boot time
//! next to the appliance's (goal: ready within 1.5x).
//! A benchmark, not a test: nothing here fails on a slow result.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use crate::vm::{Firmware, Vm};

const PROFILE: &str = "vps";
const MARKER: &str = "bench: multi-user.target reached";
const MARKER_UNIT: &str = "[Unit]
Description=Benchmark marker: multi-user.target reached
After=multi-user.target

[Service]
Type=oneshot
StandardOutput=journal+console
ExecStart=/bin/echo \"bench: multi-user.target reached\"
ExecStartPost=/usr/bin/systemctl poweroff --no-block
";

pub fn run(args: &[String]) -> Result<()> {
    let boot = match args {
        [] => false,
        [flag] if flag == "--boot" => true,
        _ => bail!("usage: cargo xtask bench-disk [--boot]"),
    };
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
    if boot {
        boot_times(&repo)?;
    }
    Ok(())
}

fn boot_times(repo: &Path) -> Result<()> {
    let tools = crate::tools::ensure()?;
    let work = repo.join("target/bench/disk-boot");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work)?;
    let key = work.join("id_ed25519");
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key)
        .status()?;
    ensure!(status.success(), "ssh-keygen failed");
    let pubkey = fs::read_to_string(key.with_extension("pub"))?;
    let out = work.join("out");
    // The tests' image cache: its images and disk tools root are likely there already.
    let cache = repo.join("target/test-image-cache");
    let status = Command::new(repo.join("target/release/builder"))
        .current_dir(repo)
        .args(["--quiet", "build", "--profile", "vps-offline", "--out"])
        .arg(&out)
        .arg("--cache-dir")
        .arg(&cache)
        .args(["--set", &format!("ssh_authorized_keys={}", pubkey.trim())])
        .status()?;
    ensure!(
        status.success(),
        "builder build --profile vps-offline failed"
    );
    let raw = out.join("vps-offline.raw");
    extract_kernel(&raw, &out.join("vps-offline.manifest.json"), &cache, &work)?;

    let vm = Vm::new(&tools.root, &work, &key)?;
    vm.create_disk(&raw)?;
    let mut qemu = vm.boot(Firmware::Uefi)?;
    let first = vm.wait_ready(&mut qemu)?;
    vm.shutdown(qemu)?;
    let mut qemu = vm.boot(Firmware::Uefi)?;
    let again = vm.wait_ready(&mut qemu)?;
    let stack =
        vm.ssh("systemctl list-unit-files --no-legend --plain 'matrix-*' | cut -d' ' -f1")?;
    vm.shutdown(qemu)?;

    let cmdline = fs::read_to_string(work.join("cmdline"))?;
    let masks: Vec<String> = stack
        .split_whitespace()
        .map(|u| format!("systemd.mask={u}"))
        .collect();
    // A marker unit passed in as a credential (the image stays as built) says on
    // the console when multi-user.target is reached and powers the VM off.
    let mut qemu = vm.boot_with(
        Firmware::Kernel(format!(
            "{} {} systemd.wants=bench-marker.service",
            cmdline.trim(),
            masks.join(" ")
        )),
        &[("systemd.extra-unit.bench-marker.service", MARKER_UNIT)],
    )?;
    let bare = vm.wait_for(&mut qemu, MARKER)?;
    let started = Instant::now();
    while !qemu.exited()? {
        ensure!(
            started.elapsed() < Duration::from_secs(300),
            "the marker unit did not power the VM off"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    println!("boot of vps-offline under qemu (KVM if it works, else TCG; see above)");
    println!(
        "  first boot to ready            {:>8.1} s",
        first.as_secs_f64()
    );
    println!(
        "  reboot to ready                {:>8.1} s",
        again.as_secs_f64()
    );
    println!(
        "  same base, stack masked, to multi-user {:>8.1} s",
        bare.as_secs_f64()
    );
    println!(
        "  reboot to ready / bare multi-user      {:>8.2} (goal 1.5)",
        again.as_secs_f64() / bare.as_secs_f64()
    );
    Ok(())
}

/// The image's own kernel and initramfs (from its ESP) and command line
/// (from its manifest), into `work/`.
fn extract_kernel(raw: &Path, manifest: &Path, cache: &Path, work: &Path) -> Result<()> {
    let manifest: serde_json::Value = serde_json::from_slice(&fs::read(manifest)?)?;
    let disk = &manifest["disk"];
    let esp = disk["partitions"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["label"] == "esp"))
        .context("no ESP in the manifest")?;
    let offset = esp["offset"].as_u64().context("no ESP offset")?;
    // mtools from the builder's own tools root: the host may have no vfat.
    let tools = fs::read_dir(cache.join("disk-tools"))?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("root"))
        .find(|p| p.join("usr/bin/mcopy").exists())
        .context("no disk tools root with mtools in target/test-image-cache")?;
    let dir = raw.parent().context("the image has a directory")?;
    let name = raw
        .file_name()
        .and_then(|n| n.to_str())
        .context("image name")?;
    for file in ["vmlinuz", "initrd.img"] {
        let script = format!(
            "set -e\nmkdir -p {t}/bench\nmount --bind {d} {t}/bench\n\
             chroot {t} mcopy -o -n -i /bench/{name}@@{offset} ::/{file} /bench/{file}",
            t = tools.display(),
            d = dir.display(),
        );
        let status = Command::new("unshare")
            .args([
                "--mount",
                "--propagation",
                "private",
                "--fork",
                "sh",
                "-c",
                &script,
            ])
            .status()?;
        ensure!(
            status.success(),
            "copying {file} out of the image's ESP failed"
        );
        fs::rename(dir.join(file), work.join(file))?;
    }
    fs::write(
        work.join("cmdline"),
        disk["kernel_cmdline"]
            .as_str()
            .context("no kernel_cmdline")?,
    )?;
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
