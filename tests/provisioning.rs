//! Provisioning from the platform's metadata (cloud-init 25.1, Debian
//! trixie's, in the tools root) with the disk image's own configuration, on
//! its read-only root: a NoCloud seed with an SSH key, a host name and a
//! static IPv4 + IPv6 network becomes a systemd-networkd file under /run, a
//! key file under /run that sshd reads beside the built-in keys, and the
//! kernel's host name; /etc, /usr and /root stay read-only throughout. The
//! boot itself (ds-identify finding the seed disk, networkd using the file,
//! SSH with the key) is the VM test's.

mod common;

use std::fs;

use common::tools::ToolsRoot;
use common::*;

const MAC: &str = "52:54:00:12:34:56";

/// cloud-init's two stages as the single process runs them at boot (with
/// a host name, a /sys and links of the sandbox's own; the image's /etc,
/// /usr and /root read-only); then what they left.
const SCRIPT: &str = r#"set -eu
# The link the metadata names by its MAC address, under another name.
ip link add eth9 type veth peer name eth9peer
ip link set eth9 address "$1"
hostname build-time-name
cloud-init init --local >/tmp/local.log 2>&1 || { cat /tmp/local.log /var/log/cloud-init.log; exit 1; }
cloud-init init >/tmp/network.log 2>&1 || { cat /tmp/network.log /var/log/cloud-init.log; exit 1; }
echo "hostname: $(hostname)"
for f in /run/systemd/network/*.network; do echo "file: $f"; cat "$f"; done
echo "keys:"; cat /run/matrix-appliance/ssh/cloud-init.root
echo "links:"; ip -o link show
echo "problems:"; grep -E "WARNING|ERROR|Traceback" /var/log/cloud-init.log || true
echo "report:"; /usr/libexec/matrix-appliance/provision-report 2>&1
"#;

#[test]
fn a_nocloud_seed_gives_keys_host_name_and_a_static_network_in_run() {
    let p = Project::copy_of_repo();
    let built_in =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMq4JmF3bYgT0oQbq2l0x7V5p1kq8s4m8J3k2v9C7d1a admin";
    let o = p.builder(&[
        "render",
        "--profile",
        "vps",
        "--out",
        "tree",
        "--set",
        &format!("ssh_authorized_keys={built_in}"),
    ]);
    assert_exit(&o, 0);
    let seed = p.dir.path().join("seed");
    fs::create_dir_all(&seed).unwrap();
    let key =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEZ8OIts85ACozHbpRTvbfZF5GuoHUoXs8iMCSVj5Osg metadata";
    fs::write(
        seed.join("meta-data"),
        "instance-id: iid-test-1\nlocal-hostname: hs-from-metadata\n",
    )
    .unwrap();
    fs::write(
        seed.join("user-data"),
        format!("#cloud-config\nssh_authorized_keys:\n  - {key}\n"),
    )
    .unwrap();
    fs::write(
        seed.join("network-config"),
        format!(
            "version: 2\nethernets:\n  lan0:\n    match:\n      macaddress: \"{MAC}\"\n    \
             set-name: lan0\n    dhcp4: false\n    dhcp6: false\n    \
             addresses: [192.0.2.10/24, \"2001:db8:1::10/64\"]\n    routes:\n      \
             - to: 0.0.0.0/0\n        via: 192.0.2.1\n      - to: \"::/0\"\n        \
             via: \"2001:db8:1::1\"\n    nameservers:\n      addresses: [192.0.2.53]\n"
        ),
    )
    .unwrap();
    let o = ToolsRoot::get()
        .sandbox(vec![p.root().join("tree")])
        .bind(seed, "/run/matrix-appliance/cloud-init/seed/nocloud")
        .loopback_only()
        .uts_namespace()
        // This network namespace's links, as cloud-init looks them up.
        .sys()
        .read_only_path("/etc")
        .read_only_path("/usr")
        .read_only_path("/root")
        .command(&["sh", "-c", SCRIPT, "sh", MAC])
        .unwrap()
        .output()
        .unwrap();
    let out = stdout(&o);
    assert!(o.status.success(), "{out}\n{}", stderr(&o));
    assert!(out.contains("hostname: hs-from-metadata\n"), "{out}");
    let file = out
        .split("file: ")
        .find(|f| f.starts_with("/run/systemd/network/10-cloud-init-lan0.network"))
        .unwrap_or_else(|| panic!("no network file for lan0 in /run:\n{out}"));
    for line in [
        &format!("MACAddress={MAC}"),
        "Address=192.0.2.10/24",
        "Address=2001:db8:1::10/64",
        "Gateway=192.0.2.1",
        "Gateway=2001:db8:1::1",
        "DNS=192.0.2.53",
    ] {
        assert!(file.lines().any(|l| l == line), "{line} not in:\n{file}");
    }
    assert!(out.contains(&format!("keys:\n{key}")), "{out}");
    // The link was renamed as the metadata asked (a veth: `lan0@peer`).
    assert!(out.contains(": lan0@"), "{out}");
    let (problems, report) = out
        .split("problems:")
        .nth(1)
        .unwrap()
        .split_once("report:")
        .unwrap();
    assert!(problems.trim().is_empty(), "cloud-init's log:\n{problems}");
    eprintln!("{report}");
    // The journal's account of where each thing came from (the unit's script).
    for line in [
        "provisioning: cloud metadata: DataSourceNoCloud [seed=/run/matrix-appliance/cloud-init/seed/nocloud]",
        "provisioning: host name: hs-from-metadata (from the metadata; the image's is ",
        "provisioning: SSH keys for root: 1 built in (ssh_authorized_keys), 1 from the metadata, 0 from the credential",
        "provisioning: network: 10-cloud-init-lan0.network (from the metadata): ",
    ] {
        assert!(report.contains(line), "{line:?} not in the report:\n{report}");
    }
    assert!(report.contains("Address=2001:db8:1::10/64"), "{report}");
    assert!(
        !report.contains(key.split(' ').nth(1).unwrap()),
        "a key in the report:\n{report}"
    );
}
