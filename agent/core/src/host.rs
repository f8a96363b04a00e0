//! Registry hosts, as every stage names them: `normalize_server` (the one spelling of a
//! registry's `host[:port]`, shared by secrets, auth and pull), and `[[registry.mirror]]`
//! entries, parsed once at start-up.

use std::fmt;
use std::net::Ipv6Addr;

/// Longest normalised `server` (`host[:port]`), in bytes.
const MAX_SERVER_BYTES: usize = 255;

/// The Docker Hub host every alias is reduced to.
pub const DOCKER_HUB: &str = "docker.io";

/// Docker Hub's other names (without a port).
const DOCKER_HUB_ALIASES: [&str; 3] = ["docker.io", "index.docker.io", "registry-1.docker.io"];

/// Why a server name was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct HostError(pub &'static str);

/// Reduces a registry server given as a host, `host:port` or URL to `host[:port]`.
///
/// The scheme (http or https) and any path are dropped, the host is lower-cased, and Docker Hub's
/// names (`docker.io`, `index.docker.io`, `registry-1.docker.io`) become `docker.io`. Userinfo,
/// queries, fragments, bad characters, bad ports and results over 255 bytes are refused.
pub fn normalize_server(input: &str) -> Result<String, HostError> {
    let invalid = HostError;
    if input.is_empty() {
        return Err(invalid("must not be empty"));
    }
    if input.len() > 4 * MAX_SERVER_BYTES {
        return Err(invalid("longer than 255 bytes"));
    }
    let without_scheme = match input.split_once("://") {
        Some((scheme, rest)) => {
            if scheme.eq_ignore_ascii_case("https") || scheme.eq_ignore_ascii_case("http") {
                rest
            } else {
                return Err(invalid("scheme must be http or https"));
            }
        }
        None => input,
    };
    if without_scheme.contains(['?', '#']) {
        return Err(invalid("must not contain a query or fragment"));
    }
    let authority = without_scheme
        .split_once('/')
        .map_or(without_scheme, |(authority, _path)| authority);
    if authority.contains('@') {
        return Err(invalid("must not contain a username or password"));
    }
    if authority.is_empty() {
        return Err(invalid("has no host"));
    }

    let (host, port) =
        split_host_port(authority).ok_or_else(|| invalid("port must be 1 to 65535"))?;
    let host =
        normalize_host(host).ok_or_else(|| invalid("host must be a DNS name or an IP address"))?;

    let server = match port {
        None if DOCKER_HUB_ALIASES.contains(&host.as_str()) => DOCKER_HUB.to_owned(),
        None => host,
        Some(port) => format!("{host}:{port}"),
    };
    if server.len() > MAX_SERVER_BYTES {
        return Err(invalid("longer than 255 bytes"));
    }
    Ok(server)
}

/// Splits `host[:port]` (host may be a bracketed IPv6 literal). `None`: a malformed port.
fn split_host_port(authority: &str) -> Option<(&str, Option<u16>)> {
    let (host, port) = if authority.starts_with('[') {
        match authority.split_once(']') {
            Some((_, "")) => (authority, None),
            Some((bracketed, rest)) => {
                let port = rest.strip_prefix(':')?;
                (&authority[..=bracketed.len()], Some(port))
            }
            None => (authority, None),
        }
    } else {
        match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    match port {
        None => Some((host, None)),
        Some(port) => {
            if port.is_empty() || port.len() > 5 || !port.bytes().all(|byte| byte.is_ascii_digit())
            {
                return None;
            }
            let port: u16 = port.parse().ok()?;
            (port != 0).then_some((host, Some(port)))
        }
    }
}

/// A lower-cased DNS name, IPv4 address, or bracketed IPv6 literal; `None` when malformed.
fn normalize_host(host: &str) -> Option<String> {
    if let Some(inner) = host.strip_prefix('[') {
        let address: Ipv6Addr = inner.strip_suffix(']')?.parse().ok()?;
        return Some(format!("[{address}]"));
    }
    let host = host.to_ascii_lowercase();
    let label_ok = |label: &str| {
        let bytes = label.as_bytes();
        !bytes.is_empty()
            && bytes.len() <= 63
            && bytes
                .iter()
                .all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || *byte == b'-')
            && bytes.first() != Some(&b'-')
            && bytes.last() != Some(&b'-')
    };
    host.split('.').all(label_ok).then_some(host)
}

/// One `[[registry.mirror]]` entry, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mirror {
    /// The upstream's `host[:port]`, normalised as secret servers are (`docker.io`).
    pub upstream: String,
    pub endpoint: Endpoint,
    /// Whether the upstream's secret may be sent to this mirror.
    pub credentials: bool,
}

