//! What goes on the wire to a registry or a token realm, and the one place it becomes an
//! `Authorization` header. The username is no secret; passwords and tokens stay in
//! `SecretString` (zeroized on drop) until [`WireAuth::header`] writes them into a header
//! value marked sensitive (HPACK never indexes it, and `Debug` of the header hides it).

use base64::Engine as _;
use http::HeaderValue;
use secrecy::{ExposeSecret as _, SecretString};
use zeroize::Zeroizing;

/// The authorization of a request, sealed: only `auth` makes one from a credential or looks
/// inside; the puller holds it and asks for the header. Not `Serialize`, not `Display`; its
/// `Debug` names the kind and the username only.
#[derive(Clone, Default)]
pub struct WireAuth(pub(super) Wire);

/// What a [`WireAuth`] holds: nothing, Basic credentials, or a Bearer token.
#[derive(Clone, Default)]
pub(super) enum Wire {
    #[default]
    Anonymous,
    Basic {
        username: String,
        password: SecretString,
    },
    Bearer(SecretString),
}

impl WireAuth {
    /// No credential.
    pub fn anonymous() -> Self {
        Self(Wire::Anonymous)
    }

    /// A Bearer token (as a token realm answers).
    pub fn bearer(token: SecretString) -> Self {
        Self(Wire::Bearer(token))
    }

    /// Basic credentials.
    pub(super) fn basic(username: &str, password: &SecretString) -> Self {
        Self(Wire::Basic {
            username: username.to_owned(),
            password: password.clone(),
        })
    }

    /// The `Authorization` header value, marked sensitive; None when anonymous, or for a
    /// token no header may carry (token responses with one are refused before it gets here).
    pub fn header(&self) -> Option<HeaderValue> {
        match &self.0 {
            Wire::Anonymous => None,
            Wire::Basic { username, password } => Some(basic_header(username, password)),
            Wire::Bearer(token) => {
                let value = Zeroizing::new(format!("Bearer {}", token.expose_secret()));
                let mut header = HeaderValue::from_str(&value).ok()?;
                header.set_sensitive(true);
                Some(header)
            }
        }
    }
}

/// `Basic base64(username:password)`, marked sensitive; the plain text is wiped after encoding.
pub(super) fn basic_header(username: &str, password: &SecretString) -> HeaderValue {
    let plain = Zeroizing::new(format!("{username}:{}", password.expose_secret()));
    let encoded =
        Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(plain.as_bytes()));
    let value = Zeroizing::new(format!("Basic {}", encoded.as_str()));
    let mut header =
        HeaderValue::from_str(&value).expect("invariant: base64 is a valid header value");
    header.set_sensitive(true);
    header
}

impl std::fmt::Debug for WireAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Wire::Anonymous => f.write_str("Anonymous"),
            Wire::Basic { username, .. } => f
                .debug_struct("Basic")
                .field("username", username)
                .field("password", &"<redacted>")
                .finish(),
            Wire::Bearer(_) => f.debug_tuple("Bearer").field(&"<redacted>").finish(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWORD: &str = "zzpasszz";
    const TOKEN: &str = "zztokenzz";

    fn every_variant() -> Vec<WireAuth> {
        vec![
            WireAuth::anonymous(),
            WireAuth::basic("alice", &SecretString::from(PASSWORD)),
            WireAuth::bearer(SecretString::from(TOKEN)),
        ]
    }

    #[test]
    fn debug_of_every_variant_shows_no_material() {
        for auth in every_variant() {
            for shown in [format!("{auth:?}"), format!("{auth:#?}")] {
                assert!(!shown.contains(PASSWORD), "{shown}");
                assert!(!shown.contains(TOKEN), "{shown}");
            }
            if let Some(header) = auth.header() {
                let shown = format!("{header:?}");
                assert!(
                    !shown.contains(TOKEN) && !shown.contains("YWxpY2U6"),
                    "{shown}"
                );
            }
        }
        assert_eq!(format!("{:?}", WireAuth::default()), "Anonymous");
    }

    #[test]
    fn headers_are_sensitive_and_well_formed() {
        assert!(WireAuth::anonymous().header().is_none());
        let basic = WireAuth::basic("alice", &SecretString::from(PASSWORD))
            .header()
            .unwrap();
        assert!(basic.is_sensitive());
        let expected = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("alice:{PASSWORD}"))
        );
        assert_eq!(basic.to_str().unwrap(), expected);
        let bearer = WireAuth::bearer(SecretString::from(TOKEN))
            .header()
            .unwrap();
        assert!(bearer.is_sensitive());
        assert_eq!(bearer.to_str().unwrap(), format!("Bearer {TOKEN}"));
    }

    #[test]
    fn material_no_header_can_carry_gives_no_header() {
        let bearer = WireAuth::bearer(SecretString::from("line\nbreak"));
        assert!(bearer.header().is_none());
    }

    /// Type-level: the password and token of a clone (what every retry holds) are
    /// `SecretString`s, so no plain `String` copy of them exists outside a header.
    #[test]
    fn clones_hold_material_only_as_secret_strings() {
        fn secret(_: &SecretString) {}
        for auth in every_variant() {
            match auth.clone().0 {
                Wire::Anonymous => {}
                Wire::Basic { password, .. } => secret(&password),
                Wire::Bearer(token) => secret(&token),
            }
        }
    }
}
