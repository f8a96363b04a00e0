//! One end-to-end environment: CA, containerd, a registry (htpasswd or token auth, optionally behind
//! the corrupting proxy) and berthd, plus the few steps every product test takes. With
//! `cloud_registries`, an ACR-style and a GAR-style registry (and the Google token endpoint
//! stand-in) join the token registry, all three verifying the one token server's JWTs.
//!
//! Fields drop in declaration order: berthd first, containerd (which removes its workloads) after
//! every registry piece, the CA and scratch dir last.

use std::path::Path;

use anyhow::{bail, Context as _};
use berth::api::pb::{
    Container, ContainerSpec, ContainerState, GetContainerRequest, PullImageRequest,
    StartContainerRequest,
};
use tempfile::TempDir;

use super::berthd::{Berthd, BerthdOptions};
use super::ca::TestCa;
use super::containerd::Containerd;
use super::credentials::RegistryUser;
use super::google::GoogleOAuth;
use super::image::layered::PushedLayered;
use super::image::{push_image, PushedImage, TestImage};
use super::proxy::{CorruptingProxy, ServicelessFront};
use super::registry::Registry;
use super::token_server::{Grants, TokenServer};
use super::wait::{wait_for, ORDER_TIMEOUT};
use super::{random_lowercase, temp_dir};

/// How the registry authenticates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegistryKind {
    /// `auth.htpasswd`: Basic on every request.
    Htpasswd,
    /// `auth.token` with our token server: Bearer tokens.
    Token,
}

/// What else the environment has.
#[derive(Debug, Clone, Copy, Default)]
pub struct EnvOptions {
    /// A [`CorruptingProxy`] in front of the registry, in berthd's `plain_http`.
    pub corrupting_proxy: bool,
    /// An ACR-style and a GAR-style registry beside the token registry (needs
    /// [`RegistryKind::Token`]). The harness's pusher may push to both.
    pub cloud_registries: bool,
}

/// The GAR-style registry: what berthd and image references name is the front.
#[derive(Debug)]
pub struct GarRegistry {
    /// Drops `service` from the registry's challenges; `addr()` is its address.
    pub front: ServicelessFront,
    /// The registry behind the front (push here).
    pub registry: Registry,
    /// The `oauth2.googleapis.com` stand-in: every service account's `token_uri`.
    pub google: GoogleOAuth,
}

impl GarRegistry {
    /// `127.0.0.1:PORT` of the front: the GAR "host" of secrets and image references.
    pub fn addr(&self) -> &str {
        self.front.addr()
    }
}

/// Everything one end-to-end test runs against.
#[derive(Debug)]
pub struct Env {
    pub berthd: Berthd,
    pub proxy: Option<CorruptingProxy>,
    pub gar: Option<GarRegistry>,
    pub acr: Option<Registry>,
    pub registry: Registry,
    pub token_server: Option<TokenServer>,
    pub containerd: Containerd,
    pub ca: TestCa,
    /// The credential berthd is given (in a secret): may pull every repository.
    pub user: RegistryUser,
    /// The harness's own credential, for pushing.
    pub pusher: RegistryUser,
    scratch: TempDir,
}

impl Env {
    pub async fn start(kind: RegistryKind) -> anyhow::Result<Self> {
        Self::start_with(kind, EnvOptions::default()).await
    }

    pub async fn start_with(kind: RegistryKind, options: EnvOptions) -> anyhow::Result<Self> {
        Self::start_on(kind, options, None).await
    }

    /// [`Self::start_with`] on a containerd the test started itself (one with its root on a
    /// small filesystem, say).
    pub async fn start_with_containerd(
        kind: RegistryKind,
        containerd: Containerd,
    ) -> anyhow::Result<Self> {
        Self::start_on(kind, EnvOptions::default(), Some(containerd)).await
    }

