//! Proto -> domain (validated: malformed input is INVALID_ARGUMENT) and domain -> proto.

use std::time::SystemTime;

use super::pb;
use crate::run::{ContainerState, ContainerView, PullPlan};
use berth_core::order::{OrderError, PullPolicy, RawOrder};
use berth_registry::pull::PullProgress;
use berth_secrets::{SecretKind, SecretMeta};

pub(super) fn raw_order(request: pb::StartContainerRequest) -> Result<RawOrder, OrderError> {
    let container = request
        .container
        .ok_or(OrderError::Missing { field: "container" })?;
    let pull_policy = match pb::PullPolicy::try_from(container.pull_policy) {
        Ok(pb::PullPolicy::IfNotPresent) => PullPolicy::IfNotPresent,
        Ok(pb::PullPolicy::Always) => PullPolicy::Always,
        Ok(pb::PullPolicy::Never) => PullPolicy::Never,
        Err(_) => {
            return Err(OrderError::Invalid {
                field: "container.pull_policy",
                reason: "unknown pull policy",
            })
        }
    };
    Ok(RawOrder {
        order_id: request.order_id,
        project: request.project,
        name: request.name,
        image: container.image,
        pull_secret: container.pull_secret,
        command: container.command,
        args: container.args,
        env: container.env.into_iter().collect(),
        pull_policy,
    })
}

pub(super) fn container(view: ContainerView) -> pb::Container {
    let state = match view.state {
        ContainerState::Unknown => pb::ContainerState::Unspecified,
        ContainerState::Created => pb::ContainerState::Created,
        ContainerState::Running => pb::ContainerState::Running,
        ContainerState::Exited => pb::ContainerState::Exited,
    };
    pb::Container {
        id: view.id,
        order_id: view.order_id,
        project: view.project,
        name: view.name,
        image: view.image,
        image_digest: view.image_digest,
        state: state as i32,
        exit_code: view.exit_code,
        log_path: view.log_path.display().to_string(),
        created_at: view.created_at.map(timestamp),
        started_at: view.started_at.map(timestamp),
        finished_at: view.finished_at.map(timestamp),
    }
}

pub(super) fn secret(meta: SecretMeta) -> pb::Secret {
    pb::Secret {
        id: meta.id.to_string(),
        project: meta.project,
        name: meta.name,
        kind: kind_name(meta.kind).to_owned(),
        server: meta.server,
        created_at: Some(timestamp(meta.created_at)),
    }
}

fn kind_name(kind: SecretKind) -> &'static str {
    kind.as_str()
}

pub(super) fn pull_event(progress: PullProgress) -> pb::PullEvent {
    use pb::pull_event::Event;
    let event = match progress {
        PullProgress::Queued { image, position } => Event::Queued(pb::Queued { image, position }),
        PullProgress::Resolved {
            image,
            digest,
            layers,
            total_bytes,
        } => Event::Resolved(pb::Resolved {
            image,
            digest,
            layers,
            total_bytes,
        }),
        PullProgress::Layer {
            digest,
            done_bytes,
            total_bytes,
            cached,
        } => Event::Layer(pb::LayerProgress {
            digest,
            done_bytes,
            total_bytes,
            cached,
        }),
        PullProgress::Done { digest, signature } => Event::Done(pb::Done {
            digest,
            signature: signature.to_owned(),
        }),
    };
    pb::PullEvent { event: Some(event) }
}

pub(super) fn pull_plan(plan: PullPlan) -> pb::PullPlan {
    pb::PullPlan {
        image: plan.image,
        digest: plan.digest,
        endpoint: plan.endpoint,
        credential: plan.credential,
        realm: plan.realm,
        scope: plan.scope,
        present: plan.present,
        bytes_to_fetch: plan.bytes_to_fetch,
        access: plan.access,
        policy: plan.policy,
        signature: plan.signature,
    }
}

pub(super) fn timestamp(time: SystemTime) -> prost_types::Timestamp {
    let since = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    prost_types::Timestamp {
        seconds: i64::try_from(since.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(since.subsec_nanos()).unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_container_spec_is_invalid() {
        let request = pb::StartContainerRequest {
            order_id: "o".into(),
            name: "web".into(),
            ..Default::default()
        };
        assert!(matches!(
            raw_order(request),
            Err(OrderError::Missing { field: "container" })
        ));
    }

    #[test]
    fn unknown_pull_policy_is_invalid() {
        let request = pb::StartContainerRequest {
            order_id: "o".into(),
            name: "web".into(),
            container: Some(pb::ContainerSpec {
                image: "busybox".into(),
                pull_policy: 42,
                ..Default::default()
            }),
            ..Default::default()
        };
        raw_order(request).unwrap_err();
    }
}
