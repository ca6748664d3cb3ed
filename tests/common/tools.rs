//! The Debian trixie tools root that `cargo xtask tools` builds: the tests run
//! production's own programs in it (podman 5's quadlet generator, systemd 257,
//! nginx, Caddy, PostgreSQL 17, Pebble), whatever Debian the host runs.
//!
//! Every command gets a private mount namespace: the root is the lowest layer
//! of an overlay whose upper layer is a tmpfs of that namespace, so a command
//! may write anywhere, mount points are created on the fly, and nothing leaks
//! into the shared root, the host or a concurrent test. Needs root.

use std::ffi::OsStr;
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

/// How a command sees the root beyond the plain root.
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
        let tools = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tools");
        let root = std::env::var_os("BUILDER_TOOLS_ROOT")
            .map(PathBuf::from)
            .unwrap_or_else(|| tools.join("current"));
        let root = fs::canonicalize(&root)
            .unwrap_or_else(|e| panic!("no tools root at {} ({e}): {HOW}", root.display()));
        assert!(
            root.join("usr/libexec/podman/quadlet").exists(),
            "{} is not a complete tools root: {HOW}",
            root.display()
        );
        let venv = std::env::var_os("BUILDER_TOOLS_VENV")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.parent().unwrap().join("venv"));
        let scratch = root.parent().unwrap().join(".scratch");
        fs::create_dir_all(&scratch).unwrap();
        mount_option_path(&scratch);
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
            .unwrap_or_else(|| main.root.parent().unwrap().join("postgres-next"));
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

    /// `program args` run inside the root as `sandbox` says. The environment
    /// of the returned command reaches the program (PATH is the root's).
    pub fn command_in(&self, sandbox: &Sandbox, program: &str, args: &[&str]) -> Command {
        let mut lower = Vec::new();
        for tree in &sandbox.trees {
            lower.push(mount_option_path(tree));
        }
        lower.push(mount_option_path(&self.root));
        let mut script = String::from("set -eu\n");
        script += &format!("s={}\n", quote(self.scratch.as_os_str()));
        script += "mount -t tmpfs -o mode=0755 tmpfs \"$s\"\n";
        script += "mkdir \"$s/upper\" \"$s/work\" \"$s/merged\"\nm=$s/merged\n";
        script += &format!(
            "mount -t overlay overlay -o \"lowerdir={},upperdir=$s/upper,workdir=$s/work\" \"$m\"\n",
            lower.join(":")
        );
        script += "mount -t proc proc \"$m/proc\"\nmount --rbind /dev \"$m/dev\"\n";
        for (host, inside) in &sandbox.binds {
            assert!(
                inside.starts_with('/'),
                "bind target {inside:?} is not absolute"
            );
            let host_q = quote(host.as_os_str());
            let inside_q = quote(OsStr::new(inside));
            // A directory or a file mount point, made in the overlay.
            script += &format!(
                "t=\"$m\"{inside_q}\n\
                 if [ -L \"$t\" ]; then echo \"bind target {inside} is a symlink in the root\" >&2; exit 1; fi\n\
                 if [ -d {host_q} ]; then mkdir -p \"$t\"; \
                 else mkdir -p \"$(dirname \"$t\")\"; [ -e \"$t\" ] || : >\"$t\"; fi\n\
                 mount --bind {host_q} \"$t\"\n"
            );
        }
        if sandbox.offline {
            script += "chroot \"$m\" ip link set lo up\n";
        }
        script += "export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n";
        if sandbox.pivot_root {
            script += "cd \"$m\"\npivot_root . mnt\n";
            script += "exec chroot . sh -c 'umount -l /mnt && cd / && exec \"$@\"' sh \"$@\"\n";
        } else {
            script += "exec chroot \"$m\" \"$@\"\n";
        }

        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private"]);
        if sandbox.offline {
            cmd.arg("--net");
        }
        cmd.args(["sh", "-c", &script, "sh", program]).args(args);
        cmd
    }
}

/// A path as overlayfs options take it: they split on `,` and `:`.
fn mount_option_path(path: &Path) -> String {
    let text = path.to_str().expect("UTF-8 path").to_string();
    assert!(
        !text.contains([',', ':', '\'', '"', '\\', '$', '`'])
            && !text.contains(char::is_whitespace),
        "{text:?} cannot be an overlay layer"
    );
    text
}

/// A single-quoted shell word.
fn quote(word: &OsStr) -> String {
    format!("'{}'", word.to_string_lossy().replace('\'', "'\\''"))
}
