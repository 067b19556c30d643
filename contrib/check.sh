#!/usr/bin/env bash
# Checks the Prometheus files in contrib/:
#   - `promtool check rules contrib/prometheus/alerts.yml`
#   - `promtool test rules` with a built-in suite (each alert fires when it should)
#   - `promtool check config` on a minimal prometheus.yml built around scrape.yml
#   - `promtool check metrics < FILE` when FILE is given (e.g. a saved /metrics scrape:
#     `curl -s http://127.0.0.1:9464/metrics > metrics.txt; contrib/check.sh metrics.txt`)
#   - contrib/grafana/upgate.json is valid JSON and names only known upgate_ metrics
# Installs promtool (Debian package `prometheus`, without starting its service) when it is
# missing and this runs as root with apt-get available.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
alerts="$here/prometheus/alerts.yml"
scrape="$here/prometheus/scrape.yml"
dashboard="$here/grafana/upgate.json"

install_promtool() {
    if command -v promtool >/dev/null 2>&1; then
        return 0
    fi
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        echo "contrib/check.sh: promtool is missing; install it (Debian: apt-get install prometheus)" >&2
        exit 1
    fi
    echo "contrib/check.sh: installing promtool (Debian package prometheus)" >&2
    # Never start the Prometheus service while installing: a policy-rc.d that denies it,
    # only for the duration of the install if none exists.
    local policy=/usr/sbin/policy-rc.d added_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 0755 "$policy"
        added_policy=1
    fi
    local status=0
    {
        apt-get update -qq &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus
    } >/tmp/upgate-contrib-apt.log 2>&1 || status=$?
    if [ "$added_policy" = 1 ]; then rm -f "$policy"; fi
    if [ "$status" -ne 0 ]; then
        cat /tmp/upgate-contrib-apt.log >&2
        echo "contrib/check.sh: apt-get install prometheus failed" >&2
        exit 1
    fi
    # On a machine booted with systemd the package enables and may start the service.
    if [ -d /run/systemd/system ]; then
        systemctl disable --now prometheus >/dev/null 2>&1 || true
    fi
    command -v promtool >/dev/null 2>&1 || { echo "contrib/check.sh: promtool still missing" >&2; exit 1; }
}

install_promtool

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

echo "== promtool check rules"
promtool check rules "$alerts"

