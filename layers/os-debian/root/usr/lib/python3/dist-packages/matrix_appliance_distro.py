"""cloud-init's Debian, for the appliance's read-only root (/etc/cloud/cloud.cfg names it).

- systemd-networkd configuration goes to /run/systemd/network (cloud-init 25.1 writes
  /etc/systemd/network and has no setting for it);
- the host name is applied to the kernel only: /etc/hostname is the build's, read-only.
"""

from cloudinit.distros import debian


class Distro(debian.Distro):
    renderer_configs = {
        **debian.Distro.renderer_configs,
        "networkd": {"network_conf_dir": "/run/systemd/network/"},
    }

    def _write_hostname(self, hostname, filename):
        # The root file system is read-only; set_hostname then applies the name with
        # `hostname`, for this boot (cloud-init sets it again at every boot).
        return
