//! Updates without a VM: the image version's errors (the build stops before
//! any work) and `matrixctl update`'s checks of a `--from` directory, run
//! from the rendered disk tree (the VM test applies real updates).

mod common;

use std::fs;

use common::{assert_exit, stderr, Project};

/// A refused build leaves no output directory.
fn assert_wrote_nothing(p: &Project) {
    assert!(
        !p.out().exists(),
        "a refused build wrote {:?}",
        p.out_files()
    );
}

#[test]
fn a_bad_image_version_is_a_usage_error_naming_where_it_came_from() {
    let p = Project::copy_of_repo();
    let o = p.builder(&["build", "--profile", "vps", "--version", "1_2"]);
    assert_exit(&o, 2);
    let err = stderr(&o);
    assert!(
        err.contains("--version \"1_2\" is not a valid image version"),
        "{err}"
    );
    assert_wrote_nothing(&p);

    let profile = p.root().join("profiles/vps.toml");
    let text = fs::read_to_string(&profile).unwrap();
    fs::write(&profile, format!("version = \"v2\"\n{text}")).unwrap();
    let o = p.builder(&["build", "--profile", "vps-offline", "--output", "bundle"]);
    assert_exit(&o, 2);
    assert!(
        stderr(&o).contains("the profile's `version` \"v2\""),
        "{}",
        stderr(&o)
    );
    // The command line wins over the profile.
    let o = p.builder(&[
        "build",
        "--profile",
        "vps",
        "--output",
        "bundle",
        "--version",
        "2.1",
    ]);
    assert_exit(&o, 0);
}

/// `--base-release` is read before any work: a directory that is no
/// earlier build's update/, a version not newer than the release's, or a
/// build without a disk image is a usage error that says so.
#[test]
fn a_base_release_that_cannot_be_built_on_is_a_usage_error() {
    let p = Project::copy_of_repo();
    let release = p.root().join("release");
    fs::create_dir_all(&release).unwrap();
    let base = release.to_str().unwrap();
    let build = |args: &[&str]| {
        let mut all = vec!["build", "--profile", "vps", "--base-release", base];
        all.extend_from_slice(args);
        if !args.contains(&"--output") {
            all.extend(["--output", "disk"]);
        }
        p.builder(&all)
    };
    let o = build(&["--version", "3"]);
    assert_exit(&o, 2);
    assert!(stderr(&o).contains("no SHA256SUMS there"), "{}", stderr(&o));

    fs::write(
        release.join("SHA256SUMS"),
        format!(
            "{0}  appliance_2.efi\n{0}  appliance_2.grub.cfg\n{0}  appliance_1.vmlinuz\n\
             {0}  appliance_1_4b3c.root.gz\n",
            "0".repeat(64)
        ),
    )
    .unwrap();
    for older in ["2", "1.9"] {
        let o = build(&["--version", older]);
        assert_exit(&o, 2);
        assert!(
            stderr(&o).contains(&format!(
                "--version {older} is not newer than 2, the version of --base-release"
            )),
            "{}",
            stderr(&o)
        );
    }
    let o = build(&["--version", "3", "--output", "bundle"]);
    assert_exit(&o, 2);
    assert!(
        stderr(&o).contains("--base-release is for the disk image's updates"),
        "{}",
        stderr(&o)
    );
    assert_wrote_nothing(&p);
}

#[test]
fn signing_keys_need_a_disk_image_and_a_readable_file() {
    let p = Project::copy_of_repo();
    let o = p.builder(&[
        "build",
        "--profile",
        "vps",
        "--output",
        "bundle",
        "--sign-key",
        "key.sec",
    ]);
    assert_exit(&o, 2);
    assert!(
        stderr(&o).contains("--sign-key and --trust-key are for the disk image's updates"),
        "{}",
        stderr(&o)
    );
    let o = p.builder(&[
        "build",
        "--profile",
        "minimal",
        "--trust-key",
        "missing.pub",
    ]);
    assert_exit(&o, 2);
    // A disk build checks the key file before any work (and before root is
    // needed, so this holds for any user).
    let o = p.builder(&[
        "build",
        "--profile",
        "vps",
        "--output",
        "disk",
        "--sign-key",
        "/nonexistent/key.sec",
    ]);
    assert_exit(&o, 1);
    assert!(
        stderr(&o).contains("cannot read the key file /nonexistent/key.sec"),
        "{}",
        stderr(&o)
    );
    // The site value's keys are the disk image's too, checked the same way.
    let o = p.builder(&[
        "build",
        "--profile",
        "vps",
        "--output",
        "disk",
        "--set",
        "update_trust_keys=/nonexistent/site.pub",
    ]);
    assert_exit(&o, 1);
    assert!(
        stderr(&o).contains("cannot read the key file /nonexistent/site.pub"),
        "{}",
        stderr(&o)
    );
    assert_wrote_nothing(&p);
}

