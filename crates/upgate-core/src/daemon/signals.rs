//! Signals: SIGHUP reloads the config and plugins; SIGTERM and SIGINT stop the daemon.
//!
//! What flows through here: signals in; a new policy snapshot swapped into the gateway (or a
//! refused config logged, the running one kept), and systemd's RELOADING/READY states.

use std::path::Path;

use sd_notify::NotifyState;

use super::{Providers, ServeError, notify};
use crate::config::{Config, ServerConfig};
use crate::metrics;
use crate::plugins;
use crate::policy::Policy;
use crate::upload::Gateway;

/// SIGHUP caught from the start of the daemon: one that arrives while it starts (a log
/// rotation's `kill -HUP`) is a reload once it serves, not the signal's default end of the
/// process. SIGTERM and SIGINT keep their default until then: nothing is in flight to drain.
pub(super) struct Hangup(Option<tokio::signal::unix::Signal>);

impl Hangup {
    pub(super) fn catch() -> Self {
        use tokio::signal::unix::{SignalKind, signal};
        Self(signal(SignalKind::hangup()).ok())
    }
}

/// SIGTERM and SIGINT, once the daemon serves.
pub(super) struct Stops {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl Stops {
    /// The next SIGTERM or SIGINT.
    pub(super) async fn next(&mut self) {
        tokio::select! {
            _ = self.terminate.recv() => {}
            _ = self.interrupt.recv() => {}
        }
    }
}

/// Handles SIGHUP (reload) until SIGTERM or SIGINT arrives, and hands back the stop signals
/// (a second one during the drain stops at once). A stop signal during a reload is not kept
/// waiting for it: the reload is dropped (the running configuration stays) and the daemon
/// stops.
pub(super) async fn wait_for_stop(config_path: &Path, gateway: &Gateway, hangup: Hangup) -> Stops {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(terminate), Ok(interrupt), Some(mut hangup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        hangup.0,
    ) else {
        tracing::error!("cannot install signal handlers");
        return std::future::pending().await;
    };
    let mut stops = Stops { terminate, interrupt };
    loop {
        tokio::select! {
            _ = stops.next() => return stops,
            _ = hangup.recv() => tokio::select! {
                _ = reload(config_path, gateway) => {}
                _ = stops.next() => {
                    tracing::warn!("stopping during a reload: the reload is dropped");
                    return stops;
                }
            },
        }
    }
}

async fn reload(config_path: &Path, gateway: &Gateway) {
    let mut states = vec![NotifyState::Reloading];
    if let Ok(now) = NotifyState::monotonic_usec_now() {
        states.push(now);
    }
    notify(&states);
    let path = config_path.to_path_buf();
    let running = gateway.policy().config.server.clone();
    let loaded = tokio::task::spawn_blocking(move || reload_config(&path, &running)).await;
    match loaded {
        Ok(Ok((config, providers, kept))) => {
            if !kept.is_empty() {
                tracing::warn!(
                    settings = %kept.join(", "),
                    "these server settings take effect at the next restart; the running values stay"
                );
            }
            metrics::prime(providers.keys().map(String::as_str));
            gateway.replace_policy(Policy::new(config, providers));
            metrics::config_reload(true);
            tracing::info!("configuration reloaded");
        }
        Ok(Err(error)) => {
            metrics::config_reload(false);
            tracing::error!(%error, "configuration reload refused; the running configuration stays");
        }
        Err(error) => {
            metrics::config_reload(false);
            tracing::error!(%error, "configuration reload failed; the running configuration stays");
        }
    }
    notify(&[NotifyState::Ready, NotifyState::Status("serving")]);
}

/// The config at `path` as a reload applies it ([`with_running_server`]), its providers made
/// with that, and the start-only settings it would have changed.
fn reload_config(
    path: &Path,
    running: &ServerConfig,
) -> Result<(Config, Providers, Vec<&'static str>), ServeError> {
    let (config, kept) = with_running_server(Config::load(path).map_err(ServeError::Config)?, running);
    let providers = plugins::instantiate(&config).map_err(ServeError::Plugins)?;
    Ok((config, providers, kept))
}

/// A reloaded config whose start-only `server` settings are the running ones (so that the
/// new providers, made from it, see the `durability` and `plugin_dir` the daemon runs with,
/// and nothing reads a value the log said stays), with the names of those it changed.
fn with_running_server(mut config: Config, running: &ServerConfig) -> (Config, Vec<&'static str>) {
    let kept = start_only_changes(&config.server, running);
    config.server = running.with_live_settings_of(config.server);
    (config, kept)
}

/// The `server` settings a reload changed that only take effect at the next restart (what the
/// listeners, the engines, the background loops and the intake were started with). The
/// others (`idle_timeout`, `session_expiry`, `max_concurrent_uploads`, `cors`,
/// `min_body_rate`, the plans, providers and tenants) apply to the next request.
fn start_only_changes(new: &ServerConfig, running: &ServerConfig) -> Vec<&'static str> {
    let store_url = |server: &ServerConfig| server.store.as_ref().map(|store| store.url.expose().to_owned());
    let debug = |value: &dyn std::fmt::Debug| format!("{value:?}");
    let settings: [(&'static str, bool); 17] = [
        ("listen", new.listen != running.listen),
        ("data_dir", new.data_dir != running.data_dir),
        ("plugin_dir", new.plugin_dir != running.plugin_dir),
        ("store", store_url(new) != store_url(running)),
        ("spool", debug(&new.spool) != debug(&running.spool)),
        ("limits", debug(&new.limits) != debug(&running.limits)),
        ("metrics_listen", new.metrics_listen != running.metrics_listen),
        ("workers", new.workers != running.workers),
        ("header_timeout", new.header_timeout.0 != running.header_timeout.0),
        (
            "shutdown_timeout",
            new.shutdown_timeout.0 != running.shutdown_timeout.0,
        ),
        ("max_connections", new.max_connections != running.max_connections),
        ("sweep_interval", new.sweep_interval.0 != running.sweep_interval.0),
        (
            "disk_free_floor",
            new.disk_free_floor.0 != running.disk_free_floor.0,
        ),
        (
            "forward_concurrency",
            new.forward_concurrency != running.forward_concurrency,
        ),
        ("intake_memory", new.intake_memory.0 != running.intake_memory.0),
        ("durability", new.durability != running.durability),
        ("log_format", debug(&new.log_format) != debug(&running.log_format)),
    ];
    settings
        .into_iter()
        .filter_map(|(name, changed)| changed.then_some(name))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reload_names_the_settings_it_cannot_apply() {
        let text = "server:\n  listen: 127.0.0.1:0\n  data_dir: data\nplans:\n  p: { max_file_size: 1MiB }\nproviders:\n  d: { plugin: local, settings: { root: ./f } }\ntenants:\n  t: { plan: p, provider: d, keys: [k] }\n";
        let path = Path::new("/etc/upgate/config.yaml");
        let running = crate::config::Config::parse(text, path).unwrap().server;
        let live = text.replace(
            "data_dir: data",
            "data_dir: data\n  idle_timeout: 9s\n  session_expiry: 2h",
        );
        let live = crate::config::Config::parse(&live, path).unwrap().server;
        assert!(start_only_changes(&live, &running).is_empty());
        let kept = text.replace(
            "data_dir: data",
            "data_dir: data\n  forward_concurrency: 3\n  sweep_interval: 5s",
        );
        let kept = crate::config::Config::parse(&kept, path).unwrap().server;
        assert_eq!(
            start_only_changes(&kept, &running),
            vec!["sweep_interval", "forward_concurrency"]
        );
    }

    /// The log says a start-only setting keeps its running value: so does the config the
    /// new providers are made from (a durability reloaded from power_loss to process_crash
    /// made new local-disk instances stop fsyncing), while the live ones apply.
    #[test]
    fn a_reloaded_config_keeps_the_running_start_only_settings() {
        let text = "server:\n  listen: 127.0.0.1:0\n  data_dir: data\n  durability: power_loss\nplans:\n  p: { max_file_size: 1MiB }\nproviders:\n  d: { plugin: local, settings: { root: ./f } }\ntenants:\n  t: { plan: p, provider: d, keys: [k] }\n";
        let path = Path::new("/etc/upgate/config.yaml");
        let running = crate::config::Config::parse(text, path).unwrap().server;
        let changed = text
            .replace(
                "durability: power_loss",
                "durability: process_crash\n  idle_timeout: 9s",
            )
            .replace("data_dir: data", "data_dir: data\n  plugin_dir: /elsewhere");
        let reloaded = crate::config::Config::parse(&changed, path).unwrap();
        let (config, kept) = with_running_server(reloaded, &running);
        assert_eq!(kept, vec!["plugin_dir", "durability"]);
        assert_eq!(config.server.durability, crate::config::Durability::PowerLoss);
        assert_eq!(config.server.plugin_dir, running.plugin_dir);
        assert_eq!(config.server.idle_timeout.0, std::time::Duration::from_secs(9));
    }
}
