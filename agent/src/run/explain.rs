//! ExplainPull: what a pull of an image would do now, walking the real path (secret or
//! credential provider, mirrors, challenge and realm check, token, manifest, presence and the
//! access check of a cached image, signature policy) without fetching a blob or writing
//! anything but the `token` audit line.

use tracing::instrument;

use super::image::access_key;
use super::{audit_subject, RunError, Runner};
use crate::audit::AuditAction;
use berth_core::order::ImageRef;
use berth_registry::auth::OrderCredential;
use berth_registry::pull::{PullError, PulledImage};
use berth_secrets::StoredSecret;

/// What a pull of an image would do now (ExplainPull).
#[derive(Debug, Clone)]
pub(crate) struct PullPlan {
    pub(crate) image: String,
    pub(crate) digest: String,
    pub(crate) endpoint: String,
    pub(crate) credential: String,
    pub(crate) realm: String,
    pub(crate) scope: String,
    pub(crate) present: bool,
    pub(crate) bytes_to_fetch: u64,
    pub(crate) access: String,
    pub(crate) policy: String,
    pub(crate) signature: String,
}

/// The project and image an ExplainPull asks about.
#[derive(Debug)]
struct ExplainOrder<'a> {
    project: &'a str,
    image: &'a ImageRef,
}

impl Runner {
    /// What pulling `image` for `project` with `pull_secret` would do now, walking the real
    /// path (secret or provider, mirrors, challenge and realm check, token, manifest, presence
    /// and access check, signature policy) without fetching a blob or writing anything.
    /// Failures on that path are the errors a pull would give; the access check of a cached
    /// image is reported in the plan. The token use is audited (`action: token`).
    #[instrument(skip_all, fields(project = %project, image = %image))]
    pub(crate) async fn explain(
        &self,
        project: &str,
        image: &ImageRef,
        pull_secret: Option<&str>,
    ) -> Result<PullPlan, RunError> {
        let secret = self.load_secret(project, pull_secret, image).await?;
        let secret = secret.as_ref();
        let subject = audit_subject(project, "", secret);
        let secret_id = secret.map(|secret| secret.meta.id.to_string());
        let mirrored = self
            .puller
            .explain_mirrors(image, project, OrderCredential::new(secret))
            .await
            .map_err(RunError::from);
        let resolution = match mirrored {
            Ok(Some(resolution)) => {
                self.audit_use(
                    &subject,
                    image,
                    "",
                    AuditAction::Token,
                    &Ok::<(), RunError>(()),
                );
                resolution
            }
            Ok(None) => {
                let grant = self.auth.grant(secret, image).await.map_err(RunError::from);
                self.audit_use(&subject, image, "", AuditAction::Token, &grant);
                self.puller
                    .explain_upstream(image, project, grant?.auth, secret_id.as_deref())
                    .await?
            }
            Err(err) => {
                self.audit.record(
                    &subject,
                    image.registry(),
                    image.repository(),
                    "",
                    AuditAction::Token,
                    super::code::audit_result(&err),
                );
                return Err(err);
            }
        };
        let realm = self
            .auth
            .realm_at(&resolution.host, resolution.plain_http)
            .await?
            .unwrap_or_default();
        let scope = if realm.is_empty() {
            String::new()
        } else {
            format!("repository:{}:pull", image.repository())
        };
        let cached = self.puller.load(image).await?;
        let access = match &cached {
            Some(pulled) if pulled.private => {
                let order = ExplainOrder { project, image };
                match self.explain_access(&order, secret, pulled).await {
                    Ok(()) => "ok",
                    Err(err) => super::code::audit_result(&err),
                }
            }
            Some(_) | None => "ok",
        };
        Ok(PullPlan {
            image: image.to_string(),
            digest: resolution.manifest_digest,
            endpoint: resolution.endpoint,
            credential: subject.credential,
            realm,
            scope,
            present: cached.is_some(),
            bytes_to_fetch: resolution.bytes_to_fetch,
            access: access.to_owned(),
            policy: resolution.policy,
            signature: resolution.signature,
        })
    }

    /// The access check a start of the cached private `pulled` would make (TTL included).
    async fn explain_access(
        &self,
        order: &ExplainOrder<'_>,
        secret: Option<&StoredSecret>,
        pulled: &PulledImage,
    ) -> Result<(), RunError> {
        let Some(key) = access_key(order.project, order.image, secret, pulled) else {
            return Err(PullError::Denied {
                registry: order.image.registry().to_owned(),
                repository: order.image.repository().to_owned(),
                secret: None,
            }
            .into());
        };
        if self.access_checks.recently_passed(&key) {
            return Ok(());
        }
        let subject = audit_subject(order.project, "", secret);
        let secret_id = key.secret.clone();
        self.with_grant(&subject, secret, order.image, |auth| {
            self.puller
                .check_access(order.image, auth, Some(&secret_id))
        })
        .await
    }
}
