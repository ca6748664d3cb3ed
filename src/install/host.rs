//! The host an install goes onto: what it must have, and its systemd told
//! about the new units (reload, users, directories, start, stop).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::record::Record;
use crate::error::usage;

/// The oldest Podman whose quadlets the bundle's units are written for.
const PODMAN_MIN: (u32, u32) = (4, 4);

/// Programs the bundle's scripts run on the host, besides systemd's and
/// Podman's (the same package names on Debian and Fedora).
const PROGRAMS: &[&str] = &["jq", "curl", "openssl"];

/// `root` made absolute; it must be a directory.
pub fn root(root: &Path) -> Result<PathBuf> {
    let abs = std::fs::canonicalize(root).map_err(|e| {
        usage(format!(
            "--root {}: {e}: give an existing directory (or / for this host)",
            root.display()
        ))
    })?;
    if !abs.is_dir() {
        return Err(usage(format!(
            "--root {} is not a directory",
            root.display()
        )));
    }
    Ok(abs)
}

/// Whether the install goes onto the running system (its units reloaded and
/// started) rather than into a directory.
pub fn is_live(root: &Path) -> bool {
    root == Path::new("/")
}

/// The running host has what the bundle needs; otherwise an error naming
/// each missing piece and how to get it. Nothing is written before this.
pub fn preflight() -> Result<()> {
    if !rustix::process::geteuid().is_root() {
        return Err(usage(
            "installing onto this host needs root (units go into /usr and are started): \
             run it with sudo, or give --root DIR to put the files into a directory",
        ));
    }
    if !Path::new("/run/systemd/system").is_dir() {
        return Err(usage(
            "systemd is not running this host (no /run/systemd/system): the bundle's services \
             are systemd units and Podman quadlets; give --root DIR to put the files into a \
             directory instead",
        ));
    }
    let podman = exec::command("podman").arg("--version").output();
    let version = match podman {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).into_owned(),
        _ => {
            return Err(usage(format!(
                "Podman is not installed (no `podman` in PATH): install Podman {}.{} or newer \
                 (Debian and Ubuntu: apt install podman; Fedora: dnf install podman)",
                PODMAN_MIN.0, PODMAN_MIN.1
            )))
        }
    };
    match parse_podman_version(&version) {
        Some(v) if v >= PODMAN_MIN => {}
        _ => {
            return Err(usage(format!(
                "{}: the bundle's units are quadlets, which need Podman {}.{} or newer: \
                 upgrade Podman (e.g. from your distribution's backports)",
                version.trim(),
                PODMAN_MIN.0,
                PODMAN_MIN.1
            )))
        }
    }
    let missing: Vec<&str> = PROGRAMS.iter().copied().filter(|p| !in_path(p)).collect();
    if !missing.is_empty() {
        return Err(usage(format!(
            "the bundle's scripts run {}, not found in PATH: install {} (apt install or dnf \
             install, same names)",
            missing.join(", "),
            if missing.len() == 1 { "it" } else { "them" }
        )));
    }
    Ok(())
}

/// "podman version 5.4.2" → (5, 4).
fn parse_podman_version(text: &str) -> Option<(u32, u32)> {
    let version = text.split_whitespace().last()?;
    let mut parts = version.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts
        .next()?
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .ok()?;
    Some((major, minor))
}

fn in_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
        .unwrap_or(false)
}

/// systemd reads the new units (the quadlet generator makes the
/// containers' services), then makes the users and directories the bundle's
/// sysusers.d and tmpfiles.d files declare.
pub fn reload(rec: &Record) -> Result<()> {
    systemctl(&["daemon-reload"])?;
    generated(rec)?;
    let declared = |dir: &str| -> Vec<String> {
        rec.entries
            .iter()
            .filter(|e| e.path.starts_with(dir) && e.path.ends_with(".conf"))
            .map(|e| format!("/{}", e.path))
            .collect()
    };
    let sysusers = declared("usr/lib/sysusers.d/");
    if !sysusers.is_empty() {
        run("systemd-sysusers", &sysusers)?;
    }
    let tmpfiles = declared("usr/lib/tmpfiles.d/");
    if !tmpfiles.is_empty() {
        let mut args = vec!["--create".to_string()];
        args.extend(tmpfiles);
        run("systemd-tmpfiles", &args)?;
    }
    Ok(())
}

