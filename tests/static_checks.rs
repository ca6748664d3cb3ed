//! Issue 3, proof 1 ("static"): every file the vps profile renders goes
//! through the program that reads it in production, as Debian trixie ships
//! it (the tools root of `cargo xtask tools`): podman 5's quadlet generator,
//! `systemd-analyze verify`, systemd-tmpfiles and -sysusers, `nginx -t`,
//! `caddy validate`, Traefik's own start-up; and every YAML, JSON and TOML
//! file parses back with duplicate keys refused.
//!
//! Renders run with each proxy the profile offers, with default and with
//! non-default site values (only values that some layer of the profile
//! declares, so the test follows the layers as they land). A proxy's checks
//! skip only while no layer for that proxy exists; once one exists, a render
//! without its config fails.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;

use common::tools::{Sandbox, ToolsRoot};
use common::EPOCH;
use serde_json::Value;

const PROFILE: &str = "vps";
const QUADLET_DIR: &str = "usr/share/containers/systemd";
const QUADLET_EXTS: &[&str] = &[
    "container",
    "network",
    "volume",
    "pod",
    "image",
    "kube",
    "build",
];
const UNIT_DIRS: &[&str] = &["usr/lib/systemd/system", "etc/systemd/system"];
const UNIT_EXTS: &[&str] = &[
    "service",
    "target",
    "timer",
    "socket",
    "path",
    "mount",
    "automount",
    "swap",
    "slice",
];

// ---------------------------------------------------------------------------
// What the profile offers, and the renders to check

/// The project's layers and the site values the profile's layers declare.
struct Catalog {
    layers: Vec<Value>,
    values: BTreeMap<String, Value>,
}

