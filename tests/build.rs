//! The build path through the real binary: reproducibility, caching,
//! verify, inspect, render, site files.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, UNIX_EPOCH};

use common::*;

fn build_json(p: &Project, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["build", "--profile", "vps", "--json"];
    args.extend_from_slice(extra);
    let o = p.builder(&args);
    assert_exit(&o, 0);
    json(&o)
}

/// Scrambles what a checkout's file system may differ in: modes (umask)
/// and mtimes.
fn disturb_metadata(dir: &std::path::Path, mode_bits: u32, age: u64) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let meta = fs::symlink_metadata(&path).unwrap();
        if meta.is_dir() {
            disturb_metadata(&path, mode_bits, age);
            fs::set_permissions(&path, fs::Permissions::from_mode(0o700 | mode_bits)).unwrap();
        } else if meta.is_file() {
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600 | mode_bits)).unwrap();
            let f = fs::File::options().append(true).open(&path).unwrap();
            f.set_modified(UNIX_EPOCH + Duration::from_secs(1_600_000_000 - age))
                .unwrap();
        }
    }
}

#[test]
fn two_clones_give_the_same_bundle_and_another_epoch_a_different_one() {
    let a = Project::copy_of_repo();
    let b = Project::copy_of_repo();
    disturb_metadata(&a.root().join("layers"), 0o077, 10);
    disturb_metadata(&b.root().join("layers"), 0o044, 100_000);

    let args = [
        "build",
        "--profile",
        "vps",
        "--output",
        "bundle",
        "--set",
        "server_name=chat.example.net",
        // The layers' bytes are this test's subject; tests/images.rs
        // rebuilds the local images from nothing under another umask.
        "--set",
        "pull_images=true",
    ];
    // Different umasks for the two builds, too.
    let run = |p: &Project, umask: &str| {
        let o = p.builder_with_umask(umask, &args);
        assert_exit(&o, 0);
        fs::read(p.out().join("vps.bundle.tar")).unwrap()
    };
    let bundle_a = run(&a, "077");
    let bundle_b = run(&b, "002");
    assert!(bundle_a == bundle_b, "bundles from two clones differ");

    let o = b
        .command(&args)
        .env("SOURCE_DATE_EPOCH", "1700000001")
        .output()
        .unwrap();
    assert_exit(&o, 0);
    assert_ne!(
        fs::read(b.out().join("vps.bundle.tar")).unwrap(),
        bundle_a,
        "the epoch did not change the bundle"
    );
}

#[test]
fn a_second_build_is_all_cached_and_a_value_repacks_only_its_readers() {
    let p = Project::copy_of_repo();
    let first = build_json(&p, &[]);
    let built = first["layers"].as_array().unwrap();
    // Not vacuously: a build that reported no layer must fail here.
    assert!(built.len() >= 2, "{first}");
    assert!(built.iter().all(|l| l["cached"] == false));

    let second = build_json(&p, &[]);
    let layers = second["layers"].as_array().unwrap();
    assert!(layers.len() >= 2);
    assert!(layers.iter().all(|l| l["cached"] == true), "{second}");
    assert_eq!(first["bundle_digest"], second["bundle_digest"]);

    let changed = build_json(&p, &["--set", "server_name=other.example.com"]);
    let readers = layer_readers(&p, "server_name");
    for l in changed["layers"].as_array().unwrap() {
        let name = l["name"].as_str().unwrap();
        let reads = readers.contains(&name.to_string());
        assert_eq!(
            l["cached"], !reads,
            "layer {name} (reads server_name: {reads})"
        );
    }
    let built: Vec<&str> = layers.iter().map(|l| l["name"].as_str().unwrap()).collect();
    let built_readers = built
        .iter()
        .filter(|n| readers.contains(&n.to_string()))
        .count();
    assert!(
        built_readers > 0,
        "no layer reads server_name; the test proves nothing"
    );
    assert!(
        built_readers < built.len(),
        "every layer reads server_name; the test proves nothing"
    );
}

/// The layers that declare a value, from `builder layers --json`.
fn layer_readers(p: &Project, value: &str) -> Vec<String> {
    let o = p.builder(&["layers", "--json"]);
    assert_exit(&o, 0);
    json(&o)["layers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| {
            l["values"]
                .as_array()
                .unwrap()
                .iter()
                .any(|v| v["name"] == value)
        })
        .map(|l| l["name"].as_str().unwrap().to_string())
        .collect()
}

