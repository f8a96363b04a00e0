//! The OCI runtime spec of a container, built from the image config and the order alone.
//!
//! This module takes no credential or token type (it imports nothing from `secret` or `auth`), so
//! registry material cannot reach a container's spec. Only the image's `Entrypoint`, `Cmd`, `Env`,
//! `WorkingDir` and `User`, and the order's command, args and env, go in; image labels and other
//! metadata do not, and the spec carries no annotations.
//!
//! The base is `oci_spec::runtime::Spec::default()` with its defaults corrected to containerd's
//! `oci.WithDefaultSpec` (see containerd.md §5): writable root, the 14 default capabilities, a
//! device deny-all rule, the container id as hostname, and a `/run` tmpfs.

use std::collections::{BTreeMap, HashSet};

use oci_spec::image::ImageConfiguration;
use oci_spec::runtime::{
    Capability, LinuxBuilder, LinuxCapabilities, LinuxCapabilitiesBuilder,
    LinuxDeviceCgroupBuilder, LinuxNamespaceBuilder, LinuxNamespaceType, LinuxResourcesBuilder,
    Mount, MountBuilder, PosixRlimitBuilder, PosixRlimitType, ProcessBuilder, RootBuilder, Spec,
    User, UserBuilder,
};

/// Added when neither the image nor the order sets `PATH` (containerd's default).
const DEFAULT_PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// containerd's default capability set (Docker's), in bounding, effective and permitted.
const DEFAULT_CAPABILITIES: [Capability; 14] = [
    Capability::Chown,
    Capability::DacOverride,
    Capability::Fsetid,
    Capability::Fowner,
    Capability::Mknod,
    Capability::NetRaw,
    Capability::Setgid,
    Capability::Setuid,
    Capability::Setfcap,
    Capability::Setpcap,
    Capability::NetBindService,
    Capability::SysChroot,
    Capability::Kill,
    Capability::AuditWrite,
];

/// containerd's default masked paths.
const MASKED_PATHS: [&str; 11] = [
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// containerd's default read-only paths.
const READONLY_PATHS: [&str; 5] = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// Soft and hard `RLIMIT_NOFILE`.
const NOFILE_LIMIT: u64 = 1024;

/// What the spec is built from: the image config and the order, nothing else.
#[derive(Debug)]
pub struct SpecInput<'a> {
    /// Also the hostname and the last element of the cgroups path.
    pub container_id: &'a str,
    /// containerd namespace, for the cgroups path `/<namespace>/<container_id>`.
    pub namespace: &'a str,
    pub image_config: &'a ImageConfiguration,
    /// Replaces the image `Entrypoint`; with `args` empty the image `Cmd` is dropped too.
    pub command: &'a [String],
    /// Replaces the image `Cmd` (Kubernetes semantics).
    pub args: &'a [String],
    /// Added to the image `Env`; a key the image also sets takes the order's value.
    pub env: &'a BTreeMap<String, String>,
}

#[derive(thiserror::Error, Debug)]
pub enum SpecError {
    #[error("neither the order nor the image gives a command to run")]
    NoCommand,
    /// A user name (not `uid[:gid]`) would need the rootfs' `/etc/passwd`, which is not read yet.
    #[error("image user {user} is not numeric uid[:gid] or root")]
    User { user: String },
    #[error("building the runtime spec")]
    Build {
        #[source]
        source: oci_spec::OciSpecError,
    },
    #[error("encoding the runtime spec")]
    Encode {
        #[source]
        source: serde_json::Error,
    },
}

impl From<oci_spec::OciSpecError> for SpecError {
    fn from(source: oci_spec::OciSpecError) -> Self {
        SpecError::Build { source }
    }
}

