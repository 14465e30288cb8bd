//! TLS for every client and server of the workspace, set up one way: rustls with the `ring`
//! provider (no OpenSSL, no aws-lc-rs), certificates and keys from PEM files.
//!
//! This module owns loading trust anchors (a private CA bundle, or the platform's store),
//! server certificates and keys, the optional SHA-256 pin of a server's public key
//! (SubjectPublicKeyInfo, checked on top of normal chain and name validation), and the
//! translation of a handshake failure into words an operator can act on ([`TlsFailure`]).
//!
//! Every configuration built here names its crypto provider explicitly. [`provider`] also
//! installs `ring` as the process default once, so a library that asks rustls for the
//! default (reqwest does) finds the same provider instead of panicking: with only `ring`
//! compiled in there is nothing else it could pick.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, OnceLock};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, OtherError, SignatureScheme};

pub use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// Why a TLS setting could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A file is not valid PEM.
    #[error("{}: not valid PEM: {reason}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// What the PEM parser said.
        reason: String,
    },
    /// A file holds no certificate.
    #[error("{}: no PEM certificate (-----BEGIN CERTIFICATE-----) found", path.display())]
    NoCertificates {
        /// The file.
        path: PathBuf,
    },
    /// A CA file holds a certificate that cannot be a trust anchor.
    #[error("{}: certificate {index} cannot be used as a CA: {reason}", path.display())]
    BadCa {
        /// The file.
        path: PathBuf,
        /// 1-based position of the certificate in the file.
        index: usize,
        /// Why it was refused.
        reason: String,
    },
    /// A key file holds no private key.
    #[error("{}: no PEM private key found", path.display())]
    NoKey {
        /// The file.
        path: PathBuf,
    },
    /// The platform's trust store is empty or unreadable.
    #[error("no trusted CA certificates in the system store{detail}; give a CA file")]
    NoPlatformRoots {
        /// What went wrong reading the store, if anything, starting with `": "`.
        detail: String,
    },
    /// A certificate and key do not make a usable server identity, or the provider refused
    /// the settings.
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
    /// The verifier could not be built from the trust anchors.
    #[error("cannot build the certificate verifier: {0}")]
    Verifier(String),
}

/// The crypto provider of every TLS configuration in the workspace (`ring`). The first call
/// also installs it as the process default, so code that asks rustls for the default gets
/// this one.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    Arc::clone(PROVIDER.get_or_init(|| {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        // Fails only when some other code installed one first; that one then stays the
        // default, and our configurations still name ring explicitly.
        let _ = CryptoProvider::install_default((*provider).clone());
        provider
    }))
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Every certificate in the PEM file at `path` (at least one).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificates {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// The first private key (PKCS#8, PKCS#1 or SEC1) in the PEM file at `path`.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoKey {
            path: path.to_path_buf(),
        },
        other => TlsError::Pem {
            path: path.to_path_buf(),
            reason: other.to_string(),
        },
    })
}

/// The CA certificates in the PEM bundle at `path`, as trust anchors. Every certificate
/// must be usable: a bundle with a broken entry is a configuration mistake worth hearing
/// about at start, not a silently smaller trust set.
pub fn roots_from_file(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for (i, cert) in load_certs(path)?.into_iter().enumerate() {
        roots.add(cert).map_err(|e| TlsError::BadCa {
            path: path.to_path_buf(),
            index: i + 1,
            reason: e.to_string(),
        })?;
    }
    Ok(roots)
}

/// The platform's trust store (on Linux the `ca-certificates` bundle, honouring
/// `SSL_CERT_FILE` and `SSL_CERT_DIR`). Unusable entries are skipped, as the platform's own
/// tools do; an empty result is an error.
pub fn platform_roots() -> Result<RootCertStore, TlsError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let _ = roots.add_parsable_certificates(found.certs);
    if roots.is_empty() {
        let detail = found
            .errors
            .first()
            .map(|e| format!(": {e}"))
            .unwrap_or_default();
        return Err(TlsError::NoPlatformRoots { detail });
    }
    Ok(roots)
}

/// A SHA-256 digest of a certificate's DER-encoded SubjectPublicKeyInfo: the same value as
/// `openssl x509 -pubkey -noout | openssl pkey -pubin -outform der | openssl dgst -sha256`.
/// Pinning the key rather than the certificate survives certificate renewal with the same
/// key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SpkiPin([u8; 32]);

