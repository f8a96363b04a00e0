//! Token realms are chosen by the registry, and credentials go there: check the URL first
//! (CVE-2020-15157 and the 2026 realm advisories in protocols.md §F2).

use std::net::IpAddr;

use super::AuthError;

/// Accepts `realm` for `registry` or says why not: https (http only when the registry itself is
/// in `plain_http`), no user info, no link-local or metadata addresses, loopback only for a
/// loopback registry.
pub(super) fn check(
    realm: &str,
    registry: &str,
    plain_http: &[String],
) -> Result<reqwest::Url, AuthError> {
    let refuse = |reason| AuthError::Realm {
        registry: registry.to_owned(),
        reason,
    };
    let url = reqwest::Url::parse(realm).map_err(|_| refuse("not a URL"))?;
    let registry_plain = plain_http.iter().any(|host| host == registry);
    match url.scheme() {
        "https" => {}
        "http" if registry_plain => {}
        "http" => return Err(refuse("plain http for a registry spoken to over https")),
        _ => return Err(refuse("not an http(s) URL")),
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(refuse("the URL carries user info"));
    }
    let host = url.host_str().ok_or_else(|| refuse("no host"))?;
    let registry_host = host_of(registry);
    let registry_loopback = is_localhost(registry_host)
        || registry_host
            .parse::<IpAddr>()
            .is_ok_and(|registry_ip| registry_ip.to_canonical().is_loopback());
    if let Ok(ip) = host
        .trim_matches(|c| c == '[' || c == ']')
        .parse::<IpAddr>()
    {
        // `::ffff:a.b.c.d` reaches a.b.c.d: judge the address the connection will really use.
        let ip = ip.to_canonical();
        if is_link_local(ip) || ip.is_unspecified() || ip.is_multicast() {
            return Err(refuse("a link-local, unspecified or multicast address"));
        }
        if ip.is_loopback() && !registry_loopback {
            return Err(refuse(
                "a loopback address for a registry that is not on loopback",
            ));
        }
    } else if is_localhost(host) && !registry_loopback {
        return Err(refuse("localhost for a registry that is not on loopback"));
    }
    Ok(url)
}

/// `localhost`, `localhost.` and names under `.localhost` (RFC 6761: all loopback).
fn is_localhost(host: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    host == "localhost" || host.ends_with(".localhost")
}

/// The host of `host[:port]` (IPv6 brackets removed).
fn host_of(registry: &str) -> &str {
    if let Some(rest) = registry.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    registry.rsplit_once(':').map_or(registry, |(host, _)| host)
}

fn is_link_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => {
            (v6.segments()[0] & 0xffc0) == 0xfe80 || v6.segments()[..4] == [0xfd00, 0xec2, 0, 0]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn realm_policy() {
        let none: Vec<String> = vec![];
        let plain = vec!["127.0.0.1:5000".to_owned()];
        check("https://auth.docker.io/token", "docker.io", &none).unwrap();
        check("https://127.0.0.1:9000/token", "127.0.0.1:5000", &none).unwrap();
        check("http://127.0.0.1:9000/token", "127.0.0.1:5000", &plain).unwrap();
        check("https://localhost:9000/token", "127.0.0.1:5000", &none).unwrap();
        check("https://127.0.0.1:9000/token", "localhost.:5000", &none).unwrap();
        for (realm, registry) in [
            ("http://auth.example/token", "reg.example"),
            ("https://user:pw@auth.example/token", "reg.example"),
            ("https://169.254.169.254/latest", "reg.example"),
            ("https://[fe80::1]/t", "reg.example"),
            ("https://127.0.0.1/t", "reg.example"),
            ("https://localhost/t", "reg.example"),
            ("https://localhost./t", "reg.example"),
            ("https://realm.localhost/t", "reg.example"),
            ("file:///etc/passwd", "reg.example"),
            ("https://0.0.0.0/t", "reg.example"),
            ("https://[::ffff:169.254.169.254]/t", "reg.example"),
            ("https://[::ffff:127.0.0.1]/t", "reg.example"),
            ("https://[::ffff:0.0.0.0]/t", "reg.example"),
            ("not a url", "reg.example"),
        ] {
            assert!(
                matches!(check(realm, registry, &none), Err(AuthError::Realm { .. })),
                "{realm} for {registry} accepted"
            );
        }
    }
}
