//! A static file server on loopback for the VM test: it serves a build's
//! `update/` directory to the guest (qemu's `guestfwd`), as any static HTTP
//! server would serve it to an appliance. GET and HEAD of files directly in
//! the served directory; which directory can change while it runs, and it
//! can break off one download part-way (an interrupted transfer).

use std::fs;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread;

use anyhow::{Context, Result};

pub(crate) struct StaticServer {
    pub(crate) port: u16,
    dir: Arc<Mutex<PathBuf>>,
    /// The next GET of a file whose name ends so sends part of the file, then
    /// closes the connection (its Content-Length promises all of it).
    cut: Arc<Mutex<Option<String>>>,
}

impl StaticServer {
    /// Listens on 127.0.0.1 (a free port) and serves `dir` until the test ends.
    pub(crate) fn start(dir: PathBuf) -> Result<StaticServer> {
        let listener = TcpListener::bind("127.0.0.1:0").context("binding the update server")?;
        let port = listener.local_addr()?.port();
        let served = Arc::new(Mutex::new(dir));
        let cut = Arc::new(Mutex::new(None));
        let (shared, shared_cut) = (served.clone(), cut.clone());
        thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let dir = shared.lock().expect("not poisoned").clone();
                let cut = shared_cut.clone();
                thread::spawn(move || {
                    let _ = answer(stream, dir, &cut);
                });
            }
        });
        Ok(StaticServer {
            port,
            dir: served,
            cut,
        })
    }

    /// Breaks off the next download of a file whose name ends in `suffix`
    /// part-way, as a dropped connection would.
    pub(crate) fn cut_next(&self, suffix: &str) {
        *self.cut.lock().expect("not poisoned") = Some(suffix.to_string());
    }

    /// Serves another directory from the next request on.
    pub(crate) fn serve(&self, dir: PathBuf) {
        *self.dir.lock().expect("not poisoned") = dir;
    }
}

/// Bytes of a broken-off download sent before the connection drops.
const CUT_AFTER: u64 = 16 << 20;

fn answer(stream: TcpStream, dir: PathBuf, cut: &Mutex<Option<String>>) -> Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    // The headers are read and ignored.
    let mut header = String::new();
    while reader.read_line(&mut header)? > 2 {
        header.clear();
    }
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let name = path.trim_start_matches('/');
    let mut out = stream;
    let file = (!name.is_empty() && !name.contains('/') && !name.starts_with('.'))
        .then(|| dir.join(name))
        .filter(|p| p.is_file());
    eprintln!("vm-test: update server: {method} {path}");
    match (method, file) {
        ("GET" | "HEAD", Some(file)) => {
            let len = fs::metadata(&file)?.len();
            write!(
                out,
                "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n"
            )?;
            if method == "GET" {
                let mut cut = cut.lock().expect("not poisoned");
                if cut
                    .as_ref()
                    .is_some_and(|suffix| name.ends_with(suffix.as_str()))
                {
                    *cut = None;
                    // Early (what is sent before the break does not matter,
                    // and under TCG every megabyte costs the guest time).
                    let sent = (len / 2).min(CUT_AFTER);
                    eprintln!("vm-test: update server: breaking off {name} after {sent} bytes");
                    let mut part = fs::File::open(&file)?.take(sent);
                    std::io::copy(&mut part, &mut out)?;
                    return Ok(());
                }
                drop(cut);
                std::io::copy(&mut fs::File::open(&file)?, &mut out)?;
            }
        }
        _ => write!(
            out,
            "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )?,
    }
    out.flush()?;
    Ok(())
}