impl SpkiPin {
    /// The pin of a DER-encoded SubjectPublicKeyInfo.
    pub fn of_spki(spki_der: &[u8]) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, spki_der);
        let mut out = [0; 32];
        out.copy_from_slice(digest.as_ref());
        SpkiPin(out)
    }

    /// The pin of a DER-encoded X.509 certificate's public key, or `None` if the
    /// certificate cannot be parsed that far.
    pub fn of_certificate(cert_der: &[u8]) -> Option<Self> {
        spki_of_certificate(cert_der).map(Self::of_spki)
    }

    /// The digest.
    pub fn bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lower-case hex, 64 characters.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Standard base64 with padding, 44 characters.
    pub fn to_base64(&self) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(self.0)
    }
}

/// Shown as `sha256/<base64>`, the form curl and HPKP use.
impl fmt::Display for SpkiPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256/{}", self.to_base64())
    }
}

impl fmt::Debug for SpkiPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpkiPin({self})")
    }
}

/// Why a pin could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0:?} is not a SHA-256 pin: expected 64 hex digits or 44 base64 characters (optionally after sha256/)"
)]
pub struct PinParseError(pub String);

/// Accepts 64 hex digits (colons allowed between bytes) or base64 of 32 bytes (standard or
/// URL-safe alphabet, padding optional), optionally prefixed `sha256/` (our form) or
/// `sha256//` (curl's). A base64 pin may itself begin with `/`, so `sha256//…` is read both
/// ways; at most one reading is 32 bytes long.
impl FromStr for SpkiPin {
    type Err = PinParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let readings = [
            t.strip_prefix("sha256//"),
            t.strip_prefix("sha256/"),
            Some(t),
        ];
        readings
            .into_iter()
            .flatten()
            .find_map(parse_bare_pin)
            .ok_or_else(|| PinParseError(s.to_owned()))
    }
}

/// A pin without prefix: hex (colons allowed) or base64 of exactly 32 bytes.
fn parse_bare_pin(t: &str) -> Option<SpkiPin> {
    use base64::Engine as _;
    use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
    let hex: String = t.chars().filter(|c| *c != ':').collect();
    if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            let pair = hex.get(2 * i..2 * i + 2)?;
            *byte = u8::from_str_radix(pair, 16).ok()?;
        }
        return Some(SpkiPin(out));
    }
    let unpadded = t.trim_end_matches('=');
    let decoded = STANDARD_NO_PAD
        .decode(unpadded)
        .or_else(|_| URL_SAFE_NO_PAD.decode(unpadded))
        .ok()?;
    <[u8; 32]>::try_from(decoded.as_slice()).ok().map(SpkiPin)
}

/// One DER element: its tag, its content, the whole element and what follows it.
struct Tlv<'a> {
    tag: u8,
    content: &'a [u8],
    whole: &'a [u8],
    rest: &'a [u8],
}

/// Reads one DER element. Only the single-byte tags and definite lengths a certificate
/// uses are accepted; anything else is `None`.
fn tlv(input: &[u8]) -> Option<Tlv<'_>> {
    let tag = *input.first()?;
    if tag & 0x1f == 0x1f {
        return None;
    }
    let first = *input.get(1)?;
    let (len, header) = if first < 0x80 {
        (usize::from(first), 2)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for b in input.get(2..2 + n)? {
            len = (len << 8) | usize::from(*b);
        }
        (len, 2 + n)
    };
    let end = header.checked_add(len)?;
    Some(Tlv {
        tag,
        content: input.get(header..end)?,
        whole: input.get(..end)?,
        rest: input.get(end..)?,
    })
}

/// The DER SubjectPublicKeyInfo of an X.509 certificate: the seventh field of
/// `tbsCertificate` counting the optional `[0]` version (RFC 5280, section 4.1).
fn spki_of_certificate(cert: &[u8]) -> Option<&[u8]> {
    const SEQUENCE: u8 = 0x30;
    let certificate = tlv(cert)?;
    let tbs = tlv(certificate.content)?;
    if certificate.tag != SEQUENCE || tbs.tag != SEQUENCE {
        return None;
    }
    let mut field = tlv(tbs.content)?;
    if field.tag == 0xa0 {
        field = tlv(field.rest)?;
    }
    // serialNumber, signature, issuer, validity, subject, then subjectPublicKeyInfo.
    for _ in 0..5 {
        field = tlv(field.rest)?;
    }
    (field.tag == SEQUENCE).then_some(field.whole)
}

