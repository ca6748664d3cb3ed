//! The tools root: a Debian trixie tree with the programs that make the
//! disk image (systemd-repart, mkfs.*, GRUB's BIOS installer,
//! systemd-boot, qemu-img), so the host needs only mmdebstrap: its own
//! systemd may be too old to partition offline. Cached by package set.

use std::path::{Path, PathBuf};

use anyhow::Result;

use exec::Sandbox;

use crate::cache::{Cache, Key};
use crate::debian::{self, SUITE};
use crate::progress::Progress;

/// Bump when something not listed below changes what the root holds.
const VERSION: &str = "3";

const PACKAGES: &[&str] = &[
    "systemd",
    "systemd-repart",
    "systemd-boot-efi",
    "grub-pc-bin",
    "grub2-common",
    "dosfstools",
    "mtools",
    "e2fsprogs",
    "erofs-utils",
    "fdisk",
    "qemu-utils",
    // unpacks embedded images into the disk's image store (containers-storage)
    "skopeo",
    // the unified kernel image systemd-boot starts
    "systemd-ukify",
    // signs update/SHA256SUMS (build --sign-key)
    "gpg",
    "gpg-agent",
];

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

pub fn ensure(cache: &Cache, epoch: u64, progress: &mut Progress) -> Result<Tools> {
    let mirror = debian::mirror();
    let mut key = Key::new("builder disk tools", 0);
    key.add(VERSION.as_bytes())
        .add(SUITE.as_bytes())
        .add(mirror.as_bytes())
        .add(PACKAGES.join(" ").as_bytes());
    let dir = cache.dir_or_build("disk-tools", &key.finish(), |dir: &Path| {
        progress.note(&format!(
            "disk: making the {SUITE} tools root ({}) with mmdebstrap",
            PACKAGES.join(", ")
        ));
        let packages: Vec<String> = PACKAGES.iter().map(|p| p.to_string()).collect();
        debian::mmdebstrap(
            &debian::Bootstrap {
                what: "the disk image's tools root",
                suite: SUITE,
                variant: "apt",
                packages: &packages,
                hooks: Vec::new(),
                target: &dir.join("root"),
                work: dir,
                epoch,
            },
            cache,
        )
    })?;
    Ok(Tools {
        root: dir.join("root"),
    })
}
