//! The sealed record format of the `file` store.
//!
//! A record is `MAGIC || nonce (12 bytes) || AES-256-GCM ciphertext+tag`, sealed with a fresh random
//! nonce on every write. The associated data is `berth-secret-v1\0<project>\0<id>`, so a record
//! copied to another project's directory or renamed to another id fails to authenticate
//! ([`SecretError::Corrupt`]). The plaintext is a small JSON document, built and parsed in zeroized
//! buffers; material moves into [`SecretString`] right away.

use std::time::{Duration, UNIX_EPOCH};

use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use super::fields::{self, FieldsIn, FieldsOut, Reading};
use super::{Credential, SecretError, SecretId, SecretKind, SecretMeta, StoredSecret};

/// First bytes of every record: "berth sealed record", format version 1.
pub(super) const MAGIC: [u8; 4] = [b'B', b'S', b'R', 1];

/// AES-GCM standard nonce length.
const NONCE_BYTES: usize = 12;

/// Prefix of the associated data; bumped with the record format.
const AAD_PREFIX: &[u8] = b"berth-secret-v1\0";

/// The JSON plaintext of a record, as written (borrows; the buffer it goes into is zeroized).
#[derive(Serialize)]
struct PlainOut<'a> {
    name: &'a str,
    kind: &'a str,
    server: &'a str,
    created_at: u64,
    #[serde(flatten)]
    credential: &'a FieldsOut<'a>,
}

/// The JSON plaintext of a record, as read. Zeroized on drop; material is taken out of it.
#[derive(Deserialize, Zeroize, ZeroizeOnDrop)]
#[serde(deny_unknown_fields)]
struct PlainIn {
    name: String,
    kind: String,
    server: String,
    created_at: u64,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    json_key: Option<String>,
}

/// Seals one secret into record bytes: `MAGIC || nonce || ciphertext+tag`.
pub(super) fn seal(
    cipher: &Aes256Gcm,
    meta: &SecretMeta,
    created_secs: u64,
    credential: &Credential,
) -> Result<Vec<u8>, SecretError> {
    let credential = FieldsOut::new(credential);
    let plain = PlainOut {
        name: &meta.name,
        kind: meta.kind.as_str(),
        server: &meta.server,
        created_at: created_secs,
        credential: &credential,
    };
    let plaintext = fields::encode(&plain, &credential, meta.name.len() + meta.server.len())?;

    let mut nonce = [0u8; NONCE_BYTES];
    rand::rng().fill_bytes(&mut nonce);
    let aad = associated_data(&meta.project, &meta.id);
    let ciphertext = cipher
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: &plaintext,
                aad: &aad,
            },
        )
        .map_err(|_| SecretError::Invalid {
            field: "credential",
            reason: "cannot be sealed",
        })?;
    let mut record = Vec::with_capacity(MAGIC.len() + NONCE_BYTES + ciphertext.len());
    record.extend_from_slice(&MAGIC);
    record.extend_from_slice(&nonce);
    record.extend_from_slice(&ciphertext);
    Ok(record)
}

/// Opens record bytes of `(project, id)`; anything that fails to authenticate or decode is
/// [`SecretError::Corrupt`].
pub(super) fn unseal(
    cipher: &Aes256Gcm,
    project: &str,
    id: &SecretId,
    record: &[u8],
) -> Result<StoredSecret, SecretError> {
    let corrupt = || SecretError::Corrupt {
        id: id.as_str().to_owned(),
    };
    let body = record.strip_prefix(&MAGIC).ok_or_else(corrupt)?;
    if body.len() < NONCE_BYTES {
        return Err(corrupt());
    }
    let (nonce, ciphertext) = body.split_at(NONCE_BYTES);
    let aad = associated_data(project, id);
    let plaintext = Zeroizing::new(
        cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad: &aad,
                },
            )
            .map_err(|_| corrupt())?,
    );
    let mut plain: PlainIn = serde_json::from_slice(&plaintext).map_err(|_| corrupt())?;
    let kind: SecretKind = plain.kind.parse().map_err(|_| corrupt())?;
    let credential = FieldsIn {
        username: plain.username.take(),
        password: plain.password.take(),
        json_key: plain.json_key.take(),
    }
    .into_credential(kind, Reading::Exact)
    .map_err(|_| corrupt())?;
    let created_at = UNIX_EPOCH
        .checked_add(Duration::from_secs(plain.created_at))
        .ok_or_else(corrupt)?;
    let meta = SecretMeta {
        id: id.clone(),
        project: project.to_owned(),
        name: std::mem::take(&mut plain.name),
        kind,
        server: std::mem::take(&mut plain.server),
        created_at,
    };
    Ok(StoredSecret { meta, credential })
}

/// Binds a record to its place: `berth-secret-v1\0<project>\0<id>`.
fn associated_data(project: &str, id: &SecretId) -> Vec<u8> {
    let mut aad = Vec::with_capacity(AAD_PREFIX.len() + project.len() + 1 + id.as_str().len());
    aad.extend_from_slice(AAD_PREFIX);
    aad.extend_from_slice(project.as_bytes());
    aad.push(0);
    aad.extend_from_slice(id.as_str().as_bytes());
    aad
}

#[cfg(test)]
mod tests {
    use aes_gcm::KeyInit as _;

    use super::*;
    use crate::fields::tests::{credential, same, KINDS};

    /// Every kind, sealed and opened again, comes back as it went in; opened as another id it
    /// is corrupt.
    #[test]
    fn every_kind_round_trips_through_a_sealed_record() {
        let cipher = Aes256Gcm::new_from_slice(&[7u8; 32]).unwrap();
        for kind in KINDS {
            let credential = credential(kind);
            let meta = SecretMeta {
                id: SecretId::parse("secret-a").unwrap(),
                project: "default".to_owned(),
                name: "n".to_owned(),
                kind,
                server: "r.example".to_owned(),
                created_at: UNIX_EPOCH + Duration::from_secs(1_700_000_001),
            };
            let record = seal(&cipher, &meta, 1_700_000_001, &credential).unwrap();
            let stored = unseal(&cipher, "default", &meta.id, &record).unwrap();
            assert_eq!(stored.meta.kind, kind);
            assert_eq!(stored.meta.name, "n");
            assert_eq!(stored.meta.created_at, meta.created_at);
            assert!(same(&credential, &stored.credential), "{kind}");
            let other = SecretId::parse("secret-b").unwrap();
            assert!(matches!(
                unseal(&cipher, "default", &other, &record),
                Err(SecretError::Corrupt { .. })
            ));
        }
    }
}
