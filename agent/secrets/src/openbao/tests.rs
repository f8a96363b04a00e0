//! Unit tests of the layout, and component tests of the store against a small in-process fake of
//! OpenBao's HTTP API (AppRole login, token lookup/renew, KV v2 data and metadata). The real
//! `bao server -dev` is exercised by the integration tests (`tests/openbao.rs`).

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::{Arc, Mutex};

use secrecy::{ExposeSecret as _, SecretString};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

use super::*;
use crate::fields::tests::{credential, same, KINDS};
use crate::{Credential, SecretStore};

const PASSWORD: &str = "hunter2-Pa55word-marker";
const SECRET_ID: &str = "approle-secret-id-marker";

fn json_key() -> String {
    crate::gar_key::tests::key_json(
        crate::gar_key::tests::TEST_RSA_PEM,
        "https://oauth2.googleapis.com/token",
    )
}

fn id(text: &str) -> SecretId {
    SecretId::parse(text).unwrap()
}

fn read_answer(document: &Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "data": {
            "data": document,
            "metadata": {"created_time": "2026-01-02T03:04:05.123456789Z", "version": 3}
        }
    }))
    .unwrap()
}

#[test]
fn layout_paths() {
    let layout = Layout {
        mount: "secret".to_owned(),
        prefix: "fleet/berth".to_owned(),
    };
    let secret = id("secret-abc");
    assert_eq!(
        layout.data("team-a", &secret),
        "secret/data/fleet/berth/team-a/secret-abc"
    );
    assert_eq!(
        layout.metadata("team-a", &secret),
        "secret/metadata/fleet/berth/team-a/secret-abc"
    );
    assert_eq!(
        layout.project("team-a"),
        "secret/metadata/fleet/berth/team-a"
    );
}

#[test]
fn documents_written_by_a_control_plane_parse() {
    let docker = read_answer(&json!({
        "kind": "docker", "server": "https://Reg.Example:5000/v2/", "name": "hub",
        "username": "robot", "password": PASSWORD, "team": "extra fields are ignored"
    }));
    let stored = parse_secret("team-a", &id("secret-abc"), &docker).unwrap();
    assert_eq!(stored.meta.kind, SecretKind::Docker);
    assert_eq!(stored.meta.server, "reg.example:5000");
    assert_eq!(stored.meta.name, "hub");
    assert_eq!(stored.meta.project, "team-a");
    // No created_at field: the version's created_time.
    assert_eq!(
        stored.meta.created_at,
        UNIX_EPOCH + Duration::from_secs(1_767_323_045)
    );
    match &stored.credential {
        Credential::UsernamePassword { username, password } => {
            assert_eq!(username, "robot");
            assert_eq!(password.expose_secret(), PASSWORD);
        }
        Credential::JsonKey(_) => panic!("wrong credential type"),
    }
    assert!(!format!("{stored:?}").contains(PASSWORD));

    // One trailing newline (from `echo ... | bao kv put ... password=-`) is dropped.
    let piped = read_answer(&json!({
        "kind": "docker", "server": "reg", "name": "hub",
        "username": "robot\n", "password": format!("{PASSWORD}\n")
    }));
    match parse_secret("p", &id("secret-abc"), &piped)
        .unwrap()
        .credential
    {
        Credential::UsernamePassword { username, password } => {
            assert_eq!(username, "robot");
            assert_eq!(password.expose_secret(), PASSWORD);
        }
        Credential::JsonKey(_) => panic!("wrong credential type"),
    }

    let gar = read_answer(&json!({
        "kind": "gar", "server": "europe-docker.pkg.dev", "name": "gar",
        "json_key": json_key(), "created_at": "1700000000"
    }));
    let stored = parse_secret("default", &id("secret-gar"), &gar).unwrap();
    assert_eq!(stored.meta.kind, SecretKind::Gar);
    assert_eq!(
        stored.meta.created_at,
        UNIX_EPOCH + Duration::from_secs(1_700_000_000)
    );
    assert!(matches!(stored.credential, Credential::JsonKey(_)));
}

