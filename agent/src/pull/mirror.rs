//! Registry mirrors (`[[registry.mirror]]`): pull-through caches (distribution in proxy mode,
//! Harbor proxy-cache projects, Spegel) tried in file order before the upstream registry, as
//! containerd's `hosts.toml` does.
//!
//! - A mirror that fails the way a registry can (unreachable, 5xx, 401/403, 404, a manifest it
//!   cannot serve, content that fails verification) is passed over for the next one, and finally
//!   for the upstream. containerd and berth's own failures end the pull as they would without
//!   mirrors.
//! - Mirrors are tried before the upstream is contacted at all: a pull a mirror serves asks
//!   neither the upstream registry nor its token endpoint for anything, except the one anonymous
//!   HEAD below.
//! - A mirror is asked anonymously unless its entry says `credentials = true`. Then it gets the
//!   order's username and password (Docker and ACR secrets; not refresh tokens, not GAR keys,
//!   for which it is asked anonymously) and its own challenge decides how: Basic, or a token
//!   from the mirror's realm. A secret for another server never reaches a mirror: such an order
//!   skips the mirrors and fails on the upstream path as before.
//! - The image record, digests and labels are the upstream reference's: a pull through a mirror
//!   gives the same image name and digest, verified byte by byte the same way. A tag is resolved
//!   by the mirror (a pull-through cache may lag the upstream by its cache TTL).
//! - Private or public is decided against the upstream, never a mirror. An order with a secret
//!   makes the image private, as without mirrors. An anonymous order served by a mirror records
//!   the image public only if the upstream itself serves that manifest digest anonymously (one
//!   anonymous HEAD request); if it refuses, lacks it or cannot be reached, the image is recorded
//!   private. The order that pulled it runs either way (the operator let that mirror serve
//!   anonymously); later anonymous orders for the cached private image are refused as for any
//!   private image, until an anonymous pull (pull policy ALWAYS) records it again.
//! - An endpoint may carry a path: a repository prefix on the mirror, e.g.
//!   `https://harbor.example/dockerhub-proxy` for Harbor's proxy-cache project `dockerhub-proxy`
//!   (`docker.io/library/alpine` is then asked for as `dockerhub-proxy/library/alpine`).
//!   `http://` endpoints are spoken to over plain HTTP.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use oci_client::secrets::RegistryAuth;
use secrecy::ExposeSecret as _;
use tokio::sync::mpsc;
use tracing::{debug, info, instrument, warn};

use super::registry::Session;
use super::{InFlight, Privacy, PullError, PullProgress, PulledImage, Puller, UncountedPull};
use crate::auth::REFRESH_TOKEN_USERNAME;
use crate::config::MirrorConfig;
use crate::metrics::MirrorLabels;
use crate::metrics::PullLabels;
use crate::order::ImageRef;
use crate::secret::{Credential, SecretKind, StoredSecret};

/// One `[[registry.mirror]]` entry, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Mirror {
    /// The upstream's `host[:port]`, normalised as secret servers are (`docker.io`).
    pub(crate) upstream: String,
    pub(crate) endpoint: Endpoint,
    /// Whether the upstream's secret may be sent to this mirror.
    pub(crate) credentials: bool,
}

impl Mirror {
    /// Parses one config entry; the reason names what is wrong, for `ConfigError`.
    pub(crate) fn parse(config: &MirrorConfig) -> Result<Self, MirrorConfigError> {
        let upstream = crate::secret::normalize_server(config.upstream.trim())
            .map_err(|_| MirrorConfigError::Upstream)?;
        Ok(Self {
            upstream,
            endpoint: Endpoint::parse(&config.endpoint)?,
            credentials: config.credentials,
        })
    }

    /// Every entry of `[[registry.mirror]]`, in file order; entries that do not parse (the
    /// config was validated before) are left out.
    pub(crate) fn from_config(configs: &[MirrorConfig]) -> Vec<Self> {
        configs
            .iter()
            .filter_map(|config| Self::parse(config).ok())
            .collect()
    }
}

