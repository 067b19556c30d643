#!/usr/bin/env bash
# Checks systemd/upgate.service:
#   - `systemd-analyze verify` is clean (no output, exit 0)
#   - `systemd-analyze security --offline=true` rates it at most 2.0 (override: MAX_EXPOSURE)
#   - upgate.sysusers and upgate.tmpfiles parse (systemd-sysusers/systemd-tmpfiles against a
#     scratch root, nothing on this machine changes)
# Installs systemd (Debian) when systemd-analyze is missing and this runs as root with apt-get.
# `verify` wants the ExecStart= binary to exist: when /usr/local/bin/upgate is not installed,
# a copy of the unit pointing at a stub in a scratch directory is verified instead (only the
# binary's path differs); this script never writes outside that scratch directory.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
unit="$here/upgate.service"
max="${MAX_EXPOSURE:-2.0}"

if ! command -v systemd-analyze >/dev/null 2>&1; then
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        echo "systemd/check.sh: systemd-analyze is missing; install it (Debian: apt-get install systemd)" >&2
        exit 1
    fi
    echo "systemd/check.sh: installing systemd (for systemd-analyze)" >&2
    {
        apt-get update -qq &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends systemd
    } >/tmp/upgate-systemd-apt.log 2>&1 || { cat /tmp/upgate-systemd-apt.log >&2; exit 1; }
fi
echo "== $(systemd-analyze --version | head -n 1)"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# ---- verify
binary=/usr/local/bin/upgate
if [ -x "$binary" ]; then
    target="$unit"
else
    printf '#!/bin/sh\nexit 0\n' >"$work/upgate"
    chmod 0755 "$work/upgate"
    mkdir -p "$work/unit"
    sed "s|$binary|$work/upgate|g" "$unit" >"$work/unit/upgate.service"
    target="$work/unit/upgate.service"
    echo "   ($binary is not installed: verifying a copy that runs a stub instead)"
fi
echo "== systemd-analyze verify upgate.service"
set +e
out="$(SYSTEMD_LOG_LEVEL=notice systemd-analyze verify "$target" 2>&1)"
status=$?
set -e
if [ "$status" -ne 0 ] || [ -n "$out" ]; then
    printf '%s\n' "$out" >&2
    echo "systemd/check.sh: systemd-analyze verify failed (exit $status)" >&2
    exit 1
fi
echo "   clean"

# ---- security
echo "== systemd-analyze security --offline=true upgate.service"
set +e
report="$(systemd-analyze security --offline=true --no-pager "$unit" 2>&1)"
status=$?
set -e
printf '%s\n' "$report" | grep -v '✓' || true
score="$(printf '%s\n' "$report" | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p' | tail -n 1)"
if [ -z "$score" ]; then
    printf '%s\n' "$report" >&2
    echo "systemd/check.sh: could not read the exposure score (exit $status)" >&2
    exit 1
fi
if awk -v s="$score" -v m="$max" 'BEGIN { exit !(s > m) }'; then
    echo "systemd/check.sh: exposure $score is above $max" >&2
    exit 1
fi
echo "   exposure $score (limit $max)"

# ---- sysusers / tmpfiles syntax, against a scratch root
if command -v systemd-sysusers >/dev/null 2>&1 && command -v systemd-tmpfiles >/dev/null 2>&1; then
    echo "== systemd-sysusers / systemd-tmpfiles (scratch root)"
    root="$work/root"
    mkdir -p "$root/etc" "$root/usr/sbin" "$root/var/lib" "$root/usr/local/lib"
    : >"$root/etc/passwd"
    : >"$root/etc/group"
    cp "$here/upgate.sysusers" "$work/upgate-sysusers.conf"
    set +e
    out="$(systemd-sysusers --root="$root" "$work/upgate-sysusers.conf" 2>&1)"
    status=$?
    set -e
    if [ "$status" -ne 0 ] || ! grep -q '^upgate:' "$root/etc/passwd" || ! grep -q '^upgate:' "$root/etc/group"; then
        printf '%s\n' "$out" >&2
        echo "systemd/check.sh: upgate.sysusers did not create user and group upgate" >&2
        exit 1
    fi
    echo "   sysusers: $(grep '^upgate:' "$root/etc/passwd")"
    cp "$here/upgate.tmpfiles" "$work/upgate-tmpfiles.conf"
    set +e
    out="$(systemd-tmpfiles --root="$root" --create "$work/upgate-tmpfiles.conf" 2>&1)"
    status=$?
    set -e
    if [ "$status" -ne 0 ] || [ -n "$out" ]; then
        printf '%s\n' "$out" >&2
        echo "systemd/check.sh: upgate.tmpfiles failed (exit $status)" >&2
        exit 1
    fi
    mode="$(stat -c '%a' "$root/etc/upgate")"
    [ "$mode" = 750 ] || { echo "systemd/check.sh: /etc/upgate got mode $mode, want 750" >&2; exit 1; }
    echo "   tmpfiles: ok"
fi

echo "systemd/check.sh: ok"
