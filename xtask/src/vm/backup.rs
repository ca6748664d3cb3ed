//! The VM test's backup leg: the appliance backs up to a restic REST server
//! on the host's loopback (the guest reaches it at [`BACKUP_HOST`] through
//! qemu's guestfwd), and a fresh machine from the same image restores it.

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use super::{free_port, in_tools, Disk, Firmware, Vm, BACKUP_HOST};

/// `restic-rest-server` from the tools root on 127.0.0.1, its repositories
/// in `work/backup-rest`; stopped when dropped.
pub(crate) struct RestServer {
    child: Child,
    pub(crate) port: u16,
}

impl RestServer {
    pub(crate) fn start(tools: &Path, work: &Path) -> Result<RestServer> {
        std::fs::create_dir_all(work.join("backup-rest"))?;
        let port = free_port()?;
        let command = format!(
            "exec restic-rest-server --path /work/backup-rest --listen 127.0.0.1:{port} --no-auth"
        );
        let child = in_tools(tools, work, &command)?
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(work.join("rest-server.log"))?)
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting restic-rest-server")?;
        Ok(RestServer { child, port })
    }
}

impl Drop for RestServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the owner keeps off the machine: the backup key; and the admin's
/// password, to log in with after the restore.
pub(crate) struct Kept {
    key: String,
    admin_password: String,
}

impl Vm {
    /// `matrixctl backup configure` with the REST server, `backup now` (to
    /// the local and the remote repository), and the key the owner keeps.
    pub(crate) fn back_up(&self) -> Result<Kept> {
        let out = self.ssh(&format!(
            "matrixctl backup configure rest:http://{BACKUP_HOST}/ 2>&1 && matrixctl backup now 2>&1"
        ))?;
        ensure!(
            out.contains("a new repository") && out.contains(", remote "),
            "the backup to the host's REST server was not made:\n{out}"
        );
        let shown = self.ssh("matrixctl backup key")?;
        let key = shown
            .lines()
            .find_map(|l| l.strip_prefix("local repository (/var/lib/matrix-backup/repo): "))
            .context("`matrixctl backup key` printed no key for the local repository")?
            .to_string();
        let admin_password = self
            .ssh("cat /var/lib/matrix/secrets/admin-password")?
            .trim()
            .to_string();
        eprintln!("vm-test: backed up to the local repository and the host's REST server");
        Ok(Kept {
            key,
            admin_password,
        })
    }

    /// A new machine (fresh disk from `image`, fresh UEFI variables) for
    /// the same server name: first boot makes its own secrets; the kept key
    /// opens the remote repository, the restore brings back the admin's old
    /// password and the message in `room`, served over TLS again.
    pub(crate) fn restore_on_fresh_machine(
        &mut self,
        image: &Path,
        kept: &Kept,
        room: &(String, String),
    ) -> Result<()> {
        // A new machine: another disk (the old one's space freed first) and
        // new UEFI variables.
        let _ = std::fs::remove_file(self.work.join(Disk::Raw.file()));
        let _ = std::fs::remove_file(self.work.join("efivars.fd"));
        self.create_disk(image)?;
        let mut qemu = self.boot(Firmware::Uefi)?;
        let ready = self.wait_ready(&mut qemu)?;
        eprintln!("vm-test: a new machine from the same image ready in {ready:.0?}");
        self.check_no_metadata()?;
        let fresh = self.ssh("cat /var/lib/matrix/secrets/admin-password")?;
        ensure!(
            fresh.trim() != kept.admin_password,
            "the new machine's admin password is the old one before any restore"
        );
        // The key goes over standard input, never on a command line.
        let command = "umask 077 && cat > /run/kept-key";
        let out = self.ssh_with_input(command, &kept.key)?;
        ensure!(
            out.status.success(),
            "ssh {command:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        let out = self.ssh(&format!(
            "matrixctl backup configure rest:http://{BACKUP_HOST}/ --key /run/kept-key 2>&1 && rm /run/kept-key && \
             matrixctl backup restore 2>&1; echo \"exit=$?\""
        ))?;
        ensure!(
            out.contains("an existing repository")
                && out.contains("restored snapshot latest")
                && out.trim_end().ends_with("exit=0"),
            "the restore from the host's REST server failed:\n{out}"
        );
        let started = Instant::now();
        while self.ssh("matrixctl status >/dev/null 2>&1 && echo up || echo down")? != "up\n" {
            if started.elapsed() > Duration::from_secs(15 * 60) {
                bail!(
                    "the stack did not come back after the restore:\n{}",
                    self.ssh("matrixctl status 2>&1 || true")?
                );
            }
            std::thread::sleep(Duration::from_secs(10));
        }
        let restored = self.ssh("cat /var/lib/matrix/secrets/admin-password")?;
        ensure!(
            restored.trim() == kept.admin_password,
            "the restore did not bring back the admin's password"
        );
        // The admin logs in with it and reads the message from the first boot.
        self.check_matrix(Some(room))?;
        self.check_journal()?;
        eprintln!(
            "vm-test: the new machine restored the backup: the admin's old password logs in, the message is there ({:.0?})",
            started.elapsed()
        );
        self.shutdown(qemu)
    }
}
