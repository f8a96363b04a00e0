//! The distribution protocol: `auth` answers the registry's challenge once per pull; berth
//! then fetches manifests (capped at 4 MiB, digest-checked) and streams blobs itself, so that
//! it controls redirects (never https -> http, never Authorization to another host).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{StreamExt as _, TryStreamExt as _};
use oci_client::Reference;
use sha2::{Digest as _, Sha256};

use super::manifest::{self, Descriptor};
use super::verify::Mismatch;
use super::PullError;
use crate::auth::{Authenticator, WireAuth};
use berth_core::order::ImageRef;

/// Registry settings shared by every pull, from `[registry]`.
#[derive(Debug, Clone)]
pub struct RegistrySettings {
    pub plain_http: Vec<String>,
    /// PEM bundles trusted beside the system roots.
    pub ca_pems: Vec<Vec<u8>>,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub max_concurrent_downloads: usize,
    /// Attempts per request (connection errors, timeouts, 429 and 5xx are retried).
    pub retries: u32,
    /// A blob download that receives no byte for this long is cut and resumed; None = off.
    pub stall_timeout: Option<Duration>,
    /// Download bandwidth of all pulls together; 0 = no limit.
    pub max_bytes_per_second: u64,
    /// `[[registry.mirror]]`, in file order.
    pub mirrors: Vec<berth_core::host::Mirror>,
}

/// Largest manifest or index berth reads (distribution caps pushes at 4 MiB too).
const MAX_MANIFEST: usize = 4 << 20;

impl RegistrySettings {
    /// The HTTP client for manifests and blobs: the configured CAs beside the system roots,
    /// connect/read timeouts, no automatic decompression, and a redirect policy that refuses
    /// https -> http. reqwest drops Authorization (and cookies) on every hop to another host
    /// or port, so blob-storage redirect targets never see a credential.
    pub fn http_client(&self) -> Result<reqwest::Client, PullError> {
        let mut certificates = Vec::new();
        for pem in &self.ca_pems {
            certificates.extend(
                reqwest::Certificate::from_pem_bundle(pem).map_err(|source| PullError::Client {
                    source: Box::new(source),
                })?,
            );
        }
        let policy = reqwest::redirect::Policy::custom(|attempt| {
            let downgrade = attempt.url().scheme() == "http"
                && attempt.previous().iter().any(|url| url.scheme() == "https");
            if downgrade {
                attempt.error("refusing a redirect from https to http")
            } else if attempt.previous().len() > 10 {
                attempt.error("too many redirects")
            } else {
                attempt.follow()
            }
        });
        reqwest::Client::builder()
            .redirect(policy)
            .tls_certs_merge(certificates)
            .connect_timeout(self.connect_timeout)
            .read_timeout(self.read_timeout)
            .user_agent(concat!("berth/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|source| PullError::Client {
                source: Box::new(source),
            })
    }
}

/// Where a session's requests go.
struct Target {
    /// Registry host and repository as the host knows them.
    reference: Reference,
    /// `host[:port]`, named in errors.
    host: String,
    plain_http: bool,
}

/// A `Retry-After` given in seconds (the HTTP-date form is ignored), at most a minute.
fn retry_after(response: &reqwest::Response) -> Option<std::time::Duration> {
    let seconds: u64 = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(std::time::Duration::from_secs(seconds.min(60)))
}

/// One authenticated conversation with a registry about one repository.
#[derive(Clone)]
pub struct Session {
    http: reqwest::Client,
    /// `<scheme>://<host>/v2/<repository>`
    base: String,
    /// What each request is authorized with; it becomes a header only as a request is built.
    auth: Arc<WireAuth>,
    image: ImageRef,
    /// The host spoken to, named in errors: the image's registry, or a mirror of it.
    host: Arc<str>,
    secret_id: Option<Arc<str>>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("base", &self.base)
            .field("image", &self.image)
            .field("host", &self.host)
            .field("secret_id", &self.secret_id)
            .finish_non_exhaustive()
    }
}

impl Session {
    /// Authenticates to the registry of `image` as its challenge asks (a Bearer grant is used as is; Basic goes to the registry or its token realm, as the
    /// registry's challenge decides; anonymous gets an anonymous token where one is needed).
    pub async fn open(
        settings: &RegistrySettings,
        http: &reqwest::Client,
        authenticator: &Authenticator,
        image: &ImageRef,
        auth: WireAuth,
        secret_id: Option<&str>,
    ) -> Result<Self, PullError> {
        let plain_http = settings
            .plain_http
            .iter()
            .any(|host| host == image.registry());
        let target = Target {
            reference: image.reference().clone(),
            host: image.registry().to_owned(),
            plain_http,
        };
        Self::open_at(
            http,
            authenticator,
            image,
            target,
            auth,
            secret_id,
            settings.retries,
        )
        .await
    }

