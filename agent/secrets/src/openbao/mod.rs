//! The `openbao` backend: pull secrets kept in OpenBao (or HashiCorp Vault, same API) KV v2.
//!
//! Layout, documented in the README so that a control plane can write secrets there directly:
//! one KV v2 secret per pull secret at `<mount>/data/<prefix>/<project>/<secret id>`, with string
//! fields `kind` (`docker`, `acr` or `gar`), `server`, `name`, the kind's material (`username` and
//! `password`, or `json_key`) and, when berth wrote it, `created_at` (unix seconds; otherwise the
//! time the current version was written). Reads take the latest version; a deleted latest version
//! (soft delete) or a deleted secret is NotFound.
//!
//! Nothing is cached and nothing is written to disk: every `get` asks OpenBao, so a rotated
//! password is used on the next pull, and a secret deleted there is NotFound on the next order.
//!
//! - `client`: HTTP to OpenBao. berth's token goes only to `address`; bodies with material are
//!   read into zeroized buffers; answers become [`SecretError`]s (down or sealed: `Unavailable`,
//!   refused by the agent's policy: `Denied`).
//! - `session`: berth's own token: AppRole login or `token_file`, renewed at 2/3 of its TTL by a
//!   task the store owns, and replaced by a new login when renewal fails.

mod client;
mod session;
mod transport;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::{StreamExt as _, TryStreamExt as _};
use reqwest::{Method, StatusCode};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};
use zeroize::{Zeroize, ZeroizeOnDrop};

use self::client::Client;
pub use self::session::Login;
use self::transport::Answer;
use super::fields::{self, FieldsIn, FieldsOut, Reading};
use super::{
    is_secret_name, normalize_server, validate_credential, NewSecret, SecretError, SecretId,
    SecretKind, SecretMeta, StoredSecret,
};

/// How many secrets `list` reads at once.
const LIST_CONCURRENCY: usize = 8;

/// Fresh ids tried when the first one is (very unlikely) taken.
const CREATE_ATTEMPTS: usize = 4;

/// What the openbao store needs, made from `[secrets.openbao]` at start-up.
#[derive(Debug, Clone)]
pub struct OpenbaoSettings {
    /// `http(s)://host[:port]`, no trailing slash.
    pub address: String,
    pub mount: String,
    pub prefix: String,
    pub login: Login,
    /// `ca_file` and `[registry] ca_files`, trusted beside the system roots.
    pub ca_pems: Vec<Vec<u8>>,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
}

/// Where berth's secrets live under the KV v2 mount.
#[derive(Debug, Clone)]
struct Layout {
    mount: String,
    prefix: String,
}

impl Layout {
    /// `<mount>/data/<prefix>/<project>/<id>`: read and write the latest version.
    fn data(&self, project: &str, id: &SecretId) -> String {
        format!("{}/data/{}/{project}/{id}", self.mount, self.prefix)
    }

    /// `<mount>/metadata/<prefix>/<project>/<id>`: delete every version.
    fn metadata(&self, project: &str, id: &SecretId) -> String {
        format!("{}/metadata/{}/{project}/{id}", self.mount, self.prefix)
    }

    /// `<mount>/metadata/<prefix>/<project>`: LIST the project's ids.
    fn project(&self, project: &str) -> String {
        format!("{}/metadata/{}/{project}", self.mount, self.prefix)
    }
}

/// The `openbao` secret store. The daemon holds one (behind an `Arc`); dropping it stops the
/// token renewal.
pub struct OpenbaoStore {
    client: Arc<Client>,
    layout: Layout,
    /// Serialises this agent's create and delete, so the name check and the write are one step.
    /// (Agents on other hosts are not serialised with it; let one place create secrets.)
    write_lock: tokio::sync::Mutex<()>,
    _renewal: RenewalTask,
}

impl std::fmt::Debug for OpenbaoStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenbaoStore")
            .field("address", &self.client.address())
            .field("mount", &self.layout.mount)
            .field("prefix", &self.layout.prefix)
            .finish_non_exhaustive()
    }
}

/// The token renewal task, aborted when the store drops.
#[derive(Debug)]
struct RenewalTask(tokio::task::JoinHandle<()>);