/// Builds the runtime spec for one container.
pub fn build(input: &SpecInput<'_>) -> Result<Spec, SpecError> {
    let image = input.image_config.config().as_ref();
    let entrypoint = image
        .and_then(|config| config.entrypoint().as_deref())
        .unwrap_or_default();
    let cmd = image
        .and_then(|config| config.cmd().as_deref())
        .unwrap_or_default();
    let image_env = image
        .and_then(|config| config.env().as_deref())
        .unwrap_or_default();
    let working_dir = image
        .and_then(|config| config.working_dir().as_deref())
        .unwrap_or_default();
    let image_user = image
        .and_then(|config| config.user().as_deref())
        .unwrap_or_default();

    let args = process_args(entrypoint, cmd, input.command, input.args)?;
    let env = merge_env(image_env, input.env);
    let user = parse_user(image_user)?;
    let cwd = if working_dir.is_empty() {
        "/".to_owned()
    } else if working_dir.starts_with('/') {
        working_dir.to_owned()
    } else {
        format!("/{working_dir}")
    };

    let process = ProcessBuilder::default()
        .terminal(false)
        .user(user)
        .args(args)
        .env(env)
        .cwd(cwd)
        .capabilities(default_capabilities()?)
        .rlimits(vec![PosixRlimitBuilder::default()
            .typ(PosixRlimitType::RlimitNofile)
            .soft(NOFILE_LIMIT)
            .hard(NOFILE_LIMIT)
            .build()?])
        .no_new_privileges(true)
        .build()?;

    let resources = LinuxResourcesBuilder::default()
        .devices(vec![LinuxDeviceCgroupBuilder::default()
            .allow(false)
            .access("rwm")
            .build()?])
        .build()?;
    let namespaces = [
        LinuxNamespaceType::Pid,
        LinuxNamespaceType::Network,
        LinuxNamespaceType::Ipc,
        LinuxNamespaceType::Uts,
        LinuxNamespaceType::Mount,
        LinuxNamespaceType::Cgroup,
    ]
    .into_iter()
    .map(|typ| LinuxNamespaceBuilder::default().typ(typ).build())
    .collect::<Result<Vec<_>, _>>()?;
    let linux = LinuxBuilder::default()
        .resources(resources)
        .cgroups_path(format!("/{}/{}", input.namespace, input.container_id))
        .namespaces(namespaces)
        .masked_paths(MASKED_PATHS.map(str::to_owned).to_vec())
        .readonly_paths(READONLY_PATHS.map(str::to_owned).to_vec())
        .build()?;

    let mut spec = Spec::default();
    spec.set_root(Some(
        RootBuilder::default()
            .path("rootfs")
            .readonly(false)
            .build()?,
    ));
    spec.set_hostname(Some(input.container_id.to_owned()));
    spec.set_domainname(None);
    spec.set_mounts(Some(default_mounts()?));
    spec.set_process(Some(process));
    spec.set_linux(Some(linux));
    spec.set_annotations(None);
    spec.set_hooks(None);
    Ok(spec)
}

/// The spec as JSON, for containerd's `Container.spec` (`Any.value`).
pub fn to_json(spec: &Spec) -> Result<Vec<u8>, SpecError> {
    serde_json::to_vec(spec).map_err(|source| SpecError::Encode { source })
}

/// Kubernetes semantics: a command replaces `Entrypoint` and drops `Cmd`; args replace `Cmd`.
fn process_args(
    entrypoint: &[String],
    cmd: &[String],
    command: &[String],
    args: &[String],
) -> Result<Vec<String>, SpecError> {
    let (head, tail) = match (command.is_empty(), args.is_empty()) {
        (false, _) => (command, args),
        (true, false) => (entrypoint, args),
        (true, true) => (entrypoint, cmd),
    };
    let process_args: Vec<String> = head.iter().chain(tail).cloned().collect();
    if process_args.is_empty() {
        Err(SpecError::NoCommand)
    } else {
        Ok(process_args)
    }
}

/// The image `Env`, with the order's keys replacing the image's in place and new keys appended
/// (sorted); a default `PATH` first when neither sets one.
fn merge_env(image_env: &[String], order_env: &BTreeMap<String, String>) -> Vec<String> {
    let key_of = |entry: &str| {
        entry
            .split_once('=')
            .map_or(entry, |(key, _)| key)
            .to_owned()
    };
    let mut replaced = HashSet::new();
    let mut env: Vec<String> = image_env
        .iter()
        .map(|entry| {
            let key = key_of(entry);
            match order_env.get(&key) {
                Some(value) => {
                    let merged = format!("{key}={value}");
                    replaced.insert(key);
                    merged
                }
                None => entry.clone(),
            }
        })
        .collect();
    env.extend(
        order_env
            .iter()
            .filter(|(key, _)| !replaced.contains(key.as_str()))
            .map(|(key, value)| format!("{key}={value}")),
    );
    if !env.iter().any(|entry| key_of(entry) == "PATH") {
        env.insert(0, DEFAULT_PATH_ENV.to_owned());
    }
    env
}