    /// Like [`Self::open`], but speaks to a mirror of the image's registry: `endpoint`'s host,
    /// with its path prefix before the repository. Errors name the mirror.
    pub async fn open_mirror(
        http: &reqwest::Client,
        authenticator: &Authenticator,
        image: &ImageRef,
        endpoint: &berth_core::host::Endpoint,
        auth: WireAuth,
        secret_id: Option<&str>,
    ) -> Result<Self, PullError> {
        let target = Target {
            reference: Reference::with_tag(
                endpoint.host().to_owned(),
                endpoint.repository(image.repository()),
                "latest".to_owned(),
            ),
            host: endpoint.host().to_owned(),
            plain_http: endpoint.plain_http(),
        };
        // One attempt: a failing mirror hands over to the next source.
        Self::open_at(http, authenticator, image, target, auth, secret_id, 1).await
    }

    async fn open_at(
        http: &reqwest::Client,
        authenticator: &Authenticator,
        image: &ImageRef,
        target: Target,
        auth: WireAuth,
        secret_id: Option<&str>,
        attempts: u32,
    ) -> Result<Self, PullError> {
        let registry = target.reference.resolve_registry();
        let scheme = if target.plain_http { "http" } else { "https" };
        let mut session = Self {
            http: http.clone(),
            base: format!("{scheme}://{registry}/v2/{}", target.reference.repository()),
            auth: Arc::default(),
            image: image.clone(),
            host: Arc::from(target.host.as_str()),
            secret_id: secret_id.map(Arc::from),
        };
        let own_registry = target.host == image.registry();
        // The Authenticator's answer to this registry's challenge is kept; a mirror, or an
        // anonymous request, answers that host's own challenge, after the same realm checks.
        let auth = authenticator
            .session_auth(
                auth,
                own_registry,
                &target.host,
                target.plain_http,
                target.reference.repository(),
                attempts,
            )
            .await
            .map_err(PullError::Auth)?;
        session.auth = Arc::new(auth);
        Ok(session)
    }

    fn get(&self, url: &str) -> reqwest::RequestBuilder {
        self.authorize(self.http.get(url))
    }

    /// Adds the session's Authorization header (sensitive), if it has one. reqwest drops it on
    /// a redirect to another host or port.
    fn authorize(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match self.auth.header() {
            Some(value) => request.header(reqwest::header::AUTHORIZATION, value),
            None => request,
        }
    }