impl Mirror {
    /// Parses one config entry; the reason names what is wrong, for the config's error.
    pub fn parse(
        upstream: &str,
        endpoint: &str,
        credentials: bool,
    ) -> Result<Self, MirrorConfigError> {
        let upstream =
            normalize_server(upstream.trim()).map_err(|_| MirrorConfigError::Upstream)?;
        Ok(Self {
            upstream,
            endpoint: Endpoint::parse(endpoint)?,
            credentials,
        })
    }
}

/// What is wrong with a `[[registry.mirror]]` entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MirrorConfigError {
    #[error("upstream must be a registry host[:port], e.g. \"docker.io\"")]
    Upstream,
    #[error("endpoint must be an http:// or https:// URL, e.g. \"https://mirror.example:5000\"")]
    Scheme,
    #[error("endpoint must not carry a user, password, query or fragment")]
    Extras,
    #[error(
        "endpoint's path is a repository prefix of lower-case [a-z0-9._-] segments (without /v2)"
    )]
    Path,
}

/// Where a mirror listens: scheme, `host[:port]` and an optional repository prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    plain_http: bool,
    /// `host[:port]` (an IPv6 host in brackets).
    host: String,
    /// `""`, or `a/b` put before the upstream repository.
    prefix: String,
}

impl Endpoint {
    pub fn parse(text: &str) -> Result<Self, MirrorConfigError> {
        let url = reqwest::Url::parse(text.trim()).map_err(|_| MirrorConfigError::Scheme)?;
        let plain_http = match url.scheme() {
            "http" => true,
            "https" => false,
            _ => return Err(MirrorConfigError::Scheme),
        };
        let host = url
            .host_str()
            .filter(|host| !host.is_empty())
            .ok_or(MirrorConfigError::Scheme)?;
        if !url.username().is_empty()
            || url.password().is_some()
            || url.query().is_some()
            || url.fragment().is_some()
        {
            return Err(MirrorConfigError::Extras);
        }
        let host = match url.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_owned(),
        };
        let prefix = url.path().trim_matches('/').to_owned();
        if !prefix.is_empty() && !is_repository_prefix(&prefix) {
            return Err(MirrorConfigError::Path);
        }
        Ok(Self {
            plain_http,
            host,
            prefix,
        })
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn plain_http(&self) -> bool {
        self.plain_http
    }

