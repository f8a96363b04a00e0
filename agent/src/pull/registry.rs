//! The distribution protocol, through oci-client: authenticate once per pull, fetch manifests
//! (digest-checked by oci-client and again here) and stream blobs.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::stream::BoxStream;
use oci_client::client::{
    BlobResponse, Certificate, CertificateEncoding, ClientConfig, ClientProtocol,
};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};

use super::manifest::{self, Descriptor};
use super::PullError;
use crate::order::ImageRef;

/// Registry settings shared by every pull, from `[registry]`.
#[derive(Debug, Clone)]
pub(crate) struct RegistrySettings {
    pub(crate) plain_http: Vec<String>,
    /// PEM bundles trusted beside the system roots.
    pub(crate) ca_pems: Vec<Vec<u8>>,
    pub(crate) connect_timeout: Duration,
    pub(crate) read_timeout: Duration,
    pub(crate) max_concurrent_downloads: usize,
    /// Attempts per request (connection errors, timeouts, 429 and 5xx are retried).
    pub(crate) retries: u32,
}

/// One authenticated conversation with a registry about one repository.
#[derive(Clone)]
pub(crate) struct Session {
    client: Client,
    image: ImageRef,
    secret_id: Option<Arc<str>>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("image", &self.image)
            .field("secret_id", &self.secret_id)
            .finish_non_exhaustive()
    }
}

impl Session {
    /// Authenticates to the registry of `image` (Basic, or Basic to its Bearer token realm, as
    /// the registry's challenge decides).
    pub(crate) async fn open(
        settings: &RegistrySettings,
        image: &ImageRef,
        auth: RegistryAuth,
        secret_id: Option<&str>,
    ) -> Result<Self, PullError> {
        let config = ClientConfig {
            protocol: ClientProtocol::HttpsExcept(settings.plain_http.clone()),
            extra_root_certificates: settings
                .ca_pems
                .iter()
                .map(|pem| Certificate {
                    encoding: CertificateEncoding::Pem,
                    data: pem.clone(),
                })
                .collect(),
            platform_resolver: None,
            connect_timeout: Some(settings.connect_timeout),
            read_timeout: Some(settings.read_timeout),
            max_concurrent_download: settings.max_concurrent_downloads,
            user_agent: concat!("berth/", env!("CARGO_PKG_VERSION")),
            ..ClientConfig::default()
        };
        let client = Client::try_from(config).map_err(|source| PullError::Client { source })?;
        let session = Self {
            client,
            image: image.clone(),
            secret_id: secret_id.map(Arc::from),
        };
        session
            .client
            .auth(image.reference(), &auth, RegistryOperation::Pull)
            .await
            .map_err(|err| session.classify(err))?;
        Ok(session)
    }

    /// Fetches a manifest or index by tag or digest; returns its bytes and digest.
    pub(crate) async fn manifest(
        &self,
        reference: &Reference,
    ) -> Result<(Bytes, String), PullError> {
        let (body, digest) = self
            .client
            .pull_manifest_raw(reference, &RegistryAuth::Anonymous, manifest::ACCEPTED)
            .await
            .map_err(|err| self.classify(err))?;
        Ok((body, digest))
    }

    /// Opens the blob of `desc` from byte `offset` (not yet verified: the caller verifies).
    /// Returns the stream and whether it starts at `offset` (false: the registry ignored the
    /// Range and sends the whole blob).
    pub(crate) async fn blob(
        &self,
        desc: &Descriptor,
        offset: u64,
    ) -> Result<(BoxStream<'static, std::io::Result<Bytes>>, bool), PullError> {
        let layer = oci_client::manifest::OciDescriptor {
            media_type: desc.media_type.clone(),
            digest: desc.digest.clone(),
            size: i64::try_from(desc.size).unwrap_or(i64::MAX),
            urls: None,
            annotations: None,
            artifact_type: None,
        };
        let response = self
            .client
            .pull_blob_stream_partial(self.image.reference(), &layer, offset, None)
            .await
            .map_err(|err| self.classify(err))?;
        Ok(match response {
            BlobResponse::Full(sized) => (sized.stream, offset == 0),
            BlobResponse::Partial(sized) => (sized.stream, true),
        })
    }

    pub(crate) fn reference_with_digest(&self, digest: &str) -> Reference {
        let reference = self.image.reference();
        Reference::with_digest(
            reference.registry().to_owned(),
            reference.repository().to_owned(),
            digest.to_owned(),
        )
    }

    /// Maps an oci-client error onto what it means for the order. Registry error text is
    /// never copied into the message.
    pub(crate) fn classify(&self, err: OciDistributionError) -> PullError {
        let registry = self.image.registry().to_owned();
        let repository = self.image.repository().to_owned();
        let secret = self.secret_id.as_deref().map(str::to_owned);
        match &err {
            OciDistributionError::AuthenticationFailure(_)
            | OciDistributionError::UnauthorizedError { .. } => PullError::Denied {
                registry,
                repository,
                secret,
            },
            OciDistributionError::ImageManifestNotFoundError(_) => PullError::NotFound {
                image: self.image.to_string(),
            },
            OciDistributionError::RegistryError { envelope, .. } => {
                let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|e| &e.code).collect();
                if codes.iter().any(|c| {
                    matches!(
                        c,
                        OciErrorCode::ManifestUnknown
                            | OciErrorCode::NameUnknown
                            | OciErrorCode::NotFound
                            | OciErrorCode::BlobUnknown
                    )
                }) {
                    PullError::NotFound {
                        image: self.image.to_string(),
                    }
                } else if codes
                    .iter()
                    .any(|c| matches!(c, OciErrorCode::Toomanyrequests))
                {
                    PullError::Unreachable {
                        registry,
                        source: Box::new(err),
                    }
                } else if codes
                    .iter()
                    .any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied))
                {
                    PullError::Denied {
                        registry,
                        repository,
                        secret,
                    }
                } else {
                    PullError::Registry {
                        registry,
                        repository,
                        source: err,
                    }
                }
            }
            OciDistributionError::ServerError { code, .. } if *code == 404 => PullError::NotFound {
                image: self.image.to_string(),
            },
            OciDistributionError::ServerError { code, .. } if *code == 403 => PullError::Denied {
                registry,
                repository,
                secret,
            },
            OciDistributionError::ServerError { code, .. } if *code >= 500 || *code == 429 => {
                PullError::Unreachable {
                    registry,
                    source: Box::new(err),
                }
            }
            OciDistributionError::RequestError(inner)
                if inner.is_connect() || inner.is_timeout() =>
            {
                PullError::Unreachable {
                    registry,
                    source: Box::new(err),
                }
            }
            OciDistributionError::DigestError(_) => PullError::Mismatch {
                image: self.image.to_string(),
                source: super::verify::Mismatch::Digest {
                    digest: self
                        .image
                        .reference()
                        .digest()
                        .unwrap_or("manifest")
                        .to_owned(),
                    actual: "another digest".to_owned(),
                },
            },
            _ => PullError::Registry {
                registry,
                repository,
                source: err,
            },
        }
    }
}