/// The peer's public key matched none of the pins.
#[derive(Debug, thiserror::Error)]
#[error("the server's public key {actual} matches none of the configured pins")]
pub struct PinMismatch {
    /// The pin of the key the server presented.
    pub actual: SpkiPin,
}

/// Normal WebPKI validation (chain to a trusted CA, validity, name), then the pin check on
/// the leaf's public key.
#[derive(Debug)]
struct PinnedVerifier {
    inner: Arc<WebPkiServerVerifier>,
    pins: Vec<SpkiPin>,
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        let actual = SpkiPin::of_certificate(end_entity).ok_or(
            rustls::Error::InvalidCertificate(CertificateError::BadEncoding),
        )?;
        if self.pins.contains(&actual) {
            Ok(verified)
        } else {
            Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                OtherError(Arc::new(PinMismatch { actual })),
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A client configuration trusting `roots`; with `pins`, the server's key must also match
/// one of them.
pub fn client_config(roots: RootCertStore, pins: &[SpkiPin]) -> Result<ClientConfig, TlsError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()?;
    let config = if pins.is_empty() {
        builder.with_root_certificates(roots)
    } else {
        let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| TlsError::Verifier(e.to_string()))?;
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedVerifier {
                inner,
                pins: pins.to_vec(),
            }))
    };
    Ok(config.with_no_client_auth())
}

/// A server configuration presenting the certificate chain in `cert_file` (leaf first) with
/// the key in `key_file`; no client certificates.
pub fn server_config(cert_file: &Path, key_file: &Path) -> Result<ServerConfig, TlsError> {
    let certs = load_certs(cert_file)?;
    let key = load_key(key_file)?;
    Ok(ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?)
}

/// A server certificate that can be replaced while the server runs: new handshakes get
/// the new chain and key, connections already established keep theirs. A reload that
/// fails (a half-written file, a key that does not match) keeps the current certificate.
#[derive(Debug)]
pub struct ReloadableCert {
    cert_file: PathBuf,
    key_file: PathBuf,
    current: std::sync::RwLock<Arc<rustls::sign::CertifiedKey>>,
    /// Modification times of the two files when they were last loaded.
    stamp: std::sync::Mutex<Option<(std::time::SystemTime, std::time::SystemTime)>>,
}

impl ReloadableCert {
    /// Loads the chain in `cert_file` (leaf first) and the key in `key_file`.
    pub fn load(cert_file: &Path, key_file: &Path) -> Result<Arc<Self>, TlsError> {
        let this = ReloadableCert {
            cert_file: cert_file.to_owned(),
            key_file: key_file.to_owned(),
            current: std::sync::RwLock::new(Arc::new(Self::read(cert_file, key_file)?)),
            stamp: std::sync::Mutex::new(Self::mtimes(cert_file, key_file)),
        };
        Ok(Arc::new(this))
    }

    fn read(cert_file: &Path, key_file: &Path) -> Result<rustls::sign::CertifiedKey, TlsError> {
        let certs = load_certs(cert_file)?;
        let key = load_key(key_file)?;
        let certified = rustls::sign::CertifiedKey::from_der(certs, key, &provider())?;
        Ok(certified)
    }

    fn mtimes(cert: &Path, key: &Path) -> Option<(std::time::SystemTime, std::time::SystemTime)> {
        let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        Some((m(cert)?, m(key)?))
    }

    /// Loads the files again and, if they are good, serves them from the next handshake on.
    pub fn reload(&self) -> Result<(), TlsError> {
        let stamp = Self::mtimes(&self.cert_file, &self.key_file);
        let fresh = Self::read(&self.cert_file, &self.key_file)?;
        if let Ok(mut current) = self.current.write() {
            *current = Arc::new(fresh);
        }
        if let Ok(mut last) = self.stamp.lock() {
            *last = stamp;
        }
        Ok(())
    }

