//! The `[store]` section: where the job store lives.

use super::*;

/// Keys of `[store]`.
const STORE_KEYS: &[&str] = &["url", "notify", "xmin_warning", "node_timeout"];

/// Default of `node_timeout`.
pub const DEFAULT_NODE_TIMEOUT: Duration = Duration::from_secs(10);

/// Default of `xmin_warning`.
pub const DEFAULT_XMIN_WARNING: Duration = Duration::from_secs(300);

/// The `[store]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    /// `Some`: a PostgreSQL connection URL (`postgres://` or
    /// `postgresql://`). `None` (absent, or `"sqlite"`): the embedded SQLite
    /// store in `daemon.state_dir`.
    pub url: Option<String>,
    /// PostgreSQL: wake-ups through LISTEN/NOTIFY (default). `false` for a
    /// connection pooler that drops notifications (transaction pooling):
    /// nodes then poll every [`crate::store::POLL_WITHOUT_NOTIFY`].
    pub notify: bool,
    /// PostgreSQL: `status` warns of a transaction that has held back the
    /// server's cleanup (its xmin) for longer than this.
    pub xmin_warning: Duration,
    /// PostgreSQL: a node whose last heartbeat (every second) is older than
    /// this is declared dead and its jobs are queued again.
    pub node_timeout: Duration,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            url: None,
            notify: true,
            xmin_warning: DEFAULT_XMIN_WARNING,
            node_timeout: DEFAULT_NODE_TIMEOUT,
        }
    }
}

impl StoreConfig {
    /// The URL without its password, for messages.
    pub fn display_url(&self) -> Option<String> {
        self.url.as_deref().map(crate::store::redact_url)
    }
}

impl Walker<'_> {
    pub(super) fn store(&self, t: &DeTable<'_>) -> Result<StoreConfig, ConfigError> {
        let mut s = StoreConfig::default();
        for (k, v) in in_order(t) {
            let name = key_str(k);
            let key = join("store", name);
            match name {
                "url" => {
                    let url = self.string(v, &key)?;
                    if url == "sqlite" {
                        s.url = None;
                        continue;
                    }
                    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                        return Err(self.err(
                            v.span(),
                            &key,
                            "expected \"sqlite\" (the default) or a PostgreSQL URL such as \
                             \"postgres://jobvisor@db.example/jobvisor\"",
                        ));
                    }
                    if let Err(e) = crate::store::check_postgres_url(url) {
                        return Err(self.err(
                            v.span(),
                            &key,
                            format!("not a valid PostgreSQL URL ({e})"),
                        ));
                    }
                    s.url = Some(url.to_owned());
                }
                "notify" => match v.get_ref() {
                    DeValue::Boolean(b) => s.notify = *b,
                    other => {
                        return Err(self.err(
                            v.span(),
                            &key,
                            format!("expected true or false, got {}", type_name(other)),
                        ))
                    }
                },
                "xmin_warning" => s.xmin_warning = self.positive_duration(v, &key)?,
                "node_timeout" => {
                    let d = self.duration(v, &key)?;
                    if d < Duration::from_secs(3) {
                        return Err(self.err(
                            v.span(),
                            &key,
                            "must be at least \"3s\" (heartbeats are 1 s apart)",
                        ));
                    }
                    s.node_timeout = d;
                }
                other => return Err(self.unknown_key(k, "store", other, STORE_KEYS)),
            }
        }
        Ok(s)
    }
}
