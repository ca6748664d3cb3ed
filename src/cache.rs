//! The content-addressed layer cache: packed blobs under
//! `blobs/sha256/<digest>` and, per layer input key, a record of what
//! packing those inputs produced. Same inputs → no repacking.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use sha2::{Digest as _, Sha256};

use crate::digest::{Digest, HashingReader};
use crate::layer::{field, hash_sources, Layer, SourceNode};
use crate::pack::Packed;
use crate::pgzip;
use crate::stamp::{read_record, write_record, Stamp};

pub struct Cache {
    root: PathBuf,
}

/// The cache directory: `explicit`, else $BUILDER_CACHE_DIR, else
/// $XDG_CACHE_HOME/builder, else ~/.cache/builder.
pub fn default_dir(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(p) = env("BUILDER_CACHE_DIR") {
        return Ok(p);
    }
    if let Some(p) = env("XDG_CACHE_HOME") {
        return Ok(p.join("builder"));
    }
    if let Some(home) = env("HOME") {
        return Ok(home.join(".cache").join("builder"));
    }
    anyhow::bail!("no cache directory: set --cache-dir, BUILDER_CACHE_DIR, XDG_CACHE_HOME or HOME")
}

/// A cache key being made: every key covers the kind of entry, the builder
/// version, the compression settings and the epoch; each kind adds the
/// inputs that decide its bytes.
pub struct Key(Sha256);

impl Key {
    pub fn new(kind: &str, epoch: u64) -> Key {
        let mut h = Sha256::new();
        field(&mut h, kind.as_bytes());
        field(&mut h, env!("CARGO_PKG_VERSION").as_bytes());
        field(
            &mut h,
            format!("gzip level {} chunk {}", pgzip::LEVEL, pgzip::CHUNK_SIZE).as_bytes(),
        );
        field(&mut h, &epoch.to_le_bytes());
        Key(h)
    }

    pub fn add(&mut self, bytes: &[u8]) -> &mut Key {
        field(&mut self.0, bytes);
        self
    }

    /// Adds a merged output tree: every path with its metadata and content.
    /// A streamed file is named by its path, which is a blob of this cache
    /// (named by its digest) or a file of a cached root.
    pub fn add_tree(&mut self, tree: &crate::tree::Tree) -> &mut Key {
        use crate::tree::{Content, Node};
        for (path, entry) in tree.iter() {
            field(&mut self.0, path);
            field(
                &mut self.0,
                format!(
                    "{} {:o} {} {}",
                    entry.type_name(),
                    entry.mode,
                    entry.uid,
                    entry.gid
                )
                .as_bytes(),
            );
            match &entry.node {
                Node::Dir => {}
                Node::File(Content::Bytes(b)) => field(&mut self.0, b),
                Node::File(Content::File { path, size }) => {
                    field(&mut self.0, path.as_os_str().as_encoded_bytes());
                    field(&mut self.0, &size.to_le_bytes());
                }
                Node::Symlink(target) => field(&mut self.0, target),
                Node::Device { kind, major, minor } => {
                    field(&mut self.0, format!("{kind:?} {major} {minor}").as_bytes())
                }
            }
        }
        self
    }

    /// Adds a source tree (paths, kinds, contents).
    pub fn add_sources(&mut self, sources: &BTreeMap<Vec<u8>, SourceNode>) -> &mut Key {
        hash_sources(&mut self.0, sources);
        self
    }

    pub fn finish(self) -> Digest {
        let digest: [u8; 32] = self.0.finalize().into();
        Digest::of(&digest)
    }
}

/// The inputs that decide a layer's bytes: the layer's own files and the
/// values it reads (besides what every key covers).
pub fn layer_key(layer: &Layer, values: &serde_json::Value, epoch: u64) -> Digest {
    let mut key = Key::new("builder layer cache v2", epoch);
    key.add(layer.name.as_bytes())
        .add(&layer.source_hash())
        .add(&serde_json::to_vec(values).expect("JSON values serialise"));
    key.finish()
}

