//! Tests of config parsing, units and error locations.

use super::units::expand_env;
use super::*;

const GOOD: &str = "server:\n  listen: 127.0.0.1:0\n  data_dir: data\nplans:\n  free:\n    max_file_size: 10MiB\n    allowed_extensions: [png, txt]\n    rate_limit: { requests_per_second: 5, burst: 10 }\nproviders:\n  disk: { plugin: local, settings: { root: ./files } }\ntenants:\n  demo:\n    plan: free\n    provider: disk\n    keys: [demo-key]\n";

fn parse(text: &str) -> Result<Config, Vec<ConfigError>> {
    Config::parse(text, Path::new("/etc/upgate/config.yaml"))
}

fn first_error(text: &str) -> String {
    parse(text).unwrap_err().remove(0).to_string()
}

#[test]
fn sizes() {
    assert_eq!(ByteSize::parse("10MiB").unwrap().0, 10 << 20);
    assert_eq!(ByteSize::parse("25MB").unwrap().0, 25_000_000);
    assert_eq!(ByteSize::parse("1.5 GiB").unwrap().0, 3 << 29);
    assert_eq!(ByteSize::parse("1024").unwrap().0, 1024);
    assert_eq!(ByteSize::parse("0").unwrap().0, 0);
    assert!(ByteSize::parse("10XB").unwrap_err().contains("unknown size unit"));
    assert!(ByteSize::parse("MiB").is_err());
    assert!(ByteSize::parse("-1MiB").is_err());
    assert_eq!(ByteSize(10 << 20).to_string(), "10MiB");
    assert_eq!(ByteSize(1000).to_string(), "1000 bytes");
}

#[test]
fn env_expansion() {
    // cargo sets CARGO_PKG_NAME for the test process.
    assert_eq!(
        expand_env("a ${CARGO_PKG_NAME} b $$ c $x").unwrap(),
        "a upgate-core b $ c $x"
    );
    assert_eq!(
        expand_env("${UPGATE_TEST_UNSET_VAR}").unwrap_err(),
        "environment variable UPGATE_TEST_UNSET_VAR is not set"
    );
    assert!(expand_env("${bad name}").is_err());
    assert!(expand_env("${OPEN").is_err());
    // A malformed reference in a secret is refused without repeating the secret.
    for secret in ["s3cr3t-${pass", "s3cr3t-${pa ss}"] {
        let error = expand_env(secret).unwrap_err();
        assert!(!error.contains("s3cr3t") && !error.contains("pa"), "{error}");
    }
    // Server paths too (cargo sets CARGO_MANIFEST_DIR, an absolute path).
    let config = parse(&GOOD.replace("data_dir: data", "data_dir: ${CARGO_MANIFEST_DIR}/state")).unwrap();
    assert_eq!(
        config.server.data_dir,
        PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/state"))
    );
    let errors = parse(&GOOD.replace("data_dir: data", "data_dir: ${UPGATE_TEST_UNSET_DIR}")).unwrap_err();
    assert!(
        errors[0].to_string().contains("UPGATE_TEST_UNSET_DIR"),
        "{errors:?}"
    );
}

#[test]
fn parses_the_good_config_and_resolves_paths() {
    let config = parse(GOOD).unwrap();
    assert_eq!(config.server.data_dir, PathBuf::from("/etc/upgate/data"));
    assert_eq!(
        config.server.plugin_dir,
        PathBuf::from("/etc/upgate/target/release")
    );
    assert_eq!(config.plans["free"].max_file_size.0, 10 << 20);
    assert_eq!(config.server.idle_timeout.0, Duration::from_secs(30));
    assert_eq!(config.tenants["demo"].dialects, vec![DialectGrant::All]);
    assert!(config.plans["free"].verify_content);
}

#[test]
fn unknown_field_is_located() {
    let text = GOOD.replace("    provider: disk\n", "    provider: disk\n    colour: blue\n");
    let message = first_error(&text);
    assert!(message.starts_with("/etc/upgate/config.yaml:15:5: "), "{message}");
    assert!(message.contains("unknown field `colour`"), "{message}");
}

#[test]
fn bad_size_is_located() {
    let message = first_error(&GOOD.replace("10MiB", "10XB"));
    assert!(
        message.starts_with("/etc/upgate/config.yaml:6:5: plans.free: "),
        "{message}"
    );
    assert!(message.contains("unknown size unit"), "{message}");
}

#[test]
fn unknown_plan_is_located_and_lists_the_choices() {
    let message = first_error(&GOOD.replace("plan: free", "plan: gold"));
    assert_eq!(
        message,
        "/etc/upgate/config.yaml:13:5: unknown plan `gold`, expected one of: free"
    );
}

