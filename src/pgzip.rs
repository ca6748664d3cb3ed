//! A gzip writer that compresses on all cores yet gives the same bytes
//! whatever the core count: the input is cut into fixed 1 MiB chunks, each
//! deflated on a worker with the previous chunk's last 32 KiB as dictionary
//! and ended with a sync flush, and the pieces are joined in order into one
//! gzip member (the scheme pigz uses). Chunk size, level and dictionary are
//! fixed, so the output depends only on the input and the pinned zlib-rs.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};

use flate2::{Compress, Compression, FlushCompress, Status};

/// Bytes of input per independently compressed chunk.
pub const CHUNK_SIZE: usize = 1 << 20;
/// The deflate window: how much of the previous chunk primes the next.
const DICT_SIZE: usize = 32 * 1024;
/// The compression level used for every blob; part of the output format.
pub const LEVEL: u32 = 6;

/// gzip header: magic, deflate, no flags, mtime 0, no extra flags, OS
/// "unknown" (255) so the bytes do not depend on the building system.
const GZIP_HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255];

struct Job {
    index: u64,
    data: Vec<u8>,
    dict: Vec<u8>,
    last: bool,
}

struct Done {
    index: u64,
    result: io::Result<Vec<u8>>,
    crc: u32,
    len: u64,
}

pub struct ParallelGzWriter<W: Write> {
    /// `None` only after `finish` handed it back.
    out: Option<W>,
    buf: Vec<u8>,
    dict: Vec<u8>,
    crc: crc32fast::Hasher,
    /// Input bytes so far, for the gzip trailer.
    total_in: u64,
    next_index: u64,
    next_to_write: u64,
    pending: BTreeMap<u64, Done>,
    in_flight: usize,
    max_in_flight: usize,
    jobs: Option<SyncSender<Job>>,
    done: Receiver<Done>,
    workers: Vec<JoinHandle<()>>,
    failed: bool,
}

impl<W: Write> ParallelGzWriter<W> {
    pub fn new(mut out: W) -> io::Result<Self> {
        out.write_all(&GZIP_HEADER)?;
        let threads = thread::available_parallelism().map_or(1, |n| n.get());
        let (job_tx, job_rx) = mpsc::sync_channel::<Job>(threads);
        let (done_tx, done_rx) = mpsc::channel::<Done>();
        let job_rx = Arc::new(Mutex::new(job_rx));
        let workers = (0..threads)
            .map(|_| {
                let job_rx = Arc::clone(&job_rx);
                let done_tx = done_tx.clone();
                thread::spawn(move || worker(&job_rx, &done_tx))
            })
            .collect();
        Ok(ParallelGzWriter {
            out: Some(out),
            buf: Vec::with_capacity(CHUNK_SIZE),
            dict: Vec::new(),
            crc: crc32fast::Hasher::new(),
            total_in: 0,
            next_index: 0,
            next_to_write: 0,
            pending: BTreeMap::new(),
            in_flight: 0,
            // Bounds memory: at most this many chunks (in and out) exist.
            max_in_flight: 2 * threads + 1,
            jobs: Some(job_tx),
            done: done_rx,
            workers,
            failed: false,
        })
    }

