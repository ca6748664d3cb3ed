//! A plain Debian trixie host with systemd and Podman, not the appliance
//! image: `target/tools/host` (or `BUILDER_HOST_ROOT`), booted by
//! systemd-nspawn (from the tools root) with systemd as its PID 1, its own
//! network namespace (loopback only) and a throw-away overlay over its
//! files, so every test starts from the same clean host.
//!
//! nspawn's default system call filter refuses keyctl, which crun needs for
//! each container's session keyring: allowed (`@keyring`), and so is bpf, with which crun installs
//! each container's device filter. Two settings are
//! this test machine's, not the bundle's: its kernel has
//! the cgroup controllers on cgroup v1, so the container sees none of them
//! (Podman's default PID limit cannot be set: `pids_limit = 0`); and Podman's
//! storage lives on a bound directory (overlay storage cannot sit on the
//! container's own overlay root).

#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use exec::Enter;

use super::tools::ToolsRoot;

/// The host's cgroup, under the machine's cgroup v2 tree, is this, the
/// test process's PID and a count.
const CGROUP_PREFIX: &str = "builder-test-host-";

pub struct Host {
    /// The sandbox (`unshare`: every process of the host dies with it).
    sandbox: Child,
    /// The cgroup the sandbox made for the host (removed when done).
    cgroup: String,
    /// systemd-nspawn, and the container's PID 1 (systemd, for nsenter).
    nspawn: u32,
    leader: u32,
    _dir: tempfile::TempDir,
}

