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

/// Whether `program` is an executable file in one of PATH's directories
/// (what running it would find), without running it.
pub fn on_path(program: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            std::fs::metadata(dir.join(program))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}

/// A single-quoted shell word (for the hooks and scripts that are shell by
/// nature, such as mmdebstrap's).
pub fn shell_quote(word: impl AsRef<OsStr>) -> String {
    format!(
        "'{}'",
        word.as_ref().to_string_lossy().replace('\'', "'\\''")
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn on_path_finds_programs_but_not_missing_ones() {
        assert!(super::on_path("sh"));
        assert!(!super::on_path("no-such-program-here"));
    }
}
