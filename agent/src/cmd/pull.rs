//! `berth pull IMAGE [--pull-secret ID]`: pre-pulls an image, printing each progress event.

use clap::Args;

use super::{output, CmdError, Console};
use crate::api::pb;
use crate::api::pb::agent_client::AgentClient;

#[derive(Debug, Args)]
pub(super) struct PullArgs {
    /// Image reference, e.g. registry.example.com/team/app:tag or ...@sha256:HEX.
    image: String,
    /// Secret id to pull with [default: anonymous].
    #[arg(long, value_name = "ID")]
    pull_secret: Option<String>,
}

pub(super) async fn run(args: PullArgs, console: &mut Console<'_>) -> Result<(), CmdError> {
    let mut client = AgentClient::new(console.channel().await?);
    // No deadline here: the daemon bounds the pull with its own pull_deadline_seconds.
    let mut events = client
        .pull_image(pb::PullImageRequest {
            project: console.project(),
            image: args.image,
            pull_secret: args.pull_secret.unwrap_or_default(),
        })
        .await?
        .into_inner();
    while let Some(event) = events.message().await? {
        if console.json() {
            output::write_json_line(console.out, &output::pull_event_json(&event))?;
        } else if let Some(line) = output::pull_event_line(&event) {
            output::write_line(console.out, &line)?;
            console.out.flush().map_err(CmdError::Output)?;
        }
    }
    Ok(())
}
