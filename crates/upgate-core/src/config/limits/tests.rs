//! Tests of `server.limits`: the URL checked when read and never shown with its password,
//! `fault_tolerant` and its default, unknown fields refused where they are.

use std::path::Path;

use super::RedisUrl;
use crate::config::Config;

/// A whole config whose `server.limits` block holds `body` (indented under it).
fn config_with(body: &str) -> String {
    format!(
        "server:\n  limits:\n{body}plans:\n  free:\n    max_file_size: 1MiB\n\
         providers:\n  disk: {{ plugin: local }}\ntenants:\n  demo:\n    plan: free\n    provider: disk\n    keys: [k]\n"
    )
}

fn with_url(url: &str) -> String {
    config_with(&format!("    url: \"{url}\"\n"))
}

fn parse(text: &str) -> Result<Config, String> {
    Config::parse(text, Path::new("/etc/upgate/config.yaml")).map_err(|errors| {
        errors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    })
}

#[test]
fn the_url_is_shown_without_its_password() {
    for (url, shown) in [
        (
            "redis://:hunter2@cache.internal:6380/2",
            "redis://:***@cache.internal:6380/2",
        ),
        (
            "redis://upgate:hunter2@cache.internal",
            "redis://upgate:***@cache.internal:6379",
        ),
        ("redis://10.0.0.5:6379", "redis://10.0.0.5:6379"),
        ("redis://[::1]:7000/0", "redis://[::1]:7000"),
        ("redis://u@h/1", "redis://u@h:6379/1"),
        (
            "rediss://:hunter2@cache.internal/1",
            "rediss://:***@cache.internal:6379/1",
        ),
        (
            "redis+unix:///run/redis.sock?db=3&pass=hunter2",
            "redis+unix:///run/redis.sock?db=3&pass=***",
        ),
    ] {
        let parsed = RedisUrl::parse(url).unwrap_or_else(|error| panic!("{url}: {error}"));
        assert_eq!(parsed.to_string(), shown, "{url}");
        assert_eq!(format!("{parsed:?}"), format!("RedisUrl(\"{shown}\")"));
        assert_eq!(parsed.expose(), url);
    }
}

#[test]
fn a_config_with_limits_reads_them_and_its_debug_hides_the_password() {
    let config = parse(&config_with(
        "    url: redis://:hunter2@127.0.0.1:6379/1\n    fault_tolerant: false\n",
    ))
    .unwrap();
    let limits = config.server.limits.as_ref().unwrap();
    assert_eq!(limits.url.expose(), "redis://:hunter2@127.0.0.1:6379/1");
    assert!(!limits.fault_tolerant);
    let debug = format!("{config:?}");
    assert!(debug.contains("redis://:***@127.0.0.1:6379/1"), "{debug}");
    assert!(!debug.contains("hunter2"), "{debug}");
    // fault_tolerant defaults to true; absent: limits in process.
    let config = parse(&with_url("redis://127.0.0.1")).unwrap();
    assert!(config.server.limits.unwrap().fault_tolerant);
    let local = with_url("x").replace("  limits:\n    url: \"x\"\n", "");
    assert!(parse(&local).unwrap().server.limits.is_none());
}

#[test]
fn the_url_takes_env_references() {
    // cargo sets CARGO_PKG_NAME for the test process.
    let config = parse(&with_url("redis://:${CARGO_PKG_NAME}@h:1/0")).unwrap();
    let url = &config.server.limits.unwrap().url;
    assert_eq!(url.expose(), "redis://:upgate-core@h:1/0");
    assert_eq!(url.to_string(), "redis://:***@h:1");
}

#[test]
fn bad_limits_are_refused_where_they_are_and_without_repeating_the_url() {
    for (url, expected) in [
        ("postgres://u:hunter2@h/db", "unsupported scheme `postgres`"),
        (
            "rediss://:hunter2@h/#insecure",
            "the server's certificate is always verified",
        ),
        ("hunter2", "not a URL"),
        ("redis://:hunter2@h:notaport", "not a valid Redis URL"),
        ("redis://:hunter2@h/notadb", "Invalid database number"),
        ("redis://:hunter2${@h", "an unterminated `${`"),
        (
            "redis://:${UPGATE_TEST_UNSET_PASSWORD}@h",
            "UPGATE_TEST_UNSET_PASSWORD is not set",
        ),
    ] {
        let error = parse(&with_url(url)).unwrap_err();
        assert!(error.starts_with("/etc/upgate/config.yaml:3:"), "{url}: {error}");
        assert!(error.contains(expected), "{url}: {error}");
        assert!(!error.contains("hunter2"), "{url}: {error}");
    }
    let unknown = config_with("    url: redis://h\n    pool_size: 3\n");
    let error = parse(&unknown).unwrap_err();
    assert!(
        error.starts_with("/etc/upgate/config.yaml:4:") && error.contains("unknown field `pool_size`"),
        "{error}"
    );
    let not_bool = config_with("    url: redis://h\n    fault_tolerant: maybe\n");
    let error = parse(&not_bool).unwrap_err();
    assert!(
        error.contains("fault_tolerant") || error.contains("boolean"),
        "{error}"
    );
    let no_url = config_with("    fault_tolerant: true\n");
    assert!(parse(&no_url).unwrap_err().contains("missing field `url`"));
}

#[test]
fn a_ca_file_goes_with_a_tls_url_and_follows_the_config_file() {
    let config = parse(&config_with(
        "    url: rediss://cache.internal:6380\n    ca_file: tls/redis-ca.pem\n",
    ))
    .unwrap();
    let limits = config.server.limits.unwrap();
    assert!(limits.url.is_tls());
    assert_eq!(
        limits.ca_file.as_deref(),
        Some(Path::new("/etc/upgate/tls/redis-ca.pem"))
    );
    let error = parse(&config_with(
        "    url: redis://cache.internal\n    ca_file: /etc/ca.pem\n",
    ))
    .unwrap_err();
    assert!(
        error.starts_with("/etc/upgate/config.yaml:4:") && error.contains("only with a rediss://"),
        "{error}"
    );
}
