//! The `berth` CLI: argument types, one module per subcommand group, and the one error type.
//!
//! Every command writes through the `out`/`err` writers given to [`run_with`], so tests can
//! capture what it prints. Inputs (files, stdin) are read and checked before the daemon is dialled.

pub mod connect;

#[cfg(test)]
mod component;
mod container;
mod explain;
mod image;
mod output;
mod progress;
mod pull;
mod secret;
pub(crate) mod service;
mod version;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use tokio::io::AsyncReadExt;
use zeroize::{Zeroize, Zeroizing};

/// The daemon address used when neither `--address` nor `--socket` is given.
pub const DEFAULT_ADDRESS: &str = "unix:///run/berth/berthd.sock";

/// Files read by the CLI (service files, JSON keys, docker configs) are refused past this size.
const MAX_INPUT_BYTES: u64 = 1024 * 1024;

/// Deadline of a short unary call (list, get, create secret, ...). Start, stop and pull are
/// bounded by the daemon's own deadlines instead.
const UNARY_TIMEOUT: Duration = Duration::from_secs(30);

/// Command line of `berth`.
#[derive(Debug, Parser)]
#[command(
    name = "berth",
    version,
    about = "Talk to berthd: pull secrets, services, containers and image pulls"
)]
pub struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

/// Options accepted before or after the verb.
#[derive(Debug, Args)]
#[command(next_help_heading = "Global options")]
struct GlobalArgs {
    /// Project to act in.
    #[arg(long, global = true, default_value = "default")]
    project: String,
    /// berthd address: unix:///path, a bare /path, or http://host:port.
    #[arg(
        long = "address",
        visible_alias = "socket",
        global = true,
        value_name = "URL|PATH",
        default_value = DEFAULT_ADDRESS
    )]
    address: String,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value_t = OutputFormat::Text)]
    output: OutputFormat,
}

/// How results are printed on stdout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum OutputFormat {
    /// Tables and plain lines.
    Text,
    /// JSON with the proto field names.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Manage image pull secrets.
    #[command(subcommand)]
    Secret(secret::SecretCommand),
    /// Start services described by a file.
    #[command(subcommand)]
    Service(service::ServiceCommand),
    /// List containers.
    Ps,
    /// Show one container.
    Get(container::TargetArgs),
    /// Print a container's log.
    Logs(container::LogsArgs),
    /// Stop a container (SIGTERM, then SIGKILL after the timeout).
    Stop(container::StopArgs),
    /// Remove a container.
    Rm(container::RmArgs),
    /// Pull an image ahead of time.
    Pull(pull::PullArgs),
    /// Show what a pull of an image would do now, without pulling.
    Explain(explain::ExplainArgs),
    /// Manage the images berthd keeps (`image prune`).
    #[command(subcommand)]
    Image(image::ImageCommand),
    /// Print the versions of berth, berthd and the containerd berthd talks to.
    Version,
}

