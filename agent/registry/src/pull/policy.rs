//! Signature policy (`[[policy]]`): which images must carry a signature by which keys. The
//! first entry whose `images` and `projects` both match an order wins; an image that matches no
//! entry is not checked.

use std::path::Path;
use std::sync::Arc;

use berth_core::order::ImageRef;
use serde::Deserialize;

use super::cosign::TrustedKeys;

/// A glob on `host[:port]/repository` (or on a project name): `*` matches within one path
/// segment, `**` across segments; every other character matches itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageGlob {
    text: String,
    tokens: Vec<Token>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Literal(char),
    /// `*`
    Segment,
    /// `**`
    Any,
}

/// Why a pattern was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum GlobError {
    #[error("a pattern must not be empty")]
    Empty,
    #[error("a pattern has no whitespace")]
    Whitespace,
    #[error("use * or **, not three or more * in a row")]
    Stars,
}

impl ImageGlob {
    pub fn parse(text: &str) -> Result<Self, GlobError> {
        if text.is_empty() {
            return Err(GlobError::Empty);
        }
        if text.chars().any(char::is_whitespace) {
            return Err(GlobError::Whitespace);
        }
        let mut tokens = Vec::new();
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            if c != '*' {
                tokens.push(Token::Literal(c));
                continue;
            }
            if chars.peek() == Some(&'*') {
                chars.next();
                if chars.peek() == Some(&'*') {
                    return Err(GlobError::Stars);
                }
                tokens.push(Token::Any);
            } else {
                tokens.push(Token::Segment);
            }
        }
        Ok(Self {
            text: text.to_owned(),
            tokens,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn matches(&self, subject: &str) -> bool {
        let subject: Vec<char> = subject.chars().collect();
        // matched[j]: the tokens so far match subject[..j] (dynamic programming, no recursion).
        let mut matched = vec![false; subject.len() + 1];
        matched[0] = true;
        for token in &self.tokens {
            let mut next = vec![false; subject.len() + 1];
            match token {
                Token::Literal(c) => {
                    for j in 0..subject.len() {
                        next[j + 1] = matched[j] && subject[j] == *c;
                    }
                }
                Token::Segment | Token::Any => {
                    let crosses = matches!(token, Token::Any);
                    next[0] = matched[0];
                    for j in 0..subject.len() {
                        next[j + 1] = matched[j + 1] || (next[j] && (crosses || subject[j] != '/'));
                    }
                }
            }
            matched = next;
        }
        matched[subject.len()]
    }
}

/// What a policy demands.
#[derive(Debug, Clone)]
pub enum Verification {
    /// Matching images run unchecked (an exception before a broader entry).
    None,
    /// A cosign signature by one of these keys.
    Cosign(TrustedKeys),
}

/// One `[[policy]]` entry, its keys read.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Position in the file (1-based), for the log and the cache key.
    pub entry: usize,
    images: Vec<ImageGlob>,
    projects: Vec<ImageGlob>,
    pub verification: Verification,
}

impl Policy {
    /// The first `images` pattern: how refusals name the policy.
    pub fn pattern(&self) -> &str {
        self.images.first().map_or("", ImageGlob::as_str)
    }

    fn matches(&self, image: &ImageRef, project: &str) -> bool {
        let subject = format!("{}/{}", image.registry(), image.repository());
        self.images.iter().any(|glob| glob.matches(&subject))
            && self.projects.iter().any(|glob| glob.matches(project))
    }
}

/// `[[policy]]`: a signature policy; the first entry whose `images` and `projects` match an
/// order's image and project wins.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Globs on `host[:port]/repository`: `*` within one path segment, `**` across segments.
    pub images: Vec<String>,
    #[serde(default = "all_projects")]
    pub projects: Vec<String>,
    pub verify: VerifyKind,
    /// cosign: PEM public key files; a valid signature by any one of them suffices.
    #[serde(default)]
    pub keys: Vec<std::path::PathBuf>,
    /// notation: a directory of trusted root certificates (PEM).
    #[serde(default)]
    pub trust_store: String,
    /// notation: x509 subjects or `["*"]`.
    #[serde(default)]
    pub trusted_identities: Vec<String>,
}

fn all_projects() -> Vec<String> {
    vec!["*".to_owned()]
}

/// `[[policy]] verify`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VerifyKind {
    Cosign,
    Notation,
    None,
}

