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

use std::future::Future;
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::{debug, info, instrument, warn};

use super::registry::Session;
use super::{InFlight, Privacy, PullError, PullProgress, PulledImage, Puller, UncountedPull};
use crate::auth::{OrderCredential, WireAuth};
use berth_core::host::Mirror;
use berth_core::metrics::MirrorLabels;
use berth_core::metrics::PullLabels;
use berth_core::order::ImageRef;

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
        // Bytes that are not what the descriptor names may be the mirror's fault.
        PullError::Layer { source, .. } => source.is_data_loss(),
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
    berth_core::host::normalize_server(registry).unwrap_or_else(|_| registry.to_owned())
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
    pub async fn pull_mirrors_first<E, F, Fut>(
        &self,
        image: &ImageRef,
        project: &str,
        credential: OrderCredential<'_>,
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
        if mirrors.is_empty() || !credential.fits(image.registry()) {
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
            self.try_mirrors(image, project, &mirrors, credential, progress),
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
        credential: OrderCredential<'_>,
        progress: Option<mpsc::Sender<PullProgress>>,
    ) -> Result<Option<PulledImage>, PullError> {
        let privacy = if credential.is_some() {
            Privacy::Known(true)
        } else {
            Privacy::AskUpstream
        };
        for mirror in mirrors {
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
                WireAuth::anonymous(),
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
}