    /// Reloads when either file changed since the last load; returns whether it did. The
    /// error of a failed reload is returned once per change, not on every call.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let now = Self::mtimes(&self.cert_file, &self.key_file);
        let changed = match self.stamp.lock() {
            Ok(mut last) if *last != now => {
                *last = now;
                true
            }
            _ => false,
        };
        if changed {
            self.reload()?;
        }
        Ok(changed)
    }

    /// The leaf certificate being served (DER).
    pub fn leaf(&self) -> Option<CertificateDer<'static>> {
        let current = self.current.read().ok()?;
        current.cert.first().cloned()
    }

    /// A server configuration (TLS 1.2 and 1.3, rustls' safe defaults, no client
    /// certificates) that asks this certificate for every handshake.
    pub fn server_config(self: &Arc<Self>) -> Result<ServerConfig, TlsError> {
        Ok(ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(self) as Arc<dyn rustls::server::ResolvesServerCert>))
    }
}

impl rustls::server::ResolvesServerCert for ReloadableCert {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.current.read().ok().map(|c| Arc::clone(&c))
    }
}

/// A failed TLS handshake, in the terms an operator fixes it by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsFailure {
    /// The server's chain does not lead to a trusted CA.
    UnknownIssuer,
    /// The certificate does not name the host that was dialled.
    NameMismatch {
        /// The host dialled, when known.
        expected: Option<String>,
        /// The names the certificate does carry, when known.
        presented: Vec<String>,
    },
    /// The certificate has expired or is not valid yet.
    NotValidNow(String),
    /// The chain is fine but the key is not one of the pins.
    PinMismatch {
        /// `sha256/<base64>` of the key the server presented.
        actual: String,
    },
    /// The server refused our side of the handshake (a TLS alert).
    AlertReceived(String),
    /// The server did not speak TLS (for example a plain HTTP port).
    NotTls,
    /// Anything else rustls reported.
    Other(String),
}

impl fmt::Display for TlsFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TlsFailure::UnknownIssuer => f.write_str(
                "certificate not trusted: it is not signed by a trusted CA (unknown issuer)",
            ),
            TlsFailure::NameMismatch {
                expected,
                presented,
            } => {
                f.write_str("certificate name mismatch: it is not valid for ")?;
                match expected {
                    Some(host) => f.write_str(host)?,
                    None => f.write_str("the host dialled")?,
                }
                if !presented.is_empty() {
                    write!(f, ", only for {}", presented.join(", "))?;
                }
                Ok(())
            }
            TlsFailure::NotValidNow(what) => write!(f, "certificate not valid now: {what}"),
            TlsFailure::PinMismatch { actual } => write!(
                f,
                "certificate pin mismatch: the server's public key is {actual}, not one of the pinned keys"
            ),
            TlsFailure::AlertReceived(alert) => {
                write!(f, "the server refused the TLS handshake (alert {alert})")
            }
            TlsFailure::NotTls => {
                f.write_str("the server did not answer with TLS (is it a plain-text port?)")
            }
            TlsFailure::Other(e) => write!(f, "TLS error: {e}"),
        }
    }
}

impl TlsFailure {
    /// Classifies a rustls error.
    pub fn from_rustls(e: &rustls::Error) -> Self {
        match e {
            rustls::Error::InvalidCertificate(c) => match c {
                CertificateError::UnknownIssuer => TlsFailure::UnknownIssuer,
                CertificateError::NotValidForName => TlsFailure::NameMismatch {
                    expected: None,
                    presented: vec![],
                },
                CertificateError::NotValidForNameContext {
                    expected,
                    presented,
                } => TlsFailure::NameMismatch {
                    expected: Some(expected.to_str().into_owned()),
                    presented: presented.iter().map(|p| unwrap_name(p)).collect(),
                },
                CertificateError::Expired
                | CertificateError::ExpiredContext { .. }
                | CertificateError::NotValidYet
                | CertificateError::NotValidYetContext { .. } => {
                    TlsFailure::NotValidNow(format!("{c:?}"))
                }
                CertificateError::Other(OtherError(inner)) => {
                    match inner.downcast_ref::<PinMismatch>() {
                        Some(m) => TlsFailure::PinMismatch {
                            actual: m.actual.to_string(),
                        },
                        None => TlsFailure::Other(e.to_string()),
                    }
                }
                _ => TlsFailure::Other(e.to_string()),
            },
            rustls::Error::AlertReceived(alert) => TlsFailure::AlertReceived(format!("{alert:?}")),
            rustls::Error::InvalidMessage(_) => TlsFailure::NotTls,
            other => TlsFailure::Other(other.to_string()),
        }
    }

