//! The bridges (issue 6), from the bundle's own rendered files: first boot's
//! registrations are loaded by real Synapse (PyPI, the pinned version) on
//! real PostgreSQL 17, and Synapse reaches each bridge. mautrix-telegram is
//! the real bridge (PyPI, the local image's lock), run from its rendered
//! config: Synapse pings it and its bot answers `help`. mautrix-whatsapp and
//! mautrix-signal are Go programs this machine cannot fetch: a stand-in HTTP
//! appservice (tests/fixtures/standin-appservice.py, named as such) answers
//! for them, and their rendered configs are checked against the keys and
//! types of the pinned versions' example configs.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::stack::{prepare, render_vps, server_names, unit_section, words, Answer, Stack};
use common::*;
use serde_json::json;
use serde_yaml::Value as Yaml;

/// Test-only Telegram app credentials (well-formed, not a real app).
const TELEGRAM_API_ID: &str = "1234567";
const TELEGRAM_API_HASH: &str = "0123456789abcdef0123456789abcdef";

const SYNAPSE: &str = "http://localhost:8008";

fn values<'a>(server_name: &'a str, bridges: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("server_name", server_name),
        ("bridges", bridges),
        ("telegram_api_id", TELEGRAM_API_ID),
        ("telegram_api_hash", TELEGRAM_API_HASH),
    ]
}

fn yaml_file(path: &Path) -> Yaml {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}\n{text}", path.display()))
}

/// The registration Synapse reads for bridge `name`.
fn registration(stack: &Stack, name: &str) -> Yaml {
    yaml_file(&stack.state.join(format!("synapse/appservices/{name}.yaml")))
}

/// The registration files conf.d/40-appservices.yaml lists, as Synapse sees them.
fn listed(stack: &Stack) -> Vec<String> {
    let list = yaml_file(&stack.state.join("synapse/conf.d/40-appservices.yaml"));
    list["app_service_config_files"]
        .as_sequence()
        .expect("app_service_config_files is a list")
        .iter()
        .map(|f| f.as_str().unwrap().to_string())
        .collect()
}

/// Runs the bridge unit's `ExecStartPre=` (database, config and registration
/// in /data) as systemd would before starting the container.
fn prepare_bridge(stack: &Stack, name: &str) {
    let quadlet = stack.rendered.join(format!(
        "usr/share/containers/systemd/matrix-bridge-{name}.container"
    ));
    let service = unit_section(&quadlet, "[Service]");
    let env = stack.firstboot_env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    for pre in &service["ExecStartPre"] {
        let argv = words(pre);
        let args: Vec<&str> = argv[1..].iter().map(String::as_str).collect();
        stack.run_env(&env, &argv[0], &args);
    }
}

fn synapse(
    stack: &Stack,
    token: &str,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> Answer {
    stack.request(Some(token), method, &format!("{SYNAPSE}{path}"), body)
}

/// Synapse's appservice ping, as the appservice `name` asks for it with its
/// as_token: Synapse then calls the appservice's /_matrix/app/v1/ping.
fn ping(stack: &Stack, name: &str, as_token: &str) -> Answer {
    synapse(
        stack,
        as_token,
        "POST",
        &format!("/_matrix/client/v1/appservice/{name}/ping"),
        Some(&json!({"transaction_id": format!("test-{name}")})),
    )
}

fn wait_until(
    what: &str,
    timeout: Duration,
    stack: &mut Stack,
    mut done: impl FnMut(&Stack) -> bool,
) {
    let start = Instant::now();
    loop {
        if done(stack) {
            return;
        }
        for (name, child) in &mut stack.children {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("{name} exited ({status}) while waiting for {what}");
            }
        }
        assert!(start.elapsed() < timeout, "{what}: not after {timeout:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Where `cargo xtask tools` installed mautrix-telegram for the root's Python.
fn telegram_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("BUILDER_TELEGRAM_DIR") {
        return PathBuf::from(dir);
    }
    let tools = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tools");
    fs::read_dir(&tools)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("mautrix-telegram-")
                && p.join(".complete").exists()
        })
        .unwrap_or_else(|| {
            panic!(
                "no mautrix-telegram under {}: run `cargo xtask tools`",
                tools.display()
            )
        })
}

