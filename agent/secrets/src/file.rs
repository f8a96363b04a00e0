//! The embedded `file` backend: one AES-256-GCM record per secret under the state dir.
//!
//! Layout: `<state_dir>/secrets/<project>/<id>.sealed` (directories 0700, files 0600), one record
//! per secret, bound to its (project, id) (format in `record`). The key is 32 bytes in `key_file`,
//! created 0600 on first start (see `disk`). Create and delete are serialised, so secret names
//! stay unique per project.

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aes_gcm::aead::KeyInit;
use aes_gcm::Aes256Gcm;
use tracing::{info, warn};

use super::disk::{create_private_dir, load_or_create_key, sync_dir, write_atomically};
use super::record::{seal, unseal};
use super::{NewSecret, SecretError, SecretId, SecretMeta, StoredSecret};

/// Records are named `<id>.sealed`.
const RECORD_SUFFIX: &str = ".sealed";

/// A record larger than this is not one of ours (three 64 KiB fields, escaped, plus framing).
const MAX_RECORD_BYTES: u64 = 2 * 1024 * 1024;

/// The `file` secret store. The daemon holds one (share it behind an `Arc`).
pub struct FileStore {
    inner: Arc<Inner>,
    /// Serialises create and delete, so the name check and the write are one step. The guard
    /// moves into the blocking task, so it is held until the disk work ends even when the
    /// calling future is dropped.
    write_lock: Arc<tokio::sync::Mutex<()>>,
}

impl std::fmt::Debug for FileStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileStore")
            .field("dir", &self.inner.dir)
            .finish_non_exhaustive()
    }
}

struct Inner {
    /// `<state_dir>/secrets`
    dir: PathBuf,
    /// Built from the key file; the raw key bytes are zeroized once it exists.
    cipher: Aes256Gcm,
}

impl FileStore {
    /// Opens the store under `state_dir`, creating `<state_dir>/secrets` (0700) and `key_file`
    /// (32 random bytes, 0600, parent 0700) when they are missing. Blocking; call once at start.
    pub fn open(state_dir: &Path, key_file: &Path) -> Result<FileStore, SecretError> {
        let dir = state_dir.join("secrets");
        create_private_dir(&dir)?;
        let key = load_or_create_key(key_file)?;
        let cipher = Aes256Gcm::new_from_slice(&key[..]).map_err(|_| SecretError::Key {
            path: key_file.to_owned(),
            reason: "not exactly 32 bytes",
        })?;
        Ok(FileStore {
            inner: Arc::new(Inner { dir, cipher }),
            write_lock: Arc::new(tokio::sync::Mutex::new(())),
        })
    }

    /// Stores an already validated secret (see `SecretStore::create`).
    pub async fn create(&self, new: NewSecret) -> Result<SecretMeta, SecretError> {
        let guard = Arc::clone(&self.write_lock).lock_owned().await;
        let inner = Arc::clone(&self.inner);
        let meta = blocking(self.inner.dir.clone(), move || {
            let _guard = guard;
            inner.create(new)
        })
        .await?;
        info!(secret_id = %meta.id, "secret created");
        Ok(meta)
    }

    pub async fn get(&self, project: &str, id: &SecretId) -> Result<StoredSecret, SecretError> {
        let inner = Arc::clone(&self.inner);
        let project = project.to_owned();
        let id = id.clone();
        blocking(self.inner.dir.clone(), move || {
            inner.open_record(&project, &id)
        })
        .await
    }

    pub async fn list(&self, project: &str) -> Result<Vec<SecretMeta>, SecretError> {
        let inner = Arc::clone(&self.inner);
        let project = project.to_owned();
        blocking(self.inner.dir.clone(), move || inner.list(&project)).await
    }

    pub async fn delete(&self, project: &str, id: &SecretId) -> Result<(), SecretError> {
        let guard = Arc::clone(&self.write_lock).lock_owned().await;
        let inner = Arc::clone(&self.inner);
        let project = project.to_owned();
        let id_for_task = id.clone();
        blocking(self.inner.dir.clone(), move || {
            let _guard = guard;
            inner.delete(&project, &id_for_task)
        })
        .await?;
        info!(secret_id = %id, "secret deleted");
        Ok(())
    }
}

