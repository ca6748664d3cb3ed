//! The `minimal` profile built at the tests' fixed epoch is exactly the
//! committed one: its file listing (`builder inspect --files`: every file's
//! type, mode, owner, size and hash) and every digest (layers' diff_ids and
//! blobs, the bundle). Two builds agreeing with each other would not notice a
//! new flate2, zlib-rs or tar writer changing the output for everyone; this
//! does. An intended change: `cargo xtask pin-minimal` writes the new pin.

mod common;

use std::fs;
use std::path::Path;

use common::{assert_exit, json, stdout, Project};

const PIN: &str = "tests/fixtures/minimal-pinned.txt";

/// The listing and digests of `minimal` built in a fresh copy of the project.
fn pinned_text() -> String {
    let p = Project::copy_of_repo();
    let o = p.builder(&["build", "--profile", "minimal"]);
    assert_exit(&o, 0);
    let bundle = p.out().join("minimal.bundle.tar");
    let bundle = bundle.to_str().unwrap();
    let listing = p.builder(&["inspect", "--files", bundle]);
    assert_exit(&listing, 0);
    let listing = stdout(&listing);
    // The first line names the bundle's temporary path.
    let (_, listing) = listing.split_once('\n').unwrap();
    let report = json(&p.builder(&["inspect", "--json", bundle]));
    let mut text =
        String::from("# `builder build --profile minimal` at SOURCE_DATE_EPOCH=1700000000\n");
    text += listing;
    text += "digests\n";
    let sums = fs::read_to_string(p.out().join("SHA256SUMS")).unwrap();
    for line in sums.lines().filter(|l| l.ends_with(".bundle.tar")) {
        text += &format!("  bundle {}\n", line.split_whitespace().next().unwrap());
    }
    for layer in report["manifest"]["layers"].as_array().unwrap() {
        text += &format!(
            "  layer {} diff_id {} blob {}\n",
            layer["name"].as_str().unwrap(),
            layer["diff_id"].as_str().unwrap(),
            layer["digest"].as_str().unwrap()
        );
    }
    text
}

#[test]
fn the_minimal_profile_at_a_fixed_epoch_is_the_pinned_one() {
    let now = pinned_text();
    let pin = Path::new(env!("CARGO_MANIFEST_DIR")).join(PIN);
    if std::env::var_os("BUILDER_WRITE_PIN").is_some() {
        fs::write(&pin, &now).unwrap();
        eprintln!("wrote {}", pin.display());
        return;
    }
    let pinned = fs::read_to_string(&pin)
        .unwrap_or_else(|e| panic!("{}: {e} (cargo xtask pin-minimal writes it)", pin.display()));
    assert!(
        now.lines().filter(|l| l.contains("sha256:")).count() > 10,
        "too few hashes in the listing:\n{now}"
    );
    if now != pinned {
        let diff: Vec<String> = pinned
            .lines()
            .zip(now.lines())
            .filter(|(a, b)| a != b)
            .map(|(a, b)| format!("- {a}\n+ {b}"))
            .collect();
        panic!(
            "the minimal profile's output differs from {PIN} (first differences below). \
             If the change is intended (a layer or the builder changed on purpose), run \
             `cargo xtask pin-minimal` and commit the file; if not, something changed the \
             output silently (a dependency's compression or archive writer?).\n{}",
            diff.into_iter().take(20).collect::<Vec<_>>().join("\n")
        );
    }
}