impl Drop for RenewalTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl OpenbaoStore {
    /// Checks the credential files and starts the token task (which logs in at once, and keeps
    /// retrying while OpenBao is down). Needs a tokio runtime; does not wait for OpenBao.
    pub fn open(settings: &OpenbaoSettings) -> Result<OpenbaoStore, SecretError> {
        settings.login.check_files()?;
        let client = Arc::new(Client::new(settings)?);
        if settings.address.starts_with("http://") {
            warn!(address = %settings.address, "openbao address is plain http; berth's token is sent unencrypted");
        }
        let renewal = RenewalTask(tokio::spawn(client::keep_token_fresh(Arc::clone(&client))));
        info!(address = %settings.address, mount = %settings.mount, prefix = %settings.prefix, login = settings.login.method(), "secret store: openbao");
        Ok(OpenbaoStore {
            client,
            layout: Layout {
                mount: settings.mount.clone(),
                prefix: settings.prefix.clone(),
            },
            write_lock: tokio::sync::Mutex::new(()),
            _renewal: renewal,
        })
    }

    /// Stores an already validated secret (see `SecretStore::create`) under a fresh id.
    pub async fn create(&self, new: NewSecret) -> Result<SecretMeta, SecretError> {
        let _guard = self.write_lock.lock().await;
        if self
            .list(&new.project)
            .await?
            .iter()
            .any(|meta| meta.name == new.name)
        {
            return Err(SecretError::NameTaken { name: new.name });
        }
        let created_secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since_epoch| since_epoch.as_secs());
        let body = write_body(&new, created_secs)?;
        for _ in 0..CREATE_ATTEMPTS {
            let id = SecretId::generate();
            let path = self.layout.data(&new.project, &id);
            let answer = self
                .client
                .call(Method::POST, &path, Some(body.clone()))
                .await?;
            if answer.status.is_success() {
                info!(secret_id = %id, "secret created in openbao");
                return Ok(SecretMeta {
                    id,
                    project: new.project,
                    name: new.name,
                    kind: new.kind,
                    server: new.server,
                    created_at: UNIX_EPOCH + Duration::from_secs(created_secs),
                });
            }
            // `cas = 0`: the id exists already; draw another.
            if answer.status == StatusCode::BAD_REQUEST && answer.mentions("check-and-set") {
                continue;
            }
            return Err(self.unexpected(&path, &answer, "the write was refused"));
        }
        Err(SecretError::Backend {
            address: self.client.address().to_owned(),
            path: self.layout.project(&new.project),
            reason: "no free secret id after several attempts",
        })
    }

    /// The latest version of secret `id` of `project`.
    pub async fn get(&self, project: &str, id: &SecretId) -> Result<StoredSecret, SecretError> {
        let path = self.layout.data(project, id);
        let answer = self.client.call(Method::GET, &path, None).await?;
        match answer.status {
            StatusCode::OK => parse_secret(project, id, &answer.body),
            StatusCode::NOT_FOUND => Err(SecretError::NotFound {
                id: id.as_str().to_owned(),
            }),
            _ => Err(self.unexpected(&path, &answer, "the read was refused")),
        }
    }

    /// Metadata of every readable secret of `project`. A secret that does not follow the layout
    /// is skipped with a warning, so one bad entry does not hide the others.
    pub async fn list(&self, project: &str) -> Result<Vec<SecretMeta>, SecretError> {
        let path = self.layout.project(project);
        let answer = self.client.call(list_method(), &path, None).await?;
        let ids: Vec<SecretId> = match answer.status {
            StatusCode::OK => {
                let listing: ListAnswer = answer.json(self.client.address(), &path)?;
                listing
                    .data
                    .keys
                    .iter()
                    // Folders end in '/'; anything else that is not an id is not ours.
                    .filter_map(|key| SecretId::parse(key).ok())
                    .collect()
            }
            StatusCode::NOT_FOUND => return Ok(Vec::new()),
            _ => return Err(self.unexpected(&path, &answer, "the listing was refused")),
        };
        futures::stream::iter(ids)
            .map(|id| async move {
                match self.get(project, &id).await {
                    // The credential is dropped (and zeroized) here; only metadata is kept.
                    Ok(stored) => Ok(Some(stored.meta)),
                    // Deleted between the listing and the read, or only soft-deleted.
                    Err(SecretError::NotFound { .. }) => Ok(None),
                    Err(err @ SecretError::Malformed { .. }) => {
                        warn!(secret_id = %id, error = %err, "skipping openbao secret that does not follow the layout");
                        Ok(None)
                    }
                    Err(other) => Err(other),
                }
            })
            .buffer_unordered(LIST_CONCURRENCY)
            .try_filter_map(|meta| async move { Ok(meta) })
            .try_collect()
            .await
    }

    /// Removes secret `id` of `project` with all its versions and metadata.
    pub async fn delete(&self, project: &str, id: &SecretId) -> Result<(), SecretError> {
        let _guard = self.write_lock.lock().await;
        // Absent (or soft-deleted) is NotFound, as in the file store; the body is dropped unread.
        let data_path = self.layout.data(project, id);
        let answer = self.client.call(Method::GET, &data_path, None).await?;
        match answer.status {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => {
                return Err(SecretError::NotFound {
                    id: id.as_str().to_owned(),
                })
            }
            _ => return Err(self.unexpected(&data_path, &answer, "the read was refused")),
        }
        let path = self.layout.metadata(project, id);
        let answer = self.client.call(Method::DELETE, &path, None).await?;
        if !answer.status.is_success() {
            return Err(self.unexpected(&path, &answer, "the delete was refused"));
        }
        info!(secret_id = %id, "secret deleted from openbao");
        Ok(())
    }

    fn unexpected(&self, path: &str, answer: &Answer, reason: &'static str) -> SecretError {
        warn!(address = %self.client.address(), path, status = %answer.status, "unexpected answer from openbao");
        SecretError::Backend {
            address: self.client.address().to_owned(),
            path: path.to_owned(),
            reason,
        }
    }
}

