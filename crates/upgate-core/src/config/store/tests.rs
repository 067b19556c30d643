//! Tests of `server.store`: the URL checked when read, and never shown with its password.

use std::path::Path;

use super::{PostgresTls, PostgresUrl};
use crate::config::Config;

/// A whole config whose `server.store.url` is `url`.
fn config_with(url: &str) -> String {
    format!(
        "server:\n  store:\n    url: \"{url}\"\nplans:\n  free:\n    max_file_size: 1MiB\n\
         providers:\n  disk: {{ plugin: local }}\ntenants:\n  demo:\n    plan: free\n    provider: disk\n    keys: [k]\n"
    )
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
    let url = PostgresUrl::parse("postgres://upgate:hunter2@db.internal:5433/uploads").unwrap();
    assert_eq!(url.to_string(), "postgres://upgate:***@db.internal:5433/uploads");
    assert_eq!(
        format!("{url:?}"),
        "PostgresUrl(\"postgres://upgate:***@db.internal:5433/uploads\")"
    );
    assert_eq!(url.expose(), "postgres://upgate:hunter2@db.internal:5433/uploads");
    // A password in a parameter, several hosts, a user without a password.
    let url = PostgresUrl::parse("postgresql://u@a:1,b:2/db?password=hunter2&connect_timeout=3").unwrap();
    assert_eq!(url.to_string(), "postgresql://u:***@a:1,b:2/db");
    let url = PostgresUrl::parse("postgres://u@h/db").unwrap();
    assert_eq!(url.to_string(), "postgres://u@h:5432/db");
}

#[test]
fn a_config_with_a_store_reads_it_and_its_debug_hides_the_password() {
    let config = parse(&config_with("postgres://upgate:hunter2@127.0.0.1:5432/upgate")).unwrap();
    let store = config.server.store.as_ref().unwrap();
    assert_eq!(
        store.url.expose(),
        "postgres://upgate:hunter2@127.0.0.1:5432/upgate"
    );
    let debug = format!("{config:?}");
    assert!(
        debug.contains("postgres://upgate:***@127.0.0.1:5432/upgate"),
        "{debug}"
    );
    assert!(!debug.contains("hunter2"), "{debug}");
    // Absent: SQLite in data_dir.
    let sqlite = config_with("x").replace("  store:\n    url: \"x\"\n", "");
    assert!(parse(&sqlite).unwrap().server.store.is_none());
}

#[test]
fn the_url_takes_env_references() {
    // cargo sets CARGO_PKG_NAME for the test process.
    let config = parse(&config_with("postgres://u:${CARGO_PKG_NAME}@h:1/db")).unwrap();
    let url = &config.server.store.unwrap().url;
    assert_eq!(url.expose(), "postgres://u:upgate-core@h:1/db");
    assert_eq!(url.to_string(), "postgres://u:***@h:1/db");
}

