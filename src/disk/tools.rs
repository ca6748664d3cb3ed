//! The tools root the disk image is made with: tools.toml's `disk` root
//! (systemd-repart, mkfs.*, GRUB's BIOS installer, systemd-boot, qemu-img),
//! so the host needs only mmdebstrap: its own systemd may be too old to
//! partition offline.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use exec::Sandbox;

use crate::cache::Cache;
use crate::progress::Progress;
use crate::tools_root;

/// A prepared tools root to use instead of building one.
const ROOT_ENV: &str = "BUILDER_TOOLS_ROOT";

pub struct Tools {
    pub root: PathBuf,
}

impl Tools {
    /// systemd-boot's UEFI program, as the firmware's default loader.
    pub fn systemd_boot(&self) -> PathBuf {
        self.root
            .join("usr/lib/systemd/boot/efi/systemd-bootx64.efi")
    }

    /// Runs `argv` in the tools root with `scratch` mounted at /work (and
    /// SOURCE_DATE_EPOCH set); its standard output.
    pub fn run_in(&self, scratch: &Path, epoch: u64, argv: &[&str], what: &str) -> Result<Vec<u8>> {
        let mut cmd = self
            .sandbox(scratch)
            .env("SOURCE_DATE_EPOCH", &epoch.to_string())
            .command(argv)?;
        exec::output(&mut cmd, what)
    }

    /// `mkfs.erofs` (lz4hc, file system UUID `uuid`, every time the epoch) of
    /// `/work/<dir>` into `/work/<image>`: the root and the extension alike.
    pub fn mkfs_erofs(
        &self,
        scratch: &Path,
        epoch: u64,
        uuid: &str,
        image: &str,
        dir: &str,
        what: &str,
    ) -> Result<()> {
        let epoch_text = epoch.to_string();
        let (image, dir) = (format!("/work/{image}"), format!("/work/{dir}"));
        self.run_in(
            scratch,
            epoch,
            &[
                "mkfs.erofs",
                "--quiet",
                "-zlz4hc",
                "-U",
                uuid,
                "-T",
                &epoch_text,
                &image,
                &dir,
            ],
            what,
        )
        .map(drop)
    }

    /// The tools root with `scratch` at /work, for [`Sandbox::command`]:
    /// nothing from the host's environment, nothing written into the root
    /// (which other builds and the tests may share).
    pub fn sandbox(&self, scratch: &Path) -> Sandbox {
        Sandbox::new(&self.root)
            .clear_env()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .umask("022")
            .bind(scratch, "/work")
    }
}

/// The tools root `BUILDER_TOOLS_ROOT` names (the tests', say), once it is
/// checked to hold tools.toml's `disk` packages; `None` when it is unset.
pub fn given_root() -> Result<Option<PathBuf>> {
    let Some(given) = std::env::var_os(ROOT_ENV).filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    let root = fs::canonicalize(&given).with_context(|| {
        format!(
            "{ROOT_ENV}={} names no directory: point it at a tools root, or unset it",
            Path::new(&given).display()
        )
    })?;
    let spec = tools_root::spec("disk")?;
    let missing = tools_root::missing_packages(&root, &spec.packages)?;
    if !missing.is_empty() {
        bail!(
            "the tools root {ROOT_ENV}={} lacks packages the disk image needs: {}; \
             rebuild it (`cargo xtask tools`) or unset {ROOT_ENV}",
            root.display(),
            missing.join(", ")
        );
    }
    Ok(Some(root))
}

/// The tools root [`given_root`] names, else tools.toml's `disk` root,
/// built into the cache if missing.
pub fn ensure(cache: &Cache, epoch: u64, progress: &mut Progress) -> Result<Tools> {
    if let Some(root) = given_root()? {
        return Ok(Tools { root });
    }
    let spec = tools_root::spec("disk")?;
    Ok(Tools {
        root: tools_root::ensure_in(cache, &spec, epoch, progress)?,
    })
}
