//! Credentials without stored secrets: kubelet credential provider plugins
//! (`[[credential_provider]]`, API `credentialprovider.kubelet.k8s.io/v1`).
//!
//! For an order with no `pull_secret`, in a project a provider lists, for an image its
//! `match_images` match, berthd runs the plugin (only the configured `env` and `PATH`, its own
//! process group, killed whole on timeout), writes a `CredentialProviderRequest` to its stdin
//! and reads a `CredentialProviderResponse` from its stdout. The answer is kept in memory only,
//! per its `cacheKeyType` (Image, Registry or Global) for its `cacheDuration` (or the
//! provider's `default_cache_seconds`), and becomes a [`StoredSecret`] named
//! `provider:<name>`: from there on it goes through `auth` exactly like a stored secret. One
//! plugin run per provider at a time (single flight): orders that wait find the cache filled.
//! The plugin's output never reaches a log or an error.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use secrecy::SecretString;
use serde::Deserialize;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::time::Instant;
use tracing::{debug, instrument, warn};
use zeroize::Zeroizing;

use berth_core::metrics::{ProviderLabels, SharedMetrics};
use berth_core::order::ImageRef;

use super::{Credential, SecretId, SecretKind, SecretMeta, StoredSecret};

/// The API version berth speaks to plugins.
const API_VERSION: &str = "credentialprovider.kubelet.k8s.io/v1";

/// Longest plugin answer read, in bytes.
const MAX_RESPONSE_BYTES: u64 = 1024 * 1024;

/// The `PATH` a plugin gets when berthd itself has none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Why a provider gave no credential. Never carries the plugin's output.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("credential provider provider:{provider} could not be started")]
    Spawn {
        provider: String,
        #[source]
        source: std::io::Error,
    },
    #[error("credential provider provider:{provider} gave no answer within {seconds} s")]
    Timeout { provider: String, seconds: u64 },
    #[error("credential provider provider:{provider} failed ({status})")]
    Failed { provider: String, status: String },
    #[error(
        "credential provider provider:{provider} answered something berth cannot use: {reason}"
    )]
    Invalid {
        provider: String,
        reason: &'static str,
    },
}

/// One `match_images` pattern, kubelet's syntax: `host[:port][/path]`, an optional
/// `https://`; `*` and `?` in a host label match within that label only (`*.example.com`
/// matches `a.example.com`, not `a.b.example.com`); the port must be the same (none matches
/// none); the path is a prefix of the image's path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MatchImage {
    labels: Vec<String>,
    port: String,
    path: String,
}

impl MatchImage {
    pub fn parse(pattern: &str) -> Result<Self, &'static str> {
        let (host, port, path) = split_url(pattern).ok_or("not a host[:port][/path] pattern")?;
        if host.is_empty() {
            return Err("the host is empty");
        }
        if host.contains(['[', ']', '\\']) {
            return Err("character classes and escapes are not supported; use * and ?");
        }
        let labels: Vec<String> = host.split('.').map(str::to_ascii_lowercase).collect();
        if labels.iter().any(String::is_empty) {
            return Err("a host label is empty");
        }
        Ok(Self {
            labels,
            port: port.to_owned(),
            path: path.to_owned(),
        })
    }

    /// Whether `target` (`host[:port]/repository[:tag|@digest]`) matches.
    pub fn matches(&self, target: &str) -> bool {
        let Some((host, port, path)) = split_url(target) else {
            return false;
        };
        if port != self.port {
            return false;
        }
        let target_labels: Vec<String> = host.split('.').map(str::to_ascii_lowercase).collect();
        if target_labels.len() != self.labels.len() {
            return false;
        }
        let hosts_match = self
            .labels
            .iter()
            .zip(&target_labels)
            .all(|(pattern, label)| glob(pattern.as_bytes(), label.as_bytes()));
        hosts_match && path.starts_with(&self.path)
    }

    /// How specific the pattern is: longer patterns win among several matching keys.
    fn specificity(&self) -> (usize, usize, usize) {
        let literal: usize = self
            .labels
            .iter()
            .map(|label| label.bytes().filter(|b| !matches!(b, b'*' | b'?')).count())
            .sum();
        (self.path.len(), literal, self.port.len())
    }
}

