//! What the VM test checks in a running appliance: from the inside with vm-check.sh
//! (over SSH, or as credentials in boots without SSH), and what needs the host's side
//! from outside (HTTPS through the forwarded port, the firewall's probe, the console).

use super::*;

/// A room ID as a URL path segment (`!` and `:` escaped).
pub(super) fn room_path(room_id: &str) -> String {
    room_id.replace('!', "%21").replace(':', "%3A")
}

/// What identifies the machine and must survive reboots and upgrades: its
/// ID, SSH host key, and the hashes of every secret and bridge registration.
pub(super) const IDENTITY: &str = "cat /etc/machine-id; \
     ssh-keygen -lf /var/lib/appliance/ssh/ssh_host_ed25519_key.pub; \
     cd /var/lib/matrix && find secrets synapse/secrets synapse/appservices bridges/*/secrets \
     -type f ! -name matrixctl-token -exec sha256sum {} + | sort -k2";

/// The journal check (vm-journal.sh) with what it needs to know from here.
pub(super) fn journal_script() -> String {
    format!(
        "telegram_api_hash='{TELEGRAM_API_HASH}'\n{}",
        include_str!("../vm-journal.sh")
    )
}

/// The embedded image the reboot leaves an older copy of in /var.
pub(super) const STALE_IMAGE: &str = "localhost/matrix-appliance/synapse:embedded";

/// What the inside check prints on the console, then "passed" or "FAILED: ...".
pub(super) const CHECK_MARKER: &str = "vm-test-check: ";

/// What the inside check prints before a note: worth knowing, no failure.
pub(super) const CHECK_NOTE: &str = "vm-test note: ";

/// The appliance checking itself (vm-check.sh): its system part (units, the
/// stack's health, mounts, images, offline, the machine ID, SSH, the
/// containers' groups) always, and what the update must have left when
/// given [`AfterUpdate`]. The same text over SSH ([`Vm::check_over_ssh`])
/// and, in a boot without SSH, run by a unit that systemd gets as
/// credentials (mkosi's check-and-shutdown pattern): pulled in by
/// multi-user.target, ordered after the appliance's readiness report,
/// powering the VM off when done, passed or not.
pub(super) struct CheckInside<'a> {
    after_update: Option<AfterUpdate<'a>>,
}

/// What vm-check.sh's part after the update checks against.
#[derive(Clone, Copy)]
pub(super) struct AfterUpdate<'a> {
    /// The first boot's room and message, to be read back.
    pub(super) room: &'a (String, String),
    /// sha256 of the IDENTITY command's output on the first boot.
    pub(super) identity_sha: &'a str,
    /// The updated image's max_upload_size.
    pub(super) upload_limit: &'a str,
    /// The version that must run, the OS image in the other root slot, and
    /// a version that must be marked bad ("" for none).
    pub(super) version: &'a str,
    pub(super) previous: &'a str,
    pub(super) failed: &'a str,
    /// The image the boot must have removed from /var ("": not checked).
    pub(super) stale_image: &'a str,
}

impl<'a> CheckInside<'a> {
    /// The system part only.
    pub(super) fn system() -> Self {
        Self { after_update: None }
    }

    /// The system part and the part after the update.
    pub(super) fn after_update(values: AfterUpdate<'a>) -> Self {
        Self {
            after_update: Some(values),
        }
    }

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

    /// vm-check.sh with the values it needs set above it.
    pub(super) fn script(&self) -> String {
        let check = include_str!("../vm-check.sh");
        let Some(after) = &self.after_update else {
            return format!("after_update=\n{check}");
        };
        let (room, text) = after.room;
        format!(
            "after_update=1\nmatrix_host='{MATRIX_HOST}'\nroom='{room}'\ntext='{text}'\n\
             identity_sha='{}'\nupload_limit='{}'\nstale_image='{}'\n\
             version='{}'\nprevious='{}'\nfailed='{}'\n\
             identity() {{ {IDENTITY}; }}\n{}\n{check}",
            after.identity_sha,
            after.upload_limit,
            after.stale_image,
            after.version,
            after.previous,
            after.failed,
            journal_script(),
        )
    }