/// Where the host root is (built by `cargo xtask tools`).
fn host_root() -> PathBuf {
    let root = std::env::var_os("BUILDER_HOST_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| super::tools::tools_dir().join("host"));
    let root = fs::canonicalize(&root).unwrap_or_else(|e| {
        panic!(
            "no host root at {} ({e}): run `cargo xtask tools` (or cargo xtask test)",
            root.display()
        )
    });
    assert!(
        root.join("usr/bin/podman").exists() && root.join("lib/systemd/systemd").exists(),
        "{} lacks systemd or podman: run `cargo xtask tools`",
        root.display()
    );
    root
}

impl Host {
    /// Boots the host with each `(host path, path inside)` bound read-only
    /// into it; returns once its systemd has finished starting up.
    pub fn boot(binds: &[(&Path, &str)]) -> Host {
        let dir = tempfile::tempdir().unwrap();
        let containers = dir.path().join("containers");
        fs::create_dir(&containers).unwrap();
        let machine_id = dir.path().join("machine-id");
        fs::write(&machine_id, "4f1c9a7e2b3d4c5e8f9a0b1c2d3e4f50\n").unwrap();
        // A cgroup of its own, seen as the whole tree in a cgroup namespace,
        // and a PID namespace (systemd finds its root from PID 1's cgroup):
        // nspawn and the host's systemd take it over as if it were a machine's.
        static BOOTED: AtomicUsize = AtomicUsize::new(0);
        let cgroup = format!(
            "{CGROUP_PREFIX}{}-{}",
            std::process::id(),
            BOOTED.fetch_add(1, Ordering::SeqCst)
        );
        let mut sandbox = ToolsRoot::get()
            .sandbox(Vec::new())
            .bind(host_root(), "/srv/host-root")
            .bind(&containers, "/srv/containers")
            // nspawn itself needs a machine ID in the tools root.
            .bind(&machine_id, "/etc/machine-id")
            .enter(Enter::PivotRoot)
            .pid_namespace()
            .cgroup(&cgroup)
            .tmpfs("/run");
        let mut nspawn = vec![
            "systemd-nspawn".to_string(),
            "--quiet".into(),
            "-D".into(),
            "/srv/host-root".into(),
            "--volatile=overlay".into(),
            "--register=no".into(),
            "--keep-unit".into(),
            "--private-network".into(),
            "--console=passive".into(),
            "--hostname=plain-host".into(),
            "--system-call-filter=@keyring bpf".into(),
            "--capability=CAP_BPF".into(),
            "--bind=/srv/containers:/var/lib/containers".into(),
        ];
        for (i, (outside, inside)) in binds.iter().enumerate() {
            let at = format!("/srv/bind-{i}");
            sandbox = sandbox.bind(outside, &at);
            nspawn.push(format!("--bind-ro={at}:{inside}"));
        }
        // The test machine's settings (see the module's comment), in the
        // host's /etc through a bound drop-in.
        let conf = dir.path().join("50-test-machine.conf");
        fs::write(&conf, "[containers]\npids_limit = 0\n").unwrap();
        sandbox = sandbox.bind(&conf, "/srv/containers.conf");
        nspawn.push(
            "--bind-ro=/srv/containers.conf:/etc/containers/containers.conf.d/50-test-machine.conf"
                .into(),
        );
        nspawn.push("--boot".into());
        let sandbox = sandbox
            .command(&nspawn)
            .unwrap()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut host = Host {
            sandbox,
            cgroup,
            nspawn: 0,
            leader: 0,
            _dir: dir,
        };
        (host.nspawn, host.leader) = host.find_leader();
        host.wait_booted();
        host
    }

    /// nspawn and systemd, its child, among the sandbox's descendants.
    fn find_leader(&mut self) -> (u32, u32) {
        let started = Instant::now();
        loop {
            let mut parents = vec![self.sandbox.id()];
            while let Some(pid) = parents.pop() {
                let children = fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
                    .unwrap_or_default();
                for child in children.split_whitespace() {
                    let child: u32 = child.parse().unwrap();
                    let comm =
                        fs::read_to_string(format!("/proc/{child}/comm")).unwrap_or_default();
                    if comm.trim() == "systemd" {
                        return (pid, child);
                    }
                    parents.push(child);
                }
            }
            if let Ok(Some(status)) = self.sandbox.try_wait() {
                panic!("systemd-nspawn exited ({status}) before the host's systemd started");
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the host's systemd did not start within a minute"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn wait_booted(&self) {
        let started = Instant::now();
        loop {
            let state = stdout_of(&self.sh("systemctl is-system-running"));
            match state.trim() {
                "running" => return,
                "degraded" => {
                    let failed = stdout_of(&self.sh("systemctl --failed --no-legend"));
                    panic!("the plain host booted degraded:\n{failed}");
                }
                _ => {}
            }
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "the host's systemd is still {state:?} after two minutes"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// `sh -c script` inside the host, as root, in all its namespaces.
    pub fn sh(&self, script: &str) -> Output {
        exec::command("nsenter")
            .arg("--target")
            .arg(self.leader.to_string())
            .args(["--all", "--root", "--wd", "env", "-i"])
            .args([
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "LANG=C.UTF-8",
                "sh",
                "-c",
                script,
            ])
            .output()
            .unwrap()
    }

    /// Like [`Host::sh`], failing the test on a non-zero exit; its stdout.
    pub fn sh_ok(&self, script: &str) -> String {
        let out = self.sh(script);
        assert!(
            out.status.success(),
            "{script:?} on the host failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        stdout_of(&out)
    }
}

fn stdout_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Drop for Host {
    /// Powers the host off (nspawn passes SIGTERM on as a shutdown), killed
    /// if it takes longer than a minute.
    fn drop(&mut self) {
        let _ = exec::command("kill")
            .args(["-TERM", &self.nspawn.to_string()])
            .stderr(Stdio::null())
            .status();
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(60) {
            if let Ok(Some(_)) = self.sandbox.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        // A host that did not stop in time: killed.
        let _ = self.sandbox.kill();
        let _ = exec::command("kill")
            .args(["-KILL", &self.nspawn.to_string()])
            .stderr(Stdio::null())
            .status();
        let _ = self.sandbox.wait();
        remove_cgroup(&self.cgroup);
    }
}

/// Removes the host's cgroup tree (empty once its processes are gone),
/// deepest first, from wherever the machine mounts cgroup v2.
fn remove_cgroup(name: &str) {
    for base in ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"] {
        let top = Path::new(base).join(name);
        if !top.is_dir() {
            continue;
        }
        let mut dirs = vec![top.clone()];
        let mut i = 0;
        while i < dirs.len() {
            if let Ok(entries) = fs::read_dir(&dirs[i]) {
                for e in entries.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        dirs.push(e.path());
                    }
                }
            }
            i += 1;
        }
        for dir in dirs.iter().rev() {
            let _ = fs::remove_dir(dir);
        }
    }
}
