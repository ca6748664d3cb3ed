//! Project automation: `cargo xtask <command>`.

mod bench;
mod bench_disk;
mod config_keys;
mod http;
mod lock;
mod synapse;
mod test;
mod tools;
mod vm;

use std::process::ExitCode;

const COMMANDS: &str =
    "bench, bench-disk, config-keys, lock-wheels, pin-minimal, test, tools, vm-test";

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let cmd = args.next();
    let rest: Vec<String> = args.collect();
    let result = match cmd.as_deref() {
        Some("bench") => bench::run(&rest),
        Some("bench-disk") => bench_disk::run(&rest),
        Some("config-keys") => config_keys::run(&rest),
        Some("lock-wheels") => lock::run(&rest),
        Some("pin-minimal") => test::pin_minimal(&rest),
        Some("test") => test::run(&rest),
        Some("tools") => tools::run(&rest),
        Some("vm-test") => vm::run(&rest),
        Some(other) => {
            eprintln!("xtask: unknown command `{other}` (known: {COMMANDS})");
            return ExitCode::from(2);
        }
        None => {
            eprintln!("usage: cargo xtask <command>   (known: {COMMANDS})");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