/// The project checked: this repository, or `STATIC_CHECKS_PROJECT` (a
/// scratch copy, to try a layer before it joins a profile here).
fn project() -> PathBuf {
    std::env::var_os("STATIC_CHECKS_PROJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

fn builder(args: &[&str], cache: &Path) -> Output {
    exec::command(env!("CARGO_BIN_EXE_builder"))
        .arg("--project")
        .arg(project())
        .args(args)
        .env("SOURCE_DATE_EPOCH", EPOCH)
        .env("BUILDER_CACHE_DIR", cache)
        .env_remove("XDG_CACHE_HOME")
        .output()
        .unwrap()
}

impl Catalog {
    fn load() -> Catalog {
        let tmp = tempfile::tempdir().unwrap();
        let profiles = builder(&["profiles", "--json"], tmp.path());
        common::assert_exit(&profiles, 0);
        let profiles = common::json(&profiles);
        let in_profile: BTreeSet<String> = profiles["profiles"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == PROFILE)
            .unwrap_or_else(|| panic!("no profile {PROFILE}"))["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l.as_str().unwrap().to_string())
            .collect();
        let layers = builder(&["layers", "--json"], tmp.path());
        common::assert_exit(&layers, 0);
        let layers = common::json(&layers)["layers"].as_array().unwrap().clone();
        let mut values = BTreeMap::new();
        for layer in &layers {
            if in_profile.contains(layer["name"].as_str().unwrap()) {
                for v in layer["values"].as_array().unwrap() {
                    values.insert(v["name"].as_str().unwrap().to_string(), v.clone());
                }
            }
        }
        Catalog { layers, values }
    }

    /// The layer that serves `proxy`, if any exists in layers/ (in the
    /// profile or not): named `proxy-<proxy>`, or included `when proxy = ..`.
    fn proxy_layer(&self, proxy: &str) -> Option<String> {
        self.layers
            .iter()
            .find(|l| l["name"] == format!("proxy-{proxy}") || l["when"]["proxy"] == proxy)
            .map(|l| l["name"].as_str().unwrap().to_string())
    }

    /// The proxies the profile's `proxy` value offers (None: no such value).
    fn proxy_choices(&self) -> Option<Vec<String>> {
        self.values.get("proxy").map(|v| {
            v["choices"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c.as_str().unwrap().to_string())
                .collect()
        })
    }

    /// Non-default settings for every value the profile declares that can
    /// take one without knowing what it means.
    fn non_default_sets(&self) -> Vec<(String, String)> {
        let mut sets = Vec::new();
        for (name, spec) in &self.values {
            let default = &spec["default"];
            let value = match (spec["type"].as_str().unwrap(), name.as_str()) {
                (_, "proxy") => None,
                // Off only in its own variant: federation_8448 = true needs it on.
                (_, "federation") => None,
                ("server_name", _) => Some("chat.example.net".to_string()),
                ("hostname", "matrix_host") => Some("hs.chat.example.net".to_string()),
                ("hostname", _) => Some(format!("{}.chat.example.net", name.replace('_', "-"))),
                ("size", _) => Some("100M".to_string()),
                ("bool", _) => Some((!default.as_bool().unwrap_or(false)).to_string()),
                ("email", _) => Some("ops@chat.example.net".to_string()),
                // A local Pebble, never a real CA (and the checks run offline).
                ("url", n) if n.contains("acme") => Some("https://127.0.0.1:14000/dir".to_string()),
                ("url", _) => Some("https://element.chat.example.net/".to_string()),
                ("enum", _) => spec["choices"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|c| *c != default)
                    .map(|c| c.as_str().unwrap().to_string()),
                ("string", "podman_subnet") => Some("10.77.12.0/24".to_string()),
                ("string", "admin_user") => Some("ops.admin".to_string()),
                // systemd calendar specs (the timers' OnCalendar=, verified below)
                ("string", "update_window") => Some("Mon..Fri *-*-* 02:30:00".to_string()),
                ("string", "backup_schedule") => Some("*-*-* 03:15:00".to_string()),
                ("int", n) if n.starts_with("backup_keep_") => Some("14".to_string()),
                // Every bridge, with the Telegram app credentials it then needs.
                ("list", "bridges") => Some(
                    spec["choices"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|c| c.as_str().unwrap())
                        .collect::<Vec<_>>()
                        .join(","),
                ),
                ("int", "telegram_api_id") => Some("1234567".to_string()),
                ("string", "telegram_api_hash") => {
                    Some("0123456789abcdef0123456789abcdef".to_string())
                }
                _ => None,
            };
            if let Some(value) = value {
                sets.push((name.clone(), value));
            }
        }
        sets
    }

    /// Default and non-default values, each with `proxy` if given and offered.
    fn variants(&self, proxy: Option<&str>) -> Vec<Variant> {
        let with_proxy = |mut sets: Vec<(String, String)>| {
            if let Some(p) = proxy {
                sets.push(("proxy".to_string(), p.to_string()));
            }
            sets
        };
        let tag = proxy.map(|p| format!("proxy={p}, ")).unwrap_or_default();
        let mut variants = vec![
            Variant {
                label: format!("{tag}defaults"),
                sets: with_proxy(Vec::new()),
            },
            Variant {
                label: format!("{tag}non-default values"),
                sets: with_proxy(self.non_default_sets()),
            },
        ];
        // An isolated server: the other non-default values without the 8448 port.
        if self.values.contains_key("federation") {
            let mut sets: Vec<(String, String)> = self
                .non_default_sets()
                .into_iter()
                .filter(|(name, _)| name != "federation_8448")
                .collect();
            sets.push(("federation".to_string(), "false".to_string()));
            variants.push(Variant {
                label: format!("{tag}non-default values, federation = false"),
                sets: with_proxy(sets),
            });
        }
        variants
    }

    /// Every render to check: each offered proxy (or none, before the
    /// `proxy` value exists), each with default and non-default values.
    fn all_variants(&self) -> Vec<Variant> {
        match self.proxy_choices() {
            None => self.variants(None),
            Some(choices) => choices
                .iter()
                .flat_map(|p| self.variants(Some(p)))
                .collect(),
        }
    }
}

struct Variant {
    label: String,
    sets: Vec<(String, String)>,
}

impl Variant {
    fn value<'a>(&'a self, name: &str, default: &'a str) -> &'a str {
        self.sets
            .iter()
            .find(|(n, _)| n == name)
            .map_or(default, |(_, v)| v.as_str())
    }
}

/// A rendered tree in its own temporary directory.
struct Rendered {
    dir: tempfile::TempDir,
    tree: PathBuf,
    label: String,
    server_name: String,
    matrix_host: String,
}

fn render(variant: &Variant) -> Rendered {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    let mut args = vec![
        "render".to_string(),
        "--profile".into(),
        PROFILE.into(),
        "--out".into(),
        tree.to_str().unwrap().into(),
    ];
    let mut shown = Vec::new();
    for (name, value) in &variant.sets {
        args.push("--set".into());
        args.push(format!("{name}={value}"));
        shown.push(format!("{name}={value}"));
    }
    // Images stay upstream (building them takes minutes per render);
    // tests/images.rs checks the units of embedded images.
    if !variant.sets.iter().any(|(name, _)| name == "pull_images") {
        args.extend(["--set".into(), "pull_images=true".into()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = builder(&args, &dir.path().join("cache"));
    assert!(
        out.status.success(),
        "builder render --profile {PROFILE} {} failed:\n{}",
        shown.join(" "),
        common::stderr(&out)
    );
    let server_name = variant.value("server_name", "example.org").to_string();
    let host_part = server_name.split(':').next().unwrap().to_string();
    let matrix_host = variant
        .value("matrix_host", &format!("matrix.{host_part}"))
        .to_string();
    Rendered {
        dir,
        tree,
        label: format!("{} [{}]", variant.label, shown.join(" ")),
        server_name: host_part,
        matrix_host,
    }
}

/// Every entry under `dir` (relative paths, sorted), symlinks not followed.
fn walk(dir: &Path) -> Vec<(PathBuf, fs::FileType)> {
    fn go(base: &Path, dir: &Path, out: &mut Vec<(PathBuf, fs::FileType)>) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for entry in entries {
            let entry = entry.unwrap();
            let ft = entry.file_type().unwrap();
            out.push((entry.path().strip_prefix(base).unwrap().to_path_buf(), ft));
            if ft.is_dir() {
                go(base, &entry.path(), out);
            }
        }
    }
    let mut out = Vec::new();
    go(dir, dir, &mut out);
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn ext(path: &Path) -> &str {
    path.extension().and_then(|e| e.to_str()).unwrap_or("")
}

fn output_text(o: &Output) -> String {
    format!("{}{}", common::stdout(o), common::stderr(o))
}

/// Collects failures so that one run reports all of them.
#[derive(Default)]
struct Failures(Vec<String>);

impl Failures {
    fn add(&mut self, what: String) {
        self.0.push(what);
    }

    fn assert_none(self, check: &str) {
        assert!(
            self.0.is_empty(),
            "{check}: {} failure(s)\n\n{}",
            self.0.len(),
            self.0.join("\n\n")
        );
    }
}

// ---------------------------------------------------------------------------
// Quadlets and systemd units

/// The unit quadlet makes from a source file (podman-systemd.unit(5)).
fn quadlet_unit_name(path: &Path, text: &str) -> String {
    if let Some(name) = ini_values(text, "ServiceName").last() {
        return format!("{name}.service");
    }
    let stem = path.file_stem().unwrap().to_str().unwrap();
    match ext(path) {
        "container" | "kube" => format!("{stem}.service"),
        other => format!("{stem}-{other}.service"),
    }
}

/// The values of `key=` lines (any section), in order.
fn ini_values(text: &str, key: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.trim().split_once('=')?;
            (k.trim() == key).then(|| v.trim().to_string())
        })
        .collect()
}

fn quadlet_sources(tree: &Path) -> Vec<PathBuf> {
    walk(&tree.join(QUADLET_DIR))
        .into_iter()
        .filter(|(p, ft)| !ft.is_dir() && QUADLET_EXTS.contains(&ext(p)))
        .map(|(p, _)| Path::new(QUADLET_DIR).join(p))
        .collect()
}

#[test]
fn quadlets_generate_their_units_without_warnings() {
    let tools = ToolsRoot::get();
    let catalog = Catalog::load();
    let mut failures = Failures::default();
    for variant in catalog.all_variants() {
        let r = render(&variant);
        let sources = quadlet_sources(&r.tree);
        if sources.is_empty() {
            failures.add(format!("{}: no quadlet under /{QUADLET_DIR}", r.label));
            continue;
        }
        let sandbox = Sandbox {
            trees: vec![r.tree.clone()],
            offline: true,
            ..Sandbox::default()
        };
        let out = tools
            .command_in(&sandbox, "/usr/libexec/podman/quadlet", &["-dryrun"])
            .env("QUADLET_UNIT_DIRS", format!("/{QUADLET_DIR}"))
            .output()
            .unwrap();
        let stdout = common::stdout(&out);
        // -dryrun always logs "Loading source unit file ..." for each source.
        let stderr = common::stderr(&out);
        let noise: Vec<&str> = stderr
            .lines()
            .filter(|l| !l.contains(": Loading source unit file "))
            .collect::<Vec<_>>();
        if !out.status.success() || !noise.is_empty() {
            failures.add(format!(
                "{}: quadlet -dryrun exit {:?}:\n{}",
                r.label,
                out.status.code(),
                noise.join("\n")
            ));
        }
        let generated: BTreeSet<&str> = stdout
            .lines()
            .filter_map(|l| l.strip_prefix("---")?.strip_suffix("---"))
            .collect();
        for source in &sources {
            let text = fs::read_to_string(r.tree.join(source)).unwrap();
            let unit = quadlet_unit_name(source, &text);
            if !generated.contains(unit.as_str()) {
                failures.add(format!(
                    "{}: /{} yields no {unit} (quadlet generated: {generated:?})",
                    r.label,
                    source.display()
                ));
            }
        }
    }
    failures.assert_none("quadlet generator");
}

/// The unit files the layers ship (image paths), symlinks left out.
fn shipped_units(tree: &Path) -> Vec<String> {
    let mut units = Vec::new();
    for dir in UNIT_DIRS {
        for (p, ft) in walk(&tree.join(dir)) {
            if ft.is_file() && UNIT_EXTS.contains(&ext(&p)) {
                units.push(format!("/{dir}/{}", p.display()));
            }
        }
    }
    units
}

/// `systemd-analyze verify` on the layers' units and on what quadlet makes
/// of the quadlets, exactly where systemd finds them at boot: the rendered
/// tree laid over the trixie root (so ExecStart= scripts from the image
/// resolve), the generator's output in /run/systemd/generator. Any output
/// is a failure. `--man=no`: the tools root has no man pages to look up.
#[test]
fn systemd_analyze_verify_is_silent_on_every_unit() {
    let tools = ToolsRoot::get();
    let catalog = Catalog::load();
    let mut failures = Failures::default();
    const SCRIPT: &str = r#"set -eu
g=/run/systemd/generator
mkdir -p $g $g.early $g.late
/usr/libexec/podman/quadlet $g $g.early $g.late
for f in $g/*.service; do [ -e "$f" ] && set -- "$@" "$f"; done
[ "$#" -gt 0 ] || { echo "no unit to verify"; exit 1; }
printf '%s\n' "$@" >/run/verified-units
exec systemd-analyze verify --man=no "$@"
"#;
    for variant in catalog.all_variants() {
        let r = render(&variant);
        let sandbox = Sandbox {
            trees: vec![r.tree.clone()],
            offline: true,
            ..Sandbox::default()
        };
        let units = shipped_units(&r.tree);
        let mut args = vec!["-c", SCRIPT, "sh"];
        args.extend(units.iter().map(String::as_str));
        let out = tools.command_in(&sandbox, "sh", &args).output().unwrap();
        let text = output_text(&out);
        if !out.status.success() || !text.trim().is_empty() {
            failures.add(format!(
                "{}: systemd-analyze verify (units: {} shipped + quadlet's) exit {:?}:\n{text}",
                r.label,
                units.len(),
                out.status.code()
            ));
        }
    }
    failures.assert_none("systemd-analyze verify");
}

/// systemd-sysusers, then systemd-tmpfiles --create --boot, for real, on the
/// layers' own files, in a throwaway copy of the root: both must be silent.
#[test]
fn sysusers_and_tmpfiles_apply_silently() {
    let tools = ToolsRoot::get();
    let catalog = Catalog::load();
    let mut failures = Failures::default();
    for variant in catalog.all_variants() {
        let r = render(&variant);
        let files = |dir: &str, ext_: &str| -> Vec<String> {
            walk(&r.tree.join(dir))
                .into_iter()
                .filter(|(p, ft)| !ft.is_dir() && ext(p) == ext_)
                .map(|(p, _)| format!("/{dir}/{}", p.display()))
                .collect()
        };
        let sysusers = files("usr/lib/sysusers.d", "conf");
        let tmpfiles = files("usr/lib/tmpfiles.d", "conf");
        let sandbox = Sandbox {
            trees: vec![r.tree.clone()],
            offline: true,
            ..Sandbox::default()
        };
        for (program, mut args, files) in [
            ("systemd-sysusers", vec![], &sysusers),
            ("systemd-tmpfiles", vec!["--create", "--boot"], &tmpfiles),
        ] {
            if files.is_empty() {
                continue;
            }
            let mut script = String::from("set -eu\n");
            if program == "systemd-tmpfiles" && !sysusers.is_empty() {
                // tmpfiles may name the users sysusers creates.
                script += &format!("systemd-sysusers {} >/dev/null 2>&1\n", sysusers.join(" "));
            }
            args.extend(files.iter().map(String::as_str));
            script += &format!("exec {program} {}\n", args.join(" "));
            let out = tools
                .command_in(&sandbox, "sh", &["-c", &script])
                .output()
                .unwrap();
            let text = output_text(&out);
            if !out.status.success() || !text.trim().is_empty() {
                failures.add(format!(
                    "{}: {program} {} exit {:?}:\n{text}",
                    r.label,
                    args.join(" "),
                    out.status.code()
                ));
            }
        }
    }
    failures.assert_none("sysusers/tmpfiles");
}

// ---------------------------------------------------------------------------
// Proxies

/// Where a proxy's files are, in the rendered tree and in its container.
struct ProxyFiles {
    /// Rendered files of this proxy (image paths without the leading /),
    /// quadlets and units left out.
    configs: Vec<PathBuf>,
    /// The proxy's quadlet, if any: `Volume=`/`Mount=` bind sources and
    /// destinations.
    mounts: Vec<(String, String)>,
    container: Option<PathBuf>,
}

fn proxy_files(tree: &Path, proxy: &str) -> ProxyFiles {
    let entries = walk(tree);
    let is_config = |p: &Path, ft: &fs::FileType| {
        let path = p.to_string_lossy();
        !ft.is_dir()
            && !path.starts_with(QUADLET_DIR)
            && !UNIT_DIRS.iter().any(|d| path.starts_with(d))
            && !path.starts_with("usr/share/doc")
    };
    // Files named after the proxy, and what lies beside them in a config
    // directory (e.g. usr/share/matrix-appliance/proxy/ holds nginx.conf and
    // the snippets it includes).
    let mut dirs = BTreeSet::new();
    for (p, ft) in &entries {
        if is_config(p, ft) && p.to_string_lossy().to_lowercase().contains(proxy) {
            let dir = p.parent().unwrap().to_path_buf();
            if dir.starts_with("usr/share/matrix-appliance") || dir.starts_with("etc") {
                dirs.insert(dir);
            } else {
                dirs.insert(p.clone());
            }
        }
    }
    let configs: Vec<PathBuf> = entries
        .into_iter()
        .filter(|(p, ft)| is_config(p, ft) && dirs.iter().any(|d| p.starts_with(d)))
        .map(|(p, _)| p)
        .collect();
    let mut container = None;
    let mut mounts = Vec::new();
    for source in quadlet_sources(tree) {
        if ext(&source) != "container" {
            continue;
        }
        let text = fs::read_to_string(tree.join(&source)).unwrap();
        let name = ini_values(&text, "ContainerName").join("");
        let image = ini_values(&text, "Image").join("");
        let ours = image.contains(proxy)
            || (name == "matrix-proxy" && source.to_string_lossy().contains(proxy));
        if !ours {
            continue;
        }
        for v in ini_values(&text, "Volume") {
            let mut parts = v.splitn(3, ':');
            if let (Some(src), Some(dst)) = (parts.next(), parts.next()) {
                mounts.push((src.to_string(), dst.to_string()));
            }
        }
        for m in ini_values(&text, "Mount") {
            let kv: BTreeMap<&str, &str> = m.split(',').filter_map(|p| p.split_once('=')).collect();
            let src = kv.get("source").or(kv.get("src"));
            let dst = kv.get("destination").or(kv.get("dst")).or(kv.get("target"));
            if let (Some(src), Some(dst)) = (src, dst) {
                mounts.push((src.to_string(), dst.to_string()));
            }
        }
        container = Some(source);
    }
    ProxyFiles {
        configs,
        mounts,
        container,
    }
}

/// A proxy's view of the files: the rendered tree at its image paths, each
/// container bind at its container path (image files from the tree, state
/// from a scratch directory), a hosts file naming the stack's containers,
/// and throwaway certificates wherever the config names one.
struct ProxyView {
    sandbox: Sandbox,
    scratch: PathBuf,
}

impl ProxyView {
    fn new(tools: &ToolsRoot, r: &Rendered, files: &ProxyFiles) -> ProxyView {
        let scratch = r.dir.path().join("proxy");
        let state = scratch.join("state");
        fs::create_dir_all(state.join("var/lib/matrix/proxy")).unwrap();
        let mut binds = vec![(state.join("var/lib/matrix"), "/var/lib/matrix".to_string())];
        for (i, (src, dst)) in files.mounts.iter().enumerate() {
            let host = if let Some(rel) = src.strip_prefix('/') {
                let in_tree = r.tree.join(rel);
                if in_tree.exists() {
                    in_tree
                } else if rel.starts_with("var/") || rel.starts_with("run/") {
                    let host = state.join(rel);
                    make_mount_source(&host);
                    host
                } else {
                    continue; // a host file such as /etc/localtime
                }
            } else {
                // a named volume: empty at first start
                let host = scratch.join(format!("volume-{i}"));
                fs::create_dir_all(&host).unwrap();
                host
            };
            binds.push((host, dst.clone()));
        }

        let mut names: BTreeSet<String> = ["matrix-synapse", "matrix-postgres", "matrix-proxy"]
            .map(String::from)
            .into();
        for source in quadlet_sources(&r.tree) {
            let text = fs::read_to_string(r.tree.join(source)).unwrap();
            names.extend(ini_values(&text, "ContainerName"));
        }
        names.insert(r.server_name.clone());
        names.insert(r.matrix_host.clone());
        let hosts = scratch.join("hosts");
        let names: Vec<String> = names.into_iter().collect();
        fs::write(
            &hosts,
            format!("127.0.0.1 localhost {}\n::1 localhost\n", names.join(" ")),
        )
        .unwrap();
        binds.push((hosts, common::bind_target(&r.tree, "/etc/hosts")));

        let mut view = ProxyView {
            sandbox: Sandbox {
                trees: vec![r.tree.clone()],
                binds,
                offline: true,
                ..Sandbox::default()
            },
            scratch,
        };
        view.add_certificates(tools, r, files);
        view
    }

    /// A self-signed certificate at every path the config names as one.
    fn add_certificates(&mut self, tools: &ToolsRoot, r: &Rendered, files: &ProxyFiles) {
        let mut paths = BTreeSet::new();
        for config in &files.configs {
            let Ok(text) = fs::read_to_string(r.tree.join(config)) else {
                continue;
            };
            for line in text.lines() {
                let line = line.trim();
                if line.starts_with('#') {
                    continue;
                }
                let words: Vec<&str> = line
                    .split(|c: char| c.is_whitespace() || c == ';' || c == '"' || c == '\'')
                    .filter(|w| !w.is_empty())
                    .collect();
                let Some(first) = words.first() else { continue };
                let key = first.trim_end_matches([':', '=']);
                let take: &[usize] = match key {
                    // nginx
                    "ssl_certificate"
                    | "ssl_certificate_key"
                    | "ssl_trusted_certificate"
                    | "ssl_client_certificate"
                    | "ssl_dhparam" => &[1],
                    // Traefik (YAML `certFile: x`, TOML `certFile = x`)
                    "certFile" | "keyFile" | "caFile" => &[1, 2],
                    // Caddyfile `tls cert key`
                    "tls" => &[1, 2],
                    _ => &[],
                };
                for &i in take {
                    if let Some(w) = words.get(i) {
                        if w.starts_with('/') && !w.contains(['$', '{']) {
                            paths.insert(w.to_string());
                        }
                    }
                }
            }
        }
        if paths.is_empty() {
            return;
        }
        let certs = self.scratch.join("certs");
        fs::create_dir_all(&certs).unwrap();
        let san = format!(
            "subjectAltName=DNS:{},DNS:{},DNS:localhost",
            r.matrix_host, r.server_name
        );
        let subject = format!("/CN={}", r.matrix_host);
        let script = "set -eu
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
  -keyout /certs/key.pem -out /certs/cert.pem -days 7 -subj \"$1\" -addext \"$2\" 2>/dev/null
openssl genpkey -genparam -algorithm DH -pkeyopt dh_param:ffdhe2048 -out /certs/dhparam.pem
";
        let out = tools
            .command(
                &[(&certs, "/certs")],
                "sh",
                &["-c", script, "sh", &subject, &san],
            )
            .output()
            .unwrap();
        common::assert_exit(&out, 0);
        for path in paths {
            let name = Path::new(&path).file_name().unwrap().to_string_lossy();
            let source = if name.contains("dhparam") {
                "dhparam.pem"
            } else if name.contains("key") {
                "key.pem"
            } else {
                "cert.pem"
            };
            self.sandbox.binds.push((certs.join(source), path));
        }
    }

    /// Where a rendered file appears inside the container, else its image path.
    fn container_path(&self, r: &Rendered, rel: &Path) -> Vec<String> {
        let mut paths = Vec::new();
        let file = r.tree.join(rel);
        for (host, inside) in &self.sandbox.binds {
            if let Ok(rest) = file.strip_prefix(host) {
                if rest.as_os_str().is_empty() {
                    paths.push(inside.clone());
                } else {
                    paths.push(format!(
                        "{}/{}",
                        inside.trim_end_matches('/'),
                        rest.display()
                    ));
                }
            }
        }
        paths.push(format!("/{}", rel.display()));
        paths
    }

    /// The main config: the rendered file that lands at one of `known`
    /// container paths, else the first rendered file `is_main` accepts.
    fn main_config(
        &self,
        r: &Rendered,
        files: &ProxyFiles,
        known: &[&str],
        is_main: impl Fn(&str) -> bool,
    ) -> Option<String> {
        for config in &files.configs {
            for p in self.container_path(r, config) {
                if known.contains(&p.as_str()) {
                    return Some(p);
                }
            }
        }
        files
            .configs
            .iter()
            .find(|c| is_main(&c.file_name().unwrap().to_string_lossy()))
            .map(|c| format!("/{}", c.display()))
    }
}

fn make_mount_source(host: &Path) {
    let name = host.file_name().unwrap().to_string_lossy();
    let looks_like_file = [
        ".json", ".pem", ".crt", ".key", ".conf", ".yml", ".yaml", ".toml",
    ]
    .iter()
    .any(|e| name.ends_with(e));
    if looks_like_file {
        fs::create_dir_all(host.parent().unwrap()).unwrap();
        fs::write(host, "").unwrap();
        // Traefik refuses an ACME store that others can read.
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(host, fs::Permissions::from_mode(0o600)).unwrap();
    } else {
        fs::create_dir_all(host).unwrap();
    }
}

/// Runs `check` on each render for `proxy`, or says why there is none.
fn for_each_proxy_render(
    proxy: &str,
    check: impl Fn(&ToolsRoot, &Rendered, &ProxyFiles) -> Result<(), String> + Sync,
) {
    let catalog = Catalog::load();
    let layer = catalog.proxy_layer(proxy);
    let variants = match catalog.proxy_choices() {
        Some(choices) if choices.iter().any(|c| c == proxy) => catalog.variants(Some(proxy)),
        Some(_) => {
            if let Some(layer) = &layer {
                panic!("layer {layer} exists, but the {PROFILE} profile's `proxy` value does not offer {proxy}");
            }
            Vec::new()
        }
        None => catalog.variants(None),
    };
    let tools = ToolsRoot::get();
    let mut failures = Failures::default();
    let mut checked = 0;
    // Renders are independent: check them side by side (Traefik runs for
    // seconds each).
    let results: Vec<(String, Option<Result<(), String>>)> = std::thread::scope(|s| {
        let handles: Vec<_> = variants
            .iter()
            .map(|variant| {
                let (tools, check) = (&tools, &check);
                s.spawn(move || {
                    let r = render(variant);
                    let files = proxy_files(&r.tree, proxy);
                    if files.configs.is_empty() && files.container.is_none() {
                        return (r.label.clone(), None);
                    }
                    (r.label.clone(), Some(check(tools, &r, &files)))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (label, result) in results {
        match result {
            None => {
                if let Some(layer) = &layer {
                    failures.add(format!(
                        "{label}: layer {layer} exists but the render has no {proxy} config \
                         (is it in profiles/{PROFILE}.toml, selected by `proxy`?)"
                    ));
                }
            }
            Some(result) => {
                checked += 1;
                if let Err(e) = result {
                    failures.add(format!("{label}: {e}"));
                }
            }
        }
    }
    if checked == 0 && failures.0.is_empty() {
        eprintln!("skipped: no {proxy} layer and no {proxy} config in the {PROFILE} render yet");
    }
    failures.assert_none(&format!("{proxy} config"));
}

#[test]
fn nginx_accepts_the_rendered_config() {
    for_each_proxy_render("nginx", |tools, r, files| {
        let mut view = ProxyView::new(tools, r, files);
        let main = view.main_config(r, files, &["/etc/nginx/nginx.conf"], |n| n == "nginx.conf");
        let main = match main {
            Some(main) => main,
            None => {
                // Server blocks only: the official image's nginx.conf around
                // them (conf.d/*.conf), plus any not bound into conf.d.
                let mut includes = String::new();
                for config in files.configs.iter().filter(|c| ext(c) == "conf") {
                    let inside = view.container_path(r, config);
                    if !inside.iter().any(|p| p.starts_with("/etc/nginx/conf.d/")) {
                        writeln!(includes, "    include {};", inside[0]).unwrap();
                    }
                }
                let wrapper = view.scratch.join("nginx.conf");
                fs::write(
                    &wrapper,
                    format!(
                        "user nginx;\nworker_processes auto;\npid /run/nginx.pid;\n\
                         events {{ worker_connections 1024; }}\n\
                         http {{\n    include /etc/nginx/mime.types;\n    \
                         default_type application/octet-stream;\n    \
                         include /etc/nginx/conf.d/*.conf;\n{includes}}}\n"
                    ),
                )
                .unwrap();
                view.sandbox
                    .binds
                    .push((wrapper, "/etc/nginx/nginx.conf".into()));
                "/etc/nginx/nginx.conf".to_string()
            }
        };
        let out = tools
            .command_in(&view.sandbox, "nginx", &["-t", "-q", "-c", &main])
            .output()
            .unwrap();
        let text = output_text(&out);
        if out.status.success() && text.trim().is_empty() {
            Ok(())
        } else {
            Err(format!(
                "nginx -t -q -c {main} exit {:?}:\n{text}",
                out.status.code()
            ))
        }
    });
}

#[test]
fn caddy_validates_the_rendered_config() {
    for_each_proxy_render("caddy", |tools, r, files| {
        let view = ProxyView::new(tools, r, files);
        let main = view
            .main_config(
                r,
                files,
                &["/etc/caddy/Caddyfile", "/etc/caddy/caddy.json"],
                |n| n.starts_with("Caddyfile") || n.ends_with(".caddyfile") || n.ends_with(".json"),
            )
            .ok_or_else(|| format!("no Caddyfile among {:?}", files.configs))?;
        let mut args = vec!["validate", "--config", &main];
        if !main.ends_with(".json") {
            args.extend(["--adapter", "caddyfile"]);
        }
        let out = tools
            .command_in(&view.sandbox, "caddy", &args)
            .env("HOME", "/tmp/caddy-home")
            .env("XDG_DATA_HOME", "/tmp/caddy-data")
            .env("XDG_CONFIG_HOME", "/tmp/caddy-config")
            .output()
            .unwrap();
        // Caddy logs JSON lines; anything at warn or above is a failure,
        // except OCSP stapling on our throwaway certificate (it names no
        // OCSP responder).
        let text = output_text(&out);
        let bad: Vec<&str> = text
            .lines()
            .filter(|l| {
                let level = serde_json::from_str::<Value>(l)
                    .ok()
                    .and_then(|v| v["level"].as_str().map(String::from));
                match level.as_deref() {
                    Some("info") | Some("debug") => false,
                    Some(_) => !l.contains("\"stapling OCSP\""),
                    None => !l.trim().is_empty() && l.trim() != "Valid configuration",
                }
            })
            .collect();
        if out.status.success() && bad.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "caddy {} exit {:?}:\n{}",
                args.join(" "),
                out.status.code(),
                if bad.is_empty() {
                    output_text(&out)
                } else {
                    bad.join("\n")
                }
            ))
        }
    });
}

/// Traefik has no validate command: it runs with the rendered static config
/// (which names the dynamic files) for a few seconds, offline, and must log
/// no error other than failing to reach the ACME server.
#[test]
fn traefik_starts_with_the_rendered_config() {
    for_each_proxy_render("traefik", |tools, r, files| {
        let mut view = ProxyView::new(tools, r, files);
        let main = view
            .main_config(
                r,
                files,
                &[
                    "/etc/traefik/traefik.yml",
                    "/etc/traefik/traefik.yaml",
                    "/etc/traefik/traefik.toml",
                ],
                |n| matches!(n, "traefik.yml" | "traefik.yaml" | "traefik.toml"),
            )
            .ok_or_else(|| format!("no traefik.yml among {:?}", files.configs))?;
        view.sandbox
            .binds
            .push((tools.venv_bin("traefik"), "/usr/local/bin/traefik".into()));
        let config_arg = format!("--configFile={main}");
        // Running is not enough (a bad dynamic file only logs an error): it must
        // listen on 443 within 5 s, then run on for a second, and log no error.
        const SCRIPT: &str = r#"traefik "$1" & pid=$!
for i in $(seq 50); do
    if ss -ltnH | grep -q ':443 '; then
        echo "traefik-check: listening on 443"
        sleep 1
        break
    fi
    kill -0 $pid 2>/dev/null || break
    sleep 0.1
done
if kill $pid 2>/dev/null; then wait $pid; echo "traefik-check: still running"; else wait $pid; echo "traefik-check: exited ($?)"; fi
"#;
        let out = tools
            .command_in(&view.sandbox, "sh", &["-c", SCRIPT, "sh", &config_arg])
            .output()
            .unwrap();
        let text = strip_ansi(&output_text(&out));
        let errors: Vec<&str> = text.lines().filter(|l| traefik_error(l)).collect();
        if !text.contains("traefik-check: still running") {
            Err(format!(
                "traefik {config_arg} did not keep running:\n{text}"
            ))
        } else if !text.contains("traefik-check: listening on 443") {
            Err(format!(
                "traefik {config_arg} did not listen on 443 within 5 s:\n{text}"
            ))
        } else if !errors.is_empty() {
            Err(format!(
                "traefik {config_arg} logged errors:\n{}",
                errors.join("\n")
            ))
        } else {
            Ok(())
        }
    });
}

/// An error line of Traefik's log (console or JSON format), other than the
/// ACME client failing to reach its CA from the offline namespace.
fn traefik_error(line: &str) -> bool {
    let level = match serde_json::from_str::<Value>(line) {
        Ok(v) => v["level"].as_str().unwrap_or("").to_lowercase(),
        Err(_) => line
            .split_whitespace()
            .find_map(|w| match w {
                "ERR" | "FTL" | "PNC" => Some("error".to_string()),
                w if w.starts_with("level=") => Some(w[6..].to_lowercase()),
                _ => None,
            })
            .unwrap_or_default(),
    };
    let is_error = matches!(level.as_str(), "error" | "fatal" | "panic");
    let unreachable_ca = line.contains("ACME")
        && [
            "network is unreachable",
            "dial tcp",
            "connection refused",
            "no such host",
        ]
        .iter()
        .any(|s| line.contains(s));
    is_error && !unreachable_ca
}

fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

// ---------------------------------------------------------------------------
// YAML, JSON and TOML parsed back

/// Every rendered YAML (also through PyYAML's safe loader, what Synapse
/// reads it with), JSON (including the extension-less well-known files) and
/// TOML file parses, with no key repeated in any mapping.
#[test]
fn every_yaml_json_and_toml_file_parses_without_duplicate_keys() {
    let tools = ToolsRoot::get();
    let catalog = Catalog::load();
    let mut failures = Failures::default();
    let python = tools.venv_bin("python3");
    for variant in catalog.all_variants() {
        let r = render(&variant);
        let mut yaml_files = Vec::new();
        for (rel, ft) in walk(&r.tree) {
            if !ft.is_file() {
                continue;
            }
            let path = r.tree.join(&rel);
            let well_known = rel.to_string_lossy().contains("well-known/matrix/");
            let result = match ext(&rel) {
                "yaml" | "yml" => {
                    yaml_files.push(path.clone());
                    check_yaml(&fs::read_to_string(&path).unwrap())
                }
                "json" => check_json(&fs::read_to_string(&path).unwrap()),
                _ if well_known => check_json(&fs::read_to_string(&path).unwrap()),
                "toml" => fs::read_to_string(&path)
                    .unwrap()
                    .parse::<toml::Table>()
                    .map(drop)
                    .map_err(|e| e.to_string()),
                _ => Ok(()),
            };
            if let Err(e) = result {
                failures.add(format!("{}: /{}: {e}", r.label, rel.display()));
            }
        }
        if !yaml_files.is_empty() {
            let out = exec::command(&python)
                .args(["-c", PYYAML_STRICT])
                .args(&yaml_files)
                .output()
                .unwrap();
            if !out.status.success() {
                failures.add(format!("{}: PyYAML:\n{}", r.label, output_text(&out)));
            }
        }
    }
    failures.assert_none("YAML/JSON/TOML parse-back");
}

/// PyYAML's SafeLoader (yaml.safe_load, as Synapse reads its config) with
/// duplicate keys refused.
const PYYAML_STRICT: &str = r#"
import sys, yaml
class Strict(yaml.SafeLoader):
    pass
def mapping(loader, node, deep=False):
    loader.flatten_mapping(node)
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, "duplicate key %r" % (key,), key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep)
Strict.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
bad = 0
for path in sys.argv[1:]:
    try:
        with open(path) as f:
            list(yaml.load_all(f, Loader=Strict))
    except yaml.YAMLError as e:
        print("%s: %s" % (path, e)); bad = 1
sys.exit(bad)
"#;

fn check_yaml(text: &str) -> Result<(), String> {
    for doc in serde_yaml::Deserializer::from_str(text) {
        serde::de::DeserializeSeed::deserialize(NoDuplicateKeys, doc).map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn check_json(text: &str) -> Result<(), String> {
    let mut de = serde_json::Deserializer::from_str(text);
    serde::de::DeserializeSeed::deserialize(NoDuplicateKeys, &mut de).map_err(|e| e.to_string())?;
    de.end().map_err(|e| e.to_string())
}

/// Walks any self-describing document and fails on a key seen twice in one
/// mapping (serde_json keeps the last one silently).
struct NoDuplicateKeys;

impl<'de> serde::de::DeserializeSeed<'de> for NoDuplicateKeys {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for NoDuplicateKeys {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_none<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(NoDuplicateKeys)?.is_some() {}
        Ok(())
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen = Vec::new();
        // Keys as YAML values: YAML keys need not be strings.
        while let Some(key) = map.next_key::<serde_yaml::Value>()? {
            if seen.contains(&key) {
                return Err(serde::de::Error::custom(format!(
                    "duplicate key {}",
                    serde_yaml::to_string(&key).unwrap_or_default().trim()
                )));
            }
            seen.push(key);
            map.next_value_seed(NoDuplicateKeys)?;
        }
        Ok(())
    }
    fn visit_enum<A: serde::de::EnumAccess<'de>>(self, data: A) -> Result<(), A::Error> {
        // serde_yaml reports a tagged value (`!tag x`) as an enum.
        use serde::de::VariantAccess;
        let (_, variant) = data.variant::<serde_yaml::Value>()?;
        variant.newtype_variant_seed(NoDuplicateKeys)
    }
}

/// Shell functions (`name() {` at the start of a line) that more than one of
/// `scripts` defines, with the files. A program's subcommand handlers
/// (`cmd_*`) are its own and may share names with another program's.
fn functions_defined_twice(tree: &Path, scripts: &[PathBuf]) -> Vec<(String, Vec<String>)> {
    let mut defined: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for script in scripts {
        let text = fs::read_to_string(tree.join(script)).unwrap_or_default();
        let names: BTreeSet<&str> = text
            .lines()
            .filter_map(|l| l.split_once("() {").map(|(name, _)| name))
            .filter(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
            .filter(|n| !n.starts_with("cmd_"))
            .collect();
        for name in names {
            defined
                .entry(name.to_string())
                .or_default()
                .push(script.display().to_string());
        }
    }
    defined
        .into_iter()
        .filter(|(_, files)| files.len() > 1)
        .collect()
}

/// A file that starts with a POSIX shell or bash shebang, or a sourced library
/// that names its shell for shellcheck.
fn is_shell_script(path: &Path) -> bool {
    let mut head = [0u8; 32];
    let n = fs::File::open(path)
        .and_then(|mut f| std::io::Read::read(&mut f, &mut head))
        .unwrap_or(0);
    let head = String::from_utf8_lossy(&head[..n]);
    [
        "#!/bin/sh",
        "#!/bin/bash",
        "#!/usr/bin/env sh",
        "#!/usr/bin/env bash",
        // a library the scripts source (shell-lib)
        "# shellcheck shell=sh",
    ]
    .iter()
    .any(|s| head.starts_with(s))
}

/// Every shell script the appliance ships (as rendered, with default and
/// non-default values, for each proxy), the local images' entrypoints, CI's
/// script and the VM test's in-guest check pass shellcheck, info level
/// included: a `# shellcheck` directive with its reason is the only way out.
/// No shell function of the appliance is defined in two files.
#[test]
fn every_shell_script_passes_shellcheck() {
    let tools = ToolsRoot::get();
    let catalog = Catalog::load();
    let mut failures = Failures::default();
    let mut trees: Vec<(String, PathBuf, tempfile::TempDir)> = Vec::new();
    for variant in catalog.all_variants() {
        let r = render(&variant);
        trees.push((r.label.clone(), r.tree.clone(), r.dir));
    }
    let repo = project();
    let mut checked = 0;
    let mut twice = Vec::new();
    let mut check = |label: &str, root: &Path, files: Vec<PathBuf>| {
        if files.is_empty() {
            return;
        }
        checked += files.len();
        // -x with the tree as source path: a script is checked together
        // with the shell-lib files it sources.
        let mut args: Vec<String> = vec!["--norc".into(), "-x".into(), "--source-path=/src".into()];
        args.extend(files.iter().map(|f| format!("/src/{}", f.display())));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = tools
            .command(&[(root, "/src")], "shellcheck", &args)
            .output()
            .unwrap();
        if !out.status.success() {
            failures.add(format!("{label}: shellcheck:\n{}", output_text(&out)));
        }
    };
    for (label, tree, _dir) in &trees {
        let scripts: Vec<PathBuf> = walk(tree)
            .into_iter()
            .filter(|(p, ft)| ft.is_file() && is_shell_script(&tree.join(p)))
            .map(|(p, _)| p)
            .collect();
        assert!(
            scripts.iter().any(|p| p.ends_with("usr/bin/matrixctl")),
            "{label}: no matrixctl among the shell scripts found: {scripts:?}"
        );
        for (name, files) in functions_defined_twice(tree, &scripts) {
            twice.push(format!(
                "{label}: the shell function {name}() is defined in {}: define it once, in shell-lib",
                files.join(" and ")
            ));
        }
        check(label, tree, scripts);
    }
    let mut own: Vec<PathBuf> = walk(&repo.join("images"))
        .into_iter()
        .filter(|(p, ft)| ft.is_file() && is_shell_script(&repo.join("images").join(p)))
        .map(|(p, _)| Path::new("images").join(p))
        .collect();
    own.push(PathBuf::from(".ci/run"));
    own.push(PathBuf::from("xtask/src/vm-check.sh"));
    own.push(PathBuf::from("xtask/src/vm-journal.sh"));
    check("the repository's own scripts", &repo, own);
    assert!(checked > 10, "only {checked} shell scripts found");
    for failure in twice {
        failures.add(failure);
    }
    failures.assert_none("shellcheck");
}

/// The native units the project ships that stay above 2.0 in
/// `systemd-analyze security`, each with why: their jobs need root's reach
/// (Podman, the disk, the network, the stack's units).
const EXPOSED_UNITS: &[(&str, &str)] = &[
    ("appliance-gpt-relocate.service", "rewrites the disk's partition table (sfdisk on the whole disk)"),
    ("matrix-appliance-health.service", "the health gate: matrixctl status (podman exec into the containers), boot counting on the ESP, a reboot into the previous version"),
    ("matrix-appliance-ready.service", "matrixctl status: systemctl and podman exec into the containers"),
    ("matrix-appliance-update.service", "systemd-sysupdate writes partitions and the ESP; the stack is stopped for the dump; a reboot"),
    ("matrix-backup.service", "pg_dump through podman exec, the stack's units, restic over the network to the remote repository"),
    ("matrix-backup-check.service", "restic check of the remote repository over the network"),
    ("matrix-firstboot-admin-user.service", "registers the admin through Synapse's API inside its container (podman exec)"),
    ("matrix-firstboot-databases.service", "roles and databases through psql inside PostgreSQL's container (podman exec)"),
    ("matrix-firstboot-signing-key.service", "Synapse's key generator inside its image (podman)"),
    ("matrix-postgres-upgrade.service", "runs PostgreSQL's containers (podman) to move the databases to another major"),
    ("matrix-proxy-certs.service", "the proxy's certificates: lego through podman (nginx), the proxy reloaded or restarted (systemctl), ACME over the network"),
    ("matrix-proxy-certs-renew.service", "as matrix-proxy-certs.service"),
    ("matrix-update-restore.service", "restores the pre-update dump into PostgreSQL's container (podman), stopping and starting the stack"),
];

/// Every native unit the project ships (not the quadlets' generated ones)
/// scores at most 2.0 in `systemd-analyze security --offline`, in every
/// rendered variant, unless [`EXPOSED_UNITS`] says why not; and no unit is
/// listed there that no longer needs to be.
#[test]
fn native_units_are_sandboxed_to_2_0_or_say_why() {
    let tools = ToolsRoot::get();
    let catalog = Catalog::load();
    let mut failures = Failures::default();
    let mut scores: BTreeMap<String, String> = BTreeMap::new();
    for variant in catalog.all_variants() {
        let r = render(&variant);
        let units_dir = r.tree.join("usr/lib/systemd/system");
        let units: Vec<String> = fs::read_dir(&units_dir)
            .unwrap()
            .map(|e| e.unwrap())
            .filter(|e| e.file_type().unwrap().is_file())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".service"))
            .collect();
        assert!(units.len() > 5, "{}: only {units:?}", r.label);
        let mut args = vec!["security", "--offline=yes", "--root=/src", "--no-pager"];
        args.extend(units.iter().map(String::as_str));
        let out = tools
            .command(&[(&r.tree, "/src")], "systemd-analyze", &args)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        for unit in &units {
            let prefix = format!("Overall exposure level for {unit}: ");
            let Some(score) = text
                .lines()
                .find_map(|l| l.split_once(&prefix).map(|(_, rest)| rest.to_string()))
            else {
                failures.add(format!(
                    "{}: no score for {unit}:\n{}",
                    r.label,
                    output_text(&out)
                ));
                continue;
            };
            let value: f64 = score.split_whitespace().next().unwrap().parse().unwrap();
            let exposed = EXPOSED_UNITS.iter().any(|(u, _)| u == unit);
            if value > 2.0 && !exposed {
                failures.add(format!(
                    "{}: {unit} scores {score} (above 2.0): sandbox it, or add it to EXPOSED_UNITS with why",
                    r.label
                ));
            }
            if value <= 2.0 && exposed {
                failures.add(format!(
                    "{}: {unit} scores {score}: take it off EXPOSED_UNITS",
                    r.label
                ));
            }
            scores.insert(unit.clone(), score);
        }
    }
    for (unit, score) in &scores {
        eprintln!("systemd-analyze security: {unit:<40} {score}");
    }
    failures.assert_none("systemd-analyze security");
}

/// Binds over a rendered /etc/hosts land on the file its link names.
#[test]
fn a_bind_over_a_link_goes_to_the_file_it_names() {
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir_all(dir.path().join("etc")).unwrap();
    std::os::unix::fs::symlink(
        "../usr/share/matrix-appliance/etc/hosts",
        dir.path().join("etc/hosts"),
    )
    .unwrap();
    std::os::unix::fs::symlink("/usr/lib/os-release", dir.path().join("etc/os-release")).unwrap();
    assert_eq!(
        common::bind_target(dir.path(), "/etc/hosts"),
        "/usr/share/matrix-appliance/etc/hosts"
    );
    assert_eq!(
        common::bind_target(dir.path(), "/etc/os-release"),
        "/usr/lib/os-release"
    );
    assert_eq!(common::bind_target(dir.path(), "/etc/fstab"), "/etc/fstab");
}
