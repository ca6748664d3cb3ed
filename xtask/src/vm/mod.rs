//! `cargo xtask vm-test`: the disk image really boots and serves Matrix.
//!
//! Builds the default profile, `vps` (every container image it runs built
//! here and embedded), with the internal CA (`tls_mode = internal`: no ACME
//! server is reachable from the guest) and a fresh SSH key, twice (the
//! second time with the Debian base made anew: the raw and qcow2 files must
//! be byte-identical), and boots its qcow2 image (the backing file of a
//! 20 GiB overlay; made raw for the upgrade) under qemu with no route
//! anywhere (user networking with `restrict=on`; only loopback
//! ports forwarded to the VM's 22, 443 and a port the firewall must drop):
//!
//! 1. UEFI (OVMF), first boot, provisioned by the platform: a NoCloud seed
//!    disk (cloud metadata: an SSH key, a host name, static IPv4 + IPv6
//!    addresses and routes) and a key as a systemd credential; a newer
//!    version is then served as an update (the guest's update_url reaches a
//!    loopback HTTP server through qemu's guestfwd, off the metadata's /28:
//!    through its default route): a copy with one changed byte is refused,
//!    so is one signed by another key and a download broken off; the real
//!    one is installed into the empty root slot;
//! 2. the reboot, with legacy BIOS (SeaBIOS → GRUB), into the update on
//!    trial, which runs the next PostgreSQL major (18; the first version
//!    runs 17): it moves the databases at its first boot, must pass its
//!    health gate and be kept, and then removes 17's cluster; a broken
//!    version (its Synapse never starts) is applied;
//! 3. UEFI, from the disk made raw: the broken version, its unified kernel
//!    image renamed from the host to one try left (as after two failed
//!    tries), fails it and systemd-boot boots the kept version again;
//! 4. BIOS: the broken version back on trial for GRUB with no try left (as
//!    after its failed tries): GRUB marks it bad and boots the kept version;
//! 5. a new machine (UEFI) from the newer image with no metadata at all
//!    comes up on DHCP and restores the backup made on the second boot.
//!
//! Each boot waits for the appliance's own console line ("matrix-appliance:
//! ready"). The first two are then checked from outside, over SSH and the
//! forwarded HTTPS port: no failed units, the root a read-only erofs with
//! the running version's appliance extension read-only over /usr, /var
//! grown to the disk, only the appliance's images, all in the OS's
//! read-only image store (no OCI layout on the disk), Matrix over
//! TLS through the proxy (trusting only the appliance's CA), `.well-known`,
//! the admin logging in. The first boot also probes the firewall (an echo
//! service on a closed port answers inside, not from outside until a rule
//! accepts the port), creates a room and a message, and
//! the Telegram bridge's bot (its image built locally and embedded) answers
//! `help`, then leaves another image under Synapse's name in /var (as an
//! appliance that once loaded its images there has), which the update must
//! remove to run its own. The reboot reads the message back and finds the same
//! machine ID, SSH host key, secrets and bridge registrations, with no
//! first-boot step run again, and runs vm-check.sh over SSH: the new version
//! from its own slot, its health gate passed, kept, the upload limit in use.
//! The fallbacks are checked from the inside with no SSH at all: a unit
//! passed in as systemd credentials runs vm-check.sh once the kept version is
//! up again (the broken one marked bad for both boot loaders), prints the
//! verdict on the serial console and powers the
//! VM off (mkosi's check-and-shutdown pattern). qemu uses KVM when a probe
//! boots with it, else TCG.
//!
//! Here the scenario (`run`) and its constants; `qemu` the VM, `checks` what is
//! checked in it, `metadata` the platform's metadata, `updates` the update's
//! pieces, `backup` backup and restore.

mod backup;
mod checks;
mod metadata;
mod qemu;
mod updates;

// Also the submodules' prelude (`use super::*`).
use std::fs;
use std::io::{Read as _, Write as _};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use base64::{engine::general_purpose::STANDARD as BASE64, Engine as _};
use exec::Sandbox;
use serde_json::{json, Value};

