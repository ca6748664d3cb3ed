//! Container images of a rendered tree run without podman (a stand-in,
//! named as such: podman cannot pull or run here, see tests/common/stack.rs):
//! each embedded image is unpacked by umoci from the appliance's own OCI
//! layout (`/usr/share/matrix-appliance/images`), and a container is its
//! root run in the stack's network namespace the way its quadlet asks —
//! Volume= binds, Environment= over the image's Env, Entrypoint=/Exec= over
//! the image's Entrypoint/Cmd, User=/Group= over the image's User,
//! ReadOnly=true as a read-only root with tmpfs on /tmp and /run — with the
//! stack's /etc/hosts for container names.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::stack::{quadlet, words, Stack};

pub const LAYOUT: &str = "usr/share/matrix-appliance/images";

/// An image unpacked for running: its root and its OCI config.
pub struct ImageRoot {
    pub rootfs: PathBuf,
    pub config: serde_json::Value,
}

/// The `config` object (Entrypoint, Cmd, Env, User...) of the image named
/// `reference` in the layout at `layout`.
pub fn image_config(layout: &Path, reference: &str) -> serde_json::Value {
    let read = |p: PathBuf| -> serde_json::Value {
        serde_json::from_slice(&fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
            .unwrap()
    };
    let blob = |d: &serde_json::Value| {
        layout
            .join("blobs/sha256")
            .join(d.as_str().unwrap().strip_prefix("sha256:").unwrap())
    };
    let index = read(layout.join("index.json"));
    let entry = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == reference)
        .unwrap_or_else(|| panic!("the layout has no image {reference}: {index}"));
    let manifest = read(blob(&entry["digest"]));
    read(blob(&manifest["config"]["digest"]))["config"].clone()
}

/// Unpacks `reference` from the rendered tree's layout with umoci into
/// `dir`/rootfs (umoci keeps owners and modes as root).
pub fn unpack(rendered: &Path, reference: &str, dir: &Path) -> ImageRoot {
    let layout = rendered.join(LAYOUT);
    let o = exec::command("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:{reference}", layout.display()))
        .arg(dir)
        .output()
        .expect("umoci is installed by cargo xtask test");
    assert!(
        o.status.success(),
        "umoci unpack {reference}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    ImageRoot {
        rootfs: dir.join("rootfs"),
        config: image_config(&layout, reference),
    }
}

