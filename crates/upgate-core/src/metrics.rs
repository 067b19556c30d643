//! Metrics: the `upgate_*` Prometheus series, and the disk-space watch.
//!
//! What flows through here: events from the rest of the daemon (a request answered, an
//! upload received or forwarded, a plugin call timed, a rejection), recorded into one
//! process-wide registry and rendered as text exposition on `/metrics`. Every label comes
//! from a bounded set: dialect names, route patterns, status classes, provider names from
//! config, fixed reason and outcome words. Never a filename, key, id or client string.

use std::sync::OnceLock;
use std::time::Duration;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::vocab::DialectName;

/// All series.
pub(crate) struct Metrics {
    pub registry: Registry,
    requests: IntCounterVec,
    uploads: IntCounterVec,
    received_bytes: IntCounterVec,
    forwarded_bytes: IntCounterVec,
    upload_duration: HistogramVec,
    upload_size: HistogramVec,
    upstream_duration: HistogramVec,
    retries: IntCounterVec,
    rejections: IntCounterVec,
    pub sessions_active: IntGauge,
    pub sessions_bytes: IntGauge,
    pub spool_bytes: IntGauge,
    pub open_connections: IntGauge,
    pub outbox_pending: IntGauge,
    plugin_errors: IntCounterVec,
    config_reloads: IntCounterVec,
    limits_fallback: IntCounterVec,
    limits_unavailable: IntCounterVec,
    pub disk_free: IntGauge,
    pub disk_free_inodes: IntGauge,
    pub disk_floor: IntGauge,
    _build_info: IntGaugeVec,
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let metric = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("unique metric");
    metric
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let metric = IntGauge::new(name, help).expect("valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("unique metric");
    metric
}

fn histogram(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: Vec<f64>,
) -> HistogramVec {
    let metric =
        HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels).expect("valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("unique metric");
    metric
}

impl Metrics {
    fn new() -> Self {
        let registry = Registry::new();
        let r = &registry;
        // 1 ms .. ~20 min: small files on loopback to multi-GiB uploads on slow links.
        let seconds = prometheus::exponential_buckets(0.001, 4.0, 11).expect("valid buckets");
        // 1 KiB .. 16 GiB.
        let bytes = prometheus::exponential_buckets(1024.0, 4.0, 13).expect("valid buckets");
        let build_info = IntGaugeVec::new(
            Opts::new("upgate_build_info", "Build of the running daemon"),
            &["version"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(build_info.clone()))
            .expect("unique metric");
        build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        Self {
            requests: counter(
                r,
                "upgate_http_requests_total",
                "HTTP requests answered",
                &["dialect", "route", "status_class"],
            ),
            uploads: counter(
                r,
                "upgate_uploads_total",
                "Uploads by outcome",
                &["dialect", "provider", "outcome"],
            ),
            received_bytes: counter(
                r,
                "upgate_received_bytes_total",
                "Bytes of files accepted",
                &["dialect"],
            ),
            forwarded_bytes: counter(
                r,
                "upgate_forwarded_bytes_total",
                "Bytes of files delivered upstream",
                &["provider"],
            ),
            upload_duration: histogram(
                r,
                "upgate_upload_duration_seconds",
                "Upload request duration",
                &["dialect"],
                seconds.clone(),
            ),
            upload_size: histogram(
                r,
                "upgate_upload_size_bytes",
                "Size of accepted files",
                &["dialect"],
                bytes,
            ),
            upstream_duration: histogram(
                r,
                "upgate_upstream_request_duration_seconds",
                "Duration of provider plugin calls",
                &["provider", "outcome"],
                seconds,
            ),
            retries: counter(
                r,
                "upgate_upstream_retries_total",
                "Delivery retries",
                &["provider"],
            ),
            rejections: counter(
                r,
                "upgate_rejections_total",
                "Requests refused by policy",
                &["dialect", "reason"],
            ),
            sessions_active: gauge(r, "upgate_sessions_active", "Open chunked upload sessions"),
            sessions_bytes: gauge(
                r,
                "upgate_sessions_bytes",
                "Bytes recorded for the chunks of sessions and tus uploads (data_dir/sessions or the shared spool)",
            ),
            spool_bytes: gauge(r, "upgate_spool_bytes", "Bytes in the spool directory"),
            open_connections: gauge(r, "upgate_open_connections", "Open client connections"),
            outbox_pending: gauge(r, "upgate_outbox_pending", "Uploads waiting for async delivery"),
            plugin_errors: counter(
                r,
                "upgate_plugin_errors_total",
                "Provider plugin errors",
                &["provider", "kind"],
            ),
            config_reloads: counter(
                r,
                "upgate_config_reloads_total",
                "Configuration reloads",
                &["result"],
            ),
            limits_fallback: counter(
                r,
                "upgate_limits_fallback_total",
                "Checks of a shared limit (Redis) answered by this node's own limits while Redis was unreachable",
                &["limit"],
            ),
            limits_unavailable: counter(
                r,
                "upgate_limits_unavailable_total",
                "Requests refused with 503 while the shared limits (Redis) were unreachable (fault_tolerant: false)",
                &["limit"],
            ),
            disk_free: gauge(
                r,
                "upgate_data_dir_free_bytes",
                "Free bytes on the data_dir filesystem",
            ),
            disk_free_inodes: gauge(
                r,
                "upgate_data_dir_free_inodes",
                "Free inodes on the data_dir filesystem (-1: it does not count them)",
            ),
            disk_floor: gauge(
                r,
                "upgate_data_dir_free_floor_bytes",
                "Configured free-space floor for data_dir",
            ),
            _build_info: build_info,
            registry,
        }
    }
}

/// The process-wide metrics.
pub(crate) fn get() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

fn dialect_label(dialect: Option<DialectName>) -> &'static str {
    dialect.map_or("none", DialectName::as_str)
}

/// Creates every known label combination at 0, so `increase()` sees the first event and
/// dashboards show zeros rather than gaps.
pub(crate) fn prime<'a>(providers: impl IntoIterator<Item = &'a str>) {
    let metrics = get();
    for result in ["ok", "error"] {
        metrics.config_reloads.with_label_values(&[result]);
    }
    let providers: Vec<&str> = providers.into_iter().collect();
    for dialect in DialectName::ALL {
        for reason in [
            "auth",
            "size",
            "extension",
            "content",
            "rate",
            "concurrency",
            "quota",
            "invalid",
        ] {
            metrics.rejections.with_label_values(&[dialect.as_str(), reason]);
        }
        for provider in &providers {
            for outcome in ["received", "forwarded", "failed", "deleted"] {
                metrics
                    .uploads
                    .with_label_values(&[dialect.as_str(), provider, outcome]);
            }
        }
    }
    for provider in &providers {
        metrics.retries.with_label_values(&[provider]);
        for kind in [
            "panic",
            "timeout",
            "unavailable",
            "rejected",
            "not_found",
            "internal",
            "config",
        ] {
            metrics.plugin_errors.with_label_values(&[provider, kind]);
        }
    }
}