/// Starts mautrix-telegram as the local image runs it (its recipe's `cmd`
/// and `working_dir`), with /data = the state the quadlet mounts there.
fn start_telegram(stack: &mut Stack) {
    let recipe: toml::Table = toml::from_str(
        &fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("images/local/telegram/recipe.toml"),
        )
        .unwrap(),
    )
    .unwrap();
    let config = recipe["config"].as_table().unwrap();
    let cmd: Vec<&str> = config["cmd"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let workdir = config["working_dir"].as_str().unwrap();
    let q = stack.quadlet("matrix-bridge-telegram.container");
    let mut binds = stack.volume_binds(&q);
    binds.push((telegram_dir(), "/opt/mautrix-telegram".into()));
    let script = format!("cd {workdir} && exec \"$@\"");
    let mut args = vec!["-c", script.as_str(), "sh"];
    args.extend(cmd);
    stack.spawn(
        "telegram",
        &binds,
        &[("PYTHONPATH", "/opt/mautrix-telegram")],
        "sh",
        &args,
    );
}

fn login_admin(stack: &Stack) -> String {
    let password = stack.secret("secrets/admin-password");
    let body = json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "admin"}, "password": password});
    let a = stack.request(
        None,
        "POST",
        &format!("{SYNAPSE}/_matrix/client/v3/login"),
        Some(&body),
    );
    assert_eq!(a.status, 200, "{a:?}");
    a.json()["access_token"].as_str().unwrap().to_string()
}