#[test]
fn malformed_documents_name_the_field_never_the_material() {
    let cases = [
        json!({"server": "reg", "name": "n", "username": "u", "password": PASSWORD}),
        json!({"kind": "ecr", "server": "reg", "name": "n", "username": "u", "password": PASSWORD}),
        json!({"kind": "docker", "server": "reg", "username": "u", "password": PASSWORD}),
        json!({"kind": "docker", "server": "reg", "name": "Bad Name", "password": PASSWORD}),
        json!({"kind": "docker", "server": format!("https://u:{PASSWORD}@reg"), "name": "n", "username": "u", "password": PASSWORD}),
        json!({"kind": "docker", "server": "reg", "name": "n", "password": PASSWORD}),
        json!({"kind": "docker", "server": "reg", "name": "n", "username": "u", "password": ""}),
        json!({"kind": "gar", "server": "reg", "name": "n", "username": "u", "password": PASSWORD}),
        json!({"kind": "gar", "server": "reg", "name": "n", "json_key": PASSWORD}),
        json!({"kind": "docker", "server": "reg", "name": "n", "username": "u", "password": 12}),
    ];
    for case in cases {
        let err = parse_secret("p", &id("secret-x"), &read_answer(&case)).unwrap_err();
        assert!(
            matches!(err, SecretError::Malformed { .. }),
            "{case}: {err:?}"
        );
        assert!(!err.to_string().contains(PASSWORD), "{err}");
        assert!(!format!("{err:?}").contains(PASSWORD), "{err:?}");
    }
    let no_data = serde_json::to_vec(&json!({"data": {"data": null}})).unwrap();
    assert!(matches!(
        parse_secret("p", &id("secret-x"), &no_data),
        Err(SecretError::Malformed { .. })
    ));
}

#[test]
fn write_body_round_trips_through_a_read() {
    let new = NewSecret {
        project: "default".to_owned(),
        name: "hub".to_owned(),
        kind: SecretKind::Acr,
        server: "myregistry.azurecr.io".to_owned(),
        credential: Credential::UsernamePassword {
            username: "00000000-0000-0000-0000-000000000000".to_owned(),
            password: SecretString::from(PASSWORD),
        },
    };
    let body: Value = serde_json::from_slice(&write_body(&new, 1_700_000_001).unwrap()).unwrap();
    assert_eq!(body["options"]["cas"], 0);
    assert_eq!(body["data"]["kind"], "acr");
    assert_eq!(body["data"]["created_at"], "1700000001");
    assert!(body["data"].get("json_key").is_none());
    let stored = parse_secret("default", &id("secret-a"), &read_answer(&body["data"])).unwrap();
    assert_eq!(stored.meta.name, "hub");
    assert_eq!(
        stored.meta.created_at,
        UNIX_EPOCH + Duration::from_secs(1_700_000_001)
    );
}

/// Every kind, written by `write_body` and read by `parse_secret`, comes back as it went in.
#[test]
fn every_kind_round_trips_through_a_kv_document() {
    for kind in KINDS {
        let new = NewSecret {
            project: "default".to_owned(),
            name: "n".to_owned(),
            kind,
            server: "r.example".to_owned(),
            credential: credential(kind),
        };
        let body: Value =
            serde_json::from_slice(&write_body(&new, 1_700_000_001).unwrap()).unwrap();
        let stored = parse_secret("default", &id("secret-a"), &read_answer(&body["data"])).unwrap();
        assert_eq!(stored.meta.kind, kind);
        assert!(same(&new.credential, &stored.credential), "{kind}");
    }
}

#[test]
fn rfc3339_timestamps() {
    assert_eq!(rfc3339_unix_seconds("1970-01-01T00:00:00Z"), Some(0));
    assert_eq!(
        rfc3339_unix_seconds("2026-11-29T13:27:07.692689215Z"),
        Some(1_795_958_827)
    );
    assert_eq!(
        rfc3339_unix_seconds("2024-02-29T23:59:59Z"),
        Some(1_709_251_199)
    );
    for bad in [
        "",
        "2026-11-29",
        "2026-11-29T13:27:07+01:00",
        "2026-13-29T13:27:07Z",
        "2026-11-29T13:27:07.Z",
        "2026-11-29 13:27:07Z",
        "+026-11-29T13:27:07Z",
        // A multi-byte character across byte 19, in the seconds or the fraction.
        "2026-11-29T13:27:0\u{e9}Z",
        "2026-11-29T13:27:07\u{e9}Z",
        "2026-11-29T13:27:07.\u{20ac}Z",
        "2026-11-29T13:27:07.1\u{1f600}Z",
    ] {
        assert_eq!(rfc3339_unix_seconds(bad), None, "{bad}");
    }
    assert_eq!(unix_seconds(&json!("12")), Some(12));
    assert_eq!(unix_seconds(&json!(12)), Some(12));
    assert_eq!(unix_seconds(&json!(-1)), None);
}

// ---- the store against a fake OpenBao ------------------------------------------------------

