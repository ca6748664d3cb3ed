//! The command line's definition (clap) and its dispatch to the library.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use crate::build::{self, BuildRequest};
use crate::plan::SiteInput;
use crate::progress::Progress;
use crate::project::Project;
use crate::tree::Tree;
use crate::{cache, epoch, inspect, install, layer, pack, profile, verify};

/// Builds reproducible, immutable Matrix homeserver appliance images from
/// layers, a profile and a few site values.
#[derive(Parser)]
#[command(version, max_term_width = 80, help_expected = true)]
pub struct Cli {
    /// The project directory holding layers/, profiles/ and images/
    /// [default: the current directory or the nearest parent with them]
    #[arg(long, global = true, value_name = "DIR")]
    project: Option<PathBuf>,
    /// Print no progress on stderr
    #[arg(long, short, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct Site {
    /// The profile to build (see `builder profiles`)
    #[arg(long, short, default_value = "vps")]
    profile: String,
    /// Set a site value: name=value (repeatable; lists comma-separated)
    #[arg(long = "set", value_name = "NAME=VALUE")]
    sets: Vec<String>,
    /// Read site values from a TOML file (--set wins over it)
    #[arg(long, value_name = "FILE")]
    site: Option<PathBuf>,
    /// Build only this output of the profile (repeatable; e.g. `bundle`
    /// without the disk image) [default: all the profile's outputs]
    #[arg(long = "output", value_name = "KIND")]
    outputs: Vec<String>,
}

impl Site {
    fn input(&self) -> SiteInput {
        SiteInput {
            site_file: self.site.clone(),
            sets: self.sets.clone(),
            outputs: self.outputs.clone(),
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Build a profile's outputs (bundle, disk images, manifest, SHA256SUMS)
    Build {
        #[command(flatten)]
        site: Site,
        /// Where the outputs go
        #[arg(long, short, default_value = "out", value_name = "DIR")]
        out: PathBuf,
        /// The layer cache [default: $BUILDER_CACHE_DIR, $XDG_CACHE_HOME/builder
        /// or ~/.cache/builder]
        #[arg(long, value_name = "DIR")]
        cache_dir: Option<PathBuf>,
        /// The disk image's version (IMAGE_VERSION: digits, letters, dots)
        /// [default: the profile's `version`, else the build time as
        /// YYYYMMDD.HHMMSS]
        #[arg(long, value_name = "VERSION")]
        version: Option<String>,
        /// The update/ directory of the version the machines run: when this
        /// build's OS image is the same as that one's, the update carries only
        /// the boot entry and the appliance extension
        #[arg(long, value_name = "DIR")]
        base_release: Option<PathBuf>,
        /// Sign update/SHA256SUMS with this OpenPGP secret key (no
        /// passphrase; Ed25519 or RSA for reproducible signatures); the image
        /// trusts its public key
        #[arg(long, value_name = "FILE")]
        sign_key: Option<PathBuf>,
        /// Also trust updates signed by this OpenPGP public key (repeatable;
        /// e.g. the key that will sign later versions)
        #[arg(long, value_name = "FILE")]
        trust_key: Vec<PathBuf>,
        /// Print a versioned JSON report on stdout
        #[arg(long)]
        json: bool,
    },
    /// Write the merged, rendered tree of a profile into a new directory
    Render {
        #[command(flatten)]
        site: Site,
        /// The directory to create (must not exist, or be empty)
        #[arg(long, short, value_name = "DIR")]
        out: PathBuf,
        /// The cache, for embedded images [default: as for build]
        #[arg(long, value_name = "DIR")]
        cache_dir: Option<PathBuf>,
    },
    /// List the profiles with their descriptions
    Profiles {
        /// Print JSON on stdout
        #[arg(long)]
        json: bool,
    },
    /// List the layers with what each needs, provides and reads
    Layers {
        /// Print JSON on stdout
        #[arg(long)]
        json: bool,
    },
    /// Show a bundle's layers, digests, sizes and the values used
    Inspect {
        /// The bundle (out/<profile>.bundle.tar)
        bundle: PathBuf,
        /// Also list every file of every layer
        #[arg(long)]
        files: bool,
        /// Print a versioned JSON report on stdout
        #[arg(long)]
        json: bool,
    },
    /// Recompute every digest of a bundle; exit 1 on any mismatch
    Verify {
        /// The bundle (out/<profile>.bundle.tar)
        bundle: PathBuf,
        /// Print a versioned JSON report on stdout
        #[arg(long)]
        json: bool,
    },
    /// Put a bundle onto this host (systemd and Podman ≥ 4.4: Debian, Fedora, ...)
    /// and start it; every file is recorded for `builder uninstall`
    Install {
        /// The bundle (out/<profile>.bundle.tar; `build --output bundle` makes only it)
        bundle: PathBuf,
        /// Put the files under this directory instead of / (nothing is
        /// started: for a system image or a container's root)
        #[arg(long, value_name = "DIR", default_value = "/")]
        root: PathBuf,
        /// Reload systemd but start nothing
        #[arg(long)]
        no_start: bool,
    },
    /// Stop and remove what `builder install` put onto this host; the
    /// homeserver's data (/var/lib/matrix) stays
    Uninstall {
        /// The directory the install went into
        #[arg(long, value_name = "DIR", default_value = "/")]
        root: PathBuf,
    },
    /// Print a shell's completion script for builder (e.g. `builder completions bash
    /// > /etc/bash_completion.d/builder`)
    Completions {
        /// bash, elvish, fish, powershell or zsh
        shell: clap_complete::Shell,
    },
    /// Print builder's man page (roff; e.g. `builder manpage > /usr/local/share/man/man1/builder.1`)
    Manpage,
    /// Pack a directory as one deterministic layer blob (.tar.gz)
    Pack {
        /// The directory to pack, as it is (modes and owners kept)
        dir: PathBuf,
        /// The blob file to write
        #[arg(long, short, value_name = "FILE")]
        out: PathBuf,
        /// Print a versioned JSON report on stdout
        #[arg(long)]
        json: bool,
    },
}

fn print_json(value: &impl serde::Serialize) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut stdout, value)?;
    writeln!(stdout)?;
    Ok(())
}

