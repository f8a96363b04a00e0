//! A per-test CA and a server certificate for `127.0.0.1` and `localhost`, as PEM files.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tempfile::TempDir;

use super::{install_crypto_provider, temp_dir};

/// The test CA: its PEM is what berthd gets in `[registry] ca_files`.
#[derive(Debug)]
pub struct TestCa {
    ca_pem: String,
    ca_pem_path: PathBuf,
    server_cert_path: PathBuf,
    server_key_path: PathBuf,
    server_cert_der: CertificateDer<'static>,
    server_key_pkcs8: Vec<u8>,
    _dir: TempDir,
}

impl TestCa {
    /// A fresh CA, and a server certificate signed by it with SANs `127.0.0.1` (IP) and `localhost`.
    pub fn generate() -> anyhow::Result<Self> {
        install_crypto_provider();
        let dir = temp_dir("ca")?;

        let ca_key = KeyPair::generate().context("generating the CA key")?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "berth integration test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params
            .self_signed(&ca_key)
            .context("self-signing the CA")?;
        let issuer = Issuer::new(ca_params, ca_key);

        let server_key = KeyPair::generate().context("generating the server key")?;
        let mut server_params =
            CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])?;
        server_params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        server_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_cert = server_params
            .signed_by(&server_key, &issuer)
            .context("signing the server certificate")?;

        let ca_pem = ca_cert.pem();
        let ca_pem_path = dir.path().join("ca.pem");
        let server_cert_path = dir.path().join("server.pem");
        let server_key_path = dir.path().join("server-key.pem");
        write(&ca_pem_path, ca_pem.as_bytes())?;
        write(&server_cert_path, server_cert.pem().as_bytes())?;
        write(&server_key_path, server_key.serialize_pem().as_bytes())?;

        Ok(Self {
            ca_pem,
            ca_pem_path,
            server_cert_path,
            server_key_path,
            server_cert_der: server_cert.der().clone(),
            server_key_pkcs8: server_key.serialize_der(),
            _dir: dir,
        })
    }

    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    pub fn ca_pem_path(&self) -> &Path {
        &self.ca_pem_path
    }

    pub fn server_cert_path(&self) -> &Path {
        &self.server_cert_path
    }

    pub fn server_key_path(&self) -> &Path {
        &self.server_key_path
    }

    /// A rustls server config presenting the server certificate (HTTP/2 and HTTP/1.1 by ALPN).
    pub fn rustls_server_config(&self) -> anyhow::Result<Arc<rustls::ServerConfig>> {
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.server_key_pkcs8.clone()));
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .context("choosing TLS versions")?
        .with_no_client_auth()
        .with_single_cert(vec![self.server_cert_der.clone()], key)
        .context("building the TLS server config")?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// A reqwest client that trusts only this CA and follows no redirect.
    pub fn http_client(&self) -> anyhow::Result<reqwest::Client> {
        install_crypto_provider();
        let certificate = reqwest::Certificate::from_pem(self.ca_pem.as_bytes())
            .context("parsing the CA certificate")?;
        reqwest::Client::builder()
            .tls_certs_only([certificate])
            .redirect(reqwest::redirect::Policy::none())
            .timeout(std::time::Duration::from_secs(30))
            .build()
            .context("building an HTTP client that trusts the test CA")
    }
}

fn write(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    std::fs::write(path, contents).with_context(|| format!("writing {}", path.display()))
}
