#!/usr/bin/env bash
# The torture suite (tests/tests/torture.rs) for minutes instead of CI's seconds: the same
# tests, built in release mode, with a fresh random seed (printed) unless one is given.
#
#   bench/torture.sh [--minutes N] [--seed S] [--rounds N] [--loops N] [-- TEST-FILTER/ARGS...]
#
#   --minutes N   about how long one pass runs (default 5): the fuzzer gets 60% of it
#                 (UPGATE_TORTURE_SECS), and kill -9 rounds, tmpfs fill cycles and race rounds
#                 scale with it (UPGATE_TORTURE_ROUNDS = 6 per minute)
#   --seed S      UPGATE_TORTURE_SEED (decimal or 0x hex) of the first pass (default: random)
#   --rounds N    UPGATE_TORTURE_ROUNDS, overriding the one from --minutes
#   --loops N     passes, each with the next seed (default 1); stops at the first failure
#   -- ...        passed to the test binary, e.g. `-- fuzzed` to run only the fuzzer
#
# UPGATE_TORTURE_SEED, UPGATE_TORTURE_SECS and UPGATE_TORTURE_ROUNDS in the environment win.
# A failing test prints its seed and the command that reproduces it. Needs root (the tmpfs
# test mounts one); builds with CARGO_BUILD_JOBS=1 unless it is set.
set -euo pipefail

MINUTES=5
SEED=${UPGATE_TORTURE_SEED:-}
ROUNDS=${UPGATE_TORTURE_ROUNDS:-}
LOOPS=1
EXTRA=()
while [ $# -gt 0 ]; do
    case $1 in
        --minutes) MINUTES=$2; shift 2 ;;
        --seed) SEED=$2; shift 2 ;;
        --rounds) ROUNDS=$2; shift 2 ;;
        --loops) LOOPS=$2; shift 2 ;;
        --) shift; EXTRA=("$@"); break ;;
        -h | --help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "torture.sh: unknown argument: $1 (try --help)" >&2; exit 2 ;;
    esac
done
case $MINUTES in '' | *[!0-9]*) echo "torture.sh: --minutes takes a whole number" >&2; exit 2 ;; esac

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"

if [ -z "$SEED" ]; then
    SEED=0x$(od -An -N8 -tx8 /dev/urandom | tr -d ' \n')
fi
export CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-1}
export UPGATE_TORTURE_SECS=${UPGATE_TORTURE_SECS:-$((MINUTES * 36))}
export UPGATE_TORTURE_ROUNDS=${ROUNDS:-$((MINUTES * 6 > 3 ? MINUTES * 6 : 3))}

[ "$(id -u)" -eq 0 ] || echo "torture.sh: not root: the tmpfs test will fail (it mounts one)" >&2

seed=$((SEED))
for pass in $(seq 1 "$LOOPS"); do
    export UPGATE_TORTURE_SEED
    UPGATE_TORTURE_SEED=$(printf '0x%016x' "$seed")
    echo "==> pass $pass/$LOOPS: UPGATE_TORTURE_SEED=$UPGATE_TORTURE_SEED UPGATE_TORTURE_SECS=$UPGATE_TORTURE_SECS UPGATE_TORTURE_ROUNDS=$UPGATE_TORTURE_ROUNDS" >&2
    started=$(date +%s)
    if ! cargo test --release -p upgate-e2e --test torture -- "${EXTRA[@]}"; then
        echo "==> pass $pass failed; reproduce with:" >&2
        echo "    UPGATE_TORTURE_SEED=$UPGATE_TORTURE_SEED UPGATE_TORTURE_SECS=$UPGATE_TORTURE_SECS UPGATE_TORTURE_ROUNDS=$UPGATE_TORTURE_ROUNDS cargo test --release -p upgate-e2e --test torture" >&2
        exit 1
    fi
    echo "==> pass $pass passed in $(($(date +%s) - started)) s" >&2
    seed=$((seed + 1))
done
