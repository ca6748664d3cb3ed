//! `cargo xtask vm-test`: the disk image really boots and serves Matrix.
//!
//! Builds `vps-offline` (every container image embedded, internal CA) with a
//! fresh SSH key, twice (the second time with the Debian base made anew:
//! the raw and qcow2 files must be byte-identical), and boots its qcow2 image
//! (the backing file of a 20 GiB overlay; made raw for the upgrade) under qemu with
//! no route anywhere (user networking with `restrict=on`; only loopback
//! ports forwarded to the VM's 22, 443 and a port the firewall must drop):
//!
//! 1. UEFI (OVMF), first boot; a newer version is then served as an
//!    update (the guest's update_url reaches a loopback HTTP server through
//!    qemu's guestfwd): a copy with one changed byte is refused, so is one
//!    signed by another key and a download broken off; the real one is
//!    installed into the empty root slot;
//! 2. the reboot, with legacy BIOS (SeaBIOS → GRUB), into the update on
//!    trial, which runs the next PostgreSQL major (18; the first version
//!    runs 17): it moves the databases at its first boot, must pass its
//!    health gate and be kept, and then removes 17's cluster; a broken
//!    version (its Synapse never starts) is applied;
//! 3. UEFI, from the disk made raw: the broken version, its unified kernel
//!    image renamed from the host to one try left (as after two failed
//!    tries), fails it and systemd-boot boots the kept version again;
//! 4. BIOS: the broken version back on trial for GRUB with one try left
//!    fails it, and GRUB boots the kept version again.
//!
//! Each boot waits for the appliance's own console line ("matrix-appliance:
//! ready"). The first two are then checked from outside, over SSH and the
//! forwarded HTTPS port: no failed units, the root a read-only erofs, /var
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

mod backup;

use std::fs;
use std::io::{Read as _, Write as _};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use base64::{engine::general_purpose::STANDARD as BASE64, Engine as _};
use serde_json::{json, Value};

