//! The CLI steps of a product test, as an operator takes them (the seed flow): create a secret
//! (password from stdin, or a key file), create a service from YAML, `berth get` it until it has
//! exited, and read its output from its log file and `berth logs`.

use std::os::unix::fs::PermissionsExt as _;
use std::path::PathBuf;

use anyhow::{bail, Context as _};
use serde_json::Value;

use super::env::{is_secret_id, Env};
use super::wait::{wait_for, ORDER_TIMEOUT};

/// The seed's service YAML.
#[derive(Debug, Clone, Copy)]
pub struct ServiceYaml<'a> {
    /// `metadata.name`.
    pub name: &'a str,
    pub image: &'a str,
    pub pull_secret: &'a str,
    /// `IfNotPresent`, `Always` or `Never`.
    pub pull_policy: &'a str,
}

/// What `berth --output json get` showed for a service that exited 0.
#[derive(Debug, Clone)]
pub struct ServiceRun {
    pub id: String,
    pub order_id: String,
    pub image_digest: String,
    /// The container's output file.
    pub log_path: String,
}

/// A proto3 JSON enum or number field that may be left out when it holds its default.
fn field<'a>(container: &'a Value, name: &str) -> Option<&'a Value> {
    container.get(name).filter(|value| !value.is_null())
}

impl Env {
    /// `berth secret <kind> create --name N --server S --username U --password-stdin` (kind
    /// docker or acr); the id it printed.
    pub async fn cli_create_password_secret(
        &self,
        kind: &str,
        name: &str,
        server: &str,
        username: &str,
        password: &str,
    ) -> anyhow::Result<String> {
        let stdout = self
            .berthd
            .cli_ok(
                &[
                    "secret",
                    kind,
                    "create",
                    "--name",
                    name,
                    "--server",
                    server,
                    "--username",
                    username,
                    "--password-stdin",
                ],
                Some(&format!("{password}\n")),
            )
            .await?;
        secret_id_from(&stdout)
    }

    /// `berth secret gar create --name N --server S --json_key FILE`, the key in a 0600 file;
    /// the id it printed.
    pub async fn cli_create_gar_secret(
        &self,
        name: &str,
        server: &str,
        json_key: &str,
    ) -> anyhow::Result<String> {
        let path = self.write_private_file(&format!("{name}.json"), json_key)?;
        let stdout = self
            .berthd
            .cli_ok(
                &[
                    "secret",
                    "gar",
                    "create",
                    "--name",
                    name,
                    "--server",
                    server,
                    "--json_key",
                    &path.to_string_lossy(),
                ],
                None,
            )
            .await?;
        secret_id_from(&stdout)
    }

    /// Writes `contents` to `file_name` in the scratch dir, mode 0600.
    pub fn write_private_file(&self, file_name: &str, contents: &str) -> anyhow::Result<PathBuf> {
        let path = self.scratch_dir().join(file_name);
        std::fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("making {} 0600", path.display()))?;
        Ok(path)
    }

    /// `berth service create --file` for `service`, `berth get` until EXITED with exit code 0,
    /// then `output` in the container's log file and in `berth logs`.
    pub async fn cli_run_service(
        &self,
        service: &ServiceYaml<'_>,
        output: &str,
    ) -> anyhow::Result<ServiceRun> {
        let ServiceYaml {
            name,
            image,
            pull_secret,
            pull_policy,
        } = *service;
        let yaml_path = self.scratch_dir().join(format!("{name}.yaml"));
        std::fs::write(
            &yaml_path,
            format!(
                "version: v1\nkind: Service\nmetadata:\n  name: {name}\ncontainer:\n  image: {image}\n  pull_secret: {pull_secret}\n  pull_policy: {pull_policy}\n"
            ),
        )
        .with_context(|| format!("writing {}", yaml_path.display()))?;
        let created = self
            .berthd
            .cli(
                &["service", "create", "--file", &yaml_path.to_string_lossy()],
                None,
            )
            .await?;
        if !created.status.success() {
            bail!(
                "berth service create for {image} failed ({}):\nstderr: {}\nberthd log:\n{}",
                created.status,
                String::from_utf8_lossy(&created.stderr),
                self.berthd.log_tail()
            );
        }
        let container: Value = wait_for(
            &format!("`berth get {name}` to show EXITED"),
            ORDER_TIMEOUT,
            || async {
                let output = self
                    .berthd
                    .cli(&["--output", "json", "get", name], None)
                    .await?;
                if !output.status.success() {
                    return Ok(None);
                }
                let container: Value = serde_json::from_slice(&output.stdout)?;
                Ok((field(&container, "state") == Some(&Value::from("EXITED")))
                    .then_some(container))
            },
        )
        .await
        .map_err(|failure| failure.context(format!("berthd log:\n{}", self.berthd.log_tail())))?;
        let exit_code = field(&container, "exit_code")
            .and_then(Value::as_i64)
            .unwrap_or(0);
        if exit_code != 0 || container["image"] != image {
            bail!(
                "{name} ran {} and exited {exit_code}: {container}",
                container["image"]
            );
        }
        let text = |key: &str| container[key].as_str().unwrap_or_default().to_owned();
        let run = ServiceRun {
            id: text("id"),
            order_id: text("order_id"),
            image_digest: text("image_digest"),
            log_path: text("log_path"),
        };
        if run.log_path.is_empty() {
            bail!("no log_path in {container}");
        }
        wait_for(
            &format!("{} to hold {output:?}", run.log_path),
            ORDER_TIMEOUT,
            || async {
                let log = std::fs::read_to_string(&run.log_path).unwrap_or_default();
                Ok(log.contains(output).then_some(()))
            },
        )
        .await?;
        let logs = self.berthd.cli_ok(&["logs", name], None).await?;
        if !logs.contains(output) {
            bail!("berth logs {name} printed {logs:?}, without {output:?}");
        }
        Ok(run)
    }
}

/// The id a `secret ... create` printed, alone on stdout.
fn secret_id_from(stdout: &str) -> anyhow::Result<String> {
    let id = stdout.trim();
    if !is_secret_id(id) {
        bail!("`secret create` printed {stdout:?}, not a secret id");
    }
    Ok(id.to_owned())
}