/// Where a file's data starts in a tar.
fn data_offset(tar_path: &std::path::Path, name: &str) -> u64 {
    let mut archive = tar::Archive::new(fs::File::open(tar_path).unwrap());
    for entry in archive.entries().unwrap() {
        let entry = entry.unwrap();
        if entry.path_bytes().as_ref() == name.as_bytes() {
            return entry.raw_file_position();
        }
    }
    panic!("{name} not in {}", tar_path.display());
}

#[test]
fn verify_passes_then_fails_naming_the_layer_after_one_flipped_byte() {
    let p = Project::copy_of_repo();
    let report = build_json(&p, &[]);
    let bundle = p.out().join("vps.bundle.tar");
    let o = p.builder(&["verify", bundle.to_str().unwrap()]);
    assert_exit(&o, 0);

    let layer = &report["layers"][1];
    let name = layer["name"].as_str().unwrap();
    let digest = layer["digest"]
        .as_str()
        .unwrap()
        .strip_prefix("sha256:")
        .unwrap();
    let offset = data_offset(&bundle, &format!("blobs/sha256/{digest}"));
    let mut bytes = fs::read(&bundle).unwrap();
    bytes[offset as usize + 40] ^= 0x01;
    fs::write(&bundle, bytes).unwrap();

    let o = p.builder(&["verify", bundle.to_str().unwrap()]);
    assert_exit(&o, 1);
    assert!(
        stderr(&o).contains(&format!("layer {name}")),
        "{}",
        stderr(&o)
    );
    let o = p.builder(&["verify", "--json", bundle.to_str().unwrap()]);
    assert_exit(&o, 1);
    let v = json(&o);
    assert_eq!(v["version"], 1);
    assert_eq!(v["ok"], false);
    let failed: Vec<&str> = v["layers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["ok"] == false)
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    assert_eq!(failed, [name]);
}

#[test]
fn inspect_shows_layers_values_and_files() {
    let p = Project::copy_of_repo();
    let report = build_json(&p, &["--set", "server_name=chat.example.net"]);
    let bundle = p.out().join("vps.bundle.tar");
    let o = p.builder(&["inspect", "--json", "--files", bundle.to_str().unwrap()]);
    assert_exit(&o, 0);
    let v = json(&o);
    assert_eq!(v["version"], 1);
    assert_eq!(v["manifest"]["profile"], "vps");
    assert_eq!(v["manifest"]["epoch"], 1700000000);
    assert_eq!(v["manifest"]["values"]["server_name"], "chat.example.net");
    assert_eq!(
        v["manifest"]["values"]["matrix_host"],
        "matrix.chat.example.net"
    );
    let layers = v["manifest"]["layers"].as_array().unwrap();
    for (l, built) in layers.iter().zip(report["layers"].as_array().unwrap()) {
        assert_eq!(l["diff_id"], built["diff_id"]);
        let files = v["files"][l["name"].as_str().unwrap()].as_array().unwrap();
        assert_eq!(files.len() as u64, l["files"].as_u64().unwrap());
    }
    // The rendered config carries the value, and no file keeps a .tera name.
    let all: Vec<&serde_json::Value> = v["files"]
        .as_object()
        .unwrap()
        .values()
        .flat_map(|f| f.as_array().unwrap())
        .collect();
    assert!(all
        .iter()
        .all(|f| !f["path"].as_str().unwrap().ends_with(".tera")));
    assert!(all
        .iter()
        .any(|f| f["path"] == "usr/share/matrix-appliance/synapse/homeserver.yaml"));

    let text = p.builder(&["inspect", bundle.to_str().unwrap()]);
    assert_exit(&text, 0);
    let out = stdout(&text);
    assert!(
        out.contains("profile  vps") && out.contains("server_name = \"chat.example.net\""),
        "{out}"
    );
}

#[test]
fn the_bundle_is_an_oci_layout_and_out_has_sums() {
    let p = Project::copy_of_repo();
    build_json(&p, &[]);
    let out = p.out();
    let mut names = p.out_files();
    names.sort();
    assert_eq!(
        names,
        [
            "SHA256SUMS",
            "vps.bundle.tar",
            "vps.manifest.json",
            "well-known"
        ]
    );
    let sums = fs::read_to_string(out.join("SHA256SUMS")).unwrap();
    for line in sums.lines() {
        let (hex, name) = line.split_once("  ").unwrap();
        let bytes = fs::read(out.join(name)).unwrap();
        let digest = format!("{:x}", <sha2::Sha256 as sha2::Digest>::digest(&bytes));
        assert_eq!(hex, digest, "{name}");
    }
    let mode = fs::metadata(out.join("vps.bundle.tar"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o644);
    // Building another profile into the same directory keeps vps's lines.
    let o = p.builder(&["build", "--profile", "minimal"]);
    assert_exit(&o, 0);
    let sums = fs::read_to_string(out.join("SHA256SUMS")).unwrap();
    assert!(
        sums.contains("  vps.bundle.tar") && sums.contains("  minimal.bundle.tar"),
        "{sums}"
    );
}

#[test]
fn site_file_gives_the_same_result_as_set() {
    let p = Project::copy_of_repo();
    let with_set = build_json(
        &p,
        &[
            "--set",
            "server_name=example.net",
            "--set",
            "max_upload_size=100M",
        ],
    );
    p.write(
        "site.toml",
        "server_name = \"example.net\"\nmax_upload_size = \"100M\"\n",
    );
    let with_file = build_json(&p, &["--site", "site.toml"]);
    assert_eq!(with_set["bundle_digest"], with_file["bundle_digest"]);
    // --set wins over the file.
    let o = p.builder(&[
        "build",
        "--json",
        "--site",
        "site.toml",
        "--set",
        "server_name=x.example.net",
    ]);
    assert_exit(&o, 0);
    assert_ne!(json(&o)["bundle_digest"], with_file["bundle_digest"]);
}

#[test]
fn render_writes_the_merged_tree_with_modes() {
    let p = Project::copy_of_repo();
    let dir = p.root().join("rendered");
    let o = p.builder(&[
        "render",
        "--profile",
        "vps",
        "--set",
        "server_name=chat.example.net",
        "--out",
        "rendered",
    ]);
    assert_exit(&o, 0);
    let hs =
        fs::read_to_string(dir.join("usr/share/matrix-appliance/synapse/homeserver.yaml")).unwrap();
    let yaml: serde_yaml::Value = serde_yaml::from_str(&hs).unwrap();
    assert_eq!(yaml["server_name"], "chat.example.net");
    assert_eq!(yaml["public_baseurl"], "https://matrix.chat.example.net/");
    let tool = dir.join("usr/libexec/matrix-appliance/matrix-db-ensure");
    assert_eq!(
        fs::metadata(tool).unwrap().permissions().mode() & 0o7777,
        0o755
    );
    assert!(!dir
        .join("usr/share/containers/systemd/matrix-synapse.container.tera")
        .exists());
    // Rendering again into the now non-empty directory is refused.
    let o = p.builder(&["render", "--profile", "vps", "--out", "rendered"]);
    assert_exit(&o, 1);
    assert!(stderr(&o).contains("not empty"), "{}", stderr(&o));
}

#[test]
fn listings_name_every_profile_and_layer() {
    let p = Project::copy_of_repo();
    let o = p.builder(&["profiles"]);
    assert_exit(&o, 0);
    let out = stdout(&o);
    assert!(
        out.lines().any(|l| l.starts_with("vps ") && l.len() > 20),
        "{out}"
    );
    assert!(out.lines().any(|l| l.starts_with("minimal ")), "{out}");
    let o = p.builder(&["layers"]);
    assert_exit(&o, 0);
    let out = stdout(&o);
    assert!(
        out.contains("synapse") && out.contains("requires: postgres") && out.contains("reads: "),
        "{out}"
    );
}

#[test]
fn zero_config_build_uses_documented_defaults() {
    let p = Project::copy_of_repo();
    let o = p
        .command(&["build"])
        .env_remove("SOURCE_DATE_EPOCH")
        .output()
        .unwrap();
    assert_exit(&o, 0);
    assert_eq!(stdout(&o).trim(), "out/vps.bundle.tar");
    let o = p.builder(&["inspect", "--json", "out/vps.bundle.tar"]);
    let v = json(&o);
    assert_eq!(v["manifest"]["epoch"], 1735689600);
    assert_eq!(v["manifest"]["values"]["server_name"], "example.org");
}

#[test]
fn pack_gives_the_same_bytes_on_one_core_and_on_all() {
    // A tree spanning many 1 MiB compression chunks, with varied content.
    let p = Project::empty();
    let tree = p.dir.path().join("tree");
    let mut x: u64 = 7;
    for i in 0..40 {
        let dir = tree.join(format!("d{}", i % 5));
        fs::create_dir_all(&dir).unwrap();
        let len = 50_000 + (i * 37_000) % 400_000;
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                if i % 3 == 0 {
                    (x >> 56) as u8
                } else {
                    b"matrix synapse \n"[(x >> 60) as usize]
                }
            })
            .collect();
        fs::write(dir.join(format!("f{i}")), bytes).unwrap();
    }
    let pack = |taskset: Option<&str>| {
        let blob = p.dir.path().join("blob.tar.gz");
        let mut cmd = match taskset {
            Some(cpus) => {
                let mut c = exec::command("taskset");
                c.args(["-c", cpus, env!("CARGO_BIN_EXE_builder")]);
                c
            }
            None => exec::command(env!("CARGO_BIN_EXE_builder")),
        };
        let o = cmd
            .args([
                "pack",
                tree.to_str().unwrap(),
                "--out",
                blob.to_str().unwrap(),
                "--json",
            ])
            .env("SOURCE_DATE_EPOCH", EPOCH)
            .output()
            .unwrap();
        assert_exit(&o, 0);
        let report = json(&o);
        assert!(
            report["size"].as_u64().unwrap() > 8 << 20,
            "tree too small to span chunks"
        );
        (report["digest"].clone(), fs::read(blob).unwrap())
    };
    let (one_core, bytes) = pack(Some("0"));
    for _ in 0..3 {
        assert_eq!(
            pack(None).0,
            one_core,
            "gzip bytes depend on the core count or on scheduling"
        );
    }
    let mut tar = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&bytes[..]), &mut tar).unwrap();
    assert!(tar.len() > 8 << 20);
}