/// OpenBao's LIST verb (the same as `GET ?list=true`).
fn list_method() -> Method {
    Method::from_bytes(b"LIST").expect("invariant: LIST is a valid method token")
}

/// The KV v2 write body: `{"options":{"cas":0},"data":{...}}`, in a zeroized buffer that the
/// request body owns (dropped, and zeroized, with the last copy of the request).
fn write_body(new: &NewSecret, created_secs: u64) -> Result<Bytes, SecretError> {
    let credential = FieldsOut::new(&new.credential);
    let created_at = created_secs.to_string();
    let body = WriteBody {
        options: WriteOptions { cas: 0 },
        data: DocumentOut {
            kind: new.kind.as_str(),
            server: &new.server,
            name: &new.name,
            created_at: &created_at,
            credential: &credential,
        },
    };
    let buffer = fields::encode(&body, &credential, new.name.len() + new.server.len())?;
    Ok(Bytes::from_owner(buffer))
}

#[derive(Serialize)]
struct WriteBody<'a> {
    options: WriteOptions,
    data: DocumentOut<'a>,
}

/// Check-and-set: `cas = 0` writes only when the path holds no secret yet.
#[derive(Serialize)]
struct WriteOptions {
    cas: u64,
}

/// The KV document as berth writes it (borrows; serialised into a zeroized buffer).
#[derive(Serialize)]
struct DocumentOut<'a> {
    kind: &'a str,
    server: &'a str,
    name: &'a str,
    created_at: &'a str,
    #[serde(flatten)]
    credential: &'a FieldsOut<'a>,
}

/// `GET <mount>/data/...`: `{"data": {"data": {...}, "metadata": {...}}}`.
#[derive(Deserialize)]
struct ReadAnswer {
    data: ReadData,
}

#[derive(Deserialize)]
struct ReadData {
    data: Option<DocumentIn>,
    #[serde(default)]
    metadata: Option<VersionMetadata>,
}

#[derive(Deserialize)]
struct VersionMetadata {
    #[serde(default)]
    created_time: Option<String>,
}

/// The KV document as read: every field optional (a control plane may write it), other fields
/// ignored. Zeroized on drop; material is taken out of it.
#[derive(Deserialize, Zeroize, ZeroizeOnDrop)]
struct DocumentIn {
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    server: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    json_key: Option<String>,
    /// Unix seconds, as a string (berth, `bao kv put`) or a number.
    #[serde(default)]
    #[zeroize(skip)]
    created_at: Option<serde_json::Value>,
}

/// `LIST <mount>/metadata/...`: `{"data": {"keys": [...]}}`.
#[derive(Deserialize)]
struct ListAnswer {
    data: ListData,
}

#[derive(Deserialize)]
struct ListData {
    #[serde(default)]
    keys: Vec<String>,
}

