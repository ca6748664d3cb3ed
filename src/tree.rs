//! An in-memory file tree: what a layer (or a bundle) contains, keyed by path
//! bytes so iteration order is the byte order of paths and never depends on
//! the order a directory was read in.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Where the bytes of a regular file come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// Held in memory (rendered templates, small files, JSON documents).
    Bytes(Vec<u8>),
    /// Streamed from disk when the tar is written; `size` is checked then.
    File { path: PathBuf, size: u64 },
}

impl Content {
    pub fn size(&self) -> u64 {
        match self {
            Content::Bytes(b) => b.len() as u64,
            Content::File { size, .. } => *size,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    Char,
    Block,
    Fifo,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Dir,
    File(Content),
    /// The link target, stored as given; never followed.
    Symlink(Vec<u8>),
    /// Device nodes and fifos, as found in an OS root tree.
    Device {
        kind: DeviceKind,
        major: u32,
        minor: u32,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub node: Node,
    /// Permission bits including setuid/setgid/sticky (`0o7777` at most).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

impl Entry {
    pub fn dir() -> Self {
        Entry {
            node: Node::Dir,
            mode: 0o755,
            uid: 0,
            gid: 0,
        }
    }

    pub fn file(content: Content) -> Self {
        Entry {
            node: Node::File(content),
            mode: 0o644,
            uid: 0,
            gid: 0,
        }
    }

    pub fn symlink(target: impl Into<Vec<u8>>) -> Self {
        Entry {
            node: Node::Symlink(target.into()),
            mode: 0o777,
            uid: 0,
            gid: 0,
        }
    }

    pub fn type_name(&self) -> &'static str {
        match self.node {
            Node::Dir => "dir",
            Node::File(_) => "file",
            Node::Symlink(_) => "symlink",
            Node::Device {
                kind: DeviceKind::Char,
                ..
            } => "char",
            Node::Device {
                kind: DeviceKind::Block,
                ..
            } => "block",
            Node::Device {
                kind: DeviceKind::Fifo,
                ..
            } => "fifo",
        }
    }
}

/// A set of entries keyed by relative path (no leading `/`, no trailing `/`,
/// no `.` or `..` components). Every parent directory is present.
#[derive(Debug, Default, Clone)]
pub struct Tree {
    entries: BTreeMap<Vec<u8>, Entry>,
}

/// Checks that `path` is a clean relative path: non-empty components, no
/// leading `/`, no `.` or `..`, no NUL.
pub fn check_relative_path(path: &[u8]) -> Result<(), String> {
    if path.is_empty() {
        return Err("the path is empty".into());
    }
    if path.starts_with(b"/") {
        return Err("the path is absolute; paths are relative to the tree root".into());
    }
    if path.contains(&0) {
        return Err("the path contains a NUL byte".into());
    }
    for component in path.split(|b| *b == b'/') {
        match component {
            b"" => return Err("the path has an empty component (`//` or a trailing `/`)".into()),
            b"." | b".." => {
                return Err(
                    "the path has a `.` or `..` component; use a plain relative path".into(),
                )
            }
            _ => {}
        }
    }
    Ok(())
}

impl Tree {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an entry, creating missing parent directories with default
    /// attributes. Replaces an existing entry at the same path.
    pub fn insert(&mut self, path: &[u8], entry: Entry) -> Result<()> {
        if let Err(why) = check_relative_path(path) {
            bail!("invalid path {}: {why}", String::from_utf8_lossy(path));
        }
        let mut end = 0;
        while let Some(pos) = path[end..].iter().position(|b| *b == b'/') {
            let parent = &path[..end + pos];
            match self.entries.get(parent) {
                None => {
                    self.entries.insert(parent.to_vec(), Entry::dir());
                }
                Some(e) if e.node != Node::Dir => bail!(
                    "{} is a {}, but {} needs it to be a directory",
                    String::from_utf8_lossy(parent),
                    e.type_name(),
                    String::from_utf8_lossy(path)
                ),
                Some(_) => {}
            }
            end += pos + 1;
        }
        self.entries.insert(path.to_vec(), entry);
        Ok(())
    }

    pub fn get(&self, path: &[u8]) -> Option<&Entry> {
        self.entries.get(path)
    }

    pub fn get_mut(&mut self, path: &[u8]) -> Option<&mut Entry> {
        self.entries.get_mut(path)
    }

    /// Entries in path-byte order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &Entry)> {
        self.entries.iter().map(|(k, v)| (k.as_slice(), v))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Reads a directory tree from disk as it is, keeping modes and numeric
    /// owners (an OS root tree needs its setuid bits and owners), never
    /// following symlinks. File contents are streamed later, not loaded.
    pub fn from_dir(root: &Path) -> Result<Tree> {
        let meta =
            fs::symlink_metadata(root).with_context(|| format!("reading {}", root.display()))?;
        if !meta.is_dir() {
            bail!("{} is not a directory", root.display());
        }
        let mut tree = Tree::new();
        let mut stack = vec![(root.to_path_buf(), Vec::new())];
        while let Some((dir, rel)) = stack.pop() {
            let listing =
                fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))?;
            for item in listing {
                let item = item.with_context(|| format!("listing {}", dir.display()))?;
                let path = item.path();
                let mut item_rel = rel.clone();
                if !item_rel.is_empty() {
                    item_rel.push(b'/');
                }
                item_rel.extend_from_slice(item.file_name().as_bytes());
                let meta = fs::symlink_metadata(&path)
                    .with_context(|| format!("reading {}", path.display()))?;
                let ft = meta.file_type();
                let node = if ft.is_dir() {
                    stack.push((path.clone(), item_rel.clone()));
                    Node::Dir
                } else if ft.is_file() {
                    Node::File(Content::File {
                        path: path.clone(),
                        size: meta.len(),
                    })
                } else if ft.is_symlink() {
                    let target = fs::read_link(&path)
                        .with_context(|| format!("reading link {}", path.display()))?;
                    Node::Symlink(target.as_os_str().as_bytes().to_vec())
                } else if ft.is_char_device() || ft.is_block_device() || ft.is_fifo() {
                    let kind = if ft.is_char_device() {
                        DeviceKind::Char
                    } else if ft.is_block_device() {
                        DeviceKind::Block
                    } else {
                        DeviceKind::Fifo
                    };
                    let rdev = meta.rdev();
                    Node::Device {
                        kind,
                        major: major(rdev),
                        minor: minor(rdev),
                    }
                } else {
                    bail!("{} is a socket, which a tree cannot hold", path.display());
                };
                let entry = Entry {
                    node,
                    mode: meta.mode() & 0o7777,
                    uid: meta.uid(),
                    gid: meta.gid(),
                };
                tree.insert(&item_rel, entry)?;
            }
        }
        Ok(tree)
    }
}

// The Linux encoding of dev_t (glibc's gnu_dev_major/minor).
fn major(dev: u64) -> u32 {
    (((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0x0000_0fff)) as u32
}

fn minor(dev: u64) -> u32 {
    (((dev >> 12) & 0xffff_ff00) | (dev & 0x0000_00ff)) as u32
}

impl Tree {
    /// Writes a tree to disk with its modes; owners too when running as root.
    /// A file or link already at a path (the disk image's base) is replaced,
    /// never written through.
    pub fn write_to(&self, root: &Path) -> anyhow::Result<()> {
        let as_root = rustix::process::geteuid().is_root();
        let mut dirs = Vec::new();
        for (path, entry) in self.iter() {
            let dest = root.join(std::ffi::OsStr::from_bytes(path));
            let existing = fs::symlink_metadata(&dest).ok();
            if existing.is_some_and(|m| !m.is_dir()) && !matches!(entry.node, Node::Dir) {
                fs::remove_file(&dest).with_context(|| format!("replacing {}", dest.display()))?;
            }
            match &entry.node {
                Node::Dir => {
                    fs::create_dir_all(&dest)?;
                    dirs.push((dest.clone(), entry.mode));
                }
                Node::File(Content::Bytes(bytes)) => {
                    fs::write(&dest, bytes)
                        .with_context(|| format!("writing {}", dest.display()))?;
                    fs::set_permissions(&dest, fs::Permissions::from_mode(entry.mode))?;
                }
                Node::File(Content::File { path: src, .. }) => {
                    fs::copy(src, &dest).with_context(|| format!("writing {}", dest.display()))?;
                    fs::set_permissions(&dest, fs::Permissions::from_mode(entry.mode))?;
                }
                Node::Symlink(target) => symlink(std::ffi::OsStr::from_bytes(target), &dest)?,
                Node::Device { .. } => {
                    return Err(anyhow::anyhow!(
                        "{}: device nodes are not written by render",
                        dest.display()
                    ))
                }
            }
            if as_root {
                std::os::unix::fs::lchown(&dest, Some(entry.uid), Some(entry.gid))?;
            }
        }
        // Directory modes last, deepest first, so a read-only directory does not
        // stop its own children from being written.
        for (dir, mode) in dirs.into_iter().rev() {
            fs::set_permissions(&dir, fs::Permissions::from_mode(mode))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_creates_parents_and_sorts_by_bytes() {
        let mut t = Tree::new();
        t.insert(b"usr/lib/x", Entry::file(Content::Bytes(b"x".to_vec())))
            .unwrap();
        t.insert(b"usr/lib-foo", Entry::file(Content::Bytes(vec![])))
            .unwrap();
        let paths: Vec<_> = t
            .iter()
            .map(|(p, _)| String::from_utf8_lossy(p).into_owned())
            .collect();
        assert_eq!(paths, ["usr", "usr/lib", "usr/lib-foo", "usr/lib/x"]);
    }

    #[test]
    fn bad_paths_are_refused() {
        for bad in [&b"/etc/x"[..], b"a/../b", b"a//b", b"./a", b"a/", b""] {
            assert!(
                check_relative_path(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(check_relative_path(b"a/b.c/..d").is_ok());
    }

    #[test]
    fn a_file_cannot_be_a_parent() {
        let mut t = Tree::new();
        t.insert(b"a", Entry::file(Content::Bytes(vec![]))).unwrap();
        assert!(t.insert(b"a/b", Entry::dir()).is_err());
    }
}
