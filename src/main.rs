//! The `builder` command line: parses arguments (src/cli.rs) and dispatches
//! to the library. Exit codes: 0 success, 1 failure, 2 usage error.

use std::process::ExitCode;

use builder::error::is_usage;
use clap::Parser as _;

fn main() -> ExitCode {
    let cli = builder::cli::Cli::parse();
    match builder::cli::run(cli) {
        Ok(code) => code,
        Err(err) if is_broken_pipe(&err) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(if is_usage(&err) { 2 } else { 1 })
        }
    }
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