/// (host, port, path) of `host[:port][/path]`, after an optional scheme.
fn split_url(input: &str) -> Option<(&str, &str, &str)> {
    let rest = input
        .strip_prefix("https://")
        .or_else(|| input.strip_prefix("http://"))
        .unwrap_or(input);
    let (authority, path) = match rest.find('/') {
        Some(slash) => rest.split_at(slash),
        None => (rest, ""),
    };
    if authority.contains('@') {
        return None;
    }
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => {
            (host, port)
        }
        Some(_) => return None,
        None => (authority, ""),
    };
    Some((host, port, path))
}

/// Go's `path.Match` on one host label (no separators in it): `*` any run, `?` one byte.
fn glob(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(&c) if c == b'?' || c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((star_p, star_t)) => {
                    p = star_p + 1;
                    t = star_t + 1;
                    star = Some((star_p, star_t + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// A Go duration (`300s`, `5m0s`, `1h30m`, `1.5h`, `0`).
fn parse_go_duration(input: &str) -> Option<Duration> {
    if input == "0" {
        return Some(Duration::ZERO);
    }
    let mut rest = input;
    let mut total = 0f64;
    if rest.is_empty() || rest.starts_with('-') {
        return None;
    }
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number: f64 = rest[..number_len].parse().ok()?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds_per_unit = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += number * seconds_per_unit;
    }
    Duration::try_from_secs_f64(total).ok()
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Response {
    api_version: String,
    kind: String,
    cache_key_type: String,
    #[serde(default)]
    cache_duration: Option<String>,
    #[serde(default)]
    auth: HashMap<String, AuthEntry>,
}

#[derive(Deserialize)]
struct AuthEntry {
    #[serde(default)]
    username: String,
    password: Option<SecretString>,
}

impl std::fmt::Debug for AuthEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthEntry")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// A plugin's answer, kept until it expires.
#[derive(Debug)]
struct Answer {
    auth: Vec<(MatchImage, String, SecretString)>,
    expires_at: Instant,
}

impl Answer {
    /// The credential of the most specific key that matches `target`.
    fn credential_for(&self, target: &str) -> Option<(String, SecretString)> {
        self.auth
            .iter()
            .filter(|(pattern, _, _)| pattern.matches(target))
            .max_by_key(|(pattern, _, _)| pattern.specificity())
            .map(|(_, username, password)| (username.clone(), password.clone()))
    }
}

/// One configured plugin with its cache.
/// One `[[credential_provider]]` entry, validated and parsed once at start-up.
#[derive(Debug, Clone)]
pub struct ProviderSettings {
    pub name: String,
    pub command: PathBuf,
    pub args: Vec<String>,
    /// The only environment the plugin gets, beside `PATH`.
    pub env: BTreeMap<String, String>,
    pub match_images: Vec<MatchImage>,
    /// Projects whose orders may use it; empty = none.
    pub projects: Vec<String>,
    pub default_cache: Duration,
    pub timeout: Duration,
}

#[derive(Debug)]
struct Provider {
    name: String,
    command: PathBuf,
    args: Vec<String>,
    env: BTreeMap<String, String>,
    match_images: Vec<MatchImage>,
    projects: Vec<String>,
    default_cache: Duration,
    timeout: Duration,
    /// Answers by cache key: `image:<image>`, `registry:<host>` or `global`.
    cache: Mutex<HashMap<String, Answer>>,
    /// Single flight: one plugin run at a time.
    flight: tokio::sync::Mutex<()>,
}

/// Every `[[credential_provider]]`, in file order.
#[derive(Debug, Default)]
pub struct CredentialProviders {
    providers: Vec<Provider>,
    metrics: SharedMetrics,
}

impl CredentialProviders {
    /// The providers of `[[credential_provider]]`, in file order.
    pub fn new(settings: Vec<ProviderSettings>, metrics: SharedMetrics) -> Self {
        let providers = settings
            .into_iter()
            .map(|entry| Provider {
                name: entry.name,
                command: entry.command,
                args: entry.args,
                env: entry.env,
                match_images: entry.match_images,
                projects: entry.projects,
                default_cache: entry.default_cache,
                timeout: entry.timeout,
                cache: Mutex::default(),
                flight: tokio::sync::Mutex::new(()),
            })
            .collect();
        Self { providers, metrics }
    }

    /// The credential for an order of `project` without a pull secret: from the first provider
    /// whose `match_images` match `image` and whose `projects` list `project`. None when no
    /// provider applies (the plugin is not run) or the plugin has nothing for this image.
    #[instrument(skip_all, fields(project = %project, image = %image))]
    pub async fn credential(
        &self,
        project: &str,
        image: &ImageRef,
    ) -> Result<Option<StoredSecret>, ProviderError> {
        let target = format!("{}/{}", image.registry(), image.repository());
        let Some(provider) = self.providers.iter().find(|provider| {
            provider.projects.iter().any(|allowed| allowed == project)
                && provider
                    .match_images
                    .iter()
                    .any(|pattern| pattern.matches(&target))
        }) else {
            return Ok(None);
        };
        let found = match provider.cached(image, &target) {
            Some(found) => found,
            None => {
                let _flight = provider.flight.lock().await;
                // Another order may have filled the cache while this one waited.
                match provider.cached(image, &target) {
                    Some(found) => found,
                    None => {
                        let result = provider.run(image).await;
                        self.metrics
                            .credential_provider_requests
                            .get_or_create(&ProviderLabels {
                                provider: provider.name.clone(),
                                result: match &result {
                                    Ok(_) => "ok",
                                    Err(ProviderError::Timeout { .. }) => "timeout",
                                    Err(ProviderError::Invalid { .. }) => "invalid",
                                    Err(
                                        ProviderError::Spawn { .. } | ProviderError::Failed { .. },
                                    ) => "failed",
                                },
                            })
                            .inc();
                        let (key, answer) = result?;
                        let found = answer.credential_for(&target);
                        if answer.expires_at > Instant::now() {
                            provider.lock_cache().insert(key, answer);
                        }
                        found
                    }
                }
            }
        };
        let Some((username, password)) = found else {
            debug!(provider = %provider.name, "credential provider has nothing for this image");
            return Ok(None);
        };
        Ok(Some(StoredSecret {
            meta: SecretMeta {
                id: SecretId::provider(&provider.name),
                project: project.to_owned(),
                name: provider.name.clone(),
                kind: SecretKind::Docker,
                server: image.registry().to_owned(),
                created_at: SystemTime::now(),
            },
            credential: Credential::UsernamePassword { username, password },
        }))
    }
}

impl Provider {
    fn lock_cache(&self) -> std::sync::MutexGuard<'_, HashMap<String, Answer>> {
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A cached answer for `image`: by image, then registry, then global (as kubelet looks).
    fn cached(&self, image: &ImageRef, target: &str) -> Option<Option<(String, SecretString)>> {
        let mut cache = self.lock_cache();
        let now = Instant::now();
        cache.retain(|_, answer| answer.expires_at > now);
        [image_key(image), registry_key(image), "global".to_owned()]
            .iter()
            .find_map(|key| cache.get(key))
            .map(|answer| answer.credential_for(target))
    }

    /// Runs the plugin once; its answer and the cache key it asked for.
    #[instrument(skip_all, fields(provider = %self.name))]
    async fn run(&self, image: &ImageRef) -> Result<(String, Answer), ProviderError> {
        let provider = || self.name.clone();
        let request = serde_json::json!({
            "apiVersion": API_VERSION,
            "kind": "CredentialProviderRequest",
            "image": image.to_string(),
        })
        .to_string();
        let mut command = tokio::process::Command::new(&self.command);
        command
            .args(&self.args)
            .env_clear()
            .env(
                "PATH",
                std::env::var_os("PATH").unwrap_or_else(|| DEFAULT_PATH.into()),
            )
            .envs(&self.env)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            // The plugin's diagnostics may repeat what it fetched: not kept.
            .stderr(std::process::Stdio::null())
            .process_group(0)
            .kill_on_drop(true);
        let mut child = command.spawn().map_err(|source| ProviderError::Spawn {
            provider: provider(),
            source,
        })?;
        let group = child
            .id()
            .and_then(|pid| i32::try_from(pid).ok())
            .map(nix::unistd::Pid::from_raw);
        let mut stdin = child.stdin.take();
        let mut stdout = child.stdout.take();
        let exchange = async {
            if let Some(stdin) = stdin.as_mut() {
                // A plugin that does not read its request may still answer.
                stdin.write_all(request.as_bytes()).await.ok();
            }
            drop(stdin.take());
            let mut output = Zeroizing::new(Vec::new());
            if let Some(stdout) = stdout.take() {
                stdout
                    .take(MAX_RESPONSE_BYTES)
                    .read_to_end(&mut output)
                    .await
                    .ok();
            }
            let status = child.wait().await;
            (status, output)
        };
        let outcome = tokio::time::timeout(self.timeout, exchange).await;
        // The whole group goes, on timeout and after an answer alike: nothing the plugin
        // started outlives its run.
        if let Some(group) = group {
            nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL).ok();
        }
        let Ok((status, output)) = outcome else {
            child.wait().await.ok();
            warn!(provider = %self.name, "credential provider timed out; its process group was killed");
            return Err(ProviderError::Timeout {
                provider: provider(),
                seconds: self.timeout.as_secs(),
            });
        };
        let status = status.map_err(|source| ProviderError::Spawn {
            provider: provider(),
            source,
        })?;
        if !status.success() {
            return Err(ProviderError::Failed {
                provider: provider(),
                status: status.to_string(),
            });
        }
        self.parse_answer(image, &output)
    }

    fn parse_answer(
        &self,
        image: &ImageRef,
        output: &[u8],
    ) -> Result<(String, Answer), ProviderError> {
        let invalid = |reason| ProviderError::Invalid {
            provider: self.name.clone(),
            reason,
        };
        // serde's message may quote the input: never shown.
        let response: Response = serde_json::from_slice(output)
            .map_err(|_| invalid("not a CredentialProviderResponse in JSON"))?;
        if response.api_version != API_VERSION {
            return Err(invalid(
                "apiVersion is not credentialprovider.kubelet.k8s.io/v1",
            ));
        }
        if response.kind != "CredentialProviderResponse" {
            return Err(invalid("kind is not CredentialProviderResponse"));
        }
        let key = match response.cache_key_type.as_str() {
            "Image" => image_key(image),
            "Registry" => registry_key(image),
            "Global" => "global".to_owned(),
            _ => return Err(invalid("cacheKeyType is not Image, Registry or Global")),
        };
        let lifetime = match response.cache_duration.as_deref() {
            None | Some("") => self.default_cache,
            Some(text) => {
                parse_go_duration(text).ok_or_else(|| invalid("cacheDuration does not parse"))?
            }
        };
        let mut auth = Vec::with_capacity(response.auth.len());
        for (pattern, entry) in response.auth {
            let pattern = MatchImage::parse(&pattern)
                .map_err(|_| invalid("an auth key is not an image pattern"))?;
            let password = entry
                .password
                .ok_or_else(|| invalid("an auth entry has no password"))?;
            auth.push((pattern, entry.username, password));
        }
        Ok((
            key,
            Answer {
                auth,
                expires_at: Instant::now() + lifetime,
            },
        ))
    }
}

fn image_key(image: &ImageRef) -> String {
    format!("image:{image}")
}

fn registry_key(image: &ImageRef) -> String {
    format!("registry:{}", image.registry())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(pattern: &str, target: &str) -> bool {
        MatchImage::parse(pattern).unwrap().matches(target)
    }

    #[test]
    fn match_images_follow_kubelet() {
        // Host wildcards are per label.
        assert!(matches("*.example.com", "a.example.com/app"));
        assert!(!matches("*.example.com", "a.b.example.com/app"));
        assert!(!matches("*.example.com", "example.com/app"));
        assert!(matches(
            "*.dkr.ecr.*.amazonaws.com",
            "123.dkr.ecr.us-east-1.amazonaws.com/x"
        ));
        assert!(matches("a?c.io", "abc.io/x"));
        assert!(matches("gcr.io", "GCR.io/x"));
        // The port must be the same; no port matches no port.
        assert!(matches("127.0.0.1:5000", "127.0.0.1:5000/team/app"));
        assert!(!matches("127.0.0.1", "127.0.0.1:5000/team/app"));
        assert!(!matches("127.0.0.1:5001", "127.0.0.1:5000/team/app"));
        assert!(!matches("127.0.0.1:5000", "127.0.0.1/team/app"));
        assert!(matches("*.0.0.1:5000", "127.0.0.1:5000/team/app"));
        // The path is a prefix.
        assert!(matches("r.io/team", "r.io/team/app"));
        assert!(!matches("r.io/team/app", "r.io/team/other"));
        assert!(matches("https://r.io/team", "r.io/team/app"));
        MatchImage::parse("r.io:port").unwrap_err();
        MatchImage::parse("[ab].io").unwrap_err();
        MatchImage::parse("").unwrap_err();
    }

    #[test]
    fn go_durations_parse() {
        assert_eq!(parse_go_duration("300s"), Some(Duration::from_secs(300)));
        assert_eq!(parse_go_duration("5m0s"), Some(Duration::from_secs(300)));
        assert_eq!(parse_go_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_go_duration("1.5h"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_go_duration("0"), Some(Duration::ZERO));
        assert_eq!(parse_go_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_go_duration("5"), None);
        assert_eq!(parse_go_duration("-5s"), None);
        assert_eq!(parse_go_duration("5x"), None);
    }

    fn provider() -> Provider {
        Provider {
            name: "test".into(),
            command: "/bin/false".into(),
            args: Vec::new(),
            env: BTreeMap::new(),
            match_images: vec![MatchImage::parse("*.io").unwrap()],
            projects: vec!["a".into()],
            default_cache: Duration::from_secs(60),
            timeout: Duration::from_secs(1),
            cache: Mutex::default(),
            flight: tokio::sync::Mutex::new(()),
        }
    }

    #[tokio::test]
    async fn answers_parse_and_garbage_names_no_material() {
        let image = ImageRef::parse("r.io/team/app:1").unwrap();
        let good = br#"{"apiVersion":"credentialprovider.kubelet.k8s.io/v1","kind":"CredentialProviderResponse","cacheKeyType":"Registry","cacheDuration":"10m","auth":{"r.io":{"username":"u","password":"zzsecretzz"},"r.io/team":{"username":"v","password":"zzsecret2zz"}}}"#;
        let (key, answer) = provider().parse_answer(&image, good).unwrap();
        assert_eq!(key, "registry:r.io");
        let (username, _) = answer.credential_for("r.io/team/app").unwrap();
        assert_eq!(username, "v", "the most specific key wins");
        assert!(!format!("{answer:?}").contains("zzsecret"));
        for garbage in [
            &b"zzsecretzz"[..],
            br#"{"apiVersion":"v0","kind":"CredentialProviderResponse","cacheKeyType":"Image"}"#,
            br#"{"apiVersion":"credentialprovider.kubelet.k8s.io/v1","kind":"CredentialProviderResponse","cacheKeyType":"Host"}"#,
            br#"{"apiVersion":"credentialprovider.kubelet.k8s.io/v1","kind":"CredentialProviderResponse","cacheKeyType":"Image","auth":{"r.io":{"username":1,"password":"zzsecretzz"}}}"#,
        ] {
            let err = provider().parse_answer(&image, garbage).unwrap_err();
            assert!(matches!(err, ProviderError::Invalid { .. }));
            assert!(!err.to_string().contains("zzsecret"), "{err}");
            assert!(err.to_string().contains("provider:test"), "{err}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn cached_answers_follow_their_key_type_and_expire() {
        let provider = provider();
        let one = ImageRef::parse("r.io/team/app:1").unwrap();
        let two = ImageRef::parse("r.io/team/other:1").unwrap();
        let answer = |key_type: &str, duration: &str| {
            let text = format!(
                r#"{{"apiVersion":"credentialprovider.kubelet.k8s.io/v1","kind":"CredentialProviderResponse","cacheKeyType":"{key_type}","cacheDuration":"{duration}","auth":{{"r.io":{{"username":"u","password":"p"}}}}}}"#
            );
            provider.parse_answer(&one, text.as_bytes()).unwrap()
        };
        // Image: only that image.
        let (key, cached) = answer("Image", "10s");
        provider.lock_cache().insert(key, cached);
        assert!(provider.cached(&one, "r.io/team/app").is_some());
        assert!(provider.cached(&two, "r.io/team/other").is_none());
        // Global: every image; gone after its duration.
        let (key, cached) = answer("Global", "10s");
        assert_eq!(key, "global");
        provider.lock_cache().insert(key, cached);
        assert!(provider.cached(&two, "r.io/team/other").is_some());
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(provider.cached(&one, "r.io/team/app").is_none());
        assert!(provider.cached(&two, "r.io/team/other").is_none());
        // No cacheDuration: default_cache_seconds (60 s here).
        let text = br#"{"apiVersion":"credentialprovider.kubelet.k8s.io/v1","kind":"CredentialProviderResponse","cacheKeyType":"Registry","auth":{}}"#;
        let (_, cached) = provider.parse_answer(&one, text).unwrap();
        assert_eq!(cached.expires_at - Instant::now(), Duration::from_secs(60));
    }

    #[tokio::test]
    async fn a_project_not_listed_never_runs_the_plugin() {
        let providers = CredentialProviders {
            providers: vec![provider()],
            metrics: SharedMetrics::default(),
        };
        let image = ImageRef::parse("r.io/team/app:1").unwrap();
        assert!(providers.credential("b", &image).await.unwrap().is_none());
        // /bin/false would fail: the allowed project runs it.
        assert!(matches!(
            providers.credential("a", &image).await,
            Err(ProviderError::Failed { .. })
        ));
    }
}