impl Cache {
    pub fn open(root: PathBuf) -> Result<Cache> {
        for sub in ["blobs/sha256", "layers", "tmp"] {
            let dir = root.join(sub);
            fs::create_dir_all(&dir)
                .with_context(|| format!("creating cache directory {}", dir.display()))?;
        }
        Ok(Cache { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A fresh directory under the cache's tmp/ (removed when dropped).
    pub fn temp_dir(&self, prefix: &str) -> Result<tempfile::TempDir> {
        tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in(self.root.join("tmp"))
            .context("creating a directory in the cache")
    }

    /// Where `OutDir::stage_keyed` remembers the output file `path`.
    pub fn out_stamp(&self, path: &Path) -> PathBuf {
        let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let name = Digest::of(absolute.as_os_str().as_encoded_bytes());
        self.root.join("out-stamps").join(name.hex())
    }

    /// The cached directory of `group` and `key`, if there is one.
    pub fn dir_if_cached(&self, group: &str, key: &Digest) -> Option<PathBuf> {
        Some(self.root.join(group).join(key.hex())).filter(|d| d.is_dir())
    }

    /// A directory tree cached under `<cache>/<group>/<key>` (a Debian root):
    /// built once by `build` into a fresh directory, then renamed into place,
    /// so a half-built tree is never used. A concurrent build of the same key
    /// loses the rename and uses the winner's tree.
    pub fn dir_or_build(
        &self,
        group: &str,
        key: &Digest,
        build: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<PathBuf> {
        let parent = self.root.join(group);
        let dir = parent.join(key.hex());
        if dir.is_dir() {
            touch(&dir);
            return Ok(dir);
        }
        fs::create_dir_all(&parent)
            .with_context(|| format!("creating cache directory {}", parent.display()))?;
        let tmp = self.temp_dir(&format!("{group}-"))?;
        build(tmp.path())?;
        match fs::rename(tmp.path(), &dir) {
            Ok(()) => {
                let _ = tmp.keep();
                Ok(dir)
            }
            Err(_) if dir.is_dir() => Ok(dir),
            Err(e) => Err(e).with_context(|| format!("moving a built tree to {}", dir.display())),
        }
    }

    /// [`Cache::dir_or_build`] for big entries (finished disk images, a GB
    /// or more each): once a new one is built, only the `keep` most recently
    /// used of the group stay; the others are removed.
    pub fn dir_or_build_keeping(
        &self,
        group: &str,
        key: &Digest,
        keep: usize,
        build: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<PathBuf> {
        let mut built = false;
        let dir = self.dir_or_build(group, key, |dir| {
            built = true;
            build(dir)
        })?;
        if built {
            self.evict(group, keep, &dir)?;
        }
        Ok(dir)
    }

    /// Removes all but the `keep` most recently used entries of `group`
    /// (never `current`).
    fn evict(&self, group: &str, keep: usize, current: &Path) -> Result<()> {
        let parent = self.root.join(group);
        let mut entries = Vec::new();
        for entry in fs::read_dir(&parent)
            .with_context(|| format!("listing cache directory {}", parent.display()))?
        {
            let path = entry?.path();
            if path == current {
                continue;
            }
            // Gone already: another build evicted it.
            if let Ok(used) = fs::metadata(&path).and_then(|m| m.modified()) {
                entries.push((used, path));
            }
        }
        // Newest first; `current` is the newest of all and takes one place.
        entries.sort_by(|a, b| b.cmp(a));
        for (_, path) in entries.into_iter().skip(keep.saturating_sub(1)) {
            match fs::remove_dir_all(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(e)
                        .with_context(|| format!("removing old cache entry {}", path.display()))
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Whether an intact blob of this digest and size is stored: re-hashed,
    /// unless it is the very file that was hashed before, unchanged since
    /// (its stamp is recorded under `verified/`).
    pub fn has_blob(&self, digest: &Digest, size: u64) -> Result<bool> {
        let path = self.blob_path(digest);
        let Ok(stamp) = Stamp::of(&path) else {
            return Ok(false);
        };
        if stamp.size() != size {
            return Ok(false);
        }
        let memo = self.root.join("verified").join(digest.hex());
        if read_record::<Stamp>(&memo).is_some_and(|s| s == stamp) {
            return Ok(true);
        }
        let Ok(file) = File::open(&path) else {
            return Ok(false);
        };
        let (d, n) = HashingReader::new(file)
            .finish()
            .context("reading a cached blob")?;
        let intact = d == *digest && n == size;
        if intact {
            write_record(&memo, &stamp)?;
        }
        Ok(intact)
    }

    /// Stores bytes as a blob; returns their digest.
    pub fn put_bytes(&self, bytes: &[u8]) -> Result<Digest> {
        let digest = Digest::of(bytes);
        self.put_reader(&mut &bytes[..], &digest, bytes.len() as u64, "a blob")?;
        Ok(digest)
    }

    /// Copies `from` into the blob store if it has exactly the expected
    /// digest and size; `what` names it in the error otherwise.
    pub fn put_reader(
        &self,
        from: &mut dyn io::Read,
        digest: &Digest,
        size: u64,
        what: &str,
    ) -> Result<()> {
        let tmp = tempfile::NamedTempFile::new_in(self.root.join("tmp"))
            .context("creating a cache file")?;
        let mut hashing = HashingReader::new(from);
        io::copy(&mut hashing, &mut BufWriter::new(tmp.as_file()))
            .with_context(|| format!("copying {what}"))?;
        let (got, n) = hashing.finish()?;
        if got != *digest || n != size {
            anyhow::bail!(
                "{what} is damaged: expected {digest} ({size} bytes), found {got} ({n} bytes)"
            );
        }
        tmp.persist(self.blob_path(digest))
            .context("storing a blob in the cache")?;
        self.remember_intact(digest)
    }

    /// Records that the blob of `digest` was just hashed (written here), so
    /// that the next build does not hash it again (`has_blob`).
    fn remember_intact(&self, digest: &Digest) -> Result<()> {
        let stamp = Stamp::of(&self.blob_path(digest)).context("reading a stored blob")?;
        write_record(&self.root.join("verified").join(digest.hex()), &stamp)
    }

    /// A JSON record filed under `kind/<key>.json`, if there is a readable one.
    pub fn record<T: serde::de::DeserializeOwned>(&self, kind: &str, key: &Digest) -> Option<T> {
        let bytes = fs::read(self.root.join(kind).join(format!("{}.json", key.hex()))).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    pub fn put_record<T: serde::Serialize>(
        &self,
        kind: &str,
        key: &Digest,
        value: &T,
    ) -> Result<()> {
        let dir = self.root.join(kind);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let record = tempfile::NamedTempFile::new_in(self.root.join("tmp"))
            .context("creating a cache file")?;
        serde_json::to_writer(record.as_file(), value).context("writing a cache record")?;
        record
            .persist(dir.join(format!("{}.json", key.hex())))
            .context("storing a cache record")?;
        Ok(())
    }

    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(digest.hex())
    }

    fn record_path(&self, key: &Digest) -> PathBuf {
        self.root.join("layers").join(format!("{}.json", key.hex()))
    }

    /// The packed layer for `key`, if the record and an intact blob exist.
    /// A blob changed since it was hashed is hashed again: a damaged cache
    /// must not reach a bundle.
    pub fn get(&self, key: &Digest) -> Result<Option<Packed>> {
        let record = match fs::read(self.record_path(key)) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).context("reading the layer cache"),
        };
        let Ok(packed) = serde_json::from_slice::<Packed>(&record) else {
            return Ok(None);
        };
        Ok(self
            .has_blob(&packed.digest, packed.compressed_size)?
            .then_some(packed))
    }

    /// The packed layer for `key`, packing the tree `make` gives on a miss;
    /// true if it came from the cache.
    pub fn get_or_pack(
        &self,
        key: &Digest,
        epoch: u64,
        make: impl FnOnce() -> Result<crate::tree::Tree>,
    ) -> Result<(Packed, bool)> {
        if let Some(packed) = self.get(key)? {
            return Ok((packed, true));
        }
        let tree = make()?;
        let packed = self.put(key, |out| Ok(crate::pack::pack(&tree, epoch, out)?.1))?;
        Ok((packed, false))
    }

    /// Packs with `write` into a temporary file and files the blob and the
    /// record under their names.
    pub fn put(
        &self,
        key: &Digest,
        write: impl FnOnce(&mut dyn Write) -> Result<Packed>,
    ) -> Result<Packed> {
        let tmp = tempfile::NamedTempFile::new_in(self.root.join("tmp"))
            .context("creating a cache file")?;
        let mut out = BufWriter::new(tmp.as_file());
        let packed = write(&mut out)?;
        out.flush().context("writing a cache file")?;
        drop(out);
        tmp.persist(self.blob_path(&packed.digest))
            .context("storing a blob in the cache")?;
        self.remember_intact(&packed.digest)?;
        let record = tempfile::NamedTempFile::new_in(self.root.join("tmp"))
            .context("creating a cache file")?;
        serde_json::to_writer(record.as_file(), &packed).context("writing a cache record")?;
        record
            .persist(self.record_path(key))
            .context("storing a cache record")?;
        Ok(packed)
    }
}

/// Marks a cached entry as used now (its mtime orders eviction). Failing to
/// only makes it look older, so the error is ignored.
// The clock orders cache use only; nothing built reads it.
#[allow(clippy::disallowed_methods)]
fn touch(dir: &Path) {
    if let Ok(f) = File::open(dir) {
        let _ = f.set_modified(std::time::SystemTime::now());
    }
}

/// The running builder's own bytes: what it writes is its code's doing, so
/// another builder never reuses a cached disk image or output file.
pub fn builder_digest() -> Result<[u8; 32]> {
    let exe = std::env::current_exe().context("finding the builder's own executable")?;
    let mut file = File::open(&exe).with_context(|| format!("reading {}", exe.display()))?;
    let mut hasher = Sha256::new();
    io::copy(&mut file, &mut hasher).with_context(|| format!("reading {}", exe.display()))?;
    Ok(hasher.finalize().into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    fn key(n: u8) -> Digest {
        Digest::of(&[n])
    }

    /// Marks `dir` as last used `secs` before a fixed past time.
    fn age(dir: &Path, secs: u64) {
        File::open(dir)
            .unwrap()
            .set_modified(UNIX_EPOCH + Duration::from_secs(1_700_000_000 - secs))
            .unwrap();
    }

    #[test]
    fn a_new_big_entry_evicts_the_least_recently_used_beyond_the_limit() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::open(tmp.path().join("cache")).unwrap();
        let build = |n: u8| {
            cache
                .dir_or_build_keeping("big", &key(n), 3, |dir| {
                    fs::write(dir.join("image"), [n])?;
                    Ok(())
                })
                .unwrap()
        };
        let (one, two, three) = (build(1), build(2), build(3));
        age(&one, 300);
        age(&two, 200);
        age(&three, 100);
        // A hit on the oldest makes it the most recently used.
        assert_eq!(build(1), one);
        let four = build(4);
        assert!(!two.exists(), "the least recently used entry stays");
        for kept in [&one, &three, &four] {
            assert!(
                kept.join("image").is_file(),
                "{} was removed",
                kept.display()
            );
        }
        assert_eq!(fs::read(four.join("image")).unwrap(), [4]);
    }

    #[test]
    fn a_hit_evicts_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::open(tmp.path().join("cache")).unwrap();
        let dirs: Vec<PathBuf> = (1..=3)
            .map(|n| cache.dir_or_build("big", &key(n), |_| Ok(())).unwrap())
            .collect();
        cache
            .dir_or_build_keeping("big", &key(1), 1, |_| panic!("built again"))
            .unwrap();
        assert!(dirs.iter().all(|d| d.is_dir()));
    }

    #[test]
    fn a_blob_changed_after_it_was_checked_is_checked_again() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::open(tmp.path().join("cache")).unwrap();
        let digest = cache.put_bytes(b"blob bytes").unwrap();
        // Hashed as it was stored: remembered by its stamp.
        assert!(tmp
            .path()
            .join("cache/verified")
            .join(digest.hex())
            .is_file());
        assert!(cache.has_blob(&digest, 10).unwrap());
        // The same size, other bytes: found damaged.
        std::thread::sleep(std::time::Duration::from_millis(20));
        fs::write(cache.blob_path(&digest), b"blob bytez").unwrap();
        assert!(!cache.has_blob(&digest, 10).unwrap());
        assert!(!cache.has_blob(&digest, 11).unwrap());
    }
}
