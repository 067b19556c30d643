#!/usr/bin/env bash
# upgate vs nginx (WebDAV PUT) upload benchmark; with --tus, upgate's tus endpoint vs rustus
# and @tus/server (bench/tus.sh). See bench/README.md.
#
#   bench/run.sh [--tus] [--quick] [--skip-build] [--keep-logs]
#
# Needs root (apt-get, loop-mounted scratch filesystem); re-runs itself with sudo when it can.
# Environment overrides: BENCH_UPGATE_PORT (18080), BENCH_METRICS_PORT (19464),
# BENCH_NGINX_PORT (18081), BENCH_RUSTUS_PORT (18082), BENCH_TUSNODE_PORT (18083),
# BENCH_MNT (/mnt/upgate-bench), BENCH_IMG_DIR (/var/tmp), BENCH_IMG_SIZE (8G), BENCH_REPS (2),
# BENCH_CONNS (32), BENCH_THREADS (2), BENCH_IDLE_WAIT (90),
# BENCH_DURABILITY (process_crash | power_loss), BENCH_RATE_LIMIT (1: give the plan a governor
# rate limit that is never reached, to measure its cost).
set -euo pipefail

QUICK=0
SKIP_BUILD=0
KEEP_LOGS=0
MODE=nginx
for arg in "$@"; do
    case $arg in
        --quick) QUICK=1 ;;
        --skip-build) SKIP_BUILD=1 ;;
        --keep-logs) KEEP_LOGS=1 ;;
        --tus) MODE=tus ;;
        -h | --help)
            sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "run.sh: unknown argument: $arg (try --help)" >&2
            exit 2
            ;;
    esac
done

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$BENCH_DIR/.." && pwd)
cd "$REPO"

log() { printf '\033[1m==>\033[0m %s\n' "$*" >&2; }
warn() { printf '\033[1;33mWARNING:\033[0m %s\n' "$*" >&2; }
die() {
    printf '\033[1;31mERROR:\033[0m %s\n' "$*" >&2
    exit 1
}

build() {
    # Only what the benchmark runs: the daemon and the local provider plugin. (A workspace-wide
    # build would also compile the test crates, which the benchmark does not need.)
    log "building upgate (release)"
    cargo build --release -p upgate -p upgate-plugin-local
}

# The tus workloads and servers (functions only; run directly, bench/tus.sh runs this script).
# shellcheck source=bench/tus.sh
source "$BENCH_DIR/tus.sh"

# Not root: build as the calling user (cargo/rustup live in their home), then re-run as root.
if [[ $EUID -ne 0 ]]; then
    if command -v sudo >/dev/null 2>&1; then
        [[ $SKIP_BUILD == 1 ]] || build
        # rustus and npm ci as the calling user too (cargo and npm caches live in their home).
        [[ $MODE == tus ]] && ensure_tus_servers
        args=(--skip-build)
        [[ $QUICK == 1 ]] && args+=(--quick)
        [[ $KEEP_LOGS == 1 ]] && args+=(--keep-logs)
        [[ $MODE == tus ]] && args+=(--tus)
        log "re-running as root via sudo"
        exec sudo env "PATH=$PATH" \
            ${BENCH_UPGATE_PORT:+BENCH_UPGATE_PORT=$BENCH_UPGATE_PORT} \
            ${BENCH_METRICS_PORT:+BENCH_METRICS_PORT=$BENCH_METRICS_PORT} \
            ${BENCH_NGINX_PORT:+BENCH_NGINX_PORT=$BENCH_NGINX_PORT} \
            ${BENCH_RUSTUS_PORT:+BENCH_RUSTUS_PORT=$BENCH_RUSTUS_PORT} \
            ${BENCH_TUSNODE_PORT:+BENCH_TUSNODE_PORT=$BENCH_TUSNODE_PORT} \
            ${BENCH_IDLE_WAIT:+BENCH_IDLE_WAIT=$BENCH_IDLE_WAIT} \
            ${BENCH_MNT:+BENCH_MNT=$BENCH_MNT} ${BENCH_IMG_DIR:+BENCH_IMG_DIR=$BENCH_IMG_DIR} \
            ${BENCH_IMG_SIZE:+BENCH_IMG_SIZE=$BENCH_IMG_SIZE} ${BENCH_REPS:+BENCH_REPS=$BENCH_REPS} \
            ${BENCH_CONNS:+BENCH_CONNS=$BENCH_CONNS} ${BENCH_THREADS:+BENCH_THREADS=$BENCH_THREADS} \
            bash "$BENCH_DIR/run.sh" "${args[@]}"
    fi
    warn "not root and no sudo: no package installs, no loop-mounted filesystem"
fi

UPGATE_PORT=${BENCH_UPGATE_PORT:-18080}
METRICS_PORT=${BENCH_METRICS_PORT:-19464}
NGINX_PORT=${BENCH_NGINX_PORT:-18081}
RUSTUS_PORT=${BENCH_RUSTUS_PORT:-18082}
TUSNODE_PORT=${BENCH_TUSNODE_PORT:-18083}
MNT=${BENCH_MNT:-/mnt/upgate-bench}
IMG_DIR=${BENCH_IMG_DIR:-/var/tmp}
IMG_SIZE=${BENCH_IMG_SIZE:-8G}
REPS=${BENCH_REPS:-2}
# upgate's durability mode (process_crash | power_loss) and whether its plan has a (never
# reached) governor rate limit, to measure what each costs.
DURABILITY=${BENCH_DURABILITY:-process_crash}
RATE_LIMIT=${BENCH_RATE_LIMIT:-0}
CONNS=${BENCH_CONNS:-32}
THREADS=${BENCH_THREADS:-2}
if [[ $QUICK == 1 ]]; then
    BIG_MIB=256
    LOAD_SECS=5
else
    BIG_MIB=1024
    LOAD_SECS=10
fi
SMALL_BYTES=1024
if ((BIG_MIB % 1024 == 0)); then BIG_LABEL="$((BIG_MIB / 1024))GiB"; else BIG_LABEL="${BIG_MIB}MiB"; fi

