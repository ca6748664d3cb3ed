//! The platform's metadata, as a VPS provider hands it to a new machine: a
//! NoCloud seed disk (a FAT file system labelled CIDATA) with an SSH key, a
//! host name and a static IPv4 + IPv6 network, attached on the first boot;
//! and the boot with no metadata at all (the new machine), which comes up on
//! DHCP.

use super::*;

/// The host name the metadata gives.
pub(super) const METADATA_HOSTNAME: &str = "hs-from-metadata";
/// The guest's static IPv4 address: a /28 in qemu's 10.0.2.0/24, so the
/// update server ([`UPDATE_HOST`]) is not on the link and the first boot's
/// update is fetched through the metadata's default route.
pub(super) const STATIC_V4: &str = "10.0.2.9";
const STATIC_V4_PREFIX: &str = "28";
const GATEWAY_V4: &str = "10.0.2.2";
/// In qemu's IPv6 network (fec0::/64, router fec0::2).
const STATIC_V6: &str = "fec0::9";
const GATEWAY_V6: &str = "fec0::2";
/// The VM's network card, matched by the metadata's network configuration.
pub(super) const MAC: &str = "52:54:00:12:34:56";
/// The seed disk in the work directory.
pub(super) const SEED: &str = "seed.img";

impl Vm {
    /// Writes the NoCloud seed disk [`SEED`] giving `pubkey`, the host name
    /// and the static network; attached to the boots from now on until
    /// `self.seed` is cleared.
    pub(super) fn attach_seed(&mut self, pubkey: &str) -> Result<()> {
        let dir = self.work.join("seed");
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        fs::write(
            dir.join("meta-data"),
            format!("instance-id: iid-vm-test\nlocal-hostname: {METADATA_HOSTNAME}\n"),
        )?;
        fs::write(
            dir.join("user-data"),
            format!(
                "#cloud-config\nssh_authorized_keys:\n  - {}\n",
                pubkey.trim()
            ),
        )?;
        // cloud-init 25.1 needs `set-name` for a MAC match to render, and
        // the default routes spelled as prefixes (`to: default` fails).
        fs::write(
            dir.join("network-config"),
            format!(
                "version: 2\n\
                 ethernets:\n  lan0:\n    match:\n      macaddress: \"{MAC}\"\n    \
                 set-name: lan0\n    dhcp4: false\n    dhcp6: false\n    \
                 addresses: [{STATIC_V4}/{STATIC_V4_PREFIX}, \"{STATIC_V6}/64\"]\n    \
                 routes:\n      - to: 0.0.0.0/0\n        via: {GATEWAY_V4}\n      \
                 - to: \"::/0\"\n        via: \"{GATEWAY_V6}\"\n    \
                 nameservers:\n      addresses: [10.0.2.3]\n"
            ),
        )?;
        let _ = fs::remove_file(self.work.join(SEED));
        let script = format!(
            "mkfs.vfat -n CIDATA -C /work/{SEED} 1024 >/dev/null && \
             mcopy -i /work/{SEED} /work/seed/meta-data /work/seed/user-data \
             /work/seed/network-config ::/"
        );
        exec::run(
            &mut self.in_tools_root(&script)?,
            "making the NoCloud seed disk",
        )?;
        self.seed = true;
        Ok(())
    }

