//! `cargo xtask bench [--tree DIR] [--runs N]`: packs one ~400 MB tree (by default a cached
//! Debian rootfs made with mmdebstrap) with `builder pack`, and, in the same run on the same
//! warm tree, with `tar --sort=name | gzip -6` and `| pigz -6`; prints wall time (best of N),
//! MB/s, compressed sizes and the builder's peak RSS against the targets. A benchmark, not a
//! test: a missed target is reported, not turned into a failing exit code.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};

const SUITE: &str = "bookworm";
const VARIANT: &str = "minbase";
/// minbase + these comes to ~394 MB (`du -sb`) in ~11k entries; adjust here to resize the tree.
const PACKAGES: &[&str] = &["python3", "perl", "gcc"];
/// Bump when the way the cached tree is made changes, so old caches are not reused. The tree
/// is mmdebstrap's output as is, including its /dev nodes (8 character devices): `builder
/// pack` and tar both pack them, so no copy without them is needed.
const TREE_RECIPE: &str = "as-is-v1";

const TARGET_VS_GZIP: f64 = 2.5;
const TARGET_VS_PIGZ: f64 = 1.5;
const TARGET_RSS_MB: f64 = 64.0;
const SOURCE_DATE_EPOCH: &str = "1700000000";

const USAGE: &str = "usage: cargo xtask bench [--tree DIR] [--runs N] [--builder BIN]
  --tree DIR     pack DIR instead of the cached Debian rootfs (target/bench/rootfs-*)
  --runs N       runs per contender, best wall time kept (default 3)
  --builder BIN  measure BIN instead of building target/release/builder";

struct Opts {
    tree: Option<PathBuf>,
    runs: u32,
    builder: Option<PathBuf>,
}

fn parse_args(args: &[String]) -> Result<Option<Opts>> {
    let mut opts = Opts {
        tree: None,
        runs: 3,
        builder: None,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
            _ => (arg.as_str(), None),
        };
        let mut value = |name: &str| {
            inline
                .clone()
                .or_else(|| it.next().cloned())
                .with_context(|| format!("{name} needs a value\n{USAGE}"))
        };
        match flag {
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(None);
            }
            "--tree" => opts.tree = Some(PathBuf::from(value("--tree")?)),
            "--builder" => opts.builder = Some(PathBuf::from(value("--builder")?)),
            "--runs" => {
                let v = value("--runs")?;
                opts.runs = match v.parse() {
                    Ok(n) if n >= 1 => n,
                    _ => bail!("--runs wants a positive integer, got `{v}`\n{USAGE}"),
                };
            }
            _ => bail!("unknown argument `{arg}`\n{USAGE}"),
        }
    }
    Ok(Some(opts))
}