/// `""` or `root` is 0:0; `uid` is uid:0; `uid:gid` is numeric. Names need the rootfs: refused.
fn parse_user(user: &str) -> Result<User, SpecError> {
    let refuse = || SpecError::User {
        user: user.to_owned(),
    };
    let parse_id = |id: &str| -> Result<u32, SpecError> {
        if id.is_empty() || !id.bytes().all(|byte| byte.is_ascii_digit()) {
            return Err(refuse());
        }
        id.parse().map_err(|_| refuse())
    };
    let (uid, gid) = match user {
        "" | "root" => (0, 0),
        _ => match user.split_once(':') {
            Some((uid, gid)) => (parse_id(uid)?, parse_id(gid)?),
            None => (parse_id(user)?, 0),
        },
    };
    Ok(UserBuilder::default().uid(uid).gid(gid).build()?)
}

/// The 14 default capabilities in bounding, effective and permitted; none inheritable or ambient.
fn default_capabilities() -> Result<LinuxCapabilities, SpecError> {
    let set: HashSet<Capability> = DEFAULT_CAPABILITIES.into_iter().collect();
    let mut capabilities = LinuxCapabilitiesBuilder::default()
        .bounding(set.clone())
        .effective(set.clone())
        .permitted(set)
        .build()?;
    // The builder starts from oci-spec's default, which fills these two; containerd leaves them empty.
    capabilities.set_inheritable(None);
    capabilities.set_ambient(None);
    Ok(capabilities)
}

