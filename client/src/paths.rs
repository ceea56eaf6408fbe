//! Where a client finds the daemon: the default configuration file, the
//! default socket, and the one key of a configuration file a client reads
//! (`[daemon] control_socket`). The daemon resolves its own defaults with
//! the same functions, so both sides always agree.

use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};
use toml::de::{DeTable, DeValue};

/// File name of the control socket inside [`default_runtime_dir`].
pub const SOCKET_FILE_NAME: &str = "jobvisor.sock";

/// The configuration file used when `--config` is not given:
/// `$JOBVISOR_CONFIG`, else `/etc/jobvisor/jobvisor.toml` for root, else
/// `$XDG_CONFIG_HOME/jobvisor/jobvisor.toml` (`~/.config/…`).
pub fn default_config_path() -> PathBuf {
    if let Some(p) = std::env::var_os("JOBVISOR_CONFIG") {
        return PathBuf::from(p);
    }
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/etc/jobvisor/jobvisor.toml");
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("jobvisor/jobvisor.toml")
}

/// Directory for the control socket when the config does not say: `$RUNTIME_DIRECTORY`
/// (systemd), else `/run/jobvisor` for root, else `$XDG_RUNTIME_DIR/jobvisor`, else
/// `/tmp/jobvisor-$UID`.
pub fn default_runtime_dir() -> PathBuf {
    let euid = nix::unistd::geteuid();
    runtime_dir_from(|k| std::env::var_os(k), euid.as_raw())
}

/// [`default_runtime_dir`] for the environment `env` and effective uid `euid`.
pub fn runtime_dir_from(env: impl Fn(&str) -> Option<OsString>, euid: u32) -> PathBuf {
    if let Some(d) = first_dir(env("RUNTIME_DIRECTORY")) {
        return d;
    }
    if euid == 0 {
        return PathBuf::from("/run/jobvisor");
    }
    match abs_dir(env("XDG_RUNTIME_DIR")) {
        Some(d) => d.join("jobvisor"),
        None => PathBuf::from(format!("/tmp/jobvisor-{euid}")),
    }
}

/// The first absolute entry of a systemd-style, colon-separated directory list.
pub fn first_dir(v: Option<OsString>) -> Option<PathBuf> {
    let v = v?;
    let s = v.to_str()?;
    s.split(':').map(PathBuf::from).find(|p| p.is_absolute())
}

/// An absolute directory from an environment variable (XDG requires absolute paths
/// and says relative ones must be ignored).
pub fn abs_dir(v: Option<OsString>) -> Option<PathBuf> {
    v.map(PathBuf::from).filter(|p| p.is_absolute())
}

/// Only `[daemon] control_socket` of the config file at `path`, resolved as
/// the daemon resolves it (relative to the file's directory; `None` when the
/// file does not set it): all a client needs. The rest of the file is not
/// read, so that a mistake elsewhere in it (say, the one a `reload` was
/// refused for) does not keep the client from a daemon that runs fine.
/// Errors are one line: `FILE:LINE:COL: …`, as the daemon's.
pub fn control_socket(path: &Path) -> Result<Option<PathBuf>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read config {}: {e}", path.display()))?;
    let at = |offset: usize| {
        let (line, column) = line_col(&text, offset);
        format!("{}:{line}:{column}", path.display())
    };
    let doc = DeTable::parse(&text).map_err(|e| {
        format!(
            "{}: invalid TOML: {}",
            at(e.span().map_or(0, |s| s.start)),
            one_line(e.message())
        )
    })?;
    let Some(daemon) = doc
        .get_ref()
        .iter()
        .find(|(k, _)| k.get_ref() == "daemon")
        .map(|(_, v)| v)
    else {
        return Ok(None);
    };
    let DeValue::Table(t) = daemon.get_ref() else {
        return Err(format!(
            "{}: daemon: expected a table",
            at(daemon.span().start)
        ));
    };
    let Some(v) = t
        .iter()
        .find(|(k, _)| k.get_ref() == "control_socket")
        .map(|(_, v)| v)
    else {
        return Ok(None);
    };
    let key = "daemon.control_socket";
    match v.get_ref() {
        DeValue::String(s) if s.is_empty() => Err(format!(
            "{}: {key}: must not be empty; expected a path",
            at(v.span().start)
        )),
        DeValue::String(s) if s.contains('\0') => Err(format!(
            "{}: {key}: must not contain a NUL character",
            at(v.span().start)
        )),
        DeValue::String(s) => {
            let dir = absolute(path)
                .parent()
                .map_or_else(|| PathBuf::from("/"), Path::to_path_buf);
            Ok(Some(clean(&dir.join(s.as_ref()))))
        }
        _ => Err(format!("{}: {key}: expected a string", at(v.span().start))),
    }
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// toml's messages may span lines; errors are one line.
pub fn one_line(s: &str) -> String {
    s.split('\n')
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

/// `path` made absolute (against the current directory) and [`clean`]ed.
pub fn absolute(path: &Path) -> PathBuf {
    let p = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    clean(&p)
}

/// Drops `.` components (`/etc/jobvisor/./state` → `/etc/jobvisor/state`). `..` is
/// kept: with symlinks it cannot be resolved lexically.
pub fn clean(p: &Path) -> PathBuf {
    p.components()
        .filter(|c| !matches!(c, Component::CurDir))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(tag: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("jobvisor-paths-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("jobvisor.toml");
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn control_socket_is_the_only_key_read() {
        let p = write(
            "ok",
            "[daemon]\ncontrol_socket = \"./run/ctl.sock\"\n[pools.x]\nworkers = 0\nbogus = 1\n",
        );
        let dir = absolute(p.parent().unwrap());
        assert_eq!(control_socket(&p).unwrap(), Some(dir.join("run/ctl.sock")));
        std::fs::write(&p, "[pools.x]\ncommand = []\n").unwrap();
        assert_eq!(control_socket(&p).unwrap(), None);
        std::fs::write(&p, "[daemon]\ncontrol_socket = 5\n").unwrap();
        let e = control_socket(&p).unwrap_err();
        assert!(
            e.ends_with("jobvisor.toml:2:18: daemon.control_socket: expected a string"),
            "{e}"
        );
        std::fs::write(&p, "[daemon\n").unwrap();
        let e = control_socket(&p).unwrap_err();
        assert!(
            e.contains("jobvisor.toml:1:") && e.contains("invalid TOML") && !e.contains('\n'),
            "{e}"
        );
        std::fs::remove_dir_all(p.parent().unwrap()).unwrap();
    }
}
