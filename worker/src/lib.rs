//! Writing jobvisor workers in Rust.
//!
//! A worker is a long-lived process that `jobvisord` starts with three extra
//! descriptors (named by `JOBVISOR_FDS=3,4,5`): fd 3 is the read end of the
//! job pipe (daemon → worker), fd 4 the write end of the result pipe
//! (worker → daemon), fd 5 a shared-memory arena. Both pipes carry frames of
//! [`ipc_proto::worker`] messages. The worker speaks first with `Ready`; the
//! daemon then sends `Job`s (up to its `prefetch` setting at a time), and the
//! worker answers each with `Done` or `Failed`. `Cancel { id }` stops a job
//! (a queued one is answered `Failed("cancelled")` without running; a running
//! one sees [`JobContext::is_cancelled`]); `Shutdown` means: answer the jobs in
//! hand, then exit 0. A closed job pipe means the daemon is gone: exit 0.
//!
//! This crate does all of that; a worker supplies only the handler:
//!
//! ```no_run
//! fn main() -> std::process::ExitCode {
//!     // Expensive setup (loading a model, opening connections) goes here:
//!     // `Ready` is sent only when `run` starts.
//!     worker::run(|input| Ok(input.to_ascii_uppercase()))
//! }
//! ```
//!
//! Exit statuses, as the daemon reads them: 0 after `Shutdown` or end of the
//! job pipe; 1 when the result pipe fails (the daemon is gone); 2 for a
//! protocol error (a frame that does not decode, an oversized frame, a
//! shared-memory input, which this version does not support) or when the
//! process was not started by the daemon. A handler that panics crashes the
//! worker: the daemon counts the attempt as lost and retries the job.
//!
//! Architecture invariant: the handler always runs on the thread that called
//! [`run`], so it need not be `Send` and may hold thread-bound state; the
//! two other threads only read the job pipe and flush buffered results
//! (see [`serve()`]).
#![deny(missing_docs)]

mod channel;
mod context;
pub mod handlers;
mod serve;

use std::process::ExitCode;

pub use channel::{Channel, SetupError, FDS_ENV};
pub use context::JobContext;
pub use serve::{serve, ServeError, Stop, CANCELLED};

/// Serves jobs with `handler` (input bytes → output bytes, or an error
/// message) until the daemon says `Shutdown` or goes away, and returns the
/// exit status for `main` to return.
///
/// `Ready` is sent when `run` is called: do any expensive setup before.
/// Errors (not started by the daemon, protocol errors) are printed as one
/// line on stderr.
pub fn run<F>(mut handler: F) -> ExitCode
where
    F: FnMut(&[u8]) -> Result<Vec<u8>, String>,
{
    run_with(move |_: &JobContext, input: &[u8]| handler(input))
}

/// Like [`run`], with the job's [`JobContext`] (id, attempt, deadline,
/// cancellation) passed to the handler.
pub fn run_with<F>(handler: F) -> ExitCode
where
    F: FnMut(&JobContext, &[u8]) -> Result<Vec<u8>, String>,
{
    let channel = match Channel::from_env() {
        Ok(channel) => channel,
        Err(e) => {
            eprintln!("{}: {e}", program_name());
            return ExitCode::from(e.exit_code());
        }
    };
    match channel.serve(handler) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            let hint = match e {
                ServeError::Protocol(_) => "; exiting so the daemon restarts this worker",
                _ => "",
            };
            eprintln!("{}: {e}{hint}", program_name());
            ExitCode::from(e.exit_code())
        }
    }
}

/// The running program's file name, for error messages.
fn program_name() -> String {
    std::env::args_os()
        .next()
        .as_deref()
        .map(std::path::Path::new)
        .and_then(std::path::Path::file_name)
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "jobvisor worker".to_owned())
}
