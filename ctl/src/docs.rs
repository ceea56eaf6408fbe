//! `jobvisorctl completions SHELL` and `jobvisorctl man DIR`: shell
//! completions (clap_complete) and man pages (clap_mangen), both generated
//! from the same clap definitions as the parser, so they cannot drift.

use super::args::Args;
use super::Failure;
use clap::CommandFactory;
use std::io::Write;
use std::path::Path;

/// The completion script for `shell` on stdout.
pub fn completions(shell: &str) -> Result<u8, Failure> {
    use clap_complete::Shell;
    let shell = match shell {
        "bash" => Shell::Bash,
        "zsh" => Shell::Zsh,
        "fish" => Shell::Fish,
        other => {
            return Err(Failure::usage(format!(
                "completions: unknown shell {other:?}"
            )))
        }
    };
    let mut buf = Vec::new();
    clap_complete::generate(shell, &mut Args::command(), "jobvisorctl", &mut buf);
    let mut out = std::io::stdout().lock();
    out.write_all(&buf)
        .and_then(|()| out.flush())
        .map_err(Failure::stdout)?;
    Ok(0)
}

/// `jobvisorctl.1` and `jobvisorctl-COMMAND.1` for each command, in `dir`.
pub fn man_pages(dir: &Path) -> Result<u8, Failure> {
    let fail = |what: &str, e: std::io::Error| {
        Failure::new(1, format!("man: {what} {}: {e}", dir.display()))
    };
    std::fs::create_dir_all(dir).map_err(|e| fail("cannot create", e))?;
    let cmd = Args::command();
    clap_mangen::generate_to(cmd, dir).map_err(|e| fail("cannot write the pages into", e))?;
    println!("man pages written to {}", dir.display());
    Ok(0)
}
