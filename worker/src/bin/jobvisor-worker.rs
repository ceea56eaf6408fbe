//! `jobvisor-worker`: the builtin worker, serving one of the handlers in
//! [`worker::handlers`]. Glue only: parse the command line, then
//! [`worker::run_with_output`] (or [`worker::run_with`] for `exec`).

use std::ffi::OsString;
use std::process::ExitCode;

use worker::handlers::{self, Exec};

const USAGE: &str = "\
usage: jobvisor-worker HANDLER

A jobvisor worker; run it as a pool's command under jobvisord, for example
command = [\"jobvisor-worker\", \"sha256\"].

handlers:
  echo                 output = input
  sha256               output = lowercase hex SHA-256 digest of the input
  exec -- CMD ARGS...  run CMD per job: input on its stdin, its stdout is the
                       output; a non-zero exit fails the job with the tail of
                       its stderr

options:
  -h, --help           print this help
  -V, --version        print the version";

const HANDLERS: &str = "echo, sha256, exec -- CMD ARGS...";

#[derive(Debug)]
enum Handler {
    Echo,
    Sha256,
    Exec(Exec),
}

#[derive(Debug)]
enum Parsed {
    Run(Handler),
    Help,
    Version,
}

fn parse(mut args: impl Iterator<Item = OsString>) -> Result<Parsed, String> {
    let Some(first) = args.next() else {
        return Err(format!("missing handler (one of: {HANDLERS}); see --help"));
    };
    let name = first.to_string_lossy();
    let handler = match name.as_ref() {
        "-h" | "--help" => return Ok(Parsed::Help),
        "-V" | "--version" => return Ok(Parsed::Version),
        "echo" => Handler::Echo,
        "sha256" => Handler::Sha256,
        "exec" => {
            let mut rest = args.peekable();
            if rest.peek().is_some_and(|a| a == "--") {
                rest.next();
            }
            let Some(program) = rest.next() else {
                return Err("exec needs a command: exec -- CMD ARGS...".to_owned());
            };
            return Ok(Parsed::Run(Handler::Exec(Exec::new(program, rest))));
        }
        other => return Err(format!("unknown handler {other:?} (handlers: {HANDLERS})")),
    };
    if let Some(extra) = args.next() {
        return Err(format!(
            "{name} takes no arguments (got {:?}); see --help",
            extra.to_string_lossy()
        ));
    }
    Ok(Parsed::Run(handler))
}

fn main() -> ExitCode {
    let handler = match parse(std::env::args_os().skip(1)) {
        Ok(Parsed::Run(handler)) => handler,
        Ok(Parsed::Help) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Ok(Parsed::Version) => {
            println!("jobvisor-worker {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("jobvisor-worker: {e}");
            return ExitCode::from(2);
        }
    };
    match handler {
        Handler::Echo => worker::run_with_output(handlers::echo_into),
        Handler::Sha256 => worker::run_with_output(handlers::sha256_into),
        Handler::Exec(exec) => worker::run_with(|ctx, input| exec.run(ctx, input)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Parsed, String> {
        parse(args.iter().map(OsString::from))
    }

    #[test]
    fn command_line() {
        assert!(matches!(p(&["echo"]), Ok(Parsed::Run(Handler::Echo))));
        assert!(matches!(p(&["sha256"]), Ok(Parsed::Run(Handler::Sha256))));
        assert!(matches!(p(&["--help"]), Ok(Parsed::Help)));
        assert!(matches!(
            p(&["exec", "--", "tr", "a-z", "A-Z"]),
            Ok(Parsed::Run(Handler::Exec(_)))
        ));
        assert!(matches!(
            p(&["exec", "cat"]),
            Ok(Parsed::Run(Handler::Exec(_)))
        ));
        assert!(p(&["exec", "--"]).unwrap_err().contains("needs a command"));
        assert!(p(&[]).unwrap_err().contains("missing handler"));
        assert!(p(&["echo", "x"])
            .unwrap_err()
            .contains("takes no arguments"));
        let e = p(&["frob"]).unwrap_err();
        assert!(e.contains("unknown handler") && e.contains("sha256"), "{e}");
    }
}