/// Runs blocking store work off the async threads. A panic in it is resumed here.
async fn blocking<T, F>(dir: PathBuf, work: F) -> Result<T, SecretError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, SecretError> + Send + 'static,
{
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result,
        Err(join_error) => match join_error.try_into_panic() {
            Ok(payload) => std::panic::resume_unwind(payload),
            Err(_cancelled) => Err(SecretError::Io {
                path: dir,
                source: io::Error::other("blocking task cancelled"),
            }),
        },
    }
}

impl Inner {
    fn project_dir(&self, project: &str) -> PathBuf {
        self.dir.join(project)
    }

    fn record_path(&self, project: &str, id: &SecretId) -> PathBuf {
        self.project_dir(project)
            .join(format!("{}{RECORD_SUFFIX}", id.as_str()))
    }

    fn create(&self, new: NewSecret) -> Result<SecretMeta, SecretError> {
        let project_dir = self.project_dir(&new.project);
        create_private_dir(&project_dir)?;
        if self
            .list(&new.project)?
            .iter()
            .any(|meta| meta.name == new.name)
        {
            return Err(SecretError::NameTaken { name: new.name });
        }
        let id = loop {
            let candidate = SecretId::generate();
            let taken = self
                .record_path(&new.project, &candidate)
                .try_exists()
                .map_err(|source| SecretError::Io {
                    path: project_dir.clone(),
                    source,
                })?;
            if !taken {
                break candidate;
            }
        };
        let created_secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since_epoch| since_epoch.as_secs());
        let meta = SecretMeta {
            id,
            project: new.project,
            name: new.name,
            kind: new.kind,
            server: new.server,
            created_at: UNIX_EPOCH + Duration::from_secs(created_secs),
        };
        let sealed = seal(&self.cipher, &meta, created_secs, &new.credential)?;
        let path = self.record_path(&meta.project, &meta.id);
        write_atomically(&project_dir, &path, &sealed)?;
        Ok(meta)
    }

    fn open_record(&self, project: &str, id: &SecretId) -> Result<StoredSecret, SecretError> {
        let path = self.record_path(project, id);
        let record = match read_record(&path) {
            Ok(record) => record,
            Err(source) if source.kind() == io::ErrorKind::NotFound => {
                return Err(SecretError::NotFound {
                    id: id.as_str().to_owned(),
                })
            }
            Err(source) => return Err(SecretError::Io { path, source }),
        };
        unseal(&self.cipher, project, id, &record)
    }

    /// Metadata of every readable record of `project`. A record that fails to authenticate is
    /// skipped with a warning, so one bad file does not hide the others.
    fn list(&self, project: &str) -> Result<Vec<SecretMeta>, SecretError> {
        let project_dir = self.project_dir(project);
        let entries = match fs::read_dir(&project_dir) {
            Ok(entries) => entries,
            Err(source) if source.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(SecretError::Io {
                    path: project_dir,
                    source,
                })
            }
        };
        let mut metas = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| SecretError::Io {
                path: project_dir.clone(),
                source,
            })?;
            let file_name = entry.file_name();
            let Some(id) = file_name
                .to_str()
                .and_then(|name| name.strip_suffix(RECORD_SUFFIX))
                .and_then(|stem| SecretId::parse(stem).ok())
            else {
                continue;
            };
            match self.open_record(project, &id) {
                // The credential is dropped (and zeroized) here; only metadata is kept.
                Ok(stored) => metas.push(stored.meta),
                // Deleted between read_dir and open.
                Err(SecretError::NotFound { .. }) => {}
                Err(SecretError::Corrupt { .. }) => {
                    warn!(secret_id = %id, "skipping secret record that fails to authenticate");
                }
                Err(other) => return Err(other),
            }
        }
        Ok(metas)
    }

    fn delete(&self, project: &str, id: &SecretId) -> Result<(), SecretError> {
        let path = self.record_path(project, id);
        match fs::remove_file(&path) {
            Ok(()) => sync_dir(&self.project_dir(project)),
            Err(source) if source.kind() == io::ErrorKind::NotFound => Err(SecretError::NotFound {
                id: id.as_str().to_owned(),
            }),
            Err(source) => Err(SecretError::Io { path, source }),
        }
    }
}

