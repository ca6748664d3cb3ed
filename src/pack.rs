//! Writes a [`Tree`] as a deterministic tar, and packs it as a layer blob.
//!
//! Every header is built here, explicitly: entry type, mode (including
//! setuid and 0600), numeric uid/gid, mtime = the build epoch, no user or
//! group names, no sparse entries. Entries come in path-byte order with
//! every parent directory before its children. Long paths use GNU long-name
//! records, which tar, podman and umoci read. This is the only place tar
//! entries are written.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;
use tar::{EntryType, Header};

use crate::digest::{Digest, HashingWriter};
use crate::pgzip::ParallelGzWriter;
use crate::tree::{Content, DeviceKind, Entry, Node, Tree};

/// What writing a tar produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TarSummary {
    /// sha256 of the uncompressed tar: the layer id (OCI diff_id).
    pub diff_id: Digest,
    pub size: u64,
    pub entries: u64,
}

/// A packed layer blob: the uncompressed identity and the gzip transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Packed {
    pub diff_id: Digest,
    pub size: u64,
    pub digest: Digest,
    pub compressed_size: u64,
    pub entries: u64,
}

/// Writes `tree` as a tar stream into `out`, every mtime set to `epoch`.
pub fn write_tar<W: Write>(tree: &Tree, epoch: u64, out: W) -> Result<(W, TarSummary)> {
    let mut builder = tar::Builder::new(HashingWriter::new(out));
    let mut entries = 0;
    for (path, entry) in tree.iter() {
        append_entry(&mut builder, path, entry, epoch)
            .with_context(|| format!("writing {} to the tar", String::from_utf8_lossy(path)))?;
        entries += 1;
    }
    let hashing = builder.into_inner().context("finishing the tar")?;
    let (out, diff_id, size) = hashing.finish();
    Ok((
        out,
        TarSummary {
            diff_id,
            size,
            entries,
        },
    ))
}

/// Packs `tree` as a gzip-compressed tar into `out` (fixed level, no name,
/// mtime 0) and returns both digests.
pub fn pack<W: Write>(tree: &Tree, epoch: u64, out: W) -> Result<(W, Packed)> {
    let gz = ParallelGzWriter::new(HashingWriter::new(out)).context("starting compression")?;
    let (gz, tar) = write_tar(tree, epoch, gz)?;
    let hashing = gz.finish().context("finishing compression")?;
    let (out, digest, compressed_size) = hashing.finish();
    Ok((
        out,
        Packed {
            diff_id: tar.diff_id,
            size: tar.size,
            digest,
            compressed_size,
            entries: tar.entries,
        },
    ))
}

fn append_entry<W: Write>(
    builder: &mut tar::Builder<W>,
    path: &[u8],
    entry: &Entry,
    epoch: u64,
) -> Result<()> {
    let mut header = Header::new_gnu();
    header.set_mode(entry.mode & 0o7777);
    header.set_uid(entry.uid.into());
    header.set_gid(entry.gid.into());
    header.set_mtime(epoch);
    header.set_size(0);
    match &entry.node {
        Node::Dir => {
            header.set_entry_type(EntryType::Directory);
            let mut with_slash = path.to_vec();
            with_slash.push(b'/');
            set_name(builder, &mut header, &with_slash, b'L')?;
            append(builder, &mut header, io::empty())?;
        }
        Node::File(content) => {
            header.set_entry_type(EntryType::Regular);
            header.set_size(content.size());
            set_name(builder, &mut header, path, b'L')?;
            match content {
                Content::Bytes(bytes) => append(builder, &mut header, &bytes[..])?,
                Content::File { path: src, size } => {
                    let file =
                        File::open(src).with_context(|| format!("reading {}", src.display()))?;
                    let reader = ExactReader {
                        inner: file.take(*size),
                        left: *size,
                        source: src,
                    };
                    append(builder, &mut header, reader)?;
                }
            }
        }
        Node::Symlink(target) => {
            header.set_entry_type(EntryType::Symlink);
            set_name(builder, &mut header, path, b'L')?;
            set_name(builder, &mut header, target, b'K')?;
            append(builder, &mut header, io::empty())?;
        }
        Node::Device { kind, major, minor } => {
            header.set_entry_type(match kind {
                DeviceKind::Char => EntryType::Char,
                DeviceKind::Block => EntryType::Block,
                DeviceKind::Fifo => EntryType::Fifo,
            });
            header.set_device_major(*major)?;
            header.set_device_minor(*minor)?;
            set_name(builder, &mut header, path, b'L')?;
            append(builder, &mut header, io::empty())?;
        }
    }
    Ok(())
}

