//! The state partition (/var) as built: an ext4 file system that holds only
//! the appliance extension (`lib/appliance/extensions/`), written into the
//! disk image in place. The OS image's disk leaves the partition empty, so a
//! changed site value rewrites these few megabytes, not the disk.

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use anyhow::{Context, Result};
use rustix::fs::{fallocate, FallocateFlags};

use super::extension;
use super::tools::Tools;

/// Makes `scratch/var.img` (`size` bytes, ext4) holding `extension_image`
/// as this version's extension. File system UUID and directory hash seed
/// derive from `seed`; timestamps are the epoch.
pub fn make_image(
    tools: &Tools,
    scratch: &Path,
    extension_image: &Path,
    version: &str,
    size: u64,
    seed: &str,
    epoch: u64,
) -> Result<()> {
    let tree = scratch.join("var");
    let dir = tree.join(extension::VAR_DIR);
    fs::create_dir_all(&dir)?;
    fs::copy(extension_image, dir.join(extension::file_name(version)))
        .context("staging the extension on the state partition")?;
    super::assemble::clamp_mtimes(&tree, epoch)?;
    let uuid = super::partition::uuid_from(&format!("{seed} var file system"));
    let options = format!(
        "hash_seed={},root_owner=0:0",
        super::partition::uuid_from(&format!("{seed} ext4 hash_seed"))
    );
    let blocks = format!("{}k", size / 1024);
    let epoch_text = epoch.to_string();
    let mut cmd = tools
        .sandbox(scratch)
        .env("SOURCE_DATE_EPOCH", &epoch_text)
        // mke2fs's own clock (superblock and inode times) for reproducible bytes.
        .env("E2FSPROGS_FAKE_TIME", &epoch_text)
        .command(&[
            "mkfs.ext4",
            "-q",
            "-F",
            "-L",
            "var",
            "-U",
            &uuid,
            "-E",
            &options,
            "-d",
            "/work/var",
            "/work/var.img",
            &blocks,
        ])?;
    exec::run(&mut cmd, "making the state partition (mkfs.ext4)")
}

/// Writes `image` over the `size` bytes at `offset` in `disk`: the region is
/// emptied first (a hole), then only the image's data extents are written,
/// so the disk stays sparse.
pub fn write_into(disk: &Path, offset: u64, size: u64, image: &Path) -> Result<()> {
    let mut src = File::open(image).with_context(|| format!("reading {}", image.display()))?;
    let len = src.metadata()?.len();
    anyhow::ensure!(
        len <= size,
        "the state partition's image ({len} bytes) is larger than its partition ({size} bytes)"
    );
    let mut dst = fs::OpenOptions::new()
        .write(true)
        .open(disk)
        .with_context(|| format!("opening {}", disk.display()))?;
    fallocate(
        &dst,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        offset,
        size,
    )
    .with_context(|| format!("emptying the state partition in {}", disk.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    for (start, end) in data_extents(&src, len)? {
        src.seek(SeekFrom::Start(start))?;
        dst.seek(SeekFrom::Start(offset + start))?;
        let mut left = end - start;
        while left > 0 {
            let n = buf.len().min(left as usize);
            src.read_exact(&mut buf[..n])?;
            dst.write_all(&buf[..n])?;
            left -= n as u64;
        }
    }
    // Not synced here: like the rest of a cache entry, it is renamed into place
    // once complete (a sync would wait for the whole copied disk to reach storage).
    Ok(())
}

/// The byte ranges of `file` that hold data (SEEK_DATA / SEEK_HOLE).
fn data_extents(file: &File, len: u64) -> Result<Vec<(u64, u64)>> {
    use rustix::fs::{seek, SeekFrom as At};
    let mut extents = Vec::new();
    let mut pos = 0;
    while pos < len {
        let start = match seek(file, At::Data(pos)) {
            Ok(p) => p,
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => return Err(e).context("finding the state partition's data (SEEK_DATA)"),
        };
        let end = seek(file, At::Hole(start))
            .context("finding the state partition's data (SEEK_HOLE)")?
            .min(len);
        extents.push((start, end));
        pos = end;
    }
    Ok(extents)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_partition_is_rewritten_and_holes_stay_holes() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("disk");
        let image = dir.path().join("image");
        // A disk with data before, in and after the partition (bytes 4096..12288).
        let mut bytes = vec![1u8; 16384];
        bytes[4096..12288].fill(7);
        fs::write(&disk, &bytes).unwrap();
        // An image with data at its start and at 6000, a hole between.
        let f = File::create(&image).unwrap();
        f.set_len(8192).unwrap();
        drop(f);
        let mut f = fs::OpenOptions::new().write(true).open(&image).unwrap();
        f.write_all(b"head").unwrap();
        f.seek(SeekFrom::Start(6000)).unwrap();
        f.write_all(b"tail").unwrap();
        drop(f);
        write_into(&disk, 4096, 8192, &image).unwrap();
        let got = fs::read(&disk).unwrap();
        assert_eq!(&got[..4096], &bytes[..4096], "before the partition");
        assert_eq!(&got[12288..], &bytes[12288..], "after the partition");
        let mut want = vec![0u8; 8192];
        want[..4].copy_from_slice(b"head");
        want[6000..6004].copy_from_slice(b"tail");
        assert_eq!(&got[4096..12288], &want[..], "the partition is the image");
    }

    #[test]
    fn an_image_larger_than_its_partition_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("disk"), vec![0u8; 4096]).unwrap();
        fs::write(dir.path().join("image"), vec![1u8; 4097]).unwrap();
        let err =
            write_into(&dir.path().join("disk"), 0, 4096, &dir.path().join("image")).unwrap_err();
        assert!(
            err.to_string().contains("larger than its partition"),
            "{err}"
        );
    }
}
