//! Running a program inside another root: a private mount namespace (no
//! mount reaches the host or a concurrent run), the root's kernel file
//! systems, bound host paths, and the chroot or pivot_root into it, all
//! described as data and turned into one `unshare … sh -c` script here.
//!
//! The program and its arguments never pass through the script's text:
//! they are the script's positional parameters.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::{command, shell_quote as q};

/// The PATH a sandboxed program gets unless told otherwise.
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How the program is put into the root.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum Enter {
    /// chroot: the root is not the mount namespace's root.
    #[default]
    Chroot,
    /// pivot_root: the root becomes the mount namespace's root, which
    /// nested container runtimes (nspawn, crun's `exec`) need, since they
    /// join namespaces by their root.
    PivotRoot,
}

#[derive(Clone, Debug)]
struct Bind {
    host: PathBuf,
    inside: String,
    read_only: bool,
}

/// A root and how a program sees it; [`Sandbox::command`] makes the command.
#[derive(Clone, Debug)]
pub struct Sandbox {
    root: PathBuf,
    /// Trees laid over the root (overlay lower layers; the first wins) and
    /// the directory whose private tmpfs holds the writable upper layer:
    /// the program may write anywhere and the root stays as it was.
    overlay: Option<(Vec<PathBuf>, PathBuf)>,
    proc: bool,
    dev: bool,
    sys: bool,
    resolv: bool,
    tmpfs: Vec<String>,
    binds: Vec<Bind>,
    files: Vec<(String, String)>,
    read_only_root: bool,
    read_only_paths: Vec<String>,
    loopback_only: bool,
    uts_namespace: bool,
    netns: Option<String>,
    pid_namespace: bool,
    cgroup: Option<String>,
    dies_with_parent: bool,
    enter: Enter,
    user: Option<(String, String)>,
    env: Vec<(String, String)>,
    clear_env: bool,
    umask: Option<String>,
    workdir: Option<String>,
}

impl Sandbox {
    /// `root` with /proc and /dev mounted, entered by chroot, the host's
    /// environment passed on with a standard PATH.
    pub fn new(root: impl Into<PathBuf>) -> Sandbox {
        Sandbox {
            root: root.into(),
            overlay: None,
            proc: true,
            dev: true,
            sys: false,
            resolv: false,
            tmpfs: Vec::new(),
            binds: Vec::new(),
            files: Vec::new(),
            read_only_root: false,
            read_only_paths: Vec::new(),
            loopback_only: false,
            uts_namespace: false,
            netns: None,
            pid_namespace: false,
            cgroup: None,
            dies_with_parent: false,
            enter: Enter::Chroot,
            user: None,
            env: vec![("PATH".into(), PATH.into())],
            clear_env: false,
            umask: None,
            workdir: None,
        }
    }

    /// The root as the lowest layer of an overlay, `trees` above it (the
    /// first wins), with a writable layer that lives only as long as the
    /// program (a tmpfs mounted, in the private namespace, on `scratch`).
    pub fn overlay(mut self, trees: Vec<PathBuf>, scratch: impl Into<PathBuf>) -> Sandbox {
        self.overlay = Some((trees, scratch.into()));
        self
    }

    /// No /proc of its own (a [`Sandbox::tmpfs`] and [`Sandbox::file`] may
    /// stand in for it).
    pub fn no_proc(mut self) -> Sandbox {
        self.proc = false;
        self
    }

    /// A sysfs at /sys.
    pub fn sys(mut self) -> Sandbox {
        self.sys = true;
        self
    }

    /// The host's resolv.conf at /etc/resolv.conf (for downloads).
    pub fn resolv(mut self) -> Sandbox {
        self.resolv = true;
        self
    }

    /// An empty tmpfs at `inside` (made if missing), mounted before the binds.
    pub fn tmpfs(mut self, inside: &str) -> Sandbox {
        self.tmpfs.push(inside.into());
        self
    }