pub fn run(args: &[String]) -> Result<()> {
    let Some(opts) = parse_args(args)? else {
        return Ok(());
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("xtask has no parent directory")?
        .to_path_buf();
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => root.join(dir),
        None => root.join("target"),
    };
    let bench_dir = target.join("bench");
    let out_dir = bench_dir.join("out");
    fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;

    let mut tools = vec![
        ("tar", "tar"),
        ("gzip", "gzip"),
        ("pigz", "pigz"),
        ("bash", "bash"),
    ];
    if opts.tree.is_none() {
        tools.push(("mmdebstrap", "mmdebstrap"));
    }
    ensure_tools(&tools)?;

    let tree = match &opts.tree {
        Some(t) => fs::canonicalize(t)
            .with_context(|| format!("--tree {}: no such directory", t.display()))?,
        None => debian_rootfs(&bench_dir)?,
    };
    if !tree.is_dir() {
        bail!("{} is not a directory", tree.display());
    }

    let mut builder = prepare_builder(&root, &target, opts.builder.as_deref());

    eprintln!("bench: warm-up read of {}", tree.display());
    let tar_bytes = tar_stream_size(&tree)?;
    let entries = count_entries(&tree)?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());

    let gzip_out = out_dir.join("gzip.tar.gz");
    let pigz_out = out_dir.join("pigz.tar.gz");
    let builder_out = out_dir.join("builder.tar.gz");
    let mut gzip = Best::default();
    let mut pigz = Best::default();
    let mut pack = Best::default();
    let mut reports: Vec<PackReport> = Vec::new();

    // Contenders alternate within each run so any drift in machine load hits all of them.
    for i in 1..=opts.runs {
        eprintln!("bench: run {i}/{}", opts.runs);
        gzip.add(
            run_pipeline(&tree, "gzip -6", &gzip_out)?,
            file_len(&gzip_out)?,
        );
        pigz.add(
            run_pipeline(&tree, "pigz -6", &pigz_out)?,
            file_len(&pigz_out)?,
        );
        if let Ok(bin) = &builder {
            match run_builder(bin, &tree, &builder_out, &out_dir) {
                Ok((sample, report)) => {
                    pack.add(sample, report.compressed_size);
                    reports.push(report);
                }
                Err(e) => builder = Err(format!("{e:#}")),
            }
        }
    }
    let check = match (&builder, reports.last()) {
        (Ok(_), Some(last)) => Some(check_builder_output(&builder_out, last, &reports)?),
        _ => None,
    };

    let mb = |bytes: u64| bytes as f64 / 1e6;
    let pct = |bytes: u64| 100.0 * bytes as f64 / tar_bytes as f64;
    let shown = tree.strip_prefix(&root).unwrap_or(&tree);
    println!(
        "tree: {}  {:.1} MB tar stream, {entries} entries, {cores} cores, best of {} run{}",
        shown.display(),
        mb(tar_bytes),
        opts.runs,
        if opts.runs == 1 { "" } else { "s" }
    );
    let line = |name: &str, b: &Best, extra: &str| {
        println!(
            "{name:<15}: {:6.2} s {:7.1} MB/s  compressed {:6.1} MB ({:.1}%)  cpu {:5.1} s{extra}",
            b.secs,
            mb(tar_bytes) / b.secs,
            mb(b.compressed),
            pct(b.compressed),
            b.cpu_secs,
        );
    };
    let rss_mb = mb(pack.max_rss);
    match &builder {
        Ok(_) => line("builder pack", &pack, &format!("  peak RSS {rss_mb:.1} MB")),
        Err(why) => println!("{:<15}: not measured: {why}", "builder pack"),
    }
    line("tar | gzip -6", &gzip, "");
    line("tar | pigz -6", &pigz, "");
    let verdict = |ok: bool| if ok { "MET" } else { "NOT MET" };
    if builder.is_ok() {
        let (vs_gzip, vs_pigz) = (gzip.secs / pack.secs, pigz.secs / pack.secs);
        println!(
            "builder/gzip   : {vs_gzip:.2}x (target >= {TARGET_VS_GZIP}x)  {}",
            verdict(vs_gzip >= TARGET_VS_GZIP)
        );
        println!(
            "builder/pigz   : {vs_pigz:.2}x (target >= {TARGET_VS_PIGZ}x)  {}",
            verdict(vs_pigz >= TARGET_VS_PIGZ)
        );
        println!(
            "builder RSS    : {rss_mb:.1} MB (target < {TARGET_RSS_MB} MB)  {}",
            verdict(rss_mb < TARGET_RSS_MB)
        );
        if let Some(check) = check {
            println!("builder output : {check}");
        }
    }
    println!("(MB = 10^6 bytes; MB/s = tar stream bytes / wall seconds; peak RSS = max ru_maxrss over runs)");
    if let Err(why) = builder {
        bail!("the builder could not be measured: {why}");
    }
    Ok(())
}

/// One finished process: wall time, user+sys CPU (including reaped descendants), peak RSS.
struct Sample {
    secs: f64,
    cpu_secs: f64,
    max_rss: u64,
}

#[derive(Default)]
struct Best {
    secs: f64,
    cpu_secs: f64,
    compressed: u64,
    max_rss: u64,
}

impl Best {
    fn add(&mut self, s: Sample, compressed: u64) {
        if self.secs == 0.0 || s.secs < self.secs {
            self.secs = s.secs;
            self.cpu_secs = s.cpu_secs;
            self.compressed = compressed;
        }
        self.max_rss = self.max_rss.max(s.max_rss);
    }
}

