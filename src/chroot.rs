//! How the build runs a program inside a root it is making (an image, the
//! disk's base) or a tools root: the one sandbox (the `exec` crate) with
//! /proc, /dev and the host's resolv.conf for downloads, nothing in the
//! environment but what the build passes, and a root shell's umask.
//! Needs root.

use std::path::Path;

use anyhow::{bail, Result};
pub use exec::Sandbox;

/// `root` as the build enters it; add binds and environment, then
/// [`Sandbox::command`].
pub fn sandbox(root: &Path) -> Sandbox {
    // What the program makes (a venv, an image store) gets a root shell's
    // usual modes whatever the builder's umask: an image built with umask
    // 077 would otherwise hide its venv from the service's user, and differ.
    Sandbox::new(root)
        .resolv()
        .clear_env()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .umask("022")
}

/// Fails clearly where building roots is impossible; `otherwise` says what
/// the user can do without root.
pub fn require_root(why: &str, otherwise: &str) -> Result<()> {
    if !rustix::process::geteuid().is_root() {
        bail!("{why} needs root (mmdebstrap, mounts and chroot); run the build as root, or {otherwise}");
    }
    Ok(())
}