#[test]
fn well_known_documents_are_exported_as_json_made_by_serde() {
    let p = Project::copy_of_repo();
    let o = p.builder(&[
        "build",
        "--set",
        "server_name=chat.example.net",
        "--set",
        "jitsi_domain=meet.example.net",
    ]);
    assert_exit(&o, 0);
    let read = |name: &str| -> serde_json::Value {
        serde_json::from_slice(&fs::read(p.out().join("well-known/matrix").join(name)).unwrap())
            .unwrap()
    };
    assert_eq!(
        read("server"),
        serde_json::json!({"m.server": "matrix.chat.example.net:443"})
    );
    assert_eq!(
        read("client"),
        serde_json::json!({
            "m.homeserver": {"base_url": "https://matrix.chat.example.net"},
            "im.vector.riot.jitsi": {"preferredDomain": "meet.example.net"},
        })
    );
    let sums = fs::read_to_string(p.out().join("SHA256SUMS")).unwrap();
    assert!(
        sums.contains("  well-known/matrix/server\n")
            && sums.contains("  well-known/matrix/client\n"),
        "{sums}"
    );
    // The same documents are in the image, where the proxy serves them.
    let o = p.builder(&["inspect", "--json", "--files", "out/vps.bundle.tar"]);
    let files = json(&o)["files"]["well-known"].clone();
    assert!(files
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["path"] == "usr/share/matrix-appliance/well-known/matrix/client"));
}