pub(crate) fn http_request(dialect: Option<DialectName>, route: &str, status: u16, duration: Duration) {
    let class = match status {
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    };
    let metrics = get();
    metrics
        .requests
        .with_label_values(&[dialect_label(dialect), route, class])
        .inc();
    // Answered requests only: instant refusals (401, 429, ...) would hide how long uploads take.
    if let Some(dialect) = dialect
        && class == "2xx"
    {
        metrics
            .upload_duration
            .with_label_values(&[dialect.as_str()])
            .observe(duration.as_secs_f64());
    }
}

pub(crate) fn rejection(dialect: DialectName, reason: &'static str) {
    get()
        .rejections
        .with_label_values(&[dialect.as_str(), reason])
        .inc();
}

pub(crate) fn upload_received(dialect: DialectName, provider: &str, size: u64) {
    let metrics = get();
    metrics
        .uploads
        .with_label_values(&[dialect.as_str(), provider, "received"])
        .inc();
    metrics
        .received_bytes
        .with_label_values(&[dialect.as_str()])
        .inc_by(size);
    metrics
        .upload_size
        .with_label_values(&[dialect.as_str()])
        .observe(size as f64);
}

pub(crate) fn upload_delivered(dialect: DialectName, provider: &str, size: u64) {
    upload_outcome(dialect, provider, "forwarded");
    get().forwarded_bytes.with_label_values(&[provider]).inc_by(size);
}