/// What the fake OpenBao holds and how it behaves.
#[derive(Default)]
struct FakeState {
    sealed: bool,
    /// Tokens it accepts.
    tokens: Vec<String>,
    issued: usize,
    /// Projects whose paths the policy forbids.
    forbidden_projects: Vec<String>,
    /// KV v2: path under `secret/data/` → document.
    kv: BTreeMap<String, Value>,
    /// `(method, path, token)` of every request.
    seen: Vec<(String, String, String)>,
}

struct Fake {
    address: String,
    state: Arc<Mutex<FakeState>>,
}

impl Fake {
    async fn start() -> Fake {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(FakeState::default()));
        let shared = Arc::clone(&state);
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                tokio::spawn(serve_one(stream, Arc::clone(&shared)));
            }
        });
        Fake { address, state }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.state.lock().unwrap()
    }
}

async fn serve_one(mut stream: tokio::net::TcpStream, state: Arc<Mutex<FakeState>>) {
    let mut buffer = Vec::new();
    let header_end = loop {
        let mut chunk = [0u8; 4096];
        let read = stream.read(&mut chunk).await.unwrap();
        if read == 0 {
            return;
        }
        buffer.extend_from_slice(&chunk[..read]);
        if let Some(end) = buffer.windows(4).position(|window| window == b"\r\n\r\n") {
            break end + 4;
        }
    };
    let head = String::from_utf8_lossy(&buffer[..header_end]).into_owned();
    let mut lines = head.lines();
    let mut request_line = lines.next().unwrap().split(' ');
    let method = request_line.next().unwrap().to_owned();
    let path = request_line.next().unwrap().to_owned();
    let mut length = 0;
    let mut token = String::new();
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            match name.to_ascii_lowercase().as_str() {
                "content-length" => length = value.trim().parse().unwrap(),
                "x-vault-token" => value.trim().clone_into(&mut token),
                _ => {}
            }
        }
    }
    while buffer.len() < header_end + length {
        let mut chunk = [0u8; 4096];
        let read = stream.read(&mut chunk).await.unwrap();
        buffer.extend_from_slice(&chunk[..read]);
    }
    let body: Value = serde_json::from_slice(&buffer[header_end..]).unwrap_or(Value::Null);
    let (status, answer) = handle(&state, &method, &path, &token, &body);
    let answer = answer.map(|value| value.to_string()).unwrap_or_default();
    let response = format!(
        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{answer}",
        answer.len()
    );
    stream.write_all(response.as_bytes()).await.unwrap();
}

fn handle(
    state: &Mutex<FakeState>,
    method: &str,
    path: &str,
    token: &str,
    body: &Value,
) -> (u16, Option<Value>) {
    let mut state = state.lock().unwrap();
    state
        .seen
        .push((method.to_owned(), path.to_owned(), token.to_owned()));
    if state.sealed {
        return (503, Some(json!({"errors": ["Vault is sealed"]})));
    }
    let path = path.strip_prefix("/v1/").unwrap();
    if path == "auth/approle/login" {
        if body["role_id"] != "role" || body["secret_id"] != SECRET_ID {
            return (400, Some(json!({"errors": ["invalid role or secret ID"]})));
        }
        state.issued += 1;
        let token = format!("s.token-{}", state.issued);
        state.tokens.push(token.clone());
        let auth = json!({"client_token": token, "lease_duration": 600, "renewable": true});
        return (200, Some(json!({ "auth": auth })));
    }
    let denied = (403, Some(json!({"errors": ["permission denied"]})));
    if !state.tokens.iter().any(|known| known == token) {
        return denied;
    }
    if path == "auth/token/lookup-self" {
        return (
            200,
            Some(json!({"data": {"ttl": 600, "renewable": true, "id": token}})),
        );
    }
    let (area, rest) = path
        .strip_prefix("secret/")
        .and_then(|rest| rest.split_once('/'))
        .unwrap();
    let project = rest.split('/').nth(1).unwrap_or_default();
    if state.forbidden_projects.iter().any(|p| p == project) {
        return denied;
    }
    match (method, area) {
        ("GET", "data") => match state.kv.get(rest) {
            Some(document) => (
                200,
                Some(
                    json!({"data": {"data": document, "metadata": {"created_time": "2026-01-02T03:04:05Z"}}}),
                ),
            ),
            None => (404, Some(json!({"errors": []}))),
        },
        ("POST", "data") => {
            if body["options"]["cas"] == 0 && state.kv.contains_key(rest) {
                return (
                    400,
                    Some(
                        json!({"errors": ["check-and-set parameter did not match the current version"]}),
                    ),
                );
            }
            state.kv.insert(rest.to_owned(), body["data"].clone());
            (200, Some(json!({"data": {"version": 1}})))
        }
        ("LIST", "metadata") => {
            let prefix = format!("{rest}/");
            let keys: Vec<String> = state
                .kv
                .keys()
                .filter_map(|key| key.strip_prefix(&prefix).map(str::to_owned))
                .collect();
            if keys.is_empty() {
                (404, Some(json!({"errors": []})))
            } else {
                (200, Some(json!({"data": {"keys": keys}})))
            }
        }
        ("DELETE", "metadata") => {
            state.kv.remove(rest);
            (204, None)
        }
        _ => (405, Some(json!({"errors": ["unsupported"]}))),
    }
}