    /// Fetches a manifest or index by tag or digest (at most 4 MiB); returns its bytes and
    /// digest, checked against the reference's digest and the registry's digest header, and
    /// its body `mediaType` against the `Content-Type` (CVE-2021-41190).
    pub async fn manifest(&self, reference: &Reference) -> Result<(Bytes, String), PullError> {
        let tag_or_digest = reference.digest().or(reference.tag()).unwrap_or("latest");
        let url = format!("{}/manifests/{tag_or_digest}", self.base);
        let response = self
            .get(&url)
            .header(reqwest::header::ACCEPT, manifest::ACCEPTED.join(", "))
            .send()
            .await
            .map_err(|err| self.unreachable(err))?;
        let response = self.check_status(response)?;
        let content_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or_default().trim().to_owned());
        let header_digest = response
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = self.read_capped(response, MAX_MANIFEST).await?;
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(&body)));
        let mismatch = |expected: &str| PullError::Mismatch {
            image: self.image.to_string(),
            source: Mismatch::Digest {
                digest: expected.to_owned(),
                actual: digest.clone(),
            },
        };
        if let Some(expected) = reference.digest() {
            if expected != digest {
                return Err(mismatch(expected));
            }
        }
        if let Some(expected) = header_digest
            .as_deref()
            .filter(|d| d.starts_with("sha256:"))
        {
            if expected != digest {
                return Err(mismatch(expected));
            }
        }
        manifest::check_content_type(&body, content_type.as_deref()).map_err(|reason| {
            PullError::Unsupported {
                image: self.image.to_string(),
                reason,
            }
        })?;
        Ok((body, digest))
    }

    /// Whether the registry serves the manifest `digest` to this session (a HEAD request,
    /// which Docker Hub does not count against its pull limit).
    pub async fn head_manifest(&self, digest: &str) -> Result<(), PullError> {
        let url = format!("{}/manifests/{digest}", self.base);
        let response = self
            .authorize(self.http.head(&url))
            .header(reqwest::header::ACCEPT, manifest::ACCEPTED.join(", "))
            .send()
            .await
            .map_err(|err| self.unreachable(err))?;
        self.check_status(response).map(|_| ())
    }

    /// The OCI 1.1 referrers of `digest` (an image index listing them), or None when the
    /// registry has no referrers API (404, as distribution 2.8 answers). Capped at 4 MiB.
    pub async fn referrers(&self, digest: &str) -> Result<Option<Bytes>, PullError> {
        let url = format!("{}/referrers/{digest}", self.base);
        let response = self
            .get(&url)
            .header(reqwest::header::ACCEPT, manifest::OCI_INDEX)
            .send()
            .await
            .map_err(|err| self.unreachable(err))?;
        if response.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let response = self.check_status(response)?;
        let content_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or_default().trim().to_owned());
        if content_type.as_deref() != Some(manifest::OCI_INDEX) {
            // Some registries answer unknown routes with a page of their own: no referrers API.
            return Ok(None);
        }
        self.read_capped(response, MAX_MANIFEST).await.map(Some)
    }

    /// A small blob (a signature payload or bundle), read whole (at most `limit` bytes) and
    /// checked against `desc`.
    pub async fn small_blob(&self, desc: &Descriptor, limit: u64) -> Result<Bytes, PullError> {
        let unsupported = PullError::Unsupported {
            image: self.image.to_string(),
            reason: manifest::ManifestError("a signature blob is larger than berth reads"),
        };
        if desc.size > limit {
            return Err(unsupported);
        }
        manifest::check_digest(&desc.digest).map_err(|reason| PullError::Unsupported {
            image: self.image.to_string(),
            reason,
        })?;
        let url = format!("{}/blobs/{}", self.base, desc.digest);
        let response = self
            .get(&url)
            .send()
            .await
            .map_err(|err| self.unreachable(err))?;
        let response = self.check_status(response)?;
        let body = self
            .read_capped(response, usize::try_from(limit).unwrap_or(usize::MAX))
            .await?;
        super::verify::verify_bytes(&desc.digest, Some(desc.size), &body).map_err(|source| {
            PullError::Mismatch {
                image: self.image.to_string(),
                source,
            }
        })?;
        Ok(body)
    }

    /// A reference to `tag` in this session's repository.
    pub fn reference_with_tag(&self, tag: &str) -> Reference {
        let reference = self.image.reference();
        Reference::with_tag(
            reference.registry().to_owned(),
            reference.repository().to_owned(),
            tag.to_owned(),
        )
    }

    /// Opens the blob of `desc` from byte `offset` (not yet verified: the caller verifies).
    /// Returns the stream and whether it starts at `offset` (false: the registry ignored the
    /// Range and sends the whole blob).
    pub async fn blob(
        &self,
        desc: &Descriptor,
        offset: u64,
    ) -> Result<(BoxStream<'static, std::io::Result<Bytes>>, bool), PullError> {
        let url = format!("{}/blobs/{}", self.base, desc.digest);
        let mut request = self.get(&url);
        if offset > 0 {
            request = request.header(reqwest::header::RANGE, format!("bytes={offset}-"));
        }
        let response = request.send().await.map_err(|err| self.unreachable(err))?;
        let response = self.check_status(response)?;
        let from_offset = offset == 0 || response.status() == reqwest::StatusCode::PARTIAL_CONTENT;
        let stream = response.bytes_stream().map_err(std::io::Error::other);
        Ok((Box::pin(stream), from_offset))
    }

    /// Reads a body, refusing more than `limit` bytes.
    async fn read_capped(
        &self,
        response: reqwest::Response,
        limit: usize,
    ) -> Result<Bytes, PullError> {
        let mut body = bytes::BytesMut::new();
        let mut stream = response.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|err| self.unreachable(err))?;
            if body.len() + chunk.len() > limit {
                return Err(PullError::Unsupported {
                    image: self.image.to_string(),
                    reason: manifest::ManifestError("manifest larger than 4 MiB"),
                });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body.freeze())
    }

    /// Success, or what the status means for the order.
    fn check_status(&self, response: reqwest::Response) -> Result<reqwest::Response, PullError> {
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let registry = self.host.to_string();
        let repository = self.image.repository().to_owned();
        Err(match status.as_u16() {
            401 | 403 => PullError::Denied {
                registry,
                repository,
                secret: self.secret_id.as_deref().map(str::to_owned),
            },
            404 => PullError::NotFound {
                image: self.image.to_string(),
            },
            429 | 503 if retry_after(&response).is_some() => PullError::Throttled {
                registry,
                retry_after: retry_after(&response).unwrap_or_default(),
            },
            429 | 500..=599 => PullError::Unreachable {
                registry,
                source: format!("the registry answered {status}").into(),
            },
            _ => PullError::Registry {
                registry,
                repository,
                source: format!("the registry answered {status}").into(),
            },
        })
    }

    fn unreachable(&self, err: reqwest::Error) -> PullError {
        if err.is_redirect() {
            // The redirect policy refused (https -> http, or too many hops): a policy refusal.
            return PullError::Unsupported {
                image: self.image.to_string(),
                reason: manifest::ManifestError(
                    "the registry redirected from https to plain http, or more than 10 times",
                ),
            };
        }
        PullError::Unreachable {
            registry: self.host.to_string(),
            source: Box::new(err),
        }
    }

    pub fn reference_with_digest(&self, digest: &str) -> Reference {
        let reference = self.image.reference();
        Reference::with_digest(
            reference.registry().to_owned(),
            reference.repository().to_owned(),
            digest.to_owned(),
        )
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use axum::extract::State;
    use axum::http::{HeaderMap, Uri};
    use axum::response::{IntoResponse, Redirect, Response};
    use secrecy::SecretString;

    use super::*;
    use crate::auth::AuthSettings;

    /// What a fake server saw: (path, Authorization header) per request.
    type Seen = Arc<Mutex<Vec<(String, Option<String>)>>>;

    /// A loopback HTTP server that records each request and answers with `answer(path)`.
    async fn server(
        answer: impl Fn(&str) -> Response + Clone + Send + Sync + 'static,
    ) -> (String, Seen) {
        let seen = Seen::default();
        let app = axum::Router::new()
            .fallback(
                move |State(seen): State<Seen>, uri: Uri, headers: HeaderMap| async move {
                    let authorization = headers
                        .get(reqwest::header::AUTHORIZATION)
                        .map(|value| value.to_str().unwrap().to_owned());
                    seen.lock()
                        .unwrap()
                        .push((uri.path().to_owned(), authorization));
                    answer(uri.path())
                },
            )
            .with_state(seen.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (addr, seen)
    }

    fn settings(plain_http: Vec<String>) -> RegistrySettings {
        RegistrySettings {
            plain_http,
            ca_pems: Vec::new(),
            connect_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(5),
            max_concurrent_downloads: 1,
            retries: 1,
            stall_timeout: None,
            max_bytes_per_second: 0,
            mirrors: Vec::new(),
        }
    }

    const BLOB: &[u8] = b"blob";

    /// The order's own registry gets the credential; the storage host it redirects a blob to
    /// (another port, so another origin) gets no Authorization header.
    #[tokio::test]
    async fn a_blob_redirect_to_another_host_carries_no_credential() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let (storage, storage_seen) = server(|_| BLOB.into_response()).await;
        let storage_url = format!("http://{storage}/blob");
        let (registry, registry_seen) = server(move |path| {
            if path.contains("/blobs/") {
                Redirect::temporary(&storage_url).into_response()
            } else {
                reqwest::StatusCode::NOT_FOUND.into_response()
            }
        })
        .await;

        let settings = settings(vec![registry.clone()]);
        let http = settings.http_client().unwrap();
        let authenticator = Authenticator::new(
            &AuthSettings {
                plain_http: settings.plain_http.clone(),
                ca_pems: Vec::new(),
                connect_timeout: Duration::from_secs(5),
                read_timeout: Duration::from_secs(5),
                retries: 1,
            },
            berth_core::metrics::SharedMetrics::default(),
        )
        .unwrap();
        let image = ImageRef::parse(&format!("{registry}/team/app:1")).unwrap();
        let session = Session::open(
            &settings,
            &http,
            &authenticator,
            &image,
            WireAuth::bearer(SecretString::from("zztokenzz")),
            Some("secret-abc"),
        )
        .await
        .unwrap();
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(BLOB)));
        let desc = Descriptor {
            media_type: String::new(),
            digest,
            size: BLOB.len() as u64,
            urls: None,
            platform: None,
        };
        let (stream, from_offset) = session.blob(&desc, 0).await.unwrap();
        let body: Vec<Bytes> = stream.try_collect().await.unwrap();
        assert!(from_offset);
        assert_eq!(body.concat(), BLOB);

        let registry_seen = registry_seen.lock().unwrap().clone();
        assert_eq!(registry_seen.len(), 1);
        assert_eq!(registry_seen[0].1.as_deref(), Some("Bearer zztokenzz"));
        let storage_seen = storage_seen.lock().unwrap().clone();
        assert_eq!(storage_seen, vec![("/blob".to_owned(), None)]);
        assert!(!format!("{session:?}").contains("zztokenzz"));
    }
}
