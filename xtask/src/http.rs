//! A static file server on loopback for the VM test: it serves a build's
//! `update/` directory to the guest (qemu's `guestfwd`), as any static HTTP
//! server would serve it to an appliance. GET and HEAD of files directly in
//! the served directory; which directory can change while it runs.

use std::fs;
use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread;

use anyhow::{Context, Result};

pub(crate) struct StaticServer {
    pub(crate) port: u16,
    dir: Arc<Mutex<PathBuf>>,
}

impl StaticServer {
    /// Listens on 127.0.0.1 (a free port) and serves `dir` until the test ends.
    pub(crate) fn start(dir: PathBuf) -> Result<StaticServer> {
        let listener = TcpListener::bind("127.0.0.1:0").context("binding the update server")?;
        let port = listener.local_addr()?.port();
        let served = Arc::new(Mutex::new(dir));
        let shared = served.clone();
        thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let dir = shared.lock().expect("not poisoned").clone();
                thread::spawn(move || {
                    let _ = answer(stream, dir);
                });
            }
        });
        Ok(StaticServer { port, dir: served })
    }

    /// Serves another directory from the next request on.
    pub(crate) fn serve(&self, dir: PathBuf) {
        *self.dir.lock().expect("not poisoned") = dir;
    }
}

fn answer(stream: TcpStream, dir: PathBuf) -> Result<()> {
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