echo "== promtool test rules"
cp "$alerts" "$work/alerts.yml"
cat >"$work/alerts_test.yml" <<'EOF'
rule_files: [alerts.yml]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'up{job="upgate", instance="gw:9464"}'
        values: '1 1 0 0 0 0 0'
    alert_rule_test:
      - {eval_time: 3m, alertname: UpgateDown, exp_alerts: []}
      - eval_time: 5m
        alertname: UpgateDown
        exp_alerts:
          - exp_labels: {severity: critical, job: upgate, instance: "gw:9464"}
            exp_annotations:
              summary: "upgate on gw:9464 is down"
              description: "Prometheus has not been able to scrape upgate's /metrics on gw:9464 for 2 minutes."
  - interval: 1m
    input_series:
      - series: 'upgate_http_requests_total{job="upgate", instance="gw", dialect="dify", route="upload", status_class="2xx"}'
        values: '0+120x30'
      - series: 'upgate_http_requests_total{job="upgate", instance="gw", dialect="dify", route="upload", status_class="5xx"}'
        values: '0+0x10 0+60x20'
      - series: 'upgate_upstream_request_duration_seconds_count{job="upgate", instance="gw", provider="dify", outcome="ok"}'
        values: '0+60x30'
      - series: 'upgate_upstream_request_duration_seconds_count{job="upgate", instance="gw", provider="dify", outcome="timeout"}'
        values: '0+30x30'
      # Rejected (4xx from upstream) is the client's problem, not an upstream failure.
      - series: 'upgate_upstream_request_duration_seconds_count{job="upgate", instance="gw", provider="disk", outcome="ok"}'
        values: '0+60x30'
      - series: 'upgate_upstream_request_duration_seconds_count{job="upgate", instance="gw", provider="disk", outcome="rejected"}'
        values: '0+60x30'
    alert_rule_test:
      - {eval_time: 10m, alertname: UpgateHigh5xxRate, exp_alerts: []}
      - eval_time: 30m
        alertname: UpgateHigh5xxRate
        exp_alerts:
          - exp_labels: {severity: critical, job: upgate, instance: gw}
            exp_annotations:
              summary: "upgate on gw answers 33.33% of requests with 5xx"
              description: "More than 5% of HTTP requests have failed with a 5xx status for 10 minutes. Check the logs, the upstream alerts and /readyz."
      - eval_time: 30m
        alertname: UpgateUpstreamFailures
        exp_alerts:
          - exp_labels: {severity: warning, job: upgate, instance: gw, provider: dify}
            exp_annotations:
              summary: "upstream dify is failing (33.33% of calls)"
              description: "More than 10% of calls from gw to provider dify ended unavailable, timed out or failed internally over 10 minutes. Uploads are retried from the outbox; watch UpgateOutboxBacklogGrowing."
  - interval: 1m
    input_series:
      - series: 'upgate_data_dir_free_bytes{job="upgate", instance="gw"}'
        values: '1000 1000 100 100 100 100'
      - series: 'upgate_data_dir_free_floor_bytes{job="upgate", instance="gw"}'
        values: '200x5'
    alert_rule_test:
      - {eval_time: 1m, alertname: UpgateDiskBelowFloor, exp_alerts: []}
      - eval_time: 4m
        alertname: UpgateDiskBelowFloor
        exp_alerts:
          - exp_labels: {severity: critical, job: upgate, instance: gw}
            exp_annotations:
              summary: "upgate data_dir on gw is below its free-space floor"
              description: "Only 100B free in data_dir: upgate refuses uploads and /readyz fails until space is freed or server.disk_free_floor is lowered."
  - interval: 1m
    input_series:
      - series: 'upgate_outbox_pending{job="upgate", instance="gw"}'
        values: '0+1x60'
      - series: 'upgate_uploads_total{job="upgate", instance="gw", dialect="dify", provider="dify", outcome="forwarded"}'
        values: '0x60'
    alert_rule_test:
      - {eval_time: 30m, alertname: UpgateOutboxBacklogGrowing, exp_alerts: []}
      - eval_time: 50m
        alertname: UpgateOutboxBacklogGrowing
        exp_alerts:
          - exp_labels: {severity: warning, job: upgate, instance: gw}
            exp_annotations:
              summary: "upgate outbox on gw keeps growing (50 pending)"
              description: "Uploads waiting for asynchronous delivery have been growing for 30 minutes: an upstream is down or too slow. Check UpgateUpstreamFailures and the spool/disk space."
      - eval_time: 50m
        alertname: UpgateOutboxStuck
        exp_alerts:
          - exp_labels: {severity: warning, job: upgate, instance: gw}
            exp_annotations:
              summary: "upgate outbox on gw is not draining"
              description: "20 uploads have been pending for 30 minutes and nothing was forwarded in that time."
  - interval: 1m
    input_series:
      # auth: 1/s for 80 minutes, then 10/s. size: a steady 2/s, never a spike.
      - series: 'upgate_rejections_total{job="upgate", instance="gw", dialect="dify", reason="auth"}'
        values: '0+60x80 4860+600x20'
      - series: 'upgate_rejections_total{job="upgate", instance="gw", dialect="dify", reason="size"}'
        values: '0+120x100'
      - series: 'upgate_plugin_errors_total{job="upgate", instance="gw", provider="dify", kind="panic"}'
        values: '0x50 1x50'
      - series: 'upgate_config_reloads_total{job="upgate", instance="gw", result="error"}'
        values: '0x50 1x50'
    alert_rule_test:
      - {eval_time: 75m, alertname: UpgateRejectionsSpike, exp_alerts: []}
      - eval_time: 90m
        alertname: UpgateRejectionsSpike
        exp_alerts:
          - exp_labels: {severity: warning, job: upgate, instance: gw, reason: auth}
            exp_annotations:
              summary: "upgate rejections for reason auth spiked to 10/s"
              description: "Requests rejected with reason auth on gw are more than 5x the previous hour's rate. auth: bad or leaked keys; rate/concurrency/quota: a client over its plan; size/extension/content/invalid: a misbehaving client."
      - {eval_time: 45m, alertname: UpgatePluginPanics, exp_alerts: []}
      - eval_time: 55m
        alertname: UpgatePluginPanics
        exp_alerts:
          - exp_labels: {severity: warning, job: upgate, instance: gw, provider: dify}
            exp_annotations:
              summary: "plugin dify panicked"
              description: "The provider plugin dify on gw panicked 1 times in the last 15 minutes. The call failed but the daemon survived; this is a plugin bug."
      - eval_time: 55m
        alertname: UpgateConfigReloadFailed
        exp_alerts:
          - exp_labels: {severity: warning, job: upgate, instance: gw}
            exp_annotations:
              summary: "upgate on gw refused a configuration reload"
              description: "A SIGHUP reload failed; the previous configuration is still running. See the journal (`journalctl -u upgate`)."
  - interval: 1m
    input_series:
      # Event counters the daemon exports only from their first event: the series appears at 1.
      - series: 'up{job="upgate", instance="gw"}'
        values: '1x60'
      - series: 'upgate_plugin_errors_total{job="upgate", instance="gw", provider="beam", kind="panic"}'
        values: '_x30 1x30'
      - series: 'upgate_config_reloads_total{job="upgate", instance="gw", result="error"}'
        values: '_x30 1x30'
      - series: 'upgate_uploads_total{job="upgate", instance="gw", dialect="beam", provider="beam", outcome="failed"}'
        values: '_x30 1x30'
      # Old news when Prometheus starts: no alert.
      - series: 'up{job="upgate", instance="fresh"}'
        values: '_x40 1x20'
      - series: 'upgate_plugin_errors_total{job="upgate", instance="fresh", provider="beam", kind="panic"}'
        values: '_x40 3x20'
    alert_rule_test:
      - eval_time: 32m
        alertname: UpgatePluginPanics
        exp_alerts:
          - exp_labels: {severity: warning, job: upgate, instance: gw, provider: beam}
            exp_annotations:
              summary: "plugin beam panicked"
              description: "The provider plugin beam on gw panicked 1 times in the last 15 minutes. The call failed but the daemon survived; this is a plugin bug."
      - eval_time: 32m
        alertname: UpgateConfigReloadFailed
        exp_alerts:
          - exp_labels: {severity: warning, job: upgate, instance: gw}
            exp_annotations:
              summary: "upgate on gw refused a configuration reload"
              description: "A SIGHUP reload failed; the previous configuration is still running. See the journal (`journalctl -u upgate`)."
      - eval_time: 40m
        alertname: UpgateUploadsFailing
        exp_alerts:
          - exp_labels: {severity: warning, job: upgate, instance: gw, provider: beam}
            exp_annotations:
              summary: "uploads to beam are failing for good"
              description: "1 uploads to provider beam on gw were marked failed (no more retries) in the last 15 minutes."
      - {eval_time: 50m, alertname: UpgateUploadsFailing, exp_alerts: []}
      - {eval_time: 45m, alertname: UpgatePluginPanics, exp_alerts: []}
