//! `cargo xtask bench-disk`: the disk image's build times and sizes.
//!
//! Builds `vps` three times into one output directory with a cache of its
//! own: cold (no base, tools root, layers or images cached; only downloaded
//! .debs and wheels are shared with the tests' cache, so the mirror's speed
//! is not measured), again with nothing changed (no-op), and with one site
//! value changed; then that change as an update (a newer `--version` over
//! the first build's update/ as `--base-release`). Prints the wall times
//! beside the goals (one value: under 5 s; no-op: under 0.5 s), the update's
//! payload (the files of its update/ a machine running the first build
//! lacks), and the image sizes.
//!
//! With `--boot`, also boots `vps-offline` (images embedded) under qemu
//! with UEFI, three times on one disk: the first boot to "ready", a reboot
//! to "ready" (images loaded, data present), and the same disk with the
//! stack's units masked (by systemd credentials) to multi-user.target: the
//! bare system's boot time next to the appliance's (goal: ready within
//! 1.5x). Each is timed from the kernel's first console line.
//! A benchmark, not a test: nothing here fails on a slow result.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::vm::{Firmware, Vm};

const PROFILE: &str = "vps";
/// The site value the one-value build changes (a value of the synapse layer).
const ONE_VALUE: &str = "max_upload_size=80M";
/// The goals (printed beside the figures; a benchmark, not a test).
const ONE_VALUE_GOAL_S: f64 = 5.0;
const NO_OP_GOAL_S: f64 = 0.5;
const MARKER: &str = "bench: multi-user.target reached";
/// The kernel's first line on the console.
const KERNEL_BANNER: &str = "Linux version";
/// Without default dependencies: multi-user.target wants it, and is not to
/// wait for it.
const MARKER_UNIT: &str = "[Unit]
Description=Benchmark marker: multi-user.target reached
DefaultDependencies=no
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
    exec::status(
        exec::command(env!("CARGO")).current_dir(&repo).args([
            "build",
            "--release",
            "--locked",
            "--quiet",
        ]),
        "cargo build --release",
    )?;

    let out = dir.join("out");
    let cold = build(&repo, &cache, &out, &[])?;
    let update_before = update_files(&out)?;
    // The first build's update/ as the release machines run (hard links).
    let base_release = dir.join("base-release");
    exec::status(
        exec::command("cp")
            .arg("-al")
            .arg(out.join("update"))
            .arg(&base_release),
        "cp (the base release)",
    )?;
    let no_op = build(&repo, &cache, &out, &[])?;
    let one_value = build(&repo, &cache, &out, &["--set", ONE_VALUE])?;
    let first_version = (update_before.iter())
        .find_map(|f| f.0.strip_prefix("appliance_")?.strip_suffix(".efi"))
        .map(str::to_string)
        .ok_or_else(|| anyhow::anyhow!("the first build's update/ has no unified kernel image"))?;
    let next = format!("{first_version}.1");
    let out_update = dir.join("out-update");
    let as_update = build(
        &repo,
        &cache,
        &out_update,
        &[
            "--set",
            ONE_VALUE,
            "--version",
            &next,
            "--base-release",
            base_release.to_str().expect("a UTF-8 path"),
        ],
    )?;
    let update_after = update_files(&out_update)?;
    // What a machine running the first build has to fetch to run the second:
    // the files of update/ it does not hold already (byte for byte).
    let changed: Vec<&(String, u64, String)> = (update_after.iter())
        .filter(|f| f.0 != "SHA256SUMS" && f.0 != "SHA256SUMS.gpg")
        .filter(|f| !update_before.iter().any(|b| b.1 == f.1 && b.2 == f.2))
        .collect();
    let payload: u64 = changed.iter().map(|f| f.1).sum();
    let whole: u64 = update_after.iter().map(|f| f.1).sum();
    let raw = fs::metadata(out.join(format!("{PROFILE}.raw")))?;
    let qcow2 = fs::metadata(out.join(format!("{PROFILE}.qcow2")))?;
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    println!("disk image of profile {PROFILE} (raw, qcow2 and update/; the bundle too)");
    println!("  cold build                 {:>8.1} s", cold.as_secs_f64());
    println!(
        "  no-op build                {:>8.2} s   goal < {NO_OP_GOAL_S} s: {}",
        no_op.as_secs_f64(),
        verdict(no_op.as_secs_f64() < NO_OP_GOAL_S)
    );
    println!(
        "  one value changed          {:>8.2} s   goal < {ONE_VALUE_GOAL_S} s: {}   (--set {ONE_VALUE})",
        one_value.as_secs_f64(),
        verdict(one_value.as_secs_f64() < ONE_VALUE_GOAL_S)
    );
    println!(
        "  the change as an update    {:>8.1} s   (--version {next} --base-release <the first>)",
        as_update.as_secs_f64()
    );
    println!(
        "  its update payload         {:>8.2} MiB of {:.0} MiB in update/: {}",
        mib(payload),
        mib(whole),
        changed
            .iter()
            .map(|f| f.0.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("  raw, apparent              {:>8.0} MiB", mib(raw.len()));
    println!(
        "  raw, allocated             {:>8.0} MiB",
        mib(raw.blocks() * 512)
    );
    println!("  qcow2                      {:>8.0} MiB", mib(qcow2.len()));
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
    exec::status(
        exec::command("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&key),
        "ssh-keygen",
    )?;
    let pubkey = fs::read_to_string(key.with_extension("pub"))?;
    let out = work.join("out");
    // The tests' image cache: its images and disk tools root are likely there already.
    let cache = repo.join("target/test-image-cache");
    exec::status(
        exec::command(repo.join("target/release/builder"))
            .current_dir(repo)
            .args(["--quiet", "build", "--profile", "vps-offline", "--out"])
            .arg(&out)
            .arg("--cache-dir")
            .arg(&cache)
            .args(["--set", &format!("ssh_authorized_keys={}", pubkey.trim())]),
        "builder build --profile vps-offline",
    )?;
    let raw = out.join("vps-offline.raw");

    let mut vm = Vm::new(&tools.root, &work, &key)?;
    vm.create_disk(&raw)?;
    let mut qemu = vm.boot(Firmware::Uefi)?;
    let first = to_marker(&vm, &mut qemu, crate::vm::READY)?;
    vm.shutdown(qemu)?;
    let mut qemu = vm.boot(Firmware::Uefi)?;
    let again = to_marker(&vm, &mut qemu, crate::vm::READY)?;
    let stack =
        vm.ssh("systemctl list-unit-files --no-legend --plain 'matrix-*' | cut -d' ' -f1")?;
    vm.shutdown(qemu)?;

    // The same disk and firmware with every unit of the stack masked (an empty
    // systemd.extra-unit credential masks a unit) and a marker unit that says on
    // the console when multi-user.target is reached and powers the VM off: the
    // image stays as built.
    let mut credentials: Vec<(String, String)> = stack
        .split_whitespace()
        .map(|unit| (format!("systemd.extra-unit.{unit}"), String::new()))
        .collect();
    credentials.push((
        "systemd.extra-unit.bench-marker.service".into(),
        MARKER_UNIT.into(),
    ));
    credentials.push((
        "systemd.unit-dropin.multi-user.target~bench".into(),
        "[Unit]\nWants=bench-marker.service\n".into(),
    ));
    let mut qemu = vm.boot_with(Firmware::Uefi, &credentials)?;
    let bare = to_marker(&vm, &mut qemu, MARKER)?;
    vm.wait_powered_off(&mut qemu)?;
    let started = vm.console_line("Startup finished").unwrap_or_default();

    let secs = |d: Duration| d.as_secs_f64();
    println!(
        "boot of vps-offline under qemu ({}), from the kernel's first console line",
        vm.accel()
    );
    println!(
        "  first boot to ready                     {:>8.1} s",
        secs(first)
    );
    println!(
        "  reboot to ready                         {:>8.1} s",
        secs(again)
    );
    println!(
        "  same base, stack masked, to multi-user  {:>8.1} s",
        secs(bare)
    );
    println!(
        "  first boot / bare multi-user            {:>8.2} (goal 1.5)",
        secs(first) / secs(bare)
    );
    println!(
        "  reboot / bare multi-user                {:>8.2} (goal 1.5)",
        secs(again) / secs(bare)
    );
    if !started.is_empty() {
        println!("  bare boot, systemd says: {started}");
    }
    Ok(())
}

/// Time from the kernel's first line on the serial console to `marker`
/// (firmware and boot loader left out, as they differ between machines).
fn to_marker(vm: &Vm, qemu: &mut crate::vm::Qemu, marker: &str) -> Result<Duration> {
    vm.wait_for(qemu, KERNEL_BANNER)?;
    vm.wait_for(qemu, marker)
}

fn build(repo: &Path, cache: &Path, out: &Path, extra: &[&str]) -> Result<Duration> {
    let started = Instant::now();
    exec::status(
        exec::command(repo.join("target/release/builder"))
            .current_dir(repo)
            .args(["--quiet", "build", "--profile", PROFILE, "--out"])
            .arg(out)
            .arg("--cache-dir")
            .arg(cache)
            .args(extra),
        &format!("builder build --profile {PROFILE}"),
    )?;
    Ok(started.elapsed())
}

/// update/'s files: name, size and SHA-256 (from its SHA256SUMS; the sums
/// and signature by size only).
fn update_files(out: &Path) -> Result<Vec<(String, u64, String)>> {
    let dir = out.join("update");
    let sums = fs::read_to_string(dir.join("SHA256SUMS"))?;
    let mut files = Vec::new();
    for entry in fs::read_dir(&dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let sum = (sums.lines())
            .find_map(|l| l.split_once("  ").filter(|(_, n)| *n == name))
            .map(|(s, _)| s.to_string())
            .unwrap_or_default();
        files.push((name, entry.metadata()?.len(), sum));
    }
    files.sort();
    Ok(files)
}