/// Why `[[policy]]` could not be loaded at start-up.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("{key}: {reason}")]
    Invalid { key: &'static str, reason: String },
    #[error("cannot read {path}")]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Every `[[policy]]`, in file order.
#[derive(Debug, Clone, Default)]
pub struct Policies {
    entries: Vec<Arc<Policy>>,
}

impl Policies {
    /// Builds the policies from a validated config, reading each key file.
    pub fn load(configs: &[PolicyConfig]) -> Result<Self, PolicyError> {
        let mut entries = Vec::with_capacity(configs.len());
        for (index, config) in configs.iter().enumerate() {
            let entry = index + 1;
            let globs = |key: &'static str, patterns: &[String]| {
                patterns
                    .iter()
                    .map(|pattern| {
                        ImageGlob::parse(pattern).map_err(|reason| PolicyError::Invalid {
                            key,
                            reason: format!("entry {entry}: {pattern:?}: {reason}"),
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()
            };
            let verification = match config.verify {
                VerifyKind::None => Verification::None,
                VerifyKind::Cosign => Verification::Cosign(read_keys(entry, &config.keys)?),
                VerifyKind::Notation => {
                    return Err(PolicyError::Invalid {
                        key: "policy.verify",
                        reason: format!(
                            "entry {entry}: \"notation\" is not supported by this berthd yet; use \"cosign\""
                        ),
                    })
                }
            };
            entries.push(Arc::new(Policy {
                entry,
                images: globs("policy.images", &config.images)?,
                projects: globs("policy.projects", &config.projects)?,
                verification,
            }));
        }
        Ok(Self { entries })
    }

    /// The policy in force for `image` in `project`: the first entry that matches both.
    pub fn for_image(&self, image: &ImageRef, project: &str) -> Option<Arc<Policy>> {
        self.entries
            .iter()
            .find(|policy| policy.matches(image, project))
            .cloned()
    }
}

fn read_keys(entry: usize, paths: &[std::path::PathBuf]) -> Result<TrustedKeys, PolicyError> {
    let mut pems = Vec::with_capacity(paths.len());
    for path in paths {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.clone(),
            source,
        })?;
        pems.push(text);
    }
    TrustedKeys::from_pems(pems.iter().map(String::as_str)).map_err(|(index, reason)| {
        let path = paths
            .get(index)
            .map_or(Path::new(""), |path| path.as_path());
        PolicyError::Invalid {
            key: "policy.keys",
            reason: format!("entry {entry}: {}: {reason}", path.display()),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn glob(text: &str) -> ImageGlob {
        ImageGlob::parse(text).unwrap()
    }

    #[test]
    fn one_star_stays_within_a_segment() {
        let pattern = glob("registry.example.com/team/*");
        assert!(pattern.matches("registry.example.com/team/app"));
        assert!(!pattern.matches("registry.example.com/team/app/sub"));
        assert!(!pattern.matches("registry.example.com/other/app"));
        assert!(glob("*/team/app").matches("127.0.0.1:5000/team/app"));
        assert!(!glob("*/app").matches("r.example/team/app"));
        assert!(glob("r.example/te*/a*p").matches("r.example/team/app"));
        assert!(!glob("r.example/te*").matches("r.example/te/x"));
    }

    #[test]
    fn two_stars_cross_segments() {
        let pattern = glob("registry.example.com/team/**");
        assert!(pattern.matches("registry.example.com/team/app"));
        assert!(pattern.matches("registry.example.com/team/a/b/c"));
        assert!(!pattern.matches("registry.example.com/teams/app"));
        assert!(!pattern.matches("evil.example/registry.example.com/team/app"));
        assert!(glob("**").matches("any.host:1/x/y"));
        assert!(glob("**/app").matches("r.example/a/b/app"));
        assert!(!glob("**/app").matches("r.example/a/b/apps"));
    }

    #[test]
    fn everything_else_is_literal() {
        assert!(glob("r.example/app").matches("r.example/app"));
        assert!(!glob("r.example/app").matches("rxexample/app"));
        assert!(!glob("r.example/app").matches("r.example/app2"));
        assert!(!glob("r.example/app").matches("r.example/ap"));
    }

    #[test]
    fn bad_patterns_are_refused() {
        assert_eq!(ImageGlob::parse(""), Err(GlobError::Empty));
        assert_eq!(ImageGlob::parse("a b"), Err(GlobError::Whitespace));
        assert_eq!(ImageGlob::parse("r/***"), Err(GlobError::Stars));
    }

    #[test]
    fn the_first_matching_entry_wins_and_projects_default_to_all() {
        let entry = |images: &str, projects: &[&str]| PolicyConfig {
            images: vec![images.to_owned()],
            projects: projects.iter().map(|p| (*p).to_owned()).collect(),
            verify: VerifyKind::None,
            keys: Vec::new(),
            trust_store: String::new(),
            trusted_identities: Vec::new(),
        };
        let config = [
            entry("r.example/open/**", &["*"]),
            entry("r.example/**", &["team-*"]),
        ];
        let policies = Policies::load(&config).unwrap();
        let image = |text: &str| ImageRef::parse(text).unwrap();
        assert_eq!(
            policies
                .for_image(&image("r.example/open/app:1"), "x")
                .unwrap()
                .entry,
            1
        );
        assert_eq!(
            policies
                .for_image(&image("r.example/team/app:1"), "team-a")
                .unwrap()
                .pattern(),
            "r.example/**"
        );
        assert!(policies
            .for_image(&image("r.example/team/app:1"), "default")
            .is_none());
        assert!(policies
            .for_image(&image("other.example/app:1"), "team-a")
            .is_none());
    }

    #[test]
    fn key_files_are_read_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad.pub");
        std::fs::write(
            &bad,
            "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
        )
        .unwrap();
        let config = |path: &Path| PolicyConfig {
            images: vec!["r/**".into()],
            projects: vec!["*".into()],
            verify: VerifyKind::Cosign,
            keys: vec![path.to_owned()],
            trust_store: String::new(),
            trusted_identities: Vec::new(),
        };
        let err = Policies::load(&[config(&bad)]).unwrap_err().to_string();
        assert!(
            err.contains("policy.keys") && err.contains("bad.pub"),
            "{err}"
        );
        let err = Policies::load(&[config(&dir.path().join("missing.pub"))])
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.pub"), "{err}");
    }
}
