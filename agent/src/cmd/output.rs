//! What the CLI prints: text tables and detail views, or JSON with the proto field names
//! (snake_case, enums by name, timestamps in RFC 3339).

use std::io::Write;

use prost_types::Timestamp;
use serde_json::{json, Value};

use super::CmdError;
use crate::api::pb;

pub(super) fn container_json(container: &pb::Container) -> Value {
    json!({
        "id": container.id,
        "order_id": container.order_id,
        "project": container.project,
        "name": container.name,
        "image": container.image,
        "image_digest": container.image_digest,
        "state": state_json(container.state),
        "exit_code": container.exit_code,
        "log_path": container.log_path,
        "created_at": timestamp_json(container.created_at.as_ref()),
        "started_at": timestamp_json(container.started_at.as_ref()),
        "finished_at": timestamp_json(container.finished_at.as_ref()),
    })
}

pub(super) fn secret_json(secret: &pb::Secret) -> Value {
    json!({
        "id": secret.id,
        "project": secret.project,
        "name": secret.name,
        "kind": secret.kind,
        "server": secret.server,
        "created_at": timestamp_json(secret.created_at.as_ref()),
    })
}

/// One pull event in the proto JSON shape of a oneof: `{"resolved": {..}}`, `{"layer": {..}}`
/// or `{"done": {..}}`; `{}` for an event this CLI does not know.
pub(super) fn pull_event_json(event: &pb::PullEvent) -> Value {
    match &event.event {
        Some(pb::pull_event::Event::Resolved(resolved)) => json!({
            "resolved": {
                "image": resolved.image,
                "digest": resolved.digest,
                "layers": resolved.layers,
                "total_bytes": resolved.total_bytes,
            }
        }),
        Some(pb::pull_event::Event::Layer(layer)) => json!({
            "layer": {
                "digest": layer.digest,
                "done_bytes": layer.done_bytes,
                "total_bytes": layer.total_bytes,
                "cached": layer.cached,
            }
        }),
        Some(pb::pull_event::Event::Done(done)) if done.signature.is_empty() => {
            json!({ "done": { "digest": done.digest } })
        }
        Some(pb::pull_event::Event::Done(done)) => {
            json!({ "done": { "digest": done.digest, "signature": done.signature } })
        }
        Some(pb::pull_event::Event::Queued(queued)) => json!({
            "queued": { "image": queued.image, "position": queued.position }
        }),
        None => json!({}),
    }
}

/// One pull event as a line of text; `None` for an event this CLI does not know.
pub(super) fn pull_event_line(event: &pb::PullEvent) -> Option<String> {
    match &event.event {
        Some(pb::pull_event::Event::Resolved(resolved)) => Some(format!(
            "resolved {} {} ({} layers, {} bytes)",
            resolved.image, resolved.digest, resolved.layers, resolved.total_bytes
        )),
        Some(pb::pull_event::Event::Layer(layer)) if layer.cached => {
            Some(format!("layer {} cached", layer.digest))
        }
        Some(pb::pull_event::Event::Layer(layer)) => Some(format!(
            "layer {} {}/{} bytes",
            layer.digest, layer.done_bytes, layer.total_bytes
        )),
        Some(pb::pull_event::Event::Done(done)) if done.signature == "verified" => {
            Some(format!("signature verified\ndone {}", done.digest))
        }
        Some(pb::pull_event::Event::Done(done)) => Some(format!("done {}", done.digest)),
        Some(pb::pull_event::Event::Queued(queued)) => Some(format!(
            "queued {} (position {} in this host's pull queue)",
            queued.image, queued.position
        )),
        None => None,
    }
}

/// The enum name (`"RUNNING"`), or the number when this CLI does not know it.
fn state_json(state: i32) -> Value {
    match pb::ContainerState::try_from(state) {
        Ok(known) => Value::from(known.as_str_name()),
        Err(_) => Value::from(state),
    }
}

pub(super) fn state_text(state: i32) -> String {
    match pb::ContainerState::try_from(state) {
        Ok(known) => known.as_str_name().to_owned(),
        Err(_) => state.to_string(),
    }
}

fn timestamp_json(timestamp: Option<&Timestamp>) -> Value {
    timestamp.map_or(Value::Null, |timestamp| Value::from(timestamp.to_string()))
}

