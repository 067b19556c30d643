#!/usr/bin/env bash
# User-space instructions per small upload, this checkout vs a base revision, same run.
#
#   bench/instructions.sh [--base REV] [--requests-secs N] [--skip-build]
#
# Runs each daemon under valgrind's callgrind, warms it up, then counts the instructions it
# executes (all threads, plugins included, kernel excluded) while wrk sends 1 KiB Dify uploads
# over 4 connections, and divides by the uploads answered 2xx. Instruction counts do not
# depend on what else the machine is doing, so small changes show up where timings drown
# in noise. Under valgrind sha256 runs its portable code (no SHA-NI), which inflates every
# figure alike by about 65,000 instructions.
# BASE defaults to HEAD~1; it is built in a git worktree under target/bench-base.
set -euo pipefail

BASE=HEAD~1
SECS=10
SKIP_BUILD=0
while (($#)); do
    case $1 in
        --base) BASE=$2; shift ;;
        --requests-secs) SECS=$2; shift ;;
        --skip-build) SKIP_BUILD=1 ;;
        -h | --help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "instructions.sh: unknown argument: $1 (try --help)" >&2; exit 2 ;;
    esac
    shift
done

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=bench/config.sh
source "$BENCH_DIR/config.sh"
REPO=$(cd "$BENCH_DIR/.." && pwd)
cd "$REPO"
log() { printf '\033[1m==>\033[0m %s\n' "$*" >&2; }
die() { printf '\033[1;31mERROR:\033[0m %s\n' "$*" >&2; exit 1; }

missing=()
command -v valgrind >/dev/null 2>&1 || missing+=(valgrind)
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
if ((${#missing[@]})); then
    [[ $EUID -eq 0 ]] || die "missing ${missing[*]}; install it (apt-get install ${missing[*]})"
    log "apt-get install ${missing[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

BASE_SHA=$(git rev-parse --short "$BASE") || die "no such revision: $BASE"
BASE_TREE="$REPO/target/bench-base"
if [[ $SKIP_BUILD == 0 ]]; then
    log "building this checkout (release)"
    cargo build --release -p upgate -p upgate-plugin-local
    log "building $BASE ($BASE_SHA) in $BASE_TREE"
    if [[ -d $BASE_TREE ]]; then
        git -C "$BASE_TREE" checkout -q --detach "$BASE_SHA"
    else
        git worktree add -q --detach "$BASE_TREE" "$BASE_SHA"
    fi
    # The base's own target dir inside the worktree: its builds never touch this checkout's.
    (cd "$BASE_TREE" && cargo build --release -p upgate -p upgate-plugin-local)
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/upgate-instr.XXXXXX")
PID=""
cleanup() {
    [[ -n $PID ]] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT

measure() { # $1 = label, $2 = build dir (with upgate and the local plugin); prints instructions/upload
    local label=$1 build=$2 dir="$WORK/$1" out ok total
    mkdir -p "$dir/data/files"
    upgate_bench_config "$dir/upgate.yaml" 127.0.0.1:18095 127.0.0.1:19495 "$dir/data" "$build" 1MiB
    valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$dir/callgrind.out" \
        "$build/upgate" serve --config "$dir/upgate.yaml" >"$dir/out" 2>/dev/null &
    PID=$!
    local i
    for ((i = 0; i < 600; i++)); do
        grep -q 'listening on' "$dir/out" 2>/dev/null && break
        kill -0 "$PID" 2>/dev/null || die "$label: upgate exited during startup"
        sleep 0.1
    done
    wrk -t1 -c4 -d3s -s "$BENCH_DIR/upload.lua" http://127.0.0.1:18095 -- upgate bench-key 1024 >/dev/null
    callgrind_control -i on "$PID" >/dev/null
    out=$(wrk -t1 -c4 -d"${SECS}s" -s "$BENCH_DIR/upload.lua" http://127.0.0.1:18095 -- upgate bench-key 1024)
    callgrind_control -i off "$PID" >/dev/null
    kill -TERM "$PID"
    wait "$PID" 2>/dev/null || true
    PID=""
    ok=$(grep -o 'ok=[0-9]*' <<<"$out" | head -1 | cut -d= -f2)
    [[ -n $ok && $ok -gt 0 ]] || die "$label: no successful uploads: $out"
    grep -q 'bad=0 ' <<<"$out" || die "$label: some uploads failed: $(grep '^BENCH' <<<"$out")"
    total=$(callgrind_annotate "$dir/callgrind.out" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
    echo "$label $ok $((total / ok))"
}

log "measuring $BASE_SHA (base)"
read -r _ base_ok base_ir < <(measure base "$BASE_TREE/target/release")
log "measuring this checkout"
read -r _ head_ok head_ir < <(measure head "$REPO/target/release")

printf '\n%-28s | %8s | %22s\n' "build" "uploads" "instructions / upload"
printf '%-28s | %8s | %22s\n' "base $BASE_SHA" "$base_ok" "$base_ir"
printf '%-28s | %8s | %22s\n' "this checkout $(git rev-parse --short HEAD)$(git diff --quiet || echo '+dirty')" "$head_ok" "$head_ir"
awk -v h="$head_ir" -v b="$base_ir" 'BEGIN { printf "ratio this/base: %.3fx\n", h / b }'
