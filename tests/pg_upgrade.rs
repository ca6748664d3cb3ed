//! PostgreSQL 17 → 18 and back on a live stack (issue 14): PostgreSQL 17
//! from the tools root and Debian forky's 18 from its own root, each run by
//! the local image's entrypoint with the rendered quadlet's volumes; Synapse
//! from the tools root; `matrix-pg-upgrade` and `appliance-update` run as
//! their units and `matrixctl update` do.
//!
//! One journey, since each Synapse start costs: data on 17 → the pre-update
//! dump → a full disk refuses the move and changes nothing → a power cut and
//! a row-count mismatch stop the move and it starts again → the move to 18
//! keeps every row (users log in with their old tokens, messages and the
//! upload read back) → a rollback finds 17's cluster as it was → 17 writes
//! more, and 18 refuses its stale copy until a new dump → the second move →
//! the health gate's `retire` removes 17's cluster, and 17 refuses to start an
//! empty one in its place.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;

use common::stack::{boot, Stack};
use common::tools::ToolsRoot;
use common::Project;
use common::{ok, refused};

const BASE: &str = "http://localhost:8008";
const UPGRADE: &str = "/usr/libexec/matrix-appliance/matrix-pg-upgrade";
const UPDATE: &str = "/usr/libexec/matrix-appliance/appliance-update";

/// `matrix-pg-upgrade` and `appliance-update` off the appliance: PostgreSQL
/// over TCP as the superuser, no units.
const ENV: &[(&str, &str)] = &[
    (
        "MATRIX_PG_EXEC",
        "env PGHOST=127.0.0.1 PGPASSFILE=/var/lib/matrix/test-superuser.pgpass",
    ),
    ("MATRIX_SYSTEMCTL", ""),
    ("MATRIX_IMAGE_VERSION", "1.0"),
];

fn run(stack: &Stack, program: &str, args: &[&str]) -> Output {
    let mut cmd = stack.command(&[], program, args);
    cmd.envs(ENV.iter().copied());
    cmd.output().unwrap()
}

/// Every file under `dir` with its contents: what "untouched" means.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((p.clone(), fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

