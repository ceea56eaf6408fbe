//! TLS to PostgreSQL, with libpq's URL parameters: `sslmode` (`disable`,
//! `allow`, `prefer` — the default —, `require`, `verify-ca`,
//! `verify-full`), `sslrootcert` (a PEM file of CA certificates, or
//! `system` for the system's), `sslcert` and `sslkey` (a client
//! certificate and its key, PEM). The client library knows only `disable`,
//! `prefer` and `require`: [`split`] takes these parameters out of the URL
//! and [`Tls::connector`] builds the rustls configuration they ask for.
//!
//! As libpq: `prefer` and `require` encrypt without checking the server's
//! certificate unless a root certificate is given (then `require` checks
//! it as `verify-ca` does); `verify-ca` checks that a trusted CA signed it;
//! `verify-full` also that it names the host connected to. Without
//! `sslrootcert`, the root certificates are those of
//! `~/.postgresql/root.crt` if it exists. `sslrootcert=system` means
//! `verify-full` against the system's CAs, and a weaker mode with it is
//! refused. Unlike libpq, a `prefer` whose handshake fails does not retry
//! without TLS.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, Error, RootCertStore, SignatureScheme};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What a URL asks of TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tls {
    pub mode: Mode,
    pub root: Option<Root>,
    /// Client certificate and key.
    pub client: Option<(PathBuf, PathBuf)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Root {
    File(PathBuf),
    System,
}

/// Splits `url` into the URL the client library takes (its `sslmode` one
/// it knows: `verify-*` become `require`, `allow` becomes `prefer`) and
/// the TLS settings; an error names the parameter.
pub fn split(url: &str) -> Result<(String, Tls), String> {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, q),
        None => (url, ""),
    };
    let mut kept: Vec<&str> = Vec::new();
    let mut mode = None;
    let (mut root, mut cert, mut key) = (None, None, None);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let value = || {
            percent_encoding::percent_decode_str(v)
                .decode_utf8()
                .map(|s| s.into_owned())
                .map_err(|_| format!("{k}: not UTF-8"))
        };
        match k {
            "sslmode" => {
                mode = Some(match value()?.as_str() {
                    "disable" => Mode::Disable,
                    "allow" | "prefer" => Mode::Prefer,
                    "require" => Mode::Require,
                    "verify-ca" => Mode::VerifyCa,
                    "verify-full" => Mode::VerifyFull,
                    other => {
                        return Err(format!(
                            "sslmode: {other:?} is not one of disable, allow, prefer, require, \
                             verify-ca, verify-full"
                        ))
                    }
                })
            }
            "sslrootcert" => {
                root = Some(match value()?.as_str() {
                    "system" => Root::System,
                    "" => return Err("sslrootcert: empty".into()),
                    path => Root::File(PathBuf::from(path)),
                })
            }
            "sslcert" => cert = Some(PathBuf::from(value()?)),
            "sslkey" => key = Some(PathBuf::from(value()?)),
            _ => kept.push(pair),
        }
    }
    let client = match (cert, key) {
        (Some(c), Some(k)) => Some((c, k)),
        (None, None) => None,
        _ => return Err("sslcert and sslkey: give both (a client certificate and its key)".into()),
    };
    let mode = match (mode, &root) {
        (None, Some(Root::System)) => Mode::VerifyFull,
        (Some(m), Some(Root::System)) if m != Mode::VerifyFull => {
            return Err("sslrootcert=system needs sslmode=verify-full (or no sslmode)".into())
        }
        (m, _) => m.unwrap_or(Mode::Prefer),
    };
    if root.is_none() && matches!(mode, Mode::Require | Mode::VerifyCa | Mode::VerifyFull) {
        let default = std::env::var_os("HOME")
            .map(|h| Path::new(&h).join(".postgresql/root.crt"))
            .filter(|p| p.exists());
        root = default.map(Root::File);
        if root.is_none() && mode != Mode::Require {
            return Err(format!(
                "sslmode={}: give sslrootcert (a file of the CA certificates to trust, or \
                 \"system\"); ~/.postgresql/root.crt does not exist",
                if mode == Mode::VerifyCa {
                    "verify-ca"
                } else {
                    "verify-full"
                }
            ));
        }
    }
    kept.push(match mode {
        Mode::Disable => "sslmode=disable",
        Mode::Prefer => "sslmode=prefer",
        _ => "sslmode=require",
    });
    let url = format!("{base}?{}", kept.join("&"));
    Ok((url, Tls { mode, root, client }))
}

