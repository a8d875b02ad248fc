//! `tls-creds-x509`: QEMU's x509 credentials object, loaded from a
//! directory laid out as QEMU's (`ca-cert.pem`, `server-cert.pem`,
//! `server-key.pem`, `client-cert.pem`, `client-key.pem`), turned into a
//! rustls configuration for one endpoint.
//!
//! QEMU's rules, recorded with qemu-storage-daemon 10.0:
//! - `endpoint` defaults to `client`, `verify-peer` and `sanity-check` to
//!   on, for both endpoints (`qom-get` reads them back so).
//! - A server needs `ca-cert.pem`, `server-cert.pem` and `server-key.pem`;
//!   a client needs `ca-cert.pem` and presents `client-cert.pem` /
//!   `client-key.pem` only if both exist. A missing file is
//!   `Unable to access credentials DIR/FILE: No such file or directory`.
//! - With `sanity-check`, the CA list must parse (`Unable to import CA
//!   certificate list PATH`) and our own certificate must chain to it
//!   (`Our own certificate C failed validation against CA: ...`).
//! - A server with `verify-peer` requires a client certificate; a client
//!   with `verify-peer` checks the server's against the CA and the host
//!   name (`tls-hostname`, else the TCP host; none at all is `No hostname
//!   for certificate validation`).
//!
//! `priority` (a GnuTLS priority string) is kept and reported but rustls
//! has no equivalent: its safe defaults (TLS 1.2/1.3, AEAD suites) apply.
//!
//! Deliberate difference: QEMU with `sanity-check=off` accepts an
//! unparsable `ca-cert.pem` at object-add and fails every handshake later;
//! we refuse it at object-add with the sanity-check text.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig,
    SignatureScheme,
};

use crate::error::{Error, Result, strerror};

/// Which side of a connection credentials are for (QAPI
/// `QCryptoTLSCredsEndpoint`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// Accepts connections (an NBD server).
    Server,
    /// Makes connections (an NBD client). QEMU's default.
    Client,
}

impl Endpoint {
    /// QAPI's string.
    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::Server => "server",
            Endpoint::Client => "client",
        }
    }

    /// From QAPI's string.
    pub fn from_wire(s: &str) -> Option<Endpoint> {
        match s {
            "server" => Some(Endpoint::Server),
            "client" => Some(Endpoint::Client),
            _ => None,
        }
    }
}

/// The properties of a `tls-creds-x509` object (QAPI
/// `TlsCredsX509Properties`), with QEMU's defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsCredsOptions {
    /// The object's id.
    pub id: String,
    /// The credentials directory (required).
    pub dir: Option<PathBuf>,
    /// Server or client (default client).
    pub endpoint: Endpoint,
    /// Check the peer's certificate (default on).
    pub verify_peer: bool,
    /// GnuTLS priority string: kept, not applied (see the module doc).
    pub priority: Option<String>,
    /// Check our own certificate against the CA when loading (default on).
    pub sanity_check: bool,
}

impl TlsCredsOptions {
    /// QEMU's defaults for object `id`.
    pub fn new(id: impl Into<String>) -> TlsCredsOptions {
        TlsCredsOptions {
            id: id.into(),
            dir: None,
            endpoint: Endpoint::Client,
            verify_peer: true,
            priority: None,
            sanity_check: true,
        }
    }
}

/// The rustls side of loaded credentials.
#[derive(Debug)]
pub(crate) enum Config {
    Server(Arc<ServerConfig>),
    Client(Arc<ClientConfig>),
}

/// Loaded x509 credentials: immutable, shared by every connection that
/// uses them (an `Arc` keeps them alive after `object-del`, as QEMU's
/// reference counting does).
#[derive(Debug)]
pub struct TlsCreds {
    opts: TlsCredsOptions,
    pub(crate) config: Config,
}

