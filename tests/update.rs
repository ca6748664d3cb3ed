//! Updates without a VM: the image version's errors (the build stops before
//! any work) and `matrixctl update`'s checks of a `--from` directory, run
//! from the rendered disk tree (the VM test applies real updates).

mod common;

use std::fs;
use std::process::Command;

use common::{assert_exit, stderr, Project};

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
    assert!(
        !p.out().exists(),
        "a refused build wrote {:?}",
        p.out_files()
    );

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
    assert!(
        !p.out().exists(),
        "a refused build wrote {:?}",
        p.out_files()
    );
}

/// `appliance-update` as the disk image has it, rendered.
fn updater(p: &Project) -> std::path::PathBuf {
    let o = p.builder(&["render", "--profile", "vps", "--out", "tree"]);
    assert_exit(&o, 0);
    p.root()
        .join("tree/usr/libexec/matrix-appliance/appliance-update")
}

#[test]
fn a_damaged_or_incomplete_from_directory_is_refused_before_anything_runs() {
    let p = Project::copy_of_repo();
    let script = updater(&p);
    let run = |args: &[&str]| Command::new("sh").arg(&script).args(args).output().unwrap();
    let dir = p.root().join("from");
    fs::create_dir_all(&dir).unwrap();

    let o = run(&["check", "--from", "/nonexistent-update-dir"]);
    assert_exit(&o, 1);
    assert!(stderr(&o).contains("no such directory"), "{}", stderr(&o));

    fs::write(dir.join("appliance_2.vmlinuz"), "kernel").unwrap();
    let o = run(&["check", "--from", dir.to_str().unwrap()]);
    assert_exit(&o, 1);
    assert!(stderr(&o).contains("no SHA256SUMS there"), "{}", stderr(&o));

    // A file that does not match its sum.
    fs::write(
        dir.join("SHA256SUMS"),
        format!("{}  appliance_2.vmlinuz\n", "0".repeat(64)),
    )
    .unwrap();
    let o = run(&["apply", "--from", dir.to_str().unwrap(), "--no-reboot"]);
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
    let o = run(&["check", "--from", dir.to_str().unwrap()]);
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