/// Spawns `cmd` and reaps it with `wait4`, which also yields its rusage. For a shell
/// pipeline the kernel folds in the children the shell waited for (CPU sum, RSS max).
fn measure(cmd: &mut Command) -> Result<Sample> {
    let what = format!("{:?}", cmd.get_program());
    let start = Instant::now();
    let child = cmd.spawn().with_context(|| format!("spawning {what}"))?;
    let pid = child.id() as libc::pid_t;
    let mut status: libc::c_int = 0;
    // SAFETY: rusage is plain old data; all-zero is a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: pid is our own unreaped child; status and ru are valid for writes.
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
        if r == pid {
            break;
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(err).with_context(|| format!("waiting for {what}"));
        }
    }
    let secs = start.elapsed().as_secs_f64();
    if libc::WIFSIGNALED(status) {
        bail!("{what} killed by signal {}", libc::WTERMSIG(status));
    }
    if libc::WEXITSTATUS(status) != 0 {
        bail!("{what} exited with status {}", libc::WEXITSTATUS(status));
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Ok(Sample {
        secs,
        cpu_secs: tv(ru.ru_utime) + tv(ru.ru_stime),
        // Linux reports ru_maxrss in KiB.
        max_rss: ru.ru_maxrss as u64 * 1024,
    })
}