/// `outcome` is one of forwarded, failed, deleted.
pub(crate) fn upload_outcome(dialect: DialectName, provider: &str, outcome: &'static str) {
    get()
        .uploads
        .with_label_values(&[dialect.as_str(), provider, outcome])
        .inc();
}

pub(crate) fn upstream_duration(provider: &str, outcome: &'static str, duration: Duration) {
    get()
        .upstream_duration
        .with_label_values(&[provider, outcome])
        .observe(duration.as_secs_f64());
}

pub(crate) fn retry(provider: &str) {
    get().retries.with_label_values(&[provider]).inc();
}

pub(crate) fn plugin_error(provider: &str, kind: &'static str) {
    get().plugin_errors.with_label_values(&[provider, kind]).inc();
}

pub(crate) fn outbox_pending(pending: u64) {
    get().outbox_pending.set(pending as i64);
}

pub(crate) fn config_reload(ok: bool) {
    get()
        .config_reloads
        .with_label_values(&[if ok { "ok" } else { "error" }])
        .inc();
}

/// The shared limits' series at 0 for both limits (`rate`, `concurrency`), once Redis is
/// configured.
pub(crate) fn prime_limits() {
    let metrics = get();
    for limit in ["rate", "concurrency"] {
        metrics.limits_fallback.with_label_values(&[limit]);
        metrics.limits_unavailable.with_label_values(&[limit]);
    }
}

/// A check of a shared limit (`limit`: rate or concurrency) Redis could not answer: answered
/// by this node's own limits (`fell_back`), or refused with 503.
pub(crate) fn limits_unreachable(limit: &'static str, fell_back: bool) {
    let metrics = get();
    let counter = if fell_back {
        &metrics.limits_fallback
    } else {
        &metrics.limits_unavailable
    };
    counter.with_label_values(&[limit]).inc();
}

/// Free inodes below which `data_dir` counts as full whatever its free bytes: every file
/// kept apart (a chunk, a spooled upload) takes one, and with none left every write fails.
const INODE_FLOOR: u64 = 10_000;

/// Measures free space in `dir` for the gauges; returns whether it is below the floor:
/// fewer free bytes than `floor`, or, on a filesystem that counts inodes, fewer free ones
/// than [`INODE_FLOOR`] (or 1% of them, on a small one). `None` when it cannot be read.
pub(crate) fn watch_disk(dir: &std::path::Path, floor: u64) -> Option<bool> {
    let stats = rustix::fs::statvfs(dir).ok()?;
    let free = stats.f_bavail.saturating_mul(stats.f_frsize);
    let metrics = get();
    metrics.disk_free.set(i64::try_from(free).unwrap_or(i64::MAX));
    metrics.disk_floor.set(i64::try_from(floor).unwrap_or(i64::MAX));
    let counts_inodes = stats.f_files > 0;
    metrics.disk_free_inodes.set(match counts_inodes {
        true => i64::try_from(stats.f_favail).unwrap_or(i64::MAX),
        false => -1,
    });
    Some(below_floor(
        free,
        floor,
        counts_inodes.then_some((stats.f_favail, stats.f_files)),
    ))
}

/// Whether `free` bytes and `(free, total)` inodes (`None`: not counted) are below the floor.
fn below_floor(free: u64, floor: u64, inodes: Option<(u64, u64)>) -> bool {
    free < floor || inodes.is_some_and(|(free, total)| free < INODE_FLOOR.min(total / 100))
}

/// Text exposition of every series.
pub(crate) fn render() -> String {
    let mut out = Vec::new();
    let _ = TextEncoder::new().encode(&get().registry.gather(), &mut out);
    String::from_utf8(out).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_floor_counts_bytes_and_inodes_where_the_filesystem_counts_them() {
        let gib = 1 << 30;
        assert!(!below_floor(2 * gib, gib, Some((1_000_000, 2_000_000))));
        assert!(below_floor(gib - 1, gib, Some((1_000_000, 2_000_000))), "bytes");
        assert!(below_floor(2 * gib, gib, Some((9_999, 2_000_000))), "inodes");
        // A small filesystem: 1% of its inodes.
        assert!(!below_floor(2 * gib, gib, Some((600, 50_000))));
        assert!(below_floor(2 * gib, gib, Some((499, 50_000))));
        // One that does not count them (btrfs reports none).
        assert!(!below_floor(2 * gib, gib, None));
    }
}
