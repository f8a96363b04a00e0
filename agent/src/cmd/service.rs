//! `berth service create --file FILE.yaml`: reads a service file and sends one start order.
//!
//! ```yaml
//! version: v1
//! kind: Service
//! metadata:
//!   name: private-image-demo
//! container:
//!   image: registry.example.com/my-team/private-app:latest
//!   pull_secret: secret-abcdef123
//!   command: ["/app"]            # optional
//!   args: ["--port", "8080"]     # optional
//!   env: {MODE: demo}            # optional
//!   pull_policy: IfNotPresent    # optional: IfNotPresent | Always | Never
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use clap::{Args, Subcommand};
use serde::Deserialize;

use super::progress::{Mode, Progress};
use super::{output, read_input, CmdError, Console};
use crate::api::pb;
use crate::api::pb::agent_client::AgentClient;

#[derive(Debug, Subcommand)]
pub(super) enum ServiceCommand {
    /// Start the container a service file describes and print it.
    Create(CreateArgs),
}

#[derive(Debug, Args)]
pub(super) struct CreateArgs {
    /// Service file (YAML, kind Service, version v1).
    #[arg(long, value_name = "FILE")]
    file: PathBuf,
    /// Order id to send [default: a fresh one per invocation]; the same id again returns the
    /// same container.
    #[arg(long)]
    order_id: Option<String>,
}

/// A service file, exactly as written; unknown keys are refused.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceFile {
    version: String,
    kind: String,
    metadata: Metadata,
    container: ContainerSection,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Metadata {
    name: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ContainerSection {
    image: String,
    #[serde(default)]
    pull_secret: Option<String>,
    #[serde(default)]
    command: Vec<String>,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    pull_policy: Option<PullPolicyName>,
}

/// `IfNotPresent`, `if_not_present`, `IF_NOT_PRESENT`, `if-not-present`, ... (also `Always`,
/// `Never`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
struct PullPolicyName(pb::PullPolicy);

impl TryFrom<String> for PullPolicyName {
    type Error = String;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        let folded: String = value
            .chars()
            .filter(|character| !matches!(character, '_' | '-'))
            .map(|character| character.to_ascii_lowercase())
            .collect();
        match folded.as_str() {
            "ifnotpresent" => Ok(Self(pb::PullPolicy::IfNotPresent)),
            "always" => Ok(Self(pb::PullPolicy::Always)),
            "never" => Ok(Self(pb::PullPolicy::Never)),
            _ => Err(format!(
                "unknown pull_policy {value:?}, expected IfNotPresent, Always or Never"
            )),
        }
    }
}

/// The start order a service file describes (all but the order id).
#[derive(Debug, PartialEq)]
pub(crate) struct Service {
    name: String,
    container: pb::ContainerSpec,
}

pub(crate) fn parse_service(path: &Path, text: &str) -> Result<Service, CmdError> {
    let file: ServiceFile =
        serde_yaml_ng::from_str(text).map_err(|source| CmdError::ServiceFile {
            path: path.to_owned(),
            source,
        })?;
    let wrong_value = |field, expected, found: &str| CmdError::ServiceFieldValue {
        path: path.to_owned(),
        field,
        expected,
        found: found.to_owned(),
    };
    if file.version != "v1" {
        return Err(wrong_value("version", "v1", &file.version));
    }
    if file.kind != "Service" {
        return Err(wrong_value("kind", "Service", &file.kind));
    }
    let empty = |field| CmdError::ServiceFieldEmpty {
        path: path.to_owned(),
        field,
    };
    if file.metadata.name.trim().is_empty() {
        return Err(empty("metadata.name"));
    }
    if file.container.image.trim().is_empty() {
        return Err(empty("container.image"));
    }
    let section = file.container;
    Ok(Service {
        name: file.metadata.name,
        container: pb::ContainerSpec {
            image: section.image,
            pull_secret: section.pull_secret.unwrap_or_default(),
            command: section.command,
            args: section.args,
            env: section.env.into_iter().collect(),
            pull_policy: section
                .pull_policy
                .map_or(pb::PullPolicy::IfNotPresent, |policy| policy.0)
                as i32,
        },
    })
}