    fn submit(&mut self, last: bool) -> io::Result<()> {
        while self.in_flight >= self.max_in_flight {
            self.write_one_result()?;
        }
        let data = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK_SIZE));
        let dict = std::mem::take(&mut self.dict);
        if !last {
            self.dict = data[data.len().saturating_sub(DICT_SIZE)..].to_vec();
        }
        let job = Job {
            index: self.next_index,
            data,
            dict,
            last,
        };
        self.next_index += 1;
        self.in_flight += 1;
        self.jobs
            .as_ref()
            .expect("writer used after finish")
            .send(job)
            .map_err(|_| io::Error::other("compression worker stopped"))
    }

    /// Waits until the next chunk in order is compressed and writes it.
    fn write_one_result(&mut self) -> io::Result<()> {
        while !self.pending.contains_key(&self.next_to_write) {
            let done = self
                .done
                .recv()
                .map_err(|_| io::Error::other("compression worker stopped"))?;
            self.pending.insert(done.index, done);
        }
        let done = self.pending.remove(&self.next_to_write).unwrap();
        self.next_to_write += 1;
        self.in_flight -= 1;
        let bytes = done.result.inspect_err(|_| self.failed = true)?;
        self.crc
            .combine(&crc32fast::Hasher::new_with_initial_len(done.crc, done.len));
        self.total_in += done.len;
        self.out_mut().write_all(&bytes)
    }

    fn out_mut(&mut self) -> &mut W {
        self.out.as_mut().expect("writer used after finish")
    }

    /// Compresses what is buffered, writes the gzip trailer and returns the
    /// inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.submit(true)?;
        while self.in_flight > 0 {
            self.write_one_result()?;
        }
        self.stop_workers();
        let crc = self.crc.clone().finalize();
        let len = self.total_in;
        let out = self.out_mut();
        out.write_all(&crc.to_le_bytes())?;
        out.write_all(&(len as u32).to_le_bytes())?;
        out.flush()?;
        Ok(self.out.take().expect("finish runs once"))
    }

    fn stop_workers(&mut self) {
        self.jobs = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

impl<W: Write> Drop for ParallelGzWriter<W> {
    fn drop(&mut self) {
        self.stop_workers();
    }
}

impl<W: Write> Write for ParallelGzWriter<W> {
    fn write(&mut self, mut data: &[u8]) -> io::Result<usize> {
        if self.failed {
            return Err(io::Error::other("compression failed earlier"));
        }
        let total = data.len();
        while !data.is_empty() {
            let room = CHUNK_SIZE - self.buf.len();
            let take = room.min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.buf.len() == CHUNK_SIZE {
                self.submit(false)?;
            }
        }
        Ok(total)
    }

    fn flush(&mut self) -> io::Result<()> {
        // Chunk boundaries are part of the output format, so a flush must
        // not cut a chunk short; data is written at `finish`.
        Ok(())
    }
}

fn worker(jobs: &Mutex<Receiver<Job>>, done: &mpsc::Sender<Done>) {
    loop {
        let job = match jobs.lock().map(|rx| rx.recv()) {
            Ok(Ok(job)) => job,
            _ => return,
        };
        let mut crc = crc32fast::Hasher::new();
        crc.update(&job.data);
        // A fresh compressor per chunk: zlib-rs's reset does not clear all
        // match state, and leftovers would make a chunk's bytes depend on
        // which worker compressed the chunk before it.
        let mut compress = Compress::new(Compression::new(LEVEL), false);
        let result = deflate_chunk(&mut compress, &job.dict, &job.data, job.last);
        let sent = done.send(Done {
            index: job.index,
            result,
            crc: crc.finalize(),
            len: job.data.len() as u64,
        });
        if sent.is_err() {
            return;
        }
    }
}

fn deflate_chunk(c: &mut Compress, dict: &[u8], input: &[u8], last: bool) -> io::Result<Vec<u8>> {
    if !dict.is_empty() {
        c.set_dictionary(dict).map_err(io::Error::other)?;
    }
    let flush = if last {
        FlushCompress::Finish
    } else {
        FlushCompress::Sync
    };
    let mut out = Vec::with_capacity(input.len() / 2 + 64 * 1024);
    loop {
        if out.len() == out.capacity() {
            out.reserve(64 * 1024);
        }
        let consumed = c.total_in() as usize;
        let status = c
            .compress_vec(&input[consumed..], &mut out, flush)
            .map_err(io::Error::other)?;
        let all_in = c.total_in() as usize == input.len();
        match status {
            Status::StreamEnd => return Ok(out),
            // A sync flush is complete once all input is taken and the
            // output was not filled to the brim.
            Status::Ok | Status::BufError if !last && all_in && out.len() < out.capacity() => {
                return Ok(out)
            }
            Status::Ok | Status::BufError => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::read::GzDecoder;
    use std::io::Read;

    fn compress(data: &[u8], write_size: usize) -> Vec<u8> {
        let mut w = ParallelGzWriter::new(Vec::new()).unwrap();
        for piece in data.chunks(write_size.max(1)) {
            w.write_all(piece).unwrap();
        }
        w.finish().unwrap()
    }

    fn sample(len: usize) -> Vec<u8> {
        // Compressible but not trivial: a text-like pseudo-random stream.
        let mut x: u32 = 12345;
        (0..len)
            .map(|_| {
                x = x.wrapping_mul(1103515245).wrapping_add(12345);
                b"abcdefgh \n0123"[(x >> 16) as usize % 14]
            })
            .collect()
    }

    #[test]
    fn round_trips_through_a_standard_gzip_reader() {
        for len in [
            0,
            1,
            CHUNK_SIZE - 1,
            CHUNK_SIZE,
            CHUNK_SIZE + 1,
            3 * CHUNK_SIZE + 77,
        ] {
            let data = sample(len);
            let gz = compress(&data, 65536);
            let mut back = Vec::new();
            GzDecoder::new(&gz[..]).read_to_end(&mut back).unwrap();
            assert_eq!(back, data, "length {len}");
        }
    }

    #[test]
    fn output_does_not_depend_on_write_sizes() {
        let data = sample(2 * CHUNK_SIZE + 1000);
        assert_eq!(compress(&data, 1 << 20), compress(&data, 4093));
    }

    #[test]
    fn output_does_not_depend_on_which_worker_took_a_chunk() {
        // Workers pick chunks in whatever order the scheduler gives; state
        // left in a worker's compressor by one chunk must not change the
        // next. Chunks of different content make leftover state visible.
        let mut data = sample(6 * CHUNK_SIZE);
        for (i, b) in data
            .iter_mut()
            .enumerate()
            .skip(2 * CHUNK_SIZE)
            .take(CHUNK_SIZE)
        {
            *b = (i % 251) as u8;
        }
        let first = compress(&data, 1 << 16);
        for _ in 0..4 {
            assert!(
                compress(&data, 1 << 16) == first,
                "gzip bytes differ between runs"
            );
        }
        // And equal to compressing every chunk with a fresh compressor.
        let mut expected = GZIP_HEADER.to_vec();
        let chunks: Vec<&[u8]> = data.chunks(CHUNK_SIZE).collect();
        for (i, chunk) in chunks.iter().enumerate() {
            let dict = if i == 0 {
                &[][..]
            } else {
                &chunks[i - 1][CHUNK_SIZE - DICT_SIZE..]
            };
            let mut c = Compress::new(Compression::new(LEVEL), false);
            expected.extend(deflate_chunk(&mut c, dict, chunk, false).unwrap());
        }
        let mut c = Compress::new(Compression::new(LEVEL), false);
        expected.extend(
            deflate_chunk(
                &mut c,
                &chunks[chunks.len() - 1][CHUNK_SIZE - DICT_SIZE..],
                &[],
                true,
            )
            .unwrap(),
        );
        let mut crc = crc32fast::Hasher::new();
        crc.update(&data);
        expected.extend(crc.finalize().to_le_bytes());
        expected.extend((data.len() as u32).to_le_bytes());
        assert!(
            first == expected,
            "differs from chunk-by-chunk compression with fresh compressors"
        );
    }

    #[test]
    fn empty_input_is_a_valid_gzip_with_fixed_bytes() {
        let gz = compress(&[], 1);
        // header, an empty final deflate block, crc 0, length 0
        assert_eq!(
            gz,
            [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
    }
}