const PROFILE: &str = "vps-offline";
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
/// First boot under TCG loads ~250 MB of images and initialises everything.
const BOOT_TIMEOUT: Duration = Duration::from_secs(40 * 60);
/// The VM's hardware, for the boots and the KVM probe alike.
const MACHINE: &str = "-machine q35 -cpu max -m 4096 -smp 2";

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
    run_ok(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "vm-test", "-f"])
            .arg(&key),
        "ssh-keygen",
    )?;
    let pubkey = fs::read_to_string(key.with_extension("pub"))?;
    // A key the image does not carry: the platform passes it at first boot as
    // the systemd credential ssh.authorized_keys.root (as a provider would).
    let platform_key = work.join("id_ed25519_platform");
    run_ok(
        Command::new("ssh-keygen")
            .args([
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                "vm-test-platform",
                "-f",
            ])
            .arg(&platform_key),
        "ssh-keygen",
    )?;
    let platform_pubkey = fs::read_to_string(platform_key.with_extension("pub"))?;

    let sign_key = make_keys(&tools.root, &work)?;
    let started = Instant::now();
    let build = |out: &str, extra: &[&str]| -> Result<PathBuf> {
        let out = work.join(out);
        run_ok(
            Command::new(env!("CARGO"))
                .current_dir(&repo)
                .args(["run", "--release", "--locked", "--quiet", "--", "build"])
                // The integration tests' epoch: the local images they built
                // into the same cache are reused, not built again.
                .env("SOURCE_DATE_EPOCH", TESTS_EPOCH)
                .args(["--profile", PROFILE, "--out"])
                .arg(&out)
                .arg("--cache-dir")
                .arg(repo.join("target/test-image-cache"))
                .args(["--set", &format!("server_name={SERVER_NAME}")])
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
    // The finished image is cached by its inputs: made anew too.
    let _ = fs::remove_dir_all(cache.join("disk-image"));
    let again = build("out-again", &[])?;
    // The update files too: SHA256SUMS lists each by its hash.
    let update_sums = fs::read_to_string(first_image.join("update/SHA256SUMS"))?;
    ensure!(
        update_sums.lines().count() == 5,
        "update/SHA256SUMS does not list the root, UKI, kernel, initramfs and GRUB entry:\n{update_sums}"
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
    fs::remove_dir_all(&again)?;
    eprintln!("vm-test: a second build from a new base is byte-identical (images and update/)");

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
        ],
    )?;
    // Its qcow2 stays: the new machine the backup is restored on.
    remove_images(&newer, &["raw", "bundle.tar"])?;
    let broken = build_broken(&build, &work)?;
    let update = newer.join("update");
    let tampered = tampered_copy(&update, &work.join("update-tampered"))?;
    let wrong_key = wrongly_signed_copy(&tools.root, &work, &update)?;
    let server = crate::http::StaticServer::start(tampered)?;
    vm.update_port = Some(server.port);
    let rest = backup::RestServer::start(&tools.root, &work)?;
    vm.backup_port = Some(rest.port);

    // First boot (UEFI), with a key from the platform; then the update is applied.
    let mut qemu = vm.boot_with(
        Firmware::Uefi,
        &[(
            "ssh.authorized_keys.root".to_string(),
            platform_pubkey.clone(),
        )],
    )?;
    let first = vm.wait_ready(&mut qemu)?;
    eprintln!("vm-test: UEFI first boot ready in {:.0?}", first);
    vm.check_system()?;
    vm.check_platform_key(&platform_key)?;
    let before = vm.identity()?;
    let before_sha = vm.ssh(&format!("({IDENTITY}) | sha256sum | cut -d' ' -f1"))?;
    let before_sha = before_sha.trim().to_string();
    vm.check_firewall()?;
    let room = vm.check_matrix(None)?;
    vm.check_telegram_bridge()?;
    vm.leave_older_synapse_copy()?;
    vm.apply_update(&server, &update, &wrong_key)?;
    vm.shutdown(qemu)?;

    // The reboot, with BIOS firmware, into the update on trial: it passes
    // its health gate and is kept; the machine, its data and /var stay. Then
    // the broken version is applied.
    let mut qemu = vm.boot(Firmware::Bios)?;
    let second = vm.wait_ready(&mut qemu)?;
    eprintln!(
        "vm-test: BIOS reboot into the update (on trial) ready in {:.0?}",
        second
    );
    vm.check_system()?;
    vm.check_same_machine(&before)?;
    vm.check_matrix(Some(&room))?;
    let updated = CheckInside {
        room: &room,
        identity_sha: &before_sha,
        upload_limit: "77M",
        version: NEWER_VERSION,
        previous: FIRST_VERSION,
        failed: "",
        stale_image: STALE_IMAGE,
    };
    vm.check_over_ssh(&updated)?;
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
    server.serve(broken.join("update"));
    let out = vm.ssh("matrixctl update apply --no-reboot 2>&1")?;
    ensure!(
        out.contains(&format!("{BROKEN_VERSION} installed")),
        "the broken version was not installed:\n{out}"
    );
    vm.shutdown(qemu)?;

    // UEFI, from the disk made raw: the broken version fails its health gate
    // on its try and systemd-boot boots the kept version again,
    // which checks itself from the inside (no SSH: a unit passed in as
    // credentials checks, says so on the console and powers the VM off).
    vm.make_disk_raw()?;
    let fallback = CheckInside {
        previous: BROKEN_VERSION,
        failed: BROKEN_VERSION,
        stale_image: "",
        ..updated
    };
    // Its unified kernel image with one try left, as after two failed
    // tries (each try costs a boot: one shows the counting and the fallback).
    vm.set_uki_trial(&first_image, BROKEN_VERSION, 1)?;
    vm.expect_fallback(Firmware::Uefi, &fallback, 1)?;

    // The same fallback under legacy BIOS, counted by GRUB: the broken
    // version back on trial with one try left (as after two failed tries),
    // written into the ESP's GRUB environment block from the host.
    vm.set_grub_trial(&first_image, BROKEN_VERSION, 1)?;
    vm.expect_fallback(Firmware::Bios, &fallback, 1)?;

    // The disk is lost: a new machine from the same image restores the backup.
    vm.restore_on_fresh_machine(&newer.join(format!("{PROFILE}.qcow2")), &kept, &room)?;
    drop(rest);
    eprintln!("vm-test: passed ({:.0?} in all)", started.elapsed());
    Ok(())
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

pub(crate) struct Vm {
    tools: PathBuf,
    work: PathBuf,
    key: PathBuf,
    disk: Disk,
    ssh_port: u16,
    https_port: u16,
    /// Forwarded to [`PROBE_PORT`], which the firewall must drop.
    probe_port: u16,
    /// The host port the guest's [`UPDATE_URL`] reaches (a loopback server).
    pub(crate) update_port: Option<u16>,
    /// The host port the guest's [`BACKUP_HOST`] reaches (a REST server).
    pub(crate) backup_port: Option<u16>,
    /// qemu's accelerator: "kvm" when a probe boots with it, else "tcg".
    accel: &'static str,
}

impl Vm {
    pub(crate) fn new(tools: &Path, work: &Path, key: &Path) -> Result<Vm> {
        Ok(Vm {
            tools: tools.to_path_buf(),
            work: work.to_path_buf(),
            key: key.to_path_buf(),
            disk: Disk::Raw,
            ssh_port: free_port()?,
            https_port: free_port()?,
            probe_port: free_port()?,
            update_port: None,
            backup_port: None,
            accel: if kvm_boots(tools) { "kvm" } else { "tcg" },
        })
    }

    /// qemu's accelerator for this machine's boots.
    pub(crate) fn accel(&self) -> &'static str {
        self.accel
    }

    /// The built image on a 20 GiB disk, so first boot also has to grow
    /// /var into the larger disk: a qcow2 image is the backing file of a
    /// qcow2 overlay (the image itself is read, never written), a raw one
    /// is copied sparsely.
    pub(crate) fn create_disk(&mut self, image: &Path) -> Result<()> {
        if image.extension().is_some_and(|e| e == "qcow2") {
            let base = self.work.join(QCOW2_BASE);
            let _ = fs::remove_file(&base);
            fs::hard_link(image, &base)
                .or_else(|_| fs::copy(image, &base).map(drop))
                .with_context(|| format!("copying {}", image.display()))?;
            self.qemu_img(&format!(
                "create -q -f qcow2 -F qcow2 -b {QCOW2_BASE} {} 20G",
                Disk::Qcow2.file()
            ))?;
            self.disk = Disk::Qcow2;
            return Ok(());
        }
        let disk = self.work.join(Disk::Raw.file());
        run_ok(
            Command::new("cp")
                .arg("--sparse=always")
                .arg(image)
                .arg(&disk),
            "cp",
        )?;
        fs::OpenOptions::new()
            .write(true)
            .open(&disk)?
            .set_len(20 << 30)?;
        self.disk = Disk::Raw;
        Ok(())
    }

    /// A qcow2 disk becomes a raw one with the same contents (sparse).
    fn make_disk_raw(&mut self) -> Result<()> {
        if self.disk == Disk::Raw {
            return Ok(());
        }
        self.qemu_img(&format!(
            "convert -q -f qcow2 -O raw {} {}",
            Disk::Qcow2.file(),
            Disk::Raw.file()
        ))?;
        fs::remove_file(self.work.join(Disk::Qcow2.file()))?;
        fs::remove_file(self.work.join(QCOW2_BASE))?;
        self.disk = Disk::Raw;
        Ok(())
    }

    /// `qemu-img ARGS` from the tools root, in the work directory.
    fn qemu_img(&self, args: &str) -> Result<()> {
        let script = self.in_tools_root(&format!("sh -c 'cd /work && exec qemu-img {args}'"));
        run_ok(&mut in_private_mounts(&script), &format!("qemu-img {args}"))
    }

    /// A script that runs `command` chrooted in the tools root, with /proc,
    /// /dev and the work directory (as /work) mounted there; for
    /// [`in_private_mounts`], so the mounts stay in its namespace.
    fn in_tools_root(&self, command: &str) -> String {
        in_tools(&self.tools, &self.work, command)
    }

    /// `matrixctl update apply` from the update server: first a copy with one
    /// byte of the root image changed, then one signed by a key the image
    /// does not trust, both refused with nothing changed; then the real
    /// update, installed beside the running version.
    fn apply_update(
        &self,
        server: &crate::http::StaticServer,
        update: &Path,
        wrong_key: &Path,
    ) -> Result<()> {
        let slots = SLOTS;
        let before = self.ssh(slots)?;
        ensure!(
            before.trim() == format!("_empty appliance_{FIRST_VERSION}"),
            "the disk's root slots are not this version's and an empty one: {before}"
        );
        let esp = "ls /efi/appliance /efi/EFI/Linux";
        let esp_before = self.ssh(esp)?;
        let refused = self.ssh("matrixctl update apply --no-reboot 2>&1; echo \"exit=$?\"")?;
        // Refused by its SHA256 in the download of the first file (the BIOS
        // kernel), before the root image is fetched; nothing else changed.
        let root_fetched = refused
            .lines()
            .any(|l| l.contains("Acquiring") && l.contains(".root."));
        ensure!(
            refused.trim_end().ends_with("exit=1")
                && refused.contains("could not install")
                && refused.contains(".vmlinuz")
                && !root_fetched
                && self.ssh(slots)? == before,
            "a tampered update was not refused in the download of its kernel, or changed the slots: {refused}"
        );
        ensure!(
            self.ssh(esp)? == esp_before,
            "a refused update changed the ESP"
        );
        eprintln!("vm-test: a tampered update is refused and changes nothing");
        server.serve(wrong_key.to_path_buf());
        let refused = self.ssh("matrixctl update apply --no-reboot 2>&1; echo \"exit=$?\"")?;
        ensure!(
            (refused.contains("cannot read the updates") || refused.contains("could not install"))
                && refused.trim_end().ends_with("exit=1")
                && self.ssh(slots)? == before
                && self.ssh(esp)? == esp_before,
            "an update signed by another key was not refused, or changed something: {refused}"
        );
        eprintln!("vm-test: an update signed by another key is refused and changes nothing");
        // The real update, its root image's download broken off part-way:
        // the running system stays as it was, and the next try installs it.
        server.serve(update.to_path_buf());
        server.cut_next(".root.gz");
        let cut = self.ssh("matrixctl update apply --no-reboot 2>&1; echo \"exit=$?\"")?;
        ensure!(
            cut.trim_end().ends_with("exit=1")
                && cut.contains("could not install")
                && self.ssh(slots)? == before
                && self.ssh(esp)? == esp_before,
            "an interrupted download was not reported as a failure, or changed the slots or the ESP: {cut}"
        );
        eprintln!("vm-test: an interrupted download changes nothing; trying again:");
        let out = self.ssh("matrixctl update apply --no-reboot 2>&1")?;
        eprintln!("vm-test: matrixctl update apply:\n{}", out.trim_end());
        // The update brings PostgreSQL 18: nothing may change the databases
        // between the dump and the reboot.
        ensure!(
            out.contains("runs PostgreSQL 18 (this version 17): the stack stays stopped"),
            "apply --no-reboot did not say the stack stays stopped for the move to PostgreSQL 18:\n{out}"
        );
        let running =
            self.ssh("systemctl is-active matrix-postgres.service matrix-synapse.service; true")?;
        ensure!(
            !running.lines().any(|l| l.trim() == "active"),
            "PostgreSQL or Synapse runs again after the pre-update dump:\n{running}"
        );
        let after = self.ssh(slots)?;
        ensure!(
            after.trim() == format!("appliance_{FIRST_VERSION} appliance_{NEWER_VERSION}"),
            "after the update the root slots are {after}"
        );
        let status = self.ssh("matrixctl update status")?;
        ensure!(
            status.contains(&format!("trial={NEWER_VERSION} tries-left=3"))
                && status.contains(&format!("{NEWER_VERSION} on trial")),
            "the update is not on trial for both boot loaders:\n{status}"
        );
        ensure!(
            self.ssh("ls /var/lib/matrix/update/dumps/*/")?
                .contains("synapse.dump"),
            "no pre-update dump of Synapse's database"
        );
        Ok(())
    }

    /// The update moved the databases to PostgreSQL 18 (the message read
    /// back proves the rows came along): 18 serves, the move's record counts
    /// its tables, and once the health gate passed 17's cluster is gone with
    /// a note in its place.
    fn check_postgres_moved(&self) -> Result<()> {
        let version = self
            .ssh("podman exec matrix-postgres psql -U postgres -tAc 'SHOW server_version_num'")?;
        ensure!(
            version.trim().starts_with("18"),
            "PostgreSQL after the update is not 18: {version}"
        );
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let status = self.ssh("matrixctl update status")?;
            let note = self.ssh(
                "cat /var/lib/matrix/postgres/MOVED 2>/dev/null; ls /var/lib/matrix/postgres",
            )?;
            if status.contains("tables_checked=") && status.contains("retired=") {
                ensure!(
                    note.contains("moved to PostgreSQL 18 in /var/lib/matrix/postgres-18")
                        && !note.contains("PG_VERSION"),
                    "17's cluster was not replaced by a note:\n{note}"
                );
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "the move to PostgreSQL 18 is not recorded as checked and retired:\n{status}\n{note}"
            );
            std::thread::sleep(Duration::from_secs(5));
        }
        eprintln!("vm-test: the databases moved to PostgreSQL 18, row counts checked; 17's cluster removed after the gate");
        Ok(())
    }

    /// The same checks as [`CheckInside`], over SSH.
    fn check_over_ssh(&self, check: &CheckInside) -> Result<()> {
        let out = self.ssh_with_input("sh -s", &check.script())?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(
            text.contains(&format!("{CHECK_MARKER}passed")),
            "the appliance's check: {}{}",
            text.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    }

    /// `--from` a directory without a signature is refused (the image takes
    /// signed updates only) and changes nothing.
    fn check_from_refusal(&self) -> Result<()> {
        let slots = self.ssh(SLOTS)?;
        let out = self.ssh(
            "d=$(mktemp -d); printf 'not a kernel' >$d/appliance_29991231.1.vmlinuz; \
             printf '%064d  appliance_29991231.1.vmlinuz\\n' 0 >$d/SHA256SUMS; \
             matrixctl update apply --from $d --no-reboot 2>&1; echo \"exit=$?\"; rm -r $d",
        )?;
        ensure!(
            out.contains("takes signed updates only") && out.trim_end().ends_with("exit=1"),
            "a damaged --from directory was not refused as such: {out}"
        );
        ensure!(
            self.ssh(SLOTS)? == slots,
            "a refused --from changed the root slots"
        );
        eprintln!("vm-test: a damaged --from directory is refused and changes nothing");
        Ok(())
    }

    /// Waits for the inside check's verdict on the console (the boot that
    /// runs it may come after reboots), which must be "passed", and for the
    /// VM to power off.
    fn expect_self_check(&self, qemu: &mut Qemu, what: &str) -> Result<()> {
        self.wait_for(qemu, CHECK_MARKER)?;
        let verdict = self.console_line(CHECK_MARKER)?;
        ensure!(
            verdict.ends_with("passed"),
            "{what}: the appliance's own check: {verdict}"
        );
        self.wait_powered_off(qemu)?;
        eprintln!("vm-test: {what}: the appliance checked itself and powered off: {verdict}");
        Ok(())
    }

    /// Boots with reboots allowed: the broken version, on trial, fails its
    /// health gate on each of its `tries` left, then the kept version boots
    /// and checks itself (`check`) from the inside.
    fn expect_fallback(&self, firmware: Firmware, check: &CheckInside, tries: usize) -> Result<()> {
        let how = match firmware {
            Firmware::Uefi => "UEFI",
            Firmware::Bios => "BIOS",
        };
        let started = Instant::now();
        let mut qemu = self.boot_rebooting(firmware, &check.credentials())?;
        self.expect_self_check(&mut qemu, &format!("{how} fallback"))?;
        let failures = self.gate_failures(BROKEN_VERSION)?;
        ensure!(
            failures == tries,
            "the broken version failed its health gate {failures} times under {how}, not {tries} (its tries left)"
        );
        eprintln!(
            "vm-test: {how}: the broken version failed its {tries} tries left, the kept one booted again ({:.0?})",
            started.elapsed()
        );
        Ok(())
    }

    /// How often `version` failed its health gate in this qemu run (the
    /// gate says so on the console).
    fn gate_failures(&self, version: &str) -> Result<usize> {
        let text = fs::read(self.work.join("serial.log"))?;
        let line = format!("matrix-appliance: health gate: {version} FAILED");
        Ok(String::from_utf8_lossy(&text).matches(&line).count())
    }

    /// The byte offset of the ESP in the (raw) disk image, from the build's
    /// manifest.
    fn esp_offset(&self, manifest_dir: &Path) -> Result<u64> {
        ensure!(
            self.disk == Disk::Raw,
            "the disk must be raw to edit its ESP"
        );
        let manifest: Value = serde_json::from_slice(&fs::read(
            manifest_dir.join(format!("{PROFILE}.manifest.json")),
        )?)?;
        manifest["disk"]["partitions"]
            .as_array()
            .and_then(|p| p.iter().find(|p| p["label"] == "esp"))
            .and_then(|p| p["offset"].as_u64())
            .context("the manifest gives no ESP offset")
    }

    /// Runs an mtools command on the (raw) disk's ESP from the host; `IMG`
    /// in `command` is the ESP's mtools image argument.
    fn on_esp(&self, manifest_dir: &Path, command: &str, what: &str) -> Result<()> {
        let image = format!(
            "/work/{}@@{}",
            Disk::Raw.file(),
            self.esp_offset(manifest_dir)?
        );
        let script = self.in_tools_root(&command.replace("IMG", &image));
        run_ok(&mut in_private_mounts(&script), what)
    }

    /// Writes GRUB's environment block on the (raw) disk's ESP from the host
    /// (mtools): `version` on trial with `tries` left, the newer one good.
    fn set_grub_trial(&self, manifest_dir: &Path, version: &str, tries: u32) -> Result<()> {
        let mut block = format!(
            "# GRUB Environment Block\nappliance_good={NEWER_VERSION}\nappliance_try={version}\n\
             appliance_tries={tries}\nappliance_bad=\n"
        )
        .into_bytes();
        block.resize(1024, b'#');
        fs::write(self.work.join("grubenv"), block)?;
        self.on_esp(
            manifest_dir,
            "mcopy -o -i IMG /work/grubenv ::grub/grubenv",
            "mcopy (GRUB's environment block)",
        )
    }

    /// Renames `version`'s unified kernel image on the (raw) disk's ESP from
    /// the host (mtools), from its fresh `+3-0` to `tries` left and the rest
    /// done, as systemd-boot leaves it after failed tries.
    fn set_uki_trial(&self, manifest_dir: &Path, version: &str, tries: u32) -> Result<()> {
        let stem = format!("::EFI/Linux/appliance_{version}");
        self.on_esp(
            manifest_dir,
            &format!(
                "mren -i IMG {stem}+3-0.efi {stem}+{tries}-{}.efi",
                3 - tries
            ),
            "mren (systemd-boot's tries in the file name)",
        )
    }

    /// The machine's identity and secrets are what they were.
    fn check_same_machine(&self, before: &str) -> Result<()> {
        let now = self.identity()?;
        // Not two empty (or failed) listings: the machine ID, the host key's
        // fingerprint and the secrets' hashes.
        ensure!(
            before.matches(" | ").count() >= 8,
            "the identity listing is too short to compare: {before}"
        );
        ensure!(
            before == now,
            "the machine's identity or secrets changed:\nbefore: {before}\nnow:    {now}"
        );
        // That no first-boot step ran again is checked per step by
        // vm-check.sh (check_over_ssh), on this boot too.
        Ok(())
    }

    /// Leaves in Podman's own store (/var) another image under Synapse's
    /// embedded name, as an appliance that once loaded its images into /var
    /// has there: it would win over the OS's image store, so the upgraded
    /// boot must remove it (embedded-image-check) and run the OS's Synapse.
    fn leave_older_synapse_copy(&self) -> Result<()> {
        let planted = self.ssh(&format!(
            "set -e; d=$(mktemp -d); echo older >$d/which; tar -C $d -cf $d.tar .;              podman import -q $d.tar {STALE_IMAGE} >/dev/null; rm -r $d $d.tar;              podman images --format '{{{{.Repository}}}} {{{{.ReadOnly}}}}' {STALE_IMAGE}"
        ))?;
        ensure!(
            planted.contains(&format!(
                "{} false",
                STALE_IMAGE.trim_end_matches(":embedded")
            )),
            "could not leave an older copy of {STALE_IMAGE} in /var: {planted}"
        );
        Ok(())
    }

    pub(crate) fn boot(&self, firmware: Firmware) -> Result<Qemu> {
        self.boot_with(firmware, &[])
    }

    /// Boots with systemd credentials (name, content) passed in through
    /// SMBIOS (type 11), e.g. `systemd.extra-unit.<unit>`: units the boot
    /// gets without the image changing (mkosi's pattern for test hooks).
    pub(crate) fn boot_with(
        &self,
        firmware: Firmware,
        credentials: &[(String, String)],
    ) -> Result<Qemu> {
        self.launch(firmware, credentials, false)
    }

    /// Like [`Vm::boot_with`], but the guest's reboots restart it in the same
    /// qemu (boot counting needs them); it ends when the guest powers off.
    fn boot_rebooting(&self, firmware: Firmware, credentials: &[(String, String)]) -> Result<Qemu> {
        self.launch(firmware, credentials, true)
    }

    fn launch(
        &self,
        firmware: Firmware,
        credentials: &[(String, String)],
        reboots: bool,
    ) -> Result<Qemu> {
        let serial = self.work.join("serial.log");
        let _ = fs::remove_file(&serial);
        fs::write(&serial, "")?;
        let firmware_args = match &firmware {
            Firmware::Uefi => {
                let vars = self.work.join("efivars.fd");
                if !vars.exists() {
                    fs::copy(self.tools.join("usr/share/OVMF/OVMF_VARS_4M.fd"), &vars)?;
                }
                "-drive if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd \
                 -drive if=pflash,format=raw,file=/work/efivars.fd"
                    .to_string()
            }
            Firmware::Bios => String::new(),
        };
        // Each from a file: a script is longer than a command line should hold.
        let mut smbios = String::new();
        for (i, (name, content)) in credentials.iter().enumerate() {
            let file = format!("credential-{i}");
            fs::write(
                self.work.join(&file),
                format!(
                    "io.systemd.credential.binary:{name}={}",
                    BASE64.encode(content.as_bytes())
                ),
            )?;
            smbios += &format!(" -smbios type=11,path=/work/{file}");
        }
        let accel = self.accel;
        let no_reboot = if reboots { "" } else { "-no-reboot" };
        let (disk, format) = (self.disk.file(), self.disk.format());
        // The guest's only ways out: the update server at UPDATE_HOST, the
        // backup server at BACKUP_HOST. cmd: runs nc for each connection (a
        // tcp: chardev would be one connection).
        let mut guestfwd = String::new();
        for (host, port) in [
            (UPDATE_HOST, self.update_port),
            (BACKUP_HOST, self.backup_port),
        ] {
            if let Some(port) = port {
                guestfwd += &format!(",guestfwd=tcp:{host}:80-cmd:nc 127.0.0.1 {port}");
            }
        }
        let qemu = format!(
            "qemu-system-x86_64 {MACHINE} -accel {accel} \
             -nographic {no_reboot} {firmware_args} \
             -drive if=virtio,file=/work/{disk},format={format} \
             -netdev 'user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{}-:22,hostfwd=tcp:127.0.0.1:{}-:443,hostfwd=tcp:127.0.0.1:{}-:{PROBE_PORT}{guestfwd}' \
             -device virtio-net-pci,netdev=n0,romfile= \
             -serial file:/work/serial.log -monitor none -display none{smbios}",
            self.ssh_port, self.https_port, self.probe_port
        );
        let how = match firmware {
            Firmware::Uefi => "UEFI",
            Firmware::Bios => "BIOS",
        };
        eprintln!("vm: booting with {how} ({accel})");
        in_private_mounts(&self.in_tools_root(&qemu))
            .stdin(Stdio::null())
            .stdout(fs::File::create(self.work.join("qemu.log"))?)
            .stderr(Stdio::inherit())
            .spawn()
            .map(Qemu)
            .context("starting qemu")
    }

    /// Waits for the appliance's readiness line on the serial console.
    pub(crate) fn wait_ready(&self, qemu: &mut Qemu) -> Result<Duration> {
        self.wait_for(qemu, READY)
    }

    /// Waits for `marker` on the serial console; the time since the call.
    pub(crate) fn wait_for(&self, qemu: &mut Qemu, marker: &str) -> Result<Duration> {
        let qemu = &mut qemu.0;
        let started = Instant::now();
        let serial = self.work.join("serial.log");
        loop {
            let text = fs::read(&serial).unwrap_or_default();
            let text = String::from_utf8_lossy(&text);
            if text.contains(marker) {
                return Ok(started.elapsed());
            }
            if text.contains(NOT_READY) {
                let status = self
                    .ssh("matrixctl status; systemctl --failed")
                    .unwrap_or_default();
                bail!(
                    "the appliance says it is not ready:\n{status}\nserial log: {}",
                    serial.display()
                );
            }
            if let Some(status) = qemu.try_wait()? {
                bail!(
                    "qemu exited ({status}) before {marker:?} on the console; serial log: {}",
                    serial.display()
                );
            }
            if started.elapsed() > BOOT_TIMEOUT {
                let _ = qemu.kill();
                bail!(
                    "no {marker:?} on the console within {BOOT_TIMEOUT:?}; serial log: {}",
                    serial.display()
                );
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    /// `command` over SSH with `input` on its standard input (a script, or
    /// a secret that must not be on a command line); its output, whatever
    /// its exit status.
    pub(crate) fn ssh_with_input(&self, command: &str, input: &str) -> Result<Output> {
        let mut child = ssh_command(&self.key, self.ssh_port, command)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running ssh")?;
        child
            .stdin
            .take()
            .context("ssh's standard input")?
            .write_all(input.as_bytes())?;
        Ok(child.wait_with_output()?)
    }

    pub(crate) fn ssh(&self, command: &str) -> Result<String> {
        let out = ssh_command(&self.key, self.ssh_port, command)
            .output()
            .context("running ssh")?;
        if !out.status.success() {
            bail!(
                "ssh {command:?} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The key passed as a systemd credential logs in, beside the image's.
    fn check_platform_key(&self, key: &Path) -> Result<()> {
        let out = ssh_command(
            key,
            self.ssh_port,
            "cat /run/matrix-appliance/ssh/authorized_keys.root",
        )
        .output()
        .context("running ssh")?;
        ensure!(
            out.status.success()
                && String::from_utf8_lossy(&out.stdout).contains("vm-test-platform"),
            "the key passed as the credential ssh.authorized_keys.root does not log in: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        eprintln!("vm-test: a key passed by the platform (systemd credential) logs in too");
        Ok(())
    }

    /// Units, mounts and images as the issue asks.
    fn check_system(&self) -> Result<()> {
        let failed = self.ssh("systemctl list-units --failed --plain --no-legend")?;
        // Podman runs each health probe as a transient unit; one probe that
        // timed out on this slow, emulated machine stays "failed" even when
        // the next ones pass. Those are reported; the container's health is
        // what counts (matrixctl status, below). Any other failed unit fails.
        let (probes, failed): (Vec<&str>, Vec<&str>) = failed
            .lines()
            .partition(|l| l.contains("[systemd-run] /usr/bin/podman healthcheck run"));
        ensure!(failed.is_empty(), "failed units:\n{}", failed.join("\n"));
        if !probes.is_empty() {
            eprintln!(
                "vm-test: note: {} failed health probe(s) (timed out)",
                probes.len()
            );
        }
        self.ssh("matrixctl status >/dev/null")
            .context("matrixctl status says the stack is not healthy")?;
        // Name resolution by DNS only: nothing answers LLMNR (5355) or mDNS (5353).
        let multicast = self.ssh("ss -Hlntu '( sport = :5355 or sport = :5353 )'")?;
        ensure!(
            multicast.trim().is_empty(),
            "something listens for LLMNR or multicast DNS:\n{multicast}"
        );
        let root = self.ssh("findmnt -no FSTYPE,OPTIONS /")?;
        ensure!(
            root.starts_with("erofs") && root.contains("ro"),
            "the root is not a read-only erofs: {root}"
        );
        let writable = self.ssh("touch /usr/x 2>&1 || echo refused")?;
        ensure!(writable.contains("refused"), "/usr is writable");
        let var = self
            .ssh("findmnt -no SOURCE,FSTYPE /var && lsblk -bno SIZE /dev/disk/by-partlabel/var")?;
        let size: u64 = var
            .lines()
            .last()
            .unwrap_or("0")
            .trim()
            .parse()
            .unwrap_or(0);
        // 20 GiB less the ESP and the two 3 GiB root slots: about 13.5 GiB.
        ensure!(
            size > 12 << 30,
            "/var did not grow to fill the 20G disk: {var}"
        );
        // Only the appliance's own images, all in the OS's read-only image
        // store (nothing loaded into /var), and no OCI layout left on the disk.
        let images = self.ssh("podman images --format '{{.Repository}} {{.ReadOnly}}'")?;
        ensure!(
            images.lines().count() >= 3
                && images
                    .lines()
                    .all(|l| l.starts_with("localhost/matrix-appliance/") && l.ends_with(" true")),
            "an image not from the appliance's read-only image store is in Podman's store:\n{images}"
        );
        let layout = self.ssh("ls /usr/share/matrix-appliance/images 2>&1 || true")?;
        ensure!(
            layout.contains("No such file"),
            "the OCI layout is in the disk image: {layout}"
        );
        // The proof of "offline": nothing outside the VM is reachable.
        let outside = self.ssh(
            "curl -sS --max-time 10 -o /dev/null https://deb.debian.org/ 2>&1 && echo reached || true",
        )?;
        ensure!(!outside.contains("reached"), "the VM reached the internet");
        let ids = self.ssh("cat /etc/machine-id /var/lib/appliance/machine-id")?;
        let ids: Vec<&str> = ids.lines().collect();
        ensure!(
            ids.len() == 2 && ids[0] == ids[1] && ids[0].len() == 32,
            "/etc/machine-id is not the machine ID kept in /var: {ids:?}"
        );
        let key_login =
            self.ssh("grep -c '^PasswordAuthentication no' /etc/ssh/sshd_config.d/appliance.conf")?;
        ensure!(key_login.trim() == "1", "password login is not off");
        Ok(())
    }

    /// The firewall drops what comes in on a port the appliance does not
    /// open: an echo service on [`PROBE_PORT`] answers on loopback but not
    /// from outside, until a rule accepts the port (so the probe can tell).
    fn check_firewall(&self) -> Result<()> {
        self.ssh(&format!(
            "systemd-run --quiet --unit=vm-test-echo systemd-socket-activate \
             --listen={PROBE_PORT} --accept --inetd cat"
        ))?;
        // Retried while the listener comes up.
        let inside = self.ssh(&format!(
            "for i in $(seq 30); do \
               echo ping | timeout 20 bash -c 'exec 3<>/dev/tcp/127.0.0.1/{PROBE_PORT} \
                 && cat >&3 && head -c 4 <&3' 2>/dev/null && exit 0; sleep 1; \
             done; true"
        ))?;
        ensure!(
            inside.trim() == "ping",
            "the echo service on {PROBE_PORT} does not answer inside the VM: {inside:?}"
        );
        ensure!(
            !echoes(self.probe_port),
            "the firewall let a connection to port {PROBE_PORT} in (only 22, 80, 443 and 8448 may be open)"
        );
        self.ssh(&format!(
            "nft insert rule inet appliance input tcp dport {PROBE_PORT} accept"
        ))?;
        let answered = echoes(self.probe_port);
        // The appliance's own ruleset again (the file replaces its table).
        self.ssh("nft -f /etc/nftables.conf")?;
        let after = echoes(self.probe_port);
        self.ssh(
            "systemctl stop vm-test-echo; systemctl reset-failed vm-test-echo 2>/dev/null || true",
        )?;
        ensure!(
            answered,
            "port {PROBE_PORT} gave no answer from outside even with a rule accepting it: \
             the firewall probe cannot tell"
        );
        ensure!(
            !after,
            "port {PROBE_PORT} still answers from outside after the appliance's ruleset was restored"
        );
        eprintln!("vm-test: the firewall drops port {PROBE_PORT} from outside");
        Ok(())
    }

    /// What must survive a reboot: machine-id, SSH host key, secrets.
    fn identity(&self) -> Result<String> {
        self.ssh(IDENTITY).map(|s| s.replace('\n', " | "))
    }

    /// The line of the serial console that holds `marker`, from it on.
    pub(crate) fn console_line(&self, marker: &str) -> Result<String> {
        let text = fs::read(self.work.join("serial.log"))?;
        String::from_utf8_lossy(&text)
            .lines()
            .find_map(|l| l.find(marker).map(|at| l[at..].trim_end().to_string()))
            .with_context(|| format!("no {marker:?} on the console"))
    }

    /// Matrix through the proxy over TLS, trusting only the appliance's CA.
    /// Without `room`: the admin creates a room and sends a message; with
    /// it: the message from the first boot is read back.
    fn check_matrix(&self, room: Option<&(String, String)>) -> Result<(String, String)> {
        let ca = self.work.join("ca.crt");
        fs::write(&ca, self.ssh("cat /var/lib/matrix/proxy/internal-ca.crt")?)?;
        let versions = self.request("GET", MATRIX_HOST, "/_matrix/client/versions", None, None)?;
        ensure!(
            versions["versions"]
                .as_array()
                .is_some_and(|v| !v.is_empty()),
            "/_matrix/client/versions: {versions}"
        );
        let server = self.request("GET", SERVER_NAME, "/.well-known/matrix/server", None, None)?;
        ensure!(
            server["m.server"] == json!(format!("{MATRIX_HOST}:443")),
            ".well-known/matrix/server: {server}"
        );
        let client = self.request("GET", SERVER_NAME, "/.well-known/matrix/client", None, None)?;
        ensure!(
            client["m.homeserver"]["base_url"] == json!(format!("https://{MATRIX_HOST}")),
            ".well-known/matrix/client: {client}"
        );
        let token = self.admin_login()?;
        let (room_id, text) = match room {
            Some(r) => r.clone(),
            None => {
                let created = self.request(
                    "POST",
                    MATRIX_HOST,
                    "/_matrix/client/v3/createRoom",
                    Some(&token),
                    Some(json!({"name": "vm-test"})),
                )?;
                let room_id = created["room_id"]
                    .as_str()
                    .with_context(|| format!("createRoom: {created}"))?
                    .to_string();
                let text = format!("hello from the first boot, {}", std::process::id());
                let sent = self.request(
                    "PUT",
                    MATRIX_HOST,
                    &format!(
                        "/_matrix/client/v3/rooms/{}/send/m.room.message/vm-test-1",
                        room_id.replace('!', "%21").replace(':', "%3A")
                    ),
                    Some(&token),
                    Some(json!({"msgtype": "m.text", "body": text})),
                )?;
                ensure!(sent["event_id"].is_string(), "send: {sent}");
                (room_id, text)
            }
        };
        let messages = self.request(
            "GET",
            MATRIX_HOST,
            &format!(
                "/_matrix/client/v3/rooms/{}/messages?dir=b&limit=20",
                room_id.replace('!', "%21").replace(':', "%3A")
            ),
            Some(&token),
            None,
        )?;
        let found = messages["chunk"]
            .as_array()
            .is_some_and(|c| c.iter().any(|e| e["content"]["body"] == json!(text)));
        ensure!(found, "the message is not in the room: {messages}");
        eprintln!("vm-test: Matrix answers over TLS; the admin's message is in {room_id}");
        Ok((room_id, text))
    }

    /// Logs the admin in with the password first boot stored; the access token.
    fn admin_login(&self) -> Result<String> {
        let password = self.ssh("cat /var/lib/matrix/secrets/admin-password")?;
        let login = self.request(
            "POST",
            MATRIX_HOST,
            "/_matrix/client/v3/login",
            None,
            Some(json!({"type": "m.login.password",
                        "identifier": {"type": "m.id.user", "user": "admin"},
                        "password": password.trim_end_matches('\n')})),
        )?;
        Ok(login["access_token"]
            .as_str()
            .with_context(|| format!("the admin could not log in: {login}"))?
            .to_string())
    }

    /// The Telegram bridge: registered with Synapse, its bot answers `help` in a
    /// direct chat with the admin (through the proxy over TLS), and no secret of it
    /// is in the journal.
    fn check_telegram_bridge(&self) -> Result<()> {
        let listed = self.ssh("cat /var/lib/matrix/synapse/conf.d/40-appservices.yaml")?;
        ensure!(
            listed.contains("/var/lib/matrix/synapse/appservices/telegram.yaml"),
            "the Telegram registration is not listed for Synapse:\n{listed}"
        );
        let token = self.admin_login()?;
        let bot = format!("@telegrambot:{SERVER_NAME}");
        let created = self.request(
            "POST",
            MATRIX_HOST,
            "/_matrix/client/v3/createRoom",
            Some(&token),
            Some(json!({"invite": [bot], "is_direct": true, "preset": "private_chat"})),
        )?;
        let room = created["room_id"]
            .as_str()
            .with_context(|| format!("createRoom: {created}"))?
            .replace('!', "%21")
            .replace(':', "%3A");
        let started = Instant::now();
        let mut sent = false;
        loop {
            let members = self.request(
                "GET",
                MATRIX_HOST,
                &format!("/_matrix/client/v3/rooms/{room}/joined_members"),
                Some(&token),
                None,
            )?;
            if members["joined"].get(&bot).is_some() && !sent {
                let answer = self.request(
                    "PUT",
                    MATRIX_HOST,
                    &format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/vm-help-1"),
                    Some(&token),
                    Some(json!({"msgtype": "m.text", "body": "help"})),
                )?;
                ensure!(answer["event_id"].is_string(), "send: {answer}");
                sent = true;
            }
            if sent {
                let messages = self.request(
                    "GET",
                    MATRIX_HOST,
                    &format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=50"),
                    Some(&token),
                    None,
                )?;
                let answered = messages["chunk"].as_array().is_some_and(|c| {
                    c.iter().any(|e| {
                        e["sender"] == json!(bot)
                            && e["content"]["body"]
                                .as_str()
                                .is_some_and(|b| b.contains("Show this help message"))
                    })
                });
                if answered {
                    break;
                }
            }
            ensure!(
                started.elapsed() < Duration::from_secs(600),
                "the Telegram bridge bot did not {} within 10 minutes",
                if sent {
                    "answer `help`"
                } else {
                    "join the direct chat"
                }
            );
            std::thread::sleep(Duration::from_secs(5));
        }
        eprintln!(
            "vm-test: the Telegram bridge bot answered `help` after {:.0?}",
            started.elapsed()
        );
        self.check_journal()
    }

    /// vm-journal.sh over SSH: the containers' logs reach the journal, and
    /// no secret is in it.
    pub(crate) fn check_journal(&self) -> Result<()> {
        let script = format!("{}\njournal_check\n", journal_script());
        let out = self.ssh_with_input("sh -s", &script)?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(
            text.starts_with("journal: ok"),
            "the journal check: {}{}",
            text.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        eprintln!("vm-test: {}", text.trim());
        Ok(())
    }

    /// curl over the forwarded port as if DNS pointed `host` at the VM.
    fn request(
        &self,
        method: &str,
        host: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Result<Value> {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--fail-with-body", "--max-time", "60", "-X", method])
            .arg("--cacert")
            .arg(self.work.join("ca.crt"))
            .args([
                "--resolve",
                &format!("{host}:{}:127.0.0.1", self.https_port),
            ]);
        if let Some(t) = token {
            cmd.args(["-H", &format!("Authorization: Bearer {t}")]);
        }
        if let Some(b) = body {
            cmd.args([
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                &b.to_string(),
            ]);
        }
        cmd.arg(format!("https://{host}:{}{path}", self.https_port));
        let out = cmd.output().context("running curl")?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success(),
            "{method} https://{host}{path}: {} {text}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        serde_json::from_str(&text).with_context(|| format!("{method} {path}: not JSON: {text}"))
    }

    /// A clean shutdown from inside; waits for qemu to exit.
    pub(crate) fn shutdown(&self, mut qemu: Qemu) -> Result<()> {
        let _ = self.ssh("systemctl poweroff --no-block");
        self.wait_powered_off(&mut qemu)
    }

    /// Waits (5 minutes at most) for the VM to power itself off.
    pub(crate) fn wait_powered_off(&self, qemu: &mut Qemu) -> Result<()> {
        let qemu = &mut qemu.0;
        let started = Instant::now();
        while qemu.try_wait()?.is_none() {
            if started.elapsed() > Duration::from_secs(300) {
                let _ = qemu.kill();
                bail!("the VM did not power off within 5 minutes");
            }
            std::thread::sleep(Duration::from_secs(2));
        }
        Ok(())
    }
}

/// What identifies the machine and must survive reboots and upgrades: its
/// ID, SSH host key, and the hashes of every secret and bridge registration.
const IDENTITY: &str = "cat /etc/machine-id; \
     ssh-keygen -lf /var/lib/appliance/ssh/ssh_host_ed25519_key.pub; \
     cd /var/lib/matrix && find secrets synapse/secrets synapse/appservices bridges/*/secrets \
     -type f ! -name matrixctl-token -exec sha256sum {} + | sort -k2";

/// The journal check (vm-journal.sh) with what it needs to know from here.
fn journal_script() -> String {
    format!(
        "telegram_api_hash='{TELEGRAM_API_HASH}'\n{}",
        include_str!("vm-journal.sh")
    )
}

/// ssh as root into the VM (through the forwarded port) running `command`.
fn ssh_command(key: &Path, port: u16, command: &str) -> Command {
    let mut cmd = Command::new("ssh");
    cmd.arg("-i").arg(key).args([
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "LogLevel=ERROR",
        "-o",
        "ConnectTimeout=30",
        "-o",
        "BatchMode=yes",
        "-p",
        &port.to_string(),
        "root@127.0.0.1",
        command,
    ]);
    cmd
}

/// The root slots' labels, sorted.
const SLOTS: &str =
    "udevadm settle; lsblk -rno PARTLABEL | grep -E '^(appliance_|_empty)' | sort | tr '\\n' ' '";

/// The embedded image the reboot leaves an older copy of in /var.
const STALE_IMAGE: &str = "localhost/matrix-appliance/synapse:embedded";

/// What the inside check prints on the console, then "passed" or "FAILED: ...".
const CHECK_MARKER: &str = "vm-test-check: ";

/// The appliance checking itself (vm-check.sh) in a boot without SSH, run by
/// a unit that systemd gets as credentials (mkosi's check-and-shutdown
/// pattern): pulled in by multi-user.target, ordered after the appliance's
/// readiness report, powering the VM off when done, passed or not.
struct CheckInside<'a> {
    /// The first boot's room and message, to be read back.
    room: &'a (String, String),
    /// sha256 of the IDENTITY command's output on the first boot.
    identity_sha: &'a str,
    /// The updated image's max_upload_size.
    upload_limit: &'a str,
    /// The version that must run, the one installed beside it, and one
    /// that must be marked bad ("" for none).
    version: &'a str,
    previous: &'a str,
    failed: &'a str,
    /// The image the boot must have removed from /var ("": not checked).
    stale_image: &'a str,
}

impl CheckInside<'_> {
    const UNIT: &'static str = "[Unit]
Description=vm-test: check the appliance from the inside, then power off
After=matrix-appliance-ready.service
SuccessAction=poweroff
FailureAction=poweroff

[Service]
Type=oneshot
ImportCredential=vm-test-check.sh
StandardOutput=journal+console
ExecStart=/bin/sh %d/vm-test-check.sh
";

    fn script(&self) -> String {
        let (room, text) = self.room;
        format!(
            "matrix_host='{MATRIX_HOST}'\nroom='{room}'\ntext='{text}'\n\
             identity_sha='{}'\nupload_limit='{}'\nstale_image='{}'\n\
             version='{}'\nprevious='{}'\nfailed='{}'\n\
             identity() {{ {IDENTITY}; }}\n{}\n{}",
            self.identity_sha,
            self.upload_limit,
            self.stale_image,
            self.version,
            self.previous,
            self.failed,
            journal_script(),
            include_str!("vm-check.sh")
        )
    }

    fn credentials(&self) -> Vec<(String, String)> {
        vec![
            (
                "systemd.extra-unit.vm-test-check.service".into(),
                Self::UNIT.into(),
            ),
            (
                "systemd.unit-dropin.multi-user.target~vm-test".into(),
                "[Unit]\nWants=vm-test-check.service\n".into(),
            ),
            ("vm-test-check.sh".into(), self.script()),
        ]
    }
}

/// Builds the broken version: the project copied with a test-only layer
/// whose drop-in makes Synapse's unit fail before it starts, added to the
/// profile (so the build is the same profile, other than that).
fn build_broken(build: &dyn Fn(&str, &[&str]) -> Result<PathBuf>, work: &Path) -> Result<PathBuf> {
    let project = work.join("broken-project");
    let _ = fs::remove_dir_all(&project);
    fs::create_dir_all(&project)?;
    for dir in ["layers", "profiles", "images"] {
        run_ok(
            Command::new("cp")
                .arg("-a")
                .arg(repo().join(dir))
                .arg(&project),
            "cp (the project)",
        )?;
    }
    let layer = project.join("layers/vm-test-broken-synapse");
    let dropin = layer.join("root/usr/lib/systemd/system/matrix-synapse.service.d");
    fs::create_dir_all(&dropin)?;
    fs::write(
        layer.join("layer.toml"),
        "description = \"vm-test only: Synapse's unit fails before it starts\"\n\
         requires = [\"homeserver\"]\n",
    )?;
    fs::write(
        dropin.join("99-vm-test-broken.conf"),
        // Fails at once and again every second: the gate sees it fail within seconds.
        "[Service]\nExecStartPre=/bin/false\nRestartSec=1s\n",
    )?;
    let profile = project.join(format!("profiles/{PROFILE}.toml"));
    let text = fs::read_to_string(&profile)?;
    fs::write(
        &profile,
        text.replacen(
            "outputs =",
            "layers = [\"vm-test-broken-synapse\"]\noutputs =",
            1,
        ),
    )?;
    let out = build(
        "out-broken",
        &[
            "--project",
            project.to_str().context("a UTF-8 work path")?,
            "--set",
            "max_upload_size=77M",
            "--set",
            "postgres_major=18",
            "--version",
            BROKEN_VERSION,
        ],
    )?;
    remove_images(&out, &["raw", "qcow2", "bundle.tar"])?;
    fs::remove_dir_all(&project)?;
    Ok(out)
}

/// See [`Vm::in_tools_root`].
fn in_tools(tools: &Path, work: &Path, command: &str) -> String {
    format!(
        "set -e\nmount -t proc proc {t}/proc\nmount --rbind /dev {t}/dev\nmkdir -p {t}/work\n\
         mount --bind {w} {t}/work\nexec chroot {t} {command}",
        t = tools.display(),
        w = work.display()
    )
}

/// gpg in the tools root with the home `work/keys/<key>`; the clock before
/// the tests' epoch, so the keys are older than what they sign.
fn gpg(tools: &Path, work: &Path, key: &str, args: &str) -> Result<()> {
    let command = format!(
        "gpg --homedir /work/keys/{key} --batch --quiet --pinentry-mode loopback --passphrase '' \
         --faked-system-time {KEYS_EPOCH}! {args}"
    );
    run_ok(
        &mut in_private_mounts(&in_tools(tools, work, &format!("sh -c \"{command}\""))),
        &format!("gpg {args}"),
    )
}

/// Two Ed25519 signing keys, `work/keys/{a,b}`: the images trust and are
/// signed by `a` (its secret key exported to `work/keys/a.sec`); `b` signs
/// the copy that must be refused.
fn make_keys(tools: &Path, work: &Path) -> Result<PathBuf> {
    for key in ["a", "b"] {
        let home = work.join("keys").join(key);
        fs::create_dir_all(&home)?;
        fs::set_permissions(&home, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
        gpg(
            tools,
            work,
            key,
            &format!("--quick-gen-key 'vm-test update key {key}' ed25519 sign never"),
        )?;
    }
    gpg(
        tools,
        work,
        "a",
        "--export-secret-keys --output /work/keys/a.sec",
    )?;
    stop_gpg_agents(tools, work)?;
    Ok(work.join("keys/a.sec"))
}

/// A copy of an update directory whose SHA256SUMS is signed by key `b`,
/// which the image does not trust.
fn wrongly_signed_copy(tools: &Path, work: &Path, update: &Path) -> Result<PathBuf> {
    let to = work.join("update-wrong-key");
    let _ = fs::remove_dir_all(&to);
    fs::create_dir_all(&to)?;
    for entry in fs::read_dir(update)? {
        let entry = entry?;
        if entry.file_name() != "SHA256SUMS.gpg" {
            fs::hard_link(entry.path(), to.join(entry.file_name()))?;
        }
    }
    let rel = to
        .strip_prefix(work)
        .context("the copy is in the work directory")?;
    gpg(
        tools,
        work,
        "b",
        &format!(
            "--detach-sign --output /work/{r}/SHA256SUMS.gpg /work/{r}/SHA256SUMS",
            r = rel.display()
        ),
    )?;
    stop_gpg_agents(tools, work)?;
    Ok(to)
}

/// gpg leaves an agent running per home: stopped, so none outlives the test.
fn stop_gpg_agents(tools: &Path, work: &Path) -> Result<()> {
    for key in ["a", "b"] {
        run_ok(
            &mut in_private_mounts(&in_tools(
                tools,
                work,
                &format!("gpgconf --homedir /work/keys/{key} --kill all"),
            )),
            "gpgconf --kill all",
        )?;
    }
    Ok(())
}

/// A copy of an update directory with one byte of its BIOS kernel changed
/// (SHA256SUMS as it was): what a damaged download or a tampered mirror
/// serves. The kernel is the first file fetched, so the refusal comes before
/// the long download of the root image.
fn tampered_copy(update: &Path, to: &Path) -> Result<PathBuf> {
    use std::os::unix::fs::FileExt;
    let _ = fs::remove_dir_all(to);
    fs::create_dir_all(to)?;
    let mut tampered = false;
    for entry in fs::read_dir(update)? {
        let entry = entry?;
        let dest = to.join(entry.file_name());
        if entry.file_name().to_string_lossy().ends_with(".vmlinuz") {
            // A copy of its own, not a link to the real one.
            fs::copy(entry.path(), &dest)?;
            let file = fs::OpenOptions::new().read(true).write(true).open(&dest)?;
            let mut byte = [0u8; 1];
            let at = file.metadata()?.len() / 2;
            file.read_exact_at(&mut byte, at)?;
            file.write_all_at(&[byte[0] ^ 0x01], at)?;
            tampered = true;
        } else {
            fs::hard_link(entry.path(), &dest)
                .or_else(|_| fs::copy(entry.path(), &dest).map(drop))?;
        }
    }
    ensure!(tampered, "no kernel in {} to tamper with", update.display());
    Ok(to.to_path_buf())
}

fn sha256(path: &Path) -> Result<String> {
    let out = Command::new("sha256sum").arg(path).output()?;
    ensure!(out.status.success(), "sha256sum {} failed", path.display());
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string())
}

/// A running qemu, killed when dropped (a failed check leaves no VM behind).
pub(crate) struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// `sh -c script` in a private mount namespace (the tools root's mounts stay
/// there); its child dies with it.
fn in_private_mounts(script: &str) -> Command {
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--mount",
        "--propagation",
        "private",
        "--fork",
        "--kill-child",
        "sh",
        "-c",
        script,
    ]);
    cmd
}

/// The VM's disk in the work directory.
#[derive(Clone, Copy, PartialEq)]
enum Disk {
    /// An overlay whose backing file is the built qcow2 ([`QCOW2_BASE`]).
    Qcow2,
    Raw,
}

/// The built qcow2 image under the overlay, in the work directory.
const QCOW2_BASE: &str = "image.qcow2";

impl Disk {
    fn file(self) -> &'static str {
        match self {
            Disk::Qcow2 => "disk.qcow2",
            Disk::Raw => "disk.raw",
        }
    }

    fn format(self) -> &'static str {
        match self {
            Disk::Qcow2 => "qcow2",
            Disk::Raw => "raw",
        }
    }
}

/// A port nothing in the appliance listens on or opens.
const PROBE_PORT: u16 = 9999;

/// Whether the echo service behind the forwarded `port` answers. qemu's user
/// network accepts every forwarded connection on the host side; only the
/// echo says that the guest took it.
fn echoes(port: u16) -> bool {
    let answer = || -> std::io::Result<bool> {
        let mut stream = std::net::TcpStream::connect_timeout(
            &([127, 0, 0, 1], port).into(),
            Duration::from_secs(10),
        )?;
        stream.set_read_timeout(Some(Duration::from_secs(20)))?;
        stream.write_all(b"ping\n")?;
        let mut buf = [0u8; 4];
        stream.read_exact(&mut buf)?;
        Ok(&buf == b"ping")
    };
    answer().unwrap_or(false)
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// /dev/kvm may exist and still not run guests: a KVM qemu that is still
/// running after a few seconds can (one that cannot exits at once).
fn kvm_boots(tools: &Path) -> bool {
    if std::env::var("BUILDER_VM_ACCEL").is_ok_and(|a| a == "tcg")
        || !Path::new("/dev/kvm").exists()
    {
        return false;
    }
    // KVM works when the guest runs: UEFI firmware writes to the serial port
    // within seconds. (A qemu that merely has not exited yet proves nothing:
    // on a loaded machine it may not have reached KVM's failure.)
    let serial = tools.join("tmp/vm-test-kvm-probe.log");
    let _ = fs::remove_file(&serial);
    let script = format!(
        "mount -t proc proc {t}/proc && mount --rbind /dev {t}/dev && exec chroot {t} \
         qemu-system-x86_64 {MACHINE} -accel kvm -nographic -display none -no-reboot \
         -drive if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd \
         -serial file:/tmp/vm-test-kvm-probe.log -monitor none",
        t = tools.display()
    );
    let Ok(mut child) = in_private_mounts(&script)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    else {
        return false;
    };
    let started = Instant::now();
    let mut runs = false;
    while started.elapsed() < Duration::from_secs(30) {
        if fs::metadata(&serial).is_ok_and(|m| m.len() > 0) {
            runs = true;
            break;
        }
        if !matches!(child.try_wait(), Ok(None)) {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = fs::remove_file(&serial);
    runs
}

fn run_ok(cmd: &mut Command, what: &str) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {what}"))?;
    ensure!(status.success(), "{what} failed ({status})");
    Ok(())
}
