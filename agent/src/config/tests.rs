//! The config's parsing, defaults and validation.

use super::*;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new("test.toml"))
}

#[test]
fn empty_file_gives_contract_defaults() {
    let config = parse("").unwrap();
    assert_eq!(
        config.listen_addr().unwrap(),
        ListenAddr::Unix(PathBuf::from("/run/berth/berthd.sock"))
    );
    assert_eq!(config.state_dir, PathBuf::from("/var/lib/berth"));
    assert_eq!(config.containerd.namespace, "berth");
    assert_eq!(config.containerd.snapshotter, "overlayfs");
    assert!(config.containerd.keep_layer_blobs);
    assert_eq!(config.secrets.backend, SecretsBackend::File);
    assert_eq!(config.registry.max_concurrent_downloads, 4);
    assert_eq!(config.registry.retries, 5);
    assert_eq!(config.security.access_check_ttl_seconds, 300);
}

#[test]
fn unknown_key_is_refused_with_its_name_and_line() {
    let err = parse("state_dir = \"/x\"\n[registry]\nplain_htp = []\n").unwrap_err();
    let text = err.to_string();
    assert!(text.contains("plain_htp"), "{text}");
    assert!(text.contains("line 3"), "{text}");
}

#[test]
fn wrong_type_names_the_key() {
    let err = parse("[registry]\nretries = \"five\"\n").unwrap_err();
    let text = err.to_string();
    assert!(text.contains("retries"), "{text}");
    assert!(text.contains("line 2"), "{text}");
}

#[test]
fn tcp_listen_requires_mtls_files() {
    let err = parse("listen = \"tcp://127.0.0.1:7443\"\n").unwrap_err();
    assert!(err.to_string().contains("tls_client_ca"), "{err}");
    let ok = parse(
        "listen = \"tcp://127.0.0.1:7443\"\ntls_cert = \"c\"\ntls_key = \"k\"\ntls_client_ca = \"ca\"\n",
    )
    .unwrap();
    assert!(matches!(ok.listen_addr().unwrap(), ListenAddr::Tcp(_)));
}

#[test]
fn mirrors_and_access_parse() {
    let config = parse(
        "[[registry.mirror]]\nupstream = \"docker.io\"\nendpoint = \"https://m:5000\"\n\n[[access]]\nidentity = \"s\"\nprojects = [\"a\"]\n",
    )
    .unwrap();
    assert_eq!(config.registry.mirror.len(), 1);
    assert!(!config.registry.mirror[0].credentials);
    assert_eq!(config.access[0].projects, vec!["a".to_owned()]);
}

#[test]
fn mirror_entries_are_validated() {
    let mirror = |upstream: &str, endpoint: &str| {
        format!("[[registry.mirror]]\nupstream = \"{upstream}\"\nendpoint = \"{endpoint}\"\n")
    };
    parse(&mirror("docker.io", "http://127.0.0.1:5001")).unwrap();
    parse(&mirror("r.example:5000", "https://harbor.example/proxy")).unwrap();
    for (text, needle) in [
        (
            mirror("docker.io", "mirror.example:5000"),
            "http:// or https://",
        ),
        (
            mirror("docker.io", "ftp://m.example"),
            "http:// or https://",
        ),
        (mirror("docker.io", "https://u:p@m.example"), "user"),
        (mirror("docker.io", "https://m.example/v2"), "prefix"),
        (mirror("", "https://m.example"), "upstream"),
        (
            format!(
                "{}{}",
                mirror("docker.io", "https://m.example"),
                mirror("index.docker.io", "https://m.example/")
            ),
            "already a mirror of docker.io",
        ),
    ] {
        let err = parse(&text).unwrap_err();
        let message = err.to_string();
        assert!(message.contains("registry.mirror"), "{text}: {message}");
        assert!(message.contains(needle), "{text}: {message}");
    }
    parse("[[registry.mirror]]\nupstream = \"docker.io\"\n").unwrap_err();
}

#[test]
fn openbao_needs_exactly_one_way_to_log_in() {
    let section =
        |body: &str| format!("[secrets]\nbackend = \"openbao\"\n[secrets.openbao]\n{body}");
    let token = parse(&section("token_file = \"/etc/berth/bao-token\"\n")).unwrap();
    assert_eq!(token.secrets.backend, SecretsBackend::Openbao);
    assert_eq!(token.secrets.openbao.mount, "secret");
    assert_eq!(token.secrets.openbao.prefix, "berth");
    parse(&section(
        "address = \"http://127.0.0.1:8200\"\nrole_id_file = \"/r\"\nsecret_id_file = \"/s\"\nprefix = \"fleet/berth\"\n",
    ))
    .unwrap();

    for (body, needle) in [
        ("", "token_file"),
        (
            "token_file = \"/t\"\nrole_id_file = \"/r\"\nsecret_id_file = \"/s\"\n",
            "not both",
        ),
        ("token_file = \"/t\"\nsecret_id_file = \"/s\"\n", "not both"),
        ("role_id_file = \"/r\"\n", "both"),
        ("secret_id_file = \"/s\"\n", "both"),
    ] {
        let err = parse(&section(body)).unwrap_err();
        assert!(err.to_string().contains(needle), "{body:?}: {err}");
    }
    // The openbao section is not checked while the file backend is in use.
    parse("[secrets.openbao]\naddress = \"ftp://x\"\n").unwrap();
}

