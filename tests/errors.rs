//! Bad input: each case is a clear error that names the problem, exits
//! non-zero, and writes nothing into --out.

mod common;

use common::*;

const LAYER: &str = r#"
description = "a fixture layer"
[values.server_name]
type = "server_name"
default = "example.org"
description = "name"
"#;

/// A project with one good layer `a` and a profile `p` using it.
fn fixture() -> Project {
    let p = Project::empty();
    p.write("layers/a/layer.toml", LAYER);
    p.write(
        "layers/a/root/etc/a.conf.tera",
        "name = {{ server_name | toml }}\n",
    );
    p.write(
        "profiles/p.toml",
        "description = \"fixture\"\nlayers = [\"a\"]\n",
    );
    p
}

/// Runs a build of profile `p` and checks the failure.
fn fails(p: &Project, args: &[&str], code: i32, needles: &[&str]) {
    let mut all = vec!["build", "--profile", "p"];
    all.extend_from_slice(args);
    let o = p.builder(&all);
    assert_exit(&o, code);
    let err = stderr(&o);
    for n in needles {
        assert!(err.contains(n), "missing {n:?} in:\n{err}");
    }
    assert!(p.out_files().is_empty(), "out/ has {:?}", p.out_files());
}

#[test]
fn the_fixture_itself_builds() {
    let p = fixture();
    let o = p.builder(&["build", "--profile", "p"]);
    assert_exit(&o, 0);
}

#[test]
fn injection_through_server_name_is_refused_with_exit_2() {
    // Issue 2: both were shown to pass `nginx -t` / a YAML parser unvalidated.
    let p = Project::copy_of_repo();
    for evil in [
        "example.org;\n    location /evil { return 200 \"owned\"; }\n    #",
        "example.org\nenable_registration: true",
        "example.org\n  evil_key: 1",
    ] {
        let o = p.builder(&[
            "build",
            "--profile",
            "vps",
            "--set",
            &format!("server_name={evil}"),
        ]);
        assert_exit(&o, 2);
        assert!(stderr(&o).contains("server_name = "), "{}", stderr(&o));
        assert!(p.out_files().is_empty());
    }
    p.write(
        "site.toml",
        "server_name = \"example.org\\nenable_registration: true\"\n",
    );
    let o = p.builder(&["build", "--profile", "vps", "--site", "site.toml"]);
    assert_exit(&o, 2);
    assert!(
        stderr(&o).contains("site.toml: server_name = "),
        "{}",
        stderr(&o)
    );
}