use checks::*;
use metadata::*;
use qemu::*;
pub(crate) use qemu::{Qemu, Vm};
use updates::*;

const PROFILE: &str = "vps";
const SERVER_NAME: &str = "vm-test.example";
const MATRIX_HOST: &str = "matrix.vm-test.example";
pub(crate) const READY: &str = "matrix-appliance: ready";
const NOT_READY: &str = "matrix-appliance: NOT ready";
/// Test-only Telegram app credentials (well-formed, not a real app).
const TELEGRAM_API_ID: &str = "7654321";
const TELEGRAM_API_HASH: &str = "fedcba9876543210fedcba9876543210";
/// tests/common's EPOCH.
const TESTS_EPOCH: &str = "1700000000";
/// The first image's version: made from TESTS_EPOCH (`YYYYMMDD.HHMMSS`).
const FIRST_VERSION: &str = "20231114.221320";
/// The newer image's version, given with `--version`.
const NEWER_VERSION: &str = "20231115.1";
/// A version whose Synapse never starts (a test-only layer): its tries must
/// fail and the newer version boot again.
const BROKEN_VERSION: &str = "20231116.1";
/// The clock of the test keys' making: before TESTS_EPOCH.
const KEYS_EPOCH: &str = "1690000000";
/// Where the guest finds the update server (qemu's guestfwd to loopback).
const UPDATE_HOST: &str = "10.0.2.100";
/// Where the guest finds the backup repositories' REST server (the same way).
const BACKUP_HOST: &str = "10.0.2.101";

#[derive(Clone, PartialEq)]
pub(crate) enum Firmware {
    Uefi,
    Bios,
}