/// Puts a path (`kind` b'L') or link target (b'K') into the header. Names
/// longer than the 100-byte field get a GNU long-name record first, written
/// here byte for byte so any name (including non-UTF-8) round-trips.
fn set_name<W: Write>(
    builder: &mut tar::Builder<W>,
    header: &mut Header,
    name: &[u8],
    kind: u8,
) -> Result<()> {
    let old = header.as_old_mut();
    let field = if kind == b'K' {
        &mut old.linkname
    } else {
        &mut old.name
    };
    field.fill(0);
    if name.len() > field.len() {
        let mut long = Header::new_gnu();
        long.as_old_mut().name[..13].copy_from_slice(b"././@LongLink");
        long.set_mode(0o644);
        long.set_uid(0);
        long.set_gid(0);
        long.set_mtime(0);
        long.set_entry_type(EntryType::new(kind));
        let mut data = name.to_vec();
        data.push(0);
        long.set_size(data.len() as u64);
        append(builder, &mut long, &data[..])?;
    }
    let n = name.len().min(field.len());
    field[..n].copy_from_slice(&name[..n]);
    Ok(())
}

/// Writes a fully prepared header and its data; only the checksum is
/// computed here.
fn append<W: Write>(
    builder: &mut tar::Builder<W>,
    header: &mut Header,
    data: impl Read,
) -> Result<()> {
    header.set_cksum();
    builder.append(header, data)?;
    Ok(())
}

/// Yields exactly the size recorded in the header: a file that shrank while
/// being packed is an error instead of a corrupt archive.
struct ExactReader<'a, R> {
    inner: R,
    left: u64,
    source: &'a Path,
}

impl<R: Read> Read for ExactReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && self.left > 0 && !buf.is_empty() {
            return Err(io::Error::other(format!(
                "{} changed while it was being packed",
                self.source.display()
            )));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample_tree() -> Tree {
        let mut t = Tree::new();
        let mut secret = Entry::file(Content::Bytes(b"s\n".to_vec()));
        secret.mode = 0o600;
        t.insert(b"etc/matrix/secret", secret).unwrap();
        let mut suid = Entry::file(Content::Bytes(b"#!/bin/sh\n".to_vec()));
        suid.mode = 0o4755;
        t.insert(b"usr/bin/tool", suid).unwrap();
        t.insert(b"usr/lib/link", Entry::symlink(&b"../bin/tool"[..]))
            .unwrap();
        t
    }