#[test]
fn unknown_profile_suggests_the_closest() {
    let p = fixture();
    let o = p.builder(&["build", "--profile", "q"]);
    assert_exit(&o, 2);
    assert!(
        stderr(&o).contains("unknown profile \"q\"; did you mean `p`?"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn unknown_value_names_the_closest_known_one() {
    fails(
        &fixture(),
        &["--set", "sever_name=x.org"],
        2,
        &["unknown site value `sever_name`; did you mean `server_name`?"],
    );
}

#[test]
fn malformed_set() {
    fails(
        &fixture(),
        &["--set", "server_name"],
        2,
        &["--set \"server_name\" is malformed", "--set name=value"],
    );
}

#[test]
fn missing_required_values_are_listed_together() {
    let p = fixture();
    p.write(
        "layers/a/layer.toml",
        &format!("{LAYER}\n[values.acme_email]\ntype = \"email\"\ndescription = \"mail\"\n[values.admin_user]\ntype = \"string\"\ndescription = \"admin\"\n"),
    );
    fails(
        &p,
        &[],
        2,
        &[
            "missing required site values",
            "acme_email: mail",
            "admin_user: admin",
        ],
    );
}

#[test]
fn unknown_layer_in_a_profile() {
    let p = fixture();
    p.write(
        "profiles/p.toml",
        "description = \"x\"\nlayers = [\"a\", \"aa\"]\n",
    );
    fails(
        &p,
        &[],
        1,
        &[
            "profile p lists layer \"aa\", which does not exist",
            "did you mean `a`?",
        ],
    );
}

#[test]
fn dependency_cycle() {
    let p = fixture();
    p.write(
        "layers/b/layer.toml",
        "description = \"b\"\nrequires = [\"c\"]\n",
    );
    p.write(
        "layers/c/layer.toml",
        "description = \"c\"\nrequires = [\"b\"]\n",
    );
    p.write(
        "profiles/p.toml",
        "description = \"x\"\nlayers = [\"a\", \"b\", \"c\"]\n",
    );
    fails(
        &p,
        &[],
        1,
        &["layers require each other in a cycle: b → c → b"],
    );
}

#[test]
fn missing_requirement_names_a_provider() {
    let p = fixture();
    p.write(
        "layers/b/layer.toml",
        "description = \"b\"\nrequires = [\"database\"]\n",
    );
    p.write(
        "layers/db/layer.toml",
        "description = \"db\"\nprovides = [\"database\"]\n",
    );
    p.write(
        "profiles/p.toml",
        "description = \"x\"\nlayers = [\"a\", \"b\"]\n",
    );
    fails(
        &p,
        &[],
        1,
        &[
            "layer b requires \"database\"",
            "add one of these layers to the profile: db",
        ],
    );
}

#[test]
fn two_layers_providing_the_same_thing() {
    let p = fixture();
    p.write(
        "layers/n/layer.toml",
        "description = \"n\"\nprovides = [\"proxy\"]\n",
    );
    p.write(
        "layers/c/layer.toml",
        "description = \"c\"\nprovides = [\"proxy\"]\n",
    );
    p.write(
        "profiles/p.toml",
        "description = \"x\"\nlayers = [\"a\", \"n\", \"c\"]\n",
    );
    fails(&p, &[], 2, &["layers n and c both provide \"proxy\""]);
}

#[test]
fn when_clauses_select_one_provider() {
    let p = fixture();
    let proxy = |name: &str| {
        format!("description = \"{name}\"\nprovides = [\"proxy\"]\n[when]\nproxy = \"{name}\"\n[values.proxy]\ntype = \"enum\"\nchoices = [\"nginx\", \"caddy\"]\ndefault = \"nginx\"\ndescription = \"which proxy\"\n")
    };
    p.write("layers/nginx/layer.toml", &proxy("nginx"));
    p.write("layers/nginx/root/etc/nginx.conf", "n\n");
    p.write("layers/caddy/layer.toml", &proxy("caddy"));
    p.write("layers/caddy/root/etc/Caddyfile", "c\n");
    p.write(
        "profiles/p.toml",
        "description = \"x\"\nlayers = [\"a\", \"nginx\", \"caddy\"]\n",
    );
    let layers_of = |args: &[&str]| -> Vec<String> {
        let mut all = vec!["build", "--profile", "p", "--json"];
        all.extend_from_slice(args);
        let o = p.builder(&all);
        assert_exit(&o, 0);
        json(&o)["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(layers_of(&[]), ["a", "nginx"]);
    assert_eq!(layers_of(&["--set", "proxy=caddy"]), ["a", "caddy"]);
    let o = p.builder(&["build", "--profile", "p", "--set", "proxy=ngnix"]);
    assert_exit(&o, 2);
    assert!(
        stderr(&o).contains("did you mean `nginx`?"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn a_template_using_an_undeclared_value() {
    let p = fixture();
    p.write(
        "layers/a/root/etc/b.yaml.tera",
        "x: 1\n{% if false %}\ny: {{ admin_password | yaml }}\n{% endif %}\n",
    );
    fails(
        &p,
        &[],
        1,
        &[
            "layers/a/root/etc/b.yaml.tera:3: the template uses `admin_password`",
            "add [values.admin_password]",
        ],
    );
}

#[test]
fn a_tera_syntax_error_names_file_and_line() {
    let p = fixture();
    p.write(
        "layers/a/root/etc/c.conf.tera",
        "line one\nline two\n{% if server_name %}\nno endif\n",
    );
    fails(
        &p,
        &[],
        1,
        &["layers/a/root/etc/c.conf.tera:", "template syntax error"],
    );
    p.write("layers/a/root/etc/c.conf.tera", "ok\n{{ server_name | }}\n");
    fails(&p, &[], 1, &["layers/a/root/etc/c.conf.tera:2:"]);
}

#[test]
fn a_layer_toml_error_names_file_and_line() {
    let p = fixture();
    p.write(
        "layers/a/layer.toml",
        "description = \"a\"\n\nrequires = [\"x\",\n",
    );
    fails(&p, &[], 1, &["layers/a/layer.toml", "line 3"]);
    p.write(
        "layers/a/layer.toml",
        "description = \"a\"\nrequiers = []\n",
    );
    fails(
        &p,
        &[],
        1,
        &["layers/a/layer.toml", "unknown field `requiers`"],
    );
}

#[test]
fn an_unreadable_file() {
    use std::os::unix::fs::PermissionsExt;
    let p = fixture();
    if is_root() {
        // Root reads any mode, so make a file whose read fails: layer.toml
        // as a link to /proc/self/mem, which cannot be read from offset 0.
        std::fs::remove_file(p.root().join("layers/a/layer.toml")).unwrap();
        std::os::unix::fs::symlink("/proc/self/mem", p.root().join("layers/a/layer.toml")).unwrap();
        fails(&p, &[], 1, &["reading ", "layers/a/layer.toml"]);
    } else {
        let path = p.root().join("layers/a/root/etc/secret");
        std::fs::write(&path, "x").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o000)).unwrap();
        fails(&p, &[], 1, &["reading ", "etc/secret"]);
    }
}

fn is_root() -> bool {
    exec::command("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

#[test]
fn special_files_are_refused() {
    let p = fixture();
    let fifo = p.root().join("layers/a/root/etc/pipe");
    assert!(exec::command("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    fails(
        &p,
        &[],
        1,
        &["etc/pipe is not a regular file, directory or symlink"],
    );
}

#[test]
fn a_symlink_pointing_outside_its_layer() {
    let p = fixture();
    std::os::unix::fs::symlink(
        "../../../../../etc/shadow",
        p.root().join("layers/a/root/etc/evil"),
    )
    .unwrap();
    fails(
        &p,
        &[],
        1,
        &[
            "etc/evil is a symlink to ../../../../../etc/shadow",
            "points outside the layer",
        ],
    );
}

#[test]
fn absolute_and_dotdot_paths_in_layer_toml() {
    let p = fixture();
    for bad in ["/etc/a.conf", "etc/../etc/a.conf"] {
        p.write(
            "layers/a/layer.toml",
            &format!("{LAYER}\n[files.\"{bad}\"]\nmode = \"0600\"\n"),
        );
        fails(
            &p,
            &[],
            1,
            &[
                "layers/a/layer.toml",
                &format!("[files.\"{bad}\"]"),
                "paths are relative to root/",
            ],
        );
    }
    p.write(
        "layers/a/layer.toml",
        &format!("{LAYER}\n[files.\"etc/typo.conf\"]\nmode = \"0600\"\n"),
    );
    fails(&p, &[], 1, &["[files.\"etc/typo.conf\"] matches no path"]);
}

#[test]
fn two_layers_writing_one_file() {
    let p = fixture();
    p.write("layers/b/layer.toml", "description = \"b\"\n");
    p.write("layers/b/root/etc/a.conf", "other\n");
    p.write(
        "profiles/p.toml",
        "description = \"x\"\nlayers = [\"a\", \"b\"]\n",
    );
    let o = p.builder(&["render", "--profile", "p", "--out", "r"]);
    assert_exit(&o, 1);
    assert!(
        stderr(&o).contains("layers a and b both write etc/a.conf"),
        "{}",
        stderr(&o)
    );
    assert!(!p.root().join("r").exists());
}

#[test]
fn conflicting_value_declarations() {
    let p = fixture();
    p.write("layers/b/layer.toml", "description = \"b\"\n[values.server_name]\ntype = \"hostname\"\ndefault = \"example.org\"\ndescription = \"n\"\n");
    p.write(
        "profiles/p.toml",
        "description = \"x\"\nlayers = [\"a\", \"b\"]\n",
    );
    fails(&p, &[], 1, &["site value server_name is declared differently in layers/a/layer.toml and layers/b/layer.toml"]);
}

#[test]
fn malformed_source_date_epoch() {
    let p = fixture();
    let o = p
        .command(&["build", "--profile", "p"])
        .env("SOURCE_DATE_EPOCH", "yesterday")
        .output()
        .unwrap();
    assert_exit(&o, 2);
    assert!(
        stderr(&o).contains("SOURCE_DATE_EPOCH=\"yesterday\" is malformed"),
        "{}",
        stderr(&o)
    );
    assert!(p.out_files().is_empty());
}

#[test]
fn profile_extends_cycle_and_unknown_output() {
    let p = fixture();
    p.write("profiles/p.toml", "description = \"x\"\nextends = \"q\"\n");
    p.write("profiles/q.toml", "description = \"y\"\nextends = \"p\"\n");
    fails(
        &p,
        &[],
        1,
        &["profiles extend each other in a cycle: p → q → p"],
    );
    p.write(
        "profiles/p.toml",
        "description = \"x\"\nlayers = [\"a\"]\noutputs = [\"bundel\"]\n",
    );
    fails(
        &p,
        &[],
        1,
        &[
            "output \"bundel\" is not an image kind",
            "did you mean `bundle`?",
        ],
    );
}

#[test]
fn usage_errors_from_clap_exit_2() {
    let p = fixture();
    let o = p.builder(&["build", "--no-such-flag"]);
    assert_exit(&o, 2);
}

#[test]
fn an_output_the_profile_does_not_make_is_a_usage_error() {
    let p = fixture();
    fails(
        &p,
        &["--output", "disk"],
        2,
        &["--output disk", "makes bundle"],
    );
}

#[test]
fn a_malformed_ssh_key_is_refused() {
    let p = Project::copy_of_repo();
    for bad in ["not-a-key", "ssh-ed25519", "ssh-ed25519 AAAA\"; rm -rf /"] {
        let o = p.builder(&[
            "build",
            "--profile",
            "vps",
            "--set",
            &format!("ssh_authorized_keys={bad}"),
        ]);
        assert_exit(&o, 2);
        assert!(
            stderr(&o).contains("ssh_authorized_keys"),
            "{bad}: {}",
            stderr(&o)
        );
    }
}

#[test]
fn the_telegram_bridge_needs_its_credentials_and_never_echoes_them() {
    let p = Project::copy_of_repo();
    // Not selected: not needed.
    let o = p.build_with("vps", &["bridges=whatsapp,signal"]);
    assert_exit(&o, 0);
    // Selected without them: both named, with what they are and why they are needed.
    let o = p.build_with("vps", &["bridges=telegram"]);
    assert_exit(&o, 2);
    let err = stderr(&o);
    for name in ["telegram_api_id", "telegram_api_hash"] {
        assert!(err.contains(&format!("  {name}: Telegram API")), "{err}");
    }
    assert!(err.contains("layer bridge-telegram needs it"), "{err}");
    // Malformed: refused, and the value is not shown.
    let bad_hash = "0123456789ABCDEFxyz";
    let o = p.build_with(
        "vps",
        &[
            "bridges=telegram",
            "telegram_api_id=0",
            &format!("telegram_api_hash={bad_hash}"),
        ],
    );
    assert_exit(&o, 2);
    let err = stderr(&o);
    assert!(
        err.contains("telegram_api_hash = (sensitive value not shown)"),
        "{err}"
    );
    assert!(
        err.contains("telegram_api_id = (sensitive value not shown)"),
        "{err}"
    );
    assert!(!err.contains(bad_hash), "{err}");
    // An unknown bridge is named with the choices.
    let o = p.build_with("vps", &["bridges=irc"]);
    assert_exit(&o, 2);
    assert!(
        stderr(&o).contains("must be one of whatsapp, telegram, signal"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn an_isolated_server_with_the_federation_port_open_is_a_usage_error() {
    let p = Project::copy_of_repo();
    for proxy in ["nginx", "caddy", "traefik"] {
        let o = p.builder(&[
            "build",
            "--profile",
            "vps",
            "--output",
            "bundle",
            "--set",
            &format!("proxy={proxy}"),
            "--set",
            "federation=false",
            "--set",
            "federation_8448=true",
        ]);
        assert_exit(&o, 2);
        let err = stderr(&o);
        assert!(
            err.contains("site values: federation_8448 = true opens a port for federation, and federation = false turns federation off"),
            "{proxy}: {err}"
        );
        assert!(p.out_files().is_empty(), "out/ has {:?}", p.out_files());
    }
}

#[test]
fn a_json_condition_needs_its_document_and_declared_values() {
    let p = fixture();
    p.write(
        "layers/a/layer.toml",
        &format!("{LAYER}[json.\"etc/doc\"]\nx = 1\n[json_when.\"etc/other\"]\nserver_name = \"x.org\"\n"),
    );
    fails(
        &p,
        &[],
        1,
        &["[json_when.\"etc/other\"] names no [json.\"etc/other\"] document"],
    );
    p.write(
        "layers/a/layer.toml",
        &format!("{LAYER}[json.\"etc/doc\"]\nx = 1\n[json_when.\"etc/doc\"]\nflag = true\n"),
    );
    fails(
        &p,
        &[],
        1,
        &["[json_when.\"etc/doc\"] uses flag, which the layer does not declare"],
    );
}

/// A tools root named by `BUILDER_TOOLS_ROOT` that is missing, or lacks
/// the disk tools, stops a disk build before anything is built, naming the
/// root, what it lacks and both ways out.
#[test]
fn a_named_tools_root_without_the_disk_tools_is_refused_first() {
    let p = Project::copy_of_repo();
    let missing = p.dir.path().join("no-such-root");
    let partial = p.dir.path().join("partial-root");
    std::fs::create_dir_all(partial.join("var/lib/dpkg")).unwrap();
    std::fs::write(
        partial.join("var/lib/dpkg/status"),
        "Package: systemd\nStatus: install ok installed\nVersion: 257\n",
    )
    .unwrap();
    for (root, needles) in [
        (
            &missing,
            &["names no directory", "no-such-root", "unset it"][..],
        ),
        (
            &partial,
            &[
                "lacks packages the disk image needs",
                "erofs-utils",
                "cargo xtask tools",
                "unset BUILDER_TOOLS_ROOT",
            ][..],
        ),
    ] {
        let o = p
            .command(&["build", "--profile", "vps", "--output", "disk"])
            .env("BUILDER_TOOLS_ROOT", root)
            .output()
            .unwrap();
        assert_exit(&o, 1);
        let err = stderr(&o);
        for n in needles {
            assert!(err.contains(n), "missing {n:?} in:\n{err}");
        }
        assert!(
            !err.contains("systemd,"),
            "an installed package named as lacking:\n{err}"
        );
        assert!(p.out_files().is_empty(), "out/ has {:?}", p.out_files());
    }
}