    /// The repository as this mirror names it.
    pub fn repository(&self, upstream_repository: &str) -> String {
        if self.prefix.is_empty() {
            upstream_repository.to_owned()
        } else {
            format!("{}/{upstream_repository}", self.prefix)
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.plain_http { "http" } else { "https" };
        write!(f, "{scheme}://{}", self.host)?;
        if !self.prefix.is_empty() {
            write!(f, "/{}", self.prefix)?;
        }
        Ok(())
    }
}

/// `a`, `a/b-c`: segments of distribution's path components (`[a-z0-9]+([._-][a-z0-9]+)*`),
/// the first of them not `v2` (the prefix is a repository prefix, berth adds `/v2/` itself).
fn is_repository_prefix(prefix: &str) -> bool {
    let component = |segment: &str| {
        let bytes = segment.as_bytes();
        let alphanumeric = |byte: &u8| byte.is_ascii_lowercase() || byte.is_ascii_digit();
        bytes.first().is_some_and(alphanumeric)
            && bytes.last().is_some_and(alphanumeric)
            && bytes
                .iter()
                .all(|byte| alphanumeric(byte) || matches!(byte, b'.' | b'_' | b'-'))
            && !segment.contains("..")
    };
    prefix.split('/').next() != Some("v2") && prefix.split('/').all(component)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_server_table() {
        let accepted = [
            ("reg.example", "reg.example"),
            ("reg.example:5000", "reg.example:5000"),
            ("REG.Example:5000", "reg.example:5000"),
            ("https://reg.example:5000/v2/", "reg.example:5000"),
            ("HTTPS://Reg.Example", "reg.example"),
            ("http://127.0.0.1:5000", "127.0.0.1:5000"),
            ("127.0.0.1:5000", "127.0.0.1:5000"),
            ("reg.example/v2/", "reg.example"),
            ("https://reg.example:443", "reg.example:443"),
            ("reg.example:05000", "reg.example:5000"),
            ("localhost", "localhost"),
            ("[::1]:5000", "[::1]:5000"),
            ("https://[0:0:0:0:0:0:0:1]/v2/", "[::1]"),
            ("docker.io", "docker.io"),
            ("index.docker.io", "docker.io"),
            ("registry-1.docker.io", "docker.io"),
            ("https://index.docker.io/v1/", "docker.io"),
            ("https://registry-1.docker.io/v2/", "docker.io"),
            ("Docker.IO", "docker.io"),
            ("docker.io:443", "docker.io:443"),
            ("europe-west1-docker.pkg.dev", "europe-west1-docker.pkg.dev"),
            ("myregistry.azurecr.io", "myregistry.azurecr.io"),
        ];
        for (input, expected) in accepted {
            assert_eq!(
                normalize_server(input).unwrap(),
                expected,
                "input {input:?}"
            );
        }

        let refused = [
            "",
            "https://",
            "/v2/",
            "ftp://reg.example",
            "https://user:pass@reg.example",
            "user@reg.example",
            "reg.example:",
            "reg.example:0",
            "reg.example:65536",
            "reg.example:http",
            "reg.example:1:2",
            "reg_example",
            "reg example",
            "reg.example.",
            "-reg.example",
            "reg-.example",
            "reg..example",
            "rég.example",
            "https://reg.example/v2/?x=1",
            "reg.example#frag",
            "[::1",
            "[not-ip]:5000",
            "[::1]5000",
        ];
        for input in refused {
            assert!(
                matches!(normalize_server(input), Err(HostError(_))),
                "input {input:?} should be refused"
            );
        }

        let long_label = "a".repeat(63);
        let too_long = [long_label.as_str(); 5].join(".");
        assert_eq!(too_long.len(), 319);
        normalize_server(&too_long).unwrap_err();
        let just_fits = [long_label.as_str(); 4].join(".");
        assert_eq!(normalize_server(&just_fits).unwrap().len(), 255);
    }

    #[test]
    fn endpoints_parse_to_scheme_host_and_prefix() {
        for (text, display, host, plain_http, repository) in [
            (
                "https://mirror.example:5000",
                "https://mirror.example:5000",
                "mirror.example:5000",
                false,
                "library/alpine",
            ),
            (
                "http://127.0.0.1:5001/",
                "http://127.0.0.1:5001",
                "127.0.0.1:5001",
                true,
                "library/alpine",
            ),
            (
                "https://Harbor.Example/dockerhub-proxy",
                "https://harbor.example/dockerhub-proxy",
                "harbor.example",
                false,
                "dockerhub-proxy/library/alpine",
            ),
            (
                "https://[::1]:5000/a/b",
                "https://[::1]:5000/a/b",
                "[::1]:5000",
                false,
                "a/b/library/alpine",
            ),
            (
                "https://mirror.example:443",
                "https://mirror.example",
                "mirror.example",
                false,
                "library/alpine",
            ),
        ] {
            let endpoint = Endpoint::parse(text).unwrap();
            assert_eq!(endpoint.to_string(), display, "{text}");
            assert_eq!(endpoint.host(), host, "{text}");
            assert_eq!(endpoint.plain_http(), plain_http, "{text}");
            assert_eq!(endpoint.repository("library/alpine"), repository, "{text}");
        }
    }

    #[test]
    fn bad_endpoints_are_refused_with_a_reason() {
        for (text, expected) in [
            ("mirror.example:5000", MirrorConfigError::Scheme),
            ("ftp://mirror.example", MirrorConfigError::Scheme),
            ("https://", MirrorConfigError::Scheme),
            ("https://u:p@mirror.example", MirrorConfigError::Extras),
            ("https://mirror.example?x=1", MirrorConfigError::Extras),
            ("https://mirror.example#f", MirrorConfigError::Extras),
            ("https://mirror.example/v2", MirrorConfigError::Path),
            ("https://mirror.example/v2/proxy", MirrorConfigError::Path),
            ("https://mirror.example/Proxy", MirrorConfigError::Path),
            ("https://mirror.example/a//b", MirrorConfigError::Path),
            ("https://mirror.example/a/-b", MirrorConfigError::Path),
        ] {
            assert_eq!(Endpoint::parse(text), Err(expected), "{text}");
        }
        // "v2x" is a repository name, not the API root.
        Endpoint::parse("https://mirror.example/v2x").unwrap();
    }

    #[test]
    fn upstreams_are_normalised_like_secret_servers() {
        for (upstream, expected) in [
            ("docker.io", "docker.io"),
            ("index.docker.io", "docker.io"),
            ("https://registry-1.docker.io/v2/", "docker.io"),
            ("Registry.Example:5000", "registry.example:5000"),
        ] {
            let mirror = Mirror::parse(upstream, "https://m.example", false).unwrap();
            assert_eq!(mirror.upstream, expected, "{upstream}");
        }
        assert_eq!(
            Mirror::parse("", "https://m.example", false),
            Err(MirrorConfigError::Upstream)
        );
        assert_eq!(
            Mirror::parse("a b", "https://m.example", false),
            Err(MirrorConfigError::Upstream)
        );
    }
}
