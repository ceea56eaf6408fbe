//! What `jobvisorctl`, the tests and other Rust clients need to talk to a
//! running `jobvisord`, and nothing of the daemon itself (no store, no
//! supervisor, no SQLite):
//!
//! - [`connection`]: a blocking, greeted connection on the control socket
//!   (requests out, responses in, descriptors both ways).
//! - [`fdpass`]: large payloads as descriptors (`SCM_RIGHTS`), sealed
//!   memfds; the daemon uses the same module for its side.
//! - [`paths`]: the default configuration file and socket, and the socket
//!   path of a configuration file.
//! - [`trust`]: whether a directory may be trusted to hold the socket (the
//!   daemon checks its own directories with the same rules).
#![deny(missing_docs)]

pub mod connection;
pub mod fdpass;
pub mod paths;
pub mod trust;

pub use connection::{ClientError, Connection};