fn send(stack: &Stack, token: &str, room: &str, txn: &str, body: &str) {
    let room = room.replace('!', "%21").replace(':', "%3A");
    let a = stack.request(
        Some(token),
        "PUT",
        &format!("{BASE}/_matrix/client/v3/rooms/{room}/send/m.room.message/{txn}"),
        Some(&serde_json::json!({"msgtype": "m.text", "body": body})),
    );
    assert_eq!(a.status, 200, "{a:?}");
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

/// Counts a user relies on, as the superuser sees them.
fn rows(stack: &Stack) -> String {
    stack.sql_in(
        "synapse",
        "SELECT (SELECT count(*) FROM users) || ' ' || (SELECT count(*) FROM rooms) || ' ' || \
         (SELECT count(*) FROM events) || ' ' || (SELECT count(*) FROM local_media_repository)",
    )
}

/// The pre-update dump as `matrixctl update apply` takes it (Synapse
/// stopped; PostgreSQL stopped before the stamp), by the version `version`.
fn pre_update_dump(stack: &mut Stack, version: &str) -> PathBuf {
    stack.stop("synapse");
    let mut cmd = stack.command(&[], UPDATE, &["dump"]);
    cmd.envs(ENV.iter().copied())
        .env("MATRIX_IMAGE_VERSION", version);
    ok(cmd.output().unwrap());
    stack.stop_postgres();
    let dir = format!("/var/lib/matrix/update/dumps/{version}");
    ok(run(stack, UPGRADE, &["stamp", &dir]));
    stack.state.join(format!("update/dumps/{version}"))
}

#[test]
fn postgresql_17_to_18_keeps_every_row_and_a_rollback_finds_17_as_it_left_it() {
    let project = Project::copy_of_repo();
    let next = ToolsRoot::postgres_next();
    let mut stack = boot(&project, &[("server_name", "upgrade.example.net")]);
    let v17 = stack.rendered.clone();
    let v18 = stack.dir.path().join("rendered-18");
    common::stack::render_vps(
        &project,
        &[
            ("server_name", "upgrade.example.net"),
            ("postgres_major", "18"),
        ],
        &v18,
    );
    let old = stack.state.join("postgres");
    let new = stack.state.join("postgres-18");

    // Data on 17: the admin, a room with messages, an upload, a bridge's table.
    let token = common::stack::login(
        &stack,
        BASE,
        "admin",
        &stack.secret("secrets/admin-password"),
    )
    .expect("admin login");
    let room = stack.request(
        Some(&token),
        "POST",
        &format!("{BASE}/_matrix/client/v3/createRoom"),
        Some(&serde_json::json!({"name": "upgrade"})),
    );
    let room = room.json()["room_id"].as_str().unwrap().to_string();
    for i in 0..5 {
        send(
            &stack,
            &token,
            &room,
            &format!("a{i}"),
            &format!("on 17, number {i}"),
        );
    }
    let upload: String = (0..3000)
        .map(|i| char::from(b'a' + (i % 26) as u8))
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
            &upload,
        ],
        &format!("{BASE}/_matrix/media/v3/upload?filename=u.bin"),
    );
    assert_eq!(up.status, 200, "{up:?}");
    let mxc = up.json()["content_uri"].as_str().unwrap().to_string();
    let bridge_password = stack.dir.path().join("bridge-password");
    fs::write(&bridge_password, "bridgePassw0rdOf24chars1\n").unwrap();
    stack
        .extra_binds
        .push((bridge_password, "/run/bridge-password".into()));
    let mut db_env: Vec<(&str, String)> = stack.firstboot_env();
    db_env.retain(|(k, _)| *k == "MATRIX_PSQL" || *k == "PGPASSFILE");
    let db_env: Vec<(&str, &str)> = db_env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    stack.run_env(
        &db_env,
        "/usr/libexec/matrix-appliance/matrix-db-ensure",
        &["telegram", "/run/bridge-password"],
    );
    stack.sql_in(
        "telegram",
        "SET ROLE telegram; CREATE TABLE portal (tg_id bigint, mxid text); \
         INSERT INTO portal SELECT g, '!p' || g || ':x' FROM generate_series(1, 1234) g",
    );
    let rows_on_17 = rows(&stack);
    let dump = pre_update_dump(&mut stack, "1.0");
    for f in [
        "INFO",
        "CLUSTER",
        "roles.sql",
        "synapse.dump",
        "synapse.counts",
        "telegram.counts",
    ] {
        assert!(dump.join(f).is_file(), "the pre-update dump has no {f}");
    }
    let counts = fs::read_to_string(dump.join("telegram.counts")).unwrap();
    assert!(counts.contains("public.portal 1234"), "{counts}");
    let seventeen = snapshot(&old);

    // Version 2 runs PostgreSQL 18. A disk too small for the new cluster:
    // refused before anything moves.
    stack.rendered = v18.clone();
    stack.tmpfiles();
    let small = stack.dir.path().join("small");
    fs::create_dir_all(&small).unwrap();
    let mounted = exec::command("mount")
        .args(["-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs"])
        .arg(&small)
        .status()
        .unwrap();
    assert!(mounted.success());
    stack
        .extra_binds
        .push((small.clone(), "/var/lib/matrix/postgres-18".into()));
    let o = run(&stack, UPGRADE, &["prepare"]);
    stack.extra_binds.pop();
    let _ = exec::command("umount").arg(&small).status();
    refused(
        &o,
        "not enough free space to move PostgreSQL 17's data into a PostgreSQL 18 cluster",
    );
    assert!(!stack.state.join("postgres-upgrade/pending-18").exists());
    assert_eq!(
        seventeen,
        snapshot(&old),
        "the refused move changed 17's cluster"
    );

    // The move: prepare, 18 initialises its own cluster, restore, compare.
    let out = ok(run(&stack, UPGRADE, &["prepare"]));
    assert!(
        out.contains("moving the databases from PostgreSQL 17"),
        "{out}"
    );
    stack.start_postgres_image(Some(&next));
    // The power fails before the restore: the next start begins afresh.
    stack.stop_postgres();
    let out = ok(run(&stack, UPGRADE, &["prepare"]));
    assert!(out.contains("did not finish; starting it again"), "{out}");
    stack.start_postgres_image(Some(&next));
    assert!(stack.sql("SHOW server_version").starts_with("18."));
    // A table that comes back with another row count stops the move.
    let counts_file = dump.join("telegram.counts");
    fs::write(
        &counts_file,
        counts.replace("public.portal 1234", "public.portal 1235"),
    )
    .unwrap();
    refused(
        &run(&stack, UPGRADE, &["restore"]),
        "row counts of telegram differ after the restore",
    );
    assert!(stack.state.join("postgres-upgrade/pending-18").exists());
    assert_eq!(
        seventeen,
        snapshot(&old),
        "a failed move changed 17's cluster"
    );
    fs::write(&counts_file, &counts).unwrap();
    stack.stop_postgres();
    ok(run(&stack, UPGRADE, &["prepare"]));
    stack.start_postgres_image(Some(&next));
    let out = ok(run(&stack, UPGRADE, &["restore"]));
    assert!(out.contains("every row count as before"), "{out}");
    assert_eq!(rows(&stack), rows_on_17);
    assert_eq!(
        stack.sql("SELECT datcollate || datctype FROM pg_database WHERE datname = 'synapse'"),
        "CC"
    );
    // A second start finds nothing to do.
    assert_eq!(ok(run(&stack, UPGRADE, &["restore"])), "");
    stack.start_synapse();
    let read = bodies(&stack, &token, &room);
    for i in 0..5 {
        assert!(read.contains(&format!("on 17, number {i}")), "{read:?}");
    }
    let a = stack.http(
        &["-H", &format!("Authorization: Bearer {token}")],
        &format!(
            "{BASE}/_matrix/client/v1/media/download/{}",
            mxc.trim_start_matches("mxc://")
        ),
    );
    assert_eq!((a.status, a.body.as_str()), (200, upload.as_str()));
    // The bridge's role logs in with its own password.
    let o = stack.run(
        "sh",
        &[
            "-c",
            "PGPASSWORD=$(cat /run/bridge-password) psql -h 127.0.0.1 -U telegram -d telegram \
             -tAc 'SELECT count(*) FROM portal'",
        ],
    );
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "1234");
    send(&stack, &token, &room, "b1", "on 18, before the rollback");
    assert_eq!(seventeen, snapshot(&old), "18 changed 17's cluster");

    // Rollback before the health gate: 17 finds its cluster as it left it.
    stack.stop("synapse");
    stack.stop_postgres();
    stack.rendered = v17.clone();
    ok(run(&stack, UPGRADE, &["prepare"]));
    stack.start_postgres_image(None);
    assert!(stack.sql("SHOW server_version").starts_with("17."));
    assert_eq!(rows(&stack), rows_on_17);
    stack.start_synapse();
    let read = bodies(&stack, &token, &room);
    assert!(read.contains(&"on 17, number 4".to_string()), "{read:?}");
    send(
        &stack,
        &token,
        &room,
        "c1",
        "on 17 again, after the rollback",
    );
    stack.stop("synapse");
    stack.stop_postgres();

    // Forward again with no dump since 17 ran: refused, nothing changed.
    stack.rendered = v18.clone();
    let eighteen = snapshot(&new);
    let o = run(&stack, UPGRADE, &["prepare"]);
    refused(&o, "no dump of its current content exists");
    assert_eq!(eighteen, snapshot(&new));

    // With a new dump: 18's stale copy is set aside, the data moved again.
    stack.rendered = v17.clone();
    stack.start_postgres_image(None);
    stack.start_synapse();
    let rows_on_17 = rows(&stack);
    pre_update_dump(&mut stack, "1.0");
    stack.rendered = v18.clone();
    let out = ok(run(&stack, UPGRADE, &["prepare"]));
    assert!(
        out.contains("kept in /var/lib/matrix/postgres-18.replaced-"),
        "{out}"
    );
    stack.start_postgres_image(Some(&next));
    ok(run(&stack, UPGRADE, &["restore"]));
    assert_eq!(rows(&stack), rows_on_17);
    stack.start_synapse();
    let read = bodies(&stack, &token, &room);
    assert!(
        read.contains(&"on 17 again, after the rollback".to_string()),
        "{read:?}"
    );

    // The health gate passed: 17's cluster goes, a note stays in its place.
    let out = ok(run(&stack, UPGRADE, &["retire"]));
    assert!(out.contains("removed the PostgreSQL 17 cluster"), "{out}");
    assert!(!old.join("PG_VERSION").exists());
    let note = fs::read_to_string(old.join("MOVED")).unwrap();
    assert!(
        note.contains("moved to PostgreSQL 18 in /var/lib/matrix/postgres-18"),
        "{note}"
    );
    // 17 never starts an empty cluster there.
    stack.rendered = v17;
    refused(
        &run(&stack, UPGRADE, &["prepare"]),
        "is not a PostgreSQL cluster and not empty",
    );
    stack.rendered = v18;
}
