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
//! # Shared memory
//!
//! Payloads over the pool's `inline_limit` (`JOBVISOR_INLINE_LIMIT`, default
//! 64 KiB) travel through the arena on fd 5 instead of the pipes. This crate
//! maps it once at start and handles the protocol (references, slots,
//! `Release`); a handler only sees byte slices:
//! - a large input arrives as a `&[u8]` straight over the shared mapping:
//!   no copy, whatever its size;
//! - a large output returned as a `Vec` by a [`run`]/[`run_with`] handler is
//!   copied once into the arena, where the daemon reads it.
//!
//! To skip that copy too, write the output into an [`Output`] with
//! [`run_with_output`]: over the inline limit it is built directly in the
//! arena. When the final size is known, [`Output::reserve`] hands out a slot
//! of exactly that size to fill in place; [`Output::write_all`] (or
//! [`std::io::Write`]) appends as you go, starting in a `Vec` and moving into
//! the arena once the output gets large:
//!
//! ```no_run
//! use std::io::Write;
//!
//! fn main() -> std::process::ExitCode {
//!     worker::run_with_output(|_ctx, input, out| {
//!         if input.starts_with(b"upper:") {
//!             // Known size: written once, in place.
//!             let dst = out.reserve(input.len());
//!             for (d, s) in dst.iter_mut().zip(input) {
//!                 *d = s.to_ascii_uppercase();
//!             }
//!         } else {
//!             // Unknown size: append as you go.
//!             for line in input.split(|&b| b == b'\n') {
//!                 out.write_all(line);
//!                 writeln!(out, " ({} bytes)", line.len()).map_err(|e| e.to_string())?;
//!             }
//!         }
//!         Ok(())
//!     })
//! }
//! ```
//!
//! Without a usable arena (fd 5 empty, not a memfd, or not mappable) the
//! worker works inline only: every output is sent inline, and a
//! shared-memory input is a protocol error. An output too large for the
//! output region (half the arena) is sent inline if it fits in a frame
//! (64 MiB), else the job fails. While the output region is full of outputs
//! the daemon has not released yet, the handler's thread waits for it (at
//! most [`RELEASE_WAIT`], then it sends the output inline).
//!
//! # Exit statuses
//!
//! As the daemon reads them: 0 after `Shutdown` or end of the job pipe; 1
//! when the result pipe fails (the daemon is gone); 2 for a protocol error (a
//! frame that does not decode, an oversized frame, a shared-memory reference
//! outside the input region or without an arena, a `Release` of a range this
//! worker did not hand out) or when the process was not started by the
//! daemon. A handler that panics crashes the worker: the daemon counts the
//! attempt as lost and retries the job.
//!
//! Architecture invariant: the handler always runs on the thread that called
//! [`run`], so it need not be `Send` and may hold thread-bound state; the
//! two other threads only read the job pipe (and free released output slots)
//! and flush buffered results (see [`serve_with_output()`]).
#![deny(missing_docs)]

mod channel;
mod context;
mod fds;
pub mod handlers;
mod output;
mod serve;
mod shm;
#[cfg(test)]
mod tests_fds;
#[cfg(test)]
mod tests_shm;

use std::process::ExitCode;

pub use channel::{Channel, SetupError, FDS_ENV, INLINE_LIMIT_ENV};
pub use context::JobContext;
pub use output::Output;
pub use serve::{
    serve, serve_with_output, ServeConfig, ServeError, Stop, CANCELLED, DEFAULT_INLINE_LIMIT,
    RELEASE_WAIT,
};
pub use shm::Arena;

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
    run_channel(|channel| channel.serve(handler))
}

/// Like [`run_with`], but the handler writes its output into an [`Output`]
/// instead of returning a `Vec`, so that a large output is written straight
/// into shared memory (see the [crate docs](crate) for an example). An
/// `Err` fails the job; whatever was written is then discarded.
pub fn run_with_output<F>(handler: F) -> ExitCode
where
    F: FnMut(&JobContext, &[u8], &mut Output) -> Result<(), String>,
{
    run_channel(|channel| channel.serve_with_output(handler))
}

fn run_channel(serve: impl FnOnce(Channel) -> Result<Stop, ServeError>) -> ExitCode {
    let channel = match Channel::from_env() {
        Ok(channel) => channel,
        Err(e) => {
            eprintln!("{}: {e}", program_name());
            return ExitCode::from(e.exit_code());
        }
    };
    match serve(channel) {
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
