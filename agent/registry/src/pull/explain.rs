//! ExplainPull's share of the pull path: mirrors in order, then the registry, each asked for
//! the manifest only (index → this host's platform), the blobs looked up in containerd, the
//! signature policy checked. Nothing is fetched beyond manifests and signatures, nothing
//! written.

use super::mirror::falls_back;
use super::registry::Session;
use super::signature::Subject;
use super::{resolve_manifest, retry, PullError, Puller};
use crate::auth::{OrderCredential, WireAuth};
use berth_core::order::ImageRef;

/// Where and what a pull would resolve to.
#[derive(Debug, Clone)]
pub struct Resolution {
    /// The endpoint that answered: a mirror's URL or `https://<registry>`.
    pub endpoint: String,
    /// Its host and whether it is spoken to over plain HTTP.
    pub host: String,
    pub plain_http: bool,
    pub manifest_digest: String,
    /// Config and layers the content store lacks.
    pub bytes_to_fetch: u64,
    /// The matching policy's first pattern, or "".
    pub policy: String,
    /// "verified", "not required", or why the policy would refuse it.
    pub signature: String,
}

impl Puller {
    /// The first mirror that resolves `image`, as a pull tries them; None when none does (or
    /// none is configured, or the secret is for another server).
    pub async fn explain_mirrors(
        &self,
        image: &ImageRef,
        project: &str,
        credential: OrderCredential<'_>,
    ) -> Result<Option<Resolution>, PullError> {
        if !credential.fits(image.registry()) {
            return Ok(None);
        }
        for mirror in self.mirrors_for(image) {
            let (auth, secret_id) = credential.for_mirror(mirror.credentials);
            let attempt = async {
                let session = Session::open_mirror(
                    &self.http,
                    &self.authenticator,
                    image,
                    &mirror.endpoint,
                    auth,
                    secret_id.as_deref(),
                )
                .await?;
                self.resolve(
                    image,
                    project,
                    &session,
                    1,
                    (
                        mirror.endpoint.to_string(),
                        mirror.endpoint.host().to_owned(),
                        mirror.endpoint.plain_http(),
                    ),
                )
                .await
            };
            match attempt.await {
                Ok(resolution) => return Ok(Some(resolution)),
                Err(err) if falls_back(&err) => continue,
                Err(err) => return Err(err),
            }
        }
        Ok(None)
    }

    /// `image` resolved at its own registry with `auth`.
    pub async fn explain_upstream(
        &self,
        image: &ImageRef,
        project: &str,
        auth: WireAuth,
        secret_id: Option<&str>,
    ) -> Result<Resolution, PullError> {
        let attempts = self.settings.retries;
        let session = retry(attempts, || {
            Session::open(
                &self.settings,
                &self.http,
                &self.authenticator,
                image,
                auth.clone(),
                secret_id,
            )
        })
        .await?;
        let host = image.registry().to_owned();
        let plain_http = self.settings.plain_http.iter().any(|plain| plain == &host);
        let scheme = if plain_http { "http" } else { "https" };
        let endpoint_host = if host == "docker.io" {
            "registry-1.docker.io"
        } else {
            host.as_str()
        };
        let endpoint = format!("{scheme}://{endpoint_host}");
        self.resolve(
            image,
            project,
            &session,
            attempts,
            (endpoint, host, plain_http),
        )
        .await
    }

    async fn resolve(
        &self,
        image: &ImageRef,
        project: &str,
        session: &Session,
        attempts: u32,
        (endpoint, host, plain_http): (String, String, bool),
    ) -> Result<Resolution, PullError> {
        let resolved = resolve_manifest(image, session, attempts).await?;
        let index_digest = resolved.index.map(|_| resolved.top_digest);
        let (manifest_digest, manifest) = (resolved.manifest_digest, resolved.manifest);
        let mut bytes_to_fetch = 0;
        for descriptor in std::iter::once(&manifest.config).chain(&manifest.layers) {
            let present = self
                .containerd
                .has_blob(&descriptor.digest)
                .await
                .map_err(|source| PullError::Containerd {
                    image: image.to_string(),
                    source,
                })?;
            if !present {
                bytes_to_fetch += descriptor.size;
            }
        }
        let policy = self
            .signatures
            .policy_pattern(image, project)
            .unwrap_or_default();
        let signature = match self
            .signatures
            .check(
                session,
                image,
                project,
                Subject {
                    manifest_digest: &manifest_digest,
                    index_digest: index_digest.as_deref(),
                },
                attempts,
            )
            .await
        {
            Ok(status) => status.as_str().to_owned(),
            // What the refusal says: the word signature, the digest and the policy.
            Err(refused @ PullError::Signature { .. }) => refused.to_string(),
            Err(err) => return Err(err),
        };
        Ok(Resolution {
            endpoint,
            host,
            plain_http,
            manifest_digest,
            bytes_to_fetch,
            policy,
            signature,
        })
    }
}
