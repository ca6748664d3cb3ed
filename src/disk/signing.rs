//! Signed updates: an OpenPGP key (`build --sign-key`) signs
//! `update/SHA256SUMS` with a detached signature, `SHA256SUMS.gpg`, which
//! systemd-sysupdate verifies (through systemd-pull) against the image's
//! keyring `/usr/lib/systemd/import-pubring.gpg`. That keyring holds the
//! keys the image trusts: the signing key's public part and any
//! `--trust-key` (a key that will sign later versions). gpg runs in the
//! tools root with a throwaway home; the signature's time is the epoch, so an
//! Ed25519 or RSA signature is reproducible. The key files never reach an
//! output, a log or the cache (only their hash, in the disk image's cache
//! key).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use sha2::{Digest as _, Sha256};

use super::tools::Tools;

/// The keys a build signs with and trusts.
#[derive(Debug, Clone, Default)]
pub struct Keys {
    /// An OpenPGP secret key without a passphrase (armored or binary).
    pub sign: Option<PathBuf>,
    /// OpenPGP public keys the image trusts besides the signing key's.
    pub trust: Vec<PathBuf>,
}

/// Where systemd-pull looks for the keys it trusts (and matrixctl's gpgv).
pub const KEYRING: &str = "usr/lib/systemd/import-pubring.gpg";

impl Keys {
    pub fn is_empty(&self) -> bool {
        self.sign.is_none() && self.trust.is_empty()
    }

    /// Fails before any work when a key file cannot be read.
    pub fn check(&self) -> Result<()> {
        for path in self.sign.iter().chain(&self.trust) {
            fs::metadata(path).map_err(|e| {
                anyhow!(
                    "cannot read the key file {}: {e} (--sign-key takes an OpenPGP secret key \
                     file, e.g. from `gpg --export-secret-keys KEYID`; --trust-key and the site \
                     value update_trust_keys a public key file, from `gpg --export KEYID`)",
                    path.display()
                )
            })?;
        }
        Ok(())
    }

    /// The hash of every key file, for the disk image's cache key.
    pub fn digest(&self) -> Result<[u8; 32]> {
        let mut hasher = Sha256::new();
        for (role, path) in self
            .sign
            .iter()
            .map(|p| ("sign", p))
            .chain(self.trust.iter().map(|p| ("trust", p)))
        {
            let bytes = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            hasher.update(role.as_bytes());
            hasher.update(Sha256::digest(&bytes));
        }
        Ok(hasher.finalize().into())
    }
}

/// Imports the keys into `scratch/gnupg` and exports the trusted public keys
/// to `scratch/pubring.gpg`; None without keys.
pub fn keyring(tools: &Tools, scratch: &Path, keys: &Keys, epoch: u64) -> Result<Option<PathBuf>> {
    if keys.is_empty() {
        return Ok(None);
    }
    let home = scratch.join("gnupg");
    fs::create_dir_all(&home)?;
    fs::set_permissions(&home, fs::Permissions::from_mode(0o700))?;
    let mut inside = Vec::new();
    for (i, path) in keys.sign.iter().chain(&keys.trust).enumerate() {
        let name = format!("key-{i}");
        fs::copy(path, home.join(&name))
            .with_context(|| format!("reading the key file {}", path.display()))?;
        fs::set_permissions(home.join(&name), fs::Permissions::from_mode(0o600))?;
        inside.push(format!("/work/gnupg/{name}"));
    }
    let mut import = gpg(epoch);
    import.push("--import".into());
    import.extend(inside.iter().cloned());
    run(
        tools,
        scratch,
        epoch,
        &import,
        "importing the update keys (gpg)",
    )?;
    for key in &inside {
        fs::remove_file(scratch.join(key.trim_start_matches("/work/")))?;
    }
    if let Some(path) = &keys.sign {
        let mut list = gpg(epoch);
        list.extend(["--list-secret-keys".into(), "--with-colons".into()]);
        let out = run(
            tools,
            scratch,
            epoch,
            &list,
            "listing the signing key (gpg)",
        )?;
        if !String::from_utf8_lossy(&out)
            .lines()
            .any(|l| l.starts_with("sec:"))
        {
            return Err(anyhow!(
                "--sign-key {}: no secret key in it; give the secret key (`gpg \
                 --export-secret-keys KEYID`), not the public one",
                path.display()
            ));
        }
    }
    let mut export = gpg(epoch);
    export.extend([
        "--export".into(),
        "--output".into(),
        "/work/pubring.gpg".into(),
    ]);
    run(
        tools,
        scratch,
        epoch,
        &export,
        "exporting the trusted keys (gpg)",
    )?;
    Ok(Some(scratch.join("pubring.gpg")))
}

/// Signs `scratch/update/SHA256SUMS` into `SHA256SUMS.gpg` with the key
/// [`keyring`] imported.
pub fn sign(tools: &Tools, scratch: &Path, epoch: u64) -> Result<()> {
    let mut args = gpg(epoch);
    args.extend(
        [
            "--pinentry-mode",
            "loopback",
            "--passphrase",
            "",
            "--digest-algo",
            "SHA256",
            "--detach-sign",
            "--output",
            "/work/update/SHA256SUMS.gpg",
            "/work/update/SHA256SUMS",
        ]
        .map(String::from),
    );
    run(
        tools,
        scratch,
        epoch,
        &args,
        "signing update/SHA256SUMS (gpg)",
    )?;
    Ok(())
}

/// Puts the trusted keys where systemd-pull reads them, replacing the keys
/// Debian's systemd-container trusts (another distribution's); without keys
/// the image trusts none (its updates are checked against SHA256SUMS only).
pub fn install_keyring(root: &Path, keyring: Option<&Path>, epoch: u64) -> Result<()> {
    let dest = root.join(KEYRING);
    match fs::remove_file(&dest) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("removing {KEYRING}"))
        }
        _ => {}
    }
    if let Some(keyring) = keyring {
        fs::copy(keyring, &dest).with_context(|| format!("writing {KEYRING}"))?;
        fs::set_permissions(&dest, fs::Permissions::from_mode(0o644))?;
        super::assemble::clamp_mtimes(dest.parent().expect("a directory"), epoch)?;
    }
    Ok(())
}

/// Stops the gpg agent the secret key started and removes the throwaway home.
pub fn forget(tools: &Tools, scratch: &Path, used: bool, epoch: u64) -> Result<()> {
    if !used {
        return Ok(());
    }
    run(
        tools,
        scratch,
        epoch,
        &["gpgconf", "--homedir", "/work/gnupg", "--kill", "all"].map(String::from),
        "stopping gpg's agent (gpgconf)",
    )?;
    fs::remove_dir_all(scratch.join("gnupg")).context("removing gpg's home")
}

/// gpg with the scratch home, the epoch as its clock, nothing interactive.
fn gpg(epoch: u64) -> Vec<String> {
    [
        "gpg",
        "--homedir",
        "/work/gnupg",
        "--batch",
        "--quiet",
        "--no-tty",
        // A key made after the epoch still signs (with a warning).
        "--ignore-time-conflict",
        "--faked-system-time",
    ]
    .map(String::from)
    .into_iter()
    .chain([format!("{epoch}!")])
    .collect()
}

fn run(tools: &Tools, scratch: &Path, epoch: u64, args: &[String], what: &str) -> Result<Vec<u8>> {
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    tools.run_in(scratch, epoch, &argv, what)
}