    pub(super) fn credentials(&self) -> Vec<(String, String)> {
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

/// A port nothing in the appliance listens on or opens.
pub(super) const PROBE_PORT: u16 = 9999;

/// Whether the echo service behind the forwarded `port` answers. qemu's user
/// network accepts every forwarded connection on the host side; only the
/// echo says that the guest took it.
pub(super) fn echoes(port: u16) -> bool {
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

impl Vm {
    /// The update moved the databases to PostgreSQL 18 (the message read
    /// back proves the rows came along): 18 serves, the move's record counts
    /// its tables, and once the health gate passed 17's cluster is gone with
    /// a note in its place.
    pub(super) fn check_postgres_moved(&self) -> Result<()> {
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

    /// vm-check.sh ([`CheckInside`]) over SSH; its notes go to stderr.
    pub(super) fn check_over_ssh(&self, check: &CheckInside) -> Result<()> {
        let out = self.ssh_with_input("sh -s", &check.script())?;
        let text = String::from_utf8_lossy(&out.stdout);
        for note in text.lines().filter_map(|l| l.strip_prefix(CHECK_NOTE)) {
            eprintln!("vm-test: note: {note}");
        }
        ensure!(
            text.contains(&format!("{CHECK_MARKER}passed")),
            "the appliance's check: {}{}",
            text.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    }

    /// Waits for the inside check's verdict on the console (the boot that
    /// runs it may come after reboots), which must be "passed", and for the
    /// VM to power off.
    pub(super) fn expect_self_check(&self, qemu: &mut Qemu, what: &str) -> Result<()> {
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
    pub(super) fn expect_fallback(
        &self,
        firmware: Firmware,
        check: &CheckInside,
        tries: usize,
    ) -> Result<()> {
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
            "vm-test: {how}: the broken version failed its health gate {tries} times (its tries left), the kept one booted again ({:.0?})",
            started.elapsed()
        );
        Ok(())
    }

    /// How often `version` failed its health gate in this qemu run (the
    /// gate says so on the console).
    pub(super) fn gate_failures(&self, version: &str) -> Result<usize> {
        let text = fs::read(self.work.join("serial.log"))?;
        let line = format!("matrix-appliance: health gate: {version} FAILED");
        Ok(String::from_utf8_lossy(&text).matches(&line).count())
    }

    /// The machine's identity and secrets are what they were.
    pub(super) fn check_same_machine(&self, before: &str) -> Result<()> {
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
    pub(super) fn leave_older_synapse_copy(&self) -> Result<()> {
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

    /// The key passed as a systemd credential logs in, beside the image's.
    pub(super) fn check_platform_key(&self, key: &Path) -> Result<()> {
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

    /// Units, mounts, images and more as the issue asks: vm-check.sh's
    /// system part, over SSH.
    pub(super) fn check_system(&self) -> Result<()> {
        self.check_over_ssh(&CheckInside::system())
    }

    /// The firewall drops what comes in on a port the appliance does not
    /// open: an echo service on [`PROBE_PORT`] answers on loopback but not
    /// from outside, until a rule accepts the port (so the probe can tell).
    pub(super) fn check_firewall(&self) -> Result<()> {
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
    pub(super) fn identity(&self) -> Result<String> {
        self.ssh(IDENTITY).map(|s| s.replace('\n', " | "))
    }

    /// Matrix through the proxy over TLS, trusting only the appliance's CA.
    /// Without `room`: the admin creates a room and sends a message; with
    /// it: the message from the first boot is read back.
    pub(super) fn check_matrix(&self, room: Option<&(String, String)>) -> Result<(String, String)> {
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
                        room_path(&room_id)
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
                room_path(&room_id)
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
    pub(super) fn admin_login(&self) -> Result<String> {
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
    pub(super) fn check_telegram_bridge(&self) -> Result<()> {
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
        let room = room_path(
            created["room_id"]
                .as_str()
                .with_context(|| format!("createRoom: {created}"))?,
        );
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
    pub(super) fn request(
        &self,
        method: &str,
        host: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Result<Value> {
        let mut cmd = exec::command("curl");
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
}