/// Everything that can make a `berth` invocation fail.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CmdError {
    #[error("invalid berthd address {address}: expected unix:///path, /path or http://host:port")]
    InvalidAddress { address: String },
    #[error("connecting to berthd at {address}")]
    Connect {
        address: String,
        #[source]
        source: tonic::transport::Error,
    },
    /// The daemon answered with an error; printed as `<CODE>: <message>`.
    #[error("{}", status_line(.0))]
    Status(tonic::Status),
    #[error("reading {}", path.display())]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is larger than {limit} bytes", path.display())]
    FileTooLarge { path: PathBuf, limit: u64 },
    #[error("{} is not UTF-8 text", path.display())]
    NotUtf8 { path: PathBuf },
    #[error("reading stdin")]
    ReadStdin(#[source] std::io::Error),
    #[error("stdin is larger than {limit} bytes")]
    StdinTooLarge { limit: u64 },
    #[error("stdin is not UTF-8 text")]
    StdinNotUtf8,
    #[error("the password is empty")]
    EmptyPassword,
    #[error("parsing service file {}", path.display())]
    ServiceFile {
        path: PathBuf,
        #[source]
        source: serde_yaml_ng::Error,
    },
    #[error("service file {}: `{field}` must be {expected:?}, found {found:?}", path.display())]
    ServiceFieldValue {
        path: PathBuf,
        field: &'static str,
        expected: &'static str,
        found: String,
    },
    #[error("service file {}: `{field}` is empty", path.display())]
    ServiceFieldEmpty { path: PathBuf, field: &'static str },
    /// Only the position is kept: a JSON error could quote key material.
    #[error("json key {} is not valid JSON (line {line}, column {column})", path.display())]
    JsonKeyInvalid {
        path: PathBuf,
        line: usize,
        column: usize,
    },
    #[error("json key {} is not a JSON object", path.display())]
    JsonKeyNotObject { path: PathBuf },
    /// Only the position is kept: a JSON error could quote credential material.
    #[error("docker config {} is not valid (line {line}, column {column})", path.display())]
    DockerConfigInvalid {
        path: PathBuf,
        line: usize,
        column: usize,
    },
    #[error("no docker config found: set DOCKER_CONFIG or HOME, or pass --config")]
    NoDockerConfig,
    #[error("{failed} of {total} docker credentials could not be imported")]
    ImportIncomplete { failed: usize, total: usize },
    #[error("container {id} has no log file")]
    NoLogFile { id: String },
    #[error("writing output")]
    Output(#[source] std::io::Error),
}

impl From<tonic::Status> for CmdError {
    fn from(status: tonic::Status) -> Self {
        Self::Status(status)
    }
}

impl CmdError {
    /// The exit status of `berth` for this error (usage errors exit 2 from clap itself).
    pub fn exit_code(&self) -> u8 {
        1
    }

    /// The error and its sources on one line, `: `-separated; the line `berth` prints on stderr
    /// after `berth: `.
    pub fn describe(&self) -> String {
        let mut line = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            // Some sources repeat their own source's text; print each text once.
            let text = cause.to_string();
            if !line.ends_with(&text) {
                line.push_str(": ");
                line.push_str(&text);
            }
            source = cause.source();
        }
        line
    }
}

fn status_line(status: &tonic::Status) -> String {
    let code = crate::code_name::code_name(status.code());
    if status.message().is_empty() {
        code.to_owned()
    } else {
        format!("{code}: {}", status.message())
    }
}

/// Runs one parsed command line against the daemon, printing on the process's stdout/stderr.
pub async fn run(cli: Cli) -> Result<(), CmdError> {
    use std::io::IsTerminal as _;
    let mut out = std::io::stdout();
    let mut err = std::io::stderr();
    let tty = err.is_terminal();
    run_console(cli, &mut out, &mut err, tty).await
}

/// Runs one parsed command line, printing results on `out` and warnings on `err`.
pub async fn run_with(
    cli: Cli,
    out: &mut (dyn Write + Send),
    err: &mut (dyn Write + Send),
) -> Result<(), CmdError> {
    run_console(cli, out, err, false).await
}

async fn run_console(
    cli: Cli,
    out: &mut (dyn Write + Send),
    err: &mut (dyn Write + Send),
    tty: bool,
) -> Result<(), CmdError> {
    let mut console = Console {
        global: &cli.global,
        out,
        err,
        tty,
    };
    match cli.command {
        Command::Secret(command) => secret::run(command, &mut console).await,
        Command::Service(command) => service::run(command, &mut console).await,
        Command::Ps => container::ps(&mut console).await,
        Command::Get(args) => container::get(args, &mut console).await,
        Command::Logs(args) => container::logs(args, &mut console).await,
        Command::Stop(args) => container::stop(args, &mut console).await,
        Command::Rm(args) => container::rm(args, &mut console).await,
        Command::Pull(args) => pull::run(args, &mut console).await,
        Command::Explain(args) => explain::run(args, &mut console).await,
        Command::Image(command) => image::run(command, &mut console).await,
        Command::Version => version::run(&mut console).await,
    }
}

/// What a command needs besides its own arguments: the global options and where to print.
struct Console<'a> {
    global: &'a GlobalArgs,
    out: &'a mut (dyn Write + Send),
    err: &'a mut (dyn Write + Send),
    /// stderr is a terminal: progress is drawn as bars there.
    tty: bool,
}

impl Console<'_> {
    async fn channel(&self) -> Result<tonic::transport::Channel, CmdError> {
        connect::connect(&self.global.address).await
    }

    fn project(&self) -> String {
        self.global.project.clone()
    }

    fn json(&self) -> bool {
        self.global.output == OutputFormat::Json
    }

    /// A warning or note on stderr, prefixed `berth: `.
    fn warn(&mut self, message: &str) -> Result<(), CmdError> {
        writeln!(self.err, "berth: {message}").map_err(CmdError::Output)
    }
}

