//! `berth explain IMAGE [--pull-secret ID]`: what a pull of IMAGE would do now (ExplainPull),
//! as `key: value` lines or, with `--output json`, one JSON object.

use clap::Args;

use super::{output, unary, CmdError, Console};
use crate::api::pb;
use crate::api::pb::agent_client::AgentClient;

#[derive(Debug, Args)]
pub(super) struct ExplainArgs {
    /// Image reference, e.g. registry.example.com/team/app:tag or ...@sha256:HEX.
    image: String,
    /// Secret id to pull with [default: a credential provider, or anonymous].
    #[arg(long, value_name = "ID")]
    pull_secret: Option<String>,
}

pub(super) async fn run(args: ExplainArgs, console: &mut Console<'_>) -> Result<(), CmdError> {
    let plan = AgentClient::new(console.channel().await?)
        .explain_pull(unary(pb::PullImageRequest {
            project: console.project(),
            image: args.image,
            pull_secret: args.pull_secret.unwrap_or_default(),
        }))
        .await?
        .into_inner();
    if console.json() {
        return output::write_json(
            console.out,
            &serde_json::json!({
                "image": plan.image,
                "digest": plan.digest,
                "endpoint": plan.endpoint,
                "credential": plan.credential,
                "realm": plan.realm,
                "scope": plan.scope,
                "present": plan.present,
                "bytes_to_fetch": plan.bytes_to_fetch,
                "access": plan.access,
                "policy": plan.policy,
                "signature": plan.signature,
            }),
        );
    }
    let lines = [
        ("image", plan.image),
        ("digest", plan.digest),
        ("endpoint", plan.endpoint),
        ("credential", plan.credential),
        ("realm", plan.realm),
        ("scope", plan.scope),
        ("present", plan.present.to_string()),
        ("bytes_to_fetch", plan.bytes_to_fetch.to_string()),
        ("access", plan.access),
        ("policy", plan.policy),
        ("signature", plan.signature),
    ];
    for (key, value) in lines {
        output::write_line(console.out, &format!("{key:<15}{value}"))?;
    }
    Ok(())
}