    /// A readable listing of a tar: the snapshot form the tests compare.
    fn listing(tar_bytes: &[u8]) -> Vec<String> {
        let mut archive = tar::Archive::new(tar_bytes);
        archive
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let h = e.header();
                format!(
                    "{} {:?} {:o} {}:{} {} {} {:?}",
                    String::from_utf8_lossy(&e.path_bytes()),
                    h.entry_type(),
                    h.mode().unwrap(),
                    h.uid().unwrap(),
                    h.gid().unwrap(),
                    h.mtime().unwrap(),
                    h.size().unwrap(),
                    h.username_bytes().map(|b| b.to_vec()),
                )
            })
            .collect()
    }

    #[test]
    fn headers_are_explicit_and_sorted() {
        let (bytes, summary) = write_tar(&sample_tree(), 1_700_000_000, Vec::new()).unwrap();
        assert_eq!(
            listing(&bytes),
            [
                "etc/ Directory 755 0:0 1700000000 0 Some([])",
                "etc/matrix/ Directory 755 0:0 1700000000 0 Some([])",
                "etc/matrix/secret Regular 600 0:0 1700000000 2 Some([])",
                "usr/ Directory 755 0:0 1700000000 0 Some([])",
                "usr/bin/ Directory 755 0:0 1700000000 0 Some([])",
                "usr/bin/tool Regular 4755 0:0 1700000000 10 Some([])",
                "usr/lib/ Directory 755 0:0 1700000000 0 Some([])",
                "usr/lib/link Symlink 777 0:0 1700000000 0 Some([])",
            ]
        );
        assert_eq!(summary.entries, 8);
        assert_eq!(summary.size, bytes.len() as u64);
        assert_eq!(summary.diff_id, Digest::of(&bytes));
    }

    #[test]
    fn the_epoch_changes_the_bytes_and_nothing_else_does() {
        let a = write_tar(&sample_tree(), 1, Vec::new()).unwrap().0;
        let b = write_tar(&sample_tree(), 1, Vec::new()).unwrap().0;
        let c = write_tar(&sample_tree(), 2, Vec::new()).unwrap().0;
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn pack_digests_describe_the_blob() {
        let (gz, packed) = pack(&sample_tree(), 7, Vec::new()).unwrap();
        assert_eq!(packed.digest, Digest::of(&gz));
        assert_eq!(packed.compressed_size, gz.len() as u64);
        let mut tar_bytes = Vec::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_end(&mut tar_bytes)
            .unwrap();
        assert_eq!(packed.diff_id, Digest::of(&tar_bytes));
    }

    #[test]
    fn a_file_that_shrinks_while_packing_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"short").unwrap();
        let mut t = Tree::new();
        t.insert(b"f", Entry::file(Content::File { path, size: 100 }))
            .unwrap();
        let err = write_tar(&t, 0, Vec::new()).unwrap_err();
        assert!(
            format!("{err:#}").contains("changed while it was being packed"),
            "{err:#}"
        );
    }

    proptest! {
        // Paths around the 100-byte name field and 155-byte prefix field,
        // and non-UTF-8 names, must come back byte for byte.
        #[test]
        fn long_and_odd_paths_round_trip(
            segs in proptest::collection::vec(
                proptest::collection::vec(prop_oneof![Just(b'a'), Just(b'Z'), Just(0xffu8), Just(b'-')], 1..60),
                1..6),
            target_len in 1usize..300,
        ) {
            let path: Vec<u8> = segs.join(&b'/');
            let mut t = Tree::new();
            t.insert(&path, Entry::file(Content::Bytes(path.clone()))).unwrap();
            let link_target = vec![b'x'; target_len];
            let mut link_path = path.clone();
            link_path.extend_from_slice(b"-link");
            t.insert(&link_path, Entry::symlink(link_target.clone())).unwrap();
            let (bytes, _) = write_tar(&t, 0, Vec::new()).unwrap();
            let mut archive = tar::Archive::new(&bytes[..]);
            let mut found = Vec::new();
            for e in archive.entries().unwrap() {
                let mut e = e.unwrap();
                let p = e.path_bytes().into_owned();
                let link = e.link_name_bytes().map(|l| l.into_owned());
                let mut data = Vec::new();
                e.read_to_end(&mut data).unwrap();
                found.push((p, link, data));
            }
            prop_assert!(found.iter().any(|(p, _, d)| *p == path && *d == path));
            prop_assert!(found.iter().any(|(p, l, _)| *p == link_path && l.as_deref() == Some(&link_target[..])));
        }
    }
}
