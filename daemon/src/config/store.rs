//! The `[store]` section: where the job store lives.

use super::*;

/// Keys of `[store]`.
const STORE_KEYS: &[&str] = &["url"];

/// The `[store]` section.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreConfig {
    /// `Some`: a PostgreSQL connection URL (`postgres://` or
    /// `postgresql://`). `None` (absent, or `"sqlite"`): the embedded SQLite
    /// store in `daemon.state_dir`.
    pub url: Option<String>,
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
                    if let Err(e) = url.parse::<postgres::Config>() {
                        return Err(self.err(
                            v.span(),
                            &key,
                            format!("not a valid PostgreSQL URL ({e})"),
                        ));
                    }
                    s.url = Some(url.to_owned());
                }
                other => return Err(self.unknown_key(k, "store", other, STORE_KEYS)),
            }
        }
        Ok(s)
    }
}