struct Fixture {
    fake: Fake,
    store: SecretStore,
    _dir: tempfile::TempDir,
}

fn private_file(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

async fn fixture() -> Fixture {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let fake = Fake::start().await;
    let dir = tempfile::tempdir().unwrap();
    let role_id_file = dir.path().join("role-id");
    let secret_id_file = dir.path().join("secret-id");
    private_file(&role_id_file, "role\n");
    private_file(&secret_id_file, SECRET_ID);
    let settings = OpenbaoSettings {
        address: fake.address.clone(),
        mount: "secret".to_owned(),
        prefix: "berth".to_owned(),
        login: Login::AppRole {
            role_id_file,
            secret_id_file,
        },
        ca_pems: Vec::new(),
        connect_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_secs(5),
    };
    let store = SecretStore::Openbao(OpenbaoStore::open(&settings).unwrap());
    Fixture {
        fake,
        store,
        _dir: dir,
    }
}

fn docker(project: &str, name: &str) -> NewSecret {
    NewSecret {
        project: project.to_owned(),
        name: name.to_owned(),
        kind: SecretKind::Docker,
        server: "https://Reg.Example:5000/v2/".to_owned(),
        credential: Credential::UsernamePassword {
            username: "robot".to_owned(),
            password: SecretString::from(PASSWORD),
        },
    }
}

#[tokio::test]
async fn create_get_list_delete_like_the_file_store() {
    let fixture = fixture().await;
    let store = &fixture.store;
    assert!(store.list("team-a").await.unwrap().is_empty());
    let created = store.create(docker("team-a", "zeta")).await.unwrap();
    assert!(created.id.as_str().starts_with("secret-"));
    assert_eq!(created.server, "reg.example:5000");
    let stored = store.get("team-a", &created.id).await.unwrap();
    assert_eq!(stored.meta, created);

    // The documented layout, as a control plane would read it.
    let document = fixture.fake.state().kv[&format!("berth/team-a/{}", created.id)].clone();
    assert_eq!(document["kind"], "docker");
    assert_eq!(document["server"], "reg.example:5000");
    assert_eq!(document["name"], "zeta");
    assert_eq!(document["username"], "robot");
    assert_eq!(document["password"], PASSWORD);

    let error = store.create(docker("team-a", "zeta")).await.unwrap_err();
    assert!(matches!(&error, SecretError::NameTaken { name } if name == "zeta"));
    let alpha = store.create(docker("team-a", "alpha")).await.unwrap();
    store.create(docker("team-b", "zeta")).await.unwrap();
    assert_eq!(
        store.list("team-a").await.unwrap(),
        vec![alpha.clone(), created.clone()]
    );

    // Another project's id is NotFound; so is a deleted one.
    assert!(matches!(
        store.get("team-b", &created.id).await,
        Err(SecretError::NotFound { .. })
    ));
    store.delete("team-a", &created.id).await.unwrap();
    assert!(matches!(
        store.get("team-a", &created.id).await,
        Err(SecretError::NotFound { .. })
    ));
    assert!(matches!(
        store.delete("team-a", &created.id).await,
        Err(SecretError::NotFound { .. })
    ));
    assert_eq!(store.list("team-a").await.unwrap(), vec![alpha]);

    // A malformed entry written by someone else is skipped by list, and Malformed on get.
    fixture.fake.state().kv.insert(
        "berth/team-a/secret-bad".to_owned(),
        json!({"kind": "docker", "name": "bad"}),
    );
    assert_eq!(store.list("team-a").await.unwrap().len(), 1);
    assert!(matches!(
        store.get("team-a", &id("secret-bad")).await,
        Err(SecretError::Malformed { .. })
    ));
}

#[tokio::test]
async fn token_goes_only_in_its_header_and_is_replaced_when_refused() {
    let fixture = fixture().await;
    let created = fixture
        .store
        .create(docker("default", "hub"))
        .await
        .unwrap();
    // OpenBao forgets every token (a restarted dev server): berth logs in again by itself.
    fixture.fake.state().tokens.clear();
    fixture.store.get("default", &created.id).await.unwrap();
    let state = fixture.fake.state();
    assert!(state.issued >= 2, "issued {}", state.issued);
    for (method, path, token) in &state.seen {
        if path.starts_with("/v1/auth/approle/login") {
            assert!(token.is_empty(), "{method} {path} carried a token");
        } else {
            assert!(token.starts_with("s.token-"), "{method} {path}: {token:?}");
        }
        assert!(!path.contains("token-"), "{path}");
    }
}

#[tokio::test]
async fn forbidden_is_denied_and_sealed_is_unavailable() {
    let fixture = fixture().await;
    fixture
        .fake
        .state()
        .forbidden_projects
        .push("team-b".to_owned());
    let error = fixture
        .store
        .get("team-b", &id("secret-abc"))
        .await
        .unwrap_err();
    assert!(matches!(error, SecretError::Denied { .. }), "{error:?}");
    assert!(error
        .to_string()
        .contains("secret/data/berth/team-b/secret-abc"));
    // A denial is not a reason to log in again and again.
    let logins = fixture.fake.state().issued;
    assert!(logins <= 1, "{logins} logins");

    fixture.fake.state().sealed = true;
    let error = fixture
        .store
        .get("default", &id("secret-abc"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            SecretError::Unavailable {
                reason: "it is sealed",
                ..
            }
        ),
        "{error:?}"
    );
    assert!(error.to_string().contains(&fixture.fake.address), "{error}");
    fixture.fake.state().sealed = false;
    assert!(matches!(
        fixture.store.get("default", &id("secret-abc")).await,
        Err(SecretError::NotFound { .. })
    ));
}

#[tokio::test]
async fn token_file_is_read_again_when_its_token_is_refused() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let fake = Fake::start().await;
    fake.state().tokens.push("s.first-token".to_owned());
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    private_file(&token_file, "s.first-token\n");
    let settings = OpenbaoSettings {
        address: fake.address.clone(),
        mount: "secret".to_owned(),
        prefix: "berth".to_owned(),
        login: Login::TokenFile(token_file.clone()),
        ca_pems: Vec::new(),
        connect_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_secs(5),
    };
    let store = SecretStore::Openbao(OpenbaoStore::open(&settings).unwrap());
    let created = store.create(docker("default", "hub")).await.unwrap();

    // An operator (or an OpenBao agent) rotates the token: the old one is revoked, the file
    // holds the new one. The next call is refused once, then made with the new token.
    {
        let mut state = fake.state();
        state.tokens = vec!["s.second-token".to_owned()];
    }
    std::fs::write(&token_file, "s.second-token").unwrap();
    store.get("default", &created.id).await.unwrap();
    let state = fake.state();
    let (_, path, token) = state.seen.last().unwrap();
    assert!(path.ends_with(created.id.as_str()), "{path}");
    assert_eq!(token, "s.second-token");
    assert_eq!(state.issued, 0, "no approle login with token_file");
}