/// The crypto provider: ring (see Cargo.toml for why not aws-lc).
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn access(path: &Path) -> Result<()> {
    // QEMU checks with access(R_OK) and reports strerror.
    match std::fs::File::open(path) {
        Ok(_) => Ok(()),
        Err(e) => Err(Error::generic(format!(
            "Unable to access credentials {}: {}",
            path.display(),
            e.raw_os_error()
                .map(strerror)
                .unwrap_or_else(|| e.to_string())
        ))),
    }
}

fn certs_in(path: &Path) -> Vec<CertificateDer<'static>> {
    std::fs::read(path)
        .map(|pem| {
            CertificateDer::pem_slice_iter(&pem)
                .filter_map(|c| c.ok())
                .collect()
        })
        .unwrap_or_default()
}

/// A certificate chain and its key, QEMU's text when either is unusable.
fn cert_and_key(
    cert: &Path,
    key: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let fail = |why: &str| {
        Error::generic(format!(
            "Cannot load certificate '{}' & key '{}': {why}",
            cert.display(),
            key.display()
        ))
    };
    let chain = certs_in(cert);
    let key_der = std::fs::read(key)
        .ok()
        .and_then(|pem| PrivateKeyDer::from_pem_slice(&pem).ok());
    match (chain.is_empty(), key_der) {
        (false, Some(k)) => Ok((chain, k)),
        // GnuTLS's text for PEM without the expected block.
        _ => Err(fail("The requested data were not available.")),
    }
}

/// GnuTLS's words for the certificate problems QEMU reports, so our
/// messages read like QEMU's.
pub(crate) fn cert_error_text(e: &rustls::Error) -> String {
    match e {
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer => "The certificate hasn't got a known issuer".into(),
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "The certificate has expired".into()
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "The certificate is not yet activated".into()
            }
            CertificateError::Revoked => "The certificate has been revoked".into(),
            CertificateError::BadSignature => "The certificate's signature is invalid".into(),
            other => format!("The certificate is invalid: {other:?}"),
        },
        rustls::Error::NoCertificatesPresented => "No certificate was found.".into(),
        other => other.to_string(),
    }
}

impl TlsCreds {
    /// Loads credentials as QEMU's `tls-creds-x509` does on creation.
    pub fn load(opts: TlsCredsOptions) -> Result<TlsCreds> {
        let dir = opts
            .dir
            .clone()
            .ok_or_else(|| Error::generic("Missing 'dir' property value"))?;
        let ca_path = dir.join("ca-cert.pem");
        access(&ca_path)?;
        let mut roots = RootCertStore::empty();
        let (valid, _) = roots.add_parsable_certificates(certs_in(&ca_path));
        if valid == 0 {
            return Err(Error::generic(format!(
                "Unable to import CA certificate list {}",
                ca_path.display()
            )));
        }
        let roots = Arc::new(roots);
        let provider = provider();
        let config = match opts.endpoint {
            Endpoint::Server => {
                let cert = dir.join("server-cert.pem");
                let key = dir.join("server-key.pem");
                access(&cert)?;
                access(&key)?;
                let (chain, key_der) = cert_and_key(&cert, &key)?;
                if opts.sanity_check {
                    sanity_check_server(&chain, &roots, &provider, &cert, &ca_path)?;
                }
                let builder = ServerConfig::builder_with_provider(provider.clone())
                    .with_safe_default_protocol_versions()
                    .map_err(|e| Error::generic(e.to_string()))?;
                let builder = if opts.verify_peer {
                    // Mandatory client authentication against our CA.
                    let v = WebPkiClientVerifier::builder_with_provider(roots, provider)
                        .build()
                        .map_err(|e| Error::generic(e.to_string()))?;
                    builder.with_client_cert_verifier(v)
                } else {
                    builder.with_no_client_auth()
                };
                let c = builder.with_single_cert(chain, key_der).map_err(|e| {
                    Error::generic(format!(
                        "Cannot load certificate '{}' & key '{}': {e}",
                        cert.display(),
                        key.display()
                    ))
                })?;
                Config::Server(Arc::new(c))
            }
            Endpoint::Client => {
                let cert = dir.join("client-cert.pem");
                let key = dir.join("client-key.pem");
                let own = if cert.exists() && key.exists() {
                    let (chain, key_der) = cert_and_key(&cert, &key)?;
                    if opts.sanity_check {
                        sanity_check_client(&chain, &roots, &provider, &cert, &ca_path)?;
                    }
                    Some((chain, key_der))
                } else {
                    None
                };
                let verifier: Arc<dyn ServerCertVerifier> = if opts.verify_peer {
                    rustls::client::WebPkiServerVerifier::builder_with_provider(
                        roots,
                        provider.clone(),
                    )
                    .build()
                    .map_err(|e| Error::generic(e.to_string()))?
                } else {
                    Arc::new(AnyServerCert(provider.signature_verification_algorithms))
                };
                let builder = ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .map_err(|e| Error::generic(e.to_string()))?
                    .dangerous()
                    .with_custom_certificate_verifier(verifier);
                let c = match own {
                    Some((chain, key_der)) => {
                        builder.with_client_auth_cert(chain, key_der).map_err(|e| {
                            Error::generic(format!(
                                "Cannot load certificate '{}' & key '{}': {e}",
                                cert.display(),
                                key.display()
                            ))
                        })?
                    }
                    None => builder.with_no_client_auth(),
                };
                Config::Client(Arc::new(c))
            }
        };
        Ok(TlsCreds { opts, config })
    }

