//! Reliability (issue 6), end to end: pulls through a fault-injecting proxy (cuts, stalls,
//! 503/429, a registry that ignores Range, outages), many orders for one new image, berthd
//! killed mid-pull and restarted, containerd restarted under berthd, idempotent orders across
//! restarts, a graceful stop, and image cleanup.
//!
//! Measured figures (bytes re-fetched after a cut, fetch counts, timings) are printed with a
//! `[measure]` prefix; run with `--nocapture` to see them.

mod bandwidth;
mod concurrency;
mod gc;
mod idempotency;
mod prune;
mod pull_faults;
mod pull_limits;
mod restarts;
mod stall;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _};
use berth::api::pb::{Container, ContainerState, GetContainerRequest, StartContainerRequest};
use tokio::time::Instant;

use crate::harness::berthd::{Berthd, BerthdOptions};
use crate::harness::env::{start_request, Env, RegistryKind};
use crate::harness::faults::FaultProxy;
use crate::harness::image::layered::PushedLayered;
use crate::harness::random_lowercase;
use crate::harness::wait::{wait_for, ORDER_TIMEOUT};

/// berthd's `[registry]` keys for fault tests: faults show within seconds, and a pull that
/// cannot finish gives up well inside the test's patience.
const FAST_REGISTRY: &str = "connect_timeout_seconds = 2\n\
                             read_timeout_seconds = 2\n\
                             retries = 5\n\
                             pull_deadline_seconds = 20\n";

/// `pull_deadline_seconds` of [`FAST_REGISTRY`].
const FAST_DEADLINE: Duration = Duration::from_secs(20);

/// Size of the random layer: big enough that a cut lands mid-layer, mid-chunk.
const LAYER_BYTES: usize = 6 << 20;

/// A registry (htpasswd unless asked otherwise) behind a [`FaultProxy`], berthd configured with `registry_toml` and the
/// proxy in `plain_http`, and a secret for the proxy's host. Drops berthd first, the proxy last.
#[derive(Debug)]
struct FaultEnv {
    env: Env,
    proxy: FaultProxy,
    /// Secret id for the proxy's host.
    secret: String,
}

impl FaultEnv {
    async fn start(registry_toml: &str) -> anyhow::Result<Self> {
        Self::start_with(RegistryKind::Htpasswd, registry_toml).await
    }

    async fn start_with(kind: RegistryKind, registry_toml: &str) -> anyhow::Result<Self> {
        Self::start_configured(
            kind,
            BerthdOptions {
                registry_toml: registry_toml.to_owned(),
                ..BerthdOptions::default()
            },
        )
        .await
    }

    /// [`Self::start_with`], berthd configured with `options` (the proxy joins its `plain_http`).
    async fn start_configured(
        kind: RegistryKind,
        mut options: BerthdOptions,
    ) -> anyhow::Result<Self> {
        let mut env = Env::start(kind).await?;
        let proxy = FaultProxy::start(&env.ca, env.registry.addr()).await?;
        options.plain_http.push(proxy.addr().to_owned());
        // The env's own berthd knows nothing of the proxy: replace it.
        env.berthd = Berthd::start(&env.containerd, &env.ca, &options).await?;
        let secret = env
            .create_secret("via-proxy", proxy.addr(), &env.user)
            .await?;
        Ok(Self { env, proxy, secret })
    }

    /// Pushes a two-layer image (`cmd`, then `random_bytes` of random data) straight to the
    /// registry.
    async fn push(
        &self,
        repository: &str,
        cmd: &[&str],
        random_bytes: usize,
    ) -> anyhow::Result<PushedLayered> {
        self.env.push_layered(repository, cmd, random_bytes).await
    }

    /// The reference through the proxy.
    fn via_proxy(&self, pushed: &PushedLayered) -> String {
        pushed.image.reference_via(self.proxy.addr())
    }

    /// A start order for `image` through the proxy, with the proxy's secret.
    fn order(&self, order_id: &str, name: &str, image: &str) -> StartContainerRequest {
        start_request(order_id, name, image, &self.secret)
    }

    /// Starts `image` under a fresh order and name, waits until it exits 0; returns it and how
    /// long StartContainer took (pull included).
    async fn run(&self, image: &str) -> anyhow::Result<(Container, Duration)> {
        let suffix = random_lowercase(8);
        let started = Instant::now();
        let result = self
            .env
            .start_container(self.order(
                &format!("order-{suffix}"),
                &format!("run-{suffix}"),
                image,
            ))
            .await?;
        let took = started.elapsed();
        let container = match result {
            Ok(container) => container,
            Err(status) => bail!(
                "starting {image} failed: {status:?}\nproxy saw:\n{}\nberthd log:\n{}",
                self.proxy.describe(),
                self.env.berthd.log_tail()
            ),
        };
        let exited = self.env.wait_until_exited(&container.id).await?;
        if exited.exit_code != 0 {
            bail!("{image} exited with {}", exited.exit_code);
        }
        Ok((exited, took))
    }
}