/// `appliance-update` as the disk image has it, rendered, and the shell
/// library it sources: bound as `/updater` and `/usr/lib/matrix-appliance`
/// into the tools root.
struct Updater {
    script: std::path::PathBuf,
    lib: std::path::PathBuf,
}

impl Updater {
    fn binds<'a>(
        &'a self,
        more: &[(&'a std::path::Path, &'a str)],
    ) -> Vec<(&'a std::path::Path, &'a str)> {
        let mut binds = vec![
            (self.script.as_path(), "/updater"),
            (self.lib.as_path(), "/usr/lib/matrix-appliance"),
        ];
        binds.extend_from_slice(more);
        binds
    }

    /// The tools root with the updater and [`Updater::binds`] `more`.
    fn sandbox(
        &self,
        tools: &common::tools::ToolsRoot,
        more: &[(&std::path::Path, &str)],
    ) -> exec::Sandbox {
        let mut sandbox = tools.sandbox(Vec::new());
        for (host, inside) in self.binds(more) {
            sandbox = sandbox.bind(host, inside);
        }
        sandbox
    }
}

fn updater(p: &Project) -> Updater {
    let o = p.builder(&["render", "--profile", "vps", "--out", "tree"]);
    assert_exit(&o, 0);
    let tree = p.root().join("tree");
    Updater {
        script: tree.join("usr/libexec/matrix-appliance/appliance-update"),
        lib: tree.join("usr/lib/matrix-appliance"),
    }
}

#[test]
fn a_damaged_or_incomplete_from_directory_is_refused_before_anything_runs() {
    let tools = common::tools::ToolsRoot::get();
    let p = Project::copy_of_repo();
    let updater = updater(&p);
    let dir = p.root().join("from");
    fs::create_dir_all(&dir).unwrap();
    // An image built without keys trusts none (the builder removes Debian's
    // keyring, which the tools root has): SHA256SUMS alone is checked.
    let no_keys = p.root().join("no-keys");
    fs::write(&no_keys, "").unwrap();
    let binds = updater.binds(&[
        (&dir, "/from"),
        (&no_keys, "/usr/lib/systemd/import-pubring.gpg"),
    ]);
    let run = |args: &[&str]| {
        let mut all = vec!["/updater"];
        all.extend_from_slice(args);
        tools.command(&binds, "sh", &all).output().unwrap()
    };

    let o = run(&["check", "--from", "/nonexistent-update-dir"]);
    assert_exit(&o, 1);
    assert!(stderr(&o).contains("no such directory"), "{}", stderr(&o));

    fs::write(dir.join("appliance_2.vmlinuz"), "kernel").unwrap();
    let o = run(&["check", "--from", "/from"]);
    assert_exit(&o, 1);
    assert!(stderr(&o).contains("no SHA256SUMS there"), "{}", stderr(&o));

    // A file that does not match its sum.
    fs::write(
        dir.join("SHA256SUMS"),
        format!("{}  appliance_2.vmlinuz\n", "0".repeat(64)),
    )
    .unwrap();
    let o = run(&["apply", "--from", "/from", "--no-reboot"]);
    assert_exit(&o, 1);
    assert!(
        stderr(&o)
            .contains("do not match SHA256SUMS (damaged or tampered with); nothing was changed"),
        "{}",
        stderr(&o)
    );

    // A file SHA256SUMS does not list (it would be installed unchecked).
    let sum = |bytes: &[u8]| {
        use sha2::Digest as _;
        hex::encode(sha2::Sha256::digest(bytes))
    };
    fs::write(
        dir.join("SHA256SUMS"),
        format!("{}  appliance_2.vmlinuz\n", sum(b"kernel")),
    )
    .unwrap();
    fs::write(dir.join("appliance_2.initrd"), "initrd").unwrap();
    let o = run(&["check", "--from", "/from"]);
    assert_exit(&o, 1);
    assert!(
        stderr(&o).contains("appliance_2.initrd is not listed in SHA256SUMS"),
        "{}",
        stderr(&o)
    );

    for (args, why) in [
        (&["frobnicate"][..], "unknown subcommand 'frobnicate'"),
        (&["apply", "--from"][..], "--from needs a directory"),
        (&["status", "extra"][..], "status takes no arguments"),
    ] {
        let o = run(args);
        assert_exit(&o, 2);
        assert!(stderr(&o).contains(why), "{args:?}: {}", stderr(&o));
    }
}