    /// The object's id.
    pub fn id(&self) -> &str {
        &self.opts.id
    }

    /// Server or client.
    pub fn endpoint(&self) -> Endpoint {
        self.opts.endpoint
    }

    /// Whether the peer's certificate is checked.
    pub fn verify_peer(&self) -> bool {
        self.opts.verify_peer
    }

    /// The properties it was created with.
    pub fn options(&self) -> &TlsCredsOptions {
        &self.opts
    }

    /// QEMU's check that credentials suit a role: `Expected TLS
    /// credentials for a client endpoint` (or server).
    pub fn check_endpoint(&self, want: Endpoint) -> Result<()> {
        if self.opts.endpoint == want {
            Ok(())
        } else {
            Err(Error::generic(format!(
                "Expected TLS credentials for a {} endpoint",
                want.as_str()
            )))
        }
    }
}

fn own_cert_failed(cert: &Path, ca: &Path, e: &rustls::Error) -> Error {
    Error::generic(format!(
        "Our own certificate {} failed validation against {}: {}",
        cert.display(),
        ca.display(),
        cert_error_text(e)
    ))
}

fn sanity_check_client(
    chain: &[CertificateDer<'static>],
    roots: &Arc<RootCertStore>,
    provider: &Arc<CryptoProvider>,
    cert: &Path,
    ca: &Path,
) -> Result<()> {
    let v = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(|e| Error::generic(e.to_string()))?;
    v.verify_client_cert(&chain[0], &chain[1..], UnixTime::now())
        .map(|_| ())
        .map_err(|e| own_cert_failed(cert, ca, &e))
}

fn sanity_check_server(
    chain: &[CertificateDer<'static>],
    roots: &Arc<RootCertStore>,
    provider: &Arc<CryptoProvider>,
    cert: &Path,
    ca: &Path,
) -> Result<()> {
    let v = rustls::client::WebPkiServerVerifier::builder_with_provider(
        roots.clone(),
        provider.clone(),
    )
    .build()
    .map_err(|e| Error::generic(e.to_string()))?;
    // The chain and usage are what we check; which names the certificate
    // carries is the client's business, so a name mismatch passes.
    let name = ServerName::try_from("sanity-check.invalid").expect("a valid DNS name");
    match v.verify_server_cert(&chain[0], &chain[1..], &name, &[], UnixTime::now()) {
        Ok(_)
        | Err(rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        )) => Ok(()),
        Err(e) => Err(own_cert_failed(cert, ca, &e)),
    }
}

/// A client's verifier with `verify-peer=off`: any server certificate is
/// accepted, but the handshake signatures are still checked (the session
/// is still encrypted to whoever holds the key of the presented cert).
#[derive(Debug)]
struct AnyServerCert(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for AnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}