/// `cli-<unix nanos>-<random hex>`: unique per invocation.
fn fresh_order_id() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos());
    format!("cli-{nanos}-{:016x}", rand::random::<u64>())
}

pub(super) async fn run(
    command: ServiceCommand,
    console: &mut Console<'_>,
) -> Result<(), CmdError> {
    match command {
        ServiceCommand::Create(args) => create(args, console).await,
    }
}

async fn create(args: CreateArgs, console: &mut Console<'_>) -> Result<(), CmdError> {
    let text = read_input(&args.file).await?;
    let service = parse_service(&args.file, &text)?;
    let order_id = args.order_id.unwrap_or_else(fresh_order_id);
    let mut client = AgentClient::new(console.channel().await?);
    // Pull first through PullImage, so a person sees progress (bars on a terminal, lines on
    // stderr otherwise); the start order then finds the image present. JSON output stays
    // clean on stdout.
    if service.container.pull_policy != pb::PullPolicy::Never as i32 {
        let mode = match (console.json(), console.tty) {
            (true, _) => Mode::Quiet,
            (false, true) => Mode::Bars,
            (false, false) => Mode::Lines,
        };
        let request = pb::PullImageRequest {
            project: console.project(),
            image: service.container.image.clone(),
            pull_secret: service.container.pull_secret.clone(),
        };
        let mut progress = Progress::new(mode);
        let pulled: Result<(), tonic::Status> = async {
            let mut events = client.pull_image(request).await?.into_inner();
            while let Some(event) = events.message().await? {
                // A broken stderr does not stop the deploy.
                progress.event(&event, console.err).ok();
            }
            Ok(())
        }
        .await;
        match pulled {
            Ok(()) => {}
            // With the registry out of reach an image already present may still start
            // (IF_NOT_PRESENT): the start order decides.
            Err(status)
                if matches!(
                    status.code(),
                    tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
                ) && service.container.pull_policy != pb::PullPolicy::Always as i32 =>
            {
                console.warn(&format!(
                    "pre-pull failed ({}); starting from what the host has",
                    status.message()
                ))?;
            }
            Err(status) => return Err(status.into()),
        }
    }
    // No deadline here: the daemon bounds the pull with its own pull_deadline_seconds.
    let container = client
        .start_container(pb::StartContainerRequest {
            order_id,
            project: console.project(),
            name: service.name,
            container: Some(service.container),
        })
        .await?
        .into_inner();
    if console.json() {
        output::write_json(console.out, &output::container_json(&container))
    } else {
        output::write_container_detail(console.out, &container)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: &str = "\
version: v1
kind: Service
metadata:
  name: private-image-demo
container:
  image: registry.example.com/my-team/private-app:latest
  pull_secret: secret-abcdef123
";

    fn parse(text: &str) -> Result<Service, CmdError> {
        parse_service(Path::new("svc.yaml"), text)
    }

    fn error_line(text: &str) -> String {
        parse(text).unwrap_err().describe()
    }

    #[test]
    fn seed_file_parses() {
        let service = parse(SEED).unwrap();
        assert_eq!(
            service,
            Service {
                name: "private-image-demo".to_owned(),
                container: pb::ContainerSpec {
                    image: "registry.example.com/my-team/private-app:latest".to_owned(),
                    pull_secret: "secret-abcdef123".to_owned(),
                    command: Vec::new(),
                    args: Vec::new(),
                    env: Default::default(),
                    pull_policy: pb::PullPolicy::IfNotPresent as i32,
                },
            }
        );
    }

    #[test]
    fn optional_fields_parse() {
        let text = format!(
            "{SEED}  command: [/app]\n  args: [--port, \"8080\"]\n  env:\n    MODE: demo\n    EMPTY: \"\"\n  pull_policy: Always\n"
        );
        let service = parse(&text).unwrap();
        assert_eq!(service.container.command, ["/app"]);
        assert_eq!(service.container.args, ["--port", "8080"]);
        assert_eq!(
            service.container.env.get("MODE").map(String::as_str),
            Some("demo")
        );
        assert_eq!(
            service.container.env.get("EMPTY").map(String::as_str),
            Some("")
        );
        assert_eq!(service.container.pull_policy, pb::PullPolicy::Always as i32);
    }

    #[test]
    fn pull_policy_spellings() {
        for (spelling, expected) in [
            ("IfNotPresent", pb::PullPolicy::IfNotPresent),
            ("if_not_present", pb::PullPolicy::IfNotPresent),
            ("IF_NOT_PRESENT", pb::PullPolicy::IfNotPresent),
            ("if-not-present", pb::PullPolicy::IfNotPresent),
            ("always", pb::PullPolicy::Always),
            ("ALWAYS", pb::PullPolicy::Always),
            ("Never", pb::PullPolicy::Never),
        ] {
            let service = parse(&format!("{SEED}  pull_policy: {spelling}\n")).unwrap();
            assert_eq!(service.container.pull_policy, expected as i32, "{spelling}");
        }
        let line = error_line(&format!("{SEED}  pull_policy: Sometimes\n"));
        assert!(line.contains("pull_policy"), "{line}");
        assert!(line.contains("Sometimes"), "{line}");
    }

    #[test]
    fn pull_secret_is_optional() {
        let text = SEED.replace("  pull_secret: secret-abcdef123\n", "");
        assert_eq!(parse(&text).unwrap().container.pull_secret, "");
    }

    #[test]
    fn wrong_kind_is_refused() {
        let line = error_line(&SEED.replace("kind: Service", "kind: Deployment"));
        assert!(line.contains("`kind`"), "{line}");
        assert!(line.contains("Deployment"), "{line}");
        assert!(line.contains("svc.yaml"), "{line}");
    }

    #[test]
    fn wrong_version_is_refused() {
        let line = error_line(&SEED.replace("version: v1", "version: v2"));
        assert!(line.contains("`version`"), "{line}");
        assert!(line.contains("v2"), "{line}");
    }

    #[test]
    fn missing_image_is_refused() {
        let line = error_line(&SEED.replace(
            "  image: registry.example.com/my-team/private-app:latest\n",
            "",
        ));
        assert!(line.contains("image"), "{line}");
        assert!(line.contains("line"), "{line}");
        let empty = error_line(&SEED.replace(
            "image: registry.example.com/my-team/private-app:latest",
            "image: \"\"",
        ));
        assert!(empty.contains("container.image"), "{empty}");
    }

    #[test]
    fn unknown_keys_are_refused_at_every_level() {
        for (text, key) in [
            (format!("{SEED}replicas: 3\n"), "replicas"),
            (
                SEED.replace("  name: private", "  namespace: x\n  name: private"),
                "namespace",
            ),
            (format!("{SEED}  ports: [80]\n"), "ports"),
            (format!("{SEED}  pullSecret: x\n"), "pullSecret"),
        ] {
            let line = error_line(&text);
            assert!(line.contains(key), "{key}: {line}");
            assert!(line.contains("line"), "{key}: {line}");
        }
    }

    #[test]
    fn missing_sections_are_named() {
        let line = error_line("version: v1\nkind: Service\nmetadata:\n  name: x\n");
        assert!(line.contains("container"), "{line}");
        let line = error_line("version: v1\nkind: Service\ncontainer:\n  image: x\n");
        assert!(line.contains("metadata"), "{line}");
    }

    #[test]
    fn env_values_must_be_strings() {
        let line = error_line(&format!("{SEED}  env:\n    PORT: [1]\n"));
        assert!(line.contains("env"), "{line}");
    }

    #[test]
    fn order_ids_are_fresh() {
        let first = fresh_order_id();
        let second = fresh_order_id();
        assert!(first.starts_with("cli-"), "{first}");
        assert_ne!(first, second);
    }
}