# ---------------------------------------------------------------------------------------------
# Tools
# ---------------------------------------------------------------------------------------------
APT_UPDATED=0
apt_install() {
    if [[ $EUID -ne 0 ]]; then die "missing $*; install it (apt-get install $*) or run as root"; fi
    command -v apt-get >/dev/null 2>&1 || die "missing $* and no apt-get to install it"
    if [[ $APT_UPDATED == 0 ]]; then
        log "apt-get update"
        apt-get update -qq
        APT_UPDATED=1
    fi
    log "apt-get install $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

nginx_has_dav() { command -v nginx >/dev/null 2>&1 && nginx -V 2>&1 | grep -q with-http_dav_module; }

ensure_tools() {
    local missing=()
    command -v curl >/dev/null 2>&1 || missing+=(curl)
    command -v wrk >/dev/null 2>&1 || missing+=(wrk)
    command -v mkfs.ext4 >/dev/null 2>&1 || missing+=(e2fsprogs)
    command -v sha256sum >/dev/null 2>&1 || missing+=(coreutils)
    command -v pgrep >/dev/null 2>&1 || missing+=(procps)
    if [[ $MODE == tus ]]; then
        if ((${#missing[@]})); then apt_install "${missing[@]}"; fi
        ensure_tus_servers
        return 0
    fi
    command -v nginx >/dev/null 2>&1 || missing+=(nginx)
    if ((${#missing[@]})); then apt_install "${missing[@]}"; fi
    if ! nginx_has_dav; then
        warn "this nginx lacks ngx_http_dav_module; trying nginx-extras"
        apt_install nginx-extras
        nginx_has_dav || die "nginx has no WebDAV module (nginx -V lacks with-http_dav_module)"
    fi
}

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# ---------------------------------------------------------------------------------------------
# State and cleanup
# ---------------------------------------------------------------------------------------------
WORK=""
IMG=""
USE_LOOP=0
FALLBACK_DIR=""
UPGATE_PID=""
NGINX_PID=""
SAMPLER_PIDS=()
BUSY_PHASES=()

stop_samplers() {
    local pid
    for pid in "${SAMPLER_PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    SAMPLER_PIDS=()
}

stop_upgate() {
    [[ -n $UPGATE_PID ]] || return 0
    if kill -0 "$UPGATE_PID" 2>/dev/null; then
        kill -TERM "$UPGATE_PID" 2>/dev/null || true
        local i
        for ((i = 0; i < 400; i++)); do
            kill -0 "$UPGATE_PID" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$UPGATE_PID" 2>/dev/null; then
            warn "upgate (pid $UPGATE_PID) ignored SIGTERM for 40 s; killing it"
            kill -KILL "$UPGATE_PID" 2>/dev/null || true
        fi
    fi
    wait "$UPGATE_PID" 2>/dev/null || true
    UPGATE_PID=""
}

stop_nginx() {
    [[ -n $NGINX_PID ]] || return 0
    if kill -0 "$NGINX_PID" 2>/dev/null; then
        kill -QUIT "$NGINX_PID" 2>/dev/null || true
        local i
        for ((i = 0; i < 200; i++)); do
            kill -0 "$NGINX_PID" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$NGINX_PID" 2>/dev/null; then
            kill -TERM "$NGINX_PID" 2>/dev/null || true
            sleep 1
            kill -KILL "$NGINX_PID" 2>/dev/null || true
        fi
    fi
    wait "$NGINX_PID" 2>/dev/null || true
    NGINX_PID=""
}

release_fs() {
    if [[ $USE_LOOP == 1 ]]; then
        if mountpoint -q "$MNT"; then
            umount "$MNT" 2>/dev/null || { sleep 1 && umount "$MNT"; } || umount -l "$MNT" || true
        fi
        [[ -n $IMG ]] && rm -f "$IMG"
    elif [[ -n $FALLBACK_DIR ]]; then
        rm -rf "$FALLBACK_DIR"
        FALLBACK_DIR=""
    fi
}

cleanup() {
    local rc=$?
    set +e
    stop_samplers
    stop_upgate
    stop_nginx
    stop_rustus
    stop_tusnode
    release_fs
    if [[ $USE_LOOP == 1 ]]; then rmdir "$MNT" 2>/dev/null; fi
    [[ -n $WORK ]] && rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------------------------------------
# A fresh filesystem for every measured phase (deleting many files on this machine makes later
# file creation slow, so nothing is measured on a filesystem that has seen deletions).
# ---------------------------------------------------------------------------------------------
DATA="" # root of the current scratch filesystem

setup_fs_mode() {
    if [[ $EUID -ne 0 || ${BENCH_NO_LOOP:-0} == 1 ]]; then
        warn "not root (or BENCH_NO_LOOP=1): using a fresh directory per phase instead of a loop-mounted ext4"
        return
    fi
    mkdir -p "$MNT" "$IMG_DIR"
    if mountpoint -q "$MNT"; then
        die "$MNT is already mounted (a leftover of an earlier run?); umount it first"
    fi
    IMG="$IMG_DIR/upgate-bench.$$.img"
    if truncate -s "$IMG_SIZE" "$IMG" 2>/dev/null &&
        mkfs.ext4 -q -F "$IMG" >/dev/null 2>&1 &&
        mount -o loop "$IMG" "$MNT" 2>/dev/null; then
        umount "$MNT"
        USE_LOOP=1
    else
        rm -f "$IMG"
        IMG=""
        warn "cannot loop-mount an ext4 image (no loop device / not allowed): using a fresh directory per phase instead; results are less repeatable"
    fi
}

fresh_fs() {
    if [[ $USE_LOOP == 1 ]]; then
        if mountpoint -q "$MNT"; then umount "$MNT"; fi
        rm -f "$IMG"
        truncate -s "$IMG_SIZE" "$IMG"
        # Initialise inode tables and journal now, so no ext4lazyinit writes during a measurement.
        mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 "$IMG" >/dev/null
        mount -o loop,noatime "$IMG" "$MNT"
        DATA=$MNT
    else
        [[ -n $FALLBACK_DIR ]] && rm -rf "$FALLBACK_DIR"
        FALLBACK_DIR=$(mktemp -d "$IMG_DIR/upgate-bench-data.XXXXXX")
        DATA=$FALLBACK_DIR
    fi
    sync
}

# ---------------------------------------------------------------------------------------------
# Servers
# ---------------------------------------------------------------------------------------------
UPGATE_BIN="$REPO/target/release/upgate"
PLUGIN_DIR="$REPO/target/release"

start_upgate() { # $1 = file for stderr (or /dev/null)
    local errlog=$1
    mkdir -p "$DATA/upgate-data/files"
    cat >"$WORK/upgate.yaml" <<EOF
server:
  listen: 127.0.0.1:$UPGATE_PORT
  metrics_listen: 127.0.0.1:$METRICS_PORT
  data_dir: $DATA/upgate-data
  plugin_dir: $PLUGIN_DIR
  log_format: text
  disk_free_floor: 64MiB
  durability: $DURABILITY
plans:
  bench: { max_file_size: 4GiB$( ((RATE_LIMIT)) && echo ", rate_limit: { requests_per_second: 1000000, burst: 1000000 }") }
providers:
  disk: { plugin: local, settings: { root: $DATA/upgate-data/files } }
tenants:
  bench: { plan: bench, provider: disk, keys: [bench-key] }
EOF
    : >"$WORK/upgate.out"
    "$UPGATE_BIN" serve --config "$WORK/upgate.yaml" >"$WORK/upgate.out" 2>"$errlog" &
    UPGATE_PID=$!
    local i
    for ((i = 0; i < 300; i++)); do
        if grep -q 'upgate: listening on' "$WORK/upgate.out"; then
            "$BENCH_DIR/rss.sh" "$UPGATE_PID" "$WORK/rss-upgate.txt" &
            SAMPLER_PIDS+=($!)
            return 0
        fi
        if ! kill -0 "$UPGATE_PID" 2>/dev/null; then
            cat "$WORK/upgate.out" >&2
            [[ $errlog != /dev/null ]] && tail -20 "$errlog" >&2
            UPGATE_PID=""
            die "upgate exited during startup"
        fi
        sleep 0.1
    done
    die "upgate did not print 'listening on' within 30 s"
}

start_nginx() {
    local prefix="$WORK/nginx"
    mkdir -p "$prefix/tmp" "$DATA/nginx/bench" "$DATA/nginx-body"
    cat >"$prefix/nginx.conf" <<EOF
# Generated by bench/run.sh: WebDAV PUT baseline.
user root;
worker_processes 2;
pid $prefix/nginx.pid;
error_log $prefix/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    sendfile on;
    keepalive_requests 1000000;
    client_max_body_size 0;
    # The request body is spooled here, on the same filesystem, then renamed into place.
    client_body_temp_path $DATA/nginx-body;
    proxy_temp_path $prefix/tmp/proxy;
    fastcgi_temp_path $prefix/tmp/fastcgi;
    uwsgi_temp_path $prefix/tmp/uwsgi;
    scgi_temp_path $prefix/tmp/scgi;
    server {
        listen 127.0.0.1:$NGINX_PORT;
        root $DATA/nginx;
        location / {
            dav_methods PUT;
            create_full_put_path on;
            dav_access user:rw group:r all:r;
        }
    }
}
EOF
    nginx -e "$prefix/error.log" -c "$prefix/nginx.conf" -p "$prefix/" -g 'daemon off;' 2>>"$prefix/stderr.log" &
    NGINX_PID=$!
    local i
    for ((i = 0; i < 100; i++)); do
        if curl -s -o /dev/null "http://127.0.0.1:$NGINX_PORT/" 2>/dev/null && [[ -n $(nginx_workers) ]]; then
            local w
            for w in $(nginx_workers); do
                "$BENCH_DIR/rss.sh" "$w" "$WORK/rss-nginx-$w.txt" &
                SAMPLER_PIDS+=($!)
            done
            return 0
        fi
        if ! kill -0 "$NGINX_PID" 2>/dev/null; then
            cat "$prefix/stderr.log" "$prefix/error.log" >&2 2>/dev/null || true
            NGINX_PID=""
            die "nginx exited during startup"
        fi
        sleep 0.1
    done
    die "nginx did not answer within 10 s"
}

nginx_workers() { pgrep -P "$NGINX_PID" 2>/dev/null || true; }

hwm_kib() { # VmHWM of a pid, 0 when gone
    awk '/^VmHWM:/ {print $2; found=1} END {if (!found) print 0}' "/proc/$1/status" 2>/dev/null || echo 0
}

# Peak RSS in KiB of the running server: upgate's and rustus' VmHWM; for nginx and
# @tus/server the sum of their workers'.
server_peak_kib() {
    local total=0 w workers
    case $1 in
        upgate) hwm_kib "$UPGATE_PID" ;;
        rustus) hwm_kib "$RUSTUS_PID" ;;
        *)
            if [[ $1 == nginx ]]; then workers=$(nginx_workers); else workers=$(tusnode_workers); fi
            for w in $workers; do total=$((total + $(hwm_kib "$w"))); done
            echo "$total"
            ;;
    esac
}

# The processes of a running server (for CPU time): upgate's and rustus' one process, nginx's
# master and workers, @tus/server's cluster primary and workers.
server_pids() { # $1 = server
    case $1 in
        upgate) echo "$UPGATE_PID" ;;
        rustus) echo "$RUSTUS_PID" ;;
        nginx) [[ -z $NGINX_PID ]] || echo "$NGINX_PID $(nginx_workers | tr '\n' ' ')" ;;
        tusnode) [[ -z $TUSNODE_PID ]] || echo "$TUSNODE_PID $(pgrep -P "$TUSNODE_PID" 2>/dev/null | tr '\n' ' ')" ;;
    esac
}