EOF
(cd "$work" && promtool test rules alerts_test.yml)

echo "== promtool check config (scrape.yml)"
{
    printf 'global:\n  scrape_interval: 15s\nrule_files: [alerts.yml]\n'
    sed -n '/^scrape_configs:/,$p' "$scrape"
} >"$work/prometheus.yml"
promtool check config "$work/prometheus.yml"

if [ -f "$dashboard" ]; then
    echo "== grafana dashboard"
    python3 - "$dashboard" "$work/dashboard-rules.yml" <<'EOF'
import json, re, sys
known = {
    "upgate_build_info", "upgate_http_requests_total", "upgate_uploads_total",
    "upgate_received_bytes_total", "upgate_forwarded_bytes_total",
    "upgate_upload_duration_seconds_bucket", "upgate_upload_duration_seconds_sum",
    "upgate_upload_duration_seconds_count", "upgate_upload_size_bytes_bucket",
    "upgate_upload_size_bytes_sum", "upgate_upload_size_bytes_count",
    "upgate_upstream_request_duration_seconds_bucket",
    "upgate_upstream_request_duration_seconds_sum",
    "upgate_upstream_request_duration_seconds_count", "upgate_upstream_retries_total",
    "upgate_rejections_total", "upgate_sessions_active", "upgate_sessions_bytes", "upgate_spool_bytes",
    "upgate_open_connections", "upgate_outbox_pending", "upgate_plugin_errors_total",
    "upgate_config_reloads_total", "upgate_data_dir_free_bytes", "upgate_data_dir_free_inodes",
    "upgate_data_dir_free_floor_bytes",
}
with open(sys.argv[1]) as f:
    board = json.load(f)
exprs = []
def walk(node):
    if isinstance(node, dict):
        if isinstance(node.get("expr"), str):
            exprs.append(node["expr"])
        if isinstance(node.get("query"), (str, dict)):
            q = node["query"]
            exprs.append(q if isinstance(q, str) else q.get("query", ""))
        for v in node.values():
            walk(v)
    elif isinstance(node, list):
        for v in node:
            walk(v)
walk(board)
bad = sorted({m for e in exprs for m in re.findall(r"\bupgate_[a-z0-9_]+", e)} - known)
if bad:
    sys.exit(f"dashboard uses unknown metrics: {', '.join(bad)}")
ids = [p.get("id") for p in board.get("panels", [])]
if len(ids) != len(set(ids)):
    sys.exit("dashboard has duplicate panel ids")
# Every query must parse as PromQL: write them out as recording rules for promtool, with
# Grafana's variables replaced by plausible values.
def concrete(expr):
    expr = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m")
    return re.sub(r"\$\{?[A-Za-z_]+\}?", ".*", expr)
queries = [concrete(e) for e in exprs if not e.startswith("label_values(")]
rules = {"groups": [{"name": "dashboard", "rules": [
    {"record": f"dashboard:query_{i}", "expr": e} for i, e in enumerate(queries)]}]}
with open(sys.argv[2], "w") as f:
    json.dump(rules, f, indent=1)
print(f"{sys.argv[1]}: valid JSON, {len(board.get('panels', []))} panels, {len(exprs)} queries")
EOF
    promtool check rules "$work/dashboard-rules.yml" >/dev/null ||
        { promtool check rules "$work/dashboard-rules.yml"; echo "contrib/check.sh: a dashboard query does not parse" >&2; exit 1; }
    echo "  every dashboard query parses as PromQL"
fi

if [ "$#" -ge 1 ]; then
    echo "== promtool check metrics < $1"
    promtool check metrics <"$1"
fi

echo "contrib/check.sh: ok"
