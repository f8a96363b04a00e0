//! `WWW-Authenticate` challenges (RFC 7235): what a registry asks for.

/// One challenge the registry offered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
    },
}

/// A header that does not parse as any challenge berth can answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the registry's WWW-Authenticate header does not parse")]
pub struct ChallengeError;

/// Picks the challenge to answer: Bearer (token realm) when offered, else Basic.
pub fn parse(header: &str) -> Result<Challenge, ChallengeError> {
    let mut basic = false;
    for (scheme, params) in split_challenges(header)? {
        if scheme.eq_ignore_ascii_case("bearer") {
            let realm = params
                .iter()
                .find(|(key, _)| key.eq_ignore_ascii_case("realm"))
                .map(|(_, value)| value.clone())
                .filter(|realm| !realm.is_empty())
                .ok_or(ChallengeError)?;
            let service = params
                .iter()
                .find(|(key, _)| key.eq_ignore_ascii_case("service"))
                .map(|(_, value)| value.clone())
                .filter(|service| !service.is_empty());
            return Ok(Challenge::Bearer { realm, service });
        }
        if scheme.eq_ignore_ascii_case("basic") {
            basic = true;
        }
    }
    if basic {
        Ok(Challenge::Basic)
    } else {
        Err(ChallengeError)
    }
}

type Params = Vec<(String, String)>;

/// Splits `Scheme k=v, k="v", Scheme2 k=v` into schemes with their parameters.
fn split_challenges(header: &str) -> Result<Vec<(String, Params)>, ChallengeError> {
    if header.len() > 8192 {
        return Err(ChallengeError);
    }
    let mut challenges: Vec<(String, Params)> = Vec::new();
    let mut rest = header.trim();
    while !rest.is_empty() {
        // A token followed by '=' is a parameter of the current challenge; otherwise a scheme.
        let token_end = rest
            .find(|c: char| c == '=' || c == ',' || c.is_ascii_whitespace())
            .unwrap_or(rest.len());
        let token = &rest[..token_end];
        let after = rest[token_end..].trim_start();
        if token.is_empty() {
            rest = after.strip_prefix(',').ok_or(ChallengeError)?.trim_start();
            continue;
        }
        if let Some(value_part) = after.strip_prefix('=') {
            let (value, remaining) = parse_value(value_part.trim_start())?;
            let current = challenges.last_mut().ok_or(ChallengeError)?;
            current.1.push((token.to_owned(), value));
            rest = remaining.trim_start();
            rest = rest.strip_prefix(',').unwrap_or(rest).trim_start();
        } else {
            if !token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
            {
                return Err(ChallengeError);
            }
            challenges.push((token.to_owned(), Vec::new()));
            rest = after.strip_prefix(',').unwrap_or(after).trim_start();
        }
    }
    if challenges.is_empty() {
        return Err(ChallengeError);
    }
    Ok(challenges)
}

/// A quoted string (with backslash escapes) or a token; returns it and what follows.
fn parse_value(input: &str) -> Result<(String, &str), ChallengeError> {
    if let Some(quoted) = input.strip_prefix('"') {
        let mut value = String::new();
        let mut chars = quoted.char_indices();
        while let Some((index, c)) = chars.next() {
            match c {
                '\\' => value.push(chars.next().ok_or(ChallengeError)?.1),
                '"' => return Ok((value, &quoted[index + 1..])),
                c if c.is_control() => return Err(ChallengeError),
                c => value.push(c),
            }
        }
        Err(ChallengeError)
    } else {
        let end = input
            .find(|c: char| c == ',' || c.is_ascii_whitespace())
            .unwrap_or(input.len());
        if end == 0 {
            return Err(ChallengeError);
        }
        Ok((input[..end].to_owned(), &input[end..]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bearer(realm: &str, service: Option<&str>) -> Challenge {
        Challenge::Bearer {
            realm: realm.to_owned(),
            service: service.map(str::to_owned),
        }
    }

    #[test]
    fn real_world_challenges() {
        assert_eq!(
            parse(
                r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:samalba/my-app:pull,push""#
            ),
            Ok(bearer(
                "https://auth.docker.io/token",
                Some("registry.docker.io")
            ))
        );
        // ACR
        assert_eq!(
            parse(r#"Bearer realm="https://reg.azurecr.io/oauth2/token",service="reg.azurecr.io""#),
            Ok(bearer(
                "https://reg.azurecr.io/oauth2/token",
                Some("reg.azurecr.io")
            ))
        );
        // GAR: no service at all
        assert_eq!(
            parse(r#"Bearer realm="https://us-central1-docker.pkg.dev/v2/token""#),
            Ok(bearer("https://us-central1-docker.pkg.dev/v2/token", None))
        );
        // distribution htpasswd
        assert_eq!(parse(r#"Basic realm="test""#), Ok(Challenge::Basic));
        // case-insensitive scheme, unquoted values, spaces after commas
        assert_eq!(
            parse("bearer realm=https://r.example/t, service=svc"),
            Ok(bearer("https://r.example/t", Some("svc")))
        );
        // insufficient_scope with error param
        assert_eq!(
            parse(
                r#"Bearer realm="https://r/t",service="s",scope="repository:a:pull",error="insufficient_scope""#
            ),
            Ok(bearer("https://r/t", Some("s")))
        );
    }

    #[test]
    fn bearer_wins_over_basic_and_escapes_unquote() {
        assert_eq!(
            parse(r#"Basic realm="x", Bearer realm="https://r/\"t\"""#),
            Ok(bearer("https://r/\"t\"", None))
        );
    }

    #[test]
    fn garbage_is_refused() {
        for bad in [
            "",
            "Bearer",
            r#"Bearer realm="unterminated"#,
            r#"Bearer service="s""#,
            "Negotiate abc",
            "=x",
            "Bearer realm=",
            "B@d realm=x",
        ] {
            assert_eq!(parse(bad), Err(ChallengeError), "{bad:?}");
        }
        assert_eq!(parse(&"a".repeat(10_000)), Err(ChallengeError));
    }
}