fn list(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

/// How a container of `quadlet_file` runs from `image` (argv, user, env,
/// mounts), as podman would make it from the two.
pub struct Container {
    pub argv: Vec<String>,
    pub user: String,
    pub env: Vec<String>,
    /// (host path, path inside, read-only)
    pub mounts: Vec<(PathBuf, String, bool)>,
    pub read_only: bool,
    pub rootfs: PathBuf,
}

impl Stack {
    pub fn container(&self, quadlet_file: &str, image: &ImageRoot) -> Container {
        let q = quadlet(
            &self
                .rendered
                .join("usr/share/containers/systemd")
                .join(quadlet_file),
        );
        let c = &image.config;
        let entry = match q.get("Entrypoint") {
            Some(e) => words(&e[0]),
            None => list(&c["Entrypoint"]),
        };
        let cmd = match q.get("Exec") {
            Some(e) => words(&e[0]),
            None => list(&c["Cmd"]),
        };
        let argv: Vec<String> = entry.into_iter().chain(cmd).collect();
        assert!(!argv.is_empty(), "{quadlet_file}: nothing to run");
        let user = match (q.get("User"), q.get("Group")) {
            (Some(u), Some(g)) => format!("{}:{}", u[0], g[0]),
            (Some(u), None) => format!("{}:{}", u[0], u[0]),
            _ => c["User"].as_str().unwrap_or("0:0").to_string(),
        };
        let user = if user.contains(':') {
            user
        } else {
            format!("{user}:{user}")
        };
        let mut env: BTreeMap<String, String> = list(&c["Env"])
            .into_iter()
            .filter_map(|e| {
                e.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
            })
            .collect();
        env.extend(Self::quadlet_env(&q));
        let mut mounts = Vec::new();
        for v in q.get("Volume").into_iter().flatten() {
            let mut parts = v.split(':');
            let (host, inside) = (parts.next().unwrap(), parts.next().unwrap());
            let ro = parts
                .next()
                .is_some_and(|o| o.split(',').any(|o| o == "ro"));
            let source = match host.strip_prefix("/var/lib/matrix/") {
                Some(rest) => self.state.join(rest),
                None => self.rendered.join(host.trim_start_matches('/')),
            };
            mounts.push((source, inside.to_string(), ro));
        }
        mounts.push((self.hosts.clone(), "/etc/hosts".into(), true));
        Container {
            argv,
            user,
            env: env.into_iter().map(|(k, v)| format!("{k}={v}")).collect(),
            mounts,
            read_only: q.get("ReadOnly").is_some_and(|v| v[0] == "true"),
            rootfs: image.rootfs.clone(),
        }
    }

    /// The command that runs `argv` (or the container's own) in the
    /// container's root, in the stack's namespace.
    pub fn container_command(&self, c: &Container, argv: Option<&[&str]>) -> Command {
        // A PID namespace of its own: the container's processes die with
        // the command, even once they changed their user.
        let mut sandbox = exec::Sandbox::new(&c.rootfs)
            .netns(&self.netns)
            .pid_namespace();
        if c.read_only {
            for dir in ["/tmp", "/var/tmp", "/run"] {
                sandbox = sandbox.tmpfs(dir);
            }
            sandbox = sandbox.read_only_root();
        }
        for (host, inside, ro) in &c.mounts {
            sandbox = if *ro {
                sandbox.bind_ro(host, inside)
            } else {
                sandbox.bind(host, inside)
            };
        }
        let group = c.user.split(':').nth(1).unwrap();
        sandbox = sandbox.user(&c.user, group).clear_env();
        for e in &c.env {
            let (key, value) = e.split_once('=').unwrap();
            sandbox = sandbox.env(key, value);
        }
        let argv: Vec<String> = match argv {
            Some(a) => a.iter().map(|s| s.to_string()).collect(),
            None => c.argv.clone(),
        };
        sandbox
            .command(&argv)
            .unwrap_or_else(|e| panic!("the container's command: {e:#}"))
    }

    /// Starts the container of `quadlet_file` from `image`; its output goes
    /// to the stack's log `name`.
    pub fn start_image_container(&mut self, name: &str, quadlet_file: &str, image: &ImageRoot) {
        let c = self.container(quadlet_file, image);
        let log = fs::File::create(self.log_path(name)).unwrap();
        let mut cmd = self.container_command(&c, None);
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let child = cmd.spawn().unwrap();
        self.children.push((name.to_string(), child));
    }

    /// Runs `argv` in a fresh container of the same image and settings (as
    /// `podman exec` would in the running one); returns its output.
    pub fn exec_in(
        &self,
        quadlet_file: &str,
        image: &ImageRoot,
        argv: &[&str],
    ) -> std::process::Output {
        let c = self.container(quadlet_file, image);
        self.container_command(&c, Some(argv)).output().unwrap()
    }

    /// Polls the quadlet's HealthCmd inside the image until it passes.
    pub fn wait_healthy(
        &mut self,
        name: &str,
        quadlet_file: &str,
        image: &ImageRoot,
        timeout: Duration,
    ) {
        let q = quadlet(
            &self
                .rendered
                .join("usr/share/containers/systemd")
                .join(quadlet_file),
        );
        let health = words(&q["HealthCmd"][0]);
        let health: Vec<&str> = health.iter().map(String::as_str).collect();
        let start = Instant::now();
        loop {
            let o = self.exec_in(quadlet_file, image, &health);
            if o.status.success() {
                return;
            }
            if start.elapsed() > timeout {
                panic!(
                    "{name} never became healthy ({health:?}: {}{})\n--- log\n{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr),
                    self.log(name)
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}
