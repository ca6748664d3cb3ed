//! Whether a file is still the one a build wrote or checked: its device,
//! inode, size and modification time, recorded then and compared now (what
//! make-like tools trust). Not its ctime: making a hard link to the file (the
//! way outputs leave the cache) changes it. Used so that a build with nothing
//! new neither re-hashes cached blobs nor rewrites gigabytes of output.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
}

impl Stamp {
    pub fn of(path: &Path) -> io::Result<Stamp> {
        let m = fs::metadata(path)?;
        Ok(Stamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.len(),
            mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether `path` is the very file this stamp was taken of, unchanged.
    pub fn matches(&self, path: &Path) -> bool {
        Stamp::of(path).is_ok_and(|now| now == *self)
    }
}

/// Reads a JSON record (`None` when it is missing or unreadable: the caller
/// then does the work again).
pub fn read_record<T: serde::de::DeserializeOwned>(path: &Path) -> Option<T> {
    serde_json::from_slice(&fs::read(path).ok()?).ok()
}

/// Writes a JSON record atomically (a temporary file renamed into place).
pub fn write_record<T: Serialize>(path: &Path, record: &T) -> anyhow::Result<()> {
    let dir = path.parent().expect("a record has a directory");
    fs::create_dir_all(dir)?;
    let tmp = tempfile::NamedTempFile::new_in(dir)?;
    fs::write(tmp.path(), serde_json::to_vec(record)?)?;
    tmp.persist(path)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rewritten_or_replaced_file_no_longer_matches() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        fs::write(&path, b"one").unwrap();
        let stamp = Stamp::of(&path).unwrap();
        assert!(stamp.matches(&path));
        // A hard link elsewhere leaves it the same file.
        fs::hard_link(&path, dir.path().join("g")).unwrap();
        assert!(stamp.matches(&path));
        // Written again (same size): its mtime moves on.
        std::thread::sleep(std::time::Duration::from_millis(20));
        fs::write(&path, b"two").unwrap();
        assert!(!stamp.matches(&path));
        // Replaced by another file.
        let stamp = Stamp::of(&path).unwrap();
        fs::remove_file(&path).unwrap();
        fs::copy(dir.path().join("g"), &path).unwrap();
        assert!(!stamp.matches(&path));
        assert!(!stamp.matches(&dir.path().join("missing")));
    }
}