#[tokio::test]
async fn unreachable_is_unavailable() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    private_file(&token_file, "s.root-token-marker");
    // A port that was free a moment ago.
    let address = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    let settings = OpenbaoSettings {
        address: address.clone(),
        mount: "secret".to_owned(),
        prefix: "berth".to_owned(),
        login: Login::TokenFile(token_file),
        ca_pems: Vec::new(),
        connect_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_secs(2),
    };
    let store = SecretStore::Openbao(OpenbaoStore::open(&settings).unwrap());
    let error = store.get("default", &id("secret-abc")).await.unwrap_err();
    assert!(
        matches!(
            error,
            SecretError::Unavailable {
                reason: "unreachable",
                ..
            }
        ),
        "{error:?}"
    );
    assert!(error.to_string().contains(&address), "{error}");
    assert!(!format!("{store:?}").contains("root-token-marker"));
}

#[tokio::test]
async fn credential_files_are_checked_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "s.token").unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let settings = OpenbaoSettings {
        address: "http://127.0.0.1:1".to_owned(),
        mount: "secret".to_owned(),
        prefix: "berth".to_owned(),
        login: Login::TokenFile(token_file),
        ca_pems: Vec::new(),
        connect_timeout: Duration::from_secs(1),
        request_timeout: Duration::from_secs(1),
    };
    assert!(matches!(
        OpenbaoStore::open(&settings),
        Err(SecretError::CredentialFile { .. })
    ));
}