    async fn start_on(
        kind: RegistryKind,
        options: EnvOptions,
        containerd: Option<Containerd>,
    ) -> anyhow::Result<Self> {
        let ca = TestCa::generate()?;
        let user = RegistryUser::generate("berth-user");
        let pusher = RegistryUser::generate("berth-pusher");
        let token_server = match kind {
            RegistryKind::Htpasswd => None,
            RegistryKind::Token => Some(
                TokenServer::start(
                    &ca,
                    &[
                        (&user, Grants::none().pull("*")),
                        (&pusher, Grants::none().push_all()),
                    ],
                )
                .await?,
            ),
        };
        if options.cloud_registries && token_server.is_none() {
            bail!("cloud registries need RegistryKind::Token");
        }
        let google = if options.cloud_registries {
            Some(GoogleOAuth::start(&ca).await?)
        } else {
            None
        };
        if let (Some(token_server), Some(google)) = (&token_server, &google) {
            token_server.trust_google(google)?;
            token_server.add_acr_principal(&pusher, Grants::none().push_all());
            token_server.add_gar_user(&pusher, Grants::none().push_all());
        }
        let registry = async {
            match &token_server {
                Some(token_server) => Registry::start_token(&ca, token_server).await,
                None => Registry::start_htpasswd(&ca, &[&user, &pusher]).await,
            }
        };
        let cloud_token_server = token_server.as_ref().filter(|_| options.cloud_registries);
        let acr = async {
            match cloud_token_server {
                Some(token_server) => Registry::start_acr(&ca, token_server).await.map(Some),
                None => Ok(None),
            }
        };
        let gar_registry = async {
            match cloud_token_server {
                Some(token_server) => Registry::start_gar(&ca, token_server).await.map(Some),
                None => Ok(None),
            }
        };
        let containerd = async {
            match containerd {
                Some(containerd) => Ok(containerd),
                None => Containerd::start().await,
            }
        };
        let (containerd, registry, acr, gar_registry) =
            tokio::try_join!(containerd, registry, acr, gar_registry)?;
        let gar = match (gar_registry, google) {
            (Some(registry), Some(google)) => Some(GarRegistry {
                front: ServicelessFront::start(&ca, registry.addr()).await?,
                registry,
                google,
            }),
            _ => None,
        };
        let proxy = if options.corrupting_proxy {
            Some(CorruptingProxy::start(&ca, registry.addr()).await?)
        } else {
            None
        };
        let berthd_options = BerthdOptions {
            plain_http: proxy.iter().map(|proxy| proxy.addr().to_owned()).collect(),
            ..BerthdOptions::default()
        };
        let berthd = Berthd::start(&containerd, &ca, &berthd_options).await?;
        Ok(Self {
            berthd,
            proxy,
            gar,
            acr,
            registry,
            token_server,
            containerd,
            ca,
            user,
            pusher,
            scratch: temp_dir("scratch")?,
        })
    }

    /// A dir for the test's own files (service YAML and such).
    pub fn scratch_dir(&self) -> &Path {
        self.scratch.path()
    }

    /// Builds `image` and pushes it straight to the registry as the pusher.
    pub async fn push(
        &self,
        repository: &str,
        tag: &str,
        image: &TestImage,
    ) -> anyhow::Result<PushedImage> {
        self.push_to(self.registry.addr(), repository, tag, image)
            .await
    }

    /// Builds `image` and pushes it to the registry at `registry` (`host:port`) as the pusher.
    pub async fn push_to(
        &self,
        registry: &str,
        repository: &str,
        tag: &str,
        image: &TestImage,
    ) -> anyhow::Result<PushedImage> {
        push_image(&self.ca, registry, repository, tag, &self.pusher, image).await
    }

    /// Pushes busybox running `cmd` with a second layer of `random_bytes` random bytes, as
    /// `repository:v1`, straight to the registry as the pusher.
    pub async fn push_layered(
        &self,
        repository: &str,
        cmd: &[&str],
        random_bytes: usize,
    ) -> anyhow::Result<PushedLayered> {
        TestImage::busybox(cmd)
            .with_random_layer(random_bytes)
            .push(
                &self.ca,
                self.registry.addr(),
                repository,
                "v1",
                &self.pusher,
            )
            .await
    }