/// What is wrong with a `[[registry.mirror]]` entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum MirrorConfigError {
    #[error("upstream must be a registry host[:port], e.g. \"docker.io\"")]
    Upstream,
    #[error("endpoint must be an http:// or https:// URL, e.g. \"https://mirror.example:5000\"")]
    Scheme,
    #[error("endpoint must not carry a user, password, query or fragment")]
    Extras,
    #[error(
        "endpoint's path is a repository prefix of lower-case [a-z0-9._-] segments (without /v2)"
    )]
    Path,
}

/// Where a mirror listens: scheme, `host[:port]` and an optional repository prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Endpoint {
    plain_http: bool,
    /// `host[:port]` (an IPv6 host in brackets).
    host: String,
    /// `""`, or `a/b` put before the upstream repository.
    prefix: String,
}

impl Endpoint {
    pub(crate) fn parse(text: &str) -> Result<Self, MirrorConfigError> {
        let url = reqwest::Url::parse(text.trim()).map_err(|_| MirrorConfigError::Scheme)?;
        let plain_http = match url.scheme() {
            "http" => true,
            "https" => false,
            _ => return Err(MirrorConfigError::Scheme),
        };
        let host = url
            .host_str()
            .filter(|host| !host.is_empty())
            .ok_or(MirrorConfigError::Scheme)?;
        if !url.username().is_empty()
            || url.password().is_some()
            || url.query().is_some()
            || url.fragment().is_some()
        {
            return Err(MirrorConfigError::Extras);
        }
        let host = match url.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_owned(),
        };
        let prefix = url.path().trim_matches('/').to_owned();
        if !prefix.is_empty() && !is_repository_prefix(&prefix) {
            return Err(MirrorConfigError::Path);
        }
        Ok(Self {
            plain_http,
            host,
            prefix,
        })
    }

    pub(crate) fn host(&self) -> &str {
        &self.host
    }

    pub(crate) fn plain_http(&self) -> bool {
        self.plain_http
    }

    /// The repository as this mirror names it.
    pub(crate) fn repository(&self, upstream_repository: &str) -> String {
        if self.prefix.is_empty() {
            upstream_repository.to_owned()
        } else {
            format!("{}/{upstream_repository}", self.prefix)
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.plain_http { "http" } else { "https" };
        write!(f, "{scheme}://{}", self.host)?;
        if !self.prefix.is_empty() {
            write!(f, "/{}", self.prefix)?;
        }
        Ok(())
    }
}

/// `a`, `a/b-c`: segments of distribution's path components (`[a-z0-9]+([._-][a-z0-9]+)*`),
/// the first of them not `v2` (the prefix is a repository prefix, berth adds `/v2/` itself).
fn is_repository_prefix(prefix: &str) -> bool {
    let component = |segment: &str| {
        let bytes = segment.as_bytes();
        let alphanumeric = |byte: &u8| byte.is_ascii_lowercase() || byte.is_ascii_digit();
        bytes.first().is_some_and(alphanumeric)
            && bytes.last().is_some_and(alphanumeric)
            && bytes
                .iter()
                .all(|byte| alphanumeric(byte) || matches!(byte, b'.' | b'_' | b'-'))
            && !segment.contains("..")
    };
    prefix.split('/').next() != Some("v2") && prefix.split('/').all(component)
}

/// What a `credentials = true` mirror is given for `secret`: its username and password, when it
/// holds such a pair (Docker, ACR service principal); anonymous otherwise.
pub(super) fn mirror_credential(secret: Option<&StoredSecret>) -> RegistryAuth {
    match secret.map(|secret| (secret.meta.kind, &secret.credential)) {
        Some((
            SecretKind::Docker | SecretKind::Acr,
            Credential::UsernamePassword { username, password },
        )) if username != REFRESH_TOKEN_USERNAME => {
            RegistryAuth::Basic(username.clone(), password.expose_secret().to_owned())
        }
        Some(_) | None => RegistryAuth::Anonymous,
    }
}

