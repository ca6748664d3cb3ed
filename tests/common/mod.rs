//! Runs the real `builder` binary in temporary project copies.

#![allow(dead_code)]

pub mod host;
pub mod images;
pub mod stack;
pub mod tools;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const EPOCH: &str = "1700000000";

/// Where a bind mount over `path` (absolute, such as `/etc/hosts`) goes in a
/// rendered `tree`: when `path` is a symlink there (os-debian's `/etc/hosts`
/// links into `/usr`, the appliance extension), the file it names; else
/// `path` itself. A sandbox refuses to bind over a symlink.
pub fn bind_target(tree: &Path, path: &str) -> String {
    let Ok(link) = fs::read_link(tree.join(path.trim_start_matches('/'))) else {
        return path.to_string();
    };
    let mut parts: Vec<String> = if link.is_absolute() {
        Vec::new()
    } else {
        let parent = Path::new(path).parent().unwrap_or(Path::new("/"));
        (parent.iter().skip(1))
            .map(|c| c.to_string_lossy().into_owned())
            .collect()
    };
    for component in link.iter() {
        match component.to_str() {
            Some("/") | Some(".") => {}
            Some("..") => {
                parts.pop();
            }
            _ => parts.push(component.to_string_lossy().into_owned()),
        }
    }
    format!("/{}", parts.join("/"))
}

/// A copy of the project's shipped data (layers, profiles, images) in a
/// temporary directory, like a fresh clone, with its own cache.
pub struct Project {
    pub dir: tempfile::TempDir,
}

impl Project {
    pub fn copy_of_repo() -> Project {
        let dir = tempfile::tempdir().unwrap();
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
        for sub in ["layers", "profiles", "images"] {
            copy_tree(&repo.join(sub), &dir.path().join("project").join(sub));
        }
        Project { dir }
    }

    /// A copy whose builder cache is the one the image tests share
    /// (`target/test-image-cache`, content-addressed like any builder
    /// cache; the VM test builds into it too): a local image is built once.
    pub fn with_shared_image_cache() -> Project {
        let project = Project::copy_of_repo();
        std::os::unix::fs::symlink(shared_image_cache(), project.cache()).unwrap();
        project
    }

    /// An empty project (for fixtures), with images/bundle.toml.
    pub fn empty() -> Project {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("project");
        for sub in ["layers", "profiles", "images"] {
            fs::create_dir_all(root.join(sub)).unwrap();
        }
        fs::write(
            root.join("images/bundle.toml"),
            "description = \"bundle\"\n",
        )
        .unwrap();
        Project { dir }
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("project")
    }

    pub fn out(&self) -> PathBuf {
        self.root().join("out")
    }

    pub fn cache(&self) -> PathBuf {
        self.dir.path().join("cache")
    }

    pub fn write(&self, rel: &str, text: &str) {
        let path = self.root().join(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    }

    /// `builder ARGS` run in the project root with a fixed epoch.
    pub fn builder(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    /// `builder ARGS` with the profile's own image sources (see `command`).
    pub fn builder_with_profile_images(&self, args: &[&str]) -> Output {
        self.command_with(args, false).output().unwrap()
    }

    /// `builder ARGS` (as `builder`) run with the given umask.
    pub fn builder_with_umask(&self, umask: &str, args: &[&str]) -> Output {
        let inner = self.command(args);
        let mut cmd = exec::command("sh");
        cmd.arg("-c")
            .arg(format!("umask {umask}; exec \"$0\" \"$@\""))
            .arg(inner.get_program())
            .args(inner.get_args())
            .current_dir(self.root());
        for (key, value) in inner.get_envs() {
            match value {
                Some(value) => cmd.env(key, value),
                None => cmd.env_remove(key),
            };
        }
        cmd.output().unwrap()
    }

    /// `builder build --profile PROFILE --set NAME=VALUE ...`.
    pub fn build_with(&self, profile: &str, sets: &[&str]) -> Output {
        let mut args = vec!["build", "--profile", profile];
        for set in sets {
            args.extend(["--set", set]);
        }
        self.builder(&args)
    }

    pub fn command(&self, args: &[&str]) -> Command {
        self.command_with(args, true)
    }

    fn command_with(&self, args: &[&str], harness_pull: bool) -> Command {
        let mut cmd = exec::command(env!("CARGO_BIN_EXE_builder"));
        // These tests are about the bundle; the disk image (root, minutes
        // per build) is proven by `cargo xtask vm-test`.
        let bundle_only = args.first() == Some(&"build") && !args.contains(&"--output");
        // `vps` (the default profile) builds and embeds its images (minutes
        // each): tests/images.rs and the VM test prove that. Elsewhere vps
        // keeps them upstream unless the test chooses how its images come.
        let chooses_images = args.iter().any(|a| {
            ["offline=", "pull_images=", "_image_source="]
                .iter()
                .any(|v| a.contains(v))
        });
        let profile = args
            .windows(2)
            .find(|w| w[0] == "--profile")
            .map_or("vps", |w| w[1]);
        let pull = harness_pull
            && matches!(args.first(), Some(&"build" | &"render"))
            && profile == "vps"
            && !chooses_images;
        cmd.args(args)
            .args(if bundle_only {
                &["--output", "bundle"][..]
            } else {
                &[]
            })
            .args(if pull {
                &["--set", "pull_images=true"][..]
            } else {
                &[]
            })
            .current_dir(self.root())
            .env("SOURCE_DATE_EPOCH", EPOCH)
            .env("BUILDER_CACHE_DIR", self.cache())
            .env_remove("XDG_CACHE_HOME");
        cmd
    }

    /// Files under out/, for "nothing was written" checks.
    pub fn out_files(&self) -> Vec<String> {
        match fs::read_dir(self.out()) {
            Err(_) => Vec::new(),
            Ok(rd) => rd
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect(),
        }
    }
}

/// `target/test-image-cache` (see `Project::with_shared_image_cache`).
pub fn shared_image_cache() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-image-cache");
    fs::create_dir_all(&dir).unwrap();
    dir
}

pub fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let ft = entry.file_type().unwrap();
        let dest = to.join(entry.file_name());
        if ft.is_dir() {
            copy_tree(&entry.path(), &dest);
        } else if ft.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(entry.path()).unwrap(), dest).unwrap();
        } else {
            fs::copy(entry.path(), dest).unwrap();
        }
    }
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts success (showing the output otherwise); the standard output.
pub fn ok(o: Output) -> String {
    assert_exit(&o, 0);
    stdout(&o)
}

/// Asserts a refusal: exit 1, and `why` in the standard error.
pub fn refused(o: &Output, why: &str) {
    assert_exit(o, 1);
    let err = stderr(o);
    assert!(err.contains(why), "expected {why:?} in:\n{err}");
}

/// Asserts the exit code, showing the output when it differs.
pub fn assert_exit(o: &Output, code: i32) {
    assert_eq!(
        o.status.code(),
        Some(code),
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        stdout(o),
        stderr(o)
    );
}

pub fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", stdout(o)))
}