start_server() { # $1 = nginx|upgate|rustus|tusnode, $2 = file for the server's log (or /dev/null)
    case $1 in
        upgate) start_upgate "$2" ;;
        nginx) start_nginx ;;
        rustus) start_rustus "$2" ;;
        tusnode) start_tusnode "$2" ;;
    esac
}
stop_server() {
    case $1 in
        upgate) stop_upgate ;;
        nginx) stop_nginx ;;
        rustus) stop_rustus ;;
        tusnode) stop_tusnode ;;
    esac
    stop_samplers
}

# ---------------------------------------------------------------------------------------------
# Helpers for numbers
# ---------------------------------------------------------------------------------------------
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b + 0 == 0) print "n/a"; else printf "%.2fx", a / b }'; }
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
ms() { awk -v u="$1" 'BEGIN { printf "%.2f", u / 1000 }'; }
field() { sed -n "s/.*[[:space:]]$1=\([^[:space:]]*\).*/\1/p" <<<" $2" | head -1; }

INTEGRITY_OK=1
PROBLEMS=()
problem() {
    INTEGRITY_OK=0
    PROBLEMS+=("$*")
    printf '\033[1;31m!!! %s\033[0m\n' "$*" >&2
}

# ---------------------------------------------------------------------------------------------
# Other people's CPU use during a measurement. A snapshot is: total jiffies, busy jiffies not
# owned by a process (irq, softirq, steal), jiffies of kernel threads (loop, writeback, ...),
# and jiffies of our own processes: this shell (its reaped children: curl, wrk), the server,
# the RSS samplers. What is left of the busy time was used by someone else.
# ---------------------------------------------------------------------------------------------
cpu_snapshot() {
    local ours=" $$ ${SAMPLER_PIDS[*]} " server
    for server in upgate nginx rustus tusnode; do ours+=" $(server_pids "$server" | tr '\n' ' ') "; done
    # (Processes come and go while this reads them: cat skips the vanished ones.)
    { head -1 /proc/stat; cat /proc/[0-9]*/stat 2>/dev/null || true; } | awk -v ours="$ours" '
        $1 == "cpu" {
            for (i = 2; i <= 9 && i <= NF; i++) total += $i
            busy = total - $5 - $6; unowned = $7 + $8 + $9
            next
        }
        $1 ~ /^[0-9]+$/ {
            pid = $1; line = $0; sub(/^.*\) /, "", line); split(line, f, " ")
            # f[1] = state, f[2] = ppid, f[12..15] = utime stime cutime cstime
            if (f[2] == 2 || pid == 2) kthreads += f[12] + f[13]
            else if (index(ours, " " pid " ")) mine += f[12] + f[13] + f[14] + f[15]
        }
        END { printf "%d %d %d %d %d\n", total, busy, unowned, kthreads, mine }
    '
}
PHASE_SNAP=""
phase_begin() { PHASE_SNAP=$(cpu_snapshot); }
phase_end() { # $1 = phase name; prints the foreign CPU share and remembers noisy phases
    local now foreign
    now=$(cpu_snapshot)
    foreign=$(awk -v a="$PHASE_SNAP" -v b="$now" 'BEGIN {
        split(a, x, " "); split(b, y, " "); t = y[1] - x[1]
        other = (y[2] - x[2]) - (y[3] - x[3]) - (y[4] - x[4]) - (y[5] - x[5])
        if (t <= 0 || other < 0) other = 0
        printf "%.0f", (t > 0 ? 100 * other / t : 0) }')
    if ((foreign > 10)); then
        warn "$1: other processes used ${foreign}% of the CPU during the measurement (noisy)"
        BUSY_PHASES+=("$1 (${foreign}% during)")
    fi
}