#[test]
fn bad_urls_are_refused_where_they_are_and_without_repeating_them() {
    for (url, expected) in [
        ("mysql://u:hunter2@h/db", "unsupported scheme `mysql`"),
        ("hunter2", "not a URL"),
        ("postgres://u:hunter2@h:notaport/db", "not a valid PostgreSQL URL"),
        (
            "postgres://u:hunter2@h/db?sslmode=prefer",
            "sslmode=prefer falls back to plaintext",
        ),
        (
            "postgres://u:hunter2@h/db?sslmode=allow",
            "sslmode=allow falls back to plaintext",
        ),
        ("postgres://u:hunter2@h/db?sslmode=hunter2", "sslmode is one of"),
        (
            "postgres://u:hunter2@h/db?sslrootcert=/ca.pem",
            "only with sslmode=verify-full",
        ),
        (
            "postgres://u:hunter2@h/db?sslmode=require&sslrootcert=%FF",
            "not a valid path",
        ),
        (
            "postgres://u:hunter2@h/db?sslmode=verify-full&sslmode=disable",
            "sslmode is given twice",
        ),
        (
            "postgres://u:hunter2@h/db?ssl%6Dode=prefer",
            "sslmode=prefer falls back",
        ),
        (
            "postgres://u:hunter2@h/db?sslmode=require&sslrootcert=/a&sslrootcert=/b",
            "sslrootcert is given twice",
        ),
        (
            "postgres://u:hunter2@%2Frun%2Fpostgresql/db?sslmode=verify-full",
            "a Unix socket host is local already",
        ),
        (
            "postgres://u:hunter2@h/db?sslmode=verify-full&channel_binding=require",
            "channel_binding=require is not supported",
        ),
        ("postgres://u:hunter2${@h/db", "an unterminated `${`"),
        (
            "postgres://u:${UPGATE_TEST_UNSET_PASSWORD}@h/db",
            "UPGATE_TEST_UNSET_PASSWORD is not set",
        ),
    ] {
        let error = parse(&config_with(url)).unwrap_err();
        assert!(error.starts_with("/etc/upgate/config.yaml:3:"), "{url}: {error}");
        assert!(error.contains(expected), "{url}: {error}");
        assert!(!error.contains("hunter2"), "{url}: {error}");
    }
    let unknown = config_with("postgres://h/db").replace("  store:\n", "  store:\n    pool_size: 3\n");
    let error = parse(&unknown).unwrap_err();
    assert!(error.contains("unknown field `pool_size`"), "{error}");
}

#[test]
fn tls_parameters_are_taken_out_for_the_driver_and_relative_ca_files_follow_the_config() {
    let url = PostgresUrl::parse("postgres://u:pw@h:1/db?sslmode=disable").unwrap();
    assert_eq!(
        (url.expose(), url.tls()),
        ("postgres://u:pw@h:1/db?sslmode=disable", None)
    );
    let url = PostgresUrl::parse("postgres://u:pw@h:1/db?connect_timeout=3").unwrap();
    assert_eq!(url.tls(), None, "no sslmode: plaintext, as before");
    for mode in ["require", "verify-ca", "verify-full"] {
        let url = PostgresUrl::parse(&format!(
            "postgres://u:pw@h:1/db?sslmode={mode}&sslrootcert=%2Fetc%2Fca.pem&connect_timeout=3"
        ))
        .unwrap();
        assert_eq!(
            url.expose(),
            "postgres://u:pw@h:1/db?sslmode=require&connect_timeout=3",
            "{mode}"
        );
        assert_eq!(
            url.tls(),
            Some(&PostgresTls {
                ca_file: Some("/etc/ca.pem".into())
            })
        );
    }
    let config = parse(&config_with(
        "postgres://u@h:1/db?sslmode=verify-full&sslrootcert=tls/ca.pem",
    ))
    .unwrap();
    let url = &config.server.store.unwrap().url;
    assert_eq!(
        url.tls(),
        Some(&PostgresTls {
            ca_file: Some("/etc/upgate/tls/ca.pem".into())
        })
    );
    assert_eq!(url.to_string(), "postgres://u@h:1/db");
}

#[test]
fn tls_parameters_are_read_where_the_driver_reads_them() {
    // A `?` in the password is the password's: the query starts after the user info.
    let url = PostgresUrl::parse("postgres://u:p?x=1@db:1/app?sslmode=verify-full").unwrap();
    assert_eq!(url.expose(), "postgres://u:p?x=1@db:1/app?sslmode=require");
    assert_eq!(url.tls(), Some(&PostgresTls { ca_file: None }));
    let url = PostgresUrl::parse("postgres://u:p?sslmode=disable@db:1/app").unwrap();
    assert_eq!(url.tls(), None);
    // A percent-encoded key is the key the driver reads.
    let url = PostgresUrl::parse("postgres://u@db:1/app?ssl%6dode=verify-full").unwrap();
    assert_eq!(url.expose(), "postgres://u@db:1/app?sslmode=require");
    assert!(url.tls().is_some());
}
