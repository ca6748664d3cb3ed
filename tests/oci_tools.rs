//! The bundle is a real OCI image archive: skopeo copies it (checking every
//! digest on the way) and umoci unpacks it to the same tree that
//! `builder render` writes. CI installs both tools (.ci/run).

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

fn tool(name: &str) -> String {
    let found = exec::command("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .output()
        .unwrap();
    assert!(
        found.status.success(),
        "{name} is not installed; install it with `apt-get install {name}` (.ci/run does)"
    );
    String::from_utf8(found.stdout).unwrap().trim().to_string()
}

fn run(cmd: &mut Command) -> String {
    let o = cmd.output().unwrap();
    assert!(
        o.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        stdout(&o),
        stderr(&o)
    );
    stdout(&o)
}

/// Every entry of a tree on disk, sorted: path, type, mode, owner and group,
/// symlink target, and the SHA-256 of a regular file's bytes.
fn listing(root: &Path) -> Vec<String> {
    let out = run(exec::command("find")
        .arg(".")
        .arg("-mindepth")
        .arg("1")
        .arg("-printf")
        .arg("%p %y %m %U:%G ->%l\n")
        .current_dir(root));
    let mut lines: Vec<String> = out
        .lines()
        .map(|l| {
            let path = l.split(' ').next().unwrap();
            let full = root.join(path);
            let content = if full.is_file() && !full.is_symlink() {
                use sha2::Digest as _;
                hex::encode(sha2::Sha256::digest(std::fs::read(&full).unwrap()))
            } else {
                String::new()
            };
            format!("{l} {content}")
        })
        .collect();
    lines.sort();
    lines
}

#[test]
fn skopeo_copies_and_umoci_unpacks_the_bundle_to_the_rendered_tree() {
    let skopeo = tool("skopeo");
    let umoci = tool("umoci");
    let p = Project::copy_of_repo();
    let o = p.builder(&[
        "build",
        "--profile",
        "vps",
        "--set",
        "server_name=oci.example.net",
    ]);
    assert_exit(&o, 0);
    let bundle = p.out().join("vps.bundle.tar");

    let inspect = run(exec::command(&skopeo)
        .arg("inspect")
        .arg(format!("oci-archive:{}", bundle.display())));
    let v: serde_json::Value = serde_json::from_str(&inspect).unwrap();
    let ours = json(&p.builder(&["inspect", "--json", bundle.to_str().unwrap()]));
    let blob_digests: Vec<&serde_json::Value> = ours["manifest"]["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| &l["digest"])
        .collect();
    assert_eq!(
        v["Layers"].as_array().unwrap().iter().collect::<Vec<_>>(),
        blob_digests
    );

    let layout = p.dir.path().join("layout");
    run(exec::command(&skopeo)
        .arg("copy")
        .arg(format!("oci-archive:{}", bundle.display()))
        .arg(format!("oci:{}:vps", layout.display())));
    let unpacked = p.dir.path().join("unpacked");
    run(exec::command(&umoci)
        // As root: the owners in the bundle's layers are applied, not mapped.
        .arg("unpack")
        .arg("--image")
        .arg(format!("{}:vps", layout.display()))
        .arg(&unpacked));

    // The bundle's tree: without the disk image's own layer.
    let o = p.builder(&[
        "render",
        "--profile",
        "vps",
        "--output",
        "bundle",
        "--set",
        "server_name=oci.example.net",
        "--out",
        "rendered",
    ]);
    assert_exit(&o, 0);
    let rendered = listing(&p.root().join("rendered"));
    assert!(rendered.len() > 10);
    // Not only directories: files with their contents' hashes are compared.
    assert!(
        rendered.iter().filter(|l| l.contains(" f ")).count() > 10,
        "{rendered:#?}"
    );
    assert_eq!(listing(&unpacked.join("rootfs")), rendered);
}