    /// The host file or directory `host` at `inside` (made if missing).
    pub fn bind(mut self, host: impl Into<PathBuf>, inside: &str) -> Sandbox {
        self.binds.push(Bind {
            host: host.into(),
            inside: inside.into(),
            read_only: false,
        });
        self
    }

    /// Like [`Sandbox::bind`], read-only.
    pub fn bind_ro(mut self, host: impl Into<PathBuf>, inside: &str) -> Sandbox {
        self.binds.push(Bind {
            host: host.into(),
            inside: inside.into(),
            read_only: true,
        });
        self
    }

    /// A file with `content` at `inside`, written after the mounts (so into
    /// a tmpfs or an overlay, not into the root).
    pub fn file(mut self, inside: &str, content: &str) -> Sandbox {
        self.files.push((inside.into(), content.into()));
        self
    }

    /// The root read-only once everything is mounted.
    pub fn read_only_root(mut self) -> Sandbox {
        self.read_only_root = true;
        self
    }

    /// The root's own `inside` (which must exist) read-only once everything
    /// is mounted, e.g. /etc of an image whose program must not write there.
    pub fn read_only_path(mut self, inside: &str) -> Sandbox {
        self.read_only_paths.push(inside.into());
        self
    }

    /// A host name of its own (a UTS namespace): the program may set it.
    pub fn uts_namespace(mut self) -> Sandbox {
        self.uts_namespace = true;
        self
    }

    /// A network namespace of its own with only loopback, up: nothing the
    /// program does reaches the host's network.
    pub fn loopback_only(mut self) -> Sandbox {
        self.loopback_only = true;
        self
    }

    /// Runs in the named network namespace (`ip netns exec`).
    pub fn netns(mut self, name: &str) -> Sandbox {
        self.netns = Some(name.into());
        self
    }

    /// A PID namespace of its own. Its first process is the setup shell,
    /// which stays (as root) and waits for the program: when the command is
    /// killed, the shell dies and the kernel takes every process of the
    /// namespace with it, even one that changed its user.
    pub fn pid_namespace(mut self) -> Sandbox {
        self.pid_namespace = true;
        self.dies_with_parent = true;
        self
    }

    /// A cgroup `name` of its own (made under the cgroup2 root, which must
    /// be writable), seen as the whole tree in a cgroup namespace, with
    /// /sys/fs/cgroup mounted: systemd (nspawn, a booted host) takes it over
    /// as a machine's. Implies [`Sandbox::sys`]. The caller removes the
    /// cgroup when done.
    pub fn cgroup(mut self, name: &str) -> Sandbox {
        self.cgroup = Some(name.into());
        self.sys = true;
        self
    }

    /// The program dies when the command's process does (it is killed when
    /// its parent is): a killed run leaves nothing behind.
    pub fn dies_with_parent(mut self) -> Sandbox {
        self.dies_with_parent = true;
        self
    }

    pub fn enter(mut self, how: Enter) -> Sandbox {
        self.enter = how;
        self
    }

    /// Runs as `user` (a name or ID, `user:group` allowed) with the
    /// supplementary `groups` (chroot's --userspec and --groups).
    pub fn user(mut self, user: &str, groups: &str) -> Sandbox {
        self.user = Some((user.into(), groups.into()));
        self
    }

