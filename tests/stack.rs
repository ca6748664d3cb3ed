//! The live stack on loopback (issue 3, proof 2): the bundle's own rendered
//! files run by real PostgreSQL 17, Synapse (PyPI, the image's pinned
//! version) and each proxy, with the first-boot chain and `matrixctl`.

mod common;

use std::fs;

use common::stack::{boot, login, prepare, server_names, Stack, CA};
use common::*;

/// The proxy as systemd brings it up: its containers (each unit's
/// ExecStartPre first), then the certificate unit; waits until it answers
/// for `matrix_host` over TLS with the internal CA.
fn start_proxy(stack: &mut Stack, matrix_host: &str) {
    start_proxy_units(stack, matrix_host);
    wait_for_proxy(stack, matrix_host);
}

/// The proxy's containers and certificate unit, without waiting for Synapse.
fn start_proxy_units(stack: &mut Stack, matrix_host: &str) {
    stack.start_proxy_containers();
    let url = format!("https://{matrix_host}/_matrix/client/versions");
    // The certificate unit runs once the proxy is up (After=matrix-proxy.service).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !stack
        .command(&[], "curl", &["-ksS", "-o", "/dev/null", &url])
        .output()
        .unwrap()
        .status
        .success()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the proxy never answered:\n{}",
            stack.log("matrix-proxy")
        );
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    stack.run_unit(
        "matrix-proxy-certs.service",
        &[common::stack::NO_PROXY_RELOAD],
    );
}

/// Waits until the proxy serves Synapse over TLS with the internal CA.
fn wait_for_proxy(stack: &mut Stack, matrix_host: &str) {
    let url = format!("https://{matrix_host}/_matrix/client/versions");
    stack.wait_for(
        "the proxy with its certificate",
        std::time::Duration::from_secs(60),
        "curl",
        &["-fsS", "--cacert", CA, "-o", "/dev/null", &url],
    );
}

fn curl(stack: &Stack, args: &[&str]) -> String {
    let mut all = vec!["-sS", "--max-time", "20"];
    all.extend_from_slice(args);
    String::from_utf8(stack.run("curl", &all).stdout).unwrap()
}

#[test]
fn first_boot_brings_up_synapse_on_postgres_with_c_collation() {
    let project = Project::copy_of_repo();
    let mut stack = boot(&project, &[("server_name", "live.example.net")]);
    let versions = curl(&stack, &["http://localhost:8008/_matrix/client/versions"]);
    assert!(versions.contains("\"versions\""), "{versions}");
    // The databases step made Synapse's database with C collation.
    let collation = stack.sql(
        "SELECT datcollate || ' ' || datctype || ' ' || pg_encoding_to_char(encoding) FROM pg_database WHERE datname = 'synapse'",
    );
    assert_eq!(collation, "C C UTF8");
    // Every step is done, and running the chain again changes nothing.
    // Each step is gated on state: a stamp, or for the signing key the key.
    for step in ["secrets", "databases", "admin-user"] {
        assert!(
            stack.state.join(format!("firstboot/{step}.done")).exists(),
            "{step}"
        );
    }
    assert!(stack.state.join("synapse/secrets/signing.key").exists());
    let admin_password = stack.secret("secrets/admin-password");
    let before = first_boot_outcome(&stack);
    assert!(
        before.0.len() >= 6,
        "fewer secrets than first boot makes: {:?}",
        before.0.keys()
    );
    for step in ["secrets", "databases", "signing-key", "admin-user"] {
        stack.firstboot(step);
    }
    assert_eq!(
        first_boot_outcome(&stack),
        before,
        "a re-run changed something"
    );

    // A crash after a step's work, before its stamp: the re-run finds the
    // work done and only writes the stamp.
    for step in ["secrets", "databases", "admin-user"] {
        fs::remove_file(stack.state.join(format!("firstboot/{step}.done"))).unwrap();
        stack.firstboot(step);
        assert!(stack.state.join(format!("firstboot/{step}.done")).exists());
        assert_eq!(first_boot_outcome(&stack), before, "{step} redone");
    }
    // A crash half-way through the secrets: the missing one is made, the
    // others stay as they were.
    let form = stack.state.join("synapse/secrets/form_secret");
    fs::remove_file(&form).unwrap();
    fs::remove_file(stack.state.join("firstboot/secrets.done")).unwrap();
    stack.firstboot("secrets");
    let (mut secrets, users) = first_boot_outcome(&stack);
    assert!(form.exists(), "the missing secret was not made");
    secrets.remove("synapse/secrets/form_secret");
    let mut expected = before.0.clone();
    expected.remove("synapse/secrets/form_secret");
    assert_eq!((secrets, users), (expected, before.1.clone()));
    // A crash between the role and the database, and between storing the
    // admin's password and registering the admin: the database is made
    // (C-collated), and the admin registered with the stored password.
    stack.stop("synapse");
    stack.sql("DROP DATABASE synapse WITH (FORCE)");
    for step in ["databases", "admin-user"] {
        fs::remove_file(stack.state.join(format!("firstboot/{step}.done"))).unwrap();
    }
    stack.firstboot("databases");
    assert_eq!(
        stack
            .sql("SELECT datcollate || ' ' || datctype FROM pg_database WHERE datname = 'synapse'"),
        "C C"
    );
    stack.start_synapse();
    stack.firstboot("admin-user");
    assert_eq!(stack.secret("secrets/admin-password"), admin_password);
    assert!(
        login(&stack, "http://localhost:8008", "admin", &admin_password).is_ok(),
        "the admin was not registered with the stored password"
    );
}

