//! Getting an order's image: from the local cache when the policy allows and the order may use
//! it (a private image needs a positive access check of the order's credential, cached for
//! `access_check_ttl`), or by a pull that waits its turn in the pull queue.

use std::collections::HashMap;
use std::time::Duration;

use std::future::Future;
use tokio::sync::{mpsc, OwnedRwLockReadGuard};
use tokio_util::sync::CancellationToken;
use tracing::{info, instrument};

use crate::audit::{AuditAction, AuditSubject};
use berth_core::order::{ImageRef, Order, PullPolicy};
use berth_registry::auth::{OrderCredential, WireAuth};
use berth_registry::pull::{PullError, PullProgress, PulledImage};
use berth_secrets::{SecretId, StoredSecret};

use super::queue::PullTurn;
use super::{audit_subject, image_lock, RunError, Runner};

impl Runner {
    /// Pulls `image` for `project` with an optional secret, reporting progress. `cancel` takes
    /// the pull out of the queue while it waits there.
    #[instrument(skip_all, fields(project = %project, image = %image))]
    pub(crate) async fn pull(
        &self,
        project: &str,
        image: &ImageRef,
        pull_secret: Option<&str>,
        progress: mpsc::Sender<PullProgress>,
        cancel: CancellationToken,
    ) -> Result<PulledImage, RunError> {
        let secret = self.load_secret(project, pull_secret, image).await?;
        let secret_id = secret.as_ref().map(|s| s.meta.id.to_string());
        let subject = audit_subject(project, "", secret.as_ref());
        // One pull per image at a time: a start order for the same image waits and then finds
        // it present, instead of downloading the same blobs beside this pull.
        let _pull_guard = self.locks.lock(pull_lock(image)).await;
        let _turn = self.turn(image, Some(&progress), &cancel).await?;
        let _image_guard = self.image_locks.write(image_lock(image)).await;
        // Mirrors first ([[registry.mirror]]); the registry itself only when none serves it.
        let result = self
            .puller
            .pull_mirrors_first(
                image,
                project,
                OrderCredential::new(secret.as_ref()),
                Some(progress.clone()),
                || async {
                    let pulled = self
                        .with_grant(&subject, secret.as_ref(), image, |auth| {
                            self.puller.pull(
                                image,
                                project,
                                auth,
                                secret_id.as_deref(),
                                Some(progress.clone()),
                            )
                        })
                        .await?;
                    // The registry itself just served this image for this credential.
                    if let Some(key) = access_key(project, image, secret.as_ref(), &pulled) {
                        self.access_checks.passed(key);
                    }
                    Ok::<_, RunError>(pulled)
                },
            )
            .await;
        self.audit_pull(&subject, image, &result);
        result
    }

    /// Present and allowed, or pulled now, per the order's pull policy; returned with a read
    /// lock on the image that the caller holds until its container record references it.
    pub(super) async fn ensure_image(
        &self,
        order: &Order,
        secret: Option<&StoredSecret>,
        cancel: &CancellationToken,
    ) -> Result<(PulledImage, OwnedRwLockReadGuard<()>), RunError> {
        let image_ref = &order.image;
        if order.pull_policy != PullPolicy::Always {
            let guard = self.image_locks.read(image_lock(image_ref)).await;
            if let Some(image) = self.cached_image(order, secret).await? {
                return Ok((image, guard));
            }
            drop(guard);
            if order.pull_policy == PullPolicy::Never {
                return Err(RunError::ImageAbsent {
                    image: image_ref.to_string(),
                });
            }
            // One pull per image at a time. Orders that queued here behind a pull find the
            // image present and go on together under read locks.
            let pull_guard = self.locks.lock(pull_lock(image_ref)).await;
            let guard = self.image_locks.read(image_lock(image_ref)).await;
            drop(pull_guard);
            if let Some(image) = self.cached_image(order, secret).await? {
                return Ok((image, guard));
            }
        }
        self.pull_for_order(order, secret, cancel).await
    }

