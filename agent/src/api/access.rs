//! Who may act for which project. On the unix socket (mode 0660, owner and group only) every
//! caller may act for every project. Over TCP, mTLS is required and the client certificate's
//! identity (its DNS SANs, URI SANs such as spiffe://…, failing those its CN) must be listed in
//! `[[access]]`; an identity with no entry may act for no project.

use std::collections::{BTreeSet, HashMap};

use tonic::Request;
use x509_parser::prelude::{FromDer as _, GeneralName, X509Certificate};

use super::status::ApiError;
use crate::config::AccessConfig;

/// The access policy of one listener.
#[derive(Debug, Clone)]
pub(crate) enum Access {
    /// Unix socket: filesystem permissions decide who connects; all projects.
    Local,
    /// mTLS: identity -> projects (`"*"` means every project).
    Mtls(HashMap<String, BTreeSet<String>>),
}

/// The projects a caller may act for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Allowed {
    All,
    Some(BTreeSet<String>),
}

impl Allowed {
    pub(crate) fn permits(&self, project: &str) -> bool {
        match self {
            Allowed::All => true,
            Allowed::Some(projects) => projects.contains(project),
        }
    }
}

impl Access {
    pub(crate) fn mtls(entries: &[AccessConfig]) -> Self {
        let mut map: HashMap<String, BTreeSet<String>> = HashMap::new();
        for entry in entries {
            map.entry(entry.identity.clone())
                .or_default()
                .extend(entry.projects.iter().cloned());
        }
        Access::Mtls(map)
    }

    /// The projects the caller of `request` may act for.
    pub(crate) fn allowed<T>(&self, request: &Request<T>) -> Result<Allowed, ApiError> {
        let map = match self {
            Access::Local => return Ok(Allowed::All),
            Access::Mtls(map) => map,
        };
        let certs = request.peer_certs().ok_or(ApiError::NoClientCertificate)?;
        let leaf = certs.first().ok_or(ApiError::NoClientCertificate)?;
        let identities = identities(leaf.as_ref()).ok_or(ApiError::UnreadableClientCertificate)?;
        let mut projects = BTreeSet::new();
        for identity in &identities {
            if let Some(allowed) = map.get(identity) {
                if allowed.contains("*") {
                    return Ok(Allowed::All);
                }
                projects.extend(allowed.iter().cloned());
            }
        }
        Ok(Allowed::Some(projects))
    }

    /// PERMISSION_DENIED unless the caller may act for `project`.
    pub(crate) fn check<T>(&self, request: &Request<T>, project: &str) -> Result<(), ApiError> {
        if self.allowed(request)?.permits(project) {
            Ok(())
        } else {
            Err(ApiError::ProjectDenied {
                project: project.to_owned(),
            })
        }
    }
}

/// DNS and URI SANs, or the subject CN when there are none.
fn identities(der: &[u8]) -> Option<Vec<String>> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(dns) => names.push((*dns).to_owned()),
                GeneralName::URI(uri) => names.push((*uri).to_owned()),
                _ => {}
            }
        }
    }
    if names.is_empty() {
        names.extend(
            cert.subject()
                .iter_common_name()
                .filter_map(|cn| cn.as_str().ok())
                .map(str::to_owned),
        );
    }
    Some(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_callers_may_act_for_every_project() {
        let access = Access::Local;
        access.check(&Request::new(()), "anything").unwrap();
    }

    #[test]
    fn mtls_without_a_certificate_is_unauthenticated() {
        let access = Access::mtls(&[AccessConfig {
            identity: "scheduler.example".into(),
            projects: vec!["team-a".into()],
        }]);
        let err = access.check(&Request::new(()), "team-a").unwrap_err();
        assert_eq!(
            tonic::Status::from(err).code(),
            tonic::Code::Unauthenticated
        );
    }

    fn cert_der(sans: &[&str], cn: &str) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::default();
        for san in sans {
            params.subject_alt_names.push(if san.contains("://") {
                rcgen::SanType::URI((*san).try_into().unwrap())
            } else {
                rcgen::SanType::DnsName((*san).try_into().unwrap())
            });
        }
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn identity_is_the_sans_or_else_the_cn() {
        let der = cert_der(
            &["scheduler.example", "spiffe://fleet/scheduler"],
            "ignored-cn",
        );
        let names = identities(&der).unwrap();
        assert!(names.contains(&"scheduler.example".to_owned()), "{names:?}");
        assert!(
            names.contains(&"spiffe://fleet/scheduler".to_owned()),
            "{names:?}"
        );
        assert!(!names.contains(&"ignored-cn".to_owned()), "{names:?}");
        let der = cert_der(&[], "legacy-client");
        assert_eq!(identities(&der).unwrap(), vec!["legacy-client".to_owned()]);
        assert!(identities(b"not a certificate").is_none());
    }

    #[test]
    fn allowed_sets() {
        assert!(Allowed::All.permits("x"));
        let some = Allowed::Some(BTreeSet::from(["a".to_owned()]));
        assert!(some.permits("a"));
        assert!(!some.permits("b"));
    }
}
