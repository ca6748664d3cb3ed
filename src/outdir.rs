//! Writing into `--out` so that a failed build leaves nothing half written:
//! every file is staged as a temporary file beside its final name and all
//! are renamed into place only when every one of them is complete.
//! `SHA256SUMS` in the directory is updated last, keeping the lines of
//! other builds' files.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufWriter, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{anyhow, Context, Result};
use tempfile::NamedTempFile;

use crate::digest::{Digest, HashingWriter};
use crate::stamp::{read_record, write_record, Stamp};

/// What `stage_keyed` remembers of a file it wrote.
#[derive(serde::Serialize, serde::Deserialize)]
struct OutStamp {
    key: Digest,
    digest: Digest,
    stamp: Stamp,
}

pub const SUMS: &str = "SHA256SUMS";

pub struct OutDir {
    dir: PathBuf,
    created: bool,
    staged: Vec<(NamedTempFile, String, Digest)>,
    /// Files already in place as this build would write them, and their digests.
    kept: Vec<(String, Digest)>,
    /// Stamps to record once staged files are in place: (name, memo file, key).
    remember: Vec<(String, PathBuf, Digest)>,
    /// Subdirectories whose files not staged now are removed on commit.
    replaced: Vec<String>,
    committed: bool,
}

impl OutDir {
    pub fn open(dir: &Path) -> Result<OutDir> {
        if dir.exists() && !dir.is_dir() {
            return Err(anyhow!(
                "--out {} exists and is not a directory",
                dir.display()
            ));
        }
        let created = !dir.exists();
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(OutDir {
            dir: dir.to_path_buf(),
            created,
            staged: Vec::new(),
            kept: Vec::new(),
            remember: Vec::new(),
            replaced: Vec::new(),
            committed: false,
        })
    }