fn read_record(path: &Path) -> io::Result<Vec<u8>> {
    let file = File::open(path)?;
    let mut record = Vec::new();
    file.take(MAX_RECORD_BYTES).read_to_end(&mut record)?;
    Ok(record)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use secrecy::{ExposeSecret, SecretString};

    use super::*;
    use crate::record::MAGIC;
    use crate::{Credential, SecretKind, SecretStore};

    const PASSWORD: &str = "hunter2-Pa55word-marker";
    /// A real service-account key (gar secrets are checked on create).
    fn json_key() -> String {
        crate::gar_key::tests::key_json(
            crate::gar_key::tests::TEST_RSA_PEM,
            "https://oauth2.googleapis.com/token",
        )
    }

    /// A piece of the private key, to look for in sealed files.
    fn key_marker() -> &'static str {
        &crate::gar_key::tests::TEST_RSA_PEM[40..80]
    }

    struct Fixture {
        _temp: tempfile::TempDir,
        state_dir: PathBuf,
        key_file: PathBuf,
        store: SecretStore,
    }

    fn fixture() -> Fixture {
        let temp = tempfile::tempdir().unwrap();
        let state_dir = temp.path().join("state");
        let key_file = temp.path().join("etc").join("secrets.key");
        let store = SecretStore::File(FileStore::open(&state_dir, &key_file).unwrap());
        Fixture {
            _temp: temp,
            state_dir,
            key_file,
            store,
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

    fn gar(project: &str, name: &str) -> NewSecret {
        NewSecret {
            project: project.to_owned(),
            name: name.to_owned(),
            kind: SecretKind::Gar,
            server: "europe-docker.pkg.dev".to_owned(),
            credential: Credential::JsonKey(SecretString::from(json_key())),
        }
    }

    fn record_path(fixture: &Fixture, project: &str, id: &SecretId) -> PathBuf {
        fixture
            .state_dir
            .join("secrets")
            .join(project)
            .join(format!("{id}.sealed"))
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[tokio::test]
    async fn round_trip_create_get_list_delete() {
        let fixture = fixture();
        let store = &fixture.store;
        let created = store.create(docker("team-a", "zeta")).await.unwrap();
        assert!(created.id.as_str().starts_with("secret-"));
        assert_eq!(created.project, "team-a");
        assert_eq!(created.name, "zeta");
        assert_eq!(created.kind, SecretKind::Docker);
        assert_eq!(created.server, "reg.example:5000");

        let stored = store.get("team-a", &created.id).await.unwrap();
        assert_eq!(stored.meta, created);
        match &stored.credential {
            Credential::UsernamePassword { username, password } => {
                assert_eq!(username, "robot");
                assert_eq!(password.expose_secret(), PASSWORD);
            }
            Credential::JsonKey(_) => panic!("wrong credential type"),
        }

        let gar_meta = store.create(gar("team-a", "alpha")).await.unwrap();
        let stored_gar = store.get("team-a", &gar_meta.id).await.unwrap();
        match &stored_gar.credential {
            Credential::JsonKey(key) => assert_eq!(key.expose_secret(), json_key()),
            Credential::UsernamePassword { .. } => panic!("wrong credential type"),
        }
        assert_eq!(stored_gar.meta.kind, SecretKind::Gar);

        let listed = store.list("team-a").await.unwrap();
        assert_eq!(listed, vec![gar_meta.clone(), created.clone()]);
        assert!(store.list("team-b").await.unwrap().is_empty());

        store.delete("team-a", &created.id).await.unwrap();
        assert!(matches!(
            store.get("team-a", &created.id).await,
            Err(SecretError::NotFound { .. })
        ));
        assert!(matches!(
            store.delete("team-a", &created.id).await,
            Err(SecretError::NotFound { .. })
        ));
        assert_eq!(store.list("team-a").await.unwrap(), vec![gar_meta]);

        // The name is free again once deleted.
        store.create(docker("team-a", "zeta")).await.unwrap();
    }

    #[tokio::test]
    async fn reopened_store_reads_records() {
        let fixture = fixture();
        let created = fixture
            .store
            .create(docker("default", "hub"))
            .await
            .unwrap();
        let reopened =
            SecretStore::File(FileStore::open(&fixture.state_dir, &fixture.key_file).unwrap());
        let stored = reopened.get("default", &created.id).await.unwrap();
        assert_eq!(stored.meta, created);
    }

    #[tokio::test]
    async fn operations_run_on_spawned_tasks() {
        // Callers spawn order work; every store future must be Send + 'static-capable.
        let fixture = fixture();
        let store = Arc::new(fixture.store);
        let spawned = Arc::clone(&store);
        let meta = tokio::spawn(async move {
            let created = spawned.create(docker("default", "hub")).await?;
            let project = String::from("default");
            spawned.get(&project, &created.id).await?;
            spawned.list(&project).await?;
            Ok::<_, SecretError>(created)
        })
        .await
        .unwrap()
        .unwrap();
        let spawned = Arc::clone(&store);
        tokio::spawn(async move { spawned.delete("default", &meta.id).await })
            .await
            .unwrap()
            .unwrap();
        assert!(store.list("default").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn name_taken_per_project() {
        let fixture = fixture();
        fixture.store.create(docker("team-a", "hub")).await.unwrap();
        let error = fixture
            .store
            .create(gar("team-a", "hub"))
            .await
            .unwrap_err();
        assert!(
            matches!(&error, SecretError::NameTaken { name } if name == "hub"),
            "{error:?}"
        );
        // Another project may use the same name.
        fixture.store.create(docker("team-b", "hub")).await.unwrap();
    }

    #[tokio::test]
    async fn concurrent_creates_with_one_name_store_one() {
        let fixture = fixture();
        let store = Arc::new(fixture.store);
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let store = Arc::clone(&store);
                tokio::spawn(async move { store.create(docker("default", "same")).await })
            })
            .collect();
        let mut created = 0;
        for task in tasks {
            match task.await.unwrap() {
                Ok(_) => created += 1,
                Err(SecretError::NameTaken { .. }) => {}
                Err(other) => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(created, 1);
        assert_eq!(store.list("default").await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn other_project_is_not_found() {
        let fixture = fixture();
        let created = fixture.store.create(docker("team-a", "hub")).await.unwrap();
        let error = fixture.store.get("team-b", &created.id).await.unwrap_err();
        assert!(matches!(&error, SecretError::NotFound { id } if id == created.id.as_str()));
        assert!(matches!(
            fixture.store.delete("team-b", &created.id).await,
            Err(SecretError::NotFound { .. })
        ));
        // Still there for its own project.
        fixture.store.get("team-a", &created.id).await.unwrap();
        assert!(matches!(
            fixture.store.get("../team-a", &created.id).await,
            Err(SecretError::Invalid {
                field: "project",
                ..
            })
        ));
    }

    #[tokio::test]
    async fn record_moved_to_another_project_or_id_is_corrupt() {
        let fixture = fixture();
        let created = fixture.store.create(docker("team-a", "hub")).await.unwrap();
        let original = record_path(&fixture, "team-a", &created.id);

        // Copied into project team-b under the same id.
        fixture
            .store
            .create(docker("team-b", "other"))
            .await
            .unwrap();
        let copied = record_path(&fixture, "team-b", &created.id);
        fs::copy(&original, &copied).unwrap();
        assert!(matches!(
            fixture.store.get("team-b", &created.id).await,
            Err(SecretError::Corrupt { .. })
        ));
        // list skips it rather than failing or showing it.
        let listed = fixture.store.list("team-b").await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].name, "other");

        // Renamed to another id in its own project.
        let other_id = SecretId::parse("secret-renamed0000000").unwrap();
        fs::rename(&original, record_path(&fixture, "team-a", &other_id)).unwrap();
        assert!(matches!(
            fixture.store.get("team-a", &other_id).await,
            Err(SecretError::Corrupt { .. })
        ));
    }

    #[tokio::test]
    async fn tampered_record_is_corrupt() {
        let fixture = fixture();
        let created = fixture
            .store
            .create(docker("default", "hub"))
            .await
            .unwrap();
        let path = record_path(&fixture, "default", &created.id);
        let pristine = fs::read(&path).unwrap();

        let mut flipped = pristine.clone();
        let last = flipped.len() - 20;
        flipped[last] ^= 0x01;
        fs::write(&path, &flipped).unwrap();
        assert!(matches!(
            fixture.store.get("default", &created.id).await,
            Err(SecretError::Corrupt { .. })
        ));

        let mut bad_nonce = pristine.clone();
        bad_nonce[MAGIC.len()] ^= 0x80;
        fs::write(&path, &bad_nonce).unwrap();
        assert!(matches!(
            fixture.store.get("default", &created.id).await,
            Err(SecretError::Corrupt { .. })
        ));

        fs::write(&path, &pristine[..10]).unwrap();
        assert!(matches!(
            fixture.store.get("default", &created.id).await,
            Err(SecretError::Corrupt { .. })
        ));

        fs::write(&path, &pristine).unwrap();
        fixture.store.get("default", &created.id).await.unwrap();
    }

    #[tokio::test]
    async fn another_key_cannot_open_records() {
        let fixture = fixture();
        let created = fixture
            .store
            .create(docker("default", "hub"))
            .await
            .unwrap();
        let other_key = fixture.key_file.with_file_name("other.key");
        let other = SecretStore::File(FileStore::open(&fixture.state_dir, &other_key).unwrap());
        assert!(matches!(
            other.get("default", &created.id).await,
            Err(SecretError::Corrupt { .. })
        ));
    }

    #[tokio::test]
    async fn files_and_dirs_are_private_and_sealed() {
        let fixture = fixture();
        let created = fixture
            .store
            .create(docker("default", "hub"))
            .await
            .unwrap();
        let gar_meta = fixture.store.create(gar("default", "gar")).await.unwrap();

        assert_eq!(mode(&fixture.state_dir.join("secrets")), 0o700);
        assert_eq!(
            mode(&fixture.state_dir.join("secrets").join("default")),
            0o700
        );
        assert_eq!(mode(fixture.key_file.parent().unwrap()), 0o700);

        for id in [&created.id, &gar_meta.id] {
            let path = record_path(&fixture, "default", id);
            assert_eq!(mode(&path), 0o600);
            let bytes = fs::read(&path).unwrap();
            assert!(bytes.starts_with(&MAGIC));
            for needle in [
                PASSWORD,
                key_marker(),
                "robot",
                "reg.example",
                "service_account",
            ] {
                assert!(
                    !bytes
                        .windows(needle.len())
                        .any(|window| window == needle.as_bytes()),
                    "{needle} in sealed file"
                );
            }
        }
        // Nothing but the records (no temp files left).
        let names: Vec<_> = fs::read_dir(fixture.state_dir.join("secrets").join("default"))
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(names.iter().all(|name| name.ends_with(".sealed")));
    }

    #[tokio::test]
    async fn errors_never_show_material() {
        let fixture = fixture();
        let created = fixture
            .store
            .create(docker("default", "hub"))
            .await
            .unwrap();
        let path = record_path(&fixture, "default", &created.id);
        let mut errors = vec![
            fixture
                .store
                .create(docker("default", "hub"))
                .await
                .unwrap_err(),
            fixture.store.get("other", &created.id).await.unwrap_err(),
        ];
        let mut invalid = docker("default", "Bad Name");
        invalid.server = PASSWORD.to_owned();
        errors.push(fixture.store.create(invalid).await.unwrap_err());

        let mut tampered = fs::read(&path).unwrap();
        let last = tampered.len() - 1;
        tampered[last] ^= 0xff;
        fs::write(&path, &tampered).unwrap();
        errors.push(fixture.store.get("default", &created.id).await.unwrap_err());

        errors.push(SecretError::Io {
            path: path.clone(),
            source: io::Error::other("disk on fire"),
        });
        errors.push(SecretError::Key {
            path: fixture.key_file.clone(),
            reason: "not exactly 32 bytes",
        });

        let kinds: Vec<&str> = errors
            .iter()
            .map(|error| match error {
                SecretError::NotFound { .. } => "not_found",
                SecretError::NameTaken { .. } => "name_taken",
                SecretError::Invalid { .. } => "invalid",
                SecretError::Io { .. } => "io",
                SecretError::Corrupt { .. } => "corrupt",
                SecretError::Key { .. } => "key",
                SecretError::Unavailable { .. }
                | SecretError::Denied { .. }
                | SecretError::Login { .. }
                | SecretError::CredentialFile { .. }
                | SecretError::Backend { .. }
                | SecretError::Malformed { .. } => "openbao",
            })
            .collect();
        assert_eq!(
            kinds,
            ["name_taken", "not_found", "invalid", "corrupt", "io", "key"]
        );
        for error in &errors {
            let display = error.to_string();
            assert!(!display.contains(PASSWORD), "{display}");
            assert!(!format!("{error:?}").contains(PASSWORD), "{error:?}");
        }
    }

    #[tokio::test]
    async fn stored_secret_debug_redacts() {
        let fixture = fixture();
        let created = fixture
            .store
            .create(docker("default", "hub"))
            .await
            .unwrap();
        let stored = fixture.store.get("default", &created.id).await.unwrap();
        let debug = format!("{stored:?}");
        assert!(!debug.contains(PASSWORD), "{debug}");
        assert!(debug.contains(created.id.as_str()));
    }
}