/// Every quadlet of the bundle became a unit: an older Podman's quadlet
/// generator skips a file with a key it does not know (the bundle's use
/// `.image` units, `Notify=healthy` and others newer than quadlets
/// themselves), and the stack would then wait for a unit that is not there.
fn generated(rec: &Record) -> Result<()> {
    let quadlets: Vec<(&str, String)> = rec
        .entries
        .iter()
        .filter_map(|e| quadlet_unit(&e.path).map(|u| (e.path.as_str(), u)))
        .collect();
    if quadlets.is_empty() {
        return Ok(());
    }
    // One `systemctl show` for all: a block of Id= and LoadState= per unit.
    let mut args = vec!["show", "--property=Id,LoadState"];
    args.extend(quadlets.iter().map(|(_, u)| u.as_str()));
    let out = exec::command("systemctl")
        .args(&args)
        .output()
        .context("running systemctl")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let loaded: Vec<&str> = text
        .split("\n\n")
        .filter(|block| block.lines().any(|l| l == "LoadState=loaded"))
        .filter_map(|block| block.lines().find_map(|l| l.strip_prefix("Id=")))
        .collect();
    let missing: Vec<String> = quadlets
        .iter()
        .filter(|(_, unit)| !loaded.contains(&unit.as_str()))
        .map(|(file, _)| format!("/{file}"))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let version = exec::command("podman")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    bail!(
        "{version}: its quadlet generator made no unit of {}: this Podman cannot read them \
         (`/usr/libexec/podman/quadlet -dryrun` says why); the bundle is tested with Podman \
         5.4: upgrade Podman, then install again (`builder uninstall` removes what was put \
         there)",
        missing.join(", ")
    )
}

/// Starts what the bundle enables: the units its `*.wants/` links name
/// (the stack's target pulls in the first-boot chain and the containers),
/// and the quadlets with an `[Install]` section. Returns their names.
pub fn start(root: &Path, rec: &Record) -> Result<Vec<String>> {
    let mut units: Vec<String> = Vec::new();
    for e in &rec.entries {
        let path = Path::new(&e.path);
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let wants = path
            .parent()
            .and_then(Path::file_name)
            .is_some_and(|d| d.to_string_lossy().ends_with(".wants"));
        if e.target.is_some() && wants {
            units.push(name);
        } else if let Some(unit) = quadlet_unit(&e.path) {
            let text = std::fs::read_to_string(root.join(&e.path)).unwrap_or_default();
            if text.lines().any(|l| l.trim() == "[Install]") {
                units.push(unit);
            }
        }
    }
    units.sort();
    units.dedup();
    if !units.is_empty() {
        let mut args = vec!["start", "--no-block"];
        args.extend(units.iter().map(String::as_str));
        systemctl(&args)?;
    }
    Ok(units)
}

/// The service the quadlet generator makes of one of the bundle's quadlet
/// files (`usr/share/containers/systemd/NAME.container` → `NAME.service`).
pub fn quadlet_unit(path: &str) -> Option<String> {
    let name = path.strip_prefix("usr/share/containers/systemd/")?;
    if name.contains('/') {
        return None;
    }
    let (stem, kind) = name.rsplit_once('.')?;
    match kind {
        "container" | "kube" => Some(format!("{stem}.service")),
        "image" | "network" | "volume" | "pod" | "build" => Some(format!("{stem}-{kind}.service")),
        _ => None,
    }
}

/// The units the bundle's files define: its unit files and its quadlets'
/// services (what uninstall stops).
pub fn defined_units(rec: &Record) -> Vec<String> {
    let mut units: Vec<String> = rec
        .entries
        .iter()
        .filter_map(|e| {
            if let Some(unit) = quadlet_unit(&e.path) {
                return Some(unit);
            }
            let name = e.path.strip_prefix("usr/lib/systemd/system/")?;
            let unit_kind = [".service", ".timer", ".target", ".socket", ".path"];
            (!name.contains('/') && unit_kind.iter().any(|k| name.ends_with(k)))
                .then(|| name.to_string())
        })
        .collect();
    units.sort();
    units.dedup();
    units
}

pub fn systemctl(args: &[&str]) -> Result<()> {
    run("systemctl", args)
}

fn run<S: AsRef<str>>(program: &str, args: &[S]) -> Result<()> {
    let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
    exec::run(
        exec::command(program).args(&args),
        &format!("{program} {}", args.join(" ")),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn podman_versions() {
        assert_eq!(parse_podman_version("podman version 5.4.2\n"), Some((5, 4)));
        assert_eq!(
            parse_podman_version("podman version 4.4.0-rc1"),
            Some((4, 4))
        );
        assert_eq!(parse_podman_version("podman version 4.3.1"), Some((4, 3)));
        assert!(parse_podman_version("podman version 4.3.1").unwrap() < PODMAN_MIN);
        assert_eq!(parse_podman_version("garbage"), None);
    }

    #[test]
    fn quadlet_services() {
        let dir = "usr/share/containers/systemd";
        assert_eq!(
            quadlet_unit(&format!("{dir}/matrix-synapse.container")).as_deref(),
            Some("matrix-synapse.service")
        );
        assert_eq!(
            quadlet_unit(&format!("{dir}/matrix.network")).as_deref(),
            Some("matrix-network.service")
        );
        assert_eq!(
            quadlet_unit(&format!("{dir}/postgres.image")).as_deref(),
            Some("postgres-image.service")
        );
        assert_eq!(quadlet_unit(&format!("{dir}/x.container.d/10.conf")), None);
        assert_eq!(quadlet_unit("usr/lib/systemd/system/x.service"), None);
    }
}