# ---------------------------------------------------------------------------------------------
# Workload A: one big file
# ---------------------------------------------------------------------------------------------
declare -A A_RATE A_PEAK A_RUNS
# Phase names in messages and the NOISY line.
if [[ $MODE == tus ]]; then PHASE_A="tus big" PHASE_B="tus small" LOG_PREFIX=tus-; else PHASE_A=A PHASE_B=B LOG_PREFIX=""; fi

# The warm-up before a measured big upload: one 1 MiB upload of the same kind, not measured.
warm_up_big() { # $1 = server
    case $MODE:$1 in
        nginx:nginx) curl -sS -o /dev/null -T "$WARM" "http://127.0.0.1:$NGINX_PORT/bench/warm.bin" || true ;;
        nginx:upgate)
            curl -sS -o /dev/null -H 'Authorization: Bearer bench-key' -F "file=@$WARM" \
                "http://127.0.0.1:$UPGATE_PORT/v1/files/upload" || true
            ;;
        tus:*) tus_send_big "$1" "$WARM" warm.bin "$PHASE_A warm-up" ;;
    esac
}

# Uploads $SRC. Sets BIG_CODE and BIG_TIME (HTTP status and curl's time_total of the upload)
# and BIG_STORED (the stored file's path once the upload succeeded; "" when unknown).
send_big() { # $1 = server, $2 = rep
    local out id rsize
    BIG_STORED=""
    case $MODE:$1 in
        nginx:nginx)
            out=$(curl -sS -o "$WORK/resp" -w '%{http_code} %{time_total} %{size_upload}' -T "$SRC" \
                "http://127.0.0.1:$NGINX_PORT/bench/big-$2.bin") || true
            BIG_STORED="$DATA/nginx/bench/big-$2.bin"
            ;;
        nginx:upgate)
            out=$(curl -sS -o "$WORK/resp" -w '%{http_code} %{time_total} %{size_upload}' \
                -H 'Authorization: Bearer bench-key' -F "file=@$SRC" "http://127.0.0.1:$UPGATE_PORT/v1/files/upload") || true
            id=$(grep -o '"id":"[^"]*"' "$WORK/resp" | head -1 | cut -d'"' -f4)
            BIG_STORED="$DATA/upgate-data/files/$id"
            rsize=$(grep -o '"size":[0-9]*' "$WORK/resp" | head -1 | cut -d: -f2)
            if [[ $out == 2* && $rsize != "$SRC_BYTES" ]]; then
                problem "A upgate run $2: response size $rsize != $SRC_BYTES"
            fi
            ;;
        tus:*)
            tus_send_big "$1" "$SRC" "big-$2.bin" "$PHASE_A run $2"
            return 0
            ;;
    esac
    read -r BIG_CODE BIG_TIME _ <<<"${out:-000 0 0}"
}

