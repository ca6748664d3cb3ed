//! `cargo xtask test`: installs what the test suite needs on a fresh Debian
//! machine, then runs every test, the VM test last. This is the README's
//! test command.

use anyhow::{bail, Context, Result};

/// Debian packages the tests drive for real: skopeo and umoci read the
/// bundle as the OCI image archive it claims to be.
const DEBIAN_PACKAGES: &[&str] = &["skopeo", "umoci"];

pub fn run(args: &[String]) -> Result<()> {
    let tools = crate::tools::ensure()?;
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the repo");
    let synapse = crate::synapse::ensure(repo, &tools.root)?;
    let telegram = crate::synapse::ensure_telegram(repo, &tools.root)?;
    install_debian_packages(DEBIAN_PACKAGES)?;
    exec::status(
        exec::command(env!("CARGO"))
            .args(["test", "--workspace", "--locked"])
            .env("BUILDER_TOOLS_ROOT", &tools.root)
            .env("BUILDER_TOOLS_VENV", &tools.venv)
            .env("BUILDER_POSTGRES_NEXT_ROOT", &tools.postgres_next)
            .env("BUILDER_HOST_ROOT", &tools.host)
            .env("BUILDER_SYNAPSE_DIR", &synapse)
            .env("BUILDER_TELEGRAM_DIR", &telegram)
            .args(args),
        "tests",
    )?;
    // The disk image booted under qemu (level 4 of the tests); skipped when
    // arguments select particular cargo tests.
    if args.is_empty() {
        crate::vm::run(&[])?;
    }
    Ok(())
}

fn installed(package: &str) -> bool {
    exec::command("dpkg-query")
        .args(["-W", "-f", "${Status}", package])
        .output()
        .is_ok_and(|o| o.stdout.ends_with(b"install ok installed"))
}

/// Installs the missing packages with apt-get (as root), or says how to.
pub fn install_debian_packages(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let is_root = exec::command("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    if !is_root {
        bail!(
            "the tests need these Debian packages: {}; install them with `sudo apt-get install {}`",
            missing.join(" "),
            missing.join(" ")
        );
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    let apt = |args: &[&str]| {
        exec::command("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .with_context(|| format!("running apt-get {}", args.join(" ")))
    };
    if !apt(&["update", "-q"])?.success() {
        bail!("apt-get update failed");
    }
    let mut install = vec!["install", "-y", "-q", "--no-install-recommends"];
    install.extend(&missing);
    if !apt(&install)?.success() {
        bail!("apt-get could not install {}", missing.join(" "));
    }
    Ok(())
}

/// `cargo xtask pin-minimal`: writes tests/fixtures/minimal-pinned.txt anew
/// (tests/pinned.rs), after an intended change of the `minimal` profile's
/// output.
pub fn pin_minimal(args: &[String]) -> Result<()> {
    if !args.is_empty() {
        bail!("usage: cargo xtask pin-minimal");
    }
    exec::status(
        exec::command(env!("CARGO"))
            .args(["test", "--locked", "--test", "pinned"])
            .env("BUILDER_WRITE_PIN", "1"),
        "writing the pin",
    )?;
    Ok(())
}