fn print(text: &str) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(text.as_bytes())?;
    Ok(())
}

fn build_request(
    project: Project,
    site: &Site,
    out: PathBuf,
    cache_dir: Option<PathBuf>,
) -> Result<BuildRequest> {
    Ok(BuildRequest {
        project,
        profile: site.profile.clone(),
        input: site.input(),
        out,
        cache_dir: cache::default_dir(cache_dir.as_deref())?,
        epoch: epoch::from_env()?,
        version: None,
        base_release: None,
        keys: Default::default(),
    })
}

pub fn run(cli: Cli) -> Result<ExitCode> {
    let project = || Project::locate(cli.project.as_deref());
    match cli.command {
        Command::Build {
            site,
            out,
            cache_dir,
            version,
            base_release,
            sign_key,
            trust_key,
            json,
        } => {
            let mut req = build_request(project()?, &site, out, cache_dir)?;
            req.version = version;
            req.base_release = base_release;
            req.keys = crate::disk::signing::Keys {
                sign: sign_key,
                trust: trust_key,
            };
            let mut progress = Progress::new(cli.quiet || json);
            let report = build::build(&req, &mut progress)?;
            if json {
                print_json(&report)?;
            } else {
                print(&format!("{}\n", report.bundle.display()))?;
                for image in &report.disk_images {
                    print(&format!("{}\n", image.path.display()))?;
                }
            }
        }
        Command::Render {
            site,
            out,
            cache_dir,
        } => {
            let req = build_request(project()?, &site, out, cache_dir)?;
            let mut progress = Progress::new(cli.quiet);
            let count = build::render_to_dir(&req, &mut progress)?;
            let out = req.out;
            if !cli.quiet {
                eprintln!("wrote {count} entries to {}", out.display());
            }
        }
        Command::Profiles { json } => {
            let project = project()?;
            let mut rows = Vec::new();
            for name in project.profile_names()? {
                let p = profile::Profile::load(&project, &name)?;
                rows.push(serde_json::json!({
                    "name": name, "description": p.description, "layers": p.layers, "outputs": p.outputs,
                }));
            }
            if json {
                print_json(&serde_json::json!({ "version": 1, "profiles": rows }))?;
            } else {
                let text: String = rows
                    .iter()
                    .map(|r| {
                        format!(
                            "{:<14} {}\n",
                            r["name"].as_str().unwrap_or(""),
                            r["description"].as_str().unwrap_or("")
                        )
                    })
                    .collect();
                print(&text)?;
            }
        }
        Command::Layers { json } => {
            let project = project()?;
            let mut rows = Vec::new();
            for name in project.layer_names()? {
                let l = layer::Layer::load(&project.layers_dir(), &name)?;
                rows.push(serde_json::json!({
                    "name": name,
                    "description": l.def.description,
                    "requires": l.def.requires,
                    "provides": l.def.provides,
                    "conflicts": l.def.conflicts,
                    "when": l.def.when,
                    "values": l.def.values.iter().map(|(k, v)| serde_json::json!({
                        "name": k, "type": v.kind.name(), "default": v.default,
                        "choices": v.choices, "description": v.description, "sensitive": v.sensitive,
                    })).collect::<Vec<_>>(),
                }));
            }
            if json {
                print_json(&serde_json::json!({ "version": 1, "layers": rows }))?;
            } else {
                print(&layers_text(&rows))?;
            }
        }
        Command::Inspect {
            bundle,
            files,
            json,
        } => {
            let report = inspect::inspect(&bundle, files)?;
            if json {
                print_json(&report)?;
            } else {
                print(&report.to_text())?;
            }
        }
        Command::Verify { bundle, json } => {
            let report = verify::verify(&bundle)?;
            if json {
                print_json(&report)?;
            } else {
                for l in &report.layers {
                    eprintln!(
                        "layer {:<16} {} {}",
                        l.name,
                        if l.ok { "ok" } else { "FAILED" },
                        l.diff_id
                    );
                }
                for p in &report.problems {
                    eprintln!("problem: {p}");
                }
                print(&format!(
                    "{}: {}\n",
                    report.bundle,
                    if report.ok { "verified" } else { "FAILED" }
                ))?;
            }
            if !report.ok {
                return Ok(ExitCode::from(1));
            }
        }
        Command::Install {
            bundle,
            root,
            no_start,
        } => {
            let done = install::install(&install::InstallRequest {
                bundle,
                root,
                start: !no_start,
            })?;
            print(&install_summary(&done))?;
        }
        Command::Uninstall { root } => {
            let done = install::uninstall(&root)?;
            print(&uninstall_summary(&done))?;
        }
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            let mut text = Vec::new();
            clap_complete::generate(shell, &mut cmd, "builder", &mut text);
            print(&String::from_utf8(text)?)?;
        }
        Command::Manpage => {
            let mut text = Vec::new();
            clap_mangen::Man::new(<Cli as clap::CommandFactory>::command()).render(&mut text)?;
            print(&String::from_utf8(text)?)?;
        }
        Command::Pack { dir, out, json } => {
            let epoch = epoch::from_env()?;
            let tree = Tree::from_dir(&dir)?;
            let file = std::fs::File::create(&out)
                .with_context(|| format!("creating {}", out.display()))?;
            let (_, packed) = pack::pack(&tree, epoch, std::io::BufWriter::new(file))
                .with_context(|| format!("packing {}", dir.display()))?;
            let report = serde_json::json!({
                "version": 1,
                "diff_id": packed.diff_id,
                "digest": packed.digest,
                "size": packed.size,
                "compressed_size": packed.compressed_size,
                "files": packed.entries,
            });
            if json {
                print_json(&report)?;
            } else {
                print(&format!(
                    "{} {} {}\n",
                    out.display(),
                    packed.digest,
                    packed.diff_id
                ))?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn install_summary(done: &install::Installed) -> String {
    let root = &done.root;
    let mut s = format!(
        "installed {} ({} files and links) under {}{}\n",
        done.profile,
        done.files,
        root.display(),
        if done.replaced_earlier {
            ", replacing the earlier install"
        } else {
            ""
        }
    );
    if done.removed_stale > 0 {
        s += &format!(
            "removed {} files of the earlier install this bundle no longer has\n",
            done.removed_stale
        );
    }
    s += &format!("record: {}\n", root.join(install::RECORD).display());
    if !done.live {
        s += "nothing started: not the running system (boot it, or `systemctl daemon-reload` there)\n";
    } else if done.started.is_empty() {
        s += "systemd reloaded; nothing started (--no-start): `systemctl start matrix-appliance.target` starts the stack\n";
    } else {
        s += &format!(
            "starting {} (the first start loads the images and initialises everything: minutes); \
             follow it with `journalctl -f`{}\n",
            done.started.join(" "),
            if done.started.iter().any(|u| u == "matrix-appliance.target") {
                ", then `matrixctl status`"
            } else {
                ""
            }
        );
    }
    s
}

fn uninstall_summary(done: &install::Removed) -> String {
    let root = &done.root;
    let mut s = String::new();
    if done.live && !done.stopped.is_empty() {
        s += &format!("stopped {}\n", done.stopped.join(" "));
    }
    s += &format!(
        "removed {} files and links of {} from {}\n",
        done.removed,
        done.profile,
        root.display()
    );
    for path in &done.kept_changed {
        s += &format!(
            "kept {path}: changed since the install (remove it yourself if it is not needed)\n"
        );
    }
    for dir in &done.kept_dirs {
        s += &format!("kept {}: other files are in it\n", root.join(dir).display());
    }
    s += &format!(
        "kept {}: the homeserver's data (database, media, keys, secrets); an install of a \
         bundle for the same server_name uses it again; delete it yourself to start afresh. \
         Podman's images and its `matrix` network stay too (podman image prune, podman network rm)\n",
        root.join("var/lib/matrix").display()
    );
    s
}

fn layers_text(rows: &[serde_json::Value]) -> String {
    let list = |v: &serde_json::Value| {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default()
    };
    let mut s = String::new();
    for r in rows {
        s.push_str(&format!(
            "{:<16} {}\n",
            r["name"].as_str().unwrap_or(""),
            r["description"].as_str().unwrap_or("")
        ));
        for (label, key) in [
            ("requires", "requires"),
            ("provides", "provides"),
            ("conflicts", "conflicts"),
        ] {
            let items = list(&r[key]);
            if !items.is_empty() {
                s.push_str(&format!("  {label}: {items}\n"));
            }
        }
        if let Some(when) = r["when"].as_object().filter(|w| !w.is_empty()) {
            let conds: Vec<String> = when.iter().map(|(k, v)| format!("{k} = {v}")).collect();
            s.push_str(&format!("  when: {}\n", conds.join(", ")));
        }
        let values: Vec<&str> = r["values"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v["name"].as_str())
            .collect();
        if !values.is_empty() {
            s.push_str(&format!("  reads: {}\n", values.join(", ")));
        }
    }
    s
}
