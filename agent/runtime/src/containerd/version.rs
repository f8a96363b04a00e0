//! Which containerd berthd talks to, and whether berth supports it.
//!
//! berth runs on containerd 1.6, 1.7 and 2.x (its suite runs on 1.6.20, 1.7.24 and 2.1.9).
//! Older releases are out of support upstream and untested here, so berthd refuses to start on
//! them, naming the version, instead of failing orders one at a time in ways nobody has seen.

use std::fmt;

/// The oldest containerd release berth starts on.
pub const MINIMUM: (u32, u32) = (1, 6);

/// containerd's version as its Version service reports it (`v2.1.9`, `1.6.20~ds1`,
/// `1.7.24~ds1`), with the numbers berth compares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerdVersion {
    text: String,
    revision: String,
    major: u32,
    minor: u32,
}

impl ContainerdVersion {
    /// Reads the leading `major.minor` (after an optional `v`); `None` when there is none.
    pub fn parse(text: &str, revision: &str) -> Option<Self> {
        let text = text.trim();
        let numbers = text.strip_prefix('v').unwrap_or(text);
        let mut parts = numbers.split(|c: char| !c.is_ascii_digit());
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next()?.parse().ok()?;
        Some(Self {
            text: numbers.to_owned(),
            revision: revision.trim().to_owned(),
            major,
            minor,
        })
    }

    /// 1.6 or newer.
    pub fn is_supported(&self) -> bool {
        (self.major, self.minor) >= MINIMUM
    }

    /// The version as containerd printed it, without a leading `v`.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The commit containerd was built from, as it reports it (may be empty).
    pub fn revision(&self) -> &str {
        &self.revision
    }
}

impl fmt::Display for ContainerdVersion {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_versions_debian_and_upstream_builds_report() {
        let cases = [
            ("1.6.20~ds1", "1.6.20~ds1", true),
            ("1.7.24~ds1", "1.7.24~ds1", true),
            ("v2.1.9", "2.1.9", true),
            ("2.1.9+unknown", "2.1.9+unknown", true),
            ("v1.5.18", "1.5.18", false),
            ("1.4.13~ds1", "1.4.13~ds1", false),
            ("v10.0.0", "10.0.0", true),
            ("1.10", "1.10", true),
        ];
        for (reported, text, supported) in cases {
            let version = ContainerdVersion::parse(reported, "").unwrap();
            assert_eq!(version.as_str(), text, "{reported}");
            assert_eq!(version.is_supported(), supported, "{reported}");
        }
    }

    #[test]
    fn a_version_without_numbers_is_none() {
        for reported in ["", "v", "dev", "1", "x.y"] {
            assert_eq!(ContainerdVersion::parse(reported, ""), None, "{reported:?}");
        }
    }
}
