//! TLS plumbing for every connection the bridge makes, and for its https listener: which CA certificates to trust (a PEM file the operator
//! names, or the system's roots) and how much of the server's certificate to check. One place, so that
//! PostgreSQL, the MQTT broker and the EMQX REST API are verified the same way, with the same `ring` provider
//! (no process-wide default provider is installed or needed).
//!
//! CA files are read each time a client configuration is built, i.e. at each (re)connection: a CA bundle
//! mounted from a Kubernetes Secret can be rotated without restarting the bridge.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

/// Why a TLS client configuration could not be built: never worth retrying without a change on disk.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TlsError {
    #[error("CA file {path}: {reason}")]
    CaFile { path: PathBuf, reason: String },
    #[error("no CA certificates found in the system's trust store (install ca-certificates, set SSL_CERT_FILE, or name a CA file)")]
    NoSystemRoots,
    #[error("TLS set-up failed: {0}")]
    Setup(String),
    #[error("certificate file {path}: {reason}")]
    CertFile { path: PathBuf, reason: String },
    #[error("key file {path}: {reason}")]
    KeyFile { path: PathBuf, reason: String },
}

/// Whose certificates a client trusts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Roots {
    /// The system's trust store (`rustls-native-certs`: `/etc/ssl/certs`, or `SSL_CERT_FILE`).
    System,
    /// Every certificate in this PEM file, and nothing else.
    File(PathBuf),
}

impl Roots {
    /// `Some(path)`: that file; `None`: the system's roots.
    pub(crate) fn from_option(file: Option<&Path>) -> Roots {
        file.map_or(Roots::System, |p| Roots::File(p.to_path_buf()))
    }

    fn load(&self) -> Result<RootCertStore, TlsError> {
        let mut roots = RootCertStore::empty();
        match self {
            Roots::File(path) => {
                let bad = |reason: String| TlsError::CaFile {
                    path: path.clone(),
                    reason,
                };
                let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
                for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                    let cert = cert.map_err(|e| bad(e.to_string()))?;
                    roots.add(cert).map_err(|e| bad(e.to_string()))?;
                }
                if roots.is_empty() {
                    return Err(bad("no PEM certificate in it".into()));
                }
            }
            Roots::System => {
                // Unreadable entries are skipped (as every TLS client does); an empty store is an error that
                // says so, rather than a certificate error at every connection.
                for cert in rustls_native_certs::load_native_certs().certs {
                    let _ = roots.add(cert);
                }
                if roots.is_empty() {
                    return Err(TlsError::NoSystemRoots);
                }
            }
        }
        Ok(roots)
    }
}

/// How much of the server's certificate is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verify {
    /// The chain up to a trusted root, and that the certificate names the host connected to.
    Full,
    /// The chain only: any host name is accepted (PostgreSQL's `sslmode=verify-ca`).
    ChainOnly,
}

/// The crypto provider of every TLS connection of the bridge.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client configuration that verifies the server against `roots`, as much as `verify` says.
pub(crate) fn client_config(roots: &Roots, verify: Verify) -> Result<ClientConfig, TlsError> {
    let store = roots.load()?;
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Setup(e.to_string()))?;
    let config = match verify {
        Verify::Full => builder.with_root_certificates(store).with_no_client_auth(),
        Verify::ChainOnly => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ChainOnly {
                roots: store,
                algorithms: provider.signature_verification_algorithms,
            }))
            .with_no_client_auth(),
    };
    Ok(config)
}

/// A client configuration that encrypts but accepts any server certificate: PostgreSQL's `sslmode=prefer`
/// (as libpq's), which protects against a passive eavesdropper and nothing more. The handshake's signatures
/// are still checked, so the server must hold the key of the certificate it presents.
pub(crate) fn unverified_client_config() -> Result<ClientConfig, TlsError> {
    let provider = provider();
    Ok(ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Setup(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate {
            algorithms: provider.signature_verification_algorithms,
        }))
        .with_no_client_auth())
}

/// A server configuration presenting the chain in `cert` (PEM, the server's certificate first) with the key in
/// `key` (PEM: PKCS#8, PKCS#1 or SEC1), HTTP/1.1 offered by ALPN. Read once: a renewed certificate is served
/// after a restart.
pub(crate) fn server_config(cert: &Path, key: &Path) -> Result<rustls::ServerConfig, TlsError> {
    let bad_cert = |reason: String| TlsError::CertFile {
        path: cert.to_path_buf(),
        reason,
    };
    let bad_key = |reason: String| TlsError::KeyFile {
        path: key.to_path_buf(),
        reason,
    };
    let pem = std::fs::read(cert).map_err(|e| bad_cert(e.to_string()))?;
    let chain = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad_cert(e.to_string()))?;
    if chain.is_empty() {
        return Err(bad_cert("no PEM certificate in it".into()));
    }
    let pem = std::fs::read(key).map_err(|e| bad_key(e.to_string()))?;
    let private = rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|e| bad_key(e.to_string()))?
        .ok_or_else(|| bad_key("no PEM private key in it".into()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Setup(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, private)
        .map_err(|e| bad_key(format!("does not fit the certificate: {e}")))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// `sslmode=verify-ca`: the certificate must chain to one of `roots` (and be valid now); its names are not
/// looked at.
#[derive(Debug)]
struct ChainOnly {
    roots: RootCertStore,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// `sslmode=prefer`: any certificate.
#[derive(Debug)]
struct AnyCertificate {
    algorithms: WebPkiSupportedAlgorithms,
}

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
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
