//! Signals: SIGHUP reloads the config and plugins; SIGTERM and SIGINT stop the daemon.
//!
//! What flows through here: signals in; a new policy snapshot swapped into the gateway (or a
//! refused config logged, the running one kept), and systemd's RELOADING/READY states.

use std::path::Path;

use sd_notify::NotifyState;

use super::{load, notify};
use crate::metrics;
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

/// Handles SIGHUP (reload) until SIGTERM or SIGINT arrives.
pub(super) async fn wait_for_stop(config_path: &Path, gateway: &Gateway, hangup: Hangup) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut terminate), Ok(mut interrupt), Some(mut hangup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        hangup.0,
    ) else {
        tracing::error!("cannot install signal handlers");
        return std::future::pending().await;
    };
    loop {
        tokio::select! {
            _ = terminate.recv() => return,
            _ = interrupt.recv() => return,
            _ = hangup.recv() => reload(config_path, gateway).await,
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
    let loaded = tokio::task::spawn_blocking(move || load(&path)).await;
    match loaded {
        Ok(Ok((config, providers))) => {
            let running = gateway.policy();
            let store_url = |config: &crate::config::Config| {
                config
                    .server
                    .store
                    .as_ref()
                    .map(|store| store.url.expose().to_owned())
            };
            if config.server.listen != running.config.server.listen
                || config.server.data_dir != running.config.server.data_dir
                || store_url(&config) != store_url(&running.config)
            {
                tracing::warn!(
                    "server.listen, server.data_dir and server.store changes take effect at the next restart"
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
        Err(_) => metrics::config_reload(false),
    }
    notify(&[NotifyState::Ready, NotifyState::Status("serving")]);
}
