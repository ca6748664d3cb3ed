//! The Debian roots whose programs the builder and its tests run, as
//! declared in `tools.toml` (embedded): the disk image's tools, the tests'
//! superset of them, and the tests' other roots. Each is built once by
//! mmdebstrap into the cache (`<cache>/tools-<name>/<key>/root`), keyed by
//! its declaration and the mirror.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::cache::{Cache, Key};
use crate::debian;
use crate::progress::Progress;

/// The declaration, as the builder was built with it.
const DECLARED: &str = include_str!("../tools.toml");

/// Bump when something not declared changes what a root holds.
const VERSION: &str = "4";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Decl {
    suite: String,
    packages: Vec<String>,
    #[serde(default)]
    extends: Option<String>,
    #[serde(default)]
    customize: Vec<String>,
}

/// One root, its `extends` resolved.
#[derive(Debug, Clone)]
pub struct RootSpec {
    pub name: String,
    pub suite: String,
    /// Every package, its own and those of the roots it extends (sorted).
    pub packages: Vec<String>,
    customize: Vec<String>,
}

fn declared() -> Result<BTreeMap<String, Decl>> {
    toml::from_str(DECLARED).context("tools.toml (embedded in the builder) does not parse")
}

/// The root `name` as tools.toml declares it.
pub fn spec(name: &str) -> Result<RootSpec> {
    let all = declared()?;
    let mut packages = BTreeSet::new();
    let mut customize = Vec::new();
    let mut seen = Vec::new();
    let mut next = Some(name.to_string());
    let mut suite = None;
    while let Some(n) = next {
        if seen.contains(&n) {
            bail!(
                "tools.toml: roots extend each other in a circle: {}",
                seen.join(" -> ")
            );
        }
        let Some(decl) = all.get(&n) else {
            let known: Vec<&String> = all.keys().collect();
            bail!("tools.toml declares no root {n:?} (it has {known:?})");
        };
        if suite.get_or_insert_with(|| decl.suite.clone()) != &decl.suite {
            bail!("tools.toml: root {name:?} extends {n:?} of another suite");
        }
        packages.extend(decl.packages.iter().cloned());
        customize.extend(decl.customize.iter().cloned());
        seen.push(n);
        next = decl.extends.clone();
    }
    Ok(RootSpec {
        name: name.to_string(),
        suite: suite.expect("one root was read"),
        packages: packages.into_iter().collect(),
        customize,
    })
}

/// The names tools.toml declares.
pub fn names() -> Result<Vec<String>> {
    Ok(declared()?.into_keys().collect())
}

/// The root `name` in the cache at `cache_dir`, built there first if
/// missing; the root's path.
pub fn ensure(cache_dir: &Path, name: &str, quiet: bool) -> Result<PathBuf> {
    let cache = Cache::open(cache_dir.to_path_buf())?;
    let mut progress = Progress::new(quiet);
    ensure_in(&cache, &spec(name)?, 0, &mut progress)
}

pub(crate) fn ensure_in(
    cache: &Cache,
    spec: &RootSpec,
    epoch: u64,
    progress: &mut Progress,
) -> Result<PathBuf> {
    let mirror = debian::mirror();
    let mut key = Key::new("builder tools root", 0);
    key.add(VERSION.as_bytes())
        .add(spec.suite.as_bytes())
        .add(mirror.as_bytes())
        .add(spec.packages.join(" ").as_bytes())
        .add(spec.customize.join("\n").as_bytes());
    let group = format!("tools-{}", spec.name);
    let dir = cache.dir_or_build(&group, &key.finish(), |dir: &Path| {
        progress.note(&format!(
            "making the {} tools root {:?} ({}) with mmdebstrap",
            spec.suite,
            spec.name,
            spec.packages.join(", ")
        ));
        let root = dir.join("root");
        debian::mmdebstrap(
            &debian::Bootstrap {
                what: &format!("the tools root {:?}", spec.name),
                suite: &spec.suite,
                variant: "apt",
                packages: &spec.packages,
                hooks: spec
                    .customize
                    .iter()
                    .map(|h| format!("--customize-hook={h}"))
                    .collect(),
                target: &root,
                work: dir,
                epoch,
            },
            cache,
        )?;
        // What is inside, for the reader and for bug reports.
        let listing: String = debian::installed_packages(&root)?
            .iter()
            .map(|(p, v)| format!("{p} {v}\n"))
            .collect();
        fs::write(root.join("etc/builder-tools-packages.txt"), listing)?;
        Ok(())
    })?;
    Ok(dir.join("root"))
}

/// Which of `packages` dpkg does not list as installed in `root`.
pub(crate) fn missing_packages(root: &Path, packages: &[String]) -> Result<Vec<String>> {
    let status = root.join("var/lib/dpkg/status");
    let text = fs::read_to_string(&status).with_context(|| {
        format!(
            "{} is not a Debian root (no {})",
            root.display(),
            status.display()
        )
    })?;
    let installed: BTreeSet<&str> = text
        .split("\n\n")
        .filter(|stanza| stanza.lines().any(|l| l == "Status: install ok installed"))
        .filter_map(|stanza| stanza.lines().find_map(|l| l.strip_prefix("Package: ")))
        .collect();
    Ok(packages
        .iter()
        .filter(|p| !installed.contains(p.as_str()))
        .cloned()
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_declared_root_resolves() {
        let names = names().unwrap();
        for expected in ["disk", "tests", "postgres-next", "host"] {
            assert!(names.iter().any(|n| n == expected), "{names:?}");
        }
        for name in &names {
            let root = spec(name).unwrap();
            assert!(!root.packages.is_empty(), "{name}");
        }
    }

    #[test]
    fn the_tests_root_holds_everything_the_disk_root_does() {
        let disk = spec("disk").unwrap();
        let tests = spec("tests").unwrap();
        for p in &disk.packages {
            assert!(tests.packages.contains(p), "{p} is not in the tests' root");
        }
        assert_eq!(tests.suite, disk.suite);
        assert!(tests.packages.iter().any(|p| p == "podman"));
    }

    #[test]
    fn an_unknown_root_is_named_with_the_known_ones() {
        let err = spec("nope").unwrap_err().to_string();
        assert!(
            err.contains("no root \"nope\"") && err.contains("\"disk\""),
            "{err}"
        );
    }

    #[test]
    fn missing_packages_are_read_from_dpkg_status() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("var/lib/dpkg")).unwrap();
        fs::write(
            dir.path().join("var/lib/dpkg/status"),
            "Package: a\nStatus: install ok installed\nVersion: 1\n\n\
             Package: b\nStatus: deinstall ok config-files\nVersion: 1\n\n\
             Package: c\nStatus: install ok installed\n",
        )
        .unwrap();
        let wanted: Vec<String> = ["a", "b", "c", "d"].iter().map(|s| s.to_string()).collect();
        assert_eq!(missing_packages(dir.path(), &wanted).unwrap(), ["b", "d"]);
        let err = missing_packages(&dir.path().join("none"), &wanted).unwrap_err();
        assert!(err.to_string().contains("is not a Debian root"), "{err}");
    }
}
