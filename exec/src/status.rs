//! The one status check: a command that fails is reported with what it was
//! for, its exit status and the tail of what it printed.

use std::process::Command;

use anyhow::{bail, Context, Result};

/// How many lines of a failed command's output an error carries.
const TAIL_LINES: usize = 25;

/// Runs `cmd` with its output going where the caller's goes (a long job's
/// progress stays visible); fails naming `what` and the exit status.
pub fn status(cmd: &mut Command, what: &str) -> Result<()> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let status = cmd
        .status()
        .with_context(|| format!("{what}: cannot run {program}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

/// Runs `cmd` (output captured); fails with its output's tail.
pub fn run(cmd: &mut Command, what: &str) -> Result<()> {
    output(cmd, what).map(drop)
}

/// Runs `cmd` and returns its standard output; a failure carries the tail
/// of its standard error, then of its standard output.
pub fn output(cmd: &mut Command, what: &str) -> Result<Vec<u8>> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let out = cmd
        .output()
        .with_context(|| format!("{what}: cannot run {program}"))?;
    if !out.status.success() {
        let mut text = String::from_utf8_lossy(&out.stderr).into_owned();
        text += &String::from_utf8_lossy(&out.stdout);
        bail!("{what} failed ({}):\n{}", out.status, tail(&text));
    }
    Ok(out.stdout)
}

/// Like [`output`], as text with surrounding white space trimmed.
pub fn stdout(cmd: &mut Command, what: &str) -> Result<String> {
    let out = output(cmd, what)?;
    Ok(String::from_utf8_lossy(&out).trim().to_string())
}

/// The last lines of `text`, as a failure report shows them.
pub fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command;

    #[test]
    fn a_failure_names_the_job_the_status_and_the_output_tail() {
        let mut cmd = command("sh");
        cmd.args(["-c", "for i in $(seq 40); do echo line$i >&2; done; exit 3"]);
        let err = run(&mut cmd, "counting").unwrap_err().to_string();
        assert!(err.starts_with("counting failed (exit status: 3)"), "{err}");
        assert!(err.contains("line40") && err.contains("line16"), "{err}");
        assert!(!err.contains("line15\n"), "more than the tail: {err}");
    }

    #[test]
    fn a_missing_program_is_named() {
        let err = run(&mut command("no-such-program-here"), "probing")
            .unwrap_err()
            .to_string();
        assert_eq!(err, "probing: cannot run no-such-program-here");
    }

    #[test]
    fn stdout_is_returned_trimmed() {
        let mut cmd = command("echo");
        cmd.arg(" hello ");
        assert_eq!(stdout(&mut cmd, "echo").unwrap(), "hello");
    }
}