    /// Finds a rustls error in `e` or its sources (looking inside `std::io::Error`s, whose
    /// `source` skips the wrapped error) and classifies it; `None` if the failure was not
    /// a TLS one.
    pub fn find(e: &(dyn std::error::Error + 'static)) -> Option<Self> {
        let mut next: Option<&(dyn std::error::Error + 'static)> = Some(e);
        // Bounded: a malicious or cyclic chain must not loop forever.
        for _ in 0..16 {
            let cur = next?;
            if let Some(r) = cur.downcast_ref::<rustls::Error>() {
                return Some(Self::from_rustls(r));
            }
            next = match cur.downcast_ref::<std::io::Error>() {
                Some(io) => match io.get_ref() {
                    Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
                    None => None,
                },
                None => cur.source(),
            };
        }
        None
    }
}

/// rustls describes presented names as `DnsName("gw.example")` or `IpAddress(..)`; an
/// operator wants the name alone.
fn unwrap_name(presented: &str) -> String {
    presented
        .split_once("(\"")
        .and_then(|(_, rest)| rest.strip_suffix("\")"))
        .or_else(|| {
            presented
                .strip_prefix("IpAddress(")
                .and_then(|rest| rest.strip_suffix(')'))
        })
        .unwrap_or(presented)
        .to_owned()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn pins_parse_in_hex_and_base64() {
        let bytes: [u8; 32] = std::array::from_fn(|i| (i * 7) as u8);
        let pin = SpkiPin(bytes);
        for text in [
            pin.to_hex(),
            pin.to_hex().to_uppercase(),
            pin.to_base64(),
            pin.to_base64().trim_end_matches('=').to_owned(),
            pin.to_string(),
            format!("sha256//{}", pin.to_base64()),
            format!(" {} ", pin.to_hex()),
        ] {
            assert_eq!(text.parse::<SpkiPin>().unwrap(), pin, "{text}");
        }
        let colons = bytes
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect::<Vec<_>>()
            .join(":");
        assert_eq!(colons.parse::<SpkiPin>().unwrap(), pin);
        for bad in [
            "",
            "abc",
            "zz",
            &pin.to_hex()[..62],
            "sha256/",
            "sha256//",
            "AAAA",
        ] {
            assert!(bad.parse::<SpkiPin>().is_err(), "{bad:?}");
        }
    }

    /// One key in 64 has a base64 pin that starts with `/`; in our `sha256/` form that reads
    /// like curl's `sha256//` prefix and was refused before (seen in CI).
    #[test]
    fn a_base64_pin_that_starts_with_a_slash_parses_in_every_form() {
        let bytes: [u8; 32] = std::array::from_fn(|i| if i == 0 { 0xfc } else { i as u8 });
        let pin = SpkiPin(bytes);
        assert!(pin.to_base64().starts_with('/'), "{}", pin.to_base64());
        for text in [
            pin.to_string(),
            format!("sha256//{}", pin.to_base64()),
            pin.to_base64(),
            pin.to_base64().trim_end_matches('=').to_owned(),
        ] {
            assert_eq!(text.parse::<SpkiPin>().unwrap(), pin, "{text}");
        }
    }

    #[test]
    fn presented_names_are_shown_bare() {
        assert_eq!(unwrap_name("DnsName(\"gw.example\")"), "gw.example");
        assert_eq!(unwrap_name("IpAddress(1.2.3.4)"), "1.2.3.4");
        assert_eq!(unwrap_name("other"), "other");
    }

    #[test]
    fn der_walk_refuses_garbage_without_panicking() {
        for input in [
            &[][..],
            &[0x30],
            &[0x30, 0x82, 0xff],
            &[0x30, 0x03, 0x30, 0x01, 0x00],
            &[0x30, 0x85, 1, 1, 1, 1, 1],
            &[0x1f, 0x00],
        ] {
            assert!(spki_of_certificate(input).is_none());
        }
    }
}