    /// Pulls the order's image under the image's write lock (unless, with `IF_NOT_PRESENT`,
    /// another pull brought it meanwhile) and returns it with that lock downgraded to a read
    /// lock. The pull waits for its turn (`max_concurrent_pulls`) inside the image's pull
    /// mutex, so orders for an image already queued or pulling wait on that flight instead.
    async fn pull_for_order(
        &self,
        order: &Order,
        secret: Option<&StoredSecret>,
        cancel: &CancellationToken,
    ) -> Result<(PulledImage, OwnedRwLockReadGuard<()>), RunError> {
        let image_ref = &order.image;
        let _pull_guard = self.locks.lock(pull_lock(image_ref)).await;
        if order.pull_policy != PullPolicy::Always {
            // Held from here on, the pull mutex keeps any other pull of this image out.
            let guard = self.image_locks.read(image_lock(image_ref)).await;
            if let Some(image) = self.cached_image(order, secret).await? {
                return Ok((image, guard));
            }
        }
        let _turn = self.turn(image_ref, None, cancel).await?;
        let guard = self.image_locks.write(image_lock(image_ref)).await;
        let secret_id = secret.map(|s| s.meta.id.to_string());
        let subject = audit_subject(&order.project, order.order_id.as_str(), secret);
        // Mirrors first ([[registry.mirror]]); the registry itself only when none serves it.
        let result = self
            .puller
            .pull_mirrors_first(
                image_ref,
                &order.project,
                OrderCredential::new(secret),
                None,
                || async {
                    let image = self
                        .with_grant(&subject, secret, image_ref, |auth| {
                            self.puller.pull(
                                image_ref,
                                &order.project,
                                auth,
                                secret_id.as_deref(),
                                None,
                            )
                        })
                        .await?;
                    // The registry itself just served this image for this credential: orders
                    // that queued behind this pull need not ask it again.
                    if let Some(key) = access_key(&order.project, image_ref, secret, &image) {
                        self.access_checks.passed(key);
                    }
                    Ok::<_, RunError>(image)
                },
            )
            .await;
        self.audit_pull(&subject, image_ref, &result);
        Ok((result?, guard.downgrade()))
    }

    /// Waits for a pull turn (`max_concurrent_pulls`); PullImage's stream hears `queued` first
    /// when the pull has to wait.
    async fn turn(
        &self,
        image: &ImageRef,
        progress: Option<&mpsc::Sender<PullProgress>>,
        cancel: &CancellationToken,
    ) -> Result<PullTurn, RunError> {
        self.pull_queue
            .turn(&self.metrics, cancel, |position| async move {
                info!(image = %image, position, "pull queued; waiting for a turn");
                if let Some(progress) = progress {
                    // A client that stopped listening is noticed through `cancel`.
                    progress
                        .send(PullProgress::Queued {
                            image: image.to_string(),
                            position,
                        })
                        .await
                        .ok();
                }
            })
            .await
            .map_err(|_| {
                info!(image = %image, "order cancelled while its pull was queued");
                RunError::Cancelled {
                    image: image.to_string(),
                }
            })
    }

    /// The order's image if containerd has it whole and, for a private image, the registry
    /// accepts the order's credential for it now (or did within the access check TTL).
    async fn cached_image(
        &self,
        order: &Order,
        secret: Option<&StoredSecret>,
    ) -> Result<Option<PulledImage>, RunError> {
        let image_ref = &order.image;
        let Some(image) = self.puller.load(image_ref).await? else {
            return Ok(None);
        };
        self.check_access(order, secret, &image).await?;
        // Signature policy in force now, at every start of a cached image (after the access
        // check: the signature is fetched with the order's own credential).
        if self
            .puller
            .signature_check_due(image_ref, &order.project, &image)
        {
            let secret_id = secret.map(|secret| secret.meta.id.to_string());
            let subject = audit_subject(&order.project, order.order_id.as_str(), secret);
            let result = self
                .with_grant(&subject, secret, image_ref, |auth| {
                    self.puller.check_cached_signature(
                        image_ref,
                        &order.project,
                        &image,
                        auth,
                        secret_id.as_deref(),
                    )
                })
                .await;
            self.audit_use(
                &subject,
                image_ref,
                &image.manifest_digest,
                AuditAction::Signature,
                &result,
            );
            result?;
        }
        Ok(Some(image))
    }

    /// A cached private image starts only for an order whose credential the registry accepts
    /// for that repository now (or did within the access check TTL).
    async fn check_access(
        &self,
        order: &Order,
        secret: Option<&StoredSecret>,
        image: &PulledImage,
    ) -> Result<(), RunError> {
        let image_ref = &order.image;
        if !image.private {
            return Ok(());
        }
        // A cached private image starts only for an order whose credential the registry
        // accepts for that repository now.
        let subject = audit_subject(&order.project, order.order_id.as_str(), secret);
        let Some(key) = access_key(&order.project, image_ref, secret, image) else {
            let refused = Err(PullError::Denied {
                registry: image_ref.registry().to_owned(),
                repository: image_ref.repository().to_owned(),
                secret: None,
            }
            .into());
            self.audit_use(
                &subject,
                image_ref,
                &image.manifest_digest,
                AuditAction::AccessCheck,
                &refused,
            );
            return refused;
        };
        if !self.access_checks.recently_passed(&key) {
            let secret_id = key.secret.clone();
            let result = self
                .with_grant(&subject, secret, image_ref, |auth| {
                    self.puller.check_access(image_ref, auth, Some(&secret_id))
                })
                .await;
            self.audit_use(
                &subject,
                image_ref,
                &image.manifest_digest,
                AuditAction::AccessCheck,
                &result,
            );
            result?;
            self.access_checks.passed(key);
        }
        Ok(())
    }