/// RFC 3339 to the second, `-` when absent.
pub(super) fn timestamp_text(timestamp: Option<&Timestamp>) -> String {
    timestamp.map_or_else(
        || "-".to_owned(),
        |timestamp| {
            Timestamp {
                seconds: timestamp.seconds,
                nanos: 0,
            }
            .to_string()
        },
    )
}

pub(super) fn write_json(out: &mut dyn Write, value: &Value) -> Result<(), CmdError> {
    let text =
        serde_json::to_string_pretty(value).map_err(|error| CmdError::Output(error.into()))?;
    writeln!(out, "{text}").map_err(CmdError::Output)
}

/// One JSON value on one line (for streams).
pub(super) fn write_json_line(out: &mut dyn Write, value: &Value) -> Result<(), CmdError> {
    let text = serde_json::to_string(value).map_err(|error| CmdError::Output(error.into()))?;
    writeln!(out, "{text}").map_err(CmdError::Output)?;
    out.flush().map_err(CmdError::Output)
}

pub(super) fn write_line(out: &mut dyn Write, line: &str) -> Result<(), CmdError> {
    writeln!(out, "{line}").map_err(CmdError::Output)
}

/// Left-aligned columns separated by at least two spaces; the last column is not padded.
pub(super) fn write_table(
    out: &mut dyn Write,
    headers: &[&str],
    rows: &[Vec<String>],
) -> Result<(), CmdError> {
    let mut widths: Vec<usize> = headers
        .iter()
        .map(|header| header.chars().count())
        .collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let header_row: Vec<String> = headers.iter().map(|header| (*header).to_owned()).collect();
    for row in std::iter::once(&header_row).chain(rows) {
        let mut line = String::new();
        for (index, (cell, width)) in row.iter().zip(&widths).enumerate() {
            if index + 1 == row.len().min(widths.len()) {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<width$}  "));
            }
        }
        writeln!(out, "{}", line.trim_end()).map_err(CmdError::Output)?;
    }
    Ok(())
}

pub(super) fn write_container_table(
    out: &mut dyn Write,
    containers: &[pb::Container],
) -> Result<(), CmdError> {
    let rows: Vec<Vec<String>> = containers
        .iter()
        .map(|container| {
            vec![
                container.id.clone(),
                container.name.clone(),
                container.image.clone(),
                state_text(container.state),
                exit_text(container),
                timestamp_text(container.created_at.as_ref()),
            ]
        })
        .collect();
    write_table(
        out,
        &["ID", "NAME", "IMAGE", "STATE", "EXIT", "CREATED"],
        &rows,
    )
}

/// The exit code once the container has exited, `-` before.
fn exit_text(container: &pb::Container) -> String {
    if container.state == pb::ContainerState::Exited as i32 {
        container.exit_code.to_string()
    } else {
        "-".to_owned()
    }
}

pub(super) fn write_container_detail(
    out: &mut dyn Write,
    container: &pb::Container,
) -> Result<(), CmdError> {
    let fields = [
        ("id", container.id.clone()),
        ("order_id", container.order_id.clone()),
        ("project", container.project.clone()),
        ("name", container.name.clone()),
        ("image", container.image.clone()),
        ("image_digest", container.image_digest.clone()),
        ("state", state_text(container.state)),
        ("exit_code", exit_text(container)),
        ("log_path", container.log_path.clone()),
        ("created_at", timestamp_text(container.created_at.as_ref())),
        ("started_at", timestamp_text(container.started_at.as_ref())),
        (
            "finished_at",
            timestamp_text(container.finished_at.as_ref()),
        ),
    ];
    for (name, value) in fields {
        let label = format!("{name}:");
        writeln!(out, "{label:<14}{value}").map_err(CmdError::Output)?;
    }
    Ok(())
}

