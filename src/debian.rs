//! Debian roots made with mmdebstrap, for local container images, the disk
//! image's base and the tools root. Downloaded .debs are kept in the cache
//! (`<cache>/debs`, apt checks their hashes) so a rebuild needs no network.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::cache::Cache;

/// The Debian release every root is made from.
pub const SUITE: &str = "trixie";

pub const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";

/// The mirror: $BUILDER_DEBIAN_MIRROR (e.g. a snapshot.debian.org URL for
/// builds that must repeat years later), else deb.debian.org.
pub fn mirror() -> String {
    std::env::var("BUILDER_DEBIAN_MIRROR")
        .ok()
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| DEFAULT_MIRROR.to_string())
}

/// A system user (and its group) made before the packages install, so that
/// its IDs are fixed and no package takes them for its own users.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
    #[serde(default = "nologin")]
    pub shell: String,
}

fn nologin() -> String {
    "/usr/sbin/nologin".into()
}

impl User {
    /// Whether /etc/passwd can hold it: a lower-case name, absolute home and
    /// shell without `:` or a newline.
    pub fn check(&self) -> std::result::Result<(), String> {
        let ok = !self.name.is_empty()
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_".contains(&b))
            && [&self.home, &self.shell]
                .iter()
                .all(|p| p.starts_with('/') && !p.contains([':', '\n']));
        if ok {
            Ok(())
        } else {
            Err(format!(
                "user {:?} needs a lower-case name and absolute home and shell",
                self.name
            ))
        }
    }
}

/// The shell of an mmdebstrap `--essential-hook` (the root is `$1`): makes
/// `users` and writes `preseed` (path under the root → text) after the
/// Essential set, before the other packages install.
pub fn essential_hook(users: &[User], preseed: &BTreeMap<String, String>) -> String {
    let mut s = String::from("set -e\nr=$1\n");
    for u in users {
        s += &format!(
            "grep -q '^{n}:' \"$r/etc/group\" || echo '{n}:x:{g}:' >> \"$r/etc/group\"\n\
             grep -q '^{n}:' \"$r/etc/passwd\" || echo '{n}:x:{u}:{g}::{h}:{sh}' >> \"$r/etc/passwd\"\n\
             if [ -e \"$r/etc/shadow\" ]; then grep -q '^{n}:' \"$r/etc/shadow\" || echo '{n}:!*::::::' >> \"$r/etc/shadow\"; fi\n",
            n = u.name,
            u = u.uid,
            g = u.gid,
            h = u.home,
            sh = u.shell,
        );
    }
    for (path, text) in preseed {
        s += &format!(
            "mkdir -p \"$(dirname \"$r/{p}\")\"\nprintf %s {t} > \"$r/{p}\"\n",
            p = path,
            t = exec::shell_quote(text)
        );
    }
    s
}

/// One mmdebstrap run into `target` (which must not exist yet).
pub struct Bootstrap<'a> {
    /// What is being built, for messages ("the local image synapse").
    pub what: &'a str,
    /// The Debian suite ([`SUITE`] but for an image that needs a newer one).
    pub suite: &'a str,
    /// mmdebstrap's --variant (essential, apt).
    pub variant: &'a str,
    pub packages: &'a [String],
    /// Further mmdebstrap arguments (hooks).
    pub hooks: Vec<String>,
    pub target: &'a Path,
    /// A scratch directory of this build.
    pub work: &'a Path,
    pub epoch: u64,
}

/// Fails with the way to get mmdebstrap where it is missing.
pub fn require_mmdebstrap(what: &str) -> Result<()> {
    if !exec::on_path("mmdebstrap") {
        bail!(
            "{what} needs mmdebstrap, which is not installed; install it (Debian/Ubuntu: \
             apt-get install mmdebstrap)"
        );
    }
    Ok(())
}

pub fn mmdebstrap(b: &Bootstrap, cache: &Cache) -> Result<()> {
    require_mmdebstrap(b.what)?;
    let mirror = mirror();
    let debs = cache.root().join("debs");
    fs::create_dir_all(&debs).with_context(|| format!("creating {}", debs.display()))?;
    // .debs come in from the shared cache and go out to this build's own
    // directory, then into the cache one by one with a rename: a concurrent
    // build never sees half a file.
    let debs_out = b.work.join("debs-out");
    fs::create_dir_all(&debs_out)?;
    let utf8 = |p: &Path| -> Result<String> {
        Ok(exec::shell_quote(
            p.to_str().context("the cache path must be UTF-8")?,
        ))
    };
    let (debs_q, debs_out_q) = (utf8(&debs)?, utf8(&debs_out)?);
    let mut cmd = exec::command("mmdebstrap");
    cmd.arg(format!("--variant={}", b.variant))
        .args(["--mode=root", "--format=directory", "--quiet"])
        .arg(format!("--include={}", b.packages.join(",")))
        .arg("--skip=essential/unlink")
        .arg("--setup-hook=mkdir -p \"$1\"/var/cache/apt/archives/")
        .arg(format!(
            "--setup-hook=sync-in {debs_q} /var/cache/apt/archives/"
        ))
        .args(&b.hooks)
        .arg(format!(
            "--customize-hook=sync-out /var/cache/apt/archives {debs_out_q}"
        ));
    if b.suite != SUITE {
        // Testing's Release file is valid for days only, and a dated mirror (a
        // snapshot, for a reproducible build) serves an expired one. Its
        // signature is still checked.
        cmd.arg("--aptopt=Acquire::Check-Valid-Until \"false\"");
    }
    cmd.arg(b.suite)
        .arg(b.target)
        .arg(&mirror)
        .env("SOURCE_DATE_EPOCH", b.epoch.to_string())
        .env("PYTHONHASHSEED", "0");
    let out = cmd.output().context("running mmdebstrap")?;
    if !out.status.success() {
        bail!(
            "mmdebstrap could not build {} (a package not in Debian {}, or the mirror \
             {mirror} unreachable?):\n{}",
            b.what,
            b.suite,
            exec::tail(&String::from_utf8_lossy(&out.stderr))
        );
    }
    for entry in fs::read_dir(&debs_out)? {
        let path = entry?.path();
        let name = path.file_name().expect("a listed file has a name");
        if path.extension().is_some_and(|e| e == "deb") && !debs.join(name).exists() {
            fs::rename(&path, debs.join(name)).context("keeping a .deb in the cache")?;
        }
    }
    Ok(())
}

/// `package version` lines of what is installed in `root`, sorted.
pub fn installed_packages(root: &Path) -> Result<Vec<(String, String)>> {
    let out = exec::output(
        exec::command("chroot").arg(root).args([
            "dpkg-query",
            "-W",
            "-f",
            "${Package} ${Version}\\n",
        ]),
        &format!(
            "listing the packages installed in {} (dpkg-query)",
            root.display()
        ),
    )?;
    let mut packages: Vec<(String, String)> = String::from_utf8_lossy(&out)
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(p, v)| (p.to_string(), v.to_string()))
        .collect();
    packages.sort();
    Ok(packages)
}
