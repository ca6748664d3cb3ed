//! The sandbox on a small root made of the host's /usr (merged-/usr
//! hosts): what a program sees and what it cannot touch. Needs root.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;

use exec::{stdout, Enter, Sandbox};

/// A root of the host's /usr, read-only, with the usual links.
fn small_root(dir: &Path) -> Sandbox {
    assert!(
        rustix_is_root(),
        "the sandbox tests need root (mount namespaces, chroot)"
    );
    for d in ["proc", "dev", "tmp", "mnt", "etc"] {
        fs::create_dir_all(dir.join(d)).unwrap();
    }
    for (link, to) in [
        ("bin", "usr/bin"),
        ("sbin", "usr/sbin"),
        ("lib", "usr/lib"),
        ("lib64", "usr/lib64"),
    ] {
        if dir.join(link).symlink_metadata().is_err() {
            symlink(to, dir.join(link)).unwrap();
        }
    }
    Sandbox::new(dir).bind_ro("/usr", "/usr")
}

fn rustix_is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"))
}

fn sh(sandbox: &Sandbox, script: &str) -> String {
    stdout(
        &mut sandbox.command(&["sh", "-c", script]).unwrap(),
        "the sandboxed script",
    )
    .unwrap()
}

#[test]
fn arguments_reach_the_program_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let sandbox = small_root(dir.path());
    let odd = ["it's", "a \"b\"", "$HOME `x` \\n", "--flag=1 2"];
    let mut argv = vec!["sh", "-c", "printf '[%s]' \"$@\"", "sh"];
    argv.extend(odd);
    let out = stdout(&mut sandbox.command(&argv).unwrap(), "printf").unwrap();
    assert_eq!(out, "[it's][a \"b\"][$HOME `x` \\n][--flag=1 2]");
}

#[test]
fn binds_files_and_tmpfs_appear_inside_and_the_root_stays_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    fs::write(data.path().join("in"), "from the host").unwrap();
    let ro = tempfile::tempdir().unwrap();
    let sandbox = small_root(dir.path())
        .bind(data.path(), "/srv/data")
        .bind_ro(ro.path(), "/srv/ro")
        .tmpfs("/run")
        .file("/run/settings/x.conf", "a = 'b'\n");
    let out = sh(
        &sandbox,
        "cat /srv/data/in; echo; echo written > /srv/data/out; \
         touch /srv/ro/x 2>/dev/null && echo ro-writable; cat /run/settings/x.conf",
    );
    assert_eq!(out, "from the host\na = 'b'");
    assert_eq!(
        fs::read_to_string(data.path().join("out")).unwrap(),
        "written\n"
    );
    assert!(
        !dir.path().join("run/settings").exists(),
        "the file went into the root"
    );
    assert!(fs::read_dir(ro.path()).unwrap().next().is_none());
}

#[test]
fn an_overlay_takes_every_write_and_the_first_tree_wins() {
    let dir = tempfile::tempdir().unwrap();
    let (upper, lower, scratch) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    fs::write(upper.path().join("which"), "upper").unwrap();
    fs::write(lower.path().join("which"), "lower").unwrap();
    let sandbox = small_root(dir.path()).overlay(
        vec![upper.path().to_path_buf(), lower.path().to_path_buf()],
        scratch.path(),
    );
    let out = sh(
        &sandbox,
        "cat /which; echo x > /new; echo y > /which; cat /new",
    );
    assert_eq!(out, "upperx");
    assert!(!dir.path().join("new").exists());
    assert_eq!(
        fs::read_to_string(upper.path().join("which")).unwrap(),
        "upper"
    );
    assert!(fs::read_dir(scratch.path()).unwrap().next().is_none());
}

#[test]
fn a_cleared_environment_has_only_what_was_set() {
    let dir = tempfile::tempdir().unwrap();
    let sandbox = small_root(dir.path())
        .clear_env()
        .env("PATH", "/usr/bin")
        .env("ONLY", "this one");
    let out = stdout(sandbox.command(&["env"]).unwrap().env("LEAK", "x"), "env").unwrap();
    let mut lines: Vec<&str> = out.lines().collect();
    lines.sort();
    assert_eq!(lines, ["ONLY=this one", "PATH=/usr/bin"]);
}

#[test]
fn namespaces_workdir_user_and_umask_as_asked() {
    let dir = tempfile::tempdir().unwrap();
    let sandbox = small_root(dir.path())
        .loopback_only()
        .pid_namespace()
        .workdir("/tmp")
        .umask("027")
        .user("65534:65534", "65534");
    let out = sh(
        &sandbox,
        "pwd; id -u; umask; head -c 13 /proc/1/cmdline | tr '\\0' ' '; echo; \
         cut -d: -f1 /proc/net/dev | tail -n +3 | tr -d ' '",
    );
    // PID 1 is the setup shell: the namespace is the sandbox's own.
    assert_eq!(out, "/tmp\n65534\n0027\nsh -c set -eu\nlo", "{out}");
}

#[test]
fn a_host_name_of_its_own_and_a_read_only_path() {
    let dir = tempfile::tempdir().unwrap();
    let before = fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let sandbox = small_root(dir.path())
        .uts_namespace()
        .read_only_path("/etc");
    let out = sh(
        &sandbox,
        "hostname sandboxed-name && hostname; touch /etc/x 2>/dev/null || echo etc-read-only; \
         touch /tmp/x && echo tmp-writable",
    );
    assert_eq!(out, "sandboxed-name\netc-read-only\ntmp-writable");
    assert_eq!(
        fs::read_to_string("/proc/sys/kernel/hostname").unwrap(),
        before
    );
}

#[test]
fn pivot_root_makes_the_root_the_namespace_root() {
    let dir = tempfile::tempdir().unwrap();
    let sandbox = small_root(dir.path()).enter(Enter::PivotRoot);
    // /proc/self/mountinfo: the root mount is the sandbox's, nothing of the host's.
    let out = sh(&sandbox, "cut -d' ' -f5 /proc/self/mountinfo | grep -cx /");
    assert_eq!(out, "1");
    assert!(!sh(&sandbox, "cat /proc/self/mountinfo").contains("/mnt"));
}

#[test]
fn bad_requests_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let err = small_root(dir.path())
        .bind("/tmp", "relative/path")
        .command(&["true"])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("\"relative/path\" is not an absolute path"),
        "{err}"
    );
    let none: [&str; 0] = [];
    assert!(small_root(dir.path()).command(&none).is_err());
    let err = small_root(dir.path())
        .overlay(vec!["/tmp/a:b".into()], "/tmp")
        .command(&["true"])
        .unwrap_err()
        .to_string();
    assert!(err.contains("cannot be an overlay layer"), "{err}");
}