/// Whether a mirror's failure sends the pull on to the next source.
pub(super) fn falls_back(err: &PullError) -> bool {
    match err {
        PullError::Denied { .. }
        | PullError::NotFound { .. }
        | PullError::NoPlatform { .. }
        | PullError::Mismatch { .. }
        | PullError::Unsupported { .. }
        | PullError::Unreachable { .. }
        | PullError::Throttled { .. }
        | PullError::Stalled { .. }
        | PullError::Auth(_)
        | PullError::Registry { .. }
        // A mirror may lack or garble the signature: the next source has the last word.
        | PullError::Signature { .. }
        | PullError::SignatureFetch { .. } => true,
        // Verified content is the upstream's too; deadline, containerd and client set-up
        // failures would recur.
        PullError::Config { .. }
        | PullError::Client { .. }
        | PullError::Deadline { .. }
        | PullError::Containerd { .. } => false,
    }
}

/// Host names compare as secret servers do (`index.docker.io` is `docker.io`).
fn normalized(registry: &str) -> String {
    crate::secret::normalize_server(registry).unwrap_or_else(|_| registry.to_owned())
}

impl Puller {
    /// The mirrors of `image`'s registry, in file order.
    pub(super) fn mirrors_for(&self, image: &ImageRef) -> Vec<&Mirror> {
        if self.settings.mirrors.is_empty() {
            return Vec::new();
        }
        let registry = normalized(image.registry());
        self.settings
            .mirrors
            .iter()
            .filter(|mirror| mirror.upstream == registry)
            .collect()
    }

    /// Pulls `image` through its registry's mirrors, in order, and when none of them serves
    /// it, runs `upstream` (the pull from the registry itself, authenticated there only now).
    /// The whole is bounded by the pull deadline. Without mirrors this is `upstream()`. Either
    /// way, a failure of `upstream` before its pull started (a refused credential) is counted
    /// in `berth_pulls_total`.
    #[instrument(skip_all, fields(image = %image))]
    pub(crate) async fn pull_mirrors_first<E, F, Fut>(
        &self,
        image: &ImageRef,
        project: &str,
        secret: Option<&StoredSecret>,
        progress: Option<mpsc::Sender<PullProgress>>,
        upstream: F,
    ) -> Result<PulledImage, E>
    where
        E: From<PullError> + UncountedPull,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<PulledImage, E>>,
    {
        let upstream = || async {
            let result = upstream().await;
            if let Some(label) = result.as_ref().err().and_then(E::uncounted_pull_result) {
                self.metrics
                    .pulls
                    .get_or_create(&PullLabels {
                        result: label,
                        registry: image.registry().to_owned(),
                    })
                    .inc();
            }
            result
        };
        let mirrors = self.mirrors_for(image);
        // A secret for another server never reaches a mirror; the upstream path refuses it.
        let foreign_secret = secret.is_some_and(|secret| secret.meta.server != image.registry());
        if mirrors.is_empty() || foreign_secret {
            return upstream().await;
        }
        let started = tokio::time::Instant::now();
        let deadline = started + self.deadline;
        let deadline_err = || PullError::Deadline {
            image: image.to_string(),
        };
        let in_flight = InFlight::count(&self.metrics);
        let outcome = tokio::time::timeout_at(
            deadline,
            self.try_mirrors(image, project, &mirrors, secret, progress),
        )
        .await
        .map_err(|_| deadline_err())
        .and_then(|result| result);
        drop(in_flight);
        match outcome {
            Ok(Some(pulled)) => {
                let result = Ok(pulled);
                self.record(image, started, &result);
                result.map_err(E::from)
            }
            Err(err) => {
                let result = Err(err);
                self.record(image, started, &result);
                result.map_err(E::from)
            }
            Ok(None) => {
                info!("no mirror served the image; pulling from the registry");
                match tokio::time::timeout_at(deadline, upstream()).await {
                    Ok(result) => result,
                    Err(_) => {
                        let result = Err(deadline_err());
                        self.record(image, started, &result);
                        result.map_err(E::from)
                    }
                }
            }
        }
    }