/// A KV read answer → the stored secret; anything off-layout is [`SecretError::Malformed`].
fn parse_secret(project: &str, id: &SecretId, body: &[u8]) -> Result<StoredSecret, SecretError> {
    let malformed = |reason| SecretError::Malformed {
        id: id.as_str().to_owned(),
        reason,
    };
    let answer: ReadAnswer = serde_json::from_slice(body)
        .map_err(|_| malformed("the fields must be strings in a KV v2 secret"))?;
    let ReadData { data, metadata } = answer.data;
    let mut document = data.ok_or_else(|| malformed("the secret has no data"))?;
    let kind: SecretKind = document
        .kind
        .as_deref()
        .ok_or_else(|| malformed("field kind is missing"))?
        .parse()
        .map_err(|_| malformed("field kind must be docker, acr or gar"))?;
    let name = document
        .name
        .take()
        .filter(|name| is_secret_name(name))
        .ok_or_else(|| malformed("field name is missing or not a valid secret name"))?;
    let server = document
        .server
        .as_deref()
        .ok_or_else(|| malformed("field server is missing"))
        .and_then(|server| {
            normalize_server(server).map_err(|_| malformed("field server is not host[:port]"))
        })?;
    // Lenient: `echo "$PW" | bao kv put ... password=-` keeps echo's newline, and a control
    // plane may keep fields of its own beside berth's.
    let credential = FieldsIn {
        username: document.username.take(),
        password: document.password.take(),
        json_key: document.json_key.take(),
    }
    .into_credential(kind, Reading::Lenient)
    .map_err(malformed)?;
    validate_credential(kind, &credential).map_err(|err| match err {
        SecretError::Invalid { reason, .. } => malformed(reason),
        _ => malformed("the credential is not usable"),
    })?;
    let created_secs = document
        .created_at
        .as_ref()
        .and_then(unix_seconds)
        .or_else(|| {
            metadata
                .and_then(|metadata| metadata.created_time)
                .as_deref()
                .and_then(rfc3339_unix_seconds)
        })
        .unwrap_or(0);
    let meta = SecretMeta {
        id: id.clone(),
        project: project.to_owned(),
        name,
        kind,
        server,
        created_at: UNIX_EPOCH + Duration::from_secs(created_secs),
    };
    Ok(StoredSecret { meta, credential })
}

/// `"1767225600"` or `1767225600`.
fn unix_seconds(value: &serde_json::Value) -> Option<u64> {
    match value {
        serde_json::Value::String(text) => text.trim().parse().ok(),
        serde_json::Value::Number(number) => number.as_u64(),
        _ => None,
    }
}

/// `2026-11-29T13:27:07.692689215Z` (OpenBao's `created_time`, always UTC) → unix seconds.
pub fn rfc3339_unix_seconds(text: &str) -> Option<u64> {
    let digits = |range: std::ops::Range<usize>| -> Option<i64> {
        let part = text.get(range)?;
        if part.bytes().all(|byte| byte.is_ascii_digit()) {
            part.parse().ok()
        } else {
            None
        }
    };
    let bytes = text.as_bytes();
    let separators = [(4, b'-'), (7, b'-'), (10, b'T'), (13, b':'), (16, b':')];
    if bytes.len() < 20
        || !separators
            .iter()
            .all(|(index, byte)| bytes.get(*index) == Some(byte))
        || bytes.last() != Some(&b'Z')
    {
        return None;
    }
    // `get`: a multi-byte character may straddle byte 19 (OpenBao answers what it likes).
    let fraction = text.get(19..text.len() - 1)?;
    if !(fraction.is_empty()
        || fraction
            .strip_prefix('.')
            .is_some_and(|rest| !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit())))
    {
        return None;
    }
    let (year, month, day) = (digits(0..4)?, digits(5..7)?, digits(8..10)?);
    let (hour, minute, second) = (digits(11..13)?, digits(14..16)?, digits(17..19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 {
        return None;
    }
    // Days from the civil date (H. Hinnant's algorithm), proleptic Gregorian.
    let shifted_year = if month <= 2 { year - 1 } else { year };
    let era = shifted_year.div_euclid(400);
    let year_of_era = shifted_year - era * 400;
    let day_of_year = (153 * (month + if month > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    let days = era * 146_097 + day_of_era - 719_468;
    u64::try_from(days * 86_400 + hour * 3_600 + minute * 60 + second.min(60)).ok()
}

#[cfg(test)]
mod tests;
