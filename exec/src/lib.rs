//! How the builder, its xtask and its tests run programs: [`command`] is the
//! one place a [`std::process::Command`] is made (clippy.toml bans
//! `Command::new` everywhere else), [`run`] and [`output`] the one status
//! check (a failure names what was done and ends with the output's tail;
//! [`status`] for a job whose output the user watches),
//! and [`Sandbox`] the one way to run a program inside another root
//! (an image being built, a tools root, a container's root file system).

mod sandbox;
mod status;

pub use sandbox::{Enter, Sandbox};
pub use status::{output, run, status, stdout, tail};

use std::ffi::OsStr;
use std::process::Command;

/// A command for a program on the host.
#[allow(clippy::disallowed_methods)]
pub fn command(program: impl AsRef<OsStr>) -> Command {
    Command::new(program)
}

/// A single-quoted shell word (for the hooks and scripts that are shell by
/// nature, such as mmdebstrap's).
pub fn shell_quote(word: impl AsRef<OsStr>) -> String {
    format!(
        "'{}'",
        word.as_ref().to_string_lossy().replace('\'', "'\\''")
    )
}