# CPU accounting. Every process of a phase (client and server) shares the machine's cores, so
# a phase whose processes need C CPU seconds in all cannot take less than C / cores however
# well they overlap: the report turns each server's CPU into the best ratio the cores allow.
declare -A A_CPU A_CLIENT_CPU
CLK_TCK=$(getconf CLK_TCK)
CORES=$(nproc)
# CPU ticks (user + system) the server has used so far: all its processes (server_pids).
server_cpu_ticks() {
    local pid total=0
    for pid in $(server_pids "$1"); do
        total=$((total + $(awk '{print $14 + $15}' "/proc/$pid/stat" 2>/dev/null || echo 0)))
    done
    echo "$total"
}
# CPU ticks of this script's finished children (curl, wrk) so far.
client_cpu_ticks() { awk '{print $16 + $17}' "/proc/$$/stat"; }
ticks_to_s() { awk -v t="$1" -v hz="$CLK_TCK" 'BEGIN { printf "%.2f", t / hz }'; }

big_upload() { # $1 = server, $2 = rep
    local server=$1 rep=$2 code time stored rate peak
    local name=${TUS_NAME[$server]:-$server}
    fresh_fs
    local errlog="$WORK/$server-A-$rep.log"
    wait_idle "$PHASE_A $name run $rep"
    start_server "$server" "$errlog"
    warm_up_big "$server"
    sync
    local server_before client_before
    server_before=$(server_cpu_ticks "$server") client_before=$(client_cpu_ticks)
    phase_begin
    send_big "$server" "$rep"
    phase_end "$PHASE_A $name run $rep"
    local server_cpu client_cpu
    server_cpu=$(ticks_to_s $(($(server_cpu_ticks "$server") - server_before)))
    client_cpu=$(ticks_to_s $(($(client_cpu_ticks) - client_before)))
    code=$BIG_CODE time=$BIG_TIME stored=$BIG_STORED
    peak=$(server_peak_kib "$server")
    rate=$(awk -v b="$SRC_BYTES" -v t="$time" 'BEGIN { if (t > 0) printf "%.1f", b / 1048576 / t; else print 0 }')
    if [[ $code != 2?? ]]; then
        [[ $MODE == tus ]] || problem "A $server run $rep: HTTP $code: $(head -c 300 "$WORK/resp" 2>/dev/null)"
        rate=0
    else
        stop_server "$server" # drain before verifying what is on disk
        if [[ ! -f $stored ]]; then
            problem "$PHASE_A $name run $rep: stored file ${stored:-?} missing"
            rate=0
        else
            local sum
            sum=$(sha256sum "$stored" | cut -d' ' -f1)
            if [[ $sum != "$SRC_SHA" ]]; then
                problem "$PHASE_A $name run $rep: sha256 mismatch ($sum != $SRC_SHA)"
                rate=0
            else
                echo "    sha256 ok ($stored)" >&2
            fi
        fi
    fi
    stop_server "$server"
    if [[ $server == upgate && -f $errlog ]]; then
        if grep -qiE ' (ERROR|WARN) ' "$errlog"; then
            warn "upgate logged warnings/errors in run A$rep:"
            grep -iE ' (ERROR|WARN) ' "$errlog" | head -5 >&2
        fi
    fi
    [[ $KEEP_LOGS == 1 && -f $errlog ]] && cp "$errlog" "$RESULTS/logs/$LOG_PREFIX$server-A-$rep.log"
    printf '    %-11s run %d: HTTP %s, %s s, %s MiB/s, peak RSS %s MiB, CPU %s s (client %s s)\n' \
        "$name" "$rep" "$code" "$time" "$rate" "$(mib "$peak")" "$server_cpu" "$client_cpu" >&2
    A_RUNS[$server]+="${A_RUNS[$server]:+ / }$rate"
    if awk -v a="$rate" -v b="${A_RATE[$server]:-0}" 'BEGIN { exit !(a > b) }'; then
        A_RATE[$server]=$rate A_CPU[$server]=$server_cpu A_CLIENT_CPU[$server]=$client_cpu
    fi
    if ((peak > ${A_PEAK[$server]:-0})); then A_PEAK[$server]=$peak; fi
}

# ---------------------------------------------------------------------------------------------
# Workload B: many small files
# ---------------------------------------------------------------------------------------------
declare -A B_RATE B_P50 B_P99 B_PEAK B_OK B_BAD B_STORED B_CPU B_CLIENT_CPU

# What wrk loads: sets LOAD_URL, LOAD_SCRIPT and LOAD_ARGS (the Lua script's arguments).
load_target() { # $1 = server
    case $MODE:$1 in
        nginx:nginx) LOAD_URL="http://127.0.0.1:$NGINX_PORT" LOAD_SCRIPT=upload.lua LOAD_ARGS=(nginx "$SMALL_BYTES") ;;
        nginx:upgate) LOAD_URL="http://127.0.0.1:$UPGATE_PORT" LOAD_SCRIPT=upload.lua LOAD_ARGS=(upgate bench-key "$SMALL_BYTES") ;;
        tus:upgate) LOAD_URL="http://127.0.0.1:$UPGATE_PORT" LOAD_SCRIPT=tus.lua LOAD_ARGS=(/files/ "$SMALL_BYTES" bench-key) ;;
        tus:*) LOAD_URL="http://127.0.0.1:$(tus_port "$1")" LOAD_SCRIPT=tus.lua LOAD_ARGS=(/files/ "$SMALL_BYTES") ;;
    esac
}