    pub fn path_of(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// A temporary file beside `name`'s final place (so that renaming it
    /// there is atomic); `name` may have directories (`update/SHA256SUMS`).
    fn temp_beside(&self, name: &str) -> Result<NamedTempFile> {
        let dest = self.dir.join(name);
        let parent = dest.parent().expect("a file in the output directory");
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        let base = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        tempfile::Builder::new()
            .prefix(&format!(".{base}."))
            .tempfile_in(parent)
            .with_context(|| format!("creating a temporary file in {}", parent.display()))
    }

    /// Writes `name` into a temporary file; returns its digest.
    pub fn stage(
        &mut self,
        name: &str,
        write: impl FnOnce(&mut dyn Write) -> Result<()>,
    ) -> Result<Digest> {
        let tmp = self.temp_beside(name)?;
        let mut out = HashingWriter::new(BufWriter::new(tmp.as_file()));
        write(&mut out).with_context(|| format!("writing {name}"))?;
        let (mut buffered, digest, _) = out.finish();
        buffered
            .flush()
            .with_context(|| format!("writing {name}"))?;
        drop(buffered);
        // Outputs hold no secrets; tempfile's 0600 would only get in the way.
        tmp.as_file()
            .set_permissions(fs::Permissions::from_mode(0o644))?;
        tmp.as_file()
            .sync_all()
            .with_context(|| format!("writing {name}"))?;
        self.staged.push((tmp, name.to_string(), digest));
        Ok(digest)
    }

    /// Stages `bytes` as `name`, or keeps the file there if it holds them.
    pub fn stage_bytes(&mut self, name: &str, bytes: &[u8]) -> Result<Digest> {
        if fs::read(self.dir.join(name)).is_ok_and(|old| old == bytes) {
            let digest = Digest::of(bytes);
            self.kept.push((name.to_string(), digest));
            return Ok(digest);
        }
        self.stage(name, |w| Ok(w.write_all(bytes)?))
    }

    /// Stages what `write` writes as `name`, unless the file there is the one
    /// a build with the same `key` (what decides its bytes) wrote and nobody
    /// changed since: its stamp and digest are kept in `memo`.
    pub fn stage_keyed(
        &mut self,
        name: &str,
        key: &Digest,
        memo: &Path,
        write: impl FnOnce(&mut dyn Write) -> Result<()>,
    ) -> Result<Digest> {
        if let Some(old) = read_record::<OutStamp>(memo) {
            if old.key == *key && old.stamp.matches(&self.dir.join(name)) {
                self.kept.push((name.to_string(), old.digest));
                return Ok(old.digest);
            }
        }
        let digest = self.stage(name, write)?;
        self.remember
            .push((name.to_string(), memo.to_path_buf(), *key));
        Ok(digest)
    }

    /// Stages a cached file of known `digest` as `name`: a hard link to it
    /// where the output directory is on the cache's file system (the cache
    /// checks its files' stamps before it hands them out again), else a
    /// sparse copy. Nothing to do when `name` is that file already.
    pub fn stage_linked(&mut self, name: &str, src: &Path, digest: Digest) -> Result<()> {
        let dest = self.dir.join(name);
        let same = |a: &Path, b: &Path| match (fs::metadata(a), fs::metadata(b)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        };
        if same(&dest, src) {
            self.kept.push((name.to_string(), digest));
            return Ok(());
        }
        let tmp = self.temp_beside(name)?;
        let linked = fs::remove_file(tmp.path())
            .and_then(|()| fs::hard_link(src, tmp.path()))
            .is_ok();
        if !linked {
            exec::run(
                exec::command("cp")
                    .arg("--sparse=always")
                    .arg(src)
                    .arg(tmp.path()),
                &format!("copying {} into {} (cp)", src.display(), self.dir.display()),
            )?;
            fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o644))?;
        }
        self.staged.push((tmp, name.to_string(), digest));
        Ok(())
    }

    /// On commit, removes the files in subdirectory `dir` that this build
    /// does not stage (an older version's update files).
    pub fn replace_dir(&mut self, dir: &str) {
        self.replaced.push(dir.to_string());
    }

    /// Renames every staged file into place, removes what replaced
    /// directories held before, then updates SHA256SUMS.
    pub fn commit(mut self) -> Result<()> {
        let sums_path = self.dir.join(SUMS);
        let mut sums: BTreeMap<String, String> = match fs::read_to_string(&sums_path) {
            Ok(text) => text
                .lines()
                .filter_map(|l| l.split_once("  "))
                .filter(|(_, name)| self.dir.join(name).is_file())
                .map(|(d, n)| (n.to_string(), d.to_string()))
                .collect(),
            Err(_) => BTreeMap::new(),
        };
        let mut now = std::collections::BTreeSet::new();
        for (tmp, name, digest) in self.staged.drain(..) {
            let dest = self.dir.join(&name);
            tmp.persist(&dest)
                .with_context(|| format!("moving {name} into place"))?;
            sums.insert(name.clone(), digest.hex());
            now.insert(name);
        }
        for (name, digest) in self.kept.drain(..) {
            sums.insert(name.clone(), digest.hex());
            now.insert(name);
        }
        for (name, memo, key) in self.remember.drain(..) {
            let stamp =
                Stamp::of(&self.dir.join(&name)).with_context(|| format!("reading {name} back"))?;
            let digest =
                Digest::from_str(sums.get(&name).expect("staged above")).map_err(|e| anyhow!(e))?;
            write_record(&memo, &OutStamp { key, digest, stamp })?;
        }
        for dir in &self.replaced {
            let path = self.dir.join(dir);
            for entry in
                fs::read_dir(&path).with_context(|| format!("reading {}", path.display()))?
            {
                let entry = entry?;
                let name = format!("{dir}/{}", entry.file_name().to_string_lossy());
                if entry.file_type()?.is_file() && !now.contains(&name) {
                    fs::remove_file(entry.path())
                        .with_context(|| format!("removing the older {name}"))?;
                    sums.remove(&name);
                }
            }
        }
        let text: String = sums.iter().map(|(n, d)| format!("{d}  {n}\n")).collect();
        let tmp = NamedTempFile::new_in(&self.dir).context("writing SHA256SUMS")?;
        fs::write(tmp.path(), text).context("writing SHA256SUMS")?;
        tmp.as_file()
            .set_permissions(fs::Permissions::from_mode(0o644))?;
        tmp.persist(&sums_path).context("writing SHA256SUMS")?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for OutDir {
    fn drop(&mut self) {
        if !self.committed && self.created {
            // Staged temporaries are removed by their own Drop first only if
            // we clear them here; then an empty directory we made goes too.
            self.staged.clear();
            let _ = fs::remove_dir(&self.dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stage_text(out: &mut OutDir, name: &str, text: &str) {
        out.stage(name, |w| Ok(w.write_all(text.as_bytes())?))
            .unwrap();
    }

    #[test]
    fn a_replaced_directory_keeps_only_this_builds_files_and_their_sums() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        let mut out = OutDir::open(&path).unwrap();
        stage_text(&mut out, "update/appliance_1.efi", "one");
        stage_text(&mut out, "vps.raw", "raw");
        out.commit().unwrap();

        let mut out = OutDir::open(&path).unwrap();
        out.replace_dir("update");
        stage_text(&mut out, "update/appliance_2.efi", "two");
        out.commit().unwrap();

        assert!(!path.join("update/appliance_1.efi").exists());
        assert_eq!(
            fs::read_to_string(path.join("update/appliance_2.efi")).unwrap(),
            "two"
        );
        // Other builds' files stay, with their lines.
        assert!(path.join("vps.raw").exists());
        let sums = fs::read_to_string(path.join(SUMS)).unwrap();
        let names: Vec<&str> = sums
            .lines()
            .filter_map(|l| l.split_once("  "))
            .map(|p| p.1)
            .collect();
        assert_eq!(names, ["update/appliance_2.efi", "vps.raw"], "{sums}");
    }

    fn sums_of(path: &Path) -> String {
        fs::read_to_string(path.join(SUMS)).unwrap()
    }

    #[test]
    fn a_linked_file_is_the_cached_one_and_kept_when_it_is_already_there() {
        let dir = tempfile::tempdir().unwrap();
        let cached = dir.path().join("disk.raw");
        fs::write(&cached, b"raw bytes").unwrap();
        let digest = Digest::of(b"raw bytes");
        let path = dir.path().join("out");
        let mut out = OutDir::open(&path).unwrap();
        out.stage_linked("vps.raw", &cached, digest).unwrap();
        out.commit().unwrap();
        let ino = |p: &Path| fs::metadata(p).unwrap().ino();
        assert_eq!(ino(&path.join("vps.raw")), ino(&cached), "a hard link");
        assert!(sums_of(&path).contains(&format!("{}  vps.raw", digest.hex())));

        // Again: nothing staged, the line stays.
        let mut out = OutDir::open(&path).unwrap();
        out.stage_linked("vps.raw", &cached, digest).unwrap();
        assert!(out.staged.is_empty());
        out.commit().unwrap();
        assert!(sums_of(&path).contains(&format!("{}  vps.raw", digest.hex())));

        // Another cached file replaces it; the old one is untouched.
        let newer = dir.path().join("newer.raw");
        fs::write(&newer, b"newer").unwrap();
        let mut out = OutDir::open(&path).unwrap();
        out.stage_linked("vps.raw", &newer, Digest::of(b"newer"))
            .unwrap();
        out.commit().unwrap();
        assert_eq!(fs::read(path.join("vps.raw")).unwrap(), b"newer");
        assert_eq!(fs::read(&cached).unwrap(), b"raw bytes");
    }

    #[test]
    fn a_keyed_file_is_written_again_only_for_a_new_key_or_when_it_was_changed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        let memo = dir.path().join("memo/bundle");
        let writes = std::cell::Cell::new(0);
        let stage = |key: u8, text: &'static str| {
            let mut out = OutDir::open(&path).unwrap();
            let digest = out
                .stage_keyed("b.tar", &Digest::of(&[key]), &memo, |w| {
                    writes.set(writes.get() + 1);
                    Ok(w.write_all(text.as_bytes())?)
                })
                .unwrap();
            out.commit().unwrap();
            digest
        };
        assert_eq!(stage(1, "one"), Digest::of(b"one"));
        assert_eq!(stage(1, "one"), Digest::of(b"one"));
        assert_eq!(writes.get(), 1, "the same key: kept");
        assert!(sums_of(&path).contains(&Digest::of(b"one").hex()));
        stage(2, "two");
        assert_eq!(writes.get(), 2, "a new key: written");
        // Changed by someone else: written again although the key is the same.
        std::thread::sleep(std::time::Duration::from_millis(20));
        fs::write(path.join("b.tar"), b"tampered").unwrap();
        stage(2, "two");
        assert_eq!(writes.get(), 3);
        assert_eq!(fs::read(path.join("b.tar")).unwrap(), b"two");
    }

    #[test]
    fn bytes_already_there_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        let mut out = OutDir::open(&path).unwrap();
        out.stage_bytes("m.json", b"{}").unwrap();
        out.commit().unwrap();
        let mut out = OutDir::open(&path).unwrap();
        out.stage_bytes("m.json", b"{}").unwrap();
        assert!(out.staged.is_empty());
        out.stage_bytes("n.json", b"[]").unwrap();
        assert_eq!(out.staged.len(), 1);
        out.commit().unwrap();
        let sums = sums_of(&path);
        assert!(
            sums.contains("  m.json") && sums.contains("  n.json"),
            "{sums}"
        );
    }
}