/// What first boot made: every secret file (path → SHA-256 of its
/// contents) and the database's users.
fn first_boot_outcome(stack: &Stack) -> (std::collections::BTreeMap<String, String>, String) {
    let mut secrets = std::collections::BTreeMap::new();
    for dir in ["secrets", "synapse/secrets"] {
        for entry in fs::read_dir(stack.state.join(dir)).unwrap() {
            let path = entry.unwrap().path();
            let name = format!("{dir}/{}", path.file_name().unwrap().to_string_lossy());
            // By hash: a failing comparison prints no secret.
            use sha2::Digest as _;
            let digest = sha2::Sha256::digest(fs::read(&path).unwrap());
            secrets.insert(name, hex::encode(digest));
        }
    }
    let users = stack.sql_in(
        "synapse",
        "SELECT string_agg(name || ':' || admin, ' ' ORDER BY name) FROM users",
    );
    (secrets, users)
}

/// initdb already makes the cluster C-collated, which would hide a database
/// step that forgot to ask for C: on a cluster whose default is another
/// locale, the step's databases must still be C, C.
#[test]
fn the_databases_step_asks_for_c_collation_itself() {
    let project = Project::copy_of_repo();
    let mut stack = common::stack::Stack::new(&project, &[("server_name", "locale.example.net")]);
    stack.tmpfiles();
    stack.firstboot("secrets");
    stack.start_postgres_initdb(
        "-E UTF8 --locale=C.UTF-8 --auth-local=trust --auth-host=scram-sha-256",
    );
    let default = stack
        .sql("SELECT datcollate || ' ' || datctype FROM pg_database WHERE datname = 'template1'");
    assert_eq!(
        default, "C.UTF-8 C.UTF-8",
        "the cluster's default is not another locale"
    );
    stack.firstboot("databases");
    let made = stack
        .sql("SELECT datcollate || ' ' || datctype FROM pg_database WHERE datname = 'synapse'");
    assert_eq!(made, "C C");
}

fn authed(
    stack: &Stack,
    token: &str,
    method: &str,
    url: &str,
    body: Option<&serde_json::Value>,
) -> common::stack::Answer {
    stack.request(Some(token), method, url, body)
}

/// A booted stack behind `proxy` with the internal CA and `extra` values,
/// its server name and Matrix host resolving to it; with those two names.
fn boot_behind(proxy: &str, extra: &[(&str, &str)]) -> (Stack, String, String) {
    let project = Project::copy_of_repo();
    let server_name = server_names().0;
    let matrix_host = format!("matrix.{server_name}");
    let mut values = vec![
        ("server_name", server_name.as_str()),
        ("proxy", proxy),
        ("tls_mode", "internal"),
    ];
    values.extend_from_slice(extra);
    let mut stack = boot(&project, &values);
    stack.names = vec![server_name.clone(), matrix_host.clone()];
    stack.write_hosts(&[]);
    start_proxy(&mut stack, &matrix_host);
    (stack, server_name, matrix_host)
}