/// containerd's default mounts, plus `/sys/fs/cgroup` (read-only).
fn default_mounts() -> Result<Vec<Mount>, SpecError> {
    let mount = |destination: &str, typ: &str, source: &str, options: &[&str]| {
        MountBuilder::default()
            .destination(destination)
            .typ(typ)
            .source(source)
            .options(
                options
                    .iter()
                    .map(|option| (*option).to_owned())
                    .collect::<Vec<_>>(),
            )
            .build()
    };
    Ok(vec![
        mount("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"])?,
        mount(
            "/dev",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        )?,
        mount(
            "/dev/pts",
            "devpts",
            "devpts",
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
                "gid=5",
            ],
        )?,
        mount(
            "/dev/shm",
            "tmpfs",
            "shm",
            &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        )?,
        mount(
            "/dev/mqueue",
            "mqueue",
            "mqueue",
            &["nosuid", "noexec", "nodev"],
        )?,
        mount(
            "/sys",
            "sysfs",
            "sysfs",
            &["nosuid", "noexec", "nodev", "ro"],
        )?,
        mount(
            "/sys/fs/cgroup",
            "cgroup",
            "cgroup",
            &["nosuid", "noexec", "nodev", "relatime", "ro"],
        )?,
        mount(
            "/run",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        )?,
    ])
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::path::Path;

    use oci_spec::image::{ConfigBuilder, ImageConfigurationBuilder};

    use super::*;

    fn strings(values: &[&str]) -> Vec<String> {
        values.iter().map(|value| (*value).to_owned()).collect()
    }

    fn image(entrypoint: &[&str], cmd: &[&str], env: &[&str]) -> ImageConfiguration {
        let mut config = ConfigBuilder::default();
        if !entrypoint.is_empty() {
            config = config.entrypoint(strings(entrypoint));
        }
        if !cmd.is_empty() {
            config = config.cmd(strings(cmd));
        }
        if !env.is_empty() {
            config = config.env(strings(env));
        }
        ImageConfigurationBuilder::default()
            .config(config.build().unwrap())
            .build()
            .unwrap()
    }

    fn build_with(
        image_config: &ImageConfiguration,
        command: &[&str],
        args: &[&str],
        env: &BTreeMap<String, String>,
    ) -> Result<Spec, SpecError> {
        let command = strings(command);
        let args = strings(args);
        build(&SpecInput {
            container_id: "ctr-1",
            namespace: "berth",
            image_config,
            command: &command,
            args: &args,
            env,
        })
    }

    fn process(spec: &Spec) -> &oci_spec::runtime::Process {
        spec.process().as_ref().unwrap()
    }

    #[test]
    fn command_and_args_follow_kubernetes() {
        // https://kubernetes.io/docs/tasks/inject-data-application/define-command-argument-container/
        let config = image(&["/ep-1"], &["foo", "bar"], &[]);
        let env = BTreeMap::new();
        let table: [(&[&str], &[&str], &[&str]); 4] = [
            (&[], &[], &["/ep-1", "foo", "bar"]),
            (&["/ep-2"], &[], &["/ep-2"]),
            (&[], &["zoo", "boo"], &["/ep-1", "zoo", "boo"]),
            (&["/ep-2"], &["zoo", "boo"], &["/ep-2", "zoo", "boo"]),
        ];
        for (command, args, expected) in table {
            let spec = build_with(&config, command, args, &env).unwrap();
            assert_eq!(
                process(&spec).args().as_deref(),
                Some(strings(expected).as_slice()),
                "command {command:?} args {args:?}"
            );
        }

        // Image with Cmd only (busybox): args replace it; a command replaces it too.
        let busybox = image(&[], &["sh"], &[]);
        let spec = build_with(&busybox, &[], &[], &env).unwrap();
        assert_eq!(
            process(&spec).args().as_deref(),
            Some(strings(&["sh"]).as_slice())
        );
        let spec = build_with(&busybox, &[], &["echo", "hi"], &env).unwrap();
        assert_eq!(
            process(&spec).args().as_deref(),
            Some(strings(&["echo", "hi"]).as_slice())
        );
        let spec = build_with(&busybox, &["/bin/true"], &[], &env).unwrap();
        assert_eq!(
            process(&spec).args().as_deref(),
            Some(strings(&["/bin/true"]).as_slice())
        );

        // Nothing to run at all.
        let empty = image(&[], &[], &[]);
        assert!(matches!(
            build_with(&empty, &[], &[], &env),
            Err(SpecError::NoCommand)
        ));
        // Entrypoint only: a command with args replaces it; Cmd absent is fine.
        let entry_only = image(&["/ep"], &[], &[]);
        let spec = build_with(&entry_only, &[], &[], &env).unwrap();
        assert_eq!(
            process(&spec).args().as_deref(),
            Some(strings(&["/ep"]).as_slice())
        );
        // No config section at all.
        let bare = ImageConfiguration::default();
        assert!(matches!(
            build_with(&bare, &[], &[], &env),
            Err(SpecError::NoCommand)
        ));
        let spec = build_with(&bare, &["/x"], &[], &env).unwrap();
        assert_eq!(
            process(&spec).args().as_deref(),
            Some(strings(&["/x"]).as_slice())
        );
    }

    #[test]
    fn env_merges_and_defaults_path() {
        let config = image(&["/ep"], &[], &["A=image", "B=image", "EMPTY=", "NOEQ"]);
        let env: BTreeMap<String, String> = [("B", "order"), ("C", "new"), ("A", "x=y")]
            .into_iter()
            .map(|(key, value)| (key.to_owned(), value.to_owned()))
            .collect();
        let spec = build_with(&config, &[], &[], &env).unwrap();
        assert_eq!(
            process(&spec).env().as_deref(),
            Some(
                strings(&[
                    DEFAULT_PATH_ENV,
                    "A=x=y",
                    "B=order",
                    "EMPTY=",
                    "NOEQ",
                    "C=new"
                ])
                .as_slice()
            )
        );

        // The image's PATH is kept, and no default is added.
        let with_path = image(&["/ep"], &[], &["PATH=/opt/bin", "HOME=/root"]);
        let spec = build_with(&with_path, &[], &[], &BTreeMap::new()).unwrap();
        assert_eq!(
            process(&spec).env().as_deref(),
            Some(strings(&["PATH=/opt/bin", "HOME=/root"]).as_slice())
        );

        // The order's PATH replaces the image's.
        let order_path = BTreeMap::from([("PATH".to_owned(), "/custom".to_owned())]);
        let spec = build_with(&with_path, &[], &[], &order_path).unwrap();
        assert_eq!(
            process(&spec).env().as_deref(),
            Some(strings(&["PATH=/custom", "HOME=/root"]).as_slice())
        );

        // Nothing from oci-spec's default env (TERM=xterm) leaks in.
        let spec = build_with(&image(&["/ep"], &[], &[]), &[], &[], &BTreeMap::new()).unwrap();
        assert_eq!(
            process(&spec).env().as_deref(),
            Some(strings(&[DEFAULT_PATH_ENV]).as_slice())
        );
    }

    #[test]
    fn user_parsing() {
        for (input, uid, gid) in [
            ("", 0, 0),
            ("root", 0, 0),
            ("0", 0, 0),
            ("1000", 1000, 0),
            ("1000:1001", 1000, 1001),
            ("65534:65534", 65534, 65534),
            ("4294967295:0", u32::MAX, 0),
        ] {
            let user = parse_user(input).unwrap();
            assert_eq!((user.uid(), user.gid()), (uid, gid), "{input:?}");
        }
        for input in [
            "nobody",
            "root:root",
            "1000:staff",
            "app:1000",
            ":1000",
            "1000:",
            "-1",
            "+1",
            "4294967296",
            "1000:1000:1000",
            " 1000",
        ] {
            assert!(
                matches!(parse_user(input), Err(SpecError::User { user }) if user == input),
                "{input:?}"
            );
        }

        let config = ImageConfigurationBuilder::default()
            .config(
                ConfigBuilder::default()
                    .cmd(strings(&["/app"]))
                    .user("1000:2000")
                    .working_dir("/srv")
                    .build()
                    .unwrap(),
            )
            .build()
            .unwrap();
        let spec = build_with(&config, &[], &[], &BTreeMap::new()).unwrap();
        assert_eq!(process(&spec).user().uid(), 1000);
        assert_eq!(process(&spec).user().gid(), 2000);
        assert_eq!(process(&spec).cwd(), Path::new("/srv"));
    }

    #[test]
    fn containerd_defaults() {
        let spec = build_with(&image(&["/ep"], &[], &[]), &[], &[], &BTreeMap::new()).unwrap();

        let root = spec.root().as_ref().unwrap();
        assert_eq!(root.path(), Path::new("rootfs"));
        assert_eq!(root.readonly(), Some(false));
        assert_eq!(spec.hostname().as_deref(), Some("ctr-1"));
        assert!(spec.annotations().is_none());
        assert!(spec.hooks().is_none());

        let process = process(&spec);
        assert_eq!(process.cwd(), Path::new("/"));
        assert_eq!((process.user().uid(), process.user().gid()), (0, 0));
        assert_eq!(process.terminal(), Some(false));
        assert_eq!(process.no_new_privileges(), Some(true));
        let rlimits = process.rlimits().as_ref().unwrap();
        assert_eq!(rlimits.len(), 1);
        assert_eq!(rlimits[0].typ(), PosixRlimitType::RlimitNofile);
        assert_eq!((rlimits[0].soft(), rlimits[0].hard()), (1024, 1024));

        let capabilities = process.capabilities().as_ref().unwrap();
        let expected: HashSet<Capability> = DEFAULT_CAPABILITIES.into_iter().collect();
        assert_eq!(expected.len(), 14);
        assert_eq!(capabilities.bounding().as_ref(), Some(&expected));
        assert_eq!(capabilities.effective().as_ref(), Some(&expected));
        assert_eq!(capabilities.permitted().as_ref(), Some(&expected));
        assert!(capabilities
            .inheritable()
            .as_ref()
            .is_none_or(HashSet::is_empty));
        assert!(capabilities
            .ambient()
            .as_ref()
            .is_none_or(HashSet::is_empty));
        assert!(!expected.contains(&Capability::SysAdmin));

        let linux = spec.linux().as_ref().unwrap();
        assert_eq!(
            linux.cgroups_path().as_deref(),
            Some(Path::new("/berth/ctr-1"))
        );
        let devices = linux
            .resources()
            .as_ref()
            .unwrap()
            .devices()
            .as_ref()
            .unwrap();
        assert_eq!(devices.len(), 1);
        assert!(!devices[0].allow());
        assert_eq!(devices[0].access().as_deref(), Some("rwm"));
        let namespaces: Vec<LinuxNamespaceType> = linux
            .namespaces()
            .as_ref()
            .unwrap()
            .iter()
            .map(|namespace| namespace.typ())
            .collect();
        for wanted in [
            LinuxNamespaceType::Pid,
            LinuxNamespaceType::Network,
            LinuxNamespaceType::Ipc,
            LinuxNamespaceType::Uts,
            LinuxNamespaceType::Mount,
        ] {
            assert!(namespaces.contains(&wanted), "{wanted:?}");
        }
        assert!(!namespaces.contains(&LinuxNamespaceType::User));
        assert!(linux
            .masked_paths()
            .as_ref()
            .unwrap()
            .contains(&"/proc/kcore".to_owned()));
        assert!(linux
            .readonly_paths()
            .as_ref()
            .unwrap()
            .contains(&"/proc/sys".to_owned()));

        let mounts = spec.mounts().as_ref().unwrap();
        let destinations: Vec<&Path> = mounts
            .iter()
            .map(|mount| mount.destination().as_path())
            .collect();
        assert_eq!(
            destinations,
            [
                "/proc",
                "/dev",
                "/dev/pts",
                "/dev/shm",
                "/dev/mqueue",
                "/sys",
                "/sys/fs/cgroup",
                "/run"
            ]
            .map(Path::new)
        );
        for read_only in ["/sys", "/sys/fs/cgroup"] {
            let mount = mounts
                .iter()
                .find(|mount| mount.destination() == Path::new(read_only))
                .unwrap();
            assert!(
                mount.options().as_ref().unwrap().contains(&"ro".to_owned()),
                "{read_only}"
            );
        }
        let run = mounts
            .iter()
            .find(|mount| mount.destination() == Path::new("/run"))
            .unwrap();
        assert_eq!(run.typ().as_deref(), Some("tmpfs"));
    }

    #[test]
    fn relative_working_dir_is_made_absolute() {
        let config = ImageConfigurationBuilder::default()
            .config(
                ConfigBuilder::default()
                    .cmd(strings(&["/app"]))
                    .working_dir("app")
                    .build()
                    .unwrap(),
            )
            .build()
            .unwrap();
        let spec = build_with(&config, &[], &[], &BTreeMap::new()).unwrap();
        assert_eq!(process(&spec).cwd(), Path::new("/app"));
    }

    #[test]
    fn json_round_trips_and_carries_only_inputs() {
        let marker = "MARKER-not-for-the-spec";
        let labels: HashMap<String, String> = [
            ("org.example.secret".to_owned(), marker.to_owned()),
            (marker.to_owned(), "value".to_owned()),
        ]
        .into_iter()
        .collect();
        let config = ImageConfigurationBuilder::default()
            .author(marker)
            .config(
                ConfigBuilder::default()
                    .entrypoint(strings(&["/ep"]))
                    .cmd(strings(&["serve"]))
                    .env(strings(&["IMAGE_ENV=1"]))
                    .labels(labels)
                    .stop_signal(marker)
                    .volumes(strings(&[marker]))
                    .exposed_ports(strings(&[marker]))
                    .build()
                    .unwrap(),
            )
            .build()
            .unwrap();
        let env = BTreeMap::from([("ORDER_ENV".to_owned(), "2".to_owned())]);
        let spec = build_with(&config, &[], &[], &env).unwrap();
        let json = to_json(&spec).unwrap();
        let text = String::from_utf8(json.clone()).unwrap();
        assert!(!text.contains(marker), "{text}");
        assert!(!text.contains("annotations"), "{text}");
        assert!(!text.contains("youki"), "{text}");
        assert!(!text.contains("TERM="), "{text}");
        assert!(text.contains("IMAGE_ENV=1"));
        assert!(text.contains("ORDER_ENV=2"));
        assert!(text.contains("CAP_CHOWN"));
        assert!(text.contains("\"cgroupsPath\":\"/berth/ctr-1\""));

        let decoded: Spec = serde_json::from_slice(&json).unwrap();
        assert_eq!(decoded, spec);

        // Only the fields this module sets appear at the top level.
        let value: serde_json::Value = serde_json::from_slice(&json).unwrap();
        let top_level: Vec<&str> = value
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let mut sorted = top_level.clone();
        sorted.sort_unstable();
        assert_eq!(
            sorted,
            [
                "hostname",
                "linux",
                "mounts",
                "ociVersion",
                "process",
                "root"
            ]
        );
    }

    #[test]
    fn error_messages() {
        assert_eq!(
            SpecError::User {
                user: "nobody".to_owned()
            }
            .to_string(),
            "image user nobody is not numeric uid[:gid] or root"
        );
        assert!(!SpecError::NoCommand.to_string().is_empty());
    }
}
