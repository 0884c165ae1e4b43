//! TLS for ztna's QUIC connections: rustls (ring provider) configurations for both sides.
//!
//! * The server asks every client for a certificate. rustls checks only that the client owns
//!   the key it presents (the CertificateVerify signature); the chain and the SANs are checked
//!   by Python (`ztna.identity`) on the handshake event, which closes the connection with
//!   ztna's own close code and counts the refusal. Keeping that decision in one place gives
//!   the same close codes and metrics whether a peer has no certificate, another CA's, or an
//!   unscoped one.
//! * Clients verify the server's chain against our CA only (never a system store) and the
//!   name they dialled, a DNS name or an IP address.
//! * Session tickets are stateful and single use: rustls hands the server's tickets to a
//!   store object of Python's (`ztna.quic.tickets.ServerTicketStore`, SQLite), whose `take`
//!   deletes the row it returns; a replayed ClientHello finds no ticket.

use std::fmt;
use std::fs::OpenOptions;
use std::io::Write;
use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::StoresServerSessions;
use rustls::{DigitallySignedStruct, DistinguishedName, Error as TlsError, KeyLog, SignatureScheme};

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

#[derive(Debug)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

pub fn parse_certs(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let certs: Result<Vec<_>, _> = rustls_pemfile::certs(&mut &pem[..]).collect();
    let certs = certs.map_err(|e| ConfigError(format!("{what}: not PEM certificates ({e})")))?;
    if certs.is_empty() {
        return Err(ConfigError(format!("{what}: no certificate found")));
    }
    Ok(certs)
}

pub fn parse_key(pem: &[u8], what: &str) -> Result<PrivateKeyDer<'static>, ConfigError> {
    match rustls_pemfile::private_key(&mut &pem[..]) {
        Ok(Some(key)) => Ok(key),
        Ok(None) => Err(ConfigError(format!("{what}: no private key found"))),
        Err(e) => Err(ConfigError(format!("{what}: not a PEM private key ({e})"))),
    }
}

/// The handshake-signature checks every verifier here shares: the peer must own the key of
/// the certificate it presents, whatever else is (or is not) checked about that certificate.
macro_rules! signature_checks {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, TlsError> {
            verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, TlsError> {
            verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.provider.signature_verification_algorithms.supported_schemes()
        }
    };
}

/// Accepts any client certificate whose key signed the handshake; Python checks the chain.
#[derive(Debug)]
struct AnyClientCert {
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for AnyClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, TlsError> {
        Ok(ClientCertVerified::assertion())
    }

    signature_checks!();
}

/// The `--insecure` client: checks the handshake signature only, not who the server is.
#[derive(Debug)]
struct NoServerVerification {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for NoServerVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        Ok(ServerCertVerified::assertion())
    }

    signature_checks!();
}

/// The CA check of the server's chain and name (rustls' WebPKI verifier), remembering the
/// certificate each server name presented, so a refusal can say what the certificate holds.
#[derive(Debug)]
pub struct RecordingVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    pub seen: Mutex<std::collections::HashMap<String, Vec<u8>>>,
}

impl ServerCertVerifier for RecordingVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        if let Ok(mut seen) = self.seen.lock() {
            if seen.len() > 256 {
                seen.clear();
            }
            seen.insert(server_name.to_str().into_owned(), end_entity.as_ref().to_vec());
        }
        self.inner.verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// SSLKEYLOGFILE-format lines appended to one file (for Wireshark).
pub struct FileKeyLog {
    file: Mutex<std::fs::File>,
}

impl fmt::Debug for FileKeyLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FileKeyLog")
    }
}

impl FileKeyLog {
    pub fn open(path: &str) -> Result<Self, ConfigError> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| ConfigError(format!("keylog file {path}: {e}")))?;
        Ok(Self { file: Mutex::new(file) })
    }
}

fn hex(data: &[u8]) -> String {
    data.iter().map(|b| format!("{b:02x}")).collect()
}

impl KeyLog for FileKeyLog {
    fn log(&self, label: &str, client_random: &[u8], secret: &[u8]) {
        if let Ok(mut f) = self.file.lock() {
            let _ = writeln!(f, "{label} {} {}", hex(client_random), hex(secret));
        }
    }
}