pub(super) fn write_secret_table(
    out: &mut dyn Write,
    secrets: &[pb::Secret],
) -> Result<(), CmdError> {
    let rows: Vec<Vec<String>> = secrets
        .iter()
        .map(|secret| {
            vec![
                secret.id.clone(),
                secret.name.clone(),
                secret.kind.clone(),
                secret.server.clone(),
                timestamp_text(secret.created_at.as_ref()),
            ]
        })
        .collect();
    write_table(out, &["ID", "NAME", "KIND", "SERVER", "CREATED"], &rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exited_container() -> pb::Container {
        pb::Container {
            id: "c-1".to_owned(),
            order_id: "o-1".to_owned(),
            project: "default".to_owned(),
            name: "web".to_owned(),
            image: "registry.example.com/team/app:1".to_owned(),
            image_digest: "sha256:abc".to_owned(),
            state: pb::ContainerState::Exited as i32,
            exit_code: 3,
            log_path: "/var/lib/berth/logs/c-1.log".to_owned(),
            created_at: Some(Timestamp {
                seconds: 1_700_000_000,
                nanos: 500_000_000,
            }),
            started_at: Some(Timestamp {
                seconds: 1_700_000_001,
                nanos: 0,
            }),
            finished_at: None,
        }
    }

    #[test]
    fn container_json_uses_proto_names_enum_names_and_rfc3339() {
        let value = container_json(&exited_container());
        assert_eq!(
            value,
            json!({
                "id": "c-1",
                "order_id": "o-1",
                "project": "default",
                "name": "web",
                "image": "registry.example.com/team/app:1",
                "image_digest": "sha256:abc",
                "state": "EXITED",
                "exit_code": 3,
                "log_path": "/var/lib/berth/logs/c-1.log",
                "created_at": "2023-11-14T22:13:20.500Z",
                "started_at": "2023-11-14T22:13:21Z",
                "finished_at": null,
            })
        );
    }

    #[test]
    fn unknown_state_is_kept_as_a_number() {
        let mut container = exited_container();
        container.state = 42;
        assert_eq!(container_json(&container)["state"], json!(42));
        container.state = pb::ContainerState::Running as i32;
        assert_eq!(container_json(&container)["state"], json!("RUNNING"));
    }

    #[test]
    fn secret_json_shape() {
        let secret = pb::Secret {
            id: "secret-1".to_owned(),
            project: "default".to_owned(),
            name: "hub".to_owned(),
            kind: "docker".to_owned(),
            server: "docker.io".to_owned(),
            created_at: None,
        };
        assert_eq!(
            secret_json(&secret),
            json!({
                "id": "secret-1",
                "project": "default",
                "name": "hub",
                "kind": "docker",
                "server": "docker.io",
                "created_at": null,
            })
        );
    }

    #[test]
    fn pull_events() {
        let layer = pb::PullEvent {
            event: Some(pb::pull_event::Event::Layer(pb::LayerProgress {
                digest: "sha256:l1".to_owned(),
                done_bytes: 10,
                total_bytes: 20,
                cached: false,
            })),
        };
        assert_eq!(
            pull_event_json(&layer),
            json!({"layer": {"digest": "sha256:l1", "done_bytes": 10, "total_bytes": 20, "cached": false}})
        );
        assert_eq!(
            pull_event_line(&layer).unwrap(),
            "layer sha256:l1 10/20 bytes"
        );
        let done = pb::PullEvent {
            event: Some(pb::pull_event::Event::Done(pb::Done {
                digest: "sha256:m".to_owned(),
                ..pb::Done::default()
            })),
        };
        assert_eq!(
            pull_event_json(&done),
            json!({"done": {"digest": "sha256:m"}})
        );
        assert_eq!(pull_event_line(&done).unwrap(), "done sha256:m");
        let queued = pb::PullEvent {
            event: Some(pb::pull_event::Event::Queued(pb::Queued {
                image: "r/app:1".to_owned(),
                position: 2,
            })),
        };
        assert_eq!(
            pull_event_json(&queued),
            json!({"queued": {"image": "r/app:1", "position": 2}})
        );
        assert_eq!(
            pull_event_line(&queued).unwrap(),
            "queued r/app:1 (position 2 in this host's pull queue)"
        );
        assert!(pull_event_line(&pb::PullEvent { event: None }).is_none());
    }

    #[test]
    fn container_table() {
        let mut running = exited_container();
        running.id = "c-22".to_owned();
        running.state = pb::ContainerState::Running as i32;
        running.created_at = None;
        let mut out = Vec::new();
        write_container_table(&mut out, &[exited_container(), running]).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("ID    NAME  IMAGE"), "{text}");
        assert!(
            lines[1].contains("EXITED   3     2023-11-14T22:13:20Z"),
            "{text}"
        );
        assert!(lines[2].starts_with("c-22  web"), "{text}");
        assert!(lines[2].contains("RUNNING  -     -"), "{text}");
    }

    #[test]
    fn container_detail_lists_every_field() {
        let mut out = Vec::new();
        write_container_detail(&mut out, &exited_container()).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.lines().count(), 12);
        assert!(text.contains("state:        EXITED\n"), "{text}");
        assert!(text.contains("finished_at:  -\n"), "{text}");
    }
}