/// The Matrix round trip through the proxy over TLS, for one proxy.
fn round_trip_through(proxy: &str) {
    let (stack, server_name, matrix_host) = boot_behind(proxy, &[]);
    let base = format!("https://{matrix_host}");

    // Client API through the proxy over TLS, with HSTS.
    let versions = stack.http(
        &["--cacert", CA],
        &format!("{base}/_matrix/client/versions"),
    );
    assert_eq!(versions.status, 200, "{versions:?}");
    assert!(versions.json()["versions"].is_array());
    assert_eq!(
        versions
            .header("strict-transport-security")
            .map(|h| h.starts_with("max-age=63072000")),
        Some(true),
        "{versions:?}"
    );

    // .well-known on the server name: JSON with CORS.
    for (doc, key) in [("server", "m.server"), ("client", "m.homeserver")] {
        let a = stack.http(
            &["--cacert", CA],
            &format!("https://{server_name}/.well-known/matrix/{doc}"),
        );
        assert_eq!(a.status, 200, "{a:?}");
        assert!(
            a.header("content-type")
                .unwrap_or("")
                .starts_with("application/json"),
            "{a:?}"
        );
        assert_eq!(a.header("access-control-allow-origin"), Some("*"), "{a:?}");
        assert!(a.json().get(key).is_some(), "{a:?}");
    }
    let server = stack.http(
        &["--cacert", CA],
        &format!("https://{server_name}/.well-known/matrix/server"),
    );
    assert_eq!(server.json()["m.server"], format!("{matrix_host}:443"));

    // Closed doors: registration, the admin API, and / goes to the web client.
    let register = stack.request(
        None,
        "POST",
        &format!("{base}/_matrix/client/v3/register"),
        Some(
            &serde_json::json!({"username": "mallory", "password": "x", "auth": {"type": "m.login.dummy"}}),
        ),
    );
    assert_eq!(register.status, 403, "{register:?}");
    let admin_api = stack.http(
        &["--cacert", CA],
        &format!("{base}/_synapse/admin/v1/server_version"),
    );
    assert_eq!(admin_api.status, 404, "{admin_api:?}");
    let root = stack.http(&["--cacert", CA], &format!("{base}/"));
    assert!(matches!(root.status, 301 | 302 | 307 | 308), "{root:?}");
    assert_eq!(
        root.header("location"),
        Some("https://app.element.io"),
        "{root:?}"
    );

    // The admin logs in, creates a room, sends and reads back a message.
    let admin_password = stack.secret("secrets/admin-password");
    let token = login(&stack, &base, "admin", &admin_password).expect("admin login");
    let room = authed(
        &stack,
        &token,
        "POST",
        &format!("{base}/_matrix/client/v3/createRoom"),
        Some(&serde_json::json!({"name": "lobby"})),
    );
    assert_eq!(room.status, 200, "{room:?}");
    let room_id = room.json()["room_id"].as_str().unwrap().to_string();
    let room_path = room_id.replace('!', "%21").replace(':', "%3A");
    let sent = authed(
        &stack,
        &token,
        "PUT",
        &format!("{base}/_matrix/client/v3/rooms/{room_path}/send/m.room.message/txn1"),
        Some(&serde_json::json!({"msgtype": "m.text", "body": "hello from the appliance"})),
    );
    assert_eq!(sent.status, 200, "{sent:?}");
    let messages = authed(
        &stack,
        &token,
        "GET",
        &format!("{base}/_matrix/client/v3/rooms/{room_path}/messages?dir=b&limit=10"),
        None,
    );
    let bodies: Vec<String> = messages.json()["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["content"]["body"].as_str().map(str::to_string))
        .collect();
    assert!(
        bodies.contains(&"hello from the appliance".to_string()),
        "{messages:?}"
    );

    // matrixctl: add a user, reset the password; the new one logs in, the old one not.
    let ctl_env = [
        ("MATRIX_SYNAPSE_URL", "http://localhost:8008"),
        ("MATRIX_SYNAPSE_EXEC", ""),
    ];
    let added = stack.run_env(&ctl_env, "/usr/bin/matrixctl", &["user", "add", "alice"]);
    let first = String::from_utf8_lossy(&added.stdout)
        .lines()
        .last()
        .unwrap_or("")
        .trim()
        .to_string();
    assert!(
        login(&stack, &base, "alice", &first).is_ok(),
        "matrixctl user add did not print a working password: {first:?}"
    );
    let listed = String::from_utf8_lossy(
        &stack
            .run_env(&ctl_env, "/usr/bin/matrixctl", &["user", "list"])
            .stdout,
    )
    .into_owned();
    assert!(
        listed.contains(&format!("@alice:{server_name}")),
        "{listed}"
    );
    let reset = stack.run_env(
        &ctl_env,
        "/usr/bin/matrixctl",
        &["user", "reset-password", "alice"],
    );
    let second = String::from_utf8_lossy(&reset.stdout)
        .lines()
        .last()
        .unwrap_or("")
        .trim()
        .to_string();
    assert_ne!(first, second);
    assert!(
        login(&stack, &base, "alice", &second).is_ok(),
        "the new password does not log in"
    );
    assert_eq!(
        login(&stack, &base, "alice", &first),
        Err(403),
        "the old password still logs in"
    );
}

#[test]
fn round_trip_through_nginx() {
    round_trip_through("nginx");
}

/// Issue 15: `federation = false`, an isolated server. Clients work through
/// the proxy; the federation and key endpoints answer 404 through it and from
/// Synapse itself (no listener serves them), and the server name delegates
/// nothing (no /.well-known/matrix/server).
fn isolated_through(proxy: &str) {
    let (stack, server_name, matrix_host) = boot_behind(proxy, &[("federation", "false")]);
    let base = format!("https://{matrix_host}");
    let get = |url: &str| stack.http(&["--cacert", CA], url);

    let versions = get(&format!("{base}/_matrix/client/versions"));
    assert_eq!(versions.status, 200, "{versions:?}");
    let admin_password = stack.secret("secrets/admin-password");
    assert!(login(&stack, &base, "admin", &admin_password).is_ok());
    for path in ["/_matrix/federation/v1/version", "/_matrix/key/v2/server"] {
        let a = get(&format!("{base}{path}"));
        assert_eq!(a.status, 404, "{path} through {proxy}: {a:?}");
        // The proxy's own 404: the request never reached Synapse.
        assert!(
            !a.body.contains("M_UNRECOGNIZED"),
            "{path} was proxied: {a:?}"
        );
        let direct = stack.http(&[], &format!("http://localhost:8008{path}"));
        assert_eq!(direct.status, 404, "{path} from Synapse: {direct:?}");
    }
    let server = get(&format!("https://{server_name}/.well-known/matrix/server"));
    assert_eq!(server.status, 404, "{server:?}");
    let client = get(&format!("https://{server_name}/.well-known/matrix/client"));
    assert_eq!(client.status, 200, "{client:?}");
    assert_eq!(
        client.json()["m.homeserver"]["base_url"],
        format!("https://{matrix_host}")
    );
}

#[test]
fn an_isolated_server_serves_clients_and_no_federation_through_nginx() {
    isolated_through("nginx");
}

#[test]
fn an_isolated_server_serves_clients_and_no_federation_through_caddy() {
    isolated_through("caddy");
}

#[test]
fn an_isolated_server_serves_clients_and_no_federation_through_traefik() {
    isolated_through("traefik");
}

/// Issue 3, proof 3: two homeservers, each delegating through its own
/// .well-known on 443, federate: a user of one joins a room on the other and
/// messages go both ways. Each stack has its own network namespace; a veth
/// pair joins them, and each /etc/hosts names the other's hosts.
#[test]
fn two_homeservers_federate_through_nginx() {
    federate("nginx");
}

#[test]
fn two_homeservers_federate_through_caddy() {
    federate("caddy");
}

#[test]
fn two_homeservers_federate_through_traefik() {
    federate("traefik");
}

fn federate(proxy: &str) {
    let project = Project::copy_of_repo();
    let net = 60 + (std::process::id() % 150);
    let addr = |i: u32| format!("10.77.{net}.{i}");
    let (a_name, b_name) = server_names();
    let (a_host, b_host) = (format!("matrix.{a_name}"), format!("matrix.{b_name}"));
    let mut a = prepare(
        &project,
        &[
            ("server_name", &a_name),
            ("proxy", proxy),
            ("tls_mode", "internal"),
        ],
    );
    let mut b = prepare(
        &project,
        &[
            ("server_name", &b_name),
            ("proxy", proxy),
            ("tls_mode", "internal"),
        ],
    );

    let (va, vb) = (format!("{}a", a.netns), format!("{}b", b.netns));
    for cmd in [
        vec!["link", "add", &va, "type", "veth", "peer", "name", &vb],
        vec!["link", "set", &va, "netns", &a.netns],
        vec!["link", "set", &vb, "netns", &b.netns],
    ] {
        assert!(
            exec::command("ip").args(&cmd).status().unwrap().success(),
            "ip {cmd:?}"
        );
    }
    for (ns, dev, ip) in [(&a.netns, &va, addr(1)), (&b.netns, &vb, addr(2))] {
        for cmd in [
            vec!["addr", "add", &format!("{ip}/24"), "dev", dev],
            vec!["link", "set", dev, "up"],
        ] {
            let mut full = vec!["netns", "exec", ns, "ip"];
            full.extend(cmd.iter().copied());
            assert!(
                exec::command("ip").args(&full).status().unwrap().success(),
                "ip {full:?}"
            );
        }
    }
    a.names = vec![a_name.clone(), a_host.clone()];
    b.names = vec![b_name.clone(), b_host.clone()];
    a.write_hosts(&[(addr(2), b_name.clone()), (addr(2), b_host.clone())]);
    b.write_hosts(&[(addr(1), a_name.clone()), (addr(1), a_host.clone())]);

    // Each proxy and its certificate unit first (they need no Synapse), so
    // each Synapse can trust the other's internal CA from its start.
    start_proxy_units(&mut a, &a_host);
    start_proxy_units(&mut b, &b_host);
    // Test-only Synapse settings, as conf.d fragments (the appliance's
    // mechanism for settings made at run time): the peers sit on a private
    // range Synapse refuses by default, and each trusts the other's CA.
    for (me, peer) in [(&a, &b), (&b, &a)] {
        std::fs::copy(
            peer.state.join("proxy/internal-ca.crt"),
            me.state.join("synapse/conf.d/peer-ca.pem"),
        )
        .unwrap();
        let fragment = format!(
            "ip_range_whitelist: [\"10.77.{net}.0/24\"]\nfederation_custom_ca_list: [/var/lib/matrix/synapse/conf.d/peer-ca.pem]\n"
        );
        std::fs::write(
            me.state.join("synapse/conf.d/90-test-federation.yaml"),
            fragment,
        )
        .unwrap();
    }
    for stack in [&mut a, &mut b] {
        stack.start_synapse();
        stack.firstboot("admin-user");
    }
    wait_for_proxy(&mut a, &a_host);
    wait_for_proxy(&mut b, &b_host);

    let (a_base, b_base) = (format!("https://{a_host}"), format!("https://{b_host}"));
    let a_token = login(&a, &a_base, "admin", &a.secret("secrets/admin-password")).unwrap();
    let b_token = login(&b, &b_base, "admin", &b.secret("secrets/admin-password")).unwrap();

    // beta's admin opens a public room with an alias; alpha's admin joins it by alias.
    let room = authed(
        &b,
        &b_token,
        "POST",
        &format!("{b_base}/_matrix/client/v3/createRoom"),
        Some(
            &serde_json::json!({"preset": "public_chat", "room_alias_name": "lobby", "name": "lobby"}),
        ),
    );
    assert_eq!(room.status, 200, "{room:?}");
    let room_id = room.json()["room_id"].as_str().unwrap().to_string();
    let alias = format!("%23lobby%3A{b_name}");
    let joined = authed(
        &a,
        &a_token,
        "POST",
        &format!("{a_base}/_matrix/client/v3/join/{alias}"),
        Some(&serde_json::json!({})),
    );
    assert_eq!(
        joined.status,
        200,
        "alpha could not join #lobby:{b_name}: {joined:?}\n{}",
        a.log("synapse")
    );
    assert_eq!(joined.json()["room_id"], room_id);

    let path = room_id.replace('!', "%21").replace(':', "%3A");
    let send = |stack: &Stack, base: &str, token: &str, txn: &str, body: &str| {
        let a = authed(
            stack,
            token,
            "PUT",
            &format!("{base}/_matrix/client/v3/rooms/{path}/send/m.room.message/{txn}"),
            Some(&serde_json::json!({"msgtype": "m.text", "body": body})),
        );
        assert_eq!(a.status, 200, "{a:?}");
    };
    let sees = |stack: &Stack, base: &str, token: &str, body: &str| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let m = authed(
                stack,
                token,
                "GET",
                &format!("{base}/_matrix/client/v3/rooms/{path}/messages?dir=b&limit=20"),
                None,
            );
            if m.status == 200 && m.body.contains(body) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{body:?} never arrived at {base}: {m:?}"
            );
            std::thread::sleep(std::time::Duration::from_millis(500));
        }
    };
    send(&a, &a_base, &a_token, "a1", "hello beta, from alpha");
    sees(&b, &b_base, &b_token, "hello beta, from alpha");
    send(&b, &b_base, &b_token, "b1", "hello alpha, from beta");
    sees(&a, &a_base, &a_token, "hello alpha, from beta");
}

