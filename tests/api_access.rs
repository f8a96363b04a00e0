//! Issue 5, who may call the API, and berthd's own process:
//!
//! - the unix socket is mode 0660 and, with `socket_group`, belongs to that group: a user
//!   outside owner and group cannot use it, a member of the group can; an unknown group is a
//!   config error (exit 64);
//! - `listen = "tcp://..."` without all three tls files is refused at start (exit 64, naming
//!   the keys);
//! - over mTLS, a client certificate's DNS SAN, URI SAN or (failing those) CN is its identity,
//!   limited to its `[[access]]` projects: no certificate (or one from another CA) gets nothing;
//!   another project's containers are invisible (NOT_FOUND) and its calls PERMISSION_DENIED; an
//!   identity without an entry may act for no project; health answers every client that
//!   completed the handshake;
//! - berthd is not dumpable (PR_SET_DUMPABLE 0): run as an ordinary user, its /proc files
//!   belong to root and that user cannot read its environment.

use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context as _};
use berth::api::pb::agent_client::AgentClient;
use berth::api::pb::secrets_client::SecretsClient;
use berth::api::pb::{
    ContainerState, DeleteSecretRequest, GetContainerRequest, ListContainersRequest,
    ListSecretsRequest, PullImageRequest, RemoveContainerRequest, StopContainerRequest,
};
use nix::unistd::{Group, User};
use tempfile::TempDir;
use tonic::transport::Channel;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::harness::berthd::{binary, Berthd, BerthdOptions};
use crate::harness::ca::TestCa;
use crate::harness::containerd::Containerd;
use crate::harness::env::{Env, RegistryKind};
use crate::harness::image::TestImage;
use crate::harness::mtls::{ClientName, IssuedCert, TestPki};
use crate::harness::wait::{wait_for, ORDER_TIMEOUT, STARTUP_TIMEOUT};
use crate::harness::{free_local_port, temp_dir};
use crate::leaks::needles_in;
use crate::security::{docker_secret, env_needles, order, restart_berthd, LOOPBACK};

/// berthd's exit status for a bad config (EX_USAGE).
const EXIT_BAD_CONFIG: i32 = 64;

/// How long a berthd with a bad config may take to give up.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(15);

/// A group that exists on this machine and is not root's: the socket group.
fn some_group() -> anyhow::Result<Group> {
    for name in ["daemon", "nogroup", "users", "bin"] {
        if let Some(group) = Group::from_name(name)? {
            if group.gid.as_raw() != 0 {
                return Ok(group);
            }
        }
    }
    bail!("none of the groups daemon, nogroup, users, bin exists")
}

/// The unprivileged user the non-root checks run as.
fn nobody() -> anyhow::Result<User> {
    User::from_name("nobody")?.context("user nobody does not exist")
}

/// A copy of berth's binary `name` that any user may run (the checkout may be private to root).
fn binary_for_anyone(name: &str) -> anyhow::Result<(TempDir, PathBuf)> {
    let dir = temp_dir("bin")?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
    let path = dir.path().join(name);
    std::fs::copy(binary(name)?, &path).with_context(|| format!("copying {name}"))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    Ok((dir, path))
}

