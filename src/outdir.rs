//! Writing into `--out` so that a failed build leaves nothing half written:
//! every file is staged as a temporary file beside its final name and all
//! are renamed into place only when every one of them is complete.
//! `SHA256SUMS` in the directory is updated last, keeping the lines of
//! other builds' files.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufWriter, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use tempfile::NamedTempFile;

use crate::digest::{Digest, HashingWriter};

pub const SUMS: &str = "SHA256SUMS";

pub struct OutDir {
    dir: PathBuf,
    created: bool,
    staged: Vec<(NamedTempFile, String, Digest)>,
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

    /// Stages a copy of an existing file (a cached disk image, gigabytes and
    /// sparse), keeping its holes; the source stays.
    pub fn stage_file(&mut self, name: &str, src: &Path) -> Result<Digest> {
        let digest = crate::digest::HashingReader::new(
            fs::File::open(src).with_context(|| format!("reading {}", src.display()))?,
        )
        .finish()
        .with_context(|| format!("reading {}", src.display()))?
        .0;
        let tmp = self.temp_beside(name)?;
        exec::run(
            exec::command("cp")
                .arg("--sparse=always")
                .arg(src)
                .arg(tmp.path()),
            &format!("copying {} into {} (cp)", src.display(), self.dir.display()),
        )?;
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o644))?;
        self.staged.push((tmp, name.to_string(), digest));
        Ok(digest)
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
}
