//! Automatic image GC under disk pressure (`[gc]`). Every `interval_seconds` berthd measures
//! the use of `path`'s filesystem (containerd's root); at `high_percent` or more it removes
//! unused images, least recently used first, until use is at `low_percent` or less. It never
//! removes an image that a container record references, that matches a `pinned` glob, or that
//! was pulled or used by an order less than `min_age_seconds` ago (the `berth.dev/last-used`
//! label, which pulls set and orders refresh). Each removal runs under the image's write lock,
//! after reading its record and the containers again, so an order or pull of that image and
//! the GC never overlap; it waits for containerd's GC as `berth image prune` does.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::prune::prune_error;
use super::{RunError, Runner};
use berth_registry::pull::{unix_seconds_now, LABEL_LAST_USED};
use berth_runtime::containerd::ListedImage;

/// Settings of the image GC, from `[gc]`.
#[derive(Debug, Clone)]
pub(crate) struct GcSettings {
    pub(crate) path: PathBuf,
    pub(crate) high_percent: u8,
    pub(crate) low_percent: u8,
    pub(crate) min_age: Duration,
    pub(crate) interval: Duration,
    pub(crate) pinned: Vec<String>,
}

impl GcSettings {
    /// How stale `berth.dev/last-used` may get before an order refreshes it: a quarter of
    /// `min_age`, between 1 s and a minute (so a busy image costs at most one label update a
    /// minute).
    pub(crate) fn touch_every(&self) -> Duration {
        (self.min_age / 4).clamp(Duration::from_secs(1), Duration::from_secs(60))
    }
}

/// Why the GC leaves an image alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Keep {
    InUse,
    Pinned,
    Young,
}

impl Keep {
    fn reason(self) -> &'static str {
        match self {
            Keep::InUse => "in use",
            Keep::Pinned => "pinned",
            Keep::Young => "pulled or used within min_age_seconds",
        }
    }
}

/// One image the GC looks at: its name and when it was last pulled or used (unix seconds).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Candidate {
    name: String,
    last_used: i64,
}

impl Runner {
    /// Measures and collects every `interval` until `stop` is cancelled.
    pub(crate) async fn image_gc_loop(self, settings: GcSettings, stop: CancellationToken) {
        info!(
            path = %settings.path.display(),
            high_percent = settings.high_percent,
            low_percent = settings.low_percent,
            "image gc on"
        );
        let mut ticks = tokio::time::interval(settings.interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stuck = false;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = ticks.tick() => {}
            }
            match self.image_gc_pass(&settings).await {
                Ok(Some(use_after)) if use_after > f64::from(settings.low_percent) => {
                    // Said once per episode, not at every tick.
                    if !stuck {
                        warn!(
                            path = %settings.path.display(),
                            use_percent = use_after,
                            low_percent = settings.low_percent,
                            "disk use stays above the low watermark; no more images may be removed"
                        );
                    }
                    stuck = true;
                }
                Ok(_) => stuck = false,
                Err(err) => warn!(error = %err, "image gc pass failed"),
            }
        }
    }

    /// One pass: nothing below `high_percent`; otherwise removals down to `low_percent`.
    /// Returns the use after a pass that removed (or tried to), None when under the watermark.
    async fn image_gc_pass(&self, settings: &GcSettings) -> Result<Option<f64>, RunError> {
        let mut use_percent = disk_use_percent(&settings.path).await?;
        if use_percent < f64::from(settings.high_percent) {
            return Ok(None);
        }
        info!(
            path = %settings.path.display(),
            use_percent,
            high_percent = settings.high_percent,
            "disk use at the high watermark; removing unused images"
        );
        let listed = self
            .containerd
            .list_images()
            .await
            .map_err(prune_error(""))?;
        let in_use = self.images_in_use().await?;
        let now = i64::try_from(unix_seconds_now()).unwrap_or(i64::MAX);
        let mut candidates = Vec::new();
        for image in &listed {
            match keep(image, &in_use, settings, now) {
                Some(reason) => {
                    debug!(image = %image.name, reason = reason.reason(), "image kept by gc");
                }
                None => candidates.push(Candidate {
                    name: image.name.clone(),
                    last_used: last_used(image),
                }),
            }
        }
        candidates.sort_by(|a, b| (a.last_used, &a.name).cmp(&(b.last_used, &b.name)));
        let mut removed = 0_usize;
        for candidate in candidates {
            if use_percent <= f64::from(settings.low_percent) {
                break;
            }
            // Orders and pulls of this image wait while it goes; check it again first.
            let _image_guard = self
                .image_locks
                .write(format!("image/{}", candidate.name))
                .await;
            let fresh = self
                .containerd
                .list_images()
                .await
                .map_err(prune_error(&candidate.name))?;
            let Some(image) = fresh.iter().find(|image| image.name == candidate.name) else {
                continue;
            };
            let in_use = self.images_in_use().await?;
            let now = i64::try_from(unix_seconds_now()).unwrap_or(i64::MAX);
            if let Some(reason) = keep(image, &in_use, settings, now) {
                info!(image = %candidate.name, reason = reason.reason(), "image no longer removable; keeping it");
                continue;
            }
            self.containerd
                .delete_image(&candidate.name)
                .await
                .map_err(prune_error(&candidate.name))?;
            removed += 1;
            self.metrics.gc_removed_images.inc();
            use_percent = disk_use_percent(&settings.path).await?;
            info!(
                image = %candidate.name,
                last_used = candidate.last_used,
                use_percent,
                "image removed by gc"
            );
        }
        info!(removed, use_percent, "image gc pass finished");
        Ok(Some(use_percent))
    }

    /// Refreshes the image's `berth.dev/last-used` when it is older than the GC's granularity
    /// (so that a busy image costs at most one label update per interval). Failures only log:
    /// the order goes on.
    pub(crate) async fn note_use(&self, name: &str, last_used: Option<u64>) {
        let now = unix_seconds_now();
        if last_used.is_some_and(|seconds| now.saturating_sub(seconds) < self.touch_every.as_secs())
        {
            return;
        }
        let labels =
            std::collections::HashMap::from([(LABEL_LAST_USED.to_owned(), now.to_string())]);
        if let Err(err) = self.containerd.update_image_labels(name, labels).await {
            warn!(image = %name, error = %err, "could not record the image's last use");
        }
    }
}

