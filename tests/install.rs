//! `builder install` and `builder uninstall`: a bundle onto an existing host.
//!
//! Into a directory (`--root`, no systemd): every file lands with its mode,
//! a host file is never overwritten, uninstall removes exactly what was
//! installed and keeps what was changed since, a newer bundle replaces the
//! older one's files. Onto a running host: a plain Debian trixie with systemd
//! and Podman (not the appliance image; tests/common/host.rs) gets the `vps`
//! bundle with its embedded images, serves Matrix through the proxy, and
//! keeps /var/lib/matrix through uninstall and a second install.

mod common;

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use common::host::Host;
use common::*;

const RECORD: &str = "usr/lib/matrix-appliance/install-record.json";

/// A `minimal` bundle (no images: they are pulled), built in `p`.
fn minimal_bundle(p: &Project, sets: &[&str]) -> std::path::PathBuf {
    let mut all = vec!["server_name=install.example"];
    all.extend_from_slice(sets);
    let o = p.build_with("minimal", &all);
    assert_exit(&o, 0);
    p.out().join("minimal.bundle.tar")
}

fn install(p: &Project, bundle: &Path, root: &Path) -> std::process::Output {
    p.builder(&[
        "install",
        bundle.to_str().unwrap(),
        "--root",
        root.to_str().unwrap(),
    ])
}

