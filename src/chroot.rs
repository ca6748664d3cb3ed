//! Runs a command inside an image root being built: a private mount
//! namespace (nothing leaks to the host), /proc and /dev mounted, the host's
//! resolv.conf for downloads, and extra directories bound in. Needs root.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

/// A host directory visible at `inside` (an absolute path) in the root.
pub struct Bind<'a> {
    pub host: &'a Path,
    pub inside: &'a str,
}

/// `unshare` + `chroot` running `argv` in `root` with `env` only.
pub fn command(
    root: &Path,
    binds: &[Bind],
    env: &[(&str, &str)],
    argv: &[&str],
) -> Result<Command> {
    let text = |p: &Path| {
        p.to_str()
            .map(quote)
            .with_context(|| format!("{} is not UTF-8, which the build needs", p.display()))
    };
    let r = text(root)?;
    let mut script = String::from("set -e\n");
    // The root a mount point of its own: containers-storage's unpacker (in
    // the disk's image store) remounts / and fails otherwise.
    script += &format!("mount --bind {r} {r}\n");
    script += &format!("mount -t proc proc {r}/proc\n");
    script += &format!("mount --rbind /dev {r}/dev\n");
    script += &format!(
        "if [ -f /etc/resolv.conf ]; then rm -f {r}/etc/resolv.conf; : > {r}/etc/resolv.conf; \
         mount --bind /etc/resolv.conf {r}/etc/resolv.conf; fi\n"
    );
    for b in binds {
        let t = format!("{r}{}", quote(b.inside));
        if b.host.is_dir() {
            script += &format!("mkdir -p {t}\n");
        } else {
            script += &format!("mkdir -p \"$(dirname {t})\"; : > {t}\n");
        }
        script += &format!("mount --bind {} {t}\n", text(b.host)?);
    }
    // What the command makes (a venv, an image store) gets a root shell's
    // usual modes whatever the builder's umask: an image built with umask
    // 077 would otherwise hide its venv from the service's user, and differ.
    script += "umask 022\n";
    script += &format!("exec chroot {r} env -i");
    for (k, v) in env {
        script += &format!(" {}", quote(&format!("{k}={v}")));
    }
    for a in argv {
        script += &format!(" {}", quote(a));
    }
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "--fork", "sh", "-c"])
        .arg(script);
    Ok(cmd)
}

/// Runs the command; on failure the error carries its output's tail.
pub fn run(cmd: Command, what: &str) -> Result<()> {
    output(cmd, what).map(|_| ())
}

/// Runs the command and returns its standard output; on failure the error
/// carries its standard error's tail.
pub fn output(mut cmd: Command, what: &str) -> Result<Vec<u8>> {
    let out = cmd
        .output()
        .with_context(|| format!("{what}: cannot run unshare/chroot (util-linux)"))?;
    if !out.status.success() {
        let mut text = String::from_utf8_lossy(&out.stderr).into_owned();
        text += &String::from_utf8_lossy(&out.stdout);
        let tail: Vec<&str> = text.lines().rev().take(25).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!("{what} failed ({}):\n{}", out.status, tail.join("\n"));
    }
    Ok(out.stdout)
}

/// Fails clearly where building roots is impossible; `otherwise` says what
/// the user can do without root.
pub fn require_root(why: &str, otherwise: &str) -> Result<()> {
    if !rustix::process::geteuid().is_root() {
        bail!("{why} needs root (mmdebstrap, mounts and chroot); run the build as root, or {otherwise}");
    }
    Ok(())
}

/// A single-quoted shell word.
pub fn quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', "'\\''"))
}
