//! SHA-256 of a disk image whose leading part does not change between builds:
//! the hash state after the OS image's partitions (gigabytes, mostly holes) is
//! saved once with the OS image, and each build with new site values hashes
//! only the state partition and what follows from there. sha2's own
//! compression function does the work; only the state is kept here.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::digest::generic_array::GenericArray;

use crate::digest::Digest;

/// SHA-256's initial hash value (FIPS 180-4, 5.3.3).
const H0: [u32; 8] = [
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
];
const BLOCK: usize = 64;

/// The hash state after the first `len` bytes of a file (`len` a multiple of
/// the 64-byte block).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Midstate {
    pub state: [u32; 8],
    pub len: u64,
}

/// The state after the first `len` bytes of `path`.
pub fn midstate(path: &Path, len: u64) -> Result<Midstate> {
    ensure!(
        len % BLOCK as u64 == 0,
        "a hash can be resumed only at a multiple of {BLOCK} bytes, not at {len}"
    );
    let mut file = File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut state = H0;
    let mut left = len;
    let mut buf = vec![0u8; 1 << 20];
    while left > 0 {
        let n = buf.len().min(left as usize);
        file.read_exact(&mut buf[..n])
            .with_context(|| format!("reading {}", path.display()))?;
        compress(&mut state, &buf[..n]);
        left -= n as u64;
    }
    Ok(Midstate { state, len })
}

/// SHA-256 of the whole of `path`, its first `mid.len` bytes taken from `mid`.
pub fn finish(mid: &Midstate, path: &Path) -> Result<Digest> {
    let mut file = File::open(path).with_context(|| format!("reading {}", path.display()))?;
    file.seek(SeekFrom::Start(mid.len))?;
    let mut state = mid.state;
    let mut total = mid.len;
    let mut buf = vec![0u8; 1 << 20];
    // Bytes read but not yet a whole block, at the start of `buf`.
    let mut pending = 0;
    loop {
        let n = file
            .read(&mut buf[pending..])
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        total += n as u64;
        let have = pending + n;
        let whole = have - have % BLOCK;
        compress(&mut state, &buf[..whole]);
        buf.copy_within(whole..have, 0);
        pending = have - whole;
    }
    // Padding: 0x80, zeros, the length in bits (big-endian), to whole blocks.
    let mut tail = buf[..pending].to_vec();
    tail.push(0x80);
    while tail.len() % BLOCK != BLOCK - 8 {
        tail.push(0);
    }
    tail.extend_from_slice(&(total * 8).to_be_bytes());
    compress(&mut state, &tail);
    let mut out = [0u8; 32];
    for (chunk, word) in out.chunks_mut(4).zip(state) {
        chunk.copy_from_slice(&word.to_be_bytes());
    }
    Ok(Digest::from_bytes(out))
}

/// Runs the compression function over whole blocks.
fn compress(state: &mut [u32; 8], bytes: &[u8]) {
    debug_assert!(bytes.len() % BLOCK == 0);
    let blocks: Vec<GenericArray<u8, _>> = bytes
        .chunks_exact(BLOCK)
        .map(|c| *GenericArray::from_slice(c))
        .collect();
    sha2::compress256(state, &blocks);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resuming_gives_the_files_sha256_at_any_length() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        // Lengths around block and padding edges, and a cut that is not the start.
        for len in [
            0usize,
            1,
            55,
            56,
            63,
            64,
            65,
            119,
            120,
            128,
            4096 + 17,
            (1 << 20) + 3,
        ] {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            std::fs::write(&path, &bytes).unwrap();
            let want = Digest::of(&bytes);
            for cut in [0, 64, (len / 64) * 64].into_iter().filter(|c| *c <= len) {
                let mid = midstate(&path, cut as u64).unwrap();
                assert_eq!(finish(&mid, &path).unwrap(), want, "len {len}, cut {cut}");
            }
        }
    }

    #[test]
    fn a_cut_inside_a_block_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), [0u8; 100]).unwrap();
        assert!(midstate(&dir.path().join("f"), 65).is_err());
    }
}
