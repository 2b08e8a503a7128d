//! TLS to PostgreSQL.
//!
//! Whether a connection uses TLS follows the URL's `sslmode`, as in libpq:
//! `disable`, `prefer` (the default: whenever the server offers it) or
//! `require`. What is checked of the server's certificate is
//! `database.tls_verify`:
//!
//! - `none` checks nothing, as libpq's `prefer` and `require` do: traffic
//!   is encrypted against a passive listener, and a server with a
//!   self-signed certificate (Debian's default "snakeoil" one) still
//!   serves.
//! - `full` checks the chain against `database.tls_ca_file` (the system's
//!   roots when empty) and that the certificate names the host connected
//!   to, as libpq's `verify-full` does, and makes TLS required: without it
//!   the check would be skipped by a server that simply declines TLS.
//!
//! The handshake's own signatures are verified in both modes.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_platform_verifier::BuilderVerifierExt;
use tokio_postgres::config::SslMode;

use crate::config::{DatabaseSettings, SettingsError, TlsVerify};

/// What every warden connection to PostgreSQL is made with.
pub type Connector = tokio_postgres_rustls::MakeRustlsConnect;

/// The connector `settings` ask for; with `tls_verify = "full"` it also
/// makes TLS required in `pg_config`.
pub fn connector(
    settings: &DatabaseSettings,
    pg_config: &mut tokio_postgres::Config,
) -> Result<Connector, SettingsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| SettingsError::new("database.tls_verify", settings.tls_verify, e.to_string()))?;
    let config = match settings.tls_verify {
        TlsVerify::None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
            .with_no_client_auth(),
        TlsVerify::Full => {
            if pg_config.get_ssl_mode() == SslMode::Disable {
                return Err(SettingsError::new(
                    "database.tls_verify",
                    "full",
                    "\"none\" while database.url says sslmode=disable (full verification needs TLS)",
                ));
            }
            pg_config.ssl_mode(SslMode::Require);
            if settings.tls_ca_file.as_os_str().is_empty() {
                builder
                    .with_platform_verifier()
                    .map_err(|e| {
                        SettingsError::new("database.tls_verify", "full", format!("the system's trusted roots ({e})"))
                    })?
                    .with_no_client_auth()
            } else {
                builder.with_root_certificates(roots(&settings.tls_ca_file)?).with_no_client_auth()
            }
        }
    };
    Ok(Connector::new(config))
}

/// The certificates of a PEM file, for `database.tls_ca_file`.
fn roots(path: &Path) -> Result<RootCertStore, SettingsError> {
    let bad = |why: String| SettingsError::new("database.tls_ca_file", path.display(), why);
    let mut roots = RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(path).map_err(|e| bad(format!("a readable PEM file ({e})")))?;
    for cert in certs {
        let cert = cert.map_err(|e| bad(format!("a PEM file of certificates ({e})")))?;
        roots.add(cert).map_err(|e| bad(format!("a PEM file of CA certificates ({e})")))?;
    }
    if roots.is_empty() {
        return Err(bad("a PEM file holding at least one certificate".into()));
    }
    Ok(roots)
}

/// `tls_verify = "none"`: any certificate names the server, but the
/// handshake must still be signed by the key of the one presented.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
