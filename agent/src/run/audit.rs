//! The audit lines of an order's credential uses: token requests (cache hits are no use),
//! pulls, access checks and signature fetches, each with the gRPC code it ended with.

use super::{RunError, Runner};
use crate::audit::{AuditAction, AuditSubject, ANONYMOUS};
use berth_core::order::ImageRef;
use berth_registry::pull::PulledImage;
use berth_secrets::StoredSecret;

/// Who an audit line is about: `project`'s order `order_id` (empty for PullImage) with
/// `secret` (anonymous without one).
pub(super) fn audit_subject(
    project: &str,
    order_id: &str,
    secret: Option<&StoredSecret>,
) -> AuditSubject {
    AuditSubject {
        project: project.to_owned(),
        order_id: order_id.to_owned(),
        credential: secret
            .map_or_else(|| ANONYMOUS.to_owned(), |secret| secret.meta.id.to_string()),
    }
}

impl Runner {
    /// Registry authentication for `secret`; a token request (not a cache hit) is audited.
    pub(super) async fn grant(
        &self,
        subject: &AuditSubject,
        secret: Option<&StoredSecret>,
        image: &ImageRef,
    ) -> Result<berth_registry::auth::Grant, RunError> {
        let result = self.auth.grant(secret, image).await.map_err(RunError::from);
        if !result.as_ref().is_ok_and(|grant| grant.cached) {
            self.audit_use(subject, image, "", AuditAction::Token, &result);
        }
        result
    }

    /// One audit line for a use of `subject`'s credential on `image`.
    pub(super) fn audit_use<T>(
        &self,
        subject: &AuditSubject,
        image: &ImageRef,
        digest: &str,
        action: AuditAction,
        result: &Result<T, RunError>,
    ) {
        let outcome = match result {
            Ok(_) => "ok",
            Err(err) => super::code::audit_result(err),
        };
        self.audit.record(
            subject,
            image.registry(),
            image.repository(),
            digest,
            action,
            outcome,
        );
    }

    /// The audit lines of a pull: the pull itself and, when a policy had its signature
    /// fetched, the signature fetch.
    pub(super) fn audit_pull(
        &self,
        subject: &AuditSubject,
        image: &ImageRef,
        result: &Result<PulledImage, RunError>,
    ) {
        let digest = result
            .as_ref()
            .map(|pulled| pulled.manifest_digest.as_str())
            .unwrap_or_default();
        self.audit_use(subject, image, digest, AuditAction::Pull, result);
        let signature_checked = match result {
            Ok(_) => true,
            Err(RunError::Pull(err)) => err.is_signature(),
            Err(_) => false,
        };
        if signature_checked && self.puller.signature_required(image, &subject.project) {
            self.audit_use(subject, image, digest, AuditAction::Signature, result);
        }
    }
}