/// A unary request with the CLI's short deadline.
fn unary<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(UNARY_TIMEOUT);
    request
}

/// Reads a whole file of at most [`MAX_INPUT_BYTES`] as UTF-8; `-` reads stdin. The buffer is
/// zeroed on drop, since the file may be a key.
async fn read_input(path: &Path) -> Result<Zeroizing<String>, CmdError> {
    if path == Path::new("-") {
        return read_stdin().await;
    }
    let read_error = |source| CmdError::ReadFile {
        path: path.to_owned(),
        source,
    };
    let file = tokio::fs::File::open(path).await.map_err(read_error)?;
    let bytes = read_limited(file, MAX_INPUT_BYTES)
        .await
        .map_err(read_error)?
        .ok_or_else(|| CmdError::FileTooLarge {
            path: path.to_owned(),
            limit: MAX_INPUT_BYTES,
        })?;
    into_string(bytes).ok_or_else(|| CmdError::NotUtf8 {
        path: path.to_owned(),
    })
}

/// Reads all of stdin (at most [`MAX_INPUT_BYTES`]) as UTF-8 into a buffer zeroed on drop.
async fn read_stdin() -> Result<Zeroizing<String>, CmdError> {
    let bytes = read_limited(tokio::io::stdin(), MAX_INPUT_BYTES)
        .await
        .map_err(CmdError::ReadStdin)?
        .ok_or(CmdError::StdinTooLarge {
            limit: MAX_INPUT_BYTES,
        })?;
    into_string(bytes).ok_or(CmdError::StdinNotUtf8)
}

/// Reads everything from `reader`; `None` when it holds more than `limit` bytes.
async fn read_limited<R>(reader: R, limit: u64) -> std::io::Result<Option<Zeroizing<Vec<u8>>>>
where
    R: tokio::io::AsyncRead + Unpin,
{
    // Room for a typical key up front, so the buffer rarely moves (and leaves a copy behind).
    let mut bytes = Zeroizing::new(Vec::with_capacity(16 * 1024));
    reader.take(limit + 1).read_to_end(&mut bytes).await?;
    let too_large = u64::try_from(bytes.len()).map_or(true, |length| length > limit);
    Ok(if too_large { None } else { Some(bytes) })
}

