//! The restore drill on a live stack (PostgreSQL 17 and Synapse from the
//! tools root, restic and a restic REST server on loopback): an appliance
//! with data is backed up, everything under /var is lost, a fresh appliance
//! for the same server name restores the backup, and its users carry on as
//! if nothing happened. `appliance-backup` runs as `matrixctl backup` and its
//! units run it, against this stack's PostgreSQL.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;

use common::stack::{boot, Stack};
use common::{ok, refused, Project};

const BACKUP: &str = "/usr/libexec/matrix-appliance/appliance-backup";
const BASE: &str = "http://localhost:8008";
const REMOTE: &str = "rest:http://127.0.0.1:8000/";

/// What `appliance-backup` needs off the appliance: PostgreSQL over TCP as
/// the superuser, no units to stop, the local repository on a bind that
/// survives each command's private mounts.
fn env(stack: &Stack) -> Vec<(&'static str, String)> {
    let mut env = stack.firstboot_env();
    env.extend([
        (
            "MATRIX_PG_EXEC",
            "env PGHOST=127.0.0.1 PGPASSFILE=/var/lib/matrix/test-superuser.pgpass".to_string(),
        ),
        ("MATRIX_SYSTEMCTL", String::new()),
        ("MATRIX_BACKUP_REPO", "/srv/backup/repo".to_string()),
    ]);
    env
}

fn backup(stack: &Stack, args: &[&str]) -> Output {
    let env = env(stack);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut cmd = stack.command(&[], BACKUP, args);
    cmd.envs(env);
    cmd.output().unwrap()
}

fn login(stack: &Stack, user: &str, password: &str) -> Option<String> {
    common::stack::login(stack, BASE, user, password).ok()
}

fn bodies(stack: &Stack, token: &str, room: &str) -> Vec<String> {
    let room = room.replace('!', "%21").replace(':', "%3A");
    let m = stack.request(
        Some(token),
        "GET",
        &format!("{BASE}/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=50"),
        None,
    );
    assert_eq!(m.status, 200, "{m:?}");
    m.json()["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["content"]["body"].as_str().map(str::to_string))
        .collect()
}

fn download(stack: &Stack, token: &str, mxc: &str) -> String {
    let path = mxc.trim_start_matches("mxc://");
    let a = stack.http(
        &["-H", &format!("Authorization: Bearer {token}")],
        &format!("{BASE}/_matrix/client/v1/media/download/{path}"),
    );
    assert_eq!(a.status, 200, "{a:?}");
    a.body
}

fn server_keys(stack: &Stack) -> serde_json::Value {
    let a = stack.request(None, "GET", &format!("{BASE}/_matrix/key/v2/server"), None);
    assert_eq!(a.status, 200, "{a:?}");
    a.json()["verify_keys"].clone()
}

/// A bridge's database as its first start makes it (role, password,
/// C-collated database), with one row of bridge state.
fn make_bridge_database(stack: &Stack) {
    let secrets = stack.state.join("bridges/telegram/secrets");
    fs::create_dir_all(&secrets).unwrap();
    fs::write(secrets.join("db-password"), "bridgePassw0rdOf24chars1").unwrap();
    let env = env(stack);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    stack.run_env(
        &env,
        "/usr/libexec/matrix-appliance/matrix-db-ensure",
        &[
            "telegram",
            "/var/lib/matrix/bridges/telegram/secrets/db-password",
        ],
    );
    stack.sql_in(
        "telegram",
        "SET ROLE telegram; CREATE TABLE portal (tg_id bigint, mxid text); INSERT INTO portal VALUES (42, '!portal:x')",
    );
}

/// The bridge's role logs in with the password in its secret file.
fn bridge_row(stack: &Stack) -> String {
    let o = stack.run(
        "sh",
        &[
            "-c",
            "PGPASSWORD=$(cat /var/lib/matrix/bridges/telegram/secrets/db-password) \
             psql -h 127.0.0.1 -U telegram -d telegram -tAc 'SELECT tg_id || mxid FROM portal'",
        ],
    );
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// Everything under /var/lib/matrix gone, then a first boot as on a new
/// machine: new secrets, a new cluster, a new signing key and admin.
fn lose_everything_and_boot_afresh(stack: &mut Stack, backup_dir: &Path) {
    stack.stop("synapse");
    stack.stop_postgres();
    for entry in fs::read_dir(&stack.state).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            fs::remove_dir_all(&path).unwrap();
        } else {
            fs::remove_file(&path).unwrap();
        }
    }
    // The local repository was on the same disk.
    fs::remove_dir_all(backup_dir.join("repo")).unwrap();
    stack.first_boot_until_synapse();
    stack.start_synapse();
    stack.firstboot("admin-user");
}