    /// Runs `op` with registry authentication for `secret`; a cached token the registry
    /// refuses is dropped and `op` runs once more with a fresh one.
    pub(super) async fn with_grant<T, F, Fut>(
        &self,
        subject: &AuditSubject,
        secret: Option<&StoredSecret>,
        image: &ImageRef,
        op: F,
    ) -> Result<T, RunError>
    where
        F: Fn(WireAuth) -> Fut,
        Fut: Future<Output = Result<T, PullError>>,
    {
        let grant = self.grant(subject, secret, image).await?;
        match op(grant.auth).await {
            Err(PullError::Denied { .. }) if grant.cached => {
                if let Some(secret) = secret {
                    self.auth.forget(secret, image);
                }
                let fresh = self.grant(subject, secret, image).await?;
                Ok(op(fresh.auth).await?)
            }
            result => Ok(result?),
        }
    }

    /// The order's pull secret, looked up within its project; without one, the credential of
    /// a `[[credential_provider]]` that serves this project and image, if any.
    pub(crate) async fn load_secret(
        &self,
        project: &str,
        pull_secret: Option<&str>,
        image: &ImageRef,
    ) -> Result<Option<StoredSecret>, RunError> {
        let Some(secret_ref) = pull_secret else {
            return Ok(self.providers.credential(project, image).await?);
        };
        let id = SecretId::parse(secret_ref)?;
        Ok(Some(self.secrets.get(project, &id).await?))
    }
}

/// What a positive access check of `pulled` (the image `image` names) for `project`'s
/// credential is cached under; None without a credential.
pub(super) fn access_key(
    project: &str,
    image: &ImageRef,
    secret: Option<&StoredSecret>,
    pulled: &PulledImage,
) -> Option<AccessKey> {
    let secret = secret?;
    Some(AccessKey {
        project: project.to_owned(),
        secret: secret.meta.id.to_string(),
        repository: format!("{}/{}", image.registry(), image.repository()),
        digest: pulled.manifest_digest.clone(),
    })
}

/// The per-image mutex key that makes pulls of one image single flight.
fn pull_lock(image: &ImageRef) -> String {
    format!("pull/{}", image.name())
}

/// What a positive access check of a cached private image was for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct AccessKey {
    project: String,
    pub(super) secret: String,
    repository: String,
    digest: String,
}

/// Positive access checks, reused for `ttl` (`[security] access_check_ttl_seconds`).
#[derive(Debug)]
pub(super) struct AccessChecks {
    ttl: Duration,
    passed: std::sync::Mutex<HashMap<AccessKey, tokio::time::Instant>>,
}

impl Default for AccessChecks {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(300),
            passed: std::sync::Mutex::default(),
        }
    }
}

impl AccessChecks {
    pub(super) fn with_ttl(ttl: Duration) -> Self {
        Self {
            ttl,
            passed: std::sync::Mutex::default(),
        }
    }

    pub(super) fn recently_passed(&self, key: &AccessKey) -> bool {
        let mut passed = self
            .passed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = tokio::time::Instant::now();
        passed.retain(|_, at| now.duration_since(*at) < self.ttl);
        passed.contains_key(key)
    }

    pub(super) fn passed(&self, key: AccessKey) {
        if self.ttl.is_zero() {
            return;
        }
        let mut passed = self
            .passed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        passed.insert(key, tokio::time::Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn access_checks_are_reused_for_their_ttl_only() {
        let checks = AccessChecks {
            ttl: Duration::from_secs(300),
            passed: std::sync::Mutex::default(),
        };
        let key = AccessKey {
            project: "a".into(),
            secret: "secret-x".into(),
            repository: "r/app".into(),
            digest: "sha256:1".into(),
        };
        assert!(!checks.recently_passed(&key));
        checks.passed(key.clone());
        assert!(checks.recently_passed(&key));
        let other_project = AccessKey {
            project: "b".into(),
            ..key.clone()
        };
        assert!(
            !checks.recently_passed(&other_project),
            "a pass is per project"
        );
        tokio::time::advance(Duration::from_secs(301)).await;
        assert!(!checks.recently_passed(&key), "expired after the ttl");
    }
}