#[test]
fn install_into_a_directory_records_every_file_and_uninstall_removes_exactly_those() {
    let p = Project::copy_of_repo();
    let bundle = minimal_bundle(&p, &[]);
    let root = p.dir.path().join("root");
    // A host with a file of its own where the bundle puts none, and a
    // directory the bundle also uses.
    fs::create_dir_all(root.join("usr/lib/systemd/system")).unwrap();
    fs::write(
        root.join("usr/lib/systemd/system/host-own.service"),
        "[Unit]\n",
    )
    .unwrap();

    let o = install(&p, &bundle, &root);
    assert_exit(&o, 0);
    let out = stdout(&o);
    assert!(out.contains("installed minimal ("), "{out}");
    assert!(
        out.contains("nothing started: not the running system"),
        "{out}"
    );
    let quadlet = root.join("usr/share/containers/systemd/matrix-synapse.container");
    assert!(fs::read_to_string(&quadlet)
        .unwrap()
        .contains("[Container]"));
    let script = root.join("usr/libexec/matrix-appliance/matrix-db-ensure");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        fs::metadata(&script).unwrap().permissions().mode() & 0o777,
        0o755
    );
    let record: serde_json::Value =
        serde_json::from_slice(&fs::read(root.join(RECORD)).unwrap()).unwrap();
    assert_eq!(record["profile"], "minimal");
    assert_eq!(record["server_name"], "install.example");
    let recorded: Vec<&str> = record["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    assert!(recorded.contains(&"usr/share/containers/systemd/matrix-synapse.container"));
    assert!(
        !recorded.iter().any(|p| p.contains("host-own")),
        "{recorded:?}"
    );
    // The homeserver's data, as a first start would have made it.
    fs::create_dir_all(root.join("var/lib/matrix/secrets")).unwrap();
    fs::write(root.join("var/lib/matrix/secrets/admin-password"), "kept\n").unwrap();
    // An admin's edit of an installed file.
    let edited = root.join("usr/share/matrix-appliance/synapse/log.yaml");
    fs::write(&edited, "edited by the admin\n").unwrap();

    let o = p.builder(&["uninstall", "--root", root.to_str().unwrap()]);
    assert_exit(&o, 0);
    let out = stdout(&o);
    assert!(
        out.contains(&format!(
            "kept {}: changed since the install",
            edited.display()
        )),
        "{out}"
    );
    assert!(
        out.contains("kept ") && out.contains("var/lib/matrix: the homeserver's data"),
        "{out}"
    );
    assert!(!quadlet.exists() && !script.exists() && !root.join(RECORD).exists());
    assert_eq!(
        fs::read_to_string(&edited).unwrap(),
        "edited by the admin\n"
    );
    assert!(root
        .join("usr/lib/systemd/system/host-own.service")
        .exists());
    assert_eq!(
        fs::read_to_string(root.join("var/lib/matrix/secrets/admin-password")).unwrap(),
        "kept\n"
    );
    // Directories the install made and nothing else uses are gone.
    assert!(!root.join("usr/share/containers").exists());
    assert!(!root.join("usr/libexec/matrix-appliance").exists());

    // Nothing left to uninstall: said, not done.
    let o = p.builder(&["uninstall", "--root", root.to_str().unwrap()]);
    assert_exit(&o, 2);
    assert!(
        stderr(&o).contains("nothing to uninstall under"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn install_never_overwrites_a_host_file_and_says_which() {
    let p = Project::copy_of_repo();
    let bundle = minimal_bundle(&p, &[]);
    let root = p.dir.path().join("root");
    let theirs = root.join("usr/lib/matrix-appliance/postgres.sh");
    fs::create_dir_all(theirs.parent().unwrap()).unwrap();
    fs::write(&theirs, "the host's own\n").unwrap();
    let o = install(&p, &bundle, &root);
    assert_exit(&o, 2);
    let err = stderr(&o);
    assert!(
        err.contains(&format!("the host already has {}", theirs.display()))
            && err.contains("nothing was installed"),
        "{err}"
    );
    assert_eq!(fs::read_to_string(&theirs).unwrap(), "the host's own\n");
    assert!(!root.join("usr/share").exists(), "something was installed");
    assert!(!root.join(RECORD).exists());
}

#[test]
fn a_newer_bundle_replaces_the_installed_one_and_removes_what_it_no_longer_has() {
    let p = Project::copy_of_repo();
    let root = p.dir.path().join("root");
    fs::create_dir_all(&root).unwrap();
    // The vps bundle (more layers), then minimal over it: the proxy's files go.
    let o = p.build_with("vps", &["server_name=install.example"]);
    assert_exit(&o, 0);
    assert_exit(&install(&p, &p.out().join("vps.bundle.tar"), &root), 0);
    let matrixctl = root.join("usr/bin/matrixctl");
    assert!(matrixctl.exists());
    let synapse_conf = root.join("usr/share/matrix-appliance/synapse/homeserver.yaml");
    let before = fs::read_to_string(&synapse_conf).unwrap();

    let bundle = minimal_bundle(&p, &["max_upload_size=99M"]);
    let o = install(&p, &bundle, &root);
    assert_exit(&o, 0);
    let out = stdout(&o);
    assert!(out.contains("replacing the earlier install"), "{out}");
    assert!(
        out.contains("files of the earlier install this bundle no longer has"),
        "{out}"
    );
    assert!(!matrixctl.exists(), "the admin layer's matrixctl stayed");
    let after = fs::read_to_string(&synapse_conf).unwrap();
    assert!(after != before && after.contains("99M"), "{after}");
    let record = fs::read_to_string(root.join(RECORD)).unwrap();
    assert!(record.contains("\"profile\": \"minimal\"") && !record.contains("matrixctl"));
}

#[test]
fn install_refuses_a_damaged_bundle_before_writing_anything() {
    let p = Project::copy_of_repo();
    let bundle = minimal_bundle(&p, &[]);
    // One byte inside a layer blob (a gzip stream) changed.
    let mut bytes = fs::read(&bundle).unwrap();
    let gzip = bytes
        .windows(3)
        .position(|w| w == [0x1f, 0x8b, 0x08])
        .expect("no gzip layer blob in the bundle");
    bytes[gzip + 100] ^= 0xff;
    fs::write(&bundle, bytes).unwrap();
    let root = p.dir.path().join("root");
    fs::create_dir_all(&root).unwrap();
    let o = install(&p, &bundle, &root);
    assert_exit(&o, 1);
    assert!(
        stderr(&o).contains("is damaged, nothing was installed"),
        "{}",
        stderr(&o)
    );
    assert_eq!(fs::read_dir(&root).unwrap().count(), 0);
}

/// Waits until `matrixctl status` says the stack is up (the first start
/// loads the images and initialises PostgreSQL and Synapse).
fn wait_up(host: &Host) {
    let started = Instant::now();
    loop {
        let o = host.sh("matrixctl status 2>&1");
        if o.status.success() {
            return;
        }
        if started.elapsed() > Duration::from_secs(15 * 60) {
            let why = host.sh(
                "systemctl --failed --no-legend; systemctl list-jobs --no-legend; \
                 journalctl -b --no-pager -n 150 -p warning",
            );
            panic!(
                "the stack on the host is not up after 15 minutes:\n{}\n{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&why.stdout)
            );
        }
        std::thread::sleep(Duration::from_secs(3));
    }
}

/// The admin logs in through the proxy (TLS with the appliance's own CA);
/// the access token's presence.
fn admin_logs_in(host: &Host) -> bool {
    let o = host.sh("jq -n --rawfile pw /var/lib/matrix/secrets/admin-password \
         '{type: \"m.login.password\", identifier: {type: \"m.id.user\", user: \"admin\"}, \
           password: ($pw | rtrimstr(\"\\n\"))}' | \
         curl -sS --cacert /var/lib/matrix/proxy/internal-ca.crt \
           --resolve matrix.host.example:443:127.0.0.1 -H 'Content-Type: application/json' \
           -d @- https://matrix.host.example/_matrix/client/v3/login");
    String::from_utf8_lossy(&o.stdout).contains("\"access_token\"")
}

#[test]
fn the_bundle_installed_on_a_plain_systemd_host_serves_matrix_and_uninstall_keeps_the_data() {
    let p = Project::with_shared_image_cache();
    // Every image embedded (built here, as the VM test's): no registry.
    let o = p.build_with(
        "vps",
        &[
            "server_name=host.example",
            "tls_mode=internal",
            "pull_images=false",
        ],
    );
    assert_exit(&o, 0);
    let bundle = p.out().join("vps.bundle.tar");
    // A bundle with a quadlet this Podman cannot read (as an older Podman
    // cannot read the newer keys of ours): a key quadlet does not know.
    let older = Project::copy_of_repo();
    let quadlet = older
        .root()
        .join("layers/postgres/root/usr/share/containers/systemd/matrix-postgres.container.tera");
    let text = fs::read_to_string(&quadlet).unwrap();
    fs::write(
        &quadlet,
        text.replacen("[Container]\n", "[Container]\nNoSuchQuadletKey=1\n", 1),
    )
    .unwrap();
    let unreadable = minimal_bundle(&older, &[]);
    let host = Host::boot(&[
        (&bundle, "/srv/vps.bundle.tar"),
        (&unreadable, "/srv/unreadable.bundle.tar"),
        (
            Path::new(env!("CARGO_BIN_EXE_builder")),
            "/usr/local/bin/builder",
        ),
    ]);
    let o = host.sh("builder install /srv/unreadable.bundle.tar");
    assert_exit(&o, 1);
    assert!(
        stderr(&o).contains(
            "its quadlet generator made no unit of /usr/share/containers/systemd/matrix-postgres.container"
        ),
        "{}",
        stderr(&o)
    );
    host.sh_ok("builder uninstall");
    // A host without Podman (here: not in PATH) is told so, and nothing
    // is written.
    let o = host.sh("env PATH=/nonexistent /usr/local/bin/builder install /srv/vps.bundle.tar");
    assert_exit(&o, 2);
    assert!(
        stderr(&o).contains("Podman is not installed (no `podman` in PATH)"),
        "{}",
        stderr(&o)
    );
    host.sh_ok("test ! -e /usr/lib/matrix-appliance && test ! -e /usr/bin/matrixctl");
    let out = host.sh_ok("builder install /srv/vps.bundle.tar");
    assert!(
        out.contains("installed vps (") && out.contains("matrix-appliance.target"),
        "{out}"
    );
    wait_up(&host);
    let versions = host.sh_ok(
        "curl -fsS --cacert /var/lib/matrix/proxy/internal-ca.crt \
         --resolve matrix.host.example:443:127.0.0.1 \
         https://matrix.host.example/_matrix/client/versions",
    );
    assert!(versions.contains("\"versions\""), "{versions}");
    let well_known = host.sh_ok(
        "curl -fsS --cacert /var/lib/matrix/proxy/internal-ca.crt \
         --resolve host.example:443:127.0.0.1 https://host.example/.well-known/matrix/client",
    );
    assert!(
        well_known.contains("https://matrix.host.example"),
        "{well_known}"
    );
    assert!(
        admin_logs_in(&host),
        "the admin cannot log in on the installed host"
    );
    let password = host.sh_ok("cat /var/lib/matrix/secrets/admin-password");

    let out = host.sh_ok("builder uninstall");
    assert!(
        out.contains("stopped ") && out.contains("kept /var/lib/matrix"),
        "{out}"
    );
    let left = host.sh_ok(
        "ls /usr/share/containers/systemd /usr/libexec/matrix-appliance /usr/bin/matrixctl 2>&1; \
         podman ps --format '{{.Names}}'; \
         systemctl list-units --plain --no-legend --state=active 'matrix*'",
    );
    assert!(
        !left.contains("matrix-") || left.lines().all(|l| l.contains("No such file")),
        "uninstall left files, containers or units:\n{left}"
    );
    assert_eq!(
        host.sh_ok("cat /var/lib/matrix/secrets/admin-password"),
        password,
        "uninstall touched the homeserver's data"
    );

    // Installed again: the same homeserver, its data used as it was.
    host.sh_ok("builder install /srv/vps.bundle.tar");
    wait_up(&host);
    assert!(
        admin_logs_in(&host),
        "the admin's password no longer works after a reinstall"
    );
    assert_eq!(
        host.sh_ok("cat /var/lib/matrix/secrets/admin-password"),
        password
    );
}