/// Why `image` must stay, if it must.
fn keep(
    image: &ListedImage,
    in_use: &HashSet<String>,
    settings: &GcSettings,
    now: i64,
) -> Option<Keep> {
    if in_use.contains(&image.name) {
        return Some(Keep::InUse);
    }
    if settings
        .pinned
        .iter()
        .any(|pattern| glob_matches(pattern, &image.name))
    {
        return Some(Keep::Pinned);
    }
    let age = now.saturating_sub(last_used(image));
    if u64::try_from(age).map_or(true, |age| age < settings.min_age.as_secs()) {
        return Some(Keep::Young);
    }
    None
}

/// When the image was last pulled or used (unix seconds): its `berth.dev/last-used` label, or
/// else the record's last update or creation (an image pulled by another client).
fn last_used(image: &ListedImage) -> i64 {
    image
        .labels
        .get(LABEL_LAST_USED)
        .and_then(|seconds| seconds.parse::<i64>().ok())
        .or_else(|| image.updated_at.as_ref().map(|ts| ts.seconds))
        .or_else(|| image.created_at.as_ref().map(|ts| ts.seconds))
        .unwrap_or(0)
}

/// `path`'s filesystem use in percent, as `df` counts it: used / (used + available to users).
async fn disk_use_percent(path: &Path) -> Result<f64, RunError> {
    let path = path.to_owned();
    let measured = tokio::task::spawn_blocking(move || {
        nix::sys::statvfs::statvfs(&path).map_err(|errno| (path, std::io::Error::from(errno)))
    })
    .await;
    let stat = match measured {
        Ok(Ok(stat)) => stat,
        Ok(Err((path, source))) => return Err(RunError::DiskUse { path, source }),
        Err(join) => {
            return Err(RunError::DiskUse {
                path: PathBuf::new(),
                source: std::io::Error::other(join),
            })
        }
    };
    #[allow(clippy::useless_conversion)] // the field types differ between targets
    let (blocks, free, available) = (
        u64::from(stat.blocks()),
        u64::from(stat.blocks_free()),
        u64::from(stat.blocks_available()),
    );
    let used = blocks.saturating_sub(free);
    let usable = used + available;
    if usable == 0 {
        return Ok(0.0);
    }
    #[allow(clippy::cast_precision_loss)] // block counts are far below 2^52
    Ok(used as f64 * 100.0 / usable as f64)
}