/// Moves zeroizing bytes into a zeroizing string without copying them.
fn into_string(mut bytes: Zeroizing<Vec<u8>>) -> Option<Zeroizing<String>> {
    match String::from_utf8(std::mem::take(&mut *bytes)) {
        Ok(text) => Some(Zeroizing::new(text)),
        Err(error) => {
            error.into_bytes().zeroize();
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn global_options_go_before_or_after_the_verb() {
        let before = Cli::try_parse_from([
            "berth",
            "--project",
            "team-a",
            "--output",
            "json",
            "--socket",
            "/tmp/b.sock",
            "ps",
        ])
        .unwrap();
        let after = Cli::try_parse_from([
            "berth",
            "ps",
            "--project",
            "team-a",
            "--output",
            "json",
            "--address",
            "/tmp/b.sock",
        ])
        .unwrap();
        for cli in [before, after] {
            assert_eq!(cli.global.project, "team-a");
            assert_eq!(cli.global.output, OutputFormat::Json);
            assert_eq!(cli.global.address, "/tmp/b.sock");
        }
        let nested =
            Cli::try_parse_from(["berth", "secret", "list", "--project", "team-b"]).unwrap();
        assert_eq!(nested.global.project, "team-b");
    }

    #[test]
    fn defaults() {
        let cli = Cli::try_parse_from(["berth", "ps"]).unwrap();
        assert_eq!(cli.global.project, "default");
        assert_eq!(cli.global.address, DEFAULT_ADDRESS);
        assert_eq!(cli.global.output, OutputFormat::Text);
    }

    #[test]
    fn verbs_parse() {
        let lines: &[&[&str]] = &[
            &[
                "secret",
                "docker",
                "create",
                "--name",
                "n",
                "--server",
                "s",
                "--username",
                "u",
                "--password",
                "p",
            ],
            &[
                "secret",
                "docker",
                "create",
                "--name",
                "n",
                "--server",
                "s",
                "--username",
                "u",
                "--password-stdin",
            ],
            &[
                "secret",
                "acr",
                "create",
                "--name",
                "n",
                "--server",
                "s",
                "--username",
                "u",
                "--password-stdin",
            ],
            &[
                "secret",
                "gar",
                "create",
                "--name",
                "n",
                "--server",
                "s",
                "--json_key",
                "k.json",
            ],
            &[
                "secret",
                "gar",
                "create",
                "--name",
                "n",
                "--server",
                "s",
                "--json-key",
                "-",
            ],
            &["secret", "docker", "import", "--config", "/x/config.json"],
            &["secret", "docker", "import"],
            &["secret", "list"],
            &["secret", "delete", "secret-1"],
            &["service", "create", "--file", "svc.yaml"],
            &[
                "service",
                "create",
                "--file",
                "svc.yaml",
                "--order-id",
                "o-1",
            ],
            &["ps"],
            &["get", "web"],
            &["logs", "web"],
            &["logs", "web", "-f"],
            &["stop", "web", "--timeout", "5"],
            &["rm", "web", "--force"],
            &[
                "pull",
                "registry.example.com/a/b:1",
                "--pull-secret",
                "secret-1",
            ],
        ];
        for line in lines {
            let args = std::iter::once("berth").chain(line.iter().copied());
            if let Err(error) = Cli::try_parse_from(args) {
                panic!("{line:?}: {error}");
            }
        }
    }

    #[test]
    fn password_flags_are_exclusive_and_one_is_required() {
        let base = [
            "berth",
            "secret",
            "docker",
            "create",
            "--name",
            "n",
            "--server",
            "s",
            "--username",
            "u",
        ];
        let neither = Cli::try_parse_from(base);
        assert_eq!(
            neither.unwrap_err().kind(),
            clap::error::ErrorKind::MissingRequiredArgument
        );
        let both = Cli::try_parse_from(base.iter().copied().chain([
            "--password",
            "p",
            "--password-stdin",
        ]));
        assert_eq!(
            both.unwrap_err().kind(),
            clap::error::ErrorKind::ArgumentConflict
        );
    }

    #[test]
    fn password_is_not_in_debug_output() {
        let cli = Cli::try_parse_from([
            "berth",
            "secret",
            "docker",
            "create",
            "--name",
            "n",
            "--server",
            "s",
            "--username",
            "u",
            "--password",
            "hunter2-very-secret",
        ])
        .unwrap();
        assert!(!format!("{cli:?}").contains("hunter2"));
    }

    #[test]
    fn status_errors_read_code_then_message() {
        let error = CmdError::from(tonic::Status::not_found("container web not found"));
        assert_eq!(error.describe(), "NOT_FOUND: container web not found");
        assert_eq!(error.exit_code(), 1);
        let bare = CmdError::from(tonic::Status::unavailable(""));
        assert_eq!(bare.describe(), "UNAVAILABLE");
    }

    #[test]
    fn describe_names_the_path_and_the_cause() {
        let error = CmdError::ReadFile {
            path: PathBuf::from("/nope/svc.yaml"),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        let line = error.describe();
        assert!(line.starts_with("reading /nope/svc.yaml: "), "{line}");
    }

    #[test]
    fn describe_prints_a_repeated_cause_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("tcp connect error")]
        struct Outer(#[source] std::io::Error);
        let error = CmdError::ReadStdin(std::io::Error::other(Outer(std::io::Error::other(
            "tcp connect error",
        ))));
        assert_eq!(error.describe(), "reading stdin: tcp connect error");
    }

    #[tokio::test]
    async fn read_limited_refuses_oversized_input() {
        let small: &[u8] = b"hello";
        let read = read_limited(small, 5).await.unwrap();
        assert_eq!(read.as_deref().map(Vec::as_slice), Some(&b"hello"[..]));
        let big: &[u8] = b"hello!";
        assert!(read_limited(big, 5).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn read_input_names_a_missing_file() {
        let path = Path::new("/nonexistent/berth-test/file.yaml");
        let error = read_input(path).await.err().unwrap();
        assert!(error
            .describe()
            .contains("/nonexistent/berth-test/file.yaml"));
    }

    #[tokio::test]
    async fn read_input_refuses_files_over_one_mebibyte() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.yaml");
        std::fs::write(&path, vec![b'a'; 1024 * 1024 + 1]).unwrap();
        let error = read_input(&path).await.err().unwrap();
        assert!(matches!(error, CmdError::FileTooLarge { .. }), "{error:?}");
        std::fs::write(&path, vec![b'a'; 1024 * 1024]).unwrap();
        assert_eq!(read_input(&path).await.unwrap().len(), 1024 * 1024);
    }
}
