//! Postgres TLS: libpq's `sslmode` and `sslrootcert` taken out of the URL, and a rustls (ring)
//! connector that checks the server's certificate exactly as much as the mode asks.
//!
//! | sslmode            | TLS                     | certificate check                         |
//! |--------------------|-------------------------|-------------------------------------------|
//! | `disable`          | never                   | -                                         |
//! | `prefer` (default) | if the server offers it | none; the chain if `sslrootcert` is given |
//! | `require`          | always                  | none; the chain if `sslrootcert` is given |
//! | `verify-ca`        | always                  | the chain                                 |
//! | `verify-full`      | always                  | the chain and the host name               |
//!
//! The chain is checked against `sslrootcert` (a PEM file of CA certificates) or, when it is
//! absent or `system`, against the built-in public CA list (webpki-roots).

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore};
use rustls::{Error as TlsError, SignatureScheme};
use std::sync::Arc;
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

/// libpq's `sslmode` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    Disable,
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

const MODES: [(&str, Mode); 5] = [
    ("disable", Mode::Disable),
    ("prefer", Mode::Prefer),
    ("require", Mode::Require),
    ("verify-ca", Mode::VerifyCa),
    ("verify-full", Mode::VerifyFull),
];

impl Mode {
    pub fn name(self) -> &'static str {
        MODES
            .iter()
            .find(|(_, m)| *m == self)
            .map_or("?", |(n, _)| n)
    }
}

/// The TLS settings of one connection URL.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Tls {
    pub mode: Mode,
    /// `sslrootcert`: a PEM file of CA certificates, or `system` for the built-in public CAs.
    pub root_cert: Option<String>,
}

/// How much of the server's certificate is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    Nothing,
    Chain,
    ChainAndName,
}

/// Take `sslmode` and `sslrootcert` out of a URL's query string: the rest of the URL (for
/// `tokio_postgres::Config`, which does not know verify-ca/verify-full) and the TLS settings.
pub fn split_url(url: &str) -> Result<(String, Tls), String> {
    let mut tls = Tls::default();
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_string(), tls));
    };
    let mut kept = Vec::new();
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match decode(k).as_str() {
            "sslmode" => {
                let v = decode(v);
                tls.mode = MODES
                    .iter()
                    .find(|(n, _)| *n == v)
                    .map(|(_, m)| *m)
                    .ok_or_else(|| {
                        format!(
                            "sslmode={v:?} is not one of disable, prefer, require, verify-ca, \
                             verify-full"
                        )
                    })?;
            }
            "sslrootcert" => tls.root_cert = Some(decode(v)).filter(|p| !p.is_empty()),
            _ => kept.push(pair),
        }
    }
    let rest = match kept.is_empty() {
        true => base.to_string(),
        false => format!("{base}?{}", kept.join("&")),
    };
    Ok((rest, tls))
}

fn decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

impl Tls {
    fn check(&self) -> Check {
        match self.mode {
            Mode::Disable => Check::Nothing,
            // libpq: with a root certificate, prefer and require check the chain too.
            Mode::Prefer | Mode::Require if self.root_cert.is_none() => Check::Nothing,
            Mode::Prefer | Mode::Require | Mode::VerifyCa => Check::Chain,
            Mode::VerifyFull => Check::ChainAndName,
        }
    }

    /// What tokio-postgres should do about TLS (the certificate checks are in the connector).
    pub fn ssl_mode(&self) -> SslMode {
        match self.mode {
            Mode::Disable => SslMode::Disable,
            Mode::Prefer => SslMode::Prefer,
            _ => SslMode::Require,
        }
    }

    /// The CAs the chain is checked against, as the error messages name them.
    fn ca_name(&self) -> String {
        match self.root_cert.as_deref() {
            None | Some("system") => "a public CA (no sslrootcert given)".into(),
            Some(path) => format!("the CA in sslrootcert {path}"),
        }
    }

    /// The rustls connector for these settings; reads `sslrootcert` now.
    pub fn connector(&self) -> Result<MakeRustlsConnect, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier: Arc<dyn ServerCertVerifier> = match self.check() {
            Check::Nothing => Arc::new(NoCheck(provider.clone())),
            check => {
                let roots = Arc::new(self.roots()?);
                let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                    .build()
                    .map_err(|e| format!("cannot use the CA certificates: {e}"))?;
                match check {
                    Check::Chain => Arc::new(ChainOnly(webpki)),
                    _ => webpki,
                }
            }
        };
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS set-up: {e}"))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Ok(MakeRustlsConnect::new(config))
    }

    fn roots(&self) -> Result<RootCertStore, String> {
        let path = match self.root_cert.as_deref() {
            None | Some("system") => {
                return Ok(RootCertStore {
                    roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
                });
            }
            Some(path) => path,
        };
        let what = "sslrootcert must be a PEM file with the CA certificate(s) that signed the \
                    server's certificate";
        let pem = std::fs::read(path)
            .map_err(|e| format!("cannot read sslrootcert file {path}: {e} — {what}"))?;
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| format!("sslrootcert file {path}: {e} — {what}"))?;
            roots
                .add(cert)
                .map_err(|e| format!("sslrootcert file {path}: unusable certificate: {e}"))?;
        }
        if roots.is_empty() {
            return Err(format!(
                "sslrootcert file {path} holds no certificate (-----BEGIN CERTIFICATE-----) — {what}"
            ));
        }
        Ok(roots)
    }
}