pub fn run(args: &[String]) -> Result<()> {
    if !args.is_empty() {
        bail!("usage: cargo xtask vm-test");
    }
    let repo = repo();
    let tools = crate::tools::ensure()?;
    crate::test::install_debian_packages(&["openssh-client", "curl", "mmdebstrap"])?;
    let work = repo.join("target/vm-test");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work)?;
    let key = work.join("id_ed25519");
    let pubkey = ssh_key(&key, "vm-test")?;
    // A key the image does not carry: the platform passes it at first boot as
    // the systemd credential ssh.authorized_keys.root (as a provider would).
    let platform_key = work.join("id_ed25519_platform");
    let platform_pubkey = ssh_key(&platform_key, "vm-test-platform")?;
    // Another, in the first boot's cloud metadata (a NoCloud seed disk).
    let metadata_key = work.join("id_ed25519_metadata");
    let metadata_pubkey = ssh_key(&metadata_key, "vm-test-metadata")?;

    let sign_key = make_keys(&tools.root, &work)?;
    let started = Instant::now();
    let build = |out: &str, extra: &[&str]| -> Result<PathBuf> {
        let out = work.join(out);
        exec::status(
            exec::command(env!("CARGO"))
                .current_dir(&repo)
                .args(["run", "--release", "--locked", "--quiet", "--", "build"])
                // The integration tests' epoch: the local images they built
                // into the same cache are reused, not built again.
                .env("SOURCE_DATE_EPOCH", TESTS_EPOCH)
                .args(["--profile", PROFILE, "--out"])
                .arg(&out)
                .arg("--cache-dir")
                .arg(repo.join("target/test-image-cache"))
                // The tests' tools root (a superset of the disk's): one root.
                .env("BUILDER_TOOLS_ROOT", &tools.root)
                .args(["--set", &format!("server_name={SERVER_NAME}")])
                .args(["--set", "tls_mode=internal"])
                .args(["--set", &format!("ssh_authorized_keys={}", pubkey.trim())])
                // The Telegram bridge, its image built locally and embedded.
                .args(["--set", &format!("update_url=http://{UPDATE_HOST}/")])
                .arg("--sign-key")
                .arg(&sign_key)
                .args(["--set", "bridges=telegram"])
                .args(["--set", &format!("telegram_api_id={TELEGRAM_API_ID}")])
                .args(["--set", &format!("telegram_api_hash={TELEGRAM_API_HASH}")])
                .args(extra),
            "builder build",
        )?;
        ensure!(
            out.join(format!("{PROFILE}.qcow2")).is_file(),
            "the build wrote no qcow2 image"
        );
        Ok(out)
    };
    let first_image = build("out", &[])?;
    eprintln!("vm-test: built the image in {:.0?}", started.elapsed());
    // Reproducible: the same inputs again, with the Debian base made anew
    // (mmdebstrap, initramfs), give byte-identical raw and qcow2 files.
    let cache = repo.join("target/test-image-cache");
    fs::remove_dir_all(cache.join("disk-base")).context("removing the cached base")?;
    // The OS image and the finished image are cached by their inputs: made anew too.
    let _ = fs::remove_dir_all(cache.join("disk-os"));
    let _ = fs::remove_dir_all(cache.join("disk-image"));
    let again = build("out-again", &[])?;
    // The update files too: SHA256SUMS lists each by its hash.
    let update_sums = fs::read_to_string(first_image.join("update/SHA256SUMS"))?;
    ensure!(
        update_sums.lines().count() == 6,
        "update/SHA256SUMS does not list the root, appliance extension, UKI, kernel, initramfs and \
         GRUB entry:\n{update_sums}"
    );
    // The signature too (the epoch as gpg's clock, Ed25519: deterministic).
    let mut names = vec![
        format!("{PROFILE}.raw"),
        format!("{PROFILE}.qcow2"),
        "update/SHA256SUMS".to_string(),
        "update/SHA256SUMS.gpg".to_string(),
    ];
    for line in update_sums.lines() {
        let (_, name) = line.split_once("  ").context("a SHA256SUMS line")?;
        names.push(format!("update/{name}"));
    }
    for name in &names {
        ensure!(
            sha256(&first_image.join(name))? == sha256(&again.join(name))?,
            "two builds of the same inputs gave different {name} files ({} and {})",
            first_image.display(),
            again.display()
        );
    }
    for line in update_sums.lines() {
        let (sum, name) = line.split_once("  ").context("a SHA256SUMS line")?;
        ensure!(
            sha256(&first_image.join("update").join(name))? == sum,
            "update/{name} does not match its line in update/SHA256SUMS"
        );
    }
    // out/SHA256SUMS: the raw image's digest is resumed from the OS image's
    // hash state, the others come from the cache's records: each must be the file's.
    let out_sums = fs::read_to_string(first_image.join("SHA256SUMS"))?;
    for name in [format!("{PROFILE}.raw"), format!("{PROFILE}.qcow2")] {
        let listed = (out_sums.lines())
            .find_map(|l| l.split_once("  ").filter(|(_, n)| *n == name))
            .map(|(sum, _)| sum.to_string())
            .with_context(|| format!("SHA256SUMS does not list {name}"))?;
        ensure!(
            sha256(&first_image.join(&name))? == listed,
            "{name} does not match its line in SHA256SUMS"
        );
    }
    fs::remove_dir_all(&again)?;
    eprintln!(
        "vm-test: a second build from a new base is byte-identical (images and update/), \
         SHA256SUMS right"
    );

    // The qcow2, as a VPS provider takes it, boots first and reboots; the
    // upgrade writes raw partitions over the same disk made raw.
    let mut vm = Vm::new(&tools.root, &work, &key)?;
    vm.create_disk(&first_image.join(format!("{PROFILE}.qcow2")))?;
    // From here on only the manifest's partition table is read: the rest
    // (~1.5 GB) would only crowd a CI machine's disk.
    remove_images(&first_image, &["raw", "qcow2", "bundle.tar"])?;

    // The newer version (another upload limit) and a broken one (its
    // Synapse never starts), built now while no VM runs; served to the guest
    // as updates from a loopback HTTP server (first a tampered copy).
    let first_update = first_image.join("update");
    let newer = build(
        "out-newer",
        &[
            "--set",
            "max_upload_size=77M",
            // The next PostgreSQL major: its first boot moves the databases.
            "--set",
            "postgres_major=18",
            "--version",
            NEWER_VERSION,
            // Over the first as its base release: its OS image differs (the
            // embedded PostgreSQL), so it brings its own (the slots' labels
            // after the update show it).
            "--base-release",
            first_update.to_str().context("a UTF-8 work path")?,
        ],
    )?;
    // Its qcow2 stays: the new machine the backup is restored on.
    remove_images(&newer, &["raw", "bundle.tar"])?;
    let broken = build_broken(&build, &work, &newer.join("update"))?;
    let update = newer.join("update");
    let tampered = tampered_copy(&update, &work.join("update-tampered"))?;
    let wrong_key = wrongly_signed_copy(&tools.root, &work, &update)?;
    let server = crate::http::StaticServer::start(tampered)?;
    vm.update_port = Some(server.port);
    let rest = backup::RestServer::start(&tools.root, &work)?;
    vm.backup_port = Some(rest.port);

    // First boot (UEFI), provisioned by the platform as a VPS provider does:
    // cloud metadata on a seed disk (a key, the host name, a static network)
    // and a key as a systemd credential; then the update is applied (fetched
    // through the metadata's default route).
    // The builds' share of the run, for the log's last line.
    let built = started.elapsed();
    vm.attach_seed(&metadata_pubkey)?;
    let mut qemu = vm.boot_with(
        Firmware::Uefi,
        &[(
            "ssh.authorized_keys.root".to_string(),
            platform_pubkey.clone(),
        )],
    )?;
    let first = vm.wait_ready(&mut qemu)?;
    eprintln!("vm-test: UEFI first boot ready in {:.0?}", first);
    // While first boot ran (minutes under TCG), the readiness report said
    // what it waited for.
    if vm.accel() == "tcg" {
        let waiting = vm.console_line("matrix-appliance: waiting for the homeserver (")?;
        ensure!(
            waiting.contains("): starting ") && waiting.contains("; failed: "),
            "the readiness report's progress line says too little: {waiting}"
        );
        eprintln!("vm-test: while waiting: {waiting}");
    }
    vm.check_system()?;
    vm.check_platform_key(&platform_key)?;
    vm.check_metadata(&metadata_key)?;
    let before = vm.identity()?;
    let before_sha = vm.ssh(&format!("({IDENTITY}) | sha256sum | cut -d' ' -f1"))?;
    let before_sha = before_sha.trim().to_string();
    vm.check_firewall()?;
    let room = vm.check_matrix(None)?;
    vm.check_telegram_bridge()?;
    vm.leave_older_synapse_copy()?;
    vm.apply_update(&server, &update, &wrong_key)?;
    vm.shutdown(qemu)?;
    // The other boots have no metadata: DHCP.
    vm.seed = false;

    // The reboot, with BIOS firmware, into the update on trial: it passes
    // its health gate and is kept; the machine, its data and /var stay. Then
    // the broken version is applied.
    let mut qemu = vm.boot(Firmware::Bios)?;
    let second = vm.wait_ready(&mut qemu)?;
    eprintln!(
        "vm-test: BIOS reboot into the update (on trial) ready in {:.0?}",
        second
    );
    vm.check_same_machine(&before)?;
    vm.check_matrix(Some(&room))?;
    let updated = AfterUpdate {
        room: &room,
        identity_sha: &before_sha,
        upload_limit: "77M",
        version: NEWER_VERSION,
        previous: FIRST_VERSION,
        failed: "",
        stale_image: STALE_IMAGE,
    };
    // vm-check.sh: its system part (check_system on the first boot) too.
    vm.check_over_ssh(&CheckInside::after_update(updated))?;
    eprintln!("vm-test: the update passed its health gate and was kept; data and identity intact");
    vm.check_postgres_moved()?;
    vm.check_from_refusal()?;
    // No downgrade unless asked: the first version's update, served again,
    // is not taken for a newer one.
    server.serve(first_image.join("update"));
    let older = vm.ssh("matrixctl update check 2>&1; echo \"exit=$?\"")?;
    ensure!(
        older.contains(&format!("no newer version (running {NEWER_VERSION})"))
            && older.trim_end().ends_with("exit=1"),
        "an older version offered as an update was not turned down:\n{older}"
    );
    let older = vm.ssh("matrixctl update apply --no-reboot 2>&1")?;
    ensure!(
        older.contains("nothing to do"),
        "apply with only an older version offered did something:\n{older}"
    );
    eprintln!("vm-test: an older version offered by the server is not installed");
    let kept = vm.back_up()?;
    // The broken version keeps the newer one's OS image: only its entry and
    // extension are fetched, the root slots stay as they are.
    server.serve(broken.join("update"));
    let slots = vm.ssh(SLOTS)?;
    let out = vm.ssh("matrixctl update apply --no-reboot 2>&1")?;
    ensure!(
        out.contains(&format!(
            "{BROKEN_VERSION} installed beside {NEWER_VERSION}, over the OS image {NEWER_VERSION} \
             already here"
        )) && !out.contains(".root.")
            && vm.ssh(SLOTS)? == slots,
        "the broken version was not installed over the running OS image alone:\n{out}"
    );
    let status = vm.ssh("matrixctl update status")?;
    ensure!(
        status.contains(&format!(
            "installed: {BROKEN_VERSION} (OS image {NEWER_VERSION})"
        )) && status.contains(&format!("running:   {NEWER_VERSION} (OS image {NEWER_VERSION})")),
        "matrixctl update status does not show the broken version over the running OS image:\n{status}"
    );
    eprintln!("vm-test: the broken version (its appliance part only) is installed; the root slots unchanged");
    vm.shutdown(qemu)?;

    // UEFI, from the disk made raw: the broken version fails its health gate
    // on its try and systemd-boot boots the kept version again,
    // which checks itself from the inside (no SSH: a unit passed in as
    // credentials checks, says so on the console and powers the VM off).
    vm.make_disk_raw()?;
    // The broken version ran over the kept one's OS image: the other root
    // slot still holds the first.
    let fallback = CheckInside::after_update(AfterUpdate {
        failed: BROKEN_VERSION,
        stale_image: "",
        ..updated
    });
    // Its unified kernel image with one try left, as after two failed
    // tries (each try costs a boot: one shows the counting and the fallback).
    vm.set_uki_trial(&first_image, BROKEN_VERSION, 1)?;
    vm.expect_fallback(Firmware::Uefi, &fallback, 1)?;

    // The same fallback under legacy BIOS, counted by GRUB: the broken
    // version back on trial with no try left (as after its three failed
    // tries; a failing try and the gate's part were just seen under UEFI,
    // GRUB's countdown in the reboot into the update), written into the
    // ESP's GRUB environment block from the host: GRUB marks it bad and
    // boots the kept version.
    vm.set_grub_trial(&first_image, BROKEN_VERSION, 0)?;
    vm.expect_fallback(Firmware::Bios, &fallback, 0)?;

    // The disk is lost: a new machine from the same image restores the backup.
    vm.restore_on_fresh_machine(&newer.join(format!("{PROFILE}.qcow2")), &kept, &room)?;
    drop(rest);
    let total = started.elapsed();
    eprintln!(
        "vm-test: passed ({:.0?} in all: {:.0?} building, {:.0?} booting and checking)",
        total,
        built,
        total - built
    );
    Ok(())
}

/// A new SSH key pair at `path` (no passphrase); its public key.
fn ssh_key(path: &Path, comment: &str) -> Result<String> {
    exec::status(
        exec::command("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
            .arg(path),
        "ssh-keygen",
    )?;
    Ok(fs::read_to_string(path.with_extension("pub"))?)
}

/// Removes the build outputs `{PROFILE}.<ext>` in `out` that the test has
/// done with.
fn remove_images(out: &Path, exts: &[&str]) -> Result<()> {
    for ext in exts {
        let file = out.join(format!("{PROFILE}.{ext}"));
        fs::remove_file(&file).with_context(|| format!("removing {}", file.display()))?;
    }
    Ok(())
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the repo")
        .to_path_buf()
}

fn sha256(path: &Path) -> Result<String> {
    let out = exec::command("sha256sum").arg(path).output()?;
    ensure!(out.status.success(), "sha256sum {} failed", path.display());
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string())
}
