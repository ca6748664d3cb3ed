//! The Debian trixie tools root that `cargo xtask tools` builds: the tests run
//! production's own programs in it (podman 5's quadlet generator, systemd 257,
//! nginx, Caddy, PostgreSQL 17, Pebble), whatever Debian the host runs.
//!
//! Every command gets a private mount namespace (the `exec` crate's sandbox):
//! the root is the lowest layer of an overlay whose upper layer is a tmpfs of
//! that namespace, so a command may write anywhere, mount points are created
//! on the fly, and nothing leaks into the shared root, the host or a
//! concurrent test. Needs root.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const HOW: &str = "run `cargo xtask tools` (cargo xtask test does it)";

pub struct ToolsRoot {
    /// The root itself (symlinks resolved).
    pub root: PathBuf,
    /// The venv with tools from PyPI, if any (`bin/traefik`).
    venv: PathBuf,
    /// An empty directory each command mounts its own tmpfs on.
    scratch: PathBuf,
}

/// How a command sees the root beyond the plain root (the common cases;
/// [`ToolsRoot::sandbox`] gives the `exec` sandbox itself for the others).
#[derive(Default, Clone)]
pub struct Sandbox {
    /// Directory trees laid over `/` (overlay lower layers; the first wins),
    /// such as a rendered image tree: its files appear at their image paths.
    pub trees: Vec<PathBuf>,
    /// Host path → path inside the root (a file or a directory), bound in
    /// this order after the trees are laid.
    pub binds: Vec<(PathBuf, String)>,
    /// A network namespace of its own with only loopback: nothing the
    /// command does reaches the host's network (ports, ACME servers).
    pub offline: bool,
    /// Enter the root with pivot_root rather than chroot, so it is the root
    /// of the mount namespace: nested container runtimes (nspawn, then
    /// crun's `exec`) join namespaces by their root, which a chroot leaves
    /// at the machine's own.
    pub pivot_root: bool,
}

impl ToolsRoot {
    /// The root named by `BUILDER_TOOLS_ROOT`, else `target/tools/current`.
    pub fn get() -> ToolsRoot {
        let root = std::env::var_os("BUILDER_TOOLS_ROOT")
            .map(PathBuf::from)
            .unwrap_or_else(|| tools_dir().join("current"));
        let root = fs::canonicalize(&root)
            .unwrap_or_else(|e| panic!("no tools root at {} ({e}): {HOW}", root.display()));
        assert!(
            root.join("usr/libexec/podman/quadlet").exists(),
            "{} is not a complete tools root: {HOW}",
            root.display()
        );
        let venv = std::env::var_os("BUILDER_TOOLS_VENV")
            .map(PathBuf::from)
            .unwrap_or_else(|| tools_dir().join("venv"));
        let scratch = tools_dir().join(".scratch");
        fs::create_dir_all(&scratch).unwrap();
        assert!(
            rustix::process::geteuid().is_root(),
            "the tools root needs root (unshare, mount, chroot)"
        );
        ToolsRoot {
            root,
            venv,
            scratch,
        }
    }

    /// The Debian forky root with the next PostgreSQL major (18), named by
    /// `BUILDER_POSTGRES_NEXT_ROOT`, else `target/tools/postgres-next`.
    pub fn postgres_next() -> ToolsRoot {
        let main = ToolsRoot::get();
        let root = std::env::var_os("BUILDER_POSTGRES_NEXT_ROOT")
            .map(PathBuf::from)
            .unwrap_or_else(|| tools_dir().join("postgres-next"));
        let root = fs::canonicalize(&root)
            .unwrap_or_else(|e| panic!("no PostgreSQL 18 root at {} ({e}): {HOW}", root.display()));
        assert!(
            root.join("usr/lib/postgresql/18/bin/postgres").exists(),
            "{} has no PostgreSQL 18: {HOW}",
            root.display()
        );
        ToolsRoot { root, ..main }
    }

    /// A program from the PyPI venv (e.g. `traefik`), as a host path.
    pub fn venv_bin(&self, name: &str) -> PathBuf {
        let path = self.venv.join("bin").join(name);
        assert!(
            path.exists(),
            "no {} in the tools venv: {HOW}",
            path.display()
        );
        path
    }

    /// `program args` run inside the root, with each `(host path, path inside)`
    /// bound into it.
    pub fn command(&self, binds: &[(&Path, &str)], program: &str, args: &[&str]) -> Command {
        let sandbox = Sandbox {
            binds: binds
                .iter()
                .map(|(host, inside)| (host.to_path_buf(), inside.to_string()))
                .collect(),
            ..Sandbox::default()
        };
        self.command_in(&sandbox, program, args)
    }

    /// The root under an overlay with `trees` laid over it (the first wins)
    /// and a writable layer of the command's own.
    pub fn sandbox(&self, trees: Vec<PathBuf>) -> exec::Sandbox {
        exec::Sandbox::new(&self.root).overlay(trees, &self.scratch)
    }

    /// `program args` run inside the root as `sandbox` says. The environment
    /// of the returned command reaches the program (PATH is the root's).
    pub fn command_in(&self, sandbox: &Sandbox, program: &str, args: &[&str]) -> Command {
        let mut view = self.sandbox(sandbox.trees.clone());
        for (host, inside) in &sandbox.binds {
            view = view.bind(host, inside);
        }
        if sandbox.offline {
            view = view.loopback_only();
        }
        if sandbox.pivot_root {
            view = view.enter(exec::Enter::PivotRoot);
        }
        let mut argv = vec![program];
        argv.extend(args);
        view.command(&argv)
            .unwrap_or_else(|e| panic!("a command in the tools root: {e:#}"))
    }
}

/// `target/tools`: the symlinks `cargo xtask tools` leaves (`current`,
/// `postgres-next`, `host`, `venv`) and the commands' scratch directory.
pub fn tools_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tools")
}
