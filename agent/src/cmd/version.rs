//! `berth version`: the CLI's own version, then berthd's and the containerd berthd talks to.

use super::{output, unary, CmdError, Console};
use crate::api::pb;
use crate::api::pb::agent_client::AgentClient;

/// The CLI's version line comes first, so it is printed even when berthd cannot be reached.
pub(super) async fn run(console: &mut Console<'_>) -> Result<(), CmdError> {
    let client_version = env!("CARGO_PKG_VERSION");
    if !console.json() {
        output::write_line(console.out, &format!("berth   {client_version}"))?;
    }
    let daemon = AgentClient::new(console.channel().await?)
        .version(unary(pb::VersionRequest {}))
        .await?
        .into_inner();
    if console.json() {
        return output::write_json(
            console.out,
            &serde_json::json!({
                "berth": client_version,
                "berthd": daemon.version,
                "containerd": daemon.containerd_version,
                "containerd_revision": daemon.containerd_revision,
            }),
        );
    }
    output::write_line(console.out, &format!("berthd  {}", daemon.version))?;
    let containerd = if daemon.containerd_version.is_empty() {
        "not answering".to_owned()
    } else if daemon.containerd_revision.is_empty() {
        daemon.containerd_version
    } else {
        format!(
            "{} (revision {})",
            daemon.containerd_version, daemon.containerd_revision
        )
    };
    output::write_line(console.out, &format!("containerd {containerd}"))
}
