//! Test-only TLS: a throwaway certificate authority, server certificates it signs (for
//! `localhost`, `127.0.0.1` and `::1` by default), and a TLS-terminating TCP proxy that
//! pipes the decrypted bytes to a plain upstream address.
//!
//! The proxy stands in for TLS termination in front of a service that speaks plain TCP (the
//! gateway, an OTLP receiver), so clients can be tested over real TLS against the real
//! service. It counts completed and failed handshakes, so a test can show that a client
//! that refused the server's certificate never got through to the upstream.
//!
//! Certificates are generated with `rcgen` and served with rustls on the `ring` provider,
//! the same provider the services use. Pins are computed here independently of the
//! services' own code (SHA-256 over the DER SubjectPublicKeyInfo rcgen reports).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData as _,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// A throwaway CA that signs server certificates.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa").finish_non_exhaustive()
    }
}

impl TestCa {
    /// A new CA with common name `name` and a fresh key.
    pub fn new(name: &str) -> TestCa {
        let mut params =
            CertificateParams::new(Vec::new()).unwrap_or_else(|e| panic!("CA parameters: {e}"));
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().unwrap_or_else(|e| panic!("CA key: {e}"));
        let cert = params
            .self_signed(&key)
            .unwrap_or_else(|e| panic!("CA certificate: {e}"));
        TestCa {
            issuer: Issuer::new(params, key),
            pem: cert.pem(),
        }
    }

    /// The CA certificate, PEM.
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// Writes the CA certificate (PEM) to `path` and returns it.
    pub fn write(&self, path: &Path) -> PathBuf {
        write(path, &self.pem)
    }

    /// A server certificate for `localhost`, `127.0.0.1` and `::1`.
    pub fn server_cert(&self) -> ServerCert {
        self.server_cert_for(&["localhost", "127.0.0.1", "::1"])
    }

    /// A server certificate for `names` (DNS names or IP addresses), with a fresh key.
    pub fn server_cert_for(&self, names: &[&str]) -> ServerCert {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params =
            CertificateParams::new(names).unwrap_or_else(|e| panic!("server parameters: {e}"));
        params
            .distinguished_name
            .push(DnType::CommonName, "test server");
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().unwrap_or_else(|e| panic!("server key: {e}"));
        let cert = params
            .signed_by(&key, &self.issuer)
            .unwrap_or_else(|e| panic!("server certificate: {e}"));
        let digest = ring::digest::digest(&ring::digest::SHA256, &key.subject_public_key_info());
        let mut pin = [0u8; 32];
        pin.copy_from_slice(digest.as_ref());
        ServerCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            pin,
        }
    }
}

/// A server certificate and its private key.
#[derive(Debug, Clone)]
pub struct ServerCert {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The private key (PKCS#8), PEM.
    pub key_pem: String,
    pin: [u8; 32],
}

impl ServerCert {
    /// SHA-256 of the certificate's DER SubjectPublicKeyInfo, 64 lower-case hex digits.
    pub fn pin_hex(&self) -> String {
        self.pin.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The same pin in standard base64 (what the `openssl ... | base64` recipe prints).
    pub fn pin_base64(&self) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(self.pin)
    }

    /// Writes `<dir>/<name>.pem` and `<dir>/<name>.key` and returns their paths.
    pub fn write(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        (
            write(&dir.join(format!("{name}.pem")), &self.cert_pem),
            write(&dir.join(format!("{name}.key")), &self.key_pem),
        )
    }

    /// A rustls server configuration (ring provider) presenting this certificate.
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        let cert = CertificateDer::from_pem_slice(self.cert_pem.as_bytes())
            .unwrap_or_else(|e| panic!("certificate PEM: {e}"));
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes())
            .unwrap_or_else(|e| panic!("key PEM: {e}"));
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap_or_else(|e| panic!("TLS versions: {e}"))
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .unwrap_or_else(|e| panic!("server certificate: {e}"));
        Arc::new(config)
    }
}

fn write(path: &Path, text: &str) -> PathBuf {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    path.to_path_buf()
}

/// A TLS-terminating TCP proxy on a free loopback port; stops (with every connection it
/// carries) when dropped.
#[derive(Debug)]
pub struct TlsProxy {
    addr: SocketAddr,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TlsProxy {
    /// Accepts TLS with `cert` and pipes each connection's plaintext to `upstream` (call
    /// inside a tokio runtime).
    pub async fn start(cert: &ServerCert, upstream: SocketAddr) -> std::io::Result<TlsProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let acceptor = tokio_rustls::TlsAcceptor::from(cert.server_config());
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let (ok_count, failed_count) = (Arc::clone(&ok), Arc::clone(&failed));
        let task = tokio::spawn(async move {
            // Connection tasks live in the set, so aborting the accept loop ends them too.
            let mut connections = JoinSet::new();
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    Some(_) = connections.join_next(), if !connections.is_empty() => continue,
                };
                let Ok((tcp, _)) = accepted else { continue };
                let acceptor = acceptor.clone();
                let (ok, failed) = (Arc::clone(&ok_count), Arc::clone(&failed_count));
                connections.spawn(async move {
                    let mut tls = match acceptor.accept(tcp).await {
                        Ok(tls) => {
                            ok.fetch_add(1, Ordering::SeqCst);
                            tls
                        }
                        Err(_) => {
                            failed.fetch_add(1, Ordering::SeqCst);
                            return;
                        }
                    };
                    let Ok(mut plain) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                });
            }
        });
        Ok(TlsProxy {
            addr,
            ok,
            failed,
            task,
        })
    }

    /// The proxy's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Handshakes completed so far (connections that reached the upstream).
    pub fn handshakes(&self) -> u64 {
        self.ok.load(Ordering::SeqCst)
    }

    /// Handshakes that failed (the client refused the certificate, or spoke no TLS).
    pub fn failed_handshakes(&self) -> u64 {
        self.failed.load(Ordering::SeqCst)
    }
}