/// If `e` is a TLS failure: what failed and what to do about it.
pub fn explain(e: &tokio_postgres::Error, tls: &Tls) -> Option<String> {
    let mode = tls.mode.name();
    let Some(err) = rustls_error(e) else {
        let text = super::errors::describe(e);
        return text.contains("server does not support TLS").then(|| {
            format!(
                "the server does not accept TLS connections but sslmode={mode} requires TLS \
                 — turn ssl on in the server, or use sslmode=prefer or sslmode=disable"
            )
        });
    };
    let TlsError::InvalidCertificate(cert) = err else {
        return Some(format!(
            "TLS handshake failed (sslmode={mode}): {err} — check the server's TLS settings \
             (ssl_min_protocol_version, its certificate and key)"
        ));
    };
    let (reason, todo) = match cert {
        CertificateError::UnknownIssuer | CertificateError::BadSignature => (
            format!(
                "the server's certificate is not signed by {}",
                tls.ca_name()
            ),
            match tls.root_cert.as_deref() {
                None | Some("system") => {
                    "set sslrootcert=<file> in the URL to the CA that signed the server's \
                     certificate (managed services publish theirs)"
                }
                Some(_) => "check sslrootcert (the CA that signed the server's certificate)",
            },
        ),
        CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => (
            cert.to_string(),
            "connect with a host name the certificate lists, or use sslmode=verify-ca to check \
             only the CA",
        ),
        other => (
            other.to_string(),
            "check sslrootcert (the CA that signed the server's certificate) or the host name",
        ),
    };
    Some(format!(
        "TLS certificate verification failed ({mode}): {reason} — {todo}"
    ))
}

/// The rustls error somewhere in the chain (tokio-rustls wraps it in an `io::Error`).
fn rustls_error(e: &tokio_postgres::Error) -> Option<&TlsError> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(found) = err.downcast_ref::<TlsError>() {
            return Some(found);
        }
        let inner = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref());
        if let Some(found) = inner.and_then(|i| i.downcast_ref::<TlsError>()) {
            return Some(found);
        }
        cur = err.source();
    }
    None
}

/// prefer/require without a root certificate: encrypt, but trust any certificate (libpq).
/// The handshake signatures are still checked.
#[derive(Debug)]
struct NoCheck(Arc<CryptoProvider>);

impl ServerCertVerifier for NoCheck {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// verify-ca: the full webpki check, except that a host name mismatch is accepted. (webpki
/// checks the name last, after the chain, so a name error means the chain was good.)
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(TlsError::InvalidCertificate(
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
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls(mode: Mode, root_cert: Option<&str>) -> Tls {
        Tls {
            mode,
            root_cert: root_cert.map(str::to_string),
        }
    }

    #[test]
    fn takes_ssl_settings_out_of_the_url() {
        let (rest, t) = split_url("postgres://u:pw@h:5432/db").unwrap();
        assert_eq!(
            (rest.as_str(), t),
            ("postgres://u:pw@h:5432/db", Tls::default())
        );
        assert_eq!(Tls::default().mode, Mode::Prefer);

        let (rest, t) = split_url(
            "postgres://h/db?application_name=x&sslmode=verify-full&sslrootcert=%2Fetc%2Fca+1.pem\
             &connect_timeout=5",
        )
        .unwrap();
        assert_eq!(rest, "postgres://h/db?application_name=x&connect_timeout=5");
        assert_eq!(t, tls(Mode::VerifyFull, Some("/etc/ca+1.pem")));

        let (rest, t) = split_url("postgres://h/db?sslmode=disable").unwrap();
        assert_eq!((rest.as_str(), t.mode), ("postgres://h/db", Mode::Disable));
        let (_, t) = split_url("postgres://h/db?sslrootcert=/ca.pem&sslmode=verify-ca").unwrap();
        assert_eq!(t, tls(Mode::VerifyCa, Some("/ca.pem")));

        let err = split_url("postgres://h/db?sslmode=verify").unwrap_err();
        assert!(err.contains("\"verify\" is not one of disable"), "{err}");
        // What is left must still parse for tokio-postgres.
        let (rest, _) = split_url("postgres://h/db?sslmode=require&sslrootcert=x").unwrap();
        rest.parse::<tokio_postgres::Config>().unwrap();
    }

    #[test]
    fn modes_map_to_libpq_checks() {
        let cases = [
            (tls(Mode::Disable, None), SslMode::Disable, Check::Nothing),
            (tls(Mode::Prefer, None), SslMode::Prefer, Check::Nothing),
            (tls(Mode::Require, None), SslMode::Require, Check::Nothing),
            (
                tls(Mode::Require, Some("ca")),
                SslMode::Require,
                Check::Chain,
            ),
            (tls(Mode::VerifyCa, None), SslMode::Require, Check::Chain),
            (
                tls(Mode::VerifyFull, None),
                SslMode::Require,
                Check::ChainAndName,
            ),
        ];
        for (t, ssl, check) in cases {
            assert_eq!((t.ssl_mode(), t.check()), (ssl, check), "{t:?}");
        }
    }

    #[test]
    fn unreadable_root_cert_names_the_file() {
        let err = tls(Mode::VerifyFull, Some("/nonexistent/ca.pem"))
            .connector()
            .err()
            .unwrap();
        assert!(
            err.contains("cannot read sslrootcert file /nonexistent/ca.pem"),
            "{err}"
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "not a certificate\n").unwrap();
        let err = tls(Mode::VerifyCa, path.to_str())
            .connector()
            .err()
            .unwrap();
        assert!(err.contains("holds no certificate"), "{err}");
        assert!(tls(Mode::VerifyFull, None).connector().is_ok());
    }
}