/// Where the server's session tickets live. Implemented by the binding (a Python object);
/// `take` must delete what it returns (single use).
pub trait TicketBackend: Send + Sync {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool;
    fn take(&self, key: &[u8]) -> Option<Vec<u8>>;
}

pub struct TicketStore(pub Box<dyn TicketBackend>);

impl fmt::Debug for TicketStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TicketStore")
    }
}

impl StoresServerSessions for TicketStore {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        self.0.put(key, value)
    }

    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        // Only TLS 1.2 asks for a ticket without consuming it; QUIC is TLS 1.3 only, and a
        // ticket must never be usable twice, so a plain lookup finds nothing.
        let _ = key;
        None
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.0.take(key)
    }

    fn can_cache(&self) -> bool {
        true
    }
}

pub struct ServerTlsOptions<'a> {
    pub cert_pem: &'a [u8],
    pub key_pem: &'a [u8],
    pub alpn: Vec<Vec<u8>>,
    pub request_client_cert: bool,
    pub tickets: Option<Box<dyn TicketBackend>>,
    pub keylog: Option<&'a str>,
}

pub fn server_config(o: ServerTlsOptions<'_>) -> Result<rustls::ServerConfig, ConfigError> {
    let provider = provider();
    let certs = parse_certs(o.cert_pem, "certificate")?;
    let key = parse_key(o.key_pem, "private key")?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ConfigError(format!("TLS: {e}")))?;
    let builder = if o.request_client_cert {
        builder.with_client_cert_verifier(Arc::new(AnyClientCert { provider: provider.clone() }))
    } else {
        builder.with_no_client_auth()
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| ConfigError(format!("certificate and key do not match or are unusable: {e}")))?;
    config.alpn_protocols = o.alpn;
    match o.tickets {
        Some(backend) => {
            config.session_storage = Arc::new(TicketStore(backend));
            config.send_tls13_tickets = 2;
            // quinn accepts 0-RTT only when rustls advertises this exact value.
            config.max_early_data_size = u32::MAX;
        }
        None => {
            config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
            config.send_tls13_tickets = 0;
            config.max_early_data_size = 0;
        }
    }
    if let Some(path) = o.keylog {
        config.key_log = Arc::new(FileKeyLog::open(path)?);
    }
    Ok(config)
}

pub struct ClientTlsOptions<'a> {
    pub cert_pem: Option<&'a [u8]>,
    pub key_pem: Option<&'a [u8]>,
    pub ca_pem: &'a [u8],
    pub alpn: Vec<Vec<u8>>,
    pub verify_server: bool,
    pub keylog: Option<&'a str>,
    pub resumption: bool,
}

pub fn client_config(o: ClientTlsOptions<'_>) -> Result<(rustls::ClientConfig, Option<Arc<RecordingVerifier>>), ConfigError> {
    let provider = provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ConfigError(format!("TLS: {e}")))?;
    let mut recorder = None;
    let builder = if o.verify_server {
        let mut roots = rustls::RootCertStore::empty();
        for ca in parse_certs(o.ca_pem, "CA certificate")? {
            roots
                .add(ca)
                .map_err(|e| ConfigError(format!("CA certificate unusable: {e}")))?;
        }
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()
        .map_err(|e| ConfigError(format!("CA certificate unusable: {e}")))?;
        let recording = Arc::new(RecordingVerifier { inner: verifier, seen: Mutex::new(Default::default()) });
        recorder = Some(recording.clone());
        builder.dangerous().with_custom_certificate_verifier(recording)
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoServerVerification { provider: provider.clone() }))
    };
    let mut config = match (o.cert_pem, o.key_pem) {
        (Some(cert), Some(key)) => {
            let certs = parse_certs(cert, "certificate")?;
            let key = parse_key(key, "private key")?;
            builder.with_client_auth_cert(certs, key).map_err(|e| {
                ConfigError(format!("certificate and key do not match or are unusable: {e}"))
            })?
        }
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols = o.alpn;
    if o.resumption {
        config.enable_early_data = true;
        config.resumption = rustls::client::Resumption::in_memory_sessions(64);
    } else {
        config.resumption = rustls::client::Resumption::disabled();
    }
    if let Some(path) = o.keylog {
        config.key_log = Arc::new(FileKeyLog::open(path)?);
    }
    Ok((config, recorder))
}
