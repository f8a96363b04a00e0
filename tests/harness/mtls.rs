//! A second per-test PKI for what the test CA's one server certificate (`127.0.0.1`,
//! `localhost`) cannot cover: servers on other addresses (127.0.0.2, the host's own address),
//! berthd's mTLS listener, and client certificates whose identity is a DNS SAN, a URI SAN or only
//! a CN; plus tonic clients that speak mTLS to berthd.
//!
//! berthd trusts this CA when a test puts [`TestPki::ca_pem_path`] in
//! `BerthdOptions::extra_ca_files` (registries, realms, redirect targets) or names it as
//! `tls_client_ca` (its API clients).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tempfile::TempDir;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::{install_crypto_provider, temp_dir};

/// The name a client certificate carries.
#[derive(Debug, Clone, Copy)]
pub enum ClientName<'a> {
    /// A DNS SAN (and the same CN).
    Dns(&'a str),
    /// A URI SAN such as `spiffe://fleet/b` (CN `uri-client`).
    Uri(&'a str),
    /// No SAN at all, only this CN.
    CommonNameOnly(&'a str),
}

/// One certificate and its key, as PEM files and DER.
#[derive(Debug)]
pub struct IssuedCert {
    pub cert_pem: String,
    pub key_pem: String,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    cert_der: CertificateDer<'static>,
    key_pkcs8: Vec<u8>,
}

impl IssuedCert {
    /// A rustls server config presenting this certificate (HTTP/2 and HTTP/1.1 by ALPN).
    pub fn rustls_server_config(&self) -> anyhow::Result<Arc<rustls::ServerConfig>> {
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_pkcs8.clone()));
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .context("choosing TLS versions")?
        .with_no_client_auth()
        .with_single_cert(vec![self.cert_der.clone()], key)
        .context("building the TLS server config")?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

/// The CA, and the dir its certificates are written to.
pub struct TestPki {
    ca_pem: String,
    ca_pem_path: PathBuf,
    issuer: Issuer<'static, KeyPair>,
    dir: TempDir,
}

impl std::fmt::Debug for TestPki {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("TestPki")
            .field("ca_pem_path", &self.ca_pem_path)
            .finish_non_exhaustive()
    }
}

impl TestPki {
    pub fn generate() -> anyhow::Result<Self> {
        install_crypto_provider();
        let dir = temp_dir("pki")?;
        let ca_key = KeyPair::generate().context("generating the CA key")?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, "berth security test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = params.self_signed(&ca_key).context("self-signing the CA")?;
        let ca_pem = ca_cert.pem();
        let ca_pem_path = dir.path().join("pki-ca.pem");
        write(&ca_pem_path, ca_pem.as_bytes())?;
        Ok(Self {
            ca_pem,
            ca_pem_path,
            issuer: Issuer::new(params, ca_key),
            dir,
        })
    }

    pub fn ca_pem_path(&self) -> &Path {
        &self.ca_pem_path
    }

    /// A server certificate for these IP addresses and `localhost`, saved as `<file>.pem` and
    /// `<file>-key.pem`.
    pub fn server(&self, file: &str, ips: &[IpAddr]) -> anyhow::Result<IssuedCert> {
        self.server_named(file, &[], ips)
    }

    /// A server certificate for these DNS names, IP addresses and `localhost`.
    pub fn server_named(
        &self,
        file: &str,
        names: &[&str],
        ips: &[IpAddr],
    ) -> anyhow::Result<IssuedCert> {
        let mut dns_names = vec!["localhost".to_owned()];
        dns_names.extend(names.iter().map(|name| (*name).to_owned()));
        let mut params = CertificateParams::new(dns_names)?;
        params
            .subject_alt_names
            .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        params
            .distinguished_name
            .push(DnType::CommonName, "berth test server");
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(file, params)
    }

    /// A client certificate carrying `name`.
    pub fn client(&self, file: &str, name: ClientName<'_>) -> anyhow::Result<IssuedCert> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        match name {
            ClientName::Dns(dns) => {
                params
                    .subject_alt_names
                    .push(SanType::DnsName(dns.try_into()?));
                params.distinguished_name.push(DnType::CommonName, dns);
            }
            ClientName::Uri(uri) => {
                params.subject_alt_names.push(SanType::URI(uri.try_into()?));
                params
                    .distinguished_name
                    .push(DnType::CommonName, "uri-client");
            }
            ClientName::CommonNameOnly(cn) => {
                params.distinguished_name.push(DnType::CommonName, cn);
            }
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(file, params)
    }

    fn issue(&self, file: &str, params: CertificateParams) -> anyhow::Result<IssuedCert> {
        let key = KeyPair::generate().context("generating a key")?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .with_context(|| format!("signing the certificate {file}"))?;
        let cert_path = self.dir.path().join(format!("{file}.pem"));
        let key_path = self.dir.path().join(format!("{file}-key.pem"));
        let cert_pem = cert.pem();
        let key_pem = key.serialize_pem();
        write(&cert_path, cert_pem.as_bytes())?;
        write(&key_path, key_pem.as_bytes())?;
        std::fs::set_permissions(
            &key_path,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .with_context(|| format!("chmod 0600 {}", key_path.display()))?;
        Ok(IssuedCert {
            cert_pem,
            key_pem,
            cert_path,
            key_path,
            cert_der: cert.der().clone(),
            key_pkcs8: key.serialize_der(),
        })
    }

    /// A rustls client config trusting this CA and presenting `client`, offering only h2: for
    /// tests that write HTTP/2 frames themselves.
    pub fn rustls_client_config(
        &self,
        client: &IssuedCert,
    ) -> anyhow::Result<Arc<rustls::ClientConfig>> {
        use rustls::pki_types::pem::PemObject as _;
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(self.ca_pem.as_bytes()).context("parsing the CA")?)
            .context("trusting the CA")?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(client.key_pkcs8.clone()));
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .context("choosing TLS versions")?
        .with_root_certificates(roots)
        .with_client_auth_cert(vec![client.cert_der.clone()], key)
        .context("building the TLS client config")?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }

    /// A gRPC channel to berthd's mTLS listener at `addr` (its certificate must be one of this
    /// CA's server certificates), presenting `client` when given. Connected now: an `Err` may
    /// mean the server refused the handshake.
    pub async fn channel(
        &self,
        addr: SocketAddr,
        client: Option<&IssuedCert>,
    ) -> anyhow::Result<Channel> {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .domain_name("localhost");
        if let Some(client) = client {
            tls = tls.identity(Identity::from_pem(&client.cert_pem, &client.key_pem));
        }
        Endpoint::from_shared(format!("https://{addr}"))?
            .tls_config(tls)
            .context("configuring client TLS")?
            .connect_timeout(std::time::Duration::from_secs(10))
            .timeout(std::time::Duration::from_secs(120))
            .connect()
            .await
            .with_context(|| format!("connecting to https://{addr} over mTLS"))
    }
}

fn write(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    std::fs::write(path, contents).with_context(|| format!("writing {}", path.display()))
}