impl Tls {
    /// The rustls connector these settings ask for (`None`: no TLS). Reads
    /// the certificate files (on each connection: a renewed file is used).
    pub fn connector(&self) -> Result<Option<tokio_postgres_rustls::MakeRustlsConnect>, String> {
        if self.mode == Mode::Disable {
            return Ok(None);
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = match &self.root {
            None => None,
            Some(Root::System) => {
                let found = rustls_native_certs::load_native_certs();
                let mut store = RootCertStore::empty();
                store.add_parsable_certificates(found.certs);
                if store.is_empty() {
                    return Err(format!(
                        "sslrootcert=system: no CA certificate found on this system ({} errors)",
                        found.errors.len()
                    ));
                }
                Some(store)
            }
            Some(Root::File(path)) => {
                let mut store = RootCertStore::empty();
                let certs = pem_certs("sslrootcert", path)?;
                let (added, _) = store.add_parsable_certificates(certs);
                if added == 0 {
                    return Err(format!(
                        "sslrootcert {}: no CA certificate in it (PEM expected)",
                        path.display()
                    ));
                }
                Some(store)
            }
        };
        let chain = match roots {
            None => None,
            Some(roots) => Some(
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|e| format!("sslrootcert: {e}"))?,
            ),
        };
        let verifier: Arc<dyn ServerCertVerifier> = match chain {
            Some(chain) if self.mode == Mode::VerifyFull => chain,
            chain => Arc::new(Lenient {
                provider: Arc::clone(&provider),
                chain,
            }),
        };
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let config = match &self.client {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let chain = pem_certs("sslcert", cert)?;
                let key = PrivateKeyDer::from_pem_file(key)
                    .map_err(|e| format!("sslkey {}: {e}", key.display()))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| format!("sslcert/sslkey: {e}"))?
            }
        };
        Ok(Some(tokio_postgres_rustls::MakeRustlsConnect::new(config)))
    }
}

/// The certificates of the PEM file `path` (given as URL parameter
/// `param`, which an error names).
fn pem_certs(param: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{param} {}: {e}", path.display()))
}

/// The checks weaker than `verify-full`, which uses rustls's own verifier:
/// with no `chain` (`prefer` and `require` without a root certificate, as
/// libpq: encryption against eavesdropping, not against an active
/// attacker) any certificate is accepted; with one (`verify-ca`) the chain
/// is checked and the name in the certificate is not. Either way the
/// handshake's signatures are checked.
#[derive(Debug)]
struct Lenient {
    provider: Arc<CryptoProvider>,
    chain: Option<Arc<WebPkiServerVerifier>>,
}

impl ServerCertVerifier for Lenient {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libpq_parameters_are_taken_out_and_the_mode_mapped() {
        let (url, tls) = split(
            "postgres://u@h/db?connect_timeout=5&sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem",
        )
        .unwrap();
        assert_eq!(url, "postgres://u@h/db?connect_timeout=5&sslmode=require");
        assert_eq!(tls.mode, Mode::VerifyFull);
        assert_eq!(tls.root, Some(Root::File("/etc/ca.pem".into())));
        let (url, tls) = split("postgres://u@h/db").unwrap();
        assert_eq!(url, "postgres://u@h/db?sslmode=prefer");
        assert_eq!(tls.mode, Mode::Prefer);
        let (_, tls) = split("postgres://u@h/db?sslmode=allow").unwrap();
        assert_eq!(tls.mode, Mode::Prefer);
        let (url, tls) = split("postgres://u@h/db?sslmode=disable").unwrap();
        assert_eq!(url, "postgres://u@h/db?sslmode=disable");
        assert!(tls.connector().unwrap().is_none());
        let (_, tls) = split("postgres://u@h/db?sslrootcert=system").unwrap();
        assert_eq!(tls.mode, Mode::VerifyFull);
        let (_, tls) = split("postgres://u@h/db?sslcert=/c.pem&sslkey=/k.pem").unwrap();
        assert_eq!(tls.client, Some(("/c.pem".into(), "/k.pem".into())));
        for (url, says) in [
            ("postgres://u@h/db?sslmode=sure", "sslmode: \"sure\""),
            ("postgres://u@h/db?sslcert=/c.pem", "give both"),
            (
                "postgres://u@h/db?sslrootcert=system&sslmode=require",
                "needs sslmode=verify-full",
            ),
            ("postgres://u@h/db?sslrootcert=", "sslrootcert: empty"),
        ] {
            let e = split(url).unwrap_err();
            assert!(e.contains(says), "{url}: {e}");
        }
    }

    #[test]
    fn unreadable_certificate_files_are_named() {
        let (_, tls) =
            split("postgres://u@h/db?sslmode=verify-ca&sslrootcert=/nonexistent/ca.pem").unwrap();
        let e = tls.connector().err().expect("an error");
        assert!(e.starts_with("sslrootcert /nonexistent/ca.pem: "), "{e}");
        let dir = std::env::temp_dir().join(format!("jv-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let junk = dir.join("junk.pem");
        std::fs::write(&junk, "not a certificate\n").unwrap();
        let (_, tls) = split(&format!(
            "postgres://u@h/db?sslmode=verify-ca&sslrootcert={}",
            junk.display()
        ))
        .unwrap();
        let e = tls.connector().err().expect("an error");
        assert!(e.contains("no CA certificate in it"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
