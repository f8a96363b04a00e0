//! `berth pull IMAGE [--pull-secret ID]`: pre-pulls an image, printing each progress event.

use clap::Args;

use super::progress::{Mode, Progress};
use super::{CmdError, Console};
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
    let mode = match (console.json(), console.tty) {
        (true, _) => Mode::Json,
        (false, true) => Mode::Bars,
        (false, false) => Mode::Lines,
    };
    let mut progress = Progress::new(mode);
    while let Some(event) = events.message().await? {
        progress.event(&event, console.out)?;
    }
    Ok(())
}