/// Glob `pattern` against an image reference: `**` matches anything, `*` anything within one
/// path segment (no `/`), `?` one character other than `/`; everything else itself.
fn glob_matches(pattern: &str, text: &str) -> bool {
    fn matches(pattern: &[u8], text: &[u8]) -> bool {
        match pattern {
            [] => text.is_empty(),
            [b'*', b'*', rest @ ..] => (0..=text.len()).any(|skip| matches(rest, &text[skip..])),
            [b'*', rest @ ..] => {
                let segment = text
                    .iter()
                    .position(|&byte| byte == b'/')
                    .unwrap_or(text.len());
                (0..=segment).any(|skip| matches(rest, &text[skip..]))
            }
            [b'?', rest @ ..] => {
                matches!(text.first(), Some(&byte) if byte != b'/') && matches(rest, &text[1..])
            }
            [literal, rest @ ..] => text.first() == Some(literal) && matches(rest, &text[1..]),
        }
    }
    matches(pattern.as_bytes(), text.as_bytes())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn settings(pinned: &[&str]) -> GcSettings {
        GcSettings {
            path: PathBuf::from("/"),
            high_percent: 85,
            low_percent: 80,
            min_age: Duration::from_secs(300),
            interval: Duration::from_secs(60),
            pinned: pinned.iter().map(|p| (*p).to_owned()).collect(),
        }
    }

    fn image(name: &str, last_used: Option<i64>, created: i64) -> ListedImage {
        ListedImage {
            name: name.to_owned(),
            target_digest: String::new(),
            target_size: 0,
            created_at: Some(prost_types::Timestamp {
                seconds: created,
                nanos: 0,
            }),
            updated_at: None,
            labels: last_used
                .map(|seconds| HashMap::from([(LABEL_LAST_USED.to_owned(), seconds.to_string())]))
                .unwrap_or_default(),
        }
    }

    #[test]
    fn globs_match_within_and_across_segments() {
        assert!(glob_matches("r.example/team/**", "r.example/team/app:1"));
        assert!(glob_matches("r.example/team/**", "r.example/team/a/b:1"));
        assert!(glob_matches("r.example/*/app:*", "r.example/team/app:1.4"));
        assert!(!glob_matches("r.example/*/app:*", "r.example/a/b/app:1"));
        assert!(glob_matches("*:5000/base/*", "127.0.0.1:5000/base/os:12"));
        assert!(glob_matches("r.example/app:v?", "r.example/app:v1"));
        assert!(!glob_matches("r.example/app:v?", "r.example/app:v10"));
        assert!(glob_matches("r.example/app:1", "r.example/app:1"));
        assert!(!glob_matches("r.example/app:1", "r.example/app:12"));
        assert!(glob_matches("**", "anything/at/all"));
    }

    #[test]
    fn in_use_pinned_and_young_images_are_kept() {
        let settings = settings(&["r/base/**"]);
        let now = 10_000;
        let in_use = HashSet::from(["r/used:1".to_owned()]);
        let old = now - 301;
        assert_eq!(
            keep(&image("r/used:1", Some(old), 0), &in_use, &settings, now),
            Some(Keep::InUse)
        );
        assert_eq!(
            keep(&image("r/base/os:1", Some(old), 0), &in_use, &settings, now),
            Some(Keep::Pinned)
        );
        assert_eq!(
            keep(
                &image("r/new:1", Some(now - 299), 0),
                &in_use,
                &settings,
                now
            ),
            Some(Keep::Young)
        );
        assert_eq!(
            keep(&image("r/old:1", Some(old), 0), &in_use, &settings, now),
            None
        );
        // Without the label, the record's own times count.
        assert_eq!(
            keep(&image("r/other:1", None, now - 10), &in_use, &settings, now),
            Some(Keep::Young)
        );
        assert_eq!(
            keep(&image("r/other:1", None, old), &in_use, &settings, now),
            None
        );
    }

    #[test]
    fn the_label_is_refreshed_at_a_granularity_within_min_age() {
        let mut settings = settings(&[]);
        assert_eq!(settings.touch_every(), Duration::from_secs(60));
        settings.min_age = Duration::from_secs(8);
        assert_eq!(settings.touch_every(), Duration::from_secs(2));
        settings.min_age = Duration::ZERO;
        assert_eq!(settings.touch_every(), Duration::from_secs(1));
    }

    #[tokio::test]
    async fn disk_use_is_a_percentage() {
        let percent = disk_use_percent(Path::new("/")).await.unwrap();
        assert!((0.0..=100.0).contains(&percent), "{percent}");
        disk_use_percent(Path::new("/no/such/dir"))
            .await
            .unwrap_err();
    }
}
