//! `jobvisorctl`: drives a running `jobvisord` over its control socket.
//! The command line and its logic live in [`daemon::ctl`].

use std::process::ExitCode;

fn main() -> ExitCode {
    daemon::ctl::main()
}
