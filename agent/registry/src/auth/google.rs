//! Google service accounts: an RS256 JWT assertion signed with the key, exchanged at the key's
//! token_uri for an access token, which then logs in to the registry as `oauth2accesstoken`.

use std::time::{Duration, SystemTime};

use secrecy::{ExposeSecret as _, SecretString};
use serde::Serialize;

use super::AuthError;
use berth_secrets::gar_key::ServiceAccountKey;

/// The scope Artifact Registry and Container Registry accept.
const SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";
/// Assertion lifetime (Google allows at most one hour).
const ASSERTION_LIFETIME: Duration = Duration::from_secs(3600);
/// Clock-skew allowance, as golang/oauth2 back-dates `iat`.
const SKEW: Duration = Duration::from_secs(10);

/// The registry username for a Google access token.
pub(super) const ACCESS_TOKEN_USERNAME: &str = "oauth2accesstoken";

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    scope: &'a str,
    aud: &'a str,
    iat: u64,
    exp: u64,
}

/// Signs the JWT-bearer assertion for `key`.
pub(super) fn assertion(
    key: &ServiceAccountKey,
    secret: &str,
    now: SystemTime,
) -> Result<SecretString, AuthError> {
    let iat = now
        .checked_sub(SKEW)
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let claims = Claims {
        iss: &key.client_email,
        scope: SCOPE,
        aud: &key.token_uri,
        iat,
        exp: iat + ASSERTION_LIFETIME.as_secs(),
    };
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = Some(key.private_key_id.clone());
    let unusable = || AuthError::KeyUnusable {
        secret: secret.to_owned(),
    };
    let signing_key =
        jsonwebtoken::EncodingKey::from_rsa_pem(key.private_key.expose_secret().as_bytes())
            .map_err(|_| unusable())?;
    let token = jsonwebtoken::encode(&header, &claims, &signing_key).map_err(|_| unusable())?;
    Ok(SecretString::from(token))
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_secrets::gar_key;

    #[test]
    fn assertion_is_an_rs256_jwt_with_googles_claims() {
        let json = serde_json::json!({
            "type": "service_account",
            "project_id": "p",
            "private_key_id": "kid-1",
            "private_key": include_str!("testdata/rsa2048.pem"),
            "client_email": "puller@p.iam.gserviceaccount.com",
            "client_id": "1",
            "token_uri": "https://oauth2.googleapis.com/token",
        })
        .to_string();
        let key = gar_key::parse(&SecretString::from(json)).unwrap();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let jwt = assertion(&key, "secret-x", now).unwrap();
        let header = jsonwebtoken::decode_header(jwt.expose_secret()).unwrap();
        assert_eq!(header.alg, jsonwebtoken::Algorithm::RS256);
        assert_eq!(header.kid.as_deref(), Some("kid-1"));

        let public = rsa_public_pem();
        let decoding = jsonwebtoken::DecodingKey::from_rsa_pem(public.as_bytes()).unwrap();
        let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
        validation.set_audience(&["https://oauth2.googleapis.com/token"]);
        validation.validate_exp = false;
        let data =
            jsonwebtoken::decode::<serde_json::Value>(jwt.expose_secret(), &decoding, &validation)
                .unwrap();
        assert_eq!(data.claims["iss"], "puller@p.iam.gserviceaccount.com");
        assert_eq!(data.claims["scope"], SCOPE);
        assert_eq!(data.claims["iat"], 1_800_000_000 - 10);
        assert_eq!(data.claims["exp"], 1_800_000_000 - 10 + 3600);
    }

    /// The public half of `TEST_RSA_PEM` (`openssl pkey -pubout`).
    fn rsa_public_pem() -> &'static str {
        include_str!("testdata/rsa2048.pub.pem")
    }
}