/// berthd options with `registry_toml` and metrics on a free loopback port; returns them and
/// the metrics address.
fn with_metrics(registry_toml: &str) -> anyhow::Result<(BerthdOptions, String)> {
    let addr = format!("127.0.0.1:{}", crate::harness::free_local_port()?);
    let options = BerthdOptions {
        registry_toml: registry_toml.to_owned(),
        top_level_toml: format!("metrics_listen = \"{addr}\"\n"),
        ..BerthdOptions::default()
    };
    Ok((options, addr))
}

/// One sample of berthd's metrics at `addr`; 0 when it has none (yet).
async fn metric(addr: &str, name: &str, labels: &[(&str, &str)]) -> anyhow::Result<f64> {
    let (_, exposition) = crate::harness::exposition::scrape(addr).await?;
    Ok(exposition.value(name, labels).unwrap_or(0.0))
}

/// Image names in the test's namespace (`ctr images ls -q`).
async fn image_names(env: &Env) -> anyhow::Result<Vec<String>> {
    Ok(env
        .containerd
        .ctr_ok(&["images", "ls", "-q"])
        .await?
        .lines()
        .map(str::to_owned)
        .collect())
}

/// containerd's content store root (the local store under the harness's containerd dir).
fn content_root(env: &Env) -> PathBuf {
    env.containerd
        .dir()
        .join("root")
        .join("io.containerd.content.v1.content")
}

/// The bytes containerd holds in the ingest of blob `digest` (berthd's ref
/// `berth-blob-<digest>`), read from the local store's files; None without such an ingest.
fn ingest_offset(env: &Env, digest: &str) -> anyhow::Result<Option<u64>> {
    let ingests = content_root(env).join("ingest");
    let suffix = format!("berth-blob-{digest}");
    let Ok(entries) = std::fs::read_dir(&ingests) else {
        return Ok(None);
    };
    for entry in entries {
        let dir = entry?.path();
        let Ok(reference) = std::fs::read_to_string(dir.join("ref")) else {
            continue;
        };
        if reference.trim_end().ends_with(&suffix) {
            // An ingest being opened has its ref before its data file.
            let data = dir.join("data");
            return match std::fs::metadata(&data) {
                Ok(metadata) => Ok(Some(metadata.len())),
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(err) => Err(err).with_context(|| format!("reading {}", data.display())),
            };
        }
    }
    Ok(None)
}

/// Whether the content store has the committed blob `digest`.
fn blob_committed(env: &Env, digest: &str) -> bool {
    let hex = digest.trim_start_matches("sha256:");
    content_root(env)
        .join("blobs")
        .join("sha256")
        .join(hex)
        .is_file()
}

/// Polls GetContainer until `id` is in `state`.
async fn wait_for_state(env: &Env, id: &str, state: ContainerState) -> anyhow::Result<Container> {
    let agent = env.berthd.agent().await?;
    wait_for(
        &format!("container {id} to be {state:?}"),
        ORDER_TIMEOUT,
        || {
            let mut agent = agent.clone();
            async move {
                let container = agent
                    .get_container(GetContainerRequest {
                        id: id.to_owned(),
                        ..GetContainerRequest::default()
                    })
                    .await
                    .with_context(|| format!("getting container {id}"))?
                    .into_inner();
                Ok((container.state() == state).then_some(container))
            }
        },
    )
    .await
    .with_context(|| format!("berthd log:\n{}", env.berthd.log_tail()))
}

/// Waits until `path` holds `needle`; returns the file's text.
async fn wait_for_log(path: &Path, needle: &str) -> anyhow::Result<String> {
    wait_for(
        &format!("{} to hold {needle:?}", path.display()),
        ORDER_TIMEOUT,
        || async {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            Ok(text.contains(needle).then_some(text))
        },
    )
    .await
}

/// `ctr tasks ls` of the test's namespace: (container id, status) pairs.
async fn tasks(env: &Env) -> anyhow::Result<Vec<(String, String)>> {
    let listing = env.containerd.ctr_ok(&["tasks", "ls"]).await?;
    Ok(listing
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            match fields.as_slice() {
                [id, _pid, status, ..] => Some(((*id).to_owned(), (*status).to_owned())),
                _ => None,
            }
        })
        .collect())
}
