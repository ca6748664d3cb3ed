//! PostgreSQL across major versions: the local image's entrypoint, run in
//! the tools root with Debian's PostgreSQL 17 as the image has it, never
//! starts on nor initialises over a cluster of another major.

mod common;

use std::fs;
use std::path::Path;

use common::assert_exit;
use common::tools::ToolsRoot;

const ENTRYPOINT: &str = "images/local/postgres/root/usr/local/bin/docker-entrypoint.sh";

/// Every file and directory under `dir`: path, owner, mode and contents.
fn snapshot(dir: &Path) -> Vec<(String, u32, u32, Vec<u8>)> {
    use std::os::unix::fs::MetadataExt as _;
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let meta = fs::symlink_metadata(&path).unwrap();
        let contents = if meta.is_dir() {
            out.extend(snapshot(&path));
            Vec::new()
        } else {
            fs::read(&path).unwrap()
        };
        out.push((
            path.display().to_string(),
            meta.uid(),
            meta.mode(),
            contents,
        ));
    }
    out.sort();
    out
}

#[test]
fn the_local_image_refuses_a_cluster_of_another_major_and_changes_nothing() {
    let tools = ToolsRoot::get();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let entrypoint = repo.join(ENTRYPOINT);
    for theirs in ["16", "18"] {
        let data = tempfile::tempdir().unwrap();
        fs::write(data.path().join("PG_VERSION"), format!("{theirs}\n")).unwrap();
        fs::create_dir(data.path().join("base")).unwrap();
        fs::write(data.path().join("base/1"), "a table of the older cluster").unwrap();
        let before = snapshot(data.path());
        let o = tools
            .command(
                &[
                    (&entrypoint, "/usr/local/bin/docker-entrypoint.sh"),
                    (data.path(), "/var/lib/postgresql/data"),
                ],
                "env",
                &[
                    // The image's environment (recipe.toml) and the quadlet's.
                    "PATH=/usr/lib/postgresql/17/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    "PGDATA=/var/lib/postgresql/data",
                    "POSTGRES_PASSWORD=a-password-of-16-chars",
                    "/usr/local/bin/docker-entrypoint.sh",
                    "postgres",
                ],
            )
            .output()
            .unwrap();
        assert_exit(&o, 1);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains(&format!(
                "holds a PostgreSQL {theirs} cluster and this is PostgreSQL 17: not starting on it"
            )),
            "{err}"
        );
        assert!(err.contains("matrixctl update rollback"), "{err}");
        assert_eq!(
            before,
            snapshot(data.path()),
            "the refused cluster's directory changed"
        );
    }
}

/// The server the entrypoint becomes (a stand-in `postgres` first in PATH
/// that prints its environment; initdb runs Debian's real one) has no
/// password in its environment: initdb read it from the root-only file.
#[test]
fn the_server_gets_no_password_in_its_environment() {
    use std::os::unix::fs::PermissionsExt as _;
    let tools = ToolsRoot::get();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let entrypoint = repo.join(ENTRYPOINT);
    let data = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let password = "a-password-of-16-chars";
    let secret = dir.path().join("postgres-password");
    fs::write(&secret, format!("{password}\n")).unwrap();
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();
    let bin = dir.path().join("bin");
    fs::create_dir(&bin).unwrap();
    fs::write(
        bin.join("postgres"),
        "#!/bin/sh\nexec cat /proc/self/environ\n",
    )
    .unwrap();
    fs::set_permissions(bin.join("postgres"), fs::Permissions::from_mode(0o755)).unwrap();
    let o = tools
        .command(
            &[
                (&entrypoint, "/usr/local/bin/docker-entrypoint.sh"),
                (data.path(), "/var/lib/postgresql/data"),
                (&secret, "/run/secrets/postgres-password"),
                (&bin, "/opt/stand-in"),
            ],
            "env",
            &[
                "PATH=/opt/stand-in:/usr/lib/postgresql/17/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "PGDATA=/var/lib/postgresql/data",
                "POSTGRES_PASSWORD_FILE=/run/secrets/postgres-password",
                "/usr/local/bin/docker-entrypoint.sh",
                "postgres",
            ],
        )
        .output()
        .unwrap();
    assert_exit(&o, 0);
    assert!(
        data.path().join("PG_VERSION").exists(),
        "initdb made no cluster"
    );
    let environ = String::from_utf8_lossy(&o.stdout);
    let vars: Vec<&str> = environ.split('\0').filter(|v| !v.is_empty()).collect();
    assert!(
        vars.iter().any(|v| v.starts_with("PGDATA=")),
        "not the server's environment: {vars:?}"
    );
    assert!(
        !vars
            .iter()
            .any(|v| v.starts_with("POSTGRES_PASSWORD=") || v.contains(password)),
        "the server's environment holds the password"
    );
}