/// Messages of `room` newest first: (sender, body).
fn messages(stack: &Stack, token: &str, room: &str) -> Vec<(String, String)> {
    let a = synapse(
        stack,
        token,
        "GET",
        &format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=50"),
        None,
    );
    assert_eq!(a.status, 200, "{a:?}");
    a.json()["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "m.room.message")
        .map(|e| {
            (
                e["sender"].as_str().unwrap_or("").to_string(),
                e["content"]["body"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

#[test]
fn synapse_loads_every_bridge_registration_and_reaches_each_bridge() {
    let project = Project::copy_of_repo();
    let server_name = server_names().0;
    let mut stack = prepare(&project, &values(&server_name, "whatsapp,telegram,signal"));
    stack.firstboot("appservices");

    // Three registrations, listed for Synapse, each with its own fresh tokens.
    let names = ["signal", "telegram", "whatsapp"];
    let expected: Vec<String> = names
        .iter()
        .map(|n| format!("/var/lib/matrix/synapse/appservices/{n}.yaml"))
        .collect();
    assert_eq!(listed(&stack), expected);
    let mut tokens = Vec::new();
    for name in names {
        let path = stack.state.join(format!("synapse/appservices/{name}.yaml"));
        let text = fs::read_to_string(&path).unwrap();
        assert!(
            !text.contains("__MATRIX_"),
            "{name}: a placeholder is left:\n{text}"
        );
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o640,
            "{name}"
        );
        let r = registration(&stack, name);
        assert_eq!(r["id"].as_str(), Some(name));
        for key in ["as_token", "hs_token"] {
            let token = r[key].as_str().unwrap().to_string();
            assert!(
                token.len() >= 40 && token.chars().all(|c| c.is_ascii_alphanumeric()),
                "{name} {key}"
            );
            // Never in the image: the rendered template holds only the placeholder.
            let template = stack.rendered.join(format!(
                "usr/share/matrix-appliance/bridges/{name}/registration.yaml"
            ));
            assert!(!fs::read_to_string(template).unwrap().contains(&token));
            tokens.push(token);
        }
        for ns in r["namespaces"]["users"].as_sequence().unwrap() {
            assert_eq!(ns["exclusive"].as_bool(), Some(true), "{name}: {ns:?}");
        }
    }
    let distinct: std::collections::BTreeSet<&String> = tokens.iter().collect();
    assert_eq!(distinct.len(), tokens.len(), "every token is different");

    // Synapse starts with all three (it refuses invalid or clashing ones: see below).
    stack.start_synapse();
    stack.firstboot("admin-user");

    // mautrix-telegram, for real: its database, config and registration, then the bridge.
    prepare_bridge(&stack, "telegram");
    assert_eq!(
        stack.sql("SELECT pg_get_userbyid(datdba) || ' ' || datcollate || ' ' || datctype FROM pg_database WHERE datname = 'telegram'"),
        "telegram C C"
    );
    let data = stack.state.join("bridges/telegram/data");
    let config = fs::read_to_string(data.join("config.yaml")).unwrap();
    assert!(!config.contains("__MATRIX_"));
    assert_eq!(
        fs::metadata(data.join("config.yaml"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    start_telegram(&mut stack);
    let telegram = registration(&stack, "telegram");
    let as_token = telegram["as_token"].as_str().unwrap().to_string();
    // The bridge pings itself through Synapse once it is up; so do we.
    wait_until(
        "Synapse's ping of mautrix-telegram",
        Duration::from_secs(120),
        &mut stack,
        |s| ping(s, "telegram", &as_token).status == 200,
    );
    let answer = ping(&stack, "telegram", &as_token);
    assert!(answer.json()["duration_ms"].is_u64(), "{answer:?}");
    // The bot user exists, with the bridge's display name.
    let bot = format!("@telegrambot:{server_name}");
    let profile = synapse(
        &stack,
        &as_token,
        "GET",
        &format!("/_matrix/client/v3/profile/{bot}"),
        None,
    );
    assert_eq!(
        profile.status,
        200,
        "{profile:?}\n{}",
        stack.log("telegram")
    );

    // The admin invites the bot, the bot joins; `help` gets the bridge's help.
    let token = login_admin(&stack);
    let room = synapse(
        &stack,
        &token,
        "POST",
        "/_matrix/client/v3/createRoom",
        Some(&json!({"invite": [bot], "is_direct": true, "preset": "private_chat"})),
    );
    assert_eq!(room.status, 200, "{room:?}");
    let room = room.json()["room_id"].as_str().unwrap().to_string();
    wait_until(
        "the bot joining",
        Duration::from_secs(60),
        &mut stack,
        |s| {
            let m = synapse(
                s,
                &token,
                "GET",
                &format!("/_matrix/client/v3/rooms/{room}/joined_members"),
                None,
            );
            m.status == 200 && m.json()["joined"].get(&bot).is_some()
        },
    );
    let sent = synapse(
        &stack,
        &token,
        "PUT",
        &format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/help-1"),
        Some(&json!({"msgtype": "m.text", "body": "help"})),
    );
    assert_eq!(sent.status, 200, "{sent:?}");
    wait_until(
        "the bot's answer to help",
        Duration::from_secs(60),
        &mut stack,
        |s| {
            messages(s, &token, &room)
                .iter()
                .any(|(from, body)| *from == bot && body.contains("Show this help message"))
        },
    );

    // WhatsApp and Signal: database, config and registration as for Telegram; a stand-in
    // answers at the registration's URL, and Synapse reaches it with the hs_token.
    let standin =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/standin-appservice.py");
    for name in ["whatsapp", "signal"] {
        prepare_bridge(&stack, name);
        assert_eq!(
            stack.sql(&format!("SELECT pg_get_userbyid(datdba) || ' ' || datcollate FROM pg_database WHERE datname = '{name}'")),
            format!("{name} C")
        );
        let r = registration(&stack, name);
        let port = r["url"]
            .as_str()
            .unwrap()
            .rsplit(':')
            .next()
            .unwrap()
            .to_string();
        let log = format!("/var/lib/matrix/standin-{name}.log");
        let own = format!("/var/lib/matrix/bridges/{name}/data/registration.yaml");
        stack.spawn(
            &format!("standin-{name}"),
            &[(standin.clone(), "/opt/standin-appservice.py".into())],
            &[],
            "python3",
            &["/opt/standin-appservice.py", &port, &own, &log],
        );
        let as_token = r["as_token"].as_str().unwrap().to_string();
        wait_until(
            &format!("Synapse's ping of the {name} stand-in"),
            Duration::from_secs(60),
            &mut stack,
            |s| ping(s, name, &as_token).status == 200,
        );
        let seen = fs::read_to_string(stack.state.join(format!("standin-{name}.log"))).unwrap();
        assert!(
            seen.contains("POST /_matrix/app/v1/ping token ok"),
            "{seen}"
        );
        assert!(!seen.contains("token bad"), "{seen}");
        // Another appservice's token cannot ping this one.
        assert_ne!(
            ping(&stack, name, telegram["as_token"].as_str().unwrap()).status,
            200
        );
    }

    // The next boot: the same registrations, byte for byte, and the same list.
    let before: BTreeMap<&str, Vec<u8>> = names
        .iter()
        .map(|n| {
            (
                *n,
                fs::read(stack.state.join(format!("synapse/appservices/{n}.yaml"))).unwrap(),
            )
        })
        .collect();
    stack.firstboot("appservices");
    for (name, bytes) in &before {
        assert_eq!(
            &fs::read(stack.state.join(format!("synapse/appservices/{name}.yaml"))).unwrap(),
            bytes,
            "{name}"
        );
    }
    assert_eq!(listed(&stack), expected);
}

/// Starts Synapse with the current conf.d and expects it to refuse to start,
/// saying `why`.
fn synapse_refuses(stack: &mut Stack, label: &str, why: &str) {
    let (args, binds) = stack.synapse_command();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = stack.command(&binds, "python3", &args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success(),
        "{label}: Synapse started anyway:\n{text}"
    );
    assert!(
        text.contains(why),
        "{label}: Synapse failed, but not saying {why:?}:\n{text}"
    );
}

#[test]
fn synapse_refuses_a_duplicate_or_broken_registration() {
    let project = Project::copy_of_repo();
    let server_name = server_names().0;
    let mut stack = prepare(&project, &values(&server_name, "telegram,signal"));
    stack.firstboot("appservices");
    let dir = stack.state.join("synapse/appservices");
    let list = stack.state.join("synapse/conf.d/40-appservices.yaml");
    let telegram = fs::read_to_string(dir.join("telegram.yaml")).unwrap();

    // A second registration with the telegram one's id (and tokens).
    fs::write(dir.join("copy.yaml"), &telegram).unwrap();
    fs::write(
        &list,
        "app_service_config_files:\n  - /var/lib/matrix/synapse/appservices/telegram.yaml\n  - /var/lib/matrix/synapse/appservices/copy.yaml\n",
    )
    .unwrap();
    synapse_refuses(&mut stack, "duplicate", "Cannot reuse");

    // A registration without its hs_token.
    let broken: String = telegram
        .lines()
        .filter(|l| !l.starts_with("hs_token:"))
        .map(|l| format!("{l}\n"))
        .collect();
    fs::write(dir.join("broken.yaml"), broken).unwrap();
    fs::write(
        &list,
        "app_service_config_files:\n  - /var/lib/matrix/synapse/appservices/broken.yaml\n",
    )
    .unwrap();
    synapse_refuses(&mut stack, "no hs_token", "hs_token");

    // The generated list again: Synapse starts.
    stack.firstboot("appservices");
    stack.start_synapse();
}

#[test]
fn a_bridge_added_by_a_newer_image_is_registered_alone() {
    let project = Project::copy_of_repo();
    let server_name = server_names().0;
    let stack = Stack::new(&project, &values(&server_name, "telegram"));
    stack.tmpfiles();
    stack.firstboot("secrets");
    stack.firstboot("appservices");
    let telegram = fs::read(stack.state.join("synapse/appservices/telegram.yaml")).unwrap();
    assert_eq!(
        listed(&stack),
        ["/var/lib/matrix/synapse/appservices/telegram.yaml"]
    );

    // A newer image with one more bridge, the same /var.
    render_vps(
        &project,
        &values(&server_name, "telegram,signal"),
        &stack.rendered,
    );
    stack.firstboot("appservices");
    assert_eq!(
        fs::read(stack.state.join("synapse/appservices/telegram.yaml")).unwrap(),
        telegram
    );
    assert_eq!(
        listed(&stack),
        [
            "/var/lib/matrix/synapse/appservices/signal.yaml",
            "/var/lib/matrix/synapse/appservices/telegram.yaml"
        ]
    );
    let signal = registration(&stack, "signal");
    let telegram_reg = registration(&stack, "telegram");
    assert_ne!(signal["as_token"], telegram_reg["as_token"]);

    // An image without Telegram: its registration stays on disk, unlisted.
    render_vps(&project, &values(&server_name, "signal"), &stack.rendered);
    stack.firstboot("appservices");
    assert_eq!(
        listed(&stack),
        ["/var/lib/matrix/synapse/appservices/signal.yaml"]
    );
    assert!(stack
        .state
        .join("synapse/appservices/telegram.yaml")
        .exists());
    assert!(stack
        .state
        .join("bridges/telegram/secrets/as_token")
        .exists());
}

/// (path, type) lines of a config-keys fixture or of a YAML document.
fn keys_of_fixture(path: &Path) -> BTreeMap<String, String> {
    fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (k, t) = l.split_once('\t').unwrap();
            (k.to_string(), t.to_string())
        })
        .collect()
}

fn type_name(v: &Yaml) -> &'static str {
    match v {
        Yaml::Mapping(_) => "map",
        Yaml::Sequence(_) => "list",
        Yaml::String(_) => "str",
        Yaml::Number(n) if n.is_f64() => "float",
        Yaml::Number(_) => "int",
        Yaml::Bool(_) => "bool",
        Yaml::Null => "null",
        Yaml::Tagged(_) => "tagged",
    }
}

/// Every key path of a YAML document with its value's type, as
/// `cargo xtask config-keys` lists them.
fn keys_of_yaml(doc: &Yaml) -> BTreeMap<String, String> {
    fn walk(prefix: &str, v: &Yaml, out: &mut BTreeMap<String, String>) {
        let Yaml::Mapping(map) = v else { return };
        for (k, child) in map {
            let key = k
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| format!("{k:?}"));
            let path = if prefix.is_empty() {
                key
            } else {
                format!("{prefix}.{key}")
            };
            out.insert(path.clone(), type_name(child).to_string());
            walk(&path, child, out);
        }
    }
    let mut out = BTreeMap::new();
    walk("", doc, &mut out);
    out
}

/// Every key of `doc` must be in `upstream` with the same type, except below
/// maps whose content is the user's (permissions, double-puppet servers,
/// Python's logging dictConfig).
fn check_keys(label: &str, doc: &Yaml, upstream: &BTreeMap<String, String>, free: &[&str]) {
    let ours = keys_of_yaml(doc);
    assert!(!ours.is_empty());
    for (path, kind) in &ours {
        if free.iter().any(|f| path.starts_with(&format!("{f}."))) {
            continue;
        }
        match upstream.get(path) {
            Some(t) => assert!(
                t == kind || (t == "null" && kind == "str"),
                "{label}: {path} is {kind}, upstream {t}"
            ),
            None => panic!("{label}: {path} is not a key of the upstream example config"),
        }
    }
}

#[test]
fn rendered_bridge_configs_use_the_upstream_keys_and_types() {
    let project = Project::copy_of_repo();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("rendered");
    render_vps(
        &project,
        &values("chat.example.net", "whatsapp,telegram,signal"),
        &out,
    );
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bridge-config-keys");
    let config = |name: &str| {
        yaml_file(&out.join(format!(
            "usr/share/matrix-appliance/bridges/{name}/config.yaml"
        )))
    };

    let bridgev2_free = [
        "bridge.permissions",
        "double_puppet.servers",
        "double_puppet.secrets",
    ];
    for (name, fixture, port) in [
        ("whatsapp", "whatsapp-v0.2608.0.keys", 29318),
        ("signal", "signal-v26.02.2.keys", 29328),
    ] {
        let c = config(name);
        check_keys(
            name,
            &c,
            &keys_of_fixture(&fixtures.join(fixture)),
            &bridgev2_free,
        );
        // What the bridge checks before it starts (mautrix-go bridgev2/matrix/mxmain
        // validateConfig): nothing left at an example value.
        assert_eq!(
            c["homeserver"]["address"].as_str(),
            Some("http://matrix-synapse:8008")
        );
        assert_eq!(c["homeserver"]["domain"].as_str(), Some("chat.example.net"));
        assert_eq!(
            c["appservice"]["as_token"].as_str(),
            Some("__MATRIX_AS_TOKEN__")
        );
        assert_eq!(
            c["appservice"]["hs_token"].as_str(),
            Some("__MATRIX_HS_TOKEN__")
        );
        assert!(c["appservice"]["username_template"]
            .as_str()
            .unwrap()
            .contains("{{.}}"));
        assert_eq!(
            c["database"]["uri"].as_str().unwrap(),
            format!(
                "postgres://{name}:__MATRIX_DB_PASSWORD__@matrix-postgres/{name}?sslmode=disable"
            )
        );
        let perms = c["bridge"]["permissions"].as_mapping().unwrap();
        assert_eq!(perms.get("*").and_then(Yaml::as_str), Some("relay"));
        assert_eq!(
            perms.get("@admin:chat.example.net").and_then(Yaml::as_str),
            Some("admin")
        );
        assert_eq!(
            perms.len(),
            2,
            "the domain gets `user` only when bridge_domain_users asks"
        );
        // The registration's URL and namespaces match the config.
        let r = yaml_file(&out.join(format!(
            "usr/share/matrix-appliance/bridges/{name}/registration.yaml"
        )));
        assert_eq!(
            r["url"].as_str().unwrap(),
            format!("http://matrix-bridge-{name}:{port}")
        );
        assert_eq!(c["appservice"]["address"], r["url"]);
        assert_eq!(c["appservice"]["port"].as_u64(), Some(port));
        assert_eq!(
            r["sender_localpart"].as_str().unwrap(),
            format!("{name}bot")
        );
        let users: Vec<&str> = r["namespaces"]["users"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|n| n["regex"].as_str().unwrap())
            .collect();
        assert_eq!(
            users,
            [
                format!("^@{name}bot:chat\\.example\\.net$"),
                format!("^@{name}_.*:chat\\.example\\.net$")
            ]
        );
    }

    // Namespaces never overlap: no bridge's regex matches another bridge's users.
    let bridges = ["whatsapp", "telegram", "signal"];
    for a in bridges {
        let r = yaml_file(&out.join(format!(
            "usr/share/matrix-appliance/bridges/{a}/registration.yaml"
        )));
        for ns in r["namespaces"]["users"].as_sequence().unwrap() {
            let re = regex::Regex::new(ns["regex"].as_str().unwrap()).unwrap();
            assert!(
                re.is_match(&format!("@{a}_someone:chat.example.net"))
                    || re.is_match(&format!("@{a}bot:chat.example.net"))
            );
            for b in bridges.iter().filter(|b| **b != a) {
                for user in [
                    format!("@{b}bot:chat.example.net"),
                    format!("@{b}_someone:chat.example.net"),
                ] {
                    assert!(!re.is_match(&user), "{a}'s {re} matches {user}");
                }
            }
            assert!(
                !re.is_match(&format!("@{a}_someone:other.example.net")),
                "{a}: {re} matches another server"
            );
        }
    }

    // The check itself: a key the bridge does not know, or a value of another type, fails.
    let whatsapp = keys_of_fixture(&fixtures.join("whatsapp-v0.2608.0.keys"));
    for bad in [
        "appservice:\n    bot_username: x\n",
        "appservice:\n    port: \"29318\"\n",
    ] {
        let doc: Yaml = serde_yaml::from_str(bad).unwrap();
        let caught = std::panic::catch_unwind(|| check_keys("bad", &doc, &whatsapp, &[]));
        assert!(caught.is_err(), "check_keys accepted {bad:?}");
    }

    // Telegram: against the upstream image's version (fixture) and the local image's, from
    // the installed package itself.
    let telegram_free = [
        "bridge.permissions",
        "bridge.double_puppet_server_map",
        "bridge.login_shared_secret_map",
        "logging.formatters",
        "logging.handlers",
        "logging.loggers",
    ];
    let c = config("telegram");
    check_keys(
        "telegram 0.15.2",
        &c,
        &keys_of_fixture(&fixtures.join("telegram-v0.15.2.keys")),
        &telegram_free,
    );
    let example = yaml_file(&telegram_dir().join("mautrix_telegram/example-config.yaml"));
    let local = keys_of_yaml(&example);
    check_keys("telegram (local image)", &c, &local, &telegram_free);
    assert_eq!(
        c["telegram"]["api_id"].as_i64(),
        Some(TELEGRAM_API_ID.parse().unwrap())
    );
    assert_eq!(c["telegram"]["api_hash"].as_str(), Some(TELEGRAM_API_HASH));
    let perms = c["bridge"]["permissions"].as_mapping().unwrap();
    assert_eq!(perms.get("*").and_then(Yaml::as_str), Some("relaybot"));
    assert_eq!(perms.len(), 2);
    // The API hash is only in a root-only file of the image.
    let mode = fs::metadata(out.join("usr/share/matrix-appliance/bridges/telegram/config.yaml"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    // bridge_domain_users: the whole domain may log in.
    let mut with_domain = values("chat.example.net", "whatsapp,telegram");
    with_domain.push(("bridge_domain_users", "true"));
    render_vps(&project, &with_domain, &out);
    assert_eq!(
        config("whatsapp")["bridge"]["permissions"]["chat.example.net"].as_str(),
        Some("user")
    );
    assert_eq!(
        config("telegram")["bridge"]["permissions"]["chat.example.net"].as_str(),
        Some("full")
    );
}