    /// Sets `key` for the program (over the host's, or over nothing after
    /// [`Sandbox::clear_env`]).
    pub fn env(mut self, key: &str, value: &str) -> Sandbox {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.into(), value.into()));
        self
    }

    /// The program gets only what [`Sandbox::env`] set (not even PATH
    /// unless set).
    pub fn clear_env(mut self) -> Sandbox {
        self.clear_env = true;
        self.env.clear();
        self
    }

    /// The program's umask (e.g. "022": what it makes gets a root shell's
    /// usual modes whatever the caller's umask).
    pub fn umask(mut self, mask: &str) -> Sandbox {
        self.umask = Some(mask.into());
        self
    }

    /// The program's working directory inside the root.
    pub fn workdir(mut self, dir: &str) -> Sandbox {
        self.workdir = Some(dir.into());
        self
    }

    /// The command that runs `argv` (program first) in the sandbox.
    pub fn command<S: AsRef<OsStr>>(&self, argv: &[S]) -> Result<Command> {
        if argv.is_empty() {
            bail!("no program to run in {}", self.root.display());
        }
        if self.user.is_some() && self.enter != Enter::Chroot {
            bail!("a sandbox user needs Enter::Chroot");
        }
        let script = self.script()?;
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = command("ip");
                c.args(["netns", "exec", ns, "unshare"]);
                c
            }
            None => command("unshare"),
        };
        cmd.args(["--mount", "--propagation", "private"]);
        if self.loopback_only {
            cmd.arg("--net");
        }
        if self.uts_namespace {
            cmd.arg("--uts");
        }
        if self.pid_namespace {
            cmd.arg("--pid");
        }
        if self.dies_with_parent {
            cmd.args(["--fork", "--kill-child"]);
        }
        cmd.args(["sh", "-c", &script, "sh"]);
        // The positional parameters: what runs after the root is entered.
        if self.clear_env {
            cmd.args(["env", "-i"]);
            cmd.args(self.env.iter().map(|(k, v)| format!("{k}={v}")));
        } else {
            cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        }
        if let Some(dir) = &self.workdir {
            cmd.args(["sh", "-c", "cd \"$1\" && shift && exec \"$@\"", "sh", dir]);
        }
        cmd.args(argv);
        Ok(cmd)
    }

    /// The setup script: mounts, then the way in.
    fn script(&self) -> Result<String> {
        let mut s = String::from("set -eu\n");
        match &self.overlay {
            Some((trees, scratch)) => {
                let mut lower = Vec::new();
                for tree in trees.iter().chain([&self.root]) {
                    lower.push(overlay_layer(tree)?);
                }
                s += &format!("s={}\n", q(utf8(scratch)?));
                s += "mount -t tmpfs -o mode=0755 tmpfs \"$s\"\n";
                s += "mkdir \"$s/upper\" \"$s/work\" \"$s/merged\"\nm=$s/merged\n";
                s += &format!(
                    "mount -t overlay overlay -o \"lowerdir={},upperdir=$s/upper,workdir=$s/work\" \"$m\"\n",
                    lower.join(":")
                );
            }
            None => {
                // The root a mount point of its own: pivot_root needs one,
                // and so does containers-storage's unpacker, which remounts /.
                s += &format!("m={}\nmount --bind \"$m\" \"$m\"\n", q(utf8(&self.root)?));
            }
        }
        if self.proc {
            s += "mount -t proc proc \"$m/proc\"\n";
        }
        if self.dev {
            s += "mount --rbind /dev \"$m/dev\"\n";
        }
        if self.sys {
            s += "mount -t sysfs sysfs \"$m/sys\"\n";
        }
        // With a PID namespace this shell is its first process and stays.
        let exec = if self.pid_namespace { "" } else { "exec " };
        let Some(name) = &self.cgroup else {
            return Ok(s + &self.finish(exec)?);
        };
        // Into a cgroup of its own (from the whole tree's view), then the
        // rest in a cgroup namespace rooted there.
        s += &format!(
            "mount -t cgroup2 cgroup2 \"$m/sys/fs/cgroup\"\n\
             mkdir \"$m/sys/fs/cgroup/\"{n}\n\
             echo 0 > \"$m/sys/fs/cgroup/\"{n}/cgroup.procs\n\
             umount \"$m/sys/fs/cgroup\"\nexport m\n",
            n = q(name)
        );
        let rest = format!(
            "set -eu\nmount -t cgroup2 cgroup2 \"$m/sys/fs/cgroup\"\n{}",
            self.finish("exec ")?
        );
        Ok(s + &format!("{exec}unshare --cgroup sh -c {} sh \"$@\"\n", q(rest)))
    }

    /// The script's part after the root's own mounts: the rest of the
    /// mounts, the files, then the way in (`exec` or not).
    fn finish(&self, exec: &str) -> Result<String> {
        let mut s = String::new();
        if self.resolv {
            s += "if [ -f /etc/resolv.conf ]; then\n\
                  rm -f \"$m/etc/resolv.conf\"; : > \"$m/etc/resolv.conf\"\n\
                  mount --bind /etc/resolv.conf \"$m/etc/resolv.conf\"\nfi\n";
        }
        for dir in &self.tmpfs {
            s += &format!(
                "t=\"$m\"{}\nmkdir -p \"$t\"\nmount -t tmpfs tmpfs \"$t\"\n",
                q(absolute(dir)?)
            );
        }
        for b in &self.binds {
            let host = q(utf8(&b.host)?);
            let inside = absolute(&b.inside)?;
            // The mount point, a directory or a file, made where missing.
            s += &format!(
                "t=\"$m\"{i}\n\
                 if [ -L \"$t\" ]; then echo {msg} >&2; exit 1; fi\n\
                 if [ -d {host} ]; then mkdir -p \"$t\"; \
                 else mkdir -p \"$(dirname \"$t\")\"; [ -e \"$t\" ] || : >\"$t\"; fi\n\
                 mount --bind {host} \"$t\"\n",
                i = q(inside),
                msg = q(format!("bind target {inside} is a symlink in the root"))
            );
            if b.read_only {
                s += "mount -o remount,bind,ro \"$t\"\n";
            }
        }
        for (inside, content) in &self.files {
            s += &format!(
                "t=\"$m\"{}\nmkdir -p \"$(dirname \"$t\")\"\nprintf %s {} > \"$t\"\n",
                q(absolute(inside)?),
                q(content)
            );
        }
        if self.loopback_only {
            s += "ip link set lo up\n";
        }
        for inside in &self.read_only_paths {
            s += &format!(
                "t=\"$m\"{}\nmount --bind \"$t\" \"$t\"\nmount -o remount,bind,ro \"$t\"\n",
                q(absolute(inside)?)
            );
        }
        if self.read_only_root {
            s += "mount -o remount,bind,ro \"$m\"\n";
        }
        if let Some(mask) = &self.umask {
            s += &format!("umask {}\n", q(mask));
        }
        match self.enter {
            Enter::Chroot => {
                s += exec;
                s += "chroot";
                if let Some((user, groups)) = &self.user {
                    s += &format!(" --userspec={} --groups={}", q(user), q(groups));
                }
                s += " \"$m\" \"$@\"\n";
            }
            Enter::PivotRoot => {
                s += "cd \"$m\"\nmkdir -p mnt\npivot_root . mnt\n";
                s += exec;
                s += "chroot . sh -c 'umount -l /mnt && cd / && exec \"$@\"' sh \"$@\"\n";
            }
        }
        Ok(s)
    }
}

/// A path as the script takes it.
fn utf8(path: &Path) -> Result<&str> {
    path.to_str()
        .with_context(|| format!("{} is not UTF-8, which a sandbox needs", path.display()))
}

/// A path inside the root: absolute, or an error naming it.
fn absolute(inside: &str) -> Result<&str> {
    if !inside.starts_with('/') {
        bail!("{inside:?} is not an absolute path inside the sandbox's root");
    }
    Ok(inside)
}

/// A path as overlayfs options take it: they split on `,` and `:`, and the
/// script puts the list between double quotes.
fn overlay_layer(path: &Path) -> Result<String> {
    let text = utf8(path)?;
    if text.contains([',', ':', '\'', '"', '\\', '$', '`']) || text.contains(char::is_whitespace) {
        bail!("{text:?} cannot be an overlay layer (no , : quotes, $, ` or white space)");
    }
    Ok(text.to_string())
}