    /// Each mirror in turn: the pull it served, or None when every one of them failed in a way
    /// that sends the pull on.
    async fn try_mirrors(
        &self,
        image: &ImageRef,
        project: &str,
        mirrors: &[&Mirror],
        secret: Option<&StoredSecret>,
        progress: Option<mpsc::Sender<PullProgress>>,
    ) -> Result<Option<PulledImage>, PullError> {
        let privacy = if secret.is_some() {
            Privacy::Known(true)
        } else {
            Privacy::AskUpstream
        };
        for mirror in mirrors {
            let auth = if mirror.credentials {
                mirror_credential(secret)
            } else {
                RegistryAuth::Anonymous
            };
            let secret_id = match auth {
                RegistryAuth::Anonymous => None,
                RegistryAuth::Basic(..) | RegistryAuth::Bearer(_) => {
                    secret.map(|secret| secret.meta.id.to_string())
                }
            };
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
                // One attempt per request: a failing mirror hands over to the next source
                // instead of being retried.
                self.pull_from(image, project, &session, 1, privacy, progress.clone())
                    .await
            };
            let result = attempt.await;
            let label = match &result {
                Ok(_) => "ok",
                Err(err) if falls_back(err) => "fallback",
                Err(_) => "error",
            };
            self.metrics
                .mirror_pulls
                .get_or_create(&MirrorLabels {
                    upstream: mirror.upstream.clone(),
                    mirror: mirror.endpoint.to_string(),
                    result: label,
                })
                .inc();
            match result {
                Ok(pulled) => {
                    info!(mirror = %mirror.endpoint, digest = %pulled.manifest_digest, private = pulled.private, "pulled through a mirror");
                    return Ok(Some(pulled));
                }
                Err(err) if falls_back(&err) => {
                    warn!(mirror = %mirror.endpoint, error = %err, "mirror failed; trying the next source");
                }
                Err(err) => return Err(err),
            }
        }
        Ok(None)
    }

    /// Whether the upstream registry itself serves the manifest `digest` of `image` without a
    /// credential (an anonymous token where it wants one). Unreachable counts as no.
    pub(super) async fn upstream_serves_anonymously(&self, image: &ImageRef, digest: &str) -> bool {
        let check = async {
            let session = Session::open(
                &self.settings,
                &self.http,
                &self.authenticator,
                image,
                RegistryAuth::Anonymous,
                None,
            )
            .await?;
            session.head_manifest(digest).await
        };
        let bound: Duration = self.settings.connect_timeout + self.settings.read_timeout;
        match tokio::time::timeout(bound, check).await {
            Ok(Ok(())) => true,
            Ok(Err(err)) => {
                info!(error = %err, digest = %digest, "the registry does not serve this image anonymously; recording it private");
                false
            }
            Err(_) => {
                debug!(digest = %digest, "the registry did not answer in time; recording the image private");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(upstream: &str, endpoint: &str) -> MirrorConfig {
        MirrorConfig {
            upstream: upstream.to_owned(),
            endpoint: endpoint.to_owned(),
            credentials: false,
        }
    }

    #[test]
    fn endpoints_parse_to_scheme_host_and_prefix() {
        for (text, display, host, plain_http, repository) in [
            (
                "https://mirror.example:5000",
                "https://mirror.example:5000",
                "mirror.example:5000",
                false,
                "library/alpine",
            ),
            (
                "http://127.0.0.1:5001/",
                "http://127.0.0.1:5001",
                "127.0.0.1:5001",
                true,
                "library/alpine",
            ),
            (
                "https://Harbor.Example/dockerhub-proxy",
                "https://harbor.example/dockerhub-proxy",
                "harbor.example",
                false,
                "dockerhub-proxy/library/alpine",
            ),
            (
                "https://[::1]:5000/a/b",
                "https://[::1]:5000/a/b",
                "[::1]:5000",
                false,
                "a/b/library/alpine",
            ),
            (
                "https://mirror.example:443",
                "https://mirror.example",
                "mirror.example",
                false,
                "library/alpine",
            ),
        ] {
            let endpoint = Endpoint::parse(text).unwrap();
            assert_eq!(endpoint.to_string(), display, "{text}");
            assert_eq!(endpoint.host(), host, "{text}");
            assert_eq!(endpoint.plain_http(), plain_http, "{text}");
            assert_eq!(endpoint.repository("library/alpine"), repository, "{text}");
        }
    }

    #[test]
    fn bad_endpoints_are_refused_with_a_reason() {
        for (text, expected) in [
            ("mirror.example:5000", MirrorConfigError::Scheme),
            ("ftp://mirror.example", MirrorConfigError::Scheme),
            ("https://", MirrorConfigError::Scheme),
            ("https://u:p@mirror.example", MirrorConfigError::Extras),
            ("https://mirror.example?x=1", MirrorConfigError::Extras),
            ("https://mirror.example#f", MirrorConfigError::Extras),
            ("https://mirror.example/v2", MirrorConfigError::Path),
            ("https://mirror.example/v2/proxy", MirrorConfigError::Path),
            ("https://mirror.example/Proxy", MirrorConfigError::Path),
            ("https://mirror.example/a//b", MirrorConfigError::Path),
            ("https://mirror.example/a/-b", MirrorConfigError::Path),
        ] {
            assert_eq!(Endpoint::parse(text), Err(expected), "{text}");
        }
        // "v2x" is a repository name, not the API root.
        Endpoint::parse("https://mirror.example/v2x").unwrap();
    }

    #[test]
    fn upstreams_are_normalised_like_secret_servers() {
        for (upstream, expected) in [
            ("docker.io", "docker.io"),
            ("index.docker.io", "docker.io"),
            ("https://registry-1.docker.io/v2/", "docker.io"),
            ("Registry.Example:5000", "registry.example:5000"),
        ] {
            let mirror = Mirror::parse(&entry(upstream, "https://m.example")).unwrap();
            assert_eq!(mirror.upstream, expected, "{upstream}");
        }
        assert_eq!(
            Mirror::parse(&entry("", "https://m.example")),
            Err(MirrorConfigError::Upstream)
        );
        assert_eq!(
            Mirror::parse(&entry("a b", "https://m.example")),
            Err(MirrorConfigError::Upstream)
        );
    }

    #[test]
    fn only_registry_failures_fall_back() {
        let image = || "r.example/a:1".to_owned();
        assert!(falls_back(&PullError::NotFound { image: image() }));
        assert!(falls_back(&PullError::Denied {
            registry: "m".into(),
            repository: "a".into(),
            secret: None,
        }));
        assert!(falls_back(&PullError::Unreachable {
            registry: "m".into(),
            source: "down".into(),
        }));
        assert!(!falls_back(&PullError::Deadline { image: image() }));
    }

    #[test]
    fn mirrors_get_a_username_and_password_or_nothing() {
        use crate::secret::{SecretId, SecretMeta};
        let secret = |kind, username: &str| StoredSecret {
            meta: SecretMeta {
                id: SecretId::parse("secret-abc").unwrap(),
                project: "default".into(),
                name: "n".into(),
                kind,
                server: "r.example".into(),
                created_at: std::time::SystemTime::UNIX_EPOCH,
            },
            credential: Credential::UsernamePassword {
                username: username.to_owned(),
                password: "zzpasszz".into(),
            },
        };
        assert!(matches!(
            mirror_credential(Some(&secret(SecretKind::Docker, "u"))),
            RegistryAuth::Basic(user, password) if user == "u" && password == "zzpasszz"
        ));
        assert!(matches!(
            mirror_credential(Some(&secret(SecretKind::Acr, REFRESH_TOKEN_USERNAME))),
            RegistryAuth::Anonymous
        ));
        assert!(matches!(mirror_credential(None), RegistryAuth::Anonymous));
    }
}