fn tar_cmd(compressor: &str) -> String {
    format!(r#"tar --sort=name --format=gnu -cf - -C "$1" . | {compressor}"#)
}

fn run_pipeline(tree: &Path, compressor: &str, out: &Path) -> Result<Sample> {
    let _ = fs::remove_file(out);
    let script = format!(r#"{} > "$2""#, tar_cmd(compressor));
    measure(
        exec::command("bash")
            .args(["-o", "pipefail", "-c", &script, "bench"])
            .arg(tree)
            .arg(out)
            .stdin(Stdio::null()),
    )
    .with_context(|| format!("`{}` on {}", tar_cmd(compressor), tree.display()))
}

/// Reads the whole tree once through tar (so every contender starts from a warm page
/// cache) and returns the size of the tar stream, the common denominator for MB/s.
fn tar_stream_size(tree: &Path) -> Result<u64> {
    // Not `tar -cf /dev/null`: GNU tar notices /dev/null and skips reading file contents.
    let out = exec::command("bash")
        .args(["-o", "pipefail", "-c", &tar_cmd("wc -c"), "bench"])
        .arg(tree)
        .stderr(Stdio::inherit())
        .output()
        .context("running tar")?;
    if !out.status.success() {
        bail!("tar of {} failed ({})", tree.display(), out.status);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .parse()
        .with_context(|| format!("unexpected `wc -c` output {text:?}"))
}

fn count_entries(tree: &Path) -> Result<u64> {
    let mut count = 0;
    let mut stack = vec![tree.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let entry = entry?;
            count += 1;
            if entry.file_type()?.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    Ok(count)
}

fn file_len(path: &Path) -> Result<u64> {
    Ok(fs::metadata(path)
        .with_context(|| format!("{} was not written", path.display()))?
        .len())
}

/// Builds the release binary and checks it has `pack`; Err carries why it can't be measured.
fn prepare_builder(root: &Path, target: &Path, given: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(bin) = given {
        return check_pack(bin.to_path_buf());
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!("bench: cargo build --release -p builder");
    let status = exec::command(&cargo)
        .args(["build", "--release", "-p", "builder"])
        .current_dir(root)
        .stdout(Stdio::null())
        .status()
        .map_err(|e| format!("running cargo: {e}"))?;
    if !status.success() {
        return Err(format!(
            "`cargo build --release -p builder` failed ({status})"
        ));
    }
    check_pack(target.join("release").join("builder"))
}

fn check_pack(bin: PathBuf) -> Result<PathBuf, String> {
    let help = exec::command(&bin)
        .args(["pack", "--help"])
        .output()
        .map_err(|e| format!("running {}: {e}", bin.display()))?;
    // Exit status alone is not enough: a stub `main` exits 0 for any arguments.
    let text = String::from_utf8_lossy(&help.stdout);
    if !help.status.success() || !text.contains("--out") {
        let err = String::from_utf8_lossy(&help.stderr);
        let first = err.lines().next().unwrap_or("").trim();
        return Err(format!(
            "`{} pack --help` does not describe `pack --out` yet ({}{}{first})",
            bin.display(),
            help.status,
            if first.is_empty() { "" } else { ": " }
        ));
    }
    Ok(bin)
}

struct PackReport {
    diff_id: String,
    digest: String,
    size: u64,
    compressed_size: u64,
    files: u64,
}

fn run_builder(
    bin: &Path,
    tree: &Path,
    out: &Path,
    out_dir: &Path,
) -> Result<(Sample, PackReport)> {
    let _ = fs::remove_file(out);
    let json_path = out_dir.join("builder.json");
    let err_path = out_dir.join("builder.stderr");
    // Output goes to files, not pipes, so nothing has to drain them while we sit in wait4.
    let result = measure(
        exec::command(bin)
            .arg("pack")
            .arg(tree)
            .arg("--out")
            .arg(out)
            .arg("--json")
            .env("SOURCE_DATE_EPOCH", SOURCE_DATE_EPOCH)
            .stdin(Stdio::null())
            .stdout(File::create(&json_path)?)
            .stderr(File::create(&err_path)?),
    );
    if let Err(e) = result {
        let stderr = fs::read_to_string(&err_path).unwrap_or_default();
        let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!("`builder pack` failed: {e:#}: {}", tail.join(" | "));
    }
    let sample = result?;
    let text = fs::read_to_string(&json_path)?;
    let v: serde_json::Value = serde_json::from_str(text.trim())
        .with_context(|| format!("`builder pack --json` printed no JSON: {text:?}"))?;
    let num = |k: &str| {
        v[k].as_u64()
            .with_context(|| format!("`builder pack --json`: no integer `{k}` in {text}"))
    };
    let string = |k: &str| {
        v[k].as_str()
            .map(str::to_string)
            .with_context(|| format!("`builder pack --json`: no string `{k}` in {text}"))
    };
    if num("version")? != 1 {
        bail!("`builder pack --json`: expected version 1 in {text}");
    }
    let report = PackReport {
        diff_id: string("diff_id")?,
        digest: string("digest")?,
        size: num("size")?,
        compressed_size: num("compressed_size")?,
        files: num("files")?,
    };
    Ok((sample, report))
}

/// Cheap sanity check outside the timed runs: the last .tar.gz decompresses to what the
/// JSON claims, and every run produced the same bytes.
fn check_builder_output(out: &Path, last: &PackReport, all: &[PackReport]) -> Result<String> {
    let mut problems = Vec::new();
    if file_len(out)? != last.compressed_size {
        problems.push(format!(
            "compressed_size {} but the file has {} bytes",
            last.compressed_size,
            file_len(out)?
        ));
    }
    let digest = sha256_of(out, false)?;
    if format!("sha256:{digest}") != last.digest {
        problems.push(format!(
            "digest {} but file is sha256:{digest}",
            last.digest
        ));
    }
    let diff_id = sha256_of(out, true)?;
    if format!("sha256:{diff_id}") != last.diff_id {
        problems.push(format!(
            "diff_id {} but gunzip gives sha256:{diff_id}",
            last.diff_id
        ));
    }
    let distinct = |key: fn(&PackReport) -> &str| {
        let mut v: Vec<&str> = all.iter().map(key).collect();
        v.sort_unstable();
        v.dedup();
        v.len()
    };
    let (diff_ids, digests) = (distinct(|r| &r.diff_id), distinct(|r| &r.digest));
    if diff_ids > 1 {
        problems.push(format!(
            "{diff_ids} different diff_ids in {} runs",
            all.len()
        ));
    }
    if digests > 1 {
        problems.push(format!(
            "NOT REPRODUCIBLE: {digests} different .tar.gz digests in {} runs{}",
            all.len(),
            if diff_ids == 1 {
                " (same diff_id: the gzip stream varies)"
            } else {
                ""
            }
        ));
    }
    let tar = format!(
        "its tar {:.1} MB, {} entries",
        last.size as f64 / 1e6,
        last.files
    );
    Ok(if problems.is_empty() {
        format!(
            "OK: digests match gzip -dc | sha256sum, identical in all {} runs ({tar})",
            all.len()
        )
    } else {
        format!("PROBLEMS: {} ({tar})", problems.join("; "))
    })
}

fn sha256_of(path: &Path, gunzip: bool) -> Result<String> {
    let script = if gunzip {
        r#"gzip -dc "$1" | sha256sum"#
    } else {
        r#"sha256sum < "$1""#
    };
    let out = exec::command("bash")
        .args(["-o", "pipefail", "-c", script, "bench"])
        .arg(path)
        .output()
        .context("running sha256sum")?;
    if !out.status.success() {
        bail!(
            "`{script}` on {} failed: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text.split_whitespace().next().unwrap_or("").to_string())
}

/// Returns the cached rootfs, building it on first use. Keyed by a hash of everything that
/// shapes it, so changing PACKAGES builds a new one instead of reusing a stale tree.
fn debian_rootfs(bench_dir: &Path) -> Result<PathBuf> {
    let key = format!("{SUITE} {VARIANT} {} {TREE_RECIPE}", PACKAGES.join(","));
    let dir = bench_dir.join(format!("rootfs-{:016x}", fnv1a(key.as_bytes())));
    if dir.is_dir() {
        return Ok(dir);
    }
    let partial = bench_dir.join(format!(
        "{}.partial",
        dir.file_name().and_then(OsStr::to_str).unwrap_or("rootfs")
    ));
    if partial.exists() {
        fs::remove_dir_all(&partial)
            .with_context(|| format!("removing stale {}", partial.display()))?;
    }
    // SAFETY: geteuid has no preconditions.
    let mode = if unsafe { libc::geteuid() } == 0 {
        "root"
    } else {
        "unshare"
    };
    eprintln!(
        "bench: building the Debian rootfs once (mmdebstrap {SUITE} {VARIANT} + {}), cached in {}",
        PACKAGES.join(","),
        dir.display()
    );
    let status = exec::command("mmdebstrap")
        .arg(format!("--mode={mode}"))
        .arg(format!("--variant={VARIANT}"))
        .arg(format!("--include={}", PACKAGES.join(",")))
        .arg(SUITE)
        .arg(&partial)
        .stdout(Stdio::null())
        .status()
        .context("running mmdebstrap")?;
    if !status.success() {
        bail!("mmdebstrap failed ({status}); it needs network access to deb.debian.org");
    }
    fs::rename(&partial, &dir)
        .with_context(|| format!("renaming {} to {}", partial.display(), dir.display()))?;
    Ok(dir)
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Makes sure each (binary, Debian package) is on PATH, apt-installing missing ones as root.
fn ensure_tools(tools: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = tools
        .iter()
        .filter(|(bin, _)| !on_path(bin))
        .map(|&(_, pkg)| pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "missing tools; install them with: sudo apt-get install -y {}",
            missing.join(" ")
        );
    }
    eprintln!("bench: apt-get install -y {}", missing.join(" "));
    let install = || {
        exec::command("apt-get")
            .args(["install", "-y"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
    };
    let mut out = install().context("running apt-get (is this a Debian-like system?)")?;
    if !out.status.success() {
        eprintln!("bench: apt-get update (a package was not found)");
        let _ = exec::command("apt-get").arg("update").output();
        out = install().context("running apt-get")?;
    }
    let still: Vec<&str> = tools
        .iter()
        .filter(|(bin, _)| !on_path(bin))
        .map(|&(bin, _)| bin)
        .collect();
    if !out.status.success() || !still.is_empty() {
        bail!(
            "could not install {} (still missing: {}): {}",
            missing.join(" "),
            still.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn on_path(bin: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths)
            .any(|dir| fs::metadata(dir.join(bin)).is_ok_and(|m| m.is_file()))
    })
}
