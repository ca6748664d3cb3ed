//! Progress on stderr: an indicatif bar on a terminal, plain lines
//! otherwise (CI logs, journald), nothing with `--quiet`.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

pub struct Progress {
    mode: Mode,
    bar: Option<ProgressBar>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Quiet,
    Plain,
    Bar,
}

impl Progress {
    pub fn new(quiet: bool) -> Progress {
        let mode = if quiet {
            Mode::Quiet
        } else if std::io::stderr().is_terminal() {
            Mode::Bar
        } else {
            Mode::Plain
        };
        Progress { mode, bar: None }
    }

    /// Starts a counted phase of `total` items.
    pub fn start(&mut self, total: u64, what: &str) {
        match self.mode {
            Mode::Quiet => {}
            Mode::Plain => eprintln!("{what}"),
            Mode::Bar => {
                let bar = ProgressBar::new(total);
                bar.set_style(
                    ProgressStyle::with_template("{spinner} {prefix} [{bar:30}] {pos}/{len} {msg}")
                        .expect("valid template")
                        .progress_chars("=> "),
                );
                bar.set_prefix(what.to_string());
                bar.enable_steady_tick(Duration::from_millis(120));
                self.bar = Some(bar);
            }
        }
    }

    /// Says what is being worked on now.
    pub fn working(&self, what: &str) {
        if let Some(bar) = &self.bar {
            bar.set_message(what.to_string());
        }
    }

    /// One item finished, with a line worth keeping in the log.
    pub fn item_done(&self, line: &str) {
        match (self.mode, &self.bar) {
            (Mode::Quiet, _) => {}
            (Mode::Bar, Some(bar)) => {
                bar.println(line);
                bar.inc(1);
            }
            _ => eprintln!("{line}"),
        }
    }

    /// A standalone step (not counted).
    pub fn note(&self, line: &str) {
        match (self.mode, &self.bar) {
            (Mode::Quiet, _) => {}
            (Mode::Bar, Some(bar)) => bar.println(line),
            _ => eprintln!("{line}"),
        }
    }

    pub fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}