#[test]
fn round_trip_through_caddy() {
    round_trip_through("caddy");
}

#[test]
fn round_trip_through_traefik() {
    round_trip_through("traefik");
}

/// Issue 3, proof 1: Synapse's own config checker accepts the rendered
/// homeserver.yaml (with the conf.d directory and the secrets first boot
/// makes), for default and non-default values.
#[test]
fn synapse_config_check_accepts_the_rendered_homeserver_yaml() {
    let project = Project::copy_of_repo();
    let (name, _) = server_names();
    for values in [
        vec![("server_name", name.as_str())],
        vec![
            ("server_name", name.as_str()),
            ("url_previews", "true"),
            ("max_upload_size", "2G"),
            ("podman_subnet", "10.99.0.0/24"),
        ],
        vec![("server_name", name.as_str()), ("federation", "false")],
    ] {
        let stack = Stack::new(&project, &values);
        stack.tmpfiles();
        stack.firstboot("secrets");
        stack.firstboot("signing-key");
        let o = stack.run(
            "python3",
            &[
                "-m",
                "synapse.config",
                "-c",
                "/usr/share/matrix-appliance/synapse/homeserver.yaml",
                "-c",
                "/var/lib/matrix/synapse/conf.d",
            ],
        );
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(
            out.contains("Config parses OK"),
            "{out}\n{}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

/// Issue 13 (database safety): after a rollback to an older version whose
/// Synapse cannot use the database a newer one migrated, the dump the older
/// version took before the update is restored before Synapse starts; while
/// the database still suits it, nothing is touched. `appliance-update` runs
/// as its units do, against this stack's PostgreSQL and Synapse.
#[test]
fn a_rolled_back_version_gets_back_the_databases_it_left_when_a_newer_synapse_moved_them_on() {
    let project = Project::copy_of_repo();
    let mut stack = boot(&project, &[("server_name", "rollback.example.net")]);
    let updater = "/usr/libexec/matrix-appliance/appliance-update";
    let env = [
        (
            "MATRIX_PG_EXEC",
            "env PGHOST=127.0.0.1 PGPASSFILE=/var/lib/matrix/test-superuser.pgpass",
        ),
        ("MATRIX_SYSTEMCTL", ""),
        ("MATRIX_IMAGE_VERSION", "1.0"),
    ];
    let synapse_sql = |stack: &Stack, query: &str| stack.sql_in("synapse", query);
    // Version 1.0 passed its health gate: the schema its Synapse runs is recorded.
    stack.run_env(&env, updater, &["record-schema"]);
    let ours = fs::read_to_string(stack.state.join("update/schema-1.0")).unwrap();
    assert_eq!(
        ours.trim(),
        synapse_sql(&stack, "SELECT version FROM schema_version")
    );
    let ours: u32 = ours.trim().parse().unwrap();

    let base = "http://localhost:8008";
    let token = login(
        &stack,
        base,
        "admin",
        &stack.secret("secrets/admin-password"),
    )
    .expect("admin login");
    let room = authed(
        &stack,
        &token,
        "POST",
        &format!("{base}/_matrix/client/v3/createRoom"),
        Some(&serde_json::json!({"name": "rollback"})),
    );
    let room_id = room.json()["room_id"].as_str().unwrap().to_string();
    let room_path = room_id.replace('!', "%21").replace(':', "%3A");
    let send = |stack: &Stack, txn: &str, body: &str| {
        let sent = authed(
            stack,
            &token,
            "PUT",
            &format!("{base}/_matrix/client/v3/rooms/{room_path}/send/m.room.message/{txn}"),
            Some(&serde_json::json!({"msgtype": "m.text", "body": body})),
        );
        assert_eq!(sent.status, 200, "{sent:?}");
    };
    let bodies = |stack: &Stack| -> Vec<String> {
        let m = authed(
            stack,
            &token,
            "GET",
            &format!("{base}/_matrix/client/v3/rooms/{room_path}/messages?dir=b&limit=20"),
            None,
        );
        m.json()["chunk"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|e| e["content"]["body"].as_str().map(str::to_string))
            .collect()
    };
    send(&stack, "t1", "sent before the update");

    // The update: 1.0 dumps every database first (as `matrixctl update apply`).
    stack.stop("synapse");
    stack.run_env(&env, updater, &["dump"]);
    let info = fs::read_to_string(stack.state.join("update/dumps/1.0/INFO")).unwrap();
    assert!(info.contains("version=1.0\n"), "{info}");
    assert!(info.contains("synapse"), "{info}");
    stack.start_synapse();
    send(&stack, "t2", "sent after the update");

    // Back on 1.0 with a database it can use: nothing is restored.
    stack.stop("synapse");
    let o = stack.run_env(&env, updater, &["restore-if-needed"]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("nothing to restore"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    stack.start_synapse();
    let now = bodies(&stack);
    assert!(
        now.contains(&"sent after the update".to_string()),
        "{now:?}"
    );

    // A newer Synapse moved the database beyond 1.0's schema: 1.0 gets back
    // the databases it left, the newer ones dumped aside.
    stack.stop("synapse");
    synapse_sql(
        &stack,
        &format!(
            "UPDATE schema_compat_version SET compat_version = {}",
            ours + 1
        ),
    );
    let o = stack.run_env(&env, updater, &["restore-if-needed"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("restored the databases as 1.0 left them"),
        "{out}"
    );
    assert!(
        synapse_sql(&stack, "SELECT compat_version FROM schema_compat_version")
            .parse::<u32>()
            .unwrap()
            <= ours
    );
    let collation = stack
        .sql("SELECT datcollate || ' ' || datctype FROM pg_database WHERE datname = 'synapse'");
    assert_eq!(collation, "C C");
    let aside: Vec<_> = fs::read_dir(stack.state.join("update/dumps"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("replaced-"))
        .collect();
    assert_eq!(aside.len(), 1, "the newer databases were not dumped aside");
    assert!(aside[0].path().join("synapse.dump").is_file());
    stack.start_synapse();
    let now = bodies(&stack);
    assert!(
        now.contains(&"sent before the update".to_string()),
        "{now:?}"
    );
    assert!(
        !now.contains(&"sent after the update".to_string()),
        "{now:?}"
    );
    // A second run finds the restore done: nothing more happens.
    stack.stop("synapse");
    let o = stack.run_env(&env, updater, &["restore-if-needed"]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("nothing to restore"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
}