/// A quoted non-ASCII tenant name: the error is located, never a panic (whose message
/// quoted the config line, keys and all).
#[test]
fn an_error_under_a_quoted_non_ascii_key_is_located() {
    let text = GOOD.replace(
        "  demo:\n    plan: free\n    provider: disk\n    keys: [demo-key]\n",
        "  \"\u{e9}t\u{e9}\": { plan: nope, provider: disk, keys: [Tenant-SECRET-key-42] }\n",
    );
    let message = first_error(&text);
    assert!(message.contains("unknown plan `nope`"), "{message}");
    assert!(!message.contains("SECRET"), "{message}");
}

#[test]
fn unknown_provider_in_flow_style() {
    let text = GOOD.replace(
        "  demo:\n    plan: free\n    provider: disk\n    keys: [demo-key]\n",
        "  demo: { plan: free, provider: nowhere, keys: [k] }\n",
    );
    let message = first_error(&text);
    assert!(
        message.starts_with("/etc/upgate/config.yaml:12:23: unknown provider `nowhere`"),
        "{message}"
    );
}

#[test]
fn unset_variable_is_named_and_located() {
    let text = GOOD.replace("root: ./files", "root: \"${UPGATE_TEST_NOT_SET_ROOT}\"");
    let message = first_error(&text);
    assert!(
        message.contains("environment variable UPGATE_TEST_NOT_SET_ROOT is not set"),
        "{message}"
    );
    assert!(message.starts_with("/etc/upgate/config.yaml:10:"), "{message}");
}

#[test]
fn bad_listen_address_and_dialect() {
    let message = first_error(&GOOD.replace("127.0.0.1:0", "localhost"));
    assert!(message.starts_with("/etc/upgate/config.yaml:2:11: "), "{message}");
    let text = GOOD.replace("keys: [demo-key]", "keys: [demo-key]\n    dialects: [dify, fax]");
    let message = first_error(&text);
    assert!(message.contains("unknown dialect `fax`"), "{message}");
}

#[test]
fn duplicate_keys_are_refused() {
    let text = format!("{GOOD}  other:\n    plan: free\n    provider: disk\n    keys: [demo-key]\n");
    let message = first_error(&text);
    assert!(message.contains("already used"), "{message}");
    assert!(message.starts_with("/etc/upgate/config.yaml:19:5"), "{message}");
}

#[test]
fn cors_origins_are_exact_origins() {
    let with = |origins: &str| {
        let text = GOOD.replace(
            "server:\n  listen: 127.0.0.1:0\n",
            &format!("server:\n  listen: 127.0.0.1:0\n  cors: {{ allowed_origins: {origins} }}\n"),
        );
        parse(&text)
    };
    let config = with("[\"https://app.example.com\", \"http://localhost:3000\"]").unwrap();
    let cors = config.server.cors.unwrap();
    assert!(cors.allows("https://app.example.com"));
    assert!(!cors.allows("https://evil.example.com"));
    assert!(
        with("[\"*\"]")
            .unwrap()
            .server
            .cors
            .unwrap()
            .allows("https://any.example")
    );
    let error = with("[\"https://app.example.com/\"]").unwrap_err()[0].to_string();
    assert!(error.contains("no path or trailing slash"), "{error}");
}

#[test]
fn values_that_would_stall_lock_out_or_overflow_are_refused() {
    for (text, expected) in [
        (
            GOOD.replace("data_dir: data", "data_dir: data\n  workers: 0"),
            "workers must be at least 1",
        ),
        (
            GOOD.replace("data_dir: data", "data_dir: data\n  sweep_interval: 0s"),
            "sweep_interval must be at least 100ms",
        ),
        (
            GOOD.replace(
                "max_file_size: 10MiB",
                "max_file_size: 10MiB\n    max_concurrent_uploads: 0",
            ),
            "max_concurrent_uploads must be at least 1",
        ),
        (
            GOOD.replace(
                "max_file_size: 10MiB",
                "max_file_size: 10MiB\n    max_open_sessions: 0",
            ),
            "max_open_sessions must be at least 1",
        ),
        (
            GOOD.replace(
                "data_dir: data",
                "data_dir: data\n  session_expiry: 999999999999h",
            ),
            "session_expiry must be from 1s to 365d",
        ),
        (
            GOOD.replace("plugin: local,", "plugin: local, timeout: 1000000h,"),
            "timeout must be more than 0 and at most 24h",
        ),
    ] {
        let message = first_error(&text);
        assert!(message.contains(expected), "{message}");
    }
}
