//! `berth image prune [--keep-bytes N]`: removes images no container uses, oldest first.

use clap::{Args, Subcommand};

use super::{output, CmdError, Console};
use crate::api::pb;
use crate::api::pb::agent_client::AgentClient;

#[derive(Debug, Subcommand)]
pub(super) enum ImageCommand {
    /// Remove images no container uses, oldest first, down to a disk budget.
    Prune(PruneArgs),
}

#[derive(Debug, Args)]
pub(super) struct PruneArgs {
    /// Bytes unused images may keep taking (0: remove every unused image).
    #[arg(long, value_name = "BYTES", default_value_t = 0)]
    keep_bytes: u64,
}

pub(super) async fn run(command: ImageCommand, console: &mut Console<'_>) -> Result<(), CmdError> {
    match command {
        ImageCommand::Prune(args) => prune(args, console).await,
    }
}

async fn prune(args: PruneArgs, console: &mut Console<'_>) -> Result<(), CmdError> {
    let mut client = AgentClient::new(console.channel().await?);
    // No short deadline: each removal waits for containerd's garbage collection.
    let report = client
        .prune_images(pb::PruneImagesRequest {
            keep_bytes: args.keep_bytes,
        })
        .await?
        .into_inner();
    if console.json() {
        return output::write_json(
            console.out,
            &serde_json::json!({
                "removed": report.removed,
                "freed_bytes": report.freed_bytes,
            }),
        );
    }
    for name in &report.removed {
        output::write_line(console.out, name)?;
    }
    output::write_line(
        console.out,
        &format!(
            "removed {} images, freed {} bytes",
            report.removed.len(),
            report.freed_bytes
        ),
    )
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::super::{Cli, Command};
    use super::*;

    #[test]
    fn prune_parses_with_and_without_a_budget() {
        let cli = Cli::try_parse_from(["berth", "image", "prune"]).unwrap();
        let Command::Image(ImageCommand::Prune(args)) = cli.command else {
            panic!("not image prune: {cli:?}");
        };
        assert_eq!(args.keep_bytes, 0);
        let cli =
            Cli::try_parse_from(["berth", "image", "prune", "--keep-bytes", "1048576"]).unwrap();
        let Command::Image(ImageCommand::Prune(args)) = cli.command else {
            panic!("not image prune: {cli:?}");
        };
        assert_eq!(args.keep_bytes, 1 << 20);
        Cli::try_parse_from(["berth", "image", "prune", "--keep-bytes", "-1"])
            .expect_err("a negative budget");
    }
}