/// `berth --socket SOCKET secret list`, run as `uid`:`gid` with no supplementary groups.
async fn cli_as(
    berth: &Path,
    socket: &Path,
    uid: u32,
    gid: u32,
) -> anyhow::Result<std::process::Output> {
    let mut command = tokio::process::Command::new(berth);
    command
        .arg("--socket")
        .arg(socket)
        .args(["secret", "list"])
        .uid(uid)
        .gid(gid)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    tokio::time::timeout(ORDER_TIMEOUT, command.output())
        .await
        .context("berth secret list timed out")?
        .context("running berth secret list")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_unix_socket_is_0660_and_belongs_to_socket_group() -> anyhow::Result<()> {
    let ca = TestCa::generate()?;
    let containerd = Containerd::start().await?;
    let plain = Berthd::start(&containerd, &ca, &BerthdOptions::default()).await?;
    let metadata = std::fs::metadata(plain.socket())?;
    assert_eq!(
        metadata.mode() & 0o7777,
        0o660,
        "{}",
        plain.socket().display()
    );
    drop(plain);

    let group = some_group()?;
    let berthd = Berthd::start(
        &containerd,
        &ca,
        &BerthdOptions {
            top_level_toml: format!("socket_group = {:?}", group.name),
            ..BerthdOptions::default()
        },
    )
    .await?;
    let metadata = std::fs::metadata(berthd.socket())?;
    assert_eq!(metadata.mode() & 0o7777, 0o660);
    assert_eq!(
        metadata.gid(),
        group.gid.as_raw(),
        "the socket should belong to group {}",
        group.name
    );
    assert_eq!(berthd.health().await?, ServingStatus::Serving);

    // What 0660 + group mean for callers: let other users reach the socket's dir, then ask.
    let socket_dir = berthd
        .socket()
        .parent()
        .context("the socket has a parent dir")?;
    std::fs::set_permissions(socket_dir, std::fs::Permissions::from_mode(0o711))?;
    let (_bin, berth) = binary_for_anyone("berth")?;
    let nobody = nobody()?;
    let outsider = cli_as(
        &berth,
        berthd.socket(),
        nobody.uid.as_raw(),
        nobody.gid.as_raw(),
    )
    .await?;
    assert!(
        !outsider.status.success(),
        "a user outside owner and group used the socket: {}",
        String::from_utf8_lossy(&outsider.stdout)
    );
    let member = cli_as(
        &berth,
        berthd.socket(),
        nobody.uid.as_raw(),
        group.gid.as_raw(),
    )
    .await?;
    assert!(
        member.status.success(),
        "a member of group {} could not use the socket: {}",
        group.name,
        String::from_utf8_lossy(&member.stderr)
    );
    Ok(())
}

/// Runs berthd with `config` (written to a file) and expects it to exit with 64 within
/// [`REFUSAL_TIMEOUT`]; returns what it wrote on stderr.
async fn refused_config(config: &str) -> anyhow::Result<String> {
    let dir = temp_dir("berthd-refused")?;
    let path = dir.path().join("berthd.toml");
    std::fs::write(
        &path,
        config.replace("{dir}", &dir.path().to_string_lossy()),
    )?;
    let mut command = tokio::process::Command::new(binary("berthd")?);
    command
        .arg("--config")
        .arg(&path)
        .env("BERTH_LOG", "info")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let output = tokio::time::timeout(REFUSAL_TIMEOUT, command.output())
        .await
        .with_context(|| format!("berthd did not refuse to start with:\n{config}"))??;
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(
        output.status.code(),
        Some(EXIT_BAD_CONFIG),
        "config:\n{config}\nstderr:\n{stderr}"
    );
    Ok(stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_without_tls_files_refuses_to_start() -> anyhow::Result<()> {
    let port = free_local_port()?;
    let listen = format!("listen = \"tcp://127.0.0.1:{port}\"\nstate_dir = \"{{dir}}/state\"\n");
    for extra in [
        "",
        "tls_cert = \"{dir}/cert.pem\"\n",
        "tls_cert = \"{dir}/cert.pem\"\ntls_key = \"{dir}/key.pem\"\n",
        "tls_key = \"{dir}/key.pem\"\ntls_client_ca = \"{dir}/ca.pem\"\n",
    ] {
        let stderr = refused_config(&format!("{listen}{extra}")).await?;
        for key in ["tls_cert", "tls_key", "tls_client_ca"] {
            assert!(
                stderr.contains(key),
                "the refusal should name {key}:\n{stderr}"
            );
        }
        assert!(
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_err(),
            "something listens on the refused port {port}"
        );
    }
    let stderr = refused_config(
        "listen = \"unix://{dir}/berthd.sock\"\nstate_dir = \"{dir}/state\"\n\
         socket_group = \"berth-no-such-group\"\n[containerd]\nsocket = \"{dir}/none.sock\"\n\
         [secrets]\nkey_file = \"{dir}/secrets.key\"\n",
    )
    .await?;
    assert!(
        stderr.contains("berth-no-such-group"),
        "the refusal should name the group:\n{stderr}"
    );
    Ok(())
}

/// One mTLS client of berthd.
struct Client {
    name: &'static str,
    channel: Channel,
}

impl Client {
    async fn connect(
        pki: &TestPki,
        addr: SocketAddr,
        name: &'static str,
        cert: &IssuedCert,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            name,
            channel: pki.channel(addr, Some(cert)).await?,
        })
    }

    fn agent(&self) -> AgentClient<Channel> {
        AgentClient::new(self.channel.clone())
    }

    fn secrets(&self) -> SecretsClient<Channel> {
        SecretsClient::new(self.channel.clone())
    }

    async fn health(&self) -> Result<ServingStatus, tonic::Status> {
        let response = HealthClient::new(self.channel.clone())
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await?;
        Ok(response.into_inner().status())
    }

    /// Starts the order and waits until it exited 0; returns the container id.
    async fn run(&self, request: berth::api::pb::StartContainerRequest) -> anyhow::Result<String> {
        let started = self
            .agent()
            .start_container(request)
            .await
            .with_context(|| format!("{} starting an order", self.name))?
            .into_inner();
        let agent = self.agent();
        let id = started.id.clone();
        wait_for(&format!("container {id} to exit"), ORDER_TIMEOUT, || {
            let (mut agent, id) = (agent.clone(), id.clone());
            async move {
                let container = agent
                    .get_container(GetContainerRequest {
                        id,
                        ..GetContainerRequest::default()
                    })
                    .await?
                    .into_inner();
                Ok((container.state() == ContainerState::Exited).then_some(container))
            }
        })
        .await
        .map(|container| {
            assert_eq!(container.exit_code, 0, "{container:?}");
            container.id
        })
    }
}

/// `call` failed with `code`.
fn expect_status<T: std::fmt::Debug>(what: &str, result: Result<T, tonic::Status>, code: Code) {
    match result {
        Ok(value) => panic!("{what} should fail with {code:?}, got {value:?}"),
        Err(status) => assert_eq!(status.code(), code, "{what}: {status:?}"),
    }
}

/// A client without a certificate, or with one from another CA, gets no answer: the handshake
/// fails, or the call is UNAUTHENTICATED.
async fn expect_no_service(pki: &TestPki, addr: SocketAddr, cert: Option<&IssuedCert>, what: &str) {
    let Ok(channel) = pki.channel(addr, cert).await else {
        return;
    };
    let health = HealthClient::new(channel.clone())
        .check(HealthCheckRequest::default())
        .await;
    let listed = SecretsClient::new(channel)
        .list_secrets(ListSecretsRequest::default())
        .await;
    for (call, status) in [
        ("health", health.map(|_| ()).err()),
        ("list secrets", listed.map(|_| ()).err()),
    ] {
        let status = status.unwrap_or_else(|| panic!("{what}: {call} answered"));
        // The server ends the handshake: tonic reports the closed connection as a transport
        // error (Unavailable, Unknown or Cancelled, with the transport error as its source).
        let transport = std::error::Error::source(&status)
            .is_some_and(|source| source.is::<tonic::transport::Error>());
        assert!(
            status.code() == Code::Unauthenticated || transport,
            "{what}: {call} should fail in the handshake or as UNAUTHENTICATED: {status:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_clients_act_only_for_their_projects() -> anyhow::Result<()> {
    let mut env = Env::start(RegistryKind::Htpasswd).await?;
    let pki = TestPki::generate()?;
    let server = pki.server("berthd", &[LOOPBACK])?;
    let cert_a = pki.client("client-a", ClientName::Dns("scheduler-a.example"))?;
    let cert_b = pki.client("client-b", ClientName::Uri("spiffe://fleet/b"))?;
    let cert_c = pki.client("client-c", ClientName::CommonNameOnly("legacy"))?;
    let other_pki = TestPki::generate()?;
    let cert_stranger = other_pki.client("stranger", ClientName::Dns("scheduler-a.example"))?;

    let addr = SocketAddr::new(LOOPBACK, free_local_port()?);
    let options = BerthdOptions {
        listen: Some(format!("tcp://{addr}")),
        top_level_toml: format!(
            "tls_cert = {:?}\ntls_key = {:?}\ntls_client_ca = {:?}",
            server.cert_path,
            server.key_path,
            pki.ca_pem_path()
        ),
        tables_toml: "[[access]]\nidentity = \"scheduler-a.example\"\nprojects = [\"team-a\"]\n\n\
                      [[access]]\nidentity = \"spiffe://fleet/b\"\nprojects = [\"team-b\"]\n"
            .to_owned(),
        ..BerthdOptions::default()
    };
    restart_berthd(&mut env, &options).await?;
    let a = Client::connect(&pki, addr, "A", &cert_a).await?;
    let b = Client::connect(&pki, addr, "B", &cert_b).await?;
    let c = Client::connect(&pki, addr, "C", &cert_c).await?;

    for client in [&a, &b, &c] {
        let health = wait_for(
            &format!("health over mTLS for {}", client.name),
            STARTUP_TIMEOUT,
            || async { Ok(client.health().await.ok()) },
        )
        .await?;
        assert_eq!(health, ServingStatus::Serving, "client {}", client.name);
    }
    expect_no_service(&pki, addr, None, "no client certificate").await;
    expect_no_service(
        &pki,
        addr,
        Some(&cert_stranger),
        "a certificate of another CA",
    )
    .await;

    let pushed = env
        .push("team/mtls", "v1", &TestImage::busybox(&["echo", "mtls"]))
        .await?;
    let image = pushed.reference();
    let registry = env.registry.addr();

    // A acts for team-a.
    let a_secret = a
        .secrets()
        .create_secret(docker_secret("team-a", "reg", registry, &env.user))
        .await?
        .into_inner()
        .id;
    let a_container = a.run(order("team-a", "a-web", &image, &a_secret)).await?;
    // ... and for nothing else.
    expect_status(
        "A CreateSecret in team-b",
        a.secrets()
            .create_secret(docker_secret("team-b", "reg", registry, &env.user))
            .await,
        Code::PermissionDenied,
    );
    expect_status(
        "A StartContainer in team-b",
        a.agent()
            .start_container(order("team-b", "a-intrudes", &image, &a_secret))
            .await,
        Code::PermissionDenied,
    );
    expect_status(
        "A ListSecrets of team-b",
        a.secrets()
            .list_secrets(ListSecretsRequest {
                project: "team-b".to_owned(),
            })
            .await,
        Code::PermissionDenied,
    );
    expect_status(
        "A PullImage in team-b",
        a.agent()
            .pull_image(PullImageRequest {
                project: "team-b".to_owned(),
                image: image.clone(),
                pull_secret: String::new(),
            })
            .await,
        Code::PermissionDenied,
    );
    expect_status(
        "A ListContainers of team-b",
        a.agent()
            .list_containers(ListContainersRequest {
                project: "team-b".to_owned(),
            })
            .await,
        Code::PermissionDenied,
    );

    // B (URI SAN) acts for team-b.
    let b_secret = b
        .secrets()
        .create_secret(docker_secret("team-b", "reg", registry, &env.user))
        .await?
        .into_inner()
        .id;
    let b_container = b.run(order("team-b", "b-web", &image, &b_secret)).await?;
    expect_status(
        "A DeleteSecret of team-b",
        a.secrets()
            .delete_secret(DeleteSecretRequest {
                project: "team-b".to_owned(),
                id: b_secret.clone(),
            })
            .await,
        Code::PermissionDenied,
    );
    expect_status(
        "A GetContainer team-b/b-web by name",
        a.agent()
            .get_container(GetContainerRequest {
                id: String::new(),
                project: "team-b".to_owned(),
                name: "b-web".to_owned(),
            })
            .await,
        Code::PermissionDenied,
    );

    // Another project's containers are invisible to A, exactly like missing ones.
    let listed = a
        .agent()
        .list_containers(ListContainersRequest::default())
        .await?
        .into_inner();
    assert!(
        listed.containers.iter().all(|c| c.project == "team-a")
            && listed.containers.iter().any(|c| c.id == a_container),
        "A lists more (or less) than team-a: {listed:?}"
    );
    let missing_id = "team-b.does-not-exist";
    for id in [b_container.as_str(), missing_id] {
        let status = a
            .agent()
            .get_container(GetContainerRequest {
                id: id.to_owned(),
                ..GetContainerRequest::default()
            })
            .await
            .expect_err("A must not see another project's container");
        assert_eq!(status.code(), Code::NotFound, "{id}: {status:?}");
        assert_eq!(
            status.message().replace(id, "<id>"),
            "container <id> not found",
            "{id}"
        );
    }
    expect_status(
        "A StopContainer of team-b's",
        a.agent()
            .stop_container(StopContainerRequest {
                id: b_container.clone(),
                timeout_seconds: 1,
            })
            .await,
        Code::NotFound,
    );
    expect_status(
        "A RemoveContainer of team-b's",
        a.agent()
            .remove_container(RemoveContainerRequest {
                id: b_container.clone(),
                force: true,
            })
            .await,
        Code::NotFound,
    );
    expect_status(
        "B GetContainer of team-a's",
        b.agent()
            .get_container(GetContainerRequest {
                id: a_container.clone(),
                ..GetContainerRequest::default()
            })
            .await,
        Code::NotFound,
    );
    b.agent()
        .get_container(GetContainerRequest {
            id: b_container.clone(),
            ..GetContainerRequest::default()
        })
        .await
        .context("B's container must survive A's attempts")?;

    // C (CN only, no [[access]] entry) may act for no project.
    for project in ["team-a", "team-b", "default", ""] {
        expect_status(
            &format!("C CreateSecret in {project:?}"),
            c.secrets()
                .create_secret(docker_secret(project, "c", registry, &env.user))
                .await,
            Code::PermissionDenied,
        );
        expect_status(
            &format!("C StartContainer in {project:?}"),
            c.agent()
                .start_container(order(project, "c-web", &image, ""))
                .await,
            Code::PermissionDenied,
        );
    }
    let listed = c
        .agent()
        .list_containers(ListContainersRequest::default())
        .await?
        .into_inner();
    assert!(
        listed.containers.is_empty(),
        "C sees containers: {listed:?}"
    );
    for client in [&a, &b, &c] {
        assert_eq!(client.health().await?, ServingStatus::Serving);
    }

    let log = env.berthd.log_text();
    let needles = env_needles(&env);
    let leaked = needles_in(log.as_bytes(), &needles);
    assert!(leaked.is_empty(), "berthd's log holds {leaked:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn berthd_is_not_dumpable() -> anyhow::Result<()> {
    let nobody = nobody()?;
    let (uid, gid) = (nobody.uid.as_raw(), nobody.gid.as_raw());
    let (_bin, berthd) = binary_for_anyone("berthd")?;
    let dir = temp_dir("berthd-dumpable")?;
    nix::unistd::chown(dir.path(), Some(nobody.uid), Some(nobody.gid))?;
    let root = dir.path().to_string_lossy().into_owned();
    let config = format!(
        "listen = \"unix://{root}/berthd.sock\"\nstate_dir = \"{root}/state\"\n\
         [containerd]\nsocket = \"{root}/no-containerd.sock\"\n\
         [secrets]\nkey_file = \"{root}/secrets.key\"\n"
    );
    let config_path = dir.path().join("berthd.toml");
    std::fs::write(&config_path, config)?;
    let log = std::fs::File::create(dir.path().join("berthd.log"))?;

    let mut daemon = tokio::process::Command::new(&berthd)
        .arg("--config")
        .arg(&config_path)
        .uid(uid)
        .gid(gid)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .context("starting berthd as nobody")?;
    let mut control = tokio::process::Command::new("sleep")
        .arg("60")
        .uid(uid)
        .gid(gid)
        .kill_on_drop(true)
        .spawn()
        .context("starting sleep as nobody")?;
    let pid = daemon.id().context("berthd's pid")?;
    let control_pid = control.id().context("sleep's pid")?;
    let socket = dir.path().join("berthd.sock");
    let log_path = dir.path().join("berthd.log");
    wait_for(
        "berthd (as nobody) to bind its socket",
        STARTUP_TIMEOUT,
        || {
            let (socket, log_path) = (&socket, &log_path);
            let exited = daemon.try_wait();
            async move {
                if let Ok(Some(status)) = exited {
                    bail!(
                        "berthd exited with {status}:\n{}",
                        std::fs::read_to_string(log_path).unwrap_or_default()
                    );
                }
                Ok(socket.exists().then_some(()))
            }
        },
    )
    .await?;

    let status_text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    assert!(
        status_text
            .lines()
            .any(|line| line.starts_with("Uid:") && line.contains(&uid.to_string())),
        "berthd does not run as nobody:\n{status_text}"
    );
    // The control proves the check means something: a dumpable process's files are its own.
    let control_environ = std::fs::metadata(format!("/proc/{control_pid}/environ"))?;
    assert_eq!(control_environ.uid(), uid, "the control is not dumpable?");
    let control_read = read_as(&format!("/proc/{control_pid}/environ"), uid, gid).await?;
    assert!(
        control_read,
        "nobody cannot read its own dumpable process's environ"
    );

    for file in ["environ", "mem", "maps", "status"] {
        let metadata = std::fs::metadata(format!("/proc/{pid}/{file}"))?;
        assert_eq!(
            (metadata.uid(), metadata.gid()),
            (0, 0),
            "/proc/{pid}/{file} should belong to root:root for a non-dumpable process"
        );
    }
    assert!(
        !read_as(&format!("/proc/{pid}/environ"), uid, gid).await?,
        "berthd's own user can read its environment: it is dumpable"
    );
    daemon.start_kill()?;
    control.start_kill()?;
    daemon.wait().await?;
    control.wait().await?;
    Ok(())
}

/// Whether `cat FILE` as `uid`:`gid` succeeds.
async fn read_as(file: &str, uid: u32, gid: u32) -> anyhow::Result<bool> {
    let output = tokio::process::Command::new("cat")
        .arg(file)
        .uid(uid)
        .gid(gid)
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("cat {file}"))?;
    Ok(output.status.success())
}