#[test]
fn a_backup_restored_on_a_fresh_appliance_brings_back_users_messages_media_and_keys() {
    let project = Project::copy_of_repo();
    let server_name = "restore.example.net";
    let mut stack = boot(&project, &[("server_name", server_name)]);
    let backup_dir: PathBuf = stack.dir.path().join("backup");
    fs::create_dir_all(backup_dir.join("rest")).unwrap();
    stack
        .extra_binds
        .push((backup_dir.clone(), "/srv/backup".to_string()));
    stack.spawn(
        "rest-server",
        &[],
        &[],
        "restic-rest-server",
        &[
            "--path",
            "/srv/backup/rest",
            "--listen",
            "127.0.0.1:8000",
            "--no-auth",
        ],
    );
    stack.wait_for(
        "the REST server",
        std::time::Duration::from_secs(30),
        "curl",
        &["-sS", "-o", "/dev/null", "http://127.0.0.1:8000/"],
    );

    // Data: the admin's message in a room, an upload, a bridge's state.
    let admin_password = stack.secret("secrets/admin-password");
    let token = login(&stack, "admin", &admin_password).expect("admin login");
    let room = stack.request(
        Some(&token),
        "POST",
        &format!("{BASE}/_matrix/client/v3/createRoom"),
        Some(&serde_json::json!({"name": "drill"})),
    );
    let room_id = room.json()["room_id"].as_str().unwrap().to_string();
    let room_path = room_id.replace('!', "%21").replace(':', "%3A");
    let sent = stack.request(
        Some(&token),
        "PUT",
        &format!("{BASE}/_matrix/client/v3/rooms/{room_path}/send/m.room.message/d1"),
        Some(&serde_json::json!({"msgtype": "m.text", "body": "sent before the disk died"})),
    );
    assert_eq!(sent.status, 200, "{sent:?}");
    let upload_body: String = (0..2000)
        .map(|i| format!("{:x}", i * 7919 % 65521))
        .collect();
    let up = stack.http(
        &[
            "-X",
            "POST",
            "-H",
            &format!("Authorization: Bearer {token}"),
            "-H",
            "Content-Type: application/octet-stream",
            "--data-binary",
            &upload_body,
        ],
        &format!("{BASE}/_matrix/media/v3/upload?filename=drill.bin"),
    );
    assert_eq!(up.status, 200, "{up:?}");
    let mxc = up.json()["content_uri"].as_str().unwrap().to_string();
    make_bridge_database(&stack);
    let signing_key = stack.secret("synapse/secrets/signing.key");
    let keys_before = server_keys(&stack);

    // The first boot's unit makes the key and the local repository.
    ok(backup(&stack, &["init"]));
    assert!(backup_dir.join("repo/config").is_file());
    let key_out = ok(backup(&stack, &["key"]));
    let key = key_out
        .lines()
        .find_map(|l| l.strip_prefix("local repository (/srv/backup/repo): "))
        .unwrap_or_else(|| panic!("no key in:\n{key_out}"))
        .to_string();
    assert!(key.len() >= 32, "a short key: {key_out}");
    fs::write(backup_dir.join("kept-key"), &key).unwrap();
    // No key of the backup lies in what it backs up.
    assert!(!stack.state.join("secrets").join("backup-key").exists());

    // A remote repository on the REST server, then a backup to both.
    let out = ok(backup(&stack, &["configure", REMOTE]));
    assert!(out.contains("a new repository"), "{out}");
    let out = ok(backup(&stack, &["now"]));
    assert!(
        out.contains("backup made: local ") && out.contains(", remote "),
        "{out}"
    );
    let status = ok(backup(&stack, &["status"]));
    assert!(status.contains("last backup: ok "), "{status}");
    let listed = ok(backup(&stack, &["list", "--remote"]));
    assert!(listed.contains("scheduled"), "{listed}");
    // The dump left out e2e_one_time_keys_json's rows, and the cluster's
    // password stayed out.
    let dumps = fs::read_to_string(stack.state.join("backup/dumps/INFO")).unwrap();
    assert!(
        dumps.contains(&format!("server_name={server_name}\n")),
        "{dumps}"
    );
    assert!(
        dumps.contains("synapse") && dumps.contains("telegram"),
        "{dumps}"
    );

    // A backup of another server name is refused, naming both.
    let other = stack.dir.path().join("other");
    common::stack::render_vps(&project, &[("server_name", "other.example.net")], &other);
    let other_backup = other.join("usr/libexec/matrix-appliance/appliance-backup");
    let env_other = env(&stack);
    let mut cmd = stack.command(
        &[(other_backup, "/srv/other-backup".to_string())],
        "/srv/other-backup",
        &["restore", "--local"],
    );
    cmd.envs(env_other.iter().map(|(k, v)| (*k, v.as_str())));
    let o = cmd.output().unwrap();
    refused(
        &o,
        &format!("is a backup of {server_name}, and this appliance serves other.example.net"),
    );

    // Over data without --force: refused, nothing changed.
    let o = backup(&stack, &["restore", "--local"]);
    refused(&o, "already has data");
    assert_eq!(
        bodies(&stack, &token, &room_id),
        vec!["sent before the disk died"]
    );

    // The disk dies; a new machine boots the same image.
    lose_everything_and_boot_afresh(&mut stack, &backup_dir);
    assert_ne!(stack.secret("synapse/secrets/signing.key"), signing_key);
    assert_ne!(stack.secret("secrets/admin-password"), admin_password);
    assert!(login(&stack, "admin", &admin_password).is_none());
    ok(backup(&stack, &["init"]));

    // The remote repository with a wrong key: refused, nothing configured.
    fs::write(
        backup_dir.join("wrong-key"),
        "not-the-key-of-that-repository",
    )
    .unwrap();
    let o = backup(
        &stack,
        &["configure", REMOTE, "--key", "/srv/backup/wrong-key"],
    );
    refused(&o, "the key does not open it");
    assert!(!stack.state.join("backup/remote.repo").exists());
    // The kept key opens it; Synapse stops for the restore (its unit would).
    ok(backup(
        &stack,
        &["configure", REMOTE, "--key", "/srv/backup/kept-key"],
    ));
    stack.stop("synapse");
    let out = ok(backup(&stack, &["restore"]));
    assert!(out.contains("restored snapshot latest"), "{out}");
    stack.start_synapse();

    // As before: the old token, the message, the upload, the keys, the bridge.
    assert_eq!(
        bodies(&stack, &token, &room_id),
        vec!["sent before the disk died"]
    );
    assert_eq!(download(&stack, &token, &mxc), upload_body);
    assert_eq!(stack.secret("synapse/secrets/signing.key"), signing_key);
    assert_eq!(server_keys(&stack), keys_before);
    assert!(login(&stack, "admin", &admin_password).is_some());
    assert_eq!(bridge_row(&stack), "42!portal:x");
    let collation = stack
        .sql("SELECT datcollate || ' ' || datctype FROM pg_database WHERE datname = 'synapse'");
    assert_eq!(collation, "C C");
    let status = ok(backup(&stack, &["status"]));
    assert!(status.contains("last restore: "), "{status}");

    // Over data with --force: what is there is backed up first.
    stack.stop("synapse");
    let out = ok(backup(&stack, &["restore", "--force"]));
    assert!(out.contains("backing up what is here first"), "{out}");
    let listed = ok(backup(&stack, &["list", "--remote"]));
    assert!(listed.contains("before-restore"), "{listed}");
}
