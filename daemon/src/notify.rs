//! systemd `sd_notify`: datagrams to `$NOTIFY_SOCKET` (a path, or an
//! abstract socket when it starts with `@`). Without `NOTIFY_SOCKET` every
//! call is a no-op.

use std::os::unix::net::{SocketAddr, UnixDatagram};

/// A connection to the service manager's notification socket.
pub struct Notifier {
    sock: Option<(UnixDatagram, SocketAddr)>,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET`; the variable is then removed from the
    /// environment so children never see it.
    pub fn from_env() -> Notifier {
        let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
            return Notifier { sock: None };
        };
        let path = path.to_string_lossy().into_owned();
        let addr = if let Some(name) = path.strip_prefix('@') {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name.as_bytes())
        } else {
            SocketAddr::from_pathname(&path)
        };
        let sock = match (UnixDatagram::unbound(), addr) {
            (Ok(s), Ok(a)) => Some((s, a)),
            (Err(e), _) | (_, Err(e)) => {
                crate::warn!("NOTIFY_SOCKET={path} unusable: {e}");
                None
            }
        };
        Notifier { sock }
    }

    /// True when a notification socket is configured.
    pub fn active(&self) -> bool {
        self.sock.is_some()
    }

    /// Sends `state` (e.g. `"READY=1\nSTATUS=…"`); failures are logged once
    /// and otherwise ignored: the manager being gone is not our problem.
    pub fn notify(&self, state: &str) {
        if let Some((s, a)) = &self.sock {
            if let Err(e) = s.send_to_addr(state.as_bytes(), a) {
                crate::warn!("sd_notify failed: {e}");
            }
        }
    }
}