    /// `Agent/PullImage` (project "default") of `image` with `pull_secret`, read to its end.
    pub async fn pull_image(&self, image: &str, pull_secret: &str) -> anyhow::Result<()> {
        let mut events = self
            .berthd
            .agent()
            .await?
            .pull_image(PullImageRequest {
                project: String::new(),
                image: image.to_owned(),
                pull_secret: pull_secret.to_owned(),
            })
            .await?
            .into_inner();
        while events.message().await?.is_some() {}
        Ok(())
    }

    /// The token server; an error for an htpasswd env.
    pub fn token_server(&self) -> anyhow::Result<&TokenServer> {
        self.token_server
            .as_ref()
            .context("this env has no token server (RegistryKind::Htpasswd)")
    }

    /// The ACR-style registry; an error when the env was started without cloud registries.
    pub fn acr(&self) -> anyhow::Result<&Registry> {
        self.acr
            .as_ref()
            .context("this env was started without cloud registries")
    }

    /// The GAR-style registry; an error when the env was started without cloud registries.
    pub fn gar(&self) -> anyhow::Result<&GarRegistry> {
        self.gar
            .as_ref()
            .context("this env was started without cloud registries")
    }

    /// The corrupting proxy; an error when the env was started without one.
    pub fn proxy(&self) -> anyhow::Result<&CorruptingProxy> {
        self.proxy
            .as_ref()
            .context("this env was started without a corrupting proxy")
    }

    /// `Secrets/CreateSecret` (project "default") for a Docker credential; returns the id.
    pub async fn create_secret(
        &self,
        name: &str,
        server: &str,
        user: &RegistryUser,
    ) -> anyhow::Result<String> {
        crate::harness::berthd::create_docker_secret(
            self.berthd.secrets().await?,
            name,
            server,
            user,
        )
        .await
    }

    /// `Agent/StartContainer`; the tonic status is returned as is, for tests of error codes.
    pub async fn start_container(
        &self,
        request: StartContainerRequest,
    ) -> anyhow::Result<Result<Container, tonic::Status>> {
        let mut agent = self.berthd.agent().await?;
        Ok(agent
            .start_container(request)
            .await
            .map(tonic::Response::into_inner))
    }

    /// Polls `Agent/GetContainer` until the container `id` is EXITED.
    pub async fn wait_until_exited(&self, id: &str) -> anyhow::Result<Container> {
        let agent = self.berthd.agent().await?;
        wait_for(&format!("container {id} to exit"), ORDER_TIMEOUT, || {
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
                Ok((container.state() == ContainerState::Exited).then_some(container))
            }
        })
        .await
        .with_context(|| format!("berthd log:\n{}", self.berthd.log_tail()))
    }

    /// Starts `image` with `pull_secret` under a fresh order id and name, waits for it to exit,
    /// and checks exit code 0.
    pub async fn run_to_completion(
        &self,
        image: &str,
        pull_secret: &str,
    ) -> anyhow::Result<Container> {
        let suffix = random_lowercase(8);
        let request = start_request(
            &format!("order-{suffix}"),
            &format!("run-{suffix}"),
            image,
            pull_secret,
        );
        let started = match self.start_container(request).await? {
            Ok(container) => container,
            Err(status) => bail!(
                "starting {image} failed: {status:?}\nberthd log:\n{}",
                self.berthd.log_tail()
            ),
        };
        let exited = self.wait_until_exited(&started.id).await?;
        if exited.exit_code != 0 {
            bail!("{image} exited with {}", exited.exit_code);
        }
        Ok(exited)
    }
}

/// A start order in project "default" for `image`, running the image's own entrypoint and cmd.
pub fn start_request(
    order_id: &str,
    name: &str,
    image: &str,
    pull_secret: &str,
) -> StartContainerRequest {
    StartContainerRequest {
        order_id: order_id.to_owned(),
        project: String::new(),
        name: name.to_owned(),
        container: Some(ContainerSpec {
            image: image.to_owned(),
            pull_secret: pull_secret.to_owned(),
            ..ContainerSpec::default()
        }),
    }
}

/// `secret-<[a-z0-9]+>`, as contract.md gives the ids.
pub fn is_secret_id(id: &str) -> bool {
    id.strip_prefix("secret-").is_some_and(|random| {
        !random.is_empty()
            && random
                .bytes()
                .all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit())
    })
}