#[test]
fn openbao_address_mount_and_prefix_are_checked() {
    let with = |line: &str| {
        parse(&format!(
            "[secrets]\nbackend = \"openbao\"\n[secrets.openbao]\ntoken_file = \"/t\"\n{line}\n"
        ))
    };
    for good in [
        "address = \"https://bao.example:8200\"",
        "address = \"http://127.0.0.1:8200/\"",
        "mount = \"kv/berth\"",
        "prefix = \"fleet.v1/berth_a-b\"",
    ] {
        with(good).unwrap();
    }
    for (bad, key) in [
        ("address = \"ftp://bao.example\"", "address"),
        ("address = \"bao.example:8200\"", "address"),
        ("address = \"https://bao.example/v1\"", "address"),
        ("address = \"https://u:p@bao.example\"", "address"),
        ("address = \"https://bao.example?x=1\"", "address"),
        ("mount = \"\"", "mount"),
        ("mount = \"/secret\"", "mount"),
        ("prefix = \"berth/\"", "prefix"),
        ("prefix = \"../x\"", "prefix"),
        ("prefix = \"a b\"", "prefix"),
    ] {
        let err = with(bad).unwrap_err();
        assert!(
            err.to_string().contains(&format!("secrets.openbao.{key}")),
            "{bad}: {err}"
        );
    }
}

#[test]
fn host_protection_keys_default_and_parse() {
    let config = parse("").unwrap();
    assert_eq!(config.registry.stall_timeout_seconds, 60);
    assert_eq!(config.registry.max_concurrent_pulls, 0);
    assert_eq!(config.registry.max_bytes_per_second, 0);
    assert!(!config.gc.enabled);
    assert_eq!(config.gc.path, PathBuf::from("/var/lib/containerd"));
    assert_eq!((config.gc.high_percent, config.gc.low_percent), (85, 80));
    assert_eq!(config.gc.min_age_seconds, 300);
    assert_eq!(config.gc.interval_seconds, 60);
    assert!(config.gc.pinned.is_empty());
    let config = parse(
        "[registry]\nstall_timeout_seconds = 0\nmax_concurrent_pulls = 2\nmax_bytes_per_second = 4194304\n\
         [gc]\nenabled = true\npath = \"/srv/containerd\"\nhigh_percent = 90\nlow_percent = 70\n\
         pinned = [\"registry.example.com/base/**\"]\n",
    )
    .unwrap();
    assert_eq!(config.registry.stall_timeout_seconds, 0);
    assert_eq!(config.registry.max_concurrent_pulls, 2);
    assert_eq!(config.registry.max_bytes_per_second, 4 << 20);
    assert!(config.gc.enabled);
    assert_eq!(config.gc.pinned, ["registry.example.com/base/**"]);
}

#[test]
fn the_example_config_parses_to_the_defaults() {
    let example = parse(include_str!("../../../config/berthd.toml")).unwrap();
    let defaults = parse("").unwrap();
    assert_eq!(format!("{example:?}"), format!("{defaults:?}"));
}

#[test]
fn gc_watermarks_are_checked_naming_the_key() {
    for (body, key) in [
        ("high_percent = 80\nlow_percent = 80\n", "gc.low_percent"),
        ("high_percent = 50\nlow_percent = 60\n", "gc.low_percent"),
        ("high_percent = 101\n", "gc.high_percent"),
        ("high_percent = 0\nlow_percent = 0\n", "gc.high_percent"),
        ("interval_seconds = 0\n", "gc.interval_seconds"),
        ("path = \"var/lib/containerd\"\n", "gc.path"),
        ("pinned = [\"\"]\n", "gc.pinned"),
    ] {
        let err = parse(&format!("[gc]\n{body}")).unwrap_err();
        assert!(err.to_string().contains(key), "{body:?}: {err}");
    }
    parse("[gc]\nhigh_percent = 100\nlow_percent = 0\n").unwrap();
    // A percentage past 255 does not fit the type: a parse error naming the key.
    let err = parse("[gc]\nhigh_percent = 300\n").unwrap_err();
    assert!(err.to_string().contains("high_percent"), "{err}");
}

#[test]
fn relative_state_dir_is_refused() {
    parse("state_dir = \"var/lib\"\n").unwrap_err();
}

#[test]
fn config_refuses_notation_keyless_cosign_and_bad_patterns() {
    let parse = |text: &str| Config::parse(text, Path::new("t.toml"));
    for (text, needle) in [
        (
            "[[policy]]\nimages = [\"r/**\"]\nverify = \"notation\"\n",
            "policy.verify",
        ),
        ("[[policy]]\nimages = [\"r/**\"]\nverify = \"cosign\"\n", "policy.keys"),
        ("[[policy]]\nimages = []\nverify = \"none\"\n", "policy.images"),
        (
            "[[policy]]\nimages = [\"r/***\"]\nverify = \"none\"\n",
            "policy.images",
        ),
        (
            "[[policy]]\nimages = [\"r/**\"]\nverify = \"cosign\"\nkeys = [\"/k\"]\ntrust_store = \"/t\"\n",
            "policy.trust_store",
        ),
    ] {
        let err = parse(text).unwrap_err().to_string();
        assert!(err.contains(needle), "{text}: {err}");
    }
    let err = parse("[[policy]]\nimages = [\"r/**\"]\nverify = \"sigstore\"\n").unwrap_err();
    assert!(err.to_string().contains("verify"), "{err}");
}