#[test]
fn disk_only_layers_stay_out_of_the_bundle() {
    let p = Project::copy_of_repo();
    let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEXAMPLEexampleEXAMPLEexampleEXAMPLEexample admin@laptop";
    let set_key = format!("ssh_authorized_keys={key}");
    // The bundle of vps: no os-debian layer, although the value it reads is accepted.
    let o = p.builder(&["build", "--profile", "vps", "--json", "--set", &set_key]);
    assert_exit(&o, 0);
    let layers: Vec<String> = json(&o)["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap().to_string())
        .collect();
    assert!(layers.contains(&"synapse".to_string()), "{layers:?}");
    assert!(!layers.contains(&"os-debian".to_string()), "{layers:?}");
    assert!(!p.out().join("vps.raw").exists());
    // The disk image's tree has it: fstab, repart definitions, the key.
    let o = p.builder(&[
        "render",
        "--profile",
        "vps",
        "--out",
        "disk-tree",
        "--set",
        &set_key,
    ]);
    assert_exit(&o, 0);
    let tree = p.root().join("disk-tree");
    let fstab = fs::read_to_string(tree.join("etc/fstab")).unwrap();
    assert!(
        fstab.lines().any(|l| l
            .split_whitespace()
            .take(3)
            .eq(["PARTLABEL=var", "/var", "ext4"])),
        "{fstab}"
    );
    assert!(tree.join("usr/lib/repart.d/40-var.conf").is_file());
    let keys =
        fs::read_to_string(tree.join("usr/share/matrix-appliance/ssh/authorized_keys")).unwrap();
    assert!(keys.lines().any(|l| l == key), "{keys}");
    // Rendering only the bundle's tree leaves them out.
    let o = p.builder(&[
        "render",
        "--profile",
        "vps",
        "--output",
        "bundle",
        "--out",
        "bundle-tree",
    ]);
    assert_exit(&o, 0);
    assert!(!p.root().join("bundle-tree/etc/fstab").exists());
    assert!(p
        .root()
        .join("bundle-tree/usr/share/matrix-appliance/synapse/homeserver.yaml")
        .is_file());
}

#[test]
fn the_telegram_credentials_stay_out_of_the_manifest_and_the_output() {
    let p = Project::copy_of_repo();
    let hash = "5e1f0c2d3b4a59687766554433221100";
    let o = p.build_with(
        "vps",
        &[
            "bridges=telegram",
            "telegram_api_id=24681357",
            &format!("telegram_api_hash={hash}"),
        ],
    );
    assert_exit(&o, 0);
    let printed = format!("{}{}", stdout(&o), stderr(&o));
    for secret in [hash, "24681357"] {
        assert!(!printed.contains(secret), "{secret} printed:\n{printed}");
        for file in ["vps.manifest.json", "SHA256SUMS"] {
            let text = fs::read_to_string(p.out().join(file)).unwrap();
            assert!(!text.contains(secret), "{secret} in {file}");
        }
    }
    let manifest: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(p.out().join("vps.manifest.json")).unwrap())
            .unwrap();
    assert_eq!(
        manifest["values"]["bridges"],
        serde_json::json!(["telegram"])
    );
    assert!(manifest["values"].get("telegram_api_hash").is_none());
    // `inspect` shows the values the image was built with, never these.
    let shown = p.builder(&["inspect", p.out().join("vps.bundle.tar").to_str().unwrap()]);
    assert_exit(&shown, 0);
    assert!(!stdout(&shown).contains(hash));
}

/// Shell completions and the man page come from the same definitions as the
/// parser: every command is in both, bash accepts the script, and an unknown
/// shell is a usage error.
#[test]
fn completions_and_the_man_page_come_from_the_command_definitions() {
    let p = Project::copy_of_repo();
    let bash = p.builder(&["completions", "bash"]);
    assert_exit(&bash, 0);
    let script = stdout(&bash);
    let man = p.builder(&["manpage"]);
    assert_exit(&man, 0);
    let man = stdout(&man);
    assert!(
        man.starts_with(".ie") && man.contains(".TH builder 1"),
        "{man}"
    );
    for command in [
        "build", "render", "inspect", "verify", "layers", "profiles", "pack",
    ] {
        assert!(
            script.contains(command),
            "{command} not completed:\n{script}"
        );
        assert!(man.contains(command), "{command} not in the man page");
    }
    let checked = exec::command("bash")
        .args(["-n", "-c", &script])
        .output()
        .unwrap();
    assert!(checked.status.success(), "{}", stderr(&checked));
    let o = p.builder(&["completions", "tcsh"]);
    assert_exit(&o, 2);
    assert!(stderr(&o).contains("tcsh"), "{}", stderr(&o));
}