/// The transfer definitions `matrixctl update` writes, run by the real
/// systemd-sysupdate (Debian trixie's, from the tools root) against an ESP in
/// a scratch root. Running version 1 over OS image 1: version 3, built over
/// OS image 1 (`--base-release`), brings only its entry (the UKI on trial,
/// `+3-0`, and GRUB's entry) and its appliance extension, and the OS set
/// finds nothing new; version 4 brings OS image 4 too (its kernel and
/// initramfs beside OS image 1's) and takes version 3's place. The root file
/// system's partition transfer needs a disk whose partitions the kernel
/// shows, which this machine's kernel does not do for a file; the VM test
/// runs it.
#[test]
fn systemd_sysupdate_installs_a_version_over_the_running_os_image_or_with_its_own() {
    let tools = common::tools::ToolsRoot::get();
    let p = Project::copy_of_repo();
    let updater = updater(&p);
    let from3 = p.root().join("from3");
    let from4 = p.root().join("from4");
    for (dir, os, version) in [(&from3, "1", "3"), (&from4, "4", "4")] {
        fs::create_dir_all(dir).unwrap();
        for ext in ["vmlinuz", "initrd"] {
            let name = format!("appliance_{os}.{ext}");
            fs::write(dir.join(name), format!("os {os} {ext}\n")).unwrap();
        }
        for ext in ["efi", "grub.cfg", "sysext.raw"] {
            let name = format!("appliance_{version}.{ext}");
            fs::write(dir.join(name), format!("version {version} {ext}\n")).unwrap();
        }
    }
    const SCRIPT: &str = r#"set -eu
mkdir -p /r/usr/lib /r/etc /r/efi/EFI/Linux /r/efi/appliance /r/var/lib/appliance/extensions
printf 'ID=debian\nIMAGE_ID=matrix-appliance\nIMAGE_VERSION=1\n' >/r/usr/lib/os-release
for x in vmlinuz initrd; do echo "os 1 $x" >/r/efi/appliance/appliance_1.$x; done
echo "version 1 grub.cfg" >/r/efi/appliance/appliance_1.grub.cfg
echo "version 1 efi" >/r/efi/EFI/Linux/appliance_1.efi
echo "version 1 sysext.raw" >/r/var/lib/appliance/extensions/matrix-appliance_1.raw
d=$(MATRIX_IMAGE_VERSION=1 sh /updater definitions --from /from3)
(cd "$d" && ls os version)
rm "$d/os/20-root.transfer"
# With --root, systemd-sysupdate reads --definitions inside that root.
mkdir -p "/r$d" && cp -r "$d/os" "$d/version" "/r$d/"
export SYSTEMD_RELAX_ESP_CHECKS=1 SYSTEMD_LOG_LEVEL=notice
sysupdate() {
	from=$1 set_name=$2
	shift 2
	/usr/lib/systemd/systemd-sysupdate --root=/r --definitions="$d/$set_name" \
		--transfer-source="$from" --no-pager "$@"
}
show() {
	(cd /r/efi && for f in EFI/Linux/* appliance/*; do echo "$1 $f: $(cat "$f")"; done)
	(cd /r/var/lib/appliance && for f in extensions/*; do echo "$1 $f: $(cat "$f")"; done)
}
echo "3: os check-new: $(sysupdate /from3 os check-new || true)."
echo "3: version check-new: $(sysupdate /from3 version check-new)."
sysupdate /from3 version update
show 3
echo "4: os check-new: $(sysupdate /from4 os check-new)."
sysupdate /from4 os update
sysupdate /from4 version update
show 4
"#;
    // The ESP a file system of its own, as on the machine.
    let o = updater
        .sandbox(&tools, &[(&from3, "/from3"), (&from4, "/from4")])
        .tmpfs("/r/efi")
        .command(&["sh", "-c", SCRIPT])
        .unwrap()
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // Both sets were written; sysupdate read all but the root's.
    for name in [
        "10-vmlinuz",
        "11-initrd",
        "20-root",
        "12-grub",
        "13-extension",
        "30-uki",
    ] {
        assert!(out.contains(&format!("{name}.transfer")), "{out}");
    }
    for line in [
        "3: os check-new: .",
        "3: version check-new: 3.",
        "3 EFI/Linux/appliance_1.efi: version 1 efi",
        "3 EFI/Linux/appliance_3+3-0.efi: version 3 efi",
        "3 appliance/appliance_1.vmlinuz: os 1 vmlinuz",
        "3 appliance/appliance_1.initrd: os 1 initrd",
        "3 appliance/appliance_3.grub.cfg: version 3 grub.cfg",
        "3 extensions/matrix-appliance_1.raw: version 1 sysext.raw",
        "3 extensions/matrix-appliance_3.raw: version 3 sysext.raw",
        "4: os check-new: 4.",
        "4 EFI/Linux/appliance_1.efi: version 1 efi",
        "4 EFI/Linux/appliance_4+3-0.efi: version 4 efi",
        "4 appliance/appliance_1.vmlinuz: os 1 vmlinuz",
        "4 appliance/appliance_4.vmlinuz: os 4 vmlinuz",
        "4 appliance/appliance_4.initrd: os 4 initrd",
        "4 appliance/appliance_1.grub.cfg: version 1 grub.cfg",
        "4 appliance/appliance_4.grub.cfg: version 4 grub.cfg",
        "4 extensions/matrix-appliance_4.raw: version 4 sysext.raw",
    ] {
        assert!(out.contains(line), "missing {line:?} in:\n{out}");
    }
    // Version 3 made room for 4; OS image 1 (the running one's) stays.
    assert!(!out.contains("3 appliance/appliance_3.vmlinuz"), "{out}");
    assert!(!out.contains("4 EFI/Linux/appliance_3"), "{out}");
    assert!(!out.contains("4 extensions/matrix-appliance_3"), "{out}");
}

/// `matrixctl update rollback`: the other installed version boots from now
/// on for both boot loaders and the running one is marked bad; also when the
/// other one had used up its tries (sent back in by the admin, e.g. after a
/// fresh database dump). Run against a scratch ESP with the rendered script.
#[test]
fn rollback_boots_the_other_version_for_both_boot_loaders() {
    let tools = common::tools::ToolsRoot::get();
    let p = Project::copy_of_repo();
    let updater = updater(&p);
    const SCRIPT: &str = r#"set -eu
mkdir -p /efi/EFI/Linux /efi/appliance /efi/grub
for v in 1 2; do for x in vmlinuz initrd grub.cfg; do echo "$v" >/efi/appliance/appliance_$v.$x; done; done
# GRUB's 1024-byte environment block, as the image has it.
env_block() {
	b=$(printf '# GRUB Environment Block\nappliance_good=%s\nappliance_try=%s\nappliance_tries=%s\nappliance_bad=%s\n' "$@")
	{ printf '%s\n' "$b"; head -c $((1024 - ${#b} - 1)) /dev/zero | tr '\0' '#'; } >/efi/grub/grubenv
}
show() { echo "$1: $(ls /efi/EFI/Linux | tr '\n' ' ')| $(grep '^appliance_' /efi/grub/grubenv | tr '\n' ' ')| $(wc -c </efi/grub/grubenv)"; }

# Running 2 (kept); rolling back to 1.
echo 1 >/efi/EFI/Linux/appliance_1.efi
echo 2 >/efi/EFI/Linux/appliance_2.efi
env_block 2 '' '' ''
MATRIX_IMAGE_VERSION=2 sh /updater rollback --no-reboot >/dev/null
show back

# Running 1 again; 2 had failed its tries: sent back in.
rm /efi/EFI/Linux/*
echo 1 >/efi/EFI/Linux/appliance_1.efi
echo 2 >/efi/EFI/Linux/appliance_2+0-3.efi
env_block 1 '' '' 2
MATRIX_IMAGE_VERSION=1 sh /updater rollback --no-reboot >/dev/null
show forward

# Nothing else installed: refused.
rm /efi/appliance/appliance_2.*
MATRIX_IMAGE_VERSION=1 sh /updater rollback --no-reboot 2>&1 || echo "exit=$?"
"#;
    let o = updater
        .sandbox(&tools, &[])
        .tmpfs("/efi")
        .command(&["sh", "-c", SCRIPT])
        .unwrap()
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    for line in [
        "back: appliance_1.efi appliance_2+0-3.efi | appliance_good=1 appliance_try= appliance_tries= appliance_bad=2 | 1024",
        "forward: appliance_1+0-3.efi appliance_2.efi | appliance_good=2 appliance_try= appliance_tries= appliance_bad=1 | 1024",
        "no other version is installed: nothing to roll back to",
        "exit=1",
    ] {
        assert!(out.contains(line), "missing {line:?} in:\n{out}");
    }
}
