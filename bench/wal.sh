#!/usr/bin/env bash
# The small-upload load against upgate alone, with what it leaves in SQLite: a fresh
# loop-mounted ext4, a fresh daemon, one `wrk -t2 -c32` load of 1 KiB Dify uploads, then the
# sizes of upgate.db and its WAL, and, with --trace, every system call of the daemon that took
# longer than 10 ms (perf trace). What bench/run.sh does not show: the WAL's growth and where
# the p99 latency goes.
#
#   sudo bench/wal.sh [--trace] [--secs N] [--runs N]
#
# Needs root (loop mount), wrk, and the release build (cargo build --release -p upgate
# -p upgate-plugin-local). Environment: BENCH_UPGATE_PORT (18090), BENCH_MNT
# (/mnt/upgate-wal), BENCH_IMG_DIR (/var/tmp).
set -euo pipefail

SECS=10
RUNS=1
TRACE=0
while (($#)); do
    case $1 in
        --trace) TRACE=1 ;;
        --secs) SECS=$2; shift ;;
        --runs) RUNS=$2; shift ;;
        -h | --help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "wal.sh: unknown argument: $1 (try --help)" >&2; exit 2 ;;
    esac
    shift
done
[[ $EUID -eq 0 ]] || { echo "wal.sh: needs root (loop mount); run it with sudo" >&2; exit 1; }
command -v wrk >/dev/null || { echo "wal.sh: needs wrk (apt-get install wrk)" >&2; exit 1; }
((TRACE == 0)) || command -v perf >/dev/null || { echo "wal.sh: --trace needs perf" >&2; exit 1; }

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=bench/config.sh
source "$BENCH_DIR/config.sh"
REPO=$(cd "$BENCH_DIR/.." && pwd)
BIN="$REPO/target/release/upgate"
[[ -x $BIN && -f $REPO/target/release/libupgate_plugin_local.so ]] ||
    { echo "wal.sh: build first: cargo build --release -p upgate -p upgate-plugin-local" >&2; exit 1; }
PORT=${BENCH_UPGATE_PORT:-18090}
MNT=${BENCH_MNT:-/mnt/upgate-wal}
IMG="${BENCH_IMG_DIR:-/var/tmp}/upgate-wal.$$.img"
WORK=$(mktemp -d)
PID=""

cleanup() {
    [[ -z $PID ]] || { kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; }
    mountpoint -q "$MNT" && umount "$MNT"
    rm -f "$IMG"
    rm -rf "$WORK"
}
trap cleanup EXIT

for ((run = 1; run <= RUNS; run++)); do
    mountpoint -q "$MNT" && umount "$MNT"
    rm -f "$IMG"
    mkdir -p "$MNT"
    truncate -s 8G "$IMG"
    mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 "$IMG"
    mount -o loop,noatime "$IMG" "$MNT"
    mkdir -p "$MNT/data/files"
    upgate_bench_config "$WORK/upgate.yaml" "127.0.0.1:$PORT" null "$MNT/data" "$REPO/target/release" 4GiB
    sync
    "$BIN" serve --config "$WORK/upgate.yaml" >"$WORK/out.txt" 2>"$WORK/log.txt" &
    PID=$!
    for _ in $(seq 100); do grep -q 'listening on' "$WORK/out.txt" && break; sleep 0.1; done
    grep -q 'listening on' "$WORK/out.txt" || { cat "$WORK/out.txt" "$WORK/log.txt" >&2; exit 1; }
    TRACER=""
    if ((TRACE)); then
        timeout $((SECS + 3)) perf trace --duration 10 -p "$PID" -o "$WORK/trace.txt" >/dev/null 2>&1 &
        TRACER=$!
        sleep 1
    fi
    line=$(wrk -t2 -c32 -d"${SECS}s" --latency -s "$BENCH_DIR/upload.lua" "http://127.0.0.1:$PORT" \
        -- upgate bench-key 1024 | grep '^BENCH ')
    field() { sed -n "s/.*\b$1=\([0-9]*\).*/\1/p" <<<"$line"; }
    printf 'run %d: %d uploads in %d s (%d/s), p50 %.1f ms, p99 %.1f ms, max %.1f ms; ' "$run" \
        "$(field ok)" "$SECS" $(($(field ok) / SECS)) "$(field p50_us)e-3" "$(field p99_us)e-3" "$(field max_us)e-3"
    printf 'upgate.db %d MiB, WAL %d MiB\n' $(($(stat -c %s "$MNT/data/upgate.db") >> 20)) \
        $(($(stat -c %s "$MNT/data/upgate.db-wal" 2>/dev/null || echo 0) >> 20))
    if ((TRACE)); then
        wait "$TRACER" || true
        echo "  system calls over 10 ms (thread: call x count):"
        grep -v 'epoll_wait\|futex' "$WORK/trace.txt" |
            sed -n 's/.*): \([^/]*\)\/[0-9]* \([a-z0-9_]*\)(.*/\1: \2/p' | sort | uniq -c | sort -rn | sed 's/^/    /'
    fi
    kill "$PID"
    wait "$PID" 2>/dev/null || true
    PID=""
done
