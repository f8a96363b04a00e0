//! A validated start order. Proto types stop at `api/convert.rs`; everything past here sees these.

use std::collections::BTreeMap;
use std::fmt;

use oci_client::Reference;
use sha2::{Digest as _, Sha256};

/// Longest image reference accepted, in bytes.
const MAX_REFERENCE_LEN: usize = 255;
/// Longest order id accepted, in bytes.
const MAX_ORDER_ID_LEN: usize = 128;
/// The project of an order that names none.
pub const DEFAULT_PROJECT: &str = "default";

/// A malformed order; always INVALID_ARGUMENT.
#[derive(Debug, thiserror::Error)]
pub enum OrderError {
    #[error("{field} is required")]
    Missing { field: &'static str },
    #[error("{field} is invalid: {reason}")]
    Invalid {
        field: &'static str,
        reason: &'static str,
    },
    #[error("image reference {image:?} is malformed")]
    Reference {
        image: String,
        #[source]
        source: oci_client::ParseError,
    },
}

/// The scheduler's id of one order; the same id again means the same container.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct OrderId(String);

impl OrderId {
    pub fn parse(value: &str) -> Result<Self, OrderError> {
        if value.is_empty() {
            return Err(OrderError::Missing { field: "order_id" });
        }
        if value.len() > MAX_ORDER_ID_LEN
            || !value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
        {
            return Err(OrderError::Invalid {
                field: "order_id",
                reason: "use at most 128 characters of [A-Za-z0-9._:-]",
            });
        }
        Ok(Self(value.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for OrderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A parsed, normalised image reference (`docker.io/library/x:latest` for `x`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageRef(Reference);

impl ImageRef {
    pub fn parse(value: &str) -> Result<Self, OrderError> {
        if value.is_empty() {
            return Err(OrderError::Missing {
                field: "container.image",
            });
        }
        if value.len() > MAX_REFERENCE_LEN {
            return Err(OrderError::Invalid {
                field: "container.image",
                reason: "longer than 255 bytes",
            });
        }
        let reference = Reference::try_from(value).map_err(|source| OrderError::Reference {
            image: value.to_owned(),
            source,
        })?;
        if let Some(digest) = reference.digest() {
            let valid = digest.strip_prefix("sha256:").is_some_and(|hex| {
                hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            });
            if !valid {
                return Err(OrderError::Invalid {
                    field: "container.image",
                    reason: "the digest must be sha256:<64 lower-case hex>",
                });
            }
        }
        Ok(Self(reference))
    }

    /// The reference for the distribution client.
    pub fn reference(&self) -> &Reference {
        &self.0
    }

    /// The registry `host[:port]` as named in the reference (`docker.io` for Docker Hub).
    pub fn registry(&self) -> &str {
        self.0.registry()
    }

    pub fn repository(&self) -> &str {
        self.0.repository()
    }

    /// The full normalised name, also the containerd image record's name.
    pub fn name(&self) -> String {
        self.0.whole()
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// When to contact the registry for an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PullPolicy {
    #[default]
    IfNotPresent,
    Always,
    Never,
}

impl PullPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            PullPolicy::IfNotPresent => "IF_NOT_PRESENT",
            PullPolicy::Always => "ALWAYS",
            PullPolicy::Never => "NEVER",
        }
    }
}

/// One validated start order.
#[derive(Debug, Clone)]
pub struct Order {
    pub order_id: OrderId,
    pub project: String,
    pub name: String,
    pub image: ImageRef,
    pub pull_secret: Option<String>,
    pub command: Vec<String>,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub pull_policy: PullPolicy,
}

/// The fields of a start order as they arrive, before validation.
#[derive(Debug, Default)]
pub struct RawOrder {
    pub order_id: String,
    pub project: String,
    pub name: String,
    pub image: String,
    pub pull_secret: String,
    pub command: Vec<String>,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub pull_policy: PullPolicy,
}

impl Order {
    pub fn parse(raw: RawOrder) -> Result<Self, OrderError> {
        let order_id = OrderId::parse(&raw.order_id)?;
        let project = parse_project(&raw.project)?;
        let name = parse_dns_label(&raw.name, "name")?;
        let image = ImageRef::parse(&raw.image)?;
        let pull_secret = parse_secret_ref(&raw.pull_secret)?;
        for key in raw.env.keys() {
            if key.is_empty() || key.contains('=') || key.contains('\0') {
                return Err(OrderError::Invalid {
                    field: "container.env",
                    reason: "names must be non-empty and contain no '=' or NUL",
                });
            }
        }
        if raw
            .command
            .iter()
            .chain(&raw.args)
            .chain(raw.env.values())
            .any(|s| s.contains('\0'))
        {
            return Err(OrderError::Invalid {
                field: "container",
                reason: "command, args and env values must not contain NUL",
            });
        }
        Ok(Self {
            order_id,
            project,
            name,
            image,
            pull_secret,
            command: raw.command,
            args: raw.args,
            env: raw.env,
            pull_policy: raw.pull_policy,
        })
    }

    /// A stable hash of what the order asks for, to tell a retry from a different order that
    /// reuses an order id.
    pub fn fingerprint(&self) -> String {
        let mut hasher = Sha256::new();
        let mut field = |value: &str| {
            hasher.update((value.len() as u64).to_le_bytes());
            hasher.update(value.as_bytes());
        };
        field(&self.project);
        field(&self.name);
        field(&self.image.name());
        field(self.pull_secret.as_deref().unwrap_or(""));
        field(self.pull_policy.as_str());
        field(&format!("command:{}", self.command.len()));
        self.command.iter().for_each(|s| field(s));
        field(&format!("args:{}", self.args.len()));
        self.args.iter().for_each(|s| field(s));
        field(&format!("env:{}", self.env.len()));
        for (key, value) in &self.env {
            field(key);
            field(value);
        }
        hex::encode(&hasher.finalize()[..16])
    }
}

/// An empty project means "default"; otherwise a DNS label.
pub fn parse_project(value: &str) -> Result<String, OrderError> {
    if value.is_empty() {
        return Ok(DEFAULT_PROJECT.to_owned());
    }
    parse_dns_label(value, "project")
}

/// `[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?`
pub fn is_dns_label(value: &str) -> bool {
    let bytes = value.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes
            .iter()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'-'))
        && bytes.first() != Some(&b'-')
        && bytes.last() != Some(&b'-')
}

/// A DNS label, or INVALID_ARGUMENT naming `field`.
pub fn parse_dns_label(value: &str, field: &'static str) -> Result<String, OrderError> {
    if value.is_empty() {
        return Err(OrderError::Missing { field });
    }
    if !is_dns_label(value) {
        return Err(OrderError::Invalid {
            field,
            reason: "must be a DNS label: [a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?",
        });
    }
    Ok(value.to_owned())
}

fn parse_secret_ref(value: &str) -> Result<Option<String>, OrderError> {
    if value.is_empty() {
        return Ok(None);
    }
    let ok = value.len() <= 71
        && value.strip_prefix("secret-").is_some_and(|rest| {
            !rest.is_empty()
                && rest
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        });
    if !ok {
        return Err(OrderError::Invalid {
            field: "container.pull_secret",
            reason: "a secret id looks like secret-<a-z0-9>",
        });
    }
    Ok(Some(value.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(image: &str) -> RawOrder {
        RawOrder {
            order_id: "o-1".into(),
            project: String::new(),
            name: "web".into(),
            image: image.into(),
            ..RawOrder::default()
        }
    }

    #[test]
    fn short_names_normalise_to_docker_hub() {
        let order = Order::parse(raw("busybox")).unwrap();
        assert_eq!(order.image.name(), "docker.io/library/busybox:latest");
        assert_eq!(order.image.registry(), "docker.io");
        assert_eq!(order.project, "default");
    }

    #[test]
    fn registry_with_port_and_digest() {
        let digest = format!("sha256:{}", "a".repeat(64));
        let image = ImageRef::parse(&format!("127.0.0.1:5000/team/app@{digest}")).unwrap();
        assert_eq!(image.registry(), "127.0.0.1:5000");
        assert_eq!(image.repository(), "team/app");
        assert_eq!(image.reference().digest(), Some(digest.as_str()));
    }

    #[test]
    fn malformed_references_are_refused() {
        for bad in [
            "UPPER/Case::bad",
            "reg.example/Team/app",
            "reg.example/app:bad tag",
            "reg.example/app@sha256:abc",
            "reg.example/app@md5:0123456789abcdef0123456789abcdef",
            "",
        ] {
            ImageRef::parse(bad).expect_err(bad);
        }
        let long = format!("reg.example/{}", "a".repeat(250));
        ImageRef::parse(&long).unwrap_err();
    }

    #[test]
    fn names_projects_and_ids_are_checked() {
        let mut order = raw("busybox");
        order.name = "Web".into();
        Order::parse(order).unwrap_err();
        let mut order = raw("busybox");
        order.name = "-web".into();
        Order::parse(order).unwrap_err();
        let mut order = raw("busybox");
        order.project = "team_a".into();
        Order::parse(order).unwrap_err();
        let mut order = raw("busybox");
        order.order_id = String::new();
        assert!(matches!(
            Order::parse(order),
            Err(OrderError::Missing { field: "order_id" })
        ));
        let mut order = raw("busybox");
        order.pull_secret = "../../etc/passwd".into();
        Order::parse(order).unwrap_err();
        let mut order = raw("busybox");
        order.env.insert("A=B".into(), "c".into());
        Order::parse(order).unwrap_err();
    }

    #[test]
    fn fingerprint_tells_orders_apart() {
        let a = Order::parse(raw("busybox")).unwrap();
        let same = Order::parse(raw("busybox")).unwrap();
        assert_eq!(a.fingerprint(), same.fingerprint());
        let b = Order::parse(raw("busybox:1")).unwrap();
        assert_ne!(a.fingerprint(), b.fingerprint());
        let mut c = raw("busybox");
        c.args = vec!["x".into()];
        let c = Order::parse(c).unwrap();
        let mut d = raw("busybox");
        d.command = vec!["x".into()];
        let d = Order::parse(d).unwrap();
        assert_ne!(c.fingerprint(), d.fingerprint());
    }
}
