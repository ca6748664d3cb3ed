//! The VM itself: its disk, qemu (UEFI or BIOS, KVM when it boots, else TCG), the
//! serial console, SSH into it, power off.

use super::*;

/// First boot under TCG loads ~250 MB of images and initialises everything.
pub(super) const BOOT_TIMEOUT: Duration = Duration::from_secs(40 * 60);

/// The VM's hardware, for the boots and the KVM probe alike.
pub(super) const MACHINE: &str = "-machine q35 -cpu max -m 4096 -smp 2";

pub(crate) struct Vm {
    pub(super) tools: PathBuf,
    pub(super) work: PathBuf,
    pub(super) key: PathBuf,
    pub(super) disk: Disk,
    pub(super) ssh_port: u16,
    pub(super) https_port: u16,
    /// Forwarded to [`PROBE_PORT`], which the firewall must drop.
    pub(super) probe_port: u16,
    /// The host port the guest's [`UPDATE_URL`] reaches (a loopback server).
    pub(crate) update_port: Option<u16>,
    /// The host port the guest's [`BACKUP_HOST`] reaches (a REST server).
    pub(crate) backup_port: Option<u16>,
    /// qemu's accelerator: "kvm" when a probe boots with it, else "tcg".
    pub(super) accel: &'static str,
    /// Whether the boots get the NoCloud seed disk ([`Vm::attach_seed`]);
    /// the forwarded ports then go to its static address.
    pub(super) seed: bool,
}

/// ssh as root into the VM (through the forwarded port) running `command`.
pub(super) fn ssh_command(key: &Path, port: u16, command: &str) -> Command {
    let mut cmd = exec::command("ssh");
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

/// `sh -c script` in the tools root, with the work directory at /work
/// (and as the working directory); it dies with the returned command.
pub(super) fn in_tools(tools: &Path, work: &Path, script: &str) -> Result<Command> {
    Sandbox::new(tools)
        .bind(work, "/work")
        .workdir("/work")
        .dies_with_parent()
        .command(&["sh", "-c", script])
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

/// The VM's disk in the work directory.
#[derive(Clone, Copy, PartialEq)]
pub(super) enum Disk {
    /// An overlay whose backing file is the built qcow2 ([`QCOW2_BASE`]).
    Qcow2,
    Raw,
}

/// The built qcow2 image under the overlay, in the work directory.
pub(super) const QCOW2_BASE: &str = "image.qcow2";

impl Disk {
    pub(super) fn file(self) -> &'static str {
        match self {
            Disk::Qcow2 => "disk.qcow2",
            Disk::Raw => "disk.raw",
        }
    }

    pub(super) fn format(self) -> &'static str {
        match self {
            Disk::Qcow2 => "qcow2",
            Disk::Raw => "raw",
        }
    }
}

pub(super) fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// /dev/kvm may exist and still not run guests: a KVM qemu that is still
/// running after a few seconds can (one that cannot exits at once).
pub(super) fn kvm_boots(tools: &Path) -> bool {
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
        "exec qemu-system-x86_64 {MACHINE} -accel kvm -nographic -display none -no-reboot \
         -drive if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd \
         -serial file:/tmp/vm-test-kvm-probe.log -monitor none"
    );
    let Ok(mut probe) = Sandbox::new(tools)
        .dies_with_parent()
        .command(&["sh", "-c", &script])
    else {
        return false;
    };
    let Ok(mut child) = probe
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
            seed: false,
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
        exec::status(
            exec::command("cp")
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
    pub(super) fn make_disk_raw(&mut self) -> Result<()> {
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
    pub(super) fn qemu_img(&self, args: &str) -> Result<()> {
        exec::run(
            &mut self.in_tools_root(&format!("exec qemu-img {args}"))?,
            &format!("qemu-img {args}"),
        )
    }

    /// `sh -c script` in the tools root, the work directory at /work.
    pub(super) fn in_tools_root(&self, script: &str) -> Result<Command> {
        in_tools(&self.tools, &self.work, script)
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
    pub(super) fn boot_rebooting(
        &self,
        firmware: Firmware,
        credentials: &[(String, String)],
    ) -> Result<Qemu> {
        self.launch(firmware, credentials, true)
    }

    pub(super) fn launch(
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
        // The metadata's static address, or the one qemu's DHCP gives.
        let (seed, guest) = if self.seed {
            (
                format!(" -drive if=virtio,file=/work/{SEED},format=raw,readonly=on"),
                STATIC_V4,
            )
        } else {
            (String::new(), "")
        };
        let qemu = format!(
            "exec qemu-system-x86_64 {MACHINE} -accel {accel} \
             -nographic {no_reboot} {firmware_args} \
             -drive if=virtio,file=/work/{disk},format={format}{seed} \
             -netdev 'user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{}-{guest}:22,hostfwd=tcp:127.0.0.1:{}-{guest}:443,hostfwd=tcp:127.0.0.1:{}-{guest}:{PROBE_PORT}{guestfwd}' \
             -device virtio-net-pci,netdev=n0,mac={MAC},romfile= \
             -serial file:/work/serial.log -monitor none -display none{smbios}",
            self.ssh_port, self.https_port, self.probe_port
        );
        let how = match firmware {
            Firmware::Uefi => "UEFI",
            Firmware::Bios => "BIOS",
        };
        eprintln!("vm: booting with {how} ({accel})");
        self.in_tools_root(&qemu)?
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

    /// The line of the serial console that holds `marker`, from it on.
    pub(crate) fn console_line(&self, marker: &str) -> Result<String> {
        let text = fs::read(self.work.join("serial.log"))?;
        String::from_utf8_lossy(&text)
            .lines()
            .find_map(|l| l.find(marker).map(|at| l[at..].trim_end().to_string()))
            .with_context(|| format!("no {marker:?} on the console"))
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
