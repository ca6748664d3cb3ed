//! The update scenario's pieces: applying updates (damaged, wrongly signed, broken off,
//! real), the broken version, the signing keys, the ESP edited from the host.

use super::*;

/// The root slots' labels, sorted.
pub(super) const SLOTS: &str =
    "udevadm settle; lsblk -rno PARTLABEL | grep -E '^(appliance_|_empty)' | sort | tr '\\n' ' '";

/// Builds the broken version: the project copied with a test-only layer
/// whose drop-in makes Synapse's unit fail before it starts, added to the
/// profile (so the build is the same profile, other than that).
pub(super) fn build_broken(
    build: &dyn Fn(&str, &[&str]) -> Result<PathBuf>,
    work: &Path,
    base_release: &Path,
) -> Result<PathBuf> {
    let project = work.join("broken-project");
    let _ = fs::remove_dir_all(&project);
    fs::create_dir_all(&project)?;
    for dir in ["layers", "profiles", "images"] {
        exec::status(
            exec::command("cp")
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
    // Into the profile's own `layers` list, or a new one.
    let text = if text.starts_with("layers = [") || text.contains("\nlayers = [") {
        text.replacen("layers = [", "layers = [\"vm-test-broken-synapse\", ", 1)
    } else {
        text.replacen(
            "outputs =",
            "layers = [\"vm-test-broken-synapse\"]\noutputs =",
            1,
        )
    };
    fs::write(&profile, text)?;
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
            // Its change is in the appliance's /usr only: it keeps the
            // newer version's OS image, and its update leaves the root out.
            "--base-release",
            base_release.to_str().context("a UTF-8 work path")?,
        ],
    )?;
    let sums = |dir: &Path| -> Result<Vec<(String, String)>> {
        let text = fs::read_to_string(dir.join("update/SHA256SUMS"))?;
        Ok(text
            .lines()
            .filter_map(|l| l.split_once("  "))
            .map(|(sum, name)| (name.to_string(), sum.to_string()))
            .collect())
    };
    let base = sums(
        base_release
            .parent()
            .context("the base release's directory")?,
    )?;
    let (shared, own): (Vec<_>, Vec<_>) = sums(&out)?.into_iter().partition(|f| base.contains(f));
    let mut shared: Vec<&str> = shared.iter().map(|(n, _)| n.as_str()).collect();
    let own: Vec<&str> = own.iter().map(|(n, _)| n.as_str()).collect();
    shared.sort();
    let os_files = [".initrd", ".root.gz", ".vmlinuz"];
    ensure!(
        shared.len() == os_files.len()
            && os_files
                .iter()
                .all(|ext| shared.iter().any(|n| n.ends_with(ext)))
            && own
                == [
                    format!("appliance_{BROKEN_VERSION}.efi"),
                    format!("appliance_{BROKEN_VERSION}.grub.cfg"),
                    format!("appliance_{BROKEN_VERSION}.sysext.raw"),
                ],
        "the broken version's update does not keep the newer one's OS image (root, kernel, \
         initramfs) and bring its own entry and extension: shared {shared:?}, its own {own:?}"
    );
    remove_images(&out, &["raw", "qcow2", "bundle.tar"])?;
    fs::remove_dir_all(&project)?;
    Ok(out)
}

/// gpg in the tools root with the home `work/keys/<key>`; the clock before
/// the tests' epoch, so the keys are older than what they sign.
pub(super) fn gpg(tools: &Path, work: &Path, key: &str, args: &str) -> Result<()> {
    let command = format!(
        "gpg --homedir /work/keys/{key} --batch --quiet --pinentry-mode loopback --passphrase '' \
         --faked-system-time {KEYS_EPOCH}! {args}"
    );
    exec::status(
        &mut in_tools(tools, work, &command)?,
        &format!("gpg {args}"),
    )
}

/// Two Ed25519 signing keys, `work/keys/{a,b}`: the images trust and are
/// signed by `a` (its secret key exported to `work/keys/a.sec`); `b` signs
/// the copy that must be refused.
pub(super) fn make_keys(tools: &Path, work: &Path) -> Result<PathBuf> {
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
pub(super) fn wrongly_signed_copy(tools: &Path, work: &Path, update: &Path) -> Result<PathBuf> {
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
pub(super) fn stop_gpg_agents(tools: &Path, work: &Path) -> Result<()> {
    for key in ["a", "b"] {
        exec::status(
            &mut in_tools(
                tools,
                work,
                &format!("gpgconf --homedir /work/keys/{key} --kill all"),
            )?,
            "gpgconf --kill all",
        )?;
    }
    Ok(())
}

/// A copy of an update directory with one byte of its BIOS kernel changed
/// (SHA256SUMS as it was): what a damaged download or a tampered mirror
/// serves. The kernel is the first file fetched, so the refusal comes before
/// the long download of the root image.
pub(super) fn tampered_copy(update: &Path, to: &Path) -> Result<PathBuf> {
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

impl Vm {
    /// `matrixctl update apply` from the update server: first a copy with one
    /// byte of the root image changed, then one signed by a key the image
    /// does not trust, both refused with nothing changed; then the real
    /// update, installed beside the running version.
    pub(super) fn apply_update(
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

    /// `--from` a directory without a signature is refused (the image takes
    /// signed updates only) and changes nothing.
    pub(super) fn check_from_refusal(&self) -> Result<()> {
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

    /// The byte offset of the ESP in the (raw) disk image, from the build's
    /// manifest.
    pub(super) fn esp_offset(&self, manifest_dir: &Path) -> Result<u64> {
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
    pub(super) fn on_esp(&self, manifest_dir: &Path, command: &str, what: &str) -> Result<()> {
        let image = format!(
            "/work/{}@@{}",
            Disk::Raw.file(),
            self.esp_offset(manifest_dir)?
        );
        exec::run(
            &mut self.in_tools_root(&command.replace("IMG", &image))?,
            what,
        )
    }

    /// Writes GRUB's environment block on the (raw) disk's ESP from the host
    /// (mtools): `version` on trial with `tries` left, the newer one good.
    pub(super) fn set_grub_trial(
        &self,
        manifest_dir: &Path,
        version: &str,
        tries: u32,
    ) -> Result<()> {
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
    pub(super) fn set_uki_trial(
        &self,
        manifest_dir: &Path,
        version: &str,
        tries: u32,
    ) -> Result<()> {
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
}