    /// The first boot took the seed's key, host name and network: SSH with
    /// the metadata's key; the static addresses on the renamed link, from
    /// the file cloud-init wrote in /run, with no DHCP lease; the default
    /// routes through the metadata's gateways; and the journal says what
    /// came from where.
    pub(super) fn check_metadata(&self, key: &Path) -> Result<()> {
        let out = ssh_command(
            key,
            self.ssh_port,
            "cat /run/matrix-appliance/ssh/cloud-init.root",
        )
        .output()
        .context("running ssh")?;
        ensure!(
            out.status.success()
                && String::from_utf8_lossy(&out.stdout).contains("vm-test-metadata"),
            "the key from the metadata does not log in: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        let name = self.ssh("uname -n")?;
        ensure!(
            name.trim() == METADATA_HOSTNAME,
            "the host name is {name:?}, not the metadata's {METADATA_HOSTNAME}"
        );
        let link =
            self.ssh("networkctl status lan0 --no-pager 2>&1; ip -o address show dev lan0")?;
        ensure!(
            link.contains("Network File: /run/systemd/network/10-cloud-init-lan0.network"),
            "lan0 is not configured by the metadata's network file in /run:\n{link}"
        );
        let v4 = link
            .lines()
            .find(|l| l.contains(" inet "))
            .with_context(|| format!("no IPv4 address on lan0:\n{link}"))?;
        ensure!(
            v4.contains(&format!(" inet {STATIC_V4}/{STATIC_V4_PREFIX} "))
                && !v4.contains("dynamic")
                && link.lines().filter(|l| l.contains(" inet ")).count() == 1,
            "lan0's IPv4 address is not the metadata's static one alone (a DHCP lease?):\n{link}"
        );
        ensure!(
            link.contains(&format!(" inet6 {STATIC_V6}/64 ")),
            "lan0 lacks the metadata's IPv6 address:\n{link}"
        );
        let routes = self.ssh(&format!(
            "ip route show default; ip -6 route show default; ip route get {UPDATE_HOST}"
        ))?;
        for want in [
            format!("default via {GATEWAY_V4} dev lan0"),
            format!("default via {GATEWAY_V6} dev lan0"),
            format!("{UPDATE_HOST} via {GATEWAY_V4} dev lan0"),
        ] {
            ensure!(routes.contains(&want), "no route {want:?}:\n{routes}");
        }
        let report = self.provisioning_report()?;
        for want in [
            "provisioning: cloud metadata: DataSourceNoCloud".to_string(),
            format!("provisioning: host name: {METADATA_HOSTNAME} (from the metadata"),
            "provisioning: SSH keys for root: 1 built in (ssh_authorized_keys), 1 from the metadata, 1 from the credential ssh.authorized_keys.root".to_string(),
            format!("provisioning: network: 10-cloud-init-lan0.network (from the metadata): Address={STATIC_V4}/{STATIC_V4_PREFIX}"),
        ] {
            ensure!(report.contains(&want), "the journal lacks {want:?}:\n{report}");
        }
        eprintln!(
            "vm-test: the metadata's key logs in; host name, static {STATIC_V4}/{STATIC_V4_PREFIX} and {STATIC_V6}/64 with their routes from the seed disk; the journal says so"
        );
        Ok(())
    }

    /// A boot with no metadata: cloud-init did not run, the link has a DHCP
    /// lease from the image's own network file, the image's host name.
    pub(super) fn check_no_metadata(&self) -> Result<()> {
        let out = self.ssh(
            "uname -n; cat /etc/hostname; test -e /run/cloud-init/disabled && echo cloud-init-disabled; \
             networkctl status --all --no-pager 2>&1; ip -o -4 address show scope global",
        )?;
        let mut lines = out.lines();
        let (name, built) = (lines.next(), lines.next());
        ensure!(
            name.is_some() && name == built,
            "the host name is not the image's with no metadata:\n{out}"
        );
        ensure!(
            out.contains("cloud-init-disabled\n"),
            "cloud-init did not disable itself with no metadata:\n{out}"
        );
        ensure!(
            out.contains("Network File: /usr/lib/systemd/network/80-ethernet.network")
                && out.contains(" inet 10.0.2.15/24 ")
                && out.contains("dynamic"),
            "no DHCP lease from the image's network file:\n{out}"
        );
        let report = self.provisioning_report()?;
        for want in [
            "provisioning: cloud metadata: none",
            "provisioning: network: DHCP on every Ethernet link",
        ] {
            ensure!(
                report.contains(want),
                "the journal lacks {want:?}:\n{report}"
            );
        }
        eprintln!("vm-test: with no metadata, cloud-init stays off and the machine is on DHCP");
        Ok(())
    }

    /// What the journal says this boot took from the platform.
    fn provisioning_report(&self) -> Result<String> {
        self.ssh("journalctl -b -u appliance-provision-report.service --output=cat --no-pager")
    }
}
