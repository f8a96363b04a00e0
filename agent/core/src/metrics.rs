//! Prometheus metrics (text exposition at `metrics_listen` `/metrics`). Names are the contract's.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PullLabels {
    pub result: &'static str,
    pub registry: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RegistryLabels {
    pub registry: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    pub registry: String,
    /// docker | acr | acr_refresh | gar | google
    pub kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MirrorLabels {
    pub upstream: String,
    /// The endpoint URL as configured (normalised).
    pub mirror: String,
    /// ok | fallback (failed; the next mirror or the upstream was tried) | error (ended the pull)
    pub result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SignatureLabels {
    /// verified | no_signature | unknown_key | wrong_digest | bad_encoding | fetch_failed |
    /// denied | unavailable
    pub result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderLabels {
    pub provider: String,
    /// ok | failed | timeout | invalid
    pub result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabels {
    pub version: String,
}

/// Every metric berthd exports. One instance per daemon, shared by `Arc`.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub pulls: Family<PullLabels, Counter>,
    pub pull_bytes: Family<RegistryLabels, Counter>,
    pub pull_duration: Histogram,
    pub start_duration: Histogram,
    pub token_requests: Family<TokenLabels, Counter>,
    pub token_cache_hits: Family<RegistryLabels, Counter>,
    pub pulls_in_flight: Gauge,
    pub containers: Family<StateLabels, Gauge>,
    pub mirror_pulls: Family<MirrorLabels, Counter>,
    /// Blob downloads cut by the stall timer (`stall_timeout_seconds`).
    pub download_stalls: Family<RegistryLabels, Counter>,
    /// Image pulls waiting for a turn (`max_concurrent_pulls`).
    pub pulls_queued: Gauge,
    /// Images removed by the automatic image GC (`[gc]`).
    pub gc_removed_images: Counter,
    pub signature_verifications: Family<SignatureLabels, Counter>,
    /// Runs of `[[credential_provider]]` plugins by provider and result.
    pub credential_provider_requests: Family<ProviderLabels, Counter>,
    /// Audit lines dropped or not written (`audit_log`).
    pub audit_write_errors: Counter,
    /// 1 for the version of the containerd berthd last reached; no sample before that.
    containerd_info: Family<VersionLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let pulls = Family::<PullLabels, Counter>::default();
        let pull_bytes = Family::<RegistryLabels, Counter>::default();
        // 50 ms .. ~14 min
        let pull_duration = Histogram::new(exponential_buckets(0.05, 2.0, 15));
        // 5 ms .. ~80 s
        let start_duration = Histogram::new(exponential_buckets(0.005, 2.0, 15));
        let token_requests = Family::<TokenLabels, Counter>::default();
        let token_cache_hits = Family::<RegistryLabels, Counter>::default();
        let pulls_in_flight = Gauge::default();
        let containers = Family::<StateLabels, Gauge>::default();
        let mirror_pulls = Family::<MirrorLabels, Counter>::default();
        let containerd_info = Family::<VersionLabels, Gauge>::default();
        let download_stalls = Family::<RegistryLabels, Counter>::default();
        let pulls_queued = Gauge::default();
        let gc_removed_images = Counter::default();
        let signature_verifications = Family::<SignatureLabels, Counter>::default();
        let credential_provider_requests = Family::<ProviderLabels, Counter>::default();
        let audit_write_errors = Counter::default();
        registry.register(
            "berth_credential_provider_requests",
            "Runs of credential provider plugins by provider and result",
            credential_provider_requests.clone(),
        );
        registry.register(
            "berth_audit_write_errors",
            "Audit lines dropped or not written",
            audit_write_errors.clone(),
        );
        registry.register(
            "berth_signature_verifications",
            "Image signature verifications against [[policy]] by result",
            signature_verifications.clone(),
        );
        registry.register(
            "berth_pulls",
            "Image pulls by result and registry",
            pulls.clone(),
        );
        registry.register(
            "berth_pull_bytes",
            "Blob bytes fetched from registries",
            pull_bytes.clone(),
        );
        registry.register(
            "berth_pull_duration_seconds",
            "Time of whole pulls, resolve to image record",
            pull_duration.clone(),
        );
        registry.register(
            "berth_start_duration_seconds",
            "Time from a start order's arrival to its container RUNNING",
            start_duration.clone(),
        );
        registry.register(
            "berth_token_requests",
            "Requests to token endpoints by registry and credential kind",
            token_requests.clone(),
        );
        registry.register(
            "berth_token_cache_hits",
            "Registry tokens served from the in-memory cache",
            token_cache_hits.clone(),
        );
        registry.register(
            "berth_pulls_in_flight",
            "Pulls running now",
            pulls_in_flight.clone(),
        );
        registry.register(
            "berth_containers",
            "berth's containers by state",
            containers.clone(),
        );
        registry.register(
            "berth_mirror_pulls",
            "Pull attempts through registry mirrors by upstream, mirror and result",
            mirror_pulls.clone(),
        );
        registry.register(
            "berth_containerd_info",
            "The version of the containerd berthd talks to (value 1)",
            containerd_info.clone(),
        );
        registry.register(
            "berth_download_stalls",
            "Blob downloads that received nothing for stall_timeout_seconds and were resumed",
            download_stalls.clone(),
        );
        registry.register(
            "berth_pulls_queued",
            "Image pulls waiting for a turn under max_concurrent_pulls",
            pulls_queued.clone(),
        );
        registry.register(
            "berth_gc_removed_images",
            "Images removed by the automatic image GC under disk pressure",
            gc_removed_images.clone(),
        );
        Self {
            registry,
            pulls,
            pull_bytes,
            pull_duration,
            start_duration,
            token_requests,
            token_cache_hits,
            pulls_in_flight,
            containers,
            mirror_pulls,
            download_stalls,
            pulls_queued,
            gc_removed_images,
            signature_verifications,
            credential_provider_requests,
            audit_write_errors,
            containerd_info,
        }
    }
}

impl Metrics {
    pub fn token_request(&self, registry: &str, kind: &'static str) {
        self.token_requests
            .get_or_create(&TokenLabels {
                registry: registry.to_owned(),
                kind,
            })
            .inc();
    }

    /// Records the containerd version berthd reaches now (it may change across a containerd
    /// upgrade and restart): one sample, value 1.
    pub fn containerd_version(&self, version: &str) {
        self.containerd_info.clear();
        self.containerd_info
            .get_or_create(&VersionLabels {
                version: version.to_owned(),
            })
            .set(1);
    }

    /// The text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        prometheus_client::encoding::text::encode(&mut text, &self.registry).ok();
        text
    }
}

/// The shared handle passed to every stage.
pub type SharedMetrics = Arc<Metrics>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_uses_the_contract_names() {
        let metrics = Metrics::default();
        metrics
            .pulls
            .get_or_create(&PullLabels {
                result: "ok",
                registry: "r:5000".into(),
            })
            .inc();
        metrics.token_request("r:5000", "docker");
        metrics.pull_duration.observe(1.5);
        metrics.pulls_in_flight.set(2);
        metrics
            .pull_bytes
            .get_or_create(&RegistryLabels {
                registry: "r:5000".into(),
            })
            .inc_by(10);
        metrics
            .download_stalls
            .get_or_create(&RegistryLabels {
                registry: "r:5000".into(),
            })
            .inc();
        metrics.pulls_queued.set(3);
        metrics.gc_removed_images.inc();
        metrics.containerd_version("1.6.20~ds1");
        metrics.containerd_version("2.1.9");
        let text = metrics.encode();
        assert!(!text.contains("1.6.20"), "{text}");
        for needle in [
            "berth_pulls_total{result=\"ok\",registry=\"r:5000\"} 1",
            "berth_token_requests_total{registry=\"r:5000\",kind=\"docker\"} 1",
            "berth_pull_duration_seconds_count 1",
            "berth_pulls_in_flight 2",
            "# TYPE berth_start_duration_seconds histogram",
            "berth_pull_bytes_total{registry=\"r:5000\"} 10",
            "berth_containerd_info{version=\"2.1.9\"} 1",
            "berth_download_stalls_total{registry=\"r:5000\"} 1",
            "berth_pulls_queued 3",
            "berth_gc_removed_images_total 1",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
    }
}