# The files a server stored for the small uploads, once stopped: prints "ALL COMPLETE LEFTOVERS"
# (COMPLETE: the files of the full size; LEFTOVERS: temp/spool files that must not stay).
small_stored() { # $1 = server
    local all leftovers
    case $MODE:$1 in
        nginx:nginx)
            all=$(find "$DATA/nginx/bench" -type f | wc -l)
            leftovers=$(find "$DATA/nginx-body" -type f | wc -l)
            echo "$all $all $leftovers"
            ;;
        nginx:upgate)
            all=$(find "$DATA/upgate-data/files" -type f | wc -l)
            leftovers=$(find "$DATA/upgate-data/spool" -type f 2>/dev/null | wc -l)
            echo "$all $all $leftovers"
            ;;
        tus:*) tus_stored_counts "$1" ;;
    esac
}

small_load() { # $1 = server
    local server=$1 wrkout line ok bad dur all stored leftovers peak errlog=/dev/null warm=0
    local name=${TUS_NAME[$server]:-$server}
    fresh_fs
    [[ $KEEP_LOGS == 1 && ($server != nginx) ]] && errlog="$RESULTS/logs/$LOG_PREFIX$server-B.log"
    wait_idle "$PHASE_B $name"
    start_server "$server" "$errlog"
    if [[ $MODE == tus ]]; then
        # Warm-up, and a check of the answer's shape: one upload like wrk's, not measured (and
        # not counted: its file is taken off the files stored).
        tus_extensions "$server"
        tus_create_with_upload "$server" "$SMALL" warm.bin "$PHASE_B warm-up"
        warm=1
    fi
    sync
    load_target "$server"
    wrkout="$WORK/wrk-$LOG_PREFIX$server.txt"
    local cpu_before cpu_after client_before client_after
    cpu_before=$(server_cpu_ticks "$server") client_before=$(client_cpu_ticks)
    phase_begin
    wrk -t"$THREADS" -c"$CONNS" -d"${LOAD_SECS}s" --latency -s "$BENCH_DIR/$LOAD_SCRIPT" "$LOAD_URL" -- "${LOAD_ARGS[@]}" \
        >"$wrkout" 2>&1 || problem "$PHASE_B $name: wrk exited non-zero: $(tail -3 "$wrkout")"
    phase_end "$PHASE_B $name"
    cpu_after=$(server_cpu_ticks "$server") client_after=$(client_cpu_ticks)
    [[ $KEEP_LOGS == 1 ]] && cp "$wrkout" "$RESULTS/logs/"
    line=$(grep '^BENCH ' "$wrkout" | head -1 || true)
    [[ -n $line ]] || {
        cat "$wrkout" >&2
        die "$PHASE_B $name: no BENCH line in wrk output"
    }
    peak=$(server_peak_kib "$server")
    stop_server "$server" # graceful: requests in flight at the cut-off finish first
    ok=$(field ok "$line")
    bad=$(field bad "$line")
    dur=$(field duration_us "$line")
    read -r all stored leftovers <<<"$(small_stored "$server")"
    all=$((all - warm)) stored=$((stored - warm))
    B_RATE[$server]=$(awk -v n="$ok" -v d="$dur" 'BEGIN { printf "%.0f", n / (d / 1e6) }')
    B_P50[$server]=$(field p50_us "$line")
    B_P99[$server]=$(field p99_us "$line")
    B_PEAK[$server]=$peak
    B_CPU[$server]=$(awk -v t=$((cpu_after - cpu_before)) -v hz="$CLK_TCK" -v n="$ok" \
        'BEGIN { if (n > 0) printf "%.0f", t * 1e6 / hz / n; else print 0 }')
    B_CLIENT_CPU[$server]=$(awk -v t=$((client_after - client_before)) -v hz="$CLK_TCK" -v n="$ok" \
        'BEGIN { if (n > 0) printf "%.0f", t * 1e6 / hz / n; else print 0 }')
    B_OK[$server]=$ok
    B_BAD[$server]=$bad
    B_STORED[$server]=$stored
    printf '    %-6s %s uploads/s, 2xx %s, non-2xx %s, files stored %s, temp/spool leftovers %s, p50 %s ms, p99 %s ms, peak RSS %s MiB\n' \
        "$name" "${B_RATE[$server]}" "$ok" "$bad" "$stored" "$leftovers" "$(ms "${B_P50[$server]}")" \
        "$(ms "${B_P99[$server]}")" "$(mib "$peak")" >&2
    printf '    %-6s wrk: %s\n' "$name" "${line#BENCH }" >&2
    if ((bad > 0)); then
        problem "$PHASE_B $name: $bad bad answers (first: HTTP $(field first_bad_status "$line")): $(grep '^BENCH_FIRST_BAD_BODY' "$wrkout" | cut -d' ' -f2-)"
    fi
    local socket_errors
    socket_errors=$(($(field err_connect "$line") + $(field err_read "$line") + $(field err_write "$line") + $(field err_timeout "$line")))
    ((socket_errors == 0)) || warn "$PHASE_B $name: wrk socket errors: connect=$(field err_connect "$line") read=$(field err_read "$line") write=$(field err_write "$line") timeout=$(field err_timeout "$line")"
    # wrk drops the connections that are mid-request when the time is up; the server may still
    # finish those uploads, so up to one extra file per connection is expected (for a tus server
    # that writes as the body arrives, possibly a short one).
    if ((stored < ok)); then
        problem "$PHASE_B $name: LOST FILES: $ok uploads answered 2xx but only $stored complete files are stored"
    elif ((all > ok + CONNS)); then
        problem "$PHASE_B $name: LEAKED FILES: $all files stored for $ok 2xx answers (more than the $CONNS in flight at the cut-off)"
    elif ((all > ok)); then
        echo "    ($((all - ok)) more files than 2xx answers, $((all - stored)) of them short: uploads in flight when wrk stopped)" >&2
    fi
    ((leftovers == 0)) || problem "$PHASE_B $name: $leftovers temp/spool files left behind after a graceful stop"
}

# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
RESULTS="$BENCH_DIR/results"
mkdir -p "$RESULTS"
[[ -f $RESULTS/.gitignore ]] || printf '*\n!.gitignore\n' >"$RESULTS/.gitignore"
[[ $KEEP_LOGS == 1 ]] && mkdir -p "$RESULTS/logs"

ensure_tools
if [[ $SKIP_BUILD == 0 ]]; then build; fi
[[ -x $UPGATE_BIN ]] || die "$UPGATE_BIN missing (build it, or drop --skip-build)"
[[ -f $PLUGIN_DIR/libupgate_plugin_local.so ]] || die "$PLUGIN_DIR/libupgate_plugin_local.so missing"
if [[ $MODE == tus ]]; then
    SERVERS=(upgate rustus tusnode)
    PORTS=("$UPGATE_PORT" "$METRICS_PORT" "$RUSTUS_PORT" "$TUSNODE_PORT")
else
    SERVERS=(nginx upgate)
    PORTS=("$UPGATE_PORT" "$METRICS_PORT" "$NGINX_PORT")
fi
for port in "${PORTS[@]}"; do
    port_busy "$port" && die "port $port is in use (set BENCH_UPGATE_PORT / BENCH_METRICS_PORT / BENCH_NGINX_PORT / BENCH_RUSTUS_PORT / BENCH_TUSNODE_PORT)"
done

# How busy the machine is without us: CPU use over one second, from /proc/stat.
cpu_busy_pct() {
    local a b
    a=$(head -1 /proc/stat)
    sleep 1
    b=$(head -1 /proc/stat)
    awk -v a="$a" -v b="$b" 'BEGIN {
        n = split(a, x); split(b, y); total = 0
        for (i = 2; i <= 9 && i <= n; i++) total += y[i] - x[i]
        idle = (y[5] - x[5]) + (y[6] - x[6])
        if (total > 0) printf "%.0f", 100 * (total - idle) / total; else print 0 }'
}
# Before every measured phase: wait (up to BENCH_IDLE_WAIT s, default 90) for the CPU to be
# under 15 % busy for a second, so other people's builds and tests do not skew a measurement.
IDLE_WAIT=${BENCH_IDLE_WAIT:-90}
wait_idle() { # $1 = phase name
    local start=$SECONDS busy
    while :; do
        busy=$(cpu_busy_pct)
        ((busy < 15)) && return 0
        if ((SECONDS - start >= IDLE_WAIT)); then
            warn "$1: the machine is still ${busy}% busy after ${IDLE_WAIT} s of waiting; measuring anyway (noisy)"
            ps -eo pcpu,pid,etime,comm --sort=-pcpu | sed -n '1,5p' >&2
            BUSY_PHASES+=("$1 (${busy}%)")
            return 0
        fi
        if ((SECONDS - start < 2)); then echo "    waiting for the machine to go idle (${busy}% busy)..." >&2; fi
    done
}
LOAD_BEFORE="$(cpu_busy_pct)% cpu busy"

WORK=$(mktemp -d "$IMG_DIR/upgate-bench-work.XXXXXX")
setup_fs_mode

SRC="$WORK/big.bin"
log "generating $BIG_MIB MiB of random data"
head -c "$((BIG_MIB * 1024 * 1024))" /dev/urandom >"$SRC"
SRC_BYTES=$(stat -c %s "$SRC")
SRC_SHA=$(sha256sum "$SRC" | cut -d' ' -f1) # also leaves it in the page cache
WARM="$WORK/warm.bin"
head -c 1048576 "$SRC" >"$WARM"
SMALL="$WORK/small.bin"
head -c "$SMALL_BYTES" "$SRC" >"$SMALL"

if [[ $MODE == tus ]]; then
    log "tus big: one $BIG_LABEL upload (creation POST + one PATCH), $REPS runs per server, fresh filesystem and server each run"
else
    log "workload A: one $BIG_LABEL upload, $REPS runs per server, fresh filesystem and server each run"
fi
for rep in $(seq 1 "$REPS"); do
    for server in "${SERVERS[@]}"; do big_upload "$server" "$rep"; done
done

if [[ $MODE == tus ]]; then
    log "tus small: $SMALL_BYTES-byte creation-with-upload POSTs, $CONNS connections, $THREADS wrk threads, ${LOAD_SECS} s"
else
    log "workload B: $SMALL_BYTES-byte uploads, $CONNS connections, $THREADS wrk threads, ${LOAD_SECS} s"
fi
for server in "${SERVERS[@]}"; do small_load "$server"; done

if [[ $MODE == tus ]]; then
    echo
    tus_report | tee "$RESULTS/latest-tus.txt"
    echo
    log "written to ${RESULTS#"$REPO"/}/latest-tus.txt"
    [[ $INTEGRITY_OK == 1 ]]
    exit
fi

# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
small_label="1KiB x$CONNS"
((SMALL_BYTES == 1024)) || small_label="${SMALL_BYTES}B x$CONNS"
row() { printf '%-22s | %-16s | %15s | %15s | %s\n' "$@"; }
report() {
    echo "upgate upload benchmark — $(date -u '+%Y-%m-%d %H:%M UTC'), git $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$REPO" diff --quiet HEAD -- crates plugins 2>/dev/null || echo '+dirty')"
    echo "mode: $([[ $QUICK == 1 ]] && echo quick || echo full); $(nproc) cores; kernel $(uname -r); nginx $(nginx -v 2>&1 | sed 's|.*nginx/||'); $(wrk --version 2>&1 | head -1 | awk '{print $1, $2}'); before the run: $LOAD_BEFORE"
    if ((${#BUSY_PHASES[@]})); then
        echo "NOISY: other processes used the CPU in: ${BUSY_PHASES[*]}; re-run on an idle machine"
    fi
    echo "filesystem: $([[ $USE_LOOP == 1 ]] && echo "fresh loop-mounted ext4 ($IMG_SIZE) per phase" || echo "fresh directory per phase in $IMG_DIR (NO loop mount)")"
    echo
    row "workload" "metric" "nginx" "upgate" "upgate/nginx"
    row "----------------------" "----------------" "---------------" "---------------" "------------"
    row "$BIG_LABEL x1 (best of $REPS)" "MiB/s" "${A_RATE[nginx]:-0}" "${A_RATE[upgate]:-0}" "$(ratio "${A_RATE[upgate]:-0}" "${A_RATE[nginx]:-0}")"
    row "$BIG_LABEL x1" "MiB/s, each run" "${A_RUNS[nginx]:-}" "${A_RUNS[upgate]:-}" ""
    row "$BIG_LABEL x1" "peak RSS MiB" "$(mib "${A_PEAK[nginx]:-0}")" "$(mib "${A_PEAK[upgate]:-0}")" "$(ratio "${A_PEAK[upgate]:-0}" "${A_PEAK[nginx]:-0}")"
    row "$BIG_LABEL x1" "CPU s (+curl's)" "${A_CPU[nginx]:-0} (+${A_CLIENT_CPU[nginx]:-0})" "${A_CPU[upgate]:-0} (+${A_CLIENT_CPU[upgate]:-0})" "$(ratio "${A_CPU[upgate]:-0}" "${A_CPU[nginx]:-0}")"
    row "$small_label" "uploads/s" "${B_RATE[nginx]}" "${B_RATE[upgate]}" "$(ratio "${B_RATE[upgate]}" "${B_RATE[nginx]}")"
    row "$small_label" "p50 latency ms" "$(ms "${B_P50[nginx]}")" "$(ms "${B_P50[upgate]}")" "$(ratio "${B_P50[upgate]}" "${B_P50[nginx]}")"
    row "$small_label" "p99 latency ms" "$(ms "${B_P99[nginx]}")" "$(ms "${B_P99[upgate]}")" "$(ratio "${B_P99[upgate]}" "${B_P99[nginx]}")"
    row "$small_label" "2xx / non-2xx" "${B_OK[nginx]}/${B_BAD[nginx]}" "${B_OK[upgate]}/${B_BAD[upgate]}" ""
    row "$small_label" "files stored" "${B_STORED[nginx]}" "${B_STORED[upgate]}" ""
    row "$small_label" "CPU us/upload" "${B_CPU[nginx]}" "${B_CPU[upgate]}" "$(ratio "${B_CPU[upgate]}" "${B_CPU[nginx]}")"
    row "$small_label" "wrk CPU us/upload" "${B_CLIENT_CPU[nginx]}" "${B_CLIENT_CPU[upgate]}" ""
    row "$small_label" "peak RSS MiB" "$(mib "${B_PEAK[nginx]}")" "$(mib "${B_PEAK[upgate]}")" "$(ratio "${B_PEAK[upgate]}" "${B_PEAK[nginx]}")"
    echo
    echo "nginx peak RSS = sum of its 2 workers' VmHWM; upgate = the daemon's VmHWM (fresh process per run)."
    echo
    local small_ratio big_ratio rss_peak
    small_ratio=$(awk -v a="${B_RATE[upgate]}" -v b="${B_RATE[nginx]}" 'BEGIN { if (b > 0) printf "%.3f", a / b; else print 0 }')
    big_ratio=$(awk -v a="${A_RATE[upgate]:-0}" -v b="${A_RATE[nginx]:-0}" 'BEGIN { if (b > 0) printf "%.3f", a / b; else print 0 }')
    rss_peak=${A_PEAK[upgate]:-0}
    ((${B_PEAK[upgate]:-0} > rss_peak)) && rss_peak=${B_PEAK[upgate]}
    verdict() { if awk "BEGIN { exit !($1) }"; then echo PASS; else echo FAIL; fi; }
    echo "targets:"
    printf '  %-4s %s uploads/s >= 1.0x nginx (auth + sha256 + SQLite record per upload): %sx\n' \
        "$(verdict "$small_ratio >= 1.0")" "$small_label" "$small_ratio"
    printf '  %-4s %s MiB/s >= 0.9x nginx: %sx\n' "$(verdict "$big_ratio >= 0.9")" "$BIG_LABEL" "$big_ratio"
    # The ratios the cores allow: upgate's phase cannot take less than the CPU it and its
    # client used, divided by the cores (CPU accounting, above).
    printf '       best ratios %s cores allow with the CPU upgate and its client used: %s %sx, %s %sx\n' "$CORES" \
        "$small_label" "$(awk -v u="${B_CPU[upgate]}" -v c="${B_CLIENT_CPU[upgate]}" -v n="${B_RATE[nginx]}" -v k="$CORES" \
            'BEGIN { if (u + c > 0 && n > 0) printf "%.2f", k * 1e6 / (u + c) / n; else print "?" }')" \
        "$BIG_LABEL" "$(awk -v u="${A_CPU[upgate]:-0}" -v c="${A_CLIENT_CPU[upgate]:-0}" -v n="${A_RATE[nginx]:-0}" -v b="$SRC_BYTES" -v k="$CORES" \
            'BEGIN { if (u + c > 0 && n > 0) printf "%.2f", b / 1048576 / ((u + c) / k) / n; else print "?" }')"
    printf '  %-4s upgate peak RSS < 64 MiB: %s MiB\n' "$(verdict "$rss_peak < 65536")" "$(mib "$rss_peak")"
    if [[ $INTEGRITY_OK == 1 ]]; then
        echo "  PASS integrity: every stored big file matches its sha256; files stored match the 2xx answers"
    else
        echo "  FAIL integrity / errors:"
        local p
        for p in "${PROBLEMS[@]}"; do echo "       !!! $p"; done
    fi
}
echo
report | tee "$RESULTS/latest.txt"
echo
log "written to ${RESULTS#"$REPO"/}/latest.txt"
[[ $INTEGRITY_OK == 1 ]]
